// Checkpoints and model files (docs/design.md, Checkpoint format): full, unsharded float32 tensors, written
// atomically.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "lrllm/core/config.h"
#include "lrllm/model/model.h"
#include "lrllm/model/optimizer.h"
#include "lrllm/parallel/topology.h"

namespace lrllm {

// The newest model-file format this lrllm reads and writes; it reads every older one. Version 2 adds /config
// lora_modules (base tensors trained beside the adapters) and is written only by files that have them, so
// every other file stays version 1, readable by older lrllm (docs/design.md, Checkpoint format). Version 3
// adds /config trainable_tokens (the token ids of /model/trainable_tokens/delta's rows), written only by
// files that have them: a version-2 reader would drop the delta and run another model. Version 4 is every
// Llama file, version 5 every file whose low-rank sites compute B silu(A x) (/config lowrank_activation
// silu), which an older reader would run as B A x; a file takes the version of the highest feature it has.
inline constexpr int64_t kFormatVersion = 5;
int64_t format_version_of(const ModelConfig& m);

// Everything beyond weights and moments that an exact resume needs.
struct TrainState {
  int64_t step = 0;
  int64_t tokens_seen = 0;
  uint64_t seed = 0;
  uint64_t data_cursor = 0;  // position of the next training sequence
};

// The model shape stored in a file's /config; the kind and rank of each linear site come from the datasets
// of the blocks (W, or A and B), so a file can mix dense and low-rank sites.
ModelConfig read_model_config(const std::string& path);

// Loads /model into the model; every tensor must exist with the model's shape. A quantized layer reads its
// stored codes, or quantizes the file's float W as it loads.
void load_weights(const std::string& path, Model& model);

// The same for the start of finetuning: everything but the LoRA adapters, which the file need not have.
void load_base_weights(const std::string& path, Model& model);

// Writes path atomically (path.tmp, then rename). Optimizer and state are optional (a model file has none);
// with run, the run's resolved configuration and command line are stored too (root attributes run_config,
// command_line).
void save_checkpoint(const std::string& path, const std::string& mode, Model& model, AdamW* optimizer,
                     const TrainState* state, const Config* run = nullptr);

// Writes a model file of shape c from tensors given one at a time (name under /model and shape, in the order
// listed; values(name) returns each), atomically, never holding more than one tensor: how a converted model
// is written (--mode import).
void save_model_file(const std::string& path, const std::string& mode, const ModelConfig& c,
                     const std::vector<std::pair<std::string, std::vector<int64_t>>>& tensors,
                     const std::function<std::vector<float>(const std::string&)>& values, const Config* run);

// A tensor of a model file written one at a time: stored as float32, or with quantized as codes of the file's
// storage (c.quant, quant_block, quant_double: docs/design.md, Quantized tensors), under the same path.
struct ModelFileTensor {
  std::string name;  // under /model
  std::vector<int64_t> shape;
  bool quantized = false;
};
// The bytes a model file's tensors take as stored: float32 values, and quantized codes with their scales.
struct StoredBytes {
  std::size_t float32 = 0, quantized = 0;
};
// The same, quantizing the tensors so marked as each is written: how a model too large to build in float32
// is written (--mode export of random weights), holding one tensor and its codes at a time.
StoredBytes save_model_file(const std::string& path, const std::string& mode, const ModelConfig& c,
                            const std::vector<ModelFileTensor>& tensors,
                            const std::function<std::vector<float>(const std::string&)>& values,
                            const Config* run);

// The tokenizer folder of a mode that reads model.init: --data.tokenizer_dir when given, else the one the
// model file records (/config tokenizer_dir), else data.tokenizer_dir's default.
std::string tokenizer_dir_for(const Config& cfg);

// The same from a training run under any parallel layout, called by every rank: the full tensors are
// assembled on world rank 0 from each stage's and tensor slice's parts (and ZeRO's optimizer shards), which
// writes the file, so it can be resumed under any other layout, and prints one line (path, MB, seconds).
// optimizer_bounds: each data-parallel rank's shard of the optimizer state (DataParallel::bounds).
void save_checkpoint(const std::string& path, const std::string& mode, Model& model, AdamW& optimizer,
                     const std::vector<std::size_t>& optimizer_bounds, const TrainState& state,
                     const Topology& topo, const Config* run = nullptr);

// Adapter files (docs/design.md, Adapter files): root attribute format of the file --mode export
// --lora.only writes.
inline constexpr const char* kAdapterFormat = "lrllm-adapters";

// The identity of a base model file: a checksum over every dataset under its /model ("fnv1a64:" and 16 hex
// digits). InputError on a file that cannot be read.
std::string base_checksum(const std::string& path);

// Writes the model's trainable tensors alone (its adapters and the tensors trained beside them) with its
// shape and its base's path and checksum, atomically. InputError when the model does not record its base.
void save_adapters(const std::string& path, Model& model, const Config* run);

// The model the options name: --model.init, with the adapters of --lora.init over it when given. The adapter
// file must fit the base (shape, low-rank sites; a base without adapters), and the base's checksum must be
// the one the file records: InputError otherwise.
ModelConfig read_input_model_config(const Config& cfg);

// Loads the weights of that model: the file's, or the base's with the adapter file's over them.
void load_input_weights(const Config& cfg, Model& model);

// The model the options name, whole, on a backend of its own: what every mode that runs a model it does not
// train (eval, generate, export) starts from. device as --device; local_rank picks the GPU.
struct LoadedModel {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Model> model;
};
LoadedModel load_model(const Config& cfg, const std::string& device, int local_rank);

// The adapters (and the tensors trained beside them) of an adapter file, over a model already holding its
// base (load_base_weights).
void load_adapters(const std::string& path, Model& model);

// Loads /optimizer and /state of a checkpoint for a resume (this rank's parts and optimizer range).
void load_training_state(const std::string& path, AdamW& optimizer, TrainState& state);

// "latest" resolves to the newest checkpoint in run_dir; anything else is a path that must exist.
std::string resolve_resume(const std::string& resume, const std::string& run_dir);

// The checkpoints (step, path) of run_dir, oldest first; none when it is not a directory.
std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& run_dir);

// Name of the checkpoint of a step inside run_dir.
std::string checkpoint_path(const std::string& run_dir, int64_t step);

// Deletes all but the newest `keep` checkpoints of run_dir (keep <= 0 keeps all).
void prune_checkpoints(const std::string& run_dir, int keep);

// --mode info: prints a file's config, tensors with shapes and storage types, parameter counts and bytes.
void print_info(const std::string& path);

}  // namespace lrllm

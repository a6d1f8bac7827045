// The training loop of --mode pretrain and --mode finetune: batch -> forward -> loss -> backward ->
// gradient averaging -> optimizer -> metrics -> checkpoint.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "lrllm/backend/backend.h"
#include "lrllm/core/config.h"
#include "lrllm/io/checkpoint.h"
#include "lrllm/io/data.h"
#include "lrllm/model/model.h"
#include "lrllm/model/optimizer.h"
#include "lrllm/parallel/data_parallel.h"
#include "lrllm/parallel/mpi_world.h"
#include "lrllm/parallel/pipeline.h"
#include "lrllm/parallel/topology.h"

namespace lrllm {

// Everything a run needs before its first step. Modes build it inside collective_check, so that a bad option
// or file on any rank stops every rank before work starts.
struct TrainSetup {
  std::string resume;  // the checkpoint resumed from, if any
  ModelConfig mc;
  std::unique_ptr<BatchSource> train, val;
  std::vector<std::shared_ptr<void>> data_files;  // the token files the batch sources read from
  std::string data_summary;                       // one line for the start banner
  int row_len = 0;  // the longest row a batch holds: mc.seq_len, or less in finetuning (model.seq_len)
  int steps = 0;    // the run's optimizer steps: train.steps, or train.epochs over the training sequences
  std::unique_ptr<Topology> topo;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Model> model;
  std::unique_ptr<DataParallel> data_parallel;  // decides the optimizer's shard (ZeRO-1) before AdamW exists
  std::unique_ptr<AdamW> optimizer;
  TrainState state;

  // Checks the parallel layout against mc and the batch (InputError), and resolves row_len (mc.seq_len when
  // unset) and steps; inside the mode's collective_check, once the batch sources exist.
  void check_layout(const Config& cfg, const MpiWorld& comm);
  // Splits the world into the layout's groups, creates the backend on this rank's device, and connects the
  // device transport (NCCL) where tensors live on GPUs: collective, so outside any check that one rank may
  // fail.
  void make_topology(const Config& cfg, const MpiWorld& comm);
  // Creates this rank's share of the model (of mc), its data parallelism and its optimizer state (the shard
  // data parallelism assigns); when resuming, loads weights,
  // moments and state. A fresh start's weights are the mode's to set.
  void build(const Config& cfg);
};

// Mean loss over the first `sequences` sequences of a source, in order, so every evaluation of a run sees the
// same tokens whatever the layout: each data-parallel rank takes a contiguous share, in batches of at most
// batch_size through the pipeline. `sequences` must be a multiple of the data-parallel ranks. Every rank gets
// the result. Training's periodic validation and --mode eval on token files.
double validation_loss(Pipeline& pipeline, const Topology& topo, BatchSource& batcher, uint64_t sequences,
                       int batch_size);

// Runs setup.steps steps from setup.state, writing metrics.h5 and checkpoints (mode names them).
int run_training(const Config& cfg, const MpiWorld& comm, TrainSetup& setup, const std::string& mode);

// The model-shape, low-rank, LoRA and quantization options given must agree with the file the model comes
// from (path, read as file): the same values again, as a requeued job's command line gives them, are
// accepted; a value that differs is an InputError naming both.
void check_options_agree(const Config& cfg, const ModelConfig& file, const std::string& path);

// The model shape a run uses: from the resumed checkpoint, else model.init, else the options. Checks that the
// options given do not contradict the file. Throws InputError.
ModelConfig resolve_model_config(const Config& cfg, const std::string& resume_path);

int run_pretrain(const Config& cfg, const MpiWorld& comm);

}  // namespace lrllm

// Hugging Face transformers folders (docs/design.md, safetensors and Hugging Face folders): the file mapping
// of each architecture, behind one interface that --mode import, --mode export --export.format hf and the
// PEFT adapters (io/peft.h) share. An architecture's mapping is its config.json, its tensor names and how
// each maps onto lrllm's tensors (whole, transposed, or a block of rows of a fused site), and its PEFT
// modules.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "lrllm/core/config.h"

namespace lrllm {

class SafetensorsSet;

// One tensor of the Hugging Face model and the rows of the lrllm tensor it holds.
struct HfTensor {
  std::string hf;     // the full name in the file: "transformer.h.0.attn.c_attn.weight"
  std::string lrllm;  // the name under /model: "h.0/attn/qkv/W"
  std::vector<int64_t> hf_shape;
  // A Conv1D weight, stored [in, out]: lrllm's nn.Linear orientation [out, in] is its transpose.
  bool transposed = false;
  // A block of a fused lrllm tensor: it holds rows [row, row + hf_shape[0]) of lrllm_shape. A whole tensor
  // has row 0 and lrllm_shape its own shape (transposed or not).
  int64_t row = 0;
  std::vector<int64_t> lrllm_shape;
};

// A module PEFT puts an adapter on, and the rows of the lrllm site's output it computes.
struct HfModule {
  LinearSite site;
  std::string name;  // inside a block: "self_attn.q_proj", "attn.c_attn"
  int64_t row = 0, rows = 0;
};

class HfArch {
 public:
  virtual ~HfArch() = default;
  virtual const char* arch() const = 0;        // lrllm's: "gpt2"
  virtual const char* hf_class() const = 0;    // "GPT2LMHeadModel"
  virtual const char* model_type() const = 0;  // config.json's: "gpt2"
  // The model config.json (already parsed, from path) describes; InputError naming path for one that lrllm
  // does not compute the same way. tied: the lm_head is the embedding and the folder need not store it.
  virtual ModelConfig read_config(const std::string& path, const nlohmann::json& j, bool& tied) const = 0;
  virtual std::string config_json(const ModelConfig& m, const std::string& torch_dtype) const = 0;
  // Every tensor of a dense model of shape m, named as in set (which prefix its names have; nullptr: as an
  // export writes them), in lrllm's order: a fused lrllm tensor's parts are consecutive.
  virtual std::vector<HfTensor> tensors(const ModelConfig& m, const SafetensorsSet* set, bool tied) const = 0;
  // A tensor of the folder outside tensors(): returns when it is no weight lrllm lacks (a buffer, a stored
  // copy of a tied lm_head), which the import leaves out; an InputError when it is one.
  virtual void check_extra(const std::string& name, const SafetensorsSet& set,
                           const ModelConfig& m) const = 0;
  // PEFT: the prefix of block l's modules in an adapter file, the modules of each site, and the layers'
  // orientation (PEFT's fan_in_fan_out: a Conv1D model's).
  virtual std::string peft_block(int l) const = 0;
  virtual std::vector<HfModule> peft_modules(const ModelConfig& m) const = 0;
  virtual bool fan_in_fan_out() const = 0;
};

// The mapping of an lrllm architecture.
const HfArch& hf_arch(const std::string& arch);
// The mapping config.json's model_type names (absent: gpt2, which older GPT-2 files leave out), with the
// parsed file; InputError naming the file for one that cannot be read or names another model.
const HfArch& hf_arch_of_config(const std::string& path, nlohmann::json& j);

// Shared by the mappings' read_config: a positive integer field (InputError naming path and field otherwise),
// and a boolean that must hold its default for lrllm to compute what transformers computes.
int hf_positive_field(const std::string& path, const nlohmann::json& j, const char* name);
void hf_require_flag(const std::string& path, const nlohmann::json& j, const char* name, bool expected,
                     const char* model);
// Checks m as validate_model_config does but for the memory (an import streams the model), naming path.
void hf_validate(const std::string& path, const ModelConfig& m);

// The values of an lrllm tensor of set (its HF parts read, transposed and stacked row by row), and the values
// of one HF tensor from its lrllm tensor's.
std::vector<float> hf_gather(const SafetensorsSet& set, const std::vector<const HfTensor*>& parts);
std::vector<float> hf_slice(const HfTensor& t, const std::vector<float>& lrllm_values);

// out[c][r] = in[r][c] for a rows x cols matrix.
void transpose(const float* in, float* out, int64_t rows, int64_t cols);

}  // namespace lrllm

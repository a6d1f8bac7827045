// An architecture described once (docs/design.md, Architectures): its embeddings, the norms and linear sites
// of one block with their widths and tensor-parallel split, and the norm after the blocks. The model
// registers its tensors from it; the stage balancer, the parameter counts (training's banner, --mode info),
// the memory estimate, lora.modules_to_save and the checkpoint reader all read it instead of knowing GPT-2.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "lrllm/core/config.h"

namespace lrllm {

// A norm of the residual stream: a gain "path/w" and, with shift, a bias "path/b", each [d_model]. A block's
// norm feeds a linear site (the first that reads its output), and is registered just before it.
struct NormSpec {
  std::string path;
  bool shift = true;
  LinearSite feeds = LinearSite::qkv;
};

// A linear site of every block.
struct LinearSpec {
  LinearSite site;
  std::string path;         // the module inside a block: "attn/qkv" of "h.0/attn/qkv/W"
  int64_t in = 0, out = 0;  // the whole model's widths, before a tensor-parallel split
  // Tensor parallelism splits the output (column) or the input (row: a projection into the residual
  // stream, whose partial sums the group adds, and which GPT-2 initialises scaled).
  bool column = true;
  std::vector<int64_t> groups;  // the widths of column groups split separately (the fused qkv's q, k, v)
  bool bias = true;
};

struct Architecture {
  std::string token_embedding;     // [vocab_size, d_model], also the lm_head's weight when tied
  std::string position_embedding;  // [seq_len, d_model]; empty: none (rotary positions)
  std::string output_head;         // an untied lm_head [vocab_size, d_model]; empty: tied to token_embedding
  bool rms_norm = false;           // RMSNorm (no shift) instead of LayerNorm
  std::vector<NormSpec> block_norms;  // in the order a block applies them
  std::vector<LinearSpec> sites;      // indexed by LinearSite, the order a block applies them
  NormSpec final_norm;
  // FLOPs of one token, forward and backward: through one block (its linear layers as factorized, and
  // attention over seq_len), and through the lm_head. The stage balancer's costs.
  double block_flops = 0, head_flops = 0;
};

// The description of cfg.arch at cfg's shape.
Architecture describe_architecture(const ModelConfig& cfg);
// Block l's name, the prefix of its tensors: "h.3".
std::string block_name(int l);
// The float tensors of the whole model that are neither linear weights nor adapters, with their sizes:
// embeddings, norms and biases (those lora.modules_to_save may name).
std::vector<std::pair<std::string, std::size_t>> non_linear_tensors(const ModelConfig& cfg);

struct ParamCounts {
  std::size_t embedding = 0;       // token and position tables
  std::size_t linear_dense = 0;    // W of dense linear layers
  std::size_t linear_lowrank = 0;  // A and B of low-rank linear layers
  std::size_t other = 0;           // biases and norms
  std::size_t lora = 0;            // LoRA adapters
  std::size_t saved = 0;           // base tensors trained beside the adapters (counted in their kinds above)
  std::size_t tokens = 0;          // trainable tokens: deltas over chosen wte rows
  std::size_t total() const { return embedding + linear_dense + linear_lowrank + other + lora + tokens; }
};
// The whole model's parameters by kind (saved needs trains_beside_adapters: the model fills it).
ParamCounts count_params(const ModelConfig& cfg);
// The linear layers' weights were every site dense: what a low-rank model's compression is measured against.
std::size_t dense_linear_params(const ModelConfig& cfg);
// Prints parameters by kind and the compression of the linear layers against their dense equivalent.
void print_param_counts(const ParamCounts& counts, const ModelConfig& cfg);

// Checks a model shape (sizes, head split, ranks against layer widths) and that the memory it needs at the
// least (its weights and one sequence's activations) fits in this machine's. Every size is checked in 64-bit
// arithmetic before the model's own int arithmetic sees it. Throws InputError; a shape read from a file goes
// through the same checks as one given as options. Without must_fit_memory the memory is not checked: a
// conversion (--mode import) streams a model it never holds, for a machine that will run it.
void validate_model_config(const ModelConfig& m, bool must_fit_memory = true);

// The bytes of the model's weights as stored (float32, or int8 / NF4 codes for a quantized base), and those
// it needs at the least to run: the weights and one sequence's activations.
double model_weight_bytes(const ModelConfig& m);
double model_memory_estimate(const ModelConfig& m);

}  // namespace lrllm

// The table of a model's tensors: names (the checkpoint's paths under /model), shapes and offsets into one
// flat buffer. Parameters, gradients and both AdamW moments share this layout, which makes the optimizer,
// gradient norm and gradient averaging single passes over contiguous memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace lrllm {

// How a rank's tensor relates to the full tensor of the checkpoint under tensor parallelism: part `part` of
// `parts` along `axis`, which is cut into consecutive groups first, each split alike (the fused qkv's q, k
// and v: so each rank holds the same heads of each, and under grouped-query attention k's and v's groups are
// narrower than q's). axis -1: the rank holds the whole tensor.
struct TensorSplit {
  int axis = -1;
  std::vector<int64_t> groups;  // the groups' full widths along axis (their sum is its extent); empty: one
  int part = 0;
  int parts = 1;
  // Another rank holds the copy that counts: it alone is saved and enters the gradient norm (the replicas of
  // a tensor-parallel group, and the last pipeline stage's copy of the tied embedding).
  bool replica = false;
};

// What a tensor is, given when it is registered: how Model::init_random draws it, whether AdamW decays it,
// and whether it is an adapter (trained, saved and merged as the finetuning's own).
enum class TensorRole {
  embedding,        // wte, wpe: N(0, 0.02)
  norm_gain,        // a LayerNorm's w: 1
  norm_shift,       // a LayerNorm's b: 0
  weight,           // a dense linear layer's W: N(0, 0.02)
  residual_weight,  // the W of a projection into the residual stream: N(0, 0.02 / sqrt(2 n_layer)), GPT-2's
  factor,           // a low-rank layer's A or B: each factor sqrt(std / sqrt(r)), so the product has W's std
  residual_factor,  // the same for a residual projection
  bias,             // 0
  lora_a,           // LoRA's A: uniform in +-1/sqrt(in), PEFT's default
  lora_b,           // LoRA's B: 0, so the adapters start as the identity
  token_delta,      // the trainable tokens' delta over wte rows: 0
};
// AdamW decays the 2-D weights (embeddings, linear weights and factors, adapters), not biases and norms.
bool decays(TensorRole role);
bool is_adapter(TensorRole role);  // lora_a, lora_b, token_delta

struct TensorInfo {
  std::string name;                 // e.g. "h.0/attn/qkv/A"
  std::vector<int64_t> shape;       // this rank's
  std::vector<int64_t> full_shape;  // the checkpoint's
  std::size_t offset = 0;
  std::size_t size = 0;
  TensorRole role = TensorRole::weight;
  TensorSplit split;
  std::size_t full_size() const;  // elements of the full tensor
};

class ParamTable {
 public:
  // Appends a tensor (its local shape); offsets are padded to 16 floats so every tensor starts 64-byte
  // aligned.
  std::size_t add(const std::string& name, std::vector<int64_t> shape, TensorRole role,
                  const TensorSplit& split = {});
  const TensorInfo* find(const std::string& name) const;
  const TensorInfo& at(const std::string& name) const;
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  std::size_t total() const { return total_; }
  std::size_t count() const;  // number of parameters, without padding

 private:
  std::vector<TensorInfo> tensors_;
  std::size_t total_ = 0;
};

std::string shape_string(const std::vector<int64_t>& shape);

// Copies this rank's part of a full tensor (laid out as t.full_shape) into part, or back.
void extract_part(const TensorInfo& t, const float* full, float* part);
void insert_part(const TensorInfo& t, const float* part, float* full);

}  // namespace lrllm

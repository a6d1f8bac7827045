// One linear layer (docs/design.md, Linear layers): a base, dense W[out,in] + b or low-rank A[r,in],
// B[out,r] + b with y = B(Ax) + b (or B silu(Ax) + b, CoLA's form), and optional LoRA adapters lora_A[rl,in],
// lora_B[out,rl] adding (alpha/rl) * lora_B lora_A x. A base can be frozen (finetuning), and a frozen base
// (W, or A and B) can be stored quantized (int8 or NF4), in which case forward and the input gradient
// dequantize one tile of rows at a time.
//
// Under tensor parallelism (Megatron) a layer is column-parallel (each rank computes a slice of the outputs
// from the full input) or row-parallel (each rank holds a slice of the inputs and the outputs are summed).
// A dense layer sums the d-wide tensor (dx of a column-parallel layer in backward, y of a row-parallel one in
// forward). A low-rank layer sums the r-wide intermediate instead: Ax = sum over ranks of A_part x_part, and
// dx = (sum over ranks of dy_part B_part) A; the factor on the other side is replicated.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "lrllm/backend/backend.h"
#include "lrllm/model/params.h"
#include "lrllm/model/quant.h"

namespace lrllm {

// Sums a tensor in place over the tensor-parallel group.
class TensorReducer {
 public:
  virtual ~TensorReducer() = default;
  virtual void allreduce_sum(float* x, std::size_t n) const = 0;
};

enum class TpMode { none, column, row };

// A layer's tensor-parallel slice: part `part` of `parts`; groups: the full widths of the output's groups,
// each split alike (the fused qkv's q, k and v, so each rank gets the same heads of each; empty: one).
struct LinearTp {
  TpMode mode = TpMode::none;
  int part = 0, parts = 1;
  std::vector<int64_t> groups;
  const TensorReducer* group = nullptr;
};

// Where a tensor lives: in the trainable buffers (params, with gradients) or in the frozen buffer.
struct TensorRef {
  std::size_t offset = 0;
  bool frozen = false;
};

// The model's flat buffers, as a layer reads them.
struct WeightBuffers {
  const float* params = nullptr;
  float* grads = nullptr;
  const float* frozen = nullptr;
  const float* at(TensorRef r) const { return (r.frozen ? frozen : params) + r.offset; }
  // nullptr for a frozen tensor: it has no gradient.
  float* grad(TensorRef r) const { return r.frozen ? nullptr : grads + r.offset; }
};

// Scratch a layer may use during one call.
struct LinearScratch {
  float* dmid = nullptr;  // [N, max(r, rl)]
  float* tile = nullptr;  // dequantized rows of a quantized W, A or B
  std::size_t tile_floats = 0;
  float* lora_x = nullptr;  // [N, in]: the adapters' dropped-out input, then their input gradient
  float* act = nullptr;     // [N, r]: silu(A x) of a silu site (recomputed in backward)
};

// y[N, out] = x[N, in] W^T and dx[N, in] = dy[N, out] W for a quantized W [out, in], dequantizing as many
// rows of W at a time as fit in tile_floats, so that W is never expanded whole.
void quantized_matmul(Backend& be, const QuantizedTensor& w, float* tile, std::size_t tile_floats,
                      const float* x, float* y, int N);
void quantized_matmul_input_grad(Backend& be, const QuantizedTensor& w, float* tile, std::size_t tile_floats,
                                 const float* dy, float* dx, int N);

class Linear {
 public:
  Linear() = default;
  // Registers the layer's tensors under prefix (e.g. "h.0/attn/qkv"): base tensors in `base` (the trainable
  // table when pretraining, the frozen one when finetuning), adapters in `trainable`. rank 0: a dense base;
  // lora_rank 0: no adapters; quantized: a base whose W, or A and B, are held in quantized storage
  // (set_quantized).
  // in and out are the full layer's; tp slices them (adapters and quantization need tp.parts == 1).
  // bias_trains: a frozen base's bias trains in full beside the adapters (lora.modules_to_save).
  // residual: the layer projects into the residual stream (its weights' TensorRole, hence their init).
  // has_bias: false for architectures without biases (Llama).
  // silu: a low-rank base computes y = B silu(A x) + b (lowrank.activation silu); no effect on a dense one.
  Linear(ParamTable& trainable, ParamTable& base, bool base_frozen, const std::string& prefix, int in,
         int out, int rank, int lora_rank, double lora_alpha, bool quantized, bool bias_trains = false,
         const LinearTp& tp = {}, bool residual = false, bool has_bias = true, bool silu = false);

  // This rank's widths.
  int in() const { return in_; }
  int out() const { return out_; }
  int rank() const { return rank_; }
  int lora_rank() const { return lora_rank_; }
  bool lowrank() const { return rank_ > 0; }
  bool has_bias() const { return has_bias_; }
  bool silu() const { return silu_; }
  const std::string& prefix() const { return prefix_; }
  std::size_t weight_count()
      const;  // parameters in W or A and B of the full layer, without bias and adapters
  // The quantized base: W (dense), or A and B (low-rank).
  void set_quantized(const QuantizedTensor* w_or_a, const QuantizedTensor* b = nullptr) {
    qw_ = w_or_a;
    qb_ = b;
  }

  // y[N,out] = base(x) + adapters(x * lora_mask). mid[N,r] (low-rank base: A x, before silu) and
  // lora_mid[N,rl] are kept for backward; a silu site needs s.act. lora_mask [N,in] is LoRA dropout's mask (0
  // or 1/(1-p)), or nullptr for none.
  void forward(Backend& be, const WeightBuffers& w, const LinearScratch& s, const float* x, float* y,
               float* mid, float* lora_mid, const float* lora_mask, int N) const;
  // Accumulates gradients of the trainable tensors and writes dx[N,in]; lora_mask as in forward.
  void backward(Backend& be, const WeightBuffers& w, const LinearScratch& s, const float* x, const float* mid,
                const float* lora_mid, const float* lora_mask, const float* dy, float* dx, int N) const;

  TensorRef w, a, b_mat, bias, lora_a, lora_b;

 private:
  // The row-parallel sum of a partial result [N, n], and the column-parallel sum of an input gradient.
  void reduce(float* x, std::size_t n) const;

  std::string prefix_;
  int in_ = 0, out_ = 0, full_in_ = 0, full_out_ = 0, rank_ = 0, lora_rank_ = 0;
  LinearTp tp_;
  float lora_scale_ = 0.0f;
  bool quantized_ = false;
  bool has_bias_ = true;
  bool silu_ = false;
  const QuantizedTensor* qw_ = nullptr;  // W, or A of a low-rank base
  const QuantizedTensor* qb_ = nullptr;  // B of a low-rank base
};

// lowrank.refactor_every's anti-drift step (docs/design.md, Linear layers): every low-rank site of the table
// (the A and B of TensorRole factor or residual_factor) is replaced by balanced factors of the same product,
// B' = Qb U S^1/2 and A' = S^1/2 V^T Qa^T from thin QRs of B and A^T and the SVD of the r x r core, in
// double on the host. Deterministic: the same parameters give the same factors on every rank. Needs whole
// tensors (no tensor parallelism). Returns the number of sites refactored.
int refactor_factors(Backend& be, const ParamTable& table, float* params);

}  // namespace lrllm

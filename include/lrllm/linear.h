// One linear layer of the two kinds pretraining uses (DESIGN §3): dense W[out,in] + b, or low-rank
// A[r,in], B[out,r] + b with y = B(Ax) + b. Weights live in the model's flat buffers.
#pragma once

#include <cstddef>
#include <string>

#include "lrllm/backend.h"
#include "lrllm/params.h"

namespace lrllm {

class Linear {
 public:
  Linear() = default;
  // Registers the layer's tensors under prefix (e.g. "h.0/attn/qkv"); rank 0 makes it dense.
  Linear(ParamTable& table, const std::string& prefix, int in, int out, int rank);

  int in() const { return in_; }
  int out() const { return out_; }
  int rank() const { return rank_; }
  bool lowrank() const { return rank_ > 0; }
  std::size_t weight_count() const;  // parameters in W or A and B, without the bias

  // y[N,out] = x W^T + b. For low rank, mid[N,r] = x A^T is kept for backward.
  void forward(Backend& be, const float* params, const float* x, float* y, float* mid, int N) const;
  // Accumulates weight gradients into grads and writes dx[N,in]; dmid[N,r] is scratch for low rank.
  void backward(Backend& be, const float* params, float* grads, const float* x, const float* mid,
                const float* dy, float* dx, float* dmid, int N) const;

  // Offsets of the tensors in the flat buffers (W unused for low rank; A and B unused for dense).
  std::size_t w = 0, a = 0, b_mat = 0, bias = 0;

 private:
  int in_ = 0, out_ = 0, rank_ = 0;
};

}  // namespace lrllm

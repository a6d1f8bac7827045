#include "lrllm/linear.h"

namespace lrllm {

Linear::Linear(ParamTable& table, const std::string& prefix, int in, int out, int rank)
    : in_(in), out_(out), rank_(rank) {
  if (rank > 0) {
    a = table.add(prefix + "/A", {rank, in});
    b_mat = table.add(prefix + "/B", {out, rank});
  } else {
    w = table.add(prefix + "/W", {out, in});
  }
  bias = table.add(prefix + "/b", {out});
}

std::size_t Linear::weight_count() const {
  return rank_ > 0 ? static_cast<std::size_t>(rank_) * (in_ + out_) : static_cast<std::size_t>(in_) * out_;
}

void Linear::forward(Backend& be, const float* params, const float* x, float* y, float* mid, int N) const {
  if (rank_ > 0) {
    be.matmul(mid, x, params + a, N, rank_, in_, false, true, 1.0f, 0.0f);
    be.matmul(y, mid, params + b_mat, N, out_, rank_, false, true, 1.0f, 0.0f);
  } else {
    be.matmul(y, x, params + w, N, out_, in_, false, true, 1.0f, 0.0f);
  }
  be.add_bias(y, params + bias, N, out_);
}

void Linear::backward(Backend& be, const float* params, float* grads, const float* x, const float* mid,
                      const float* dy, float* dx, float* dmid, int N) const {
  be.bias_backward(grads + bias, dy, N, out_);
  if (rank_ > 0) {
    be.matmul(grads + b_mat, dy, mid, out_, rank_, N, true, false, 1.0f, 1.0f);     // dB += dy^T mid
    be.matmul(dmid, dy, params + b_mat, N, rank_, out_, false, false, 1.0f, 0.0f);  // dmid = dy B
    be.matmul(grads + a, dmid, x, rank_, in_, N, true, false, 1.0f, 1.0f);          // dA += dmid^T x
    be.matmul(dx, dmid, params + a, N, in_, rank_, false, false, 1.0f, 0.0f);       // dx = dmid A
  } else {
    be.matmul(grads + w, dy, x, out_, in_, N, true, false, 1.0f, 1.0f);     // dW += dy^T x
    be.matmul(dx, dy, params + w, N, in_, out_, false, false, 1.0f, 0.0f);  // dx = dy W
  }
}

}  // namespace lrllm

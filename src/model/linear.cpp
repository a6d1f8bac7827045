#include "lrllm/model/linear.h"

#include <algorithm>

#include "lrllm/core/common.h"

namespace lrllm {

Linear::Linear(ParamTable& trainable, ParamTable& base, bool base_frozen, const std::string& prefix, int in,
               int out, int rank, int lora_rank, double lora_alpha, bool quantized, bool bias_trains,
               const LinearTp& tp, bool residual, bool has_bias)
    : prefix_(prefix),
      in_(tp.mode == TpMode::row ? in / tp.parts : in),
      out_(tp.mode == TpMode::column ? out / tp.parts : out),
      full_in_(in),
      full_out_(out),
      rank_(rank),
      lora_rank_(lora_rank),
      tp_(tp),
      quantized_(quantized),
      has_bias_(has_bias) {
  LRLLM_CHECK(tp.parts == 1 || (lora_rank == 0 && !quantized), "Linear", "tensor parallelism of " + prefix);
  auto add = [&](ParamTable& table, bool frozen, const std::string& name, std::vector<int64_t> shape,
                 TensorRole role, TensorSplit split) {
    return TensorRef{table.add(prefix + "/" + name, std::move(shape), role, split), frozen};
  };
  const TensorRole weight_role = residual ? TensorRole::residual_weight : TensorRole::weight;
  const TensorRole factor_role = residual ? TensorRole::residual_factor : TensorRole::factor;
  // Column-parallel: the out axis of W, B and b is split (in groups); row-parallel: the in axis of W and A.
  const bool split = tp.parts > 1;
  const TensorSplit whole{-1, {}, 0, 1, split && tp.part > 0};
  const TensorSplit outs{0, tp.groups, tp.part, tp.parts, false};
  const TensorSplit ins{1, {}, tp.part, tp.parts, false};
  const bool column = tp.mode == TpMode::column, row = tp.mode == TpMode::row;
  // A quantized base's W, or A and B, live in the model's quantized storage.
  if (!quantized && rank > 0) {
    a = add(base, base_frozen, "A", {rank, in_}, factor_role, row ? ins : whole);
    b_mat = add(base, base_frozen, "B", {out_, rank}, factor_role, column ? outs : whole);
  } else if (!quantized) {
    w = add(base, base_frozen, "W", {out_, in_}, weight_role, column ? outs : row ? ins : whole);
  }
  if (has_bias)
    bias = bias_trains ? add(trainable, false, "b", {out_}, TensorRole::bias, column ? outs : whole)
                       : add(base, base_frozen, "b", {out_}, TensorRole::bias, column ? outs : whole);
  if (lora_rank > 0) {
    lora_a = add(trainable, false, "lora_A", {lora_rank, in}, TensorRole::lora_a, whole);
    lora_b = add(trainable, false, "lora_B", {out, lora_rank}, TensorRole::lora_b, whole);
    lora_scale_ = static_cast<float>(lora_alpha / lora_rank);
  }
}

std::size_t Linear::weight_count() const {
  return rank_ > 0 ? static_cast<std::size_t>(rank_) * (full_in_ + full_out_)
                   : static_cast<std::size_t>(full_in_) * full_out_;
}

void Linear::reduce(float* x, std::size_t n) const {
  if (tp_.parts > 1) tp_.group->allreduce_sum(x, n);
}

namespace {

// Calls use(o0, rows, in, out) for each tile of rows [o0, o0 + rows) of W [out, in], dequantized into tile.
template <typename Use>
void for_each_tile(Backend& be, const QuantizedTensor& w, float* tile, std::size_t tile_floats, Use use) {
  const int out = static_cast<int>(w.shape.at(0)), in = static_cast<int>(w.shape.at(1));
  const int tile_rows = static_cast<int>(std::max<std::size_t>(1, tile_floats / in));
  for (int o0 = 0; o0 < out; o0 += tile_rows) {
    const int rows = std::min(tile_rows, out - o0);
    be.dequantize(tile, w, static_cast<std::size_t>(o0) * in, static_cast<std::size_t>(rows) * in);
    use(o0, rows, in, out);
  }
}

}  // namespace

void quantized_matmul(Backend& be, const QuantizedTensor& w, float* tile, std::size_t tile_floats,
                      const float* x, float* y, int N) {
  for_each_tile(be, w, tile, tile_floats, [&](int o0, int rows, int in, int out) {
    // y[:, o0:o0+rows] = x tile^T
    be.matmul_strided(y + o0, x, tile, N, rows, in, false, true, 1.0f, 0.0f, in, in, out);
  });
}

void quantized_matmul_input_grad(Backend& be, const QuantizedTensor& w, float* tile, std::size_t tile_floats,
                                 const float* dy, float* dx, int N) {
  for_each_tile(be, w, tile, tile_floats, [&](int o0, int rows, int in, int out) {
    // dx += dy[:, o0:o0+rows] tile
    be.matmul_strided(dx, dy + o0, tile, N, in, rows, false, false, 1.0f, o0 == 0 ? 0.0f : 1.0f, out, in, in);
  });
}

void Linear::forward(Backend& be, const WeightBuffers& wb, const LinearScratch& s, const float* x, float* y,
                     float* mid, float* lora_mid, const float* lora_mask, int N) const {
  if (quantized_ && rank_ > 0) {
    quantized_matmul(be, *qw_, s.tile, s.tile_floats, x, mid, N);
    quantized_matmul(be, *qb_, s.tile, s.tile_floats, mid, y, N);
  } else if (quantized_) {
    quantized_matmul(be, *qw_, s.tile, s.tile_floats, x, y, N);
  } else if (rank_ > 0) {
    be.matmul(mid, x, wb.at(a), N, rank_, in_, false, true, 1.0f, 0.0f);
    if (tp_.mode == TpMode::row) reduce(mid, static_cast<std::size_t>(N) * rank_);
    be.matmul(y, mid, wb.at(b_mat), N, out_, rank_, false, true, 1.0f, 0.0f);
  } else {
    be.matmul(y, x, wb.at(w), N, out_, in_, false, true, 1.0f, 0.0f);
    if (tp_.mode == TpMode::row) reduce(y, static_cast<std::size_t>(N) * out_);
  }
  if (has_bias_) be.add_bias(y, wb.at(bias), N, out_);
  if (lora_rank_ > 0) {
    const float* lx = x;
    if (lora_mask != nullptr) {
      be.mul(s.lora_x, x, lora_mask, static_cast<std::size_t>(N) * in_);
      lx = s.lora_x;
    }
    be.matmul(lora_mid, lx, wb.at(lora_a), N, lora_rank_, in_, false, true, 1.0f, 0.0f);
    be.matmul(y, lora_mid, wb.at(lora_b), N, out_, lora_rank_, false, true, lora_scale_, 1.0f);
  }
}

void Linear::backward(Backend& be, const WeightBuffers& wb, const LinearScratch& s, const float* x,
                      const float* mid, const float* lora_mid, const float* lora_mask, const float* dy,
                      float* dx, int N) const {
  if (float* g = has_bias_ ? wb.grad(bias) : nullptr) be.bias_backward(g, dy, N, out_);
  if (quantized_ && rank_ > 0) {
    quantized_matmul_input_grad(be, *qb_, s.tile, s.tile_floats, dy, s.dmid, N);  // dmid = dy B
    quantized_matmul_input_grad(be, *qw_, s.tile, s.tile_floats, s.dmid, dx, N);  // dx = dmid A
  } else if (quantized_) {
    quantized_matmul_input_grad(be, *qw_, s.tile, s.tile_floats, dy, dx, N);
  } else if (rank_ > 0) {
    if (float* g = wb.grad(b_mat))
      be.matmul(g, dy, mid, out_, rank_, N, true, false, 1.0f, 1.0f);               // dB += dy^T mid
    be.matmul(s.dmid, dy, wb.at(b_mat), N, rank_, out_, false, false, 1.0f, 0.0f);  // dmid = dy B
    if (tp_.mode == TpMode::column) reduce(s.dmid, static_cast<std::size_t>(N) * rank_);
    if (float* g = wb.grad(a))
      be.matmul(g, s.dmid, x, rank_, in_, N, true, false, 1.0f, 1.0f);         // dA += dmid^T x
    be.matmul(dx, s.dmid, wb.at(a), N, in_, rank_, false, false, 1.0f, 0.0f);  // dx = dmid A
  } else {
    if (float* g = wb.grad(w)) be.matmul(g, dy, x, out_, in_, N, true, false, 1.0f, 1.0f);  // dW += dy^T x
    be.matmul(dx, dy, wb.at(w), N, in_, out_, false, false, 1.0f, 0.0f);                    // dx = dy W
    if (tp_.mode == TpMode::column) reduce(dx, static_cast<std::size_t>(N) * in_);
  }
  if (lora_rank_ > 0) {
    // y += s * lora_mid lora_B^T with lora_mid = x lora_A^T:
    be.matmul(wb.grad(lora_b), dy, lora_mid, out_, lora_rank_, N, true, false, lora_scale_, 1.0f);
    be.matmul(s.dmid, dy, wb.at(lora_b), N, lora_rank_, out_, false, false, lora_scale_, 0.0f);
    if (lora_mask == nullptr) {
      be.matmul(wb.grad(lora_a), s.dmid, x, lora_rank_, in_, N, true, false, 1.0f, 1.0f);
      be.matmul(dx, s.dmid, wb.at(lora_a), N, in_, lora_rank_, false, false, 1.0f, 1.0f);
    } else {
      // The adapters saw x * mask: rebuild it for dA, then route their input gradient through the mask.
      const std::size_t n = static_cast<std::size_t>(N) * in_;
      be.mul(s.lora_x, x, lora_mask, n);
      be.matmul(wb.grad(lora_a), s.dmid, s.lora_x, lora_rank_, in_, N, true, false, 1.0f, 1.0f);
      be.matmul(s.lora_x, s.dmid, wb.at(lora_a), N, in_, lora_rank_, false, false, 1.0f, 0.0f);
      be.mul(s.lora_x, s.lora_x, lora_mask, n);
      be.add(dx, dx, s.lora_x, n);
    }
  }
}

}  // namespace lrllm

#include "lrllm/model/linear.h"

#include <lapacke.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "lrllm/core/common.h"

namespace lrllm {

Linear::Linear(ParamTable& trainable, ParamTable& base, bool base_frozen, const std::string& prefix, int in,
               int out, int rank, int lora_rank, double lora_alpha, bool quantized, bool bias_trains,
               const LinearTp& tp, bool residual, bool has_bias, bool silu)
    : prefix_(prefix),
      in_(tp.mode == TpMode::row ? in / tp.parts : in),
      out_(tp.mode == TpMode::column ? out / tp.parts : out),
      full_in_(in),
      full_out_(out),
      rank_(rank),
      lora_rank_(lora_rank),
      tp_(tp),
      quantized_(quantized),
      has_bias_(has_bias),
      silu_(silu && rank > 0) {
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
  // mid keeps A x, before silu: backward needs it for silu' and recomputes silu(mid) from it, so a silu site
  // keeps no more activations than a plain one.
  const std::size_t n_mid = static_cast<std::size_t>(N) * rank_;
  const float* b_in = mid;
  if (silu_) b_in = s.act;
  if (quantized_ && rank_ > 0) {
    quantized_matmul(be, *qw_, s.tile, s.tile_floats, x, mid, N);
    if (silu_) be.silu_forward(s.act, mid, n_mid);
    quantized_matmul(be, *qb_, s.tile, s.tile_floats, b_in, y, N);
  } else if (quantized_) {
    quantized_matmul(be, *qw_, s.tile, s.tile_floats, x, y, N);
  } else if (rank_ > 0) {
    be.matmul(mid, x, wb.at(a), N, rank_, in_, false, true, 1.0f, 0.0f);
    if (tp_.mode == TpMode::row) reduce(mid, n_mid);
    if (silu_) be.silu_forward(s.act, mid, n_mid);
    be.matmul(y, b_in, wb.at(b_mat), N, out_, rank_, false, true, 1.0f, 0.0f);
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
  const std::size_t n_mid = static_cast<std::size_t>(N) * rank_;
  if (quantized_ && rank_ > 0) {
    quantized_matmul_input_grad(be, *qb_, s.tile, s.tile_floats, dy, s.dmid, N);  // dmid = dy B
    if (silu_) be.silu_backward(s.dmid, mid, s.dmid, n_mid);                      // through silu(A x)
    quantized_matmul_input_grad(be, *qw_, s.tile, s.tile_floats, s.dmid, dx, N);  // dx = dmid A
  } else if (quantized_) {
    quantized_matmul_input_grad(be, *qw_, s.tile, s.tile_floats, dy, dx, N);
  } else if (rank_ > 0) {
    // B's input: A x, or silu(A x) recomputed from the kept pre-activation.
    const float* b_in = mid;
    if (silu_) {
      be.silu_forward(s.act, mid, n_mid);
      b_in = s.act;
    }
    if (float* g = wb.grad(b_mat))
      be.matmul(g, dy, b_in, out_, rank_, N, true, false, 1.0f, 1.0f);              // dB += dy^T b_in
    be.matmul(s.dmid, dy, wb.at(b_mat), N, rank_, out_, false, false, 1.0f, 0.0f);  // dmid = dy B
    if (tp_.mode == TpMode::column) reduce(s.dmid, n_mid);
    // After the column-parallel sum: silu' applies to the whole gradient of silu(A x), not to a part.
    if (silu_) be.silu_backward(s.dmid, mid, s.dmid, n_mid);
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

namespace {

// Q [rows, r] (row-major, in place of m) and R [r, r] of m = Q R, by Householder (LAPACK dgeqrf, dorgqr).
void thin_qr(std::vector<double>& m, int rows, int r, std::vector<double>& R) {
  std::vector<double> tau(r);
  lapack_int info = LAPACKE_dgeqrf(LAPACK_ROW_MAJOR, rows, r, m.data(), r, tau.data());
  if (info != 0)
    fail_call("LAPACKE_dgeqrf", strprintf("info %d on %d x %d", info, rows, r), __FILE__, __LINE__);
  R.assign(static_cast<std::size_t>(r) * r, 0.0);
  for (int i = 0; i < r; ++i)
    for (int j = i; j < r; ++j) R[i * r + j] = m[static_cast<std::size_t>(i) * r + j];
  info = LAPACKE_dorgqr(LAPACK_ROW_MAJOR, rows, r, r, m.data(), r, tau.data());
  if (info != 0)
    fail_call("LAPACKE_dorgqr", strprintf("info %d on %d x %d", info, rows, r), __FILE__, __LINE__);
}

}  // namespace

int refactor_factors(Backend& be, const ParamTable& table, float* params) {
  int sites = 0;
  for (const TensorInfo& ta : table.tensors()) {
    if ((ta.role != TensorRole::factor && ta.role != TensorRole::residual_factor) || !ta.name.ends_with("/A"))
      continue;
    const TensorInfo& tb = table.at(ta.name.substr(0, ta.name.size() - 1) + "B");
    LRLLM_CHECK(ta.split.parts == 1 && tb.split.parts == 1, "refactor_factors",
                "a tensor-parallel " + ta.name);
    const int r = static_cast<int>(ta.shape[0]), in = static_cast<int>(ta.shape[1]);
    const int out = static_cast<int>(tb.shape[0]);
    std::vector<float> a(ta.size), b(tb.size);
    be.to_host(a.data(), params + ta.offset, a.size() * sizeof(float));
    be.to_host(b.data(), params + tb.offset, b.size() * sizeof(float));
    // B = Qb Rb and A^T = Qa Ra, so B A = Qb (Rb Ra^T) Qa^T; the r x r core Rb Ra^T = U S V^T gives
    // B' = Qb U S^1/2 and A' = S^1/2 V^T Qa^T: the same product (to rounding), with B'^T B' = A' A'^T = S.
    std::vector<double> qb(b.begin(), b.end()), qa(static_cast<std::size_t>(in) * r), rb, ra;
    for (int k = 0; k < r; ++k)
      for (int i = 0; i < in; ++i)
        qa[static_cast<std::size_t>(i) * r + k] = a[static_cast<std::size_t>(k) * in + i];
    thin_qr(qb, out, r, rb);
    thin_qr(qa, in, r, ra);
    std::vector<double> core(static_cast<std::size_t>(r) * r, 0.0);
    for (int i = 0; i < r; ++i)
      for (int j = 0; j < r; ++j)
        for (int k = 0; k < r; ++k) core[i * r + j] += rb[i * r + k] * ra[j * r + k];
    std::vector<double> sv(r), u(static_cast<std::size_t>(r) * r), vt(static_cast<std::size_t>(r) * r);
    const lapack_int info =
        LAPACKE_dgesdd(LAPACK_ROW_MAJOR, 'S', r, r, core.data(), r, sv.data(), u.data(), r, vt.data(), r);
    if (info != 0)
      fail_call("LAPACKE_dgesdd", strprintf("info %d on %d x %d", info, r, r), __FILE__, __LINE__);
    for (int k = 0; k < r; ++k) {
      const double root = std::sqrt(sv[k]);
      for (int o = 0; o < out; ++o) {
        double v = 0;
        for (int j = 0; j < r; ++j) v += qb[static_cast<std::size_t>(o) * r + j] * u[j * r + k];
        b[static_cast<std::size_t>(o) * r + k] = static_cast<float>(v * root);
      }
      for (int i = 0; i < in; ++i) {
        double v = 0;
        for (int j = 0; j < r; ++j) v += vt[k * r + j] * qa[static_cast<std::size_t>(i) * r + j];
        a[static_cast<std::size_t>(k) * in + i] = static_cast<float>(v * root);
      }
    }
    be.to_device(params + ta.offset, a.data(), a.size() * sizeof(float));
    be.to_device(params + tb.offset, b.data(), b.size() * sizeof(float));
    ++sites;
  }
  return sites;
}

}  // namespace lrllm

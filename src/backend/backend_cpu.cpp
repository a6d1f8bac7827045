// CPU backend: OpenBLAS (OpenMP build) for matrix products, OpenMP loops for the rest. Reductions use a
// fixed chunking so results do not depend on the thread count's scheduling, which keeps resumed runs exact.
#include <cblas.h>
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "lrllm/backend/backend.h"
#include "lrllm/core/common.h"
#include "lrllm/core/rng.h"

namespace lrllm {
namespace {

constexpr float kLayerNormEps = 1e-5f;
constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2/pi)

// Rows of a reduction are split into this many fixed chunks, summed in order.
constexpr int kReduceChunks = 64;

// exp(x) to about 2 ulp for x in [-87, 88] (clamped outside): Cody-Waite range reduction to r in [-ln2/2,
// ln2/2], a degree-6 polynomial, and 2^n assembled in the exponent bits. Written out so the compiler
// vectorises it (libm's expf is a scalar call), which matters for the softmax over a 50257-word vocabulary.
[[gnu::always_inline]] inline float exp_approx(float x) {
  // Conditional moves, not std::min/max, so the loops calling this stay free of branches and vectorise.
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer in plain vector arithmetic.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r -= n * -2.12194440e-4f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// tanh through the vectorisable exp: 1 - 2 / (e^{2u} + 1). Its absolute error stays near float epsilon,
// which is what GELU needs (it multiplies tanh by x and adds 1).
[[gnu::always_inline]] inline float tanh_approx(float u) {
  return 1.0f - 2.0f / (exp_approx(2.0f * u) + 1.0f);
}

void* aligned_zeroed(std::size_t bytes) {
  if (bytes == 0) bytes = 64;
  void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  if (p == nullptr) throw RuntimeError(strprintf("out of host memory allocating %zu bytes", bytes));
  std::memset(p, 0, bytes);
  return p;
}

class CpuBackend final : public Backend {
 public:
  std::string name() const override { return "cpu"; }

  float* alloc(std::size_t count) override {
    return static_cast<float*>(aligned_zeroed(count * sizeof(float)));
  }
  int32_t* alloc_int(std::size_t count) override {
    return static_cast<int32_t*>(aligned_zeroed(count * sizeof(int32_t)));
  }
  void release(void* ptr) override { std::free(ptr); }
  // An empty transfer may come with null pointers (an empty tensor table), which memcpy must not see.
  void to_device(void* dst, const void* src, std::size_t bytes) override {
    if (bytes > 0) std::memcpy(dst, src, bytes);
  }
  void to_host(void* dst, const void* src, std::size_t bytes) override {
    if (bytes > 0) std::memcpy(dst, src, bytes);
  }
  void fill(float* x, std::size_t n, float value) override { std::fill(x, x + n, value); }
  void copy(float* dst, const float* src, std::size_t n) override {
    if (n > 0) std::memcpy(dst, src, n * sizeof(float));
  }

  void matmul_strided(float* C, const float* A, const float* B, int M, int N, int K, bool trans_a,
                      bool trans_b, float alpha, float beta, int lda, int ldb, int ldc) override {
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, M, N,
                K, alpha, A, lda, B, ldb, beta, C, ldc);
  }

  void add_bias(float* out, const float* bias, int N, int C) override {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; ++n) {
      float* row = out + static_cast<std::size_t>(n) * C;
      for (int c = 0; c < C; ++c) row[c] += bias[c];
    }
  }

  void bias_backward(float* dbias, const float* dout, int N, int C) override {
    column_sums(dout, N, C, [&](int c, double s) { dbias[c] += static_cast<float>(s); });
  }

  void add(float* out, const float* a, const float* b, std::size_t n) override {
#pragma omp parallel for schedule(static)
    for (std::size_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
  }

  void mul(float* out, const float* a, const float* b, std::size_t n) override {
#pragma omp parallel for simd schedule(static)
    for (std::size_t i = 0; i < n; ++i) out[i] = a[i] * b[i];
  }

  void scale(float* x, std::size_t n, float s) override {
#pragma omp parallel for schedule(static)
    for (std::size_t i = 0; i < n; ++i) x[i] *= s;
  }

  double sum_squares(const float* x, std::size_t n) override {
    double partial[kReduceChunks] = {};
    const std::size_t chunk = (n + kReduceChunks - 1) / kReduceChunks;
#pragma omp parallel for schedule(static)
    for (int k = 0; k < kReduceChunks; ++k) {
      const std::size_t lo = std::min(n, k * chunk), hi = std::min(n, lo + chunk);
      double s = 0;
      for (std::size_t i = lo; i < hi; ++i) s += static_cast<double>(x[i]) * x[i];
      partial[k] = s;
    }
    double total = 0;
    for (double p : partial) total += p;
    return total;
  }

  void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* w,
                         const float* b, int N, int C) override {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; ++n) {
      const float* x = inp + static_cast<std::size_t>(n) * C;
      float* y = out + static_cast<std::size_t>(n) * C;
      double s = 0;
      for (int c = 0; c < C; ++c) s += x[c];
      const float m = static_cast<float>(s / C);
      double var = 0;
      for (int c = 0; c < C; ++c) var += static_cast<double>(x[c] - m) * (x[c] - m);
      const float r = 1.0f / std::sqrt(static_cast<float>(var / C) + kLayerNormEps);
      for (int c = 0; c < C; ++c) y[c] = (x[c] - m) * r * w[c] + b[c];
      mean[n] = m;
      rstd[n] = r;
    }
  }

  void layernorm_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp,
                          const float* w, const float* mean, const float* rstd, int N, int C) override {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; ++n) {
      const std::size_t off = static_cast<std::size_t>(n) * C;
      const float* dy = dout + off;
      const float* x = inp + off;
      const float m = mean[n], r = rstd[n];
      double sum_dxhat = 0, sum_dxhat_xhat = 0;
      for (int c = 0; c < C; ++c) {
        const float xhat = (x[c] - m) * r;
        const float dxhat = dy[c] * w[c];
        sum_dxhat += dxhat;
        sum_dxhat_xhat += static_cast<double>(dxhat) * xhat;
      }
      const float mean_dxhat = static_cast<float>(sum_dxhat / C);
      const float mean_dxhat_xhat = static_cast<float>(sum_dxhat_xhat / C);
      float* dx = dinp + off;
      for (int c = 0; c < C; ++c) {
        const float xhat = (x[c] - m) * r;
        dx[c] += r * (dy[c] * w[c] - mean_dxhat - xhat * mean_dxhat_xhat);
      }
    }
    // dw = sum_n dout * xhat, db = sum_n dout, reduced over rows in fixed chunks.
    std::vector<double> part_w(static_cast<std::size_t>(kReduceChunks) * C), part_b(part_w.size());
    const int chunk = (N + kReduceChunks - 1) / kReduceChunks;
#pragma omp parallel for schedule(static)
    for (int k = 0; k < kReduceChunks; ++k) {
      double* pw = part_w.data() + static_cast<std::size_t>(k) * C;
      double* pb = part_b.data() + static_cast<std::size_t>(k) * C;
      for (int n = k * chunk; n < std::min(N, (k + 1) * chunk); ++n) {
        const std::size_t off = static_cast<std::size_t>(n) * C;
        for (int c = 0; c < C; ++c) {
          const float xhat = (inp[off + c] - mean[n]) * rstd[n];
          pw[c] += static_cast<double>(dout[off + c]) * xhat;
          pb[c] += dout[off + c];
        }
      }
    }
    for (int c = 0; c < C; ++c) {
      double sw = 0, sb = 0;
      for (int k = 0; k < kReduceChunks; ++k) {
        sw += part_w[static_cast<std::size_t>(k) * C + c];
        sb += part_b[static_cast<std::size_t>(k) * C + c];
      }
      dw[c] += static_cast<float>(sw);
      db[c] += static_cast<float>(sb);
    }
  }

  void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* w, int N, int C,
                       float eps) override {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; ++n) {
      const float* x = inp + static_cast<std::size_t>(n) * C;
      float* y = out + static_cast<std::size_t>(n) * C;
      double ss = 0;
      for (int c = 0; c < C; ++c) ss += static_cast<double>(x[c]) * x[c];
      const float r = 1.0f / std::sqrt(static_cast<float>(ss / C) + eps);
      for (int c = 0; c < C; ++c) y[c] = x[c] * r * w[c];
      rstd[n] = r;
    }
  }

  // With xhat = x * rstd: dx = rstd * (dout * w - xhat * mean_c(dout * w * xhat)), dw = sum_n dout * xhat.
  void rmsnorm_backward(float* dinp, float* dw, const float* dout, const float* inp, const float* w,
                        const float* rstd, int N, int C) override {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; ++n) {
      const std::size_t off = static_cast<std::size_t>(n) * C;
      const float* dy = dout + off;
      const float* x = inp + off;
      const float r = rstd[n];
      double sum_dxhat_xhat = 0;
      for (int c = 0; c < C; ++c) sum_dxhat_xhat += static_cast<double>(dy[c] * w[c]) * (x[c] * r);
      const float mean_dxhat_xhat = static_cast<float>(sum_dxhat_xhat / C);
      float* dx = dinp + off;
      for (int c = 0; c < C; ++c) dx[c] += r * (dy[c] * w[c] - x[c] * r * mean_dxhat_xhat);
    }
    if (dw == nullptr) return;
    std::vector<double> part(static_cast<std::size_t>(kReduceChunks) * C);
    const int chunk = (N + kReduceChunks - 1) / kReduceChunks;
#pragma omp parallel for schedule(static)
    for (int k = 0; k < kReduceChunks; ++k) {
      double* pw = part.data() + static_cast<std::size_t>(k) * C;
      for (int n = k * chunk; n < std::min(N, (k + 1) * chunk); ++n) {
        const std::size_t off = static_cast<std::size_t>(n) * C;
        for (int c = 0; c < C; ++c) pw[c] += static_cast<double>(dout[off + c]) * (inp[off + c] * rstd[n]);
      }
    }
    for (int c = 0; c < C; ++c) {
      double sw = 0;
      for (int k = 0; k < kReduceChunks; ++k) sw += part[static_cast<std::size_t>(k) * C + c];
      dw[c] += static_cast<float>(sw);
    }
  }

  void rope_forward(float* x, int B, int T, int n_heads, int head_dim, int row_stride,
                    const int32_t* positions, float theta) override {
    rotate(x, B, T, n_heads, head_dim, row_stride, positions, theta, 1.0f);
  }
  void rope_backward(float* dx, int B, int T, int n_heads, int head_dim, int row_stride,
                     const int32_t* positions, float theta) override {
    rotate(dx, B, T, n_heads, head_dim, row_stride, positions, theta, -1.0f);
  }

  void swiglu_forward(float* out, const float* gate_up, int N, int F) override {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; ++n) {
      const float* gate = gate_up + static_cast<std::size_t>(n) * 2 * F;
      const float* up = gate + F;
      float* o = out + static_cast<std::size_t>(n) * F;
#pragma omp simd
      for (int f = 0; f < F; ++f) o[f] = gate[f] / (1.0f + exp_approx(-gate[f])) * up[f];
    }
  }

  // silu'(g) = s * (1 + g * (1 - s)), s = sigmoid(g).
  void swiglu_backward(float* dgate_up, const float* gate_up, const float* dout, int N, int F) override {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; ++n) {
      const std::size_t row = static_cast<std::size_t>(n) * 2 * F;
      const float *gate = gate_up + row, *up = gate + F, *d = dout + static_cast<std::size_t>(n) * F;
      float *dgate = dgate_up + row, *dup = dgate + F;
#pragma omp simd
      for (int f = 0; f < F; ++f) {
        const float g = gate[f];
        const float sig = 1.0f / (1.0f + exp_approx(-g));
        dgate[f] = d[f] * up[f] * (sig * (1.0f + g * (1.0f - sig)));
        dup[f] = d[f] * (g * sig);
      }
    }
  }

  void silu_forward(float* out, const float* inp, std::size_t n) override {
#pragma omp parallel for simd schedule(static)
    for (std::size_t i = 0; i < n; ++i) out[i] = inp[i] / (1.0f + exp_approx(-inp[i]));
  }

  // silu'(x) = s * (1 + x * (1 - s)), s = sigmoid(x), as swiglu_backward's gate.
  void silu_backward(float* dinp, const float* inp, const float* dout, std::size_t n) override {
#pragma omp parallel for simd schedule(static)
    for (std::size_t i = 0; i < n; ++i) {
      const float x = inp[i];
      const float sig = 1.0f / (1.0f + exp_approx(-x));
      dinp[i] = dout[i] * (sig * (1.0f + x * (1.0f - sig)));
    }
  }

  void gelu_forward(float* out, const float* inp, std::size_t n) override {
#pragma omp parallel for simd schedule(static)
    for (std::size_t i = 0; i < n; ++i) {
      const float x = inp[i];
      out[i] = 0.5f * x * (1.0f + tanh_approx(kGeluScale * (x + 0.044715f * x * x * x)));
    }
  }

  void gelu_backward(float* dinp, const float* inp, const float* dout, std::size_t n) override {
#pragma omp parallel for simd schedule(static)
    for (std::size_t i = 0; i < n; ++i) {
      const float x = inp[i];
      const float u = kGeluScale * (x + 0.044715f * x * x * x);
      const float t = tanh_approx(u);
      const float du = kGeluScale * (1.0f + 3.0f * 0.044715f * x * x);
      dinp[i] = dout[i] * (0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du);
    }
  }

  void dropout_mask(float* mask, std::size_t n, double p, uint64_t seed) override {
    const float keep = static_cast<float>(1.0 / (1.0 - p));
#pragma omp parallel for schedule(static)
    for (std::size_t i = 0; i < n; ++i) mask[i] = uniform_of(splitmix64_at(seed, i)) < p ? 0.0f : keep;
  }

  void attention_forward(float* out, float* lse, const float* qkv, int B, int T, int C, int NH, int NKV,
                         const int32_t* positions) override {
    check_heads("attention_forward", C, NH, NKV);
    const int hs = C / NH, group = NH / NKV;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
    const std::size_t kv = static_cast<std::size_t>(NKV) * hs;
    const std::size_t row = C + 2 * kv;
#pragma omp parallel
    {
      std::vector<float> p(static_cast<std::size_t>(T) * T);
#pragma omp for schedule(static) collapse(2)
      for (int b = 0; b < B; ++b) {
        for (int h = 0; h < NH; ++h) {
          const float* q = qkv + b * T * row + h * hs;
          const float* k = qkv + b * T * row + C + (h / group) * hs;
          const float* v = k + kv;
          float* l = lse + (static_cast<std::size_t>(b) * NH + h) * T;
          const int32_t* pos = positions ? positions + static_cast<std::size_t>(b) * T : nullptr;
          // Scores for the whole T x T square; the masked entries are overwritten with zeros below.
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hs, scale, q, row, k, row, 0.0f,
                      p.data(), T);
          for (int t = 0; t < T; ++t) {
            float* pr = p.data() + static_cast<std::size_t>(t) * T;
            const int first = pos ? t - pos[t] : 0;
            float mx = pr[first];
#pragma omp simd reduction(max : mx)
            for (int s = first + 1; s <= t; ++s) mx = pr[s] > mx ? pr[s] : mx;
            float sum = 0;
#pragma omp simd reduction(+ : sum)
            for (int s = first; s <= t; ++s) {
              pr[s] = exp_approx(pr[s] - mx);
              sum += pr[s];
            }
            const float inv = 1.0f / sum;
            for (int s = 0; s < first; ++s) pr[s] = 0.0f;
            for (int s = first; s <= t; ++s) pr[s] *= inv;
            for (int s = t + 1; s < T; ++s) pr[s] = 0.0f;
            l[t] = mx + std::log(sum);
          }
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hs, T, 1.0f, p.data(), T, v, row, 0.0f,
                      out + b * T * static_cast<std::size_t>(C) + h * hs, C);
        }
      }
    }
  }

  // One task per (row, kv head): the query heads sharing a kv head run in order inside it and add their dk
  // and dv into it (beta = 1 after the first), so the sums have a fixed order and no two threads write the
  // same values. With NKV = NH every task is one head, as in multi-head attention.
  void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out,
                          const float* lse, int B, int T, int C, int NH, int NKV,
                          const int32_t* positions) override {
    check_heads("attention_backward", C, NH, NKV);
    const int hs = C / NH, group = NH / NKV;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
    const std::size_t kv = static_cast<std::size_t>(NKV) * hs;
    const std::size_t row = C + 2 * kv;
#pragma omp parallel
    {
      std::vector<float> p(static_cast<std::size_t>(T) * T), dp(p.size());
#pragma omp for schedule(static) collapse(2)
      for (int b = 0; b < B; ++b) {
        for (int g = 0; g < NKV; ++g) {
          const std::size_t kv_base = b * T * row + C + g * hs;
          const float* k = qkv + kv_base;
          const float* v = k + kv;
          float* dk = dqkv + kv_base;
          float* dv = dk + kv;
          const int32_t* pos = positions ? positions + static_cast<std::size_t>(b) * T : nullptr;
          for (int j = 0; j < group; ++j) {
            const int h = g * group + j;
            const float beta = j == 0 ? 0.0f : 1.0f;
            const std::size_t base = b * T * row + h * hs;
            const float* q = qkv + base;
            float* dq = dqkv + base;
            const float* l = lse + (static_cast<std::size_t>(b) * NH + h) * T;
            const std::size_t head = b * T * static_cast<std::size_t>(C) + h * hs;
            const float* dO = dout + head;
            const float* O = out + head;
            // P = exp(S - lse), recomputed from the scores; masked entries are zero, so dS is zero there too.
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hs, scale, q, row, k, row, 0.0f,
                        p.data(), T);
            for (int t = 0; t < T; ++t) {
              float* pr = p.data() + static_cast<std::size_t>(t) * T;
              const float lt = l[t];
              const int first = pos ? t - pos[t] : 0;
              for (int s = 0; s < first; ++s) pr[s] = 0.0f;
#pragma omp simd
              for (int s = first; s <= t; ++s) pr[s] = exp_approx(pr[s] - lt);
              for (int s = t + 1; s < T; ++s) pr[s] = 0.0f;
            }
            // dP = dO V^T ; dV (+)= P^T dO
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hs, 1.0f, dO, C, v, row, 0.0f,
                        dp.data(), T);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, hs, T, 1.0f, p.data(), T, dO, C, beta, dv,
                        row);
            // dS = P * (dP - D) with D_t = sum_s dP_ts P_ts = dO_t . O_t, the 1/sqrt(hs) of the scores
            // folded in.
            for (int t = 0; t < T; ++t) {
              float* dr = dp.data() + static_cast<std::size_t>(t) * T;
              const float* pr = p.data() + static_cast<std::size_t>(t) * T;
              float d = 0;
              for (int i = 0; i < hs; ++i)
                d += dO[static_cast<std::size_t>(t) * C + i] * O[static_cast<std::size_t>(t) * C + i];
              for (int s = 0; s <= t; ++s) dr[s] = pr[s] * (dr[s] - d) * scale;
              for (int s = t + 1; s < T; ++s) dr[s] = 0.0f;
            }
            // dQ = dS K ; dK (+)= dS^T Q
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hs, T, 1.0f, dp.data(), T, k, row, 0.0f,
                        dq, row);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, hs, T, 1.0f, dp.data(), T, q, row, beta,
                        dk, row);
          }
        }
      }
    }
  }

  // attention_forward's arithmetic on the rows of the new queries: the scores as one GEMM per head, the
  // softmax with the same exponential, then P V.
  void attention_decode(float* out, float* kv, const float* qkv, int n, int past, int C, int NH,
                        int NKV) override {
    check_heads("attention_decode", C, NH, NKV);
    LRLLM_CHECK(n > 0 && past >= 0, "attention_decode", strprintf("bad rows: n=%d past=%d", n, past));
    const int hs = C / NH, group = NH / NKV, S = past + n;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hs));
    const std::size_t width = static_cast<std::size_t>(NKV) * hs;
    const std::size_t row = C + 2 * width, kv_row = 2 * width;
    for (int i = 0; i < n; ++i)
      std::copy_n(qkv + i * row + C, kv_row, kv + (static_cast<std::size_t>(past) + i) * kv_row);
#pragma omp parallel
    {
      std::vector<float> p(static_cast<std::size_t>(n) * S);
#pragma omp for schedule(static)
      for (int h = 0; h < NH; ++h) {
        const float* k = kv + (h / group) * hs;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, S, hs, scale, qkv + h * hs, row, k, kv_row,
                    0.0f, p.data(), S);
        for (int i = 0; i < n; ++i) {
          float* pr = p.data() + static_cast<std::size_t>(i) * S;
          const int last = past + i;
          float mx = pr[0];
#pragma omp simd reduction(max : mx)
          for (int s = 1; s <= last; ++s) mx = pr[s] > mx ? pr[s] : mx;
          float sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int s = 0; s <= last; ++s) {
            pr[s] = exp_approx(pr[s] - mx);
            sum += pr[s];
          }
          const float inv = 1.0f / sum;
          for (int s = 0; s <= last; ++s) pr[s] *= inv;
          for (int s = last + 1; s < S; ++s) pr[s] = 0.0f;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, hs, S, 1.0f, p.data(), S, k + width, kv_row,
                    0.0f, out + h * hs, C);
      }
    }
  }

  void embedding_forward(float* out, const int32_t* tokens, const float* wte, const float* wpe, int B, int T,
                         int C, const int32_t* positions) override {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < B * T; ++i) {
      const float* e = wte + static_cast<std::size_t>(tokens[i]) * C;
      float* o = out + static_cast<std::size_t>(i) * C;
      if (wpe == nullptr) {
        std::copy(e, e + C, o);
        continue;
      }
      const float* p = wpe + static_cast<std::size_t>(positions ? positions[i] : i % T) * C;
      for (int c = 0; c < C; ++c) o[c] = e[c] + p[c];
    }
  }

  void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens, int B, int T,
                          int C, const int32_t* positions) override {
    if (dwpe != nullptr && positions == nullptr) column_sums_strided(dout, B, T, C, dwpe);
    if (dwpe != nullptr && positions != nullptr)
      for (int i = 0; i < B * T; ++i) {
        float* d = dwpe + static_cast<std::size_t>(positions[i]) * C;
        const float* r = dout + static_cast<std::size_t>(i) * C;
        for (int c = 0; c < C; ++c) d[c] += r[c];
      }
    if (dwte == nullptr) return;
    // Sequential over tokens: a token id can repeat, and a fixed order keeps the sums reproducible.
    for (int i = 0; i < B * T; ++i) {
      float* e = dwte + static_cast<std::size_t>(tokens[i]) * C;
      const float* d = dout + static_cast<std::size_t>(i) * C;
      for (int c = 0; c < C; ++c) e[c] += d[c];
    }
  }

  void softmax_xent(float* losses, float* logits, const int32_t* targets, int N, int V,
                    float grad_scale) override {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; ++n) {
      float* z = logits + static_cast<std::size_t>(n) * V;
      const int target = targets[n];
      if (target < 0) {
        losses[n] = 0.0f;
        if (grad_scale != 0.0f) std::fill(z, z + V, 0.0f);
        continue;
      }
      float mx = z[0];
#pragma omp simd reduction(max : mx)
      for (int i = 0; i < V; ++i) mx = z[i] > mx ? z[i] : mx;  // a select, unlike std::max, vectorises
      const float target_logit = z[target];
      // The exponentials replace the logits in place: one pass of exp per row, vectorised.
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int i = 0; i < V; ++i) {
        z[i] = exp_approx(z[i] - mx);
        sum += z[i];
      }
      losses[n] = std::log(sum) - (target_logit - mx);
      if (grad_scale != 0.0f) {
        const float norm = grad_scale / sum;
#pragma omp simd
        for (int i = 0; i < V; ++i) z[i] *= norm;
        z[target] -= grad_scale;
      }
    }
  }

  void dequantize(float* out, const QuantizedTensor& q, std::size_t first, std::size_t count) override {
    lrllm::dequantize(q, first, count, out);
  }
  void dequantize_rows(float* out, const QuantizedTensor& q, const int32_t* host_rows, int n_rows) override {
    const std::size_t row_len = q.shape.empty() || q.shape[0] == 0 ? 0 : q.size() / q.shape[0];
    for (int i = 0; i < n_rows; ++i)
      lrllm::dequantize(q, static_cast<std::size_t>(host_rows[i]) * row_len, row_len, out + i * row_len);
  }
  void adamw(float* param, const float* grad, float* m, float* v, std::size_t n, float lr, float beta1,
             float beta2, float eps, float weight_decay, int step) override {
    const float bc1 = 1.0f - std::pow(beta1, static_cast<float>(step));
    const float bc2 = 1.0f - std::pow(beta2, static_cast<float>(step));
    const float step_size = lr / bc1;
    const float bc2_sqrt = std::sqrt(bc2);
    const float decay = 1.0f - lr * weight_decay;
#pragma omp parallel for schedule(static)
    for (std::size_t i = 0; i < n; ++i) {
      const float g = grad[i];
      m[i] = beta1 * m[i] + (1.0f - beta1) * g;
      v[i] = beta2 * v[i] + (1.0f - beta2) * g * g;
      const float denom = std::sqrt(v[i]) / bc2_sqrt + eps;
      param[i] = param[i] * decay - step_size * m[i] / denom;
    }
  }

 private:
  static void check_heads(const char* call, int C, int NH, int NKV) {
    LRLLM_CHECK(NH > 0 && NKV > 0 && C % NH == 0 && NH % NKV == 0, call,
                strprintf("bad heads: C=%d NH=%d NKV=%d (NH must divide C and NKV divide NH)", C, NH, NKV));
  }

  // Rotates each (i, i + head_dim/2) pair of every head by sign * p * inv_freq[i]. As modeling_llama.py's
  // rotary embedding: the exponent 2i / head_dim, theta's power, its inverse, the angle and cos/sin are all
  // float32. The power is rounded from double so that the CUDA backend's powf, less exact than glibc's,
  // cannot differ from it in inv_freq: an ulp there is amplified by positions in the thousands.
  static void rotate(float* x, int B, int T, int n_heads, int head_dim, int row_stride,
                     const int32_t* positions, float theta, float sign) {
    LRLLM_CHECK(head_dim > 0 && head_dim % 2 == 0, "rope", strprintf("head_dim %d is not even", head_dim));
    const int half = head_dim / 2;
    std::vector<float> inv_freq(half);
    for (int i = 0; i < half; ++i)
      inv_freq[i] =
          1.0f / static_cast<float>(std::pow(static_cast<double>(theta),
                                             static_cast<float>(2 * i) / static_cast<float>(head_dim)));
#pragma omp parallel for schedule(static)
    for (int n = 0; n < B * T; ++n) {
      const float p = static_cast<float>(positions ? positions[n] : n % T);
      float* r = x + static_cast<std::size_t>(n) * row_stride;
      for (int i = 0; i < half; ++i) {
        const float angle = p * inv_freq[i];
        const float c = std::cos(angle), s = sign * std::sin(angle);
        for (int h = 0; h < n_heads; ++h) {
          float* v = r + static_cast<std::size_t>(h) * head_dim;
          const float a = v[i], b = v[i + half];
          v[i] = a * c - b * s;
          v[i + half] = b * c + a * s;
        }
      }
    }
  }

  // Sums each column of x[N,C] in double over fixed row chunks and hands (c, sum) to emit.
  template <typename Emit>
  void column_sums(const float* x, int N, int C, Emit emit) {
    std::vector<double> part(static_cast<std::size_t>(kReduceChunks) * C);
    const int chunk = (N + kReduceChunks - 1) / kReduceChunks;
#pragma omp parallel for schedule(static)
    for (int k = 0; k < kReduceChunks; ++k) {
      double* p = part.data() + static_cast<std::size_t>(k) * C;
      for (int n = k * chunk; n < std::min(N, (k + 1) * chunk); ++n) {
        const float* r = x + static_cast<std::size_t>(n) * C;
        for (int c = 0; c < C; ++c) p[c] += r[c];
      }
    }
    for (int c = 0; c < C; ++c) {
      double s = 0;
      for (int k = 0; k < kReduceChunks; ++k) s += part[static_cast<std::size_t>(k) * C + c];
      emit(c, s);
    }
  }

  // dwpe[t,c] += sum_b dout[b,t,c]
  void column_sums_strided(const float* dout, int B, int T, int C, float* dwpe) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; ++t) {
      float* d = dwpe + static_cast<std::size_t>(t) * C;
      for (int b = 0; b < B; ++b) {
        const float* r = dout + (static_cast<std::size_t>(b) * T + t) * C;
        for (int c = 0; c < C; ++c) d[c] += r[c];
      }
    }
  }
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend() {
  return std::make_unique<CpuBackend>();
}

void ensure_blas_kernels(char** argv) {
  if (std::getenv("OPENBLAS_CORETYPE") != nullptr) return;  // the user's choice, or our re-execution
  const std::string core = openblas_get_corename();
  if (core != "Prescott" && core != "Core2" && core != "Nehalem" && core != "Penryn" && core != "Dunnington")
    return;
  const char* better = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")
                           ? "SkylakeX"
                       : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? "Haswell"
                                                                                         : nullptr;
  if (better == nullptr) return;
  setenv("OPENBLAS_CORETYPE", better, 1);
  execv("/proc/self/exe", argv);
  // exec failed: carry on with the generic kernels.
}

}  // namespace lrllm

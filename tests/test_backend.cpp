// Every primitive of the CPU backend, forward and backward, against plain double-precision references: the
// float forward against the double one, and each backward against central differences of the double forward
// of L = sum(out * R) for a random R. The CPU backend's device pointers are host pointers, so the tests hand
// it std::vector storage directly.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "lrllm/backend/backend.h"
#include "lrllm/core/common.h"
#include "test_util.h"

namespace lrllm {
namespace {

using test::dot;
using test::numeric_grad;
using test::random_floats;
using test::rel_error;
using test::to_double;

// Float forward against the double reference: a few float roundings per output.
constexpr double kForwardTol = 1e-5;
// Float backward against double finite differences (h = 1e-6 leaves ~1e-10 of truncation and rounding error).
constexpr double kGradTol = 1e-5;

// a + b, elementwise: the expected content of a buffer that a backward accumulates into.
std::vector<double> plus(const std::vector<float>& a, const std::vector<double>& b) {
  std::vector<double> out(b.size());
  for (std::size_t i = 0; i < b.size(); ++i) out[i] = a[i] + b[i];
  return out;
}

class BackendTest : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> be = make_cpu_backend();
};

TEST_F(BackendTest, MemoryIsZeroedAndCopiesRoundTrip) {
  EXPECT_EQ(be->name(), "cpu");
  constexpr std::size_t n = 37;
  float* x = be->alloc(n);
  int32_t* ids = be->alloc_int(n);
  for (std::size_t i = 0; i < n; ++i) {
    EXPECT_EQ(x[i], 0.0f);
    EXPECT_EQ(ids[i], 0);
  }
  const std::vector<float> src = random_floats(n, 1);
  be->to_device(x, src.data(), n * sizeof(float));
  float* y = be->alloc(n);
  be->copy(y, x, n);
  std::vector<float> back(n);
  be->to_host(back.data(), y, n * sizeof(float));
  EXPECT_EQ(back, src);
  be->fill(y, n, 2.5f);
  be->to_host(back.data(), y, n * sizeof(float));
  EXPECT_TRUE(std::all_of(back.begin(), back.end(), [](float v) { return v == 2.5f; }));
  be->release(x);
  be->release(y);
  be->release(ids);
}

// C = alpha * op(A) op(B) + beta * C0 with the storage conventions of Backend::matmul.
std::vector<double> matmul_ref(const std::vector<double>& A, const std::vector<double>& B,
                               const std::vector<double>& C0, int M, int N, int K, bool ta, bool tb,
                               double alpha, double beta) {
  std::vector<double> C(static_cast<std::size_t>(M) * N);
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) {
      double s = 0;
      for (int k = 0; k < K; ++k) {
        const double a = ta ? A[k * M + m] : A[m * K + k];
        const double b = tb ? B[n * K + k] : B[k * N + n];
        s += a * b;
      }
      C[m * N + n] = alpha * s + (beta != 0 ? beta * C0[m * N + n] : 0.0);
    }
  }
  return C;
}

TEST_F(BackendTest, MatmulAllTransposesAlphaBeta) {
  constexpr int M = 5, N = 7, K = 6;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "trans_a " << ta << " trans_b " << tb);
      const std::vector<float> A = random_floats(M * K, 10 + ta), B = random_floats(K * N, 20 + tb);
      const std::vector<float> C0 = random_floats(M * N, 30);
      std::vector<float> C = C0;
      be->matmul(C.data(), A.data(), B.data(), M, N, K, ta, tb, 0.7f, 0.3f);
      EXPECT_LT(
          rel_error(C, matmul_ref(to_double(A), to_double(B), to_double(C0), M, N, K, ta, tb, 0.7, 0.3)),
          kForwardTol);
      // beta = 0 must overwrite C whatever it held: the model reuses scratch buffers without clearing them.
      std::vector<float> D(M * N, std::numeric_limits<float>::quiet_NaN());
      be->matmul(D.data(), A.data(), B.data(), M, N, K, ta, tb, 1.0f, 0.0f);
      EXPECT_LT(
          rel_error(D, matmul_ref(to_double(A), to_double(B), to_double(C0), M, N, K, ta, tb, 1.0, 0.0)),
          kForwardTol);
    }
  }
}

// The products a linear layer's backward is made of: for Y = X W^T (W in nn.Linear orientation [N,K]),
// dX = R W and dW = R^T X, computed with the transposed matmuls, against finite differences.
TEST_F(BackendTest, MatmulGradientsOfLinearForm) {
  constexpr int M = 4, N = 6, K = 5;
  const std::vector<float> X = random_floats(M * K, 40), W = random_floats(N * K, 41),
                           R = random_floats(M * N, 42);
  const std::vector<double> Rd = to_double(R), empty;
  std::vector<float> dX(M * K), dW(N * K);
  be->matmul(dX.data(), R.data(), W.data(), M, K, N, false, false, 1.0f, 0.0f);
  be->matmul(dW.data(), R.data(), X.data(), N, K, M, true, false, 1.0f, 0.0f);
  const std::vector<double> Wd = to_double(W), Xd = to_double(X);
  const auto fd_x = numeric_grad(Xd, [&](const std::vector<double>& x) {
    return dot(matmul_ref(x, Wd, empty, M, N, K, false, true, 1, 0), Rd);
  });
  const auto fd_w = numeric_grad(Wd, [&](const std::vector<double>& w) {
    return dot(matmul_ref(Xd, w, empty, M, N, K, false, true, 1, 0), Rd);
  });
  EXPECT_LT(rel_error(dX, fd_x), kGradTol);
  EXPECT_LT(rel_error(dW, fd_w), kGradTol);
}

TEST_F(BackendTest, AddBiasAndBiasBackwardAccumulates) {
  constexpr int N = 7, C = 9;
  const std::vector<float> x = random_floats(N * C, 50), bias = random_floats(C, 51),
                           R = random_floats(N * C, 52);
  const auto ref = [&](const std::vector<double>& b) {
    std::vector<double> out(N * C);
    for (int n = 0; n < N; ++n)
      for (int c = 0; c < C; ++c) out[n * C + c] = x[n * C + c] + b[c];
    return out;
  };
  std::vector<float> out = x;
  be->add_bias(out.data(), bias.data(), N, C);
  EXPECT_LT(rel_error(out, ref(to_double(bias))), kForwardTol);

  const std::vector<float> dbias0 = random_floats(C, 53);
  std::vector<float> dbias = dbias0;
  be->bias_backward(dbias.data(), R.data(), N, C);
  const auto fd =
      numeric_grad(to_double(bias), [&](const std::vector<double>& b) { return dot(ref(b), to_double(R)); });
  EXPECT_LT(rel_error(dbias, plus(dbias0, fd)), kGradTol);
}

struct LayerNormRef {
  std::vector<double> out, mean, rstd;
};

LayerNormRef layernorm_ref(const std::vector<double>& x, const std::vector<double>& w,
                           const std::vector<double>& b, int N, int C) {
  LayerNormRef r{std::vector<double>(N * C), std::vector<double>(N), std::vector<double>(N)};
  for (int n = 0; n < N; ++n) {
    double mean = 0, var = 0;
    for (int c = 0; c < C; ++c) mean += x[n * C + c] / C;
    for (int c = 0; c < C; ++c) var += (x[n * C + c] - mean) * (x[n * C + c] - mean) / C;
    const double rstd = 1.0 / std::sqrt(var + 1e-5);
    for (int c = 0; c < C; ++c) r.out[n * C + c] = (x[n * C + c] - mean) * rstd * w[c] + b[c];
    r.mean[n] = mean;
    r.rstd[n] = rstd;
  }
  return r;
}

TEST_F(BackendTest, LayerNormForwardAndAccumulatingBackward) {
  constexpr int N = 6, C = 10;
  const std::vector<float> x = random_floats(N * C, 60, 1.5, 0.7), w = random_floats(C, 61, 0.3, 1.0),
                           b = random_floats(C, 62, 0.2), R = random_floats(N * C, 63);
  const std::vector<double> xd = to_double(x), wd = to_double(w), bd = to_double(b), Rd = to_double(R);
  std::vector<float> out(N * C), mean(N), rstd(N);
  be->layernorm_forward(out.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), N, C);
  const LayerNormRef ref = layernorm_ref(xd, wd, bd, N, C);
  EXPECT_LT(rel_error(out, ref.out), kForwardTol);
  EXPECT_LT(rel_error(mean, ref.mean), kForwardTol);
  EXPECT_LT(rel_error(rstd, ref.rstd), kForwardTol);

  // The gradient buffers start with content: layernorm_backward must add to it.
  const std::vector<float> dx0 = random_floats(N * C, 64), dw0 = random_floats(C, 65),
                           db0 = random_floats(C, 66);
  std::vector<float> dx = dx0, dw = dw0, db = db0;
  be->layernorm_backward(dx.data(), dw.data(), db.data(), R.data(), x.data(), w.data(), mean.data(),
                         rstd.data(), N, C);
  const auto fd_x =
      numeric_grad(xd, [&](const auto& v) { return dot(layernorm_ref(v, wd, bd, N, C).out, Rd); });
  const auto fd_w =
      numeric_grad(wd, [&](const auto& v) { return dot(layernorm_ref(xd, v, bd, N, C).out, Rd); });
  const auto fd_b =
      numeric_grad(bd, [&](const auto& v) { return dot(layernorm_ref(xd, wd, v, N, C).out, Rd); });
  EXPECT_LT(rel_error(dx, plus(dx0, fd_x)), kGradTol);
  EXPECT_LT(rel_error(dw, plus(dw0, fd_w)), kGradTol);
  EXPECT_LT(rel_error(db, plus(db0, fd_b)), kGradTol);
}

double gelu_ref(double x) {
  return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
}

TEST_F(BackendTest, GeluTanhFormForwardAndBackward) {
  constexpr std::size_t n = 64;
  const std::vector<float> x = random_floats(n, 70, 2.0), R = random_floats(n, 71);
  std::vector<double> ref(n);
  for (std::size_t i = 0; i < n; ++i) ref[i] = gelu_ref(x[i]);
  std::vector<float> out(n);
  be->gelu_forward(out.data(), x.data(), n);
  EXPECT_LT(rel_error(out, ref), kForwardTol);

  // gelu_backward overwrites: start from garbage.
  std::vector<float> dx(n, 1e3f);
  be->gelu_backward(dx.data(), x.data(), R.data(), n);
  const auto fd = numeric_grad(to_double(x), [&](const std::vector<double>& v) {
    double s = 0;
    for (std::size_t i = 0; i < n; ++i) s += gelu_ref(v[i]) * R[i];
    return s;
  });
  EXPECT_LT(rel_error(dx, fd), kGradTol);
}

struct AttentionRef {
  std::vector<double> out, lse;
};

// qkv rows [q: NH heads | k: NKV heads | v: NKV heads], query head h reading kv head h / (NH / NKV);
// positions (empty: none): query t sees keys t - positions[t] .. t of its row.
AttentionRef attention_ref(const std::vector<double>& qkv, int B, int T, int C, int NH, int NKV,
                           const std::vector<int32_t>& positions = {}) {
  const int hs = C / NH, row = C + 2 * NKV * hs, g = NH / NKV;
  AttentionRef r{std::vector<double>(B * T * C, 0.0), std::vector<double>(B * NH * T, 0.0)};
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < NH; ++h) {
      for (int t = 0; t < T; ++t) {
        const double* q = &qkv[(b * T + t) * row + h * hs];
        const int first = positions.empty() ? 0 : t - positions[b * T + t];
        std::vector<double> score(t + 1);
        double mx = -1e300;
        for (int s = first; s <= t; ++s) {
          const double* k = &qkv[(b * T + s) * row + C + h / g * hs];
          double d = 0;
          for (int i = 0; i < hs; ++i) d += q[i] * k[i];
          score[s] = d / std::sqrt(static_cast<double>(hs));
          mx = std::max(mx, score[s]);
        }
        double sum = 0;
        for (int s = first; s <= t; ++s) sum += std::exp(score[s] - mx);
        r.lse[(b * NH + h) * T + t] = mx + std::log(sum);
        for (int s = first; s <= t; ++s) {
          const double p = std::exp(score[s] - mx) / sum;
          const double* v = &qkv[(b * T + s) * row + C + NKV * hs + h / g * hs];
          for (int i = 0; i < hs; ++i) r.out[(b * T + t) * C + h * hs + i] += p * v[i];
        }
      }
    }
  }
  return r;
}

TEST_F(BackendTest, CausalAttentionForwardAndBackward) {
  constexpr int B = 2, T = 5, C = 8, NH = 2;
  const std::vector<float> qkv = random_floats(B * T * 3 * C, 80), R = random_floats(B * T * C, 81);
  std::vector<float> out(B * T * C), lse(B * NH * T, 7.0f);
  be->attention_forward(out.data(), lse.data(), qkv.data(), B, T, C, NH, NH, nullptr);
  const AttentionRef ref = attention_ref(to_double(qkv), B, T, C, NH, NH);
  EXPECT_LT(rel_error(out, ref.out), kForwardTol);
  // Each row's log-sum-exp over the causal prefix only: a future key leaking into it would change the value.
  EXPECT_LT(rel_error(lse, ref.lse), kForwardTol);
  // Causality of the output: changing the last position's key and value leaves earlier outputs unchanged.
  std::vector<float> changed = qkv;
  for (int b = 0; b < B; ++b)
    for (int i = C; i < 3 * C; ++i) changed[(b * T + T - 1) * 3 * C + i] += 1.0f;
  std::vector<float> out2(out.size()), lse2(lse.size());
  be->attention_forward(out2.data(), lse2.data(), changed.data(), B, T, C, NH, NH, nullptr);
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T - 1; ++t)
      for (int c = 0; c < C; ++c) EXPECT_EQ(out[(b * T + t) * C + c], out2[(b * T + t) * C + c]);

  std::vector<float> dqkv(qkv.size(), 1e3f);  // overwritten, so garbage must not survive
  be->attention_backward(dqkv.data(), R.data(), qkv.data(), out.data(), lse.data(), B, T, C, NH, NH, nullptr);
  const auto fd = numeric_grad(to_double(qkv), [&](const std::vector<double>& v) {
    return dot(attention_ref(v, B, T, C, NH, NH).out, to_double(R));
  });
  EXPECT_LT(rel_error(dqkv, fd), kGradTol);
}

// Packed rows: row 0 holds examples of 3 and 4 tokens, row 1 one of 2 and one of 5.
TEST_F(BackendTest, PackedAttentionStaysInsideEachExample) {
  constexpr int B = 2, T = 7, C = 8, NH = 2;
  const std::vector<int32_t> positions = {0, 1, 2, 0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 4};
  const std::vector<float> qkv = random_floats(B * T * 3 * C, 85), R = random_floats(B * T * C, 86);
  std::vector<float> out(B * T * C), lse(B * NH * T);
  be->attention_forward(out.data(), lse.data(), qkv.data(), B, T, C, NH, NH, positions.data());
  const AttentionRef ref = attention_ref(to_double(qkv), B, T, C, NH, NH, positions);
  EXPECT_LT(rel_error(out, ref.out), kForwardTol);
  EXPECT_LT(rel_error(lse, ref.lse), kForwardTol);
  // No example sees another: changing the first example of each row leaves the second's outputs unchanged.
  std::vector<float> changed = qkv;
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < (b == 0 ? 3 : 2); ++t)
      for (int i = 0; i < 3 * C; ++i) changed[(b * T + t) * 3 * C + i] += 1.0f;
  std::vector<float> out2(out.size()), lse2(lse.size());
  be->attention_forward(out2.data(), lse2.data(), changed.data(), B, T, C, NH, NH, positions.data());
  for (int b = 0; b < B; ++b)
    for (int t = b == 0 ? 3 : 2; t < T; ++t)
      for (int c = 0; c < C; ++c) EXPECT_EQ(out[(b * T + t) * C + c], out2[(b * T + t) * C + c]);

  std::vector<float> dqkv(qkv.size(), 1e3f);
  be->attention_backward(dqkv.data(), R.data(), qkv.data(), out.data(), lse.data(), B, T, C, NH, NH,
                         positions.data());
  const auto fd = numeric_grad(to_double(qkv), [&](const std::vector<double>& v) {
    return dot(attention_ref(v, B, T, C, NH, NH, positions).out, to_double(R));
  });
  EXPECT_LT(rel_error(dqkv, fd), kGradTol);
}

struct AttentionRun {
  std::vector<float> out, lse, dqkv;
};

// Forward, then backward of L = sum(out * R), on the CPU backend.
AttentionRun run_attention(Backend& be, const std::vector<float>& qkv, const std::vector<float>& R, int B,
                           int T, int C, int NH, int NKV, const int32_t* positions) {
  AttentionRun r{std::vector<float>(static_cast<std::size_t>(B) * T * C),
                 std::vector<float>(static_cast<std::size_t>(B) * NH * T),
                 std::vector<float>(qkv.size(), 1e3f)};
  be.attention_forward(r.out.data(), r.lse.data(), qkv.data(), B, T, C, NH, NKV, positions);
  be.attention_backward(r.dqkv.data(), R.data(), qkv.data(), r.out.data(), r.lse.data(), B, T, C, NH, NKV,
                        positions);
  return r;
}

// Grouped-query attention against the double reference: forward, and dqkv against finite differences (the
// k and v gradients then sum over the query heads sharing each kv head), for groups of 2 and 4 query heads,
// with rows of one example and packed rows.
TEST_F(BackendTest, GroupedQueryAttentionForwardAndBackward) {
  constexpr int B = 2, T = 7, NH = 4, hs = 4, C = NH * hs;
  const std::vector<int32_t> packed = {0, 1, 2, 0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 4};
  for (const int NKV : {2, 1}) {
    for (const bool pack : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "NKV " << NKV << " packed " << pack);
      const std::vector<int32_t> positions = pack ? packed : std::vector<int32_t>{};
      const std::size_t row = C + 2 * NKV * hs;
      const std::vector<float> qkv = random_floats(B * T * row, 150 + NKV), R = random_floats(B * T * C, 151);
      const AttentionRun run =
          run_attention(*be, qkv, R, B, T, C, NH, NKV, pack ? positions.data() : nullptr);
      const AttentionRef ref = attention_ref(to_double(qkv), B, T, C, NH, NKV, positions);
      EXPECT_LT(rel_error(run.out, ref.out), kForwardTol);
      EXPECT_LT(rel_error(run.lse, ref.lse), kForwardTol);
      const auto fd = numeric_grad(to_double(qkv), [&](const std::vector<double>& v) {
        return dot(attention_ref(v, B, T, C, NH, NKV, positions).out, to_double(R));
      });
      EXPECT_LT(rel_error(run.dqkv, fd), kGradTol);
    }
  }
}

// With NKV = NH every head is computed on its own exactly as multi-head attention computes it: bit for bit
// the result of attending with that head alone (NH = NKV = 1 on its q, k and v copied out), forward and
// backward. A kv index other than h, or a stride of the wrong width, would change the values.
TEST_F(BackendTest, AttentionWithAsManyKvHeadsAsHeadsIsMultiHeadBitForBit) {
  constexpr int B = 2, T = 6, NH = 3, hs = 4, C = NH * hs;
  const std::vector<int32_t> positions = {0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 4, 5};
  for (const bool pack : {false, true}) {
    SCOPED_TRACE(::testing::Message() << "packed " << pack);
    const int32_t* pos = pack ? positions.data() : nullptr;
    const std::vector<float> qkv = random_floats(B * T * 3 * C, 160), R = random_floats(B * T * C, 161);
    const AttentionRun all = run_attention(*be, qkv, R, B, T, C, NH, NH, pos);
    for (int h = 0; h < NH; ++h) {
      std::vector<float> qkv_h(B * T * 3 * hs), R_h(B * T * hs);
      for (int n = 0; n < B * T; ++n)
        for (int i = 0; i < hs; ++i) {
          for (int part = 0; part < 3; ++part)
            qkv_h[n * 3 * hs + part * hs + i] = qkv[n * 3 * C + part * C + h * hs + i];
          R_h[n * hs + i] = R[n * C + h * hs + i];
        }
      const AttentionRun one = run_attention(*be, qkv_h, R_h, B, T, hs, 1, 1, pos);
      for (int n = 0; n < B * T; ++n)
        for (int i = 0; i < hs; ++i) {
          ASSERT_EQ(all.out[n * C + h * hs + i], one.out[n * hs + i]) << "head " << h << " row " << n;
          for (int part = 0; part < 3; ++part)
            ASSERT_EQ(all.dqkv[n * 3 * C + part * C + h * hs + i], one.dqkv[n * 3 * hs + part * hs + i])
                << "head " << h << " row " << n << " part " << part;
        }
      for (int b = 0; b < B; ++b)
        for (int t = 0; t < T; ++t) ASSERT_EQ(all.lse[(b * NH + h) * T + t], one.lse[b * T + t]);
    }
  }
}

// repeat_kv's definition: GQA equals multi-head attention on the qkv whose kv heads are repeated for the
// query heads that read them, and its k and v gradients are the sums of the repeated heads' gradients.
TEST_F(BackendTest, GroupedQueryAttentionIsMultiHeadOnRepeatedKvHeads) {
  constexpr int B = 2, T = 9, NH = 6, NKV = 2, hs = 4, C = NH * hs, group = NH / NKV;
  constexpr int row = C + 2 * NKV * hs;
  const std::vector<float> qkv = random_floats(B * T * row, 170), R = random_floats(B * T * C, 171);
  std::vector<float> repeated(B * T * 3 * C);
  for (int n = 0; n < B * T; ++n)
    for (int h = 0; h < NH; ++h)
      for (int i = 0; i < hs; ++i) {
        const int g = h / group;
        repeated[n * 3 * C + h * hs + i] = qkv[n * row + h * hs + i];
        repeated[n * 3 * C + C + h * hs + i] = qkv[n * row + C + g * hs + i];
        repeated[n * 3 * C + 2 * C + h * hs + i] = qkv[n * row + C + NKV * hs + g * hs + i];
      }
  const AttentionRun gqa = run_attention(*be, qkv, R, B, T, C, NH, NKV, nullptr);
  const AttentionRun mha = run_attention(*be, repeated, R, B, T, C, NH, NH, nullptr);
  EXPECT_LT(rel_error(gqa.out, to_double(mha.out)), 1e-6);
  EXPECT_LT(rel_error(gqa.lse, to_double(mha.lse)), 1e-6);
  std::vector<double> folded(qkv.size(), 0.0);
  for (int n = 0; n < B * T; ++n)
    for (int h = 0; h < NH; ++h)
      for (int i = 0; i < hs; ++i) {
        const int g = h / group;
        folded[n * row + h * hs + i] = mha.dqkv[n * 3 * C + h * hs + i];
        folded[n * row + C + g * hs + i] += mha.dqkv[n * 3 * C + C + h * hs + i];
        folded[n * row + C + NKV * hs + g * hs + i] += mha.dqkv[n * 3 * C + 2 * C + h * hs + i];
      }
  EXPECT_LT(rel_error(gqa.dqkv, folded), 1e-6);
}

TEST_F(BackendTest, AttentionRefusesKvHeadsThatDoNotDivideTheHeads) {
  constexpr int B = 1, T = 2, NH = 4, NKV = 3, C = 8;
  std::vector<float> qkv(B * T * (C + 2 * NKV * 2), 0.5f), out(B * T * C), lse(B * NH * T);
  EXPECT_THROW(be->attention_forward(out.data(), lse.data(), qkv.data(), B, T, C, NH, NKV, nullptr),
               RuntimeError);
}

// Decoding over a key/value cache, fed in chunks of 5, 1, 1 and 6 new tokens, equals the full causal
// attention row for row, for multi-head and grouped-query heads; the cache rows are the qkv rows' k and v
// tails, and rows past the fed positions are untouched.
TEST_F(BackendTest, AttentionDecodeOverTheCacheEqualsFullAttention) {
  constexpr int T = 13, hs = 4, Tmax = 16;
  for (const auto& [NH, NKV] : {std::pair{4, 4}, std::pair{4, 2}, std::pair{4, 1}}) {
    SCOPED_TRACE(::testing::Message() << "NH " << NH << " NKV " << NKV);
    const int C = NH * hs, kv_row = 2 * NKV * hs, row = C + kv_row;
    const std::vector<float> qkv = random_floats(static_cast<std::size_t>(T) * row, 160 + NKV);
    std::vector<float> full(static_cast<std::size_t>(T) * C), lse(static_cast<std::size_t>(NH) * T);
    be->attention_forward(full.data(), lse.data(), qkv.data(), 1, T, C, NH, NKV, nullptr);
    std::vector<float> kv(static_cast<std::size_t>(Tmax) * kv_row, 7.0f), out(full.size(), 0.0f);
    int past = 0;
    for (const int n : {5, 1, 1, 6}) {
      be->attention_decode(out.data() + static_cast<std::size_t>(past) * C, kv.data(),
                           qkv.data() + static_cast<std::size_t>(past) * row, n, past, C, NH, NKV);
      past += n;
    }
    ASSERT_EQ(past, T);
    EXPECT_LT(rel_error(out, to_double(full)), 1e-6);
    for (int t = 0; t < Tmax; ++t)
      for (int j = 0; j < kv_row; ++j)
        ASSERT_EQ(kv[t * kv_row + j], t < T ? qkv[t * row + C + j] : 7.0f)
            << "position " << t << " value " << j;
  }
}

struct RmsNormRef {
  std::vector<double> out, rstd;
};

RmsNormRef rmsnorm_ref(const std::vector<double>& x, const std::vector<double>& w, int N, int C, double eps) {
  RmsNormRef r{std::vector<double>(N * C), std::vector<double>(N)};
  for (int n = 0; n < N; ++n) {
    double ms = 0;
    for (int c = 0; c < C; ++c) ms += x[n * C + c] * x[n * C + c] / C;
    r.rstd[n] = 1.0 / std::sqrt(ms + eps);
    for (int c = 0; c < C; ++c) r.out[n * C + c] = x[n * C + c] * r.rstd[n] * w[c];
  }
  return r;
}

TEST_F(BackendTest, RmsNormForwardAndAccumulatingBackward) {
  constexpr int N = 6, C = 10;
  constexpr float eps = 1e-6f;
  const std::vector<float> x = random_floats(N * C, 180, 1.5, 0.3), w = random_floats(C, 181, 0.3, 1.0),
                           R = random_floats(N * C, 182);
  const std::vector<double> xd = to_double(x), wd = to_double(w), Rd = to_double(R);
  std::vector<float> out(N * C), rstd(N);
  be->rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), N, C, eps);
  const RmsNormRef ref = rmsnorm_ref(xd, wd, N, C, eps);
  EXPECT_LT(rel_error(out, ref.out), kForwardTol);
  EXPECT_LT(rel_error(rstd, ref.rstd), kForwardTol);

  const std::vector<float> dx0 = random_floats(N * C, 183), dw0 = random_floats(C, 184);
  std::vector<float> dx = dx0, dw = dw0;
  be->rmsnorm_backward(dx.data(), dw.data(), R.data(), x.data(), w.data(), rstd.data(), N, C);
  const auto fd_x =
      numeric_grad(xd, [&](const auto& v) { return dot(rmsnorm_ref(v, wd, N, C, eps).out, Rd); });
  const auto fd_w =
      numeric_grad(wd, [&](const auto& v) { return dot(rmsnorm_ref(xd, v, N, C, eps).out, Rd); });
  EXPECT_LT(rel_error(dx, plus(dx0, fd_x)), kGradTol);
  EXPECT_LT(rel_error(dw, plus(dw0, fd_w)), kGradTol);

  // A frozen norm (dw null) gets the same input gradient.
  std::vector<float> dx_frozen = dx0;
  be->rmsnorm_backward(dx_frozen.data(), nullptr, R.data(), x.data(), w.data(), rstd.data(), N, C);
  EXPECT_EQ(dx_frozen, dx);
}

// A row of one value a: mean(x^2) = a^2, so out = sign(a) * w * |a| / sqrt(a^2 + eps), whatever C is.
TEST_F(BackendTest, RmsNormOfAConstantRow) {
  constexpr int C = 48;
  constexpr float eps = 1e-5f;
  const std::vector<float> w = random_floats(C, 185, 0.5, 1.0);
  for (const float a : {2.0f, -0.125f, 1e-3f}) {
    SCOPED_TRACE(::testing::Message() << "a " << a);
    const std::vector<float> x(C, a);
    std::vector<float> out(C), rstd(1);
    be->rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), 1, C, eps);
    const double r = 1.0 / std::sqrt(static_cast<double>(a) * a + eps);
    EXPECT_NEAR(rstd[0], r, 1e-6 * r);
    std::vector<double> ref(C);
    for (int c = 0; c < C; ++c) ref[c] = a * r * w[c];
    EXPECT_LT(rel_error(out, ref), 1e-6);
  }
}

// Rotary embeddings in double, modeling_llama.py's formula: x * cos + rotate_half(x) * sin per head, over
// n_heads heads starting at column `offset` of rows of `stride` values.
std::vector<double> rope_ref(std::vector<double> x, int N, int T, int n_heads, int hd, int stride, int offset,
                             const std::vector<int32_t>& positions, double theta) {
  const int half = hd / 2;
  for (int n = 0; n < N; ++n) {
    const double p = positions.empty() ? n % T : positions[n];
    for (int h = 0; h < n_heads; ++h) {
      double* v = &x[n * stride + offset + h * hd];
      for (int i = 0; i < half; ++i) {
        const double angle = p * std::pow(theta, -2.0 * i / hd);
        const double a = v[i], b = v[i + half];
        v[i] = a * std::cos(angle) - b * std::sin(angle);
        v[i + half] = b * std::cos(angle) + a * std::sin(angle);
      }
    }
  }
  return x;
}

// q and k inside a fused qkv row (NH = 2 query heads and NKV = 1 kv head of 8), at packed positions and at
// 0 .. T-1: forward against the double reference with v and the other head group untouched, and backward
// (the transpose, rope being linear) against finite differences of L = sum(rope(x) * R).
TEST_F(BackendTest, RopeOnQAndKOfAFusedRow) {
  constexpr int B = 2, T = 6, NH = 2, NKV = 1, hd = 8, stride = (NH + 2 * NKV) * hd;
  constexpr float theta = 10000.0f;
  const std::vector<int32_t> packed = {0, 1, 2, 3, 0, 1, 0, 1, 2, 0, 1, 2};
  for (const bool pack : {false, true}) {
    SCOPED_TRACE(::testing::Message() << "packed " << pack);
    const std::vector<int32_t> positions = pack ? packed : std::vector<int32_t>{};
    const int32_t* pos = pack ? positions.data() : nullptr;
    for (const auto& [offset, heads] : {std::pair{0, NH}, std::pair{NH * hd, NKV}}) {
      SCOPED_TRACE(::testing::Message() << "offset " << offset);
      const std::vector<float> x = random_floats(B * T * stride, 190 + offset),
                               R = random_floats(x.size(), 191);
      std::vector<float> y = x;
      be->rope_forward(y.data() + offset, B, T, heads, hd, stride, pos, theta);
      const std::vector<double> ref =
          rope_ref(to_double(x), B * T, T, heads, hd, stride, offset, positions, theta);
      EXPECT_LT(rel_error(y, ref), kForwardTol);
      for (int n = 0; n < B * T; ++n)
        for (int c = 0; c < stride; ++c)
          if (c < offset || c >= offset + heads * hd) {
            ASSERT_EQ(y[n * stride + c], x[n * stride + c]);
          }

      std::vector<float> g = R;
      be->rope_backward(g.data() + offset, B, T, heads, hd, stride, pos, theta);
      const auto fd = numeric_grad(to_double(x), [&](const std::vector<double>& v) {
        return dot(rope_ref(v, B * T, T, heads, hd, stride, offset, positions, theta), to_double(R));
      });
      EXPECT_LT(rel_error(g, fd), kGradTol);
    }
  }
}

// Position 0 is the identity, bit for bit (cos 0 = 1, sin 0 = 0): the first token of every example keeps
// its q and k; and rope_backward undoes rope_forward (a rotation's transpose is its inverse) to rounding.
TEST_F(BackendTest, RopeAtPositionZeroIsIdentityAndBackwardInvertsForward) {
  constexpr int B = 3, T = 16, heads = 4, hd = 32, stride = heads * hd;
  constexpr float theta = 10000.0f;
  const std::vector<float> x = random_floats(B * T * stride, 195);
  const std::vector<int32_t> zeros(B * T, 0);
  std::vector<float> y = x;
  be->rope_forward(y.data(), B, T, heads, hd, stride, zeros.data(), theta);
  EXPECT_EQ(y, x);

  y = x;
  be->rope_forward(y.data(), B, T, heads, hd, stride, nullptr, theta);
  double moved = 0;
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T; ++t)
      for (int c = 0; c < stride; ++c) {
        const std::size_t i = (static_cast<std::size_t>(b) * T + t) * stride + c;
        if (t == 0) {
          ASSERT_EQ(y[i], x[i]);
        }
        moved += std::abs(y[i] - x[i]);
      }
  EXPECT_GT(moved, 1.0);  // later positions do rotate
  be->rope_backward(y.data(), B, T, heads, hd, stride, nullptr, theta);
  EXPECT_LT(rel_error(y, to_double(x)), 1e-6);
}

double silu_ref(double g) {
  return g / (1.0 + std::exp(-g));
}

// gate_up rows: gate's F values, then up's.
TEST_F(BackendTest, SwigluForwardAndBackward) {
  constexpr int N = 4, F = 16;
  std::vector<float> gate_up = random_floats(2 * N * F, 200, 3.0);
  const std::vector<float> R = random_floats(N * F, 202);
  const auto ref = [&](const std::vector<double>& gu) {
    std::vector<double> out(N * F);
    for (int n = 0; n < N; ++n)
      for (int f = 0; f < F; ++f) out[n * F + f] = silu_ref(gu[n * 2 * F + f]) * gu[n * 2 * F + F + f];
    return out;
  };
  std::vector<float> out(N * F);
  be->swiglu_forward(out.data(), gate_up.data(), N, F);
  EXPECT_LT(rel_error(out, ref(to_double(gate_up))), kForwardTol);

  // swiglu_backward overwrites: start from garbage.
  std::vector<float> dgate_up(2 * N * F, 1e3f);
  be->swiglu_backward(dgate_up.data(), gate_up.data(), R.data(), N, F);
  const auto fd = numeric_grad(to_double(gate_up), [&](const auto& gu) {
    const std::vector<double> y = ref(gu);
    double s = 0;
    for (int i = 0; i < N * F; ++i) s += y[i] * R[i];
    return s;
  });
  EXPECT_LT(rel_error(dgate_up, fd), kGradTol);
}

// The nonlinearity between low-rank factors (lowrank.activation silu); backward in place, as Linear runs it.
TEST_F(BackendTest, SiluForwardAndBackward) {
  constexpr std::size_t n = 64;
  const std::vector<float> x = random_floats(n, 210, 4.0);
  const std::vector<float> R = random_floats(n, 212);
  std::vector<double> want(n);
  for (std::size_t i = 0; i < n; ++i) want[i] = silu_ref(x[i]);
  std::vector<float> out(n);
  be->silu_forward(out.data(), x.data(), n);
  EXPECT_LT(rel_error(out, want), kForwardTol);

  std::vector<float> d = R;
  be->silu_backward(d.data(), x.data(), d.data(), n);
  const auto fd = numeric_grad(to_double(x), [&](const auto& v) {
    double s = 0;
    for (std::size_t i = 0; i < n; ++i) s += silu_ref(v[i]) * R[i];
    return s;
  });
  EXPECT_LT(rel_error(d, fd), kGradTol);
}

TEST_F(BackendTest, EmbeddingAtPackedPositions) {
  constexpr int B = 1, T = 5, C = 3, V = 4;
  const std::vector<int32_t> tokens = {3, 1, 2, 0, 1}, positions = {0, 1, 0, 1, 2};
  const std::vector<float> wte = random_floats(V * C, 95), wpe = random_floats(T * C, 96),
                           R = random_floats(B * T * C, 97);
  const auto ref = [&](const std::vector<double>& e, const std::vector<double>& p) {
    std::vector<double> out(B * T * C);
    for (int i = 0; i < B * T; ++i)
      for (int c = 0; c < C; ++c) out[i * C + c] = e[tokens[i] * C + c] + p[positions[i] * C + c];
    return out;
  };
  std::vector<float> out(B * T * C);
  be->embedding_forward(out.data(), tokens.data(), wte.data(), wpe.data(), B, T, C, positions.data());
  EXPECT_LT(rel_error(out, ref(to_double(wte), to_double(wpe))), kForwardTol);
  std::vector<float> dwte(V * C, 0.0f), dwpe(T * C, 0.0f);
  be->embedding_backward(dwte.data(), dwpe.data(), R.data(), tokens.data(), B, T, C, positions.data());
  const auto fd_p =
      numeric_grad(to_double(wpe), [&](const auto& p) { return dot(ref(to_double(wte), p), to_double(R)); });
  EXPECT_LT(rel_error(dwpe, fd_p), kGradTol);
}

TEST_F(BackendTest, EmbeddingForwardAndAccumulatingBackwardWithRepeatedTokens) {
  constexpr int B = 2, T = 4, C = 5, V = 7;
  const std::vector<int32_t> tokens = {3, 1, 3, 6, 0, 3, 1, 1};
  const std::vector<float> wte = random_floats(V * C, 90), wpe = random_floats(T * C, 91),
                           R = random_floats(B * T * C, 92);
  const auto ref = [&](const std::vector<double>& e, const std::vector<double>& p) {
    std::vector<double> out(B * T * C);
    for (int i = 0; i < B * T; ++i)
      for (int c = 0; c < C; ++c) out[i * C + c] = e[tokens[i] * C + c] + p[(i % T) * C + c];
    return out;
  };
  std::vector<float> out(B * T * C);
  be->embedding_forward(out.data(), tokens.data(), wte.data(), wpe.data(), B, T, C, nullptr);
  EXPECT_LT(rel_error(out, ref(to_double(wte), to_double(wpe))), kForwardTol);

  const std::vector<float> dwte0 = random_floats(V * C, 93), dwpe0 = random_floats(T * C, 94);
  std::vector<float> dwte = dwte0, dwpe = dwpe0;
  be->embedding_backward(dwte.data(), dwpe.data(), R.data(), tokens.data(), B, T, C, nullptr);
  const auto fd_e =
      numeric_grad(to_double(wte), [&](const auto& e) { return dot(ref(e, to_double(wpe)), to_double(R)); });
  const auto fd_p =
      numeric_grad(to_double(wpe), [&](const auto& p) { return dot(ref(to_double(wte), p), to_double(R)); });
  EXPECT_LT(rel_error(dwte, plus(dwte0, fd_e)), kGradTol);
  EXPECT_LT(rel_error(dwpe, plus(dwpe0, fd_p)), kGradTol);
}

// Per-row -log softmax(z)[target] in double; rows with a negative target count 0.
std::vector<double> xent_ref(const std::vector<double>& z, const std::vector<int32_t>& targets, int N,
                             int V) {
  std::vector<double> loss(N, 0.0);
  for (int n = 0; n < N; ++n) {
    if (targets[n] < 0) continue;
    double mx = -1e300;
    for (int i = 0; i < V; ++i) mx = std::max(mx, z[n * V + i]);
    double sum = 0;
    for (int i = 0; i < V; ++i) sum += std::exp(z[n * V + i] - mx);
    loss[n] = std::log(sum) + mx - z[n * V + targets[n]];
  }
  return loss;
}

TEST_F(BackendTest, SoftmaxCrossEntropyLossesAndGradients) {
  constexpr int N = 6, V = 11;
  const std::vector<int32_t> targets = {2, -1, 10, 0, -1, 5};
  const std::vector<float> logits = random_floats(N * V, 100, 3.0);
  const std::vector<double> ref = xent_ref(to_double(logits), targets, N, V);

  // Loss only (the logits buffer is scratch then: the backend may leave anything in it).
  std::vector<float> z = logits, losses(N, -1.0f);
  be->softmax_xent(losses.data(), z.data(), targets.data(), N, V, 0.0f);
  EXPECT_LT(rel_error(losses, ref), kForwardTol);

  constexpr float grad_scale = 0.37f;
  z = logits;
  std::fill(losses.begin(), losses.end(), -1.0f);
  be->softmax_xent(losses.data(), z.data(), targets.data(), N, V, grad_scale);
  EXPECT_LT(rel_error(losses, ref), kForwardTol);
  const auto fd = numeric_grad(to_double(logits), [&](const std::vector<double>& v) {
    const std::vector<double> l = xent_ref(v, targets, N, V);
    double s = 0;
    for (double x : l) s += grad_scale * x;
    return s;
  });
  EXPECT_LT(rel_error(z, fd), kGradTol);
  for (int n = 0; n < N; ++n) {
    if (targets[n] >= 0) continue;
    EXPECT_EQ(losses[n], 0.0f) << "ignored row " << n;
    for (int i = 0; i < V; ++i) EXPECT_EQ(z[n * V + i], 0.0f) << "ignored row " << n << " logit " << i;
  }
}

TEST_F(BackendTest, SoftmaxCrossEntropyIsStableForLargeLogits) {
  constexpr int N = 2, V = 5;
  const std::vector<int32_t> targets = {1, 4};
  std::vector<float> z = random_floats(N * V, 110), shifted = z;
  for (float& x : shifted) x += 1000.0f;
  std::vector<float> losses(N), losses_shifted(N);
  be->softmax_xent(losses.data(), z.data(), targets.data(), N, V, 1.0f);
  be->softmax_xent(losses_shifted.data(), shifted.data(), targets.data(), N, V, 1.0f);
  for (int n = 0; n < N; ++n) {
    ASSERT_TRUE(std::isfinite(losses_shifted[n]));
    // 1000 + x in float rounds x to ~6e-5, which bounds the difference.
    EXPECT_NEAR(losses_shifted[n], losses[n], 1e-3);
  }
  for (int i = 0; i < N * V; ++i) EXPECT_NEAR(shifted[i], z[i], 1e-3);
}

// Two AdamW steps by PyTorch's formula (torch.optim.AdamW): decoupled decay, then the bias-corrected update.
TEST_F(BackendTest, AdamwMatchesPyTorchFormulaOverTwoSteps) {
  constexpr std::size_t n = 10;
  constexpr float lr = 0.1f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f;
  for (float wd : {0.0f, 0.1f}) {
    SCOPED_TRACE(::testing::Message() << "weight_decay " << wd);
    const std::vector<float> p0 = random_floats(n, 120);
    const std::vector<float> grads[2] = {random_floats(n, 121), random_floats(n, 122, 0.5)};
    std::vector<float> p = p0, m(n, 0.0f), v(n, 0.0f);
    std::vector<double> rp = to_double(p0), rm(n, 0.0), rv(n, 0.0);
    for (int step = 1; step <= 2; ++step) {
      const std::vector<float>& g = grads[step - 1];
      be->adamw(p.data(), g.data(), m.data(), v.data(), n, lr, beta1, beta2, eps, wd, step);
      const double bc1 = 1 - std::pow(double{beta1}, step), bc2 = 1 - std::pow(double{beta2}, step);
      for (std::size_t i = 0; i < n; ++i) {
        rp[i] *= 1 - double{lr} * wd;
        rm[i] = beta1 * rm[i] + (1 - double{beta1}) * g[i];
        rv[i] = beta2 * rv[i] + (1 - double{beta2}) * g[i] * g[i];
        rp[i] -= lr / bc1 * rm[i] / (std::sqrt(rv[i]) / std::sqrt(bc2) + eps);
      }
    }
    EXPECT_LT(rel_error(m, rm), 1e-6);
    EXPECT_LT(rel_error(v, rv), 1e-6);
    // Compare the change of the parameters, not the parameters, so that an error in the update is not hidden
    // behind the size of p.
    std::vector<double> delta(n), ref_delta(n);
    for (std::size_t i = 0; i < n; ++i) {
      delta[i] = static_cast<double>(p[i]) - p0[i];
      ref_delta[i] = rp[i] - p0[i];
    }
    EXPECT_LT(rel_error(delta, ref_delta), 1e-5);
  }
}

TEST_F(BackendTest, SumSquaresScaleAdd) {
  for (std::size_t n : {std::size_t{0}, std::size_t{5}, std::size_t{1000}}) {
    const std::vector<float> x = random_floats(n, 130 + n);
    double ref = 0;
    for (float v : x) ref += static_cast<double>(v) * v;
    EXPECT_NEAR(be->sum_squares(x.data(), n), ref, 1e-12 * (ref + 1)) << "n " << n;
  }
  constexpr std::size_t n = 100;
  const std::vector<float> a = random_floats(n, 140), b = random_floats(n, 141);
  std::vector<float> x = a, out(n);
  be->scale(x.data(), n, -0.3f);
  std::vector<double> ref(n);
  for (std::size_t i = 0; i < n; ++i) ref[i] = a[i] * -0.3;
  EXPECT_LT(rel_error(x, ref), 1e-6);
  be->add(out.data(), a.data(), b.data(), n);
  for (std::size_t i = 0; i < n; ++i) ref[i] = static_cast<double>(a[i]) + b[i];
  EXPECT_LT(rel_error(out, ref), 1e-6);
}

}  // namespace
}  // namespace lrllm

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
#include <vector>

#include "lrllm/backend/backend.h"
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

// positions (empty: none): query t sees keys t - positions[t] .. t of its row.
AttentionRef attention_ref(const std::vector<double>& qkv, int B, int T, int C, int NH,
                           const std::vector<int32_t>& positions = {}) {
  const int hs = C / NH;
  AttentionRef r{std::vector<double>(B * T * C, 0.0), std::vector<double>(B * NH * T, 0.0)};
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < NH; ++h) {
      for (int t = 0; t < T; ++t) {
        const double* q = &qkv[(b * T + t) * 3 * C + h * hs];
        const int first = positions.empty() ? 0 : t - positions[b * T + t];
        std::vector<double> score(t + 1);
        double mx = -1e300;
        for (int s = first; s <= t; ++s) {
          const double* k = &qkv[(b * T + s) * 3 * C + C + h * hs];
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
          const double* v = &qkv[(b * T + s) * 3 * C + 2 * C + h * hs];
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
  be->attention_forward(out.data(), lse.data(), qkv.data(), B, T, C, NH, nullptr);
  const AttentionRef ref = attention_ref(to_double(qkv), B, T, C, NH);
  EXPECT_LT(rel_error(out, ref.out), kForwardTol);
  // Each row's log-sum-exp over the causal prefix only: a future key leaking into it would change the value.
  EXPECT_LT(rel_error(lse, ref.lse), kForwardTol);
  // Causality of the output: changing the last position's key and value leaves earlier outputs unchanged.
  std::vector<float> changed = qkv;
  for (int b = 0; b < B; ++b)
    for (int i = C; i < 3 * C; ++i) changed[(b * T + T - 1) * 3 * C + i] += 1.0f;
  std::vector<float> out2(out.size()), lse2(lse.size());
  be->attention_forward(out2.data(), lse2.data(), changed.data(), B, T, C, NH, nullptr);
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T - 1; ++t)
      for (int c = 0; c < C; ++c) EXPECT_EQ(out[(b * T + t) * C + c], out2[(b * T + t) * C + c]);

  std::vector<float> dqkv(qkv.size(), 1e3f);  // overwritten, so garbage must not survive
  be->attention_backward(dqkv.data(), R.data(), qkv.data(), out.data(), lse.data(), B, T, C, NH, nullptr);
  const auto fd = numeric_grad(to_double(qkv), [&](const std::vector<double>& v) {
    return dot(attention_ref(v, B, T, C, NH).out, to_double(R));
  });
  EXPECT_LT(rel_error(dqkv, fd), kGradTol);
}

// Packed rows: row 0 holds examples of 3 and 4 tokens, row 1 one of 2 and one of 5.
TEST_F(BackendTest, PackedAttentionStaysInsideEachExample) {
  constexpr int B = 2, T = 7, C = 8, NH = 2;
  const std::vector<int32_t> positions = {0, 1, 2, 0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 4};
  const std::vector<float> qkv = random_floats(B * T * 3 * C, 85), R = random_floats(B * T * C, 86);
  std::vector<float> out(B * T * C), lse(B * NH * T);
  be->attention_forward(out.data(), lse.data(), qkv.data(), B, T, C, NH, positions.data());
  const AttentionRef ref = attention_ref(to_double(qkv), B, T, C, NH, positions);
  EXPECT_LT(rel_error(out, ref.out), kForwardTol);
  EXPECT_LT(rel_error(lse, ref.lse), kForwardTol);
  // No example sees another: changing the first example of each row leaves the second's outputs unchanged.
  std::vector<float> changed = qkv;
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < (b == 0 ? 3 : 2); ++t)
      for (int i = 0; i < 3 * C; ++i) changed[(b * T + t) * 3 * C + i] += 1.0f;
  std::vector<float> out2(out.size()), lse2(lse.size());
  be->attention_forward(out2.data(), lse2.data(), changed.data(), B, T, C, NH, positions.data());
  for (int b = 0; b < B; ++b)
    for (int t = b == 0 ? 3 : 2; t < T; ++t)
      for (int c = 0; c < C; ++c) EXPECT_EQ(out[(b * T + t) * C + c], out2[(b * T + t) * C + c]);

  std::vector<float> dqkv(qkv.size(), 1e3f);
  be->attention_backward(dqkv.data(), R.data(), qkv.data(), out.data(), lse.data(), B, T, C, NH,
                         positions.data());
  const auto fd = numeric_grad(to_double(qkv), [&](const std::vector<double>& v) {
    return dot(attention_ref(v, B, T, C, NH, positions).out, to_double(R));
  });
  EXPECT_LT(rel_error(dqkv, fd), kGradTol);
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

// `make test-gpu`: the CUDA backend against the CPU backend on the same random inputs (never zeros).
//
// Tolerances are relative errors ||gpu - cpu|| / ||cpu|| over whole outputs, so a wrong element cannot hide
// under an absolute bound:
// - float32 kernels (LayerNorm, RMSNorm, GELU, SwiGLU, RoPE, attention, softmax, AdamW, reductions): 1e-5.
//   Both sides compute in float32 and differ only in the order of additions and in CUDA's exp, tanh, sin
//   and cos against the CPU's polynomials and glibc, a few ulp (~1e-7) per value.
// - matrix products: 1e-2. They run on bf16 tensor cores: each input is rounded to bf16 (8 significant bits,
//   unit roundoff 2^-9 = 0.2%), products accumulate in float32, so a K-term dot product of random values is
//   off by about sqrt(2) * 2^-9 = 0.3% relative; 1e-2 is three times that, far below what a wrong index gives
//   (~1).
// - the whole model: loss 1e-2 and gradients 5e-2, two orders of the above through a dozen products in
//   sequence (errors add up roughly with the square root of the depth).
// - quantized weights dequantize bit for bit as on the CPU.
// Every test skips with a message where no GPU is visible; `make test` still compiles this file.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "../test_util.h"
#include "lrllm/backend/backend.h"
#include "lrllm/core/rng.h"
#include "lrllm/model/model.h"
#include "lrllm/model/optimizer.h"
#include "lrllm/model/quant.h"

namespace lrllm {
namespace {

using test::random_floats;

constexpr double kFloatTol = 1e-5;
constexpr double kGemmTol = 1e-2;
constexpr double kLossTol = 1e-2;
constexpr double kGradTol = 5e-2;

// ||got - ref|| / ||ref|| of two float vectors.
double rel_diff(const std::vector<float>& got, const std::vector<float>& ref) {
  EXPECT_EQ(got.size(), ref.size());
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < ref.size() && i < got.size(); ++i) {
    diff += (static_cast<double>(got[i]) - ref[i]) * (static_cast<double>(got[i]) - ref[i]);
    norm += static_cast<double>(ref[i]) * ref[i];
  }
  return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

// A buffer on both backends with the same contents.
struct Pair {
  Backend *cpu, *gpu;
  float *c = nullptr, *g = nullptr;
  std::size_t n = 0;
  Pair(Backend& cpu_be, Backend& gpu_be, const std::vector<float>& v)
      : cpu(&cpu_be), gpu(&gpu_be), n(v.size()) {
    c = cpu->alloc(n);
    g = gpu->alloc(n);
    cpu->to_device(c, v.data(), n * sizeof(float));
    gpu->to_device(g, v.data(), n * sizeof(float));
  }
  ~Pair() {
    cpu->release(c);
    gpu->release(g);
  }
  Pair(const Pair&) = delete;
  Pair& operator=(const Pair&) = delete;
  std::vector<float> host_cpu() const {
    std::vector<float> h(n);
    cpu->to_host(h.data(), c, n * sizeof(float));
    return h;
  }
  std::vector<float> host_gpu() const {
    std::vector<float> h(n);
    gpu->to_host(h.data(), g, n * sizeof(float));
    return h;
  }
  double error() const { return rel_diff(host_gpu(), host_cpu()); }
};

struct IntPair {
  Backend *cpu, *gpu;
  int32_t *c = nullptr, *g = nullptr;
  IntPair(Backend& cpu_be, Backend& gpu_be, const std::vector<int32_t>& v) : cpu(&cpu_be), gpu(&gpu_be) {
    c = cpu->alloc_int(v.size());
    g = gpu->alloc_int(v.size());
    cpu->to_device(c, v.data(), v.size() * sizeof(int32_t));
    gpu->to_device(g, v.data(), v.size() * sizeof(int32_t));
  }
  ~IntPair() {
    cpu->release(c);
    gpu->release(g);
  }
  IntPair(const IntPair&) = delete;
  IntPair& operator=(const IntPair&) = delete;
};

std::vector<int32_t> random_ids(std::size_t n, int below, uint64_t seed) {
  Rng rng(seed);
  std::vector<int32_t> v(n);
  for (int32_t& x : v) x = static_cast<int32_t>(rng.below(below));
  return v;
}

class Gpu : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device is visible: GPU test skipped";
    cpu_ = make_cpu_backend();
    gpu_ = make_cuda_backend(0);
  }
  Pair pair(std::size_t n, uint64_t seed, double scale = 1.0, double shift = 0.0) {
    return Pair(*cpu_, *gpu_, random_floats(n, seed, scale, shift));
  }
  std::unique_ptr<Backend> cpu_, gpu_;
};

TEST_F(Gpu, MatmulEveryOrientationAndStride) {
  const int M = 67, N = 129, K = 96;
  for (const bool ta : {false, true})
    for (const bool tb : {false, true})
      for (const float beta : {0.0f, 0.5f}) {
        Pair a = pair(static_cast<std::size_t>(M) * K, 1), b = pair(static_cast<std::size_t>(K) * N, 2),
             c = pair(static_cast<std::size_t>(M) * N, 3);
        cpu_->matmul(c.c, a.c, b.c, M, N, K, ta, tb, 0.7f, beta);
        gpu_->matmul(c.g, a.g, b.g, M, N, K, ta, tb, 0.7f, beta);
        EXPECT_LT(c.error(), kGemmTol) << "trans_a " << ta << " trans_b " << tb << " beta " << beta;
      }
  // A block of columns of wider matrices at an odd offset (unaligned pointers, strides wider than the block).
  const int ld = 301;
  Pair a = pair(static_cast<std::size_t>(M) * ld, 4), b = pair(static_cast<std::size_t>(N) * ld, 5),
       c = pair(static_cast<std::size_t>(M) * ld, 6);
  cpu_->matmul_strided(c.c + 3, a.c + 1, b.c + 5, M, N, K, false, true, 1.0f, 1.0f, ld, ld, ld);
  gpu_->matmul_strided(c.g + 3, a.g + 1, b.g + 5, M, N, K, false, true, 1.0f, 1.0f, ld, ld, ld);
  EXPECT_LT(c.error(), kGemmTol);
}

TEST_F(Gpu, ElementwiseAndReductions) {
  const std::size_t n = 100003;
  Pair a = pair(n, 1), b = pair(n, 2), out = pair(n, 3);
  cpu_->add(out.c, a.c, b.c, n);
  gpu_->add(out.g, a.g, b.g, n);
  EXPECT_EQ(out.host_gpu(), out.host_cpu());
  cpu_->mul(out.c, a.c, b.c, n);
  gpu_->mul(out.g, a.g, b.g, n);
  EXPECT_EQ(out.host_gpu(), out.host_cpu());
  cpu_->scale(out.c, n, 0.3f);
  gpu_->scale(out.g, n, 0.3f);
  EXPECT_EQ(out.host_gpu(), out.host_cpu());
  cpu_->fill(out.c, n, 1.5f);
  gpu_->fill(out.g, n, 1.5f);
  EXPECT_EQ(out.host_gpu(), out.host_cpu());
  const double s_cpu = cpu_->sum_squares(a.c, n), s_gpu = gpu_->sum_squares(a.g, n);
  EXPECT_NEAR(s_gpu, s_cpu, 1e-12 * s_cpu);

  const int N = 333, C = 200;
  Pair x = pair(static_cast<std::size_t>(N) * C, 4), bias = pair(C, 5), dbias = pair(C, 6);
  cpu_->add_bias(x.c, bias.c, N, C);
  gpu_->add_bias(x.g, bias.g, N, C);
  EXPECT_EQ(x.host_gpu(), x.host_cpu());
  cpu_->bias_backward(dbias.c, x.c, N, C);
  gpu_->bias_backward(dbias.g, x.g, N, C);
  EXPECT_LT(dbias.error(), kFloatTol);
}

TEST_F(Gpu, LayerNormForwardAndBackward) {
  const int N = 300, C = 1600;  // GPT-2 1.5B's width: more values per lane than lanes
  const std::size_t n = static_cast<std::size_t>(N) * C;
  Pair x = pair(n, 1, 2.0, 0.5), w = pair(C, 2, 0.2, 1.0), b = pair(C, 3, 0.1), out = pair(n, 4);
  Pair mean = pair(N, 5), rstd = pair(N, 6);
  cpu_->layernorm_forward(out.c, mean.c, rstd.c, x.c, w.c, b.c, N, C);
  gpu_->layernorm_forward(out.g, mean.g, rstd.g, x.g, w.g, b.g, N, C);
  EXPECT_LT(out.error(), kFloatTol);
  EXPECT_LT(mean.error(), kFloatTol);
  EXPECT_LT(rstd.error(), kFloatTol);
  Pair dout = pair(n, 7), dx = pair(n, 8), dw = pair(C, 9), db = pair(C, 10);
  cpu_->layernorm_backward(dx.c, dw.c, db.c, dout.c, x.c, w.c, mean.c, rstd.c, N, C);
  gpu_->layernorm_backward(dx.g, dw.g, db.g, dout.g, x.g, w.g, mean.g, rstd.g, N, C);
  EXPECT_LT(dx.error(), kFloatTol);
  EXPECT_LT(dw.error(), kFloatTol);
  EXPECT_LT(db.error(), kFloatTol);
}

TEST_F(Gpu, Gelu) {
  const std::size_t n = 50001;
  Pair x = pair(n, 1, 3.0), out = pair(n, 2), dout = pair(n, 3), dx = pair(n, 4);
  cpu_->gelu_forward(out.c, x.c, n);
  gpu_->gelu_forward(out.g, x.g, n);
  EXPECT_LT(out.error(), kFloatTol);
  cpu_->gelu_backward(dx.c, x.c, dout.c, n);
  gpu_->gelu_backward(dx.g, x.g, dout.g, n);
  EXPECT_LT(dx.error(), kFloatTol);
}

// Sequence lengths around the kernels' tiles (1, a partial tile, several tiles), and GPT-2's head size.
TEST_F(Gpu, AttentionForwardAndBackward) {
  for (const int T : {1, 37, 64, 130, 1024}) {
    const int B = 2, NH = 4, C = NH * 64;
    const std::size_t n = static_cast<std::size_t>(B) * T * C;
    Pair qkv = pair(3 * n, 1), out = pair(n, 2), lse = pair(static_cast<std::size_t>(B) * NH * T, 3);
    cpu_->attention_forward(out.c, lse.c, qkv.c, B, T, C, NH, NH, nullptr);
    gpu_->attention_forward(out.g, lse.g, qkv.g, B, T, C, NH, NH, nullptr);
    EXPECT_LT(out.error(), kFloatTol) << "T " << T;
    EXPECT_LT(lse.error(), kFloatTol) << "T " << T;
    Pair dout = pair(n, 4), dqkv = pair(3 * n, 5);
    cpu_->attention_backward(dqkv.c, dout.c, qkv.c, out.c, lse.c, B, T, C, NH, NH, nullptr);
    gpu_->attention_backward(dqkv.g, dout.g, qkv.g, out.g, lse.g, B, T, C, NH, NH, nullptr);
    EXPECT_LT(dqkv.error(), kFloatTol) << "T " << T;
  }
}

// Grouped-query attention (groups of 4 and 8 query heads per kv head, and Llama's head size 128) around the
// kernels' tiles; NKV = NH is AttentionForwardAndBackward above.
TEST_F(Gpu, GroupedQueryAttentionForwardAndBackward) {
  struct Heads {
    int NH, NKV, hs;
  };
  for (const Heads hd : {Heads{8, 2, 64}, Heads{8, 1, 64}, Heads{4, 2, 128}})
    for (const int T : {1, 37, 130}) {
      const int B = 2, C = hd.NH * hd.hs;
      const std::size_t rows = static_cast<std::size_t>(B) * T, n = rows * C;
      Pair qkv = pair(rows * (C + 2 * hd.NKV * hd.hs), 1), out = pair(n, 2),
           lse = pair(static_cast<std::size_t>(B) * hd.NH * T, 3);
      cpu_->attention_forward(out.c, lse.c, qkv.c, B, T, C, hd.NH, hd.NKV, nullptr);
      gpu_->attention_forward(out.g, lse.g, qkv.g, B, T, C, hd.NH, hd.NKV, nullptr);
      EXPECT_LT(out.error(), kFloatTol) << "NH " << hd.NH << " NKV " << hd.NKV << " T " << T;
      EXPECT_LT(lse.error(), kFloatTol) << "NH " << hd.NH << " NKV " << hd.NKV << " T " << T;
      Pair dout = pair(n, 4), dqkv = pair(qkv.n, 5);
      cpu_->attention_backward(dqkv.c, dout.c, qkv.c, out.c, lse.c, B, T, C, hd.NH, hd.NKV, nullptr);
      gpu_->attention_backward(dqkv.g, dout.g, qkv.g, out.g, lse.g, B, T, C, hd.NH, hd.NKV, nullptr);
      EXPECT_LT(dqkv.error(), kFloatTol) << "NH " << hd.NH << " NKV " << hd.NKV << " T " << T;
    }
}

// Decoding over a key/value cache (a prompt of 37, then single tokens, then a chunk of 70 reaching past the
// kernels' tiles) against the CPU: the outputs and the cache rows, for multi-head, grouped-query and head
// size 128.
TEST_F(Gpu, AttentionDecodeOverTheCacheFollowsTheCpu) {
  struct Heads {
    int NH, NKV, hs;
  };
  for (const Heads hd : {Heads{4, 4, 64}, Heads{8, 2, 64}, Heads{4, 2, 128}, Heads{2, 1, 24}}) {
    const int C = hd.NH * hd.hs, row = C + 2 * hd.NKV * hd.hs, Tmax = 160;
    Pair qkv = pair(static_cast<std::size_t>(Tmax) * row, 1),
         out = pair(static_cast<std::size_t>(Tmax) * C, 2),
         kv = pair(static_cast<std::size_t>(Tmax) * 2 * hd.NKV * hd.hs, 3);
    int past = 0;
    for (const int n : {37, 1, 1, 70}) {
      const std::size_t q = static_cast<std::size_t>(past) * row, o = static_cast<std::size_t>(past) * C;
      cpu_->attention_decode(out.c + o, kv.c, qkv.c + q, n, past, C, hd.NH, hd.NKV);
      gpu_->attention_decode(out.g + o, kv.g, qkv.g + q, n, past, C, hd.NH, hd.NKV);
      past += n;
    }
    EXPECT_LT(out.error(), kFloatTol) << "NH " << hd.NH << " NKV " << hd.NKV << " hs " << hd.hs;
    EXPECT_EQ(kv.host_gpu(), kv.host_cpu()) << "NH " << hd.NH << " NKV " << hd.NKV << " hs " << hd.hs;
  }
}

// Llama-7B's width, more values per lane than lanes; the frozen case (dw null) too.
TEST_F(Gpu, RmsNormForwardAndBackward) {
  const int N = 300, C = 4096;
  const std::size_t n = static_cast<std::size_t>(N) * C;
  Pair x = pair(n, 1, 2.0, 0.5), w = pair(C, 2, 0.2, 1.0), out = pair(n, 3), rstd = pair(N, 4);
  cpu_->rmsnorm_forward(out.c, rstd.c, x.c, w.c, N, C, 1e-5f);
  gpu_->rmsnorm_forward(out.g, rstd.g, x.g, w.g, N, C, 1e-5f);
  EXPECT_LT(out.error(), kFloatTol);
  EXPECT_LT(rstd.error(), kFloatTol);
  Pair dout = pair(n, 5), dx = pair(n, 6), dw = pair(C, 7), dx_frozen = pair(n, 6);
  cpu_->rmsnorm_backward(dx.c, dw.c, dout.c, x.c, w.c, rstd.c, N, C);
  gpu_->rmsnorm_backward(dx.g, dw.g, dout.g, x.g, w.g, rstd.g, N, C);
  EXPECT_LT(dx.error(), kFloatTol);
  EXPECT_LT(dw.error(), kFloatTol);
  cpu_->rmsnorm_backward(dx_frozen.c, nullptr, dout.c, x.c, w.c, rstd.c, N, C);
  gpu_->rmsnorm_backward(dx_frozen.g, nullptr, dout.g, x.g, w.g, rstd.g, N, C);
  EXPECT_LT(dx_frozen.error(), kFloatTol);
}

// q and k of a fused GQA row at positions up to 2047 (angles in the thousands of radians), with rows of one
// example and packed rows; forward, then backward on the result.
TEST_F(Gpu, RopeOnQAndKOfAFusedRow) {
  const int B = 2, T = 2048, NH = 8, NKV = 2, hd = 128, stride = (NH + 2 * NKV) * hd;
  std::vector<int32_t> packed(static_cast<std::size_t>(B) * T);
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T; ++t) packed[static_cast<std::size_t>(b) * T + t] = t % (517 + 300 * b);
  IntPair positions(*cpu_, *gpu_, packed);
  for (const bool pack : {false, true})
    for (const auto& [offset, heads] : {std::pair{0, NH}, std::pair{NH * hd, NKV}}) {
      Pair x = pair(static_cast<std::size_t>(B) * T * stride, 1);
      cpu_->rope_forward(x.c + offset, B, T, heads, hd, stride, pack ? positions.c : nullptr, 10000.0f);
      gpu_->rope_forward(x.g + offset, B, T, heads, hd, stride, pack ? positions.g : nullptr, 10000.0f);
      EXPECT_LT(x.error(), kFloatTol) << "packed " << pack << " offset " << offset;
      cpu_->rope_backward(x.c + offset, B, T, heads, hd, stride, pack ? positions.c : nullptr, 10000.0f);
      gpu_->rope_backward(x.g + offset, B, T, heads, hd, stride, pack ? positions.g : nullptr, 10000.0f);
      EXPECT_LT(x.error(), kFloatTol) << "packed " << pack << " offset " << offset;
    }
}

TEST_F(Gpu, Swiglu) {
  const int N = 37, F = 1376;  // F as Llama-2's 11008 / 8: not a multiple of a warp
  const std::size_t n = static_cast<std::size_t>(N) * F;
  Pair gate_up = pair(2 * n, 1, 3.0), out = pair(n, 3), dout = pair(n, 4), dgate_up = pair(2 * n, 5);
  cpu_->swiglu_forward(out.c, gate_up.c, N, F);
  gpu_->swiglu_forward(out.g, gate_up.g, N, F);
  EXPECT_LT(out.error(), kFloatTol);
  cpu_->swiglu_backward(dgate_up.c, gate_up.c, dout.c, N, F);
  gpu_->swiglu_backward(dgate_up.g, gate_up.g, dout.g, N, F);
  EXPECT_LT(dgate_up.error(), kFloatTol);
}

// lowrank.activation silu's primitive, backward in place as Linear runs it.
TEST_F(Gpu, Silu) {
  const std::size_t n = 37 * 1376;
  Pair x = pair(n, 1, 4.0), out = pair(n, 2), d = pair(n, 3);
  cpu_->silu_forward(out.c, x.c, n);
  gpu_->silu_forward(out.g, x.g, n);
  EXPECT_LT(out.error(), kFloatTol);
  cpu_->silu_backward(d.c, x.c, d.c, n);
  gpu_->silu_backward(d.g, x.g, d.g, n);
  EXPECT_LT(d.error(), kFloatTol);
}

TEST_F(Gpu, EmbeddingForwardAndBackward) {
  const int B = 3, T = 50, C = 96, V = 20;  // a small vocabulary: every id repeats
  const std::vector<int32_t> ids = random_ids(static_cast<std::size_t>(B) * T, V, 1);
  IntPair tokens(*cpu_, *gpu_, ids);
  Pair wte = pair(static_cast<std::size_t>(V) * C, 2), wpe = pair(static_cast<std::size_t>(T) * C, 3);
  Pair out = pair(static_cast<std::size_t>(B) * T * C, 4);
  cpu_->embedding_forward(out.c, tokens.c, wte.c, wpe.c, B, T, C, nullptr);
  gpu_->embedding_forward(out.g, tokens.g, wte.g, wpe.g, B, T, C, nullptr);
  EXPECT_EQ(out.host_gpu(), out.host_cpu());
  Pair dwte = pair(static_cast<std::size_t>(V) * C, 5), dwpe = pair(static_cast<std::size_t>(T) * C, 6);
  cpu_->embedding_backward(dwte.c, dwpe.c, out.c, tokens.c, B, T, C, nullptr);
  gpu_->embedding_backward(dwte.g, dwpe.g, out.g, tokens.g, B, T, C, nullptr);
  EXPECT_LT(dwte.error(), kFloatTol);
  EXPECT_LT(dwpe.error(), kFloatTol);
}

TEST_F(Gpu, SoftmaxCrossEntropy) {
  const int N = 40, V = 50257;
  std::vector<int32_t> ids = random_ids(N, V, 1);
  ids[3] = ids[17] = -1;  // ignored rows
  IntPair targets(*cpu_, *gpu_, ids);
  for (const float grad_scale : {0.0f, 0.25f}) {
    Pair logits = pair(static_cast<std::size_t>(N) * V, 2, 3.0), losses = pair(N, 3);
    cpu_->softmax_xent(losses.c, logits.c, targets.c, N, V, grad_scale);
    gpu_->softmax_xent(losses.g, logits.g, targets.g, N, V, grad_scale);
    EXPECT_LT(losses.error(), kFloatTol);
    if (grad_scale != 0.0f) {
      EXPECT_LT(logits.error(), kFloatTol);
    }
  }
}

TEST_F(Gpu, AdamW) {
  const std::size_t n = 10007;
  Pair p = pair(n, 1), g = pair(n, 2), m = pair(n, 3, 0.1), v = pair(n, 4, 0.01, 0.05);
  for (int step = 1; step <= 3; ++step) {
    cpu_->adamw(p.c, g.c, m.c, v.c, n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, step);
    gpu_->adamw(p.g, g.g, m.g, v.g, n, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, step);
  }
  EXPECT_LT(p.error(), 1e-6);
  EXPECT_LT(m.error(), 1e-6);
  EXPECT_LT(v.error(), 1e-6);
}

TEST_F(Gpu, DequantizationIsBitIdentical) {
  const std::vector<int64_t> shape = {97, 130};  // an odd count of blocks and of values
  const std::vector<float> w = random_floats(97 * 130, 1, 0.3);
  const std::vector<QuantizedTensor> kinds = {quantize_int8(w.data(), shape, 64),
                                              quantize_nf4(w.data(), shape, false, 64),
                                              quantize_nf4(w.data(), shape, true, 64)};
  for (const QuantizedTensor& q : kinds) {
    // A range starting at an odd value (half an NF4 byte) and crossing block boundaries, then whole rows.
    const std::size_t first = 131, count = 5000;
    Pair out = pair(count, 2);
    cpu_->dequantize(out.c, q, first, count);
    gpu_->dequantize(out.g, q, first, count);
    EXPECT_EQ(out.host_gpu(), out.host_cpu());
    const std::vector<int32_t> rows = {5, 96, 0, 5, 41};
    Pair picked = pair(rows.size() * 130, 3);
    cpu_->dequantize_rows(picked.c, q, rows.data(), static_cast<int>(rows.size()));
    gpu_->dequantize_rows(picked.g, q, rows.data(), static_cast<int>(rows.size()));
    EXPECT_EQ(picked.host_gpu(), picked.host_cpu());
  }
}

// A small GPT-2 whose attention spans several tiles: vocabulary 211, 80 positions, 2 blocks of width 128.
ModelConfig gpu_config(std::array<int, kNumSites> ranks = {0, 0, 0, 0}) {
  ModelConfig m = test::tiny_config(ranks);
  m.vocab_size = 211;
  m.seq_len = 80;
  m.d_model = 128;
  m.n_head = 2;
  m.d_ff = 512;
  return m;
}

// The same model on both backends: parameters from one seed, quantized tensors from one set of values.
struct ModelPair {
  ModelPair(const ModelConfig& cfg, Backend& cpu, Backend& gpu, bool recompute)
      : on_cpu(cfg, cpu, recompute), on_gpu(cfg, gpu, recompute) {
    on_cpu.init_random(7);
    on_gpu.init_random(7);
    for (std::size_t i = 0; i < on_cpu.quantized_tensors().size(); ++i) {
      QuantizedEntry& e = on_cpu.quantized_tensors()[i];
      const std::vector<float> w =
          random_floats(static_cast<std::size_t>(e.shape[0] * e.shape[1]), derive_seed(9, e.name), 0.05);
      e.tensor = quantize(cfg.quant, w.data(), e.shape, true, cfg.quant_block);
      on_gpu.quantized_tensors()[i].tensor = e.tensor;
    }
  }
  Model on_cpu, on_gpu;
};

std::vector<float> grads_of(Model& model) {
  std::vector<float> g(model.table().total());
  model.backend().to_host(g.data(), model.grads(), g.size() * sizeof(float));
  return g;
}

struct ModelCase {
  const char* name;
  std::array<int, kNumSites> lowrank, lora;
  const char* quant;
  bool recompute;
  bool silu = false;  // lowrank.activation silu
};

class GpuModel : public Gpu, public ::testing::WithParamInterface<ModelCase> {};

TEST_P(GpuModel, LossAndGradientsFollowTheCpu) {
  const ModelCase& c = GetParam();
  ModelConfig cfg = gpu_config(c.lowrank);
  std::copy(c.lora.begin(), c.lora.end(), cfg.lora_rank);
  cfg.quant = quant_from_name(c.quant);
  cfg.quant_embedding = cfg.quant != QuantKind::none;
  cfg.lowrank_silu = c.silu;
  ModelPair models(cfg, *cpu_, *gpu_, c.recompute);
  const int B = 3, n = B * cfg.seq_len;
  std::vector<int32_t> tokens = random_ids(n, cfg.vocab_size, 11),
                       targets = random_ids(n, cfg.vocab_size, 12);
  targets[5] = -1;
  models.on_cpu.zero_grads();
  models.on_gpu.zero_grads();
  const double loss_cpu = models.on_cpu.forward_backward(tokens.data(), targets.data(), B, 1.0f);
  const double loss_gpu = models.on_gpu.forward_backward(tokens.data(), targets.data(), B, 1.0f);
  EXPECT_NEAR(loss_gpu, loss_cpu, kLossTol * std::abs(loss_cpu));
  EXPECT_LT(rel_diff(grads_of(models.on_gpu), grads_of(models.on_cpu)), kGradTol);
}

INSTANTIATE_TEST_SUITE_P(
    Gpu, GpuModel,
    ::testing::Values(ModelCase{"dense", {0, 0, 0, 0}, {0, 0, 0, 0}, "none", false},
                      ModelCase{"lowrank", {16, 16, 24, 24}, {0, 0, 0, 0}, "none", false},
                      ModelCase{"recompute", {16, 0, 24, 0}, {0, 0, 0, 0}, "none", true},
                      ModelCase{"lora_nf4", {0, 0, 0, 0}, {8, 8, 8, 8}, "nf4", true},
                      ModelCase{"lora_int8_lowrank", {16, 16, 24, 24}, {8, 0, 8, 0}, "int8", true},
                      ModelCase{"lowrank_silu", {16, 16, 24, 24}, {0, 0, 0, 0}, "none", true, true},
                      ModelCase{
                          "lora_int8_lowrank_silu", {16, 16, 24, 24}, {8, 0, 8, 0}, "int8", true, true}),
    [](const auto& info) { return std::string(info.param.name); });

// 20 AdamW steps on a fixed batch sequence: the GPU's losses follow the CPU's.
TEST_F(Gpu, TrainingFollowsTheCpu) {
  const ModelConfig cfg = gpu_config({16, 16, 24, 24});
  ModelPair models(cfg, *cpu_, *gpu_, false);
  TrainConfig tc;
  tc.lr = 3e-3;
  AdamW opt_cpu(*cpu_, models.on_cpu.table(), tc), opt_gpu(*gpu_, models.on_gpu.table(), tc);
  const int B = 2, n = B * cfg.seq_len;
  for (int step = 0; step < 20; ++step) {
    const std::vector<int32_t> tokens = random_ids(n, 50, 100 + step);  // a skewed vocabulary: learnable
    double loss[2];
    int k = 0;
    for (auto [model, opt] : {std::pair{&models.on_cpu, &opt_cpu}, std::pair{&models.on_gpu, &opt_gpu}}) {
      model->zero_grads();
      loss[k++] = model->forward_backward(tokens.data(), tokens.data(), B, 1.0f);
      opt->update(model->params(), model->grads(), static_cast<float>(tc.lr));
    }
    EXPECT_NEAR(loss[1], loss[0], kLossTol * std::abs(loss[0])) << "step " << step + 1;
  }
}

// Two identical GPU runs give identical bits: no atomics, fixed reduction orders, a fixed GEMM plan.
TEST_F(Gpu, Deterministic) {
  const ModelConfig cfg = gpu_config({16, 0, 24, 0});
  std::vector<float> grads[2];
  double losses[2];
  const int B = 2, n = B * cfg.seq_len;
  const std::vector<int32_t> tokens = random_ids(n, cfg.vocab_size, 1),
                             targets = random_ids(n, cfg.vocab_size, 2);
  for (int run = 0; run < 2; ++run) {
    Model model(cfg, *gpu_, false);
    model.init_random(3);
    model.zero_grads();
    losses[run] = model.forward_backward(tokens.data(), targets.data(), B, 1.0f);
    grads[run] = grads_of(model);
  }
  EXPECT_EQ(losses[0], losses[1]);
  EXPECT_EQ(grads[0], grads[1]);
}

TEST_F(Gpu, DeviceMemoryIsTracked) {
  const std::size_t before = gpu_->peak_bytes();
  float* x = gpu_->alloc(std::size_t{1} << 20);
  EXPECT_GE(gpu_->peak_bytes(), before + (std::size_t{4} << 20));
  gpu_->release(x);
}

}  // namespace
}  // namespace lrllm

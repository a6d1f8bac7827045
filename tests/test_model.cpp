// The whole GPT-2 model: gradients against finite differences of the loss for dense, low-rank and mixed
// layers, ignored targets, recomputation, gradient scaling, initialisation and parameter counts.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "lrllm/backend/backend.h"
#include "lrllm/core/rng.h"
#include "lrllm/model/linear.h"
#include "lrllm/model/model.h"
#include "test_util.h"

namespace lrllm {
namespace {

using test::random_floats;
using test::rel_error;

constexpr int kBatch = 2;

using test::tiny_config;

std::vector<int32_t> random_ids(int n, int vocab, uint64_t seed) {
  Rng rng(seed);
  std::vector<int32_t> ids(n);
  for (int32_t& t : ids) t = static_cast<int32_t>(rng.below(vocab));
  return ids;
}

std::vector<float> host_copy(Model& model, const float* dev) {
  std::vector<float> h(model.table().total());
  model.backend().to_host(h.data(), dev, h.size() * sizeof(float));
  return h;
}

// Parameters of O(1) effect everywhere (weights 0.3, LayerNorm gains 1 +- 0.2, non-zero biases): GPT-2's own
// initialisation leaves most gradients so small that float finite differences could not resolve them.
void set_test_params(Model& model, uint64_t seed) {
  std::vector<float> host(model.table().total(), 0.0f);
  for (const TensorInfo& t : model.table().tensors()) {
    const bool ln_gain = t.name.ends_with("/w") && t.name.find("ln_") != std::string::npos;
    const double scale = t.shape.size() >= 2 ? 0.3 : 0.1;
    const std::vector<float> v =
        random_floats(t.size, derive_seed(seed, t.name), ln_gain ? 0.2 : scale, ln_gain ? 1.0 : 0.0);
    std::copy(v.begin(), v.end(), host.begin() + t.offset);
  }
  model.backend().to_device(model.params(), host.data(), host.size() * sizeof(float));
}

struct RandomBatch {
  std::vector<int32_t> tokens, targets;
};

RandomBatch random_batch(const ModelConfig& cfg, uint64_t seed) {
  const int n = kBatch * cfg.seq_len;
  return {random_ids(n, cfg.vocab_size, seed), random_ids(n, cfg.vocab_size, seed + 1)};
}

struct GradCase {
  const char* name;
  std::array<int, kNumSites> ranks;
  bool llama = false;
  bool silu = false;  // lowrank.activation silu
};

class ModelGradTest : public ::testing::TestWithParam<GradCase> {};

// Finite differences of a float loss: the loss carries ~1e-7 relative rounding noise, so small steps drown in
// it and large ones in truncation error. The fourth-order stencil
//   g = [8 (L(x+h) - L(x-h)) - (L(x+2h) - L(x-2h))] / 12h
// with h = 1e-2 has O(h^4) ~ 1e-8 truncation error and ~1e-5 noise, far below the gradients of these
// O(1)-scaled parameters, so a tight relative tolerance still holds while a wrong gradient term fails.
TEST_P(ModelGradTest, GradientsMatchFiniteDifferences) {
  ModelConfig cfg =
      GetParam().llama ? test::tiny_llama_config(GetParam().ranks) : tiny_config(GetParam().ranks);
  cfg.lowrank_silu = GetParam().silu;
  auto be = make_cpu_backend();
  Model model(cfg, *be, false);
  set_test_params(model, 7);
  const RandomBatch batch = random_batch(cfg, 11);
  model.zero_grads();
  model.forward_backward(batch.tokens.data(), batch.targets.data(), kBatch, 1.0f);
  const std::vector<float> grads = host_copy(model, model.grads());

  // One coordinate of every tensor, then random ones up to 48 in all.
  Rng rng(13);
  std::vector<std::pair<const TensorInfo*, std::size_t>> coords;
  for (const TensorInfo& t : model.table().tensors()) coords.emplace_back(&t, rng.below(t.size));
  const auto& tensors = model.table().tensors();
  while (coords.size() < 48) {
    const TensorInfo& t = tensors[rng.below(tensors.size())];
    coords.emplace_back(&t, rng.below(t.size));
  }

  float* params = model.params();  // CPU backend: host memory
  const auto loss_at = [&](std::size_t index, float value) {
    const float keep = params[index];
    params[index] = value;
    const double loss = model.forward_backward(batch.tokens.data(), batch.targets.data(), kBatch, 0.0f);
    params[index] = keep;
    return loss;
  };
  constexpr float h = 1e-2f;
  std::set<std::string> checked;
  double max_grad = 0;
  for (const auto& [t, i] : coords) {
    const std::size_t index = t->offset + i;
    const float x = params[index];
    const double fd = (8 * (loss_at(index, x + h) - loss_at(index, x - h)) -
                       (loss_at(index, x + 2 * h) - loss_at(index, x - 2 * h))) /
                      (12 * static_cast<double>(h));
    EXPECT_NEAR(grads[index], fd, 2e-3 * std::abs(fd) + 2e-5) << t->name << "[" << i << "]";
    checked.insert(t->name);
    max_grad = std::max(max_grad, std::abs(fd));
  }
  EXPECT_EQ(checked.size(), tensors.size());
  EXPECT_GT(max_grad, 1e-2) << "gradients too small for the check to mean anything";
}

INSTANTIATE_TEST_SUITE_P(Kinds, ModelGradTest,
                         ::testing::Values(GradCase{"dense", {0, 0, 0, 0}}, GradCase{"lowrank", {3, 3, 3, 3}},
                                           GradCase{"mixed", {3, 0, 4, 0}},
                                           GradCase{"llama_dense", {0, 0, 0, 0}, true},
                                           GradCase{"llama_lowrank", {3, 3, 3, 3}, true},
                                           GradCase{"llama_mixed", {3, 0, 4, 0}, true},
                                           GradCase{"lowrank_silu", {3, 3, 3, 3}, false, true},
                                           GradCase{"mixed_silu", {3, 0, 4, 0}, false, true},
                                           GradCase{"llama_lowrank_silu", {3, 3, 3, 3}, true, true}),
                         [](const ::testing::TestParamInfo<GradCase>& info) { return info.param.name; });

TEST(Model, IgnoredTargetsDropOutOfLossAndGradient) {
  const ModelConfig cfg = tiny_config({3, 0, 4, 0});
  auto be = make_cpu_backend();
  Model model(cfg, *be, false);
  set_test_params(model, 21);
  const RandomBatch batch = random_batch(cfg, 22);
  const int n = kBatch * cfg.seq_len;
  const std::set<int> ignored = {0, 3, 7, 11};

  // Each position's own loss and gradient, from a batch where it is the only valid target.
  std::vector<double> own_loss(n);
  std::vector<double> expected_grad(model.table().total(), 0.0);
  for (int i = 0; i < n; ++i) {
    std::vector<int32_t> only(n, -1);
    only[i] = batch.targets[i];
    model.zero_grads();
    own_loss[i] = model.forward_backward(batch.tokens.data(), only.data(), kBatch, 1.0f);
    if (ignored.count(i)) continue;
    const std::vector<float> g = host_copy(model, model.grads());
    for (std::size_t k = 0; k < g.size(); ++k) expected_grad[k] += g[k] / (n - ignored.size());
  }

  std::vector<int32_t> masked = batch.targets;
  double expected_loss = 0;
  for (int i = 0; i < n; ++i) {
    if (ignored.count(i))
      masked[i] = -1;
    else
      expected_loss += own_loss[i] / (n - ignored.size());
  }
  model.zero_grads();
  const double loss = model.forward_backward(batch.tokens.data(), masked.data(), kBatch, 1.0f);
  EXPECT_NEAR(loss, expected_loss, 1e-6 * expected_loss);
  EXPECT_LT(rel_error(host_copy(model, model.grads()), expected_grad), 1e-5);
}

// A micro-batch with nothing to predict (possible when targets are masked) has loss 0 and contributes no
// gradient.
TEST(Model, AllTargetsIgnoredGivesZeroLossAndNoGradient) {
  const ModelConfig cfg = tiny_config({0, 0, 0, 0});
  auto be = make_cpu_backend();
  Model model(cfg, *be, false);
  set_test_params(model, 31);
  const RandomBatch batch = random_batch(cfg, 32);
  const std::vector<int32_t> none(batch.targets.size(), -1);
  model.zero_grads();
  EXPECT_EQ(model.forward_backward(batch.tokens.data(), none.data(), kBatch, 1.0f), 0.0);
  const std::vector<float> g = host_copy(model, model.grads());
  EXPECT_EQ(std::count(g.begin(), g.end(), 0.0f), static_cast<std::ptrdiff_t>(g.size()))
      << "a batch without valid targets changed the gradients";
}

// With more rows than one classifier chunk, so that both paths must also split the classifier alike: on CPUs
// whose BLAS result for a row depends on the GEMM's row count, a different split changes the bits.
TEST(Model, RecomputeGivesBitwiseIdenticalLossAndGradients) {
  const ModelConfig cfg = tiny_config({3, 0, 4, 0});
  constexpr int B = 100;
  ASSERT_LT(classifier_chunk_rows(B * cfg.seq_len, cfg.vocab_size), B * cfg.seq_len);
  auto be = make_cpu_backend();
  Model plain(cfg, *be, false), recompute(cfg, *be, true);
  set_test_params(plain, 41);
  set_test_params(recompute, 41);
  const std::vector<int32_t> tokens = random_ids(B * cfg.seq_len, cfg.vocab_size, 42),
                             targets = random_ids(B * cfg.seq_len, cfg.vocab_size, 43);
  plain.zero_grads();
  recompute.zero_grads();
  const double a = plain.forward_backward(tokens.data(), targets.data(), B, 1.0f);
  const double b = recompute.forward_backward(tokens.data(), targets.data(), B, 1.0f);
  EXPECT_EQ(a, b);
  const std::vector<float> ga = host_copy(plain, plain.grads()), gb = host_copy(recompute, recompute.grads());
  EXPECT_EQ(std::memcmp(ga.data(), gb.data(), ga.size() * sizeof(float)), 0);
  EXPECT_GT(std::sqrt(be->sum_squares(plain.grads(), plain.table().total())), 0.0);
  // Recomputation stores one block's activations instead of all of them.
  recompute.reserve(B);
  plain.reserve(B);
  EXPECT_LT(recompute.memory().activations, plain.memory().activations);
}

TEST(Model, GradientsScaleWithGradScaleAndAccumulate) {
  const ModelConfig cfg = tiny_config({3, 3, 3, 3});
  auto be = make_cpu_backend();
  Model model(cfg, *be, false);
  set_test_params(model, 51);
  const RandomBatch batch = random_batch(cfg, 52);
  model.zero_grads();
  const double loss1 = model.forward_backward(batch.tokens.data(), batch.targets.data(), kBatch, 1.0f);
  const std::vector<float> g1 = host_copy(model, model.grads());
  model.zero_grads();
  const double loss2 = model.forward_backward(batch.tokens.data(), batch.targets.data(), kBatch, 0.37f);
  std::vector<double> scaled(g1.size());
  for (std::size_t i = 0; i < g1.size(); ++i) scaled[i] = 0.37 * g1[i];
  EXPECT_EQ(loss1, loss2) << "the loss must not depend on grad_scale";
  EXPECT_LT(rel_error(host_copy(model, model.grads()), scaled), 1e-6);

  // A second step adds to the gradients already there (gradient accumulation).
  model.forward_backward(batch.tokens.data(), batch.targets.data(), kBatch, 1.0f);
  for (std::size_t i = 0; i < g1.size(); ++i) scaled[i] = 1.37 * g1[i];
  EXPECT_LT(rel_error(host_copy(model, model.grads()), scaled), 1e-6);
}

// A batch of 100 sequences has 600 rows, more than one classifier chunk: its loss and gradients must equal
// those of the sequences run one at a time (each weighted 1/100: all have 6 targets).
TEST(Model, LargeBatchAcrossClassifierChunksEqualsSingleSequences) {
  const ModelConfig cfg = tiny_config({3, 0, 4, 0});
  constexpr int B = 100;
  ASSERT_LT(classifier_chunk_rows(B * cfg.seq_len, cfg.vocab_size), B * cfg.seq_len);
  auto be = make_cpu_backend();
  Model model(cfg, *be, false);
  set_test_params(model, 81);
  const std::vector<int32_t> tokens = random_ids(B * cfg.seq_len, cfg.vocab_size, 82),
                             targets = random_ids(B * cfg.seq_len, cfg.vocab_size, 83);
  model.zero_grads();
  double mean_loss = 0;
  for (int b = 0; b < B; ++b) {
    const std::size_t off = static_cast<std::size_t>(b) * cfg.seq_len;
    mean_loss += model.forward_backward(tokens.data() + off, targets.data() + off, 1, 1.0f / B) / B;
  }
  const std::vector<float> expected = host_copy(model, model.grads());
  model.zero_grads();
  EXPECT_NEAR(model.forward_backward(tokens.data(), targets.data(), B, 1.0f), mean_loss, 1e-6 * mean_loss);
  EXPECT_LT(rel_error(host_copy(model, model.grads()), test::to_double(expected)), 1e-5);
}

TEST(Model, ClassifierChunksAreEqualAndBounded) {
  EXPECT_EQ(classifier_chunk_rows(1024, 50257), 256);
  EXPECT_EQ(classifier_chunk_rows(300, 50257), 150);
  EXPECT_EQ(classifier_chunk_rows(600, 37), 200);
  // A vocabulary so large that the byte budget, not the row limit, decides.
  EXPECT_EQ(classifier_chunk_rows(1000, 1 << 20), 32);
  EXPECT_EQ(classifier_chunk_rows(1, 50257), 1);
  // Never more than the limit, whatever N: a smaller batch after a larger one fits the same buffer.
  for (int n = 1; n < 2000; n += 37) EXPECT_LE(classifier_chunk_rows(n, 50257), classifier_row_limit(50257));
}

TEST(Model, TokensOutsideVocabularyAreInputErrors) {
  const ModelConfig cfg = tiny_config({0, 0, 0, 0});
  auto be = make_cpu_backend();
  Model model(cfg, *be, false);
  RandomBatch batch = random_batch(cfg, 61);
  batch.tokens[4] = cfg.vocab_size;
  EXPECT_THROW(model.forward_backward(batch.tokens.data(), batch.targets.data(), kBatch, 0.0f), InputError);
  batch.tokens[4] = 0;
  batch.targets[2] = cfg.vocab_size + 5;
  EXPECT_THROW(model.forward_backward(batch.tokens.data(), batch.targets.data(), kBatch, 0.0f), InputError);
}

std::vector<float> tensor_values(Model& model, const std::string& name) {
  const TensorInfo& t = model.table().at(name);
  const std::vector<float> all = host_copy(model, model.params());
  return {all.begin() + t.offset, all.begin() + t.offset + t.size};
}

TEST(Model, InitRandomIsDeterministicPerSeedAndIndependentOfLayout) {
  auto be = make_cpu_backend();
  const ModelConfig dense_cfg = tiny_config({0, 0, 0, 0}), mixed_cfg = tiny_config({3, 0, 4, 0});
  Model a(dense_cfg, *be, false), b(dense_cfg, *be, false), c(dense_cfg, *be, false),
      mixed(mixed_cfg, *be, false);
  a.init_random(5);
  b.init_random(5);
  c.init_random(6);
  mixed.init_random(5);
  const std::vector<float> pa = host_copy(a, a.params()), pb = host_copy(b, b.params()),
                           pc = host_copy(c, c.params());
  EXPECT_EQ(pa, pb);
  EXPECT_NE(pa, pc);
  // The mixed model registers low-rank qkv before h.1/mlp/proj, shifting its offset; its values must not
  // move.
  for (const char* name : {"wte", "wpe", "h.1/mlp/proj/W", "h.0/attn/proj/W", "h.1/ln_2/w"})
    EXPECT_EQ(tensor_values(a, name), tensor_values(mixed, name)) << name;

  // GPT-2's scheme: LayerNorm gains 1, biases and shifts 0, weights N(0, 0.02), residual projections smaller.
  for (const TensorInfo& t : a.table().tensors()) {
    const std::vector<float> v = tensor_values(a, t.name);
    if (t.name.find("ln_") != std::string::npos && t.name.ends_with("/w")) {
      EXPECT_TRUE(std::all_of(v.begin(), v.end(), [](float x) { return x == 1.0f; })) << t.name;
    } else if (t.shape.size() == 1) {
      EXPECT_TRUE(std::all_of(v.begin(), v.end(), [](float x) { return x == 0.0f; })) << t.name;
    }
  }
  const auto stddev = [](const std::vector<float>& v) {
    double s = 0;
    for (float x : v) s += static_cast<double>(x) * x;
    return std::sqrt(s / v.size());
  };
  EXPECT_NEAR(stddev(tensor_values(a, "wte")), 0.02, 0.003);
  EXPECT_NEAR(stddev(tensor_values(a, "h.0/attn/qkv/W")), 0.02, 0.003);
  EXPECT_NEAR(stddev(tensor_values(a, "h.0/mlp/fc/W")), 0.02, 0.003);
}

// init_values draws value i from its own place in the sequence (threads split a tensor); it must be what one
// generator drawing in order gives.
TEST(Model, InitValuesAreOneGeneratorsSequenceInOrder) {
  const uint64_t seed = derive_seed(11, "h.0/attn/qkv/W");
  const std::vector<float> w = init_values(11, "h.0/attn/qkv/W", TensorRole::weight, {7, 9}, 2);
  Rng rng(seed);
  for (float v : w) ASSERT_EQ(v, static_cast<float>(rng.normal() * 0.02));
  const std::vector<float> a = init_values(11, "h.0/attn/qkv/lora_A", TensorRole::lora_a, {3, 16}, 2);
  Rng uniform(derive_seed(11, "h.0/attn/qkv/lora_A"));
  for (float v : a) ASSERT_EQ(v, static_cast<float>((2.0 * uniform.uniform() - 1.0) * 0.25));
  EXPECT_EQ(init_values(11, "ln_f/w", TensorRole::norm_gain, {4}, 2), std::vector<float>(4, 1.0f));
}

// GPT-2's scales, measured on a model wide enough for sample statistics: weights 0.02, residual projections
// 0.02 / sqrt(2 n_layer), and for a low-rank layer the product B A (not A or B) at the dense layer's scale.
TEST(Model, InitRandomScalesOfDenseAndLowRankLayers) {
  ModelConfig cfg = tiny_config({16, 0, 0, 16});
  cfg.d_model = 64;
  cfg.d_ff = 256;
  cfg.n_head = 4;
  auto be = make_cpu_backend();
  Model model(cfg, *be, false);
  model.init_random(3);
  const auto rms = [](const std::vector<double>& v) {
    double s = 0;
    for (double x : v) s += x * x;
    return std::sqrt(s / v.size());
  };
  const auto dense = [&](const std::string& name) {
    return rms(test::to_double(tensor_values(model, name)));
  };
  const auto product = [&](const std::string& prefix) {
    const std::vector<float> A = tensor_values(model, prefix + "/A"), B = tensor_values(model, prefix + "/B");
    const TensorInfo& a = model.table().at(prefix + "/A");
    const std::size_t r = a.shape[0], in = a.shape[1], out = B.size() / r;
    std::vector<double> W(out * in, 0.0);
    for (std::size_t o = 0; o < out; ++o)
      for (std::size_t k = 0; k < r; ++k)
        for (std::size_t i = 0; i < in; ++i)
          W[o * in + i] += static_cast<double>(B[o * r + k]) * A[k * in + i];
    return rms(W);
  };
  const double resid = 0.02 / std::sqrt(2.0 * cfg.n_layer);
  EXPECT_NEAR(dense("h.0/mlp/fc/W"), 0.02, 0.002);
  EXPECT_NEAR(dense("h.1/attn/proj/W"), resid, 0.1 * resid);
  EXPECT_NEAR(product("h.0/attn/qkv"), 0.02, 0.002);
  EXPECT_NEAR(product("h.1/mlp/proj"), resid, 0.1 * resid);
}

// lowrank.init product_std: CoLA's factors, each N(0, r^-1/4 (in+out)^-1/4), residual projections alike.
TEST(Model, InitRandomProductStdFollowsColasRule) {
  ModelConfig cfg = tiny_config({16, 0, 0, 16});
  cfg.d_model = 64;
  cfg.d_ff = 256;
  cfg.n_head = 4;
  cfg.lowrank_product_std = true;
  auto be = make_cpu_backend();
  Model model(cfg, *be, false);
  model.init_random(3);
  const auto rms = [&](const std::string& name) {
    double s = 0;
    const std::vector<float> v = tensor_values(model, name);
    for (float x : v) s += static_cast<double>(x) * x;
    return std::sqrt(s / v.size());
  };
  const auto rule = [](double r, double in, double out) {
    return std::pow(r, -0.25) * std::pow(in + out, -0.25);
  };
  for (const char* f : {"h.0/attn/qkv/A", "h.0/attn/qkv/B"})
    EXPECT_NEAR(rms(f), rule(16, 64, 192), 0.05 * rule(16, 64, 192)) << f;
  for (const char* f : {"h.1/mlp/proj/A", "h.1/mlp/proj/B"})
    EXPECT_NEAR(rms(f), rule(16, 256, 64), 0.05 * rule(16, 256, 64)) << f;
  EXPECT_NEAR(rms("h.0/mlp/fc/W"), 0.02, 0.002) << "dense sites keep GPT-2's init";
}

// lowrank.refactor_every's step: the product B A is kept (to float rounding) and the factors come out
// balanced, B^T B = A A^T diagonal, whatever their scales were before.
TEST(Model, RefactorFactorsKeepsTheProductAndBalancesTheFactors) {
  ModelConfig cfg = tiny_config({3, 0, 4, 0});
  auto be = make_cpu_backend();
  Model model(cfg, *be, false);
  set_test_params(model, 5);
  // Unbalance one site by a factor of 10: A x 10, B / 10 has the same product.
  float* p = model.params();
  const TensorInfo& a0 = model.table().at("h.0/attn/qkv/A");
  const TensorInfo& b0 = model.table().at("h.0/attn/qkv/B");
  for (std::size_t i = 0; i < a0.size; ++i) p[a0.offset + i] *= 10.0f;
  for (std::size_t i = 0; i < b0.size; ++i) p[b0.offset + i] /= 10.0f;
  const auto product = [&](const std::string& site) {
    const TensorInfo& a = model.table().at(site + "/A");
    const TensorInfo& b = model.table().at(site + "/B");
    const std::size_t r = a.shape[0], in = a.shape[1], out = b.shape[0];
    std::vector<double> W(out * in, 0.0);
    for (std::size_t o = 0; o < out; ++o)
      for (std::size_t k = 0; k < r; ++k)
        for (std::size_t i = 0; i < in; ++i)
          W[o * in + i] += static_cast<double>(p[b.offset + o * r + k]) * p[a.offset + k * in + i];
    return W;
  };
  const std::vector<std::string> sites = {"h.0/attn/qkv", "h.1/attn/qkv", "h.0/mlp/fc", "h.1/mlp/fc"};
  std::vector<std::vector<double>> before;
  for (const std::string& s : sites) before.push_back(product(s));
  const std::vector<float> dense_before = tensor_values(model, "h.0/attn/proj/W");
  EXPECT_EQ(refactor_factors(*be, model.table(), model.params()), 4);
  for (std::size_t k = 0; k < sites.size(); ++k) {
    const std::vector<double> after = product(sites[k]);
    double err = 0, norm = 0;
    for (std::size_t i = 0; i < after.size(); ++i) {
      err = std::max(err, std::abs(after[i] - before[k][i]));
      norm = std::max(norm, std::abs(before[k][i]));
    }
    EXPECT_LT(err, 1e-5 * norm) << sites[k];
    const TensorInfo& a = model.table().at(sites[k] + "/A");
    const TensorInfo& b = model.table().at(sites[k] + "/B");
    const std::size_t r = a.shape[0], in = a.shape[1], out = b.shape[0];
    for (std::size_t i = 0; i < r; ++i)
      for (std::size_t j = 0; j < r; ++j) {
        double aa = 0, bb = 0;
        for (std::size_t c = 0; c < in; ++c)
          aa += static_cast<double>(p[a.offset + i * in + c]) * p[a.offset + j * in + c];
        for (std::size_t o = 0; o < out; ++o)
          bb += static_cast<double>(p[b.offset + o * r + i]) * p[b.offset + o * r + j];
        EXPECT_NEAR(aa, bb, 1e-4 * (std::abs(aa) + 1e-3))
            << sites[k] << " A A^T vs B^T B at " << i << "," << j;
        if (i != j) {
          EXPECT_NEAR(aa, 0.0, 1e-4) << sites[k] << " off-diagonal " << i << "," << j;
        }
      }
  }
  EXPECT_EQ(tensor_values(model, "h.0/attn/proj/W"), dense_before) << "dense sites are left alone";
}

TEST(Model, ParamCountsMatchHandComputedNumbers) {
  auto be = make_cpu_backend();
  // vocab 37, seq_len 6, d_model 8, d_ff 16, 2 layers.
  // embedding: wte 37*8 + wpe 6*8 = 344.
  // other: per layer 2 LayerNorms (2*2*8 = 32) and biases 24 + 8 + 16 + 8 = 56 -> 88; 2 layers + ln_f 16 =
  // 192.
  struct Expected {
    std::array<int, kNumSites> ranks;
    std::size_t dense, lowrank;
  };
  const Expected cases[] = {
      // qkv 24*8 + proj 8*8 + fc 16*8 + mlp_proj 8*16 = 512 per layer.
      {{0, 0, 0, 0}, 2 * 512, 0},
      // rank 3: qkv 3*(8+24) = 96, proj 3*(8+8) = 48, fc 3*(8+16) = 72, mlp_proj 3*(16+8) = 72 -> 288 per
      // layer.
      {{3, 3, 3, 3}, 0, 2 * 288},
      // qkv rank 3 = 96 and fc rank 4: 4*(8+16) = 96 low-rank; proj 64 and mlp_proj 128 dense.
      {{3, 0, 4, 0}, 2 * 192, 2 * 192},
  };
  for (const Expected& e : cases) {
    Model model(tiny_config(e.ranks), *be, false);
    const ParamCounts c = model.param_counts();
    EXPECT_EQ(c.embedding, 344u);
    EXPECT_EQ(c.linear_dense, e.dense);
    EXPECT_EQ(c.linear_lowrank, e.lowrank);
    EXPECT_EQ(c.other, 192u);
    EXPECT_EQ(c.total(), model.table().count());
  }
}

// The description is what the model registers: every embedding, norm and bias it lists is a tensor of the
// model of that size, and every other tensor of the model is a linear site's weight at a path it lists.
TEST(Architecture, ListsWhatTheModelRegisters) {
  auto be = make_cpu_backend();
  const ModelConfig cfg = tiny_config({3, 0, 4, 0});
  const Model model(cfg, *be, false);
  const Architecture arch = describe_architecture(cfg);
  std::set<std::string> listed;
  for (const auto& [name, size] : non_linear_tensors(cfg)) {
    const TensorInfo* t = model.table().find(name);
    ASSERT_NE(t, nullptr) << name;
    EXPECT_EQ(t->size, size) << name;
    listed.insert(name);
  }
  for (const TensorInfo& t : model.table().tensors()) {
    if (listed.count(t.name)) continue;
    const auto slash = t.name.rfind('/');
    const std::string module = t.name.substr(0, slash), kind = t.name.substr(slash + 1);
    const bool at_a_site = std::any_of(arch.sites.begin(), arch.sites.end(),
                                       [&](const LinearSpec& s) { return module.ends_with("/" + s.path); });
    EXPECT_TRUE(at_a_site && (kind == "W" || kind == "A" || kind == "B")) << t.name;
  }
  // The stage balancer's cost of a block: 6 FLOPs a weight as factorized, and 6 T C of attention.
  const double C = cfg.d_model, F = cfg.ff(), T = cfg.seq_len;
  EXPECT_DOUBLE_EQ(arch.block_flops, 6 * (T * C + 3 * (C + 3 * C) + C * C + 4 * (C + F) + F * C));
  EXPECT_DOUBLE_EQ(arch.head_flops, 6.0 * cfg.vocab_size * C);
}

TEST(Linear, LowRankForwardEqualsDenseWithProductWeight) {
  constexpr int in = 7, out = 5, rank = 3, N = 4;
  ParamTable table;  // trainable base and adapters in one table, as in pretraining
  const Linear low(table, table, false, "low", in, out, rank, 0, 0.0, false);
  const Linear dense(table, table, false, "dense", in, out, 0, 0, 0.0, false);
  EXPECT_TRUE(low.lowrank());
  EXPECT_FALSE(dense.lowrank());
  EXPECT_EQ(low.weight_count(), static_cast<std::size_t>(rank * (in + out)));
  EXPECT_EQ(dense.weight_count(), static_cast<std::size_t>(in * out));

  std::vector<float> params(table.total(), 0.0f);
  const std::vector<float> A = random_floats(rank * in, 70), B = random_floats(out * rank, 71),
                           bias = random_floats(out, 72), x = random_floats(N * in, 73);
  std::copy(A.begin(), A.end(), params.begin() + low.a.offset);
  std::copy(B.begin(), B.end(), params.begin() + low.b_mat.offset);
  std::copy(bias.begin(), bias.end(), params.begin() + low.bias.offset);
  std::copy(bias.begin(), bias.end(), params.begin() + dense.bias.offset);
  for (int o = 0; o < out; ++o) {
    for (int i = 0; i < in; ++i) {
      double w = 0;
      for (int r = 0; r < rank; ++r) w += static_cast<double>(B[o * rank + r]) * A[r * in + i];
      params[dense.w.offset + o * in + i] = static_cast<float>(w);
    }
  }
  auto be = make_cpu_backend();
  std::vector<float> y_low(N * out), y_dense(N * out), mid(N * rank), unused(1);
  const WeightBuffers w{params.data(), nullptr, nullptr};
  low.forward(*be, w, {}, x.data(), y_low.data(), mid.data(), nullptr, nullptr, N);
  dense.forward(*be, w, {}, x.data(), y_dense.data(), unused.data(), nullptr, nullptr, N);
  EXPECT_LT(rel_error(y_low, test::to_double(y_dense)), 1e-5);
}

// Finetuning pads each batch to its longest row: rows of T < seq_len must give the loss and gradients of the
// same rows padded to seq_len with targets that carry no loss.
TEST(Model, ShortRowsEqualTheSameRowsPaddedToSeqLen) {
  ModelConfig cfg = tiny_config({3, 0, 4, 0});
  cfg.seq_len = 10;
  constexpr int B = 3, T = 6;
  auto be = make_cpu_backend();
  Model model(cfg, *be, false);
  set_test_params(model, 61);
  Batch short_rows, padded;
  short_rows.resize(B, T);
  short_rows.tokens = random_ids(B * T, cfg.vocab_size, 62);
  short_rows.targets = random_ids(B * T, cfg.vocab_size, 63);
  short_rows.targets[2] = -1;
  padded.resize(B, cfg.seq_len);
  std::fill(padded.targets.begin(), padded.targets.end(), -1);
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T; ++t) {
      padded.tokens[b * cfg.seq_len + t] = short_rows.tokens[b * T + t];
      padded.targets[b * cfg.seq_len + t] = short_rows.targets[b * T + t];
    }
  model.zero_grads();
  const double loss_short = model.forward_backward(short_rows, 1.0f);
  const std::vector<float> g_short = host_copy(model, model.grads());
  model.zero_grads();
  const double loss_padded = model.forward_backward(padded, 1.0f);
  EXPECT_NEAR(loss_short, loss_padded, 1e-6 * loss_padded);
  EXPECT_LT(rel_error(g_short, test::to_double(host_copy(model, model.grads()))), 1e-5);
}

// Packing: two examples in one row, with their own positions, must give the loss and every gradient
// (position table included) of the two examples in rows of their own: neither sees the other.
TEST(Model, PackedRowEqualsItsExamplesInRowsOfTheirOwn) {
  ModelConfig cfg = tiny_config({3, 0, 4, 0});
  cfg.seq_len = 10;
  constexpr int first_len = 4, second_len = 5;
  auto be = make_cpu_backend();
  for (bool recompute : {false, true}) {
    Model model(cfg, *be, recompute);
    set_test_params(model, 71);
    const std::vector<int32_t> tokens = random_ids(first_len + second_len, cfg.vocab_size, 72),
                               targets = random_ids(first_len + second_len, cfg.vocab_size, 73);
    Batch packed, separate;
    packed.resize(1, first_len + second_len);
    packed.tokens = tokens;
    packed.targets = targets;
    for (int p = 0; p < first_len; ++p) packed.positions.push_back(p);
    for (int p = 0; p < second_len; ++p) packed.positions.push_back(p);
    separate.resize(2, second_len);
    std::fill(separate.targets.begin(), separate.targets.end(), -1);
    std::copy(tokens.begin(), tokens.begin() + first_len, separate.tokens.begin());
    std::copy(targets.begin(), targets.begin() + first_len, separate.targets.begin());
    std::copy(tokens.begin() + first_len, tokens.end(), separate.tokens.begin() + second_len);
    std::copy(targets.begin() + first_len, targets.end(), separate.targets.begin() + second_len);
    model.zero_grads();
    const double loss_packed = model.forward_backward(packed, 1.0f);
    const std::vector<float> g_packed = host_copy(model, model.grads());
    model.zero_grads();
    const double loss_separate = model.forward_backward(separate, 1.0f);
    EXPECT_NEAR(loss_packed, loss_separate, 1e-6 * loss_separate) << "recompute " << recompute;
    EXPECT_LT(rel_error(g_packed, test::to_double(host_copy(model, model.grads()))), 1e-5)
        << "recompute " << recompute;
    // Without the positions the second example would see the first: a different loss.
    Batch unmasked = packed;
    unmasked.positions.clear();
    EXPECT_GT(std::abs(model.forward_backward(unmasked, 0.0f) - loss_separate), 1e-4);
  }
}

}  // namespace
}  // namespace lrllm

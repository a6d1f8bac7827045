// LoRA over a frozen base: adapter gradients against finite differences, adapters that start as the
// identity, and a quantized base that computes exactly what the float model with its dequantized weights
// does.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <set>
#include <string>
#include <vector>

#include "lrllm/backend/backend.h"
#include "lrllm/core/rng.h"
#include "lrllm/model/model.h"
#include "lrllm/model/quant.h"
#include "test_util.h"

namespace lrllm {
namespace {

using test::random_floats;
using test::rel_error;
using test::tiny_config;

constexpr int kBatch = 2;

ModelConfig lora_config(std::array<int, kNumSites> lowrank, std::array<int, kNumSites> lora,
                        const std::string& quant) {
  ModelConfig m = tiny_config(lowrank);
  std::copy(lora.begin(), lora.end(), m.lora_rank);
  m.lora_alpha = 2.0;  // scale 1 at rank 2: a strongly amplified adapter makes the loss too curved for FD
  m.quant = quant_from_name(quant);
  m.quant_block = 16;
  return m;
}

// O(1) values in every float tensor of a table (see test_model.cpp: small values would hide gradients).
void fill_table(Model& model, const ParamTable& table, float* device, uint64_t seed) {
  std::vector<float> host(table.total(), 0.0f);
  for (const TensorInfo& t : table.tensors()) {
    const bool ln_gain = t.name.ends_with("/w") && t.name.find("ln_") != std::string::npos;
    const double scale = t.shape.size() >= 2 ? 0.3 : 0.1;
    const std::vector<float> v =
        random_floats(t.size, derive_seed(seed, t.name), ln_gain ? 0.2 : scale, ln_gain ? 1.0 : 0.0);
    std::copy(v.begin(), v.end(), host.begin() + t.offset);
  }
  model.backend().to_device(device, host.data(), host.size() * sizeof(float));
}

// Random values for every quantized tensor, quantized as the model's config says.
void fill_quantized(Model& model, uint64_t seed) {
  const ModelConfig& c = model.config();
  for (QuantizedEntry& e : model.quantized_tensors()) {
    const std::vector<float> w =
        random_floats(static_cast<std::size_t>(e.shape[0] * e.shape[1]), derive_seed(seed, e.name), 0.3);
    e.tensor = quantize(c.quant, w.data(), e.shape, true, c.quant_block);
  }
}

std::vector<int32_t> ids(int n, int vocab, uint64_t seed) {
  Rng rng(seed);
  std::vector<int32_t> v(n);
  for (int32_t& t : v) t = static_cast<int32_t>(rng.below(vocab));
  return v;
}

std::vector<float> grads_of(Model& model) {
  std::vector<float> g(model.table().total());
  model.backend().to_host(g.data(), model.grads(), g.size() * sizeof(float));
  return g;
}

struct LoraCase {
  const char* name;
  std::array<int, kNumSites> lowrank, lora;
  const char* quant;
  double dropout = 0.0;
};

class LoraGradTest : public ::testing::TestWithParam<LoraCase> {};

// Only the adapters are trainable: the model's table holds exactly lora_A and lora_B of the chosen sites, and
// each of their gradients matches fourth-order finite differences of the loss (see test_model.cpp).
TEST_P(LoraGradTest, AdapterGradientsMatchFiniteDifferences) {
  const LoraCase& c = GetParam();
  ModelConfig cfg = lora_config(c.lowrank, c.lora, c.quant);
  cfg.lora_dropout = c.dropout;
  auto be = make_cpu_backend();
  Model model(cfg, *be, false);
  // In training mode with a fixed seed every pass draws the same dropout masks, so finite differences see the
  // function whose gradient backward computes.
  model.set_training(true);
  model.set_dropout_seed(42);
  for (const TensorInfo& t : model.table().tensors())
    EXPECT_TRUE(t.name.ends_with("/lora_A") || t.name.ends_with("/lora_B")) << t.name << " is trainable";
  fill_table(model, model.table(), model.params(), 3);
  fill_table(model, model.frozen_table(), model.frozen(), 4);
  fill_quantized(model, 5);
  const std::vector<int32_t> tokens = ids(kBatch * cfg.seq_len, cfg.vocab_size, 6),
                             targets = ids(kBatch * cfg.seq_len, cfg.vocab_size, 7);
  model.zero_grads();
  model.forward_backward(tokens.data(), targets.data(), kBatch, 1.0f);
  const std::vector<float> grads = grads_of(model);

  float* params = model.params();
  const auto loss_at = [&](std::size_t index, float value) {
    const float keep = params[index];
    params[index] = value;
    const double loss = model.forward_backward(tokens.data(), targets.data(), kBatch, 0.0f);
    params[index] = keep;
    return loss;
  };
  constexpr float h = 1e-2f;
  Rng rng(8);
  std::set<std::string> checked;
  for (const TensorInfo& t : model.table().tensors()) {
    for (int k = 0; k < 3; ++k) {
      const std::size_t index = t.offset + rng.below(t.size);
      const float x = params[index];
      const double fd = (8 * (loss_at(index, x + h) - loss_at(index, x - h)) -
                         (loss_at(index, x + 2 * h) - loss_at(index, x - 2 * h))) /
                        (12 * static_cast<double>(h));
      EXPECT_NEAR(grads[index], fd, 2e-3 * std::abs(fd) + 2e-5) << t.name;
      checked.insert(t.name);
    }
  }
  EXPECT_EQ(checked.size(), model.table().tensors().size());
}

INSTANTIATE_TEST_SUITE_P(
    Bases, LoraGradTest,
    ::testing::Values(LoraCase{"dense_float", {0, 0, 0, 0}, {2, 2, 2, 2}, "none"},
                      LoraCase{"lowrank_float", {3, 0, 4, 0}, {2, 0, 2, 3}, "none"},
                      LoraCase{"dense_nf4", {0, 0, 0, 0}, {2, 2, 0, 2}, "nf4"},
                      LoraCase{"mixed_int8", {3, 0, 0, 0}, {0, 2, 2, 2}, "int8"},
                      LoraCase{"dense_nf4_dropout", {0, 0, 0, 0}, {2, 2, 2, 2}, "nf4", 0.3},
                      LoraCase{"lowrank_dropout", {3, 0, 4, 0}, {2, 2, 2, 2}, "none", 0.5}),
    [](const ::testing::TestParamInfo<LoraCase>& info) { return info.param.name; });

// Dropout is a training-time regulariser: it changes the training loss, and evaluation (training off) sees
// the model without it.
TEST(Lora, DropoutActsOnlyWhileTraining) {
  ModelConfig cfg = lora_config({0, 0, 0, 0}, {2, 2, 2, 2}, "none");
  const ModelConfig plain_cfg = cfg;
  cfg.lora_dropout = 0.5;
  auto be = make_cpu_backend();
  Model dropped(cfg, *be, false), plain(plain_cfg, *be, false);
  for (Model* m : {&dropped, &plain}) {
    fill_table(*m, m->table(), m->params(), 31);
    fill_table(*m, m->frozen_table(), m->frozen(), 32);
  }
  const std::vector<int32_t> tokens = ids(kBatch * cfg.seq_len, cfg.vocab_size, 33),
                             targets = ids(kBatch * cfg.seq_len, cfg.vocab_size, 34);
  const double eval_loss = dropped.forward_backward(tokens.data(), targets.data(), kBatch, 0.0f);
  EXPECT_EQ(eval_loss, plain.forward_backward(tokens.data(), targets.data(), kBatch, 0.0f));
  dropped.set_training(true);
  dropped.set_dropout_seed(1);
  const double a = dropped.forward_backward(tokens.data(), targets.data(), kBatch, 0.0f);
  EXPECT_NE(a, eval_loss);
  EXPECT_EQ(a, dropped.forward_backward(tokens.data(), targets.data(), kBatch, 0.0f))
      << "same seed, same masks";
  dropped.set_dropout_seed(2);
  EXPECT_NE(a, dropped.forward_backward(tokens.data(), targets.data(), kBatch, 0.0f))
      << "another seed, other masks";
}

// lora_B starts at zero, so a freshly initialised adapter leaves the base model's loss exactly as it was.
TEST(Lora, FreshAdaptersDoNotChangeTheModel) {
  const ModelConfig base_cfg = tiny_config({3, 0, 0, 0});
  const ModelConfig cfg = lora_config({3, 0, 0, 0}, {2, 2, 2, 2}, "none");
  auto be = make_cpu_backend();
  Model base(base_cfg, *be, false), adapted(cfg, *be, false);
  fill_table(base, base.table(), base.params(), 9);
  fill_table(adapted, adapted.frozen_table(), adapted.frozen(), 9);  // same names, same values
  adapted.init_adapters(10);
  const std::vector<int32_t> tokens = ids(kBatch * cfg.seq_len, cfg.vocab_size, 11),
                             targets = ids(kBatch * cfg.seq_len, cfg.vocab_size, 12);
  EXPECT_EQ(base.forward_backward(tokens.data(), targets.data(), kBatch, 0.0f),
            adapted.forward_backward(tokens.data(), targets.data(), kBatch, 0.0f));
}

// The quantized base (dense W, low-rank A and B, the tied wte) dequantizes tile by tile; the result equals a
// float model holding the dequantized values.
TEST(Lora, QuantizedBaseEqualsFloatModelWithDequantizedWeights) {
  for (const std::array<int, kNumSites> lowrank : {std::array{0, 0, 0, 0}, std::array{4, 0, 4, 0}})
    for (const bool embedding : {false, true})
      for (const char* quant : {"int8", "nf4"}) {
        ModelConfig qcfg = lora_config(lowrank, {2, 2, 2, 2}, quant);
        qcfg.quant_embedding = embedding;
        const ModelConfig fcfg = lora_config(lowrank, {2, 2, 2, 2}, "none");
        auto be = make_cpu_backend();
        Model q(qcfg, *be, false), f(fcfg, *be, false);
        fill_table(q, q.table(), q.params(), 13);
        fill_table(f, f.table(), f.params(), 13);
        fill_table(q, q.frozen_table(), q.frozen(), 14);
        fill_table(f, f.frozen_table(), f.frozen(), 14);
        fill_quantized(q, 15);
        for (const QuantizedEntry& e : q.quantized_tensors()) {
          const TensorInfo& t = f.frozen_table().at(e.name);
          dequantize(e.tensor, 0, e.tensor.size(), f.frozen() + t.offset);
        }
        const std::vector<int32_t> tokens = ids(kBatch * qcfg.seq_len, qcfg.vocab_size, 16),
                                   targets = ids(kBatch * qcfg.seq_len, qcfg.vocab_size, 17);
        q.zero_grads();
        f.zero_grads();
        const double lq = q.forward_backward(tokens.data(), targets.data(), kBatch, 1.0f);
        const double lf = f.forward_backward(tokens.data(), targets.data(), kBatch, 1.0f);
        ASSERT_EQ(q.quantized_tensors().size(),
                  4 * static_cast<std::size_t>(qcfg.n_layer) +
                      2 * static_cast<std::size_t>(qcfg.n_layer) * (lowrank[0] > 0) + embedding);
        EXPECT_NEAR(lq, lf, 1e-6 * std::abs(lf)) << quant << " embedding " << embedding;
        EXPECT_LT(rel_error(grads_of(q), test::to_double(grads_of(f))), 1e-5)
            << quant << " embedding " << embedding;
      }
}

}  // namespace
}  // namespace lrllm

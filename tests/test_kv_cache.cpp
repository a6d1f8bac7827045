// Incremental decoding with the key/value cache (Model::decode) against the full forward (Model::logits_at)
// at every position, for GPT-2 and Llama with dense, low-rank and LoRA-over-NF4 sites; and generation with
// the cache against generation without it, past the window too.
#include <gtest/gtest.h>

#include <array>
#include <ostream>
#include <string>
#include <vector>

#include "lrllm/backend/backend.h"
#include "lrllm/core/rng.h"
#include "lrllm/model/model.h"
#include "lrllm/model/quant.h"
#include "lrllm/modes/generate.h"
#include "test_util.h"

namespace lrllm {
namespace {

using test::random_floats;
using test::rel_error;
using test::to_double;

struct CacheCase {
  const char* name;
  bool llama;
  std::array<int, kNumSites> lowrank, lora;
  const char* quant;
};

void PrintTo(const CacheCase& c, std::ostream* os) {
  *os << c.name;
}

ModelConfig case_config(const CacheCase& c) {
  ModelConfig m = c.llama ? test::tiny_llama_config(c.lowrank) : test::tiny_config(c.lowrank);
  m.seq_len = 12;
  std::copy(c.lora.begin(), c.lora.end(), m.lora_rank);
  m.lora_alpha = m.any_lora() ? 2.0 : 0.0;
  m.quant = quant_from_name(c.quant);
  m.quant_block = 16;
  m.quant_embedding = m.quant != QuantKind::none;
  return m;
}

// O(1) values in every float tensor (LoRA's B too, so adapters change the output) and every quantized one:
// near-uniform logits would hide a wrong position or a stale cache row.
void fill(Model& model, uint64_t seed) {
  auto table = [&](const ParamTable& t, float* device) {
    std::vector<float> host(t.total(), 0.0f);
    for (const TensorInfo& info : t.tensors()) {
      const bool gain = info.role == TensorRole::norm_gain;
      const std::vector<float> v =
          random_floats(info.size, derive_seed(seed, info.name),
                        gain ? 0.2 : (info.shape.size() >= 2 ? 0.3 : 0.1), gain ? 1 : 0);
      std::copy(v.begin(), v.end(), host.begin() + info.offset);
    }
    model.backend().to_device(device, host.data(), host.size() * sizeof(float));
  };
  table(model.table(), model.params());
  table(model.frozen_table(), model.frozen());
  const ModelConfig& c = model.config();
  for (QuantizedEntry& e : model.quantized_tensors()) {
    const std::vector<float> w =
        random_floats(static_cast<std::size_t>(e.shape[0] * e.shape[1]), derive_seed(seed, e.name), 0.3);
    e.tensor = quantize(c.quant, w.data(), e.shape, true, c.quant_block);
  }
}

std::vector<int32_t> random_tokens(int n, int vocab, uint64_t seed) {
  Rng rng(seed);
  std::vector<int32_t> v(n);
  for (int32_t& t : v) t = static_cast<int32_t>(rng.below(vocab));
  return v;
}

class KvCacheTest : public ::testing::TestWithParam<CacheCase> {};

// Relative to the logits' norm: rounding differs only because the GEMMs have other row counts.
constexpr double kTol = 1e-5;

TEST_P(KvCacheTest, DecodeEqualsLogitsAtEveryPosition) {
  const ModelConfig cfg = case_config(GetParam());
  auto be = make_cpu_backend();
  Model model(cfg, *be, false);
  fill(model, 3);
  const int T = cfg.seq_len, V = cfg.vocab_size;
  const std::vector<int32_t> tokens = random_tokens(T, V, 5);
  std::vector<float> full(V), cached(V);
  // Twice: the second sequence, after reset_cache, overwrites the first one's cache rows.
  for (int pass = 0; pass < 2; ++pass) {
    SCOPED_TRACE(::testing::Message() << "pass " << pass);
    model.reset_cache();
    // A prompt of three tokens, then one at a time.
    model.decode(tokens.data(), 3, cached.data());
    model.logits_at(tokens.data(), 2, full.data());
    EXPECT_LT(rel_error(cached, to_double(full)), kTol) << "position 2";
    for (int p = 3; p < T; ++p) {
      ASSERT_EQ(model.cached(), p);
      model.decode(tokens.data() + p, 1, cached.data());
      model.logits_at(tokens.data(), p, full.data());
      EXPECT_LT(rel_error(cached, to_double(full)), kTol) << "position " << p;
    }
  }
  // The whole window at once.
  model.reset_cache();
  model.decode(tokens.data(), T, cached.data());
  EXPECT_LT(rel_error(cached, to_double(full)), kTol) << "whole window";
  // The cache is full: one more position is outside the model.
  EXPECT_THROW(model.decode(tokens.data(), 1, cached.data()), RuntimeError);
}

// Greedy generation from a 4-token prompt for 30 tokens: the window of 12 fills after 8 and then slides,
// where the cached path reruns it from position 0 as logits_at does.
TEST_P(KvCacheTest, GenerateGivesTheSameTokensWithAndWithoutTheCache) {
  const ModelConfig cfg = case_config(GetParam());
  auto be = make_cpu_backend();
  Model model(cfg, *be, false);
  fill(model, 7);
  const std::vector<int32_t> prompt = random_tokens(4, cfg.vocab_size, 9);
  Rng unused(0);
  const std::vector<int32_t> without = continue_tokens(model, prompt, 30, -1, Sampling{}, unused, false);
  const std::vector<int32_t> with = continue_tokens(model, prompt, 30, -1, Sampling{}, unused, true);
  ASSERT_EQ(without.size(), 30u);
  EXPECT_EQ(with, without);
}

INSTANTIATE_TEST_SUITE_P(
    Sites, KvCacheTest,
    ::testing::Values(CacheCase{"gpt2_dense", false, {0, 0, 0, 0}, {0, 0, 0, 0}, "none"},
                      CacheCase{"gpt2_lowrank", false, {3, 3, 3, 3}, {0, 0, 0, 0}, "none"},
                      CacheCase{"gpt2_lora_nf4", false, {0, 0, 0, 0}, {2, 2, 2, 2}, "nf4"},
                      CacheCase{"gpt2_lowrank_lora_nf4", false, {3, 0, 3, 0}, {2, 2, 2, 2}, "nf4"},
                      CacheCase{"llama_dense", true, {0, 0, 0, 0}, {0, 0, 0, 0}, "none"},
                      CacheCase{"llama_lowrank", true, {3, 3, 3, 3}, {0, 0, 0, 0}, "none"},
                      CacheCase{"llama_lora_nf4", true, {0, 0, 0, 0}, {2, 2, 2, 2}, "nf4"}),
    [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace lrllm

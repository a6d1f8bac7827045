// Token choice for generation: greedy, temperature and top-k sampling against the softmax they define.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "lrllm/core/rng.h"
#include "lrllm/modes/generate.h"

namespace lrllm {
namespace {

const std::vector<float> kLogits = {0.5f, 2.0f, -1.0f, 2.0f, 1.0f, 0.0f};

TEST(Sampling, GreedyTakesTheLowestIdAmongTheMostLikely) {
  Rng rng(1);
  EXPECT_EQ(sample_token(kLogits.data(), 6, Sampling{}, rng), 1);
  // top_k 1 leaves one candidate whatever the temperature.
  for (int i = 0; i < 50; ++i) EXPECT_EQ(sample_token(kLogits.data(), 6, Sampling{5.0, 1}, rng), 1);
}

// Draw frequencies against softmax(logits / temperature) over the top k, within 5 standard errors.
void expect_frequencies(const Sampling& sampling, const std::vector<int>& allowed) {
  const int draws = 40000;
  std::vector<double> p(kLogits.size(), 0.0);
  double total = 0;
  for (int id : allowed) total += p[id] = std::exp(kLogits[id] / sampling.temperature);
  for (double& x : p) x /= total;
  std::vector<int> count(kLogits.size(), 0);
  Rng rng(42);
  for (int i = 0; i < draws; ++i) ++count[sample_token(kLogits.data(), 6, sampling, rng)];
  for (std::size_t id = 0; id < p.size(); ++id) {
    const double freq = static_cast<double>(count[id]) / draws;
    const double sigma = std::sqrt(p[id] * (1 - p[id]) / draws);
    if (p[id] == 0.0)
      EXPECT_EQ(count[id], 0) << "token " << id << " is outside the top k";
    else
      EXPECT_NEAR(freq, p[id], 5 * sigma + 1e-12) << "token " << id;
  }
}

TEST(Sampling, FollowsTheTemperedSoftmax) {
  expect_frequencies(Sampling{1.0, 0}, {0, 1, 2, 3, 4, 5});
  expect_frequencies(Sampling{0.5, 0}, {0, 1, 2, 3, 4, 5});
  expect_frequencies(Sampling{3.0, 0}, {0, 1, 2, 3, 4, 5});
}

TEST(Sampling, TopKKeepsTheKMostLikely) {
  // Ranks: ids 1 and 3 (2.0, tie kept in id order), 4 (1.0), 0 (0.5).
  expect_frequencies(Sampling{1.0, 2}, {1, 3});
  expect_frequencies(Sampling{1.0, 3}, {1, 3, 4});
  expect_frequencies(Sampling{2.0, 4}, {0, 1, 3, 4});
  expect_frequencies(Sampling{1.0, 100}, {0, 1, 2, 3, 4, 5});
}

TEST(Sampling, SameSeedSameDraws) {
  Rng a(9), b(9);
  for (int i = 0; i < 100; ++i)
    ASSERT_EQ(sample_token(kLogits.data(), 6, Sampling{1.0, 0}, a),
              sample_token(kLogits.data(), 6, Sampling{1.0, 0}, b));
}

}  // namespace
}  // namespace lrllm

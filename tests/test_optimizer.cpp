// The learning-rate schedule, global-norm clipping and AdamW over a parameter table.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <vector>

#include "lrllm/backend/backend.h"
#include "lrllm/model/optimizer.h"
#include "lrllm/model/params.h"
#include "test_util.h"

namespace lrllm {
namespace {

using test::random_floats;

TEST(LrSchedule, WarmupThenCosineToMinLr) {
  TrainConfig cfg;
  cfg.lr = 1.0;
  cfg.min_lr = 0.1;
  cfg.warmup = 4;
  cfg.steps = 12;
  // Warmup: step s (0-based) gets lr * (s + 1) / warmup, reaching lr at the last warmup step.
  EXPECT_DOUBLE_EQ(lr_at(cfg, 0), 0.25);
  EXPECT_DOUBLE_EQ(lr_at(cfg, 1), 0.5);
  EXPECT_DOUBLE_EQ(lr_at(cfg, 3), 1.0);
  // The cosine starts at lr, passes (lr + min_lr) / 2 halfway through the 8 decay steps and reaches min_lr.
  EXPECT_DOUBLE_EQ(lr_at(cfg, 4), 1.0);
  EXPECT_DOUBLE_EQ(lr_at(cfg, 8), 0.55);
  EXPECT_DOUBLE_EQ(lr_at(cfg, 6), 0.1 + 0.45 * (1 + std::cos(M_PI / 4)));
  EXPECT_DOUBLE_EQ(lr_at(cfg, 11), 0.1 + 0.45 * (1 + std::cos(7 * M_PI / 8)));
  EXPECT_DOUBLE_EQ(lr_at(cfg, 12), 0.1);
  EXPECT_DOUBLE_EQ(lr_at(cfg, 20), 0.1) << "past the last step the rate stays at min_lr";
  for (int s = 4; s < 12; ++s) EXPECT_GT(lr_at(cfg, s), lr_at(cfg, s + 1)) << "the cosine decreases at " << s;

  cfg.warmup = 0;
  EXPECT_DOUBLE_EQ(lr_at(cfg, 0), 1.0);
  EXPECT_DOUBLE_EQ(lr_at(cfg, 6), 0.55);
}

TEST(ClipGradNorm, ScalesOnlyAboveMaxAndReturnsTheNorm) {
  auto be = make_cpu_backend();
  // 3, 4, 12: norm 13 exactly.
  const std::vector<float> g0 = {3.0f, -4.0f, 12.0f};
  std::vector<float> g = g0;
  EXPECT_DOUBLE_EQ(clip_grad_norm(*be, g.data(), g.size(), 20.0), 13.0);
  EXPECT_EQ(g, g0) << "below max_norm nothing changes";
  EXPECT_DOUBLE_EQ(clip_grad_norm(*be, g.data(), g.size(), 0.0), 13.0);
  EXPECT_EQ(g, g0) << "max_norm 0 turns clipping off";

  EXPECT_DOUBLE_EQ(clip_grad_norm(*be, g.data(), g.size(), 1.0), 13.0) << "the norm before clipping";
  const double coef = 1.0 / (13.0 + 1e-6);  // PyTorch's clip_grad_norm_ coefficient
  for (std::size_t i = 0; i < g.size(); ++i) EXPECT_FLOAT_EQ(g[i], static_cast<float>(g0[i] * coef));
  EXPECT_NEAR(std::sqrt(be->sum_squares(g.data(), g.size())), 1.0, 1e-6);
}

// update() walks the table: decay for 2-D tensors only, PyTorch's AdamW formula, and the step counter.
TEST(AdamW, DecaysOnlyMatricesAndMatchesHandComputedSteps) {
  auto be = make_cpu_backend();
  ParamTable table;
  table.add("w", {3, 4}, TensorRole::weight);
  table.add("b", {5}, TensorRole::bias);
  ASSERT_TRUE(decays(table.at("w").role));
  ASSERT_FALSE(decays(table.at("b").role));
  TrainConfig cfg;
  cfg.weight_decay = 0.5;
  cfg.beta1 = 0.8;
  cfg.beta2 = 0.9;
  cfg.eps = 1e-6;
  AdamW opt(*be, table, cfg);
  EXPECT_EQ(opt.step(), 0);

  float* params = be->alloc(table.total());
  float* grads = be->alloc(table.total());
  const std::vector<float> p0 = random_floats(table.total(), 1);
  be->to_device(params, p0.data(), p0.size() * sizeof(float));
  std::vector<double> ref(p0.begin(), p0.end()), m(table.total(), 0.0), v(table.total(), 0.0);
  const float lrs[2] = {0.1f, 0.05f};
  for (int step = 1; step <= 2; ++step) {
    const std::vector<float> g = random_floats(table.total(), 10 + step);
    be->to_device(grads, g.data(), g.size() * sizeof(float));
    opt.update(params, grads, lrs[step - 1]);
    EXPECT_EQ(opt.step(), step);
    const double lr = lrs[step - 1];
    for (const TensorInfo& t : table.tensors()) {
      const double wd = t.name == "w" ? 0.5 : 0.0;
      for (std::size_t i = t.offset; i < t.offset + t.size; ++i) {
        ref[i] *= 1 - lr * wd;
        m[i] = 0.8 * m[i] + 0.2 * g[i];
        v[i] = 0.9 * v[i] + 0.1 * g[i] * g[i];
        const double mhat = m[i] / (1 - std::pow(0.8, step)), vhat = v[i] / (1 - std::pow(0.9, step));
        ref[i] -= lr * mhat / (std::sqrt(vhat) + 1e-6);
      }
    }
  }
  std::vector<float> got(table.total());
  be->to_host(got.data(), params, got.size() * sizeof(float));
  for (const TensorInfo& t : table.tensors()) {
    for (std::size_t i = t.offset; i < t.offset + t.size; ++i) {
      // The update moves each value by ~0.15; 1e-5 resolves the decay term (up to ~0.08 here) and the
      // moments.
      EXPECT_NEAR(got[i], ref[i], 1e-5) << t.name << " element " << i - t.offset;
    }
  }
  be->release(params);
  be->release(grads);
}

// lowrank.lr_mult scales the factors' step only; lowrank.refactor_every restarts their moments (and bias
// correction) after every K-th step, leaving the other tensors' moments alone.
TEST(AdamW, FactorsTakeTheirLrMultAndRestartTheirMomentsAfterARefactorStep) {
  auto be = make_cpu_backend();
  ParamTable table;
  table.add("w", {3, 4}, TensorRole::weight);
  table.add("s/A", {2, 4}, TensorRole::factor);
  table.add("s/B", {3, 2}, TensorRole::residual_factor);
  TrainConfig cfg;
  cfg.weight_decay = 0.0;
  cfg.beta1 = 0.8;
  cfg.beta2 = 0.9;
  cfg.eps = 1e-6;
  cfg.lowrank_lr_mult = 3.0;
  cfg.lowrank_refactor_every = 2;
  AdamW opt(*be, table, cfg);
  float* params = be->alloc(table.total());
  float* grads = be->alloc(table.total());
  const std::vector<float> p0 = random_floats(table.total(), 1);
  be->to_device(params, p0.data(), p0.size() * sizeof(float));
  std::vector<double> ref(p0.begin(), p0.end()), m(table.total(), 0.0), v(table.total(), 0.0);
  constexpr double lr = 0.01;
  for (int step = 1; step <= 3; ++step) {
    const std::vector<float> g = random_floats(table.total(), 20 + step);
    be->to_device(grads, g.data(), g.size() * sizeof(float));
    opt.update(params, grads, static_cast<float>(lr));
    for (const TensorInfo& t : table.tensors()) {
      const bool factor = t.name != "w";
      const int bias_step = factor && step == 3 ? 1 : step;  // restarted after step 2
      for (std::size_t i = t.offset; i < t.offset + t.size; ++i) {
        m[i] = 0.8 * m[i] + 0.2 * g[i];
        v[i] = 0.9 * v[i] + 0.1 * g[i] * g[i];
        const double mhat = m[i] / (1 - std::pow(0.8, bias_step)),
                     vhat = v[i] / (1 - std::pow(0.9, bias_step));
        ref[i] -= (factor ? 3 * lr : lr) * mhat / (std::sqrt(vhat) + 1e-6);
      }
    }
    EXPECT_EQ(opt.refactor_due(), step == 2) << "step " << step;
    if (opt.refactor_due()) {
      opt.reset_factor_moments();
      for (const TensorInfo& t : table.tensors())
        if (t.name != "w")
          std::fill(m.begin() + t.offset, m.begin() + t.offset + t.size, 0.0),
              std::fill(v.begin() + t.offset, v.begin() + t.offset + t.size, 0.0);
    }
  }
  EXPECT_EQ(opt.factor_step(), 1);
  std::vector<float> got(table.total());
  be->to_host(got.data(), params, got.size() * sizeof(float));
  for (const TensorInfo& t : table.tensors())
    for (std::size_t i = t.offset; i < t.offset + t.size; ++i)
      EXPECT_NEAR(got[i], ref[i], 1e-6) << t.name << " element " << i - t.offset;
  be->release(params);
  be->release(grads);
}

}  // namespace
}  // namespace lrllm

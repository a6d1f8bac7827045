// Helpers shared by the unit tests: seeded random data, error norms, scratch directories, error checks.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <unistd.h>

#include "lrllm/core/common.h"
#include "lrllm/core/config.h"
#include "lrllm/core/rng.h"

namespace lrllm::test {

// Normal values scaled by scale plus shift, from a fixed seed: tests never run on zeros.
inline std::vector<float> random_floats(std::size_t n, uint64_t seed, double scale = 1.0,
                                        double shift = 0.0) {
  Rng rng(seed);
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(shift + scale * rng.normal());
  return v;
}

inline std::vector<double> to_double(const std::vector<float>& v) {
  return {v.begin(), v.end()};
}

// ||got - ref|| / ||ref||.
template <typename T>
double rel_error(const std::vector<T>& got, const std::vector<double>& ref) {
  EXPECT_EQ(got.size(), ref.size());
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < ref.size() && i < got.size(); ++i) {
    diff += (static_cast<double>(got[i]) - ref[i]) * (static_cast<double>(got[i]) - ref[i]);
    norm += ref[i] * ref[i];
  }
  return std::sqrt(diff) / std::sqrt(norm);
}

// Central differences of a scalar function of x, in double, for every coordinate of x.
template <typename F>
std::vector<double> numeric_grad(std::vector<double> x, F&& loss, double h = 1e-6) {
  std::vector<double> g(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double keep = x[i];
    x[i] = keep + h;
    const double up = loss(x);
    x[i] = keep - h;
    const double down = loss(x);
    x[i] = keep;
    g[i] = (up - down) / (2 * h);
  }
  return g;
}

// sum_i a[i] * b[i]: the scalar L = sum out * R whose gradients the backward passes are checked against.
inline double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// A fresh directory for one test, removed with everything in it when the test ends.
class TempDir {
 public:
  TempDir() {
    const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = std::filesystem::temp_directory_path() /
            ("lrllm_test_" + std::to_string(::getpid()) + "_" + info->test_suite_name() + "_" + info->name());
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// Runs fn and checks that it throws InputError whose message contains `needle` (typically the file's path).
template <typename F>
void expect_input_error(F&& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "expected InputError mentioning '" << needle << "', nothing was thrown";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "InputError '" << e.what() << "' does not mention '" << needle << "'";
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected InputError mentioning '" << needle << "', got another exception: " << e.what();
  }
}

// The small GPT-2 the unit tests share: vocabulary 37, 6 positions, 2 blocks of width 8; ranks per site
// (qkv, proj, fc, mlp_proj), 0 for dense.
inline lrllm::ModelConfig tiny_config(std::array<int, lrllm::kNumSites> ranks = {0, 0, 0, 0}) {
  lrllm::ModelConfig m;
  m.vocab_size = 37;
  m.seq_len = 6;
  m.n_layer = 2;
  m.n_head = 2;
  m.d_model = 8;
  m.d_ff = 16;
  std::copy(ranks.begin(), ranks.end(), m.lowrank_rank);
  return m;
}

// Its Llama sibling: the same sizes, 4 heads of 2 sharing 2 key/value heads (grouped-query attention),
// SwiGLU width 16, no position table, an untied lm_head.
inline lrllm::ModelConfig tiny_llama_config(std::array<int, lrllm::kNumSites> ranks = {0, 0, 0, 0}) {
  lrllm::ModelConfig m = tiny_config(ranks);
  m.arch = "llama";
  m.n_head = 4;
  m.n_kv_head = 2;
  m.rope_theta = 100.0;  // positions 0..5 turn the pairs visibly
  return m;
}

}  // namespace lrllm::test

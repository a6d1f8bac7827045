// Checkpoints (docs/design.md, Checkpoint format): bitwise round trips, the attributes users and tools read,
// atomic writes, resume and pruning, clear errors on bad files; and the truncated SVD behind
// --mode decompose.
#include <gtest/gtest.h>
#include <lapacke.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "lrllm/backend/backend.h"
#include "lrllm/core/version.h"
#include "lrllm/io/checkpoint.h"
#include "lrllm/io/hdf5.h"
#include "lrllm/model/model.h"
#include "lrllm/model/optimizer.h"
#include "lrllm/modes/decompose.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace lrllm {
namespace {

using test::expect_input_error;
using test::random_floats;
using test::TempDir;

using test::tiny_config;

std::vector<float> host(Backend& be, const float* dev, std::size_t n) {
  std::vector<float> h(n);
  be.to_host(h.data(), dev, n * sizeof(float));
  return h;
}

// A model after two optimizer steps, so that weights, m and v all hold distinct non-zero values.
struct Trained {
  std::unique_ptr<Backend> be = make_cpu_backend();
  Model model;
  AdamW opt;
  TrainState state;
  Trained(const ModelConfig& cfg, uint64_t seed)
      : model(cfg, *be, false), opt(*be, model.table(), TrainConfig{}) {
    model.init_random(seed);
    const std::size_t n = model.table().total();
    for (int s = 0; s < 2; ++s) {
      const std::vector<float> g = random_floats(n, seed + 100 + s);
      be->to_device(model.grads(), g.data(), n * sizeof(float));
      opt.update(model.params(), model.grads(), 1e-3f);
    }
    state.step = 2;
    state.tokens_seen = 123456789012;
    state.seed = 0xFEDCBA9876543210ULL;  // above 2^63: must survive the int64 attribute
    state.data_cursor = (1ULL << 40) + 3;
  }
};

class CheckpointRoundTrip : public ::testing::TestWithParam<std::array<int, kNumSites>> {};

TEST_P(CheckpointRoundTrip, RestoresEverythingBitwise) {
  TempDir dir;
  const ModelConfig cfg = tiny_config(GetParam());
  Trained a(cfg, 3);
  const std::string path = dir.file("ckpt.h5");
  save_checkpoint(path, "pretrain", a.model, &a.opt, &a.state);
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  EXPECT_EQ(std::distance(fs::directory_iterator(dir.path()), fs::directory_iterator()), 1)
      << "the atomic write leaves only the checkpoint behind";

  const ModelConfig read = read_model_config(path);
  EXPECT_EQ(read.vocab_size, cfg.vocab_size);
  EXPECT_EQ(read.seq_len, cfg.seq_len);
  EXPECT_EQ(read.n_layer, cfg.n_layer);
  EXPECT_EQ(read.n_head, cfg.n_head);
  EXPECT_EQ(read.d_model, cfg.d_model);
  EXPECT_EQ(read.ff(), cfg.ff());
  for (int s = 0; s < kNumSites; ++s) EXPECT_EQ(read.lowrank_rank[s], cfg.lowrank_rank[s]) << "site " << s;

  auto be = make_cpu_backend();
  Model model(read, *be, false);
  load_weights(path, model);
  AdamW opt(*be, model.table(), TrainConfig{});
  TrainState state;
  load_training_state(path, opt, state);
  const std::size_t n = model.table().total();
  ASSERT_EQ(n, a.model.table().total());
  const auto same = [&](const float* x, const float* y) {
    return std::memcmp(host(*be, x, n).data(), host(*a.be, y, n).data(), n * sizeof(float)) == 0;
  };
  EXPECT_TRUE(same(model.params(), a.model.params()));
  EXPECT_TRUE(same(opt.m(), a.opt.m()));
  EXPECT_TRUE(same(opt.v(), a.opt.v()));
  EXPECT_EQ(opt.step(), 2);
  EXPECT_EQ(state.step, a.state.step);
  EXPECT_EQ(state.tokens_seen, a.state.tokens_seen);
  EXPECT_EQ(state.seed, a.state.seed);
  EXPECT_EQ(state.data_cursor, a.state.data_cursor);
}

INSTANTIATE_TEST_SUITE_P(Kinds, CheckpointRoundTrip,
                         ::testing::Values(std::array<int, kNumSites>{0, 0, 0, 0},
                                           std::array<int, kNumSites>{3, 3, 3, 3},
                                           std::array<int, kNumSites>{3, 0, 4, 0}));

TEST(Checkpoint, FormatAttributesOfDesignSection4) {
  TempDir dir;
  Trained a(tiny_config({3, 0, 4, 0}), 5);
  const std::string path = dir.file("ckpt.h5");
  save_checkpoint(path, "pretrain", a.model, &a.opt, &a.state);
  const H5File f = H5File::open_read(path);
  EXPECT_EQ(f.attr_string("/", "format"), "lrllm");
  EXPECT_EQ(f.attr_int("/", "format_version"), 1);
  EXPECT_EQ(f.attr_string("/", "lrllm_version"), kVersion);
  EXPECT_EQ(f.attr_string("/", "mode"), "pretrain");
  // ISO 8601 in UTC, YYYY-MM-DDTHH:MM:SSZ: digits everywhere but the separators. (Not std::regex: GCC 12
  // warns inside <regex> under the sanitizer build's -Werror.)
  const std::string created = f.attr_string("/", "created");
  const std::string layout = "dddd-dd-ddTdd:dd:ddZ";
  ASSERT_EQ(created.size(), layout.size()) << created;
  for (std::size_t i = 0; i < layout.size(); ++i) {
    const bool ok = layout[i] == 'd' ? std::isdigit(static_cast<unsigned char>(created[i])) != 0
                                     : created[i] == layout[i];
    EXPECT_TRUE(ok) << created;
  }

  EXPECT_EQ(f.attr_string("/config", "arch"), "gpt2");
  EXPECT_EQ(f.attr_int("/config", "vocab_size"), 37);
  EXPECT_EQ(f.attr_int("/config", "seq_len"), 6);
  EXPECT_EQ(f.attr_int("/config", "n_layer"), 2);
  EXPECT_EQ(f.attr_int("/config", "n_head"), 2);
  EXPECT_EQ(f.attr_int("/config", "d_model"), 8);
  EXPECT_EQ(f.attr_int("/config", "d_ff"), 16);
  EXPECT_EQ(f.attr_int("/config", "tied_embeddings"), 1);
  EXPECT_EQ(f.attr_int("/config", "lowrank_rank"), 4) << "sites differ: the largest rank";
  EXPECT_EQ(f.attr_string("/config", "lowrank_targets"), "qkv,fc");
  EXPECT_EQ(f.attr_int("/config", "lora_rank"), 0);
  EXPECT_EQ(f.attr_double("/config", "lora_alpha"), 0.0);
  EXPECT_EQ(f.attr_string("/config", "lora_targets"), "");
  EXPECT_EQ(f.attr_string("/config", "quant"), "none");
  EXPECT_TRUE(f.has_attr("/config", "quant_block"));

  EXPECT_EQ(f.attr_int("/optimizer", "step"), 2);
  EXPECT_EQ(f.attr_string("/optimizer", "name"), "adamw");
  EXPECT_EQ(f.attr_double("/optimizer", "beta1"), TrainConfig{}.beta1);
  EXPECT_EQ(f.attr_double("/optimizer", "beta2"), TrainConfig{}.beta2);
  EXPECT_EQ(f.attr_double("/optimizer", "eps"), TrainConfig{}.eps);
  EXPECT_EQ(f.attr_double("/optimizer", "weight_decay"), TrainConfig{}.weight_decay);
  EXPECT_EQ(f.attr_int("/state", "step"), 2);

  // The tensors of §4 with their shapes, in float32, and the same paths under /optimizer/m and v.
  const std::pair<const char*, std::vector<int64_t>> expected[] = {{"/model/wte", {37, 8}},
                                                                   {"/model/wpe", {6, 8}},
                                                                   {"/model/ln_f/w", {8}},
                                                                   {"/model/h.1/ln_1/b", {8}},
                                                                   {"/model/h.0/attn/qkv/A", {3, 8}},
                                                                   {"/model/h.0/attn/qkv/B", {24, 3}},
                                                                   {"/model/h.0/attn/qkv/b", {24}},
                                                                   {"/model/h.0/attn/proj/W", {8, 8}},
                                                                   {"/model/h.1/mlp/fc/A", {4, 8}},
                                                                   {"/model/h.1/mlp/fc/B", {16, 4}},
                                                                   {"/model/h.1/mlp/proj/W", {8, 16}}};
  for (const auto& [name, shape] : expected) {
    EXPECT_EQ(f.shape(name), shape) << name;
    EXPECT_EQ(f.dtype_name(name), "float32") << name;
    const std::string rest = std::string(name).substr(std::strlen("/model"));
    EXPECT_EQ(f.shape("/optimizer/m" + rest), shape) << name;
    EXPECT_EQ(f.shape("/optimizer/v" + rest), shape) << name;
  }
  EXPECT_FALSE(f.exists("/model/h.0/attn/qkv/W")) << "a low-rank site has no W";
}

TEST(Checkpoint, ModelFileWithoutTrainingStateCannotBeResumed) {
  TempDir dir;
  Trained a(tiny_config({0, 0, 0, 0}), 7);
  const std::string path = dir.file("model.h5");
  save_checkpoint(path, "decompose", a.model, nullptr, nullptr);
  const H5File f = H5File::open_read(path);
  EXPECT_FALSE(f.exists("/optimizer"));
  EXPECT_FALSE(f.exists("/state"));
  AdamW opt(*a.be, a.model.table(), TrainConfig{});
  TrainState state;
  expect_input_error([&] { load_training_state(path, opt, state); }, path);
}

// Creates an empty file (resolve_resume and prune_checkpoints only look at names).
void touch(const std::string& path) {
  std::ofstream(path) << "x";
}

TEST(Checkpoint, ResolveLatestAndPrune) {
  TempDir dir;
  const std::string run = dir.path().string();
  expect_input_error([&] { resolve_resume("latest", run); }, run);
  EXPECT_EQ(checkpoint_path(run, 42), (dir.path() / "ckpt_000042.h5").string());
  for (int64_t step : {5, 100, 20, 1000000}) touch(checkpoint_path(run, step));
  touch(dir.file("ckpt_9999999.h5.tmp"));  // an interrupted write is not a checkpoint
  touch(dir.file("notes.h5"));
  touch(dir.file("ckpt_.h5"));
  touch(dir.file("ckpt_12a.h5"));
  touch(dir.file("ckpt_123456789012345678901234567890.h5"));  // beyond int64: not ours, and no crash
  EXPECT_EQ(resolve_resume("latest", run), checkpoint_path(run, 1000000));
  EXPECT_EQ(resolve_resume(checkpoint_path(run, 20), run), checkpoint_path(run, 20));
  expect_input_error([&] { resolve_resume(dir.file("nope.h5"), run); }, dir.file("nope.h5"));

  prune_checkpoints(run, 0);
  EXPECT_TRUE(fs::exists(checkpoint_path(run, 5))) << "keep 0 keeps all";
  prune_checkpoints(run, 2);
  EXPECT_FALSE(fs::exists(checkpoint_path(run, 5)));
  EXPECT_FALSE(fs::exists(checkpoint_path(run, 20)));
  EXPECT_TRUE(fs::exists(checkpoint_path(run, 100)));
  EXPECT_TRUE(fs::exists(checkpoint_path(run, 1000000)));
  EXPECT_TRUE(fs::exists(dir.file("notes.h5")));
  EXPECT_TRUE(fs::exists(dir.file("ckpt_9999999.h5.tmp")));
}

class CheckpointErrors : public ::testing::Test {
 protected:
  void SetUp() override { save_checkpoint(good, "pretrain", trained.model, &trained.opt, &trained.state); }
  // read_model_config and load_weights into a fresh model of the right shape, as a resume does.
  void expect_load_fails(const std::string& path) {
    expect_input_error(
        [&] {
          Model model(read_model_config(path), *trained.be, false);
          load_weights(path, model);
        },
        path);
  }
  TempDir dir;
  Trained trained{tiny_config({0, 0, 0, 0}), 9};
  const std::string good = dir.file("good.h5");
};

TEST_F(CheckpointErrors, MissingFile) {
  expect_load_fails(dir.file("missing.h5"));
}

TEST_F(CheckpointErrors, NotHdf5) {
  const std::string path = dir.file("text.h5");
  std::ofstream(path) << "this is not an HDF5 file\n";
  expect_load_fails(path);
}

TEST_F(CheckpointErrors, TruncatedFile) {
  const std::string path = dir.file("half.h5");
  fs::copy_file(good, path);
  fs::resize_file(path, fs::file_size(good) / 2);
  expect_load_fails(path);
}

TEST_F(CheckpointErrors, MissingTensor) {
  const std::string path = dir.file("no_wte.h5");
  fs::copy_file(good, path);
  {
    H5File f = H5File::open_write(path);
    ASSERT_GE(H5Ldelete(f.id(), "/model/wte", H5P_DEFAULT), 0);
  }
  expect_load_fails(path);
}

TEST_F(CheckpointErrors, WrongShape) {
  const std::string path = dir.file("bad_wpe.h5");
  fs::copy_file(good, path);
  {
    H5File f = H5File::open_write(path);
    ASSERT_GE(H5Ldelete(f.id(), "/model/wpe", H5P_DEFAULT), 0);
    const std::vector<float> wpe = random_floats(5 * 8, 1);
    f.write("/model/wpe", wpe.data(), {5, 8});
  }
  expect_load_fails(path);
}

// Values a hand-altered file may hold: each read checks class, shape and range as the option would.
TEST_F(CheckpointErrors, AttributesOfTheWrongKindOrRange) {
  const auto altered = [&](const std::string& name, const std::function<void(H5File&)>& change) {
    const std::string path = dir.file(name + ".h5");
    fs::copy_file(good, path);
    H5File f = H5File::open_write(path);
    change(f);
    return path;
  };
  // An array where a scalar belongs, a float where an integer belongs, a head count that does not divide.
  expect_load_fails(altered("array", [](H5File& f) {
    f.set_attr("/config", "n_layer", std::vector<int64_t>{2, 2, 2});
  }));
  expect_load_fails(altered("version", [](H5File& f) {
    f.set_attr("/", "format_version", std::vector<int64_t>{1, 1});
  }));
  expect_load_fails(altered("float", [](H5File& f) { f.set_attr("/config", "n_layer", 2.7); }));
  expect_load_fails(altered("string", [](H5File& f) { f.set_attr("/config", "n_head", std::string("2")); }));
  expect_load_fails(altered("heads", [](H5File& f) { f.set_attr("/config", "n_head", int64_t{3}); }));
  // A size the file cannot hold the weights of.
  const std::string wide =
      altered("wide", [](H5File& f) { f.set_attr("/config", "d_ff", int64_t{1} << 24); });
  expect_input_error([&] { read_model_config(wide); }, "MB of weights");
  // Training state: negative counters, and an array step.
  for (const auto& [group, name] :
       {std::pair{"/state", "data_cursor"}, std::pair{"/optimizer", "step"}, std::pair{"/state", "step"}}) {
    const std::string path = altered(std::string("neg_") + (group + 1) + name,
                                     [&](H5File& f) { f.set_attr(group, name, int64_t{-3}); });
    expect_input_error([&] { load_training_state(path, trained.opt, trained.state); }, name);
  }
  const std::string step = altered("step", [](H5File& f) {
    f.set_attr("/optimizer", "step", std::vector<int64_t>{1, 2});
  });
  expect_input_error([&] { load_training_state(step, trained.opt, trained.state); }, "a scalar");
}

// New files carry HDF5 1.10's checksummed metadata (superblock version 2 or later).
TEST_F(CheckpointErrors, NewFilesHaveChecksummedMetadata) {
  const H5File f = H5File::open_read(good);
  H5F_info2_t info;
  ASSERT_GE(H5Fget_info2(f.id(), &info), 0);
  EXPECT_GE(info.super.version, 2u);
}

// ||W - B A||_F / ||W||_F in double.
double reconstruction_error(const std::vector<float>& W, const Factorization& f, int out, int in, int r) {
  double diff = 0, norm = 0;
  for (int o = 0; o < out; ++o) {
    for (int i = 0; i < in; ++i) {
      double ba = 0;
      for (int k = 0; k < r; ++k) ba += static_cast<double>(f.B[o * r + k]) * f.A[k * in + i];
      diff += (W[o * in + i] - ba) * (W[o * in + i] - ba);
      norm += static_cast<double>(W[o * in + i]) * W[o * in + i];
    }
  }
  return std::sqrt(diff / norm);
}

// Singular values of W [out, in], descending, by LAPACK directly.
std::vector<double> singular_values(const std::vector<float>& W, int out, int in) {
  std::vector<double> a(W.begin(), W.end()), s(std::min(out, in)), superb(std::min(out, in));
  EXPECT_EQ(LAPACKE_dgesvd(LAPACK_ROW_MAJOR, 'N', 'N', out, in, a.data(), in, s.data(), nullptr, 1, nullptr,
                           1, superb.data()),
            0);
  return s;
}

TEST(Factorize, FullRankReconstructsExactly) {
  constexpr int out = 12, in = 20;
  const std::vector<float> W = random_floats(out * in, 31);
  const Factorization f = factorize(W.data(), out, in, 12);
  ASSERT_EQ(f.A.size(), 12u * in);
  ASSERT_EQ(f.B.size(), out * 12u);
  EXPECT_LT(reconstruction_error(W, f, out, in, 12), 1e-5);
  EXPECT_LT(f.relative_error, 1e-12);
}

// At rank 4 the error equals sqrt(sum of dropped s^2) / ||W||, the Eckart-Young minimum: B A is the best
// rank-4 approximation. The factors split the singular values evenly: A A^T = B^T B = diag(s_1..s_r).
TEST(Factorize, TruncatedIsBestRankRApproximation) {
  for (const auto& [out, in] : {std::pair{12, 20}, std::pair{20, 12}}) {
    SCOPED_TRACE(::testing::Message() << out << " x " << in);
    constexpr int r = 4;
    const std::vector<float> W = random_floats(out * in, 32);
    const Factorization f = factorize(W.data(), out, in, r);
    const std::vector<double> s = singular_values(W, out, in);
    double total = 0, dropped = 0;
    for (std::size_t i = 0; i < s.size(); ++i) {
      total += s[i] * s[i];
      if (i >= r) dropped += s[i] * s[i];
    }
    const double best = std::sqrt(dropped / total);
    EXPECT_NEAR(f.relative_error, best, 1e-10);
    EXPECT_NEAR(reconstruction_error(W, f, out, in, r), best, 1e-5 * best);
    for (int i = 0; i < r; ++i) {
      for (int j = 0; j < r; ++j) {
        double aat = 0, btb = 0;
        for (int k = 0; k < in; ++k) aat += static_cast<double>(f.A[i * in + k]) * f.A[j * in + k];
        for (int k = 0; k < out; ++k) btb += static_cast<double>(f.B[k * r + i]) * f.B[k * r + j];
        const double expect = i == j ? s[i] : 0.0;
        EXPECT_NEAR(aat, expect, 1e-5 * s[0]) << i << "," << j;
        EXPECT_NEAR(btb, expect, 1e-5 * s[0]) << i << "," << j;
      }
    }
  }
}

}  // namespace
}  // namespace lrllm

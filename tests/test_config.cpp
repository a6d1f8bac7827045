// Option parsing (docs/design.md, CLI): defaults, the config file against the command line, clear errors,
// and the low-rank site selection.
#include <gtest/gtest.h>

#include <array>
#include <climits>
#include <cmath>
#include <fstream>
#include <string>
#include <vector>

#include "lrllm/config.h"
#include "lrllm/topology.h"
#include "test_util.h"

namespace lrllm {
namespace {

using test::expect_input_error;
using test::TempDir;

// parse_config over {"lrllm", args...}.
Config parse(std::vector<std::string> args) {
  args.insert(args.begin(), "lrllm");
  std::vector<const char*> argv;
  for (const std::string& a : args) argv.push_back(a.c_str());
  Config cfg;
  EXPECT_TRUE(parse_config(static_cast<int>(argv.size()), argv.data(), cfg, false));
  return cfg;
}

TEST(Config, Defaults) {
  const Config c = parse({"--mode", "pretrain"});
  EXPECT_EQ(c.mode, "pretrain");
  EXPECT_EQ(c.device, "auto");
  EXPECT_EQ(c.seed, 1337u);
  EXPECT_EQ(c.model.arch, "gpt2");
  EXPECT_EQ(c.model.n_layer, 4);
  EXPECT_EQ(c.model.d_model, 128);
  EXPECT_EQ(c.model.ff(), 512) << "d_ff 0 means 4 * d_model";
  EXPECT_EQ(c.model.vocab_size, 50257);
  EXPECT_EQ(c.lowrank_rank, 0);
  EXPECT_EQ(c.lowrank_targets, "all");
  EXPECT_DOUBLE_EQ(c.train.lr, 6e-4);
  EXPECT_DOUBLE_EQ(c.train.min_lr, 6e-5);
  EXPECT_EQ(c.train.warmup, 10);
  EXPECT_DOUBLE_EQ(c.train.weight_decay, 0.1);
  EXPECT_DOUBLE_EQ(c.train.grad_clip, 1.0);
  EXPECT_EQ(c.train.batch_size, 4);
  EXPECT_EQ(c.train.grad_accum, 1);
  EXPECT_EQ(c.train.recompute, "none");
  EXPECT_EQ(c.checkpoint.keep, 3);
  EXPECT_TRUE(c.was_given("mode"));
  EXPECT_FALSE(c.was_given("train.lr")) << "a default is not an option the user gave";
}

TEST(Config, HelpAndVersionAskToExit) {
  for (const char* flag : {"--help", "--version"}) {
    const char* argv[] = {"lrllm", flag};
    Config cfg;
    EXPECT_FALSE(parse_config(2, argv, cfg, false)) << flag;
  }
}

TEST(Config, CommandLineWinsOverConfigFile) {
  TempDir dir;
  const std::string ini = dir.file("run.cfg");
  std::ofstream(ini) << "[train]\nlr = 0.1\nsteps = 7\n\n[model]\nn_layer = 3\nd_model = 96\n";
  const Config c =
      parse({"--mode", "pretrain", "--config", ini, "--train.lr", "0.2", "--model.d_model", "64"});
  EXPECT_DOUBLE_EQ(c.train.lr, 0.2);
  EXPECT_EQ(c.model.d_model, 64);
  EXPECT_EQ(c.train.steps, 7) << "from the file";
  EXPECT_EQ(c.model.n_layer, 3) << "from the file";
  EXPECT_EQ(c.config_file, ini);
  EXPECT_TRUE(c.was_given("train.steps"));
  EXPECT_TRUE(c.was_given("train.lr"));

  const Config file_only = parse({"--mode", "pretrain", "--config", ini});
  EXPECT_DOUBLE_EQ(file_only.train.lr, 0.1);
}

void expect_parse_error(std::vector<std::string> args, const std::string& needle) {
  args.insert(args.begin(), "lrllm");
  std::vector<const char*> argv;
  for (const std::string& a : args) argv.push_back(a.c_str());
  Config cfg;
  expect_input_error([&] { parse_config(static_cast<int>(argv.size()), argv.data(), cfg, false); }, needle);
}

TEST(Config, BadOptionsAreInputErrors) {
  TempDir dir;
  expect_parse_error({"--mode", "pretrain", "--train.bogus", "1"}, "bogus");
  expect_parse_error({"--mode", "pretrain", "--train.steps", "abc"}, "train.steps");
  expect_parse_error({"--mode", "pretrain", "--train.lr=-0.1"}, "train.lr");
  expect_parse_error({"--mode", "sing"}, "sing");
  expect_parse_error({"--train.steps", "3"}, "--mode");
  expect_parse_error({"--mode", "pretrain", "--config", dir.file("missing.cfg")}, dir.file("missing.cfg"));
  const std::string ini = dir.file("unknown.cfg");
  std::ofstream(ini) << "[train]\nbogus = 1\n";
  expect_parse_error({"--mode", "pretrain", "--config", ini}, "bogus");
}

std::array<int, kNumSites> ranks_for(const std::vector<std::string>& args) {
  std::vector<std::string> all = {"--mode", "pretrain"};
  all.insert(all.end(), args.begin(), args.end());
  const Config c = parse(all);
  ModelConfig m = c.model;
  apply_lowrank(c, m);
  return {m.lowrank_rank[0], m.lowrank_rank[1], m.lowrank_rank[2], m.lowrank_rank[3]};
}

TEST(Config, ApplyLowrankSelectsSites) {
  using R = std::array<int, kNumSites>;
  EXPECT_EQ(ranks_for({}), (R{0, 0, 0, 0})) << "dense by default";
  EXPECT_EQ(ranks_for({"--lowrank.rank", "4"}), (R{4, 4, 4, 4}));
  EXPECT_EQ(ranks_for({"--lowrank.rank", "4", "--lowrank.targets", "all"}), (R{4, 4, 4, 4}));
  EXPECT_EQ(ranks_for({"--lowrank.rank", "4", "--lowrank.targets", "qkv,mlp_proj"}), (R{4, 0, 0, 4}));
  EXPECT_EQ(ranks_for({"--lowrank.rank", "4", "--lowrank.targets", "fc", "--lowrank.rank_qkv", "2"}),
            (R{2, 0, 4, 0}));
  EXPECT_EQ(ranks_for({"--lowrank.rank", "4", "--lowrank.rank_proj", "6"}), (R{4, 6, 4, 4}));
}

TEST(Config, ApplyLowrankErrors) {
  const auto apply = [](std::vector<std::string> args) { return [args] { ranks_for(args); }; };
  expect_input_error(apply({"--lowrank.rank", "4", "--lowrank.targets", "qkv,attn"}), "attn");
  expect_input_error(apply({"--lowrank.targets", "qkv"}), "lowrank.rank");
  expect_input_error(apply({"--lowrank.rank", "4", "--lowrank.rank_fc", "0"}), "rank_fc");
  expect_input_error(apply({"--lowrank.rank=-1"}), "lowrank.rank");
}

ModelConfig tiny_model() {
  return test::tiny_config();
}

TEST(Config, ValidateModelConfig) {
  ModelConfig m = tiny_model();
  EXPECT_NO_THROW(validate_model_config(m));
  // proj is 8 x 8: rank 7 still compresses, 8 does not.
  m.lowrank_rank[1] = 7;
  EXPECT_NO_THROW(validate_model_config(m));
  m.lowrank_rank[1] = 8;
  expect_input_error([&] { validate_model_config(m); }, "proj");
  // qkv is 8 -> 24: the limit is min(in, out) = 8.
  m = tiny_model();
  m.lowrank_rank[0] = 8;
  expect_input_error([&] { validate_model_config(m); }, "qkv");
  m = tiny_model();
  m.d_model = 10;
  m.n_head = 4;
  expect_input_error([&] { validate_model_config(m); }, "n_head");
  m = tiny_model();
  m.vocab_size = 70000;  // token files hold uint16 ids
  expect_input_error([&] { validate_model_config(m); }, "vocab_size");
}

// Shapes no machine holds are refused with the estimate, before the model's int arithmetic sees them.
TEST(Config, ValidateModelConfigRefusesShapesThatCannotFit) {
  for (auto set : {+[](ModelConfig& m) { m.n_layer = INT_MAX; }, +[](ModelConfig& m) { m.d_ff = INT_MAX; },
                   +[](ModelConfig& m) { m.n_layer = 1000000000; },
                   +[](ModelConfig& m) { m.d_model = INT_MAX - 1, m.n_head = 1; }}) {
    ModelConfig m = tiny_model();
    set(m);
    expect_input_error([&] { validate_model_config(m); }, "GB");
  }
  EXPECT_LT(model_memory_estimate(tiny_model()), 1e6);
}

TEST(Config, LayoutProductsDoNotOverflow) {
  ParallelConfig p;
  p.tp = p.pp = 65536;
  expect_input_error([&] { validate_layout(p, 1, tiny_model(), 4); }, "4294967296");
  p.tp = p.pp = 1;
  p.bucket_mb = INFINITY;
  expect_input_error([&] { validate_layout(p, 1, tiny_model(), 4); }, "bucket_mb");
}

TEST(Config, ConfigFileMustBeAFile) {
  TempDir dir;
  Config cfg;
  const std::string folder = dir.path().string();
  const char* argv[] = {"lrllm", "--mode", "info", "--config", folder.c_str()};
  expect_input_error([&] { parse_config(5, argv, cfg, false); }, "is a folder");
}

}  // namespace
}  // namespace lrllm

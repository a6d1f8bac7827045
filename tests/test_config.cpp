// Option parsing (docs/design.md, CLI): defaults, the config file against the command line, clear errors,
// and the low-rank site selection.
#include <gtest/gtest.h>

#include <array>
#include <climits>
#include <cmath>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "lrllm/core/config.h"
#include "lrllm/parallel/layout.h"
#include "lrllm/parallel/topology.h"
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

// The resolved configuration read back with --config gives the same values and the same given options, a
// config file's options included; defaults stay defaults (commented), so checks against a model file agree.
TEST(Config, ResolvedConfigReadsBackToTheSameConfig) {
  TempDir dir;
  const std::string ini = dir.file("part.cfg");
  std::ofstream(ini) << "[train]\nsteps = 7\n";
  const Config a = parse({"--mode", "finetune", "--config", ini, "--train.lr", "3e-3", "--lora.rank", "8",
                          "--lora.modules_to_save", "ln_f,h.*/ln_2", "--seed", "18446744073709551615",
                          "--lora.merge", "true"});
  EXPECT_NE(a.resolved.find("lr = 0.003\n"), std::string::npos) << a.resolved;
  EXPECT_NE(a.resolved.find("# n_layer = 4\n"), std::string::npos) << "a default is a comment";
  const std::string stored = dir.file("stored.cfg");
  std::ofstream(stored) << a.resolved;
  const Config b = parse({"--config", stored});
  EXPECT_EQ(b.resolved, a.resolved);
  std::set<std::string> given = a.given, again = b.given;
  given.erase("config");
  again.erase("config");
  EXPECT_EQ(again, given);
  EXPECT_EQ(b.mode, "finetune");
  EXPECT_EQ(b.train.steps, 7);
  EXPECT_EQ(b.train.lr, a.train.lr);
  EXPECT_EQ(b.seed, a.seed);
  EXPECT_EQ(b.finetune.lora_rank, 8);
  EXPECT_EQ(b.finetune.lora_modules, "ln_f,h.*/ln_2");
  EXPECT_TRUE(b.finetune.lora_merge);
  EXPECT_FALSE(b.was_given("model.n_layer"));
  // A value that INI cannot hold ('#' starts a comment there) is kept in the command line, quoted for a
  // shell.
  const Config c = parse({"--mode", "generate", "--generate.prompt", "a # b"});
  EXPECT_NE(c.resolved.find("# prompt: its value cannot be written in INI"), std::string::npos);
  EXPECT_NE(c.command_line.find("--generate.prompt 'a # b'"), std::string::npos) << c.command_line;
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

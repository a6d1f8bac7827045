#include "lrllm/core/config.h"

#include <unistd.h>

#include <boost/program_options.hpp>
#include <charconv>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include "lrllm/core/common.h"
#include "lrllm/core/version.h"

namespace po = boost::program_options;

namespace lrllm {

bool is_arch(const std::string& name) {
  return name == "gpt2" || name == "llama";
}

const char* site_name(LinearSite site) {
  static const char* const names[kNumSites] = {"qkv", "proj", "fc", "mlp_proj"};
  return names[static_cast<int>(site)];
}

namespace {
// Indexed by QuantKind and PromptTemplate.
constexpr const char* kQuantNames[] = {"none", "int8", "nf4"};
constexpr int kQuantBits[] = {0, 8, 4};
constexpr const char* kTemplateNames[] = {"fingpt", "alpaca"};
}  // namespace

bool is_prompt_template(const std::string& name) {
  return std::find(std::begin(kTemplateNames), std::end(kTemplateNames), name) != std::end(kTemplateNames);
}

PromptTemplate parse_prompt_template(const std::string& name) {
  for (std::size_t i = 0; i < std::size(kTemplateNames); ++i)
    if (name == kTemplateNames[i]) return static_cast<PromptTemplate>(i);
  throw InputError("prompt template '" + name + "' is not fingpt or alpaca");
}

const char* template_name(PromptTemplate t) {
  return kTemplateNames[static_cast<int>(t)];
}

PromptTemplate choose_template(const std::string& given, const std::string& recorded) {
  if (!given.empty()) return parse_prompt_template(given);
  return recorded.empty() ? PromptTemplate::fingpt : parse_prompt_template(recorded);
}

const char* quant_name(QuantKind q) {
  return kQuantNames[static_cast<int>(q)];
}

const char* storage_name(QuantKind q) {
  return q == QuantKind::none ? "float32" : quant_name(q);
}

QuantKind quant_from_name(const std::string& name) {
  for (int k = 0; k < 3; ++k)
    if (name == kQuantNames[k]) return static_cast<QuantKind>(k);
  throw InputError("quant '" + name + "' is not none, int8 or nf4");
}

QuantKind quant_from_bits(int bits) {
  for (int k = 0; k < 3; ++k)
    if (bits == kQuantBits[k]) return static_cast<QuantKind>(k);
  throw InputError("--quant.bits must be 0, 8 or 4, not " + std::to_string(bits));
}

int quant_bits(QuantKind q) {
  return kQuantBits[static_cast<int>(q)];
}

bool ModelConfig::any_lowrank() const {
  for (int r : lowrank_rank)
    if (r > 0) return true;
  return false;
}

namespace {

std::string sites_with(const int (&ranks)[kNumSites]) {
  std::string out;
  for (int s = 0; s < kNumSites; ++s)
    if (ranks[s] > 0) out += (out.empty() ? "" : ",") + std::string(site_name(static_cast<LinearSite>(s)));
  return out;
}

}  // namespace

std::string ModelConfig::lowrank_targets() const {
  return sites_with(lowrank_rank);
}

std::string ModelConfig::lora_targets() const {
  return sites_with(lora_rank);
}

bool ModelConfig::any_lora() const {
  for (int r : lora_rank)
    if (r > 0) return true;
  return false;
}

int ModelConfig::lowrank_rank_attr() const {
  int r = 0;
  for (int x : lowrank_rank) r = std::max(r, x);
  return r;
}

namespace {

const char* const kModes[] = {"pretrain", "finetune", "eval",     "generate", "decompose",
                              "export",   "import",   "tokenize", "info"};

// A default as the user would write it (6e-04, not 0.00059999999999999995).
std::string text(double value) {
  return strprintf("%g", value);
}

constexpr unsigned kHelpWidth = 110;

po::options_description make_options(Config& c) {
  po::options_description general("General", kHelpWidth);
  general.add_options()("help,h", "print this help and exit")("version",
                                                              "print the version and build and exit")(
      "mode", po::value(&c.mode),
      "pretrain | finetune | eval | generate | decompose | export | import | tokenize | info")(
      "config", po::value(&c.config_file), "INI file with [section] option = value lines")(
      "device", po::value(&c.device)->default_value(c.device), "cpu | cuda | auto")(
      "seed", po::value(&c.seed)->default_value(c.seed), "seed of initialisation, data order and sampling");

  po::options_description model("Model [model]", kHelpWidth);
  ModelConfig& m = c.model;
  model.add_options()("model.arch", po::value(&m.arch)->default_value(m.arch), "architecture: gpt2 | llama")(
      "model.n_layer", po::value(&m.n_layer)->default_value(m.n_layer), "transformer blocks")(
      "model.n_head", po::value(&m.n_head)->default_value(m.n_head), "attention heads")(
      "model.n_kv_head", po::value(&m.n_kv_head)->default_value(m.n_kv_head),
      "llama: key/value heads, dividing n_head (0: n_head)")(
      "model.rope_theta", po::value(&m.rope_theta)->default_value(m.rope_theta), "llama: rotary base")(
      "model.norm_eps", po::value(&m.norm_eps)->default_value(m.norm_eps), "llama: RMSNorm eps")(
      "model.d_model", po::value(&m.d_model)->default_value(m.d_model), "embedding width")(
      "model.d_ff", po::value(&m.d_ff)->default_value(m.d_ff), "MLP width (0: 4 * d_model)")(
      "model.seq_len", po::value(&m.seq_len)->default_value(m.seq_len), "sequence length (position table)")(
      "model.vocab_size", po::value(&m.vocab_size)->default_value(m.vocab_size), "vocabulary size")(
      "model.init", po::value(&m.init), "checkpoint or model file to start from");

  po::options_description lowrank("Low-rank linear layers [lowrank]", kHelpWidth);
  lowrank.add_options()("lowrank.rank", po::value(&c.lowrank_rank)->default_value(c.lowrank_rank),
                        "rank r of W = B A (0: dense)")(
      "lowrank.targets", po::value(&c.lowrank_targets)->default_value(c.lowrank_targets),
      "sites made low-rank: all, or a comma list of qkv, proj, fc, mlp_proj")(
      "lowrank.rank_qkv", po::value(&c.lowrank_site_rank[0]), "rank of qkv, overriding lowrank.rank")(
      "lowrank.rank_proj", po::value(&c.lowrank_site_rank[1]), "rank of attn proj")(
      "lowrank.rank_fc", po::value(&c.lowrank_site_rank[2]), "rank of mlp fc")(
      "lowrank.rank_mlp_proj", po::value(&c.lowrank_site_rank[3]), "rank of mlp proj")(
      "lowrank.activation", po::value(&c.lowrank_activation)->default_value(c.lowrank_activation),
      "none: y = B A x + b; silu: y = B silu(A x) + b (CoLA)")(
      "lowrank.init", po::value(&c.lowrank_init)->default_value(c.lowrank_init),
      "default: B A at the dense std; product_std: CoLA's r^-1/4 (in+out)^-1/4 per factor")(
      "lowrank.lr_mult", po::value(&c.train.lowrank_lr_mult)->default_value(c.train.lowrank_lr_mult),
      "learning-rate multiplier of the factors A and B")(
      "lowrank.refactor_every",
      po::value(&c.train.lowrank_refactor_every)->default_value(c.train.lowrank_refactor_every),
      "every K steps rebalance each B A into factors of equal norms, restarting their moments (0: never)");

  po::options_description finetune("Finetuning [lora], [quant]", kHelpWidth);
  FinetuneConfig& ft = c.finetune;
  finetune.add_options()("lora.rank", po::value(&ft.lora_rank)->default_value(ft.lora_rank),
                         "LoRA adapter rank (finetune: required)")(
      "lora.alpha", po::value(&ft.lora_alpha)->default_value(ft.lora_alpha, text(ft.lora_alpha)),
      "LoRA scale is alpha / rank")(
      "lora.dropout", po::value(&ft.lora_dropout)->default_value(ft.lora_dropout, text(ft.lora_dropout)),
      "dropout probability on the adapters' input while training")(
      "lora.targets", po::value(&ft.lora_targets)->default_value(ft.lora_targets),
      "sites with adapters: all, or a comma list of qkv, proj, fc, mlp_proj")(
      "lora.modules_to_save", po::value(&ft.lora_modules)->default_value(ft.lora_modules),
      "base LayerNorms, biases and embeddings trained in full beside the adapters: comma-separated patterns, "
      "e.g. ln_f,h.*/ln_2,wte ('*' within one name part)")(
      "lora.trainable_tokens", po::value(&ft.trainable_tokens)->default_value(ft.trainable_tokens),
      "tokens whose wte rows (embedding and lm_head) train beside the adapters: comma-separated ids, or "
      "answers (every token of the training answers and the end-of-text)")(
      "lora.merge", po::value(&ft.lora_merge)->default_value(ft.lora_merge),
      "export: fold the adapters into the weights (a low-rank site grows to rank r + lora rank)")(
      "lora.only", po::value(&ft.lora_only)->default_value(ft.lora_only),
      "export: write only the adapters and the tensors trained beside them, with the base's path and "
      "checksum")("lora.init", po::value(&ft.lora_init),
                  "adapter file (export --lora.only) or PEFT adapter folder loaded over the base "
                  "--model.init: eval, generate, export, finetune")(
      "quant.bits", po::value(&ft.quant_bits)->default_value(ft.quant_bits),
      "storage of the frozen base's dense weights: 0 (float32), 8 (int8), 4 (NF4)")(
      "quant.block", po::value(&ft.quant_block)->default_value(ft.quant_block), "values per absmax block")(
      "quant.embedding", po::value(&ft.quant_embedding)->default_value(ft.quant_embedding),
      "store the tied wte (embedding and lm_head) quantized too")(
      "quant.double", po::value(&ft.quant_double)->default_value(ft.quant_double),
      "NF4: quantize the absmax values to 8 bits too");

  po::options_description eval("Evaluation [eval]", kHelpWidth);
  eval.add_options()("eval.tasks", po::value(&c.eval.tasks),
                     "instruction JSONL files (comma-separated) for --mode eval")(
      "eval.method", po::value(&c.eval.method)->default_value(c.eval.method),
      "generate (greedy answer, label by substring) | score (most likely label)")(
      "eval.labels", po::value(&c.eval.labels),
      "the label set, comma-separated (an example outside it is an error); default: each task's outputs")(
      "eval.max_new_tokens", po::value(&c.eval.max_new_tokens)->default_value(c.eval.max_new_tokens),
      "answer length limit for generate");

  po::options_description exporting("Export [export]", kHelpWidth);
  exporting.add_options()(
      "export.format", po::value(&c.exporting.format)->default_value(c.exporting.format),
      "lrllm (a model file) | hf (a Hugging Face GPT2LMHeadModel or LlamaForCausalLM folder) | peft (the "
      "LoRA adapters as a PEFT folder)")("export.dtype",
                                         po::value(&c.exporting.dtype)->default_value(c.exporting.dtype),
                                         "hf, peft: the stored tensors' type, f32 | bf16 | f16");

  po::options_description generate("Generation [generate]", kHelpWidth);
  GenerateConfig& g = c.generate;
  generate.add_options()("generate.prompt", po::value(&g.prompt), "text to continue (empty: <|endoftext|>)")(
      "generate.max_new_tokens", po::value(&g.max_new_tokens)->default_value(g.max_new_tokens),
      "tokens to generate at most (stops early at <|endoftext|>)")(
      "generate.temperature", po::value(&g.temperature)->default_value(g.temperature, text(g.temperature)),
      "sampling temperature; 0: greedy (the most likely token)")(
      "generate.top_k", po::value(&g.top_k)->default_value(g.top_k),
      "sample among the k most likely tokens (0: all); the draws follow --seed")(
      "generate.kv_cache", po::value(&g.kv_cache)->default_value(g.kv_cache),
      "decode with a key/value cache (also eval.method generate); false: rerun the window per token");

  po::options_description train("Training [train]", kHelpWidth);
  TrainConfig& t = c.train;
  train.add_options()("train.steps", po::value(&t.steps)->default_value(t.steps), "optimizer steps")(
      "train.epochs", po::value(&t.epochs)->default_value(t.epochs, text(t.epochs)),
      "passes over the training data, instead of train.steps (0: use train.steps)")(
      "train.batch_size", po::value(&t.batch_size)->default_value(t.batch_size),
      "sequences per rank per micro-step")(
      "train.grad_accum", po::value(&t.grad_accum)->default_value(t.grad_accum), "micro-steps per step")(
      "train.lr", po::value(&t.lr)->default_value(t.lr, text(t.lr)), "peak learning rate")(
      "train.min_lr", po::value(&t.min_lr)->default_value(t.min_lr, text(t.min_lr)),
      "learning rate at the end of the cosine")("train.warmup", po::value(&t.warmup)->default_value(t.warmup),
                                                "linear warmup steps")(
      "train.weight_decay", po::value(&t.weight_decay)->default_value(t.weight_decay, text(t.weight_decay)),
      "AdamW decoupled weight decay (2-D weights only)")(
      "train.beta1", po::value(&t.beta1)->default_value(t.beta1, text(t.beta1)), "AdamW beta1")(
      "train.beta2", po::value(&t.beta2)->default_value(t.beta2, text(t.beta2)), "AdamW beta2")(
      "train.eps", po::value(&t.eps)->default_value(t.eps, text(t.eps)), "AdamW epsilon")(
      "train.grad_clip", po::value(&t.grad_clip)->default_value(t.grad_clip, text(t.grad_clip)),
      "global-norm clip (0: off)")("train.eval_every", po::value(&t.eval_every)->default_value(t.eval_every),
                                   "validation every N steps (0: only at the end)")(
      "train.eval_batches", po::value(&t.eval_batches)->default_value(t.eval_batches),
      "validation batches (of the global batch) per evaluation")(
      "train.recompute", po::value(&t.recompute)->default_value(t.recompute),
      "none | block (keep only block inputs, recompute in backward)");

  po::options_description data("Data [data]", kHelpWidth);
  DataConfig& d = c.data;
  data.add_options()("data.train", po::value(&d.train), "training token files: a file, glob or comma list")(
      "data.val", po::value(&d.val), "validation token files: a file, glob or comma list")(
      "data.input", po::value(&d.input),
      "input of tokenize (a text file or a directory) and import (a Hugging Face folder)")(
      "data.output", po::value(&d.output), "output of tokenize, decompose, export and import")(
      "data.shuffle", po::value(&d.shuffle)->default_value(d.shuffle), "shuffle sequences each epoch")(
      "data.tokenizer_dir", po::value(&d.tokenizer_dir)->default_value(d.tokenizer_dir),
      "folder with encoder.json and vocab.bpe")(
      "data.padding", po::value(&d.padding)->default_value(d.padding),
      "finetuning rows: longest (each batch to its longest) | max_length (to model.seq_len)")(
      "data.packing", po::value(&d.packing)->default_value(d.packing),
      "finetuning: pack several examples in a row, attention kept inside each (CPU)")(
      "data.val_fraction", po::value(&d.val_fraction)->default_value(d.val_fraction, text(d.val_fraction)),
      "finetuning without data.val: the share of data.train held out for validation")(
      "data.template", po::value(&d.prompt_template),
      "prompt template: fingpt | alpaca (default: the model file's, else fingpt)");

  po::options_description run("Run [run], [checkpoint]", kHelpWidth);
  run.add_options()("run.dir", po::value(&c.run.dir)->default_value(c.run.dir),
                    "run directory: checkpoints and metrics.h5")(
      "run.log_every", po::value(&c.run.log_every)->default_value(c.run.log_every),
      "progress line and metrics flush every N steps")(
      "run.overwrite", po::value(&c.run.overwrite)->default_value(c.run.overwrite),
      "a fresh run into a run.dir holding an earlier run moves that run's files aside (never deletes them)")(
      "checkpoint.every", po::value(&c.checkpoint.every)->default_value(c.checkpoint.every),
      "checkpoint every N steps (0: only at the end)")(
      "checkpoint.keep", po::value(&c.checkpoint.keep)->default_value(c.checkpoint.keep),
      "checkpoints kept in run.dir (0: all)")("checkpoint.resume", po::value(&c.checkpoint.resume),
                                              "resume from a checkpoint path, or latest");

  po::options_description parallel("Parallelism [parallel] (data parallel = ranks / (tp * pp))", kHelpWidth);
  ParallelConfig& p = c.parallel;
  parallel.add_options()("parallel.tp", po::value(&p.tp)->default_value(p.tp),
                         "tensor-parallel group size (Megatron: heads and MLP split)")(
      "parallel.pp", po::value(&p.pp)->default_value(p.pp), "pipeline stages (blocks split, 1F1B schedule)")(
      "parallel.zero", po::value(&p.zero)->default_value(p.zero),
      "1: shard the AdamW state over the data-parallel ranks (ZeRO-1)")(
      "parallel.micro_batches", po::value(&p.micro_batches)->default_value(p.micro_batches),
      "pipeline micro-batches per micro-step (must divide train.batch_size)")(
      "parallel.bucket_mb", po::value(&p.bucket_mb)->default_value(p.bucket_mb, text(p.bucket_mb)),
      "gradient averaging bucket size in MB (buckets start while backward runs)");

  po::options_description all(kHelpWidth);
  all.add(general)
      .add(model)
      .add(lowrank)
      .add(finetune)
      .add(eval)
      .add(exporting)
      .add(generate)
      .add(train)
      .add(data)
      .add(run)
      .add(parallel);
  return all;
}

// An option's value as a config file writes it; doubles in the shortest text that reads back exactly.
std::string value_text(const boost::any& v) {
  if (const auto* x = boost::any_cast<std::string>(&v)) return *x;
  if (const auto* x = boost::any_cast<bool>(&v)) return *x ? "true" : "false";
  if (const auto* x = boost::any_cast<int>(&v)) return std::to_string(*x);
  if (const auto* x = boost::any_cast<uint64_t>(&v)) return std::to_string(*x);
  if (const auto* x = boost::any_cast<double>(&v)) {
    char buf[64];
    const auto end = std::to_chars(buf, buf + sizeof buf, *x).ptr;
    return std::string(buf, end);
  }
  throw RuntimeError("resolved configuration: an option of a type it cannot write");
}

// Every option of the table but those that only answer or point elsewhere (help, version, config), as INI:
// the options given (on the command line or in a config file) as lines, and those left at their defaults
// as comments with the value this lrllm used. --config then reads the text back to the same values and the
// same Config::given, which matters: a given option is checked against the model file it loads (a shape, a
// rank) where an option left at its default is taken from the file.
std::string resolved_config(const po::options_description& options, const po::variables_map& vm) {
  std::string out = std::string("# lrllm ") + kVersion +
                    ": the resolved configuration of a run; lrllm --config FILE repeats it. Commented lines\n"
                    "# are options left at their defaults (or unset), with the value this version used.\n";
  std::string section;
  for (const auto& option : options.options()) {
    const std::string& name = option->long_name();
    if (name == "help" || name == "version" || name == "config") continue;
    const std::size_t dot = name.find('.');
    const std::string sect = dot == std::string::npos ? "" : name.substr(0, dot);
    if (sect != section) {
      out += "\n[" + sect + "]\n";
      section = sect;
    }
    const std::string key = dot == std::string::npos ? name : name.substr(dot + 1);
    const auto it = vm.find(name);
    if (it == vm.end() || it->second.empty()) {
      out += "# " + key + " =\n";
      continue;
    }
    const std::string value = value_text(it->second.value());
    // A config file ends a value at '#' and trims it; such a value is in the stored command line only.
    const bool representable = value.find_first_of("#\n\r") == std::string::npos &&
                               (value.empty() || (value.front() != ' ' && value.back() != ' '));
    if (!representable)
      out += "# " + key + ": its value cannot be written in INI; see the command line\n";
    else
      out += std::string(it->second.defaulted() ? "# " : "") + key + " = " + value + "\n";
  }
  return out;
}

// argv as one line a POSIX shell reads back: arguments with anything but safe characters single-quoted.
std::string command_line(int argc, const char* const* argv) {
  std::string out;
  for (int i = 0; i < argc; ++i) {
    const std::string arg = argv[i];
    const bool plain = !arg.empty() && arg.find_first_not_of(
                                           "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                           "0123456789-_./=:,+@%") == std::string::npos;
    std::string quoted = "'";
    for (char ch : arg) quoted += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
    out += (i ? " " : "") + (plain ? arg : quoted + "'");
  }
  return out;
}

void require(bool ok, const std::string& message) {
  if (!ok) throw InputError(message);
}

constexpr int kMaxCount = 1 << 20;

void validate(const Config& c) {
  bool known_mode = false;
  for (const char* m : kModes) known_mode |= c.mode == m;
  require(
      !c.mode.empty(),
      "--mode is required (pretrain, finetune, eval, generate, decompose, export, import, tokenize, info); "
      "see --help");
  require(known_mode, "--mode " + c.mode +
                          " is not a mode of this lrllm (pretrain, finetune, eval, generate, decompose, "
                          "export, import, tokenize, info)");
  require(c.device == "cpu" || c.device == "cuda" || c.device == "auto",
          "--device must be cpu, cuda or auto, not '" + c.device + "'");
  const TrainConfig& t = c.train;
  require(t.steps >= 0, "--train.steps must be >= 0");
  require(t.epochs >= 0 && t.epochs <= kMaxCount,
          "--train.epochs must be between 0 and " + std::to_string(kMaxCount));
  require(t.epochs == 0 || !c.was_given("train.steps"),
          "--train.steps and --train.epochs both give the run's length: give one");
  require(c.data.padding == "longest" || c.data.padding == "max_length",
          "--data.padding must be longest or max_length, not '" + c.data.padding + "'");
  require(c.data.val_fraction >= 0 && c.data.val_fraction < 1, "--data.val_fraction must be in [0, 1)");
  require(c.data.val_fraction == 0 || c.data.val.empty(),
          "--data.val_fraction holds out part of data.train, and --data.val gives validation data: give one");
  require(c.data.prompt_template.empty() || is_prompt_template(c.data.prompt_template),
          "--data.template must be fingpt or alpaca, not '" + c.data.prompt_template + "'");
  // Counts that size buffers or loops: bounded far above any real run, so that products of them stay in
  // range.
  require(t.batch_size >= 1 && t.batch_size <= kMaxCount,
          strprintf("--train.batch_size must be between 1 and %d", kMaxCount));
  require(t.grad_accum >= 1 && t.grad_accum <= kMaxCount,
          strprintf("--train.grad_accum must be between 1 and %d", kMaxCount));
  require(t.lr >= 0, "--train.lr must be >= 0, not " + std::to_string(t.lr));
  require(t.min_lr >= 0 && t.min_lr <= t.lr, "--train.min_lr must be between 0 and train.lr");
  require(t.warmup >= 0, "--train.warmup must be >= 0");
  require(t.weight_decay >= 0, "--train.weight_decay must be >= 0");
  require(t.grad_clip >= 0, "--train.grad_clip must be >= 0");
  require(t.beta1 >= 0 && t.beta1 < 1 && t.beta2 >= 0 && t.beta2 < 1,
          "--train.beta1/beta2 must be in [0, 1)");
  require(t.eps > 0, "--train.eps must be > 0");
  require(t.eval_every >= 0, "--train.eval_every must be >= 0");
  require(t.eval_batches >= 1 && t.eval_batches <= kMaxCount,
          strprintf("--train.eval_batches must be between 1 and %d", kMaxCount));
  require(t.recompute == "none" || t.recompute == "block", "--train.recompute must be none or block");
  require(c.lowrank_activation == "none" || c.lowrank_activation == "silu",
          "--lowrank.activation must be none or silu, not '" + c.lowrank_activation + "'");
  require(c.lowrank_init == "default" || c.lowrank_init == "product_std",
          "--lowrank.init must be default or product_std, not '" + c.lowrank_init + "'");
  require(t.lowrank_lr_mult > 0 && std::isfinite(t.lowrank_lr_mult), "--lowrank.lr_mult must be > 0");
  require(t.lowrank_refactor_every >= 0, "--lowrank.refactor_every must be >= 0 (0: never)");
  // Refactoring keeps B A; under silu the layer is B silu(A x), which another pair of factors with the same
  // product does not compute.
  require(t.lowrank_refactor_every == 0 || c.lowrank_activation == "none",
          "--lowrank.refactor_every keeps B A, which a silu site does not compute: use it with "
          "--lowrank.activation none");
  // The refactoring's QR and SVD need each factor whole; under tensor parallelism a rank holds a slice.
  require(t.lowrank_refactor_every == 0 || c.parallel.tp == 1,
          "--lowrank.refactor_every needs --parallel.tp 1 (it refactors whole factors)");
  require(c.run.log_every >= 1, "--run.log_every must be >= 1");
  const FinetuneConfig& ft = c.finetune;
  quant_from_bits(ft.quant_bits);
  require(ft.quant_block >= 1 && ft.quant_block <= 4096, "--quant.block must be between 1 and 4096");
  require(ft.lora_rank >= 0, "--lora.rank must be >= 0");
  require(ft.lora_alpha > 0, "--lora.alpha must be > 0");
  require(ft.lora_dropout >= 0 && ft.lora_dropout < 1, "--lora.dropout must be in [0, 1)");
  require(
      !(ft.lora_only && ft.lora_merge),
      "--lora.only writes the adapters alone and --lora.merge folds them into the base: give one of them");
  require(!ft.lora_only || c.mode == "export", "--lora.only is an option of --mode export");
  require(ft.lora_init.empty() || c.mode == "eval" || c.mode == "generate" || c.mode == "export" ||
              c.mode == "finetune",
          "--lora.init loads adapters for --mode eval, generate, export or finetune, not " + c.mode);
  require(c.exporting.format == "lrllm" || c.exporting.format == "hf" || c.exporting.format == "peft",
          "--export.format must be lrllm, hf or peft, not '" + c.exporting.format + "'");
  require(c.exporting.dtype == "f32" || c.exporting.dtype == "bf16" || c.exporting.dtype == "f16",
          "--export.dtype must be f32, bf16 or f16, not '" + c.exporting.dtype + "'");
  require(
      c.exporting.format != "lrllm" || !c.was_given("export.dtype"),
      "--export.dtype is the tensor type of --export.format hf and peft (an lrllm file stores float32, or "
      "--quant.bits)");
  require(c.eval.method == "generate" || c.eval.method == "score", "--eval.method must be generate or score");
  require(c.eval.max_new_tokens >= 1 && c.eval.max_new_tokens <= kMaxCount,
          strprintf("--eval.max_new_tokens must be between 1 and %d", kMaxCount));
  require(c.generate.max_new_tokens >= 1 && c.generate.max_new_tokens <= kMaxCount,
          strprintf("--generate.max_new_tokens must be between 1 and %d", kMaxCount));
  require(c.generate.temperature >= 0, "--generate.temperature must be >= 0");
  require(c.generate.top_k >= 0, "--generate.top_k must be >= 0");
  require(c.checkpoint.every >= 0, "--checkpoint.every must be >= 0");
  require(c.checkpoint.keep >= 0, "--checkpoint.keep must be >= 0");
}

}  // namespace

std::size_t physical_memory_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  if (pages <= 0 || page <= 0) return std::size_t{1} << 40;  // unknown: a bound of no practical effect
  return static_cast<std::size_t>(pages) * static_cast<std::size_t>(page);
}

namespace {

// Parses "all" or a comma list of sites into one flag per site.
void parse_sites(const std::string& option, const std::string& text, bool (&on)[kNumSites]) {
  std::fill(on, on + kNumSites, false);
  std::stringstream list(text);
  std::string item;
  while (std::getline(list, item, ',')) {
    if (item == "all") {
      std::fill(on, on + kNumSites, true);
      continue;
    }
    bool found = false;
    for (int s = 0; s < kNumSites; ++s) {
      if (item == site_name(static_cast<LinearSite>(s))) on[s] = found = true;
    }
    require(found || item.empty(),
            "--" + option + ": unknown site '" + item + "' (all, qkv, proj, fc, mlp_proj)");
  }
}

}  // namespace

void apply_finetune(const Config& c, ModelConfig& m) {
  const FinetuneConfig& ft = c.finetune;
  require(ft.lora_rank >= 1, "--mode finetune needs --lora.rank >= 1");
  bool on[kNumSites];
  parse_sites("lora.targets", ft.lora_targets, on);
  for (int s = 0; s < kNumSites; ++s) m.lora_rank[s] = on[s] ? ft.lora_rank : 0;
  require(m.any_lora(), "--lora.targets selects no site");
  m.lora_alpha = ft.lora_alpha;
  m.lora_dropout = ft.lora_dropout;
  m.lora_modules = ft.lora_modules;
  m.quant = quant_from_bits(ft.quant_bits);
  m.quant_block = ft.quant_block;
  m.quant_double = ft.quant_double;
  m.quant_embedding = ft.quant_embedding;
}

void apply_lowrank(const Config& c, ModelConfig& m) {
  bool site_on[kNumSites];
  parse_sites("lowrank.targets", c.lowrank_targets, site_on);
  require(c.lowrank_rank >= 0, "--lowrank.rank must be >= 0 (0 means dense)");
  require(c.lowrank_rank > 0 || !c.was_given("lowrank.targets"),
          "--lowrank.targets was given but --lowrank.rank is 0: a low-rank layer needs a rank >= 1");
  for (int s = 0; s < kNumSites; ++s) {
    const int over = c.lowrank_site_rank[s];
    require(over != 0, std::string("--lowrank.rank_") + site_name(static_cast<LinearSite>(s)) +
                           " must be >= 1 (leave it out for a dense site)");
    m.lowrank_rank[s] = over > 0 ? over : (site_on[s] ? c.lowrank_rank : 0);
  }
  m.lowrank_silu = c.lowrank_activation == "silu";
  m.lowrank_product_std = c.lowrank_init == "product_std";
  require(!m.lowrank_silu || m.any_lowrank(),
          "--lowrank.activation silu needs a low-rank site (--lowrank.rank >= 1)");
}

bool parse_config(int argc, const char* const* argv, Config& c, bool print_help_and_version) {
  po::options_description options = make_options(c);
  po::variables_map vm;
  try {
    po::store(po::parse_command_line(argc, argv, options), vm);
    if (vm.count("help")) {
      if (print_help_and_version)
        std::cout << "lrllm " << kVersion << ": low-rank GPT-2 pretraining (FinGPT-HPC)\n\n"
                  << "Usage: lrllm --mode MODE [--config FILE] [--section.option VALUE ...]\n"
                  << "Every option can also be set in the config file as 'option = value' under [section];\n"
                  << "the command line wins over the file.\n\n"
                  << options << "\n";
      return false;
    }
    if (vm.count("version")) {
      if (print_help_and_version)
        std::cout << "lrllm " << kVersion << " ("
                  << (built_with_cuda() ? "built with CUDA: --device cuda available, not yet tested on a GPU"
                                        : "CPU-only build")
                  << ")\n";
      return false;
    }
    if (vm.count("config")) {
      const std::string path = vm["config"].as<std::string>();
      // A folder opens as a stream that reads nothing, which would run on the defaults.
      if (std::filesystem::is_directory(path))
        throw InputError("--config " + path + " is a folder, not a file");
      std::ifstream in(path);
      if (!in) throw InputError("--config " + path + ": cannot open the file");
      // Command-line values were stored first, so they win over the file's.
      po::store(po::parse_config_file(in, options, false), vm);
    }
    po::notify(vm);
  } catch (const po::error& e) {
    throw InputError(e.what());
  }
  for (const auto& [name, value] : vm)
    if (!value.defaulted()) c.given.insert(name);
  validate(c);
  c.resolved = resolved_config(options, vm);
  c.command_line = command_line(argc, argv);
  return true;
}

}  // namespace lrllm

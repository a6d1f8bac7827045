// Run configuration (docs/design.md, CLI): every option, parsed from an INI file and the command line.
#pragma once

#include <cstddef>
#include <cstdint>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace lrllm {

// How a frozen base's dense linear weights (and, optionally, the tied wte) are stored: float32, or one of the
// block-quantized kinds of quant.h. Parsed once, from --quant.bits or from a file's /config quant.
enum class QuantKind { none, int8, nf4 };
const char* quant_name(QuantKind q);                 // "none", "int8", "nf4": the files' spelling
const char* storage_name(QuantKind q);               // "float32", "int8", "nf4": for messages
QuantKind quant_from_name(const std::string& name);  // the files' spelling; InputError for another
QuantKind quant_from_bits(int bits);                 // 0, 8, 4; InputError for another
int quant_bits(QuantKind q);                         // 0, 8, 4

// The prompt templates of instruction data (io/instruct.h writes them out): FinGPT's and Stanford Alpaca's.
enum class PromptTemplate { fingpt, alpaca };
bool is_prompt_template(const std::string& name);
PromptTemplate parse_prompt_template(const std::string& name);  // InputError for another name
const char* template_name(PromptTemplate t);
// The template given (data.template), else the one recorded in the model file, else FinGPT's.
PromptTemplate choose_template(const std::string& given, const std::string& recorded);

// The four kinds of linear layer in a GPT-2 block, in the order a block applies them.
enum class LinearSite { qkv = 0, proj = 1, fc = 2, mlp_proj = 3 };
inline constexpr int kNumSites = 4;
const char* site_name(LinearSite site);

// The architectures (model/architecture.h describes each): the /config arch of a model file.
bool is_arch(const std::string& name);  // "gpt2" or "llama"

struct ModelConfig {
  std::string arch = "gpt2";
  int n_layer = 4;
  int n_head = 4;
  int n_kv_head = 0;            // llama's key/value heads, dividing n_head (0: n_head, as GPT-2 always has)
  double rope_theta = 10000.0;  // llama's rotary base
  double norm_eps = 1e-5;       // llama's RMSNorm eps (GPT-2's LayerNorm eps is 1e-5)
  int d_model = 128;
  int d_ff = 0;  // 0 means 4 * d_model
  int seq_len = 128;
  int vocab_size = 50257;
  std::string init;  // checkpoint to start from
  // The frozen base a model with adapters was finetuned over: its file and base_checksum of it (empty: not
  // recorded, as in files from before lrllm recorded it).
  std::string base;
  std::string base_checksum;
  // Low-rank factorization per site; 0 means dense.
  int lowrank_rank[kNumSites] = {0, 0, 0, 0};
  // lowrank.activation silu: every low-rank site computes y = B silu(A x) + b (CoLA's form), so W = B A no
  // longer describes it (docs/design.md, Linear layers). Part of the model: /config lowrank_activation.
  bool lowrank_silu = false;
  // lowrank.init product_std: factors drawn as CoLA's (each N(0, r^-1/4 (in+out)^-1/4)) instead of at the
  // dense layer's product std. A training setting, recorded as /config lowrank_init.
  bool lowrank_product_std = false;
  // LoRA adapters per site (0: none). A model with any adapter has a frozen base: only adapters train.
  int lora_rank[kNumSites] = {0, 0, 0, 0};
  double lora_alpha = 16.0;
  // Base tensors trained in full beside the adapters: lora.modules_to_save's patterns (see model.h).
  std::string lora_modules;
  // Token ids, ascending, whose rows of the tied wte train beside the adapters (lora.trainable_tokens, PEFT's
  // trainable tokens): a [k, d_model] delta added to those rows in the embedding and the lm_head alike.
  std::vector<int32_t> trainable_tokens;
  // The prompt template (instruct.h) the adapters were finetuned with: /config prompt_template, empty when
  // none is recorded (a base, or a file from before lrllm recorded it). Eval uses it unless told otherwise.
  std::string prompt_template;
  // The folder of the model's own tokenizer (encoder.json, vocab.bpe), as /config tokenizer_dir records it:
  // written by --mode import beside the model file; empty when none is recorded. Held as a path from the
  // working directory; a file stores it relative to its own folder.
  std::string tokenizer_dir;
  // Dropout on the adapters' input while training (a training setting: not stored in checkpoints).
  double lora_dropout = 0.0;
  QuantKind quant = QuantKind::none;  // storage of the frozen base's dense linear weights
  int quant_block = 64;
  bool quant_double = true;      // nf4: absmax quantized to 8 bits as well
  bool quant_embedding = false;  // with quant: the tied wte (embedding and lm_head) is stored quantized too

  int ff() const { return d_ff > 0 ? d_ff : 4 * d_model; }
  int kv_heads() const { return n_kv_head > 0 ? n_kv_head : n_head; }
  bool llama() const { return arch == "llama"; }
  bool any_lowrank() const;
  bool any_lora() const;
  std::string lora_targets() const;
  std::string lowrank_targets() const;  // e.g. "qkv,proj,fc,mlp_proj" or ""
  // The checkpoint's single lowrank_rank attribute: the common rank, or the largest when sites differ.
  int lowrank_rank_attr() const;
};

struct TrainConfig {
  int steps = 100;
  double epochs = 0;   // > 0: the steps that pass over the training data this many times (instead of steps)
  int batch_size = 4;  // sequences per rank per micro-step
  int grad_accum = 1;
  double lr = 6e-4;
  double min_lr = 6e-5;
  int warmup = 10;
  double weight_decay = 0.1;
  double grad_clip = 1.0;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  int eval_every = 50;
  int eval_batches = 8;
  std::string recompute = "none";
  // lowrank.lr_mult: AdamW's learning rate times this for low-rank factors (A, B).
  double lowrank_lr_mult = 1.0;
  // lowrank.refactor_every: every K optimizer steps, each trainable B A is refactored into balanced factors
  // of the same product and their AdamW moments restart (0: never). docs/design.md, Linear layers.
  int lowrank_refactor_every = 0;
};

struct DataConfig {
  std::string train;
  std::string val;
  std::string input;
  std::string output;
  bool shuffle = true;
  std::string tokenizer_dir = "input/data/tokenizer";
  // Finetuning data (docs/design.md, Instruction data).
  std::string padding = "longest";  // longest: each batch to its longest row; max_length: to model.seq_len
  bool packing = false;             // several examples a row, attention kept inside each
  double val_fraction = 0;          // without data.val: this share of data.train held out for validation
  std::string prompt_template;      // fingpt | alpaca; empty: the model file's, else fingpt
};

struct RunConfig {
  std::string dir = "runs/default";
  int log_every = 1;
  bool overwrite = false;  // a fresh run into a directory with an earlier run moves its files aside
};

struct CheckpointConfig {
  int every = 0;  // 0: only at the end of training
  int keep = 3;
  std::string resume;  // a path, or "latest"
};

struct FinetuneConfig {
  int lora_rank = 0;
  double lora_alpha = 16.0;
  double lora_dropout = 0.0;
  std::string lora_targets = "all";
  std::string lora_modules;  // lora.modules_to_save
  // lora.trainable_tokens: comma-separated token ids, or "answers" (every token of the training answers and
  // the end-of-text); resolved by finetuning, which has the tokenizer and the data.
  std::string trainable_tokens;
  bool lora_merge = false;  // export: fold the adapters into the base weights
  bool lora_only = false;   // export: write only the adapters and the tensors trained beside them
  std::string lora_init;    // an adapter file (export --lora.only) loaded over the base model.init
  int quant_bits = 0;       // 0: float32 base, 8: int8, 4: NF4
  int quant_block = 64;
  bool quant_double = true;
  bool quant_embedding = true;
};

struct EvalConfig {
  std::string tasks;  // comma-separated instruction JSONL files
  std::string method = "generate";
  std::string labels;  // the tasks' label set, comma-separated; empty: each task's distinct outputs
  int max_new_tokens = 8;
};

struct ExportConfig {
  std::string format = "lrllm";  // lrllm: a model file; hf: a Hugging Face folder (docs/design.md)
  std::string dtype = "f32";     // hf: f32 | bf16 | f16
};

struct GenerateConfig {
  std::string prompt;
  int max_new_tokens = 64;
  double temperature = 0.0;  // 0: greedy
  int top_k = 0;             // sample among the k most likely tokens; 0: all
  bool kv_cache = true;      // decode with the key/value cache (also eval's generate method); false: rerun
                             // the window for every token, the reference the cache is tested against
};

struct ParallelConfig {
  int tp = 1;             // tensor-parallel group size
  int pp = 1;             // pipeline stages
  int zero = 0;           // 1: shard the optimizer state over the data-parallel ranks (ZeRO-1)
  int micro_batches = 1;  // pipeline micro-batches per micro-step (dividing train.batch_size)
  double bucket_mb = 25;  // gradient averaging buckets, started as backward finishes their blocks
};

struct Config {
  std::string mode;
  std::string config_file;
  std::string device = "auto";
  uint64_t seed = 1337;
  ModelConfig model;
  std::string lowrank_targets = "all";
  int lowrank_rank = 0;
  int lowrank_site_rank[kNumSites] = {-1, -1, -1, -1};  // per-site overrides; -1: lowrank.rank
  std::string lowrank_activation = "none";              // none | silu
  std::string lowrank_init = "default";                 // default | product_std
  // Options the user gave (file or command line), as "section.option".
  std::set<std::string> given;
  bool was_given(const std::string& option) const { return given.count(option) > 0; }
  // The run's options as INI text that --config reads back to the same Config (parse_config), and its
  // command line: stored in checkpoints and metrics.h5 so that a run can be repeated from its files.
  std::string resolved;
  std::string command_line;
  FinetuneConfig finetune;
  EvalConfig eval;
  ExportConfig exporting;  // [export] (export is a C++ keyword)
  GenerateConfig generate;
  TrainConfig train;
  DataConfig data;
  RunConfig run;
  CheckpointConfig checkpoint;
  ParallelConfig parallel;
};

// Parses argv (and the --config file it names). Throws InputError on an unknown option, a bad value or a
// missing config file. Returns false when --help or --version was answered and the program should exit 0.
bool parse_config(int argc, const char* const* argv, Config& cfg, bool print_help_and_version);

// This machine's physical memory, the bound of every size a run may allocate.
std::size_t physical_memory_bytes();

// Sets the LoRA ranks and the base's storage in m from the lora.* and quant.* options. Throws InputError.
void apply_finetune(const Config& cfg, ModelConfig& m);

// Sets each site's rank in m from lowrank.rank, lowrank.targets ("all" or a comma list of sites) and the
// per-site overrides. Throws InputError on an unknown site or a bad rank.
void apply_lowrank(const Config& cfg, ModelConfig& m);

}  // namespace lrllm

#include "lrllm/train/finetune.h"

#include <cmath>
#include <limits>
#include <memory>
#include <set>
#include <sstream>
#include <tuple>
#include <utility>

#include "lrllm/core/common.h"
#include "lrllm/core/rng.h"
#include "lrllm/io/checkpoint.h"
#include "lrllm/io/instruct.h"
#include "lrllm/io/tokenizer.h"
#include "lrllm/train/run_dir.h"
#include "lrllm/train/train.h"

namespace lrllm {
namespace {

// Instruction examples as training sequences, loss on the answer only: one example a row, or with packing
// several a row (packed once at load, so a data cursor means the same rows on resume); each batch padded to
// its longest row, or to pad_to.
class InstructionBatches final : public BatchSource {
 public:
  InstructionBatches(std::vector<Encoded> rows, int row_len, int pad_to, int32_t pad, bool shuffle,
                     uint64_t seed)
      : rows_(std::move(rows)),
        row_len_(row_len),
        pad_to_(pad_to),
        pad_(pad),
        order_(rows_.size(), shuffle, seed) {}
  std::size_t num_sequences() const override { return rows_.size(); }
  void fill(uint64_t first, int count, Batch& out) override {
    std::vector<std::size_t> picked(count);
    for (int i = 0; i < count; ++i) picked[i] = order_.at(first + i);
    fill_padded(rows_, picked, row_len_, pad_to_, pad_, out);
  }

 private:
  std::vector<Encoded> rows_;
  int row_len_, pad_to_;
  int32_t pad_;
  EpochOrder order_;
};

std::vector<Encoded> encode_file(const std::string& path, const std::vector<Example>& examples,
                                 const Tokenizer& tok, int row_len, PromptTemplate t) {
  std::vector<Encoded> encoded;
  for (std::size_t i = 0; i < examples.size(); ++i) {
    try {
      encoded.push_back(encode_example(tok, examples[i], row_len, t));
    } catch (const InputError& e) {
      throw InputError(path + ": example " + std::to_string(i + 1) + ": " + e.what());
    }
  }
  return encoded;
}

// data.val_fraction: a seeded choice of examples held out of training, both parts in file order.
std::pair<std::vector<Encoded>, std::vector<Encoded>> hold_out(std::vector<Encoded> all, double fraction,
                                                               uint64_t seed, const std::string& path) {
  const std::size_t n = all.size();
  const std::size_t held = static_cast<std::size_t>(std::llround(fraction * static_cast<double>(n)));
  if (held == 0 || held == n)
    throw InputError(strprintf("--data.val_fraction %g of the %zu examples of %s leaves %s", fraction, n,
                               path.c_str(), held == 0 ? "no validation example" : "no training example"));
  // The first `held` examples of a seeded permutation (an epoch order of its own seed).
  EpochOrder order(n, true, derive_seed(seed, "validation share"));
  std::vector<bool> is_val(n, false);
  for (std::size_t i = 0; i < held; ++i) is_val[order.at(i)] = true;
  std::vector<Encoded> train, val;
  for (std::size_t i = 0; i < n; ++i) (is_val[i] ? val : train).push_back(std::move(all[i]));
  return {std::move(train), std::move(val)};
}

// The template a run uses: data.template when given, else the one the model was finetuned with, else
// FinGPT's. Continuing adapters with another template than theirs is refused.
PromptTemplate run_template(const Config& cfg, const ModelConfig& mc, bool continues,
                            const std::string& from) {
  const std::string& given = cfg.data.prompt_template;
  if (!given.empty() && continues && !mc.prompt_template.empty() && given != mc.prompt_template)
    throw InputError("--data.template " + given + " contradicts " + from + ", finetuned with " +
                     mc.prompt_template);
  return choose_template(given, mc.prompt_template);
}

// lora.trainable_tokens: comma-separated ids, or "answers": every token the training answers hold, and the
// end-of-text that closes them (the rows a classification task's labels are read from). Ascending, distinct.
std::vector<int32_t> resolve_trainable_tokens(const std::string& spec, const Tokenizer& tok,
                                              const std::vector<Example>& train, PromptTemplate t) {
  std::set<int32_t> ids;
  if (spec == "answers") {
    for (const Example& e : train)
      for (int id : answer_tokens_of(tok, e.output, t)) ids.insert(id);
    ids.insert(tok.eot());
  } else {
    std::stringstream list(spec);
    for (std::string item; std::getline(list, item, ',');) {
      std::size_t used = 0;
      long id = -1;
      try {
        id = std::stol(item, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used == 0 || used != item.size() || id < 0 || id > std::numeric_limits<int32_t>::max())
        throw InputError("--lora.trainable_tokens: '" + item + "' is not a token id (give ids, or answers)");
      ids.insert(static_cast<int32_t>(id));
    }
  }
  return {ids.begin(), ids.end()};
}

}  // namespace

int run_finetune(const Config& cfg, const MpiWorld& comm) {
  TrainSetup setup;
  collective_check(comm, [&] {
    if (cfg.data.train.empty()) throw InputError("--mode finetune needs --data.train (instruction JSONL)");
    if (cfg.data.packing && cfg.device == "cuda")
      throw InputError(
          "--data.packing runs on the CPU backend only: the GPU attention kernels have no "
          "example mask yet (use --data.padding longest)");
    const Tokenizer tok = Tokenizer::load_dir(tokenizer_dir_for(cfg));
    const std::vector<Example> train_examples = read_jsonl(cfg.data.train);
    const std::string& tokens_spec = cfg.finetune.trainable_tokens;
    PromptTemplate prompt_template = PromptTemplate::fingpt;
    if (!cfg.checkpoint.resume.empty()) {
      if (!cfg.finetune.lora_init.empty())
        throw InputError(
            "--lora.init starts a run from adapters and --checkpoint.resume continues one: give one");
      setup.resume = resolve_resume(cfg.checkpoint.resume, cfg.run.dir);
      setup.mc = read_model_config(setup.resume);
      if (!setup.mc.any_lora())
        throw InputError(setup.resume + ": has no LoRA adapters to resume finetuning");
      check_options_agree(cfg, setup.mc, setup.resume);
      prompt_template = run_template(cfg, setup.mc, true, setup.resume);
      if (cfg.was_given("lora.trainable_tokens") &&
          resolve_trainable_tokens(tokens_spec, tok, train_examples, prompt_template) !=
              setup.mc.trainable_tokens)
        throw InputError("--lora.trainable_tokens '" + tokens_spec + "' contradicts " + setup.resume +
                         ", which trains other tokens (" + std::to_string(setup.mc.trainable_tokens.size()) +
                         ")");
      setup.mc.lora_dropout = cfg.finetune.lora_dropout;
    } else if (cfg.model.init.empty()) {
      throw InputError("--mode finetune needs --model.init (the base checkpoint)");
    } else if (!cfg.finetune.lora_init.empty()) {
      // Adapters trained before, over this base: they continue from their values with a fresh optimizer.
      setup.mc = read_input_model_config(cfg);
      check_options_agree(cfg, setup.mc, cfg.finetune.lora_init);
      prompt_template = run_template(cfg, setup.mc, true, cfg.finetune.lora_init);
      setup.mc.lora_dropout = cfg.finetune.lora_dropout;
    } else {
      setup.mc = read_model_config(cfg.model.init);
      if (setup.mc.any_lora())
        throw InputError(cfg.model.init + ": already has LoRA adapters; resume it with --checkpoint.resume");
      check_options_agree(cfg, setup.mc, cfg.model.init);
      apply_finetune(cfg, setup.mc);
      prompt_template = run_template(cfg, setup.mc, false, cfg.model.init);
      if (!tokens_spec.empty())
        setup.mc.trainable_tokens =
            resolve_trainable_tokens(tokens_spec, tok, train_examples, prompt_template);
      // The base's identity, for adapters exported alone (--lora.only) and loaded over it again.
      setup.mc.base = cfg.model.init;
      setup.mc.base_checksum = base_checksum(cfg.model.init);
    }
    setup.mc.prompt_template = template_name(prompt_template);
    validate_model_config(setup.mc);
    validate_saved_modules(setup.mc);
    check_tokenizer_fits(tok, setup.mc.vocab_size, tokenizer_dir_for(cfg));

    // Rows: --model.seq_len when given (check_options_agree refused one above the position table).
    setup.row_len = cfg.was_given("model.seq_len") ? cfg.model.seq_len : setup.mc.seq_len;
    std::vector<Encoded> train =
        encode_file(cfg.data.train, train_examples, tok, setup.row_len, prompt_template);
    std::vector<Encoded> val;
    std::string val_source;
    if (!cfg.data.val.empty()) {
      val = encode_file(cfg.data.val, read_jsonl(cfg.data.val), tok, setup.row_len, prompt_template);
      val_source = cfg.data.val;
    } else if (cfg.data.val_fraction > 0) {
      std::tie(train, val) = hold_out(std::move(train), cfg.data.val_fraction, cfg.seed, cfg.data.train);
      val_source = strprintf("%g of %s, held out", cfg.data.val_fraction, cfg.data.train.c_str());
    } else {
      val = train;
      val_source = "the training examples themselves: no --data.val or --data.val_fraction";
    }
    const std::size_t train_examples_used = train.size();
    // Validation stays one example a row: its loss means the same with and without packing.
    if (cfg.data.packing) train = pack_examples(train, setup.row_len);
    const int pad_to = cfg.data.padding == "max_length" ? setup.row_len : 0;
    const std::size_t train_rows = train.size(), val_examples = val.size();
    setup.train = std::make_unique<InstructionBatches>(std::move(train), setup.row_len, pad_to, tok.eot(),
                                                       cfg.data.shuffle, cfg.seed);
    setup.val = std::make_unique<InstructionBatches>(std::move(val), setup.row_len, pad_to, tok.eot(), false,
                                                     cfg.seed);
    setup.data_summary = strprintf(
        "train %zu examples%s, val %zu examples (%s); rows of at most %d tokens, padded to %s, %s template",
        train_examples_used, cfg.data.packing ? strprintf(" packed in %zu rows", train_rows).c_str() : "",
        val_examples, val_source.c_str(), setup.row_len,
        pad_to > 0 ? "model.seq_len" : "each batch's longest", template_name(prompt_template));
    setup.check_layout(cfg, comm);
  });
  setup.make_topology(cfg, comm);
  collective_check(comm, [&] {
    setup.build(cfg);
    if (setup.resume.empty()) {
      setup.model->init_adapters(cfg.seed);
      load_base_weights(cfg.model.init, *setup.model);
      if (!cfg.finetune.lora_init.empty()) load_adapters(cfg.finetune.lora_init, *setup.model);
    }
    claim_run_dir(cfg, comm, !setup.resume.empty());
  });
  return run_training(cfg, comm, setup, "finetune");
}

}  // namespace lrllm

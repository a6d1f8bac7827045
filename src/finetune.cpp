#include "lrllm/finetune.h"

#include <limits>
#include <memory>
#include <set>
#include <sstream>

#include "lrllm/checkpoint.h"
#include "lrllm/common.h"
#include "lrllm/instruct.h"
#include "lrllm/tokenizer.h"
#include "lrllm/train.h"

namespace lrllm {
namespace {

// Instruction examples as training sequences: one example a row, right-padded, loss on the answer only.
class InstructionBatches final : public BatchSource {
 public:
  InstructionBatches(std::vector<Encoded> examples, int seq_len, int32_t pad, bool shuffle, uint64_t seed)
      : examples_(std::move(examples)),
        seq_len_(seq_len),
        pad_(pad),
        order_(examples_.size(), shuffle, seed) {}
  std::size_t num_sequences() const override { return examples_.size(); }
  void fill(uint64_t first, int count, int32_t* tokens, int32_t* targets) override {
    std::vector<std::size_t> rows(count);
    for (int i = 0; i < count; ++i) rows[i] = order_.at(first + i);
    fill_padded(examples_, rows, seq_len_, pad_, tokens, targets);
  }

 private:
  std::vector<Encoded> examples_;
  int seq_len_;
  int32_t pad_;
  EpochOrder order_;
};

std::unique_ptr<InstructionBatches> load_examples(const std::string& path, const Tokenizer& tok, int seq_len,
                                                  bool shuffle, uint64_t seed) {
  std::vector<Encoded> encoded;
  const std::vector<Example> examples = read_jsonl(path);
  for (std::size_t i = 0; i < examples.size(); ++i) {
    try {
      encoded.push_back(encode_example(tok, examples[i], seq_len));
    } catch (const InputError& e) {
      throw InputError(path + ": example " + std::to_string(i + 1) + ": " + e.what());
    }
  }
  if (encoded.empty()) throw InputError(path + ": no examples");
  return std::make_unique<InstructionBatches>(std::move(encoded), seq_len, tok.eot(), shuffle, seed);
}

// lora.trainable_tokens: comma-separated ids, or "answers": every token the training answers hold, and the
// end-of-text that closes them (the rows a classification task's labels are read from). Ascending, distinct.
std::vector<int32_t> resolve_trainable_tokens(const std::string& spec, const Tokenizer& tok,
                                              const std::string& train_path) {
  std::set<int32_t> ids;
  if (spec == "answers") {
    for (const Example& e : read_jsonl(train_path))
      for (int id : answer_tokens_of(tok, e.output)) ids.insert(id);
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

int run_finetune(const Config& cfg, const Comm& comm) {
  TrainSetup setup;
  collective_check(comm, [&] {
    if (cfg.data.train.empty()) throw InputError("--mode finetune needs --data.train (instruction JSONL)");
    const Tokenizer tok =
        Tokenizer::load(cfg.data.tokenizer_dir + "/encoder.json", cfg.data.tokenizer_dir + "/vocab.bpe");
    const std::string& tokens_spec = cfg.finetune.trainable_tokens;
    if (!cfg.checkpoint.resume.empty()) {
      if (!cfg.finetune.lora_init.empty())
        throw InputError(
            "--lora.init starts a run from adapters and --checkpoint.resume continues one: give one");
      setup.resume = resolve_resume(cfg.checkpoint.resume, cfg.run.dir);
      setup.mc = read_model_config(setup.resume);
      if (!setup.mc.any_lora())
        throw InputError(setup.resume + ": has no LoRA adapters to resume finetuning");
      check_options_agree(cfg, setup.mc, setup.resume);
      if (cfg.was_given("lora.trainable_tokens") &&
          resolve_trainable_tokens(tokens_spec, tok, cfg.data.train) != setup.mc.trainable_tokens)
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
      setup.mc.lora_dropout = cfg.finetune.lora_dropout;
    } else {
      setup.mc = read_model_config(cfg.model.init);
      if (setup.mc.any_lora())
        throw InputError(cfg.model.init + ": already has LoRA adapters; resume it with --checkpoint.resume");
      check_options_agree(cfg, setup.mc, cfg.model.init);
      apply_finetune(cfg, setup.mc);
      if (!tokens_spec.empty())
        setup.mc.trainable_tokens = resolve_trainable_tokens(tokens_spec, tok, cfg.data.train);
      // The base's identity, for adapters exported alone (--lora.only) and loaded over it again.
      setup.mc.base = cfg.model.init;
      setup.mc.base_checksum = base_checksum(cfg.model.init);
    }
    validate_model_config(setup.mc);
    validate_saved_modules(setup.mc);
    if (tok.vocab_size() > setup.mc.vocab_size)
      throw InputError(strprintf("the GPT-2 tokenizer has %d tokens but the model's vocabulary is %d",
                                 tok.vocab_size(), setup.mc.vocab_size));
    const int T = setup.mc.seq_len;
    setup.train = load_examples(cfg.data.train, tok, T, cfg.data.shuffle, cfg.seed);
    setup.val = load_examples(cfg.data.val.empty() ? cfg.data.train : cfg.data.val, tok, T, false, cfg.seed);
    setup.data_summary = strprintf("train %zu examples, val %zu examples", setup.train->num_sequences(),
                                   setup.val->num_sequences());
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

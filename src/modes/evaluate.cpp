#include "lrllm/modes/evaluate.h"

#include <filesystem>
#include <sstream>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <vector>

#include "lrllm/backend/backend.h"
#include "lrllm/core/common.h"
#include "lrllm/io/checkpoint.h"
#include "lrllm/io/instruct.h"
#include "lrllm/io/metrics.h"
#include "lrllm/io/tokenizer.h"
#include "lrllm/modes/generate.h"
#include "lrllm/modes/scoring.h"
#include "lrllm/parallel/pipeline.h"
#include "lrllm/train/run_dir.h"
#include "lrllm/train/train.h"

namespace lrllm {

namespace {

// The task's name in tables and in metrics.h5: the file name without folders and extension.
std::string task_name(const std::string& path) {
  std::string name = std::filesystem::path(path).stem().string();
  return name.empty() ? path : name;
}

// The prompt's tokens, cut from the left so that `room` positions remain free in a sequence of seq_len.
std::vector<int32_t> prompt_tokens(const Tokenizer& tok, const Example& e, PromptTemplate t, int seq_len,
                                   int room) {
  const std::vector<int> ids = prompt_tokens_of(tok, e, t);
  const std::size_t keep =
      std::min<std::size_t>(ids.size(), static_cast<std::size_t>(std::max(1, seq_len - room)));
  // As in training (encode_example): a sequence start token stays first when the prompt loses its start.
  const std::size_t bos = tok.bos() >= 0 ? 1 : 0;
  std::vector<int32_t> out(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(bos));
  out.insert(out.end(), ids.end() - static_cast<std::ptrdiff_t>(keep - bos), ids.end());
  return out;
}

// FinGPT's protocol: the greedy answer, up to max_new tokens or <|endoftext|>.
std::string generate_answer(Model& model, const Tokenizer& tok, const Example& e, PromptTemplate t,
                            int max_new, bool kv_cache) {
  Rng unused(0);  // greedy decoding draws nothing
  const std::vector<int32_t> answer =
      continue_tokens(model, prompt_tokens(tok, e, t, model.config().seq_len, max_new), max_new, tok.eot(),
                      Sampling{}, unused, kv_cache);
  return tok.decode(std::vector<int>(answer.begin(), answer.end()));
}

// Label scoring: the label whose tokens the model finds most likely after the prompt (sum of log-probs). One
// row of prompt and answer, no longer than they are.
std::string best_label(Model& model, const Tokenizer& tok, const Example& e, PromptTemplate t,
                       const std::vector<std::string>& labels) {
  const int max_len = model.config().seq_len;
  std::string best;
  double best_logp = -INFINITY;
  Batch row;
  for (const std::string& label : labels) {
    const std::vector<int> answer = answer_tokens_of(tok, label, t);
    const std::vector<int32_t> prompt =
        prompt_tokens(tok, e, t, max_len, static_cast<int>(answer.size()) + 1);
    const int n = static_cast<int>(prompt.size());
    const int len = std::min(max_len, n + static_cast<int>(answer.size()));
    row.resize(1, len);
    std::copy(prompt.begin(), prompt.end(), row.tokens.begin());
    std::fill(row.targets.begin(), row.targets.end(), -1);
    for (std::size_t j = 0; j < answer.size() && n + static_cast<int>(j) < len; ++j) {
      row.tokens[n + j] = answer[j];
      row.targets[n + j - 1] = answer[j];
    }
    const double mean_nll = model.forward_backward(row, 0.0f);
    const double logp = -mean_nll * static_cast<double>(answer.size());
    if (logp > best_logp) {
      best_logp = logp;
      best = label;
    }
  }
  return best;
}

int run_instruction_eval(const Config& cfg, const MpiWorld& comm) {
  LoadedModel loaded;
  std::unique_ptr<Tokenizer> tok;
  std::vector<std::string> paths;
  std::vector<std::vector<Example>> tasks;
  std::vector<std::vector<std::string>> label_sets;
  PromptTemplate prompt_template = PromptTemplate::fingpt;
  collective_check(comm, [&] {
    if (cfg.model.init.empty())
      throw InputError("--mode eval needs --model.init (a checkpoint or model file)");
    std::stringstream list(cfg.eval.tasks);
    for (std::string path; std::getline(list, path, ',');)
      if (!path.empty()) paths.push_back(path);
    std::vector<std::string> given;
    std::stringstream label_list(cfg.eval.labels);
    for (std::string label; std::getline(label_list, label, ',');)
      if (!label.empty()) given.push_back(label);
    std::sort(given.begin(), given.end());
    for (const std::string& path : paths) {
      tasks.push_back(read_jsonl(path));
      label_sets.push_back(given.empty() ? label_set(tasks.back()) : given);
      check_labels(tasks.back(), label_sets.back(), path);
    }
    tok = std::make_unique<Tokenizer>(Tokenizer::load_dir(tokenizer_dir_for(cfg)));
    loaded = load_model(cfg, cfg.device, comm.local_rank());
    check_tokenizer_fits(*tok, loaded.model->config().vocab_size, tokenizer_dir_for(cfg));
    prompt_template = choose_template(cfg.data.prompt_template, loaded.model->config().prompt_template);
    prepare_run_dir(cfg, comm);
    check_metrics_file((std::filesystem::path(cfg.run.dir) / "metrics.h5").string());
  });
  std::unique_ptr<Metrics> metrics;
  if (comm.root()) {
    metrics =
        std::make_unique<Metrics>((std::filesystem::path(cfg.run.dir) / "metrics.h5").string(), INT64_MAX);
    std::printf(
        "eval %s, method %s, %s template\n| task | n | accuracy | f1_macro | f1_weighted |\n"
        "|---|---|---|---|---|\n",
        cfg.model.init.c_str(), cfg.eval.method.c_str(), template_name(prompt_template));
  }
  for (std::size_t t = 0; t < tasks.size(); ++t) {
    const std::vector<Example>& examples = tasks[t];
    const std::vector<std::string>& labels = label_sets[t];
    // Ranks take examples round-robin and agree on a confusion matrix (the last column: no label).
    const std::size_t L = labels.size();
    std::vector<double> confusion(L * (L + 1), 0.0);
    for (std::size_t i = comm.rank(); i < examples.size(); i += comm.size()) {
      const Example& e = examples[i];
      const std::string predicted =
          cfg.eval.method == "score"
              ? best_label(*loaded.model, *tok, e, prompt_template, labels)
              : label_of(generate_answer(*loaded.model, *tok, e, prompt_template, cfg.eval.max_new_tokens,
                                         cfg.generate.kv_cache),
                         labels);
      const std::size_t gold = std::lower_bound(labels.begin(), labels.end(), e.output) - labels.begin();
      const auto hit = std::find(labels.begin(), labels.end(), predicted);
      confusion[gold * (L + 1) + static_cast<std::size_t>(hit - labels.begin())] += 1.0;
    }
    for (double& c : confusion) c = comm.allreduce_sum(c);
    std::vector<std::string> gold, predicted;
    for (std::size_t g = 0; g < L; ++g)
      for (std::size_t p = 0; p <= L; ++p)
        for (int k = 0; k < static_cast<int>(confusion[g * (L + 1) + p]); ++k) {
          gold.push_back(labels[g]);
          predicted.push_back(p < L ? labels[p] : std::string());
        }
    const Scores sc = score(gold, predicted, labels);
    if (comm.root()) {
      const std::string name = task_name(paths[t]);
      std::printf("| %s | %zu | %.4f | %.4f | %.4f |\n", name.c_str(), sc.n, sc.accuracy, sc.f1_macro,
                  sc.f1_weighted);
      metrics->append_eval(name, {{"accuracy", sc.accuracy},
                                  {"f1_macro", sc.f1_macro},
                                  {"f1_weighted", sc.f1_weighted},
                                  {"n", static_cast<double>(sc.n)}});
    }
  }
  if (comm.root()) metrics->flush();
  return 0;
}

}  // namespace

int run_eval(const Config& cfg, const MpiWorld& comm) {
  if (!cfg.eval.tasks.empty()) return run_instruction_eval(cfg, comm);
  std::unique_ptr<TokenStream> file;
  std::unique_ptr<Batcher> batcher;
  LoadedModel loaded;
  std::string data;
  collective_check(comm, [&] {
    if (cfg.model.init.empty())
      throw InputError("--mode eval needs --model.init (a checkpoint or model file)");
    data = !cfg.data.val.empty() ? cfg.data.val : cfg.data.train;
    if (data.empty()) throw InputError("--mode eval needs --data.val (or --data.train): a token file");
    file = std::make_unique<TokenStream>(data);
    loaded = load_model(cfg, cfg.device, comm.local_rank());
    file->check_vocab(loaded.model->config().vocab_size);
    batcher = std::make_unique<Batcher>(*file, loaded.model->config().seq_len, false, cfg.seed);
  });
  // Data parallel only: every rank holds the whole model.
  const Topology topo(comm, ParallelConfig{});
  Pipeline pipeline(*loaded.model, topo, 1);
  // Every sequence of the file once (rounded down to a multiple of the ranks), unless a number of batches
  // was asked for.
  const uint64_t per_batch = static_cast<uint64_t>(cfg.train.batch_size) * comm.size();
  uint64_t sequences = std::max<uint64_t>(1, batcher->num_sequences() / comm.size()) * comm.size();
  if (cfg.was_given("train.eval_batches")) sequences = per_batch * cfg.train.eval_batches;
  const double loss = validation_loss(pipeline, topo, *batcher, sequences, cfg.train.batch_size);
  if (comm.root())
    std::printf("eval %s on %s: %llu tokens, loss %.6f, ppl %.3f\n", cfg.model.init.c_str(), data.c_str(),
                static_cast<unsigned long long>(sequences * loaded.model->config().seq_len), loss,
                std::exp(loss));
  return 0;
}

}  // namespace lrllm

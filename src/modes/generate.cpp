#include "lrllm/modes/generate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <numeric>

#include "lrllm/backend/backend.h"
#include "lrllm/core/common.h"
#include "lrllm/io/checkpoint.h"
#include "lrllm/io/tokenizer.h"

namespace lrllm {

int sample_token(const float* logits, int vocab, const Sampling& sampling, Rng& rng) {
  if (sampling.temperature == 0.0) return static_cast<int>(std::max_element(logits, logits + vocab) - logits);
  const int k = sampling.top_k > 0 ? std::min(sampling.top_k, vocab) : vocab;
  std::vector<int> order(vocab);
  std::iota(order.begin(), order.end(), 0);
  // Ties go to the lower id, so the candidate set does not depend on the sort's implementation.
  std::partial_sort(order.begin(), order.begin() + k, order.end(),
                    [&](int a, int b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
  const double top = logits[order[0]];
  std::vector<double> weight(k);
  double total = 0;
  for (int i = 0; i < k; ++i) total += weight[i] = std::exp((logits[order[i]] - top) / sampling.temperature);
  double u = rng.uniform() * total;
  for (int i = 0; i < k; ++i) {
    if (u < weight[i]) return order[i];
    u -= weight[i];
  }
  return order[k - 1];  // u landed on the rounding error of the sum
}

std::vector<int32_t> continue_tokens(Model& model, std::vector<int32_t> context, int max_new, int end_token,
                                     const Sampling& sampling, Rng& rng, bool kv_cache,
                                     const std::function<void(int32_t)>& on_token) {
  const std::size_t T = model.config().seq_len;
  const int V = model.config().vocab_size;
  // A position past the sequence's end has no effect on the earlier ones (causal attention): pad with
  // any valid token.
  std::vector<int32_t> window(T, 0);
  std::vector<float> logits(V);
  std::vector<int32_t> generated;
  model.reset_cache();
  for (int k = 0; k < max_new; ++k) {
    const std::size_t n = std::min(context.size(), T);
    const int32_t* last = context.data() + context.size() - n;
    if (!kv_cache) {
      std::copy(last, last + n, window.begin());
      model.logits_at(window.data(), static_cast<int>(n) - 1, logits.data());
    } else if (context.size() <= T && static_cast<std::size_t>(model.cached()) + 1 == n) {
      model.decode(last + n - 1, 1, logits.data());
    } else {
      // The prompt, or a window that has slid: every token of it now sits at another position, and the
      // dropped first token changed every later key and value, so the window runs again from position 0.
      model.reset_cache();
      model.decode(last, static_cast<int>(n), logits.data());
    }
    const int32_t next = sample_token(logits.data(), V, sampling, rng);
    if (next == end_token) break;
    context.push_back(next);
    generated.push_back(next);
    if (on_token) on_token(next);
  }
  return generated;
}

int run_generate(const Config& cfg) {
  if (cfg.model.init.empty())
    throw InputError("--mode generate needs --model.init (a checkpoint or an exported model)");
  const Tokenizer tok = Tokenizer::load_dir(tokenizer_dir_for(cfg));
  const LoadedModel loaded = load_model(cfg, cfg.device, 0);
  Model& model = *loaded.model;
  const ModelConfig& mc = model.config();
  check_tokenizer_fits(tok, mc.vocab_size, tokenizer_dir_for(cfg));

  std::vector<int32_t> context;
  // A document starts with the tokenizer's <s> (Llama); GPT-2's has none and starts one after <|endoftext|>,
  // which an empty prompt continues from.
  if (tok.bos() >= 0) context.push_back(tok.bos());
  for (int id : tok.encode(cfg.generate.prompt)) context.push_back(id);
  if (context.empty()) context.push_back(tok.eot());

  Rng rng(derive_seed(cfg.seed, "generate"));
  const Sampling sampling{cfg.generate.temperature, cfg.generate.top_k};
  std::fputs(cfg.generate.prompt.c_str(), stdout);
  std::fflush(stdout);
  const auto start = std::chrono::steady_clock::now();
  // Tokens are printed as they come: what each adds to the decoded sequence (its bytes may end inside a UTF-8
  // character that the next token completes). The whole sequence is decoded, not the token alone: Llama's
  // decode drops the space its encoder put first, which a lone token's "▁word" would lose.
  std::vector<int> sequence(context.begin(), context.end());
  std::size_t shown = tok.decode(sequence).size();
  const std::vector<int32_t> generated =
      continue_tokens(model, context, cfg.generate.max_new_tokens, tok.eot(), sampling, rng,
                      cfg.generate.kv_cache, [&](int32_t id) {
                        sequence.push_back(id);
                        const std::string text = tok.decode(sequence);
                        if (text.size() > shown)
                          std::fwrite(text.data() + shown, 1, text.size() - shown, stdout);
                        shown = std::max(shown, text.size());
                        std::fflush(stdout);
                      });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::fputc('\n', stdout);
  std::fprintf(stderr, "generated %zu tokens in %.2f s (%.1f tokens/s), %s, seed %llu\n", generated.size(),
               seconds, static_cast<double>(generated.size()) / std::max(seconds, 1e-9),
               sampling.temperature == 0.0
                   ? "greedy"
                   : strprintf("temperature %g, top_k %d", sampling.temperature, sampling.top_k).c_str(),
               static_cast<unsigned long long>(cfg.seed));
  return 0;
}

}  // namespace lrllm

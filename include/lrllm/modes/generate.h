// Text generation: --mode generate, and the greedy answers of --mode eval.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "lrllm/core/config.h"
#include "lrllm/core/rng.h"
#include "lrllm/model/model.h"

namespace lrllm {

struct Sampling {
  double temperature = 0.0;  // 0: greedy
  int top_k = 0;             // 0: the whole vocabulary
};

// The next token from a row of logits: the most likely one (the lowest id among equals) when greedy, else a
// draw from softmax(logits / temperature) over the top_k most likely tokens.
int sample_token(const float* logits, int vocab, const Sampling& sampling, Rng& rng);

// Continues `context` by up to max_new tokens, stopping at end_token (which is not returned), and returns
// the new tokens; on_token sees each one as it comes. The model sees the last seq_len tokens, so output may
// run past the context window. With kv_cache each token costs one position (Model::decode) until the
// sequence passes seq_len; without, every token reruns the window (Model::logits_at). Both give the same
// tokens.
std::vector<int32_t> continue_tokens(Model& model, std::vector<int32_t> context, int max_new, int end_token,
                                     const Sampling& sampling, Rng& rng, bool kv_cache,
                                     const std::function<void(int32_t)>& on_token = {});

// --mode generate: prints the prompt and its continuation from model.init (a checkpoint or an export).
int run_generate(const Config& cfg);

}  // namespace lrllm

// --mode import: a Hugging Face GPT2LMHeadModel or LlamaForCausalLM folder (config.json, model.safetensors or
// shards with model.safetensors.index.json, the tokenizer) into an lrllm model file that every other mode
// reads, with its tokenizer beside it (docs/design.md, safetensors and Hugging Face folders).
#pragma once

#include "lrllm/core/config.h"

namespace lrllm {

int run_import(const Config& cfg);

}  // namespace lrllm

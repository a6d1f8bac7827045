// Llama as Hugging Face transformers stores it (LlamaForCausalLM; docs/design.md, safetensors and Hugging
// Face folders): its config.json, tensor names and PEFT modules, behind the mapping interface of
// io/hf_model.h.
#pragma once

#include "lrllm/io/hf_model.h"

namespace lrllm {

const HfArch& hf_llama();

}  // namespace lrllm

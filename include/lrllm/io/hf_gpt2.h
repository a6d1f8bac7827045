// GPT-2 as Hugging Face transformers stores it (GPT2LMHeadModel; docs/design.md, safetensors and Hugging Face
// folders): its config.json, tensor names and PEFT modules, behind the mapping interface of io/hf_model.h.
#pragma once

#include "lrllm/io/hf_model.h"

namespace lrllm {

const HfArch& hf_gpt2();

}  // namespace lrllm

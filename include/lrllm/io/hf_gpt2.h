// GPT-2 as Hugging Face transformers stores it (GPT2LMHeadModel; docs/design.md, safetensors and Hugging Face
// folders): its config.json and tensor names, and how each tensor maps to lrllm's. Shared by --mode import
// and --mode export --export.format hf.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "lrllm/core/config.h"

namespace lrllm {

// One tensor of GPT2LMHeadModel and the lrllm tensor it holds.
struct HfTensor {
  std::string hf;     // without the "transformer." prefix: "h.0.attn.c_attn.weight"
  std::string lrllm;  // the name under /model: "h.0/attn/qkv/W"
  std::vector<int64_t> hf_shape;
  // A Conv1D weight, stored [in, out]: lrllm's nn.Linear orientation [out, in] is its transpose.
  bool transposed = false;
};

// Every tensor of a dense GPT-2 of shape m, in lrllm's order (wte, wpe, the blocks, ln_f); the tied lm_head
// is wte and is not listed.
std::vector<HfTensor> gpt2_hf_tensors(const ModelConfig& m);

// The model config.json describes; InputError (naming the file) for a config that is not GPT-2 or that
// lrllm's GPT-2 does not compute the same way (layer_norm_epsilon other than 1e-5, an activation other than
// gelu_new).
ModelConfig gpt2_config_from_hf(const std::string& path);

// config.json for a GPT2LMHeadModel of shape m whose tensors are stored as torch_dtype.
std::string gpt2_hf_config_json(const ModelConfig& m, const std::string& torch_dtype);

// out[c][r] = in[r][c] for a rows x cols matrix.
void transpose(const float* in, float* out, int64_t rows, int64_t cols);

}  // namespace lrllm

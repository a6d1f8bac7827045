#include "lrllm/io/hf_gpt2.h"

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "lrllm/core/common.h"
#include "lrllm/model/architecture.h"

namespace lrllm {

std::vector<HfTensor> gpt2_hf_tensors(const ModelConfig& m) {
  const int64_t C = m.d_model, F = m.ff(), V = m.vocab_size, T = m.seq_len;
  std::vector<HfTensor> out = {{"wte.weight", "wte", {V, C}, false}, {"wpe.weight", "wpe", {T, C}, false}};
  for (int l = 0; l < m.n_layer; ++l) {
    const std::string hf = "h." + std::to_string(l) + ".", ours = "h." + std::to_string(l) + "/";
    // modeling_gpt2.py: c_attn, c_proj, c_fc and the MLP's c_proj are Conv1D(nf = out, nx = in), whose weight
    // is [in, out] (y = x W + b); c_attn's output splits into q, k, v in that order, as lrllm's fused qkv.
    const std::vector<HfTensor> block = {
        {hf + "ln_1.weight", ours + "ln_1/w", {C}, false},
        {hf + "ln_1.bias", ours + "ln_1/b", {C}, false},
        {hf + "attn.c_attn.weight", ours + "attn/qkv/W", {C, 3 * C}, true},
        {hf + "attn.c_attn.bias", ours + "attn/qkv/b", {3 * C}, false},
        {hf + "attn.c_proj.weight", ours + "attn/proj/W", {C, C}, true},
        {hf + "attn.c_proj.bias", ours + "attn/proj/b", {C}, false},
        {hf + "ln_2.weight", ours + "ln_2/w", {C}, false},
        {hf + "ln_2.bias", ours + "ln_2/b", {C}, false},
        {hf + "mlp.c_fc.weight", ours + "mlp/fc/W", {C, F}, true},
        {hf + "mlp.c_fc.bias", ours + "mlp/fc/b", {F}, false},
        {hf + "mlp.c_proj.weight", ours + "mlp/proj/W", {F, C}, true},
        {hf + "mlp.c_proj.bias", ours + "mlp/proj/b", {C}, false},
    };
    out.insert(out.end(), block.begin(), block.end());
  }
  out.push_back({"ln_f.weight", "ln_f/w", {C}, false});
  out.push_back({"ln_f.bias", "ln_f/b", {C}, false});
  return out;
}

namespace {

int positive_field(const std::string& path, const nlohmann::json& j, const char* name) {
  if (!j.contains(name)) throw InputError(path + ": has no " + name);
  const nlohmann::json& v = j[name];
  if (!v.is_number_integer() || v.get<int64_t>() < 1 || v.get<int64_t>() > (int64_t{1} << 30))
    throw InputError(path + ": " + name + " is " + v.dump() + ", not a positive integer");
  return static_cast<int>(v.get<int64_t>());
}

// A boolean field that must hold its default for lrllm to compute what transformers computes.
void require_flag(const std::string& path, const nlohmann::json& j, const char* name, bool expected) {
  if (!j.contains(name) || j[name].is_null()) return;
  if (!j[name].is_boolean() || j[name].get<bool>() != expected)
    throw InputError(path + ": " + name + " is " + j[name].dump() + ", lrllm's GPT-2 computes " + name +
                     " = " + (expected ? "true" : "false") + " only");
}

}  // namespace

ModelConfig gpt2_config_from_hf(const std::string& path) {
  nlohmann::json j;
  {
    std::ifstream in(path);
    if (!in) throw InputError(path + ": cannot open the file (a Hugging Face model folder has config.json)");
    try {
      j = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
      throw InputError(path + ": not valid JSON: " + e.what());
    }
  }
  if (!j.is_object()) throw InputError(path + ": not a JSON object");
  if (j.contains("model_type") && j["model_type"] != "gpt2")
    throw InputError(path + ": model_type " + j["model_type"].dump() + " is not supported (gpt2 is)");
  if (j.contains("architectures") && j["architectures"].is_array()) {
    bool gpt2 = false;
    for (const nlohmann::json& a : j["architectures"]) gpt2 |= a == "GPT2LMHeadModel" || a == "GPT2Model";
    if (!gpt2)
      throw InputError(path + ": architectures " + j["architectures"].dump() +
                       " names no GPT2LMHeadModel (the model lrllm imports)");
  }
  ModelConfig m;
  m.arch = "gpt2";
  m.d_model = positive_field(path, j, "n_embd");
  m.n_layer = positive_field(path, j, "n_layer");
  m.n_head = positive_field(path, j, "n_head");
  m.vocab_size = positive_field(path, j, "vocab_size");
  // n_positions sizes wpe in modeling_gpt2.py; n_ctx is its older name.
  m.seq_len = positive_field(path, j, j.contains("n_positions") ? "n_positions" : "n_ctx");
  m.d_ff = j.contains("n_inner") && !j["n_inner"].is_null() ? positive_field(path, j, "n_inner") : 0;
  // transformers' defaults where a field is absent.
  const nlohmann::json eps = j.value("layer_norm_epsilon", nlohmann::json(1e-5));
  if (!eps.is_number() || std::abs(eps.get<double>() - 1e-5) > 1e-5 * 1e-9)
    throw InputError(path + ": layer_norm_epsilon is " + eps.dump() + ", but lrllm's LayerNorm uses 1e-5");
  const nlohmann::json act = j.value("activation_function", nlohmann::json("gelu_new"));
  if (act != "gelu_new")
    throw InputError(path + ": activation_function is " + act.dump() +
                     ", but lrllm's GPT-2 computes gelu_new (the tanh approximation) only");
  require_flag(path, j, "scale_attn_weights", true);
  require_flag(path, j, "scale_attn_by_inverse_layer_idx", false);
  require_flag(path, j, "add_cross_attention", false);
  require_flag(path, j, "tie_word_embeddings", true);
  try {
    validate_model_config(m);
  } catch (const InputError& e) {
    throw InputError(path + ": describes no model lrllm can run: " + e.what());
  }
  return m;
}

std::string gpt2_hf_config_json(const ModelConfig& m, const std::string& torch_dtype) {
  nlohmann::ordered_json j;
  j["architectures"] = {"GPT2LMHeadModel"};
  j["model_type"] = "gpt2";
  j["vocab_size"] = m.vocab_size;
  j["n_positions"] = m.seq_len;
  j["n_ctx"] = m.seq_len;
  j["n_embd"] = m.d_model;
  j["n_layer"] = m.n_layer;
  j["n_head"] = m.n_head;
  j["n_inner"] = m.d_ff > 0 && m.d_ff != 4 * m.d_model ? nlohmann::ordered_json(m.d_ff) : nullptr;
  j["activation_function"] = "gelu_new";
  j["layer_norm_epsilon"] = 1e-5;
  j["tie_word_embeddings"] = true;
  // GPT-2's <|endoftext|> (50256) begins and ends documents, where the vocabulary has it.
  if (m.vocab_size > 50256) {
    j["bos_token_id"] = 50256;
    j["eos_token_id"] = 50256;
  }
  j["torch_dtype"] = torch_dtype;
  return j.dump(2) + "\n";
}

void transpose(const float* in, float* out, int64_t rows, int64_t cols) {
  constexpr int64_t kTile = 32;  // tiles keep both sides' accesses within a few cache lines
#pragma omp parallel for collapse(2)
  for (int64_t r0 = 0; r0 < rows; r0 += kTile)
    for (int64_t c0 = 0; c0 < cols; c0 += kTile)
      for (int64_t r = r0; r < std::min(rows, r0 + kTile); ++r)
        for (int64_t c = c0; c < std::min(cols, c0 + kTile); ++c) out[c * rows + r] = in[r * cols + c];
}

}  // namespace lrllm

#include "lrllm/io/hf_llama.h"

#include <cmath>

#include "lrllm/core/common.h"
#include "lrllm/io/safetensors.h"
#include "lrllm/model/architecture.h"

namespace lrllm {
namespace {

// A real field of config.json, def where it is absent or null (LlamaConfig's defaults).
double real_field(const std::string& path, const nlohmann::json& j, const char* name, double def,
                  bool positive) {
  if (!j.contains(name) || j[name].is_null()) return def;
  if (!j[name].is_number() || !std::isfinite(j[name].get<double>()) ||
      (positive && j[name].get<double>() <= 0))
    throw InputError(path + ": " + name + " is " + j[name].dump() + ", not a positive number");
  return j[name].get<double>();
}

// The conventions of transformers' models/llama/modeling_llama.py (LlamaForCausalLM): LlamaModel under
// "model." (embed_tokens, layers.N, norm) and lm_head beside it; each LlamaDecoderLayer has input_layernorm,
// self_attn (q_proj, k_proj, v_proj, o_proj) post_attention_layernorm and mlp (gate_proj, up_proj,
// down_proj), every linear an nn.Linear whose weight is [out, in], lrllm's orientation. q and k are rotated
// by rotate_half (the pairs i and i + head_dim / 2), as lrllm's rope does, in the layout transformers saves:
// Meta's original checkpoints pair adjacent elements instead, and transformers' convert_llama_weights_to_hf
// permutes q_proj and k_proj rows when it converts them; lrllm expects the HF layout and applies no
// permutation.
class Llama final : public HfArch {
 public:
  const char* arch() const override { return "llama"; }
  const char* hf_class() const override { return "LlamaForCausalLM"; }
  const char* model_type() const override { return "llama"; }

  ModelConfig read_config(const std::string& path, const nlohmann::json& j, bool& tied) const override {
    if (j.contains("architectures") && j["architectures"].is_array()) {
      bool causal = false;
      for (const nlohmann::json& a : j["architectures"]) causal |= a == "LlamaForCausalLM";
      if (!causal)
        throw InputError(path + ": architectures " + j["architectures"].dump() +
                         " names no LlamaForCausalLM (the model lrllm imports)");
    }
    ModelConfig m;
    m.arch = "llama";
    m.d_model = hf_positive_field(path, j, "hidden_size");
    m.d_ff = hf_positive_field(path, j, "intermediate_size");
    m.n_layer = hf_positive_field(path, j, "num_hidden_layers");
    m.n_head = hf_positive_field(path, j, "num_attention_heads");
    m.n_kv_head = j.contains("num_key_value_heads") && !j["num_key_value_heads"].is_null()
                      ? hf_positive_field(path, j, "num_key_value_heads")
                      : m.n_head;
    m.seq_len = hf_positive_field(path, j, "max_position_embeddings");
    m.vocab_size = hf_positive_field(path, j, "vocab_size");
    m.norm_eps = real_field(path, j, "rms_norm_eps", 1e-6, true);
    m.rope_theta = real_field(path, j, "rope_theta", 10000.0, true);
    const nlohmann::json act = j.value("hidden_act", nlohmann::json("silu"));
    if (act != "silu")
      throw InputError(path + ": hidden_act is " + act.dump() +
                       ", but lrllm's Llama computes SwiGLU with silu only");
    if (j.contains("rope_scaling") && !j["rope_scaling"].is_null())
      throw InputError(path + ": rope_scaling is " + j["rope_scaling"].dump() +
                       ", but lrllm's rotary embedding is unscaled (rope_scaling null only)");
    // A head_dim other than hidden_size / heads (newer configs may set it) is a shape lrllm does not have.
    if (j.contains("head_dim") && !j["head_dim"].is_null() &&
        hf_positive_field(path, j, "head_dim") * m.n_head != m.d_model)
      throw InputError(path + ": head_dim " + j["head_dim"].dump() +
                       " is not hidden_size / num_attention_heads, the only head size lrllm's Llama has");
    hf_require_flag(path, j, "attention_bias", false, "Llama");
    hf_require_flag(path, j, "mlp_bias", false, "Llama");
    const nlohmann::json tie = j.value("tie_word_embeddings", nlohmann::json(false));
    if (!tie.is_boolean())
      throw InputError(path + ": tie_word_embeddings is " + tie.dump() + ", not a boolean");
    tied = tie.get<bool>();
    hf_validate(path, m);
    return m;
  }

  std::string config_json(const ModelConfig& m, const std::string& torch_dtype) const override {
    nlohmann::ordered_json j;
    j["architectures"] = {"LlamaForCausalLM"};
    j["model_type"] = "llama";
    j["vocab_size"] = m.vocab_size;
    j["hidden_size"] = m.d_model;
    j["intermediate_size"] = m.ff();
    j["num_hidden_layers"] = m.n_layer;
    j["num_attention_heads"] = m.n_head;
    j["num_key_value_heads"] = m.kv_heads();
    j["max_position_embeddings"] = m.seq_len;
    j["rms_norm_eps"] = m.norm_eps;
    j["rope_theta"] = m.rope_theta;
    j["rope_scaling"] = nullptr;
    j["hidden_act"] = "silu";
    j["attention_bias"] = false;
    j["mlp_bias"] = false;
    j["tie_word_embeddings"] = false;
    // Llama-2's <s> and </s>, where the vocabulary has them (lrllm's Tokenizer: bos 1, eot 2).
    if (m.vocab_size > 2) {
      j["bos_token_id"] = 1;
      j["eos_token_id"] = 2;
    }
    j["torch_dtype"] = torch_dtype;
    return j.dump(2) + "\n";
  }

  std::vector<HfTensor> tensors(const ModelConfig& m, const SafetensorsSet*, bool tied) const override {
    const int64_t C = m.d_model, F = m.ff(), V = m.vocab_size, hd = m.d_model / m.n_head;
    const int64_t q = m.n_head * hd, kv = m.kv_heads() * hd;
    auto whole = [](std::string hf, std::string ours, std::vector<int64_t> shape) {
      return HfTensor{std::move(hf), std::move(ours), shape, false, 0, shape};
    };
    auto part = [](std::string hf, std::string ours, int64_t rows, int64_t cols, int64_t row, int64_t total) {
      return HfTensor{std::move(hf), std::move(ours), {rows, cols}, false, row, {total, cols}};
    };
    std::vector<HfTensor> out = {
        whole("model.embed_tokens.weight", "wte", {V, C}),
        whole(tied ? "model.embed_tokens.weight" : "lm_head.weight", "lm_head", {V, C})};
    for (int l = 0; l < m.n_layer; ++l) {
      const std::string hf = "model.layers." + std::to_string(l) + ".", ours = block_name(l) + "/";
      // lrllm fuses q|k|v (rows q, then k, then v) and gate|up (rows gate, then up) into one GEMM each.
      const std::vector<HfTensor> block = {
          whole(hf + "input_layernorm.weight", ours + "ln_1/w", {C}),
          part(hf + "self_attn.q_proj.weight", ours + "attn/qkv/W", q, C, 0, q + 2 * kv),
          part(hf + "self_attn.k_proj.weight", ours + "attn/qkv/W", kv, C, q, q + 2 * kv),
          part(hf + "self_attn.v_proj.weight", ours + "attn/qkv/W", kv, C, q + kv, q + 2 * kv),
          whole(hf + "self_attn.o_proj.weight", ours + "attn/proj/W", {C, q}),
          whole(hf + "post_attention_layernorm.weight", ours + "ln_2/w", {C}),
          part(hf + "mlp.gate_proj.weight", ours + "mlp/fc/W", F, C, 0, 2 * F),
          part(hf + "mlp.up_proj.weight", ours + "mlp/fc/W", F, C, F, 2 * F),
          whole(hf + "mlp.down_proj.weight", ours + "mlp/proj/W", {C, F}),
      };
      out.insert(out.end(), block.begin(), block.end());
    }
    out.push_back(whole("model.norm.weight", "ln_f/w", {C}));
    return out;
  }

  void check_extra(const std::string& name, const SafetensorsSet& set, const ModelConfig& m) const override {
    // Older transformers saved each attention's rotary_emb.inv_freq buffer: computed from rope_theta, no
    // weight.
    const std::string head = "model.layers.", tail = ".self_attn.rotary_emb.inv_freq";
    if (name.starts_with(head) && name.ends_with(tail) && name.size() > head.size() + tail.size()) {
      const std::string layer = name.substr(head.size(), name.size() - head.size() - tail.size());
      if (layer.size() <= 6 && layer.find_first_not_of("0123456789") == std::string::npos &&
          std::stoi(layer) < m.n_layer)
        return;
    }
    // With tie_word_embeddings the lm_head is embed_tokens; a stored copy must be that matrix.
    if (name == "lm_head.weight") {
      if (set.find(name)->shape != std::vector<int64_t>{m.vocab_size, m.d_model} ||
          set.read(name) != set.read("model.embed_tokens.weight"))
        throw InputError(set.file_of(name) +
                         ": lm_head.weight differs from model.embed_tokens.weight, but config.json has "
                         "tie_word_embeddings true");
      return;
    }
    throw InputError(set.file_of(name) + ": tensor " + name +
                     " is not part of the LlamaForCausalLM that config.json describes");
  }

  std::string peft_block(int l) const override {
    return "base_model.model.model.layers." + std::to_string(l) + ".";
  }

  std::vector<HfModule> peft_modules(const ModelConfig& m) const override {
    const int64_t hd = m.d_model / m.n_head, q = m.n_head * hd, kv = m.kv_heads() * hd, F = m.ff();
    return {{LinearSite::qkv, "self_attn.q_proj", 0, q},
            {LinearSite::qkv, "self_attn.k_proj", q, kv},
            {LinearSite::qkv, "self_attn.v_proj", q + kv, kv},
            {LinearSite::proj, "self_attn.o_proj", 0, m.d_model},
            {LinearSite::fc, "mlp.gate_proj", 0, F},
            {LinearSite::fc, "mlp.up_proj", F, F},
            {LinearSite::mlp_proj, "mlp.down_proj", 0, m.d_model}};
  }

  bool fan_in_fan_out() const override { return false; }
};

}  // namespace

const HfArch& hf_llama() {
  static const Llama mapping;
  return mapping;
}

}  // namespace lrllm

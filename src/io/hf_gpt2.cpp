#include "lrllm/io/hf_gpt2.h"

#include <cmath>

#include "lrllm/core/common.h"
#include "lrllm/io/safetensors.h"
#include "lrllm/model/architecture.h"

namespace lrllm {
namespace {

class Gpt2 final : public HfArch {
 public:
  const char* arch() const override { return "gpt2"; }
  const char* hf_class() const override { return "GPT2LMHeadModel"; }
  const char* model_type() const override { return "gpt2"; }

  ModelConfig read_config(const std::string& path, const nlohmann::json& j, bool& tied) const override {
    if (j.contains("architectures") && j["architectures"].is_array()) {
      bool gpt2 = false;
      for (const nlohmann::json& a : j["architectures"]) gpt2 |= a == "GPT2LMHeadModel" || a == "GPT2Model";
      if (!gpt2)
        throw InputError(path + ": architectures " + j["architectures"].dump() +
                         " names no GPT2LMHeadModel (the model lrllm imports)");
    }
    ModelConfig m;
    m.arch = "gpt2";
    m.d_model = hf_positive_field(path, j, "n_embd");
    m.n_layer = hf_positive_field(path, j, "n_layer");
    m.n_head = hf_positive_field(path, j, "n_head");
    m.vocab_size = hf_positive_field(path, j, "vocab_size");
    // n_positions sizes wpe in modeling_gpt2.py; n_ctx is its older name.
    m.seq_len = hf_positive_field(path, j, j.contains("n_positions") ? "n_positions" : "n_ctx");
    m.d_ff = j.contains("n_inner") && !j["n_inner"].is_null() ? hf_positive_field(path, j, "n_inner") : 0;
    // transformers' defaults where a field is absent.
    const nlohmann::json eps = j.value("layer_norm_epsilon", nlohmann::json(1e-5));
    if (!eps.is_number() || std::abs(eps.get<double>() - 1e-5) > 1e-5 * 1e-9)
      throw InputError(path + ": layer_norm_epsilon is " + eps.dump() + ", but lrllm's LayerNorm uses 1e-5");
    const nlohmann::json act = j.value("activation_function", nlohmann::json("gelu_new"));
    if (act != "gelu_new")
      throw InputError(path + ": activation_function is " + act.dump() +
                       ", but lrllm's GPT-2 computes gelu_new (the tanh approximation) only");
    hf_require_flag(path, j, "scale_attn_weights", true, "GPT-2");
    hf_require_flag(path, j, "scale_attn_by_inverse_layer_idx", false, "GPT-2");
    hf_require_flag(path, j, "add_cross_attention", false, "GPT-2");
    hf_require_flag(path, j, "tie_word_embeddings", true, "GPT-2");
    hf_validate(path, m);
    tied = true;
    return m;
  }

  std::string config_json(const ModelConfig& m, const std::string& torch_dtype) const override {
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

  std::vector<HfTensor> tensors(const ModelConfig& m, const SafetensorsSet* set, bool) const override {
    // Saved from GPT2LMHeadModel the names start with "transformer.", from GPT2Model they do not.
    const std::string p = set == nullptr || set->find("transformer.wte.weight") ? "transformer." : "";
    const int64_t C = m.d_model, F = m.ff(), V = m.vocab_size, T = m.seq_len;
    auto whole = [](std::string hf, std::string ours, std::vector<int64_t> shape) {
      return HfTensor{std::move(hf), std::move(ours), shape, false, 0, shape};
    };
    auto conv1d = [](std::string hf, std::string ours, int64_t in, int64_t out) {
      return HfTensor{std::move(hf), std::move(ours), {in, out}, true, 0, {out, in}};
    };
    std::vector<HfTensor> out = {whole(p + "wte.weight", "wte", {V, C}),
                                 whole(p + "wpe.weight", "wpe", {T, C})};
    for (int l = 0; l < m.n_layer; ++l) {
      const std::string hf = p + "h." + std::to_string(l) + ".", ours = block_name(l) + "/";
      // modeling_gpt2.py: c_attn, c_proj, c_fc and the MLP's c_proj are Conv1D(nf = out, nx = in), whose
      // weight is [in, out] (y = x W + b); c_attn's output splits into q, k, v in that order, as lrllm's
      // fused qkv.
      const std::vector<HfTensor> block = {
          whole(hf + "ln_1.weight", ours + "ln_1/w", {C}),
          whole(hf + "ln_1.bias", ours + "ln_1/b", {C}),
          conv1d(hf + "attn.c_attn.weight", ours + "attn/qkv/W", C, 3 * C),
          whole(hf + "attn.c_attn.bias", ours + "attn/qkv/b", {3 * C}),
          conv1d(hf + "attn.c_proj.weight", ours + "attn/proj/W", C, C),
          whole(hf + "attn.c_proj.bias", ours + "attn/proj/b", {C}),
          whole(hf + "ln_2.weight", ours + "ln_2/w", {C}),
          whole(hf + "ln_2.bias", ours + "ln_2/b", {C}),
          conv1d(hf + "mlp.c_fc.weight", ours + "mlp/fc/W", C, F),
          whole(hf + "mlp.c_fc.bias", ours + "mlp/fc/b", {F}),
          conv1d(hf + "mlp.c_proj.weight", ours + "mlp/proj/W", F, C),
          whole(hf + "mlp.c_proj.bias", ours + "mlp/proj/b", {C}),
      };
      out.insert(out.end(), block.begin(), block.end());
    }
    out.push_back(whole(p + "ln_f.weight", "ln_f/w", {C}));
    out.push_back(whole(p + "ln_f.bias", "ln_f/b", {C}));
    return out;
  }

  void check_extra(const std::string& name, const SafetensorsSet& set, const ModelConfig& m) const override {
    const std::string p = set.find("transformer.wte.weight") ? "transformer." : "";
    // The causal-mask buffers h.N.attn.bias and h.N.attn.masked_bias that files saved by older transformers
    // carry (modeling_gpt2.py registers them as buffers): no weights.
    const std::string head = p + "h.";
    for (const std::string tail : {".attn.bias", ".attn.masked_bias"}) {
      if (!name.starts_with(head) || !name.ends_with(tail) || name.size() <= head.size() + tail.size())
        continue;
      const std::string layer = name.substr(head.size(), name.size() - head.size() - tail.size());
      if (layer.size() <= 6 && layer.find_first_not_of("0123456789") == std::string::npos &&
          std::stoi(layer) < m.n_layer)
        return;
    }
    if (name != "lm_head.weight")
      throw InputError(set.file_of(name) + ": tensor " + name +
                       " is not part of the GPT2LMHeadModel that config.json describes");
    // lrllm's output layer is the embedding, as in modeling_gpt2.py with tie_word_embeddings: a stored
    // lm_head is accepted when it is that same matrix.
    if (set.find(name)->shape != std::vector<int64_t>{m.vocab_size, m.d_model} ||
        set.read(name) != set.read(p + "wte.weight"))
      throw InputError(set.file_of(name) +
                       ": lm_head.weight differs from wte.weight; lrllm ties the output layer to the "
                       "embedding, so an untied model cannot be imported");
  }

  std::string peft_block(int l) const override {
    return "base_model.model.transformer.h." + std::to_string(l) + ".";
  }

  std::vector<HfModule> peft_modules(const ModelConfig& m) const override {
    const int64_t C = m.d_model;
    return {{LinearSite::qkv, "attn.c_attn", 0, 3 * C},
            {LinearSite::proj, "attn.c_proj", 0, C},
            {LinearSite::fc, "mlp.c_fc", 0, m.ff()},
            {LinearSite::mlp_proj, "mlp.c_proj", 0, C}};
  }

  // PEFT's lora_A and lora_B over a Conv1D are nn.Linear [r, in] and [out, r] as over any layer; the flag
  // makes it transpose B A before adding it to the [in, out] weight.
  bool fan_in_fan_out() const override { return true; }
};

}  // namespace

const HfArch& hf_gpt2() {
  static const Gpt2 mapping;
  return mapping;
}

}  // namespace lrllm

#include "lrllm/model/architecture.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "lrllm/core/common.h"

namespace lrllm {

namespace {

void require(bool ok, const std::string& message) {
  if (!ok) throw InputError(message);
}

// The widest layer and the longest sequence: the model's int arithmetic (3 * d_model, seq_len * d_model, ...)
// stays far from overflow below them, whatever the memory of a machine allows.
constexpr int64_t kMaxWidth = 1 << 24;
constexpr int64_t kMaxLayers = 1 << 16;

// Linear weights of one site as factorized (r > 0: A [r, in] and B [out, r]) or dense.
double linear_weights(const LinearSpec& s, int rank) {
  const double in = static_cast<double>(s.in), out = static_cast<double>(s.out);
  return rank > 0 ? rank * (in + out) : in * out;
}

}  // namespace

// GPT-2 (Radford et al. 2019, as in llm.c): pre-LayerNorm blocks of causal attention and a tanh-GELU MLP,
// learned positions, every linear layer with a bias, the lm_head tied to wte.
// Llama (Touvron et al. 2023, as transformers' modeling_llama.py): pre-RMSNorm blocks of causal attention
// with rotary positions and grouped-query heads, and a SwiGLU MLP; no biases, no position table, an untied
// lm_head. Its q, k and v projections are one fused site (rows q, then k, then v) and its gate and up
// projections another (rows gate, then up): one GEMM each, and the four sites of GPT-2's options.
Architecture describe_architecture(const ModelConfig& cfg) {
  // In 64 bits: validation describes a shape before it has bounded d_model.
  const int64_t C = cfg.d_model, F = cfg.d_ff > 0 ? cfg.d_ff : 4 * C;
  Architecture a;
  a.token_embedding = "wte";
  if (cfg.llama()) {
    const int64_t kv = cfg.n_head > 0 ? C / cfg.n_head * cfg.kv_heads() : 0;
    a.output_head = "lm_head";
    a.rms_norm = true;
    a.block_norms = {{"ln_1", false, LinearSite::qkv}, {"ln_2", false, LinearSite::fc}};
    a.sites = {{LinearSite::qkv, "attn/qkv", C, C + 2 * kv, true, {C, kv, kv}, false},
               {LinearSite::proj, "attn/proj", C, C, false, {}, false},
               {LinearSite::fc, "mlp/fc", C, 2 * F, true, {F, F}, false},
               {LinearSite::mlp_proj, "mlp/proj", F, C, false, {}, false}};
    a.final_norm = {"ln_f", false};
  } else {
    a.position_embedding = "wpe";
    a.block_norms = {{"ln_1", true, LinearSite::qkv}, {"ln_2", true, LinearSite::fc}};
    a.sites = {{LinearSite::qkv, "attn/qkv", C, 3 * C, true, {C, C, C}},
               {LinearSite::proj, "attn/proj", C, C, false, {}},
               {LinearSite::fc, "mlp/fc", C, F, true, {}},
               {LinearSite::mlp_proj, "mlp/proj", F, C, false, {}}};
    a.final_norm = {"ln_f"};
  }
  // 6 FLOPs a weight (forward 2, backward 4), and causal attention's 6 T C (scores and their use).
  a.block_flops = 6.0 * static_cast<double>(cfg.seq_len) * static_cast<double>(C);
  for (const LinearSpec& s : a.sites) a.block_flops += 6 * linear_weights(s, cfg.lowrank_rank[int(s.site)]);
  a.head_flops = 6.0 * cfg.vocab_size * static_cast<double>(C);
  return a;
}

std::string block_name(int l) {
  return "h." + std::to_string(l);
}

std::vector<std::pair<std::string, std::size_t>> non_linear_tensors(const ModelConfig& cfg) {
  const Architecture a = describe_architecture(cfg);
  const std::size_t C = cfg.d_model;
  std::vector<std::pair<std::string, std::size_t>> out = {{a.token_embedding, cfg.vocab_size * C}};
  if (!a.position_embedding.empty()) out.emplace_back(a.position_embedding, cfg.seq_len * C);
  if (!a.output_head.empty()) out.emplace_back(a.output_head, cfg.vocab_size * C);
  auto norm = [&](const std::string& prefix, const NormSpec& n) {
    out.emplace_back(prefix + n.path + "/w", C);
    if (n.shift) out.emplace_back(prefix + n.path + "/b", C);
  };
  for (int l = 0; l < cfg.n_layer; ++l) {
    const std::string h = block_name(l) + "/";
    for (const NormSpec& n : a.block_norms) norm(h, n);
    for (const LinearSpec& s : a.sites)
      if (s.bias) out.emplace_back(h + s.path + "/b", s.out);
  }
  norm("", a.final_norm);
  return out;
}

ParamCounts count_params(const ModelConfig& cfg) {
  const Architecture a = describe_architecture(cfg);
  ParamCounts c;
  for (const auto& [name, size] : non_linear_tensors(cfg)) {
    const bool table = name == a.token_embedding || name == a.position_embedding || name == a.output_head;
    (table ? c.embedding : c.other) += size;
  }
  for (const LinearSpec& s : a.sites) {
    const int r = cfg.lowrank_rank[int(s.site)];
    (r > 0 ? c.linear_lowrank : c.linear_dense) +=
        cfg.n_layer * static_cast<std::size_t>(linear_weights(s, r));
    c.lora += cfg.n_layer * static_cast<std::size_t>(cfg.lora_rank[int(s.site)] * (s.in + s.out));
  }
  c.tokens = cfg.trainable_tokens.size() * cfg.d_model;
  return c;
}

std::size_t dense_linear_params(const ModelConfig& cfg) {
  double dense = 0;
  for (const LinearSpec& s : describe_architecture(cfg).sites) dense += linear_weights(s, 0);
  return static_cast<std::size_t>(cfg.n_layer * dense);
}

void print_param_counts(const ParamCounts& c, const ModelConfig& cfg) {
  const std::size_t dense_equiv = dense_linear_params(cfg);
  const std::size_t linear = c.linear_dense + c.linear_lowrank;
  std::printf(
      "parameters: total %zu = embeddings %zu + linear %zu (dense %zu, low-rank %zu) + norms/biases %zu\n",
      c.total(), c.embedding, linear, c.linear_dense, c.linear_lowrank, c.other);
  std::printf("linear layers: %zu parameters against %zu dense: compression %.2fx\n", linear, dense_equiv,
              linear > 0 ? static_cast<double>(dense_equiv) / linear : 0.0);
  if (c.lora > 0 && c.saved == 0)
    std::printf("LoRA adapters: %zu trainable parameters (the base is frozen)\n", c.lora);
  else if (c.lora > 0)
    std::printf("LoRA adapters: %zu trainable parameters, and %zu of the base's (%s) trained beside them\n",
                c.lora, c.saved, cfg.lora_modules.c_str());
  if (c.tokens > 0)
    std::printf("trainable tokens: %zu wte rows (embedding and lm_head), %zu parameters\n",
                cfg.trainable_tokens.size(), c.tokens);
}

double model_weight_bytes(const ModelConfig& m) {
  // In double: the sizes may be any int, and an estimate needs no exact product.
  const Architecture a = describe_architecture(m);
  const double C = m.d_model, T = m.seq_len, V = m.vocab_size, L = m.n_layer;
  // A quantized base stores a byte (int8) or half of one (nf4) per weight.
  const double base = quant_bits(m.quant) > 0 ? quant_bits(m.quant) / 8.0 : 4.0;
  double block = 4.0 * C * 2 * static_cast<double>(a.block_norms.size());  // norms, with their shifts
  for (const LinearSpec& s : a.sites) {
    const int site = static_cast<int>(s.site);
    block += base * linear_weights(s, m.lowrank_rank[site]) +
             4.0 * (m.lora_rank[site] * static_cast<double>(s.in + s.out) + (s.bias ? s.out : 0));
  }
  const double positions = a.position_embedding.empty() ? 0 : 4 * T * C;
  const double tables = a.output_head.empty() ? 1 : 2;
  return L * block + tables * (m.quant_embedding ? base : 4.0) * V * C + positions;
}

double model_memory_estimate(const ModelConfig& m) {
  const Architecture a = describe_architecture(m);
  const double C = m.d_model, F = m.d_ff > 0 ? m.d_ff : 4.0 * m.d_model, T = m.seq_len, V = m.vocab_size,
               L = m.n_layer;
  const double qkv = static_cast<double>(a.sites[static_cast<int>(LinearSite::qkv)].out),
               fc = static_cast<double>(a.sites[static_cast<int>(LinearSite::fc)].out);
  // One sequence's activations the way that needs least (block recomputation; a forward pass alone keeps no
  // more): each block's input, one block's working set (norm outputs, the fused qkv and MLP outputs, the MLP
  // hidden layer), one T x T score buffer of attention, one row of logits. A lower bound, so that a model
  // that runs with recomputation, as a 7B model's finetuning on 24 GB does, is never refused.
  const double activations = 4 * (T * ((L + 1) * C + 4 * C + qkv + fc + F) + T * T + V);
  return model_weight_bytes(m) + activations;
}

void validate_model_config(const ModelConfig& m, bool must_fit_memory) {
  require(is_arch(m.arch), "--model.arch must be gpt2 or llama, not '" + m.arch + "'");
  require(m.n_layer >= 1, "--model.n_layer must be >= 1");
  require(m.n_head >= 1, "--model.n_head must be >= 1");
  require(m.d_model >= 1 && m.d_model % m.n_head == 0,
          strprintf("--model.d_model must be a positive multiple of n_head (d_model %d, n_head %d)",
                    m.d_model, m.n_head));
  if (m.llama()) {
    require(m.n_kv_head >= 0 && m.kv_heads() <= m.n_head && m.n_head % m.kv_heads() == 0,
            strprintf("--model.n_kv_head %d must divide n_head %d (grouped-query attention)", m.n_kv_head,
                      m.n_head));
    require(m.d_model / m.n_head % 2 == 0,
            strprintf("the head size d_model / n_head = %d must be even: rotary embeddings turn pairs",
                      m.d_model / m.n_head));
    require(std::isfinite(m.norm_eps) && m.norm_eps > 0 && m.norm_eps < 1,
            "--model.norm_eps must be in (0, 1)");
    require(std::isfinite(m.rope_theta) && m.rope_theta > 1, "--model.rope_theta must be > 1");
    require(
        m.trainable_tokens.empty(),
        "--lora.trainable_tokens needs a tied embedding (GPT-2's); llama's lm_head is its own tensor: train "
        "it with --lora.modules_to_save lm_head");
  } else {
    require(m.n_kv_head == 0 || m.n_kv_head == m.n_head,
            "--model.n_kv_head is llama's: GPT-2 has as many key/value heads as heads");
  }
  require(m.d_ff >= 0, "--model.d_ff must be >= 0");
  require(m.seq_len >= 1, "--model.seq_len must be >= 1");
  // Token files store uint16 ids.
  require(m.vocab_size >= 1 && m.vocab_size <= 65536, "--model.vocab_size must be between 1 and 65536");
  require(m.quant_block >= 1 && m.quant_block <= 4096, "--quant.block must be between 1 and 4096");
  require(!m.any_lora() || (std::isfinite(m.lora_alpha) && m.lora_alpha > 0), "--lora.alpha must be > 0");
  require(m.lora_dropout >= 0 && m.lora_dropout < 1, "--lora.dropout must be in [0, 1)");
  require(m.trainable_tokens.empty() || m.any_lora(),
          "--lora.trainable_tokens needs LoRA adapters (without them every wte row trains)");
  for (std::size_t i = 0; i < m.trainable_tokens.size(); ++i) {
    const int32_t id = m.trainable_tokens[i];
    require(id >= 0 && id < m.vocab_size,
            strprintf("trainable token %d is outside the vocabulary of %d", id, m.vocab_size));
    require(i == 0 || id > m.trainable_tokens[i - 1], "trainable tokens must be distinct");
  }
  for (const LinearSpec& s : describe_architecture(m).sites) {
    const int r = m.lowrank_rank[int(s.site)], lr = m.lora_rank[int(s.site)];
    const char* name = site_name(s.site);
    const int64_t limit = std::min(s.in, s.out);
    require(r >= 0, std::string("low-rank rank of ") + name + " must be >= 0");
    require(r < limit,
            strprintf("low-rank rank %d of %s is not below min(in, out) = %lld: it would not compress", r,
                      name, static_cast<long long>(limit)));
    require(lr >= 0 && lr < limit, strprintf("LoRA rank %d of %s is not below min(in, out) = %lld", lr, name,
                                             static_cast<long long>(limit)));
  }
  const int64_t C = m.d_model, F = m.d_ff > 0 ? m.d_ff : 4 * C;
  const double need = model_memory_estimate(m);
  const double have = static_cast<double>(physical_memory_bytes());
  require(
      !must_fit_memory || need <= have,
      strprintf("the model (n_layer %d, n_head %d, d_model %d, d_ff %lld, seq_len %d, vocab_size %d) needs "
                "at least %.3g GB (its weights and one sequence's activations), more than this machine's "
                "%.3g GB of memory",
                m.n_layer, m.n_head, m.d_model, static_cast<long long>(F), m.seq_len, m.vocab_size,
                need / 1e9, have / 1e9));
  require(C <= kMaxWidth && F <= kMaxWidth && m.seq_len <= kMaxWidth && m.n_layer <= kMaxLayers,
          strprintf("the model's sizes must stay below d_model, d_ff, seq_len %lld and n_layer %lld",
                    static_cast<long long>(kMaxWidth), static_cast<long long>(kMaxLayers)));
}

}  // namespace lrllm

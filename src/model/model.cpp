#include "lrllm/model/model.h"

#include <fnmatch.h>
#include <algorithm>

#include <cmath>
#include <cstdio>
#include <sstream>

#include "lrllm/core/common.h"
#include "lrllm/core/rng.h"

namespace lrllm {

// What one block keeps from forward for its backward.
struct Model::Acts {
  float *ln1, *ln1_mean, *ln1_rstd, *qkv, *qkv_mid, *attn, *attn_lse, *proj_mid, *x_mid;
  float *ln2, *ln2_mean, *ln2_rstd, *fc, *fc_mid, *gelu, *mlp_mid;
  float* lora_mid[kNumSites];
  float* lora_mask[kNumSites];  // LoRA dropout masks, 0 or 1/(1-p) [N, in]
};

namespace {

// Rows of a quantized weight dequantized at a time: a few MB of scratch, large enough for an efficient GEMM.
constexpr std::size_t kTileFloats = std::size_t{1} << 20;

}  // namespace

Model::Model(const ModelConfig& cfg, Backend& backend, bool recompute, const ModelShard& shard)
    : cfg_(cfg),
      be_(backend),
      recompute_(recompute),
      row_len_(cfg.seq_len),
      first_layer_(shard.first_layer),
      end_layer_(shard.end_layer < 0 ? cfg.n_layer : shard.end_layer),
      tp_(shard.tp),
      arch_(describe_architecture(cfg)) {
  const int C = cfg.d_model;
  const Architecture& arch = arch_;
  // With adapters, or with quantized storage, the base is frozen: everything but the adapters goes to the
  // frozen table. (A quantized model without adapters trains nothing; it serves evaluation and generation.)
  const bool quantized = cfg.quant != QuantKind::none;
  const bool frozen = cfg.any_lora() || quantized;
  ParamTable& base = frozen ? frozen_table_ : table_;
  // Tensors every rank of a tensor-parallel group holds whole: the first rank's copy is the one that counts.
  const bool tp_replica = shard.tp > 1 && shard.tp_part > 0;
  // Base tensors named by lora.modules_to_save train in full beside the adapters.
  auto trains = [&](const std::string& name) { return frozen && trains_beside_adapters(cfg, name); };
  auto add = [&](const std::string& name, std::vector<int64_t> shape, TensorRole role, bool replica = false) {
    TensorSplit whole;
    whole.replica = tp_replica || replica;
    const bool full = trains(name);
    return TensorRef{(full ? table_ : base).add(name, std::move(shape), role, whole), frozen && !full};
  };
  // Megatron's split: column-parallel sites split their output (in groups: the fused qkv's q, k and v),
  // row-parallel ones their input, and project into the residual stream.
  auto linear = [&](const std::string& block, const LinearSpec& s) {
    const int site = static_cast<int>(s.site);
    const std::string prefix = block + "/" + s.path;
    LinearTp tp;
    if (shard.tp > 1)
      tp = {s.column ? TpMode::column : TpMode::row, shard.tp_part, shard.tp, s.groups, shard.tp_group};
    return Linear(table_, base, frozen, prefix, static_cast<int>(s.in), static_cast<int>(s.out),
                  cfg.lowrank_rank[site], cfg.lora_rank[site], cfg.lora_alpha, quantized,
                  trains(prefix + "/b"), tp, !s.column, s.bias, cfg.lowrank_silu);
  };
  auto norm = [&](const std::string& prefix, const NormSpec& n) {
    Norm out;
    out.w = add(prefix + n.path + "/w", {C}, TensorRole::norm_gain);
    if (n.shift) out.b = add(prefix + n.path + "/b", {C}, TensorRole::norm_shift);
    return out;
  };
  auto add_quantized = [&](const std::string& name, std::vector<int64_t> shape) {
    quantized_.push_back(QuantizedEntry{name, std::move(shape), {}});
    return &quantized_.back().tensor;
  };
  // A [vocab, d_model] table: the token embedding, or an untied lm_head; quantized with quant.embedding.
  const bool quantized_tables = quantized && cfg.quant_embedding;
  auto table = [&](const std::string& name, TensorRef& ref, QuantizedTensor*& q, bool replica) {
    if (quantized_tables)
      q = add_quantized(name, {cfg.vocab_size, C});
    else
      ref = add(name, {cfg.vocab_size, C}, TensorRole::embedding, replica);
  };
  // A tied wte is on the first stage and, as the lm_head's copy, on the last; the first stage's is saved.
  const bool tied = arch.output_head.empty();
  if (first_stage() || (tied && last_stage())) table(arch.token_embedding, wte_, wte_q_, !first_stage());
  if (!cfg.trainable_tokens.empty() && (first_stage() || last_stage())) {
    // Trains whatever the base's wte is stored as (float32 or quantized): a delta over the chosen rows.
    TensorSplit whole;
    whole.replica = tp_replica || !first_stage();
    const int64_t k = static_cast<int64_t>(cfg.trainable_tokens.size());
    wte_delta_ = TensorRef{table_.add(kTokenDeltaName, {k, C}, TensorRole::token_delta, whole), false};
    delta_row_.assign(cfg.vocab_size, -1);
    for (int32_t j = 0; j < k; ++j) delta_row_[cfg.trainable_tokens[j]] = j;
  }
  if (first_stage() && !arch.position_embedding.empty())
    wpe_ = add(arch.position_embedding, {cfg.seq_len, C}, TensorRole::embedding);
  for (int l = first_layer_; l < end_layer_; ++l) {
    const std::string h = block_name(l);
    // Tensors are registered in the order the block applies them: a norm just before the site it feeds.
    Block b;
    for (const LinearSpec& s : arch.sites) {
      for (const NormSpec& n : arch.block_norms)
        if (n.feeds == s.site) b.norms.push_back(norm(h + "/", n));
      b.sites.push_back(linear(h, s));
    }
    blocks_.push_back(std::move(b));
  }
  if (last_stage()) lnf_ = norm("", arch.final_norm);
  if (last_stage() && tied) {
    head_ = wte_;
    head_q_ = wte_q_;
  } else if (last_stage()) {
    table(arch.output_head, head_, head_q_, false);
  }
  for (int s = 0; s < kNumSites; ++s) {
    max_rank_ = std::max({max_rank_, cfg.lowrank_rank[s], cfg.lora_rank[s]});
  }
  params_ = be_.alloc(table_.total());
  frozen_ = be_.alloc(frozen_table_.total());
  sink_ = be_.alloc(2 * static_cast<std::size_t>(C));
  if (quantized) {
    for (Block& b : blocks_) {
      for (Linear& lin : b.sites) {
        const std::string& p = lin.prefix();
        if (lin.lowrank())
          lin.set_quantized(add_quantized(p + "/A", {lin.rank(), lin.in()}),
                            add_quantized(p + "/B", {lin.out(), lin.rank()}));
        else
          lin.set_quantized(add_quantized(p + "/W", {lin.out(), lin.in()}));
      }
    }
    int64_t widest = 1;
    for (const QuantizedEntry& e : quantized_) widest = std::max(widest, e.shape.at(1));
    tile_floats_ = std::max<std::size_t>(kTileFloats, widest);
    tile_ = be_.alloc(tile_floats_);
    if (wte_q_) {
      std::vector<int32_t> ids(tile_floats_ / C);
      for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>(i);
      tile_ids_ = be_.alloc_int(ids.size());
      be_.to_device(tile_ids_, ids.data(), ids.size() * sizeof(int32_t));
    }
  }
}

Model::~Model() {
  for (void* p : act_allocs_) be_.release(p);
  for (Acts* a : all_acts_) delete a;
  for (float* p : {params_, grads_, frozen_, sink_, tile_})
    if (p != nullptr) be_.release(p);
  for (float* p : kv_cache_) be_.release(p);
  if (tile_ids_ != nullptr) be_.release(tile_ids_);
}

Linear& Model::layer(int block, LinearSite site) {
  return blocks_.at(block - first_layer_).sites.at(static_cast<int>(site));
}

QuantizedTensor* Model::find_quantized(const std::string& name) {
  for (QuantizedEntry& e : quantized_)
    if (e.name == name) return &e.tensor;
  return nullptr;
}

void Model::init_random(uint64_t seed) {
  init_tables(seed, true);
}

void Model::init_adapters(uint64_t seed) {
  init_tables(seed, false);
}

void Model::init_tables(uint64_t seed, bool frozen_too) {
  // lowrank.init product_std draws a factor from its site's in + out (init_values): A [r, in] finds out from
  // its B [out, r], and B in from A.
  auto product_std_fan = [&](const ParamTable& table, const TensorInfo& t) -> int64_t {
    const bool factor = t.role == TensorRole::factor || t.role == TensorRole::residual_factor;
    if (!factor || !cfg_.lowrank_product_std) return 0;
    const std::string site = t.name.substr(0, t.name.rfind('/'));
    return table.at(site + "/A").full_shape[1] + table.at(site + "/B").full_shape[0];
  };
  auto fill = [&](const ParamTable& table, float* device) {
    std::vector<float> host(table.total(), 0.0f);
    for (const TensorInfo& t : table.tensors()) {
      // The full tensor is drawn and this rank's part taken, so every parallel layout starts from the same
      // weights.
      const std::vector<float> full =
          init_values(seed, t.name, t.role, t.full_shape, cfg_.n_layer, product_std_fan(table, t));
      extract_part(t, full.data(), host.data() + t.offset);
    }
    be_.to_device(device, host.data(), host.size() * sizeof(float));
  };
  fill(table_, params_);
  if (frozen_too) fill(frozen_table_, frozen_);
}

std::vector<float> init_values(uint64_t seed, const std::string& name, TensorRole role,
                               const std::vector<int64_t>& full_shape, int n_layer, int64_t product_std_fan) {
  std::size_t n = full_shape.empty() ? 0 : 1;
  for (int64_t d : full_shape) n *= static_cast<std::size_t>(d);
  if (role == TensorRole::norm_gain) return std::vector<float>(n, 1.0f);
  std::vector<float> v(n, 0.0f);
  if (role == TensorRole::norm_shift || role == TensorRole::bias || role == TensorRole::lora_b ||
      role == TensorRole::token_delta)
    return v;
  const uint64_t s = derive_seed(seed, name);
  const std::ptrdiff_t count = static_cast<std::ptrdiff_t>(n);
  if (role == TensorRole::lora_a) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(full_shape[1]));
#pragma omp parallel for schedule(static)
    for (std::ptrdiff_t i = 0; i < count; ++i)
      v[i] = static_cast<float>((2.0 * uniform_of(splitmix64_at(s, i)) - 1.0) * bound);
    return v;
  }
  const bool residual = role == TensorRole::residual_weight || role == TensorRole::residual_factor;
  double std_dev = residual ? 0.02 / std::sqrt(2.0 * n_layer) : 0.02;
  const bool factor = role == TensorRole::factor || role == TensorRole::residual_factor;
  if (factor && product_std_fan > 0) {
    // CoLA's rule (its reference code, ColaM*ProjLayer): each factor N(0, r^-1/4 (in+out)^-1/4), so B A has
    // variance r * (r^-1/2 (in+out)^-1/2) = 1/(in+out), half of Xavier's 2/(in+out), for residual
    // projections as for the others. A is [r, in], B [out, r].
    const double r = static_cast<double>(full_shape[name.ends_with("/A") ? 0 : 1]);
    std_dev = std::pow(r, -0.25) * std::pow(static_cast<double>(product_std_fan), -0.25);
  } else if (factor) {
    // A product of two factors of rank r has variance r * sa^2 * sb^2; match the dense layer's. A is [r, in]
    // and B [out, r], and r is below in and out (validate_model_config).
    const double r = static_cast<double>(std::min(full_shape[0], full_shape[1]));
    std_dev = std::sqrt(std_dev / std::sqrt(r));
  }
  // Each value from its own position of the sequence: a 7B model's 6.7e9 draws split over the threads.
#pragma omp parallel for schedule(static)
  for (std::ptrdiff_t i = 0; i < count; ++i) v[i] = static_cast<float>(normal_at(s, i) * std_dev);
  return v;
}

float* Model::grads() {
  if (grads_ == nullptr) grads_ = be_.alloc(table_.total());
  return grads_;
}

void Model::zero_grads() {
  be_.fill(grads(), table_.total(), 0.0f);
}

namespace {

std::vector<std::string> saved_module_patterns(const ModelConfig& cfg) {
  std::vector<std::string> patterns;
  std::stringstream list(cfg.lora_modules);
  for (std::string p; std::getline(list, p, ',');)
    if (!p.empty()) patterns.push_back(p);
  return patterns;
}

// A pattern names a tensor or a module above it: it matches the name or one of its prefixes ending before a
// '/', with '*' matching within one path component.
bool names(const std::string& pattern, const std::string& tensor) {
  for (std::size_t end = tensor.find('/'); end != std::string::npos; end = tensor.find('/', end + 1))
    if (fnmatch(pattern.c_str(), tensor.substr(0, end).c_str(), FNM_PATHNAME) == 0) return true;
  return fnmatch(pattern.c_str(), tensor.c_str(), FNM_PATHNAME) == 0;
}

}  // namespace

bool trains_beside_adapters(const ModelConfig& cfg, const std::string& tensor) {
  const std::vector<std::string> patterns = saved_module_patterns(cfg);
  return std::any_of(patterns.begin(), patterns.end(),
                     [&](const std::string& p) { return names(p, tensor); });
}

void validate_saved_modules(const ModelConfig& cfg) {
  const auto savable = non_linear_tensors(cfg);
  for (const std::string& p : saved_module_patterns(cfg)) {
    if (std::none_of(savable.begin(), savable.end(), [&](const auto& t) { return names(p, t.first); }))
      throw InputError(
          "--lora.modules_to_save: '" + p +
          "' names no LayerNorm, bias or embedding of the model (e.g. ln_f, h.*/ln_1, h.0/mlp/fc/b, "
          "wpe, wte)");
  }
  if (!cfg.trainable_tokens.empty() && trains_beside_adapters(cfg, "wte"))
    throw InputError("--lora.trainable_tokens: wte trains in full already (--lora.modules_to_save)");
  if (cfg.quant != QuantKind::none && cfg.quant_embedding && trains_beside_adapters(cfg, "wte"))
    throw InputError(
        "--lora.modules_to_save: wte is stored quantized here; train it with --quant.embedding false");
}

ParamCounts Model::param_counts() const {
  ParamCounts c = count_params(cfg_);
  if (cfg_.any_lora())
    for (const auto& [name, size] : non_linear_tensors(cfg_))
      if (trains_beside_adapters(cfg_, name)) c.saved += size;
  return c;
}

int classifier_row_limit(int vocab_size) {
  const int by_budget =
      static_cast<int>(std::max<std::size_t>(1, kClassifierBudgetBytes / (sizeof(float) * vocab_size)));
  return std::min(kClassifierMaxRows, by_budget);
}

int classifier_chunk_rows(int N, int vocab_size) {
  const int limit = classifier_row_limit(vocab_size);
  const int chunks = (N + limit - 1) / limit;
  return (N + chunks - 1) / chunks;
}

MemoryBytes Model::memory() const {
  MemoryBytes m;
  m.params_trainable = table_.total() * sizeof(float);
  m.params_frozen = frozen_table_.total() * sizeof(float);
  for (const QuantizedEntry& e : quantized_) m.params_quantized += e.tensor.bytes();
  m.params = m.params_trainable + m.params_frozen + m.params_quantized;
  m.grads = m.params_trainable;
  m.activations = act_bytes_ + tile_floats_ * sizeof(float);
  return m;
}

void Model::limit_rows(int T) {
  LRLLM_CHECK(T >= 1 && T <= cfg_.seq_len && acts_batch_ == 0, "Model::limit_rows",
              "a row length outside 1..seq_len, or activations already reserved");
  row_len_ = T;
}

void Model::reserve(int B, int slots) {
  if (B <= acts_batch_ && slots <= static_cast<int>(slots_.size())) return;
  B = std::max(B, acts_batch_);
  slots = std::max<int>(slots, slots_.size());
  for (void* p : act_allocs_) be_.release(p);
  act_allocs_.clear();
  for (Acts* a : all_acts_) delete a;
  all_acts_.clear();
  slots_.assign(slots, Slot{});
  act_bytes_ = 0;

  // Under tensor parallelism the attention and MLP inner widths are this rank's slice.
  const std::size_t N = static_cast<std::size_t>(B) * row_len_;
  const std::size_t C = cfg_.d_model, T = row_len_;
  const std::size_t Cl = C / tp_, Fl = cfg_.ff() / tp_, NHl = cfg_.n_head / tp_;
  // The fused sites' outputs (this rank's slice): qkv, and fc (GPT-2's hidden layer, Llama's gate and up).
  const std::size_t qkv_width = arch_.sites[static_cast<int>(LinearSite::qkv)].out / tp_;
  const std::size_t fc_width = arch_.sites[static_cast<int>(LinearSite::fc)].out / tp_;
  const int local_layers = end_layer_ - first_layer_;
  auto f = [&](std::size_t n) {
    float* p = be_.alloc(n);
    act_allocs_.push_back(p);
    act_bytes_ += n * sizeof(float);
    return p;
  };
  auto make_acts = [&] {
    Acts* a = new Acts;
    all_acts_.push_back(a);
    a->ln1 = f(N * C);
    a->ln1_mean = f(N);
    a->ln1_rstd = f(N);
    a->qkv = f(N * qkv_width);
    a->qkv_mid = f(N * std::max(1, cfg_.lowrank_rank[0]));
    a->attn = f(N * Cl);
    a->attn_lse = f(B * NHl * T);
    a->proj_mid = f(N * std::max(1, cfg_.lowrank_rank[1]));
    a->x_mid = f(N * C);
    a->ln2 = f(N * C);
    a->ln2_mean = f(N);
    a->ln2_rstd = f(N);
    a->fc = f(N * fc_width);
    a->fc_mid = f(N * std::max(1, cfg_.lowrank_rank[2]));
    a->gelu = f(N * Fl);
    a->mlp_mid = f(N * std::max(1, cfg_.lowrank_rank[3]));
    const std::size_t site_in[kNumSites] = {C, C, C, Fl};
    for (int site = 0; site < kNumSites; ++site) {
      const bool adapted = cfg_.lora_rank[site] > 0;
      a->lora_mid[site] = adapted ? f(N * cfg_.lora_rank[site]) : nullptr;
      a->lora_mask[site] = adapted && cfg_.lora_dropout > 0 ? f(N * site_in[site]) : nullptr;
    }
    return a;
  };
  // Recomputation rebuilds a block's activations just before its backward: one set serves every block and
  // slot.
  Acts* shared = recompute_ ? make_acts() : nullptr;
  for (Slot& slot : slots_) {
    for (int l = 0; l < local_layers; ++l) slot.acts.push_back(recompute_ ? shared : make_acts());
    for (int l = 0; l <= local_layers; ++l) slot.resid.push_back(f(N * C));
    slot.dresid = f(N * C);
    slot.tokens = be_.alloc_int(N);
    act_allocs_.push_back(slot.tokens);
    slot.positions_buffer = be_.alloc_int(N);
    act_allocs_.push_back(slot.positions_buffer);
  }
  if (last_stage()) {
    lnf_out_ = f(N * C);
    lnf_mean_ = f(N);
    lnf_rstd_ = f(N);
    // A smaller batch later (a short validation batch) splits into chunks no larger than this.
    logits_ = f(std::min<std::size_t>(N, classifier_row_limit(cfg_.vocab_size)) * cfg_.vocab_size);
    losses_ = f(N);
    head_rows_ = f(N * C);
    head_targets_ = be_.alloc_int(N);
    act_allocs_.push_back(head_targets_);
  }
  residual_branch_ = f(N * C);
  ln1_out_grad_ = f(N * C);
  qkv_grad_ = f(N * qkv_width);
  mlp_hidden_grad_ = f(N * Fl);
  fc_out_grad_ = f(N * fc_width);
  scratch_rank_ = f(N * std::max(1, max_rank_));
  if (cfg_.lora_dropout > 0) scratch_lora_x_ = f(N * std::max(C, Fl));
  if (cfg_.lowrank_silu) scratch_act_ = f(N * std::max(1, max_rank_));
  acts_batch_ = B;
}

Model::Acts& Model::acts_for(int slot, int l) {
  return *slots_[slot].acts[l - first_layer_];
}

const float* Model::lora_mask(int l, int site, Acts& a, int in, int N) {
  if (!training_ || a.lora_mask[site] == nullptr) return nullptr;
  be_.dropout_mask(
      a.lora_mask[site], static_cast<std::size_t>(N) * in, cfg_.lora_dropout,
      derive_seed(dropout_seed_, block_name(l) + "/" + site_name(static_cast<LinearSite>(site))));
  return a.lora_mask[site];
}

void Model::norm_forward(float* out, float* mean, float* rstd, const float* x, const Norm& n, int N) {
  const int C = cfg_.d_model;
  if (arch_.rms_norm)
    be_.rmsnorm_forward(out, rstd, x, at(n.w), N, C, static_cast<float>(cfg_.norm_eps));
  else
    be_.layernorm_forward(out, mean, rstd, x, at(n.w), at(n.b), N, C);
}

void Model::norm_backward(float* dx, const Norm& n, const float* dout, const float* x, const float* mean,
                          const float* rstd, int N) {
  const int C = cfg_.d_model;
  if (arch_.rms_norm)
    be_.rmsnorm_backward(dx, n.w.frozen ? nullptr : grads_ + n.w.offset, dout, x, at(n.w), rstd, N, C);
  else
    be_.layernorm_backward(dx, grad_or_sink(n.w, 0), grad_or_sink(n.b, 1), dout, x, at(n.w), mean, rstd, N,
                           C);
}

void Model::block_forward(int l, Acts& a, const float* x, float* x_out, const Slot& s) {
  if (cfg_.llama())
    llama_block_forward(l, a, x, x_out, s);
  else
    gpt2_block_forward(l, a, x, x_out, s);
}

void Model::block_backward(int l, Acts& a, const float* x, float* dresid, const Slot& s) {
  if (cfg_.llama())
    llama_block_backward(l, a, x, dresid, s);
  else
    gpt2_block_backward(l, a, x, dresid, s);
}

void Model::gpt2_block_forward(int l, Acts& a, const float* x, float* x_out, const Slot& s) {
  const Block& blk = blocks_[l - first_layer_];
  const Norm &ln1 = blk.norms[0], &ln2 = blk.norms[1];
  const Linear &qkv = blk.site(LinearSite::qkv), &proj = blk.site(LinearSite::proj),
               &fc = blk.site(LinearSite::fc), &mlp_proj = blk.site(LinearSite::mlp_proj);
  const int N = s.B * s.T, C = cfg_.d_model, F = cfg_.ff() / tp_, Cl = C / tp_;
  const WeightBuffers w = buffers();
  const LinearScratch ls = linear_scratch();
  be_.layernorm_forward(a.ln1, a.ln1_mean, a.ln1_rstd, x, at(ln1.w), at(ln1.b), N, C);
  qkv.forward(be_, w, ls, a.ln1, a.qkv, a.qkv_mid, a.lora_mid[0], lora_mask(l, 0, a, C, N), N);
  attend(l, a, s);
  proj.forward(be_, w, ls, a.attn, residual_branch_, a.proj_mid, a.lora_mid[1], lora_mask(l, 1, a, Cl, N), N);
  be_.add(a.x_mid, x, residual_branch_, static_cast<std::size_t>(N) * C);
  be_.layernorm_forward(a.ln2, a.ln2_mean, a.ln2_rstd, a.x_mid, at(ln2.w), at(ln2.b), N, C);
  fc.forward(be_, w, ls, a.ln2, a.fc, a.fc_mid, a.lora_mid[2], lora_mask(l, 2, a, C, N), N);
  be_.gelu_forward(a.gelu, a.fc, static_cast<std::size_t>(N) * F);
  mlp_proj.forward(be_, w, ls, a.gelu, residual_branch_, a.mlp_mid, a.lora_mid[3], lora_mask(l, 3, a, F, N),
                   N);
  be_.add(x_out, a.x_mid, residual_branch_, static_cast<std::size_t>(N) * C);
}

// dresid holds d(loss)/d(block output) on entry and d(loss)/d(block input) on return.
void Model::gpt2_block_backward(int l, Acts& a, const float* x, float* dresid, const Slot& s) {
  const Block& blk = blocks_[l - first_layer_];
  const Norm &ln1 = blk.norms[0], &ln2 = blk.norms[1];
  const Linear &qkv = blk.site(LinearSite::qkv), &proj = blk.site(LinearSite::proj),
               &fc = blk.site(LinearSite::fc), &mlp_proj = blk.site(LinearSite::mlp_proj);
  const int N = s.B * s.T, C = cfg_.d_model, F = cfg_.ff() / tp_, Cl = C / tp_, NHl = cfg_.n_head / tp_;
  const WeightBuffers w = buffers();
  const LinearScratch ls = linear_scratch();
  const float* mask[kNumSites];
  for (int site = 0; site < kNumSites; ++site) mask[site] = training_ ? a.lora_mask[site] : nullptr;
  mlp_proj.backward(be_, w, ls, a.gelu, a.mlp_mid, a.lora_mid[3], mask[3], dresid, mlp_hidden_grad_, N);
  be_.gelu_backward(fc_out_grad_, a.fc, mlp_hidden_grad_, static_cast<std::size_t>(N) * F);
  fc.backward(be_, w, ls, a.ln2, a.fc_mid, a.lora_mid[2], mask[2], fc_out_grad_, residual_branch_, N);
  be_.layernorm_backward(dresid, grad_or_sink(ln2.w, 0), grad_or_sink(ln2.b, 1), residual_branch_, a.x_mid,
                         at(ln2.w), a.ln2_mean, a.ln2_rstd, N, C);
  proj.backward(be_, w, ls, a.attn, a.proj_mid, a.lora_mid[1], mask[1], dresid, residual_branch_, N);
  be_.attention_backward(qkv_grad_, residual_branch_, a.qkv, a.attn, a.attn_lse, s.B, s.T, Cl, NHl, NHl,
                         s.positions);
  qkv.backward(be_, w, ls, a.ln1, a.qkv_mid, a.lora_mid[0], mask[0], qkv_grad_, ln1_out_grad_, N);
  be_.layernorm_backward(dresid, grad_or_sink(ln1.w, 0), grad_or_sink(ln1.b, 1), ln1_out_grad_, x, at(ln1.w),
                         a.ln1_mean, a.ln1_rstd, N, C);
}

void Model::attend(int l, Acts& a, const Slot& s) {
  const int Cl = cfg_.d_model / tp_, NHl = cfg_.n_head / tp_, NKVl = cfg_.kv_heads() / tp_;
  if (s.past >= 0)
    be_.attention_decode(a.attn, kv_cache_[l - first_layer_], a.qkv, s.T, s.past, Cl, NHl, NKVl);
  else
    be_.attention_forward(a.attn, a.attn_lse, a.qkv, s.B, s.T, Cl, NHl, NKVl, s.positions);
}

void Model::rotate_qk(float* qkv, const Slot& s, bool backward) {
  const int hd = cfg_.d_model / cfg_.n_head, NH = cfg_.n_head / tp_, NKV = cfg_.kv_heads() / tp_;
  const int row = (NH + 2 * NKV) * hd;
  const float theta = static_cast<float>(cfg_.rope_theta);
  for (const auto& [first, heads] : {std::pair{0, NH}, std::pair{NH * hd, NKV}}) {
    if (backward)
      be_.rope_backward(qkv + first, s.B, s.T, heads, hd, row, s.positions, theta);
    else
      be_.rope_forward(qkv + first, s.B, s.T, heads, hd, row, s.positions, theta);
  }
}

// modeling_llama.py's decoder layer: x + o(attention(rope(q), rope(k), v)) over RMSNorm(x), then
// + down(silu(gate) * up) over RMSNorm of that. The activations kept: ln1/ln2 (the norms' outputs) and their
// rstd, qkv after the rotation (what attention read), fc = [gate | up] and gelu = their SwiGLU product.
void Model::llama_block_forward(int l, Acts& a, const float* x, float* x_out, const Slot& s) {
  const Block& blk = blocks_[l - first_layer_];
  const Norm &ln1 = blk.norms[0], &ln2 = blk.norms[1];
  const Linear &qkv = blk.site(LinearSite::qkv), &proj = blk.site(LinearSite::proj),
               &fc = blk.site(LinearSite::fc), &mlp_proj = blk.site(LinearSite::mlp_proj);
  const int N = s.B * s.T, C = cfg_.d_model, F = cfg_.ff() / tp_, Cl = C / tp_;
  const WeightBuffers w = buffers();
  const LinearScratch ls = linear_scratch();
  norm_forward(a.ln1, a.ln1_mean, a.ln1_rstd, x, ln1, N);
  qkv.forward(be_, w, ls, a.ln1, a.qkv, a.qkv_mid, a.lora_mid[0], lora_mask(l, 0, a, C, N), N);
  rotate_qk(a.qkv, s, false);
  attend(l, a, s);
  proj.forward(be_, w, ls, a.attn, residual_branch_, a.proj_mid, a.lora_mid[1], lora_mask(l, 1, a, Cl, N), N);
  be_.add(a.x_mid, x, residual_branch_, static_cast<std::size_t>(N) * C);
  norm_forward(a.ln2, a.ln2_mean, a.ln2_rstd, a.x_mid, ln2, N);
  fc.forward(be_, w, ls, a.ln2, a.fc, a.fc_mid, a.lora_mid[2], lora_mask(l, 2, a, C, N), N);
  be_.swiglu_forward(a.gelu, a.fc, N, F);
  mlp_proj.forward(be_, w, ls, a.gelu, residual_branch_, a.mlp_mid, a.lora_mid[3], lora_mask(l, 3, a, F, N),
                   N);
  be_.add(x_out, a.x_mid, residual_branch_, static_cast<std::size_t>(N) * C);
}

void Model::llama_block_backward(int l, Acts& a, const float* x, float* dresid, const Slot& s) {
  const Block& blk = blocks_[l - first_layer_];
  const Norm &ln1 = blk.norms[0], &ln2 = blk.norms[1];
  const Linear &qkv = blk.site(LinearSite::qkv), &proj = blk.site(LinearSite::proj),
               &fc = blk.site(LinearSite::fc), &mlp_proj = blk.site(LinearSite::mlp_proj);
  const int N = s.B * s.T, C = cfg_.d_model, F = cfg_.ff() / tp_, Cl = C / tp_, NHl = cfg_.n_head / tp_,
            NKVl = cfg_.kv_heads() / tp_;
  const WeightBuffers w = buffers();
  const LinearScratch ls = linear_scratch();
  const float* mask[kNumSites];
  for (int site = 0; site < kNumSites; ++site) mask[site] = training_ ? a.lora_mask[site] : nullptr;
  mlp_proj.backward(be_, w, ls, a.gelu, a.mlp_mid, a.lora_mid[3], mask[3], dresid, mlp_hidden_grad_, N);
  be_.swiglu_backward(fc_out_grad_, a.fc, mlp_hidden_grad_, N, F);
  fc.backward(be_, w, ls, a.ln2, a.fc_mid, a.lora_mid[2], mask[2], fc_out_grad_, residual_branch_, N);
  norm_backward(dresid, ln2, residual_branch_, a.x_mid, a.ln2_mean, a.ln2_rstd, N);
  proj.backward(be_, w, ls, a.attn, a.proj_mid, a.lora_mid[1], mask[1], dresid, residual_branch_, N);
  be_.attention_backward(qkv_grad_, residual_branch_, a.qkv, a.attn, a.attn_lse, s.B, s.T, Cl, NHl, NKVl,
                         s.positions);
  rotate_qk(qkv_grad_, s, true);
  qkv.backward(be_, w, ls, a.ln1, a.qkv_mid, a.lora_mid[0], mask[0], qkv_grad_, ln1_out_grad_, N);
  norm_backward(dresid, ln1, ln1_out_grad_, x, a.ln1_mean, a.ln1_rstd, N);
}

std::vector<std::pair<int, int>> target_runs(const int32_t* targets, int N) {
  std::vector<std::pair<int, int>> runs;
  for (int n = 0; n < N; ++n) {
    if (targets[n] < 0) continue;
    if (!runs.empty() && runs.back().second == n)
      ++runs.back().second;
    else
      runs.emplace_back(n, n + 1);
  }
  return runs;
}

// Final LayerNorm, the tied lm_head and the loss, a chunk of rows at a time so that only one
// [chunk, vocab] logits buffer ever exists. The lm_head runs on the rows with a target only: finetuning's
// loss falls on the answer, a few rows in a hundred, and the lm_head is most of a small model's compute.
// Those rows are gathered into head_rows_ (runs of consecutive rows: one copy per answer); when every row has
// a target (pretraining) they are used in place. With a gradient, dx receives d(loss)/d(final residual).
double Model::classifier(const float* x, const int32_t* host_targets, float* dx, int N, float grad_scale,
                         int normalizer) {
  const int C = cfg_.d_model, V = cfg_.vocab_size;
  const std::size_t row = C;
  norm_forward(lnf_out_, lnf_mean_, lnf_rstd_, x, lnf_, N);
  const std::vector<std::pair<int, int>> runs = target_runs(host_targets, N);
  int M = 0;
  for (const auto& [begin, end] : runs) M += end - begin;
  const bool gathered = M < N;
  std::vector<int32_t> targets(host_targets, host_targets + N);
  if (gathered) {
    targets.clear();
    int m = 0;
    for (const auto& [begin, end] : runs) {
      be_.copy(head_rows_ + m * row, lnf_out_ + begin * row, (end - begin) * row);
      targets.insert(targets.end(), host_targets + begin, host_targets + end);
      m += end - begin;
    }
  }
  be_.to_device(head_targets_, targets.data(), M * sizeof(int32_t));
  const float* head_in = gathered ? head_rows_ : lnf_out_;
  // The input gradient of the gathered rows goes to dx's first M rows, then to their own rows of
  // residual_branch_.
  float* head_dx = gathered ? dx : residual_branch_;
  const float row_scale = normalizer > 0 ? grad_scale / static_cast<float>(normalizer) : 0.0f;
  const int chunk = M > 0 ? classifier_chunk_rows(M, V) : 1;
  for (int m0 = 0; m0 < M; m0 += chunk) {
    const int rows = std::min(chunk, M - m0);
    const float* xr = head_in + m0 * row;
    lm_head(logits_, xr, rows);
    be_.softmax_xent(losses_ + m0, logits_, head_targets_ + m0, rows, V, row_scale);
    if (grad_scale != 0.0f) {
      lm_head_weight_grad(logits_, xr, rows);
      lm_head_input_grad(head_dx + m0 * row, logits_, rows);
    }
  }
  std::vector<float> losses(M);
  be_.to_host(losses.data(), losses_, M * sizeof(float));
  double sum = 0;
  for (float v : losses) sum += v;
  if (grad_scale != 0.0f) {
    if (gathered) {
      be_.fill(residual_branch_, N * row, 0.0f);
      int m = 0;
      for (const auto& [begin, end] : runs) {
        be_.copy(residual_branch_ + begin * row, head_dx + m * row, (end - begin) * row);
        m += end - begin;
      }
    }
    be_.fill(dx, N * row, 0.0f);
    norm_backward(dx, lnf_, residual_branch_, x, lnf_mean_, lnf_rstd_, N);
  }
  return normalizer > 0 ? sum / normalizer : 0.0;
}

void Model::embed(float* out, const Slot& s, const int32_t* host_tokens) {
  const int C = cfg_.d_model;
  embed_base(out, s, host_tokens);
  if (delta_row_.empty()) return;
  for (std::size_t i = 0; i < static_cast<std::size_t>(s.B) * s.T; ++i)
    if (const int j = delta_row_[host_tokens[i]]; j >= 0)
      be_.add(out + i * C, out + i * C, at(wte_delta_) + static_cast<std::size_t>(j) * C, C);
}

void Model::embed_base(float* out, const Slot& s, const int32_t* host_tokens) {
  const int T = s.T, C = cfg_.d_model;
  if (!wte_q_) {
    be_.embedding_forward(out, s.tokens, at(wte_), position_table(), s.B, T, C, s.positions);
    return;
  }
  // The rows the tokens pick, dequantized into the tile, are embedded with the ids 0, 1, 2, ... of the tile.
  const int per_tile = static_cast<int>(tile_floats_ / C);
  for (int b = 0; b < s.B; ++b)
    for (int t0 = 0; t0 < T; t0 += per_tile) {
      const int rows = std::min(per_tile, T - t0);
      const std::size_t first = static_cast<std::size_t>(b) * T + t0;
      be_.dequantize_rows(tile_, *wte_q_, host_tokens + first, rows);
      // Without positions the tile's rows sit at positions t0 .. t0 + rows - 1.
      const float* wpe = position_table();
      if (wpe != nullptr && s.positions == nullptr) wpe += static_cast<std::size_t>(t0) * C;
      be_.embedding_forward(out + first * C, tile_ids_, tile_, wpe, 1, rows, C,
                            s.positions ? s.positions + first : nullptr);
    }
}

// A trainable token's delta is one more row of the lm_head: logits[:, id] += x delta_j, in the logits'
// column.
void Model::lm_head(float* logits, const float* x, int N) {
  const int C = cfg_.d_model, V = cfg_.vocab_size;
  if (head_q_)
    quantized_matmul(be_, *head_q_, tile_, tile_floats_, x, logits, N);
  else
    be_.matmul(logits, x, at(head_), N, V, C, false, true, 1.0f, 0.0f);
  for (std::size_t j = 0; j < cfg_.trainable_tokens.size(); ++j)
    be_.matmul_strided(logits + cfg_.trainable_tokens[j], x, at(wte_delta_) + j * C, N, 1, C, false, true,
                       1.0f, 1.0f, C, C, V);
}

void Model::lm_head_input_grad(float* dx, const float* dlogits, int N) {
  const int C = cfg_.d_model, V = cfg_.vocab_size;
  if (head_q_)
    quantized_matmul_input_grad(be_, *head_q_, tile_, tile_floats_, dlogits, dx, N);
  else
    be_.matmul(dx, dlogits, at(head_), N, C, V, false, false, 1.0f, 0.0f);
  for (std::size_t j = 0; j < cfg_.trainable_tokens.size(); ++j)
    be_.matmul_strided(dx, dlogits + cfg_.trainable_tokens[j], at(wte_delta_) + j * C, N, C, 1, false, false,
                       1.0f, 1.0f, V, C, C);
}

void Model::lm_head_weight_grad(const float* dlogits, const float* x, int N) {
  const int C = cfg_.d_model, V = cfg_.vocab_size;
  if (!head_q_ && !head_.frozen)
    be_.matmul(grads_ + head_.offset, dlogits, x, V, C, N, true, false, 1.0f, 1.0f);
  for (std::size_t j = 0; j < cfg_.trainable_tokens.size(); ++j)
    be_.matmul_strided(grads_ + wte_delta_.offset + j * C, dlogits + cfg_.trainable_tokens[j], x, 1, C, N,
                       true, false, 1.0f, 1.0f, V, C, C);
}

void Model::logits_at(const int32_t* tokens, int position, float* out) {
  LRLLM_CHECK(first_stage() && last_stage() && tp_ == 1, "Model::logits_at", "needs the whole model");
  reserve(1);
  // Attention is causal: the positions after `position` cannot change its logits, so they are not run.
  const int T = position + 1, C = cfg_.d_model;
  LRLLM_CHECK(position >= 0 && position < row_len_, "Model::logits_at", "position outside the window");
  count_valid(tokens, tokens, T);
  Slot& s = slots_[0];
  s.B = 1;
  s.T = T;
  s.positions = nullptr;
  be_.to_device(s.tokens, tokens, T * sizeof(int32_t));
  embed(s.resid[0], s, tokens);
  for (int l = 0; l < cfg_.n_layer; ++l) block_forward(l, acts_for(0, l), s.resid[l], s.resid[l + 1], s);
  head_logits(s.resid[cfg_.n_layer] + static_cast<std::size_t>(position) * C, out);
}

void Model::head_logits(const float* x, float* out) {
  norm_forward(lnf_out_, lnf_mean_, lnf_rstd_, x, lnf_, 1);
  lm_head(logits_, lnf_out_, 1);
  be_.to_host(out, logits_, cfg_.vocab_size * sizeof(float));
}

// The block forward of the whole model on one row of the n new tokens, at their absolute positions (the
// position table and the rotary embedding read them), with attention over the cache.
void Model::decode(const int32_t* tokens, int n, float* out) {
  LRLLM_CHECK(first_stage() && last_stage() && tp_ == 1, "Model::decode", "needs the whole model");
  LRLLM_CHECK(n > 0 && cached_ + n <= cfg_.seq_len, "Model::decode", "tokens past the window");
  count_valid(tokens, tokens, n);
  reserve(1);
  if (kv_cache_.empty()) {
    const std::size_t width = 2 * static_cast<std::size_t>(cfg_.kv_heads()) * (cfg_.d_model / cfg_.n_head);
    for (int l = 0; l < cfg_.n_layer; ++l) kv_cache_.push_back(be_.alloc(cfg_.seq_len * width));
  }
  std::vector<int32_t> positions(n);
  for (int i = 0; i < n; ++i) positions[i] = cached_ + i;
  Slot& s = slots_[0];
  s.B = 1;
  s.T = n;
  be_.to_device(s.positions_buffer, positions.data(), n * sizeof(int32_t));
  s.positions = s.positions_buffer;
  s.past = cached_;
  be_.to_device(s.tokens, tokens, n * sizeof(int32_t));
  embed(s.resid[0], s, tokens);
  for (int l = 0; l < cfg_.n_layer; ++l) block_forward(l, acts_for(0, l), s.resid[l], s.resid[l + 1], s);
  // The slot serves full forwards again (forward and logits_at set only its rows and positions).
  s.past = -1;
  s.positions = nullptr;
  cached_ += n;
  head_logits(s.resid[cfg_.n_layer] + static_cast<std::size_t>(n - 1) * cfg_.d_model, out);
}

int Model::count_valid(const int32_t* tokens, const int32_t* targets, int N) const {
  int valid = 0;
  for (int i = 0; i < N; ++i) {
    if (tokens[i] < 0 || tokens[i] >= cfg_.vocab_size || targets[i] >= cfg_.vocab_size)
      throw InputError(strprintf("token id %d is outside the model's vocabulary of %d",
                                 std::max(tokens[i], targets[i]), cfg_.vocab_size));
    valid += targets[i] >= 0;
  }
  return valid;
}

double Model::forward_backward(const Batch& batch, float grad_scale) {
  LRLLM_CHECK(first_stage() && last_stage(), "Model::step", "needs every block (use a pipeline)");
  reserve(batch.rows);
  const int valid = count_valid(batch.tokens.data(), batch.targets.data(), batch.rows * batch.T);
  // No valid target: the mean loss is 0 and has no gradient. Running backward anyway would push what
  // softmax_xent leaves in the logits buffer at scale 0 (not a gradient) into the gradients.
  if (valid == 0) grad_scale = 0.0f;
  const double loss = forward(0, batch.tokens.data(), batch.targets.data(), batch.positions_or_null(),
                              batch.rows, batch.T, grad_scale, valid);
  if (grad_scale != 0.0f) backward(0);
  return loss;
}

double Model::forward_backward(const int32_t* tokens, const int32_t* targets, int B, float grad_scale) {
  Batch batch;
  batch.resize(B, cfg_.seq_len);
  std::copy(tokens, tokens + batch.tokens.size(), batch.tokens.begin());
  std::copy(targets, targets + batch.targets.size(), batch.targets.begin());
  return forward_backward(batch, grad_scale);
}

double Model::forward(int slot, const int32_t* tokens, const int32_t* targets, const int32_t* positions,
                      int B, int T, float grad_scale, int normalizer) {
  LRLLM_CHECK(T > 0 && T <= row_len_ && B <= acts_batch_, "Model::forward",
              "rows longer than row_len or more than reserved");
  const int N = B * T;
  Slot& s = slots_.at(slot);
  s.B = B;
  s.T = T;
  s.positions = nullptr;
  if (positions != nullptr) {
    for (int i = 0; i < N; ++i)
      LRLLM_CHECK(positions[i] >= 0 && positions[i] <= i % T, "Model::forward", "a position outside its row");
    be_.to_device(s.positions_buffer, positions, N * sizeof(int32_t));
    s.positions = s.positions_buffer;
  }
  if (grad_scale != 0.0f) grads();  // backward accumulates into them
  if (first_stage()) {
    be_.to_device(s.tokens, tokens, N * sizeof(int32_t));
    embed(s.resid[0], s, tokens);
    if (!delta_row_.empty()) s.host_tokens.assign(tokens, tokens + N);
  }
  for (int l = first_layer_; l < end_layer_; ++l)
    block_forward(l, acts_for(slot, l), s.resid[l - first_layer_], s.resid[l - first_layer_ + 1], s);
  if (!last_stage()) return 0.0;
  return classifier(s.resid.back(), targets, s.dresid, N, grad_scale, normalizer);
}

void Model::backward(int slot) {
  grads();
  Slot& s = slots_.at(slot);
  for (int l = end_layer_ - 1; l >= first_layer_; --l) {
    const float* x = s.resid[l - first_layer_];
    // With recomputation only block inputs were kept: run the block forward again to rebuild its activations.
    if (recompute_) block_forward(l, acts_for(slot, l), x, ln1_out_grad_, s);
    block_backward(l, acts_for(slot, l), x, s.dresid, s);
    if (block_grads_hook_) block_grads_hook_(l);
  }
  // A frozen model stops here: nothing below the first block has a gradient.
  if (!first_stage()) return;
  float* dwte = !wte_q_ && !wte_.frozen ? grads_ + wte_.offset : nullptr;
  float* dwpe = position_table() != nullptr && !wpe_.frozen ? grads_ + wpe_.offset : nullptr;
  if (dwte != nullptr || dwpe != nullptr)
    be_.embedding_backward(dwte, dwpe, s.dresid, s.tokens, s.B, s.T, cfg_.d_model, s.positions);
  const std::size_t C = cfg_.d_model;
  for (std::size_t i = 0; i < s.host_tokens.size(); ++i)
    if (const int j = delta_row_[s.host_tokens[i]]; j >= 0) {
      float* g = grads_ + wte_delta_.offset + j * C;
      be_.add(g, g, s.dresid + i * C, C);
    }
}

float* Model::stage_input(int slot) {
  return slots_.at(slot).resid.front();
}

const float* Model::stage_output(int slot) {
  return slots_.at(slot).resid.back();
}

float* Model::stage_grad(int slot) {
  return slots_.at(slot).dresid;
}

std::pair<std::size_t, std::size_t> Model::block_range(int l) const {
  // A block's trainable tensors are registered together, so they are one contiguous range.
  const std::string prefix = block_name(l) + "/";
  std::size_t begin = table_.total(), end = 0;
  for (const TensorInfo& t : table_.tensors()) {
    if (!t.name.starts_with(prefix)) continue;
    begin = std::min(begin, t.offset);
    end = std::max(end, t.offset + t.size);
  }
  return begin < end ? std::pair{begin, end} : std::pair<std::size_t, std::size_t>{0, 0};
}

}  // namespace lrllm

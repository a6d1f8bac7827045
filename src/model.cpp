#include "lrllm/model.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "lrllm/common.h"
#include "lrllm/rng.h"

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

Model::Model(const ModelConfig& cfg, Backend& backend, bool recompute)
    : cfg_(cfg), be_(backend), recompute_(recompute) {
  const int C = cfg.d_model, F = cfg.ff();
  // With adapters, or with quantized storage, the base is frozen: everything but the adapters goes to the
  // frozen table. (A quantized model without adapters trains nothing; it serves evaluation and generation.)
  const bool quantized = cfg.quant != "none";
  const bool frozen = cfg.any_lora() || quantized;
  ParamTable& base = frozen ? frozen_table_ : table_;
  auto add = [&](const std::string& name, std::vector<int64_t> shape) {
    return TensorRef{base.add(name, std::move(shape)), frozen};
  };
  auto linear = [&](const std::string& prefix, int in, int out, int site) {
    const int rank = cfg.lowrank_rank[site];
    return Linear(table_, base, frozen, prefix, in, out, rank, cfg.lora_rank[site], cfg.lora_alpha,
                  quantized && rank == 0);
  };
  wte_ = add("wte", {cfg.vocab_size, C});
  wpe_ = add("wpe", {cfg.seq_len, C});
  for (int l = 0; l < cfg.n_layer; ++l) {
    const std::string h = "h." + std::to_string(l);
    Block b;
    b.ln1_w = add(h + "/ln_1/w", {C});
    b.ln1_b = add(h + "/ln_1/b", {C});
    b.qkv = linear(h + "/attn/qkv", C, 3 * C, 0);
    b.proj = linear(h + "/attn/proj", C, C, 1);
    b.ln2_w = add(h + "/ln_2/w", {C});
    b.ln2_b = add(h + "/ln_2/b", {C});
    b.fc = linear(h + "/mlp/fc", C, F, 2);
    b.mlp_proj = linear(h + "/mlp/proj", F, C, 3);
    blocks_.push_back(b);
  }
  lnf_w_ = add("ln_f/w", {C});
  lnf_b_ = add("ln_f/b", {C});
  for (int s = 0; s < kNumSites; ++s) {
    max_rank_ = std::max({max_rank_, cfg.lowrank_rank[s], cfg.lora_rank[s]});
  }
  params_ = be_.alloc(table_.total());
  grads_ = be_.alloc(table_.total());
  frozen_ = be_.alloc(frozen_table_.total());
  sink_ = be_.alloc(2 * static_cast<std::size_t>(C));
  if (quantized) {
    int widest = 0;
    for (Block& b : blocks_) {
      for (Linear* lin : {&b.qkv, &b.proj, &b.fc, &b.mlp_proj}) {
        if (!lin->quantized()) continue;
        quantized_.push_back(std::make_unique<QuantizedTensor>());
        quantized_owner_.push_back(lin);
        lin->set_quantized(quantized_.back().get());
        widest = std::max(widest, lin->in());
      }
    }
    tile_rows_ = static_cast<int>(std::max<std::size_t>(1, kTileFloats / widest));
    tile_floats_ = static_cast<std::size_t>(tile_rows_) * widest;
    tile_ = be_.alloc(tile_floats_);
  }
}

Model::~Model() {
  for (void* p : act_allocs_) be_.release(p);
  for (Acts* a : layer_acts_) delete a;
  for (float* p : {params_, grads_, frozen_, sink_, tile_})
    if (p != nullptr) be_.release(p);
}

std::vector<Linear*> Model::quantized_layers() {
  std::vector<Linear*> out;
  for (Block& b : blocks_)
    for (Linear* lin : {&b.qkv, &b.proj, &b.fc, &b.mlp_proj})
      if (lin->quantized()) out.push_back(lin);
  return out;
}

Linear& Model::layer(int block, LinearSite site) {
  Block& b = blocks_.at(block);
  Linear* sites[kNumSites] = {&b.qkv, &b.proj, &b.fc, &b.mlp_proj};
  return *sites[static_cast<int>(site)];
}

QuantizedTensor& Model::quantized_weight(const Linear& layer) {
  for (std::size_t i = 0; i < quantized_owner_.size(); ++i)
    if (quantized_owner_[i] == &layer) return *quantized_[i];
  throw RuntimeError("layer " + layer.prefix() + " is not quantized");
}

void Model::init_random(uint64_t seed) {
  init_tables(seed, true);
}

void Model::init_adapters(uint64_t seed) {
  init_tables(seed, false);
}

void Model::init_tables(uint64_t seed, bool frozen_too) {
  const double resid_std = 0.02 / std::sqrt(2.0 * cfg_.n_layer);
  auto fill = [&](const ParamTable& table, float* device) {
    std::vector<float> host(table.total(), 0.0f);
    for (const TensorInfo& t : table.tensors()) {
      float* dst = host.data() + t.offset;
      const std::string& n = t.name;
      const bool is_ln_weight = n.ends_with("/w") && n.find("ln_") != std::string::npos;
      if (is_ln_weight) {
        std::fill(dst, dst + t.size, 1.0f);
        continue;
      }
      if (t.shape.size() < 2 || n.ends_with("/lora_B")) continue;  // biases, LayerNorm shifts, lora_B: zero
      Rng rng(derive_seed(seed, n));
      if (n.ends_with("/lora_A")) {
        // As PEFT's default: uniform in +-1/sqrt(in); with lora_B zero the adapters start as the identity.
        const double bound = 1.0 / std::sqrt(static_cast<double>(t.shape[1]));
        for (std::size_t i = 0; i < t.size; ++i)
          dst[i] = static_cast<float>((2.0 * rng.uniform() - 1.0) * bound);
        continue;
      }
      const bool residual =
          n.find("/attn/proj/") != std::string::npos || n.find("/mlp/proj/") != std::string::npos;
      double std_dev = residual ? resid_std : 0.02;
      if (n.ends_with("/A") || n.ends_with("/B")) {
        // A product of two factors of rank r has variance r * sa^2 * sb^2; match the dense layer's.
        const TensorInfo& a = table.at(n.substr(0, n.size() - 1) + "A");
        std_dev = std::sqrt(std_dev / std::sqrt(static_cast<double>(a.shape[0])));
      }
      for (std::size_t i = 0; i < t.size; ++i) dst[i] = static_cast<float>(rng.normal() * std_dev);
    }
    be_.to_device(device, host.data(), host.size() * sizeof(float));
  };
  fill(table_, params_);
  if (frozen_too) fill(frozen_table_, frozen_);
}

void Model::zero_grads() {
  be_.fill(grads_, table_.total(), 0.0f);
}

ParamCounts Model::param_counts() const {
  ParamCounts c;
  std::size_t all = table_.count() + frozen_table_.count();
  c.embedding = cfg_.vocab_size * static_cast<std::size_t>(cfg_.d_model) +
                cfg_.seq_len * static_cast<std::size_t>(cfg_.d_model);
  for (const Block& b : blocks_) {
    for (const Linear* lin : {&b.qkv, &b.proj, &b.fc, &b.mlp_proj}) {
      (lin->lowrank() ? c.linear_lowrank : c.linear_dense) += lin->weight_count();
      if (lin->quantized()) all += lin->weight_count();
      c.lora += static_cast<std::size_t>(lin->lora_rank()) * (lin->in() + lin->out());
    }
  }
  c.other = all - c.embedding - c.linear_dense - c.linear_lowrank - c.lora;
  return c;
}

int classifier_row_limit(int vocab_size, int max_rows) {
  const int by_budget =
      static_cast<int>(std::max<std::size_t>(1, kClassifierBudgetBytes / (sizeof(float) * vocab_size)));
  return std::min(max_rows, by_budget);
}

int classifier_chunk_rows(int N, int vocab_size, int max_rows) {
  const int limit = classifier_row_limit(vocab_size, max_rows);
  const int chunks = (N + limit - 1) / limit;
  return (N + chunks - 1) / chunks;
}

void print_param_counts(const ParamCounts& c, const ModelConfig& cfg) {
  // qkv 3C*C, proj C*C, fc F*C, mlp proj C*F per block.
  const std::size_t C = cfg.d_model, F = cfg.ff();
  const std::size_t dense_equiv = static_cast<std::size_t>(cfg.n_layer) * (4 * C * C + 2 * C * F);
  const std::size_t linear = c.linear_dense + c.linear_lowrank;
  std::printf(
      "parameters: total %zu = embeddings %zu + linear %zu (dense %zu, low-rank %zu) + norms/biases %zu\n",
      c.total(), c.embedding, linear, c.linear_dense, c.linear_lowrank, c.other);
  std::printf("linear layers: %zu parameters against %zu dense: compression %.2fx\n", linear, dense_equiv,
              linear > 0 ? static_cast<double>(dense_equiv) / linear : 0.0);
  if (c.lora > 0) std::printf("LoRA adapters: %zu trainable parameters (the base is frozen)\n", c.lora);
}

MemoryBytes Model::memory(int B) {
  ensure_acts(B);
  MemoryBytes m;
  m.params_trainable = table_.total() * sizeof(float);
  m.params_frozen = frozen_table_.total() * sizeof(float);
  for (const auto& q : quantized_) m.params_quantized += q->bytes();
  m.params = m.params_trainable + m.params_frozen + m.params_quantized;
  m.grads = m.params_trainable;
  m.activations = act_bytes_ + tile_floats_ * sizeof(float);
  return m;
}

void Model::ensure_acts(int B) {
  if (B <= acts_batch_) return;
  for (void* p : act_allocs_) be_.release(p);
  act_allocs_.clear();
  for (Acts* a : layer_acts_) delete a;
  layer_acts_.clear();
  resid_.clear();
  act_bytes_ = 0;

  const std::size_t N = static_cast<std::size_t>(B) * cfg_.seq_len;
  const std::size_t C = cfg_.d_model, F = cfg_.ff(), T = cfg_.seq_len, NH = cfg_.n_head;
  auto f = [&](std::size_t n) {
    float* p = be_.alloc(n);
    act_allocs_.push_back(p);
    act_bytes_ += n * sizeof(float);
    return p;
  };
  const int stored_layers = recompute_ ? 1 : cfg_.n_layer;
  for (int l = 0; l < stored_layers; ++l) {
    Acts* a = new Acts;
    a->ln1 = f(N * C);
    a->ln1_mean = f(N);
    a->ln1_rstd = f(N);
    a->qkv = f(N * 3 * C);
    a->qkv_mid = f(N * std::max(1, cfg_.lowrank_rank[0]));
    a->attn = f(N * C);
    a->attn_lse = f(B * NH * T);
    a->proj_mid = f(N * std::max(1, cfg_.lowrank_rank[1]));
    a->x_mid = f(N * C);
    a->ln2 = f(N * C);
    a->ln2_mean = f(N);
    a->ln2_rstd = f(N);
    a->fc = f(N * F);
    a->fc_mid = f(N * std::max(1, cfg_.lowrank_rank[2]));
    a->gelu = f(N * F);
    a->mlp_mid = f(N * std::max(1, cfg_.lowrank_rank[3]));
    const std::size_t site_in[kNumSites] = {C, C, C, F};
    for (int site = 0; site < kNumSites; ++site) {
      const bool adapted = cfg_.lora_rank[site] > 0;
      a->lora_mid[site] = adapted ? f(N * cfg_.lora_rank[site]) : nullptr;
      a->lora_mask[site] = adapted && cfg_.lora_dropout > 0 ? f(N * site_in[site]) : nullptr;
    }
    layer_acts_.push_back(a);
  }
  for (int l = 0; l <= cfg_.n_layer; ++l) resid_.push_back(f(N * C));
  lnf_ = f(N * C);
  lnf_mean_ = f(N);
  lnf_rstd_ = f(N);
  // A smaller batch later (a short validation batch) splits into chunks no larger than this.
  const int max_rows = recompute_ ? kClassifierMaxRowsLowMemory : kClassifierMaxRows;
  logits_ = f(std::min<std::size_t>(N, classifier_row_limit(cfg_.vocab_size, max_rows)) * cfg_.vocab_size);
  losses_ = f(N);
  dresid_ = f(N * C);
  scratch_c_ = f(N * C);
  scratch_c2_ = f(N * C);
  scratch_3c_ = f(N * 3 * C);
  scratch_ff_ = f(N * F);
  scratch_ff2_ = f(N * F);
  scratch_rank_ = f(N * std::max(1, max_rank_));
  if (cfg_.lora_dropout > 0) scratch_lora_x_ = f(N * std::max(C, F));
  tokens_dev_ = be_.alloc_int(N);
  targets_dev_ = be_.alloc_int(N);
  act_allocs_.push_back(tokens_dev_);
  act_allocs_.push_back(targets_dev_);
  acts_batch_ = B;
}

Model::Acts& Model::acts_for(int l) {
  return *layer_acts_[recompute_ ? 0 : l];
}

const float* Model::lora_mask(int l, int site, Acts& a, int in, int N) {
  if (!training_ || a.lora_mask[site] == nullptr) return nullptr;
  const double p = cfg_.lora_dropout;
  const float keep = static_cast<float>(1.0 / (1.0 - p));
  std::vector<float> mask(static_cast<std::size_t>(N) * in);
  Rng rng(
      derive_seed(dropout_seed_, "h." + std::to_string(l) + "/" + site_name(static_cast<LinearSite>(site))));
  for (float& m : mask) m = rng.uniform() < p ? 0.0f : keep;
  be_.to_device(a.lora_mask[site], mask.data(), mask.size() * sizeof(float));
  return a.lora_mask[site];
}

void Model::block_forward(int l, Acts& a, const float* x, float* x_out, int B) {
  const Block& blk = blocks_[l];
  const int N = B * cfg_.seq_len, C = cfg_.d_model, F = cfg_.ff();
  const WeightBuffers w = buffers();
  const LinearScratch ls = linear_scratch();
  be_.layernorm_forward(a.ln1, a.ln1_mean, a.ln1_rstd, x, at(blk.ln1_w), at(blk.ln1_b), N, C);
  blk.qkv.forward(be_, w, ls, a.ln1, a.qkv, a.qkv_mid, a.lora_mid[0], lora_mask(l, 0, a, C, N), N);
  be_.attention_forward(a.attn, a.attn_lse, a.qkv, B, cfg_.seq_len, C, cfg_.n_head);
  blk.proj.forward(be_, w, ls, a.attn, scratch_c_, a.proj_mid, a.lora_mid[1], lora_mask(l, 1, a, C, N), N);
  be_.add(a.x_mid, x, scratch_c_, static_cast<std::size_t>(N) * C);
  be_.layernorm_forward(a.ln2, a.ln2_mean, a.ln2_rstd, a.x_mid, at(blk.ln2_w), at(blk.ln2_b), N, C);
  blk.fc.forward(be_, w, ls, a.ln2, a.fc, a.fc_mid, a.lora_mid[2], lora_mask(l, 2, a, C, N), N);
  be_.gelu_forward(a.gelu, a.fc, static_cast<std::size_t>(N) * F);
  blk.mlp_proj.forward(be_, w, ls, a.gelu, scratch_c_, a.mlp_mid, a.lora_mid[3], lora_mask(l, 3, a, F, N), N);
  be_.add(x_out, a.x_mid, scratch_c_, static_cast<std::size_t>(N) * C);
}

// dresid holds d(loss)/d(block output) on entry and d(loss)/d(block input) on return.
void Model::block_backward(int l, Acts& a, const float* x, float* dresid, int B) {
  const Block& blk = blocks_[l];
  const int N = B * cfg_.seq_len, C = cfg_.d_model, F = cfg_.ff();
  const WeightBuffers w = buffers();
  const LinearScratch ls = linear_scratch();
  const float* mask[kNumSites];
  for (int s = 0; s < kNumSites; ++s) mask[s] = training_ ? a.lora_mask[s] : nullptr;
  blk.mlp_proj.backward(be_, w, ls, a.gelu, a.mlp_mid, a.lora_mid[3], mask[3], dresid, scratch_ff_, N);
  be_.gelu_backward(scratch_ff2_, a.fc, scratch_ff_, static_cast<std::size_t>(N) * F);
  blk.fc.backward(be_, w, ls, a.ln2, a.fc_mid, a.lora_mid[2], mask[2], scratch_ff2_, scratch_c_, N);
  be_.layernorm_backward(dresid, grad_or_sink(blk.ln2_w, 0), grad_or_sink(blk.ln2_b, 1), scratch_c_, a.x_mid,
                         at(blk.ln2_w), a.ln2_mean, a.ln2_rstd, N, C);
  blk.proj.backward(be_, w, ls, a.attn, a.proj_mid, a.lora_mid[1], mask[1], dresid, scratch_c_, N);
  be_.attention_backward(scratch_3c_, scratch_c_, a.qkv, a.attn, a.attn_lse, B, cfg_.seq_len, C, cfg_.n_head);
  blk.qkv.backward(be_, w, ls, a.ln1, a.qkv_mid, a.lora_mid[0], mask[0], scratch_3c_, scratch_c2_, N);
  be_.layernorm_backward(dresid, grad_or_sink(blk.ln1_w, 0), grad_or_sink(blk.ln1_b, 1), scratch_c2_, x,
                         at(blk.ln1_w), a.ln1_mean, a.ln1_rstd, N, C);
}

// Final LayerNorm, the tied lm_head and the loss, a chunk of rows at a time so that only one
// [chunk, vocab] logits buffer ever exists. With a gradient, dx receives d(loss)/d(final residual).
double Model::classifier(const float* x, const int32_t* targets, float* dx, int N, float grad_scale,
                         int valid) {
  const int C = cfg_.d_model, V = cfg_.vocab_size;
  const float* wte = at(wte_);
  be_.layernorm_forward(lnf_, lnf_mean_, lnf_rstd_, x, at(lnf_w_), at(lnf_b_), N, C);
  const float row_scale = valid > 0 ? grad_scale / static_cast<float>(valid) : 0.0f;
  const int chunk =
      classifier_chunk_rows(N, V, recompute_ ? kClassifierMaxRowsLowMemory : kClassifierMaxRows);
  for (int n0 = 0; n0 < N; n0 += chunk) {
    const int rows = std::min(chunk, N - n0);
    const float* xr = lnf_ + static_cast<std::size_t>(n0) * C;
    be_.matmul(logits_, xr, wte, rows, V, C, false, true, 1.0f, 0.0f);
    be_.softmax_xent(losses_ + n0, logits_, targets + n0, rows, V, row_scale);
    if (grad_scale != 0.0f) {
      if (!wte_.frozen) be_.matmul(grads_ + wte_.offset, logits_, xr, V, C, rows, true, false, 1.0f, 1.0f);
      be_.matmul(scratch_c_ + static_cast<std::size_t>(n0) * C, logits_, wte, rows, C, V, false, false, 1.0f,
                 0.0f);
    }
  }
  std::vector<float> losses(N);
  be_.to_host(losses.data(), losses_, N * sizeof(float));
  double sum = 0;
  for (float v : losses) sum += v;
  if (grad_scale != 0.0f) {
    be_.fill(dx, static_cast<std::size_t>(N) * C, 0.0f);
    be_.layernorm_backward(dx, grad_or_sink(lnf_w_, 0), grad_or_sink(lnf_b_, 1), scratch_c_, x, at(lnf_w_),
                           lnf_mean_, lnf_rstd_, N, C);
  }
  return valid > 0 ? sum / valid : 0.0;
}

void Model::logits_at(const int32_t* tokens, int position, float* out) {
  ensure_acts(1);
  const int T = cfg_.seq_len, C = cfg_.d_model;
  for (int i = 0; i < T; ++i)
    if (tokens[i] < 0 || tokens[i] >= cfg_.vocab_size)
      throw InputError(
          strprintf("token id %d is outside the model's vocabulary of %d", tokens[i], cfg_.vocab_size));
  be_.to_device(tokens_dev_, tokens, T * sizeof(int32_t));
  be_.embedding_forward(resid_[0], tokens_dev_, at(wte_), at(wpe_), 1, T, C);
  for (int l = 0; l < cfg_.n_layer; ++l) block_forward(l, acts_for(l), resid_[l], resid_[l + 1], 1);
  const float* x = resid_[cfg_.n_layer] + static_cast<std::size_t>(position) * C;
  be_.layernorm_forward(lnf_, lnf_mean_, lnf_rstd_, x, at(lnf_w_), at(lnf_b_), 1, C);
  be_.matmul(logits_, lnf_, at(wte_), 1, cfg_.vocab_size, C, false, true, 1.0f, 0.0f);
  be_.to_host(out, logits_, cfg_.vocab_size * sizeof(float));
}

double Model::step(const int32_t* tokens, const int32_t* targets, int B, float grad_scale) {
  ensure_acts(B);
  const int T = cfg_.seq_len, C = cfg_.d_model, N = B * T;
  int valid = 0;
  for (int i = 0; i < N; ++i) {
    if (tokens[i] < 0 || tokens[i] >= cfg_.vocab_size || targets[i] >= cfg_.vocab_size)
      throw InputError(strprintf("token id %d is outside the model's vocabulary of %d",
                                 std::max(tokens[i], targets[i]), cfg_.vocab_size));
    valid += targets[i] >= 0;
  }
  // No valid target: the mean loss is 0 and has no gradient. Running backward anyway would push what
  // softmax_xent leaves in the logits buffer at scale 0 (not a gradient) into the gradients.
  if (valid == 0) grad_scale = 0.0f;
  be_.to_device(tokens_dev_, tokens, N * sizeof(int32_t));
  be_.to_device(targets_dev_, targets, N * sizeof(int32_t));

  be_.embedding_forward(resid_[0], tokens_dev_, at(wte_), at(wpe_), B, T, C);
  for (int l = 0; l < cfg_.n_layer; ++l) block_forward(l, acts_for(l), resid_[l], resid_[l + 1], B);
  const double loss = classifier(resid_[cfg_.n_layer], targets_dev_, dresid_, N, grad_scale, valid);
  if (grad_scale == 0.0f) return loss;

  for (int l = cfg_.n_layer - 1; l >= 0; --l) {
    // With recomputation only block inputs were kept: run the block forward again to rebuild its activations.
    if (recompute_) block_forward(l, acts_for(l), resid_[l], scratch_c2_, B);
    block_backward(l, acts_for(l), resid_[l], dresid_, B);
  }
  // A frozen model stops here: nothing below the first block has a gradient.
  if (!wte_.frozen)
    be_.embedding_backward(grads_ + wte_.offset, grads_ + wpe_.offset, dresid_, tokens_dev_, B, T, C);
  return loss;
}

}  // namespace lrllm

#include "lrllm/model/optimizer.h"

#include <algorithm>
#include <cmath>

namespace lrllm {

AdamW::AdamW(Backend& backend, const ParamTable& table, const TrainConfig& cfg, std::size_t begin,
             std::size_t end)
    : be_(backend), table_(table), cfg_(cfg), begin_(begin), end_(end == 0 ? table.total() : end) {
  m_ = be_.alloc(end_ - begin_);
  v_ = be_.alloc(end_ - begin_);
}

AdamW::~AdamW() {
  be_.release(m_);
  be_.release(v_);
}

namespace {

bool is_factor(TensorRole role) {
  return role == TensorRole::factor || role == TensorRole::residual_factor;
}

}  // namespace

int AdamW::factor_step() const {
  const int k = cfg_.lowrank_refactor_every;
  // The factors' moments restarted after the last step that was a multiple of k (refactor_due), so their
  // bias correction counts from there: steps k+1, k+2, ... are the factors' 1, 2, ... A function of step_
  // alone, so a resume needs no more state.
  return k > 0 ? step_ - k * ((step_ - 1) / k) : step_;
}

void AdamW::update(float* params, const float* grads, float lr) {
  ++step_;
  for (const TensorInfo& t : table_.tensors()) {
    const std::size_t b = std::max(t.offset, begin_), e = std::min(t.offset + t.size, end_);
    if (b >= e) continue;
    const float wd = decays(t.role) ? static_cast<float>(cfg_.weight_decay) : 0.0f;
    const bool factor = is_factor(t.role);
    // lowrank.lr_mult: factorized weights take a larger step (decoupled decay scales with it, as in PyTorch
    // parameter groups with their own lr).
    const float tensor_lr = factor ? static_cast<float>(lr * cfg_.lowrank_lr_mult) : lr;
    const std::size_t i = b - begin_;
    be_.adamw(params + b, grads + i, m_ + i, v_ + i, e - b, tensor_lr, static_cast<float>(cfg_.beta1),
              static_cast<float>(cfg_.beta2), static_cast<float>(cfg_.eps), wd,
              factor ? factor_step() : step_);
  }
}

bool AdamW::refactor_due() const {
  return cfg_.lowrank_refactor_every > 0 && step_ > 0 && step_ % cfg_.lowrank_refactor_every == 0;
}

void AdamW::reset_factor_moments() {
  for (const TensorInfo& t : table_.tensors()) {
    const std::size_t b = std::max(t.offset, begin_), e = std::min(t.offset + t.size, end_);
    if (b >= e || !is_factor(t.role)) continue;
    be_.fill(m_ + (b - begin_), e - b, 0.0f);
    be_.fill(v_ + (b - begin_), e - b, 0.0f);
  }
}

double lr_at(const TrainConfig& cfg, int step) {
  if (step < cfg.warmup) return cfg.lr * (step + 1) / cfg.warmup;
  if (cfg.steps <= cfg.warmup) return cfg.lr;
  const double progress = static_cast<double>(step - cfg.warmup) / (cfg.steps - cfg.warmup);
  return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + std::cos(M_PI * std::min(1.0, progress)));
}

void clip_to_max_norm(Backend& backend, float* grads, std::size_t n, double norm, double max_norm) {
  if (max_norm <= 0) return;
  // PyTorch's clip_grad_norm_: coefficient max_norm / (norm + 1e-6), applied only when below 1.
  const double coef = max_norm / (norm + 1e-6);
  if (coef < 1.0) backend.scale(grads, n, static_cast<float>(coef));
}

double clip_grad_norm(Backend& backend, float* grads, std::size_t n, double max_norm) {
  const double norm = std::sqrt(backend.sum_squares(grads, n));
  clip_to_max_norm(backend, grads, n, norm, max_norm);
  return norm;
}

}  // namespace lrllm

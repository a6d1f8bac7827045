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

void AdamW::update(float* params, const float* grads, float lr) {
  ++step_;
  for (const TensorInfo& t : table_.tensors()) {
    const std::size_t b = std::max(t.offset, begin_), e = std::min(t.offset + t.size, end_);
    if (b >= e) continue;
    const float wd = decays(t.role) ? static_cast<float>(cfg_.weight_decay) : 0.0f;
    const std::size_t i = b - begin_;
    be_.adamw(params + b, grads + i, m_ + i, v_ + i, e - b, lr, static_cast<float>(cfg_.beta1),
              static_cast<float>(cfg_.beta2), static_cast<float>(cfg_.eps), wd, step_);
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

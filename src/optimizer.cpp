#include "lrllm/optimizer.h"

#include <algorithm>
#include <cmath>

namespace lrllm {

AdamW::AdamW(Backend& backend, const ParamTable& table, const TrainConfig& cfg)
    : be_(backend), table_(table), cfg_(cfg) {
  m_ = be_.alloc(table.total());
  v_ = be_.alloc(table.total());
}

AdamW::~AdamW() {
  be_.release(m_);
  be_.release(v_);
}

void AdamW::update(float* params, const float* grads, float lr) {
  ++step_;
  for (const TensorInfo& t : table_.tensors()) {
    const float wd = t.decay ? static_cast<float>(cfg_.weight_decay) : 0.0f;
    be_.adamw(params + t.offset, grads + t.offset, m_ + t.offset, v_ + t.offset, t.size, lr,
              static_cast<float>(cfg_.beta1), static_cast<float>(cfg_.beta2), static_cast<float>(cfg_.eps),
              wd, step_);
  }
}

double lr_at(const TrainConfig& cfg, int step) {
  if (step < cfg.warmup) return cfg.lr * (step + 1) / cfg.warmup;
  if (cfg.steps <= cfg.warmup) return cfg.lr;
  const double progress = static_cast<double>(step - cfg.warmup) / (cfg.steps - cfg.warmup);
  return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + std::cos(M_PI * std::min(1.0, progress)));
}

double clip_grad_norm(Backend& backend, float* grads, std::size_t n, double max_norm) {
  const double norm = std::sqrt(backend.sum_squares(grads, n));
  if (max_norm > 0) {
    // PyTorch's clip_grad_norm_: coefficient max_norm / (norm + 1e-6), applied only when below 1.
    const double coef = max_norm / (norm + 1e-6);
    if (coef < 1.0) backend.scale(grads, n, static_cast<float>(coef));
  }
  return norm;
}

}  // namespace lrllm

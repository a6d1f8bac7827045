// AdamW with decoupled weight decay on 2-D weights, the warmup + cosine schedule, and global-norm clipping.
#pragma once

#include <cstddef>

#include "lrllm/backend.h"
#include "lrllm/config.h"
#include "lrllm/params.h"

namespace lrllm {

class AdamW {
 public:
  AdamW(Backend& backend, const ParamTable& table, const TrainConfig& cfg);
  ~AdamW();
  AdamW(const AdamW&) = delete;
  AdamW& operator=(const AdamW&) = delete;

  // One update with learning rate lr; increments step().
  void update(float* params, const float* grads, float lr);
  int step() const { return step_; }
  void set_step(int step) { step_ = step; }
  float* m() { return m_; }
  float* v() { return v_; }
  Backend& backend() { return be_; }
  std::size_t bytes() const { return 2 * table_.total() * sizeof(float); }
  const TrainConfig& config() const { return cfg_; }
  const ParamTable& table() const { return table_; }

 private:
  Backend& be_;
  const ParamTable& table_;
  TrainConfig cfg_;
  float* m_ = nullptr;
  float* v_ = nullptr;
  int step_ = 0;
};

// Learning rate of 0-based step: linear warmup to lr over `warmup` steps, then cosine decay to min_lr at
// `steps`.
double lr_at(const TrainConfig& cfg, int step);

// Global L2 norm of the gradients; scales them down to max_norm when larger (max_norm <= 0: no clipping).
double clip_grad_norm(Backend& backend, float* grads, std::size_t n, double max_norm);

}  // namespace lrllm

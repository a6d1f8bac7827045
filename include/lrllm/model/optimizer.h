// AdamW with decoupled weight decay on 2-D weights, the warmup + cosine schedule, and global-norm clipping.
#pragma once

#include <cstddef>

#include "lrllm/backend/backend.h"
#include "lrllm/core/config.h"
#include "lrllm/model/params.h"

namespace lrllm {

class AdamW {
 public:
  // The moments of [begin, end) of the table's flat layout (ZeRO-1 gives each data-parallel rank a shard;
  // end 0: to the end).
  AdamW(Backend& backend, const ParamTable& table, const TrainConfig& cfg, std::size_t begin = 0,
        std::size_t end = 0);
  ~AdamW();
  AdamW(const AdamW&) = delete;
  AdamW& operator=(const AdamW&) = delete;

  // One update of params[begin, end) with learning rate lr; grads holds the gradients of [begin, end)
  // (grads[0] is params[begin]'s). Increments step(). Low-rank factors (TensorRole::factor,
  // residual_factor) take lr * lowrank.lr_mult and count their bias correction from their last restart.
  void update(float* params, const float* grads, float lr);
  // Whether the step just taken ends a lowrank.refactor_every period: the factors are refactored
  // (refactor_factors, linear.h) and reset_factor_moments restarts their moments.
  bool refactor_due() const;
  void reset_factor_moments();
  // The step the factors' bias correction uses.
  int factor_step() const;
  std::size_t begin() const { return begin_; }
  std::size_t end() const { return end_; }
  bool whole() const { return begin_ == 0 && end_ == table_.total(); }
  int step() const { return step_; }
  void set_step(int step) { step_ = step; }
  float* m() { return m_; }
  float* v() { return v_; }
  Backend& backend() { return be_; }
  std::size_t bytes() const { return 2 * (end_ - begin_) * sizeof(float); }
  const TrainConfig& config() const { return cfg_; }
  const ParamTable& table() const { return table_; }

 private:
  Backend& be_;
  const ParamTable& table_;
  TrainConfig cfg_;
  float* m_ = nullptr;
  float* v_ = nullptr;
  std::size_t begin_ = 0, end_ = 0;
  int step_ = 0;
};

// Learning rate of 0-based step: linear warmup to lr over `warmup` steps, then cosine decay to min_lr at
// `steps`.
double lr_at(const TrainConfig& cfg, int step);

// Scales n gradients whose global norm is `norm` down to max_norm when larger (max_norm <= 0: no clipping).
void clip_to_max_norm(Backend& backend, float* grads, std::size_t n, double norm, double max_norm);

// Global L2 norm of the gradients; scales them down to max_norm when larger (max_norm <= 0: no clipping).
double clip_grad_norm(Backend& backend, float* grads, std::size_t n, double max_norm);

}  // namespace lrllm

#include "lrllm/parallel/pipeline.h"

#include <algorithm>

#include "lrllm/core/common.h"

namespace lrllm {
namespace {

constexpr int kActivationTag = 0, kGradientTag = 1;

}  // namespace

Pipeline::Pipeline(Model& model, const Topology& topo, int micro_batches)
    : model_(model), topo_(topo), micro_batches_(micro_batches) {
  slots_ = std::min(micro_batches_, topo_.pp() - topo_.pp_rank());
  sends_.resize(slots_);
}

void Pipeline::reserve(int B) {
  model_.reserve(B / micro_batches_, slots_);
}

double Pipeline::bubble_fraction() const {
  const double P = topo_.pp(), M = micro_batches_;
  return (P - 1) / (M + P - 1);
}

void Pipeline::wait_slot(int slot) {
  PendingTransfer::wait_all(sends_[slot]);
}

void Pipeline::wait_all() {
  for (int s = 0; s < slots_; ++s) wait_slot(s);
}

void Pipeline::forward(int micro, int first, int mb, const Batch& batch, float grad_scale, int normalizer,
                       double& loss) {
  const int slot = micro % slots_;
  const std::size_t n = static_cast<std::size_t>(mb) * batch.T * model_.config().d_model;
  const std::size_t offset = static_cast<std::size_t>(first) * batch.T;
  const int32_t* positions = batch.positions_or_null();
  wait_slot(slot);
  if (!model_.first_stage())
    topo_.recv_stage(model_.stage_input(slot), n, topo_.pp_rank() - 1, kActivationTag);
  loss += model_.forward(slot, batch.tokens.data() + offset, batch.targets.data() + offset,
                         positions ? positions + offset : nullptr, mb, batch.T, grad_scale, normalizer);
  if (!model_.last_stage())
    sends_[slot].push_back(
        topo_.isend_stage(model_.stage_output(slot), n, topo_.pp_rank() + 1, kActivationTag));
}

void Pipeline::backward(int micro, int mb, int T) {
  const int slot = micro % slots_;
  const std::size_t n = static_cast<std::size_t>(mb) * T * model_.config().d_model;
  if (!model_.last_stage()) topo_.recv_stage(model_.stage_grad(slot), n, topo_.pp_rank() + 1, kGradientTag);
  model_.backward(slot);
  if (!model_.first_stage())
    sends_[slot].push_back(topo_.isend_stage(model_.stage_grad(slot), n, topo_.pp_rank() - 1, kGradientTag));
}

double Pipeline::train(const Batch& batch, float grad_scale, const std::function<void(int)>* final_hook) {
  const int B = batch.rows;
  reserve(B);
  const int M = micro_batches_, mb = B / M;
  // The loss is the mean over the whole micro-step's valid targets, whatever the micro-batches hold; every
  // stage sees the same batch, so all agree on it (and on skipping backward when there is none).
  const int normalizer = model_.count_valid(batch.tokens.data(), batch.targets.data(), B * batch.T);
  if (normalizer == 0 || grad_scale == 0.0f) return evaluate(batch);
  const int warmup = std::min(topo_.pp() - topo_.pp_rank() - 1, M);
  double loss = 0;
  int forwards = 0, backwards = 0;
  auto next_backward = [&] {
    if (backwards == M - 1 && final_hook != nullptr) model_.set_block_grads_hook(*final_hook);
    backward(backwards++, mb, batch.T);
    model_.set_block_grads_hook({});
  };
  auto next_forward = [&] {
    forward(forwards, forwards * mb, mb, batch, grad_scale, normalizer, loss);
    ++forwards;
  };
  for (int i = 0; i < warmup; ++i) next_forward();
  for (int i = 0; i < M - warmup; ++i) {
    next_forward();
    next_backward();
  }
  for (int i = 0; i < warmup; ++i) next_backward();
  wait_all();
  return loss;
}

double Pipeline::evaluate(const Batch& batch) {
  const int B = batch.rows;
  const int mb_max = std::max(1, B / micro_batches_);
  model_.reserve(mb_max, slots_);
  const int normalizer = model_.count_valid(batch.tokens.data(), batch.targets.data(), B * batch.T);
  double loss = 0;
  // Micro-batches of mb_max sequences (the last one shorter), forward only, streaming through the stages.
  for (int first = 0, micro = 0; first < B; first += mb_max, ++micro)
    forward(micro, first, std::min(mb_max, B - first), batch, 0.0f, normalizer, loss);
  wait_all();
  return loss;
}

}  // namespace lrllm

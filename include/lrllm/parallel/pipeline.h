// Pipeline parallelism's schedule, 1F1B (PipeDream-Flush, as in Megatron-LM): stage s of P first runs
// min(P - s - 1, M) forwards to fill the pipe, then alternates one forward and one backward, then drains the
// remaining backwards. At most P - s micro-batches are in flight on stage s, so it keeps that many activation
// slots where GPipe keeps M; the bubble is the same, (P - 1) / (M + P - 1) of the step. Activations go to the
// next stage and their gradients to the previous one as non-blocking sends, so no pair of stages can wait on
// each other. With one stage the schedule is plain gradient accumulation over the micro-batches.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "lrllm/model/model.h"
#include "lrllm/parallel/topology.h"

namespace lrllm {

class Pipeline {
 public:
  // micro_batches: per micro-step of B sequences (B divisible by it).
  Pipeline(Model& model, const Topology& topo, int micro_batches);
  Pipeline(const Pipeline&) = delete;
  Pipeline& operator=(const Pipeline&) = delete;

  // Activation slots for micro-steps of B sequences (allocating them); the slot count is the schedule's.
  void reserve(int B);
  int slots() const { return slots_; }
  const ModelConfig& config() const { return model_.config(); }
  // Forward and backward of one micro-step (every rank of the pipeline holds the same batch), accumulating
  // grad_scale * d(mean loss)/d(param). Returns the mean loss over the batch's valid targets on the last
  // stage, 0 on the others. final_hook, when given, is set on the model for the last micro-batch's backward
  // (see Model::set_block_grads_hook).
  double train(const Batch& batch, float grad_scale, const std::function<void(int)>* final_hook);
  // Forward only: the mean loss of the batch on the last stage, 0 on the others.
  double evaluate(const Batch& batch);
  // The idle fraction of the schedule: (P - 1) / (M + P - 1).
  double bubble_fraction() const;

 private:
  // Micro-batch `micro`: mb sequences from sequence `first` of the batch.
  void forward(int micro, int first, int mb, const Batch& batch, float grad_scale, int normalizer,
               double& loss);
  void backward(int micro, int mb, int T);
  void wait_slot(int slot);
  void wait_all();

  Model& model_;
  const Topology& topo_;
  int micro_batches_ = 1;
  int slots_ = 1;
  std::vector<std::vector<PendingTransfer>> sends_;  // outstanding sends from each slot's buffers
};

}  // namespace lrllm

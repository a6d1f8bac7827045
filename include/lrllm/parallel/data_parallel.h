// Data parallelism over the data-parallel group, after backward and before the optimizer:
// - plain: gradients are averaged in buckets of whole blocks, each started (Topology::iallreduce_dp) as soon
//   as backward has finished its blocks, so communication runs while backward goes on;
// - ZeRO-1 (parallel.zero 1): one reduce-scatter leaves each rank the averaged gradients of its shard of the
//   flat buffer, AdamW keeps moments for that shard only, and an allgather hands every rank the updated
//   parameters.
// It also sums the tied embedding between the first and last pipeline stage, and computes the global
// gradient norm with every parameter counted once (tensor-parallel replicas and the lm_head's copy of wte
// are left out).
#pragma once

#include <cstddef>
#include <functional>
#include <vector>

#include "lrllm/model/model.h"
#include "lrllm/model/optimizer.h"
#include "lrllm/parallel/topology.h"

namespace lrllm {

class DataParallel {
 public:
  DataParallel(Model& model, const Topology& topo, bool zero, double bucket_mb);
  ~DataParallel();
  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  // The range of the flat parameter buffer whose optimizer state this rank keeps (all of it without ZeRO).
  std::size_t shard_begin() const { return bounds_[rank_]; }
  std::size_t shard_end() const { return bounds_[rank_ + 1]; }
  // Every data-parallel rank's shard: rank i keeps [bounds()[i], bounds()[i + 1]) ({0, n} without ZeRO).
  const std::vector<std::size_t>& bounds() const { return bounds_; }
  // For the step's last backward: starts a bucket once all its blocks' gradients are final.
  const std::function<void(int)>& hook() const { return hook_; }
  // Finishes the gradient communication of the step (see the file comment). Call after every backward.
  void finish_gradients();
  // The global gradient norm; scales the gradients down to max_norm when larger (max_norm <= 0: no clipping).
  double clip(double max_norm);
  // AdamW on this rank's shard with learning rate lr, then (ZeRO) the allgather of the parameters.
  void update(AdamW& optimizer, float lr);
  // Bytes of the gradient shard buffer (ZeRO) that the model's memory figures do not include.
  std::size_t extra_bytes() const { return zero_ ? (shard_end() - shard_begin()) * sizeof(float) : 0; }

 private:
  struct Bucket {
    int lowest_layer = 0;  // backward finishes it last
    std::size_t begin = 0, end = 0;
    PendingTransfer request{};
    bool started = false;
  };
  float* grads_of_shard();
  void start(Bucket& b);

  Model& model_;
  const Topology& topo_;
  bool zero_;
  int rank_ = 0;
  std::vector<std::size_t> bounds_;
  std::vector<Bucket> buckets_;
  std::vector<std::pair<std::size_t, std::size_t>> rest_;  // ranges outside the buckets: embeddings, ln_f
  float* shard_grads_ = nullptr;                           // ZeRO: the averaged gradients of this shard
  std::function<void(int)> hook_;
};

}  // namespace lrllm

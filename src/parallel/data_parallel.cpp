#include "lrllm/parallel/data_parallel.h"

#include <algorithm>
#include <cmath>

#include "lrllm/core/common.h"

namespace lrllm {

DataParallel::DataParallel(Model& model, const Topology& topo, bool zero, double bucket_mb)
    : model_(model), topo_(topo), zero_(zero) {
  const std::size_t n = model.table().total();
  Backend& be = model.backend();
  if (zero_) {
    rank_ = topo.dp_rank();
    bounds_ = topo.dp_bounds(n);
    shard_grads_ = be.alloc(shard_end() - shard_begin());
    return;
  }
  bounds_ = {0, n};
  if (topo.dp() == 1) return;
  // Buckets of consecutive blocks, from the last block down (the order backward finishes them), each closed
  // once it reaches bucket_mb. A block's tensors are contiguous and blocks follow each other in the table.
  const std::size_t limit =
      std::max<std::size_t>(1, static_cast<std::size_t>(bucket_mb * 1e6 / sizeof(float)));
  for (int l = model.end_layer() - 1; l >= model.first_layer(); --l) {
    const auto [begin, end] = model.block_range(l);
    if (begin == end) continue;
    if (buckets_.empty() || buckets_.back().end - buckets_.back().begin >= limit) {
      buckets_.push_back({l, begin, end});
    } else {
      buckets_.back().lowest_layer = l;
      buckets_.back().begin = begin;
    }
  }
  // The embeddings and ln_f lie outside the blocks; they are averaged after backward (and after the tied
  // embedding's sum between stages).
  const std::size_t covered_begin = buckets_.empty() ? n : buckets_.back().begin;
  const std::size_t covered_end = buckets_.empty() ? n : buckets_.front().end;
  if (covered_begin > 0) rest_.emplace_back(0, covered_begin);
  if (covered_end < n) rest_.emplace_back(covered_end, n);
  hook_ = [this](int layer) {
    for (Bucket& b : buckets_)
      if (!b.started && b.lowest_layer == layer) start(b);
  };
}

DataParallel::~DataParallel() {
  if (shard_grads_ != nullptr) model_.backend().release(shard_grads_);
}

void DataParallel::start(Bucket& b) {
  b.request = topo_.iallreduce_dp(model_.grads() + b.begin, b.end - b.begin);
  b.started = true;
}

float* DataParallel::grads_of_shard() {
  return zero_ ? shard_grads_ : model_.grads();
}

void DataParallel::finish_gradients() {
  Backend& be = model_.backend();
  float* grads = model_.grads();
  // The tied embedding, and the trainable tokens' rows of it: the first stage's gradient (input side) plus
  // the last stage's (lm_head side).
  const bool tied_embedding = describe_architecture(model_.config()).output_head.empty();
  if (topo_.pp() > 1 && tied_embedding)
    for (const char* tied : {"wte", kTokenDeltaName})
      if (const TensorInfo* t = model_.table().find(tied))
        topo_.sum_tied_embedding(grads + t->offset, t->size);
  const float inv_dp = 1.0f / static_cast<float>(topo_.dp());
  if (zero_) {
    topo_.reduce_scatter_dp(grads, shard_grads_, bounds_);
    be.scale(shard_grads_, shard_end() - shard_begin(), inv_dp);
    return;
  }
  if (topo_.dp() == 1) return;
  // Buckets whose blocks had no backward this step (no valid target) start now.
  for (Bucket& b : buckets_)
    if (!b.started) start(b);
  for (const auto& [begin, end] : rest_) topo_.allreduce_sum(Group::dp, grads + begin, end - begin);
  for (Bucket& b : buckets_) {
    b.request.wait();
    b.started = false;
  }
  be.scale(grads, model_.table().total(), inv_dp);
}

double DataParallel::clip(double max_norm) {
  Backend& be = model_.backend();
  float* grads = grads_of_shard();
  const std::size_t lo = shard_begin(), hi = shard_end();
  // Each parameter once: replicas are skipped, and without ZeRO every data-parallel rank holds the same
  // averaged gradients, so only the first contributes.
  double local = 0;
  if (zero_ || topo_.dp_rank() == 0)
    for (const TensorInfo& t : model_.table().tensors()) {
      const std::size_t b = std::max(t.offset, lo), e = std::min(t.offset + t.size, hi);
      if (!t.split.replica && b < e) local += be.sum_squares(grads + (b - lo), e - b);
    }
  const double norm = std::sqrt(topo_.world_sum(local));
  clip_to_max_norm(be, grads, hi - lo, norm, max_norm);
  return norm;
}

void DataParallel::update(AdamW& optimizer, float lr) {
  optimizer.update(model_.params(), grads_of_shard(), lr);
  if (zero_) topo_.allgather_dp(model_.params(), bounds_);
}

}  // namespace lrllm

// The parallel layout (DESIGN §3 "Parallelism"): MPI_COMM_WORLD split into tensor-, pipeline- and
// data-parallel groups, tp * pp * dp = world. Tensor parallelism is innermost, so that the group that talks
// most shares a node where it can: world rank = (dp_rank * pp + pp_rank) * tp + tp_rank.
//
// Every collective and transfer here counts the bytes this rank hands to it (the payload: n floats of an
// allreduce count 4n, whatever algorithm MPI picks), per communicator; training writes them to metrics.h5.
#pragma once

#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "lrllm/comm.h"
#include "lrllm/config.h"
#include "lrllm/model.h"

namespace lrllm {

enum class Group { dp, tp, pp };

// Checks a layout against the world size, the model and the batch before anything is built: world divisible
// by tp * pp, pp at most the layer count, heads and d_ff divisible by tp, micro_batches dividing the batch.
// Throws InputError.
void validate_layout(const ParallelConfig& p, int world_size, const ModelConfig& m, int batch_size);

class Topology : public TensorReducer {
 public:
  Topology(const Comm& world, const ParallelConfig& p);
  ~Topology() override;
  Topology(const Topology&) = delete;
  Topology& operator=(const Topology&) = delete;

  const Comm& world() const { return world_; }
  int tp() const { return tp_; }
  int pp() const { return pp_; }
  int dp() const { return dp_; }
  int tp_rank() const { return tp_rank_; }
  int pp_rank() const { return pp_rank_; }
  int dp_rank() const { return dp_rank_; }
  bool first_stage() const { return pp_rank_ == 0; }
  bool last_stage() const { return pp_rank_ == pp_ - 1; }
  // This rank's share of the model: its stage's blocks and its tensor-parallel slice.
  ModelShard shard(const ModelConfig& m) const;

  // Blocks [first, end) of a stage. Stages are balanced by compute, not block count: the last one also runs
  // the lm_head (6 V C FLOPs a token, forward and backward: several blocks' worth at GPT-2's vocabulary), so
  // the split minimizes the largest stage's FLOPs, every stage keeping at least one block.
  static std::pair<int, int> stage_layers(const ModelConfig& m, int pp, int stage);
  // One line per rank (host, coordinates, blocks, heads), gathered to and printed by world rank 0.
  void print_placement(const ModelConfig& m) const;

  // In-place sum over the tensor-parallel group (the TensorReducer the linear layers use).
  void allreduce_sum(float* x, std::size_t n) const override;
  void allreduce_sum(Group g, float* x, std::size_t n) const;
  // Sums over the world, every rank getting the result.
  double world_sum(double x) const;
  void world_sum(double* x, int n) const;
  // Starts an in-place sum over the data-parallel group; the caller waits for the request.
  MPI_Request iallreduce_dp(float* x, std::size_t n) const;
  // ZeRO-1's shards of a flat buffer of n floats over the data-parallel ranks (see shard_bounds).
  std::vector<std::size_t> dp_bounds(std::size_t n) const { return shard_bounds(n, dp_); }
  // n floats in `parts` shards: shard d is [bounds[d], bounds[d+1]), equal and 64-byte aligned but for the
  // last.
  static std::vector<std::size_t> shard_bounds(std::size_t n, int parts);
  // Data parallelism with sharded optimizer state: shard d of the flat buffer is [bounds[d], bounds[d+1]).
  void reduce_scatter_dp(const float* x, float* shard, const std::vector<std::size_t>& bounds) const;
  void allgather_dp(float* x, const std::vector<std::size_t>& bounds) const;
  // Gathers the shards of every data-parallel rank into full on dp rank 0 (full: bounds.back() floats there).
  void gather_dp(const float* shard, float* full, const std::vector<std::size_t>& bounds) const;
  // Sum of the tied embedding's gradient between the first and last pipeline stage (pp > 1 only).
  void sum_tied_embedding(float* grad, std::size_t n) const;
  // Pipeline transfers between stages of this rank's pipeline (tag: 0 activations, 1 their gradients).
  MPI_Request isend_stage(const float* x, std::size_t n, int stage, int tag) const;
  void recv_stage(float* x, std::size_t n, int stage, int tag) const;

  int64_t bytes(Group g) const { return bytes_[static_cast<int>(g)]; }
  double pp_wait_s() const { return pp_wait_s_; }

 private:
  MPI_Comm comm(Group g) const;
  void count(Group g, std::size_t floats) const { bytes_[static_cast<int>(g)] += floats * sizeof(float); }

  const Comm& world_;
  int tp_ = 1, pp_ = 1, dp_ = 1, tp_rank_ = 0, pp_rank_ = 0, dp_rank_ = 0;
  MPI_Comm tp_comm_ = MPI_COMM_NULL, pp_comm_ = MPI_COMM_NULL, dp_comm_ = MPI_COMM_NULL;
  MPI_Comm embed_comm_ = MPI_COMM_NULL;  // the first and the last stage of a pipeline (pp > 1)
  mutable int64_t bytes_[3] = {0, 0, 0};
  mutable double pp_wait_s_ = 0;  // time blocked in pipeline receives
};

}  // namespace lrllm

// The parallel layout (docs/design.md, Parallel layouts): MPI_COMM_WORLD split into tensor-, pipeline- and
// data-parallel groups, tp * pp * dp = world. Tensor parallelism is innermost, so that the group that talks
// most shares a node where it can: world rank = (dp_rank * pp + pp_rank) * tp + tp_rank.
//
// Host tensors move with MPI. Device tensors (--device cuda) move with NCCL (nccl.h), since this MPI is not
// CUDA-aware; MPI still carries host data: world_sum, gather_dp (checkpoints) and gather_lines.
//
// Every collective and transfer here counts the bytes this rank hands to it (the payload: n floats of an
// allreduce count 4n, whatever algorithm MPI or NCCL picks), per communicator; training writes them to
// metrics.h5.
#pragma once

#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "lrllm/core/config.h"
#include "lrllm/model/linear.h"
#include "lrllm/parallel/mpi_world.h"
#include "lrllm/parallel/tensor_group.h"

namespace lrllm {

enum class Group { dp, tp, pp };

class Topology : public TensorReducer {
 public:
  // device_tensors: the tensors handed to the collectives and transfers below are device pointers (--device
  // cuda), which NCCL carries once start_device_transport has run. Throws InputError for device tensors in a
  // CPU-only build.
  Topology(const MpiWorld& world, const ParallelConfig& p, bool device_tensors = false);
  ~Topology() override;
  Topology(const Topology&) = delete;
  Topology& operator=(const Topology&) = delete;

  // With device tensors, creates the NCCL communicators; otherwise does nothing. Collective over the world:
  // every rank calls it once, after the backend has chosen this rank's GPU and before any collective or
  // transfer of device tensors.
  void start_device_transport();

  const MpiWorld& world() const { return world_; }
  int tp() const { return tp_; }
  int pp() const { return pp_; }
  int dp() const { return dp_; }
  int tp_rank() const { return tp_rank_; }
  int pp_rank() const { return pp_rank_; }
  int dp_rank() const { return dp_rank_; }
  bool first_stage() const { return pp_rank_ == 0; }
  bool last_stage() const { return pp_rank_ == pp_ - 1; }
  // Every rank's line (up to 255 characters), in world rank order, on world rank 0; empty elsewhere.
  std::vector<std::string> gather_lines(const std::string& line) const;
  // The world rank of a layout coordinate (the formula in this file's header, written once).
  int world_rank(int dp_rank, int pp_rank, int tp_rank) const {
    return (dp_rank * pp_ + pp_rank) * tp_ + tp_rank;
  }
  // Blocking host messages between two world ranks, received in the order they were sent: what a gather to
  // world rank 0 that writes as it receives (checkpoints) needs. Not counted in bytes().
  void send_host(int rank, const float* x, std::size_t n) const;
  void recv_host(int rank, float* x, std::size_t n) const;
  void send_text(int rank, const std::string& text) const;
  std::string recv_text(int rank) const;
  // A turn passed between world rank 0 and another rank: give_turn blocks until `rank` has taken it
  // (take_turn) and handed it back (end_turn), so that ranks take turns at one resource (a file).
  void give_turn(int rank) const;
  void take_turn() const;
  void end_turn() const;

  // In-place sum over the tensor-parallel group (the TensorReducer the linear layers use).
  void allreduce_sum(float* x, std::size_t n) const override;
  void allreduce_sum(Group g, float* x, std::size_t n) const;
  // Sums over the world, every rank getting the result.
  double world_sum(double x) const;
  void world_sum(double* x, int n) const;
  // Starts an in-place sum over the data-parallel group; the caller waits for the transfer.
  PendingTransfer iallreduce_dp(float* x, std::size_t n) const;
  // ZeRO-1's shards of a flat buffer of n floats over the data-parallel ranks (see shard_bounds).
  std::vector<std::size_t> dp_bounds(std::size_t n) const { return shard_bounds(n, dp_); }
  // n floats in `parts` shards: shard d is [bounds[d], bounds[d+1]), equal and 64-byte aligned but for the
  // last.
  static std::vector<std::size_t> shard_bounds(std::size_t n, int parts);
  // Data parallelism with sharded optimizer state: shard d of the flat buffer is [bounds[d], bounds[d+1]).
  void reduce_scatter_dp(const float* x, float* shard, const std::vector<std::size_t>& bounds) const;
  void allgather_dp(float* x, const std::vector<std::size_t>& bounds) const;
  // Gathers the shards of every data-parallel rank into full on dp rank 0 (full: bounds.back() floats there).
  // Host buffers (checkpoints), on every device.
  void gather_dp(const float* shard, float* full, const std::vector<std::size_t>& bounds) const;
  // Sum of the tied embedding's gradient between the first and last pipeline stage (pp > 1 only).
  void sum_tied_embedding(float* grad, std::size_t n) const;
  // Pipeline transfers between stages of this rank's pipeline (tag: 0 activations, 1 their gradients).
  PendingTransfer isend_stage(const float* x, std::size_t n, int stage, int tag) const;
  void recv_stage(float* x, std::size_t n, int stage, int tag) const;

  int64_t bytes(Group g) const { return bytes_[static_cast<int>(g)]; }
  // Host time blocked in pipeline receives. A device receive only queues the transfer (the GPU waits, not
  // the host), so with device tensors this stays near 0.
  double pp_wait_s() const { return pp_wait_s_; }

 private:
  // The transport of a group's tensors; with device tensors only once start_device_transport has run.
  TensorGroup& group(Group g) const;
  void count(Group g, std::size_t floats) const { bytes_[static_cast<int>(g)] += floats * sizeof(float); }

  const MpiWorld& world_;
  int tp_ = 1, pp_ = 1, dp_ = 1, tp_rank_ = 0, pp_rank_ = 0, dp_rank_ = 0;
  bool device_tensors_ = false;
  MPI_Comm tp_comm_ = MPI_COMM_NULL, pp_comm_ = MPI_COMM_NULL, dp_comm_ = MPI_COMM_NULL;
  MPI_Comm embed_comm_ = MPI_COMM_NULL;  // the first and the last stage of a pipeline (pp > 1)
  // MPI groups over those communicators, replaced by NCCL ones for device tensors (start_device_transport).
  std::unique_ptr<TensorGroup> tp_group_, pp_group_, dp_group_, embed_group_;
  bool device_transport_ = false;
  mutable int64_t bytes_[3] = {0, 0, 0};
  mutable double pp_wait_s_ = 0;  // time blocked in pipeline receives
};

}  // namespace lrllm

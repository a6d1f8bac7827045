// One interface for the tensor traffic of a process group (docs/design.md, Transport): MPI moves host
// tensors, NCCL device tensors (this Open MPI is not CUDA-aware). Topology holds one TensorGroup per group
// and never asks which transport is behind it.
#pragma once

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <memory>
#include <vector>

#include "lrllm/parallel/nccl.h"

namespace lrllm {

// A transfer in flight (TensorGroup::iallreduce_sum, send): an MPI request for host tensors, the completion
// of a NCCL op for device tensors. Once wait() returns, its buffer may be read and reused by what follows:
// MPI blocks the host until the transfer is done; NCCL makes the default stream wait for it (see nccl.h),
// which orders every later kernel and device transfer after it without blocking the host. Destroying an
// unfinished transfer lets it finish on its own (MPI_Request_free), as when a run stops on an error: its
// buffer must outlive it.
class PendingTransfer {
 public:
  PendingTransfer();
  explicit PendingTransfer(MPI_Request request);
  explicit PendingTransfer(std::unique_ptr<DeviceEvent> done);
  PendingTransfer(PendingTransfer&& other) noexcept;
  PendingTransfer& operator=(PendingTransfer&& other) noexcept;
  ~PendingTransfer();

  void wait();
  // Waits for every transfer (the MPI ones in one MPI_Waitall) and empties the list.
  static void wait_all(std::vector<PendingTransfer>& transfers);

 private:
  void release();

  MPI_Request request_ = MPI_REQUEST_NULL;
  std::unique_ptr<DeviceEvent> done_;
};

// The operations training needs of a group of ranks, on float tensors. Every rank of the group issues the
// collectives in the same order.
class TensorGroup {
 public:
  virtual ~TensorGroup() = default;
  virtual int size() const = 0;
  // In-place sum over the group, and the same started asynchronously.
  virtual void allreduce_sum(float* x, std::size_t n) = 0;
  virtual PendingTransfer iallreduce_sum(float* x, std::size_t n) = 0;
  // Rank d gets in shard the sum of x[bounds[d], bounds[d+1]).
  virtual void reduce_scatter(const float* x, float* shard, const std::vector<std::size_t>& bounds) = 0;
  // In place: every rank gets x[bounds[d], bounds[d+1]) from rank d.
  virtual void allgather(float* x, const std::vector<std::size_t>& bounds) = 0;
  // Point to point on a channel (0 or 1, as MPI tags): one channel's messages arrive in order, and the two
  // channels are independent, so activations and their gradients never wait behind each other.
  virtual PendingTransfer send(const float* x, std::size_t n, int peer, int channel) = 0;
  virtual void recv(float* x, std::size_t n, int peer, int channel) = 0;
};

// Host tensors over an MPI communicator (not owned).
std::unique_ptr<TensorGroup> make_mpi_tensor_group(MPI_Comm comm);
// Device tensors over NCCL communicators made from an MPI communicator: one, or two when point-to-point
// channels are used (the pipeline group), each with its own stream. Collective over comm.
std::unique_ptr<TensorGroup> make_nccl_tensor_group(MPI_Comm comm, bool two_channels);

// MPI counts are int: large transfers go in pieces of at most this many floats.
inline constexpr std::size_t kMaxMpiCount = INT_MAX / 2;

template <typename Fn>
void in_mpi_pieces(std::size_t n, Fn fn) {
  for (std::size_t off = 0; off < n; off += kMaxMpiCount)
    fn(off, static_cast<int>(std::min(kMaxMpiCount, n - off)));
}

// The int counts (and displacements, when given) of shards [bounds[d], bounds[d+1]). Throws RuntimeError when
// one exceeds MPI's int counts.
std::vector<int> mpi_counts(const std::vector<std::size_t>& bounds, std::vector<int>* displs);

}  // namespace lrllm

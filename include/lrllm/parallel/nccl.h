// NCCL, the transport of device tensors between GPU ranks (docs/design.md, Transport): Open MPI here is not
// CUDA-aware, so a Topology whose tensors live on GPUs moves them with NCCL, while MPI bootstraps each
// communicator (the unique id) and still carries host data. Plain C++ without CUDA types, so that host code
// includes it without CUDA's headers; the implementation is cuda/nccl.cu.
//
// Streams: the CUDA backend runs every kernel on the legacy default stream. Each group has its own
// non-blocking stream. An op first makes that stream wait for the default stream's work so far (its inputs
// are written); a blocking op then makes the default stream wait for the op (later kernels see its result);
// an asynchronous op leaves that to its DeviceEvent. None of them blocks the host.
#pragma once

#include <mpi.h>

#include <cstddef>
#include <memory>
#include <vector>

namespace lrllm {

// The completion of an asynchronous op. Destroying it while the op runs lets the op finish.
class DeviceEvent {
 public:
  virtual ~DeviceEvent() = default;
  // Makes the default stream wait for the op: kernels and transfers issued afterwards see its result and may
  // overwrite its buffers.
  virtual void wait() = 0;
};

// One NCCL communicator over the ranks of an MPI communicator (NCCL rank = MPI rank), with its own stream.
// Its ops run one after the other in issue order, so every rank must issue them in the same order.
class NcclGroup {
 public:
  virtual ~NcclGroup() = default;

  // In-place sum over the group.
  virtual void allreduce_sum(float* x, std::size_t n) = 0;
  // The same, asynchronous.
  virtual std::unique_ptr<DeviceEvent> iallreduce_sum(float* x, std::size_t n) = 0;
  // Rank d gets in shard the sum of x[bounds[d], bounds[d+1]).
  virtual void reduce_scatter(const float* x, float* shard, const std::vector<std::size_t>& bounds) = 0;
  // In place: every rank gets x[bounds[d], bounds[d+1]) from rank d.
  virtual void allgather(float* x, const std::vector<std::size_t>& bounds) = 0;
  // Point to point; the send's buffer must not change until its event has been waited for.
  virtual std::unique_ptr<DeviceEvent> send(const float* x, std::size_t n, int peer) = 0;
  virtual void recv(float* x, std::size_t n, int peer) = 0;
};

// Collective over comm: its rank 0 creates the unique id and MPI_Bcast hands it to the others. This process's
// GPU must be chosen (cudaSetDevice) before. Throws RuntimeError; in a CPU-only build, always.
std::unique_ptr<NcclGroup> make_nccl_group(MPI_Comm comm);

}  // namespace lrllm

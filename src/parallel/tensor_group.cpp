#include "lrllm/parallel/tensor_group.h"

#include <string>
#include <utility>

#include "lrllm/core/common.h"
#include "lrllm/parallel/mpi_world.h"

namespace lrllm {

PendingTransfer::PendingTransfer() = default;

PendingTransfer::PendingTransfer(MPI_Request request) : request_(request) {}

PendingTransfer::PendingTransfer(std::unique_ptr<DeviceEvent> done) : done_(std::move(done)) {}

PendingTransfer::PendingTransfer(PendingTransfer&& other) noexcept
    : request_(std::exchange(other.request_, MPI_REQUEST_NULL)), done_(std::move(other.done_)) {}

PendingTransfer& PendingTransfer::operator=(PendingTransfer&& other) noexcept {
  if (this != &other) {
    release();
    request_ = std::exchange(other.request_, MPI_REQUEST_NULL);
    done_ = std::move(other.done_);
  }
  return *this;
}

PendingTransfer::~PendingTransfer() {
  release();
}

void PendingTransfer::release() {
  if (request_ != MPI_REQUEST_NULL) MPI_Request_free(&request_);
  done_.reset();
}

void PendingTransfer::wait() {
  if (request_ != MPI_REQUEST_NULL) LRLLM_MPI(MPI_Wait(&request_, MPI_STATUS_IGNORE));
  if (done_ != nullptr) {
    done_->wait();
    done_.reset();
  }
}

void PendingTransfer::wait_all(std::vector<PendingTransfer>& transfers) {
  std::vector<MPI_Request> requests;
  for (PendingTransfer& t : transfers)
    if (t.request_ != MPI_REQUEST_NULL)
      requests.push_back(std::exchange(t.request_, MPI_REQUEST_NULL));
    else
      t.wait();
  if (!requests.empty())
    LRLLM_MPI(MPI_Waitall(static_cast<int>(requests.size()), requests.data(), MPI_STATUSES_IGNORE));
  transfers.clear();
}

std::vector<int> mpi_counts(const std::vector<std::size_t>& bounds, std::vector<int>* displs) {
  std::vector<int> counts;
  for (std::size_t d = 0; d + 1 < bounds.size(); ++d) {
    if (bounds[d + 1] > kMaxMpiCount) throw RuntimeError("a ZeRO shard buffer exceeds MPI's int counts");
    counts.push_back(static_cast<int>(bounds[d + 1] - bounds[d]));
    if (displs != nullptr) displs->push_back(static_cast<int>(bounds[d]));
  }
  return counts;
}

namespace {

int checked_count(std::size_t n, const char* what) {
  if (n > kMaxMpiCount) throw RuntimeError(std::string(what) + " exceeds MPI's int counts");
  return static_cast<int>(n);
}

class MpiTensorGroup final : public TensorGroup {
 public:
  explicit MpiTensorGroup(MPI_Comm comm) : comm_(comm) { LRLLM_MPI(MPI_Comm_size(comm_, &size_)); }
  int size() const override { return size_; }
  void allreduce_sum(float* x, std::size_t n) override {
    in_mpi_pieces(n, [&](std::size_t off, int c) {
      LRLLM_MPI(MPI_Allreduce(MPI_IN_PLACE, x + off, c, MPI_FLOAT, MPI_SUM, comm_));
    });
  }
  PendingTransfer iallreduce_sum(float* x, std::size_t n) override {
    MPI_Request req = MPI_REQUEST_NULL;
    LRLLM_MPI(MPI_Iallreduce(MPI_IN_PLACE, x, checked_count(n, "a gradient bucket"), MPI_FLOAT, MPI_SUM,
                             comm_, &req));
    return PendingTransfer(req);
  }
  void reduce_scatter(const float* x, float* shard, const std::vector<std::size_t>& bounds) override {
    const std::vector<int> counts = mpi_counts(bounds, nullptr);
    LRLLM_MPI(MPI_Reduce_scatter(x, shard, counts.data(), MPI_FLOAT, MPI_SUM, comm_));
  }
  void allgather(float* x, const std::vector<std::size_t>& bounds) override {
    std::vector<int> displs;
    const std::vector<int> counts = mpi_counts(bounds, &displs);
    LRLLM_MPI(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, x, counts.data(), displs.data(), MPI_FLOAT,
                             comm_));
  }
  PendingTransfer send(const float* x, std::size_t n, int peer, int channel) override {
    MPI_Request req = MPI_REQUEST_NULL;
    LRLLM_MPI(MPI_Isend(x, checked_count(n, "a pipeline transfer"), MPI_FLOAT, peer, channel, comm_, &req));
    return PendingTransfer(req);
  }
  void recv(float* x, std::size_t n, int peer, int channel) override {
    LRLLM_MPI(MPI_Recv(x, checked_count(n, "a pipeline transfer"), MPI_FLOAT, peer, channel, comm_,
                       MPI_STATUS_IGNORE));
  }

 private:
  MPI_Comm comm_;
  int size_ = 1;
};

// NCCL runs a communicator's ops in issue order, and a send completes only once its peer's receive runs; on
// one communicator, 1F1B deadlocks (pp 2, 2 micro-batches: stage 0 sends a0, a1, then receives g0; stage 1
// receives a0, sends g0, then receives a1, so a1 waits behind g0 and g0 behind a1). A communicator per
// channel, each with its own stream, keeps the directions independent, as MPI's tags do.
class NcclTensorGroup final : public TensorGroup {
 public:
  NcclTensorGroup(MPI_Comm comm, bool two_channels) {
    LRLLM_MPI(MPI_Comm_size(comm, &size_));
    for (int c = 0; c < (two_channels ? 2 : 1); ++c) channels_.push_back(make_nccl_group(comm));
  }
  int size() const override { return size_; }
  void allreduce_sum(float* x, std::size_t n) override { channels_[0]->allreduce_sum(x, n); }
  PendingTransfer iallreduce_sum(float* x, std::size_t n) override {
    return PendingTransfer(channels_[0]->iallreduce_sum(x, n));
  }
  void reduce_scatter(const float* x, float* shard, const std::vector<std::size_t>& bounds) override {
    channels_[0]->reduce_scatter(x, shard, bounds);
  }
  void allgather(float* x, const std::vector<std::size_t>& bounds) override {
    channels_[0]->allgather(x, bounds);
  }
  PendingTransfer send(const float* x, std::size_t n, int peer, int channel) override {
    return PendingTransfer(of(channel).send(x, n, peer));
  }
  void recv(float* x, std::size_t n, int peer, int channel) override { of(channel).recv(x, n, peer); }

 private:
  NcclGroup& of(int channel) {
    if (channel < 0 || channel >= static_cast<int>(channels_.size()))
      throw RuntimeError(strprintf("channel %d of a NCCL group with %zu", channel, channels_.size()));
    return *channels_[channel];
  }
  std::vector<std::unique_ptr<NcclGroup>> channels_;
  int size_ = 1;
};

}  // namespace

std::unique_ptr<TensorGroup> make_mpi_tensor_group(MPI_Comm comm) {
  return std::make_unique<MpiTensorGroup>(comm);
}

std::unique_ptr<TensorGroup> make_nccl_tensor_group(MPI_Comm comm, bool two_channels) {
  return std::make_unique<NcclTensorGroup>(comm, two_channels);
}

#ifndef LRLLM_WITH_CUDA
std::unique_ptr<NcclGroup> make_nccl_group(MPI_Comm) {
  throw RuntimeError("NCCL is not part of this CPU-only build");
}
#endif

}  // namespace lrllm

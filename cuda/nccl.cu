// The NCCL transport of device tensors (include/lrllm/parallel/nccl.h).
#include <nccl.h>

#include <exception>
#include <string>

#include "check.cuh"
#include "lrllm/parallel/mpi_world.h"
#include "lrllm/parallel/nccl.h"

#define LRLLM_NCCL(call) ::lrllm::check_nccl((call), #call, __FILE__, __LINE__)

namespace lrllm {
namespace {

void check_nccl(ncclResult_t code, const char* call, const char* file, int line) {
  if (code == ncclSuccess) return;
  std::string detail = ncclGetErrorString(code);
  // NCCL's last error names what failed (a peer, a transport), which the code alone does not.
  const char* last = ncclGetLastError(nullptr);
  if (last != nullptr && *last != '\0') detail += std::string(": ") + last;
  fail_call(call, detail, file, line);
}

// The legacy default stream, where the backend runs every kernel.
const cudaStream_t kCompute = nullptr;

class Event final : public DeviceEvent {
 public:
  Event() { LRLLM_CUDA(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming)); }
  ~Event() override { cudaEventDestroy(event_); }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  void record(cudaStream_t stream) { LRLLM_CUDA(cudaEventRecord(event_, stream)); }
  void wait() override { LRLLM_CUDA(cudaStreamWaitEvent(kCompute, event_, 0)); }

 private:
  cudaEvent_t event_ = nullptr;
};

class Group final : public NcclGroup {
 public:
  Group() = default;
  ~Group() override;
  Group(const Group&) = delete;
  Group& operator=(const Group&) = delete;

  void start(MPI_Comm comm);

  void allreduce_sum(float* x, std::size_t n) override {
    begin();
    LRLLM_NCCL(ncclAllReduce(x, x, n, ncclFloat, ncclSum, comm_, stream_));
    finish();
  }

  std::unique_ptr<DeviceEvent> iallreduce_sum(float* x, std::size_t n) override {
    begin();
    LRLLM_NCCL(ncclAllReduce(x, x, n, ncclFloat, ncclSum, comm_, stream_));
    return finish_async();
  }

  // NCCL's reduce-scatter and allgather want equal shards, and the last of Topology::shard_bounds is shorter:
  // padding would need a padded copy of the whole buffer. Instead one reduce (or broadcast) per shard, rooted
  // at its owner, in one NCCL group: NCCL launches them together, and each rank still sends about the
  // n (ranks - 1) / ranks floats of a ring reduce-scatter (allgather).
  void reduce_scatter(const float* x, float* shard, const std::vector<std::size_t>& bounds) override {
    begin();
    LRLLM_NCCL(ncclGroupStart());
    for (std::size_t d = 0; d + 1 < bounds.size(); ++d)
      if (bounds[d + 1] > bounds[d])
        LRLLM_NCCL(ncclReduce(x + bounds[d], shard, bounds[d + 1] - bounds[d], ncclFloat, ncclSum,
                              static_cast<int>(d), comm_, stream_));
    LRLLM_NCCL(ncclGroupEnd());
    finish();
  }

  void allgather(float* x, const std::vector<std::size_t>& bounds) override {
    begin();
    LRLLM_NCCL(ncclGroupStart());
    for (std::size_t d = 0; d + 1 < bounds.size(); ++d)
      if (bounds[d + 1] > bounds[d])
        LRLLM_NCCL(ncclBroadcast(x + bounds[d], x + bounds[d], bounds[d + 1] - bounds[d], ncclFloat,
                                 static_cast<int>(d), comm_, stream_));
    LRLLM_NCCL(ncclGroupEnd());
    finish();
  }

  std::unique_ptr<DeviceEvent> send(const float* x, std::size_t n, int peer) override {
    begin();
    LRLLM_NCCL(ncclSend(x, n, ncclFloat, peer, comm_, stream_));
    return finish_async();
  }

  void recv(float* x, std::size_t n, int peer) override {
    begin();
    LRLLM_NCCL(ncclRecv(x, n, ncclFloat, peer, comm_, stream_));
    finish();
  }

 private:
  // The group's stream waits for the work issued so far on the default stream: the op's inputs are written,
  // and its outputs are no longer read there.
  void begin() {
    LRLLM_CUDA(cudaEventRecord(issued_, kCompute));
    LRLLM_CUDA(cudaStreamWaitEvent(stream_, issued_, 0));
  }
  // The default stream waits for the op. A stream waits for an event's record as of the wait call, so the two
  // events are recorded again by the next op without disturbing this one.
  void finish() {
    LRLLM_CUDA(cudaEventRecord(done_, stream_));
    LRLLM_CUDA(cudaStreamWaitEvent(kCompute, done_, 0));
  }
  std::unique_ptr<DeviceEvent> finish_async() {
    auto done = std::make_unique<Event>();
    done->record(stream_);
    return done;
  }

  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t issued_ = nullptr, done_ = nullptr;
};

void Group::start(MPI_Comm comm) {
  int rank = 0, size = 1;
  LRLLM_MPI(MPI_Comm_rank(comm, &rank));
  LRLLM_MPI(MPI_Comm_size(comm, &size));
  ncclUniqueId id{};
  if (rank == 0) LRLLM_NCCL(ncclGetUniqueId(&id));
  LRLLM_MPI(MPI_Bcast(&id, static_cast<int>(sizeof id), MPI_BYTE, 0, comm));
  // Non-blocking: the legacy default stream would otherwise wait for every op here, and they for it.
  LRLLM_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  LRLLM_CUDA(cudaEventCreateWithFlags(&issued_, cudaEventDisableTiming));
  LRLLM_CUDA(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
  LRLLM_NCCL(ncclCommInitRank(&comm_, size, id, rank));
}

Group::~Group() {
  if (comm_ != nullptr) {
    // On an error's way out, peers may never finish what is in flight, and finalizing would wait for them.
    if (std::uncaught_exceptions() > 0) {
      ncclCommAbort(comm_);
    } else {
      ncclCommFinalize(comm_);
      ncclCommDestroy(comm_);
    }
  }
  if (done_ != nullptr) cudaEventDestroy(done_);
  if (issued_ != nullptr) cudaEventDestroy(issued_);
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

}  // namespace

std::unique_ptr<NcclGroup> make_nccl_group(MPI_Comm comm) {
  auto group = std::make_unique<Group>();
  group->start(comm);
  return group;
}

}  // namespace lrllm

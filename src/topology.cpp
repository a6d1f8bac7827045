#include "lrllm/topology.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <limits>
#include <utility>

#include "lrllm/common.h"
#include "lrllm/nccl.h"

namespace lrllm {
namespace {

// MPI counts are int: large transfers go in pieces of at most this many floats.
constexpr std::size_t kMaxCount = INT_MAX / 2;

template <typename Fn>
void in_pieces(std::size_t n, Fn fn) {
  for (std::size_t off = 0; off < n; off += kMaxCount)
    fn(off, static_cast<int>(std::min(kMaxCount, n - off)));
}

std::vector<int> int_counts(const std::vector<std::size_t>& bounds, std::vector<int>* displs) {
  std::vector<int> counts;
  for (std::size_t d = 0; d + 1 < bounds.size(); ++d) {
    if (bounds[d + 1] > kMaxCount) throw RuntimeError("a ZeRO shard buffer exceeds MPI's int counts");
    counts.push_back(static_cast<int>(bounds[d + 1] - bounds[d]));
    if (displs != nullptr) displs->push_back(static_cast<int>(bounds[d]));
  }
  return counts;
}

NcclGroup& started(const std::unique_ptr<NcclGroup>& group) {
  if (group == nullptr)
    throw RuntimeError("a collective of device tensors before Topology::start_device_transport");
  return *group;
}

}  // namespace

#ifndef LRLLM_WITH_CUDA
std::unique_ptr<NcclGroup> make_nccl_group(MPI_Comm) {
  throw RuntimeError("NCCL is not part of this CPU-only build");
}
#endif

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

Topology::Topology(const Comm& world, const ParallelConfig& p, bool device_tensors)
    : world_(world), tp_(p.tp), pp_(p.pp), device_tensors_(device_tensors) {
#ifndef LRLLM_WITH_CUDA
  // Every rank alike (the option is the same everywhere) and before any split; the lowest rank reports it.
  if (device_tensors_)
    collective_check(world, [] {
      throw InputError(
          "--device cuda: this build of lrllm is CPU-only (rebuild on a machine with nvcc, cuBLAS and NCCL)");
    });
#endif
  dp_ = world.size() / (tp_ * pp_);
  const int r = world.rank();
  tp_rank_ = r % tp_;
  pp_rank_ = (r / tp_) % pp_;
  dp_rank_ = r / (tp_ * pp_);
  LRLLM_MPI(MPI_Comm_split(MPI_COMM_WORLD, dp_rank_ * pp_ + pp_rank_, tp_rank_, &tp_comm_));
  LRLLM_MPI(MPI_Comm_split(MPI_COMM_WORLD, dp_rank_ * tp_ + tp_rank_, pp_rank_, &pp_comm_));
  LRLLM_MPI(MPI_Comm_split(MPI_COMM_WORLD, pp_rank_ * tp_ + tp_rank_, dp_rank_, &dp_comm_));
  const bool ends = pp_ > 1 && (first_stage() || last_stage());
  LRLLM_MPI(MPI_Comm_split(MPI_COMM_WORLD, ends ? dp_rank_ * tp_ + tp_rank_ : MPI_UNDEFINED, pp_rank_,
                           &embed_comm_));
  for (MPI_Comm c : {tp_comm_, pp_comm_, dp_comm_, embed_comm_})
    if (c != MPI_COMM_NULL) LRLLM_MPI(MPI_Comm_set_errhandler(c, MPI_ERRORS_RETURN));
}

Topology::~Topology() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  for (MPI_Comm* c : {&tp_comm_, &pp_comm_, &dp_comm_, &embed_comm_})
    if (*c != MPI_COMM_NULL) MPI_Comm_free(c);
}

void Topology::start_device_transport() {
  if (!device_tensors_) return;
  // Here, explicitly, not on first use: creating a communicator is collective, and a pipeline stage's first
  // transfer is not one that all its peers reach together. Every rank creates them in the same order, joining
  // those it belongs to, so that no rank waits in one communicator's creation for a peer that waits in
  // another's.
  if (tp_ > 1) tp_nccl_ = make_nccl_group(tp_comm_);
  // One communicator per pipeline tag: activations go forward on the first, their gradients backward on the
  // second. NCCL runs a communicator's ops in issue order, and a send completes only once its peer's receive
  // runs; on one communicator, 1F1B deadlocks (pp 2, 2 micro-batches: stage 0 sends a0, a1, then receives
  // g0; stage 1 receives a0, sends g0, then receives a1, so a1 waits behind g0 and g0 behind a1). Two
  // communicators, each with its own stream, keep the directions independent, as MPI's tags do.
  if (pp_ > 1)
    for (std::unique_ptr<NcclGroup>& g : pp_nccl_) g = make_nccl_group(pp_comm_);
  dp_nccl_ = make_nccl_group(dp_comm_);
  if (embed_comm_ != MPI_COMM_NULL) embed_nccl_ = make_nccl_group(embed_comm_);
}

std::vector<std::string> Topology::gather_lines(const std::string& line) const {
  // Fixed-size records: one gather, and no rank's line can overrun another's.
  constexpr std::size_t kWidth = 256;
  char mine[kWidth] = {};
  std::snprintf(mine, sizeof mine, "%s", line.c_str());
  std::vector<char> all(world_.root() ? kWidth * world_.size() : 0);
  LRLLM_MPI(MPI_Gather(mine, kWidth, MPI_CHAR, all.data(), kWidth, MPI_CHAR, 0, MPI_COMM_WORLD));
  std::vector<std::string> lines;
  for (int r = 0; world_.root() && r < world_.size(); ++r) lines.emplace_back(all.data() + r * kWidth);
  return lines;
}

namespace {
constexpr int kHostTag = 7;  // send_host / send_text / turns: world-communicator messages of their own tag
}  // namespace

void Topology::send_host(int rank, const float* x, std::size_t n) const {
  in_pieces(n, [&](std::size_t off, int c) {
    LRLLM_MPI(MPI_Send(x + off, c, MPI_FLOAT, rank, kHostTag, MPI_COMM_WORLD));
  });
}

void Topology::recv_host(int rank, float* x, std::size_t n) const {
  in_pieces(n, [&](std::size_t off, int c) {
    LRLLM_MPI(MPI_Recv(x + off, c, MPI_FLOAT, rank, kHostTag, MPI_COMM_WORLD, MPI_STATUS_IGNORE));
  });
}

void Topology::send_text(int rank, const std::string& text) const {
  if (text.size() > kMaxCount) throw RuntimeError("a text message exceeds MPI's int counts");
  LRLLM_MPI(MPI_Send(text.data(), static_cast<int>(text.size()), MPI_CHAR, rank, kHostTag, MPI_COMM_WORLD));
}

std::string Topology::recv_text(int rank) const {
  MPI_Status status;
  int len = 0;
  LRLLM_MPI(MPI_Probe(rank, kHostTag, MPI_COMM_WORLD, &status));
  LRLLM_MPI(MPI_Get_count(&status, MPI_CHAR, &len));
  std::string text(static_cast<std::size_t>(len), '\0');
  LRLLM_MPI(MPI_Recv(text.data(), len, MPI_CHAR, rank, kHostTag, MPI_COMM_WORLD, MPI_STATUS_IGNORE));
  return text;
}

void Topology::give_turn(int rank) const {
  int turn = rank;
  LRLLM_MPI(MPI_Send(&turn, 1, MPI_INT, rank, kHostTag, MPI_COMM_WORLD));
  LRLLM_MPI(MPI_Recv(&turn, 1, MPI_INT, rank, kHostTag, MPI_COMM_WORLD, MPI_STATUS_IGNORE));
}

void Topology::take_turn() const {
  int turn = 0;
  LRLLM_MPI(MPI_Recv(&turn, 1, MPI_INT, 0, kHostTag, MPI_COMM_WORLD, MPI_STATUS_IGNORE));
}

void Topology::end_turn() const {
  int turn = world_.rank();
  LRLLM_MPI(MPI_Send(&turn, 1, MPI_INT, 0, kHostTag, MPI_COMM_WORLD));
}

MPI_Comm Topology::comm(Group g) const {
  return g == Group::dp ? dp_comm_ : g == Group::tp ? tp_comm_ : pp_comm_;
}

NcclGroup& Topology::nccl(Group g) const {
  return started(g == Group::dp ? dp_nccl_ : g == Group::tp ? tp_nccl_ : pp_nccl_[0]);
}

NcclGroup& Topology::nccl_pp(int tag) const {
  if (tag != 0 && tag != 1)
    throw RuntimeError(strprintf("pipeline tag %d: device transfers have tags 0 and 1", tag));
  return started(pp_nccl_[tag]);
}

void Topology::allreduce_sum(float* x, std::size_t n) const {
  allreduce_sum(Group::tp, x, n);
}

void Topology::allreduce_sum(Group g, float* x, std::size_t n) const {
  int size = 1;
  LRLLM_MPI(MPI_Comm_size(comm(g), &size));
  if (size == 1) return;
  count(g, n);
  if (device_tensors_) {
    nccl(g).allreduce_sum(x, n);
    return;
  }
  in_pieces(n, [&](std::size_t off, int c) {
    LRLLM_MPI(MPI_Allreduce(MPI_IN_PLACE, x + off, c, MPI_FLOAT, MPI_SUM, comm(g)));
  });
}

double Topology::world_sum(double x) const {
  world_sum(&x, 1);
  return x;
}

void Topology::world_sum(double* x, int n) const {
  if (world_.size() > 1) LRLLM_MPI(MPI_Allreduce(MPI_IN_PLACE, x, n, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD));
}

PendingTransfer Topology::iallreduce_dp(float* x, std::size_t n) const {
  if (device_tensors_) {
    count(Group::dp, n);
    return PendingTransfer(nccl(Group::dp).iallreduce_sum(x, n));
  }
  if (n > kMaxCount) throw RuntimeError("a gradient bucket exceeds MPI's int counts");
  count(Group::dp, n);
  MPI_Request req = MPI_REQUEST_NULL;
  LRLLM_MPI(MPI_Iallreduce(MPI_IN_PLACE, x, static_cast<int>(n), MPI_FLOAT, MPI_SUM, dp_comm_, &req));
  return PendingTransfer(req);
}

std::vector<std::size_t> Topology::shard_bounds(std::size_t n, int parts) {
  const std::size_t share = ((n + parts - 1) / parts + 15) / 16 * 16;
  std::vector<std::size_t> bounds;
  for (int d = 0; d <= parts; ++d) bounds.push_back(std::min(n, share * d));
  return bounds;
}

void Topology::reduce_scatter_dp(const float* x, float* shard, const std::vector<std::size_t>& bounds) const {
  count(Group::dp, bounds.back());
  if (device_tensors_) {
    nccl(Group::dp).reduce_scatter(x, shard, bounds);
    return;
  }
  const std::vector<int> counts = int_counts(bounds, nullptr);
  LRLLM_MPI(MPI_Reduce_scatter(x, shard, counts.data(), MPI_FLOAT, MPI_SUM, dp_comm_));
}

void Topology::allgather_dp(float* x, const std::vector<std::size_t>& bounds) const {
  count(Group::dp, bounds[dp_rank_ + 1] - bounds[dp_rank_]);
  if (device_tensors_) {
    nccl(Group::dp).allgather(x, bounds);
    return;
  }
  std::vector<int> displs;
  const std::vector<int> counts = int_counts(bounds, &displs);
  LRLLM_MPI(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, x, counts.data(), displs.data(), MPI_FLOAT,
                           dp_comm_));
}

void Topology::gather_dp(const float* shard, float* full, const std::vector<std::size_t>& bounds) const {
  std::vector<int> displs;
  const std::vector<int> counts = int_counts(bounds, &displs);
  LRLLM_MPI(MPI_Gatherv(shard, counts[dp_rank_], MPI_FLOAT, full, counts.data(), displs.data(), MPI_FLOAT, 0,
                        dp_comm_));
}

void Topology::sum_tied_embedding(float* grad, std::size_t n) const {
  if (embed_comm_ == MPI_COMM_NULL) return;
  count(Group::pp, n);
  if (device_tensors_) {
    started(embed_nccl_).allreduce_sum(grad, n);
    return;
  }
  in_pieces(n, [&](std::size_t off, int c) {
    LRLLM_MPI(MPI_Allreduce(MPI_IN_PLACE, grad + off, c, MPI_FLOAT, MPI_SUM, embed_comm_));
  });
}

PendingTransfer Topology::isend_stage(const float* x, std::size_t n, int stage, int tag) const {
  if (device_tensors_) {
    count(Group::pp, n);
    return PendingTransfer(nccl_pp(tag).send(x, n, stage));
  }
  if (n > kMaxCount) throw RuntimeError("a pipeline transfer exceeds MPI's int counts");
  count(Group::pp, n);
  MPI_Request req = MPI_REQUEST_NULL;
  LRLLM_MPI(MPI_Isend(x, static_cast<int>(n), MPI_FLOAT, stage, tag, pp_comm_, &req));
  return PendingTransfer(req);
}

void Topology::recv_stage(float* x, std::size_t n, int stage, int tag) const {
  const auto t0 = std::chrono::steady_clock::now();
  if (device_tensors_)
    nccl_pp(tag).recv(x, n, stage);
  else
    LRLLM_MPI(MPI_Recv(x, static_cast<int>(n), MPI_FLOAT, stage, tag, pp_comm_, MPI_STATUS_IGNORE));
  pp_wait_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace lrllm

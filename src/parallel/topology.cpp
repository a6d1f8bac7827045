#include "lrllm/parallel/topology.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <limits>
#include <utility>

#include "lrllm/core/common.h"
#include "lrllm/parallel/tensor_group.h"

namespace lrllm {
Topology::Topology(const MpiWorld& world, const ParallelConfig& p, bool device_tensors)
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
  // Host tensors until start_device_transport, which replaces these where tensors live on GPUs.
  tp_group_ = make_mpi_tensor_group(tp_comm_);
  pp_group_ = make_mpi_tensor_group(pp_comm_);
  dp_group_ = make_mpi_tensor_group(dp_comm_);
  if (embed_comm_ != MPI_COMM_NULL) embed_group_ = make_mpi_tensor_group(embed_comm_);
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
  // another's. A group of one rank needs none, but dp's ZeRO reduce-scatter runs even alone.
  if (tp_ > 1) tp_group_ = make_nccl_tensor_group(tp_comm_, false);
  if (pp_ > 1) pp_group_ = make_nccl_tensor_group(pp_comm_, true);
  dp_group_ = make_nccl_tensor_group(dp_comm_, false);
  if (embed_comm_ != MPI_COMM_NULL) embed_group_ = make_nccl_tensor_group(embed_comm_, false);
  device_transport_ = true;
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
  in_mpi_pieces(n, [&](std::size_t off, int c) {
    LRLLM_MPI(MPI_Send(x + off, c, MPI_FLOAT, rank, kHostTag, MPI_COMM_WORLD));
  });
}

void Topology::recv_host(int rank, float* x, std::size_t n) const {
  in_mpi_pieces(n, [&](std::size_t off, int c) {
    LRLLM_MPI(MPI_Recv(x + off, c, MPI_FLOAT, rank, kHostTag, MPI_COMM_WORLD, MPI_STATUS_IGNORE));
  });
}

void Topology::send_text(int rank, const std::string& text) const {
  if (text.size() > kMaxMpiCount) throw RuntimeError("a text message exceeds MPI's int counts");
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

TensorGroup& Topology::group(Group g) const {
  if (device_tensors_ && !device_transport_)
    throw RuntimeError("a collective of device tensors before Topology::start_device_transport");
  return g == Group::dp ? *dp_group_ : g == Group::tp ? *tp_group_ : *pp_group_;
}

void Topology::allreduce_sum(float* x, std::size_t n) const {
  allreduce_sum(Group::tp, x, n);
}

void Topology::allreduce_sum(Group g, float* x, std::size_t n) const {
  TensorGroup& to = group(g);
  if (to.size() == 1) return;
  count(g, n);
  to.allreduce_sum(x, n);
}

double Topology::world_sum(double x) const {
  world_sum(&x, 1);
  return x;
}

void Topology::world_sum(double* x, int n) const {
  if (world_.size() > 1) LRLLM_MPI(MPI_Allreduce(MPI_IN_PLACE, x, n, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD));
}

PendingTransfer Topology::iallreduce_dp(float* x, std::size_t n) const {
  TensorGroup& dp = group(Group::dp);
  count(Group::dp, n);
  return dp.iallreduce_sum(x, n);
}

std::vector<std::size_t> Topology::shard_bounds(std::size_t n, int parts) {
  const std::size_t share = ((n + parts - 1) / parts + 15) / 16 * 16;
  std::vector<std::size_t> bounds;
  for (int d = 0; d <= parts; ++d) bounds.push_back(std::min(n, share * d));
  return bounds;
}

void Topology::reduce_scatter_dp(const float* x, float* shard, const std::vector<std::size_t>& bounds) const {
  TensorGroup& dp = group(Group::dp);
  count(Group::dp, bounds.back());
  dp.reduce_scatter(x, shard, bounds);
}

void Topology::allgather_dp(float* x, const std::vector<std::size_t>& bounds) const {
  TensorGroup& dp = group(Group::dp);
  count(Group::dp, bounds[dp_rank_ + 1] - bounds[dp_rank_]);
  dp.allgather(x, bounds);
}

void Topology::gather_dp(const float* shard, float* full, const std::vector<std::size_t>& bounds) const {
  std::vector<int> displs;
  const std::vector<int> counts = mpi_counts(bounds, &displs);
  LRLLM_MPI(MPI_Gatherv(shard, counts[dp_rank_], MPI_FLOAT, full, counts.data(), displs.data(), MPI_FLOAT, 0,
                        dp_comm_));
}

void Topology::sum_tied_embedding(float* grad, std::size_t n) const {
  if (embed_group_ == nullptr) return;
  group(Group::pp);  // the same check: device tensors need the device transport
  count(Group::pp, n);
  embed_group_->allreduce_sum(grad, n);
}

PendingTransfer Topology::isend_stage(const float* x, std::size_t n, int stage, int tag) const {
  TensorGroup& pp = group(Group::pp);
  count(Group::pp, n);
  return pp.send(x, n, stage, tag);
}

void Topology::recv_stage(float* x, std::size_t n, int stage, int tag) const {
  TensorGroup& pp = group(Group::pp);
  const auto t0 = std::chrono::steady_clock::now();
  pp.recv(x, n, stage, tag);
  pp_wait_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace lrllm

// MPI for every run (launched by mpirun, srun, or alone as a singleton). Every MPI call is checked.
#pragma once

#include <mpi.h>

#include <cstddef>
#include <functional>
#include <string>

namespace lrllm {

class MpiWorld {
 public:
  // Initialises MPI (once per process) and returns the world communicator's view.
  static MpiWorld& world(int* argc = nullptr, char*** argv = nullptr);
  // Finalises MPI if it was initialised; safe to call more than once.
  static void finalize();
  // Ends every rank of the job at once: used when one rank fails mid-run and the others could wait forever.
  [[noreturn]] static void abort(int code);

  int rank() const { return rank_; }
  int size() const { return size_; }
  int local_rank() const { return local_rank_; }
  int local_size() const { return local_size_; }
  bool root() const { return rank_ == 0; }

  double allreduce_sum(double x) const;
  void barrier() const;

 private:
  MpiWorld() = default;
  int rank_ = 0, size_ = 1, local_rank_ = 0, local_size_ = 1;
  MPI_Comm local_ = MPI_COMM_NULL;
};

// Runs fn on every rank and agrees on the outcome: when fn throws InputError on some ranks, every rank
// throws, the lowest failing rank with its message and the others with PeerInputError, which is not printed.
// This keeps a bad input from leaving the healthy ranks waiting in a collective.
void collective_check(const MpiWorld& comm, const std::function<void()>& fn);

void mpi_check(int code, const char* call, const char* file, int line);

}  // namespace lrllm

#define LRLLM_MPI(call) ::lrllm::mpi_check((call), #call, __FILE__, __LINE__)

#include "lrllm/parallel/mpi_world.h"

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "lrllm/core/common.h"

namespace lrllm {

void mpi_check(int code, const char* call, const char* file, int line) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, text, &len);
  fail_call(call, std::string(text, len), file, line);
}

MpiWorld& MpiWorld::world(int* argc, char*** argv) {
  static MpiWorld comm;
  static bool ready = false;
  if (ready) return comm;
  int initialized = 0;
  LRLLM_MPI(MPI_Initialized(&initialized));
  if (!initialized) {
    int provided = 0;
    LRLLM_MPI(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided));
  }
  // Errors come back as codes that LRLLM_MPI turns into messages naming the call.
  LRLLM_MPI(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  LRLLM_MPI(MPI_Comm_rank(MPI_COMM_WORLD, &comm.rank_));
  LRLLM_MPI(MPI_Comm_size(MPI_COMM_WORLD, &comm.size_));
  LRLLM_MPI(
      MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, comm.rank_, MPI_INFO_NULL, &comm.local_));
  LRLLM_MPI(MPI_Comm_rank(comm.local_, &comm.local_rank_));
  LRLLM_MPI(MPI_Comm_size(comm.local_, &comm.local_size_));
  ready = true;
  return comm;
}

void MpiWorld::finalize() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Finalize();
}

void MpiWorld::abort(int code) {
  std::fflush(stdout);
  std::fflush(stderr);
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

double MpiWorld::allreduce_sum(double x) const {
  double out = x;
  if (size_ > 1) LRLLM_MPI(MPI_Allreduce(&x, &out, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD));
  return out;
}

void collective_check(const MpiWorld& comm, const std::function<void()>& fn) {
  std::string message;
  bool failed = false;
  try {
    fn();
  } catch (const InputError& e) {
    failed = true;
    message = e.what();
  }
  if (comm.size() == 1) {
    if (failed) throw InputError(message);
    return;
  }
  const int mine = failed ? comm.rank() : INT_MAX;
  int first = INT_MAX;
  LRLLM_MPI(MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
  if (first == INT_MAX) return;
  if (first == comm.rank()) throw InputError(message);
  throw PeerInputError();
}

void MpiWorld::barrier() const {
  LRLLM_MPI(MPI_Barrier(MPI_COMM_WORLD));
}

}  // namespace lrllm

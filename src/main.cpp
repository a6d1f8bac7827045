// lrllm: parse the options, start MPI, run the mode. Errors end as one line on stderr with an exit status:
// 2 for bad input, 3 for a diverged run, 1 for any other failure; 75 is a training run stopped by SIGTERM or
// SIGUSR1 after writing its checkpoint; the other modes end at once on a signal with 128 + its number
// (signals.h).
#include <omp.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <new>
#include <string>

#include "lrllm/backend/backend.h"
#include "lrllm/core/common.h"
#include "lrllm/core/config.h"
#include "lrllm/core/signals.h"
#include "lrllm/io/checkpoint.h"
#include "lrllm/io/hdf5.h"
#include "lrllm/io/metrics.h"
#include "lrllm/io/tokenizer.h"
#include "lrllm/modes/decompose.h"
#include "lrllm/modes/evaluate.h"
#include "lrllm/modes/export.h"
#include "lrllm/modes/generate.h"
#include "lrllm/modes/import.h"
#include "lrllm/parallel/mpi_world.h"
#include "lrllm/train/finetune.h"
#include "lrllm/train/train.h"

#if defined(__SANITIZE_ADDRESS__)
// Open MPI unloads its plugins before AddressSanitizer's exit-time leak scan, so their allocations show up as
// leaks in unknown modules that no suppression can name. Leak checking of lrllm's own code happens in the
// unit tests, which do not start MPI.
extern "C" const char* __asan_default_options() {
  return "detect_leaks=0";
}
#endif

namespace {

// Ranks sharing a node split its cores, unless the user or the scheduler set OMP_NUM_THREADS.
void set_threads(const lrllm::MpiWorld& comm) {
  if (std::getenv("OMP_NUM_THREADS") != nullptr) return;
  const int cores = omp_get_num_procs();
  omp_set_num_threads(std::max(1, cores / std::max(1, comm.local_size())));
}

// This process's rank as the launcher (mpirun, srun) set it, before MPI starts; 0 when run alone.
int launcher_rank() {
  for (const char* name : {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"})
    if (const char* value = std::getenv(name)) return std::atoi(value);
  return 0;
}

// After a failure outside the input checks other ranks may be waiting in a collective for this one: the whole
// job ends (Open MPI then prints its abort banner). A process alone has no one to wait for it.
int abort_others(bool started_work) {
  if (started_work && lrllm::MpiWorld::world().size() > 1) lrllm::MpiWorld::abort(1);
  return 1;
}

int run_tokenize(const lrllm::Config& cfg) {
  if (cfg.data.input.empty() || cfg.data.output.empty())
    throw lrllm::InputError("--mode tokenize needs --data.input (a text file or folder) and --data.output");
  lrllm::H5File::check_output(cfg.data.output, "data.output");
  const auto tok = lrllm::Tokenizer::load_dir(cfg.data.tokenizer_dir);
  lrllm::set_partial_output(cfg.data.output + ".tmp");  // where tokenize_to_file writes until it commits
  const std::size_t n = lrllm::tokenize_to_file(tok, cfg.data.input, cfg.data.output);
  lrllm::clear_partial_output();
  std::printf("tokenized %s: %zu tokens -> %s\n", cfg.data.input.c_str(), n, cfg.data.output.c_str());
  return 0;
}

int run_mode(const lrllm::Config& cfg, const lrllm::MpiWorld& comm) {
  if (cfg.mode == "pretrain") return lrllm::run_pretrain(cfg, comm);
  if (cfg.mode == "finetune") return lrllm::run_finetune(cfg, comm);
  if (cfg.mode == "eval") return lrllm::run_eval(cfg, comm);
  // The remaining modes write or print one thing: rank 0 does it.
  if (!comm.root()) return 0;
  if (cfg.mode == "decompose") return lrllm::run_decompose(cfg);
  if (cfg.mode == "export") return lrllm::run_export(cfg);
  if (cfg.mode == "import") return lrllm::run_import(cfg);
  if (cfg.mode == "generate") return lrllm::run_generate(cfg);
  if (cfg.mode == "tokenize") return run_tokenize(cfg);
  if (cfg.mode == "info") {
    if (cfg.model.init.empty())
      throw lrllm::InputError("--mode info needs --model.init (an lrllm HDF5 file)");
    if (lrllm::is_metrics_file(cfg.model.init))
      lrllm::print_metrics_info(cfg.model.init);
    else
      lrllm::print_info(cfg.model.init);
    return 0;
  }
  throw lrllm::InputError("unknown mode " + cfg.mode);
}

}  // namespace

int main(int argc, char** argv) {
  lrllm::ensure_blas_kernels(argv);
  lrllm::Config cfg;
  // Options are parsed before MPI starts, so --help, --version and bad options never wait on other ranks.
  // Every rank parses the same command line; the first alone speaks.
  const bool speaks = launcher_rank() == 0;
  try {
    if (!lrllm::parse_config(argc, argv, cfg, speaks)) return 0;
  } catch (const lrllm::InputError& e) {
    if (speaks) std::fprintf(stderr, "lrllm: error: %s\n", e.what());
    return 2;
  }
  int code = 0;
  bool started_work = false;
  try {
    lrllm::MpiWorld& comm = lrllm::MpiWorld::world(&argc, &argv);
    set_threads(comm);
    // Training stops at a step's end and saves a checkpoint; the other modes have nothing to save.
    if (cfg.mode == "pretrain" || cfg.mode == "finetune")
      lrllm::install_stop_handlers();
    else
      lrllm::install_exit_handlers();
    started_work = true;
    code = run_mode(cfg, comm);
    if (comm.size() > 1) comm.barrier();
  } catch (const lrllm::PeerInputError&) {
    code = 2;
  } catch (const lrllm::InputError& e) {
    std::fprintf(stderr, "lrllm: error: %s\n", e.what());
    code = 2;
  } catch (const lrllm::DivergenceError& e) {
    std::fprintf(stderr, "lrllm: error: %s\n", e.what());
    code = 3;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "lrllm: error: out of memory\n");
    code = abort_others(started_work);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "lrllm: error: %s\n", e.what());
    code = abort_others(started_work);
  }
  lrllm::MpiWorld::finalize();
  return code;
}

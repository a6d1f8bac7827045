// The run directory (run.dir): where a mode writes its checkpoints and metrics.h5, created on rank 0, and the
// rule that a new training run never writes over an earlier one's files.
#pragma once

#include "lrllm/core/config.h"
#include "lrllm/parallel/mpi_world.h"

namespace lrllm {

// Creates run.dir on rank 0. Throws InputError.
void prepare_run_dir(const Config& cfg, const MpiWorld& comm);

// The same for a training run, which never writes over an earlier run's checkpoints or metrics.h5: unless it
// resumes, a run.dir holding checkpoints is an InputError, or with run.overwrite they and metrics.h5 move to
// a new run.dir/earlier-<time>/ folder; a metrics.h5 without checkpoints always moves there. Throws
// InputError.
void claim_run_dir(const Config& cfg, const MpiWorld& comm, bool resuming);

}  // namespace lrllm

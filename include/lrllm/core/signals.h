// Preemption: SIGTERM (Slurm at a time limit or preemption, srun's first signal) and SIGUSR1 (what
// `sbatch --signal=B:USR1@120` or `mpirun`, which forwards it, delivers) ask a training run to stop. The loop
// finishes its step, every rank agrees, a checkpoint is written, and lrllm exits with kExitStopped so that a
// job script can requeue itself and resume from `latest`.
#pragma once

#include <string>

namespace lrllm {

// EX_TEMPFAIL of sysexits.h: a temporary failure, try again.
inline constexpr int kExitStopped = 75;

void install_stop_handlers();
// Whether a stop signal arrived since install_stop_handlers.
bool stop_requested();

// The other modes have nothing to save: SIGTERM, SIGINT and SIGUSR1 end them at once with exit status
// 128 + signal, after removing the partial output file registered below, so that none is left behind.
void install_exit_handlers();
// The file being written now (under a temporary name, renamed into place once complete); cleared when done.
void set_partial_output(const std::string& path);
void clear_partial_output();

}  // namespace lrllm

// What a training run tells its user (docs/design.md, One training step): the start banner, one progress line
// per log interval, and one metrics.h5 row per step, from the step's named statistics.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>

#include "lrllm/backend/backend.h"
#include "lrllm/core/config.h"
#include "lrllm/model/model.h"
#include "lrllm/parallel/pipeline.h"
#include "lrllm/parallel/topology.h"

namespace lrllm {

struct TrainSetup;

// One optimizer step, as every rank agrees on it.
struct StepStats {
  int64_t step = 0;  // the step just finished, counted from 1
  double loss = 0;   // mean training loss over the step's valid targets
  double val_loss;   // NaN when the step did not validate
  double lr = 0, grad_norm = 0;
  double seconds = 0;      // wall time of the step (validation included)
  double tokens = 0;       // real (not padding) tokens over all data-parallel ranks
  double tokens_seen = 0;  // the run's real tokens so far, this step's included
  // Bytes each communicator carried during the step, summed over ranks, and the host time ranks spent
  // waiting for pipeline transfers, summed over ranks.
  double dp_bytes = 0, tp_bytes = 0, pp_bytes = 0, pp_wait_s = 0;
};

// The peak of the memory that bounds the run: the GPU's (what the backend's allocations held at most) on a
// device backend, else the process's resident set.
std::size_t peak_memory_bytes(const Backend& backend);

// The start banner: run, model, parameters, batch and data, placement of every rank (collective: every rank
// calls it), pipeline and ZeRO, memory per rank. Printed by world rank 0.
void print_banner(const Config& cfg, const TrainSetup& setup, const std::string& mode,
                  const Pipeline& pipeline, const MemoryBytes& mem);

// The metrics.h5 row of a step: its statistics, tokens/s, and memory (the planned categories and the peak).
std::map<std::string, double> metrics_row(const StepStats& s, int world_size, const MemoryBytes& mem,
                                          std::size_t peak_bytes);

// The progress line: step, losses, lr, norm, tokens/s, step time, peak memory, and the time left at
// avg_step_s a step.
void print_progress(const StepStats& s, int steps, double avg_step_s, std::size_t peak_bytes);

}  // namespace lrllm

// --mode eval: the loss on a token file, or accuracy and F1 on instruction tasks.
#pragma once

#include "lrllm/core/config.h"
#include "lrllm/parallel/mpi_world.h"

namespace lrllm {

// --mode eval on a token file (data.val, else data.train): prints loss and perplexity; with eval.tasks, the
// tasks' scores.
int run_eval(const Config& cfg, const MpiWorld& comm);

}  // namespace lrllm

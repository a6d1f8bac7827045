// Validation loss on token files: used by training's periodic evaluation and by --mode eval.
#pragma once

#include "lrllm/comm.h"
#include "lrllm/config.h"
#include "lrllm/data.h"
#include "lrllm/model.h"

namespace lrllm {

// Mean loss over the first `sequences` sequences of the file, in order, so every evaluation of a run sees
// the same tokens whatever the number of ranks: each rank takes a contiguous share, in micro-batches of at
// most batch_size. `sequences` must be a multiple of the number of ranks.
double validation_loss(Model& model, BatchSource& batcher, uint64_t sequences, int batch_size,
                       const Comm& comm);

// --mode eval on a token file (data.val, else data.train): prints loss and perplexity.
int run_eval(const Config& cfg, const Comm& comm);

}  // namespace lrllm

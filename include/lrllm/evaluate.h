// Validation loss on token files: used by training's periodic evaluation and by --mode eval.
#pragma once

#include "lrllm/comm.h"
#include "lrllm/config.h"
#include "lrllm/data.h"
#include "lrllm/model.h"

namespace lrllm {

// Mean loss over `batches` batches of batch_size sequences per rank, taken from the start of the file in
// order, so every evaluation of a run sees the same tokens. Averaged over ranks.
double validation_loss(Model& model, Batcher& batcher, int batches, int batch_size, const Comm& comm);

// --mode eval on a token file (data.val, else data.train): prints loss and perplexity.
int run_eval(const Config& cfg, const Comm& comm);

}  // namespace lrllm

// Validation loss on token files: used by training's periodic evaluation and by --mode eval.
#pragma once

#include "lrllm/comm.h"
#include "lrllm/config.h"
#include "lrllm/data.h"
#include "lrllm/model.h"
#include "lrllm/pipeline.h"
#include "lrllm/topology.h"

namespace lrllm {

// Mean loss over the first `sequences` sequences of the file, in order, so every evaluation of a run sees
// the same tokens whatever the layout: each data-parallel rank takes a contiguous share, in batches of at
// most batch_size through the pipeline. `sequences` must be a multiple of the data-parallel ranks. Every rank
// gets the result.
double validation_loss(Pipeline& pipeline, const Topology& topo, BatchSource& batcher, uint64_t sequences,
                       int batch_size);

// --mode eval on a token file (data.val, else data.train): prints loss and perplexity.
int run_eval(const Config& cfg, const Comm& comm);

}  // namespace lrllm

// How a model spreads over the parallel layout (docs/design.md, Parallel layouts): the checks of a layout
// against a model and batch, the pipeline stages' blocks, each rank's share of the model, and the placement
// printed at start. The model side of parallelism; topology.h only moves data.
#pragma once

#include <utility>

#include "lrllm/core/config.h"
#include "lrllm/model/model.h"
#include "lrllm/parallel/topology.h"

namespace lrllm {

// Checks a layout against the world size, the model and the batch before anything is built: world divisible
// by tp * pp, pp at most the layer count, heads and d_ff divisible by tp, micro_batches dividing the batch.
// Throws InputError.
void validate_layout(const ParallelConfig& p, int world_size, const ModelConfig& m, int batch_size);

// Blocks [first, end) of a stage. Stages are balanced by compute, not block count: the last one also runs
// the lm_head (6 V C FLOPs a token, forward and backward: several blocks' worth at GPT-2's vocabulary), so
// the split minimizes the largest stage's FLOPs, every stage keeping at least one block.
std::pair<int, int> stage_layers(const ModelConfig& m, int pp, int stage);

// This rank's share of the model: its stage's blocks and its tensor-parallel slice.
ModelShard model_shard(const Topology& topo, const ModelConfig& m);

// One line per rank (host, coordinates, blocks, heads), gathered to and printed by world rank 0.
void print_placement(const Topology& topo, const ModelConfig& m);

}  // namespace lrllm

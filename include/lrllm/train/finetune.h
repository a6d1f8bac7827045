// --mode finetune: LoRA adapters over a frozen base (float32, int8 or NF4) on instruction data.
#pragma once

#include "lrllm/core/config.h"
#include "lrllm/parallel/mpi_world.h"

namespace lrllm {

int run_finetune(const Config& cfg, const MpiWorld& comm);

}  // namespace lrllm

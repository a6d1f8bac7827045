// --mode finetune: LoRA adapters over a frozen base (float32, int8 or NF4) on instruction data.
#pragma once

#include "lrllm/comm.h"
#include "lrllm/config.h"

namespace lrllm {

int run_finetune(const Config& cfg, const Comm& comm);

}  // namespace lrllm

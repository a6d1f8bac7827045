// --mode export: a compact model file for inference: the base's dense weights stored as int8 or NF4
// (quant.bits), and with lora.merge the adapters folded into the weights.
#pragma once

#include "lrllm/config.h"

namespace lrllm {

int run_export(const Config& cfg);

}  // namespace lrllm

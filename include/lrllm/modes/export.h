// --mode export: a compact model file for inference: the linear weights (W, or low-rank A and B) and the tied
// embedding stored as int8 or NF4 (quant.bits, quant.embedding), and with lora.merge the adapters folded into
// the weights. Without model.init it exports a model of the given shape with random weights, to size one.
#pragma once

#include "lrllm/core/config.h"

namespace lrllm {

int run_export(const Config& cfg);

}  // namespace lrllm

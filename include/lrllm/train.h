// --mode pretrain: the training loop.
#pragma once

#include "lrllm/comm.h"
#include "lrllm/config.h"

namespace lrllm {

// The model shape a run uses: from the resumed checkpoint, else model.init, else the options. Checks that the
// options given do not contradict the file. Throws InputError.
ModelConfig resolve_model_config(const Config& cfg, const std::string& resume_path);

int run_pretrain(const Config& cfg, const Comm& comm);

}  // namespace lrllm

// A model file of random weights written a tensor at a time (--mode export without model.init): each tensor
// drawn as Model::init_random draws it (init_values), quantized where the file's storage says, and written
// before the next is drawn. A model too large to hold in float32 (Llama-2 7B: 27 GB) is never built, and the
// file equals the one a built model would give, tensor for tensor.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "lrllm/core/config.h"
#include "lrllm/io/checkpoint.h"
#include "lrllm/model/params.h"

namespace lrllm {

struct RandomTensor {
  ModelFileTensor file;  // name, shape, and whether the file stores it quantized
  TensorRole role;       // how init_values draws it
};

// The tensors of a model of shape c as Model registers them (docs/design.md, Architectures): embeddings,
// each block's norms and linear sites (W, or low-rank A and B, and a bias), the final norm, an untied
// lm_head. c has no adapters: a model of random weights has none to export.
std::vector<RandomTensor> random_tensors(const ModelConfig& c);

// Writes path (atomically) with the tensors of c drawn from seed; returns the bytes they take as stored.
StoredBytes save_random_model(const std::string& path, const ModelConfig& c, uint64_t seed,
                              const Config* run);

}  // namespace lrllm

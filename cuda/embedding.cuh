// Token and position embeddings, forward and backward.
// Part of the CUDA backend's translation unit (cuda/backend_cuda.cu includes it once; docs/design.md, Backend
// seam), as llm.c keeps one header per layer.
#pragma once

#include <cstddef>
#include <cstdint>

#include "launch.cuh"

namespace lrllm {
namespace {

__global__ void embedding_forward_kernel(float* out, const int32_t* tokens, const float* wte,
                                         const float* wpe, const int32_t* positions, int N, int T, int C) {
  const std::size_t total = static_cast<std::size_t>(N) * C;
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < total;
       i += std::size_t{gridDim.x} * blockDim.x) {
    const std::size_t n = i / C, c = i % C;
    const std::size_t p = positions ? static_cast<std::size_t>(positions[n]) : n % T;
    out[i] = wte[static_cast<std::size_t>(tokens[n]) * C + c] + (wpe ? wpe[p * C + c] : 0.0f);
  }
}

// dwte rows of the distinct tokens: block x takes token ids[x], whose positions are
// positions[starts[x] .. starts[x + 1]) in increasing order, and adds their gradients in that order.
__global__ void embedding_backward_kernel(float* dwte, const float* dout, const int32_t* ids,
                                          const int32_t* starts, const int32_t* positions, int C) {
  const int c = blockIdx.y * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float s = 0;
  for (int k = starts[blockIdx.x]; k < starts[blockIdx.x + 1]; ++k)
    s += dout[static_cast<std::size_t>(positions[k]) * C + c];
  dwte[static_cast<std::size_t>(ids[blockIdx.x]) * C + c] += s;
}

__global__ void position_grad_kernel(float* dwpe, const float* dout, int B, int T, int C) {
  const std::size_t total = static_cast<std::size_t>(T) * C;
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < total;
       i += std::size_t{gridDim.x} * blockDim.x) {
    float s = 0;
    for (int b = 0; b < B; ++b) s += dout[static_cast<std::size_t>(b) * total + i];
    dwpe[i] += s;
  }
}

}  // namespace
}  // namespace lrllm

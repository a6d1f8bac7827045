// SwiGLU's product silu(gate) * up, forward and backward.
// Part of the CUDA backend's translation unit (cuda/backend_cuda.cu includes it once; docs/design.md, Backend
// seam), as llm.c keeps one header per layer.
#pragma once

#include <cstddef>

#include "launch.cuh"

namespace lrllm {
namespace {

__global__ void swiglu_forward_kernel(float* out, const float* gate, const float* up, std::size_t n) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n;
       i += std::size_t{gridDim.x} * blockDim.x) {
    const float g = gate[i];
    out[i] = g / (1.0f + expf(-g)) * up[i];
  }
}

// silu'(g) = s * (1 + g * (1 - s)), s = sigmoid(g).
__global__ void swiglu_backward_kernel(float* dgate, float* dup, const float* gate, const float* up,
                                       const float* dout, std::size_t n) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n;
       i += std::size_t{gridDim.x} * blockDim.x) {
    const float g = gate[i];
    const float sig = 1.0f / (1.0f + expf(-g));
    dgate[i] = dout[i] * up[i] * (sig * (1.0f + g * (1.0f - sig)));
    dup[i] = dout[i] * (g * sig);
  }
}

}  // namespace
}  // namespace lrllm

// SwiGLU's product silu(gate) * up over the fused [N, 2F] gate and up projections, forward and backward,
// and silu alone (the nonlinearity between low-rank factors, lowrank.activation silu).
// Part of the CUDA backend's translation unit (cuda/backend_cuda.cu includes it once; docs/design.md, Backend
// seam), as llm.c keeps one header per layer.
#pragma once

#include <cstddef>

#include "launch.cuh"

namespace lrllm {
namespace {

// One thread per output value i of [N, F]: row n = i / F reads gate at n * 2F + f and up F further.
__global__ void swiglu_forward_kernel(float* out, const float* gate_up, std::size_t n, int F) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n;
       i += std::size_t{gridDim.x} * blockDim.x) {
    const std::size_t g_at = i + (i / F) * F;
    const float g = gate_up[g_at];
    out[i] = g / (1.0f + expf(-g)) * gate_up[g_at + F];
  }
}

// silu'(g) = s * (1 + g * (1 - s)), s = sigmoid(g).
__global__ void swiglu_backward_kernel(float* dgate_up, const float* gate_up, const float* dout,
                                       std::size_t n, int F) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n;
       i += std::size_t{gridDim.x} * blockDim.x) {
    const std::size_t g_at = i + (i / F) * F;
    const float g = gate_up[g_at], up = gate_up[g_at + F];
    const float sig = 1.0f / (1.0f + expf(-g));
    dgate_up[g_at] = dout[i] * up * (sig * (1.0f + g * (1.0f - sig)));
    dgate_up[g_at + F] = dout[i] * (g * sig);
  }
}

__global__ void silu_forward_kernel(float* out, const float* inp, std::size_t n) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n;
       i += std::size_t{gridDim.x} * blockDim.x) {
    const float x = inp[i];
    out[i] = x / (1.0f + expf(-x));
  }
}

// dinp may alias dout: each thread reads its dout before writing the same index.
__global__ void silu_backward_kernel(float* dinp, const float* inp, const float* dout, std::size_t n) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n;
       i += std::size_t{gridDim.x} * blockDim.x) {
    const float x = inp[i];
    const float sig = 1.0f / (1.0f + expf(-x));
    dinp[i] = dout[i] * (sig * (1.0f + x * (1.0f - sig)));
  }
}

}  // namespace
}  // namespace lrllm

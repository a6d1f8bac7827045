// Rotary position embeddings, forward and backward (the backward is the rotation by the opposite angle).
// Part of the CUDA backend's translation unit (cuda/backend_cuda.cu includes it once; docs/design.md, Backend
// seam), as llm.c keeps one header per layer.
#pragma once

#include <cstddef>
#include <cstdint>

#include "launch.cuh"
#include "lrllm/core/common.h"

namespace lrllm {
namespace {

// One thread per (row, pair index i): the angle's cos and sin serve every head of the row. inv_freq, the
// angle and cos/sin are float32 and computed as the CPU backend computes them (theta's power rounded from
// double, so that the backends agree on inv_freq).
__global__ void rope_kernel(float* x, std::size_t pairs, int T, int n_heads, int half, int row_stride,
                            const int32_t* positions, float theta, float sign) {
  for (std::size_t k = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; k < pairs;
       k += std::size_t{gridDim.x} * blockDim.x) {
    const std::size_t n = k / half;
    const int i = static_cast<int>(k % half);
    const float p = static_cast<float>(positions ? positions[n] : static_cast<int>(n % T));
    const float inv_freq =
        1.0f / static_cast<float>(
                   pow(static_cast<double>(theta), static_cast<float>(2 * i) / static_cast<float>(2 * half)));
    const float angle = p * inv_freq;
    const float c = cosf(angle), s = sign * sinf(angle);
    float* r = x + n * row_stride + i;
    for (int h = 0; h < n_heads; ++h) {
      float* v = r + static_cast<std::size_t>(h) * 2 * half;
      const float a = v[0], b = v[half];
      v[0] = a * c - b * s;
      v[half] = b * c + a * s;
    }
  }
}

// sign 1: forward; -1: backward.
void launch_rope(float* x, int B, int T, int n_heads, int head_dim, int row_stride, const int32_t* positions,
                 float theta, float sign) {
  LRLLM_CHECK(head_dim > 0 && head_dim % 2 == 0, "rope", strprintf("head_dim %d is not even", head_dim));
  const int half = head_dim / 2;
  launch_over(static_cast<std::size_t>(B) * T * half, "rope_kernel", rope_kernel, x,
              static_cast<std::size_t>(B) * T * half, T, n_heads, half, row_stride, positions, theta, sign);
}

}  // namespace
}  // namespace lrllm

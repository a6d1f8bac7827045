// The AdamW update.
// Part of the CUDA backend's translation unit (cuda/backend_cuda.cu includes it once; docs/design.md, Backend
// seam), as llm.c keeps one header per layer.
#pragma once

#include <cstddef>

#include "launch.cuh"

namespace lrllm {
namespace {

__global__ void adamw_kernel(float* param, const float* grad, float* m, float* v, std::size_t n, float beta1,
                             float beta2, float eps, float step_size, float bc2_sqrt, float decay) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n;
       i += std::size_t{gridDim.x} * blockDim.x) {
    const float g = grad[i];
    const float mi = beta1 * m[i] + (1.0f - beta1) * g;
    const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    param[i] = param[i] * decay - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
  }
}

}  // namespace
}  // namespace lrllm

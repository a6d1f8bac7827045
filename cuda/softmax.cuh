// Softmax cross-entropy of the classifier, with its gradient in place.
// Part of the CUDA backend's translation unit (cuda/backend_cuda.cu includes it once; docs/design.md, Backend
// seam), as llm.c keeps one header per layer.
#pragma once

#include <cmath>
#include <cstdint>

#include "launch.cuh"

namespace lrllm {
namespace {

// One block per row: the maximum, the sum of exponentials, the loss, and in place the scaled gradient.
__global__ void softmax_xent_kernel(float* losses, float* logits, const int32_t* targets, int V,
                                    float grad_scale) {
  __shared__ float scratch[32];
  float* z = logits + static_cast<std::size_t>(blockIdx.x) * V;
  const int target = targets[blockIdx.x];
  if (target < 0) {
    if (threadIdx.x == 0) losses[blockIdx.x] = 0.0f;
    if (grad_scale != 0.0f)
      for (int i = threadIdx.x; i < V; i += blockDim.x) z[i] = 0.0f;
    return;
  }
  float mx = -INFINITY;
  for (int i = threadIdx.x; i < V; i += blockDim.x) mx = fmaxf(mx, z[i]);
  mx = block_reduce<true>(mx, scratch);
  float sum = 0;
  for (int i = threadIdx.x; i < V; i += blockDim.x) sum += expf(z[i] - mx);
  sum = block_reduce<false>(sum, scratch);
  const float target_logit = z[target];
  __syncthreads();  // every thread has read the target's logit before it is overwritten
  if (threadIdx.x == 0) losses[blockIdx.x] = logf(sum) - (target_logit - mx);
  if (grad_scale == 0.0f) return;
  const float norm = grad_scale / sum;
  for (int i = threadIdx.x; i < V; i += blockDim.x)
    z[i] = expf(z[i] - mx) * norm - (i == target ? grad_scale : 0.0f);
}

}  // namespace
}  // namespace lrllm

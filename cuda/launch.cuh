// Launch helpers of the CUDA kernels: grid sizes, warp and block reductions, grid-stride launches.
// Part of the CUDA backend's translation unit (cuda/backend_cuda.cu includes it once; docs/design.md, Backend
// seam), as llm.c keeps one header per layer.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>

#include "check.cuh"

namespace lrllm {
namespace {

constexpr int kThreads = 256;

int blocks_for(std::size_t n, int threads = kThreads) {
  return static_cast<int>(std::min<std::size_t>((n + threads - 1) / threads, std::size_t{1} << 30));
}

__device__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// A block-wide reduction in a fixed tree (deterministic); every thread gets the result. scratch: 32 floats.
template <bool Max>
__device__ float block_reduce(float x, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  x = Max ? warp_max(x) : warp_sum(x);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  float y = lane < warps ? scratch[lane] : (Max ? -INFINITY : 0.0f);
  y = Max ? warp_max(y) : warp_sum(y);
  return y;
}

// Launches a grid-stride kernel over n values (nothing for n = 0) and checks the launch.
template <typename... Params, typename... Args>
void launch_over(std::size_t n, const char* name, void (*kernel)(Params...), Args... args) {
  if (n == 0) return;
  kernel<<<blocks_for(n), kThreads>>>(args...);
  LRLLM_CUDA_LAUNCH(name);
}

}  // namespace
}  // namespace lrllm

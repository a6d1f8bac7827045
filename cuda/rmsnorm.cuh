// RMSNorm forward and backward (Llama's norm: no mean, no bias).
// Part of the CUDA backend's translation unit (cuda/backend_cuda.cu includes it once; docs/design.md, Backend
// seam), as llm.c keeps one header per layer.
#pragma once

#include <cstddef>

#include "launch.cuh"
#include "reduce.cuh"

namespace lrllm {
namespace {

struct RmsNormalizedProduct {  // dout * inp * rstd: the RMSNorm weight's gradient
  const float *dout, *inp, *rstd;
  int C;
  __device__ float operator()(int n, int c) const {
    const std::size_t i = static_cast<std::size_t>(n) * C + c;
    return dout[i] * (inp[i] * rstd[n]);
  }
};

// One warp per row, as LayerNorm's kernels.
__global__ void rmsnorm_forward_kernel(float* out, float* rstd, const float* inp, const float* w, int N,
                                       int C, float eps) {
  const int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
  if (n >= N) return;
  const float* x = inp + static_cast<std::size_t>(n) * C;
  float ss = 0;
  for (int c = lane; c < C; c += 32) ss += x[c] * x[c];
  const float r = rsqrtf(warp_sum(ss) / C + eps);
  float* y = out + static_cast<std::size_t>(n) * C;
  for (int c = lane; c < C; c += 32) y[c] = x[c] * r * w[c];
  if (lane == 0) rstd[n] = r;
}

// dx += rstd * (dout * w - xhat * mean_c(dout * w * xhat)), xhat = x * rstd.
__global__ void rmsnorm_input_grad_kernel(float* dinp, const float* dout, const float* inp, const float* w,
                                          const float* rstd, int N, int C) {
  const int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
  if (n >= N) return;
  const std::size_t off = static_cast<std::size_t>(n) * C;
  const float* dy = dout + off;
  const float* x = inp + off;
  const float r = rstd[n];
  float s = 0;
  for (int c = lane; c < C; c += 32) s += (dy[c] * w[c]) * (x[c] * r);
  const float mean_dxhat_xhat = warp_sum(s) / C;
  float* dx = dinp + off;
  for (int c = lane; c < C; c += 32) dx[c] += r * (dy[c] * w[c] - x[c] * r * mean_dxhat_xhat);
}

}  // namespace
}  // namespace lrllm

// LayerNorm forward and backward.
// Part of the CUDA backend's translation unit (cuda/backend_cuda.cu includes it once; docs/design.md, Backend
// seam), as llm.c keeps one header per layer.
#pragma once

#include <cstddef>

#include "launch.cuh"
#include "reduce.cuh"

namespace lrllm {
namespace {

constexpr float kLayerNormEps = 1e-5f;

struct NormalizedProduct {  // dout * xhat: the LayerNorm weight's gradient
  const float *dout, *inp, *mean, *rstd;
  int C;
  __device__ float operator()(int n, int c) const {
    const std::size_t i = static_cast<std::size_t>(n) * C + c;
    return dout[i] * ((inp[i] - mean[n]) * rstd[n]);
  }
};

// One warp per row: mean, then the variance about it (two passes over the row, which stays in L1).
__global__ void layernorm_forward_kernel(float* out, float* mean, float* rstd, const float* inp,
                                         const float* w, const float* b, int N, int C) {
  const int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
  if (n >= N) return;
  const float* x = inp + static_cast<std::size_t>(n) * C;
  float s = 0;
  for (int c = lane; c < C; c += 32) s += x[c];
  const float m = warp_sum(s) / C;
  float v = 0;
  for (int c = lane; c < C; c += 32) v += (x[c] - m) * (x[c] - m);
  const float r = rsqrtf(warp_sum(v) / C + kLayerNormEps);
  float* y = out + static_cast<std::size_t>(n) * C;
  for (int c = lane; c < C; c += 32) y[c] = (x[c] - m) * r * w[c] + b[c];
  if (lane == 0) {
    mean[n] = m;
    rstd[n] = r;
  }
}

__global__ void layernorm_input_grad_kernel(float* dinp, const float* dout, const float* inp, const float* w,
                                            const float* mean, const float* rstd, int N, int C) {
  const int n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
  if (n >= N) return;
  const std::size_t off = static_cast<std::size_t>(n) * C;
  const float* dy = dout + off;
  const float* x = inp + off;
  const float m = mean[n], r = rstd[n];
  float sum_dxhat = 0, sum_dxhat_xhat = 0;
  for (int c = lane; c < C; c += 32) {
    const float dxhat = dy[c] * w[c];
    sum_dxhat += dxhat;
    sum_dxhat_xhat += dxhat * ((x[c] - m) * r);
  }
  const float mean_dxhat = warp_sum(sum_dxhat) / C, mean_dxhat_xhat = warp_sum(sum_dxhat_xhat) / C;
  float* dx = dinp + off;
  for (int c = lane; c < C; c += 32)
    dx[c] += r * (dy[c] * w[c] - mean_dxhat - (x[c] - m) * r * mean_dxhat_xhat);
}

}  // namespace
}  // namespace lrllm

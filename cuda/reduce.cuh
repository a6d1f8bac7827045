// Deterministic reductions: the sum of squares and column sums in a fixed order (no float atomics).
// Part of the CUDA backend's translation unit (cuda/backend_cuda.cu includes it once; docs/design.md, Backend
// seam), as llm.c keeps one header per layer.
#pragma once

#include <cstddef>

#include "launch.cuh"

namespace lrllm {
namespace {

// Row chunks of a column reduction: enough blocks to fill the GPU at GPT-2's widths, few partials to add.
constexpr int kColumnChunks = 64;
// Blocks of the sum of squares: each adds a grid-strided share in double, the host adds the partials in
// order.
constexpr int kSquareBlocks = 1024;

__global__ void sum_squares_kernel(double* partial, const float* x, std::size_t n) {
  __shared__ double shared[kThreads];
  double s = 0;
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n;
       i += std::size_t{gridDim.x} * blockDim.x)
    s += static_cast<double>(x[i]) * x[i];
  shared[threadIdx.x] = s;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) shared[threadIdx.x] += shared[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = shared[0];
}

// Column sums in two passes: block (x, y) adds rows of chunk y for 32 columns, 8 rows in parallel, then the
// 8 partial sums in order; column_finish adds the chunks in order. Value(n, c) is the summand.
template <typename Value>
__global__ void column_partials(float* partial, int N, int C, int chunk_rows, Value value) {
  __shared__ float shared[8][33];
  const int c = blockIdx.x * 32 + threadIdx.x;
  const int lo = blockIdx.y * chunk_rows, hi = min(N, lo + chunk_rows);
  float s = 0;
  if (c < C)
    for (int n = lo + threadIdx.y; n < hi; n += 8) s += value(n, c);
  shared[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float total = 0;
    for (int k = 0; k < 8; ++k) total += shared[k][threadIdx.x];
    partial[static_cast<std::size_t>(blockIdx.y) * C + c] = total;
  }
}

__global__ void column_finish(float* out, const float* partial, int chunks, int C) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float s = 0;
  for (int k = 0; k < chunks; ++k) s += partial[static_cast<std::size_t>(k) * C + c];
  out[c] += s;
}

struct RowValue {
  const float* x;
  int C;
  __device__ float operator()(int n, int c) const { return x[static_cast<std::size_t>(n) * C + c]; }
};

}  // namespace
}  // namespace lrllm

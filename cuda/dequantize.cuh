// Quantized storage on the GPU (quant.h's layout) and its dequantization, bit for bit quant.cpp's.
// Part of the CUDA backend's translation unit (cuda/backend_cuda.cu includes it once; docs/design.md, Backend
// seam), as llm.c keeps one header per layer.
#pragma once

#include <cstddef>
#include <cstdint>

#include "launch.cuh"
#include "lrllm/model/quant.h"

namespace lrllm {
namespace {

__constant__ float nf4_levels[16];

// The device copy of a quantized tensor's storage (quant.h).
struct DeviceQuantized {
  const void* host_codes = nullptr;  // identifies the host tensor the copy was made from
  std::size_t host_bytes = 0;
  uint8_t* codes = nullptr;
  float* absmax = nullptr;        // not double-quantized
  int8_t* absmax_q = nullptr;     // double-quantized
  float* absmax_scale = nullptr;  // double-quantized
  float absmax_mean = 0;
  bool nf4 = false, double_quant = false;
  int block = 64;
};

// The absmax block b dequantizes with, the same expression as quant.cpp's (fma, one rounding).
__device__ float block_absmax(const DeviceQuantized& q, std::size_t b) {
  if (!q.double_quant) return q.absmax[b];
  return __fmaf_rn(static_cast<float>(q.absmax_q[b]), q.absmax_scale[b / kAbsmaxBlock], q.absmax_mean);
}

// Value g of the flattened tensor, bit for bit quant.cpp's: int8 code * (absmax / 127); NF4 level * absmax.
// The _rn intrinsics keep the compiler from contracting the products into anything else.
__device__ float dequantized_value(const DeviceQuantized& q, std::size_t g) {
  const float a = block_absmax(q, g / q.block);
  if (!q.nf4) return __fmul_rn(static_cast<float>(static_cast<int8_t>(q.codes[g])), __fdiv_rn(a, 127.0f));
  const uint8_t byte = q.codes[g >> 1];
  return __fmul_rn(nf4_levels[(g & 1) ? (byte & 15) : (byte >> 4)], a);
}

__global__ void dequantize_kernel(float* out, DeviceQuantized q, std::size_t first, std::size_t count) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < count;
       i += std::size_t{gridDim.x} * blockDim.x)
    out[i] = dequantized_value(q, first + i);
}

__global__ void dequantize_rows_kernel(float* out, DeviceQuantized q, const int32_t* rows, int n_rows,
                                       std::size_t row_len) {
  const std::size_t total = static_cast<std::size_t>(n_rows) * row_len;
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < total;
       i += std::size_t{gridDim.x} * blockDim.x)
    out[i] = dequantized_value(q, static_cast<std::size_t>(rows[i / row_len]) * row_len + i % row_len);
}

}  // namespace
}  // namespace lrllm

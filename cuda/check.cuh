// Checks for CUDA runtime calls and kernel launches: a failure throws RuntimeError naming the call, the
// file and the line (fail_call), like every other library call in lrllm.
#pragma once

#include <cuda_runtime.h>

#include "lrllm/core/common.h"

namespace lrllm::cuda {

inline void check_cuda(cudaError_t code, const char* call, const char* file, int line) {
  if (code != cudaSuccess) fail_call(call, cudaGetErrorString(code), file, line);
}

}  // namespace lrllm::cuda

#define LRLLM_CUDA(call) ::lrllm::cuda::check_cuda((call), #call, __FILE__, __LINE__)
// After a kernel launch: a bad configuration is reported at once, not at the next synchronising call.
#define LRLLM_CUDA_LAUNCH(kernel) ::lrllm::cuda::check_cuda(cudaGetLastError(), kernel, __FILE__, __LINE__)

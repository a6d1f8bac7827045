// CUDA device discovery. The backend's kernels live beside this file; a GPU run needs a visible device.
#include <cuda_runtime.h>

#include "lrllm/backend.h"
#include "lrllm/common.h"

namespace lrllm {

bool built_with_cuda() {
  return true;
}

int cuda_device_count() {
  int count = 0;
  // No driver or no device is an answer here, not an error: the CPU backend takes over.
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

std::unique_ptr<Backend> make_cuda_backend() {
  if (cuda_device_count() == 0) throw InputError("--device cuda: no CUDA device is visible");
  throw InputError(
      "--device cuda: the CUDA training backend is not part of this release yet; use --device cpu");
}

}  // namespace lrllm

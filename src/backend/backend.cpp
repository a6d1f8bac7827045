#include "lrllm/backend/backend.h"

#include "lrllm/core/common.h"

namespace lrllm {

std::unique_ptr<Backend> make_backend(const std::string& device, int local_rank) {
  if (device == "cpu") return make_cpu_backend();
  if (device == "cuda") {
    const int visible = cuda_device_count();
    return make_cuda_backend(visible > 0 ? local_rank % visible : 0);
  }
  // The CUDA backend has not run on a GPU yet (no GPU was available to its tests), so auto stays on the CPU.
  if (device == "auto") return make_cpu_backend();
  throw InputError("--device must be cpu, cuda or auto, not '" + device + "'");
}

#ifndef LRLLM_WITH_CUDA
int cuda_device_count() {
  return 0;
}
std::unique_ptr<Backend> make_cuda_backend(int) {
  throw InputError(
      "--device cuda: this build of lrllm is CPU-only (rebuild on a machine with nvcc, cuBLAS and NCCL)");
}
#endif

}  // namespace lrllm

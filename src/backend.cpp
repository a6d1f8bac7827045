#include "lrllm/backend.h"

#include "lrllm/common.h"

namespace lrllm {

std::unique_ptr<Backend> make_backend(const std::string& device) {
  if (device == "cpu") return make_cpu_backend();
  if (device == "cuda") return make_cuda_backend();
  // The CUDA backend does not train yet, so auto means the CPU even where a GPU is visible.
  if (device == "auto") return make_cpu_backend();
  throw InputError("--device must be cpu, cuda or auto, not '" + device + "'");
}

#ifndef LRLLM_WITH_CUDA
bool built_with_cuda() {
  return false;
}
int cuda_device_count() {
  return 0;
}
std::unique_ptr<Backend> make_cuda_backend() {
  throw InputError("--device cuda: this build of lrllm is CPU-only (rebuild on a machine with nvcc)");
}
#endif

}  // namespace lrllm

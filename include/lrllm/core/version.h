// The program's version, and what this build holds.
#pragma once

namespace lrllm {

inline constexpr const char* kVersion = "0.1.0";

// True when this binary was compiled with the CUDA backend (the build defines LRLLM_WITH_CUDA everywhere).
inline constexpr bool built_with_cuda() {
#ifdef LRLLM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace lrllm

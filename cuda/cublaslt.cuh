// cuBLASLt, opened at run time, and what its matrix layouts need.
// Part of the CUDA backend's translation unit (cuda/backend_cuda.cu includes it once; docs/design.md, Backend
// seam), as llm.c keeps one header per layer.
#pragma once

#include <cublasLt.h>
#include <dlfcn.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "lrllm/core/common.h"

namespace lrllm {
namespace {

// cuBLASLt's workspace: what Hopper's fastest GEMM kernels ask for at GPT-2 shapes.
constexpr std::size_t kGemmWorkspaceBytes = std::size_t{32} << 20;

// cuBLASLt is opened when the first CUDA backend is made, not linked: loading it maps and relocates about 200
// MB, which every CPU run of a CUDA build would otherwise carry in its resident memory (and in mem_peak).
struct CublasLt {
  decltype(&cublasLtCreate) create = nullptr;
  decltype(&cublasLtDestroy) destroy = nullptr;
  decltype(&cublasLtMatmulAlgoGetHeuristic) algo_get_heuristic = nullptr;
  decltype(&cublasLtMatmulDescCreate) desc_create = nullptr;
  decltype(&cublasLtMatmulDescDestroy) desc_destroy = nullptr;
  decltype(&cublasLtMatmulDescSetAttribute) desc_set_attribute = nullptr;
  decltype(&cublasLtMatmulPreferenceCreate) preference_create = nullptr;
  decltype(&cublasLtMatmulPreferenceDestroy) preference_destroy = nullptr;
  decltype(&cublasLtMatmulPreferenceSetAttribute) preference_set_attribute = nullptr;
  decltype(&cublasLtMatrixLayoutCreate) layout_create = nullptr;
  decltype(&cublasLtMatrixLayoutDestroy) layout_destroy = nullptr;
  decltype(&cublasLtMatmul) matmul = nullptr;
  decltype(&cublasLtGetStatusString) status_string = nullptr;
};

const CublasLt& cublaslt() {
  static const CublasLt api = [] {
    const std::string name = "libcublasLt.so." + std::to_string(CUBLAS_VER_MAJOR);
    void* lib = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) fail_call("dlopen", name + ": " + dlerror(), __FILE__, __LINE__);
    CublasLt a;
    const auto load = [&](auto& fn, const char* symbol) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, symbol));
      if (fn == nullptr) fail_call("dlsym", name + " has no " + symbol, __FILE__, __LINE__);
    };
    load(a.create, "cublasLtCreate");
    load(a.destroy, "cublasLtDestroy");
    load(a.algo_get_heuristic, "cublasLtMatmulAlgoGetHeuristic");
    load(a.desc_create, "cublasLtMatmulDescCreate");
    load(a.desc_destroy, "cublasLtMatmulDescDestroy");
    load(a.desc_set_attribute, "cublasLtMatmulDescSetAttribute");
    load(a.preference_create, "cublasLtMatmulPreferenceCreate");
    load(a.preference_destroy, "cublasLtMatmulPreferenceDestroy");
    load(a.preference_set_attribute, "cublasLtMatmulPreferenceSetAttribute");
    load(a.layout_create, "cublasLtMatrixLayoutCreate");
    load(a.layout_destroy, "cublasLtMatrixLayoutDestroy");
    load(a.matmul, "cublasLtMatmul");
    load(a.status_string, "cublasLtGetStatusString");
    return a;
  }();
  return api;
}

void check_cublas(cublasStatus_t code, const char* call, const char* file, int line) {
  if (code != CUBLAS_STATUS_SUCCESS) fail_call(call, cublaslt().status_string(code), file, line);
}

#define LRLLM_CUBLAS(call) check_cublas((call), #call, __FILE__, __LINE__)

// The largest power of two (up to 256) that divides a pointer's address: what cuBLASLt may assume of it.
uint32_t alignment_of(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  uint32_t align = 256;
  while (align > 1 && a % align != 0) align >>= 1;
  return align;
}

}  // namespace
}  // namespace lrllm

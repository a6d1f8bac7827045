// Causal grouped-query attention on the GPU (the CUDA backend's attention_forward and attention_backward):
// memory-efficient, no [T, T] matrix is ever stored; backward recomputes the probabilities from the saved
// log-sum-exp. Deterministic: no floating-point atomics, so two identical runs give identical bits.
#pragma once

#include <cuda_runtime.h>

namespace lrllm::cuda {

// qkv [B, T, C + 2 NKV hs], hs = C / NH: q (NH heads), then k and v (NKV heads each, NKV dividing NH; query
// head h reads kv head h / (NH / NKV)); out [B, T, C]; lse [B, NH, T]. Heads of more than 128 values are
// refused (RuntimeError).
void attention_forward(float* out, float* lse, const float* qkv, int B, int T, int C, int NH, int NKV,
                       cudaStream_t stream);
// dqkv [B, T, C + 2 NKV hs] is overwritten. dot_scratch holds B * NH * T floats (each row's dO . O).
void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse,
                        float* dot_scratch, int B, int T, int C, int NH, int NKV, cudaStream_t stream);

// Decoding: the n new qkv rows' keys and values go to rows past .. past + n - 1 of kv [positions, 2 NKV hs],
// then row i of out [n, C] attends over cache rows 0 .. past + i (Backend::attention_decode).
void attention_decode(float* out, float* kv, const float* qkv, int n, int past, int C, int NH, int NKV,
                      cudaStream_t stream);

}  // namespace lrllm::cuda

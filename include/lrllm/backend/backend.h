// The backend seam (docs/design.md, Backend seam): every primitive the model needs, written once per device.
// Pointers are device pointers of the backend that allocated them; shapes are row-major.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "lrllm/model/quant.h"

namespace lrllm {

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;

  // Memory. Allocations are zero-filled.
  virtual float* alloc(std::size_t count) = 0;
  virtual int32_t* alloc_int(std::size_t count) = 0;
  virtual void release(void* ptr) = 0;
  virtual void to_device(void* dst, const void* src, std::size_t bytes) = 0;
  virtual void to_host(void* dst, const void* src, std::size_t bytes) = 0;
  virtual void fill(float* x, std::size_t n, float value) = 0;
  virtual void copy(float* dst, const float* src, std::size_t n) = 0;

  // C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C. With trans_a, A is stored [K,M]; with trans_b, B is
  // stored [N,K] (the nn.Linear weight orientation). lda, ldb and ldc are the row strides of A, B and C as
  // stored, so a product can read or write a block of columns of a larger matrix.
  virtual void matmul_strided(float* C, const float* A, const float* B, int M, int N, int K, bool trans_a,
                              bool trans_b, float alpha, float beta, int lda, int ldb, int ldc) = 0;
  // The same on packed matrices.
  void matmul(float* C, const float* A, const float* B, int M, int N, int K, bool trans_a, bool trans_b,
              float alpha, float beta) {
    matmul_strided(C, A, B, M, N, K, trans_a, trans_b, alpha, beta, trans_a ? M : K, trans_b ? K : N, N);
  }
  // out[n,c] += bias[c]
  virtual void add_bias(float* out, const float* bias, int N, int C) = 0;
  // dbias[c] += sum_n dout[n,c]
  virtual void bias_backward(float* dbias, const float* dout, int N, int C) = 0;

  // out = a + b
  virtual void add(float* out, const float* a, const float* b, std::size_t n) = 0;
  // x *= s
  virtual void scale(float* x, std::size_t n, float s) = 0;
  // out = a * b, elementwise
  virtual void mul(float* out, const float* a, const float* b, std::size_t n) = 0;
  // Sum of squares, accumulated in double.
  virtual double sum_squares(const float* x, std::size_t n) = 0;

  // Per-row LayerNorm over C features (eps 1e-5); mean and rstd [N] are saved for backward.
  virtual void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* w,
                                 const float* b, int N, int C) = 0;
  // dinp += ..., dw += ..., db += ...
  virtual void layernorm_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp,
                                  const float* w, const float* mean, const float* rstd, int N, int C) = 0;

  // Per-row RMSNorm over C features (Llama's, modeling_llama.py's LlamaRMSNorm): rstd[n] =
  // 1 / sqrt(mean_c inp[n,c]^2 + eps), accumulated in double; out = inp * rstd * w. rstd [N] is saved for
  // backward.
  virtual void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* w, int N, int C,
                               float eps) = 0;
  // dinp += ..., dw += ... (dw may be null: a frozen norm).
  virtual void rmsnorm_backward(float* dinp, float* dw, const float* dout, const float* inp, const float* w,
                                const float* rstd, int N, int C) = 0;

  // Rotary position embeddings in place, with modeling_llama.py's pairing (rotate_half): in each of n_heads
  // heads of head_dim (even) values, value i < head_dim / 2 and value i + head_dim / 2 rotate together by
  // p * theta^(-2i / head_dim), p = positions[b,t] (null: p = t). x is [B*T, row_stride] and the heads start
  // at each row's first value, so a caller passes qkv + offset to rotate q or k inside a fused qkv row.
  virtual void rope_forward(float* x, int B, int T, int n_heads, int head_dim, int row_stride,
                            const int32_t* positions, float theta) = 0;
  // The transpose of rope_forward (rotation by the opposite angle), applied in place to the gradient.
  virtual void rope_backward(float* dx, int B, int T, int n_heads, int head_dim, int row_stride,
                             const int32_t* positions, float theta) = 0;

  // SwiGLU over the fused gate and up projections: gate_up [N, 2F] holds gate in each row's first F values
  // and up in its last F (one GEMM makes both); out [N, F] = silu(gate) * up, silu(g) = g / (1 + e^-g).
  virtual void swiglu_forward(float* out, const float* gate_up, int N, int F) = 0;
  // dgate_up [N, 2F] is overwritten.
  virtual void swiglu_backward(float* dgate_up, const float* gate_up, const float* dout, int N, int F) = 0;

  // silu(x) = x / (1 + e^-x) elementwise: the nonlinearity between a low-rank layer's factors
  // (lowrank.activation silu). out may be inp.
  virtual void silu_forward(float* out, const float* inp, std::size_t n) = 0;
  // dinp = silu'(inp) * dout; dinp may be dout (in place).
  virtual void silu_backward(float* dinp, const float* inp, const float* dout, std::size_t n) = 0;

  // GPT-2's tanh approximation of GELU.
  virtual void gelu_forward(float* out, const float* inp, std::size_t n) = 0;
  // dinp = gelu'(inp) * dout (overwrites dinp).
  virtual void gelu_backward(float* dinp, const float* inp, const float* dout, std::size_t n) = 0;

  // LoRA dropout: mask[i] = 0 with probability p, else 1 / (1 - p), from uniform_of(splitmix64_at(seed, i))
  // (rng.h), so that every backend draws the same mask for a seed.
  virtual void dropout_mask(float* mask, std::size_t n, double p, uint64_t seed) = 0;

  // Causal grouped-query attention. qkv [B,T,C + 2*NKV*hs], hs = C/NH: q (NH heads of hs), then k, then v
  // (NKV heads each; NKV divides NH), and query head h reads kv head h / (NH/NKV), as modeling_llama.py's
  // repeat_kv; NKV = NH is GPT-2's multi-head attention. out [B,T,C]. No [T,T] matrix is kept: lse [B,NH,T]
  // holds each score row's log-sum-exp, from which backward recomputes the probabilities. positions [B,T]
  // (null: 0 .. T-1 in every row) are each token's position inside its example when rows pack several:
  // query t then sees keys t - positions[t] .. t only.
  virtual void attention_forward(float* out, float* lse, const float* qkv, int B, int T, int C, int NH,
                                 int NKV, const int32_t* positions) = 0;
  // dqkv is overwritten (a kv head's gradient sums over the query heads that read it); out and lse are
  // forward's.
  virtual void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out,
                                  const float* lse, int B, int T, int C, int NH, int NKV,
                                  const int32_t* positions) = 0;

  // Attention of n new tokens of one sequence over a key/value cache, for incremental decoding. qkv [n, C +
  // 2*NKV*hs]: the new tokens' fused rows (attention_forward's layout) at positions past .. past + n - 1.
  // Their keys and values are first written to rows past .. past + n - 1 of kv [max positions, 2*NKV*hs]
  // (each row: k, then v, as a qkv row's tail); then query i attends over cache rows 0 .. past + i with
  // attention_forward's scores, 1/sqrt(hs) scaling and softmax, so out [n, C] equals attention_forward's rows
  // of the whole sequence to rounding. Saves no log-sum-exp: decoding has no backward.
  virtual void attention_decode(float* out, float* kv, const float* qkv, int n, int past, int C, int NH,
                                int NKV) = 0;

  // out[b,t,:] = wte[tokens[b,t],:] + wpe[p,:], p = positions[b,t] (null: p = t); wpe null: no position
  // table (rotary models), out = wte[tokens].
  virtual void embedding_forward(float* out, const int32_t* tokens, const float* wte, const float* wpe, int B,
                                 int T, int C, const int32_t* positions) = 0;
  // dwte, dwpe accumulate; either may be null, for a table that does not train (a finetuning base's).
  virtual void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens, int B,
                                  int T, int C, const int32_t* positions) = 0;

  // Softmax cross-entropy over V logits per row. losses[n] = -log p[target]; rows whose target is negative
  // are ignored (loss 0). The logits are scratch: when grad_scale != 0 they are overwritten in place by
  // grad_scale * (softmax - onehot) (zero for ignored rows), which saves a second [N,V] buffer; otherwise
  // their content afterwards is unspecified.
  virtual void softmax_xent(float* losses, float* logits, const int32_t* targets, int N, int V,
                            float grad_scale) = 0;

  // Values [first, first + count) of a quantized tensor (host storage, see quant.h) into out: bit for bit
  // what quant.h's dequantize gives. A device backend keeps its own copy of the codes, made on first use.
  virtual void dequantize(float* out, const QuantizedTensor& q, std::size_t first, std::size_t count) = 0;
  // Rows host_rows[0..n_rows) of a quantized matrix [rows, row_len] into out [n_rows, row_len].
  virtual void dequantize_rows(float* out, const QuantizedTensor& q, const int32_t* host_rows,
                               int n_rows) = 0;

  // One AdamW step (PyTorch's order: decoupled decay first, then the bias-corrected Adam update).
  virtual void adamw(float* param, const float* grad, float* m, float* v, std::size_t n, float lr,
                     float beta1, float beta2, float eps, float weight_decay, int step) = 0;

  // The most bytes this backend's allocations held at once (0 where memory is the host's: see mem_peak).
  virtual std::size_t peak_bytes() const { return 0; }
};

// The CPU backend: OpenBLAS sgemm and OpenMP loops.
std::unique_ptr<Backend> make_cpu_backend();

// OpenBLAS picks its kernels from the CPU model when it loads, and falls back to generic SSE3 ones on models
// it does not know (virtual CPUs often report such models), which runs sgemm several times slower. When that
// happened on a CPU with AVX-512 or AVX2, this sets OPENBLAS_CORETYPE to the matching kernel set and
// re-executes the program (the choice is only read at load time). It returns when nothing needs changing.
void ensure_blas_kernels(char** argv);

// The CUDA backend on GPU `device` (of those visible), when this build has one and a GPU is visible; throws
// InputError otherwise.
std::unique_ptr<Backend> make_cuda_backend(int device = 0);

// Number of visible CUDA devices (0 in a CPU-only build).
int cuda_device_count();

// Picks the backend for --device cpu|cuda|auto (auto: the CPU until the CUDA backend has passed make
// test-gpu on a GPU). local_rank: this process's index among the ranks on its node, which picks the GPU
// (local_rank modulo the visible devices), so that the ranks of a node share its GPUs evenly.
std::unique_ptr<Backend> make_backend(const std::string& device, int local_rank = 0);

}  // namespace lrllm

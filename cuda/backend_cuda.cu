// The CUDA backend (docs/design.md, Backend seam): every primitive of backend.h on one GPU. Tensors are
// float32 in device memory, the master copy of every parameter; matrix products run on the tensor cores in
// bf16 with float32 accumulation (cuBLASLt's CUBLAS_COMPUTE_32F_FAST_16BF), with one cached plan per shape.
// Every kernel runs on the legacy default stream, so the order of calls is the order of work and the host
// never waits except to read a result; NCCL transfers (nccl.cu) order themselves against it with events.
//
// Reductions (bias and LayerNorm parameter gradients, the embedding gradient, the sum of squares) run in a
// fixed order with no floating-point atomics, so two identical runs give identical bits.
#include <cublasLt.h>
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "adamw.cuh"
#include "attention.cuh"
#include "check.cuh"
#include "cublaslt.cuh"
#include "dequantize.cuh"
#include "elementwise.cuh"
#include "embedding.cuh"
#include "launch.cuh"
#include "layernorm.cuh"
#include "lrllm/backend/backend.h"
#include "lrllm/core/common.h"
#include "lrllm/core/rng.h"
#include "lrllm/model/quant.h"
#include "reduce.cuh"
#include "rmsnorm.cuh"
#include "rope.cuh"
#include "softmax.cuh"
#include "swiglu.cuh"

namespace lrllm {
namespace {

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {
    LRLLM_CUDA(cudaSetDevice(device));
    cudaDeviceProp prop{};
    LRLLM_CUDA(cudaGetDeviceProperties(&prop, device));
    name_ = strprintf("cuda:%d (%s)", device, prop.name);
    LRLLM_CUBLAS(cublaslt().create(&lt_));
    LRLLM_CUDA(cudaMalloc(&workspace_, kGemmWorkspaceBytes));
    LRLLM_CUDA(cudaMemcpyToSymbol(nf4_levels, kNf4Levels, sizeof kNf4Levels));
    LRLLM_CUDA(cudaMallocHost(&square_partials_, kSquareBlocks * sizeof(double)));
    LRLLM_CUDA(cudaMalloc(&square_partials_device_, kSquareBlocks * sizeof(double)));
  }

  ~CudaBackend() override {
    // Teardown runs also while an error unwinds: failures here are not reported over the first one.
    for (auto& [key, plan] : plans_) destroy_plan(plan);
    for (auto& [key, q] : quantized_) free_quantized(q);
    cudaFree(scratch_);
    cudaFree(scratch_int_);
    cublaslt().destroy(lt_);
    cudaFree(workspace_);
    cudaFree(square_partials_device_);
    cudaFreeHost(square_partials_);
  }

  std::string name() const override { return name_; }

  float* alloc(std::size_t count) override { return static_cast<float*>(allocate(count * sizeof(float))); }
  int32_t* alloc_int(std::size_t count) override {
    return static_cast<int32_t*>(allocate(count * sizeof(int32_t)));
  }
  void release(void* ptr) override {
    if (ptr == nullptr) return;
    const auto it = sizes_.find(ptr);
    if (it == sizes_.end()) throw RuntimeError("CudaBackend::release: pointer was not allocated here");
    current_ -= it->second;
    sizes_.erase(it);
    LRLLM_CUDA(cudaFree(ptr));
  }
  std::size_t peak_bytes() const override { return peak_; }

  void to_device(void* dst, const void* src, std::size_t bytes) override {
    if (bytes > 0) LRLLM_CUDA(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
  }
  void to_host(void* dst, const void* src, std::size_t bytes) override {
    if (bytes > 0) LRLLM_CUDA(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
  }
  void fill(float* x, std::size_t n, float value) override {
    launch_over(n, "fill_kernel", fill_kernel, x, n, value);
  }
  void copy(float* dst, const float* src, std::size_t n) override {
    if (n > 0) LRLLM_CUDA(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice, 0));
  }

  void matmul_strided(float* C, const float* A, const float* B, int M, int N, int K, bool trans_a,
                      bool trans_b, float alpha, float beta, int lda, int ldb, int ldc) override {
    if (M == 0 || N == 0) return;
    if (K == 0) {  // C = beta C: cuBLASLt rejects an empty inner dimension. Beta 0 ignores C, as in BLAS.
      for (int m = 0; m < M; ++m) {
        float* row = C + static_cast<std::size_t>(m) * ldc;
        if (beta == 0.0f)
          fill(row, N, 0.0f);
        else
          scale(row, N, beta);
      }
      return;
    }
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: cuBLASLt's A is our B and its B our A.
    const PlanKey key{
        M, N, K, trans_a, trans_b, lda, ldb, ldc, alignment_of(A), alignment_of(B), alignment_of(C)};
    const Plan& plan = plan_for(key);
    LRLLM_CUBLAS(cublaslt().matmul(lt_, plan.op, &alpha, B, plan.a, A, plan.b, &beta, C, plan.c, C, plan.c,
                                   &plan.algo, workspace_, kGemmWorkspaceBytes, 0));
  }

  void add_bias(float* out, const float* bias, int N, int C) override {
    const std::size_t n = static_cast<std::size_t>(N) * C;
    launch_over(n, "add_bias_kernel", add_bias_kernel, out, bias, n, C);
  }
  void bias_backward(float* dbias, const float* dout, int N, int C) override {
    column_sums(dbias, RowValue{dout, C}, N, C);
  }

  void add(float* out, const float* a, const float* b, std::size_t n) override {
    launch_over(n, "add_kernel", add_kernel, out, a, b, n);
  }
  void scale(float* x, std::size_t n, float s) override {
    launch_over(n, "scale_kernel", scale_kernel, x, n, s);
  }
  void mul(float* out, const float* a, const float* b, std::size_t n) override {
    launch_over(n, "mul_kernel", mul_kernel, out, a, b, n);
  }
  double sum_squares(const float* x, std::size_t n) override {
    if (n == 0) return 0.0;
    sum_squares_kernel<<<kSquareBlocks, kThreads>>>(square_partials_device_, x, n);
    LRLLM_CUDA_LAUNCH("sum_squares_kernel");
    LRLLM_CUDA(cudaMemcpy(square_partials_, square_partials_device_, kSquareBlocks * sizeof(double),
                          cudaMemcpyDeviceToHost));
    double total = 0;
    for (int k = 0; k < kSquareBlocks; ++k) total += square_partials_[k];
    return total;
  }

  void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* w,
                         const float* b, int N, int C) override {
    if (N == 0) return;
    layernorm_forward_kernel<<<blocks_for(N, kThreads / 32), kThreads>>>(out, mean, rstd, inp, w, b, N, C);
    LRLLM_CUDA_LAUNCH("layernorm_forward_kernel");
  }
  void layernorm_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp,
                          const float* w, const float* mean, const float* rstd, int N, int C) override {
    if (N == 0) return;
    layernorm_input_grad_kernel<<<blocks_for(N, kThreads / 32), kThreads>>>(dinp, dout, inp, w, mean, rstd, N,
                                                                            C);
    LRLLM_CUDA_LAUNCH("layernorm_input_grad_kernel");
    column_sums(dw, NormalizedProduct{dout, inp, mean, rstd, C}, N, C);
    column_sums(db, RowValue{dout, C}, N, C);
  }

  void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* w, int N, int C,
                       float eps) override {
    if (N == 0) return;
    rmsnorm_forward_kernel<<<blocks_for(N, kThreads / 32), kThreads>>>(out, rstd, inp, w, N, C, eps);
    LRLLM_CUDA_LAUNCH("rmsnorm_forward_kernel");
  }
  void rmsnorm_backward(float* dinp, float* dw, const float* dout, const float* inp, const float* w,
                        const float* rstd, int N, int C) override {
    if (N == 0) return;
    rmsnorm_input_grad_kernel<<<blocks_for(N, kThreads / 32), kThreads>>>(dinp, dout, inp, w, rstd, N, C);
    LRLLM_CUDA_LAUNCH("rmsnorm_input_grad_kernel");
    if (dw != nullptr) column_sums(dw, RmsNormalizedProduct{dout, inp, rstd, C}, N, C);
  }

  void rope_forward(float* x, int B, int T, int n_heads, int head_dim, int row_stride,
                    const int32_t* positions, float theta) override {
    launch_rope(x, B, T, n_heads, head_dim, row_stride, positions, theta, 1.0f);
  }
  void rope_backward(float* dx, int B, int T, int n_heads, int head_dim, int row_stride,
                     const int32_t* positions, float theta) override {
    launch_rope(dx, B, T, n_heads, head_dim, row_stride, positions, theta, -1.0f);
  }

  void swiglu_forward(float* out, const float* gate_up, int N, int F) override {
    const std::size_t n = static_cast<std::size_t>(N) * F;
    launch_over(n, "swiglu_forward_kernel", swiglu_forward_kernel, out, gate_up, n, F);
  }
  void swiglu_backward(float* dgate_up, const float* gate_up, const float* dout, int N, int F) override {
    const std::size_t n = static_cast<std::size_t>(N) * F;
    launch_over(n, "swiglu_backward_kernel", swiglu_backward_kernel, dgate_up, gate_up, dout, n, F);
  }

  void silu_forward(float* out, const float* inp, std::size_t n) override {
    launch_over(n, "silu_forward_kernel", silu_forward_kernel, out, inp, n);
  }
  void silu_backward(float* dinp, const float* inp, const float* dout, std::size_t n) override {
    launch_over(n, "silu_backward_kernel", silu_backward_kernel, dinp, inp, dout, n);
  }

  void gelu_forward(float* out, const float* inp, std::size_t n) override {
    launch_over(n, "gelu_forward_kernel", gelu_forward_kernel, out, inp, n);
  }
  void dropout_mask(float* mask, std::size_t n, double p, uint64_t seed) override {
    launch_over(n, "dropout_mask_kernel", dropout_mask_kernel, mask, n, p,
                static_cast<float>(1.0 / (1.0 - p)), seed);
  }
  void gelu_backward(float* dinp, const float* inp, const float* dout, std::size_t n) override {
    launch_over(n, "gelu_backward_kernel", gelu_backward_kernel, dinp, inp, dout, n);
  }

  // Packed rows (positions) need an example mask in the tiled kernels, which they do not have yet; the
  // finetuning setup refuses data.packing on this backend before a step runs.
  void attention_forward(float* out, float* lse, const float* qkv, int B, int T, int C, int NH, int NKV,
                         const int32_t* positions) override {
    LRLLM_CHECK(positions == nullptr, "attention_forward", "packed rows are not supported on the GPU");
    cuda::attention_forward(out, lse, qkv, B, T, C, NH, NKV, 0);
  }
  void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out,
                          const float* lse, int B, int T, int C, int NH, int NKV,
                          const int32_t* positions) override {
    LRLLM_CHECK(positions == nullptr, "attention_backward", "packed rows are not supported on the GPU");
    float* dots = scratch(static_cast<std::size_t>(B) * NH * T);
    cuda::attention_backward(dqkv, dout, qkv, out, lse, dots, B, T, C, NH, NKV, 0);
  }

  void attention_decode(float* out, float* kv, const float* qkv, int n, int past, int C, int NH,
                        int NKV) override {
    cuda::attention_decode(out, kv, qkv, n, past, C, NH, NKV, 0);
  }

  void embedding_forward(float* out, const int32_t* tokens, const float* wte, const float* wpe, int B, int T,
                         int C, const int32_t* positions) override {
    const std::size_t n = static_cast<std::size_t>(B) * T * C;
    launch_over(n, "embedding_forward_kernel", embedding_forward_kernel, out, tokens, wte, wpe, positions,
                B * T, T, C);
  }
  void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens, int B, int T,
                          int C, const int32_t* positions) override {
    const int N = B * T;
    if (N == 0) return;
    LRLLM_CHECK(positions == nullptr || dwpe == nullptr, "embedding_backward",
                "packed rows are not supported on the GPU");
    if (dwpe != nullptr) {
      position_grad_kernel<<<blocks_for(static_cast<std::size_t>(T) * C), kThreads>>>(dwpe, dout, B, T, C);
      LRLLM_CUDA_LAUNCH("position_grad_kernel");
    }
    if (dwte == nullptr) return;
    // The positions of each distinct token, grouped on the host (N ids, a few KB), so that each dwte row is
    // summed by one thread per column in position order: deterministic, unlike atomics.
    std::vector<int32_t> host_tokens(N);
    to_host(host_tokens.data(), tokens, N * sizeof(int32_t));
    std::vector<int32_t> order(N);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t a, int32_t b) { return host_tokens[a] < host_tokens[b]; });
    std::vector<int32_t> ids, starts;
    for (int k = 0; k < N; ++k)
      if (k == 0 || host_tokens[order[k]] != host_tokens[order[k - 1]]) {
        ids.push_back(host_tokens[order[k]]);
        starts.push_back(k);
      }
    starts.push_back(N);
    const int distinct = static_cast<int>(ids.size());
    int32_t* device = scratch_int(static_cast<std::size_t>(N) + 2 * distinct + 1);
    to_device(device, order.data(), N * sizeof(int32_t));
    to_device(device + N, ids.data(), distinct * sizeof(int32_t));
    to_device(device + N + distinct, starts.data(), (distinct + 1) * sizeof(int32_t));
    const dim3 grid(distinct, (C + kThreads - 1) / kThreads);
    embedding_backward_kernel<<<grid, kThreads>>>(dwte, dout, device + N, device + N + distinct, device, C);
    LRLLM_CUDA_LAUNCH("embedding_backward_kernel");
  }

  void softmax_xent(float* losses, float* logits, const int32_t* targets, int N, int V,
                    float grad_scale) override {
    if (N == 0) return;
    softmax_xent_kernel<<<N, 1024>>>(losses, logits, targets, V, grad_scale);
    LRLLM_CUDA_LAUNCH("softmax_xent_kernel");
  }

  void dequantize(float* out, const QuantizedTensor& q, std::size_t first, std::size_t count) override {
    const std::size_t n = q.size();
    if (first > n || count > n - first)
      throw RuntimeError(
          strprintf("dequantize: values [%zu, %zu) are outside a tensor of %zu", first, first + count, n));
    launch_over(count, "dequantize_kernel", dequantize_kernel, out, device_copy(q), first, count);
  }
  void dequantize_rows(float* out, const QuantizedTensor& q, const int32_t* host_rows, int n_rows) override {
    const int64_t rows = q.shape.empty() ? 0 : q.shape[0];
    for (int i = 0; i < n_rows; ++i)
      if (host_rows[i] < 0 || host_rows[i] >= rows)
        throw RuntimeError(strprintf("dequantize_rows: row %d outside a matrix of %lld rows", host_rows[i],
                                     static_cast<long long>(rows)));
    const std::size_t row_len = rows == 0 ? 0 : q.size() / rows;
    if (n_rows == 0 || row_len == 0) return;  // an empty launch is a configuration error
    int32_t* device_rows = scratch_int(n_rows);
    to_device(device_rows, host_rows, n_rows * sizeof(int32_t));
    dequantize_rows_kernel<<<blocks_for(n_rows * row_len), kThreads>>>(out, device_copy(q), device_rows,
                                                                       n_rows, row_len);
    LRLLM_CUDA_LAUNCH("dequantize_rows_kernel");
  }

  void adamw(float* param, const float* grad, float* m, float* v, std::size_t n, float lr, float beta1,
             float beta2, float eps, float weight_decay, int step) override {
    if (n == 0) return;
    // The bias corrections in float on the host, as the CPU backend computes them.
    const float bc1 = 1.0f - std::pow(beta1, static_cast<float>(step));
    const float bc2 = 1.0f - std::pow(beta2, static_cast<float>(step));
    adamw_kernel<<<blocks_for(n), kThreads>>>(param, grad, m, v, n, beta1, beta2, eps, lr / bc1,
                                              std::sqrt(bc2), 1.0f - lr * weight_decay);
    LRLLM_CUDA_LAUNCH("adamw_kernel");
  }

 private:
  struct PlanKey {
    int M, N, K;
    bool trans_a, trans_b;
    int lda, ldb, ldc;
    uint32_t align_a, align_b, align_c;
    auto tie() const { return std::tie(M, N, K, trans_a, trans_b, lda, ldb, ldc, align_a, align_b, align_c); }
    bool operator<(const PlanKey& o) const { return tie() < o.tie(); }
  };
  struct Plan {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
  };

  // The descriptors and the heuristic's first algorithm for one shape, made once and kept.
  const Plan& plan_for(const PlanKey& k) {
    if (const auto it = plans_.find(k); it != plans_.end()) return it->second;
    Plan p;
    LRLLM_CUBLAS(cublaslt().desc_create(&p.op, CUBLAS_COMPUTE_32F_FAST_16BF, CUDA_R_32F));
    const cublasOperation_t op_a = k.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;  // cuBLASLt's A: our B
    const cublasOperation_t op_b = k.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;  // cuBLASLt's B: our A
    LRLLM_CUBLAS(cublaslt().desc_set_attribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof op_a));
    LRLLM_CUBLAS(cublaslt().desc_set_attribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof op_b));
    // Column-major views: our B [K,N] (or [N,K] transposed) is N x K (K x N), our A likewise, C is N x M.
    LRLLM_CUBLAS(
        cublaslt().layout_create(&p.a, CUDA_R_32F, k.trans_b ? k.K : k.N, k.trans_b ? k.N : k.K, k.ldb));
    LRLLM_CUBLAS(
        cublaslt().layout_create(&p.b, CUDA_R_32F, k.trans_a ? k.M : k.K, k.trans_a ? k.K : k.M, k.lda));
    LRLLM_CUBLAS(cublaslt().layout_create(&p.c, CUDA_R_32F, k.N, k.M, k.ldc));
    cublasLtMatmulPreference_t pref = nullptr;
    LRLLM_CUBLAS(cublaslt().preference_create(&pref));
    const std::size_t workspace = kGemmWorkspaceBytes;
    LRLLM_CUBLAS(cublaslt().preference_set_attribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                     &workspace, sizeof workspace));
    // cuBLASLt assumes 256-byte aligned pointers unless told otherwise; column blocks of a larger matrix are
    // not.
    for (const auto& [attr, align] : {std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, k.align_b},
                                      std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, k.align_a},
                                      std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, k.align_c},
                                      std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, k.align_c}})
      LRLLM_CUBLAS(cublaslt().preference_set_attribute(pref, attr, &align, sizeof align));
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    const cublasStatus_t status =
        cublaslt().algo_get_heuristic(lt_, p.op, p.a, p.b, p.c, p.c, pref, 1, &result, &found);
    cublaslt().preference_destroy(pref);
    if (status != CUBLAS_STATUS_SUCCESS || found == 0) {
      destroy_plan(p);
      fail_call("cublasLtMatmulAlgoGetHeuristic",
                strprintf("no algorithm for M=%d N=%d K=%d trans_a=%d trans_b=%d", k.M, k.N, k.K, k.trans_a,
                          k.trans_b),
                __FILE__, __LINE__);
    }
    p.algo = result.algo;
    return plans_.emplace(k, p).first->second;
  }

  static void destroy_plan(Plan& p) {
    if (p.a) cublaslt().layout_destroy(p.a);
    if (p.b) cublaslt().layout_destroy(p.b);
    if (p.c) cublaslt().layout_destroy(p.c);
    if (p.op) cublaslt().desc_destroy(p.op);
  }

  void* allocate(std::size_t bytes) {
    // Zero-sized tensors still get a distinct pointer, as on the CPU.
    const std::size_t size = std::max<std::size_t>(bytes, 256);
    void* p = nullptr;
    const cudaError_t code = cudaMalloc(&p, size);
    if (code == cudaErrorMemoryAllocation) {
      cudaGetLastError();
      std::size_t free = 0, total = 0;
      cudaMemGetInfo(&free, &total);
      throw RuntimeError(
          strprintf("out of GPU memory on %s allocating %.1f MB (%.1f MB free of %.1f MB, %.1f MB "
                    "held by lrllm)",
                    name_.c_str(), size / 1e6, free / 1e6, total / 1e6, current_ / 1e6));
    }
    LRLLM_CUDA(code);
    LRLLM_CUDA(cudaMemset(p, 0, size));
    sizes_[p] = size;
    current_ += size;
    peak_ = std::max(peak_, current_);
    return p;
  }

  // Scratch buffers of at least n elements, grown when too small; valid until the next call that uses them.
  // Growing frees the old buffer, and cudaFree waits for the kernels still queued that read it.
  float* scratch(std::size_t n) { return grown(scratch_, scratch_floats_, n); }
  int32_t* scratch_int(std::size_t n) { return grown(scratch_int_, scratch_ints_, n); }
  template <typename T>
  T* grown(T*& buffer, std::size_t& capacity, std::size_t n) {
    if (n > capacity) {
      release(buffer);
      buffer = static_cast<T*>(allocate(n * sizeof(T)));
      capacity = n;
    }
    return buffer;
  }

  template <typename Value>
  void column_sums(float* out, Value value, int N, int C) {
    if (N == 0 || C == 0) return;
    const int chunk_rows = (N + kColumnChunks - 1) / kColumnChunks;
    const int chunks = (N + chunk_rows - 1) / chunk_rows;
    float* partial = scratch(static_cast<std::size_t>(chunks) * C);
    column_partials<<<dim3((C + 31) / 32, chunks), dim3(32, 8)>>>(partial, N, C, chunk_rows, value);
    LRLLM_CUDA_LAUNCH("column_partials");
    column_finish<<<(C + kThreads - 1) / kThreads, kThreads>>>(out, partial, chunks, C);
    LRLLM_CUDA_LAUNCH("column_finish");
  }

  // The device copy of q's storage, uploaded on first use and kept for the backend's life: a frozen base
  // never changes. The host tensor's code buffer identifies it.
  const DeviceQuantized& device_copy(const QuantizedTensor& q) {
    auto it = quantized_.find(&q);
    if (it != quantized_.end() && it->second.host_codes == q.codes.data() &&
        it->second.host_bytes == q.codes.size())
      return it->second;
    if (it != quantized_.end()) {
      free_quantized(it->second);
      quantized_.erase(it);
    }
    // A tensor whose buffers disagree with its shape is rejected as quant.h's dequantize rejects it (a
    // dequantization of no values runs just that check); the kernels would read past the buffers instead.
    lrllm::dequantize(q, 0, 0, nullptr);
    DeviceQuantized d;
    d.host_codes = q.codes.data();
    d.host_bytes = q.codes.size();
    d.nf4 = q.kind == QuantKind::nf4;
    d.double_quant = q.double_quant;
    d.block = q.block;
    d.absmax_mean = q.absmax_mean;
    d.codes = upload<uint8_t>(q.codes.data(), q.codes.size());
    if (q.double_quant) {
      d.absmax_q = upload<int8_t>(reinterpret_cast<const int8_t*>(q.absmax_q.data()), q.absmax_q.size());
      d.absmax_scale = upload<float>(q.absmax_scale.data(), q.absmax_scale.size());
    } else {
      d.absmax = upload<float>(q.absmax.data(), q.absmax.size());
    }
    return quantized_.emplace(&q, d).first->second;
  }

  template <typename T>
  T* upload(const T* host, std::size_t n) {
    T* d = static_cast<T*>(allocate(n * sizeof(T)));
    to_device(d, host, n * sizeof(T));
    return d;
  }

  void free_quantized(DeviceQuantized& q) {
    for (void* p : {static_cast<void*>(q.codes), static_cast<void*>(q.absmax), static_cast<void*>(q.absmax_q),
                    static_cast<void*>(q.absmax_scale)})
      if (p != nullptr) {
        current_ -= sizes_[p];
        sizes_.erase(p);
        cudaFree(p);
      }
  }

  int device_;
  std::string name_;
  cublasLtHandle_t lt_ = nullptr;
  void* workspace_ = nullptr;
  double* square_partials_ = nullptr;  // pinned
  double* square_partials_device_ = nullptr;
  std::map<PlanKey, Plan> plans_;
  std::unordered_map<const QuantizedTensor*, DeviceQuantized> quantized_;
  std::unordered_map<void*, std::size_t> sizes_;
  std::size_t current_ = 0, peak_ = 0;
  float* scratch_ = nullptr;
  std::size_t scratch_floats_ = 0;
  int32_t* scratch_int_ = nullptr;
  std::size_t scratch_ints_ = 0;
};

}  // namespace

int cuda_device_count() {
  int count = 0;
  // No driver or no device is an answer here, not an error: the CPU backend takes over.
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

std::unique_ptr<Backend> make_cuda_backend(int device) {
  const int count = cuda_device_count();
  if (count == 0) throw InputError("--device cuda: no CUDA device is visible");
  if (device < 0 || device >= count)
    throw InputError(strprintf("--device cuda: GPU %d asked for, %d visible", device, count));
  return std::make_unique<CudaBackend>(device);
}

}  // namespace lrllm

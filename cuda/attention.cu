// Causal attention kernels, FlashAttention style in fp32. A block of kThreads threads owns a kTile x kTile
// tile of scores: thread (ty, tx) = (tid / 16, tid % 16) holds rows ty * 4 + i and columns tx + 16 * j
// (i, j < 4), so the 16 threads sharing a row form one half-warp and reduce it with shuffles. Operand tiles
// are staged in shared memory, zero-filled past T and past the head size, so padded rows and columns add
// exact zeros and never carry a NaN into a product.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "attention.cuh"
#include "check.cuh"
#include "lrllm/core/common.h"

namespace lrllm::cuda {

namespace {

constexpr int kTile = 64;      // query rows and key rows per tile
constexpr int kThreads = 256;  // 16 x 16 threads, each 4 x 4 scores
constexpr int kRows = 4;       // tile rows per thread
constexpr int kCols = 4;       // score columns per thread, strided by 16
constexpr int kPad = 4;        // rows stay float4-aligned, and 8 consecutive rows' float4s hit distinct banks
constexpr int kMaxHead = 128;

static_assert(kTile == 16 * kRows && kTile == 16 * kCols && kThreads == 256);

// Floats in one staged [kTile, HS] operand tile and in one [kTile, kTile] probability tile.
template <int HS>
constexpr int kOperandFloats = (HS + kPad) * kTile;
constexpr int kScoreFloats = kTile * (kTile + kPad);

__device__ __forceinline__ float component(const float4& v, int k) {
  return k == 0 ? v.x : k == 1 ? v.y : k == 2 ? v.z : v.w;
}

__device__ __forceinline__ const float4& as_float4(const float* p) {
  return *reinterpret_cast<const float4*>(p);
}

// The 16 lanes of a half-warp hold one row; xor offsets below 16 stay inside it. Partners add in the same
// commutative pairs at every step, so all 16 lanes end with the same bits.
__device__ __forceinline__ float row_max(float v) {
  for (int off = 8; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

__device__ __forceinline__ float row_sum(float v) {
  for (int off = 8; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Stages rows [0, rows) x columns [0, hs) of a row-major matrix with leading dimension ld into a
// [kTile, HS + kPad] shared tile; everything else is zero. vec: hs is a multiple of 4 and src 16-byte
// aligned, so whole float4s move. All of a thread's loads are issued before its stores, so their latencies
// overlap.
template <int HS>
__device__ __forceinline__ void load_tile(float* dst, const float* src, std::size_t ld, int rows, int hs,
                                          bool vec) {
  const int tid = static_cast<int>(threadIdx.x);
  if (vec) {
    constexpr int per_row = HS / 4;
    constexpr int step = kThreads / per_row;
    const int c = tid % per_row * 4;
    const int r0 = tid / per_row;
    float4 val[kTile / step];
#pragma unroll
    for (int k = 0; k < kTile / step; ++k) {
      const int r = r0 + k * step;
      val[k] = r < rows && c < hs ? *reinterpret_cast<const float4*>(src + r * ld + c)
                                  : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
#pragma unroll
    for (int k = 0; k < kTile / step; ++k)
      *reinterpret_cast<float4*>(dst + (r0 + k * step) * (HS + kPad) + c) = val[k];
  } else {
    constexpr int step = kThreads / HS;
    const int c = tid % HS;
    const int r0 = tid / HS;
    // Unrolled in groups only: a full unroll keeps every row's 64-bit offset live across the tile loop.
#pragma unroll 4
    for (int k = 0; k < kTile / step; ++k) {
      const int r = r0 + k * step;
      dst[r * (HS + kPad) + c] = r < rows && c < hs ? src[r * ld + c] : 0.0f;
    }
  }
}

// s[i][j] = a[ty * 4 + i, :] . b[tx + 16 * j, :] over both [kTile, HS + kPad] tiles.
template <int HS>
__device__ __forceinline__ void tile_scores(float (&s)[kRows][kCols], const float* a, const float* b, int ty,
                                            int tx) {
  constexpr int ld = HS + kPad;
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
#pragma unroll
    for (int j = 0; j < kCols; ++j) s[i][j] = 0.0f;
  }
  // Kept rolled to hold register use down (two blocks per SM at HS = 64); the other resident warps hide
  // the shared-memory latency.
#pragma unroll 1
  for (int d = 0; d < HS; d += 4) {
    float4 av[kRows], bv[kCols];
#pragma unroll
    for (int i = 0; i < kRows; ++i) av[i] = as_float4(a + (ty * kRows + i) * ld + d);
#pragma unroll
    for (int j = 0; j < kCols; ++j) bv[j] = as_float4(b + (tx + 16 * j) * ld + d);
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        s[i][j] = fmaf(av[i].x, bv[j].x, s[i][j]);
        s[i][j] = fmaf(av[i].y, bv[j].y, s[i][j]);
        s[i][j] = fmaf(av[i].z, bv[j].z, s[i][j]);
        s[i][j] = fmaf(av[i].w, bv[j].w, s[i][j]);
      }
  }
}

// acc[i][4g + c] += sum_x w[ty * 4 + i, x] * m[x, 64g + 4tx + c], w a [kTile, kTile + kPad] tile of
// weights (probabilities or score gradients), m a [kTile, HS + kPad] operand tile.
template <int HS>
__device__ __forceinline__ void tile_accumulate(float (&acc)[kRows][HS / 16], const float* w, const float* m,
                                                int ty, int tx) {
  constexpr int ldw = kTile + kPad;
  constexpr int ldm = HS + kPad;
#pragma unroll 1  // as in tile_scores
  for (int x = 0; x < kTile; x += 4) {
    float4 wv[kRows];
#pragma unroll
    for (int i = 0; i < kRows; ++i) wv[i] = as_float4(w + (ty * kRows + i) * ldw + x);
#pragma unroll
    for (int k = 0; k < 4; ++k)
#pragma unroll
      for (int g = 0; g < HS / 64; ++g) {
        const float4 mv = as_float4(m + (x + k) * ldm + g * 64 + tx * 4);
#pragma unroll
        for (int i = 0; i < kRows; ++i) {
          const float wi = component(wv[i], k);
          acc[i][g * 4 + 0] = fmaf(wi, mv.x, acc[i][g * 4 + 0]);
          acc[i][g * 4 + 1] = fmaf(wi, mv.y, acc[i][g * 4 + 1]);
          acc[i][g * 4 + 2] = fmaf(wi, mv.z, acc[i][g * 4 + 2]);
          acc[i][g * 4 + 3] = fmaf(wi, mv.w, acc[i][g * 4 + 3]);
        }
      }
  }
}

// Writes the thread's rows of a [kTile, HS / 16]-per-thread accumulator (times mul) to dst, row r of the
// tile at dst + r * ld; rows past `rows` and columns past hs are padding.
template <int HS>
__device__ __forceinline__ void store_rows(float* dst, std::size_t ld, const float (&acc)[kRows][HS / 16],
                                           const float (&mul)[kRows], int rows, int hs, int ty, int tx) {
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int r = ty * kRows + i;
    if (r >= rows) continue;
#pragma unroll
    for (int c = 0; c < HS / 16; ++c) {
      const int col = (c / 4) * 64 + tx * 4 + c % 4;
      if (col < hs) dst[r * ld + col] = acc[i][c] * mul[i];
    }
  }
}

__device__ __forceinline__ int tile_rows(int T, int start) {
  return T - start < kTile ? T - start : kTile;
}

// One block per (query tile, b * NH + h); the heaviest query tiles (most key tiles under the causal mask)
// come first in launch order so the tail of the grid is short.
template <int HS>
__global__ void __launch_bounds__(kThreads)
    attention_forward_kernel(float* out, float* lse, const float* qkv, int T, int C, int NH, int NKV, int hs,
                             float scale, int n_tiles, int n_heads, bool vec) {
  extern __shared__ float4 smem[];
  float* qs = reinterpret_cast<float*>(smem);
  float* ks = qs + kOperandFloats<HS>;
  float* vs = ks + kOperandFloats<HS>;
  // The probabilities take the key tile's place once the scores are computed.
  float* ps = ks;
  static_assert(kScoreFloats <= kOperandFloats<HS>);

  const int tid = static_cast<int>(threadIdx.x);
  const int ty = tid / 16;
  const int tx = tid % 16;
  const int qt = n_tiles - 1 - static_cast<int>(blockIdx.x) / n_heads;
  const int bh = static_cast<int>(blockIdx.x) % n_heads;
  const int b = bh / NH;
  const int h = bh % NH;
  const std::size_t kv = static_cast<std::size_t>(NKV) * hs;
  const std::size_t ld = C + 2 * kv;
  const float* row = qkv + static_cast<std::size_t>(b) * T * ld;
  const float* q = row + static_cast<std::size_t>(h) * hs;
  const float* k = row + C + static_cast<std::size_t>(h / (NH / NKV)) * hs;
  const float* v = k + kv;
  const int q0 = qt * kTile;

  load_tile<HS>(qs, q + q0 * ld, ld, tile_rows(T, q0), hs, vec);

  float o[kRows][HS / 16] = {};
  float m[kRows];
  float l[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
  }

  for (int kt = 0; kt <= qt; ++kt) {
    const int k0 = kt * kTile;
    __syncthreads();  // the previous tile's ps and vs are read
    load_tile<HS>(ks, k + k0 * ld, ld, tile_rows(T, k0), hs, vec);
    load_tile<HS>(vs, v + k0 * ld, ld, tile_rows(T, k0), hs, vec);
    __syncthreads();

    float s[kRows][kCols];
    tile_scores<HS>(s, qs, ks, ty, tx);
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      // Key 0 is never masked and lies in the first tile, so the running max is finite from the first
      // tile on: exp(m - m_new) and exp(s - m_new) see at most exp(-inf) = 0, never -inf - -inf.
      const int query = q0 + ty * kRows + i;
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        s[i][j] = k0 + tx + 16 * j <= query ? s[i][j] * scale : -INFINITY;
        mx = fmaxf(mx, s[i][j]);
      }
      const float m_new = fmaxf(m[i], row_max(mx));
      const float alpha = expf(m[i] - m_new);
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        s[i][j] = expf(s[i][j] - m_new);
        sum += s[i][j];
      }
      l[i] = l[i] * alpha + row_sum(sum);
      m[i] = m_new;
#pragma unroll
      for (int c = 0; c < HS / 16; ++c) o[i][c] *= alpha;
    }

    __syncthreads();  // every thread's scores are done with ks
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int j = 0; j < kCols; ++j) ps[(ty * kRows + i) * (kTile + kPad) + tx + 16 * j] = s[i][j];
    __syncthreads();
    tile_accumulate<HS>(o, ps, vs, ty, tx);
  }

  const int rows = tile_rows(T, q0);
  float inv[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) inv[i] = 1.0f / l[i];
  store_rows<HS>(out + (static_cast<std::size_t>(b) * T + q0) * C + static_cast<std::size_t>(h) * hs, C, o,
                 inv, rows, hs, ty, tx);
  if (tx == 0) {
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int r = ty * kRows + i;
      if (r < rows) lse[static_cast<std::size_t>(bh) * T + q0 + r] = m[i] + logf(l[i]);
    }
  }
}

// dot[(b * NH + h) * T + t] = dO . O over the head's hs values; one warp per row, lanes in a fixed order.
__global__ void __launch_bounds__(kThreads)
    attention_row_dot_kernel(float* dot, const float* dout, const float* out, int T, int C, int NH, int hs,
                             int n_rows) {
  const int row = static_cast<int>(blockIdx.x) * (kThreads / 32) + static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  if (row >= n_rows) return;  // whole warps leave together, so the shuffles below see full warps
  const int bh = row / T;
  const int t = row % T;
  const std::size_t off =
      (static_cast<std::size_t>(bh / NH) * T + t) * C + static_cast<std::size_t>(bh % NH) * hs;
  float sum = 0.0f;
  for (int d = lane; d < hs; d += 32) sum = fmaf(dout[off + d], out[off + d], sum);
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) dot[row] = sum;
}

// dq for one query tile: loops over the key tiles up to the diagonal like forward, with P recomputed from
// lse; dS = P * (dO . v - D) * scale, dq = dS k.
template <int HS>
__global__ void __launch_bounds__(kThreads)
    attention_backward_dq_kernel(float* dqkv, const float* dout, const float* qkv, const float* lse,
                                 const float* dot, int T, int C, int NH, int NKV, int hs, float scale,
                                 int n_tiles, int n_heads, bool vec) {
  extern __shared__ float4 smem[];
  float* qs = reinterpret_cast<float*>(smem);
  float* dos = qs + kOperandFloats<HS>;
  float* ks = dos + kOperandFloats<HS>;
  float* vs = ks + kOperandFloats<HS>;
  // The score gradients take the value tile's place once dO . v is computed.
  float* dss = vs;
  static_assert(kScoreFloats <= kOperandFloats<HS>);

  const int tid = static_cast<int>(threadIdx.x);
  const int ty = tid / 16;
  const int tx = tid % 16;
  const int qt = n_tiles - 1 - static_cast<int>(blockIdx.x) / n_heads;
  const int bh = static_cast<int>(blockIdx.x) % n_heads;
  const int b = bh / NH;
  const int h = bh % NH;
  const std::size_t kv = static_cast<std::size_t>(NKV) * hs;
  const std::size_t ld = C + 2 * kv;
  const std::size_t head = static_cast<std::size_t>(b) * T * ld + static_cast<std::size_t>(h) * hs;
  const float* q = qkv + head;
  const float* k =
      qkv + static_cast<std::size_t>(b) * T * ld + C + static_cast<std::size_t>(h / (NH / NKV)) * hs;
  const float* v = k + kv;
  const int q0 = qt * kTile;
  const int rows = tile_rows(T, q0);

  load_tile<HS>(qs, q + q0 * ld, ld, rows, hs, vec);
  load_tile<HS>(dos, dout + (static_cast<std::size_t>(b) * T + q0) * C + static_cast<std::size_t>(h) * hs, C,
                rows, hs, vec);
  float row_lse[kRows];
  float row_dot[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int r = ty * kRows + i;
    row_lse[i] = r < rows ? lse[static_cast<std::size_t>(bh) * T + q0 + r] : 0.0f;
    row_dot[i] = r < rows ? dot[static_cast<std::size_t>(bh) * T + q0 + r] : 0.0f;
  }

  float dq[kRows][HS / 16] = {};
  for (int kt = 0; kt <= qt; ++kt) {
    const int k0 = kt * kTile;
    __syncthreads();  // the previous tile's dss (vs) and ks are read
    load_tile<HS>(ks, k + k0 * ld, ld, tile_rows(T, k0), hs, vec);
    load_tile<HS>(vs, v + k0 * ld, ld, tile_rows(T, k0), hs, vec);
    __syncthreads();

    float s[kRows][kCols];
    float dp[kRows][kCols];
    tile_scores<HS>(s, qs, ks, ty, tx);
    tile_scores<HS>(dp, dos, vs, ty, tx);
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int query = q0 + ty * kRows + i;
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const bool live = query < T && k0 + tx + 16 * j <= query;
        const float p = live ? expf(s[i][j] * scale - row_lse[i]) : 0.0f;
        s[i][j] = live ? p * (dp[i][j] - row_dot[i]) * scale : 0.0f;
      }
    }

    __syncthreads();  // every thread's dO . v is done with vs
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int j = 0; j < kCols; ++j) dss[(ty * kRows + i) * (kTile + kPad) + tx + 16 * j] = s[i][j];
    __syncthreads();
    tile_accumulate<HS>(dq, dss, ks, ty, tx);
  }

  const float one[kRows] = {1.0f, 1.0f, 1.0f, 1.0f};
  store_rows<HS>(dqkv + head + q0 * ld, ld, dq, one, rows, hs, ty, tx);
}

// dk and dv for one key tile of one kv head: loops over the query heads that read it, and for each over the
// query tiles from the diagonal on, the tile transposed (rows are keys, columns queries): dv = sum P^T dO,
// dk = sum dS^T q, added in registers in a fixed order (no atomics).
template <int HS>
__global__ void __launch_bounds__(kThreads)
    attention_backward_dkdv_kernel(float* dqkv, const float* dout, const float* qkv, const float* lse,
                                   const float* dot, int T, int C, int NH, int NKV, int hs, float scale,
                                   int n_tiles, int n_kv_heads, bool vec) {
  extern __shared__ float4 smem[];
  float* ks = reinterpret_cast<float*>(smem);
  float* vs = ks + kOperandFloats<HS>;
  float* qs = vs + kOperandFloats<HS>;
  float* dos = qs + kOperandFloats<HS>;
  float* ps = dos + kOperandFloats<HS>;
  float* dss = ps + kScoreFloats;

  const int tid = static_cast<int>(threadIdx.x);
  const int ty = tid / 16;
  const int tx = tid % 16;
  // Key tile 0 meets every query tile: low tiles first.
  const int kt = static_cast<int>(blockIdx.x) / n_kv_heads;
  const int bg = static_cast<int>(blockIdx.x) % n_kv_heads;
  const int b = bg / NKV;
  const int g = bg % NKV;
  const int group = NH / NKV;
  const std::size_t kv = static_cast<std::size_t>(NKV) * hs;
  const std::size_t ld = C + 2 * kv;
  const float* row = qkv + static_cast<std::size_t>(b) * T * ld;
  const std::size_t kv_head = static_cast<std::size_t>(b) * T * ld + C + static_cast<std::size_t>(g) * hs;
  const float* k = qkv + kv_head;
  const float* v = k + kv;
  const int k0 = kt * kTile;
  const int rows = tile_rows(T, k0);

  load_tile<HS>(ks, k + k0 * ld, ld, rows, hs, vec);
  load_tile<HS>(vs, v + k0 * ld, ld, rows, hs, vec);

  float dk[kRows][HS / 16] = {};
  float dv[kRows][HS / 16] = {};
  for (int h = g * group; h < (g + 1) * group; ++h) {
    const int bh = b * NH + h;
    const float* q = row + static_cast<std::size_t>(h) * hs;
    const float* dO = dout + static_cast<std::size_t>(b) * T * C + static_cast<std::size_t>(h) * hs;
    for (int qt = kt; qt < n_tiles; ++qt) {
      const int q0 = qt * kTile;
      const int qrows = tile_rows(T, q0);
      __syncthreads();  // the previous tile's qs, dos, ps and dss are read
      load_tile<HS>(qs, q + q0 * ld, ld, qrows, hs, vec);
      load_tile<HS>(dos, dO + q0 * static_cast<std::size_t>(C), C, qrows, hs, vec);
      float col_lse[kCols];
      float col_dot[kCols];
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const int c = tx + 16 * j;
        col_lse[j] = c < qrows ? lse[static_cast<std::size_t>(bh) * T + q0 + c] : 0.0f;
        col_dot[j] = c < qrows ? dot[static_cast<std::size_t>(bh) * T + q0 + c] : 0.0f;
      }
      __syncthreads();

      float s[kRows][kCols];
      float dp[kRows][kCols];
      tile_scores<HS>(s, ks, qs, ty, tx);
      tile_scores<HS>(dp, vs, dos, ty, tx);
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int key = k0 + ty * kRows + i;
#pragma unroll
        for (int j = 0; j < kCols; ++j) {
          const int query = q0 + tx + 16 * j;
          const bool live = query < T && key <= query;
          const float p = live ? expf(s[i][j] * scale - col_lse[j]) : 0.0f;
          const int at = (ty * kRows + i) * (kTile + kPad) + tx + 16 * j;
          ps[at] = p;
          dss[at] = live ? p * (dp[i][j] - col_dot[j]) * scale : 0.0f;
        }
      }
      __syncthreads();
      tile_accumulate<HS>(dv, ps, dos, ty, tx);
      tile_accumulate<HS>(dk, dss, qs, ty, tx);
    }
  }

  const float one[kRows] = {1.0f, 1.0f, 1.0f, 1.0f};
  float* dk_out = dqkv + kv_head + k0 * ld;
  store_rows<HS>(dk_out, ld, dk, one, rows, hs, ty, tx);
  store_rows<HS>(dk_out + kv, ld, dv, one, rows, hs, ty, tx);
}

struct Shape {
  int hs = 0;
  int n_tiles = 0;
  int n_heads = 0;     // B * NH
  int n_kv_heads = 0;  // B * NKV
  float scale = 0.0f;
  bool vec = false;  // the tiles load as float4s
};

// staged: the matrices whose tiles go through shared memory.
Shape shape_of(int B, int T, int C, int NH, int NKV, std::initializer_list<const float*> staged) {
  if (B < 0 || T < 0 || C <= 0 || NH <= 0 || C % NH != 0 || NKV <= 0 || NH % NKV != 0)
    throw RuntimeError(strprintf("attention: bad shape B=%d T=%d C=%d NH=%d NKV=%d", B, T, C, NH, NKV));
  Shape s;
  s.hs = C / NH;
  if (s.hs > kMaxHead)
    throw RuntimeError(
        strprintf("attention: head size %d (C=%d / NH=%d) is over the CUDA kernels' limit of %d", s.hs, C, NH,
                  kMaxHead));
  s.n_tiles = (T + kTile - 1) / kTile;
  s.n_heads = B * NH;
  s.n_kv_heads = B * NKV;
  // Grid x holds n_tiles * B * NH blocks and the row-dot kernel indexes B * NH * T rows in an int.
  if (static_cast<std::int64_t>(B) * NH * (static_cast<std::int64_t>(s.n_tiles) * kTile) > INT32_MAX)
    throw RuntimeError(strprintf("attention: B=%d x NH=%d x T=%d is too large", B, NH, T));
  s.scale = 1.0f / std::sqrt(static_cast<float>(s.hs));
  // Rows start C or C + 2 NKV hs floats apart and heads hs apart, so with hs a multiple of 4 an aligned base
  // keeps every float4 aligned.
  s.vec = s.hs % 4 == 0;
  for (const float* p : staged) s.vec = s.vec && reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
  return s;
}

template <int HS>
void forward(float* out, float* lse, const float* qkv, int T, int C, int NH, int NKV, const Shape& s,
             cudaStream_t stream) {
  const std::size_t smem = 3 * kOperandFloats<HS> * sizeof(float);
  LRLLM_CUDA(cudaFuncSetAttribute(attention_forward_kernel<HS>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem)));
  attention_forward_kernel<HS><<<s.n_tiles * s.n_heads, kThreads, smem, stream>>>(
      out, lse, qkv, T, C, NH, NKV, s.hs, s.scale, s.n_tiles, s.n_heads, s.vec);
  LRLLM_CUDA_LAUNCH("attention_forward_kernel");
}

template <int HS>
void backward(float* dqkv, const float* dout, const float* qkv, const float* lse, const float* dot, int T,
              int C, int NH, int NKV, const Shape& s, cudaStream_t stream) {
  const std::size_t dq_smem = 4 * kOperandFloats<HS> * sizeof(float);
  LRLLM_CUDA(cudaFuncSetAttribute(attention_backward_dq_kernel<HS>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dq_smem)));
  attention_backward_dq_kernel<HS><<<s.n_tiles * s.n_heads, kThreads, dq_smem, stream>>>(
      dqkv, dout, qkv, lse, dot, T, C, NH, NKV, s.hs, s.scale, s.n_tiles, s.n_heads, s.vec);
  LRLLM_CUDA_LAUNCH("attention_backward_dq_kernel");

  const std::size_t dkdv_smem = (4 * kOperandFloats<HS> + 2 * kScoreFloats) * sizeof(float);
  LRLLM_CUDA(cudaFuncSetAttribute(attention_backward_dkdv_kernel<HS>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dkdv_smem)));
  attention_backward_dkdv_kernel<HS><<<s.n_tiles * s.n_kv_heads, kThreads, dkdv_smem, stream>>>(
      dqkv, dout, qkv, lse, dot, T, C, NH, NKV, s.hs, s.scale, s.n_tiles, s.n_kv_heads, s.vec);
  LRLLM_CUDA_LAUNCH("attention_backward_dkdv_kernel");
}

// Decoding: one block per (new query, head) of kDecodeWarps warps. Warp w visits the keys w, w +
// kDecodeWarps,
// ... in order with an online softmax (running max, sum and P V), its lanes splitting the head's values; the
// warps then merge in a fixed order, so the result is deterministic. The cache rows are read directly: a
// decoding step reads each key and value once, so staging them in shared memory would not pay.
constexpr int kDecodeWarps = 4;
constexpr int kDecodeValues = kMaxHead / 32;  // head values per lane

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// kv rows past .. past + n - 1 = the k and v tails of the n qkv rows.
__global__ void kv_append_kernel(float* kv, const float* qkv, int n, int past, int C, int kv_row) {
  const std::size_t total = static_cast<std::size_t>(n) * kv_row;
  for (std::size_t idx = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const std::size_t i = idx / kv_row, j = idx % kv_row;
    kv[(past + i) * kv_row + j] = qkv[i * (C + kv_row) + C + j];
  }
}

__global__ void __launch_bounds__(kDecodeWarps * 32)
    attention_decode_kernel(float* out, const float* kv, const float* qkv, int past, int C, int NH, int group,
                            int hs, float scale) {
  const int h = static_cast<int>(blockIdx.x), i = static_cast<int>(blockIdx.y);
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const std::size_t width = static_cast<std::size_t>(NH / group) * hs, kv_row = 2 * width;
  const float* q = qkv + static_cast<std::size_t>(i) * (C + kv_row) + static_cast<std::size_t>(h) * hs;
  const float* k = kv + static_cast<std::size_t>(h / group) * hs;
  float qv[kDecodeValues], acc[kDecodeValues];
#pragma unroll
  for (int c = 0; c < kDecodeValues; ++c) {
    const int d = lane + 32 * c;
    qv[c] = d < hs ? q[d] : 0.0f;
    acc[c] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  for (int s = warp; s <= past + i; s += kDecodeWarps) {
    const float* ks = k + static_cast<std::size_t>(s) * kv_row;
    float part = 0.0f;
#pragma unroll
    for (int c = 0; c < kDecodeValues; ++c)
      if (lane + 32 * c < hs) part = fmaf(qv[c], ks[lane + 32 * c], part);
    const float score = warp_sum(part) * scale;
    const float m_new = fmaxf(m, score);
    const float correction = expf(m - m_new);  // 0 at the first key (m = -inf)
    const float p = expf(score - m_new);
    l = l * correction + p;
    const float* vs = ks + width;
#pragma unroll
    for (int c = 0; c < kDecodeValues; ++c)
      if (lane + 32 * c < hs) acc[c] = fmaf(p, vs[lane + 32 * c], acc[c] * correction);
    m = m_new;
  }
  __shared__ float warp_m[kDecodeWarps], warp_l[kDecodeWarps], warp_acc[kDecodeWarps][kMaxHead];
  if (lane == 0) {
    warp_m[warp] = m;
    warp_l[warp] = l;
  }
#pragma unroll
  for (int c = 0; c < kDecodeValues; ++c)
    if (lane + 32 * c < hs) warp_acc[warp][lane + 32 * c] = acc[c];
  __syncthreads();
  if (warp != 0) return;
  // Warp 0 always has key 0, so the maximum is finite; a warp without keys (m = -inf) weighs 0.
  float top = warp_m[0];
  for (int w = 1; w < kDecodeWarps; ++w) top = fmaxf(top, warp_m[w]);
  float weight[kDecodeWarps], sum = 0.0f;
  for (int w = 0; w < kDecodeWarps; ++w) sum += warp_l[w] * (weight[w] = expf(warp_m[w] - top));
  float* o = out + static_cast<std::size_t>(i) * C + static_cast<std::size_t>(h) * hs;
  for (int d = lane; d < hs; d += 32) {
    float v = 0.0f;
    for (int w = 0; w < kDecodeWarps; ++w) v = fmaf(warp_acc[w][d], weight[w], v);
    o[d] = v / sum;
  }
}

}  // namespace

void attention_forward(float* out, float* lse, const float* qkv, int B, int T, int C, int NH, int NKV,
                       cudaStream_t stream) {
  const Shape s = shape_of(B, T, C, NH, NKV, {qkv});
  if (B == 0 || T == 0) return;
  // Heads of 64 or fewer share the 64-wide kernels, zero-padded; larger ones up to 128 the 128-wide.
  if (s.hs <= 64)
    forward<64>(out, lse, qkv, T, C, NH, NKV, s, stream);
  else
    forward<128>(out, lse, qkv, T, C, NH, NKV, s, stream);
}

void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse,
                        float* dot_scratch, int B, int T, int C, int NH, int NKV, cudaStream_t stream) {
  const Shape s = shape_of(B, T, C, NH, NKV, {qkv, dout});
  if (B == 0 || T == 0) return;
  const int n_rows = s.n_heads * T;
  const int warps_per_block = kThreads / 32;
  attention_row_dot_kernel<<<(n_rows + warps_per_block - 1) / warps_per_block, kThreads, 0, stream>>>(
      dot_scratch, dout, out, T, C, NH, s.hs, n_rows);
  LRLLM_CUDA_LAUNCH("attention_row_dot_kernel");
  if (s.hs <= 64)
    backward<64>(dqkv, dout, qkv, lse, dot_scratch, T, C, NH, NKV, s, stream);
  else
    backward<128>(dqkv, dout, qkv, lse, dot_scratch, T, C, NH, NKV, s, stream);
}

void attention_decode(float* out, float* kv, const float* qkv, int n, int past, int C, int NH, int NKV,
                      cudaStream_t stream) {
  if (n < 0 || n > 65535 || past < 0)
    throw RuntimeError(strprintf("attention_decode: bad rows n=%d past=%d", n, past));
  const Shape s = shape_of(1, n, C, NH, NKV, {});
  if (n == 0) return;
  const int kv_row = 2 * NKV * s.hs;
  const std::size_t values = static_cast<std::size_t>(n) * kv_row;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<std::size_t>((values + threads - 1) / threads, 65535));
  kv_append_kernel<<<blocks, threads, 0, stream>>>(kv, qkv, n, past, C, kv_row);
  LRLLM_CUDA_LAUNCH("kv_append_kernel");
  attention_decode_kernel<<<dim3(NH, n), kDecodeWarps * 32, 0, stream>>>(out, kv, qkv, past, C, NH, NH / NKV,
                                                                         s.hs, s.scale);
  LRLLM_CUDA_LAUNCH("attention_decode_kernel");
}

}  // namespace lrllm::cuda

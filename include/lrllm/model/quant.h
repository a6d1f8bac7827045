// Block-wise 8-bit and 4-bit storage of frozen weights (docs/design.md, Quantized tensors), laid out like
// bitsandbytes/QLoRA so that codes and scales can be compared with that ecosystem.
//
// Both kinds split the flattened (row-major) tensor into blocks of `block` consecutive values (the last block
// may be short) and scale each block by its absmax = max |x|.
//   int8: code = round(127 * x / absmax), rounded half away from zero in double precision, in [-127, 127];
//         value = code * (absmax / 127), the block scale rounded to float once.
//   NF4:  v = x / absmax in float; code = index of the level of kNf4Levels nearest to v in exact arithmetic,
//         an exact midpoint going to the LOWER code (the one nearer -1). This is bitsandbytes' rule (it
//         compares against midpoints with `>`), except that bitsandbytes rounds its midpoints to float: the
//         two can differ only for v within half a float ulp of a midpoint. value = level[code] * absmax. Two
//         codes a byte, the earlier value in the high nibble; an odd count leaves the last low nibble 0.
//   absmax 0: every code is 0 (int8) or 7 (the NF4 level 0.0), and every value dequantizes to 0.
// NF4 double quantization compresses the absmax values themselves: mean = their mean over the whole tensor
// (rounded to float); c = absmax - mean; per block of kAbsmaxBlock absmax values, scale = float(max |c| /
// 127) and q = round(c / scale) half away from zero in double (0 where scale is 0). The codes are computed
// from the exact absmax; the absmax used to dequantize is fma(q, scale, mean), one float rounding,
// everywhere.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "lrllm/core/config.h"

namespace lrllm {

class H5File;

// The 16 NF4 levels (codes 0..15), exactly as docs/design.md (Quantized tensors) and bitsandbytes list them.
inline constexpr float kNf4Levels[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

// Absmax values per block of double quantization (bitsandbytes' nested block size).
inline constexpr int kAbsmaxBlock = 256;

struct QuantizedTensor {
  QuantKind kind = QuantKind::int8;
  int block = 64;
  std::vector<int64_t> shape;  // logical shape, e.g. [out, in]
  // int8: one signed code per value (int8 bits); nf4: two codes a byte, the first value in the high nibble.
  std::vector<uint8_t> codes;
  std::vector<float> absmax;        // one per block; empty when double-quantized
  bool double_quant = false;        // nf4 only
  std::vector<uint8_t> absmax_q;    // double quant: centred absmax, one signed int8 code per block
  std::vector<float> absmax_scale;  // double quant: one per kAbsmaxBlock absmax values
  float absmax_mean = 0;            // double quant: the mean subtracted before quantizing

  std::size_t size() const;    // number of logical values (0 for an empty shape)
  std::size_t blocks() const;  // number of blocks of `block` values
  std::size_t bytes() const;   // storage: codes + absmax (or absmax_q + absmax_scale + mean)
};

// x holds the product of shape values. InputError on a block size below 1, a negative dimension or a
// non-finite value.
// A QuantizedTensor's kind is int8 or nf4, never QuantKind::none.
QuantizedTensor quantize_int8(const float* x, std::vector<int64_t> shape, int block = 64);
QuantizedTensor quantize_nf4(const float* x, std::vector<int64_t> shape, bool double_quant, int block = 64);
// Either of the two by kind (int8 ignores double_quant).
QuantizedTensor quantize(QuantKind kind, const float* x, std::vector<int64_t> shape, bool double_quant,
                         int block);

// Writes values [first, first + count) of the flattened tensor to out as float32, bit for bit what a full
// dequantization gives; any first and count work (block boundaries and odd NF4 starts included). It needs no
// memory beyond out, and splits large ranges across OpenMP threads.
void dequantize(const QuantizedTensor& q, std::size_t first, std::size_t count, float* out);

// HDF5 layout beside the float tensor's own path, the stem (e.g. "/model/h.0/attn/qkv/W" or "/model/wte"),
// all datasets 1-D in flattened order:
//   <stem>_q            int8 [size] (int8) or uint8 [(size + 1) / 2] (nf4)
//                       attrs: quant ("int8" | "nf4"), block_size, shape (int64 array: the logical shape),
//                       and when double-quantized absmax_mean (float64) and absmax_block_size (256)
//   <stem>_absmax       float32 [blocks]                          (not double-quantized)
//   <stem>_absmax_q     int8 [blocks]                              (double-quantized)
//   <stem>_absmax_scale float32 [ceil(blocks / 256)]               (double-quantized)
void write_quantized(H5File& f, const std::string& stem, const QuantizedTensor& q);
QuantizedTensor read_quantized(const H5File& f, const std::string& stem);

}  // namespace lrllm

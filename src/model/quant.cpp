#include "lrllm/model/quant.h"

#include <algorithm>
#include <array>
#include <climits>
#include <cmath>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "lrllm/core/common.h"
#include "lrllm/io/hdf5.h"
#include "lrllm/model/params.h"

namespace lrllm {
namespace {

// Midpoints between adjacent NF4 levels. Each is exact in double (the nonzero levels are floats of magnitude
// at least 2^-4, so a sum of two needs at most 28 significant bits), which makes `v > midpoint` an exact
// comparison for any float v.
constexpr std::array<double, 15> nf4_midpoints() {
  std::array<double, 15> m{};
  for (std::size_t i = 0; i < m.size(); ++i)
    m[i] = (static_cast<double>(kNf4Levels[i]) + static_cast<double>(kNf4Levels[i + 1])) / 2;
  return m;
}
constexpr std::array<double, 15> kNf4Midpoints = nf4_midpoints();

// Below this many values a dequantization runs on the calling thread: a parallel region costs more.
constexpr std::size_t kParallelMin = std::size_t{1} << 16;

// The nearest level: the number of midpoints strictly below v, so an exact midpoint takes the lower code.
uint8_t nf4_code(float v) {
  int code = 0;
  for (double m : kNf4Midpoints) code += static_cast<double>(v) > m;
  return static_cast<uint8_t>(code);
}

// Number of values of shape; throws InputError (prefixed by where) on a negative or overflowing dimension.
std::size_t element_count(const std::vector<int64_t>& shape, const std::string& where) {
  if (shape.empty()) return 0;
  std::size_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) throw InputError(where + ": shape " + shape_string(shape) + " has a negative dimension");
    if (d > 0 && n > (std::size_t{1} << 62) / static_cast<std::size_t>(d))
      throw InputError(where + ": shape " + shape_string(shape) + " is too large");
    n *= static_cast<std::size_t>(d);
  }
  return n;
}

std::size_t code_bytes(QuantKind kind, std::size_t n) {
  return kind == QuantKind::int8 ? n : (n + 1) / 2;
}

std::size_t absmax_scales(std::size_t blocks) {
  return (blocks + kAbsmaxBlock - 1) / kAbsmaxBlock;
}

// What makes q's buffers disagree with its shape and block size; empty when they agree.
std::string inconsistency(const QuantizedTensor& q) {
  if (q.block < 1) return "block size " + std::to_string(q.block) + " is below 1";
  const std::size_t n = q.size(), nb = q.blocks();
  if (q.codes.size() != code_bytes(q.kind, n))
    return std::to_string(q.codes.size()) + " code bytes for " + std::to_string(n) + " values";
  if (q.double_quant) {
    if (q.kind != QuantKind::nf4) return "int8 storage cannot be double-quantized";
    if (q.absmax_q.size() != nb)
      return std::to_string(q.absmax_q.size()) + " quantized absmax values for " + std::to_string(nb) +
             " blocks";
    if (q.absmax_scale.size() != absmax_scales(nb))
      return std::to_string(q.absmax_scale.size()) + " absmax scales for " + std::to_string(nb) + " blocks";
  } else if (q.absmax.size() != nb) {
    return std::to_string(q.absmax.size()) + " absmax values for " + std::to_string(nb) + " blocks";
  }
  return "";
}

// Validates the arguments of a quantization and sets up the tensor's shape and block size.
QuantizedTensor start(QuantKind kind, std::vector<int64_t> shape, int block) {
  if (block < 1) throw InputError("quantization block size " + std::to_string(block) + " must be at least 1");
  QuantizedTensor q;
  q.kind = kind;
  q.block = block;
  element_count(shape, "cannot quantize");
  q.shape = std::move(shape);
  return q;
}

// max |x| over every block; InputError on a non-finite value, which no scale can represent.
std::vector<float> block_absmax(const float* x, std::size_t n, std::size_t block) {
  std::vector<float> absmax((n + block - 1) / block);
  for (std::size_t b = 0; b < absmax.size(); ++b) {
    float m = 0;
    for (std::size_t i = b * block; i < std::min(n, (b + 1) * block); ++i) {
      if (!std::isfinite(x[i]))
        throw InputError("cannot quantize a non-finite value (" + std::to_string(x[i]) + " at flat index " +
                         std::to_string(i) + ")");
      m = std::max(m, std::fabs(x[i]));
    }
    absmax[b] = m;
  }
  return absmax;
}

// Round half away from zero, clamped to the symmetric int8 range, in int8 bits.
uint8_t int8_bits(double y) {
  const long r = std::clamp(std::lround(y), -127L, 127L);
  return static_cast<uint8_t>(static_cast<int8_t>(r));
}

// Replaces q.absmax by its double quantization (see quant.h).
void double_quantize(QuantizedTensor& q) {
  const std::size_t nb = q.absmax.size();
  double sum = 0;
  for (float a : q.absmax) sum += a;
  q.absmax_mean = nb > 0 ? static_cast<float>(sum / static_cast<double>(nb)) : 0.0f;
  const double mean = q.absmax_mean;
  q.absmax_q.resize(nb);
  q.absmax_scale.resize(absmax_scales(nb));
  for (std::size_t g = 0; g < q.absmax_scale.size(); ++g) {
    const std::size_t lo = g * kAbsmaxBlock, hi = std::min(nb, lo + kAbsmaxBlock);
    double widest = 0;
    for (std::size_t b = lo; b < hi; ++b) widest = std::max(widest, std::fabs(q.absmax[b] - mean));
    const float scale = static_cast<float>(widest / 127);
    q.absmax_scale[g] = scale;
    for (std::size_t b = lo; b < hi; ++b)
      q.absmax_q[b] = scale > 0 ? int8_bits((q.absmax[b] - mean) / scale) : 0;
  }
  q.absmax.clear();
  q.absmax.shrink_to_fit();
  q.double_quant = true;
}

// The absmax a block dequantizes with: one expression, so that every caller gets the same bits.
float dequantized_absmax(const QuantizedTensor& q, std::size_t b) {
  if (!q.double_quant) return q.absmax[b];
  return std::fma(static_cast<float>(static_cast<int8_t>(q.absmax_q[b])), q.absmax_scale[b / kAbsmaxBlock],
                  q.absmax_mean);
}

// Values [lo, hi) of one int8 block. A plain convert-and-scale loop, which the compiler vectorises.
void int8_span(const uint8_t* codes, std::size_t lo, std::size_t hi, float scale, float* out) {
  const int8_t* c = reinterpret_cast<const int8_t*>(codes) + lo;
  const std::size_t n = hi - lo;
#pragma omp simd
  for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<float>(c[i]) * scale;
}

// Values [lo, hi) of one NF4 block from table (the 16 levels already scaled by the block's absmax): a lookup
// per value, one byte serving two outputs; an odd start or end takes one nibble on its own. With AVX2 the
// lookups of 16 values at a time are two in-register permutes and a blend, which select table entries as they
// are, so both paths give the same bits.
void nf4_span(const uint8_t* codes, std::size_t lo, std::size_t hi, const float* table, float* out) {
  std::size_t i = lo;
  if (i < hi && (i & 1) != 0) *out++ = table[codes[i++ >> 1] & 15];
  const uint8_t* c = codes + (i >> 1);
  const std::size_t pairs = (hi - i) / 2;
  std::size_t p = 0;
#if defined(__AVX2__)
  const __m256 low_levels = _mm256_loadu_ps(table), high_levels = _mm256_loadu_ps(table + 8);
  const __m128i nibble = _mm_set1_epi8(15);
  for (; p + 8 <= pairs; p += 8) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + p));
    // The 16 codes in value order: high nibble of byte 0, low nibble of byte 0, high nibble of byte 1, ...
    const __m128i in_order =
        _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble), _mm_and_si128(bytes, nibble));
    for (int half = 0; half < 2; ++half) {
      const __m256i code = _mm256_cvtepu8_epi32(half == 0 ? in_order : _mm_srli_si128(in_order, 8));
      // permutevar uses the low 3 bits of each code; bit 3, moved to the sign bit, picks the table half.
      const __m256 value = _mm256_blendv_ps(_mm256_permutevar8x32_ps(low_levels, code),
                                            _mm256_permutevar8x32_ps(high_levels, code),
                                            _mm256_castsi256_ps(_mm256_slli_epi32(code, 28)));
      _mm256_storeu_ps(out + 2 * p + 8 * half, value);
    }
  }
#endif
  for (; p < pairs; ++p) {
    out[2 * p] = table[c[p] >> 4];
    out[2 * p + 1] = table[c[p] & 15];
  }
  i += 2 * pairs;
  if (i < hi) out[2 * pairs] = table[codes[i >> 1] >> 4];
}

[[noreturn]] void bad_file(const H5File& f, const std::string& what) {
  throw InputError(f.path() + ": " + what);
}

// Checks that a dataset exists with the given 1-D length before it is read, so that every inconsistency is an
// InputError whether the file was opened as user input or not.
void require_dataset(const H5File& f, const std::string& dataset, std::size_t length) {
  if (!f.exists(dataset)) bad_file(f, "dataset " + dataset + " is missing");
  const std::vector<int64_t> got = f.shape(dataset);
  const std::vector<int64_t> want = {static_cast<int64_t>(length)};
  if (got != want)
    bad_file(f, "dataset " + dataset + " has shape " + shape_string(got) + ", expected " +
                    shape_string(want) + " for the stored shape and block size");
}

void require_attr(const H5File& f, const std::string& object, const std::string& name) {
  if (!f.has_attr(object, name)) bad_file(f, "attribute " + name + " of " + object + " is missing");
}

}  // namespace

std::size_t QuantizedTensor::size() const {
  return element_count(shape, "quantized tensor");
}

std::size_t QuantizedTensor::blocks() const {
  const std::size_t b = static_cast<std::size_t>(std::max(block, 1));
  return (size() + b - 1) / b;
}

std::size_t QuantizedTensor::bytes() const {
  return codes.size() + absmax.size() * sizeof(float) + absmax_q.size() +
         absmax_scale.size() * sizeof(float) + (double_quant ? sizeof(float) : 0);
}

// int8: see quant.h. y = 127 * x / absmax in double is exact up to the final rounding of the division (127 *
// x needs 31 bits), so the rounding of y sees the true quotient except within 2^-53 of it.
QuantizedTensor quantize_int8(const float* x, std::vector<int64_t> shape, int block) {
  QuantizedTensor q = start(QuantKind::int8, std::move(shape), block);
  const std::size_t n = q.size(), B = static_cast<std::size_t>(block);
  q.absmax = block_absmax(x, n, B);
  q.codes.assign(n, 0);
  for (std::size_t b = 0; b < q.absmax.size(); ++b) {
    const double a = q.absmax[b];
    if (a == 0) continue;
    for (std::size_t i = b * B; i < std::min(n, (b + 1) * B); ++i) q.codes[i] = int8_bits(127.0 * x[i] / a);
  }
  return q;
}

// NF4: see quant.h. v = x / absmax is one correctly rounded float division, |v| <= 1.
QuantizedTensor quantize(QuantKind kind, const float* x, std::vector<int64_t> shape, bool double_quant,
                         int block) {
  LRLLM_CHECK(kind != QuantKind::none, "quantize", "no quantized kind given");
  return kind == QuantKind::int8 ? quantize_int8(x, std::move(shape), block)
                                 : quantize_nf4(x, std::move(shape), double_quant, block);
}

QuantizedTensor quantize_nf4(const float* x, std::vector<int64_t> shape, bool double_quant, int block) {
  QuantizedTensor q = start(QuantKind::nf4, std::move(shape), block);
  const std::size_t n = q.size(), B = static_cast<std::size_t>(block);
  q.absmax = block_absmax(x, n, B);
  q.codes.assign(code_bytes(QuantKind::nf4, n), 0);
  constexpr uint8_t kZeroCode = 7;
  for (std::size_t i = 0; i < n; ++i) {
    const float a = q.absmax[i / B];
    const uint8_t code = a > 0 ? nf4_code(x[i] / a) : kZeroCode;
    q.codes[i / 2] |= static_cast<uint8_t>((i & 1) != 0 ? code : code << 4);
  }
  if (double_quant) double_quantize(q);
  return q;
}

void dequantize(const QuantizedTensor& q, std::size_t first, std::size_t count, float* out) {
  const std::string problem = inconsistency(q);
  if (!problem.empty()) throw RuntimeError("dequantize: inconsistent quantized tensor: " + problem);
  const std::size_t n = q.size();
  if (first > n || count > n - first)
    throw RuntimeError("dequantize: values [" + std::to_string(first) + ", " + std::to_string(first + count) +
                       ") are outside a tensor of " + std::to_string(n));
  if (count == 0) return;
  const std::size_t B = static_cast<std::size_t>(q.block), end = first + count;
  const int64_t b0 = static_cast<int64_t>(first / B), b1 = static_cast<int64_t>((end - 1) / B + 1);
  // Blocks are independent, so any split across threads gives the same bits.
#pragma omp parallel for schedule(static) if (count >= kParallelMin)
  for (int64_t b = b0; b < b1; ++b) {
    const std::size_t lo = std::max(first, static_cast<std::size_t>(b) * B);
    const std::size_t hi = std::min(end, (static_cast<std::size_t>(b) + 1) * B);
    const float a = dequantized_absmax(q, static_cast<std::size_t>(b));
    float* dst = out + (lo - first);
    if (q.kind == QuantKind::int8) {
      int8_span(q.codes.data(), lo, hi, a / 127.0f, dst);
    } else {
      float table[16];
      for (int k = 0; k < 16; ++k) table[k] = kNf4Levels[k] * a;
      nf4_span(q.codes.data(), lo, hi, table, dst);
    }
  }
}

void write_quantized(H5File& f, const std::string& stem, const QuantizedTensor& q) {
  const std::string problem = inconsistency(q);
  if (!problem.empty()) throw RuntimeError("write_quantized " + stem + ": " + problem);
  const std::string wq = stem + "_q";
  const bool is_int8 = q.kind == QuantKind::int8;
  f.write_bytes(wq, q.codes.data(), {static_cast<int64_t>(q.codes.size())}, is_int8);
  f.set_attr(wq, "quant", std::string(is_int8 ? "int8" : "nf4"));
  f.set_attr(wq, "block_size", int64_t{q.block});
  f.set_attr(wq, "shape", q.shape);
  if (q.double_quant) {
    f.set_attr(wq, "absmax_mean", static_cast<double>(q.absmax_mean));
    f.set_attr(wq, "absmax_block_size", int64_t{kAbsmaxBlock});
    f.write_bytes(stem + "_absmax_q", q.absmax_q.data(), {static_cast<int64_t>(q.absmax_q.size())}, true);
    f.write(stem + "_absmax_scale", q.absmax_scale.data(), {static_cast<int64_t>(q.absmax_scale.size())});
  } else {
    f.write(stem + "_absmax", q.absmax.data(), {static_cast<int64_t>(q.absmax.size())});
  }
}

QuantizedTensor read_quantized(const H5File& f, const std::string& stem) {
  const std::string wq = stem + "_q";
  if (!f.exists(wq)) bad_file(f, "dataset " + wq + " is missing");
  QuantizedTensor q;
  require_attr(f, wq, "quant");
  const std::string kind = f.attr_string(wq, "quant");
  if (kind != quant_name(QuantKind::int8) && kind != quant_name(QuantKind::nf4))
    bad_file(f, wq + " attribute quant '" + kind + "' is not int8 or nf4");
  q.kind = quant_from_name(kind);
  require_attr(f, wq, "block_size");
  const int64_t block = f.attr_int(wq, "block_size");
  if (block < 1 || block > INT_MAX)
    bad_file(f, wq + " attribute block_size " + std::to_string(block) + " is out of range");
  q.block = static_cast<int>(block);
  require_attr(f, wq, "shape");
  q.shape = f.attr_ints(wq, "shape");
  const std::size_t n = element_count(q.shape, f.path() + ": " + wq + " attribute shape");
  const std::size_t nb = q.blocks();

  require_dataset(f, wq, code_bytes(q.kind, n));
  q.codes.resize(code_bytes(q.kind, n));
  f.read_bytes(wq, q.codes.data(), {static_cast<int64_t>(q.codes.size())}, q.kind == QuantKind::int8);
  if (q.kind == QuantKind::int8 &&
      std::any_of(q.codes.begin(), q.codes.end(), [](uint8_t c) { return static_cast<int8_t>(c) == -128; }))
    bad_file(f, wq + " holds the code -128, outside the symmetric int8 range");

  const std::string absmax = stem + "_absmax", absmax_q = stem + "_absmax_q";
  const auto finite_non_negative = [](float v) { return std::isfinite(v) && v >= 0; };
  if (f.exists(absmax_q)) {
    if (q.kind == QuantKind::int8) bad_file(f, absmax_q + ": int8 storage cannot be double-quantized");
    if (f.exists(absmax)) bad_file(f, stem + " has both _absmax and _absmax_q");
    q.double_quant = true;
    require_attr(f, wq, "absmax_block_size");
    if (f.attr_int(wq, "absmax_block_size") != kAbsmaxBlock)
      bad_file(f, wq + " attribute absmax_block_size is not " + std::to_string(kAbsmaxBlock));
    require_attr(f, wq, "absmax_mean");
    const double mean = f.attr_double(wq, "absmax_mean");
    q.absmax_mean = static_cast<float>(mean);
    if (!std::isfinite(q.absmax_mean)) bad_file(f, wq + " attribute absmax_mean is not finite");
    require_dataset(f, absmax_q, nb);
    q.absmax_q.resize(nb);
    f.read_bytes(absmax_q, q.absmax_q.data(), {static_cast<int64_t>(nb)}, true);
    if (std::any_of(q.absmax_q.begin(), q.absmax_q.end(),
                    [](uint8_t c) { return static_cast<int8_t>(c) == -128; }))
      bad_file(f, absmax_q + " holds the code -128, outside the symmetric int8 range");
    const std::string scale = stem + "_absmax_scale";
    require_dataset(f, scale, absmax_scales(nb));
    q.absmax_scale.resize(absmax_scales(nb));
    f.read(scale, q.absmax_scale.data(), {static_cast<int64_t>(q.absmax_scale.size())});
    if (!std::all_of(q.absmax_scale.begin(), q.absmax_scale.end(), finite_non_negative))
      bad_file(f, scale + " holds a negative or non-finite scale");
  } else {
    require_dataset(f, absmax, nb);
    q.absmax.resize(nb);
    f.read(absmax, q.absmax.data(), {static_cast<int64_t>(nb)});
    if (!std::all_of(q.absmax.begin(), q.absmax.end(), finite_non_negative))
      bad_file(f, absmax + " holds a negative or non-finite absmax");
  }
  return q;
}

}  // namespace lrllm

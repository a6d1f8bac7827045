// Block-wise int8 and NF4 storage (docs/design.md, Quantized tensors): codes and scales against brute-force
// references written independently of src/model/quant.cpp, the nibble layout, error bounds, double
// quantization, sub-range dequantization, and the HDF5 layout with its errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "lrllm/core/common.h"
#include "lrllm/io/hdf5.h"
#include "lrllm/model/quant.h"
#include "test_util.h"

namespace lrllm {
namespace {

using test::expect_input_error;
using test::random_floats;
using test::TempDir;

// ---- references: whole-tensor loops in long double / brute force, no shared helpers with the library ----

struct Reference {
  std::vector<int> codes;  // one per value, unpacked
  std::vector<float> absmax;
};

std::vector<float> ref_absmax(const std::vector<float>& x, int block) {
  std::vector<float> out;
  for (std::size_t start = 0; start < x.size(); start += block) {
    const auto stop = x.begin() + static_cast<std::ptrdiff_t>(std::min(x.size(), start + block));
    float m = 0;
    std::for_each(x.begin() + static_cast<std::ptrdiff_t>(start), stop,
                  [&](float v) { m = std::max(m, -v > v ? -v : v); });
    out.push_back(m);
  }
  return out;
}

Reference ref_int8(const std::vector<float>& x, int block) {
  Reference r;
  r.absmax = ref_absmax(x, block);
  for (std::size_t i = 0; i < x.size(); ++i) {
    const long double a = r.absmax[i / block];
    r.codes.push_back(a == 0 ? 0 : static_cast<int>(std::round(127.0L * x[i] / a)));
  }
  return r;
}

// Scans all 16 levels; a strictly smaller distance wins, so an exact tie keeps the lower code.
Reference ref_nf4(const std::vector<float>& x, int block) {
  Reference r;
  r.absmax = ref_absmax(x, block);
  for (std::size_t i = 0; i < x.size(); ++i) {
    const float a = r.absmax[i / block];
    if (a == 0) {
      r.codes.push_back(7);
      continue;
    }
    const double v = static_cast<float>(x[i] / a);
    int best = 0;
    for (int k = 1; k < 16; ++k)
      if (std::fabs(v - kNf4Levels[k]) < std::fabs(v - kNf4Levels[best])) best = k;
    r.codes.push_back(best);
  }
  return r;
}

std::vector<uint8_t> pack_nibbles(const std::vector<int>& codes) {
  std::vector<uint8_t> bytes;
  for (std::size_t i = 0; i < codes.size(); i += 2) {
    const int low = i + 1 < codes.size() ? codes[i + 1] : 0;
    bytes.push_back(static_cast<uint8_t>(codes[i] * 16 + low));
  }
  return bytes;
}

std::vector<int> signed_codes(const std::vector<uint8_t>& bytes) {
  std::vector<int> out;
  for (uint8_t b : bytes) out.push_back(b < 128 ? b : b - 256);
  return out;
}

std::vector<float> full(const QuantizedTensor& q) {
  std::vector<float> out(q.size());
  dequantize(q, 0, out.size(), out.data());
  return out;
}

// Empty vectors may hand out null pointers, which memcmp must not see.
bool same_bits(const float* a, const float* b, std::size_t n) {
  return n == 0 || std::memcmp(a, b, n * sizeof(float)) == 0;
}

// The fixed vectors every reference comparison runs on, by name.
std::vector<std::pair<std::string, std::vector<float>>> fixed_vectors() {
  std::vector<std::pair<std::string, std::vector<float>>> v;
  v.push_back({"zeros", std::vector<float>(64, 0.0f)});
  v.push_back({"equal", std::vector<float>(64, 0.3f)});
  std::vector<float> neg = random_floats(64, 11);
  for (float& x : neg) x = -std::fabs(x) - 0.01f;
  v.push_back({"negative-only", neg});
  v.push_back({"size 100", random_floats(100, 12)});
  v.push_back({"size 130", random_floats(130, 13, 3.0, 0.5)});
  v.push_back({"size 37", random_floats(37, 14, 0.02)});
  // A zero block between two others, and a tail block of one value.
  std::vector<float> mixed = random_floats(64 * 3 + 1, 15);
  std::fill(mixed.begin() + 64, mixed.begin() + 128, 0.0f);
  v.push_back({"zero block inside", mixed});
  // Every NF4 midpoint times a block absmax of 3 (not a power of two), with the absmax itself present.
  std::vector<float> ties = {3.0f};
  for (int k = 0; k < 15; ++k) {
    const double mid = (static_cast<double>(kNf4Levels[k]) + kNf4Levels[k + 1]) / 2;
    ties.push_back(static_cast<float>(mid * 3.0));
    ties.push_back(static_cast<float>(mid));
  }
  v.push_back({"midpoints x3", ties});
  return v;
}

// ---- codes and scales against the references ----

TEST(QuantNf4, MatchesBruteForceReference) {
  for (const auto& [name, x] : fixed_vectors()) {
    SCOPED_TRACE(name);
    const Reference r = ref_nf4(x, 64);
    const QuantizedTensor q = quantize_nf4(x.data(), {static_cast<int64_t>(x.size())}, false);
    EXPECT_EQ(q.absmax, r.absmax);
    EXPECT_EQ(q.codes, pack_nibbles(r.codes));
    EXPECT_FALSE(q.double_quant);
    EXPECT_EQ(q.size(), x.size());
  }
  // Another block size, odd so that blocks start on either nibble, over a 2-D shape.
  const std::vector<float> x = random_floats(7 * 29, 16);
  const Reference r = ref_nf4(x, 37);
  const QuantizedTensor q = quantize_nf4(x.data(), {7, 29}, false, 37);
  EXPECT_EQ(q.absmax, r.absmax);
  EXPECT_EQ(q.codes, pack_nibbles(r.codes));
}

TEST(QuantNf4, ExactMidpointsTakeTheLowerCode) {
  // Midpoints that are floats themselves are exact ties; the others are checked from both sides.
  int exact = 0;
  for (float absmax : {1.0f, 2.0f, 0.5f}) {
    for (int k = 0; k < 15; ++k) {
      SCOPED_TRACE("absmax " + std::to_string(absmax) + ", between codes " + std::to_string(k) + " and " +
                   std::to_string(k + 1));
      const double mid = (static_cast<double>(kNf4Levels[k]) + kNf4Levels[k + 1]) / 2;
      const float below = std::nextafter(static_cast<float>(mid), -2.0f);
      const float above = std::nextafter(static_cast<float>(mid), 2.0f);
      // The floats next to the midpoint lie on either side of it. Scaling by a power of two is exact, so
      // x / absmax gives back the normalised value.
      std::vector<float> x = {absmax, below * absmax, above * absmax};
      std::vector<uint8_t> want = {static_cast<uint8_t>(15 * 16 + k), static_cast<uint8_t>((k + 1) * 16)};
      if (static_cast<double>(static_cast<float>(mid)) == mid) {
        ++exact;
        x.push_back(static_cast<float>(mid) * absmax);
        want[1] = static_cast<uint8_t>(want[1] + k);
      }
      EXPECT_EQ(quantize_nf4(x.data(), {static_cast<int64_t>(x.size())}, false).codes, want);
    }
  }
  EXPECT_EQ(exact, 3 * 6);  // midpoints 2, 6, 7, 9, 11 and 13 are floats
}

TEST(QuantNf4, NibbleLayoutHandChecked) {
  // Codes 15, 0 | 7, 15 | 1 and a zero low nibble: the first value of each byte in the high nibble.
  const std::vector<float> x = {2.0f, -2.0f, 0.0f, 2.0f, -0.6961928009986877f * 2};
  const QuantizedTensor q = quantize_nf4(x.data(), {5}, false);
  EXPECT_EQ(q.codes, (std::vector<uint8_t>{0xF0, 0x7F, 0x10}));
  EXPECT_EQ(q.absmax, std::vector<float>{2.0f});
  EXPECT_EQ(full(q), (std::vector<float>{2.0f, -2.0f, 0.0f, 2.0f, -0.6961928009986877f * 2}));
  EXPECT_EQ(q.bytes(), 3u + 4u);
}

TEST(QuantNf4, ZeroBlockDequantizesToZero) {
  const std::vector<float> x(70, 0.0f);
  const QuantizedTensor q = quantize_nf4(x.data(), {70}, false);
  EXPECT_EQ(q.codes, std::vector<uint8_t>(35, 0x77));
  EXPECT_EQ(full(q), x);
}

TEST(QuantInt8, MatchesLongDoubleReference) {
  for (const auto& [name, x] : fixed_vectors()) {
    SCOPED_TRACE(name);
    const Reference r = ref_int8(x, 64);
    const QuantizedTensor q = quantize_int8(x.data(), {static_cast<int64_t>(x.size())});
    EXPECT_EQ(q.absmax, r.absmax);
    EXPECT_EQ(signed_codes(q.codes), r.codes);
    EXPECT_EQ(q.bytes(), x.size() + 4 * r.absmax.size());
  }
}

TEST(QuantInt8, HalvesRoundAwayFromZeroAndCodesAreSignedBytes) {
  // absmax 127 makes 127 x / absmax = x: 2.5 -> 3, -2.5 -> -3, 0.5 -> 1, -0.49 -> 0.
  const std::vector<float> x = {127.0f, -127.0f, 2.5f, -2.5f, 0.5f, -0.49f, 126.5f};
  const QuantizedTensor q = quantize_int8(x.data(), {7});
  EXPECT_EQ(q.codes, (std::vector<uint8_t>{0x7F, 0x81, 0x03, 0xFD, 0x01, 0x00, 0x7F}));
  const std::vector<float> zeros(10, 0.0f);
  const QuantizedTensor z = quantize_int8(zeros.data(), {2, 5});
  EXPECT_EQ(z.codes, std::vector<uint8_t>(10, 0));
  EXPECT_EQ(full(z), zeros);
}

TEST(QuantErrors, BadArgumentsAreInputErrors) {
  const std::vector<float> x = {1.0f, NAN, 2.0f};
  expect_input_error([&] { quantize_nf4(x.data(), {3}, false); }, "non-finite");
  expect_input_error([&] { quantize_int8(x.data(), {3}); }, "non-finite");
  expect_input_error([&] { quantize_int8(x.data(), {1}, 0); }, "block size");
  expect_input_error([&] { quantize_nf4(x.data(), {-1, 3}, false); }, "negative");
}

// ---- error bounds ----

// The largest half gap between adjacent NF4 levels (between -1 and the next level).
double nf4_max_half_gap() {
  double g = 0;
  for (int k = 0; k < 15; ++k) g = std::max(g, (static_cast<double>(kNf4Levels[k + 1]) - kNf4Levels[k]) / 2);
  return g;
}

TEST(QuantInt8, ErrorWithinHalfAStep) {
  const std::vector<float> x = random_floats(768 * 64 + 17, 21, 0.05);
  const QuantizedTensor q = quantize_int8(x.data(), {static_cast<int64_t>(x.size())});
  const std::vector<float> dq = full(q);
  double worst = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double a = q.absmax[i / 64];
    const double err = std::fabs(static_cast<double>(x[i]) - dq[i]);
    ASSERT_LE(err, a / 254 + 4 * a * 0x1p-24) << "at " << i;
    worst = std::max(worst, err / a);
  }
  std::printf("int8: worst |x - dq| / absmax = %.6g (bound 1/254 = %.6g)\n", worst, 1.0 / 254);
}

TEST(QuantNf4, ErrorWithinHalfTheWidestGap) {
  const std::vector<float> x = random_floats(768 * 64 + 17, 22, 0.05);
  const QuantizedTensor q = quantize_nf4(x.data(), {static_cast<int64_t>(x.size())}, false);
  const std::vector<float> dq = full(q);
  const double half_gap = nf4_max_half_gap();
  EXPECT_NEAR(half_gap, (1.0 - 0.6961928009986877) / 2, 1e-12);
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double a = q.absmax[i / 64];
    const double err = std::fabs(static_cast<double>(x[i]) - dq[i]);
    ASSERT_LE(err, a * half_gap * (1 + 1e-6)) << "at " << i;
    diff += err * err;
    norm += static_cast<double>(x[i]) * x[i];
  }
  // Measured 0.0917 on normal data with blocks of 64 (QLoRA's NF4 is built for exactly this case).
  const double rel = std::sqrt(diff / norm);
  std::printf("nf4: relative Frobenius error on normal data %.4f\n", rel);
  EXPECT_LT(rel, 0.14);
}

// ---- double quantization ----

// Normal data whose scale varies from block to block, so the absmax values spread out; two zero blocks
// (n >= 768).
std::vector<float> spread_blocks(std::size_t n, uint64_t seed) {
  std::vector<float> x = random_floats(n, seed);
  for (std::size_t i = 0; i < n; ++i) x[i] *= 0.01f * static_cast<float>(1 + (i / 64) % 23);
  std::fill(x.begin() + 64 * 5, x.begin() + 64 * 6, 0.0f);
  const std::ptrdiff_t middle = static_cast<std::ptrdiff_t>(n / 64 / 2 * 64);
  std::fill(x.begin() + middle, x.begin() + middle + 64, 0.0f);
  return x;
}

TEST(QuantDoubleQuant, MatchesReferenceAndBounds) {
  const std::vector<float> x = spread_blocks(768 * 100 + 30, 31);  // 1201 blocks: 5 groups of 256, one short
  const QuantizedTensor plain = quantize_nf4(x.data(), {static_cast<int64_t>(x.size())}, false);
  const QuantizedTensor q = quantize_nf4(x.data(), {static_cast<int64_t>(x.size())}, true);
  ASSERT_TRUE(q.double_quant);
  EXPECT_TRUE(q.absmax.empty());
  EXPECT_EQ(q.codes, plain.codes);  // codes come from the exact absmax
  const std::vector<float>& a = plain.absmax;
  ASSERT_EQ(a.size(), 1201u);
  ASSERT_EQ(q.absmax_q.size(), 1201u);
  ASSERT_EQ(q.absmax_scale.size(), 5u);
  EXPECT_EQ(q.bytes(), q.codes.size() + 1201 + 5 * 4 + 4);

  // Reference in long double.
  long double sum = 0;
  for (float v : a) sum += v;
  const float mean = static_cast<float>(sum / a.size());
  EXPECT_EQ(q.absmax_mean, mean);
  for (std::size_t g = 0; g < 5; ++g) {
    long double widest = 0;
    for (std::size_t b = g * 256; b < std::min(a.size(), g * 256 + 256); ++b)
      widest = std::max(widest, std::fabs(static_cast<long double>(a[b]) - mean));
    const float scale = static_cast<float>(widest / 127);
    EXPECT_EQ(q.absmax_scale[g], scale) << "group " << g;
    for (std::size_t b = g * 256; b < std::min(a.size(), g * 256 + 256); ++b) {
      const int want = static_cast<int>(std::round((static_cast<long double>(a[b]) - mean) / scale));
      EXPECT_EQ(signed_codes({q.absmax_q[b]})[0], want) << "block " << b;
    }
  }

  // Dequantized absmax within scale / 2 of the true one; values within the combined bound.
  const std::vector<float> dq = full(q);
  const double half_gap = nf4_max_half_gap();
  for (std::size_t b = 0; b < a.size(); ++b) {
    const double scale = q.absmax_scale[b / 256];
    const double a_dq = std::fma(static_cast<float>(signed_codes({q.absmax_q[b]})[0]),
                                 q.absmax_scale[b / 256], q.absmax_mean);
    ASSERT_LE(std::fabs(a_dq - a[b]), scale / 2 + 1e-6 * a[b] + 1e-9) << "block " << b;
    for (std::size_t i = b * 64; i < std::min(x.size(), b * 64 + 64); ++i) {
      ASSERT_LE(std::fabs(static_cast<double>(x[i]) - dq[i]), a[b] * half_gap * (1 + 1e-6) + scale / 2 + 1e-9)
          << "at " << i;
      if (a[b] == 0) {
        ASSERT_EQ(dq[i], 0.0f);
      }
    }
  }
}

TEST(QuantDoubleQuant, SingleBlockKeepsItsAbsmaxExactly) {
  // One block: the mean is the absmax itself, the centred value and the scale are 0.
  const std::vector<float> x = random_floats(50, 32);
  const QuantizedTensor plain = quantize_nf4(x.data(), {50}, false);
  const QuantizedTensor q = quantize_nf4(x.data(), {50}, true);
  EXPECT_EQ(q.absmax_mean, plain.absmax[0]);
  EXPECT_EQ(q.absmax_scale, std::vector<float>{0.0f});
  EXPECT_EQ(q.absmax_q, std::vector<uint8_t>{0});
  EXPECT_EQ(full(q), full(plain));
}

// ---- sub-ranges ----

TEST(QuantDequantRange, SubRangesEqualTheFullDequantization) {
  const std::vector<float> x = spread_blocks(300 * 257, 41);  // odd total: the last byte has one NF4 code
  const int64_t n = static_cast<int64_t>(x.size());
  std::vector<std::pair<std::string, QuantizedTensor>> kinds;
  kinds.push_back({"int8", quantize_int8(x.data(), {300, 257})});
  kinds.push_back({"nf4", quantize_nf4(x.data(), {300, 257}, false)});
  kinds.push_back({"nf4 double", quantize_nf4(x.data(), {300, 257}, true)});
  kinds.push_back({"nf4 block 37", quantize_nf4(x.data(), {n}, false, 37)});
  kinds.push_back({"int8 block 37", quantize_int8(x.data(), {n}, 37)});
  const std::size_t N = x.size();
  const std::vector<std::pair<std::size_t, std::size_t>> ranges = {
      {0, N},   {0, 1},    {1, 1},         {1, 2},     {63, 2},    {63, 3},
      {64, 64}, {65, 127}, {77, 1000},     {N - 1, 1}, {N - 2, 2}, {N - 3, 3},
      {N, 0},   {5, 0},    {257, 257 * 7}, {3, N - 3}, {1, 70001}, {64 * 257, 257 * 64}};
  for (const auto& [name, q] : kinds) {
    SCOPED_TRACE(name);
    const std::vector<float> whole = full(q);
    // Full dequantization is level[code] * absmax (int8: code * (absmax / 127)), to the bit.
    for (std::size_t i = 0; i < N; ++i) {
      const std::size_t b = i / static_cast<std::size_t>(q.block);
      const float a = q.double_quant ? std::fma(static_cast<float>(signed_codes({q.absmax_q[b]})[0]),
                                                q.absmax_scale[b / 256], q.absmax_mean)
                                     : q.absmax[b];
      const float want = q.kind == QuantKind::int8
                             ? static_cast<float>(signed_codes({q.codes[i]})[0]) * (a / 127.0f)
                             : kNf4Levels[(i % 2 == 0 ? q.codes[i / 2] >> 4 : q.codes[i / 2] & 15)] * a;
      ASSERT_TRUE(same_bits(&whole[i], &want, 1)) << "at " << i;
    }
    for (const auto& [first, count] : ranges) {
      std::vector<float> part(count + 1, -7.0f);  // one guard value past the end
      dequantize(q, first, count, part.data());
      EXPECT_TRUE(same_bits(part.data(), whole.data() + first, count))
          << "first " << first << " count " << count;
      EXPECT_EQ(part[count], -7.0f) << "wrote past count at first " << first;
    }
    std::vector<float> out(2);
    EXPECT_THROW(dequantize(q, N - 1, 2, out.data()), RuntimeError);
    EXPECT_THROW(dequantize(q, N + 1, 0, out.data()), RuntimeError);
  }
}

// ---- HDF5 ----

void expect_identical(const QuantizedTensor& a, const QuantizedTensor& b) {
  EXPECT_EQ(a.kind, b.kind);
  EXPECT_EQ(a.block, b.block);
  EXPECT_EQ(a.shape, b.shape);
  EXPECT_EQ(a.codes, b.codes);
  EXPECT_EQ(a.double_quant, b.double_quant);
  EXPECT_EQ(a.absmax_q, b.absmax_q);
  ASSERT_EQ(a.absmax.size(), b.absmax.size());
  EXPECT_TRUE(same_bits(a.absmax.data(), b.absmax.data(), a.absmax.size()));
  ASSERT_EQ(a.absmax_scale.size(), b.absmax_scale.size());
  EXPECT_TRUE(same_bits(a.absmax_scale.data(), b.absmax_scale.data(), a.absmax_scale.size()));
  EXPECT_TRUE(same_bits(&a.absmax_mean, &b.absmax_mean, 1));
}

TEST(QuantHdf5, RoundTripsBitwiseWithTheDocumentedLayout) {
  TempDir dir;
  const std::string path = dir.file("q.h5");
  const std::vector<float> x = spread_blocks(96 * 200 + 3, 51);
  const QuantizedTensor i8 = quantize_int8(x.data(), {96 * 200 + 3});
  const QuantizedTensor n4 = quantize_nf4(x.data(), {3, 6401}, false, 32);
  const QuantizedTensor dq = quantize_nf4(x.data(), {96 * 200 + 3}, true);
  {
    H5File f = H5File::create(path);
    write_quantized(f, "/model/h.0/attn/qkv/W", i8);
    write_quantized(f, "/model/h.0/mlp/fc/W", n4);
    write_quantized(f, "/model/h.1/mlp/fc/W", dq);
  }
  const H5File f = H5File::open_read(path);
  expect_identical(read_quantized(f, "/model/h.0/attn/qkv/W"), i8);
  expect_identical(read_quantized(f, "/model/h.0/mlp/fc/W"), n4);
  expect_identical(read_quantized(f, "/model/h.1/mlp/fc/W"), dq);

  // What users and tools read.
  EXPECT_EQ(f.dtype_name("/model/h.0/attn/qkv/W_q"), "int8");
  EXPECT_EQ(f.shape("/model/h.0/attn/qkv/W_q"), (std::vector<int64_t>{96 * 200 + 3}));
  EXPECT_EQ(f.attr_string("/model/h.0/attn/qkv/W_q", "quant"), "int8");
  EXPECT_EQ(f.attr_int("/model/h.0/attn/qkv/W_q", "block_size"), 64);
  EXPECT_EQ(f.dtype_name("/model/h.0/mlp/fc/W_q"), "uint8");
  EXPECT_EQ(f.shape("/model/h.0/mlp/fc/W_q"), (std::vector<int64_t>{(3 * 6401 + 1) / 2}));
  EXPECT_EQ(f.attr_ints("/model/h.0/mlp/fc/W_q", "shape"), (std::vector<int64_t>{3, 6401}));
  EXPECT_EQ(f.attr_string("/model/h.0/mlp/fc/W_q", "quant"), "nf4");
  EXPECT_EQ(f.dtype_name("/model/h.0/mlp/fc/W_absmax"), "float32");
  EXPECT_FALSE(f.exists("/model/h.0/mlp/fc/W_absmax_q"));
  EXPECT_EQ(f.dtype_name("/model/h.1/mlp/fc/W_absmax_q"), "int8");
  EXPECT_EQ(f.dtype_name("/model/h.1/mlp/fc/W_absmax_scale"), "float32");
  EXPECT_FALSE(f.exists("/model/h.1/mlp/fc/W_absmax"));
  EXPECT_EQ(f.attr_double("/model/h.1/mlp/fc/W_q", "absmax_mean"), static_cast<double>(dq.absmax_mean));
  EXPECT_EQ(f.attr_int("/model/h.1/mlp/fc/W_q", "absmax_block_size"), 256);
}

// Writes the datasets of q by hand, so that single pieces can be broken.
struct Breakage {
  std::size_t codes_dropped = 0;
  bool omit_absmax = false;
  std::size_t absmax_dropped = 0;
  bool codes_as_float = false;
  std::string quant{};  // empty: the real kind
  int64_t block = 0;
};

void write_broken(const std::string& path, const QuantizedTensor& q, const Breakage& br) {
  H5File f = H5File::create(path);
  const std::string wq = "/m/W_q";
  const bool is_int8 = q.kind == QuantKind::int8;
  const int64_t n_codes = static_cast<int64_t>(q.codes.size() - br.codes_dropped);
  if (br.codes_as_float) {
    const std::vector<float> as_float(q.codes.begin(), q.codes.end());
    f.write(wq, as_float.data(), {n_codes});
  } else {
    f.write_bytes(wq, q.codes.data(), {n_codes}, is_int8);
  }
  f.set_attr(wq, "quant", br.quant.empty() ? std::string(is_int8 ? "int8" : "nf4") : br.quant);
  f.set_attr(wq, "block_size", br.block != 0 ? br.block : int64_t{q.block});
  f.set_attr(wq, "shape", q.shape);
  if (!br.omit_absmax)
    f.write("/m/W_absmax", q.absmax.data(), {static_cast<int64_t>(q.absmax.size() - br.absmax_dropped)});
}

TEST(QuantHdf5, BrokenFilesAreInputErrorsNamingTheFile) {
  TempDir dir;
  const std::vector<float> x = random_floats(1000, 61);
  const QuantizedTensor n4 = quantize_nf4(x.data(), {10, 100}, false);
  const QuantizedTensor i8 = quantize_int8(x.data(), {10, 100});
  const auto check = [&](const std::string& name, const QuantizedTensor& q, const Breakage& br,
                         const std::string& detail) {
    SCOPED_TRACE(name);
    const std::string path = dir.file(name + ".h5");
    write_broken(path, q, br);
    const H5File f = H5File::open_read(path);
    expect_input_error([&] { read_quantized(f, "/m/W"); }, path);
    expect_input_error([&] { read_quantized(f, "/m/W"); }, detail);
  };
  // The hand-written layout is sound: each file below differs from this one in one piece.
  write_broken(dir.file("intact.h5"), n4, {});
  expect_identical(read_quantized(H5File::open_read(dir.file("intact.h5")), "/m/W"), n4);
  check("truncated nf4 codes", n4, {.codes_dropped = 1}, "W_q");
  check("truncated int8 codes", i8, {.codes_dropped = 100}, "W_q");
  check("missing absmax", n4, {.omit_absmax = true}, "W_absmax");
  check("short absmax", i8, {.absmax_dropped = 1}, "W_absmax");
  check("codes stored as float", n4, {.codes_as_float = true}, "float32");
  check("unknown quant", n4, {.quant = "nf3"}, "nf3");
  check("wrong block size", n4, {.block = 32}, "W_absmax");
  check("negative block size", n4, {.block = -4}, "block_size");
  {
    const H5File f = H5File::open_read(dir.file("intact.h5"));
    expect_input_error([&] { read_quantized(f, "/elsewhere/W"); }, "/elsewhere/W_q");
  }
  // A file cut short on disk.
  const std::string good = dir.file("good.h5");
  {
    H5File f = H5File::create(good);
    write_quantized(f, "/m/W", n4);
  }
  const std::string cut = dir.file("cut.h5");
  std::filesystem::copy_file(good, cut);
  std::filesystem::resize_file(cut, std::filesystem::file_size(good) / 2);
  expect_input_error([&] { read_quantized(H5File::open_read(cut), "/m/W"); }, cut);
}

// ---- speed (printed, not asserted) ----

TEST(QuantPerf, Dequantize768x3072) {
  const std::vector<float> x = random_floats(768 * 3072, 71, 0.02);
  std::vector<std::pair<std::string, QuantizedTensor>> kinds;
  kinds.push_back({"int8", quantize_int8(x.data(), {768, 3072})});
  kinds.push_back({"nf4", quantize_nf4(x.data(), {768, 3072}, false)});
  kinds.push_back({"nf4 double quant", quantize_nf4(x.data(), {768, 3072}, true)});
  std::vector<float> out(x.size());
  for (const auto& [name, q] : kinds) {
    dequantize(q, 0, out.size(), out.data());  // warm up caches and threads
    const int reps = 20;
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) dequantize(q, 0, out.size(), out.data());
    const auto t1 = std::chrono::steady_clock::now();
    // Tiles of 8 rows into a buffer that stays in cache: small enough to run on one thread.
    const std::size_t tile = 8 * 3072;
    std::vector<float> buf(tile);
    for (int r = 0; r < reps; ++r)
      for (std::size_t first = 0; first < out.size(); first += tile) dequantize(q, first, tile, buf.data());
    const auto t2 = std::chrono::steady_clock::now();
    const double n = static_cast<double>(reps) * static_cast<double>(x.size());
    std::printf(
        "%s 768x3072 dequantize: %.3f ns/value whole (OpenMP), %.3f ns/value in 8-row tiles (1 thread)\n",
        name.c_str(), std::chrono::duration<double, std::nano>(t1 - t0).count() / n,
        std::chrono::duration<double, std::nano>(t2 - t1).count() / n);
  }
}

}  // namespace
}  // namespace lrllm

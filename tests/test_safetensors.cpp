// The safetensors reader and writer (docs/design.md, safetensors and Hugging Face folders): every fault of a
// header is an InputError naming the file and the tensor, and the float16/bfloat16 conversions round to
// nearest even, checked on exact values.
#include "lrllm/io/safetensors.h"

#include <bit>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>

#include "test_util.h"

namespace lrllm {
namespace {

using test::expect_input_error;
using test::TempDir;

// A file of a given header text and data, its length field as given (by default the header's own).
std::string write_raw(const std::string& path, const std::string& header, const std::string& data,
                      uint64_t length = std::numeric_limits<uint64_t>::max()) {
  std::ofstream out(path, std::ios::binary);
  const uint64_t n = length == std::numeric_limits<uint64_t>::max() ? header.size() : length;
  out.write(reinterpret_cast<const char*>(&n), 8);
  out << header << data;
  return path;
}

std::string floats(std::initializer_list<float> v) {
  std::string s(v.size() * 4, '\0');
  std::memcpy(s.data(), std::data(v), s.size());
  return s;
}

float bits(uint32_t u) {
  return std::bit_cast<float>(u);
}

TEST(Safetensors, Bf16RoundsToNearestEven) {
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(float_to_bf16(-2.0f), 0xc000);
  EXPECT_EQ(float_to_bf16(bits(0x3f808000)), 0x3f80);  // half way, kept value even: down
  EXPECT_EQ(float_to_bf16(bits(0x3f818000)), 0x3f82);  // half way, kept value odd: up
  EXPECT_EQ(float_to_bf16(bits(0x3f808001)), 0x3f81);  // above half way
  EXPECT_EQ(float_to_bf16(bits(0x3f807fff)), 0x3f80);  // below
  EXPECT_EQ(float_to_bf16(bits(0x7f7fffff)), 0x7f80);  // the largest float rounds to infinity
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(float_to_bf16(bits(0x80000001)), 0x8000);  // the smallest negative subnormal: -0
  EXPECT_EQ(float_to_bf16(bits(0x7f800001)), 0x7fc0);  // a signalling NaN stays a NaN, quiet
  EXPECT_EQ(float_to_bf16(bits(0xffc00000)), 0xffc0);
  EXPECT_EQ(bf16_to_float(0x3f81), bits(0x3f810000));
  // Every non-NaN bfloat16 converts to float32 and back unchanged.
  for (uint32_t h = 0; h < 65536; ++h)
    if ((h & 0x7fff) <= 0x7f80) {
      ASSERT_EQ(float_to_bf16(bf16_to_float(static_cast<uint16_t>(h))), h) << h;
    }
}

TEST(Safetensors, F16RoundsToNearestEven) {
  EXPECT_EQ(float_to_f16(1.0f), 0x3c00);
  EXPECT_EQ(float_to_f16(-0.0f), 0x8000);
  EXPECT_EQ(float_to_f16(65504.0f), 0x7bff);  // the largest half
  EXPECT_EQ(float_to_f16(65519.0f), 0x7bff);
  EXPECT_EQ(float_to_f16(65520.0f), 0x7c00);  // half way to 65536, odd mantissa: infinity
  EXPECT_EQ(float_to_f16(-1e6f), 0xfc00);
  EXPECT_EQ(float_to_f16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);                          // tie, even
  EXPECT_EQ(float_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);                      // tie, odd: up
  EXPECT_EQ(float_to_f16(1.0f + std::ldexp(1.0f, -11) + std::ldexp(1.0f, -23)), 0x3c01);  // above
  EXPECT_EQ(float_to_f16(std::ldexp(1.0f, -14)), 0x0400);                                 // smallest normal
  EXPECT_EQ(float_to_f16(std::ldexp(1.0f, -14) - std::ldexp(1.0f, -25)), 0x0400);  // tie into the normals
  EXPECT_EQ(float_to_f16(std::ldexp(1.0f, -24)), 0x0001);                          // smallest subnormal
  EXPECT_EQ(float_to_f16(std::ldexp(1.0f, -25)), 0x0000);                          // tie, even: zero
  EXPECT_EQ(float_to_f16(3 * std::ldexp(1.0f, -25)), 0x0002);                      // tie, odd: up
  EXPECT_EQ(float_to_f16(1e-10f), 0x0000);
  EXPECT_EQ(float_to_f16(std::numeric_limits<float>::quiet_NaN()) & 0x7e00, 0x7e00);
  EXPECT_EQ(f16_to_float(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(f16_to_float(0x7bff), 65504.0f);
  EXPECT_EQ(f16_to_float(0x3555), 0.333251953125f);
  EXPECT_EQ(f16_to_float(0xfc00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(f16_to_float(0x7e01)));
  for (uint32_t h = 0; h < 65536; ++h)
    if ((h & 0x7fff) <= 0x7c00) {
      ASSERT_EQ(float_to_f16(f16_to_float(static_cast<uint16_t>(h))), h) << h;
    }
  // Against the compiler's own conversion (IEEE, to nearest even) over float32 bit patterns of every range.
  Rng rng(5);
  for (int i = 0; i < 1 << 20; ++i) {
    const uint32_t u = static_cast<uint32_t>(rng.next());
    const float x = bits(u);
    if (std::isnan(x)) continue;
    const _Float16 ref = static_cast<_Float16>(x);
    ASSERT_EQ(float_to_f16(x), std::bit_cast<uint16_t>(ref)) << std::hex << u;
  }
}

TEST(Safetensors, ReadsF32F16Bf16AndMetadata) {
  TempDir dir;
  std::string data = floats({1.5f, -2.0f});
  const uint16_t h[2] = {float_to_f16(0.5f), float_to_f16(-3.0f)}, b[3] = {0x3f80, 0x4000, 0xc040};
  data.append(reinterpret_cast<const char*>(h), 4);
  data.append(reinterpret_cast<const char*>(b), 6);
  std::string header =
      R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("h":{"dtype":"F16","shape":[1,2],"data_offsets":[8,12]},"e":{"dtype":"F32","shape":[0,4],)"
      R"("data_offsets":[12,12]},"b":{"dtype":"BF16","shape":[3],"data_offsets":[12,18]}})";
  header.append((8 - header.size() % 8) % 8, ' ');
  const SafetensorsFile f(write_raw(dir.file("ok.safetensors"), header, data));
  EXPECT_EQ(f.metadata().at("format"), "pt");
  ASSERT_EQ(f.tensors().size(), 4u);
  EXPECT_EQ(f.tensors()[0].name, "a");  // name order
  EXPECT_EQ(f.read("a"), (std::vector<float>{1.5f, -2.0f}));
  EXPECT_EQ(f.read("h"), (std::vector<float>{0.5f, -3.0f}));
  EXPECT_EQ(f.find("h")->shape, (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(f.read("b"), (std::vector<float>{1.0f, 2.0f, -3.0f}));
  EXPECT_TRUE(f.read("e").empty());
  expect_input_error([&] { f.read("zzz"); }, "has no tensor zzz");
}

TEST(Safetensors, EveryHeaderFaultNamesTheFileAndTensor) {
  TempDir dir;
  const std::string two = floats({1.0f, 2.0f});
  const auto entry = [](const std::string& name, const std::string& dtype, const std::string& shape,
                        const std::string& offsets) {
    return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape +
           ",\"data_offsets\":" + offsets + "}";
  };
  struct Case {
    const char* what;
    std::string header, data;
    uint64_t length;
    std::string needle;
  };
  constexpr uint64_t own = std::numeric_limits<uint64_t>::max();
  const std::vector<Case> cases = {
      {"header length past the end", "{}", "", 1000, "the header length 1000 runs past the end of the file"},
      {"bad JSON", R"({"w":{"dtype":"F32",)", "", own, "the header is not valid JSON"},
      {"not an object", "[1, 2]", "", own, "the header is not a JSON object"},
      {"unknown dtype", "{" + entry("w", "F33", "[2]", "[0,8]") + "}", two, own,
       "tensor w: unknown dtype 'F33'"},
      {"shape against span", "{" + entry("w", "F32", "[3]", "[0,8]") + "}", two, own,
       "tensor w: shape [3] of F32 needs 12 bytes, but data_offsets [0, 8) span 8"},
      {"dtype against span", "{" + entry("w", "BF16", "[2]", "[0,8]") + "}", two, own, "needs 4 bytes"},
      {"negative dimension", "{" + entry("w", "F32", "[-2]", "[0,8]") + "}", two, own, "shape holds -2"},
      {"offsets reversed", "{" + entry("w", "F32", "[0]", "[8,0]") + "}", two, own, "end before they begin"},
      {"offsets not integers", "{" + entry("w", "F32", "[2]", "[0,\"8\"]") + "}", two, own,
       "tensor w: data_offsets must be two non-negative integers"},
      {"offsets past the end", "{" + entry("w", "F32", "[4]", "[0,16]") + "}", two, own,
       "tensor w: data_offsets [0, 16) run past the end of the data (8 bytes)"},
      {"overlap", "{" + entry("v", "F32", "[2]", "[0,8]") + "," + entry("w", "F32", "[1]", "[4,8]") + "}",
       two, own, "tensor w: its data_offsets overlap those of v"},
      {"hole", "{" + entry("w", "F32", "[1]", "[4,8]") + "}", two, own,
       "tensor w: 4 bytes before its data_offsets belong to no tensor"},
      {"out of order and overlapping",
       "{" + entry("a", "F32", "[2]", "[0,8]") + "," + entry("b", "F32", "[2]", "[0,8]") + "}", two, own,
       "overlap"},
      {"trailing garbage", "{" + entry("w", "F32", "[1]", "[0,4]") + "}", two, own,
       "4 bytes of trailing data after the last tensor"},
      {"missing field", R"({"w":{"dtype":"F32","shape":[2]}})", two, own,
       "tensor w: the header entry has no data_offsets"},
      {"metadata not strings", R"({"__metadata__":{"n":1}})", "", own, "__metadata__ n is not a string"},
  };
  for (std::size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE(cases[i].what);
    const std::string file =
        write_raw(dir.file("bad" + std::to_string(i)), cases[i].header, cases[i].data, cases[i].length);
    expect_input_error([&] { SafetensorsFile f(file); }, cases[i].needle);
    expect_input_error([&] { SafetensorsFile f(file); }, file + ": ");
  }
  {
    std::ofstream(dir.file("short")) << "abc";
    expect_input_error([&] { SafetensorsFile f(dir.file("short")); },
                       "shorter than the 8-byte header length");
  }
  expect_input_error([&] { SafetensorsFile f(dir.file("missing")); }, "cannot open");
  const SafetensorsFile ints(write_raw(dir.file("ints"), "{" + entry("i", "I32", "[2]", "[0,8]") + "}", two));
  expect_input_error([&] { ints.read("i"); },
                     "tensor i has dtype I32: lrllm reads F32, F16 and BF16 tensors");
}

TEST(Safetensors, WriterPadsTheHeaderAndRoundTrips) {
  TempDir dir;
  const std::vector<float> a = test::random_floats(6, 1), b = test::random_floats(5, 2);
  const std::string path = dir.file("w.safetensors");
  write_safetensors(path,
                    {{"a", SafetensorsDtype::f32, {2, 3}, [&] { return a; }},
                     {"b", SafetensorsDtype::bf16, {5}, [&] { return b; }},
                     {"c", SafetensorsDtype::f16, {5}, [&] { return b; }}},
                    {{"format", "pt"}});
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
  std::ifstream in(path, std::ios::binary);
  uint64_t n = 0;
  in.read(reinterpret_cast<char*>(&n), 8);
  EXPECT_EQ(n % 8, 0u);
  std::string header(n, '\0');
  in.read(header.data(), static_cast<std::streamsize>(n));
  EXPECT_EQ(header.front(), '{');
  EXPECT_EQ(header.find_last_not_of(' '), header.find_last_of('}'));  // padded with spaces after the JSON
  const SafetensorsFile f(path);
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.read("a"), a);
  EXPECT_EQ(f.find("a")->shape, (std::vector<int64_t>{2, 3}));
  const auto* stored = reinterpret_cast<const uint16_t*>(f.bytes(*f.find("b")));
  for (int i = 0; i < 5; ++i) {
    uint16_t v16, h16;
    std::memcpy(&v16, stored + i, 2);
    std::memcpy(&h16, f.bytes(*f.find("c")) + 2 * i, 2);
    EXPECT_EQ(v16, float_to_bf16(b[i]));
    EXPECT_EQ(h16, float_to_f16(b[i]));
    EXPECT_EQ(f.read("b")[i], bf16_to_float(float_to_bf16(b[i])));
  }
  EXPECT_EQ(f.find("a")->begin, 0u);  // in the order given, back to back
  EXPECT_EQ(f.find("b")->begin, 24u);
  EXPECT_EQ(f.find("c")->begin, 34u);
}

TEST(Safetensors, ShardedFolderReadsAsOneSet) {
  TempDir dir;
  const auto one = [](float x) { return [x] { return std::vector<float>{x}; }; };
  write_safetensors(dir.file("s1.safetensors"), {{"a", SafetensorsDtype::f32, {1}, one(1)}}, {});
  write_safetensors(dir.file("s2.safetensors"),
                    {{"b", SafetensorsDtype::f32, {1}, one(2)}, {"c", SafetensorsDtype::bf16, {1}, one(3)}},
                    {});
  const auto index = [&](const std::string& map) {
    std::ofstream(dir.file("model.safetensors.index.json"))
        << R"({"metadata":{},"weight_map":)" << map << "}";
  };
  index(R"({"a":"s1.safetensors","b":"s2.safetensors","c":"s2.safetensors"})");
  const SafetensorsSet set(dir.path().string());
  EXPECT_EQ(set.names(), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(set.read("c"), std::vector<float>{3.0f});
  EXPECT_EQ(set.file_of("b"), dir.file("s2.safetensors"));
  index(R"({"a":"s2.safetensors","b":"s2.safetensors","c":"s2.safetensors"})");
  expect_input_error([&] { SafetensorsSet s(dir.path().string()); },
                     "puts tensor a in s2.safetensors, which does not hold it");
  index(R"({"a":"s1.safetensors","b":"s2.safetensors"})");
  expect_input_error([&] { SafetensorsSet s(dir.path().string()); },
                     "holds tensor c, which weight_map does not name");
  index(R"({"a":"../s1.safetensors"})");
  expect_input_error([&] { SafetensorsSet s(dir.path().string()); }, "not a file of the folder");
  index(R"({"a":"s9.safetensors"})");
  expect_input_error([&] { SafetensorsSet s(dir.path().string()); }, "s9.safetensors: cannot open");
  index(R"([1])");
  expect_input_error([&] { SafetensorsSet s(dir.path().string()); }, "has no weight_map object");
  std::filesystem::remove(dir.file("model.safetensors.index.json"));
  expect_input_error([&] { SafetensorsSet s(dir.path().string()); }, "holds neither model.safetensors");
}

}  // namespace
}  // namespace lrllm

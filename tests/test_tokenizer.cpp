// The GPT-2 tokenizer against ids from the reference encoder (npm gpt-3-encoder), and the token file
// writer. The vocabulary comes from $LRLLM_TOKENIZER_DIR, by default input/data/tokenizer (made by
// `make data`); without it these tests fail rather than skip.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "lrllm/core/common.h"
#include "lrllm/io/tokenizer.h"
#include "test_util.h"

namespace lrllm {
namespace {

namespace fs = std::filesystem;

std::string tokenizer_dir() {
  const char* dir = std::getenv("LRLLM_TOKENIZER_DIR");
  return dir && *dir ? dir : "input/data/tokenizer";
}

// Loaded once for all tests; null (with the reason in load_error) when the files are missing.
std::string load_error;
const Tokenizer* gpt2() {
  static const std::unique_ptr<Tokenizer> tok = []() -> std::unique_ptr<Tokenizer> {
    try {
      return std::make_unique<Tokenizer>(
          Tokenizer::load(tokenizer_dir() + "/encoder.json", tokenizer_dir() + "/vocab.bpe"));
    } catch (const std::exception& e) {
      load_error = e.what();
      return nullptr;
    }
  }();
  return tok.get();
}

#define REQUIRE_GPT2(tok)                                                                       \
  const Tokenizer* tok = gpt2();                                                                \
  ASSERT_NE(tok, nullptr) << "cannot load the GPT-2 tokenizer from " << tokenizer_dir() << " (" \
                          << load_error << "); run `make data` or set LRLLM_TOKENIZER_DIR"

struct Vector {
  std::string text;
  std::vector<int> ids;
};

// Produced by gpt-3-encoder 1.1.4's encode().
const std::vector<Vector>& reference_vectors() {
  static const std::vector<Vector> vectors = {
      {"Hello world", {15496, 995}},
      {"I'm don't we'll they've", {40, 1101, 836, 470, 356, 1183, 484, 1053}},
      {"a  b\n\n\n c   \n", {64, 220, 275, 628, 198, 269, 220, 220, 220, 198}},
      {"12345 3.14", {10163, 2231, 513, 13, 1415}},
      {"Ünïcödé naïve 日本語",
       {127, 250, 77, 26884, 66, 9101, 67, 2634, 41492, 10545, 245, 98, 17312, 105, 45739, 252}},
      {"🤖👍🏽", {8582, 97, 244, 41840, 235, 8582, 237, 121}},
      {"", {}},
      {"\n", {198}},
  };
  return vectors;
}

std::vector<char> read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// Reads back a token file: the header's first three ints, then the tokens.
void read_token_file(const fs::path& path, std::vector<int32_t>& header, std::vector<uint16_t>& tokens) {
  const std::vector<char> bytes = read_bytes(path);
  ASSERT_GE(bytes.size(), 1024u);
  header.assign(3, 0);
  std::memcpy(header.data(), bytes.data(), 3 * sizeof(int32_t));
  tokens.resize((bytes.size() - 1024) / 2);
  std::memcpy(tokens.data(), bytes.data() + 1024, tokens.size() * 2);
}

TEST(Tokenizer, Gpt2Vocabulary) {
  REQUIRE_GPT2(tok);
  EXPECT_EQ(tok->vocab_size(), 50257);
  EXPECT_EQ(tok->eot(), 50256);
  const std::vector<int> eot = {tok->eot()};
  EXPECT_EQ(tok->decode(eot), "<|endoftext|>");
}

TEST(Tokenizer, EncodesLikeTheReference) {
  REQUIRE_GPT2(tok);
  for (const auto& [text, ids] : reference_vectors()) EXPECT_EQ(tok->encode(text), ids) << "text: " << text;
}

TEST(Tokenizer, DecodeInvertsEncode) {
  REQUIRE_GPT2(tok);
  for (const auto& v : reference_vectors()) {
    EXPECT_EQ(tok->decode(v.ids), v.text);
    EXPECT_EQ(tok->decode(tok->encode(v.text)), v.text);
  }
}

TEST(Tokenizer, KeepsInvalidUtf8BytesAsTheirOwnPreTokens) {
  REQUIRE_GPT2(tok);
  const std::string text = "abc\xff\xfe def \xc3( x\xe2\x82";
  const std::vector<int> ids = tok->encode(text);
  EXPECT_EQ(tok->decode(ids), text);
  // Valid text around the invalid bytes is encoded as usual: "abc" and " def".
  ASSERT_GE(ids.size(), 4u);
  EXPECT_EQ(ids[0], 39305);
  EXPECT_EQ(ids[3], 825);
}

TEST(Tokenizer, DecodeRejectsIdsOutsideTheVocabulary) {
  REQUIRE_GPT2(tok);
  const std::vector<int> bad = {15496, 50257};
  EXPECT_THROW(tok->decode(bad), std::out_of_range);
}

TEST(Tokenizer, MissingEncoderJsonIsAnInputError) {
  const test::TempDir dir;
  const std::string missing = dir.file("encoder.json");
  test::expect_input_error([&] { Tokenizer::load(missing, tokenizer_dir() + "/vocab.bpe"); }, missing);
}

TEST(Tokenizer, CorruptEncoderJsonIsAnInputError) {
  const test::TempDir dir;
  const std::string corrupt = dir.file("encoder.json");
  std::ofstream(corrupt) << "{\"a\": 0,";
  test::expect_input_error([&] { Tokenizer::load(corrupt, tokenizer_dir() + "/vocab.bpe"); }, corrupt);
}

TEST(TokenFile, WriterRoundTrips) {
  const test::TempDir dir;
  const fs::path path = dir.file("tokens.bin");
  const std::vector<uint16_t> tokens = {50256, 0, 1, 65535, 15496};
  write_token_file(path.string(), tokens);
  std::vector<int32_t> header;
  std::vector<uint16_t> back;
  read_token_file(path, header, back);
  EXPECT_EQ(header, (std::vector<int32_t>{20240520, 1, 5}));
  EXPECT_EQ(back, tokens);
  EXPECT_FALSE(fs::exists(path.string() + ".tmp"));
}

TEST(TokenFile, TokenizesADirectoryInNameOrder) {
  REQUIRE_GPT2(tok);
  const test::TempDir dir;
  fs::create_directories(dir.path() / "docs" / "subdir_is_ignored");
  std::ofstream(dir.path() / "docs" / "b.txt") << "\n";
  std::ofstream(dir.path() / "docs" / "a.txt") << "Hello world";
  const fs::path out = dir.file("out.bin");
  EXPECT_EQ(tokenize_to_file(*tok, dir.file("docs"), out.string()), 5u);
  std::vector<int32_t> header;
  std::vector<uint16_t> tokens;
  read_token_file(out, header, tokens);
  EXPECT_EQ(header, (std::vector<int32_t>{20240520, 1, 5}));
  EXPECT_EQ(tokens, (std::vector<uint16_t>{50256, 15496, 995, 50256, 198}));
}

TEST(TokenFile, TokenizesASingleFile) {
  REQUIRE_GPT2(tok);
  const test::TempDir dir;
  std::ofstream(dir.file("doc.txt")) << "Hello world";
  EXPECT_EQ(tokenize_to_file(*tok, dir.file("doc.txt"), dir.file("out.bin")), 3u);
}

TEST(TokenFile, MissingInputIsAnInputError) {
  REQUIRE_GPT2(tok);
  const test::TempDir dir;
  const std::string missing = dir.file("nothing");
  test::expect_input_error([&] { tokenize_to_file(*tok, missing, dir.file("out.bin")); }, missing);
  EXPECT_FALSE(fs::exists(dir.file("out.bin")));
}

}  // namespace
}  // namespace lrllm

// The Llama-2 tokenizer (Tokenizer::load_dir on a Hugging Face tokenizer.json) against ids from the
// reference, llama-tokenizer-js, and the loader's checks on small hand-made files. The real vocabulary
// comes from $LRLLM_LLAMA_TOKENIZER_DIR, by default input/data/tokenizer-llama (made by `make data`);
// without it these tests fail rather than skip.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "lrllm/core/common.h"
#include "lrllm/io/tokenizer.h"
#include "test_util.h"

namespace lrllm {
namespace {

namespace fs = std::filesystem;

std::string llama_dir() {
  const char* dir = std::getenv("LRLLM_LLAMA_TOKENIZER_DIR");
  return dir && *dir ? dir : "input/data/tokenizer-llama";
}

std::string load_error;
const Tokenizer* llama() {
  static const std::unique_ptr<Tokenizer> tok = []() -> std::unique_ptr<Tokenizer> {
    try {
      return std::make_unique<Tokenizer>(Tokenizer::load_dir(llama_dir()));
    } catch (const std::exception& e) {
      load_error = e.what();
      return nullptr;
    }
  }();
  return tok.get();
}

#define REQUIRE_LLAMA(tok)                                                                                \
  const Tokenizer* tok = llama();                                                                         \
  ASSERT_NE(tok, nullptr) << "cannot load the Llama tokenizer from " << llama_dir() << " (" << load_error \
                          << "); run `make data` or set LRLLM_LLAMA_TOKENIZER_DIR"

struct Vector {
  std::string text;
  std::vector<int> ids;  // the reference's encode(text) without its leading <s> (1)
};

// From llama-tokenizer-js 1.2.2's encode(); the first eight are the package's own test cases.
const std::vector<Vector>& reference_vectors() {
  static const std::vector<Vector> vectors = {
      {"grabbed", {2646, 1327, 287}},
      {" grabbed", {29871, 2646, 1327, 287}},
      {"           grabbed", {9651, 2646, 1327, 287}},
      {"\n", {29871, 13}},
      {" \n", {259, 13}},
      {"\ttabs\t\t\t\tout here", {29871, 12, 21175, 12, 12, 12, 12, 449, 1244}},
      {"ax\n####\nboo", {4853, 13, 4136, 13, 833, 29877}},
      {"\xe9\x95\x87", {29871, 30411}},                   // 镇, a piece of its own
      {"\xf0\x9f\xa6\x99", {29871, 243, 162, 169, 156}},  // 🦙, byte fallback
      {"Hello world", {15043, 3186}},
      {"<s>Hi</s>", {529, 29879, 29958, 18567, 829, 29879, 29958}},
      {"  two  spaces", {259, 1023, 29871, 8162}},
      {"1234567", {29871, 29896, 29906, 29941, 29946, 29945, 29953, 29955}},
      {"na\xc3\xafve caf\xc3\xa9", {1055, 30085, 345, 274, 28059}},
  };
  return vectors;
}

TEST(LlamaTokenizer, Vocabulary) {
  REQUIRE_LLAMA(tok);
  EXPECT_EQ(tok->vocab_size(), 32000);
  EXPECT_EQ(tok->bos(), 1);
  EXPECT_EQ(tok->eot(), 2);
  const std::vector<int> eos = {2, 0};
  EXPECT_EQ(tok->decode(eos), "</s><unk>");
}

TEST(LlamaTokenizer, EncodesLikeTheReference) {
  REQUIRE_LLAMA(tok);
  for (const auto& [text, ids] : reference_vectors()) EXPECT_EQ(tok->encode(text), ids) << "text: " << text;
}

TEST(LlamaTokenizer, DecodeInvertsEncodeWithOrWithoutTheStart) {
  REQUIRE_LLAMA(tok);
  for (const auto& [text, ids] : reference_vectors()) {
    EXPECT_EQ(tok->decode(ids), text);
    std::vector<int> with_bos = {tok->bos()};
    with_bos.insert(with_bos.end(), ids.begin(), ids.end());
    EXPECT_EQ(tok->decode(with_bos), text);
  }
}

TEST(LlamaTokenizer, EmptyTextHasNoTokens) {
  REQUIRE_LLAMA(tok);
  EXPECT_TRUE(tok->encode("").empty());
  EXPECT_EQ(tok->decode(std::vector<int>{}), "");
}

TEST(LlamaTokenizer, SpecialTokensInTextArePlainText) {
  REQUIRE_LLAMA(tok);
  const std::vector<int> ids = tok->encode("<s> </s> <unk>");
  for (const int id : ids) EXPECT_GT(id, 2);
  EXPECT_EQ(tok->decode(ids), "<s> </s> <unk>");
}

TEST(LlamaTokenizer, InvalidUtf8BytesBecomeBytePieces) {
  REQUIRE_LLAMA(tok);
  const std::string text = "a\xff\xc3(\xed\xa0\x80";  // a stray byte, a cut sequence, a surrogate
  const std::vector<int> ids = tok->encode(text);
  // <0xXX> has id 3 + XX.
  EXPECT_EQ(ids, (std::vector<int>{263, 3 + 0xff, 3 + 0xc3, 29898, 3 + 0xed, 3 + 0xa0, 3 + 0x80}));
  EXPECT_EQ(tok->decode(ids), text);
}

TEST(LlamaTokenizer, TheSpaceMarkDecodesAsASpace) {
  REQUIRE_LLAMA(tok);
  EXPECT_EQ(tok->encode("\xe2\x96\x81x"), tok->encode(" x"));
  EXPECT_EQ(tok->decode(tok->encode("a\xe2\x96\x81"
                                    "b")),
            "a b");
}

TEST(LlamaTokenizer, DecodeRejectsIdsOutsideTheVocabulary) {
  REQUIRE_LLAMA(tok);
  EXPECT_THROW(tok->decode(std::vector<int>{15043, 32000}), std::out_of_range);
  EXPECT_THROW(tok->decode(std::vector<int>{-1}), std::out_of_range);
}

TEST(LlamaTokenizer, DocumentsStartWithTheSequenceStart) {
  REQUIRE_LLAMA(tok);
  const test::TempDir dir;
  fs::create_directories(dir.path() / "docs");
  std::ofstream(dir.path() / "docs" / "a.txt") << "Hello world";
  std::ofstream(dir.path() / "docs" / "b.txt") << "";
  const std::string out = dir.file("out.bin");
  EXPECT_EQ(tokenize_to_file(*tok, dir.file("docs"), out), 4u);
  std::ifstream in(out, std::ios::binary);
  const std::vector<char> bytes{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  ASSERT_EQ(bytes.size(), 1024u + 8);
  std::vector<uint16_t> tokens(4);
  std::memcpy(tokens.data(), bytes.data() + 1024, 8);
  EXPECT_EQ(tokens, (std::vector<uint16_t>{1, 15043, 3186, 1}));
}

// A small tokenizer.json: the specials, the 256 byte pieces (ids 3..258), then "▁" 259, "a" 260, "b" 261,
// "ab" 262, "▁a" 263, "aa" 264, with the merges "a b", "▁ a", "a a" in that rank order.
nlohmann::json small_tokenizer() {
  nlohmann::json vocab = nlohmann::json::object();
  vocab["<unk>"] = 0;
  vocab["<s>"] = 1;
  vocab["</s>"] = 2;
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    vocab[name] = 3 + b;
  }
  const std::vector<std::string> pieces = {"\xe2\x96\x81",
                                           "a",
                                           "b",
                                           "ab",
                                           "\xe2\x96\x81"
                                           "a",
                                           "aa"};
  for (std::size_t i = 0; i < pieces.size(); ++i) vocab[pieces[i]] = 259 + static_cast<int>(i);
  nlohmann::json j;
  j["model"] = {{"type", "BPE"},
                {"byte_fallback", true},
                {"vocab", vocab},
                {"merges", {"a b", "\xe2\x96\x81 a", "a a"}}};
  j["added_tokens"] = {{{"id", 0}, {"content", "<unk>"}}, {{"id", 265}, {"content", "<pad>"}}};
  return j;
}

// Keeps the ids contiguous, so that only the missing piece is wrong.
void rename_piece(nlohmann::json& j, const std::string& from, const std::string& to) {
  nlohmann::json& vocab = j["model"]["vocab"];
  vocab[to] = vocab[from];
  vocab.erase(from);
}

void write_tokenizer(const test::TempDir& dir, const std::string& text) {
  std::ofstream(dir.file("tokenizer.json")) << text;
}

TEST(LlamaTokenizerFile, MergesLowestRankFirstAndTiesLeftToRight) {
  const test::TempDir dir;
  write_tokenizer(dir, small_tokenizer().dump());
  const Tokenizer tok = Tokenizer::load_dir(dir.path().string());
  EXPECT_EQ(tok.vocab_size(), 266);                            // the added <pad> extends the vocabulary
  EXPECT_EQ(tok.encode("ab"), (std::vector<int>{259, 262}));   // "a b" ranks before "▁ a"
  EXPECT_EQ(tok.encode("a"), (std::vector<int>{263}));         // "▁a"
  EXPECT_EQ(tok.encode("aaa"), (std::vector<int>{263, 264}));  // "▁ a" first, then "a a"
  EXPECT_EQ(tok.encode("baaa"), (std::vector<int>{259, 261, 264, 260}));  // of two equal "a a", the left
  EXPECT_EQ(tok.encode("c"), (std::vector<int>{259, 3 + 'c'}));           // byte fallback
  EXPECT_EQ(tok.decode(std::vector<int>{265}), "<pad>");
}

TEST(LlamaTokenizerFile, ReadsMergesWrittenAsPairs) {
  const test::TempDir dir;
  nlohmann::json j = small_tokenizer();
  j["model"]["merges"] =
      nlohmann::json::array({nlohmann::json::array({"a", "b"}), nlohmann::json::array({"\xe2\x96\x81", "a"}),
                             nlohmann::json::array({"a", "a"})});
  write_tokenizer(dir, j.dump());
  EXPECT_EQ(Tokenizer::load_dir(dir.path().string()).encode("aaa"), (std::vector<int>{263, 264}));
}

TEST(TokenizerDir, ReadsGptTwoWithoutASequenceStart) {
  const char* gpt2 = std::getenv("LRLLM_TOKENIZER_DIR");
  const std::string dir = gpt2 && *gpt2 ? gpt2 : "input/data/tokenizer";
  const Tokenizer tok = Tokenizer::load_dir(dir);
  EXPECT_EQ(tok.bos(), -1);
  EXPECT_EQ(tok.eot(), 50256);
  EXPECT_EQ(tok.encode("Hello world"), (std::vector<int>{15496, 995}));
}

TEST(TokenizerDir, ADirectoryWithoutTokenizerFilesIsAnInputError) {
  const test::TempDir dir;
  test::expect_input_error([&] { Tokenizer::load_dir(dir.path().string()); }, dir.path().string());
}

TEST(TokenizerDir, OneGptTwoFileAloneNamesTheMissingOne) {
  const test::TempDir dir;
  std::ofstream(dir.file("vocab.bpe")) << "#version: 0.2\n";
  test::expect_input_error([&] { Tokenizer::load_dir(dir.path().string()); }, dir.file("encoder.json"));
}

// Each malformed variant of the small file must be refused with a message naming the file and the cause.
TEST(LlamaTokenizerFile, MalformedFilesAreInputErrors) {
  struct Case {
    std::string what, text, needle;
  };
  const auto with = [](auto edit) {
    nlohmann::json j = small_tokenizer();
    edit(j);
    return j.dump();
  };
  const std::vector<Case> cases = {
      {"bad JSON", "{\"model\": {", "parse error"},
      {"not an object", "[]", "\"model\" object"},
      {"no model", with([](nlohmann::json& j) { j.erase("model"); }), "\"model\" object"},
      {"not BPE", with([](nlohmann::json& j) { j["model"]["type"] = "Unigram"; }), "model.type"},
      {"no byte fallback", with([](nlohmann::json& j) { j["model"]["byte_fallback"] = false; }),
       "byte_fallback"},
      {"no vocab", with([](nlohmann::json& j) { j["model"].erase("vocab"); }), "model.vocab is missing"},
      {"id not an integer", with([](nlohmann::json& j) { j["model"]["vocab"]["a"] = "x"; }),
       "not an integer"},
      {"ids with a gap", with([](nlohmann::json& j) { j["model"]["vocab"]["a"] = 999; }), "each once"},
      {"no byte piece", with([](nlohmann::json& j) { rename_piece(j, "<0x41>", "A"); }), "<0x41>"},
      {"no </s>", with([](nlohmann::json& j) { rename_piece(j, "</s>", "<eos>"); }), "</s>"},
      {"no merges", with([](nlohmann::json& j) { j["model"].erase("merges"); }), "model.merges is missing"},
      {"merge of an unknown piece", with([](nlohmann::json& j) { j["model"]["merges"].push_back("a zz"); }),
       "'zz' is not in model.vocab"},
      {"merge making an unknown piece",
       with([](nlohmann::json& j) { j["model"]["merges"].push_back("b a"); }), "'ba' is not in model.vocab"},
      {"merge of three pieces", with([](nlohmann::json& j) { j["model"]["merges"].push_back("a b a"); }),
       "not two pieces"},
      {"added token clashing", with([](nlohmann::json& j) { j["added_tokens"][0]["content"] = "<pad>"; }),
       "model.vocab gives to '<unk>'"},
      {"added tokens with a gap", with([](nlohmann::json& j) { j["added_tokens"][1]["id"] = 300; }),
       "without gaps"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    const test::TempDir dir;
    write_tokenizer(dir, c.text);
    test::expect_input_error([&] { Tokenizer::load_dir(dir.path().string()); }, dir.file("tokenizer.json"));
    test::expect_input_error([&] { Tokenizer::load_dir(dir.path().string()); }, c.needle);
  }
}

}  // namespace
}  // namespace lrllm

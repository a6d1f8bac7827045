// GPT-2's byte-level BPE tokenizer (docs/design.md, Tokenizer) and the writer of llm.c token files.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace lrllm {

// Encodes exactly like OpenAI's GPT-2 encoder as published in the npm package gpt-3-encoder, the
// reference that tests/tokenizer/compare.sh checks against. Two deliberate choices where that reference
// leaves room:
//  * Whitespace (\s) is JavaScript's set, so U+FEFF is whitespace and U+0085 is not; letters and
//    numbers (\p{L}, \p{N}) follow PCRE2's Unicode tables, which may lag the newest Unicode version.
//  * Bytes that are not valid UTF-8 are kept, not replaced: each maximal run of them becomes a
//    pre-token of its own, BPE-encoded from its raw bytes, so decode(encode(x)) == x for any bytes x.
class Tokenizer {
 public:
  // Reads OpenAI's encoder.json and vocab.bpe. Throws InputError naming the file when one is missing or
  // corrupt.
  static Tokenizer load(const std::string& encoder_json, const std::string& vocab_bpe);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Safe to call from several threads at once: the per-pre-token cache is locked.
  std::vector<int> encode(std::string_view text) const;
  // Concatenates the tokens' bytes, which need not be valid UTF-8 when a multi-byte character is split
  // across tokens. Throws std::out_of_range on an id outside the vocabulary.
  std::string decode(std::span<const int> tokens) const;
  int eot() const;         // <|endoftext|>, 50256 for GPT-2
  int vocab_size() const;  // 50257 for GPT-2

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Writes an llm.c token file (header of 256 int32: magic, version, token count; then uint16 tokens) to
// path + ".tmp" and renames it to path, so a reader never sees a half-written file. Throws RuntimeError
// when the file cannot be written.
void write_token_file(const std::string& path, std::span<const uint16_t> tokens);

// Tokenizes input (a text file, or a directory whose regular files, sorted by name, are the documents)
// into the token file output, each document preceded by <|endoftext|>. Returns the number of tokens.
// Throws InputError when input is missing or holds no documents.
std::size_t tokenize_to_file(const Tokenizer& tok, const std::string& input, const std::string& output);

}  // namespace lrllm

// The tokenizers (GPT-2's byte-level BPE, Llama-2's SentencePiece-style BPE; docs/design.md, Tokenizer)
// and the writer of llm.c token files.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace lrllm {

// One of two tokenizers, each encoding exactly like its reference, which tests/tokenizer/compare.sh
// checks against token for token.
//
// GPT-2 (OpenAI's encoder.json and vocab.bpe): like the npm package gpt-3-encoder. Two deliberate choices
// where that reference leaves room:
//  * Whitespace (\s) is JavaScript's set, so U+FEFF is whitespace and U+0085 is not; letters and
//    numbers (\p{L}, \p{N}) follow PCRE2's Unicode tables, which may lag the newest Unicode version.
//  * Bytes that are not valid UTF-8 are kept, not replaced: each maximal run of them becomes a
//    pre-token of its own, BPE-encoded from its raw bytes, so decode(encode(x)) == x for any bytes x.
//
// Llama-2 (a Hugging Face tokenizer.json whose model is BPE with byte_fallback): like the npm package
// llama-tokenizer-js's encode(text) without its <s>. A space is put before the text, every " " becomes
// "▁", each character becomes its one-character piece or, when the vocabulary has none, the byte pieces
// <0xXX> of its UTF-8, and then the lowest-ranked adjacent pair is merged first (ties left to right)
// until no pair has a merge. There is no pre-tokenization: tabs, newlines and digits are plain
// characters. As in the reference:
//  * "<s>", "</s>" and "<unk>" inside the text are plain text, never the special tokens.
//  * Empty text encodes to no tokens at all (no "▁" either).
// Where the reference leaves room: each byte that is not part of valid UTF-8 becomes its own byte piece
// (the reference, reading JavaScript strings, would see U+FFFD instead), so decode(encode(x)) == x for
// any bytes x without U+2581 "▁", which encodes like a space and decodes as one.
class Tokenizer {
 public:
  // Reads the tokenizer in dir: GPT-2's when it holds encoder.json or vocab.bpe, else a Hugging Face
  // tokenizer.json. Throws InputError naming dir when it holds none of them, or naming the file that is
  // missing (GPT-2's other one) or corrupt.
  static Tokenizer load_dir(const std::string& dir);
  // Reads OpenAI's encoder.json and vocab.bpe. Throws InputError naming the file when one is missing or
  // corrupt.
  static Tokenizer load(const std::string& encoder_json, const std::string& vocab_bpe);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // The text's tokens only: a caller that wants the sequence start prepends bos() when it is >= 0, which
  // gives the Llama reference's encode(text) for any text but the empty one. Safe to call from several
  // threads at once.
  std::vector<int> encode(std::string_view text) const;
  // Concatenates the tokens' bytes, which need not be valid UTF-8 when a multi-byte character is split
  // across tokens. Llama's: a leading <s> is skipped, byte pieces are their byte, "▁" is a space, and
  // the one space that encode put before the text is dropped (as the reference's decode does), so decode
  // wants a whole sequence, not one token at a time. Special tokens elsewhere decode as their text
  // ("<|endoftext|>", "</s>"). Throws std::out_of_range on an id outside the vocabulary.
  std::string decode(std::span<const int> tokens) const;
  int bos() const;  // Llama's <s> (1); -1 for GPT-2, which has none
  // Whether encode puts a space before the text (Llama's SentencePiece rule): a continuation encoded on its
  // own then needs no space of its own.
  bool adds_space_first() const;
  int eot() const;         // <|endoftext|> (50256) for GPT-2, </s> (2) for Llama
  int vocab_size() const;  // 50257 for GPT-2, 32000 for Llama-2

  // Implemented by each tokenizer (include/lrllm/io/tokenizer_impl.h); public so that its subclasses in
  // other files can name it.
  class Impl;

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// A model of model_vocab tokens can read every id of tok (from dir): else an InputError naming both, e.g. a
// Llama model of 32000 tokens given GPT-2's tokenizer.
void check_tokenizer_fits(const Tokenizer& tok, int model_vocab, const std::string& dir);

// Writes an llm.c token file (header of 256 int32: magic, version, token count; then uint16 tokens) to
// path + ".tmp" and renames it to path, so a reader never sees a half-written file. Throws RuntimeError
// when the file cannot be written.
void write_token_file(const std::string& path, std::span<const uint16_t> tokens);

// Tokenizes input (a text file, or a directory whose regular files, sorted by name, are the documents)
// into the token file output, each document preceded by bos() when the tokenizer has one (Llama: <s>, as
// the reference encodes a document) and by eot() otherwise (GPT-2: <|endoftext|>). Returns the number of
// tokens.
// Throws InputError when input is missing or holds no documents.
std::size_t tokenize_to_file(const Tokenizer& tok, const std::string& input, const std::string& output);

}  // namespace lrllm

// Internal to the tokenizer component (docs/design.md, Tokenizer): the interface behind Tokenizer, its two
// implementations' loaders, and the BPE merge loop they share.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "lrllm/io/tokenizer.h"

namespace lrllm {

class Tokenizer::Impl {
 public:
  virtual ~Impl() = default;
  virtual std::vector<int> encode(std::string_view text) const = 0;
  virtual std::string decode(std::span<const int> tokens) const = 0;
  virtual int bos() const = 0;
  virtual bool adds_space_first() const = 0;
  virtual int eot() const = 0;
  virtual int vocab_size() const = 0;
};

// GPT-2's, from OpenAI's encoder.json and vocab.bpe (src/io/tokenizer.cpp).
std::unique_ptr<Tokenizer::Impl> load_gpt2_bpe(const std::string& encoder_json, const std::string& vocab_bpe);
// Llama's, from a Hugging Face tokenizer.json (src/io/sentencepiece_bpe.cpp).
std::unique_ptr<Tokenizer::Impl> load_sentencepiece_bpe(const std::string& tokenizer_json);

// The bytes of the file at path; InputError naming it ("cannot open <what> '<path>': ...") when it cannot
// be read.
std::string read_whole_file(const std::string& path, const std::string& what);

// A merge of two adjacent symbols: its rank (lower merges first) and the symbol it makes.
struct Merge {
  int rank;
  int result;
};

inline uint64_t pair_key(int left, int right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

using MergeTable = std::unordered_map<uint64_t, Merge>;  // pair_key(left, right) -> its merge

// Merges symbols in place: the lowest-ranked adjacent pair first, ties left to right, until no pair has
// a merge. llama-tokenizer-js works this way; gpt-3-encoder merges round by round, which gives the same
// for the merge orders that load_gpt2_bpe accepts.
void merge_symbols(std::vector<int>& symbols, const MergeTable& merges);

}  // namespace lrllm

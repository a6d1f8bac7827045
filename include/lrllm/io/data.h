// Token files (llm.c's shard format, docs/design.md, Token files) and the batches drawn from them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "lrllm/model/batch.h"

namespace lrllm {

inline constexpr int32_t kTokenFileMagic = 20240520;
inline constexpr int32_t kTokenFileVersion = 1;
inline constexpr int kTokenHeaderInts = 256;

// A token file mapped into memory read-only: pages load on demand and ranks on one node share them, so a
// corpus of billions of tokens costs no copy per rank. Throws InputError naming the file when it is missing,
// has a bad header, or its size disagrees with the header's token count.
class TokenFile {
 public:
  explicit TokenFile(const std::string& path);
  ~TokenFile();
  TokenFile(const TokenFile&) = delete;
  TokenFile& operator=(const TokenFile&) = delete;
  const std::string& path() const { return path_; }
  std::size_t size() const { return count_; }
  const uint16_t* data() const { return tokens_; }
  // The largest token id of the file, found in one pass when it is opened.
  int max_token() const { return max_token_; }
  // Throws InputError naming the file when one of its ids is not below vocab_size.
  void check_vocab(int vocab_size) const;

 private:
  std::string path_;
  void* map_ = nullptr;
  std::size_t map_bytes_ = 0;
  const uint16_t* tokens_ = nullptr;
  std::size_t count_ = 0;
  int max_token_ = -1;
};

// Where training and validation batches come from: numbered sequences (targets < 0 carry no loss).
// Positions run on past the end (epochs).
class BatchSource {
 public:
  virtual ~BatchSource() = default;
  virtual std::size_t num_sequences() const = 0;
  // Fills `out` with the sequences at positions first .. first + count - 1, one a row.
  virtual void fill(uint64_t first, int count, Batch& out) = 0;
};

// The order in which an epoch visits n items: the identity, or with shuffling a fixed random permutation per
// epoch drawn from our own generator, so it is the same on every platform and every resume.
class EpochOrder {
 public:
  EpochOrder(std::size_t n, bool shuffle, uint64_t seed) : n_(n), shuffle_(shuffle), seed_(seed) {}
  // The item visited at a position counted from the start of the first epoch.
  std::size_t at(uint64_t position);

 private:
  std::size_t n_;
  bool shuffle_;
  uint64_t seed_;
  uint64_t epoch_ = UINT64_MAX;
  std::vector<uint32_t> order_;
};

// Cuts a token file into sequences of seq_len + 1 tokens (inputs and shifted targets): sequence i starts at
// token i * seq_len. Sequence positions run on across epochs; with shuffling, each epoch visits the
// sequences in its own fixed random order.
class Batcher final : public BatchSource {
 public:
  Batcher(const TokenFile& file, int seq_len, bool shuffle, uint64_t seed);
  std::size_t num_sequences() const override { return num_sequences_; }
  // Rows of seq_len tokens: no padding.
  void fill(uint64_t first, int count, Batch& out) override;

 private:
  const TokenFile& file_;
  int seq_len_;
  std::size_t num_sequences_;
  EpochOrder order_;
};

}  // namespace lrllm

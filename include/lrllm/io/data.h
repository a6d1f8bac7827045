// Token files (llm.c's shard format, docs/design.md, Token files) and the batches drawn from them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
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

// Where each shard's tokens lie in a stream of shards: the 64-bit offset arithmetic of TokenStream on its
// own, so that it can be tested with counts beyond 2^32 without files that large.
class ShardIndex {
 public:
  explicit ShardIndex(const std::vector<uint64_t>& sizes);
  uint64_t total() const { return starts_.back(); }
  // The position of shard k's first token in the stream.
  uint64_t start(std::size_t k) const { return starts_[k]; }
  // The shard holding the stream's token `position` (below total()), and the token's position in it.
  std::pair<std::size_t, uint64_t> locate(uint64_t position) const;

 private:
  std::vector<uint64_t> starts_;  // one per shard, then the total
};

// The paths that data.train or data.val names (docs/design.md, Token files): a comma list whose entries are
// paths or globs, a glob's matches sorted by name. Throws InputError for an empty entry or a glob that
// matches no file.
std::vector<std::string> token_file_paths(const std::string& spec);

// The token files of data.train or data.val read as one token stream, in the order of token_file_paths
// (docs/design.md, Token files). Every shard is mapped and validated when the stream is built, so a missing,
// truncated or corrupt one is an InputError naming it before any step runs.
class TokenStream {
 public:
  explicit TokenStream(const std::string& spec);
  const std::string& spec() const { return spec_; }
  uint64_t size() const { return index_.total(); }
  std::size_t num_shards() const { return shards_.size(); }
  const TokenFile& shard(std::size_t k) const { return *shards_[k]; }
  // Copies the stream's tokens first .. first + count - 1 (below size()), across shard boundaries.
  void read(uint64_t first, std::size_t count, uint16_t* out) const;
  // Throws InputError naming the first shard with an id that is not below vocab_size.
  void check_vocab(int vocab_size) const;
  // "N tokens", and "in K shards" when there are several: for the start banner.
  std::string summary() const;

 private:
  std::string spec_;
  std::vector<std::unique_ptr<TokenFile>> shards_;
  ShardIndex index_;
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

// A bijection of [0, n) chosen by `key`, computed one value at a time in O(1) time and memory: a balanced
// Feistel network on the smallest even number of bits that covers n, applied again while the value falls
// outside [0, n) (cycle walking; fewer than 4 passes on average). i must be below n.
uint64_t permute_index(uint64_t i, uint64_t n, uint64_t key);

// Up to this many items, an epoch's shuffled order is a table of 32-bit entries built by Fisher-Yates;
// beyond, the table's entries would not hold the items' numbers (nor fit in memory), and the order is
// permute_index.
inline constexpr uint64_t kShuffleTableMax = uint64_t{1} << 32;

// The order in which an epoch visits n items: the identity, or with shuffling a fixed random permutation per
// epoch drawn from our own generator, so it is the same on every platform and every resume.
class EpochOrder {
 public:
  EpochOrder(uint64_t n, bool shuffle, uint64_t seed) : n_(n), shuffle_(shuffle), seed_(seed) {}
  // The item visited at a position counted from the start of the first epoch.
  uint64_t at(uint64_t position);

 private:
  uint64_t n_;
  bool shuffle_;
  uint64_t seed_;
  uint64_t epoch_ = UINT64_MAX;
  uint64_t epoch_seed_ = 0;
  std::vector<uint32_t> order_;
};

// Cuts a token stream into sequences of seq_len + 1 tokens (inputs and shifted targets): sequence i starts at
// the stream's token i * seq_len, wherever the shards' boundaries lie. Sequence positions run on across
// epochs; with shuffling, each epoch visits the sequences in its own fixed random order.
class Batcher final : public BatchSource {
 public:
  Batcher(const TokenStream& stream, int seq_len, bool shuffle, uint64_t seed);
  std::size_t num_sequences() const override { return num_sequences_; }
  // Rows of seq_len tokens: no padding.
  void fill(uint64_t first, int count, Batch& out) override;

 private:
  const TokenStream& stream_;
  int seq_len_;
  std::size_t num_sequences_;
  EpochOrder order_;
  std::vector<uint16_t> row_;  // one sequence's seq_len + 1 tokens, read from the stream
};

}  // namespace lrllm

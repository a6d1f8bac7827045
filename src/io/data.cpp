#include "lrllm/io/data.h"

#include <fcntl.h>
#include <glob.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <numeric>

#include "lrllm/core/common.h"
#include "lrllm/core/rng.h"

namespace lrllm {

TokenFile::TokenFile(const std::string& path) : path_(path) {
  const int fd = open(path.c_str(), O_RDONLY);
  if (fd < 0) throw InputError("token file " + path + " cannot be opened: " + std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    throw InputError("token file " + path + " is not a regular file");
  }
  const uint64_t bytes = static_cast<uint64_t>(st.st_size);
  if (bytes < kTokenHeaderInts * sizeof(int32_t)) {
    close(fd);
    throw InputError("token file " + path + " is truncated: shorter than its 1024-byte header");
  }
  map_ = mmap(nullptr, bytes, PROT_READ, MAP_SHARED, fd, 0);
  close(fd);  // the mapping stays valid without the descriptor
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    throw InputError("token file " + path + " cannot be mapped: " + std::strerror(errno));
  }
  map_bytes_ = bytes;
  const auto* header = static_cast<const int32_t*>(map_);
  if (header[0] != kTokenFileMagic || header[1] != kTokenFileVersion) {
    const std::string msg =
        strprintf("token file %s has a bad header (magic %d version %d; expected %d and %d)", path.c_str(),
                  header[0], header[1], kTokenFileMagic, kTokenFileVersion);
    munmap(map_, map_bytes_);
    map_ = nullptr;
    throw InputError(msg);
  }
  // The header's count is an int32 of llm.c's format; sizes beyond it are computed in 64 bits.
  const uint64_t count = static_cast<uint32_t>(header[2]);
  const uint64_t expected = kTokenHeaderInts * sizeof(int32_t) + count * sizeof(uint16_t);
  if (bytes != expected) {
    munmap(map_, map_bytes_);
    map_ = nullptr;
    throw InputError(
        strprintf("token file %s: header says %llu tokens (%llu bytes) but the file has %llu bytes",
                  path.c_str(), static_cast<unsigned long long>(count),
                  static_cast<unsigned long long>(expected), static_cast<unsigned long long>(bytes)));
  }
  tokens_ = reinterpret_cast<const uint16_t*>(header + kTokenHeaderInts);
  count_ = count;
  // One sequential pass for the largest id, so that an id outside a model's vocabulary is found now, not
  // when a batch happens to draw it; then batches jump around the file, without read-ahead.
  madvise(map_, map_bytes_, MADV_SEQUENTIAL);
  uint16_t largest = 0;
  for (std::size_t i = 0; i < count_; ++i) largest = std::max(largest, tokens_[i]);
  max_token_ = count_ > 0 ? largest : -1;
  madvise(map_, map_bytes_, MADV_RANDOM);
}

void TokenFile::check_vocab(int vocab_size) const {
  if (max_token_ >= vocab_size)
    throw InputError(strprintf("token file %s holds token id %d, outside the model's vocabulary of %d",
                               path_.c_str(), max_token_, vocab_size));
}

TokenFile::~TokenFile() {
  if (map_ != nullptr) munmap(map_, map_bytes_);
}

ShardIndex::ShardIndex(const std::vector<uint64_t>& sizes) : starts_{0} {
  for (uint64_t n : sizes) starts_.push_back(starts_.back() + n);
}

std::pair<std::size_t, uint64_t> ShardIndex::locate(uint64_t position) const {
  // The last shard starting at or before the position: empty shards share their start with the next one,
  // and upper_bound passes over them.
  const auto after = std::upper_bound(starts_.begin(), starts_.end() - 1, position);
  const std::size_t k = static_cast<std::size_t>(after - starts_.begin()) - 1;
  return {k, position - starts_[k]};
}

std::vector<std::string> token_file_paths(const std::string& spec) {
  std::vector<std::string> paths;
  std::size_t begin = 0;
  while (true) {
    const std::size_t comma = spec.find(',', begin);
    const std::string entry = spec.substr(begin, comma == std::string::npos ? comma : comma - begin);
    if (entry.empty()) throw InputError("token files '" + spec + "': an empty entry in the comma list");
    if (entry.find_first_of("*?[") == std::string::npos) {
      paths.push_back(entry);
    } else {
      // glob's own sorting follows the locale's collation; sorting the bytes makes the order the same
      // everywhere (docs/design.md, Determinism).
      glob_t found{};
      const int rc = glob(entry.c_str(), GLOB_NOSORT, nullptr, &found);
      std::vector<std::string> matches;
      if (rc == 0) matches.assign(found.gl_pathv, found.gl_pathv + found.gl_pathc);
      globfree(&found);
      if (rc == GLOB_NOMATCH || (rc == 0 && matches.empty()))
        throw InputError("token files " + entry + ": the pattern matches no file");
      if (rc != 0)
        throw InputError("token files " + entry + ": the pattern cannot be expanded (a read error)");
      std::sort(matches.begin(), matches.end());
      paths.insert(paths.end(), matches.begin(), matches.end());
    }
    if (comma == std::string::npos) return paths;
    begin = comma + 1;
  }
}

namespace {

std::vector<std::unique_ptr<TokenFile>> open_shards(const std::string& spec) {
  std::vector<std::unique_ptr<TokenFile>> shards;
  for (const std::string& path : token_file_paths(spec)) shards.push_back(std::make_unique<TokenFile>(path));
  return shards;
}

std::vector<uint64_t> shard_sizes(const std::vector<std::unique_ptr<TokenFile>>& shards) {
  std::vector<uint64_t> sizes;
  for (const auto& shard : shards) sizes.push_back(shard->size());
  return sizes;
}

}  // namespace

TokenStream::TokenStream(const std::string& spec)
    : spec_(spec), shards_(open_shards(spec)), index_(shard_sizes(shards_)) {}

void TokenStream::read(uint64_t first, std::size_t count, uint16_t* out) const {
  auto [k, offset] = index_.locate(first);
  while (count > 0) {
    const TokenFile& shard = *shards_[k];
    const std::size_t n = static_cast<std::size_t>(std::min<uint64_t>(count, shard.size() - offset));
    std::copy(shard.data() + offset, shard.data() + offset + n, out);
    out += n;
    count -= n;
    ++k;
    offset = 0;
  }
}

void TokenStream::check_vocab(int vocab_size) const {
  for (const auto& shard : shards_) shard->check_vocab(vocab_size);
}

std::string TokenStream::summary() const {
  const auto tokens = static_cast<unsigned long long>(size());
  return shards_.size() == 1 ? strprintf("%llu tokens", tokens)
                             : strprintf("%llu tokens in %zu shards", tokens, shards_.size());
}

uint64_t permute_index(uint64_t i, uint64_t n, uint64_t key) {
  constexpr int kRounds = 6;
  int bits = 2;
  while (bits < 64 && (uint64_t{1} << bits) < n) bits += 2;
  const int half = bits / 2;
  const uint64_t mask = (uint64_t{1} << half) - 1;
  uint64_t x = i;
  do {
    uint64_t left = x >> half, right = x & mask;
    for (int round = 0; round < kRounds; ++round) {
      // right < 2^32, so each (round, right) pair draws its own value.
      const uint64_t next = left ^ (splitmix64_at(key, (static_cast<uint64_t>(round) << 32) | right) & mask);
      left = right;
      right = next;
    }
    x = (left << half) | right;
  } while (x >= n);
  return x;
}

uint64_t EpochOrder::at(uint64_t position) {
  if (!shuffle_) return position % n_;
  const uint64_t epoch = position / n_;
  if (epoch != epoch_) {
    epoch_seed_ = derive_seed(seed_, "epoch " + std::to_string(epoch));
    if (n_ <= kShuffleTableMax) {
      // Fisher-Yates with our own generator.
      order_.resize(n_);
      std::iota(order_.begin(), order_.end(), 0u);
      Rng rng(epoch_seed_);
      for (uint64_t i = n_ - 1; i > 0; --i) std::swap(order_[i], order_[rng.below(i + 1)]);
    }
    epoch_ = epoch;
  }
  return n_ <= kShuffleTableMax ? order_[position % n_] : permute_index(position % n_, n_, epoch_seed_);
}

Batcher::Batcher(const TokenStream& stream, int seq_len, bool shuffle, uint64_t seed)
    : stream_(stream),
      seq_len_(seq_len),
      num_sequences_(stream.size() > 0 ? (stream.size() - 1) / seq_len : 0),
      order_(num_sequences_, shuffle, seed),
      row_(static_cast<std::size_t>(seq_len) + 1) {
  if (num_sequences_ == 0)
    throw InputError(strprintf("token files %s have %llu tokens: fewer than one sequence of seq_len %d + 1",
                               stream.spec().c_str(), static_cast<unsigned long long>(stream.size()),
                               seq_len));
}

void Batcher::fill(uint64_t first, int count, Batch& out) {
  out.resize(count, seq_len_);
  int32_t* tokens = out.tokens.data();
  int32_t* targets = out.targets.data();
  for (int s = 0; s < count; ++s) {
    stream_.read(order_.at(first + s) * static_cast<uint64_t>(seq_len_), row_.size(), row_.data());
    for (int t = 0; t < seq_len_; ++t) {
      tokens[s * seq_len_ + t] = row_[t];
      targets[s * seq_len_ + t] = row_[t + 1];
    }
  }
}

}  // namespace lrllm

#include "lrllm/io/data.h"

#include <fcntl.h>
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

std::size_t EpochOrder::at(uint64_t position) {
  if (!shuffle_) return position % n_;
  const uint64_t epoch = position / n_;
  if (epoch != epoch_) {
    // Fisher-Yates with our own generator.
    order_.resize(n_);
    std::iota(order_.begin(), order_.end(), 0u);
    Rng rng(derive_seed(seed_, "epoch " + std::to_string(epoch)));
    for (std::size_t i = n_ - 1; i > 0; --i) std::swap(order_[i], order_[rng.below(i + 1)]);
    epoch_ = epoch;
  }
  return order_[position % n_];
}

Batcher::Batcher(const TokenFile& file, int seq_len, bool shuffle, uint64_t seed)
    : file_(file),
      seq_len_(seq_len),
      num_sequences_(file.size() > 0 ? (file.size() - 1) / seq_len : 0),
      order_(num_sequences_, shuffle, seed) {
  if (num_sequences_ == 0)
    throw InputError(strprintf("token file %s has %zu tokens: fewer than one sequence of seq_len %d + 1",
                               file.path().c_str(), file.size(), seq_len));
}

void Batcher::fill(uint64_t first, int count, Batch& out) {
  out.resize(count, seq_len_);
  int32_t* tokens = out.tokens.data();
  int32_t* targets = out.targets.data();
  for (int s = 0; s < count; ++s) {
    const uint16_t* src = file_.data() + order_.at(first + s) * seq_len_;
    for (int t = 0; t < seq_len_; ++t) {
      tokens[s * seq_len_ + t] = src[t];
      targets[s * seq_len_ + t] = src[t + 1];
    }
  }
}

}  // namespace lrllm

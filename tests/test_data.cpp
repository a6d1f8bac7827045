// Token files (llm.c's format) and streams of shards, the batcher's sequences and epochs, and the metrics
// file.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "lrllm/io/data.h"
#include "lrllm/io/hdf5.h"
#include "lrllm/io/metrics.h"
#include "test_util.h"

namespace lrllm {
namespace {

using test::expect_input_error;
using test::TempDir;

// Writes a token file whose header may lie about its magic or count.
void write_tokens(const std::string& path, const std::vector<uint16_t>& tokens,
                  int32_t magic = kTokenFileMagic, int64_t header_count = -1) {
  int32_t header[kTokenHeaderInts] = {};
  header[0] = magic;
  header[1] = kTokenFileVersion;
  header[2] = static_cast<int32_t>(header_count >= 0 ? header_count : static_cast<int64_t>(tokens.size()));
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(header), sizeof header);
  out.write(reinterpret_cast<const char*>(tokens.data()), static_cast<std::streamsize>(tokens.size() * 2));
}

// 0, 1, 2, ...: a sequence's first token tells where it starts.
std::vector<uint16_t> counting(std::size_t n) {
  std::vector<uint16_t> t(n);
  for (std::size_t i = 0; i < n; ++i) t[i] = static_cast<uint16_t>(i);
  return t;
}

TEST(TokenFile, ReadsAGoodFile) {
  TempDir dir;
  const std::string path = dir.file("good.bin");
  std::vector<uint16_t> tokens(1000);
  for (std::size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<uint16_t>((i * 7919) % 65536);
  write_tokens(path, tokens);
  const TokenFile f(path);
  EXPECT_EQ(f.path(), path);
  ASSERT_EQ(f.size(), tokens.size());
  EXPECT_TRUE(std::equal(tokens.begin(), tokens.end(), f.data()));
}

TEST(TokenFile, BadFilesAreInputErrorsNamingTheFile) {
  TempDir dir;
  const std::vector<uint16_t> tokens = counting(100);
  expect_input_error([&] { TokenFile f(dir.file("missing.bin")); }, dir.file("missing.bin"));

  const std::string magic = dir.file("magic.bin");
  write_tokens(magic, tokens, 12345);
  expect_input_error([&] { TokenFile f(magic); }, magic);

  const std::string more = dir.file("header_more.bin");
  write_tokens(more, tokens, kTokenFileMagic, 101);
  expect_input_error([&] { TokenFile f(more); }, more);

  const std::string fewer = dir.file("header_fewer.bin");
  write_tokens(fewer, tokens, kTokenFileMagic, 99);
  expect_input_error([&] { TokenFile f(fewer); }, fewer);

  const std::string short_header = dir.file("short.bin");
  std::ofstream(short_header, std::ios::binary) << std::string(100, '\1');
  expect_input_error([&] { TokenFile f(short_header); }, short_header);
}

TEST(Batcher, SequencesAndShiftedTargetsWrapAround) {
  TempDir dir;
  constexpr int T = 4;
  const std::string path = dir.file("tokens.bin");
  write_tokens(path, counting(10 * T + 3));  // 10 whole sequences of T + 1 tokens, 2 tokens left over
  const TokenStream f(path);
  Batcher batcher(f, T, false, 1);
  ASSERT_EQ(batcher.num_sequences(), 10u);

  Batch batch;
  batcher.fill(2, 3, batch);
  EXPECT_EQ(batch.rows, 3);
  EXPECT_EQ(batch.T, T);
  EXPECT_EQ(batch.real_tokens, 3 * T);
  EXPECT_TRUE(batch.positions.empty());
  const std::vector<int32_t>& tokens = batch.tokens;
  const std::vector<int32_t>& targets = batch.targets;
  for (int s = 0; s < 3; ++s) {
    for (int t = 0; t < T; ++t) {
      EXPECT_EQ(tokens[s * T + t], (2 + s) * T + t);
      EXPECT_EQ(targets[s * T + t], (2 + s) * T + t + 1);
    }
  }
  // Positions run on across epochs: 9, 10, 11 are sequences 9, 0, 1.
  batcher.fill(9, 3, batch);
  EXPECT_EQ(tokens[0], 9 * T);
  EXPECT_EQ(targets[T - 1], 10 * T);
  EXPECT_EQ(tokens[T], 0);
  EXPECT_EQ(tokens[2 * T], T);

  const std::string tiny = dir.file("tiny.bin");
  write_tokens(tiny, counting(T));  // T tokens: no room for the shifted target
  const TokenStream tf(tiny);
  expect_input_error([&] { Batcher b(tf, T, false, 1); }, tiny);
}

// Sequence start positions of one epoch, in the order the batcher visits them.
std::vector<int32_t> epoch_order(Batcher& b, uint64_t epoch, int T) {
  const int n = static_cast<int>(b.num_sequences());
  std::vector<int32_t> starts(n);
  Batch batch;
  b.fill(epoch * n, n, batch);
  const std::vector<int32_t>& tokens = batch.tokens;
  const std::vector<int32_t>& targets = batch.targets;
  for (int s = 0; s < n; ++s) {
    starts[s] = tokens[s * T] / T;
    for (int t = 0; t < T; ++t) {
      EXPECT_EQ(tokens[s * T + t], starts[s] * T + t);
      EXPECT_EQ(targets[s * T + t], starts[s] * T + t + 1);
    }
  }
  return starts;
}

TEST(Batcher, ShuffleIsAPermutationPerEpochAndDeterministic) {
  TempDir dir;
  constexpr int T = 3;
  const std::string path = dir.file("tokens.bin");
  write_tokens(path, counting(20 * T + 1));
  const TokenStream f(path);
  Batcher a(f, T, true, 42), b(f, T, true, 42), c(f, T, true, 43);
  std::vector<int32_t> identity(20);
  for (int i = 0; i < 20; ++i) identity[i] = i;

  const std::vector<int32_t> e0 = epoch_order(a, 0, T), e1 = epoch_order(a, 1, T);
  for (const auto& order : {e0, e1}) {
    std::vector<int32_t> sorted = order;
    std::sort(sorted.begin(), sorted.end());
    EXPECT_EQ(sorted, identity) << "every sequence exactly once per epoch";
  }
  EXPECT_NE(e0, identity) << "shuffled";
  EXPECT_NE(e0, e1) << "each epoch has its own order";
  EXPECT_EQ(epoch_order(a, 0, T), e0) << "going back to an epoch (a resume) gives its order again";
  EXPECT_EQ(epoch_order(b, 1, T), e1) << "same seed, same order";
  EXPECT_EQ(epoch_order(b, 0, T), e0);
  EXPECT_NE(epoch_order(c, 0, T), e0) << "another seed, another order";
}

// Writes `sizes` shards named NAME_0.bin, NAME_1.bin, ... that cut counting(total) in that order.
std::vector<std::string> write_shards(const TempDir& dir, const std::string& name,
                                      const std::vector<std::size_t>& sizes) {
  std::vector<std::string> paths;
  uint16_t next = 0;
  for (std::size_t k = 0; k < sizes.size(); ++k) {
    std::vector<uint16_t> tokens(sizes[k]);
    for (uint16_t& t : tokens) t = next++;
    paths.push_back(dir.file(name + "_" + std::to_string(k) + ".bin"));
    write_tokens(paths.back(), tokens);
  }
  return paths;
}

std::vector<int32_t> rows(Batcher& b, uint64_t first, int count) {
  Batch batch;
  b.fill(first, count, batch);
  std::vector<int32_t> out = batch.tokens;
  out.insert(out.end(), batch.targets.begin(), batch.targets.end());
  return out;
}

TEST(TokenStream, AGlobIsSortedByNameAndAListKeepsItsOrder) {
  TempDir dir;
  // Written out of order: the glob's order is the names', not the directory's.
  for (const char* name : {"s_2.bin", "s_0.bin", "s_10.bin", "s_1.bin"})
    write_tokens(dir.file(name), std::vector<uint16_t>(5, static_cast<uint16_t>(std::string(name).size())));
  EXPECT_EQ(token_file_paths(dir.file("s_*.bin")),
            (std::vector<std::string>{dir.file("s_0.bin"), dir.file("s_1.bin"), dir.file("s_10.bin"),
                                      dir.file("s_2.bin")}));
  const std::string list = dir.file("s_2.bin") + "," + dir.file("s_0.bin") + "," + dir.file("s_1*.bin");
  EXPECT_EQ(token_file_paths(list), (std::vector<std::string>{dir.file("s_2.bin"), dir.file("s_0.bin"),
                                                              dir.file("s_1.bin"), dir.file("s_10.bin")}));
  const std::vector<std::string> paths = write_shards(dir, "c", {3, 4});
  const TokenStream reversed(paths[1] + "," + paths[0]);
  ASSERT_EQ(reversed.size(), 7u);
  std::vector<uint16_t> got(7);
  reversed.read(0, 7, got.data());
  EXPECT_EQ(got, (std::vector<uint16_t>{3, 4, 5, 6, 0, 1, 2}));
  EXPECT_EQ(reversed.summary(), "7 tokens in 2 shards");
}

TEST(TokenStream, SequencesAcrossShardBoundariesEqualTheConcatenation) {
  TempDir dir;
  constexpr int T = 4;
  // Boundaries at tokens 10, 10 (an empty shard), 17 and 40, none a multiple of T.
  const std::vector<std::string> paths = write_shards(dir, "shard", {10, 0, 7, 23, 6});
  const std::string whole = dir.file("whole.bin");
  write_tokens(whole, counting(46));
  const TokenStream shards(dir.file("shard_*.bin")), one(whole);
  ASSERT_EQ(shards.num_shards(), 5u);
  ASSERT_EQ(shards.size(), 46u);
  for (const bool shuffle : {false, true}) {
    Batcher a(shards, T, shuffle, 7), b(one, T, shuffle, 7);
    ASSERT_EQ(a.num_sequences(), 11u);
    EXPECT_EQ(rows(a, 0, 33), rows(b, 0, 33)) << "three epochs, shuffle " << shuffle;
  }
  // Sequence 2 is tokens 8 .. 12: two from the first shard, then the third's first three.
  Batcher a(shards, T, false, 7);
  Batch batch;
  a.fill(2, 1, batch);
  EXPECT_EQ(batch.tokens, (std::vector<int32_t>{8, 9, 10, 11}));
  EXPECT_EQ(batch.targets, (std::vector<int32_t>{9, 10, 11, 12}));
}

TEST(TokenStream, ACursorResumesExactlyAcrossABoundary) {
  TempDir dir;
  constexpr int T = 3;
  const std::vector<std::string> paths = write_shards(dir, "shard", {20, 11, 31});  // 20 sequences
  const std::string list = paths[0] + "," + paths[1] + "," + paths[2];
  for (const bool shuffle : {false, true}) {
    const TokenStream stream(list);
    Batcher uninterrupted(stream, T, shuffle, 3);
    Batch all;
    uninterrupted.fill(0, 40, all);
    // A resumed run builds its stream and batcher again and starts at the cursor: sequence 6 (tokens 18 ..
    // 21) spans the first boundary, 10 the second, and 25 is in the second epoch.
    for (const int cursor : {6, 7, 10, 25}) {
      const TokenStream again(list);
      Batcher resumed(again, T, shuffle, 3);
      Batch rest;
      resumed.fill(cursor, 40 - cursor, rest);
      EXPECT_TRUE(std::equal(rest.tokens.begin(), rest.tokens.end(), all.tokens.begin() + cursor * T))
          << "cursor " << cursor << " shuffle " << shuffle;
      EXPECT_TRUE(std::equal(rest.targets.begin(), rest.targets.end(), all.targets.begin() + cursor * T))
          << "cursor " << cursor << " shuffle " << shuffle;
    }
  }
}

TEST(TokenStream, OffsetsAreSixtyFourBit) {
  // Shards of 3e9 tokens: the stream's positions pass 2^32.
  const uint64_t big = 3'000'000'000ULL;
  const ShardIndex index({big, 0, big, 5});
  EXPECT_EQ(index.total(), 2 * big + 5);
  EXPECT_EQ(index.start(3), 2 * big);
  EXPECT_EQ(index.locate(0), (std::pair<std::size_t, uint64_t>{0, 0}));
  EXPECT_EQ(index.locate(big - 1), (std::pair<std::size_t, uint64_t>{0, big - 1}));
  EXPECT_EQ(index.locate(big), (std::pair<std::size_t, uint64_t>{2, 0}));
  EXPECT_EQ(index.locate(big + 2'000'000'000ULL), (std::pair<std::size_t, uint64_t>{2, 2'000'000'000ULL}));
  EXPECT_EQ(index.locate(2 * big + 4), (std::pair<std::size_t, uint64_t>{3, 4}));

  // More sequences than 32 bits count: in order, and shuffled without a table.
  const uint64_t n = kShuffleTableMax + 7;
  EpochOrder in_order(n, false, 1);
  EXPECT_EQ(in_order.at(n - 1), n - 1);
  EXPECT_EQ(in_order.at(n + 5), 5u);
  EpochOrder a(n, true, 1), b(n, true, 1), other(n, true, 2);
  std::vector<uint64_t> first;
  for (uint64_t p = 0; p < 2000; ++p)
    first.push_back(a.at(n - 1000 + p));  // the end of epoch 0, then epoch 1
  std::vector<uint64_t> seen = first;
  std::sort(seen.begin(), seen.end());
  EXPECT_EQ(std::adjacent_find(seen.begin(), seen.begin() + 1000), seen.begin() + 1000) << "no repeats";
  EXPECT_GE(seen.back(), kShuffleTableMax / 2) << "values beyond 32 bits";
  EXPECT_LT(*std::max_element(first.begin(), first.end()), n);
  std::size_t same_as_other = 0;
  for (uint64_t p = 0; p < 2000; ++p) {
    EXPECT_EQ(b.at(n - 1000 + p), first[p]) << "the same seed, the same order";
    same_as_other += other.at(n - 1000 + p) == first[p];
  }
  EXPECT_LT(same_as_other, 10u) << "another seed, another order";
  EXPECT_EQ(a.at(n - 1000), first[0]) << "going back an epoch (a resume) gives its order again";
}

TEST(TokenStream, PermuteIndexIsABijection) {
  for (const uint64_t n : {1u, 2u, 3u, 5u, 64u, 1000u, 4097u}) {
    for (const uint64_t key : {1u, 99u}) {
      std::vector<uint64_t> image(n);
      for (uint64_t i = 0; i < n; ++i) image[i] = permute_index(i, n, key);
      std::vector<uint64_t> sorted = image;
      std::sort(sorted.begin(), sorted.end());
      for (uint64_t i = 0; i < n; ++i) ASSERT_EQ(sorted[i], i) << "n " << n << " key " << key;
      if (n >= 64) {
        std::size_t fixed = 0;
        for (uint64_t i = 0; i < n; ++i) fixed += image[i] == i;
        EXPECT_LT(fixed, n / 8) << "shuffled, n " << n;
      }
    }
  }
}

TEST(TokenStream, ABadShardIsOneInputErrorNamingIt) {
  TempDir dir;
  const std::vector<std::string> paths = write_shards(dir, "shard", {10, 10, 10});
  const std::string glob = dir.file("shard_*.bin");
  EXPECT_NO_THROW(TokenStream s(glob));
  expect_input_error([&] { TokenStream s(paths[0] + "," + dir.file("gone.bin")); }, dir.file("gone.bin"));
  write_tokens(paths[1], counting(10), kTokenFileMagic, 12);  // header says 12 tokens, the file holds 10
  expect_input_error([&] { TokenStream s(glob); }, paths[1] + ": header says 12 tokens");
  write_tokens(paths[1], counting(10), 777);
  expect_input_error([&] { TokenStream s(glob); }, paths[1] + " has a bad header");
  write_tokens(paths[1], counting(10));
  std::vector<uint16_t> high = counting(10);
  high[3] = 900;
  write_tokens(paths[2], high);
  const TokenStream s(glob);
  expect_input_error([&] { s.check_vocab(512); }, paths[2] + " holds token id 900");
  expect_input_error([&] { TokenStream e(dir.file("none_*.bin")); },
                     dir.file("none_*.bin") + ": the pattern matches no file");
  expect_input_error([&] { TokenStream e(paths[0] + ",," + paths[1]); }, "an empty entry");
}

// A float64 dataset read as doubles (H5File::read converts to float32, which would hide the file's type).
std::vector<double> read_doubles(const H5File& f, const std::string& dataset) {
  const std::vector<int64_t> shape = f.shape(dataset);
  EXPECT_EQ(shape.size(), 1u);
  std::vector<double> v(shape.empty() ? 0 : shape[0]);
  const hid_t d = H5Dopen2(f.id(), dataset.c_str(), H5P_DEFAULT);
  EXPECT_GE(d, 0);
  EXPECT_GE(H5Dread(d, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()), 0);
  H5Dclose(d);
  return v;
}

// Element-wise equality where NaN equals NaN.
void expect_series(const std::vector<double>& got, const std::vector<double>& want, const std::string& name) {
  ASSERT_EQ(got.size(), want.size()) << name;
  for (std::size_t i = 0; i < want.size(); ++i) {
    if (std::isnan(want[i])) {
      EXPECT_TRUE(std::isnan(got[i])) << name << " row " << i << " is " << got[i] << ", not NaN";
    } else {
      EXPECT_EQ(got[i], want[i]) << name << " row " << i;
    }
  }
}

TEST(Metrics, AppendFlushAndResumeTruncation) {
  TempDir dir;
  const std::string path = dir.file("metrics.h5");
  const double nan = std::nan("");
  {
    Metrics m(path, 0);
    m.append({{"step", 1}, {"loss", 2.5}, {"lr", 0.1}});
    m.append({{"step", 2}, {"loss", 2.25}, {"lr", 0.2}, {"val_loss", 3.0}});
    m.flush();
    // A metric first seen in a later flush gets NaN for the earlier rows.
    m.append({{"step", 3}, {"loss", 2.125}, {"tokens_per_s", 1e6}});
    m.flush();
  }
  {
    const H5File f = H5File::open_read(path);
    EXPECT_EQ(f.children("/metrics"),
              (std::vector<std::string>{"loss", "lr", "step", "tokens_per_s", "val_loss"}));
    EXPECT_EQ(f.dtype_name("/metrics/loss"), "float64");
    expect_series(read_doubles(f, "/metrics/step"), {1, 2, 3}, "step");
    expect_series(read_doubles(f, "/metrics/loss"), {2.5, 2.25, 2.125}, "loss");
    expect_series(read_doubles(f, "/metrics/lr"), {0.1, 0.2, nan}, "lr");
    expect_series(read_doubles(f, "/metrics/val_loss"), {nan, 3.0, nan}, "val_loss");
    expect_series(read_doubles(f, "/metrics/tokens_per_s"), {nan, nan, 1e6}, "tokens_per_s");
  }
  {
    // Resuming from the checkpoint of step 2 drops the later rows, then the run writes its own step 3.
    Metrics m(path, 2);
    {
      const H5File f = H5File::open_read(path);
      for (const std::string& name : f.children("/metrics"))
        EXPECT_EQ(f.shape("/metrics/" + name), std::vector<int64_t>{2}) << name;
    }
    m.append({{"step", 3}, {"loss", 1.5}, {"lr", 0.3}});
    m.flush();
  }
  const H5File f = H5File::open_read(path);
  expect_series(read_doubles(f, "/metrics/step"), {1, 2, 3}, "step");
  expect_series(read_doubles(f, "/metrics/loss"), {2.5, 2.25, 1.5}, "loss");
  expect_series(read_doubles(f, "/metrics/lr"), {0.1, 0.2, 0.3}, "lr");
  expect_series(read_doubles(f, "/metrics/val_loss"), {nan, 3.0, nan}, "val_loss");
  expect_series(read_doubles(f, "/metrics/tokens_per_s"), {nan, nan, nan}, "tokens_per_s");
}

TEST(TokenFile, IdsOutsideTheVocabularyAreFoundWhenOpened) {
  TempDir dir;
  const std::string path = dir.file("ids.bin");
  std::vector<uint16_t> tokens = counting(100);
  tokens[57] = 600;
  write_tokens(path, tokens);
  const TokenFile f(path);
  EXPECT_EQ(f.max_token(), 600);
  EXPECT_NO_THROW(f.check_vocab(601));
  expect_input_error([&] { f.check_vocab(512); }, "token id 600");
}

// A metrics file whose step series is 2-D, as h5py can make one: reading it as a series would overflow.
TEST(Metrics, DamagedFileIsReportedWithAWayOn) {
  TempDir dir;
  const std::string path = dir.file("metrics.h5");
  {
    Metrics m(path, 0);
    m.append({{"step", 1}, {"loss", 2.5}});
    m.flush();
  }
  EXPECT_NO_THROW(check_metrics_file(path));
  EXPECT_NO_THROW(check_metrics_file(dir.file("none.h5")));  // a run without one starts a new one
  {
    H5File f = H5File::open_write(path);
    ASSERT_GE(H5Ldelete(f.id(), "/metrics/step", H5P_DEFAULT), 0);
    const float grid[6] = {1, 2, 3, 4, 5, 6};
    f.write("/metrics/step", grid, {2, 3});
  }
  expect_input_error([&] { check_metrics_file(path); }, "move " + path + " aside");
  EXPECT_THROW(Metrics(path, 1), RuntimeError);
  expect_input_error([&] { check_metrics_file(dir.path().string()); }, "not a regular file");
}

}  // namespace
}  // namespace lrllm

// The pieces of the parallel layout that need no MPI: how tensors split into tensor-parallel parts, how
// blocks split into stages, and how ZeRO shards a flat buffer.
#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "lrllm/model/params.h"
#include "lrllm/parallel/layout.h"
#include "lrllm/parallel/topology.h"

namespace lrllm {
namespace {

TEST(TensorSplit, FusedQkvPartHoldsTheSameHeadsOfQKAndV) {
  // Full [6, 2]: rows q0 q1 k0 k1 v0 v1; part 1 of 2 in 3 groups takes q1, k1, v1.
  ParamTable table;
  table.add("qkv/W", {3, 2}, TensorRole::weight, TensorSplit{0, {2, 2, 2}, 1, 2, false});
  const TensorInfo& t = table.tensors()[0];
  EXPECT_EQ(t.full_shape, (std::vector<int64_t>{6, 2}));
  std::vector<float> full(12);
  std::iota(full.begin(), full.end(), 0.0f);
  std::vector<float> part(6);
  extract_part(t, full.data(), part.data());
  EXPECT_EQ(part, (std::vector<float>{2, 3, 6, 7, 10, 11}));
  std::vector<float> back(12, -1.0f);
  insert_part(t, part.data(), back.data());
  EXPECT_EQ(back, (std::vector<float>{-1, -1, 2, 3, -1, -1, 6, 7, -1, -1, 10, 11}));
}

TEST(TensorSplit, GroupedQueryQkvPartHoldsItsQueryHeadsAndTheirKeyValueHead) {
  // Full [8, 1]: rows q0 q1 q2 q3 k0 k1 v0 v1 (4 query heads sharing 2 key/value heads, head size 1); part 1
  // of 2 takes q2 q3, k1, v1: the query heads that read its key/value head.
  ParamTable table;
  table.add("qkv/W", {4, 1}, TensorRole::weight, TensorSplit{0, {4, 2, 2}, 1, 2, false});
  const TensorInfo& t = table.tensors()[0];
  EXPECT_EQ(t.full_shape, (std::vector<int64_t>{8, 1}));
  std::vector<float> full(8);
  std::iota(full.begin(), full.end(), 0.0f);
  std::vector<float> part(4);
  extract_part(t, full.data(), part.data());
  EXPECT_EQ(part, (std::vector<float>{2, 3, 5, 7}));
  std::vector<float> back(8, -1.0f);
  insert_part(t, part.data(), back.data());
  EXPECT_EQ(back, (std::vector<float>{-1, -1, 2, 3, -1, 5, -1, 7}));
}

TEST(TensorSplit, RowParallelPartHoldsColumns) {
  ParamTable table;
  table.add("proj/W", {2, 2}, TensorRole::weight, TensorSplit{1, {}, 0, 2, false});
  const TensorInfo& t = table.tensors()[0];
  EXPECT_EQ(t.full_shape, (std::vector<int64_t>{2, 4}));
  const std::vector<float> full = {0, 1, 2, 3, 4, 5, 6, 7};
  std::vector<float> part(4);
  extract_part(t, full.data(), part.data());
  EXPECT_EQ(part, (std::vector<float>{0, 1, 4, 5}));
}

TEST(TensorSplit, PartsReassembleTheFullTensor) {
  const int parts = 4;
  std::vector<float> full(8 * 3 * 5);
  std::iota(full.begin(), full.end(), 0.0f);
  std::vector<float> rebuilt(full.size(), 0.0f);
  for (int p = 0; p < parts; ++p) {
    ParamTable table;
    table.add("x", {8 * 3 / parts, 5}, TensorRole::weight, TensorSplit{0, {8, 8, 8}, p, parts, false});
    const TensorInfo& t = table.tensors()[0];
    std::vector<float> part(t.size);
    extract_part(t, full.data(), part.data());
    insert_part(t, part.data(), rebuilt.data());
  }
  EXPECT_EQ(rebuilt, full);
}

ModelConfig gpt2_shape(int n_layer, int d_model, int vocab_size, int rank = 0) {
  ModelConfig m;
  m.n_layer = n_layer;
  m.n_head = 4;
  m.d_model = d_model;
  m.seq_len = 1024;
  m.vocab_size = vocab_size;
  for (int& r : m.lowrank_rank) r = rank;
  return m;
}

std::vector<std::pair<int, int>> stages(const ModelConfig& m, int pp) {
  std::vector<std::pair<int, int>> out;
  for (int s = 0; s < pp; ++s) out.push_back(stage_layers(m, pp, s));
  return out;
}

TEST(Topology, StagesWithoutAHeadSplitBlocksEvenlyEarlierStagesFirst) {
  using S = std::vector<std::pair<int, int>>;
  EXPECT_EQ(stages(gpt2_shape(4, 64, 1), 3), (S{{0, 2}, {2, 3}, {3, 4}}));
  EXPECT_EQ(stages(gpt2_shape(12, 64, 1), 4), (S{{0, 3}, {3, 6}, {6, 9}, {9, 12}}));
  EXPECT_EQ(stages(gpt2_shape(5, 64, 1), 5), (S{{0, 1}, {1, 2}, {2, 3}, {3, 4}, {4, 5}}));
}

TEST(Topology, StagesBalanceTheLmHead) {
  using S = std::vector<std::pair<int, int>>;
  // GPT-2 124M: a block is 6 (12 C^2 + T C) = 47.2 MFLOP a token, the lm_head 6 V C = 231.6 (4.9 blocks):
  // 8 blocks against 4 + the head (8 and 8.9 blocks' worth) beats 9 against 3 (9 and 7.9).
  EXPECT_EQ(stages(gpt2_shape(12, 768, 50257), 2), (S{{0, 8}, {8, 12}}));
  // Low-rank blocks are cheaper, so the head weighs more: 2.64x smaller linear layers (rank 218) give
  // blocks of 20.8 MFLOP, the head 11.1 blocks; the last stage keeps its one block.
  EXPECT_EQ(stages(gpt2_shape(12, 768, 50257, 218), 2), (S{{0, 11}, {11, 12}}));
  // Every stage keeps a block, however heavy the head.
  EXPECT_EQ(stages(gpt2_shape(4, 64, 50257), 4), (S{{0, 1}, {1, 2}, {2, 3}, {3, 4}}));
}

TEST(Topology, ShardBoundsCoverTheBufferAligned) {
  const std::vector<std::size_t> b = Topology::shard_bounds(1000, 3);
  ASSERT_EQ(b.size(), 4u);
  EXPECT_EQ(b.front(), 0u);
  EXPECT_EQ(b.back(), 1000u);
  for (std::size_t d = 1; d + 1 < b.size(); ++d) EXPECT_EQ(b[d] % 16, 0u);
  EXPECT_EQ(Topology::shard_bounds(5, 4), (std::vector<std::size_t>{0, 5, 5, 5, 5}));
}

}  // namespace
}  // namespace lrllm

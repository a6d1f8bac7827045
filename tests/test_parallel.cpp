// The pieces of the parallel layout that need no MPI: how tensors split into tensor-parallel parts, how
// blocks split into stages, and how ZeRO shards a flat buffer.
#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "lrllm/params.h"
#include "lrllm/topology.h"

namespace lrllm {
namespace {

TEST(TensorSplit, FusedQkvPartHoldsTheSameHeadsOfQKAndV) {
  // Full [6, 2]: rows q0 q1 k0 k1 v0 v1; part 1 of 2 in 3 groups takes q1, k1, v1.
  ParamTable table;
  table.add("qkv/W", {3, 2}, TensorSplit{0, 3, 1, 2, false});
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

TEST(TensorSplit, RowParallelPartHoldsColumns) {
  ParamTable table;
  table.add("proj/W", {2, 2}, TensorSplit{1, 1, 0, 2, false});
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
    table.add("x", {8 * 3 / parts, 5}, TensorSplit{0, 3, p, parts, false});
    const TensorInfo& t = table.tensors()[0];
    std::vector<float> part(t.size);
    extract_part(t, full.data(), part.data());
    insert_part(t, part.data(), rebuilt.data());
  }
  EXPECT_EQ(rebuilt, full);
}

TEST(Topology, StagesSplitBlocksEvenlyEarlierStagesFirst) {
  EXPECT_EQ(Topology::stage_layers(4, 3, 0), (std::pair{0, 2}));
  EXPECT_EQ(Topology::stage_layers(4, 3, 1), (std::pair{2, 3}));
  EXPECT_EQ(Topology::stage_layers(4, 3, 2), (std::pair{3, 4}));
  EXPECT_EQ(Topology::stage_layers(12, 4, 3), (std::pair{9, 12}));
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

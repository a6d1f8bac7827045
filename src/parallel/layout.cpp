#include "lrllm/parallel/layout.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "lrllm/core/common.h"

namespace lrllm {

void validate_layout(const ParallelConfig& p, int world_size, const ModelConfig& m, int batch_size) {
  auto require = [](bool ok, const std::string& message) {
    if (!ok) throw InputError(message);
  };
  require(p.tp >= 1 && p.pp >= 1, "--parallel.tp and --parallel.pp must be >= 1");
  require(p.zero == 0 || p.zero == 1, strprintf("--parallel.zero must be 0 or 1, not %d", p.zero));
  require(p.micro_batches >= 1, "--parallel.micro_batches must be >= 1");
  // In 64 bits: the product of two user-given ints overflows int, and the Topology divides by it.
  const int64_t group = int64_t{p.tp} * p.pp;
  require(
      world_size % group == 0,
      strprintf("%d ranks cannot be split into tensor-parallel groups of %d times pipeline stages of %d: the "
                "rank count must be a multiple of parallel.tp * parallel.pp = %lld",
                world_size, p.tp, p.pp, static_cast<long long>(group)));
  require(
      p.pp <= m.n_layer,
      strprintf("--parallel.pp %d is above the model's %d layers: a stage needs a block", p.pp, m.n_layer));
  require(m.n_head % p.tp == 0,
          strprintf("--parallel.tp %d does not divide the model's %d attention heads", p.tp, m.n_head));
  require(m.ff() % p.tp == 0, strprintf("--parallel.tp %d does not divide d_ff %d", p.tp, m.ff()));
  require(batch_size % p.micro_batches == 0,
          strprintf("--parallel.micro_batches %d does not divide train.batch_size %d", p.micro_batches,
                    batch_size));
  require(m.kv_heads() % p.tp == 0,
          strprintf("--parallel.tp %d does not divide the model's %d key/value heads", p.tp, m.kv_heads()));
  require(
      p.tp == 1 || (!m.any_lora() && m.quant == QuantKind::none),
      "--parallel.tp above 1 with LoRA adapters or a quantized base is not supported yet: finetune with data "
      "and pipeline parallelism (parallel.pp, parallel.zero)");
  // Bucket sizes become byte counts: bounded so that the conversion stays in range.
  require(p.bucket_mb > 0 && p.bucket_mb <= 1e6, "--parallel.bucket_mb must be > 0 and at most 1e6");
}

std::pair<int, int> stage_layers(const ModelConfig& m, int pp, int stage) {
  const Architecture arch = describe_architecture(m);
  const double block = arch.block_flops, head = arch.head_flops;
  // Blocks are alike, so a stage's cost depends on its count alone. best[k][n]: the least possible largest
  // stage cost when the first k stages hold the first n blocks; the last stage adds the lm_head.
  const int L = m.n_layer;
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<std::vector<double>> best(pp + 1, std::vector<double>(L + 1, inf));
  std::vector<std::vector<int>> cut(pp + 1, std::vector<int>(L + 1, 0));
  best[0][0] = 0;
  for (int k = 1; k <= pp; ++k)
    for (int n = k; n <= L; ++n)
      // From the fewest blocks for stage k up, taking strict improvements only: among equal splits the
      // earlier stages hold more.
      for (int prev = n - 1; prev >= k - 1; --prev) {
        const double cost = std::max(best[k - 1][prev], (n - prev) * block + (k == pp ? head : 0.0));
        if (cost < best[k][n]) {
          best[k][n] = cost;
          cut[k][n] = prev;
        }
      }
  std::vector<int> bounds(pp + 1, L);
  for (int k = pp; k >= 1; --k) bounds[k - 1] = cut[k][bounds[k]];
  return {bounds[stage], bounds[stage + 1]};
}

ModelShard model_shard(const Topology& topo, const ModelConfig& m) {
  ModelShard s;
  std::tie(s.first_layer, s.end_layer) = stage_layers(m, topo.pp(), topo.pp_rank());
  s.tp_part = topo.tp_rank();
  s.tp = topo.tp();
  s.tp_group = &topo;
  return s;
}

void print_placement(const Topology& topo, const ModelConfig& m) {
  char host[64] = {};
  gethostname(host, sizeof host - 1);
  const auto [first, end] = stage_layers(m, topo.pp(), topo.pp_rank());
  const int heads = m.n_head / topo.tp();
  const std::vector<std::string> lines = topo.gather_lines(
      strprintf("  rank %d on %s: dp %d/%d, stage %d/%d (blocks %d-%d%s%s), tensor slice %d/%d (heads %d-%d)",
                topo.world().rank(), host, topo.dp_rank(), topo.dp(), topo.pp_rank(), topo.pp(), first,
                end - 1, topo.first_stage() ? ", embeddings" : "", topo.last_stage() ? ", lm_head" : "",
                topo.tp_rank(), topo.tp(), topo.tp_rank() * heads, (topo.tp_rank() + 1) * heads - 1));
  if (!topo.world().root()) return;
  std::printf("layout: %d ranks = dp %d x pp %d x tp %d\n", topo.world().size(), topo.dp(), topo.pp(),
              topo.tp());
  for (const std::string& line : lines) std::printf("%s\n", line.c_str());
}

}  // namespace lrllm

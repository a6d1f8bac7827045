#include "lrllm/train/run_dir.h"

#include <cstdio>
#include <ctime>
#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

#include "lrllm/core/common.h"
#include "lrllm/io/checkpoint.h"

namespace lrllm {

namespace fs = std::filesystem;

void prepare_run_dir(const Config& cfg, const MpiWorld& comm) {
  if (!comm.root()) return;
  std::error_code ec;
  fs::create_directories(cfg.run.dir, ec);
  if (ec) throw InputError("--run.dir " + cfg.run.dir + ": cannot create it: " + ec.message());
}

void claim_run_dir(const Config& cfg, const MpiWorld& comm, bool resuming) {
  prepare_run_dir(cfg, comm);
  if (!comm.root() || resuming) return;
  std::vector<fs::path> earlier;
  for (const auto& checkpoint : list_checkpoints(cfg.run.dir)) earlier.emplace_back(checkpoint.second);
  const std::size_t checkpoints = earlier.size();
  const fs::path metrics = fs::path(cfg.run.dir) / "metrics.h5";
  std::error_code ec;
  if (fs::exists(metrics, ec)) earlier.push_back(metrics);
  if (earlier.empty()) return;
  // Metrics without a checkpoint (a run that died before its first) cannot be resumed: they move aside
  // unasked, so that a requeued job starts again instead of waiting for a person.
  if (checkpoints > 0 && !cfg.run.overwrite)
    throw InputError(
        strprintf("--run.dir %s holds an earlier run (%zu checkpoints%s): continue it with "
                  "--checkpoint.resume latest, or move its files aside with --run.overwrite true",
                  cfg.run.dir.c_str(), checkpoints, earlier.size() > checkpoints ? " and metrics.h5" : ""));
  const std::time_t now = std::time(nullptr);
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%Y%m%d-%H%M%S", std::localtime(&now));
  fs::path aside = fs::path(cfg.run.dir) / ("earlier-" + std::string(stamp));
  for (int n = 2; fs::exists(aside, ec); ++n)
    aside = fs::path(cfg.run.dir) / strprintf("earlier-%s-%d", stamp, n);
  fs::create_directory(aside, ec);
  if (ec) throw InputError("--run.overwrite: cannot create " + aside.string() + ": " + ec.message());
  for (const fs::path& p : earlier) {
    fs::rename(p, aside / p.filename(), ec);
    if (ec) throw InputError("--run.overwrite: cannot move " + p.string() + " aside: " + ec.message());
  }
  std::printf("moved the earlier run's %zu files to %s\n", earlier.size(), aside.c_str());
}

}  // namespace lrllm

#include "lrllm/train/train_log.h"

#include <sys/resource.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>

#include "lrllm/core/common.h"
#include "lrllm/parallel/layout.h"
#include "lrllm/train/train.h"

namespace lrllm {
namespace {

std::string format_duration(double seconds) {
  const long s = std::lround(std::max(0.0, seconds));
  return strprintf("%ld:%02ld:%02ld", s / 3600, (s / 60) % 60, s % 60);
}

}  // namespace

std::size_t peak_memory_bytes(const Backend& backend) {
  if (const std::size_t device = backend.peak_bytes(); device > 0) return device;
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<std::size_t>(usage.ru_maxrss) * 1024;
}

void print_banner(const Config& cfg, const TrainSetup& setup, const std::string& mode,
                  const Pipeline& pipeline, const MemoryBytes& mem) {
  const Topology& topo = *setup.topo;
  const ModelConfig& mc = setup.mc;
  const bool root = topo.world().root();
  const int B = cfg.train.batch_size, dp = topo.dp();
  if (root) {
    std::printf("lrllm %s on %d rank(s), device %s, %s\n", mode.c_str(), topo.world().size(),
                setup.backend->name().c_str(),
                setup.resume.empty()
                    ? (mc.init.empty() ? "random init" : ("init from " + mc.init).c_str())
                    : ("resuming " + setup.resume + " at step " + std::to_string(setup.state.step)).c_str());
    std::printf("model: %s n_layer %d n_head %d", mc.arch.c_str(), mc.n_layer, mc.n_head);
    if (mc.llama()) std::printf(" n_kv_head %d", mc.kv_heads());
    std::printf(" d_model %d d_ff %d seq_len %d vocab %d, linear sites:", mc.d_model, mc.ff(), mc.seq_len,
                mc.vocab_size);
    for (int s = 0; s < kNumSites; ++s) {
      std::printf(" %s=%s", site_name(static_cast<LinearSite>(s)),
                  mc.lowrank_rank[s] ? ("r" + std::to_string(mc.lowrank_rank[s])).c_str() : "dense");
      if (mc.lora_rank[s] > 0) std::printf("+lora%d", mc.lora_rank[s]);
    }
    if (mc.any_lora()) std::printf(", frozen base stored as %s", storage_name(mc.quant));
    if (mc.lowrank_silu) std::printf(", low-rank sites B silu(A x)");
    std::printf("\n");
    print_param_counts(setup.model->param_counts(), mc);
    std::printf(
        "batch: %d seq/rank x %d accum x %d data-parallel ranks = %llu sequences of at most %d tokens per "
        "step; %s\n",
        B, cfg.train.grad_accum, dp, static_cast<unsigned long long>(B) * cfg.train.grad_accum * dp,
        setup.row_len, setup.data_summary.c_str());
  }
  print_placement(topo, mc);
  if (!root) return;
  if (topo.pp() > 1)
    std::printf(
        "pipeline: %d stages, %d micro-batches of %d sequences, 1F1B schedule, bubble %.1f%% of a step\n",
        topo.pp(), cfg.parallel.micro_batches, B / cfg.parallel.micro_batches,
        100.0 * pipeline.bubble_fraction());
  if (cfg.parallel.zero == 1)
    std::printf("ZeRO-1: optimizer state sharded over %d data-parallel ranks\n", dp);
  std::printf(
      "memory per rank: params %.1f MB (trainable %.1f, frozen %.1f, quantized %.1f), grads %.1f MB, "
      "optimizer %.1f MB, activations %.1f MB\n",
      mem.params / 1e6, mem.params_trainable / 1e6, mem.params_frozen / 1e6, mem.params_quantized / 1e6,
      mem.grads / 1e6, mem.optimizer / 1e6, mem.activations / 1e6);
  std::fflush(stdout);
}

std::map<std::string, double> metrics_row(const StepStats& s, int world_size, const MemoryBytes& mem,
                                          std::size_t peak_bytes) {
  return {{"step", static_cast<double>(s.step)},
          {"loss", s.loss},
          {"lr", s.lr},
          {"grad_norm", s.grad_norm},
          {"tokens_per_s", s.tokens / s.seconds},
          {"step_ms", s.seconds * 1e3},
          {"val_loss", s.val_loss},
          {"tokens_seen", s.tokens_seen},
          {"comm_bytes_dp", s.dp_bytes},
          {"comm_bytes_tp", s.tp_bytes},
          {"comm_bytes_pp", s.pp_bytes},
          {"pp_wait_frac", s.pp_wait_s / world_size / s.seconds},
          {"mem_params", static_cast<double>(mem.params)},
          {"mem_params_trainable", static_cast<double>(mem.params_trainable)},
          {"mem_params_frozen", static_cast<double>(mem.params_frozen)},
          {"mem_params_quantized", static_cast<double>(mem.params_quantized)},
          {"mem_grads", static_cast<double>(mem.grads)},
          {"mem_optimizer", static_cast<double>(mem.optimizer)},
          {"mem_activations", static_cast<double>(mem.activations)},
          {"mem_peak", static_cast<double>(peak_bytes)}};
}

void print_progress(const StepStats& s, int steps, double avg_step_s, std::size_t peak_bytes) {
  std::printf(
      "step %6lld/%d | loss %.4f%s | lr %.2e | norm %.3f | %.0f tok/s | %.1f ms | mem %.0f MB | eta %s\n",
      static_cast<long long>(s.step), steps, s.loss,
      std::isnan(s.val_loss) ? "" : strprintf(" | val %.4f", s.val_loss).c_str(), s.lr, s.grad_norm,
      s.tokens / s.seconds, s.seconds * 1e3, peak_bytes / 1e6,
      format_duration(avg_step_s * (steps - s.step)).c_str());
  std::fflush(stdout);
}

}  // namespace lrllm

#include "lrllm/train.h"

#include <sys/resource.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <vector>

#include "lrllm/backend.h"
#include "lrllm/checkpoint.h"
#include "lrllm/common.h"
#include "lrllm/data.h"
#include "lrllm/evaluate.h"
#include "lrllm/metrics.h"
#include "lrllm/model.h"
#include "lrllm/optimizer.h"
#include "lrllm/rng.h"

namespace fs = std::filesystem;

namespace lrllm {
namespace {

std::size_t peak_rss_bytes() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<std::size_t>(usage.ru_maxrss) * 1024;
}

std::string format_duration(double seconds) {
  const long s = std::lround(std::max(0.0, seconds));
  return strprintf("%ld:%02ld:%02ld", s / 3600, (s / 60) % 60, s % 60);
}

// A model-shape option the user gave that the file being loaded contradicts.
void check_against_file(const Config& cfg, const char* option, int given, int in_file,
                        const std::string& path) {
  if (!cfg.was_given(option) || given == in_file) return;
  if (std::string(option) == "model.seq_len" && given > in_file)
    throw InputError(strprintf("--model.seq_len %d is above the position table of %s (%d positions)", given,
                               path.c_str(), in_file));
  throw InputError(strprintf("--%s %d contradicts %s, which has %d", option, given, path.c_str(), in_file));
}

}  // namespace

ModelConfig resolve_model_config(const Config& cfg, const std::string& resume_path) {
  const std::string& from = !resume_path.empty() ? resume_path : cfg.model.init;
  if (from.empty()) {
    ModelConfig m = cfg.model;
    apply_lowrank(cfg, m);
    validate_model_config(m);
    return m;
  }
  ModelConfig m = read_model_config(from);
  check_against_file(cfg, "model.n_layer", cfg.model.n_layer, m.n_layer, from);
  check_against_file(cfg, "model.n_head", cfg.model.n_head, m.n_head, from);
  check_against_file(cfg, "model.d_model", cfg.model.d_model, m.d_model, from);
  check_against_file(cfg, "model.d_ff", cfg.model.d_ff, m.d_ff, from);
  check_against_file(cfg, "model.seq_len", cfg.model.seq_len, m.seq_len, from);
  check_against_file(cfg, "model.vocab_size", cfg.model.vocab_size, m.vocab_size, from);
  if (cfg.was_given("lowrank.rank") || cfg.was_given("lowrank.targets"))
    throw InputError("lowrank options cannot reshape the model of " + from +
                     "; turn a dense checkpoint low-rank with --mode decompose");
  if (m.any_lora() || m.quant != "none")
    throw InputError(from +
                     " has LoRA adapters or a quantized base: continue it with --mode finetune, or "
                     "export it merged (--mode export --lora.merge true) to pretrain further");
  validate_model_config(m);
  return m;
}

void TrainSetup::build(const Config& cfg) {
  backend = make_backend(cfg.device);
  model = std::make_unique<Model>(mc, *backend, cfg.train.recompute == "block");
  optimizer = std::make_unique<AdamW>(*backend, model->table(), cfg.train);
  state.seed = cfg.seed;
  if (!resume.empty()) {
    load_weights(resume, *model);
    load_training_state(resume, *optimizer, state);
  }
}

void prepare_run_dir(const Config& cfg, const Comm& comm) {
  if (!comm.root()) return;
  std::error_code ec;
  fs::create_directories(cfg.run.dir, ec);
  if (ec) throw InputError("--run.dir " + cfg.run.dir + ": cannot create it: " + ec.message());
}

int run_pretrain(const Config& cfg, const Comm& comm) {
  TrainSetup setup;
  collective_check(comm, [&] {
    if (cfg.data.train.empty()) throw InputError("--mode pretrain needs --data.train (a token file)");
    if (!cfg.checkpoint.resume.empty()) setup.resume = resolve_resume(cfg.checkpoint.resume, cfg.run.dir);
    setup.mc = resolve_model_config(cfg, setup.resume);
    auto train_file = std::make_shared<TokenFile>(cfg.data.train);
    auto val_file = std::make_shared<TokenFile>(cfg.data.val.empty() ? cfg.data.train : cfg.data.val);
    setup.data_summary = strprintf("train %zu tokens, val %zu tokens", train_file->size(), val_file->size());
    setup.train = std::make_unique<Batcher>(*train_file, setup.mc.seq_len, cfg.data.shuffle, cfg.seed);
    setup.val = std::make_unique<Batcher>(*val_file, setup.mc.seq_len, false, cfg.seed);
    setup.keep_alive = {train_file, val_file};
    setup.build(cfg);
    if (setup.resume.empty()) {
      if (!setup.mc.init.empty())
        load_weights(setup.mc.init, *setup.model);
      else
        setup.model->init_random(cfg.seed);
    }
    prepare_run_dir(cfg, comm);
  });
  return run_training(cfg, comm, setup, "pretrain");
}

int run_training(const Config& cfg, const Comm& comm, TrainSetup& setup, const std::string& mode) {
  const TrainConfig& tc = cfg.train;
  const std::string& resume = setup.resume;
  const ModelConfig& mc = setup.mc;
  BatchSource& train_batches = *setup.train;
  BatchSource& val_batches = *setup.val;
  Backend* backend = setup.backend.get();
  Model& model = *setup.model;
  AdamW& optimizer = *setup.optimizer;
  TrainState& state = setup.state;

  const int B = tc.batch_size, T = mc.seq_len, dp = comm.size();
  const uint64_t sequences_per_step = static_cast<uint64_t>(B) * tc.grad_accum * dp;
  const MemoryBytes mem = [&] {
    MemoryBytes m = model.memory(B);
    m.optimizer = optimizer.bytes();
    return m;
  }();

  if (comm.root()) {
    std::printf("lrllm %s on %d rank(s), device %s, %s\n", mode.c_str(), dp, backend->name().c_str(),
                resume.empty() ? (mc.init.empty() ? "random init" : ("init from " + mc.init).c_str())
                               : ("resuming " + resume + " at step " + std::to_string(state.step)).c_str());
    std::printf("model: gpt2 n_layer %d n_head %d d_model %d d_ff %d seq_len %d vocab %d, linear sites:",
                mc.n_layer, mc.n_head, mc.d_model, mc.ff(), mc.seq_len, mc.vocab_size);
    for (int s = 0; s < kNumSites; ++s) {
      std::printf(" %s=%s", site_name(static_cast<LinearSite>(s)),
                  mc.lowrank_rank[s] ? ("r" + std::to_string(mc.lowrank_rank[s])).c_str() : "dense");
      if (mc.lora_rank[s] > 0) std::printf("+lora%d", mc.lora_rank[s]);
    }
    if (mc.any_lora())
      std::printf(", frozen base stored as %s", mc.quant == "none" ? "float32" : mc.quant.c_str());
    std::printf("\n");
    print_param_counts(model.param_counts(), mc);
    std::printf("batch: %d seq/rank x %d accum x %d ranks = %llu sequences, %llu tokens per step; %s\n", B,
                tc.grad_accum, dp, static_cast<unsigned long long>(sequences_per_step),
                static_cast<unsigned long long>(sequences_per_step * T), setup.data_summary.c_str());
    std::printf(
        "memory per rank: params %.1f MB (trainable %.1f, frozen %.1f, quantized %.1f), grads %.1f MB, "
        "optimizer %.1f MB, activations %.1f MB\n",
        mem.params / 1e6, mem.params_trainable / 1e6, mem.params_frozen / 1e6, mem.params_quantized / 1e6,
        mem.grads / 1e6, mem.optimizer / 1e6, mem.activations / 1e6);
    std::fflush(stdout);
  }

  std::unique_ptr<Metrics> metrics;
  if (comm.root())
    metrics = std::make_unique<Metrics>((fs::path(cfg.run.dir) / "metrics.h5").string(), state.step);

  std::vector<int32_t> tokens(static_cast<std::size_t>(B) * T), targets(tokens.size());
  const std::size_t n_params = model.table().total();
  double elapsed_train_s = 0;
  int timed_steps = 0;
  double last_val = NAN;
  const int64_t first_step = state.step;

  for (int64_t step = state.step; step < tc.steps; ++step) {
    const auto t0 = std::chrono::steady_clock::now();

    // Forward and backward over this rank's micro-batches; the step's batch is sequences_per_step sequences
    // from the data cursor, of which micro-step m on rank r takes the (m * dp + r)-th slice of B.
    model.zero_grads();
    model.set_training(true);
    double loss = 0;
    for (int micro = 0; micro < tc.grad_accum; ++micro) {
      const uint64_t first = state.data_cursor + (static_cast<uint64_t>(micro) * dp + comm.rank()) * B;
      train_batches.fill(first, B, tokens.data(), targets.data());
      // Dropout masks follow from the seed, the step and the slice: a resumed run draws the same ones.
      model.set_dropout_seed(
          derive_seed(state.seed, strprintf("dropout %lld %llu", static_cast<long long>(step),
                                            static_cast<unsigned long long>(first))));
      loss += model.step(tokens.data(), targets.data(), B, 1.0f / tc.grad_accum) / tc.grad_accum;
    }

    model.set_training(false);

    // Gradient communication: the mean over data-parallel ranks.
    comm.allreduce_mean(model.grads(), n_params);
    loss = comm.allreduce_sum(loss) / dp;
    if (!std::isfinite(loss))
      throw DivergenceError(strprintf("loss is %f at step %lld; stopping (the last checkpoint in %s is kept)",
                                      loss, static_cast<long long>(step + 1), cfg.run.dir.c_str()));

    // Optimizer.
    const double grad_norm = clip_grad_norm(*backend, model.grads(), n_params, tc.grad_clip);
    const double lr = lr_at(tc, static_cast<int>(step));
    optimizer.update(model.params(), model.grads(), static_cast<float>(lr));
    state.step = step + 1;
    state.data_cursor += sequences_per_step;
    state.tokens_seen += static_cast<int64_t>(sequences_per_step * T);
    const double step_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    // The first step of a process pays for page faults and warm-up; leave it out of the rate.
    if (step > first_step) {
      elapsed_train_s += step_s;
      ++timed_steps;
    }
    const double tokens_per_s = sequences_per_step * T / step_s;

    // Metrics.
    const bool last = state.step == tc.steps;
    double val_loss = NAN;
    if ((tc.eval_every > 0 && state.step % tc.eval_every == 0) || last) {
      val_loss = validation_loss(model, val_batches, tc.eval_batches * sequences_per_step, B, comm);
      last_val = val_loss;
    }
    if (comm.root()) {
      metrics->append({{"step", static_cast<double>(state.step)},
                       {"loss", loss},
                       {"lr", lr},
                       {"grad_norm", grad_norm},
                       {"tokens_per_s", tokens_per_s},
                       {"step_ms", step_s * 1e3},
                       {"val_loss", val_loss},
                       {"tokens_seen", static_cast<double>(state.tokens_seen)},
                       {"mem_params", static_cast<double>(mem.params)},
                       {"mem_params_trainable", static_cast<double>(mem.params_trainable)},
                       {"mem_params_frozen", static_cast<double>(mem.params_frozen)},
                       {"mem_params_quantized", static_cast<double>(mem.params_quantized)},
                       {"mem_grads", static_cast<double>(mem.grads)},
                       {"mem_optimizer", static_cast<double>(mem.optimizer)},
                       {"mem_activations", static_cast<double>(mem.activations)},
                       {"mem_peak", static_cast<double>(peak_rss_bytes())}});
      if (state.step % cfg.run.log_every == 0 || last || !std::isnan(val_loss)) {
        const double avg_s = timed_steps > 0 ? elapsed_train_s / timed_steps : step_s;
        std::printf(
            "step %6lld/%d | loss %.4f%s | lr %.2e | norm %.3f | %.0f tok/s | %.1f ms | mem %.0f MB | eta "
            "%s\n",
            static_cast<long long>(state.step), tc.steps, loss,
            std::isnan(val_loss) ? "" : strprintf(" | val %.4f", val_loss).c_str(), lr, grad_norm,
            tokens_per_s, step_s * 1e3, peak_rss_bytes() / 1e6,
            format_duration(avg_s * (tc.steps - state.step)).c_str());
        std::fflush(stdout);
        metrics->flush();
      }
    }

    // Checkpoint.
    if ((cfg.checkpoint.every > 0 && state.step % cfg.checkpoint.every == 0) || last) {
      if (comm.root()) {
        save_checkpoint(checkpoint_path(cfg.run.dir, state.step), mode, model, &optimizer, &state);
        prune_checkpoints(cfg.run.dir, cfg.checkpoint.keep);
      }
    }
  }
  if (comm.root()) {
    // A run of zero steps still leaves its starting point as a checkpoint (an initial model for other tools).
    if (state.step == first_step && !fs::exists(checkpoint_path(cfg.run.dir, state.step)))
      save_checkpoint(checkpoint_path(cfg.run.dir, state.step), mode, model, &optimizer, &state);
    metrics->flush();
    const double avg_tps = timed_steps > 0 ? sequences_per_step * T * timed_steps / elapsed_train_s : NAN;
    std::printf("done: %lld steps, %lld tokens, %.0f tok/s, final val loss %.4f, checkpoint %s\n",
                static_cast<long long>(state.step), static_cast<long long>(state.tokens_seen), avg_tps,
                last_val, checkpoint_path(cfg.run.dir, state.step).c_str());
  }
  return 0;
}

}  // namespace lrllm

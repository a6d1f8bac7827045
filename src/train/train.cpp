#include "lrllm/train/train.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <initializer_list>
#include <limits>
#include <vector>

#include "lrllm/backend/backend.h"
#include "lrllm/core/common.h"
#include "lrllm/core/rng.h"
#include "lrllm/core/signals.h"
#include "lrllm/io/checkpoint.h"
#include "lrllm/io/data.h"
#include "lrllm/io/hdf5.h"
#include "lrllm/io/metrics.h"
#include "lrllm/model/linear.h"
#include "lrllm/model/model.h"
#include "lrllm/model/optimizer.h"
#include "lrllm/parallel/data_parallel.h"
#include "lrllm/parallel/layout.h"
#include "lrllm/parallel/pipeline.h"
#include "lrllm/train/run_dir.h"
#include "lrllm/train/train_log.h"

namespace fs = std::filesystem;

namespace lrllm {
namespace {

// A model-shape option the user gave that the file being loaded contradicts.
void check_against_file(const Config& cfg, const char* option, int given, int in_file,
                        const std::string& path) {
  if (!cfg.was_given(option) || given == in_file) return;
  const bool seq_len = std::string(option) == "model.seq_len";
  // Finetuning cuts its rows to a shorter length; the position table stays the base's.
  if (seq_len && given < in_file && cfg.mode == "finetune") return;
  if (seq_len && given > in_file)
    throw InputError(strprintf("--model.seq_len %d is above the position table of %s (%d positions)", given,
                               path.c_str(), in_file));
  throw InputError(strprintf("--%s %d contradicts %s, which has %d", option, given, path.c_str(), in_file));
}

bool any_given(const Config& cfg, std::initializer_list<const char*> options) {
  return std::any_of(options.begin(), options.end(), [&](const char* o) { return cfg.was_given(o); });
}

// Each site's rank, e.g. "qkv=r32,proj=dense,fc=r32,mlp_proj=r32": both sides of a contradiction alike.
std::string site_ranks(const int (&ranks)[kNumSites]) {
  std::string out;
  for (int s = 0; s < kNumSites; ++s)
    out += strprintf("%s%s=%s", s ? "," : "", site_name(static_cast<LinearSite>(s)),
                     ranks[s] > 0 ? ("r" + std::to_string(ranks[s])).c_str() : "none");
  return out;
}

// The LoRA and quantization options given, with those not given taken from the file, applied to it.
ModelConfig finetune_options_over(const Config& cfg, const ModelConfig& file) {
  Config filled = cfg;
  FinetuneConfig& ft = filled.finetune;
  if (!cfg.was_given("lora.rank"))
    ft.lora_rank = *std::max_element(file.lora_rank, file.lora_rank + kNumSites);
  if (!cfg.was_given("lora.targets")) ft.lora_targets = file.lora_targets();
  if (!cfg.was_given("lora.alpha")) ft.lora_alpha = file.lora_alpha;
  if (!cfg.was_given("lora.modules_to_save")) ft.lora_modules = file.lora_modules;
  if (!cfg.was_given("quant.bits")) ft.quant_bits = quant_bits(file.quant);
  if (!cfg.was_given("quant.block")) ft.quant_block = file.quant_block;
  if (!cfg.was_given("quant.embedding")) ft.quant_embedding = file.quant_embedding;
  ModelConfig want = file;
  apply_finetune(filled, want);
  return want;
}

// A resume repeats the uninterrupted run only with the factors' learning rate and refactoring period it was
// trained with (the checkpoint's /config records them); another value is refused rather than silently
// giving another run.
void check_lowrank_settings_agree(const TrainConfig& tc, const std::string& path) {
  const H5File f = H5File::open_read(path);
  if (f.has_attr("/config", "lowrank_lr_mult") &&
      f.attr_double("/config", "lowrank_lr_mult") != tc.lowrank_lr_mult)
    throw InputError(strprintf("--lowrank.lr_mult %g contradicts %s, trained with %g", tc.lowrank_lr_mult,
                               path.c_str(), f.attr_double("/config", "lowrank_lr_mult")));
  if (f.has_attr("/config", "lowrank_refactor_every") &&
      f.attr_int("/config", "lowrank_refactor_every") != tc.lowrank_refactor_every)
    throw InputError(strprintf("--lowrank.refactor_every %d contradicts %s, trained with %lld",
                               tc.lowrank_refactor_every, path.c_str(),
                               static_cast<long long>(f.attr_int("/config", "lowrank_refactor_every"))));
}

}  // namespace

void check_options_agree(const Config& cfg, const ModelConfig& file, const std::string& path) {
  check_against_file(cfg, "model.n_layer", cfg.model.n_layer, file.n_layer, path);
  check_against_file(cfg, "model.n_head", cfg.model.n_head, file.n_head, path);
  check_against_file(cfg, "model.d_model", cfg.model.d_model, file.d_model, path);
  check_against_file(cfg, "model.d_ff", cfg.model.ff(), file.ff(), path);
  check_against_file(cfg, "model.seq_len", cfg.model.seq_len, file.seq_len, path);
  check_against_file(cfg, "model.vocab_size", cfg.model.vocab_size, file.vocab_size, path);
  if (any_given(cfg, {"lowrank.rank", "lowrank.targets", "lowrank.rank_qkv", "lowrank.rank_proj",
                      "lowrank.rank_fc", "lowrank.rank_mlp_proj"})) {
    ModelConfig want = file;
    apply_lowrank(cfg, want);
    if (!std::equal(want.lowrank_rank, want.lowrank_rank + kNumSites, file.lowrank_rank))
      throw InputError(
          "the lowrank options give " + site_ranks(want.lowrank_rank) + " but " + path + " has " +
          site_ranks(file.lowrank_rank) +
          (file.any_lowrank() ? "" : "; turn a dense checkpoint low-rank with --mode decompose"));
  }
  if (cfg.was_given("lowrank.activation") && (cfg.lowrank_activation == "silu") != file.lowrank_silu)
    throw InputError("--lowrank.activation " + cfg.lowrank_activation + " contradicts " + path +
                     ", whose low-rank sites compute " + (file.lowrank_silu ? "silu" : "none"));
  if (!file.any_lora() || !any_given(cfg, {"lora.rank", "lora.targets", "lora.alpha", "lora.modules_to_save",
                                           "quant.bits", "quant.block", "quant.embedding"}))
    return;
  const ModelConfig want = finetune_options_over(cfg, file);
  if (!std::equal(want.lora_rank, want.lora_rank + kNumSites, file.lora_rank))
    throw InputError("the lora options give adapters " + site_ranks(want.lora_rank) + " but " + path +
                     " has " + site_ranks(file.lora_rank));
  if (want.lora_alpha != file.lora_alpha)
    throw InputError(strprintf("--lora.alpha %g contradicts %s, which has %g", want.lora_alpha, path.c_str(),
                               file.lora_alpha));
  if (want.lora_modules != file.lora_modules)
    throw InputError("--lora.modules_to_save '" + want.lora_modules + "' contradicts " + path +
                     ", which has '" + file.lora_modules + "'");
  if (want.quant != file.quant)
    throw InputError(strprintf("--quant.bits %d contradicts %s, whose base is stored as %s",
                               quant_bits(want.quant), path.c_str(), storage_name(file.quant)));
  if (file.quant != QuantKind::none && want.quant_block != file.quant_block)
    throw InputError(strprintf("--quant.block %d contradicts %s, which has %d", want.quant_block,
                               path.c_str(), file.quant_block));
  if (file.quant != QuantKind::none && want.quant_embedding != file.quant_embedding)
    throw InputError(strprintf("--quant.embedding %s contradicts %s, whose embedding is %s",
                               want.quant_embedding ? "true" : "false", path.c_str(),
                               file.quant_embedding ? "quantized" : "float32"));
}

ModelConfig resolve_model_config(const Config& cfg, const std::string& resume_path) {
  const std::string& from = !resume_path.empty() ? resume_path : cfg.model.init;
  if (from.empty()) {
    ModelConfig m = cfg.model;
    apply_lowrank(cfg, m);
    validate_model_config(m);
    return m;
  }
  ModelConfig m = read_model_config(from);
  check_options_agree(cfg, m, from);
  if (!resume_path.empty()) check_lowrank_settings_agree(cfg.train, resume_path);
  if (m.any_lora() || m.quant != QuantKind::none)
    throw InputError(from +
                     " has LoRA adapters or a quantized base: continue it with --mode finetune, or "
                     "export it merged (--mode export --lora.merge true) to pretrain further");
  validate_model_config(m);
  return m;
}

void TrainSetup::check_layout(const Config& cfg, const MpiWorld& comm) {
  validate_layout(cfg.parallel, comm.size(), mc, cfg.train.batch_size);
  if (row_len == 0) row_len = mc.seq_len;
  steps = cfg.train.steps;
  if (cfg.train.epochs == 0) return;
  const int dp = comm.size() / (cfg.parallel.tp * cfg.parallel.pp);
  const double per_step = static_cast<double>(cfg.train.batch_size) * cfg.train.grad_accum * dp;
  const double wanted = std::ceil(cfg.train.epochs * static_cast<double>(train->num_sequences()) / per_step);
  if (wanted > std::numeric_limits<int>::max())
    throw InputError(strprintf("--train.epochs %g is %.0f steps of %.0f sequences: too many",
                               cfg.train.epochs, wanted, per_step));
  steps = std::max(1, static_cast<int>(wanted));
}

void TrainSetup::make_topology(const Config& cfg, const MpiWorld& comm) {
  topo = std::make_unique<Topology>(comm, cfg.parallel, cfg.device == "cuda");
  // Every rank has its device (the GPU its local rank picks) before the device transport connects them: that
  // is collective, and a rank that failed to get its GPU would leave the others waiting in it.
  collective_check(comm, [&] { backend = make_backend(cfg.device, comm.local_rank()); });
  topo->start_device_transport();
}

void TrainSetup::build(const Config& cfg) {
  model = std::make_unique<Model>(mc, *backend, cfg.train.recompute == "block", model_shard(*topo, mc));
  model->limit_rows(row_len);
  data_parallel =
      std::make_unique<DataParallel>(*model, *topo, cfg.parallel.zero == 1, cfg.parallel.bucket_mb);
  optimizer = std::make_unique<AdamW>(*backend, model->table(), cfg.train, data_parallel->shard_begin(),
                                      data_parallel->shard_end());
  state.seed = cfg.seed;
  if (!resume.empty()) {
    load_weights(resume, *model);
    load_training_state(resume, *optimizer, state);
  }
}

double validation_loss(Pipeline& pipeline, const Topology& topo, BatchSource& batcher, uint64_t sequences,
                       int batch_size) {
  Batch batch;
  const uint64_t share = sequences / topo.dp();
  const uint64_t begin = share * topo.dp_rank();
  double sum = 0;
  for (uint64_t first = begin; first < begin + share; first += batch_size) {
    const int count = static_cast<int>(std::min<uint64_t>(batch_size, begin + share - first));
    batcher.fill(first, count, batch);
    sum += pipeline.evaluate(batch) * count;
  }
  // The last stage has the loss; its tensor-parallel replicas computed the same.
  const bool counts = topo.last_stage() && topo.tp_rank() == 0;
  return topo.world_sum(counts ? sum : 0.0) / static_cast<double>(share * topo.dp());
}

int run_pretrain(const Config& cfg, const MpiWorld& comm) {
  TrainSetup setup;
  collective_check(comm, [&] {
    if (cfg.data.train.empty()) throw InputError("--mode pretrain needs --data.train (a token file)");
    if (!cfg.checkpoint.resume.empty()) setup.resume = resolve_resume(cfg.checkpoint.resume, cfg.run.dir);
    setup.mc = resolve_model_config(cfg, setup.resume);
    // data.train and data.val name token files, globs or comma lists (docs/design.md, Token files).
    auto train_file = std::make_shared<TokenStream>(cfg.data.train);
    auto val_file = cfg.data.val.empty() ? train_file : std::make_shared<TokenStream>(cfg.data.val);
    train_file->check_vocab(setup.mc.vocab_size);
    val_file->check_vocab(setup.mc.vocab_size);
    setup.data_summary =
        strprintf("train %s, val %s", train_file->summary().c_str(), val_file->summary().c_str());
    setup.train = std::make_unique<Batcher>(*train_file, setup.mc.seq_len, cfg.data.shuffle, cfg.seed);
    setup.val = std::make_unique<Batcher>(*val_file, setup.mc.seq_len, false, cfg.seed);
    setup.data_files = {train_file, val_file};
    setup.check_layout(cfg, comm);
  });
  setup.make_topology(cfg, comm);
  collective_check(comm, [&] {
    setup.build(cfg);
    if (setup.resume.empty()) {
      if (!setup.mc.init.empty())
        load_weights(setup.mc.init, *setup.model);
      else
        setup.model->init_random(cfg.seed);
    }
    claim_run_dir(cfg, comm, !setup.resume.empty());
  });
  return run_training(cfg, comm, setup, "pretrain");
}

namespace {

// What one optimizer step works with.
struct TrainLoop {
  const TrainConfig& tc;
  const Topology& topo;
  Model& model;
  AdamW& optimizer;
  TrainState& state;
  Pipeline& pipeline;
  DataParallel& data_parallel;
  BatchSource& batches;
  const std::string& run_dir;
  Batch batch;
  uint64_t sequences_per_step = 0;
};

// The traffic counters of this rank and whether it was asked to stop: summed over the world once a step, so
// that every rank agrees on the step's record and on stopping.
struct StepCounters {
  double dp_bytes = 0, tp_bytes = 0, pp_bytes = 0, pp_wait_s = 0, stop_requests = 0;
};

StepCounters counters_now(const Topology& topo) {
  return {static_cast<double>(topo.bytes(Group::dp)), static_cast<double>(topo.bytes(Group::tp)),
          static_cast<double>(topo.bytes(Group::pp)), topo.pp_wait_s(), 0.0};
}

// The world's sums of the counters since `before`, with this rank's stop request.
StepCounters world_counters_since(const Topology& topo, const StepCounters& before) {
  const StepCounters now = counters_now(topo);
  double sums[5] = {now.dp_bytes - before.dp_bytes, now.tp_bytes - before.tp_bytes,
                    now.pp_bytes - before.pp_bytes, now.pp_wait_s - before.pp_wait_s,
                    stop_requested() ? 1.0 : 0.0};
  topo.world_sum(sums, 5);
  return {sums[0], sums[1], sums[2], sums[3], sums[4]};
}

// One optimizer step, on every rank: batch -> forward -> loss -> backward -> gradient communication ->
// optimizer. The step's batch is sequences_per_step sequences from the data cursor, of which micro-step m on
// data-parallel rank r takes the (m * dp + r)-th slice of batch_size; the last micro-step starts gradient
// averaging as its backward goes.
StepStats train_step(TrainLoop& loop, int64_t step) {
  const TrainConfig& tc = loop.tc;
  const Topology& topo = loop.topo;
  const int B = tc.batch_size;
  StepStats s;
  s.val_loss = NAN;
  loop.model.zero_grads();
  loop.model.set_training(true);
  double loss = 0;
  int64_t real_tokens = 0;
  for (int micro = 0; micro < tc.grad_accum; ++micro) {
    const uint64_t first =
        loop.state.data_cursor + (static_cast<uint64_t>(micro) * topo.dp() + topo.dp_rank()) * B;
    loop.batches.fill(first, B, loop.batch);
    real_tokens += loop.batch.real_tokens;
    // Dropout masks follow from the seed, the step and the slice: a resumed run draws the same ones.
    loop.model.set_dropout_seed(
        derive_seed(loop.state.seed, strprintf("dropout %lld %llu", static_cast<long long>(step),
                                               static_cast<unsigned long long>(first))));
    const bool last_micro = micro == tc.grad_accum - 1;
    loss += loop.pipeline.train(loop.batch, 1.0f / tc.grad_accum,
                                last_micro ? &loop.data_parallel.hook() : nullptr) /
            tc.grad_accum;
  }
  loop.model.set_training(false);

  // Gradient communication: the tied embedding between stages, then the mean over data-parallel ranks.
  loop.data_parallel.finish_gradients();
  // The loss lives on the last stage, where the tensor-parallel ranks all computed it; the real tokens are
  // counted there too, once per data-parallel rank.
  const bool holds_loss = topo.last_stage() && topo.tp_rank() == 0;
  double sums[2] = {holds_loss ? loss : 0.0, holds_loss ? static_cast<double>(real_tokens) : 0.0};
  topo.world_sum(sums, 2);
  s.loss = sums[0] / topo.dp();
  s.tokens = sums[1];
  if (!std::isfinite(s.loss))
    throw DivergenceError(strprintf("loss is %f at step %lld; stopping (the last checkpoint in %s is kept)",
                                    s.loss, static_cast<long long>(step + 1), loop.run_dir.c_str()));

  // Optimizer.
  s.grad_norm = loop.data_parallel.clip(tc.grad_clip);
  s.lr = lr_at(tc, static_cast<int>(step));
  loop.data_parallel.update(loop.optimizer, static_cast<float>(s.lr));
  // After the update (and ZeRO-1's allgather), every rank holds the same whole factors and refactors them
  // alike; each restarts the moments of its own shard.
  if (loop.optimizer.refactor_due()) {
    refactor_factors(loop.model.backend(), loop.model.table(), loop.model.params());
    loop.optimizer.reset_factor_moments();
  }
  loop.state.step = step + 1;
  loop.state.data_cursor += loop.sequences_per_step;
  loop.state.tokens_seen += static_cast<int64_t>(s.tokens);
  s.step = loop.state.step;
  s.tokens_seen = static_cast<double>(loop.state.tokens_seen);
  return s;
}

}  // namespace

int run_training(const Config& cfg, const MpiWorld& comm, TrainSetup& setup, const std::string& mode) {
  // The loop's settings, its length resolved (train.epochs becomes steps; the schedule follows them).
  TrainConfig tc = cfg.train;
  tc.steps = setup.steps;
  const Topology& topo = *setup.topo;
  Model& model = *setup.model;
  AdamW& optimizer = *setup.optimizer;
  TrainState& state = setup.state;
  Pipeline pipeline(model, topo, cfg.parallel.micro_batches);
  DataParallel& data_parallel = *setup.data_parallel;
  TrainLoop loop{tc,
                 topo,
                 model,
                 optimizer,
                 state,
                 pipeline,
                 data_parallel,
                 *setup.train,
                 cfg.run.dir,
                 {},
                 static_cast<uint64_t>(tc.batch_size) * tc.grad_accum * topo.dp()};
  const MemoryBytes mem = [&] {
    pipeline.reserve(tc.batch_size);
    MemoryBytes m = model.memory();
    m.optimizer = optimizer.bytes();
    m.grads += data_parallel.extra_bytes();
    return m;
  }();
  print_banner(cfg, setup, mode, pipeline, mem);
  std::unique_ptr<Metrics> metrics;
  if (comm.root()) {
    metrics = std::make_unique<Metrics>((fs::path(cfg.run.dir) / "metrics.h5").string(), state.step);
    metrics->record_run(cfg.resolved, cfg.command_line);
  }

  double elapsed_train_s = 0, timed_tokens = 0;
  int timed_steps = 0;
  double last_val = NAN;
  const int64_t first_step = state.step;
  for (int64_t step = state.step; step < tc.steps; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    const StepCounters before = counters_now(topo);
    StepStats s = train_step(loop, step);
    s.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const bool last = state.step == tc.steps;
    if ((tc.eval_every > 0 && state.step % tc.eval_every == 0) || last) {
      s.val_loss = validation_loss(pipeline, topo, *setup.val, tc.eval_batches * loop.sequences_per_step,
                                   tc.batch_size);
      last_val = s.val_loss;
    }
    // The first step of a process pays for page faults and warm-up; leave it out of the rate.
    if (step > first_step) {
      elapsed_train_s += s.seconds;
      timed_tokens += s.tokens;
      ++timed_steps;
    }
    const StepCounters traffic = world_counters_since(topo, before);
    s.dp_bytes = traffic.dp_bytes;
    s.tp_bytes = traffic.tp_bytes;
    s.pp_bytes = traffic.pp_bytes;
    s.pp_wait_s = traffic.pp_wait_s;
    const bool stop = traffic.stop_requests > 0 && !last;

    // Metrics.
    if (comm.root()) {
      const std::size_t peak = peak_memory_bytes(*setup.backend);
      metrics->append(metrics_row(s, comm.size(), mem, peak));
      if (state.step % cfg.run.log_every == 0 || last || !std::isnan(s.val_loss)) {
        print_progress(s, tc.steps, timed_steps > 0 ? elapsed_train_s / timed_steps : s.seconds, peak);
        metrics->flush();
      }
    }

    // Checkpoint: every rank hands its parts to world rank 0, which writes the full tensors.
    if ((cfg.checkpoint.every > 0 && state.step % cfg.checkpoint.every == 0) || last || stop) {
      save_checkpoint(checkpoint_path(cfg.run.dir, state.step), mode, model, optimizer,
                      data_parallel.bounds(), state, topo, &cfg);
      if (comm.root()) prune_checkpoints(cfg.run.dir, cfg.checkpoint.keep);
    }
    if (stop) {
      if (comm.root()) {
        metrics->flush();
        std::printf(
            "stopped by a signal after step %lld: checkpoint %s written; resume with --checkpoint.resume "
            "latest (exit %d)\n",
            static_cast<long long>(state.step), checkpoint_path(cfg.run.dir, state.step).c_str(),
            kExitStopped);
        std::fflush(stdout);
      }
      return kExitStopped;
    }
  }
  // A run of zero steps still leaves its starting point as a checkpoint (an initial model for other tools).
  const bool missing =
      comm.root() && state.step == first_step && !fs::exists(checkpoint_path(cfg.run.dir, state.step));
  if (topo.world_sum(missing ? 1.0 : 0.0) > 0)
    save_checkpoint(checkpoint_path(cfg.run.dir, state.step), mode, model, optimizer, data_parallel.bounds(),
                    state, topo, &cfg);
  if (comm.root()) {
    metrics->flush();
    const double avg_tps = timed_steps > 0 ? timed_tokens / elapsed_train_s : NAN;
    std::printf("done: %lld steps, %lld tokens, %.0f tok/s, final val loss %.4f, checkpoint %s\n",
                static_cast<long long>(state.step), static_cast<long long>(state.tokens_seen), avg_tps,
                last_val, checkpoint_path(cfg.run.dir, state.step).c_str());
  }
  return 0;
}

}  // namespace lrllm

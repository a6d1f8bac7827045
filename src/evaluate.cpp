#include "lrllm/evaluate.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <vector>

#include "lrllm/backend.h"
#include "lrllm/checkpoint.h"
#include "lrllm/common.h"

namespace lrllm {

double validation_loss(Model& model, Batcher& batcher, uint64_t sequences, int batch_size, const Comm& comm) {
  const int T = model.config().seq_len;
  std::vector<int32_t> tokens(static_cast<std::size_t>(batch_size) * T), targets(tokens.size());
  const uint64_t share = sequences / comm.size();
  const uint64_t begin = share * comm.rank();
  double sum = 0;
  for (uint64_t first = begin; first < begin + share; first += batch_size) {
    const int count = static_cast<int>(std::min<uint64_t>(batch_size, begin + share - first));
    batcher.fill(first, count, tokens.data(), targets.data());
    sum += model.step(tokens.data(), targets.data(), count, 0.0f) * count;
  }
  return comm.allreduce_sum(sum) / static_cast<double>(share * comm.size());
}

int run_eval(const Config& cfg, const Comm& comm) {
  std::unique_ptr<TokenFile> file;
  std::unique_ptr<Batcher> batcher;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Model> model;
  std::string data;
  collective_check(comm, [&] {
    if (cfg.model.init.empty())
      throw InputError("--mode eval needs --model.init (a checkpoint or model file)");
    data = !cfg.data.val.empty() ? cfg.data.val : cfg.data.train;
    if (data.empty()) throw InputError("--mode eval needs --data.val (or --data.train): a token file");
    const ModelConfig mc = read_model_config(cfg.model.init);
    file = std::make_unique<TokenFile>(data);
    batcher = std::make_unique<Batcher>(*file, mc.seq_len, false, cfg.seed);
    backend = make_backend(cfg.device);
    model = std::make_unique<Model>(mc, *backend, false);
    load_weights(cfg.model.init, *model);
  });
  // Every sequence of the file once (rounded down to a multiple of the ranks), unless a number of batches
  // was asked for.
  const uint64_t per_batch = static_cast<uint64_t>(cfg.train.batch_size) * comm.size();
  uint64_t sequences = std::max<uint64_t>(1, batcher->num_sequences() / comm.size()) * comm.size();
  if (cfg.was_given("train.eval_batches")) sequences = per_batch * cfg.train.eval_batches;
  const double loss = validation_loss(*model, *batcher, sequences, cfg.train.batch_size, comm);
  if (comm.root())
    std::printf("eval %s on %s: %llu tokens, loss %.6f, ppl %.3f\n", cfg.model.init.c_str(), data.c_str(),
                static_cast<unsigned long long>(sequences * model->config().seq_len), loss, std::exp(loss));
  return 0;
}

}  // namespace lrllm

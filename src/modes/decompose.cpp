#include "lrllm/modes/decompose.h"

#include <lapacke.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "lrllm/backend/backend.h"
#include "lrllm/core/common.h"
#include "lrllm/io/checkpoint.h"
#include "lrllm/io/hdf5.h"
#include "lrllm/model/model.h"

namespace lrllm {

Factorization factorize(const float* W, int out, int in, int r) {
  const int k = std::min(out, in);
  std::vector<double> a(W, W + static_cast<std::size_t>(out) * in);
  std::vector<double> s(k), u(static_cast<std::size_t>(out) * k), vt(static_cast<std::size_t>(k) * in);
  const lapack_int info =
      LAPACKE_dgesdd(LAPACK_ROW_MAJOR, 'S', out, in, a.data(), in, s.data(), u.data(), k, vt.data(), in);
  if (info != 0)
    fail_call("LAPACKE_dgesdd", strprintf("info %d on a %d x %d matrix", info, out, in), __FILE__, __LINE__);
  Factorization f;
  f.A.resize(static_cast<std::size_t>(r) * in);
  f.B.resize(static_cast<std::size_t>(out) * r);
  for (int i = 0; i < r; ++i) {
    const double root = std::sqrt(s[i]);
    for (int j = 0; j < in; ++j)
      f.A[static_cast<std::size_t>(i) * in + j] =
          static_cast<float>(root * vt[static_cast<std::size_t>(i) * in + j]);
    for (int o = 0; o < out; ++o)
      f.B[static_cast<std::size_t>(o) * r + i] =
          static_cast<float>(u[static_cast<std::size_t>(o) * k + i] * root);
  }
  double total = 0, dropped = 0;
  for (int i = 0; i < k; ++i) {
    total += s[i] * s[i];
    if (i >= r) dropped += s[i] * s[i];
  }
  f.relative_error = total > 0 ? std::sqrt(dropped / total) : 0.0;
  return f;
}

int run_decompose(const Config& cfg) {
  if (cfg.model.init.empty()) throw InputError("--mode decompose needs --model.init (a dense checkpoint)");
  if (cfg.data.output.empty())
    throw InputError("--mode decompose needs --data.output (the low-rank model file)");
  if (cfg.lowrank_rank <= 0) throw InputError("--mode decompose needs --lowrank.rank >= 1");
  H5File::check_output(cfg.data.output, "data.output");
  const ModelConfig dense_cfg = read_model_config(cfg.model.init);
  // The SVD factors float32 weights of a plain model; adapters and quantized codes have no place in its
  // output.
  if (dense_cfg.any_lora() || dense_cfg.quant != QuantKind::none)
    throw InputError(
        "--mode decompose: " + cfg.model.init +
        " has LoRA adapters or a quantized base; export it merged to float32 first (--mode export "
        "--lora.merge true --quant.bits 0) and decompose that");
  // The SVD's factors reproduce W as B A; a silu site computes B silu(A x), which they do not.
  if (dense_cfg.lowrank_silu || cfg.lowrank_activation == "silu")
    throw InputError("--mode decompose: W = B A does not hold for lowrank.activation silu");
  ModelConfig low_cfg = dense_cfg;
  apply_lowrank(cfg, low_cfg);
  for (int s = 0; s < kNumSites; ++s) {
    if (low_cfg.lowrank_rank[s] > 0 && dense_cfg.lowrank_rank[s] > 0)
      throw InputError(std::string("--mode decompose: site ") + site_name(static_cast<LinearSite>(s)) +
                       " of " + cfg.model.init + " is already low-rank");
    if (low_cfg.lowrank_rank[s] == 0) low_cfg.lowrank_rank[s] = dense_cfg.lowrank_rank[s];
  }
  validate_model_config(low_cfg);

  auto backend = make_cpu_backend();
  Model dense(dense_cfg, *backend, false);
  load_weights(cfg.model.init, dense);
  Model low(low_cfg, *backend, false);

  std::printf("decompose %s -> %s\n%-22s %6s %12s %12s %10s\n", cfg.model.init.c_str(),
              cfg.data.output.c_str(), "layer", "rank", "dense", "low-rank", "rel. error");
  double worst = 0;
  for (const TensorInfo& t : low.table().tensors()) {
    float* dst = low.params() + t.offset;
    if (const TensorInfo* same = dense.table().find(t.name)) {
      std::copy_n(dense.params() + same->offset, t.size, dst);
      continue;
    }
    if (!t.name.ends_with("/A")) continue;  // B is written together with A
    const std::string prefix = t.name.substr(0, t.name.size() - 2);
    const TensorInfo& W = dense.table().at(prefix + "/W");
    const int out = static_cast<int>(W.shape[0]), in = static_cast<int>(W.shape[1]),
              r = static_cast<int>(t.shape[0]);
    const Factorization f = factorize(dense.params() + W.offset, out, in, r);
    std::copy(f.A.begin(), f.A.end(), dst);
    std::copy(f.B.begin(), f.B.end(), low.params() + low.table().at(prefix + "/B").offset);
    worst = std::max(worst, f.relative_error);
    std::printf("%-22s %6d %12zu %12zu %10.4f\n", prefix.c_str(), r, W.size,
                static_cast<std::size_t>(r) * (in + out), f.relative_error);
  }
  save_checkpoint(cfg.data.output, "decompose", low, nullptr, nullptr, &cfg);
  print_param_counts(low.param_counts(), low_cfg);
  std::printf("worst relative reconstruction error %.4f; wrote %s\n", worst, cfg.data.output.c_str());
  return 0;
}

}  // namespace lrllm

#include "lrllm/modes/random_model.h"

#include <map>

#include "lrllm/core/common.h"
#include "lrllm/model/architecture.h"
#include "lrllm/model/model.h"

namespace lrllm {

std::vector<RandomTensor> random_tensors(const ModelConfig& c) {
  LRLLM_CHECK(!c.any_lora(), "random_tensors", "a model of random weights with adapters");
  const Architecture a = describe_architecture(c);
  const bool quantized = c.quant != QuantKind::none;
  const int64_t C = c.d_model, V = c.vocab_size;
  std::vector<RandomTensor> out;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, TensorRole role, bool q) {
    out.push_back({{name, std::move(shape), q}, role});
  };
  auto norm = [&](const std::string& prefix, const NormSpec& n) {
    add(prefix + n.path + "/w", {C}, TensorRole::norm_gain, false);
    if (n.shift) add(prefix + n.path + "/b", {C}, TensorRole::norm_shift, false);
  };
  // The embedding tables are quantized with the linear weights under quant.embedding; positions never are.
  const bool tables = quantized && c.quant_embedding;
  add(a.token_embedding, {V, C}, TensorRole::embedding, tables);
  if (!a.position_embedding.empty()) add(a.position_embedding, {c.seq_len, C}, TensorRole::embedding, false);
  for (int l = 0; l < c.n_layer; ++l) {
    const std::string h = block_name(l) + "/";
    for (const LinearSpec& s : a.sites) {
      for (const NormSpec& n : a.block_norms)
        if (n.feeds == s.site) norm(h, n);
      const std::string p = h + s.path + "/";
      // A projection into the residual stream (row-parallel) is initialised scaled, as Linear registers it.
      const bool residual = !s.column;
      const int r = c.lowrank_rank[static_cast<int>(s.site)];
      if (r > 0) {
        const TensorRole role = residual ? TensorRole::residual_factor : TensorRole::factor;
        add(p + "A", {r, s.in}, role, quantized);
        add(p + "B", {s.out, r}, role, quantized);
      } else {
        add(p + "W", {s.out, s.in}, residual ? TensorRole::residual_weight : TensorRole::weight, quantized);
      }
      if (s.bias) add(p + "b", {s.out}, TensorRole::bias, false);
    }
  }
  norm("", a.final_norm);
  if (!a.output_head.empty()) add(a.output_head, {V, C}, TensorRole::embedding, tables);
  return out;
}

StoredBytes save_random_model(const std::string& path, const ModelConfig& c, uint64_t seed,
                              const Config* run) {
  const std::vector<RandomTensor> tensors = random_tensors(c);
  std::vector<ModelFileTensor> files;
  std::map<std::string, const RandomTensor*> by_name;
  for (const RandomTensor& t : tensors) {
    files.push_back(t.file);
    by_name[t.file.name] = &t;
  }
  // lowrank.init product_std: a factor "h.l/<site path>/A" or "/B" is drawn from its site's in + out.
  const Architecture arch = describe_architecture(c);
  auto product_std_fan = [&](const std::string& name, TensorRole role) -> int64_t {
    if (!c.lowrank_product_std || (role != TensorRole::factor && role != TensorRole::residual_factor))
      return 0;
    const std::string module = name.substr(0, name.rfind('/'));
    for (const LinearSpec& s : arch.sites)
      if (module.ends_with("/" + s.path)) return s.in + s.out;
    return 0;
  };
  return save_model_file(
      path, "export", c, files,
      [&](const std::string& name) {
        const RandomTensor& t = *by_name.at(name);
        return init_values(seed, name, t.role, t.file.shape, c.n_layer, product_std_fan(name, t.role));
      },
      run);
}

}  // namespace lrllm

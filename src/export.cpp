#include "lrllm/export.h"

#include <cstdio>
#include <filesystem>
#include <vector>

#include "lrllm/backend.h"
#include "lrllm/checkpoint.h"
#include "lrllm/common.h"
#include "lrllm/model.h"

namespace lrllm {
namespace {

// A float tensor of a loaded model by name, from whichever table holds it (CPU backend: host memory).
float* find_tensor(Model& model, const std::string& name, const TensorInfo** info) {
  if (const TensorInfo* t = model.table().find(name)) {
    *info = t;
    return model.params() + t->offset;
  }
  if (const TensorInfo* t = model.frozen_table().find(name)) {
    *info = t;
    return model.frozen() + t->offset;
  }
  *info = nullptr;
  return nullptr;
}

const float* require_tensor(Model& model, const std::string& name) {
  const TensorInfo* info = nullptr;
  const float* p = find_tensor(model, name, &info);
  if (p == nullptr) throw RuntimeError("export: the source model has no tensor " + name);
  return p;
}

// The dense weight [out, in] of a source layer: float W, or its dequantized codes.
std::vector<float> dense_weight(Model& src, Linear& layer) {
  std::vector<float> w(static_cast<std::size_t>(layer.out()) * layer.in());
  if (layer.quantized()) {
    const QuantizedTensor& q = src.quantized_weight(layer);
    dequantize(q, 0, q.size(), w.data());
  } else {
    const float* p = require_tensor(src, layer.prefix() + "/W");
    std::copy(p, p + w.size(), w.begin());
  }
  return w;
}

}  // namespace

int run_export(const Config& cfg) {
  if (cfg.model.init.empty())
    throw InputError("--mode export needs --model.init (a checkpoint or model file)");
  if (cfg.data.output.empty()) throw InputError("--mode export needs --data.output (the file to write)");
  const ModelConfig in_cfg = read_model_config(cfg.model.init);
  const bool merge = cfg.finetune.lora_merge && in_cfg.any_lora();
  ModelConfig out_cfg = in_cfg;
  if (merge) {
    // W + s B_l A_l: a dense site absorbs the product; a low-rank site B A grows to [B, s B_l] [A; A_l].
    for (int s = 0; s < kNumSites; ++s) {
      if (out_cfg.lowrank_rank[s] > 0) out_cfg.lowrank_rank[s] += out_cfg.lora_rank[s];
      out_cfg.lora_rank[s] = 0;
    }
  }
  const int bits = cfg.finetune.quant_bits;
  out_cfg.quant = bits == 8 ? "int8" : bits == 4 ? "nf4" : "none";
  out_cfg.quant_block = cfg.finetune.quant_block;
  out_cfg.quant_double = cfg.finetune.quant_double;
  out_cfg.quant_embedding = bits != 0 && cfg.finetune.quant_embedding;
  validate_model_config(out_cfg);

  auto backend = make_cpu_backend();
  Model src(in_cfg, *backend, false);
  load_weights(cfg.model.init, src);
  Model dst(out_cfg, *backend, false);

  // Every float tensor the two models share by name is copied as it is.
  for (const ParamTable* table : {&dst.table(), &dst.frozen_table()}) {
    float* base = table == &dst.table() ? dst.params() : dst.frozen();
    for (const TensorInfo& t : table->tensors()) {
      const TensorInfo* from = nullptr;
      const float* p = find_tensor(src, t.name, &from);
      if (p != nullptr && from->shape == t.shape) std::copy(p, p + t.size, base + t.offset);
    }
  }
  // Then the linear weights that change: merged adapters, and dense weights that change storage.
  std::vector<Linear*> src_layers, dst_layers;
  for (Model* m : {&src, &dst}) {
    std::vector<Linear*>& out = m == &src ? src_layers : dst_layers;
    for (int l = 0; l < m->config().n_layer; ++l)
      for (int s = 0; s < kNumSites; ++s) out.push_back(&m->layer(l, static_cast<LinearSite>(s)));
  }
  for (std::size_t i = 0; i < src_layers.size(); ++i) {
    Linear& from = *src_layers[i];
    Linear& to = *dst_layers[i];
    const float scale = static_cast<float>(in_cfg.lora_alpha / std::max(1, from.lora_rank()));
    const std::string& prefix = from.prefix();
    if (to.lowrank()) {
      if (!merge || from.lora_rank() == 0) continue;  // copied by name above
      const int r = from.rank(), rl = from.lora_rank(), in = from.in(), out = from.out();
      const float *A = require_tensor(src, prefix + "/A"), *B = require_tensor(src, prefix + "/B");
      const float *LA = require_tensor(src, prefix + "/lora_A"),
                  *LB = require_tensor(src, prefix + "/lora_B");
      const TensorInfo* ta = nullptr;
      const TensorInfo* tb = nullptr;
      float* dA = find_tensor(dst, prefix + "/A", &ta);
      float* dB = find_tensor(dst, prefix + "/B", &tb);
      std::copy(A, A + static_cast<std::size_t>(r) * in, dA);
      std::copy(LA, LA + static_cast<std::size_t>(rl) * in, dA + static_cast<std::size_t>(r) * in);
      for (int o = 0; o < out; ++o) {
        for (int k = 0; k < r; ++k) dB[o * (r + rl) + k] = B[o * r + k];
        for (int k = 0; k < rl; ++k) dB[o * (r + rl) + r + k] = scale * LB[o * rl + k];
      }
      continue;
    }
    std::vector<float> w = dense_weight(src, from);
    if (merge && from.lora_rank() > 0) {
      // W += s lora_B lora_A
      backend->matmul(w.data(), require_tensor(src, prefix + "/lora_B"),
                      require_tensor(src, prefix + "/lora_A"), from.out(), from.in(), from.lora_rank(), false,
                      false, scale, 1.0f);
    }
    if (to.quantized()) {
      const std::vector<int64_t> shape = {to.out(), to.in()};
      dst.quantized_weight(to) =
          out_cfg.quant == "int8" ? quantize_int8(w.data(), shape, out_cfg.quant_block)
                                  : quantize_nf4(w.data(), shape, out_cfg.quant_double, out_cfg.quant_block);
    } else {
      const TensorInfo* t = nullptr;
      float* dW = find_tensor(dst, prefix + "/W", &t);
      std::copy(w.begin(), w.end(), dW);
    }
  }
  // The tied embedding, when either side stores it quantized (otherwise it was copied by name).
  if (src.quantized_embedding() != nullptr || dst.quantized_embedding() != nullptr) {
    const std::vector<int64_t> shape = {in_cfg.vocab_size, in_cfg.d_model};
    std::vector<float> wte(static_cast<std::size_t>(shape[0] * shape[1]));
    if (const QuantizedTensor* q = src.quantized_embedding())
      dequantize(*q, 0, q->size(), wte.data());
    else
      std::copy_n(require_tensor(src, "wte"), wte.size(), wte.begin());
    if (QuantizedTensor* q = dst.quantized_embedding()) {
      *q = out_cfg.quant == "int8"
               ? quantize_int8(wte.data(), shape, out_cfg.quant_block)
               : quantize_nf4(wte.data(), shape, out_cfg.quant_double, out_cfg.quant_block);
    } else {
      const TensorInfo* t = nullptr;
      std::copy(wte.begin(), wte.end(), find_tensor(dst, "wte", &t));
    }
  }
  save_checkpoint(cfg.data.output, "export", dst, nullptr, nullptr);
  const MemoryBytes mem = dst.memory(1);
  std::printf(
      "exported %s -> %s: %s weights%s, %.2f MB of parameters (float32 %.2f MB, quantized %.2f MB); file "
      "%.2f MB\n",
      cfg.model.init.c_str(), cfg.data.output.c_str(),
      out_cfg.quant == "none" ? "float32" : out_cfg.quant.c_str(),
      merge ? ", adapters merged" : (out_cfg.any_lora() ? ", adapters kept" : ""), mem.params / 1e6,
      (mem.params_trainable + mem.params_frozen) / 1e6, mem.params_quantized / 1e6,
      static_cast<double>(std::filesystem::file_size(cfg.data.output)) / 1e6);
  return 0;
}

}  // namespace lrllm

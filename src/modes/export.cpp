#include "lrllm/modes/export.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <vector>

#include "lrllm/backend/backend.h"
#include "lrllm/core/common.h"
#include "lrllm/io/checkpoint.h"
#include "lrllm/io/hdf5.h"
#include "lrllm/io/hf_model.h"
#include "lrllm/io/peft.h"
#include "lrllm/io/safetensors.h"
#include "lrllm/io/tokenizer.h"
#include "lrllm/model/model.h"
#include "lrllm/modes/random_model.h"
#include "lrllm/train/train.h"

namespace fs = std::filesystem;

namespace lrllm {
namespace {

// The float values of a source tensor by its path under /model: from a float table, or dequantized.
std::vector<float> source_values(Model& src, const std::string& name) {
  for (auto [table, base] :
       {std::pair{&src.table(), src.params()}, std::pair{&src.frozen_table(), src.frozen()}})
    if (const TensorInfo* t = table->find(name))
      return std::vector<float>(base + t->offset, base + t->offset + t->size);
  if (const QuantizedTensor* q = src.find_quantized(name)) {
    std::vector<float> v(q->size());
    dequantize(*q, 0, q->size(), v.data());
    return v;
  }
  throw RuntimeError("export: the source model has no tensor " + name);
}

// A tensor of the exported model: the source's, or with lora.merge a base tensor with its layer's adapters
// folded in: W + s lora_B lora_A for a dense site; a low-rank site B A grows to [B, s lora_B] [A; lora_A].
std::vector<float> export_values(Model& src, Backend& be, bool merge, const std::string& name) {
  std::vector<float> v = source_values(src, name);
  if (merge && name == "wte" && !src.config().trainable_tokens.empty()) {
    // The trainable tokens' deltas fold into their rows.
    const std::vector<float> delta = source_values(src, kTokenDeltaName);
    const std::size_t C = src.config().d_model;
    for (std::size_t j = 0; j < src.config().trainable_tokens.size(); ++j)
      for (std::size_t c = 0; c < C; ++c) v[src.config().trainable_tokens[j] * C + c] += delta[j * C + c];
    return v;
  }
  const std::size_t slash = name.rfind('/');
  const std::string leaf = slash == std::string::npos ? name : name.substr(slash + 1);
  if (!merge || (leaf != "W" && leaf != "A" && leaf != "B")) return v;
  const std::string prefix = name.substr(0, slash);
  const TensorInfo* la = src.table().find(prefix + "/lora_A");
  if (la == nullptr) return v;
  const TensorInfo* lb = src.table().find(prefix + "/lora_B");
  const float* LA = src.params() + la->offset;
  const float* LB = src.params() + lb->offset;
  const int rl = static_cast<int>(la->shape[0]), in = static_cast<int>(la->shape[1]),
            out = static_cast<int>(lb->shape[0]);
  const float scale = static_cast<float>(src.config().lora_alpha / rl);
  if (leaf == "W") {
    be.matmul(v.data(), LB, LA, out, in, rl, false, false, scale, 1.0f);  // W += s lora_B lora_A
    return v;
  }
  if (leaf == "A") {
    v.insert(v.end(), LA, LA + static_cast<std::size_t>(rl) * in);
    return v;
  }
  const int r = static_cast<int>(v.size() / out);
  std::vector<float> grown(static_cast<std::size_t>(out) * (r + rl));
  for (int o = 0; o < out; ++o) {
    std::copy_n(v.begin() + static_cast<std::ptrdiff_t>(o) * r, r,
                grown.begin() + static_cast<std::ptrdiff_t>(o) * (r + rl));
    for (int k = 0; k < rl; ++k)
      grown[static_cast<std::size_t>(o) * (r + rl) + r + k] = scale * LB[o * rl + k];
  }
  return grown;
}

// --lora.only: the adapters and the tensors trained beside them, with the base's identity.
int export_adapters(const Config& cfg, const ModelConfig& in_cfg) {
  if (!in_cfg.any_lora())
    throw InputError("--lora.only: " +
                     (cfg.model.init.empty() ? std::string("a model of random weights") : cfg.model.init) +
                     " has no LoRA adapters to export");
  const LoadedModel loaded = load_model(cfg, "cpu", 0);
  Model& src = *loaded.model;
  save_adapters(cfg.data.output, src, &cfg);
  std::printf(
      "exported the adapters of %s -> %s: %zu tensors, %.3f MB of parameters; file %.3f MB; base %s "
      "(checksum %s)\n",
      cfg.model.init.c_str(), cfg.data.output.c_str(), src.table().tensors().size(),
      src.table().total() * 4 / 1e6, static_cast<double>(std::filesystem::file_size(cfg.data.output)) / 1e6,
      in_cfg.base.c_str(), in_cfg.base_checksum.c_str());
  return 0;
}

void copy_into(const fs::path& from, const fs::path& to) {
  std::error_code ec;
  fs::copy_file(from, to, fs::copy_options::overwrite_existing, ec);
  if (ec) throw RuntimeError("cannot copy " + from.string() + " to " + to.string() + ": " + ec.message());
}

// The tokenizer files of each architecture, and their names in a Hugging Face folder.
std::vector<std::pair<const char*, const char*>> tokenizer_files(const ModelConfig& m) {
  if (m.llama()) return {{"tokenizer.json", "tokenizer.json"}};
  return {{"encoder.json", "vocab.json"}, {"vocab.bpe", "merges.txt"}};
}

// What an interrupted hf or peft export leaves in OUTPUT.tmp/, which the next one may remove.
bool is_partial_export(const fs::path& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return false;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (name != "config.json" && name != "model.safetensors" && name != "model.safetensors.tmp" &&
        name != "vocab.json" && name != "merges.txt" && name != "tokenizer.json" &&
        name != "adapter_config.json" && name != "adapter_model.safetensors" &&
        name != "adapter_model.safetensors.tmp")
      return false;
  }
  return true;
}

// A new folder at --data.output, built as OUTPUT.tmp/ by fill and renamed into place.
void write_folder(const Config& cfg, const std::function<void(const fs::path&)>& fill) {
  const fs::path out = cfg.data.output, tmp = cfg.data.output + ".tmp";
  std::error_code ec;
  if (fs::exists(out, ec))
    throw InputError("--data.output " + cfg.data.output + " exists; --export.format " + cfg.exporting.format +
                     " writes a new folder there (give another path)");
  const fs::path parent = out.parent_path().empty() ? fs::path(".") : out.parent_path();
  if (!fs::is_directory(parent, ec))
    throw InputError("--data.output " + cfg.data.output + ": the folder " + parent.string() +
                     " does not exist");
  if (fs::exists(tmp, ec) && !is_partial_export(tmp))
    throw InputError(tmp.string() +
                     " exists and is not what an interrupted export leaves; move it away first");
  fs::remove_all(tmp, ec);
  try {
    fs::create_directory(tmp);
    fill(tmp);
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
  fs::rename(tmp, out, ec);
  if (ec) throw RuntimeError("cannot rename " + tmp.string() + " to " + out.string() + ": " + ec.message());
}

// --export.format hf: a folder transformers loads as the architecture's model class (GPT2LMHeadModel,
// LlamaForCausalLM; docs/design.md, safetensors and Hugging Face folders). Its linear layers are dense, so
// adapters are always merged and a low-rank site is written as its product W = B A; a fused lrllm site is
// split back into the HF tensors that hold its rows.
int export_hf(const Config& cfg, const ModelConfig& in_cfg, bool random) {
  if (cfg.finetune.lora_only)
    throw InputError("--lora.only writes an lrllm adapter file; --export.format hf writes whole models");
  if (cfg.finetune.quant_bits != 0)
    throw InputError(
        "--quant.bits stores lrllm's quantized layers; --export.format hf stores --export.dtype");
  const HfArch& arch = hf_arch(in_cfg.arch);
  const SafetensorsDtype dtype = parse_export_dtype(cfg.exporting.dtype);
  const std::string torch_dtype = dtype == SafetensorsDtype::f32    ? "float32"
                                  : dtype == SafetensorsDtype::bf16 ? "bfloat16"
                                                                    : "float16";
  // The tokenizer goes with the model where it fits the vocabulary (a small random model's may not).
  std::error_code ec;
  const fs::path tok = random ? fs::path(cfg.data.tokenizer_dir) : fs::path(tokenizer_dir_for(cfg));
  bool tokenizer = true;
  std::string tok_names;
  for (const auto& [ours, theirs] : tokenizer_files(in_cfg)) {
    tokenizer = tokenizer && fs::exists(tok / ours, ec);
    tok_names += (tok_names.empty() ? "" : " and ") + std::string(ours);
  }
  if (!tokenizer && cfg.was_given("data.tokenizer_dir"))
    throw InputError("--data.tokenizer_dir " + tok.string() + " has no " + tok_names);
  if (tokenizer) {
    const int tokens = Tokenizer::load_dir(tok.string()).vocab_size();
    if (tokens > in_cfg.vocab_size && cfg.was_given("data.tokenizer_dir"))
      throw InputError(
          strprintf("--data.tokenizer_dir %s has %d tokens, more than the model's vocabulary of %d",
                    tok.c_str(), tokens, in_cfg.vocab_size));
    tokenizer = tokens <= in_cfg.vocab_size;
  }

  // A dense float model file is read tensor by tensor, as an import writes one: a 7B export never holds the
  // model. Adapters, low-rank sites and quantized layers need the model built (merging, B A, dequantizing).
  const bool stream = !random && cfg.finetune.lora_init.empty() && !in_cfg.any_lora() &&
                      !in_cfg.any_lowrank() && in_cfg.quant == QuantKind::none && !in_cfg.quant_embedding;
  auto backend = make_cpu_backend();
  std::unique_ptr<Model> model;
  std::unique_ptr<H5File> file;
  if (stream) {
    file = std::make_unique<H5File>(H5File::open_read(cfg.model.init));
  } else {
    model = std::make_unique<Model>(in_cfg, *backend, false);
    if (random)
      model->init_random(cfg.seed);
    else
      load_input_weights(cfg, *model);
  }
  const bool merge = in_cfg.any_lora();
  ModelConfig dense = in_cfg;
  for (int s = 0; s < kNumSites; ++s) dense.lowrank_rank[s] = dense.lora_rank[s] = 0;
  // The lrllm tensor last computed: the HF tensors of one fused site are written one after the other, and
  // compute it (a merge, a product B A) once.
  auto last = std::make_shared<std::pair<std::string, std::vector<float>>>();
  auto lrllm_tensor = [&model, &file, &backend, merge, last](const HfTensor& t) -> const std::vector<float>& {
    if (last->first == t.lrllm) return last->second;
    std::vector<float> v;
    if (file) {
      std::size_t n = 1;
      for (int64_t d : t.lrllm_shape) n *= static_cast<std::size_t>(d);
      v.resize(n);
      file->read("/model/" + t.lrllm, v.data(), t.lrllm_shape);
      *last = {t.lrllm, std::move(v)};
      return last->second;
    }
    Model& src = *model;
    const std::size_t slash = t.lrllm.rfind('/');
    const std::string site = t.lrllm.substr(0, slash);
    if (t.lrllm.ends_with("/W") && src.table().find(t.lrllm) == nullptr &&
        src.frozen_table().find(t.lrllm) == nullptr && src.find_quantized(t.lrllm) == nullptr) {
      // A low-rank site: W = B A, [out, r] [r, in].
      const std::vector<float> A = export_values(src, *backend, merge, site + "/A");
      const std::vector<float> B = export_values(src, *backend, merge, site + "/B");
      const int out = static_cast<int>(t.lrllm_shape[0]), in = static_cast<int>(t.lrllm_shape[1]);
      const int r = static_cast<int>(A.size() / in);
      v.assign(static_cast<std::size_t>(out) * in, 0.0f);
      backend->matmul(v.data(), B.data(), A.data(), out, in, r, false, false, 1.0f, 0.0f);
    } else {
      v = export_values(src, *backend, merge, t.lrllm);
    }
    *last = {t.lrllm, std::move(v)};
    return last->second;
  };
  std::vector<SafetensorsEntry> entries;
  for (const HfTensor& t : arch.tensors(dense, nullptr, false))
    entries.push_back({t.hf, dtype, t.hf_shape, [lrllm_tensor, t] { return hf_slice(t, lrllm_tensor(t)); }});
  write_folder(cfg, [&](const fs::path& tmp) {
    {
      std::ofstream config(tmp / "config.json");
      config << arch.config_json(dense, torch_dtype);
      config.flush();
      if (!config) throw RuntimeError("cannot write " + (tmp / "config.json").string());
    }
    // transformers refuses a safetensors file whose metadata does not name its framework.
    write_safetensors((tmp / "model.safetensors").string(), entries, {{"format", "pt"}});
    if (tokenizer)
      for (const auto& [ours, theirs] : tokenizer_files(in_cfg)) copy_into(tok / ours, tmp / theirs);
  });
  std::string hf_names;
  for (const auto& [ours, theirs] : tokenizer_files(in_cfg))
    hf_names += (hf_names.empty() ? "" : ", ") + std::string(theirs);
  std::printf(
      "exported %s -> %s (Hugging Face %s, %s%s%s): %.2f MB; tokenizer %s\n",
      random ? "(random weights)" : cfg.model.init.c_str(), cfg.data.output.c_str(), arch.hf_class(),
      safetensors_dtype_name(dtype), merge ? ", adapters merged" : "",
      in_cfg.any_lowrank() ? ", low-rank layers as W = B A" : "",
      static_cast<double>(fs::file_size(fs::path(cfg.data.output) / "model.safetensors", ec)) / 1e6,
      tokenizer ? hf_names.c_str() : "none (no tokenizer of the architecture that fits the vocabulary)");
  return 0;
}

// --export.format peft: the adapters alone, as a PEFT LoRA folder over the Hugging Face export of the base
// (docs/design.md, PEFT adapters).
int export_peft(const Config& cfg, const ModelConfig& in_cfg) {
  if (cfg.model.init.empty())
    throw InputError("--export.format peft needs --model.init (a model with adapters)");
  if (!in_cfg.any_lora())
    throw InputError("--export.format peft: " + cfg.model.init + " has no LoRA adapters to export");
  if (!in_cfg.lora_modules.empty())
    throw InputError(
        "--export.format peft: " + cfg.model.init + " trains base tensors beside its adapters (" +
        in_cfg.lora_modules +
        "), which a PEFT folder would carry as modules_to_save: export it merged (--export.format "
        "hf) or as lrllm adapters (--lora.only true)");
  if (!in_cfg.trainable_tokens.empty())
    throw InputError("--export.format peft: " + cfg.model.init +
                     " trains token rows, which PEFT's LoRA adapters do not hold: export it merged "
                     "(--export.format hf) or as lrllm adapters (--lora.only true)");
  if (cfg.finetune.lora_only || cfg.finetune.lora_merge || cfg.finetune.quant_bits != 0)
    throw InputError(
        "--export.format peft writes the adapters as they are: no --lora.only, --lora.merge or --quant.bits");
  const SafetensorsDtype dtype = parse_export_dtype(cfg.exporting.dtype);
  const LoadedModel loaded = load_model(cfg, "cpu", 0);
  Model& src = *loaded.model;
  write_folder(cfg, [&](const fs::path& tmp) {
    write_peft_adapters(
        tmp.string(), in_cfg, [&src](const std::string& name) { return source_values(src, name); }, dtype,
        in_cfg.base, in_cfg.base_checksum, cfg.finetune.lora_dropout);
  });
  std::error_code ec;
  std::printf(
      "exported the adapters of %s -> %s (PEFT LoRA over %s, %s): %.3f MB; base %s\n", cfg.model.init.c_str(),
      cfg.data.output.c_str(), hf_arch(in_cfg.arch).hf_class(), safetensors_dtype_name(dtype),
      static_cast<double>(fs::file_size(fs::path(cfg.data.output) / "adapter_model.safetensors", ec)) / 1e6,
      in_cfg.base.empty() ? "(not recorded)" : in_cfg.base.c_str());
  return 0;
}

}  // namespace

int run_export(const Config& cfg) {
  if (cfg.data.output.empty()) throw InputError("--mode export needs --data.output (the file to write)");
  // Without a model to read, the model options describe one with random weights: enough to size an export.
  const bool random = cfg.model.init.empty();
  if (cfg.exporting.format == "hf") {
    const ModelConfig hf_cfg = random ? resolve_model_config(cfg, "") : read_input_model_config(cfg);
    // GPT2LMHeadModel has dense layers, written as W = B A, which a silu site does not compute.
    if (hf_cfg.lowrank_silu)
      throw InputError("--export.format hf: W = B A does not hold for lowrank.activation silu");
    return export_hf(cfg, hf_cfg, random);
  }
  if (cfg.exporting.format == "peft")
    return export_peft(cfg, random ? ModelConfig{} : read_input_model_config(cfg));
  H5File::check_output(cfg.data.output, "data.output");
  // Random weights are never built in float32 (save_random_model), so only the file's model is checked below.
  ModelConfig in_cfg = cfg.model;
  if (random)
    apply_lowrank(cfg, in_cfg);
  else
    in_cfg = read_input_model_config(cfg);
  if (cfg.finetune.lora_only) return export_adapters(cfg, in_cfg);
  const bool merge = cfg.finetune.lora_merge && in_cfg.any_lora();
  // Merging appends the adapters to a low-rank site's factors (B A + B_l A_l = [B B_l] [A; A_l]), which
  // silu(A x) would pass through silu too.
  if (merge && in_cfg.lowrank_silu)
    throw InputError(
        "--lora.merge: W = B A does not hold for lowrank.activation silu, so adapters cannot be merged");
  ModelConfig out_cfg = in_cfg;
  if (merge) {
    for (int s = 0; s < kNumSites; ++s) {
      if (out_cfg.lowrank_rank[s] > 0) out_cfg.lowrank_rank[s] += out_cfg.lora_rank[s];
      out_cfg.lora_rank[s] = 0;
    }
  }
  out_cfg.quant = quant_from_bits(cfg.finetune.quant_bits);
  out_cfg.quant_block = cfg.finetune.quant_block;
  out_cfg.quant_double = cfg.finetune.quant_double;
  out_cfg.quant_embedding = out_cfg.quant != QuantKind::none && cfg.finetune.quant_embedding;
  if (merge) {  // without adapters every tensor is the model's own
    out_cfg.lora_modules.clear();
    out_cfg.trainable_tokens.clear();
  }
  validate_model_config(out_cfg);
  validate_saved_modules(out_cfg);
  if (random) {
    const StoredBytes stored = save_random_model(cfg.data.output, out_cfg, cfg.seed, &cfg);
    std::printf(
        "exported (random weights) -> %s, a tensor at a time: %s weights, %.2f MB of parameters "
        "(float32 %.2f MB, quantized %.2f MB); file %.2f MB\n",
        cfg.data.output.c_str(), storage_name(out_cfg.quant), (stored.float32 + stored.quantized) / 1e6,
        stored.float32 / 1e6, stored.quantized / 1e6,
        static_cast<double>(std::filesystem::file_size(cfg.data.output)) / 1e6);
    return 0;
  }

  auto backend = make_cpu_backend();
  Model src(in_cfg, *backend, false);
  load_input_weights(cfg, src);
  Model dst(out_cfg, *backend, false);
  for (const ParamTable* table : {&dst.table(), &dst.frozen_table()}) {
    float* base = table == &dst.table() ? dst.params() : dst.frozen();
    for (const TensorInfo& t : table->tensors()) {
      const std::vector<float> v = export_values(src, *backend, merge, t.name);
      std::copy(v.begin(), v.end(), base + t.offset);
    }
  }
  for (QuantizedEntry& e : dst.quantized_tensors()) {
    const std::vector<float> v = export_values(src, *backend, merge, e.name);
    e.tensor = quantize(out_cfg.quant, v.data(), e.shape, out_cfg.quant_double, out_cfg.quant_block);
  }
  save_checkpoint(cfg.data.output, "export", dst, nullptr, nullptr, &cfg);
  dst.reserve(1);
  const MemoryBytes mem = dst.memory();
  std::printf(
      "exported %s -> %s: %s weights%s, %.2f MB of parameters (float32 %.2f MB, quantized %.2f MB); file "
      "%.2f MB\n",
      cfg.model.init.c_str(), cfg.data.output.c_str(), storage_name(out_cfg.quant),
      merge ? ", adapters merged" : (out_cfg.any_lora() ? ", adapters kept" : ""), mem.params / 1e6,
      (mem.params_trainable + mem.params_frozen) / 1e6, mem.params_quantized / 1e6,
      static_cast<double>(std::filesystem::file_size(cfg.data.output)) / 1e6);
  return 0;
}

}  // namespace lrllm

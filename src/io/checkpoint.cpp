#include "lrllm/io/checkpoint.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <sstream>
#include <string_view>
#include <vector>

#include "lrllm/core/common.h"
#include "lrllm/core/signals.h"
#include "lrllm/core/version.h"
#include "lrllm/io/hdf5.h"
#include "lrllm/io/instruct.h"
#include "lrllm/io/metrics.h"
#include "lrllm/io/peft.h"

namespace fs = std::filesystem;

namespace lrllm {
namespace {

int positive_attr(const H5File& f, const char* name) {
  const int64_t v = f.attr_int("/config", name);
  if (v <= 0 || v > (1 << 24))
    throw InputError(f.path() + ": /config " + name + " = " + std::to_string(v) + " is not a valid size");
  return static_cast<int>(v);
}

// The first dimension of a 2-D factor (a rank): shape[0] of a dataset, or of the shape attribute of
// quantized codes.
int leading_dim(const H5File& f, const std::string& object, bool quantized) {
  const std::vector<int64_t> shape = quantized ? f.attr_ints(object, "shape") : f.shape(object);
  if (shape.size() != 2 || shape[0] < 1 || shape[0] > (1 << 24))
    throw InputError(f.path() + ": " + object + " has shape " + shape_string(shape) +
                     ", expected a matrix of at least one row");
  return static_cast<int>(shape[0]);
}

// Writes tensors of the model's layout from a host copy of a flat buffer under group.
void write_tensors(H5File& f, const std::string& group, const ParamTable& table,
                   const std::vector<float>& flat) {
  for (const TensorInfo& t : table.tensors()) f.write(group + "/" + t.name, flat.data() + t.offset, t.shape);
}

// Reads the tensors of the table's layout under group into a host copy of a flat buffer (the optimizer's
// moments, of which a ZeRO shard keeps a range). A tensor-parallel part reads the full tensor and keeps its
// slice.
void read_tensors(const H5File& f, const std::string& group, const ParamTable& table,
                  std::vector<float>& flat) {
  std::vector<float> full;
  for (const TensorInfo& t : table.tensors()) {
    if (t.split.axis < 0) {
      f.read(group + "/" + t.name, flat.data() + t.offset, t.shape);
      continue;
    }
    full.resize(t.size * t.split.parts);
    f.read(group + "/" + t.name, full.data(), t.full_shape);
    extract_part(t, full.data(), flat.data() + t.offset);
  }
}

// The same into a backend's buffer of the table's layout, a tensor at a time: a host copy of the whole table
// would double a large frozen base's memory while it loads (Llama-2 7B's float32 embeddings: 1 GB). Without
// adapters: all but lora_A, lora_B and the tokens' delta (a base file, whose saved modules are read and whose
// adapters do not exist yet), which keep their values.
void read_tensors_to_device(const H5File& f, const std::string& group, const ParamTable& table, Backend& be,
                            float* device, bool adapters = true) {
  std::vector<float> full, part;
  for (const TensorInfo& t : table.tensors()) {
    if (!adapters && is_adapter(t.role)) continue;
    part.resize(t.size);
    if (t.split.axis < 0) {
      f.read(group + "/" + t.name, part.data(), t.shape);
    } else {
      full.resize(t.size * t.split.parts);
      f.read(group + "/" + t.name, full.data(), t.full_shape);
      extract_part(t, full.data(), part.data());
    }
    be.to_device(device + t.offset, part.data(), part.size() * sizeof(float));
  }
}

std::vector<float> to_host(Backend& be, const float* dev, std::size_t n) {
  std::vector<float> host(n);
  be.to_host(host.data(), dev, n * sizeof(float));
  return host;
}

}  // namespace

namespace {

// /config quant, the base's storage.
QuantKind quant_of(const H5File& f) {
  try {
    return quant_from_name(f.attr_string("/config", "quant"));
  } catch (const InputError& e) {
    throw InputError(f.path() + ": /config " + e.what());
  }
}

// /config prompt_template, or "" when none is recorded.
std::string prompt_template_of(const H5File& f) {
  if (!f.has_attr("/config", "prompt_template")) return "";
  std::string name = f.attr_string("/config", "prompt_template");
  if (!is_prompt_template(name))
    throw InputError(f.path() + ": /config prompt_template '" + name + "' is not fingpt or alpaca");
  return name;
}

// /config trainable_tokens, or none.
std::vector<int32_t> trainable_tokens_of(const H5File& f) {
  std::vector<int32_t> ids;
  if (!f.has_attr("/config", "trainable_tokens")) return ids;
  for (int64_t id : f.attr_ints("/config", "trainable_tokens")) {
    if (id < 0 || id > std::numeric_limits<int32_t>::max())
      throw InputError(f.path() + ": /config trainable_tokens holds " + std::to_string(id) +
                       ", not a token id");
    ids.push_back(static_cast<int32_t>(id));
  }
  return ids;
}

}  // namespace

// The highest feature present names the version (docs/design.md, Versions).
int64_t format_version_of(const ModelConfig& m) {
  if (m.lowrank_silu) return 5;
  if (m.llama()) return 4;
  if (m.any_lora() && !m.trainable_tokens.empty()) return 3;
  return m.any_lora() && !m.lora_modules.empty() ? 2 : 1;
}

ModelConfig read_model_config(const std::string& path) {
  const H5File f = H5File::open_read(path);
  if (!f.has_attr("/", "format") || f.attr_string("/", "format") != "lrllm")
    throw InputError(path + ": not an lrllm file (root attribute format is not \"lrllm\")");
  const int64_t version = f.attr_int("/", "format_version");
  if (version < 1 || version > kFormatVersion)
    throw InputError(path + ": format_version " + std::to_string(version) +
                     " is not supported (this lrllm reads 1 to " + std::to_string(kFormatVersion) + ")");
  ModelConfig m;
  m.arch = f.attr_string("/config", "arch");
  if (!is_arch(m.arch) || (m.llama() && version < 4))
    throw InputError(path + ": arch '" + m.arch + "' is not supported at format_version " +
                     std::to_string(version) + " (gpt2 from 1, llama from 4)");
  m.vocab_size = positive_attr(f, "vocab_size");
  m.seq_len = positive_attr(f, "seq_len");
  m.n_layer = positive_attr(f, "n_layer");
  m.n_head = positive_attr(f, "n_head");
  m.d_model = positive_attr(f, "d_model");
  m.d_ff = positive_attr(f, "d_ff");
  if (m.llama()) {
    m.n_kv_head = positive_attr(f, "n_kv_head");
    m.rope_theta = f.attr_double("/config", "rope_theta");
    m.norm_eps = f.attr_double("/config", "norm_eps");
  }
  for (const LinearSpec& spec : describe_architecture(m).sites) {
    const int s = static_cast<int>(spec.site);
    const std::string site = "/model/" + block_name(0) + "/" + spec.path;
    m.lowrank_rank[s] = f.exists(site + "/A")     ? leading_dim(f, site + "/A", false)
                        : f.exists(site + "/A_q") ? leading_dim(f, site + "/A_q", true)
                                                  : 0;
    m.lora_rank[s] = f.exists(site + "/lora_A") ? leading_dim(f, site + "/lora_A", false) : 0;
  }
  // Version 5: a silu site computes B silu(A x); older files are all B A x.
  if (version >= 5 && f.has_attr("/config", "lowrank_activation")) {
    const std::string act = f.attr_string("/config", "lowrank_activation");
    if (act != "none" && act != "silu")
      throw InputError(path + ": /config lowrank_activation is '" + act + "', not none or silu");
    m.lowrank_silu = act == "silu";
  }
  if (f.has_attr("/config", "lowrank_init"))
    m.lowrank_product_std = f.attr_string("/config", "lowrank_init") == "product_std";
  if (f.has_attr("/config", "lora_alpha")) m.lora_alpha = f.attr_double("/config", "lora_alpha");
  if (f.has_attr("/config", "quant")) m.quant = quant_of(f);
  if (f.has_attr("/config", "quant_block")) {
    const int64_t block = f.attr_int("/config", "quant_block");
    m.quant_block = block >= 1 && block <= 4096 ? static_cast<int>(block) : 0;  // 0: refused below
  }
  m.quant_embedding = f.exists("/model/wte_q");
  if (f.has_attr("/config", "quant_double")) m.quant_double = f.attr_int("/config", "quant_double") != 0;
  if (f.has_attr("/config", "base")) m.base = f.attr_string("/config", "base");
  if (f.has_attr("/config", "base_checksum")) m.base_checksum = f.attr_string("/config", "base_checksum");
  if (version >= 2 && f.has_attr("/config", "lora_modules"))
    m.lora_modules = f.attr_string("/config", "lora_modules");
  if (version >= 3) m.trainable_tokens = trainable_tokens_of(f);
  m.prompt_template = prompt_template_of(f);
  if (f.has_attr("/config", "tokenizer_dir")) {
    const fs::path dir = f.attr_string("/config", "tokenizer_dir");
    m.tokenizer_dir =
        dir.is_absolute() ? dir.string() : (fs::path(path).parent_path() / dir).lexically_normal().string();
  }
  m.init = path;
  // The same checks as the shape given as options: a file altered by hand must not reach the model's
  // arithmetic with sizes the command line would refuse.
  try {
    validate_model_config(m);
    validate_saved_modules(m);
  } catch (const InputError& e) {
    throw InputError(path + ": /config describes no valid model: " + e.what());
  }
  // The file stores every weight uncompressed: a /config whose model would not fit in it is damaged, and is
  // refused before its sizes are allocated.
  const double weights = model_weight_bytes(m), bytes = static_cast<double>(fs::file_size(path));
  if (weights > bytes)
    throw InputError(
        strprintf("%s: /config describes a model of %.3g MB of weights, but the file holds %.3g MB",
                  path.c_str(), weights / 1e6, bytes / 1e6));
  return m;
}

namespace {

// A quantized tensor from its stored codes, or quantized as it loads from a float one.
void load_quantized(const H5File& f, const std::string& stem, const std::vector<int64_t>& expected,
                    const ModelConfig& c, QuantizedTensor& q) {
  if (f.exists(stem + "_q")) {
    q = read_quantized(f, stem);
    if (q.shape != expected)
      throw InputError(f.path() + ": " + stem + "_q holds " + shape_string(q.shape) + ", the model expects " +
                       shape_string(expected));
    return;
  }
  if (!f.exists(stem)) throw InputError(f.path() + ": " + stem + " is missing (neither float nor quantized)");
  if (f.shape(stem) != expected)
    throw InputError(f.path() + ": " + stem + " has shape " + shape_string(f.shape(stem)) +
                     ", the model expects " + shape_string(expected));
  const std::vector<float> w = f.read_all(stem);
  q = quantize(c.quant, w.data(), expected, c.quant_double, c.quant_block);
}

void load_into(const std::string& path, Model& model, bool adapters_from_file) {
  const H5File f = H5File::open_read(path);
  Backend& be = model.backend();
  read_tensors_to_device(f, "/model", model.frozen_table(), be, model.frozen());
  // A base file has no adapters yet, but has the saved modules that train beside them.
  const bool adapters = adapters_from_file || !model.config().any_lora();
  if (adapters || !model.config().lora_modules.empty())
    read_tensors_to_device(f, "/model", model.table(), be, model.params(), adapters);
  for (QuantizedEntry& e : model.quantized_tensors())
    load_quantized(f, "/model/" + e.name, e.shape, model.config(), e.tensor);
}

}  // namespace

void load_weights(const std::string& path, Model& model) {
  load_into(path, model, true);
}

void load_base_weights(const std::string& path, Model& model) {
  load_into(path, model, false);
}

namespace {

void write_header(H5File& f, const std::string& mode, const ModelConfig& c, const Config* run,
                  const std::string& format = "lrllm", int64_t version = 0) {
  f.set_attr("/", "format", format);
  f.set_attr("/", "format_version", version > 0 ? version : format_version_of(c));
  f.set_attr("/", "lrllm_version", std::string(kVersion));
  f.set_attr("/", "mode", mode);
  f.set_attr("/", "created", now_iso8601());
  f.ensure_group("/config");
  f.set_attr("/config", "arch", c.arch);
  f.set_attr("/config", "vocab_size", int64_t{c.vocab_size});
  f.set_attr("/config", "seq_len", int64_t{c.seq_len});
  f.set_attr("/config", "n_layer", int64_t{c.n_layer});
  f.set_attr("/config", "n_head", int64_t{c.n_head});
  f.set_attr("/config", "d_model", int64_t{c.d_model});
  f.set_attr("/config", "d_ff", int64_t{c.ff()});
  f.set_attr("/config", "tied_embeddings", int64_t{c.llama() ? 0 : 1});
  if (c.llama()) {
    f.set_attr("/config", "n_kv_head", int64_t{c.kv_heads()});
    f.set_attr("/config", "rope_theta", c.rope_theta);
    f.set_attr("/config", "norm_eps", c.norm_eps);
  }
  f.set_attr("/config", "lowrank_rank", int64_t{c.lowrank_rank_attr()});
  f.set_attr("/config", "lowrank_targets", c.lowrank_targets());
  if (c.any_lowrank()) {
    // lowrank_activation changes what the model computes, hence version 5 when silu; the rest are training
    // settings that a reader of any version may ignore, recorded so that a resume can repeat them.
    f.set_attr("/config", "lowrank_activation", std::string(c.lowrank_silu ? "silu" : "none"));
    f.set_attr("/config", "lowrank_init", std::string(c.lowrank_product_std ? "product_std" : "default"));
    if (run != nullptr && mode == "pretrain") {
      f.set_attr("/config", "lowrank_lr_mult", run->train.lowrank_lr_mult);
      f.set_attr("/config", "lowrank_refactor_every", int64_t{run->train.lowrank_refactor_every});
    }
  }
  int lora_rank = 0;
  for (int r : c.lora_rank) lora_rank = std::max(lora_rank, r);
  f.set_attr("/config", "lora_rank", int64_t{lora_rank});
  f.set_attr("/config", "lora_alpha", c.any_lora() ? c.lora_alpha : 0.0);
  f.set_attr("/config", "lora_targets", c.lora_targets());
  if (format_version_of(c) >= 2) f.set_attr("/config", "lora_modules", c.lora_modules);
  if (!c.trainable_tokens.empty())
    f.set_attr("/config", "trainable_tokens",
               std::vector<int64_t>(c.trainable_tokens.begin(), c.trainable_tokens.end()));
  f.set_attr("/config", "quant", std::string(quant_name(c.quant)));
  f.set_attr("/config", "quant_block", int64_t{c.quant_block});
  // The base's storage as the options gave it: an adapter file has no base tensors to read it from.
  f.set_attr("/config", "quant_double", int64_t{c.quant_double ? 1 : 0});
  f.set_attr("/config", "quant_embedding", int64_t{c.quant_embedding ? 1 : 0});
  if (c.any_lora() && !c.base.empty()) {
    f.set_attr("/config", "base", c.base);
    f.set_attr("/config", "base_checksum", c.base_checksum);
  }
  // Optional attributes: readers of every version take their absence as "none recorded". The dense
  // equivalent of the linear layers (architecture.h) lets tools/report.py give the compression of any
  // architecture without knowing its widths.
  f.set_attr("/config", "linear_dense_equivalent", static_cast<int64_t>(dense_linear_params(c)));
  if (!c.prompt_template.empty()) f.set_attr("/config", "prompt_template", c.prompt_template);
  // Optional too; relative to the file's folder, so that the two can move together.
  if (!c.tokenizer_dir.empty()) {
    const fs::path folder = fs::absolute(fs::path(f.path()).parent_path()).lexically_normal();
    const fs::path dir = fs::absolute(c.tokenizer_dir).lexically_normal();
    f.set_attr("/config", "tokenizer_dir", dir.lexically_relative(folder).string());
  }
  if (run != nullptr) write_run_record(f, run->resolved, run->command_line);
}

void write_optimizer_and_state(H5File& f, const AdamW* optimizer, const TrainState* state) {
  if (optimizer != nullptr) {
    f.ensure_group("/optimizer");
    f.set_attr("/optimizer", "step", int64_t{optimizer->step()});
    f.set_attr("/optimizer", "name", std::string("adamw"));
    f.set_attr("/optimizer", "beta1", optimizer->config().beta1);
    f.set_attr("/optimizer", "beta2", optimizer->config().beta2);
    f.set_attr("/optimizer", "eps", optimizer->config().eps);
    f.set_attr("/optimizer", "weight_decay", optimizer->config().weight_decay);
  }
  if (state != nullptr) {
    f.ensure_group("/state");
    f.set_attr("/state", "step", state->step);
    f.set_attr("/state", "tokens_seen", state->tokens_seen);
    f.set_attr("/state", "seed", static_cast<int64_t>(state->seed));
    f.set_attr("/state", "data_cursor", static_cast<int64_t>(state->data_cursor));
  }
}

// The frozen base and its quantized layers that this rank holds (finetuning runs without tensor parallelism,
// so they are whole tensors), but for those the file has already: a pipeline's stages write in turn, and the
// first and the last both hold the tied embedding.
void write_frozen(H5File& f, Model& model) {
  const std::vector<float> frozen = to_host(model.backend(), model.frozen(), model.frozen_table().total());
  for (const TensorInfo& t : model.frozen_table().tensors())
    if (!f.exists("/model/" + t.name)) f.write("/model/" + t.name, frozen.data() + t.offset, t.shape);
  for (const QuantizedEntry& e : model.quantized_tensors())
    if (!f.exists("/model/" + e.name + "_q")) write_quantized(f, "/model/" + e.name, e.tensor);
}

void rename_into_place(const std::string& tmp, const std::string& path) {
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) throw RuntimeError("cannot rename " + tmp + " to " + path + ": " + ec.message());
}

}  // namespace

void save_checkpoint(const std::string& path, const std::string& mode, Model& model, AdamW* optimizer,
                     const TrainState* state, const Config* run) {
  LRLLM_CHECK(optimizer == nullptr || optimizer->whole(), "save_checkpoint", "sharded optimizer state");
  const std::string tmp = path + ".tmp";
  set_partial_output(tmp);
  {
    H5File f = H5File::create(tmp);
    write_header(f, mode, model.config(), run);
    Backend& be = model.backend();
    const std::size_t n = model.table().total();
    write_tensors(f, "/model", model.table(), to_host(be, model.params(), n));
    write_frozen(f, model);
    write_optimizer_and_state(f, optimizer, state);
    if (optimizer != nullptr) {
      write_tensors(f, "/optimizer/m", model.table(), to_host(be, optimizer->m(), n));
      write_tensors(f, "/optimizer/v", model.table(), to_host(be, optimizer->v(), n));
    }
    f.close();
  }
  rename_into_place(tmp, path);
  clear_partial_output();
}

void save_model_file(const std::string& path, const std::string& mode, const ModelConfig& c,
                     const std::vector<std::pair<std::string, std::vector<int64_t>>>& tensors,
                     const std::function<std::vector<float>(const std::string&)>& values, const Config* run) {
  std::vector<ModelFileTensor> floats;
  for (const auto& [name, shape] : tensors) floats.push_back({name, shape, false});
  save_model_file(path, mode, c, floats, values, run);
}

StoredBytes save_model_file(const std::string& path, const std::string& mode, const ModelConfig& c,
                            const std::vector<ModelFileTensor>& tensors,
                            const std::function<std::vector<float>(const std::string&)>& values,
                            const Config* run) {
  const std::string tmp = path + ".tmp";
  StoredBytes stored;
  set_partial_output(tmp);
  try {
    H5File f = H5File::create(tmp);
    write_header(f, mode, c, run);
    for (const ModelFileTensor& t : tensors) {
      std::vector<float> v = values(t.name);
      if (!t.quantized) {
        f.write("/model/" + t.name, v.data(), t.shape);
        stored.float32 += v.size() * sizeof(float);
        continue;
      }
      const QuantizedTensor q = quantize(c.quant, v.data(), t.shape, c.quant_double, c.quant_block);
      // The float values go before the codes are written: one tensor's worth of memory at a time.
      std::vector<float>().swap(v);
      write_quantized(f, "/model/" + t.name, q);
      stored.quantized += q.bytes();
    }
    f.close();
  } catch (...) {
    std::error_code ec;
    fs::remove(tmp, ec);
    clear_partial_output();
    throw;
  }
  rename_into_place(tmp, path);
  clear_partial_output();
  return stored;
}

namespace {

// A tensor's description as world rank 0 needs it to assemble the full tensor from its parts.
std::string describe(const ParamTable& table) {
  std::string out;
  for (const TensorInfo& t : table.tensors()) {
    out +=
        strprintf("%s %d %d %zu", t.name.c_str(), t.split.axis, t.split.replica ? 1 : 0, t.full_shape.size());
    for (int64_t d : t.full_shape) out += " " + std::to_string(d);
    out += " " + std::to_string(t.split.groups.size());
    for (int64_t g : t.split.groups) out += " " + std::to_string(g);
    out += "\n";
  }
  return out;
}

std::vector<TensorInfo> parse_description(const std::string& text, int parts) {
  std::vector<TensorInfo> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    TensorInfo t;
    int replica = 0;
    std::size_t dims = 0;
    fields >> t.name >> t.split.axis >> replica >> dims;
    t.split.replica = replica != 0;
    t.split.parts = t.split.axis >= 0 ? parts : 1;
    t.full_shape.resize(dims);
    for (int64_t& d : t.full_shape) fields >> d;
    std::size_t groups = 0;
    fields >> groups;
    t.split.groups.resize(groups);
    for (int64_t& g : t.split.groups) fields >> g;
    t.shape = t.full_shape;
    if (t.split.axis >= 0) t.shape[t.split.axis] /= parts;
    t.size = 1;
    for (int64_t d : t.shape) t.size *= static_cast<std::size_t>(d);
    out.push_back(std::move(t));
  }
  return out;
}

}  // namespace

void save_checkpoint(const std::string& path, const std::string& mode, Model& model, AdamW& optimizer,
                     const std::vector<std::size_t>& optimizer_bounds, const TrainState& state,
                     const Topology& topo, const Config* run) {
  const auto start = std::chrono::steady_clock::now();
  Backend& be = model.backend();
  const ParamTable& table = model.table();
  const std::size_t n = table.total();
  // ZeRO's moment shards, gathered into the whole local layout on data-parallel rank 0.
  std::vector<float> m, v;
  if (!optimizer.whole()) {
    m.resize(topo.dp_rank() == 0 ? n : 0);
    v.resize(m.size());
    const std::size_t shard = optimizer.end() - optimizer.begin();
    topo.gather_dp(to_host(be, optimizer.m(), shard).data(), m.data(), optimizer_bounds);
    topo.gather_dp(to_host(be, optimizer.v(), shard).data(), v.data(), optimizer_bounds);
  }
  if (topo.dp_rank() != 0) return;
  // A tensor's parameters and moments, copied from the device as it is sent or written: host copies of the
  // whole table would add three times the trainable bytes to a finetuning's peak memory (400 MB for Llama-2
  // 7B's adapters). Gathered moments are read where they are.
  const float* const device[3] = {model.params(), optimizer.m(), optimizer.v()};
  std::vector<float> staged[3];
  auto values = [&](int k, const TensorInfo& t) -> const float* {
    if (k > 0 && !optimizer.whole()) return (k == 1 ? m : v).data() + t.offset;
    staged[k].resize(t.size);
    be.to_host(staged[k].data(), device[k] + t.offset, t.size * sizeof(float));
    return staged[k].data();
  };
  const char* const groups[3] = {"/model", "/optimizer/m", "/optimizer/v"};

  const std::string tmp = path + ".tmp";
  // A frozen base (finetuning; no tensor parallelism) is written by each pipeline stage itself, in stage
  // order, once world rank 0 has written the rest: whole tensors and quantized codes need no gathering.
  const bool stages_write_base =
      topo.pp() > 1 && (!model.frozen_table().tensors().empty() || !model.quantized_tensors().empty());
  if (!topo.world().root()) {
    // Every part this rank holds goes to world rank 0, in table order; the stage's first tensor-parallel
    // rank describes the stage's tensors first.
    if (topo.tp_rank() == 0) topo.send_text(0, describe(table));
    for (const TensorInfo& t : table.tensors()) {
      if (t.split.replica) continue;
      for (int k = 0; k < 3; ++k) topo.send_host(0, values(k, t), t.size);
    }
    if (stages_write_base && topo.tp_rank() == 0) {
      topo.take_turn();
      {
        H5File f = H5File::open_write(tmp);
        write_frozen(f, model);
        f.close();
      }
      topo.end_turn();
    }
    return;
  }

  {
    H5File f = H5File::create(tmp);
    write_header(f, mode, model.config(), run);
    write_optimizer_and_state(f, &optimizer, &state);
    if (topo.tp() == 1) write_frozen(f, model);
    std::vector<float> full[3], part;
    for (int stage = 0; stage < topo.pp(); ++stage) {
      const std::vector<TensorInfo> tensors =
          stage == 0 ? table.tensors()
                     : parse_description(topo.recv_text(topo.world_rank(0, stage, 0)), topo.tp());
      for (TensorInfo t : tensors) {
        if (t.split.replica) continue;
        for (auto& buffer : full) buffer.resize(t.full_size());
        for (int p = 0; p < t.split.parts; ++p) {
          t.split.part = p;
          const int source = topo.world_rank(0, stage, p);
          for (int k = 0; k < 3; ++k) {
            if (source == 0) {
              insert_part(t, values(k, t), full[k].data());
              continue;
            }
            part.resize(t.size);
            topo.recv_host(source, part.data(), t.size);
            insert_part(t, part.data(), full[k].data());
          }
        }
        for (int k = 0; k < 3; ++k)
          f.write(std::string(groups[k]) + "/" + t.name, full[k].data(), t.full_shape);
      }
    }
    f.close();
  }
  if (stages_write_base)
    for (int stage = 1; stage < topo.pp(); ++stage) topo.give_turn(topo.world_rank(0, stage, 0));
  rename_into_place(tmp, path);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("checkpoint %s: %.2f MB in %.2f s\n", path.c_str(),
              static_cast<double>(fs::file_size(path)) / 1e6, seconds);
  std::fflush(stdout);
}

void load_training_state(const std::string& path, AdamW& optimizer, TrainState& state) {
  const H5File f = H5File::open_read(path);
  if (!f.exists("/optimizer") || !f.exists("/state"))
    throw InputError(path + ": has no /optimizer or /state to resume from (a model file? use --model.init)");
  const std::string name = f.attr_string("/optimizer", "name");
  if (name != "adamw") throw InputError(path + ": optimizer '" + name + "' is not supported (adamw is)");
  // The moments of this rank's range (a ZeRO shard, or all of them).
  const ParamTable& table = optimizer.table();
  std::vector<float> host(table.total(), 0.0f);
  const std::size_t begin = optimizer.begin(), bytes = (optimizer.end() - begin) * sizeof(float);
  read_tensors(f, "/optimizer/m", table, host);
  optimizer.backend().to_device(optimizer.m(), host.data() + begin, bytes);
  read_tensors(f, "/optimizer/v", table, host);
  optimizer.backend().to_device(optimizer.v(), host.data() + begin, bytes);
  // Counters a run only ever increases: a negative one is a damaged or altered file.
  const auto counter = [&](const char* group, const char* name, int64_t limit) {
    const int64_t v = f.attr_int(group, name);
    if (v < 0 || v > limit)
      throw InputError(strprintf("%s: %s %s = %lld is out of range (0 to %lld)", path.c_str(), group, name,
                                 static_cast<long long>(v), static_cast<long long>(limit)));
    return v;
  };
  optimizer.set_step(static_cast<int>(counter("/optimizer", "step", INT_MAX)));
  state.step = counter("/state", "step", INT_MAX);
  state.tokens_seen = counter("/state", "tokens_seen", INT64_MAX);
  state.seed = static_cast<uint64_t>(f.attr_int("/state", "seed"));  // any 64 bits, stored as int64
  state.data_cursor = static_cast<uint64_t>(counter("/state", "data_cursor", INT64_MAX));
}

std::string checkpoint_path(const std::string& run_dir, int64_t step) {
  char name[32];
  std::snprintf(name, sizeof name, "ckpt_%06lld.h5", static_cast<long long>(step));
  return (fs::path(run_dir) / name).string();
}

namespace {

// The step of a checkpoint named ckpt_<digits>.h5, or -1 for any other name. Parsed by hand: <regex> trips
// GCC 12's -Wmaybe-uninitialized under the sanitizer build, and at most 18 digits cannot overflow int64.
int64_t checkpoint_step(const std::string& name) {
  constexpr std::string_view prefix = "ckpt_", suffix = ".h5";
  if (name.size() <= prefix.size() + suffix.size() || !name.starts_with(prefix) || !name.ends_with(suffix))
    return -1;
  const std::string digits = name.substr(prefix.size(), name.size() - prefix.size() - suffix.size());
  if (digits.size() > 18 ||
      !std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; }))
    return -1;
  return std::stoll(digits);
}

}  // namespace

std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& run_dir) {
  std::vector<std::pair<int64_t, std::string>> found;
  std::error_code ec;
  if (!fs::is_directory(run_dir, ec)) return found;
  for (const auto& entry : fs::directory_iterator(run_dir, ec)) {
    const int64_t step = checkpoint_step(entry.path().filename().string());
    if (entry.is_regular_file() && step >= 0) found.emplace_back(step, entry.path().string());
  }
  std::sort(found.begin(), found.end());
  return found;
}

std::string tokenizer_dir_for(const Config& cfg) {
  if (cfg.was_given("data.tokenizer_dir") || cfg.model.init.empty()) return cfg.data.tokenizer_dir;
  const std::string recorded = read_model_config(cfg.model.init).tokenizer_dir;
  return recorded.empty() ? cfg.data.tokenizer_dir : recorded;
}

std::string resolve_resume(const std::string& resume, const std::string& run_dir) {
  std::string path = resume;
  if (resume != "latest") {
    if (!fs::exists(resume)) throw InputError("--checkpoint.resume: " + resume + ": no such file");
  } else {
    const auto found = list_checkpoints(run_dir);
    if (found.empty()) throw InputError("--checkpoint.resume latest: no checkpoint in " + run_dir);
    path = found.back().second;
  }
  // The resumed run appends to the run's metrics file: a damaged one is reported here, on every rank alike,
  // not once the run has started on one of them.
  check_metrics_file((fs::path(run_dir) / "metrics.h5").string());
  return path;
}

void prune_checkpoints(const std::string& run_dir, int keep) {
  if (keep <= 0) return;
  const auto found = list_checkpoints(run_dir);
  for (std::size_t i = 0; i + keep < found.size(); ++i) {
    std::error_code ec;
    fs::remove(found[i].second, ec);
  }
}

std::string base_checksum(const std::string& path) {
  // FNV-1a 64 over each dataset's name, type, shape and bytes, in name order. It guards against loading
  // adapters over the wrong or a changed base by mistake, not against forgery, so 64 bits and no
  // cryptographic hash suffice; it needs no library and reads the same on every machine, since HDF5 hands
  // back the stored values in one byte order.
  const H5File f = H5File::open_read(path);
  uint64_t h = 14695981039346656037ULL;
  const auto mix = [&h](const void* data, std::size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (std::size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ULL;
  };
  std::vector<uint8_t> bytes;
  for (const std::string& d : f.datasets("/model")) {
    const std::vector<int64_t> shape = f.shape(d);
    const std::string type = f.dtype_name(d);
    mix(d.c_str(), d.size() + 1);
    mix(type.c_str(), type.size() + 1);
    mix(shape.data(), shape.size() * sizeof(int64_t));
    if (type == "float32") {
      const std::vector<float> v = f.read_all(d);
      mix(v.data(), v.size() * sizeof(float));
    } else if (type == "int8" || type == "uint8") {
      std::size_t n = 1;
      for (int64_t x : shape) n *= static_cast<std::size_t>(x);
      bytes.resize(n);
      f.read_bytes(d, bytes.data(), shape, type == "int8");
      mix(bytes.data(), n);
    } else {
      throw InputError(path + ": " + d + " has type " + type + ", which no lrllm tensor has");
    }
  }
  return strprintf("fnv1a64:%016llx", static_cast<unsigned long long>(h));
}

void save_adapters(const std::string& path, Model& model, const Config* run) {
  const ModelConfig& c = model.config();
  if (!c.any_lora()) throw InputError("--lora.only: " + c.init + " has no LoRA adapters to export");
  if (c.base.empty() || c.base_checksum.empty())
    throw InputError("--lora.only: " + c.init +
                     " does not record the base it was finetuned over (written before lrllm recorded it); "
                     "export it whole, or merged with --lora.merge true");
  const std::string tmp = path + ".tmp";
  set_partial_output(tmp);
  {
    H5File f = H5File::create(tmp);
    write_header(f, "export", c, run, kAdapterFormat, 1);
    write_tensors(f, "/model", model.table(),
                  to_host(model.backend(), model.params(), model.table().total()));
    f.close();
  }
  rename_into_place(tmp, path);
  clear_partial_output();
}

namespace {

// The model of an adapter file over a base: the base's shape and linear sites, the file's adapters, saved
// modules and storage of the base, after checking that they fit each other and that the base is the one the
// adapters were trained over.
ModelConfig adapters_over(const std::string& path, const ModelConfig& base) {
  const H5File f = H5File::open_read(path);
  if (!f.has_attr("/", "format") || f.attr_string("/", "format") != kAdapterFormat)
    throw InputError(path + ": not an lrllm adapter file (root attribute format is not \"" + kAdapterFormat +
                     "\"; --mode export --lora.only true writes one)");
  const int64_t version = f.attr_int("/", "format_version");
  if (version != 1)
    throw InputError(path + ": adapter format_version " + std::to_string(version) +
                     " is not supported (this lrllm reads 1)");
  const std::pair<const char*, int> sizes[] = {{"vocab_size", base.vocab_size}, {"seq_len", base.seq_len},
                                               {"n_layer", base.n_layer},       {"n_head", base.n_head},
                                               {"d_model", base.d_model},       {"d_ff", base.ff()}};
  for (const auto& [name, value] : sizes) {
    const int64_t stored = f.attr_int("/config", name);
    if (stored != value)
      throw InputError(strprintf("%s: the adapters are for a model with %s %lld, but the base %s has %d",
                                 path.c_str(), name, static_cast<long long>(stored), base.init.c_str(),
                                 value));
  }
  const std::string lowrank = f.attr_string("/config", "lowrank_targets");
  const int64_t lowrank_rank = f.attr_int("/config", "lowrank_rank");
  if (lowrank != base.lowrank_targets() || lowrank_rank != base.lowrank_rank_attr())
    throw InputError(
        strprintf("%s: the adapters are for low-rank sites '%s' of rank %lld, but the base %s has "
                  "'%s' of rank %d",
                  path.c_str(), lowrank.c_str(), static_cast<long long>(lowrank_rank), base.init.c_str(),
                  base.lowrank_targets().c_str(), base.lowrank_rank_attr()));
  ModelConfig m = base;
  for (const LinearSpec& spec : describe_architecture(m).sites) {
    const std::string a = "/model/" + block_name(0) + "/" + spec.path + "/lora_A";
    m.lora_rank[static_cast<int>(spec.site)] = f.exists(a) ? leading_dim(f, a, false) : 0;
  }
  if (!m.any_lora()) throw InputError(path + ": holds no LoRA adapters (no /model/h.0/.../lora_A)");
  m.lora_alpha = f.attr_double("/config", "lora_alpha");
  if (f.has_attr("/config", "lora_modules")) m.lora_modules = f.attr_string("/config", "lora_modules");
  m.trainable_tokens = trainable_tokens_of(f);
  m.prompt_template = prompt_template_of(f);
  m.quant = quant_of(f);
  const int64_t block = f.attr_int("/config", "quant_block");
  m.quant_block = block >= 1 && block <= 4096 ? static_cast<int>(block) : 0;  // 0: refused below
  m.quant_double = f.attr_int("/config", "quant_double") != 0;
  m.quant_embedding = f.attr_int("/config", "quant_embedding") != 0;
  // A quantized base file holds its codes: the adapters must have been trained over that same storage.
  if (base.quant != QuantKind::none && (m.quant != base.quant || m.quant_block != base.quant_block ||
                                        m.quant_embedding != base.quant_embedding))
    throw InputError(
        strprintf("%s: the adapters were trained over a base stored as %s (block %d%s), but the "
                  "base %s is stored as %s (block %d%s)",
                  path.c_str(), storage_name(m.quant), m.quant_block,
                  m.quant_embedding ? ", embedding too" : "", base.init.c_str(), storage_name(base.quant),
                  base.quant_block, base.quant_embedding ? ", embedding too" : ""));
  try {
    validate_model_config(m);
    validate_saved_modules(m);
  } catch (const InputError& e) {
    throw InputError(path + ": the adapters do not fit the base " + base.init + ": " + e.what());
  }
  const std::string recorded = f.attr_string("/config", "base_checksum");
  const std::string actual = base_checksum(base.init);
  if (actual != recorded)
    throw InputError(path + ": the adapters were trained over " + f.attr_string("/config", "base") +
                     " (checksum " + recorded + "), but the base " + base.init + " has checksum " + actual);
  m.base = base.init;
  m.base_checksum = actual;
  return m;
}

}  // namespace

ModelConfig read_input_model_config(const Config& cfg) {
  const std::string& adapters = cfg.finetune.lora_init;
  if (adapters.empty()) return read_model_config(cfg.model.init);
  if (cfg.model.init.empty())
    throw InputError("--lora.init " + adapters + " needs --model.init: the base the adapters go over");
  const ModelConfig base = read_model_config(cfg.model.init);
  if (base.any_lora())
    throw InputError("--lora.init " + adapters + ": --model.init " + cfg.model.init +
                     " has LoRA adapters already; give the base they were trained over");
  return is_peft_folder(adapters) ? peft_adapters_over(adapters, base) : adapters_over(adapters, base);
}

void load_adapters(const std::string& path, Model& model) {
  if (!is_peft_folder(path)) {
    read_tensors_to_device(H5File::open_read(path), "/model", model.table(), model.backend(), model.params());
    return;
  }
  // A PEFT folder holds the adapters alone: the model's trainable table is exactly them.
  Backend& be = model.backend();
  std::vector<float> host = to_host(be, model.params(), model.table().total());
  const std::map<std::string, std::vector<float>> tensors = read_peft_adapters(path, model.config());
  for (const TensorInfo& t : model.table().tensors()) {
    const auto it = tensors.find(t.name);
    LRLLM_CHECK(it != tensors.end() && it->second.size() == t.size * t.split.parts, "load_adapters",
                path + " has no " + t.name);
    if (t.split.axis < 0)
      std::copy(it->second.begin(), it->second.end(), host.begin() + static_cast<std::ptrdiff_t>(t.offset));
    else
      extract_part(t, it->second.data(), host.data() + t.offset);
  }
  be.to_device(model.params(), host.data(), host.size() * sizeof(float));
}

void load_input_weights(const Config& cfg, Model& model) {
  if (cfg.finetune.lora_init.empty()) return load_weights(cfg.model.init, model);
  load_base_weights(cfg.model.init, model);
  load_adapters(cfg.finetune.lora_init, model);
}

LoadedModel load_model(const Config& cfg, const std::string& device, int local_rank) {
  LoadedModel m;
  const ModelConfig mc = read_input_model_config(cfg);
  m.backend = make_backend(device, local_rank);
  m.model = std::make_unique<Model>(mc, *m.backend, false);
  load_input_weights(cfg, *m.model);
  return m;
}

void print_info(const std::string& path) {
  const ModelConfig m = read_model_config(path);
  const H5File f = H5File::open_read(path);
  std::printf("%s: lrllm format %lld, written by lrllm %s in mode %s at %s\n", path.c_str(),
              static_cast<long long>(f.attr_int("/", "format_version")),
              f.attr_string("/", "lrllm_version").c_str(), f.attr_string("/", "mode").c_str(),
              f.attr_string("/", "created").c_str());
  std::printf("config: arch %s, vocab_size %d, seq_len %d, n_layer %d, n_head %d, d_model %d, d_ff %d\n",
              m.arch.c_str(), m.vocab_size, m.seq_len, m.n_layer, m.n_head, m.d_model, m.d_ff);
  if (m.llama())
    std::printf("llama: n_kv_head %d, rope_theta %g, norm_eps %g, untied lm_head\n", m.kv_heads(),
                m.rope_theta, m.norm_eps);
  if (m.any_lora())
    std::printf("LoRA: alpha %g, frozen base stored as %s\n", m.lora_alpha, storage_name(m.quant));
  std::printf("linear layers:");
  for (int s = 0; s < kNumSites; ++s) {
    std::printf(" %s %s%s", site_name(static_cast<LinearSite>(s)), m.lowrank_rank[s] ? "lowrank r=" : "dense",
                m.lowrank_rank[s] ? std::to_string(m.lowrank_rank[s]).c_str() : "");
    if (m.lora_rank[s] > 0) std::printf(" + LoRA r=%d", m.lora_rank[s]);
  }
  if (m.lowrank_silu) std::printf("; low-rank sites compute B silu(A x)");
  std::printf("\n");

  std::size_t total_bytes = 0;
  const std::vector<std::string> datasets = f.datasets("/");
  std::size_t model_params = 0, model_bytes = 0;
  for (const std::string& d : datasets) {
    const std::vector<int64_t> shape = f.shape(d);
    std::size_t n = 1;
    for (int64_t x : shape) n *= static_cast<std::size_t>(x);
    const std::string dtype = f.dtype_name(d);
    const std::size_t elem = dtype.ends_with("64")   ? 8
                             : dtype.ends_with("32") ? 4
                             : dtype.ends_with("16") ? 2
                                                     : 1;
    total_bytes += n * elem;
    std::string storage;
    if (d.starts_with("/model/")) {
      model_bytes += n * elem;
      if (d.ends_with("_q") && !d.ends_with("_absmax_q")) {
        // Quantized codes: count the tensor's logical values, from the shape attribute.
        const std::string stem = d.substr(0, d.size() - 2);
        const QuantizedTensor q = read_quantized(f, stem);
        model_params += q.size();
        storage = " (" + f.attr_string(d, "quant") + " codes of " + shape_string(q.shape) + ")";
      } else if (d.find("_absmax") != std::string::npos) {
        storage = " (quantization scales)";
      } else {
        model_params += n;
      }
    }
    std::printf("  %-40s %-8s %s%s\n", d.c_str(), dtype.c_str(), shape_string(shape).c_str(),
                storage.c_str());
  }
  print_param_counts(count_params(m), m);
  std::printf("parameters: %zu in /model (%.2f MB); all datasets %.2f MB; file %.2f MB\n", model_params,
              model_bytes / 1e6, total_bytes / 1e6, static_cast<double>(fs::file_size(path)) / 1e6);
  if (f.exists("/state"))
    std::printf("state: step %lld, tokens_seen %lld\n", static_cast<long long>(f.attr_int("/state", "step")),
                static_cast<long long>(f.attr_int("/state", "tokens_seen")));
  if (m.any_lora() && !m.base.empty())
    std::printf("base: %s (checksum %s)\n", m.base.c_str(), m.base_checksum.c_str());
  print_run_record(f);
}

}  // namespace lrllm

#include "lrllm/io/peft.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "lrllm/core/common.h"
#include "lrllm/io/checkpoint.h"
#include "lrllm/io/hf_model.h"
#include "lrllm/model/architecture.h"

namespace fs = std::filesystem;

namespace lrllm {
namespace {

// PEFT's key names (peft/utils/save_and_load.py, get_peft_model_state_dict): the module's path under
// PeftModel ("base_model.model." and the transformers model's own), then lora_A or lora_B and the nn.Linear's
// "weight", the adapter name ("default") left out.
std::string key(const HfArch& arch, int l, const HfModule& mod, const char* factor) {
  return arch.peft_block(l) + mod.name + "." + factor + ".weight";
}

std::string lora_name(int l, const LinearSpec& spec, const char* factor) {
  return block_name(l) + "/" + spec.path + "/" + factor;
}

// What a PEFT folder holds, as lrllm's adapters.
struct PeftRead {
  double alpha = 0;
  int rank[kNumSites] = {0, 0, 0, 0};
  std::string prompt_template, base_checksum;  // from lrllm's metadata; empty in a foreign folder
  std::map<std::string, std::vector<float>> tensors;
};

// PEFT matches a target module name against a module's path: equal, or its end after a dot.
bool targets(const std::string& entry, const std::string& module) {
  return entry == module || (module.size() > entry.size() && module.ends_with("." + entry));
}

PeftRead read_peft(const std::string& dir, const ModelConfig& base) {
  const std::string cpath = (fs::path(dir) / "adapter_config.json").string();
  nlohmann::json j;
  {
    std::ifstream in(cpath);
    if (!in)
      throw InputError(cpath + ": cannot open the file (a PEFT adapter folder has adapter_config.json)");
    try {
      j = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
      throw InputError(cpath + ": not valid JSON: " + e.what());
    }
  }
  if (!j.is_object()) throw InputError(cpath + ": not a JSON object");
  if (j.value("peft_type", nlohmann::json()) != "LORA")
    throw InputError(cpath + ": peft_type is " + j.value("peft_type", nlohmann::json()).dump() +
                     ", lrllm reads LORA adapters only");
  auto set = [&](const char* name) {
    return j.contains(name) && !j[name].is_null() && j[name] != false &&
           !(j[name].is_array() && j[name].empty()) && !(j[name].is_object() && j[name].empty());
  };
  if (set("use_dora"))
    throw InputError(cpath + ": use_dora is set: DoRA's magnitude vectors have no place in lrllm's adapters");
  if (set("use_rslora"))
    throw InputError(cpath + ": use_rslora is set: lrllm scales an adapter by lora_alpha / r, not / sqrt(r)");
  if (set("modules_to_save"))
    throw InputError(cpath + ": modules_to_save " + j["modules_to_save"].dump() +
                     ": whole trained modules are not read from a PEFT folder (LoRA adapters only)");
  if (set("alpha_pattern"))
    throw InputError(cpath + ": alpha_pattern is set: lrllm has one lora_alpha for all its adapters");
  if (set("layer_replication"))
    throw InputError(cpath + ": layer_replication is set: lrllm does not replicate layers");
  if (j.contains("bias") && j["bias"] != "none")
    throw InputError(cpath + ": bias is " + j["bias"].dump() +
                     ": lrllm's adapters train no biases (bias \"none\")");
  const HfArch& arch = hf_arch(base.arch);
  const nlohmann::json fifo = j.value("fan_in_fan_out", nlohmann::json(false));
  if (fifo != arch.fan_in_fan_out())
    throw InputError(cpath + ": fan_in_fan_out is " + fifo.dump() + ", but " + arch.hf_class() +
                     (arch.fan_in_fan_out() ? "'s layers are Conv1D ([in, out]): it must be true"
                                            : "'s layers are nn.Linear ([out, in]): it must be false"));
  const int r = hf_positive_field(cpath, j, "r");
  if (!j.contains("lora_alpha") || !j["lora_alpha"].is_number() || !(j["lora_alpha"].get<double>() > 0))
    throw InputError(cpath + ": lora_alpha is " + j.value("lora_alpha", nlohmann::json()).dump() +
                     ", not a positive number");
  const bool rank_pattern = set("rank_pattern");
  const std::vector<HfModule> modules = arch.peft_modules(base);
  const nlohmann::json tm = j.value("target_modules", nlohmann::json());
  if (tm.is_array()) {
    for (const nlohmann::json& e : tm) {
      bool known = false;
      for (const HfModule& mod : modules) known |= e.is_string() && targets(e.get<std::string>(), mod.name);
      if (!known) {
        std::string names;
        for (const HfModule& mod : modules) names += (names.empty() ? "" : ", ") + mod.name;
        throw InputError(cpath + ": target module " + e.dump() +
                         " is none that lrllm has an adapter site for (" + names + ")");
      }
    }
  } else if (tm != "all-linear") {
    throw InputError(cpath + ": target_modules is " + tm.dump() +
                     ": lrllm reads a list of module names (or \"all-linear\"), not a pattern");
  }

  const SafetensorsFile file((fs::path(dir) / "adapter_model.safetensors").string());
  std::map<std::string, bool> expected;  // key -> seen
  for (int l = 0; l < base.n_layer; ++l)
    for (const HfModule& mod : modules)
      for (const char* f : {"lora_A", "lora_B"}) expected[key(arch, l, mod, f)] = false;
  for (const SafetensorsTensor& t : file.tensors())
    if (!expected.count(t.name))
      throw InputError(file.path() + ": tensor " + t.name + " is no lora_A or lora_B of a module of the " +
                       arch.hf_class() + " that lrllm has an adapter site for");

  PeftRead out;
  out.alpha = j["lora_alpha"].get<double>();
  const auto& meta = file.metadata();
  if (meta.count("lrllm_base_checksum")) out.base_checksum = meta.at("lrllm_base_checksum");
  if (meta.count("lrllm_prompt_template") && is_prompt_template(meta.at("lrllm_prompt_template")))
    out.prompt_template = meta.at("lrllm_prompt_template");
  const Architecture a = describe_architecture(base);
  // Per site and layer: the adapters of its modules (module index, A, B, rank).
  struct Adapter {
    const HfModule* mod;
    std::vector<float> A, B;
    int64_t r;
  };
  for (const LinearSpec& spec : a.sites) {
    const int s = static_cast<int>(spec.site);
    std::vector<std::vector<Adapter>> layers(base.n_layer);
    std::vector<bool> shared(base.n_layer, true);
    int64_t R = 0;
    for (int l = 0; l < base.n_layer; ++l) {
      for (const HfModule& mod : modules) {
        if (mod.site != spec.site) continue;
        const std::string ka = key(arch, l, mod, "lora_A"), kb = key(arch, l, mod, "lora_B");
        const SafetensorsTensor *ta = file.find(ka), *tb = file.find(kb);
        if ((ta == nullptr) != (tb == nullptr))
          throw InputError(file.path() + ": " + (ta ? ka + " has no " + kb : kb + " has no " + ka));
        if (ta == nullptr) continue;
        const int64_t rm = ta->shape.size() == 2 ? ta->shape[0] : 0;
        if (ta->shape != std::vector<int64_t>{rm, spec.in} || rm < 1)
          throw InputError(file.path() + ": tensor " + ka + " has shape " + shape_string(ta->shape) +
                           ", but " + mod.name + " needs [r, " + std::to_string(spec.in) + "]");
        if (tb->shape != std::vector<int64_t>{mod.rows, rm})
          throw InputError(file.path() + ": tensor " + kb + " has shape " + shape_string(tb->shape) +
                           ", but " + mod.name + " needs " + shape_string({mod.rows, rm}));
        if (!rank_pattern && rm != r)
          throw InputError(file.path() + ": tensor " + ka + " has rank " + std::to_string(rm) +
                           ", but adapter_config.json has r " + std::to_string(r) + " and no rank_pattern");
        layers[l].push_back({&mod, file.read(ka), file.read(kb), rm});
      }
      // lrllm's fused site has one A: modules that share theirs (as lrllm exports them) keep its rank; others
      // stack their A's, each module's B in its own columns.
      int64_t stacked = 0;
      for (const Adapter& ad : layers[l]) {
        stacked += ad.r;
        shared[l] = shared[l] && ad.A == layers[l].front().A;
      }
      R = std::max(R, layers[l].empty() ? 0 : shared[l] ? layers[l].front().r : stacked);
    }
    if (R == 0) continue;
    if (R > (1 << 24))
      throw InputError(file.path() + ": adapters of rank " + std::to_string(R) + " at " + spec.path);
    out.rank[s] = static_cast<int>(R);
    for (int l = 0; l < base.n_layer; ++l) {
      std::vector<float> A(static_cast<std::size_t>(R * spec.in), 0.0f),
          B(static_cast<std::size_t>(spec.out * R), 0.0f);
      int64_t col = 0;
      for (const Adapter& ad : layers[l]) {
        // PEFT scales a module by lora_alpha / r_m, lrllm a site by lora_alpha / R: B carries R / r_m (1 for
        // a shared A of rank R; a power of two, so exact, when two modules of one rank stack).
        const float f = static_cast<float>(static_cast<double>(R) / static_cast<double>(ad.r));
        std::copy(ad.A.begin(), ad.A.end(), A.begin() + static_cast<std::ptrdiff_t>(col * spec.in));
        for (int64_t o = 0; o < ad.mod->rows; ++o)
          for (int64_t k = 0; k < ad.r; ++k)
            B[static_cast<std::size_t>((ad.mod->row + o) * R + col + k)] =
                f * ad.B[static_cast<std::size_t>(o * ad.r + k)];
        if (!shared[l]) col += ad.r;
      }
      out.tensors[lora_name(l, spec, "lora_A")] = std::move(A);
      out.tensors[lora_name(l, spec, "lora_B")] = std::move(B);
    }
  }
  if (out.tensors.empty()) throw InputError(file.path() + ": holds no LoRA adapters");
  return out;
}

}  // namespace

bool is_peft_folder(const std::string& path) {
  std::error_code ec;
  return fs::is_directory(path, ec);
}

ModelConfig peft_adapters_over(const std::string& dir, const ModelConfig& base) {
  const PeftRead p = read_peft(dir, base);
  ModelConfig m = base;
  for (int s = 0; s < kNumSites; ++s) m.lora_rank[s] = p.rank[s];
  m.lora_alpha = p.alpha;
  m.lora_modules.clear();
  m.trainable_tokens.clear();
  if (!p.prompt_template.empty()) m.prompt_template = p.prompt_template;
  const std::string actual = base_checksum(base.init);
  if (!p.base_checksum.empty() && p.base_checksum != actual)
    throw InputError(dir + ": the adapters were exported over a base of checksum " + p.base_checksum +
                     ", but the base " + base.init + " has checksum " + actual);
  try {
    validate_model_config(m);
  } catch (const InputError& e) {
    throw InputError(dir + ": the adapters do not fit the base " + base.init + ": " + e.what());
  }
  m.base = base.init;
  m.base_checksum = actual;
  return m;
}

std::map<std::string, std::vector<float>> read_peft_adapters(const std::string& dir, const ModelConfig& m) {
  return read_peft(dir, m).tensors;
}

void write_peft_adapters(const std::string& dir, const ModelConfig& m,
                         const std::function<std::vector<float>(const std::string&)>& tensor,
                         SafetensorsDtype dtype, const std::string& base, const std::string& checksum,
                         double dropout) {
  const HfArch& arch = hf_arch(m.arch);
  const std::vector<HfModule> modules = arch.peft_modules(m);
  const Architecture a = describe_architecture(m);
  int r = 0;
  for (int s = 0; s < kNumSites; ++s)
    if (r == 0) r = m.lora_rank[s];
  // target_modules by their last name (q_proj, c_attn), unless that also names a module without adapters
  // (GPT-2's c_proj is attn.c_proj and mlp.c_proj): PEFT matches a name against the end of a module's path.
  nlohmann::ordered_json targets = nlohmann::ordered_json::array(), ranks = nlohmann::ordered_json::object();
  for (const HfModule& mod : modules) {
    const int rank = m.lora_rank[static_cast<int>(mod.site)];
    if (rank == 0) continue;
    std::string name = mod.name.substr(mod.name.rfind('.') + 1);
    for (const HfModule& other : modules)
      if (other.name.ends_with("." + name) && m.lora_rank[static_cast<int>(other.site)] == 0) name = mod.name;
    if (std::find(targets.begin(), targets.end(), name) == targets.end()) targets.push_back(name);
    if (rank != r) ranks[mod.name] = rank;
  }
  nlohmann::ordered_json j;
  j["peft_type"] = "LORA";
  j["task_type"] = "CAUSAL_LM";
  j["base_model_name_or_path"] =
      base.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(base);
  j["r"] = r;
  j["lora_alpha"] = m.lora_alpha;
  j["lora_dropout"] = dropout;
  j["target_modules"] = targets;
  j["fan_in_fan_out"] = arch.fan_in_fan_out();
  j["bias"] = "none";
  j["modules_to_save"] = nullptr;
  j["use_dora"] = false;
  j["use_rslora"] = false;
  j["rank_pattern"] = ranks;
  j["alpha_pattern"] = nlohmann::ordered_json::object();
  j["inference_mode"] = true;
  j["init_lora_weights"] = true;
  {
    const fs::path p = fs::path(dir) / "adapter_config.json";
    std::ofstream out(p);
    out << j.dump(2) << "\n";
    out.flush();
    if (!out) throw RuntimeError("cannot write " + p.string());
  }
  std::vector<SafetensorsEntry> entries;
  for (int l = 0; l < m.n_layer; ++l)
    for (const HfModule& mod : modules) {
      const LinearSpec& spec = a.sites[static_cast<int>(mod.site)];
      const int64_t R = m.lora_rank[static_cast<int>(mod.site)];
      if (R == 0) continue;
      // Each module of a fused site gets the site's A and its own rows of B: B A's rows are the same.
      entries.push_back({key(arch, l, mod, "lora_A"), dtype, {R, spec.in}, [&tensor, l, spec] {
                           return tensor(lora_name(l, spec, "lora_A"));
                         }});
      entries.push_back({key(arch, l, mod, "lora_B"), dtype, {mod.rows, R}, [&tensor, l, spec, mod, R] {
                           const std::vector<float> B = tensor(lora_name(l, spec, "lora_B"));
                           const auto begin = B.begin() + static_cast<std::ptrdiff_t>(mod.row * R);
                           return std::vector<float>(begin,
                                                     begin + static_cast<std::ptrdiff_t>(mod.rows * R));
                         }});
    }
  std::map<std::string, std::string> meta = {{"format", "pt"}};
  if (!base.empty()) meta["lrllm_base"] = base;
  if (!checksum.empty()) meta["lrllm_base_checksum"] = checksum;
  if (!m.prompt_template.empty()) meta["lrllm_prompt_template"] = m.prompt_template;
  write_safetensors((fs::path(dir) / "adapter_model.safetensors").string(), entries, meta);
}

}  // namespace lrllm

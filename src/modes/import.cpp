#include "lrllm/modes/import.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "lrllm/core/common.h"
#include "lrllm/io/checkpoint.h"
#include "lrllm/io/hdf5.h"
#include "lrllm/io/hf_model.h"
#include "lrllm/io/safetensors.h"
#include "lrllm/io/tokenizer.h"
#include "lrllm/model/params.h"

namespace fs = std::filesystem;

namespace lrllm {
namespace {

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError(path.string() + ": cannot open the file");
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  out.flush();
  if (!out) throw RuntimeError("cannot write " + path.string());
}

// The BPE vocabulary and merges of tokenizer.json (the tokenizers library's file), for a folder without
// vocab.json and merges.txt. A merge is "a b", or ["a", "b"] in newer files.
std::pair<std::string, std::string> from_tokenizer_json(const fs::path& path) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_text(path));
  } catch (const nlohmann::json::exception& e) {
    throw InputError(path.string() + ": not valid JSON: " + e.what());
  }
  if (!j.is_object() || !j.contains("model") || !j["model"].is_object() ||
      j["model"].value("type", "") != "BPE" || !j["model"].contains("vocab") ||
      !j["model"]["vocab"].is_object() || !j["model"].contains("merges") || !j["model"]["merges"].is_array())
    throw InputError(path.string() + ": has no BPE model with vocab and merges (GPT-2's tokenizer)");
  std::string merges = "#version: 0.2\n";
  for (const nlohmann::json& m : j["model"]["merges"]) {
    if (m.is_string())
      merges += m.get<std::string>() + "\n";
    else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string())
      merges += m[0].get<std::string>() + " " + m[1].get<std::string>() + "\n";
    else
      throw InputError(path.string() + ": a merge is " + m.dump() + ", not a pair of tokens");
  }
  return {j["model"]["vocab"].dump(), merges};
}

// Checks that the tokenizer written into `into` (from source) loads and fits the model's vocabulary.
void check_tokenizer(const fs::path& into, const std::string& source, int vocab_size) {
  int tokens = 0;
  try {
    tokens = Tokenizer::load_dir(into.string()).vocab_size();
  } catch (const InputError& e) {
    throw InputError(source + ": the tokenizer does not load: " + e.what());
  }
  if (tokens > vocab_size)
    throw InputError(strprintf("%s: the tokenizer has %d tokens, more than the model's vocab_size %d",
                               source.c_str(), tokens, vocab_size));
}

// Writes the folder's tokenizer into `into` and checks it. GPT-2's goes under OpenAI's names (vocab.json is
// encoder.json; merges.txt is vocab.bpe, which has a #version first line; docs/design.md, Tokenizer); a
// Llama's tokenizer.json is copied as it is, which Tokenizer::load_dir reads. False when the folder has none.
bool write_tokenizer(const fs::path& hf, const fs::path& into, const ModelConfig& m) {
  if (m.llama()) {
    if (!fs::exists(hf / "tokenizer.json")) return false;
    fs::create_directory(into);
    write_text(into / "tokenizer.json", read_text(hf / "tokenizer.json"));
    check_tokenizer(into, (hf / "tokenizer.json").string(), m.vocab_size);
    return true;
  }
  std::string encoder, bpe;
  std::string source;
  if (fs::exists(hf / "vocab.json") && fs::exists(hf / "merges.txt")) {
    encoder = read_text(hf / "vocab.json");
    bpe = read_text(hf / "merges.txt");
    source = (hf / "vocab.json").string() + " and merges.txt";
  } else if (fs::exists(hf / "tokenizer.json")) {
    std::tie(encoder, bpe) = from_tokenizer_json(hf / "tokenizer.json");
    source = (hf / "tokenizer.json").string();
  } else {
    return false;
  }
  if (!bpe.starts_with("#version")) bpe = "#version: 0.2\n" + bpe;
  fs::create_directory(into);
  write_text(into / "encoder.json", encoder);
  write_text(into / "vocab.bpe", bpe);
  check_tokenizer(into, source, m.vocab_size);
  return true;
}

// A tokenizer folder that an earlier import wrote, which this one may replace.
bool is_our_tokenizer_folder(const fs::path& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return false;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (name != "encoder.json" && name != "vocab.bpe" && name != "tokenizer.json") return false;
  }
  return true;
}

}  // namespace

int run_import(const Config& cfg) {
  if (cfg.data.input.empty() || cfg.data.output.empty())
    throw InputError(
        "--mode import needs --data.input (a Hugging Face model folder) and --data.output (the lrllm model "
        "file to write)");
  H5File::check_output(cfg.data.output, "data.output");
  const fs::path hf = cfg.data.input;
  std::error_code ec;
  if (!fs::is_directory(hf, ec))
    throw InputError(
        "--data.input " + cfg.data.input +
        " is not a folder (a Hugging Face model folder, with config.json and model.safetensors)");
  nlohmann::json config;
  const HfArch& arch = hf_arch_of_config((hf / "config.json").string(), config);
  bool tied = false;
  ModelConfig m = arch.read_config((hf / "config.json").string(), config, tied);
  const SafetensorsSet set(hf.string());

  // Every tensor is checked before anything is written; an lrllm tensor is the HF tensors that hold its rows.
  const std::vector<HfTensor> tensors = arch.tensors(m, &set, tied);
  std::map<std::string, std::vector<const HfTensor*>> parts;
  std::vector<std::pair<std::string, std::vector<int64_t>>> layout;
  std::set<std::string> dtypes, known;
  for (const HfTensor& t : tensors) {
    const SafetensorsTensor* st = set.find(t.hf);
    if (st == nullptr)
      throw InputError(cfg.data.input + ": tensor " + t.hf + " is missing (config.json describes " +
                       std::to_string(m.n_layer) + " layers)");
    if (st->shape != t.hf_shape)
      throw InputError(set.file_of(t.hf) + ": tensor " + t.hf + " has shape " + shape_string(st->shape) +
                       ", but config.json's model needs " + shape_string(t.hf_shape));
    if (st->dtype != "F32" && st->dtype != "F16" && st->dtype != "BF16")
      throw InputError(set.file_of(t.hf) + ": tensor " + t.hf + " has dtype " + st->dtype +
                       ": lrllm reads F32, F16 and BF16 tensors");
    dtypes.insert(st->dtype);
    known.insert(t.hf);
    std::vector<const HfTensor*>& p = parts[t.lrllm];
    if (p.empty()) layout.emplace_back(t.lrllm, t.lrllm_shape);
    p.push_back(&t);
  }
  for (const std::string& name : set.names())
    if (!known.count(name)) arch.check_extra(name, set, m);

  const fs::path tok_dir = cfg.data.output + ".tokenizer", tok_tmp = cfg.data.output + ".tokenizer.tmp";
  if (fs::exists(tok_dir, ec) && !is_our_tokenizer_folder(tok_dir))
    throw InputError(tok_dir.string() +
                     " exists and is not a tokenizer folder an import wrote (encoder.json, vocab.bpe or "
                     "tokenizer.json): the "
                     "import writes the tokenizer there; move it away first");
  if (fs::exists(tok_tmp, ec) && !is_our_tokenizer_folder(tok_tmp))
    throw InputError(tok_tmp.string() +
                     " exists and is not what an interrupted import leaves; move it away first");
  fs::remove_all(tok_tmp, ec);
  bool tokenizer = false;
  try {
    tokenizer = write_tokenizer(hf, tok_tmp, m);
    if (tokenizer) m.tokenizer_dir = tok_dir.string();
    save_model_file(
        cfg.data.output, "import", m, layout,
        [&](const std::string& name) { return hf_gather(set, parts.at(name)); }, &cfg);
  } catch (...) {
    fs::remove_all(tok_tmp, ec);
    throw;
  }
  if (tokenizer) {
    fs::remove_all(tok_dir, ec);
    fs::rename(tok_tmp, tok_dir, ec);
    if (ec)
      throw RuntimeError("cannot rename " + tok_tmp.string() + " to " + tok_dir.string() + ": " +
                         ec.message());
  }
  std::string types;
  for (const std::string& d : dtypes) types += (types.empty() ? "" : ", ") + d;
  std::size_t params = 0;
  for (const auto& [name, shape] : layout) {
    std::size_t n = 1;
    for (int64_t d : shape) n *= static_cast<std::size_t>(d);
    params += n;
  }
  std::printf(
      "imported %s (%s: n_layer %d, n_head %d, n_kv_head %d, d_model %d, d_ff %d, seq_len %d, vocab_size %d; "
      "%s) -> %s: %zu parameters; tokenizer %s\n",
      cfg.data.input.c_str(), arch.hf_class(), m.n_layer, m.n_head, m.kv_heads(), m.d_model, m.ff(),
      m.seq_len, m.vocab_size, types.c_str(), cfg.data.output.c_str(), params,
      tokenizer ? tok_dir.c_str()
                : (m.llama() ? "none (the folder has no tokenizer.json)"
                             : "none (the folder has no vocab.json + merges.txt or tokenizer.json)"));
  return 0;
}

}  // namespace lrllm

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
#include "lrllm/io/hf_gpt2.h"
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

// Writes the folder's GPT-2 tokenizer under OpenAI's names (vocab.json is encoder.json; merges.txt is
// vocab.bpe, which has a #version first line; docs/design.md, Tokenizer) into `into`, and checks that it
// loads and fits the model's vocabulary. False when the folder has no tokenizer.
bool write_tokenizer(const fs::path& hf, const fs::path& into, int vocab_size) {
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
  int tokens = 0;
  try {
    tokens = Tokenizer::load((into / "encoder.json").string(), (into / "vocab.bpe").string()).vocab_size();
  } catch (const InputError& e) {
    throw InputError(source + ": the tokenizer does not load: " + e.what());
  }
  if (tokens > vocab_size)
    throw InputError(strprintf("%s: the tokenizer has %d tokens, more than the model's vocab_size %d",
                               source.c_str(), tokens, vocab_size));
  return true;
}

// The causal-mask buffers h.N.attn.bias and h.N.attn.masked_bias that files saved by older transformers
// carry (modeling_gpt2.py registers them as buffers): no weights, so the import leaves them out.
bool is_mask_buffer(const std::string& name, const std::string& prefix, int n_layer) {
  const std::string head = prefix + "h.";
  for (const std::string tail : {".attn.bias", ".attn.masked_bias"}) {
    if (!name.starts_with(head) || !name.ends_with(tail) || name.size() <= head.size() + tail.size())
      continue;
    const std::string layer = name.substr(head.size(), name.size() - head.size() - tail.size());
    if (layer.size() <= 6 && layer.find_first_not_of("0123456789") == std::string::npos &&
        std::stoi(layer) < n_layer)
      return true;
  }
  return false;
}

// A tokenizer folder that an earlier import wrote, which this one may replace.
bool is_our_tokenizer_folder(const fs::path& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return false;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (name != "encoder.json" && name != "vocab.bpe") return false;
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
  ModelConfig m = gpt2_config_from_hf((hf / "config.json").string());
  const SafetensorsSet set(hf.string());
  // Saved from GPT2LMHeadModel the names start with "transformer.", from GPT2Model they do not.
  const std::string prefix = set.find("transformer.wte.weight") ? "transformer." : "";
  if (set.find(prefix + "wte.weight") == nullptr)
    throw InputError(cfg.data.input +
                     ": has no tensor transformer.wte.weight or wte.weight: not a GPT-2 model");

  const std::vector<HfTensor> tensors = gpt2_hf_tensors(m);
  std::map<std::string, const HfTensor*> by_name;
  std::vector<std::pair<std::string, std::vector<int64_t>>> layout;
  std::set<std::string> dtypes;
  for (const HfTensor& t : tensors) {
    const std::string name = prefix + t.hf;
    const SafetensorsTensor* st = set.find(name);
    if (st == nullptr)
      throw InputError(cfg.data.input + ": tensor " + name + " is missing (config.json describes n_layer " +
                       std::to_string(m.n_layer) + ")");
    if (st->shape != t.hf_shape)
      throw InputError(set.file_of(name) + ": tensor " + name + " has shape " + shape_string(st->shape) +
                       ", but config.json's model needs " + shape_string(t.hf_shape));
    if (st->dtype != "F32" && st->dtype != "F16" && st->dtype != "BF16")
      throw InputError(set.file_of(name) + ": tensor " + name + " has dtype " + st->dtype +
                       ": lrllm reads F32, F16 and BF16 tensors");
    dtypes.insert(st->dtype);
    by_name[t.lrllm] = &t;
    layout.emplace_back(t.lrllm,
                        t.transposed ? std::vector<int64_t>{t.hf_shape[1], t.hf_shape[0]} : t.hf_shape);
  }
  std::set<std::string> known;
  for (const HfTensor& t : tensors) known.insert(prefix + t.hf);
  for (const std::string& name : set.names()) {
    if (known.count(name) || is_mask_buffer(name, prefix, m.n_layer)) continue;
    if (name != "lm_head.weight")
      throw InputError(set.file_of(name) + ": tensor " + name +
                       " is not part of the GPT2LMHeadModel that config.json describes");
    // lrllm's output layer is the embedding, as in modeling_gpt2.py with tie_word_embeddings: a stored
    // lm_head is accepted when it is that same matrix.
    const SafetensorsTensor* head = set.find(name);
    if (head->shape != std::vector<int64_t>{m.vocab_size, m.d_model} ||
        set.read(name) != set.read(prefix + "wte.weight"))
      throw InputError(set.file_of(name) +
                       ": lm_head.weight differs from wte.weight; lrllm ties the output layer to the "
                       "embedding, so an untied model cannot be imported");
  }

  const fs::path tok_dir = cfg.data.output + ".tokenizer", tok_tmp = cfg.data.output + ".tokenizer.tmp";
  if (fs::exists(tok_dir, ec) && !is_our_tokenizer_folder(tok_dir))
    throw InputError(tok_dir.string() +
                     " exists and is not a tokenizer folder an import wrote (encoder.json, vocab.bpe): the "
                     "import writes the tokenizer there; move it away first");
  if (fs::exists(tok_tmp, ec) && !is_our_tokenizer_folder(tok_tmp))
    throw InputError(tok_tmp.string() +
                     " exists and is not what an interrupted import leaves; move it away first");
  fs::remove_all(tok_tmp, ec);
  bool tokenizer = false;
  try {
    tokenizer = write_tokenizer(hf, tok_tmp, m.vocab_size);
    if (tokenizer) m.tokenizer_dir = tok_dir.string();
    save_model_file(
        cfg.data.output, "import", m, layout,
        [&](const std::string& name) {
          const HfTensor& t = *by_name.at(name);
          std::vector<float> v = set.read(prefix + t.hf);
          if (!t.transposed) return v;
          std::vector<float> w(v.size());
          transpose(v.data(), w.data(), t.hf_shape[0], t.hf_shape[1]);
          return w;
        },
        &cfg);
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
      "imported %s (GPT-2: n_layer %d, n_head %d, d_model %d, d_ff %d, seq_len %d, vocab_size %d; %s) -> %s: "
      "%zu parameters; tokenizer %s\n",
      cfg.data.input.c_str(), m.n_layer, m.n_head, m.d_model, m.ff(), m.seq_len, m.vocab_size, types.c_str(),
      cfg.data.output.c_str(), params,
      tokenizer ? tok_dir.c_str() : "none (the folder has no vocab.json + merges.txt or tokenizer.json)");
  return 0;
}

}  // namespace lrllm

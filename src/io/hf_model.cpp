#include "lrllm/io/hf_model.h"

#include <algorithm>
#include <fstream>

#include "lrllm/core/common.h"
#include "lrllm/io/hf_gpt2.h"
#include "lrllm/io/hf_llama.h"
#include "lrllm/io/safetensors.h"
#include "lrllm/model/architecture.h"

namespace lrllm {

const HfArch& hf_arch(const std::string& arch) {
  if (arch == hf_llama().arch()) return hf_llama();
  if (arch == hf_gpt2().arch()) return hf_gpt2();
  throw InputError("no Hugging Face mapping for arch '" + arch + "'");
}

const HfArch& hf_arch_of_config(const std::string& path, nlohmann::json& j) {
  {
    std::ifstream in(path);
    if (!in) throw InputError(path + ": cannot open the file (a Hugging Face model folder has config.json)");
    try {
      j = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
      throw InputError(path + ": not valid JSON: " + e.what());
    }
  }
  if (!j.is_object()) throw InputError(path + ": not a JSON object");
  if (!j.contains("model_type") || j["model_type"] == hf_gpt2().model_type()) return hf_gpt2();
  if (j["model_type"] == hf_llama().model_type()) return hf_llama();
  throw InputError(path + ": model_type " + j["model_type"].dump() +
                   " is not supported (gpt2 and llama are)");
}

int hf_positive_field(const std::string& path, const nlohmann::json& j, const char* name) {
  if (!j.contains(name)) throw InputError(path + ": has no " + name);
  const nlohmann::json& v = j[name];
  if (!v.is_number_integer() || v.get<int64_t>() < 1 || v.get<int64_t>() > (int64_t{1} << 30))
    throw InputError(path + ": " + name + " is " + v.dump() + ", not a positive integer");
  return static_cast<int>(v.get<int64_t>());
}

void hf_require_flag(const std::string& path, const nlohmann::json& j, const char* name, bool expected,
                     const char* model) {
  if (!j.contains(name) || j[name].is_null()) return;
  if (!j[name].is_boolean() || j[name].get<bool>() != expected)
    throw InputError(path + ": " + name + " is " + j[name].dump() + ", lrllm's " + model + " computes " +
                     name + " = " + (expected ? "true" : "false") + " only");
}

void hf_validate(const std::string& path, const ModelConfig& m) {
  try {
    validate_model_config(m, false);
  } catch (const InputError& e) {
    throw InputError(path + ": describes no model lrllm can run: " + e.what());
  }
}

std::vector<float> hf_gather(const SafetensorsSet& set, const std::vector<const HfTensor*>& parts) {
  const HfTensor& first = *parts.front();
  if (parts.size() == 1 && first.row == 0 && !first.transposed) return set.read(first.hf);
  std::size_t n = 1;
  for (int64_t d : first.lrllm_shape) n *= static_cast<std::size_t>(d);
  std::vector<float> out(n);
  const std::size_t cols = n / static_cast<std::size_t>(first.lrllm_shape[0]);
  for (const HfTensor* t : parts) {
    const std::vector<float> v = set.read(t->hf);
    float* dst = out.data() + static_cast<std::size_t>(t->row) * cols;
    if (t->transposed)
      transpose(v.data(), dst, t->hf_shape[0], t->hf_shape[1]);
    else
      std::copy(v.begin(), v.end(), dst);
  }
  return out;
}

std::vector<float> hf_slice(const HfTensor& t, const std::vector<float>& v) {
  if (t.transposed) {
    std::vector<float> w(v.size());
    transpose(v.data(), w.data(), t.hf_shape[1], t.hf_shape[0]);
    return w;
  }
  if (t.row == 0 && t.hf_shape == t.lrllm_shape) return v;
  const std::size_t cols = v.size() / static_cast<std::size_t>(t.lrllm_shape[0]);
  const auto begin = v.begin() + static_cast<std::ptrdiff_t>(t.row * cols);
  return std::vector<float>(begin, begin + static_cast<std::ptrdiff_t>(t.hf_shape[0] * cols));
}

void transpose(const float* in, float* out, int64_t rows, int64_t cols) {
  constexpr int64_t kTile = 32;  // tiles keep both sides' accesses within a few cache lines
#pragma omp parallel for collapse(2)
  for (int64_t r0 = 0; r0 < rows; r0 += kTile)
    for (int64_t c0 = 0; c0 < cols; c0 += kTile)
      for (int64_t r = r0; r < std::min(rows, r0 + kTile); ++r)
        for (int64_t c = c0; c < std::min(cols, c0 + kTile); ++c) out[c * rows + r] = in[r * cols + c];
}

}  // namespace lrllm

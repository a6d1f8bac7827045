#include "lrllm/io/instruct.h"

#include <algorithm>
#include <fstream>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "lrllm/core/common.h"

namespace lrllm {
namespace {

bool is_blank(const std::string& line) {
  return std::all_of(line.begin(), line.end(), [](char c) { return c == ' ' || c == '\t' || c == '\r'; });
}

// The string value of field `name`, or `fallback` when the field is absent and fallback is given.
std::string field(const nlohmann::json& obj, const char* name, const std::string& where,
                  const char* fallback) {
  const auto it = obj.find(name);
  if (it == obj.end()) {
    if (fallback) return fallback;
    throw InputError(where + ": missing field \"" + name + "\"");
  }
  if (!it->is_string()) {
    throw InputError(where + ": field \"" + name + "\" is a " + it->type_name() + ", not a string");
  }
  return it->get<std::string>();
}

}  // namespace

std::vector<Example> read_jsonl(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError(path + ": cannot open instruction data");
  std::vector<Example> examples;
  std::string line;
  for (long number = 1; std::getline(in, line); ++number) {
    if (is_blank(line)) continue;
    const std::string where = path + ":" + std::to_string(number);
    nlohmann::json obj;
    try {
      obj = nlohmann::json::parse(line);
    } catch (const nlohmann::json::parse_error& e) {
      // nlohmann's own message carries its internal error id; the byte offset is the part that helps a user.
      throw InputError(where + ": not valid JSON (byte " + std::to_string(e.byte) + ")");
    } catch (const nlohmann::json::exception&) {
      // The parser's other errors (out_of_range: a number too large for any of its types).
      throw InputError(where + ": a JSON number is out of range");
    }
    if (!obj.is_object()) throw InputError(where + ": expected a JSON object, got a " + obj.type_name());
    examples.push_back({field(obj, "instruction", where, nullptr), field(obj, "input", where, ""),
                        field(obj, "output", where, nullptr)});
  }
  if (in.bad()) throw InputError(path + ": read error");
  if (examples.empty()) throw InputError(path + ": no examples");
  return examples;
}

namespace {

// FinGPT's template ends in a space, which belongs to the answer's first token; Alpaca's ends in a newline.
bool answer_takes_space(PromptTemplate t) {
  return t == PromptTemplate::fingpt;
}

}  // namespace

std::string prompt_of(const Example& e, PromptTemplate t) {
  if (t == PromptTemplate::fingpt)
    return "Instruction: " + e.instruction + "\nInput: " + e.input + "\nAnswer: ";
  if (e.input.empty())
    return "Below is an instruction that describes a task. Write a response that appropriately completes the "
           "request.\n\n### Instruction:\n" +
           e.instruction + "\n\n### Response:\n";
  return "Below is an instruction that describes a task, paired with an input that provides further context. "
         "Write a response that appropriately completes the request.\n\n### Instruction:\n" +
         e.instruction + "\n\n### Input:\n" + e.input + "\n\n### Response:\n";
}

std::vector<int> prompt_tokens_of(const Tokenizer& tok, const Example& e, PromptTemplate t) {
  const std::string prompt = prompt_of(e, t);
  std::vector<int> ids;
  // A tokenizer with a sequence start (Llama's <s>) begins every example with it, as its models were trained.
  if (tok.bos() >= 0) ids.push_back(tok.bos());
  for (int id :
       tok.encode(std::string_view(prompt).substr(0, prompt.size() - (answer_takes_space(t) ? 1 : 0))))
    ids.push_back(id);
  return ids;
}

std::vector<int> answer_tokens_of(const Tokenizer& tok, const std::string& answer, PromptTemplate t) {
  return tok.encode(answer_takes_space(t) && !tok.adds_space_first() ? " " + answer : answer);
}

Encoded encode_example(const Tokenizer& tok, const Example& e, int seq_len, PromptTemplate t) {
  const std::vector<int> prompt = prompt_tokens_of(tok, e, t);
  std::vector<int> answer = answer_tokens_of(tok, e.output, t);
  answer.push_back(tok.eot());
  const std::size_t len = static_cast<std::size_t>(seq_len);
  // The inputs are every token but the final end-of-text, and at least one prompt token must stay to predict
  // the answer's first token from (the template makes the prompt non-empty).
  if (answer.size() > len) {
    throw InputError("an answer of " + std::to_string(answer.size() - 1) + " tokens does not fit seq_len " +
                     std::to_string(seq_len) + " (answer starts \"" + e.output.substr(0, 40) + "\")");
  }
  // A prompt too long for the row loses its start, but keeps the sequence start token before what is left.
  const std::size_t bos = tok.bos() >= 0 ? 1 : 0;
  const std::size_t keep = std::min(prompt.size(), len + 1 - answer.size());
  std::vector<int32_t> full(prompt.begin(), prompt.begin() + static_cast<std::ptrdiff_t>(bos));
  full.insert(full.end(), prompt.end() - static_cast<std::ptrdiff_t>(keep - bos), prompt.end());
  full.insert(full.end(), answer.begin(), answer.end());

  Encoded out;
  out.tokens.assign(full.begin(), full.end() - 1);
  out.targets.assign(out.tokens.size(), -1);
  // Position i predicts full[i + 1]; the answer starts at full[keep].
  for (std::size_t i = keep - 1; i < out.tokens.size(); ++i) out.targets[i] = full[i + 1];
  return out;
}

std::vector<Encoded> pack_examples(const std::vector<Encoded>& examples, int seq_len) {
  const std::size_t len = static_cast<std::size_t>(seq_len);
  std::vector<Encoded> rows;
  for (const Encoded& ex : examples) {
    if (ex.tokens.size() > len || ex.targets.size() != ex.tokens.size())
      throw std::invalid_argument("pack_examples: an example is longer than seq_len or malformed");
    if (rows.empty() || rows.back().tokens.size() + ex.tokens.size() > len) rows.emplace_back();
    Encoded& row = rows.back();
    row.tokens.insert(row.tokens.end(), ex.tokens.begin(), ex.tokens.end());
    row.targets.insert(row.targets.end(), ex.targets.begin(), ex.targets.end());
    for (std::size_t i = 0; i < ex.tokens.size(); ++i) row.positions.push_back(static_cast<int32_t>(i));
  }
  return rows;
}

void fill_padded(const std::vector<Encoded>& data, const std::vector<std::size_t>& indices, int seq_len,
                 int pad_to, int32_t pad, Batch& out) {
  std::size_t longest = 1;
  bool packed = false;
  for (std::size_t index : indices) {
    const Encoded& ex = data.at(index);
    if (ex.tokens.size() > static_cast<std::size_t>(seq_len) || ex.targets.size() != ex.tokens.size() ||
        (!ex.positions.empty() && ex.positions.size() != ex.tokens.size()))
      throw std::invalid_argument("fill_padded: a sequence is longer than seq_len or malformed");
    longest = std::max(longest, ex.tokens.size());
    packed |= !ex.positions.empty();
  }
  const std::size_t len =
      pad_to > 0 ? static_cast<std::size_t>(std::max(pad_to, static_cast<int>(longest))) : longest;
  out.resize(static_cast<int>(indices.size()), static_cast<int>(len));
  out.real_tokens = 0;
  if (packed) out.positions.assign(out.tokens.size(), 0);
  for (std::size_t r = 0; r < indices.size(); ++r) {
    const Encoded& ex = data[indices[r]];
    int32_t* row_tokens = out.tokens.data() + r * len;
    int32_t* row_targets = out.targets.data() + r * len;
    std::copy(ex.tokens.begin(), ex.tokens.end(), row_tokens);
    std::copy(ex.targets.begin(), ex.targets.end(), row_targets);
    std::fill(row_tokens + ex.tokens.size(), row_tokens + len, pad);
    std::fill(row_targets + ex.targets.size(), row_targets + len, -1);
    if (packed) std::copy(ex.positions.begin(), ex.positions.end(), out.positions.begin() + r * len);
    out.real_tokens += static_cast<int64_t>(ex.tokens.size());
  }
}

}  // namespace lrllm

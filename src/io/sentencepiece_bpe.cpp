// Llama-2's SentencePiece-style BPE with byte fallback, read from a Hugging Face tokenizer.json; it
// encodes like llama-tokenizer-js (docs/design.md, Tokenizer; the rules are in tokenizer.h).
#include <algorithm>
#include <array>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "lrllm/core/common.h"
#include "lrllm/io/tokenizer_impl.h"

namespace lrllm {
namespace {

constexpr char32_t kSpaceMark = U'\u2581';  // "▁", SentencePiece's stand-in for a space
constexpr std::string_view kSpaceMarkUtf8 = "\u2581";

[[noreturn]] void corrupt(const std::string& path, const std::string& why) {
  throw InputError("corrupt tokenizer file '" + path + "': " + why);
}

void append_utf8(char32_t c, std::string& out) {
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xC0 | (c >> 6));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += static_cast<char>(0xE0 | (c >> 12));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (c >> 18));
    out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  }
}

// The length of the valid UTF-8 sequence at s[i] and its code point, or 0 when s[i] does not start one
// (a stray continuation byte, an overlong form, a surrogate, past U+10FFFF, or cut short).
std::size_t utf8_at(std::string_view s, std::size_t i, char32_t& c) {
  const auto byte = [&](std::size_t k) { return static_cast<unsigned char>(s[i + k]); };
  const unsigned char lead = byte(0);
  std::size_t len;
  unsigned char low = 0x80, high = 0xBF;  // the allowed range of the second byte
  if (lead < 0x80) {
    c = lead;
    return 1;
  } else if (lead >= 0xC2 && lead <= 0xDF) {
    len = 2, c = lead & 0x1F;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    len = 3, c = lead & 0x0F;
    if (lead == 0xE0) low = 0xA0;
    if (lead == 0xED) high = 0x9F;
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    len = 4, c = lead & 0x07;
    if (lead == 0xF0) low = 0x90;
    if (lead == 0xF4) high = 0x8F;
  } else {
    return 0;
  }
  if (i + len > s.size()) return 0;
  for (std::size_t k = 1; k < len; ++k) {
    const unsigned char b = byte(k);
    if (k == 1 ? (b < low || b > high) : (b & 0xC0) != 0x80) return 0;
    c = (c << 6) | (b & 0x3F);
  }
  return len;
}

class SentencePieceBpe final : public Tokenizer::Impl {
 public:
  explicit SentencePieceBpe(const std::string& path);

  std::vector<int> encode(std::string_view text) const override;
  std::string decode(std::span<const int> tokens) const override;
  int bos() const override { return bos_; }
  bool adds_space_first() const override { return true; }
  int eot() const override { return eos_; }
  int vocab_size() const override { return static_cast<int>(pieces_.size()); }

 private:
  void load_vocabulary(const std::string& path, const nlohmann::json& model,
                       std::unordered_map<std::string, int>& ids);
  void load_added_tokens(const std::string& path, const nlohmann::json& root);
  void load_merges(const std::string& path, const nlohmann::json& model,
                   const std::unordered_map<std::string, int>& ids);
  void push_char(char32_t c, std::vector<int>& out) const;

  std::vector<std::string> pieces_;            // id -> its piece, as in the file
  std::vector<int> byte_of_;                   // id -> the byte of a <0xXX> piece, else -1
  std::array<int, 256> byte_id_{};             // byte -> its <0xXX> piece
  std::unordered_map<char32_t, int> char_id_;  // pieces of one character
  MergeTable merges_;
  int bos_ = -1, eos_ = -1;
};

SentencePieceBpe::SentencePieceBpe(const std::string& path) {
  nlohmann::json root;
  try {
    root = nlohmann::json::parse(read_whole_file(path, "tokenizer file"));
  } catch (const nlohmann::json::exception& e) {
    corrupt(path, e.what());
  }
  if (!root.is_object() || !root.contains("model") || !root["model"].is_object())
    corrupt(path, "expected a JSON object with a \"model\" object");
  const nlohmann::json& model = root["model"];
  if (model.value("type", std::string()) != "BPE")
    corrupt(path, "model.type is not \"BPE\" (lrllm reads BPE tokenizers only)");
  // Without byte fallback a character outside the vocabulary would become <unk>, which the Llama rules
  // do not cover.
  if (model.value("byte_fallback", false) != true) corrupt(path, "model.byte_fallback is not true");
  std::unordered_map<std::string, int> ids;
  load_vocabulary(path, model, ids);
  load_added_tokens(path, root);
  load_merges(path, model, ids);
}

void SentencePieceBpe::load_vocabulary(const std::string& path, const nlohmann::json& model,
                                       std::unordered_map<std::string, int>& ids) {
  if (!model.contains("vocab") || !model["vocab"].is_object() || model["vocab"].empty())
    corrupt(path, "model.vocab is missing or not an object mapping pieces to ids");
  const nlohmann::json& vocab = model["vocab"];
  const auto n = static_cast<int64_t>(vocab.size());
  pieces_.assign(n, std::string());
  std::vector<bool> seen(n, false);
  for (const auto& [piece, value] : vocab.items()) {
    if (!value.is_number_integer()) corrupt(path, "the id of piece '" + piece + "' is not an integer");
    const auto id = value.get<int64_t>();
    if (id < 0 || id >= n || seen[id])
      corrupt(path, "model.vocab ids must be 0 .. " + std::to_string(n - 1) + ", each once");
    seen[id] = true;
    pieces_[id] = piece;
    ids.emplace(piece, static_cast<int>(id));
    char32_t c;
    if (!piece.empty() && utf8_at(piece, 0, c) == piece.size()) char_id_.emplace(c, static_cast<int>(id));
  }
  byte_of_.assign(n, -1);
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    const auto it = ids.find(name);
    if (it == ids.end()) corrupt(path, std::string("model.vocab has no byte piece ") + name);
    byte_id_[b] = it->second;
    byte_of_[it->second] = b;
  }
  const auto bos = ids.find("<s>"), eos = ids.find("</s>");
  if (bos == ids.end() || eos == ids.end()) corrupt(path, "model.vocab has no <s> or no </s>");
  bos_ = bos->second;
  eos_ = eos->second;
}

// Added tokens past the vocabulary (a padding token, say) extend the ids that decode knows; encode never
// produces them, as the reference treats special tokens in text as text.
void SentencePieceBpe::load_added_tokens(const std::string& path, const nlohmann::json& root) {
  if (!root.contains("added_tokens") || root["added_tokens"].is_null()) return;
  if (!root["added_tokens"].is_array()) corrupt(path, "added_tokens is not an array");
  std::vector<std::pair<int64_t, std::string>> extra;
  for (const auto& token : root["added_tokens"]) {
    if (!token.is_object() || !token.contains("id") || !token["id"].is_number_integer() ||
        !token.contains("content") || !token["content"].is_string())
      corrupt(path, "an entry of added_tokens lacks an integer id or a string content");
    const auto id = token["id"].get<int64_t>();
    const auto content = token["content"].get<std::string>();
    if (id < 0) corrupt(path, "added token '" + content + "' has a negative id");
    if (id < static_cast<int64_t>(pieces_.size())) {
      if (pieces_[id] != content)
        corrupt(path, "added token '" + content + "' has id " + std::to_string(id) +
                          ", which model.vocab gives to '" + pieces_[id] + "'");
    } else {
      extra.emplace_back(id, content);
    }
  }
  std::sort(extra.begin(), extra.end());
  for (const auto& [id, content] : extra) {
    if (id != static_cast<int64_t>(pieces_.size()))
      corrupt(path, "added token ids past model.vocab must follow it without gaps or repeats");
    pieces_.push_back(content);
    byte_of_.push_back(-1);
  }
}

void SentencePieceBpe::load_merges(const std::string& path, const nlohmann::json& model,
                                   const std::unordered_map<std::string, int>& ids) {
  if (!model.contains("merges") || !model["merges"].is_array())
    corrupt(path, "model.merges is missing or not an array");
  const nlohmann::json& merges = model["merges"];
  merges_.reserve(merges.size());
  for (std::size_t rank = 0; rank < merges.size(); ++rank) {
    const nlohmann::json& merge = merges[rank];
    const std::string where = "merge " + std::to_string(rank) + " of model.merges";
    std::string left, right;
    // tokenizers writes a merge as "left right", or since version 0.20 as ["left", "right"].
    if (merge.is_string()) {
      const auto text = merge.get<std::string>();
      const std::size_t space = text.find(' ');
      if (space == std::string::npos || text.find(' ', space + 1) != std::string::npos)
        corrupt(path, where + " ('" + text + "') is not two pieces separated by one space");
      left = text.substr(0, space);
      right = text.substr(space + 1);
    } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() && merge[1].is_string()) {
      left = merge[0].get<std::string>();
      right = merge[1].get<std::string>();
    } else {
      corrupt(path, where + " is neither \"left right\" nor [\"left\", \"right\"]");
    }
    for (const std::string& piece : {left, right, left + right})
      if (!ids.contains(piece))
        corrupt(path, where + " ('" + left + " " + right + "'): '" + piece + "' is not in model.vocab");
    // A pair listed twice keeps its later rank, as the reference's map does.
    merges_.insert_or_assign(pair_key(ids.at(left), ids.at(right)),
                             Merge{static_cast<int>(rank), ids.at(left + right)});
  }
}

void SentencePieceBpe::push_char(char32_t c, std::vector<int>& out) const {
  if (c == U' ') c = kSpaceMark;
  const auto it = char_id_.find(c);
  if (it != char_id_.end()) {
    out.push_back(it->second);
    return;
  }
  std::string bytes;
  append_utf8(c, bytes);
  for (const char b : bytes) out.push_back(byte_id_[static_cast<unsigned char>(b)]);
}

std::vector<int> SentencePieceBpe::encode(std::string_view text) const {
  std::vector<int> symbols;
  if (text.empty()) return symbols;
  symbols.reserve(text.size() + 1);
  push_char(U' ', symbols);  // the reference's preceding space
  for (std::size_t i = 0; i < text.size();) {
    char32_t c;
    const std::size_t len = utf8_at(text, i, c);
    if (len == 0) {
      symbols.push_back(byte_id_[static_cast<unsigned char>(text[i])]);
      ++i;
    } else {
      push_char(c, symbols);
      i += len;
    }
  }
  merge_symbols(symbols, merges_);
  return symbols;
}

std::string SentencePieceBpe::decode(std::span<const int> tokens) const {
  std::string bytes;
  const std::size_t first = !tokens.empty() && tokens[0] == bos_ ? 1 : 0;
  for (std::size_t i = first; i < tokens.size(); ++i) {
    const int t = tokens[i];
    if (t < 0 || t >= vocab_size())
      throw std::out_of_range("token id " + std::to_string(t) + " out of range");
    if (byte_of_[t] >= 0)
      bytes += static_cast<char>(byte_of_[t]);
    else
      bytes += pieces_[t];
  }
  // After joining, as the reference does, so a "▁" spelled in byte pieces is a space too.
  std::string text;
  text.reserve(bytes.size());
  for (std::size_t i = 0; i < bytes.size();) {
    if (std::string_view(bytes).substr(i, kSpaceMarkUtf8.size()) == kSpaceMarkUtf8) {
      text += ' ';
      i += kSpaceMarkUtf8.size();
    } else {
      text += bytes[i++];
    }
  }
  if (!text.empty() && text[0] == ' ') text.erase(0, 1);
  return text;
}

}  // namespace

std::unique_ptr<Tokenizer::Impl> load_sentencepiece_bpe(const std::string& tokenizer_json) {
  return std::make_unique<SentencePieceBpe>(tokenizer_json);
}

}  // namespace lrllm

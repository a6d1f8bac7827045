// GPT-2 byte-level BPE, the Tokenizer that fronts both tokenizers, and the token file writer. GPT-2 works
// on raw bytes and token ids throughout: the printable byte alphabet of encoder.json and vocab.bpe is
// undone once at load time, so encoding never builds unicode strings.
#include "lrllm/io/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <stdexcept>
#include <unordered_map>
#include <utility>

#include "lrllm/core/common.h"
#include "lrllm/io/data.h"
#include "lrllm/io/tokenizer_impl.h"

namespace lrllm {
namespace {

// JavaScript's \s, spelled out because PCRE2's differs at U+0085, U+180E and U+FEFF and the reference
// encoder is JavaScript.
constexpr std::string_view kSpace =
    "\\t\\n\\x0B\\f\\r \\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}"
    "\\x{FEFF}";

// GPT-2's pattern 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ with \s
// replaced by kSpace.
std::string pretokenize_pattern() {
  const std::string s(kSpace);
  return "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^" + s + "\\p{L}\\p{N}]+|[" + s + "]+(?![^" + s +
         "])|[" + s + "]+";
}

// GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the rest for U+0100 onwards.
std::array<char32_t, 256> byte_to_char() {
  std::array<char32_t, 256> map{};
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    map[b] = printable ? static_cast<char32_t>(b) : next++;
  }
  return map;
}

// Turns a string of the byte alphabet back into raw bytes; false when it is not valid UTF-8 or holds a
// character outside the alphabet.
bool chars_to_bytes(std::string_view s, std::string& bytes) {
  static const std::vector<int> char_to_byte = [] {
    std::vector<int> inverse(512, -1);
    const auto map = byte_to_char();
    for (int b = 0; b < 256; ++b) inverse[map[b]] = b;
    return inverse;
  }();
  bytes.clear();
  for (std::size_t i = 0; i < s.size();) {
    const auto lead = static_cast<unsigned char>(s[i]);
    char32_t c;
    std::size_t len;
    if (lead < 0x80) {
      c = lead, len = 1;
    } else if ((lead & 0xE0) == 0xC0) {
      c = lead & 0x1F, len = 2;
    } else {
      return false;  // the alphabet ends at U+0143, so three- and four-byte sequences never occur
    }
    if (i + len > s.size()) return false;
    for (std::size_t k = 1; k < len; ++k) {
      const auto cont = static_cast<unsigned char>(s[i + k]);
      if ((cont & 0xC0) != 0x80) return false;
      c = (c << 6) | (cont & 0x3F);
    }
    if (c >= char_to_byte.size() || char_to_byte[c] < 0 || (len == 2 && c < 0x80)) return false;
    bytes.push_back(static_cast<char>(char_to_byte[c]));
    i += len;
  }
  return true;
}

}  // namespace

std::string read_whole_file(const std::string& path, const std::string& what) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw InputError("cannot open " + what + " '" + path + "': " + std::strerror(errno));
  std::string text;
  char buf[1 << 16];
  std::size_t got;
  while ((got = std::fread(buf, 1, sizeof buf, f)) > 0) text.append(buf, got);
  const bool failed = std::ferror(f);
  std::fclose(f);
  if (failed) throw InputError("cannot read " + what + " '" + path + "'");
  return text;
}

namespace {

[[noreturn]] void corrupt(const std::string& path, const std::string& why) {
  throw InputError("corrupt tokenizer file '" + path + "': " + why);
}

struct StringHash {
  using is_transparent = void;
  std::size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};

// Bounds the cache on adversarial input; ordinary text has far fewer distinct pre-tokens.
constexpr std::size_t kMaxCachedPieces = 1 << 20;
constexpr std::size_t kMaxCachedPieceBytes = 128;

// Appends tokens to path + ".tmp" and renames it into place on commit(); removes it when abandoned.
class TokenFileWriter {
 public:
  explicit TokenFileWriter(std::string path) : path_(std::move(path)), tmp_(path_ + ".tmp") {
    file_ = std::fopen(tmp_.c_str(), "wb");
    if (!file_) throw RuntimeError("cannot write token file '" + tmp_ + "': " + std::strerror(errno));
    const std::array<int32_t, kTokenHeaderInts> header{};
    write(header.data(), sizeof header);
  }
  TokenFileWriter(const TokenFileWriter&) = delete;
  TokenFileWriter& operator=(const TokenFileWriter&) = delete;
  ~TokenFileWriter() {
    if (file_) {
      std::fclose(file_);
      std::remove(tmp_.c_str());
    }
  }

  void append(std::span<const uint16_t> tokens) {
    write(tokens.data(), tokens.size_bytes());
    count_ += tokens.size();
  }

  std::size_t commit() {
    if (count_ > static_cast<std::size_t>(INT32_MAX))
      throw InputError("token file '" + path_ + "' would hold " + std::to_string(count_) +
                       " tokens; its int32 header holds at most " + std::to_string(INT32_MAX));
    std::array<int32_t, kTokenHeaderInts> header{};
    header[0] = kTokenFileMagic;
    header[1] = kTokenFileVersion;
    header[2] = static_cast<int32_t>(count_);
    if (std::fseek(file_, 0, SEEK_SET) != 0) fail();
    write(header.data(), sizeof header);
    const int closed = std::fclose(file_);
    file_ = nullptr;
    if (closed != 0) {
      std::remove(tmp_.c_str());
      throw RuntimeError("cannot write token file '" + tmp_ + "': " + std::strerror(errno));
    }
    std::error_code ec;
    std::filesystem::rename(tmp_, path_, ec);
    if (ec) {
      std::remove(tmp_.c_str());
      throw RuntimeError("cannot rename '" + tmp_ + "' to '" + path_ + "': " + ec.message());
    }
    return count_;
  }

 private:
  // The format is llm.c's little-endian layout; writing native integers is only right on such hosts.
  static_assert(std::endian::native == std::endian::little);

  void write(const void* data, std::size_t bytes) {
    if (std::fwrite(data, 1, bytes, file_) != bytes) fail();
  }
  [[noreturn]] void fail() {
    throw RuntimeError("cannot write token file '" + tmp_ + "': " + std::strerror(errno));
  }

  std::string path_;
  std::string tmp_;
  std::FILE* file_ = nullptr;
  std::size_t count_ = 0;
};

class Gpt2Bpe final : public Tokenizer::Impl {
 public:
  std::vector<int> encode(std::string_view text) const override;
  std::string decode(std::span<const int> tokens) const override;
  int bos() const override { return -1; }
  bool adds_space_first() const override { return false; }
  int eot() const override { return eot_; }
  int vocab_size() const override { return static_cast<int>(id_bytes.size()); }

  void load_vocabulary(const std::string& path, std::unordered_map<std::string, int>& ids);
  void load_merges(const std::string& path, const std::unordered_map<std::string, int>& ids);
  void compile_pattern();

 private:
  void bpe(std::string_view piece, std::vector<int>& out) const;
  void encode_piece(std::string_view piece, std::vector<int>& out) const;

  std::vector<std::string> id_bytes;  // token id -> its bytes
  std::array<int, 256> byte_id{};     // byte -> its single-byte token
  MergeTable merges;
  int eot_ = -1;

  std::unique_ptr<pcre2_code, decltype(&pcre2_code_free)> regex{nullptr, &pcre2_code_free};

  struct Cache {
    std::mutex mutex;
    std::unordered_map<std::string, std::vector<int>, StringHash, std::equal_to<>> pieces;
  };
  std::unique_ptr<Cache> cache = std::make_unique<Cache>();
};

void Gpt2Bpe::load_vocabulary(const std::string& path, std::unordered_map<std::string, int>& ids) {
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(read_whole_file(path, "tokenizer file"));
  } catch (const nlohmann::json::exception& e) {
    corrupt(path, e.what());
  }
  if (!json.is_object() || json.empty()) corrupt(path, "expected a JSON object mapping tokens to ids");
  id_bytes.assign(json.size(), std::string());
  std::vector<bool> seen(json.size(), false);
  std::string bytes;
  for (const auto& [key, value] : json.items()) {
    if (!value.is_number_integer()) corrupt(path, "the id of token '" + key + "' is not an integer");
    const auto id = value.get<int64_t>();
    if (id < 0 || id >= static_cast<int64_t>(json.size()) || seen[id])
      corrupt(path, "ids must be 0 .. " + std::to_string(json.size() - 1) + ", each once");
    if (!chars_to_bytes(key, bytes)) corrupt(path, "token '" + key + "' is outside GPT-2's byte alphabet");
    seen[id] = true;
    id_bytes[id] = bytes;
    ids.emplace(bytes, static_cast<int>(id));
  }
  for (int b = 0; b < 256; ++b) {
    const auto it = ids.find(std::string(1, static_cast<char>(b)));
    if (it == ids.end()) corrupt(path, "no token for byte " + std::to_string(b));
    byte_id[b] = it->second;
  }
  const auto it = ids.find("<|endoftext|>");
  if (it == ids.end()) corrupt(path, "no <|endoftext|> token");
  eot_ = it->second;
}

void Gpt2Bpe::load_merges(const std::string& path, const std::unordered_map<std::string, int>& ids) {
  const std::string text = read_whole_file(path, "tokenizer file");
  std::vector<std::pair<uint64_t, int>> ranked;  // in file order: (pair, result)
  std::size_t line_no = 0;
  std::string left, right;
  for (std::size_t pos = 0; pos < text.size();) {
    std::size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    const std::string_view line(text.data() + pos, end - pos);
    pos = end + 1;
    if (++line_no == 1) {
      if (!line.starts_with("#version")) corrupt(path, "the first line is not a #version header");
      continue;
    }
    std::vector<std::string_view> fields;
    for (std::size_t i = 0; i < line.size();) {
      const std::size_t start = line.find_first_not_of(" \t\r\v\f", i);
      if (start == std::string_view::npos) break;
      const std::size_t stop = std::min(line.find_first_of(" \t\r\v\f", start), line.size());
      fields.push_back(line.substr(start, stop - start));
      i = stop;
    }
    if (fields.empty()) continue;
    const std::string where = "line " + std::to_string(line_no) + ": ";
    if (fields.size() != 2) corrupt(path, where + "expected two symbols");
    if (!chars_to_bytes(fields[0], left) || !chars_to_bytes(fields[1], right))
      corrupt(path, where + "symbol outside GPT-2's byte alphabet");
    const auto l = ids.find(left), r = ids.find(right), m = ids.find(left + right);
    if (l == ids.end() || r == ids.end() || m == ids.end())
      corrupt(path, where + "symbol or merge result not in the vocabulary");
    ranked.emplace_back(pair_key(l->second, r->second), m->second);
  }
  merges.reserve(ranked.size());
  // A pair listed twice keeps its later rank, as OpenAI's dict does.
  for (std::size_t i = 0; i < ranked.size(); ++i)
    merges.insert_or_assign(ranked[i].first, Merge{static_cast<int>(i), ranked[i].second});
  // bpe() merges pairs in (rank, position) order as they appear, which equals OpenAI's round-by-round
  // loop only if every merge ranks after all merges producing its parts; GPT-2's training order ensures
  // that, and a file violating it is rejected rather than encoded differently.
  std::vector<int> produced(id_bytes.size(), -1);
  for (const auto& [key, merge] : merges)
    produced[merge.result] = std::max(produced[merge.result], merge.rank);
  for (const auto& [key, merge] : merges) {
    const int l = static_cast<int>(key >> 32), r = static_cast<int>(key & 0xFFFFFFFFu);
    if (produced[l] >= merge.rank || produced[r] >= merge.rank)
      corrupt(path, "line " + std::to_string(merge.rank + 2) + " merges a symbol made by a later merge");
  }
}

void Gpt2Bpe::compile_pattern() {
  const std::string pattern = pretokenize_pattern();
  int error = 0;
  PCRE2_SIZE offset = 0;
  // MATCH_INVALID_UTF lets the matcher skip over bytes that are not UTF-8 instead of rejecting the
  // subject; encode() turns those skipped runs into pre-tokens of their own.
  regex.reset(pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                            PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &error, &offset, nullptr));
  if (!regex) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error, message, sizeof message);
    throw RuntimeError("PCRE2 rejected the pre-tokenization pattern at offset " + std::to_string(offset) +
                       ": " + reinterpret_cast<const char*>(message));
  }
  // Without JIT (a PCRE2 built without it) pcre2_match falls back to the interpreter, only slower.
  pcre2_jit_compile(regex.get(), PCRE2_JIT_COMPLETE);
}

void Gpt2Bpe::bpe(std::string_view piece, std::vector<int>& out) const {
  std::vector<int> symbols(piece.size());
  for (std::size_t i = 0; i < piece.size(); ++i) symbols[i] = byte_id[static_cast<unsigned char>(piece[i])];
  merge_symbols(symbols, merges);
  out.insert(out.end(), symbols.begin(), symbols.end());
}

void Gpt2Bpe::encode_piece(std::string_view piece, std::vector<int>& out) const {
  if (piece.size() == 1) {
    out.push_back(byte_id[static_cast<unsigned char>(piece[0])]);
    return;
  }
  if (piece.size() > kMaxCachedPieceBytes) {
    bpe(piece, out);
    return;
  }
  {
    std::lock_guard lock(cache->mutex);
    const auto it = cache->pieces.find(piece);
    if (it != cache->pieces.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const std::size_t first = out.size();
  bpe(piece, out);
  std::lock_guard lock(cache->mutex);
  if (cache->pieces.size() >= kMaxCachedPieces) cache->pieces.clear();
  cache->pieces.emplace(piece, std::vector<int>(out.begin() + first, out.end()));
}

std::vector<int> Gpt2Bpe::encode(std::string_view text) const {
  std::vector<int> out;
  out.reserve(text.size() / 4);
  std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> match(
      pcre2_match_data_create_from_pattern(regex.get(), nullptr), &pcre2_match_data_free);
  if (!match) throw std::bad_alloc();
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  std::size_t pos = 0;
  while (pos < text.size()) {
    const int rc = pcre2_match(regex.get(), subject, text.size(), pos, 0, match.get(), nullptr);
    std::size_t start = text.size(), end = text.size();
    if (rc >= 0) {
      const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(match.get());
      start = ovector[0];
      end = ovector[1];
    } else if (rc != PCRE2_ERROR_NOMATCH) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(rc, message, sizeof message);
      throw RuntimeError(std::string("pre-tokenization failed: ") + reinterpret_cast<const char*>(message));
    }
    // The pattern matches every valid character, so whatever it skipped is a run of invalid UTF-8.
    if (start > pos) encode_piece(text.substr(pos, start - pos), out);
    if (end > start) encode_piece(text.substr(start, end - start), out);
    pos = end;
  }
  return out;
}

std::string Gpt2Bpe::decode(std::span<const int> tokens) const {
  std::string text;
  for (const int t : tokens) {
    if (t < 0 || t >= vocab_size())
      throw std::out_of_range("token id " + std::to_string(t) + " out of range");
    text += id_bytes[t];
  }
  return text;
}

}  // namespace

// A heap over candidate pairs and a linked list of symbols make this O(n log n) even for huge inputs.
void merge_symbols(std::vector<int>& symbols, const MergeTable& merges) {
  const int n = static_cast<int>(symbols.size());
  if (n < 2) return;
  std::vector<int>& id = symbols;
  std::vector<int> prev(n), next(n);
  for (int i = 0; i < n; ++i) {
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  struct Candidate {
    int rank, pos, left, right, result;
  };
  const auto later = [](const Candidate& a, const Candidate& b) {
    return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
  };
  std::priority_queue<Candidate, std::vector<Candidate>, decltype(later)> heap(later);
  const auto offer = [&](int pos) {
    const int q = next[pos];
    if (q < 0) return;
    const auto it = merges.find(pair_key(id[pos], id[q]));
    if (it != merges.end()) heap.push({it->second.rank, pos, id[pos], id[q], it->second.result});
  };
  for (int i = 0; i + 1 < n; ++i) offer(i);
  while (!heap.empty()) {
    const Candidate c = heap.top();
    heap.pop();
    // A symbol only ever grows into a longer token, so unchanged ids mean the pair is still there.
    const int q = next[c.pos];
    if (id[c.pos] != c.left || q < 0 || id[q] != c.right) continue;
    id[c.pos] = c.result;
    id[q] = -1;
    next[c.pos] = next[q];
    if (next[q] >= 0) prev[next[q]] = c.pos;
    if (prev[c.pos] >= 0) offer(prev[c.pos]);
    offer(c.pos);
  }
  int kept = 0;
  for (int i = 0; i >= 0; i = next[i]) id[kept++] = id[i];
  symbols.resize(kept);
}

std::unique_ptr<Tokenizer::Impl> load_gpt2_bpe(const std::string& encoder_json,
                                               const std::string& vocab_bpe) {
  auto impl = std::make_unique<Gpt2Bpe>();
  std::unordered_map<std::string, int> ids;
  impl->load_vocabulary(encoder_json, ids);
  impl->load_merges(vocab_bpe, ids);
  impl->compile_pattern();
  return impl;
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::load(const std::string& encoder_json, const std::string& vocab_bpe) {
  return Tokenizer(load_gpt2_bpe(encoder_json, vocab_bpe));
}

Tokenizer Tokenizer::load_dir(const std::string& dir) {
  namespace fs = std::filesystem;
  const std::string encoder_json = dir + "/encoder.json", vocab_bpe = dir + "/vocab.bpe";
  const std::string tokenizer_json = dir + "/tokenizer.json";
  std::error_code ec;
  // One of GPT-2's files alone is still GPT-2's tokenizer, so the error names the file that is missing.
  if (fs::exists(encoder_json, ec) || fs::exists(vocab_bpe, ec)) return load(encoder_json, vocab_bpe);
  if (fs::exists(tokenizer_json, ec)) return Tokenizer(load_sentencepiece_bpe(tokenizer_json));
  throw InputError("tokenizer directory '" + dir +
                   "' holds neither GPT-2's encoder.json and vocab.bpe nor a Hugging Face tokenizer.json");
}

std::vector<int> Tokenizer::encode(std::string_view text) const {
  return impl_->encode(text);
}
std::string Tokenizer::decode(std::span<const int> tokens) const {
  return impl_->decode(tokens);
}
int Tokenizer::bos() const {
  return impl_->bos();
}
void check_tokenizer_fits(const Tokenizer& tok, int model_vocab, const std::string& dir) {
  if (tok.vocab_size() > model_vocab)
    throw InputError(
        strprintf("the tokenizer in %s has %d tokens but the model's vocabulary is %d: give the "
                  "model's own tokenizer (--data.tokenizer_dir)",
                  dir.c_str(), tok.vocab_size(), model_vocab));
}

bool Tokenizer::adds_space_first() const {
  return impl_->adds_space_first();
}
int Tokenizer::eot() const {
  return impl_->eot();
}
int Tokenizer::vocab_size() const {
  return impl_->vocab_size();
}

void write_token_file(const std::string& path, std::span<const uint16_t> tokens) {
  TokenFileWriter writer(path);
  writer.append(tokens);
  writer.commit();
}

std::size_t tokenize_to_file(const Tokenizer& tok, const std::string& input, const std::string& output) {
  namespace fs = std::filesystem;
  if (tok.vocab_size() > 65536)
    throw InputError("a vocabulary of " + std::to_string(tok.vocab_size()) + " tokens does not fit uint16");
  std::vector<fs::path> documents;
  std::error_code ec;
  const fs::file_status status = fs::status(input, ec);
  if (fs::is_directory(status)) {
    for (const auto& entry : fs::directory_iterator(input, ec))
      if (entry.is_regular_file()) documents.push_back(entry.path());
    if (ec) throw InputError("cannot list data.input '" + input + "': " + ec.message());
    std::sort(documents.begin(), documents.end(), [](const fs::path& a, const fs::path& b) {
      return a.filename().string() < b.filename().string();
    });
    if (documents.empty()) throw InputError("data.input '" + input + "' holds no files");
  } else if (fs::is_regular_file(status)) {
    documents.push_back(input);
  } else {
    throw InputError("data.input '" + input + "' is neither a file nor a directory");
  }

  TokenFileWriter writer(output);
  std::vector<uint16_t> buffer;
  const int delimiter = tok.bos() >= 0 ? tok.bos() : tok.eot();
  for (const auto& document : documents) {
    const std::vector<int> ids = tok.encode(read_whole_file(document.string(), "document"));
    buffer.assign(1, static_cast<uint16_t>(delimiter));
    buffer.insert(buffer.end(), ids.begin(), ids.end());
    writer.append(buffer);
  }
  return writer.commit();
}

}  // namespace lrllm

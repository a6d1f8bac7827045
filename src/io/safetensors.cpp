#include "lrllm/io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "lrllm/core/common.h"
#include "lrllm/core/signals.h"

namespace fs = std::filesystem;

namespace lrllm {

static_assert(std::endian::native == std::endian::little, "safetensors stores little-endian values");

uint16_t float_to_bf16(float x) {
  const uint32_t u = std::bit_cast<uint32_t>(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  // Adding 0x7fff plus the lowest kept bit carries into the kept bits exactly when the dropped half is above
  // one half, or is one half and the kept value is odd.
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

uint16_t float_to_f16(float x) {
  const uint32_t u = std::bit_cast<uint32_t>(x);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;  // NaN
  // 65520 is halfway between the largest half, 65504 (odd mantissa), and 65536: it and above round to inf.
  if (a >= 0x477ff000u) return sign | 0x7c00u;
  if (a < 0x38800000u) {
    // Below 2^-14 a half is subnormal, a multiple of 2^-24: adding 0.5 (whose float spacing is 2^-24) lets
    // the float addition do the rounding to nearest even, and the low bits are then the half's mantissa.
    const float shifted = std::bit_cast<float>(a) + 0.5f;
    return sign | static_cast<uint16_t>(std::bit_cast<uint32_t>(shifted) - 0x3f000000u);
  }
  // Rebias the exponent (127 -> 15) and round the 13 dropped bits to nearest even; a carry moves into the
  // exponent, as it should.
  const uint32_t odd = (a >> 13) & 1u;
  return sign | static_cast<uint16_t>((a + 0xc8000fffu + odd) >> 13);
}

float bf16_to_float(uint16_t h) {
  return std::bit_cast<float>(static_cast<uint32_t>(h) << 16);
}

float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  if (exponent == 0) {
    const float v = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -v : v;
  }
  if (exponent == 31) return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
  return std::bit_cast<float>(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

std::size_t SafetensorsTensor::elements() const {
  std::size_t n = 1;
  for (int64_t d : shape) n *= static_cast<std::size_t>(d);
  return n;
}

namespace {

// Bytes per element of every dtype the format defines; 0 for a name it does not.
std::size_t dtype_size(const std::string& dtype) {
  static const std::map<std::string, std::size_t> sizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E4M3", 1}, {"F8_E5M2", 1}, {"U16", 2}, {"I16", 2}, {"F16", 2},
      {"BF16", 2}, {"U32", 4}, {"I32", 4}, {"F32", 4},     {"U64", 8},     {"I64", 8}, {"F64", 8}};
  const auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

// The reference implementation refuses larger headers; so does this reader, before allocating one.
constexpr uint64_t kMaxHeader = 100'000'000;

[[noreturn]] void bad(const std::string& path, const std::string& what) {
  throw InputError(path + ": " + what);
}

uint64_t offset_value(const std::string& path, const std::string& name, const nlohmann::json& v) {
  if (!v.is_number_unsigned())
    bad(path, "tensor " + name + ": data_offsets must be two non-negative integers");
  return v.get<uint64_t>();
}

SafetensorsTensor parse_entry(const std::string& path, const std::string& name, const nlohmann::json& e) {
  if (!e.is_object()) bad(path, "tensor " + name + ": its header entry is not an object");
  for (const char* key : {"dtype", "shape", "data_offsets"})
    if (!e.contains(key)) bad(path, "tensor " + name + ": the header entry has no " + key);
  SafetensorsTensor t;
  t.name = name;
  if (!e["dtype"].is_string()) bad(path, "tensor " + name + ": dtype is not a string");
  t.dtype = e["dtype"].get<std::string>();
  const std::size_t elem = dtype_size(t.dtype);
  if (elem == 0) bad(path, "tensor " + name + ": unknown dtype '" + t.dtype + "'");
  if (!e["shape"].is_array()) bad(path, "tensor " + name + ": shape is not an array");
  // Counted in 128 bits, so that no product of dimensions wraps around before it is compared.
  unsigned __int128 bytes = elem;
  for (const nlohmann::json& d : e["shape"]) {
    if (!d.is_number_unsigned() || d.get<uint64_t>() > (uint64_t{1} << 48))
      bad(path, "tensor " + name + ": shape holds " + d.dump() + ", not a dimension");
    t.shape.push_back(static_cast<int64_t>(d.get<uint64_t>()));
    bytes *= d.get<uint64_t>();
    if (bytes > (static_cast<unsigned __int128>(1) << 64)) bytes = static_cast<unsigned __int128>(1) << 64;
  }
  const nlohmann::json& off = e["data_offsets"];
  if (!off.is_array() || off.size() != 2)
    bad(path, "tensor " + name + ": data_offsets must be two non-negative integers");
  t.begin = offset_value(path, name, off[0]);
  t.end = offset_value(path, name, off[1]);
  if (t.end < t.begin)
    bad(path, strprintf("tensor %s: data_offsets [%llu, %llu) end before they begin", name.c_str(),
                        static_cast<unsigned long long>(t.begin), static_cast<unsigned long long>(t.end)));
  if (bytes != t.end - t.begin)
    bad(path,
        strprintf("tensor %s: shape %s of %s needs %llu bytes, but data_offsets [%llu, %llu) span %llu",
                  name.c_str(), e["shape"].dump().c_str(), t.dtype.c_str(),
                  static_cast<unsigned long long>(bytes), static_cast<unsigned long long>(t.begin),
                  static_cast<unsigned long long>(t.end), static_cast<unsigned long long>(t.end - t.begin)));
  return t;
}

}  // namespace

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) bad(path, std::string("cannot open: ") + std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    bad(path, "not a regular file");
  }
  size_ = static_cast<std::size_t>(st.st_size);
  if (size_ < 8) {
    ::close(fd);
    bad(path, strprintf("%zu bytes: shorter than the 8-byte header length of a safetensors file", size_));
  }
  void* m = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (m == MAP_FAILED) bad(path, std::string("cannot map the file: ") + std::strerror(errno));
  map_ = static_cast<const unsigned char*>(m);
  try {
    uint64_t n = 0;
    std::memcpy(&n, map_, 8);
    if (n > size_ - 8)
      bad(path, strprintf("the header length %llu runs past the end of the file (%zu bytes)",
                          static_cast<unsigned long long>(n), size_));
    if (n > kMaxHeader)
      bad(path, strprintf("the header length %llu is over the format's limit of %llu bytes",
                          static_cast<unsigned long long>(n), static_cast<unsigned long long>(kMaxHeader)));
    data_start_ = 8 + n;
    nlohmann::json header;
    try {
      header = nlohmann::json::parse(map_ + 8, map_ + 8 + n);
    } catch (const nlohmann::json::exception& e) {
      bad(path, std::string("the header is not valid JSON: ") + e.what());
    }
    if (!header.is_object()) bad(path, "the header is not a JSON object");
    for (const auto& [name, entry] : header.items()) {
      if (name == "__metadata__") {
        if (!entry.is_object()) bad(path, "__metadata__ is not an object");
        for (const auto& [key, value] : entry.items()) {
          if (!value.is_string()) bad(path, "__metadata__ " + key + " is not a string");
          metadata_[key] = value.get<std::string>();
        }
        continue;
      }
      tensors_.push_back(parse_entry(path, name, entry));
    }
    // The data must be exactly the tensors' bytes, back to back: in offset order, each starts where the one
    // before ends, and the last ends at the end of the file.
    const uint64_t data = size_ - data_start_;
    std::vector<const SafetensorsTensor*> order;
    for (const SafetensorsTensor& t : tensors_) {
      if (t.end > data)
        bad(path, strprintf("tensor %s: data_offsets [%llu, %llu) run past the end of the data (%llu bytes)",
                            t.name.c_str(), static_cast<unsigned long long>(t.begin),
                            static_cast<unsigned long long>(t.end), static_cast<unsigned long long>(data)));
      order.push_back(&t);
    }
    std::sort(order.begin(), order.end(), [](const SafetensorsTensor* a, const SafetensorsTensor* b) {
      return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
    });
    uint64_t at = 0;
    const SafetensorsTensor* previous = nullptr;
    for (const SafetensorsTensor* t : order) {
      if (t->begin < at)
        bad(path, "tensor " + t->name + ": its data_offsets overlap those of " + previous->name);
      if (t->begin > at)
        bad(path, strprintf("tensor %s: %llu bytes before its data_offsets belong to no tensor",
                            t->name.c_str(), static_cast<unsigned long long>(t->begin - at)));
      at = t->end;
      previous = t;
    }
    if (at != data)
      bad(path, strprintf("%llu bytes of trailing data after the last tensor",
                          static_cast<unsigned long long>(data - at)));
  } catch (...) {
    munmap(const_cast<unsigned char*>(map_), size_);
    throw;
  }
  std::sort(tensors_.begin(), tensors_.end(),
            [](const SafetensorsTensor& a, const SafetensorsTensor& b) { return a.name < b.name; });
}

SafetensorsFile::~SafetensorsFile() {
  munmap(const_cast<unsigned char*>(map_), size_);
}

const SafetensorsTensor* SafetensorsFile::find(const std::string& name) const {
  const auto it =
      std::lower_bound(tensors_.begin(), tensors_.end(), name,
                       [](const SafetensorsTensor& t, const std::string& n) { return t.name < n; });
  return it != tensors_.end() && it->name == name ? &*it : nullptr;
}

const unsigned char* SafetensorsFile::bytes(const SafetensorsTensor& t) const {
  return map_ + data_start_ + t.begin;
}

std::vector<float> SafetensorsFile::read(const std::string& name) const {
  const SafetensorsTensor* t = find(name);
  if (t == nullptr) bad(path_, "has no tensor " + name);
  const unsigned char* p = bytes(*t);
  std::vector<float> out(t->elements());
  if (t->dtype == "F32") {
    if (!out.empty())
      std::memcpy(out.data(), p, out.size() * sizeof(float));  // an empty vector's data may be null
  } else if (t->dtype == "F16" || t->dtype == "BF16") {
    const bool half = t->dtype == "F16";
    for (std::size_t i = 0; i < out.size(); ++i) {
      uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      out[i] = half ? f16_to_float(h) : bf16_to_float(h);
    }
  } else {
    bad(path_, "tensor " + name + " has dtype " + t->dtype + ": lrllm reads F32, F16 and BF16 tensors");
  }
  // A streaming reader (--mode import) touches each tensor's pages once: they leave this process's resident
  // set once converted, so a 7B import does not hold its 13.5 GB file mapped (the page cache keeps them, and
  // a second read faults them back; the mapping is read-only, so nothing is lost).
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto first = reinterpret_cast<uintptr_t>(p) & ~(page - 1),
             last = reinterpret_cast<uintptr_t>(p) + (t->end - t->begin);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
  return out;
}

SafetensorsSet::SafetensorsSet(const std::string& folder) : folder_(folder) {
  const fs::path dir(folder);
  const fs::path index = dir / "model.safetensors.index.json", single = dir / "model.safetensors";
  std::error_code ec;
  if (!fs::exists(index, ec)) {
    if (!fs::exists(single, ec))
      throw InputError(folder + ": holds neither model.safetensors nor model.safetensors.index.json");
    files_.push_back(std::make_unique<SafetensorsFile>(single.string()));
    for (const SafetensorsTensor& t : files_.back()->tensors()) where_[t.name] = files_.back().get();
    return;
  }
  nlohmann::json map;
  {
    std::ifstream in(index);
    if (!in) throw InputError(index.string() + ": cannot open the file");
    try {
      map = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
      throw InputError(index.string() + ": not valid JSON: " + e.what());
    }
  }
  if (!map.is_object() || !map.contains("weight_map") || !map["weight_map"].is_object())
    throw InputError(index.string() + ": has no weight_map object (tensor name -> shard file)");
  std::map<std::string, const SafetensorsFile*> opened;
  for (const auto& [name, shard] : map["weight_map"].items()) {
    if (!shard.is_string()) throw InputError(index.string() + ": weight_map " + name + " is not a file name");
    const std::string file = shard.get<std::string>();
    // A shard is a file of the folder itself: a path elsewhere would read files the folder does not hold.
    if (file.empty() || file.find('/') != std::string::npos || file == "." || file == "..")
      throw InputError(index.string() + ": weight_map " + name + " names '" + file +
                       "', not a file of the folder");
    auto it = opened.find(file);
    if (it == opened.end()) {
      files_.push_back(std::make_unique<SafetensorsFile>((dir / file).string()));
      it = opened.emplace(file, files_.back().get()).first;
    }
    if (it->second->find(name) == nullptr)
      throw InputError(index.string() + ": weight_map puts tensor " + name + " in " + file +
                       ", which does not hold it");
    where_[name] = it->second;
  }
  // Every tensor of a shard is the index's, so that a folder reads as one set, whichever file is opened.
  for (const auto& file : files_)
    for (const SafetensorsTensor& t : file->tensors()) {
      const auto it = where_.find(t.name);
      if (it == where_.end())
        throw InputError(file->path() + ": holds tensor " + t.name + ", which weight_map does not name");
      if (it->second != file.get())
        throw InputError(file->path() + ": holds tensor " + t.name + ", which weight_map puts in " +
                         it->second->path());
    }
}

std::vector<std::string> SafetensorsSet::names() const {
  std::vector<std::string> out;
  for (const auto& [name, file] : where_) out.push_back(name);
  return out;
}

const SafetensorsTensor* SafetensorsSet::find(const std::string& name) const {
  const auto it = where_.find(name);
  return it == where_.end() ? nullptr : it->second->find(name);
}

std::vector<float> SafetensorsSet::read(const std::string& name) const {
  const auto it = where_.find(name);
  if (it == where_.end()) throw InputError(folder_ + ": has no tensor " + name);
  return it->second->read(name);
}

const std::string& SafetensorsSet::file_of(const std::string& name) const {
  const auto it = where_.find(name);
  return it == where_.end() ? folder_ : it->second->path();
}

const char* safetensors_dtype_name(SafetensorsDtype d) {
  switch (d) {
    case SafetensorsDtype::f32:
      return "F32";
    case SafetensorsDtype::f16:
      return "F16";
    case SafetensorsDtype::bf16:
      return "BF16";
  }
  return "F32";
}

SafetensorsDtype parse_export_dtype(const std::string& name) {
  if (name == "f32") return SafetensorsDtype::f32;
  if (name == "f16") return SafetensorsDtype::f16;
  if (name == "bf16") return SafetensorsDtype::bf16;
  throw InputError("--export.dtype must be f32, bf16 or f16, not '" + name + "'");
}

void write_safetensors(const std::string& path, const std::vector<SafetensorsEntry>& entries,
                       const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t at = 0;
  for (const SafetensorsEntry& e : entries) {
    uint64_t n = 1;
    for (int64_t d : e.shape) n *= static_cast<uint64_t>(d);
    const uint64_t bytes = n * (e.dtype == SafetensorsDtype::f32 ? 4 : 2);
    header[e.name] = {
        {"dtype", safetensors_dtype_name(e.dtype)}, {"shape", e.shape}, {"data_offsets", {at, at + bytes}}};
    at += bytes;
  }
  std::string text = header.dump();
  text.append((8 - (text.size() % 8)) % 8, ' ');
  const std::string tmp = path + ".tmp";
  set_partial_output(tmp);
  try {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw RuntimeError("cannot create " + tmp);
    const uint64_t n = text.size();
    out.write(reinterpret_cast<const char*>(&n), 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    std::vector<uint16_t> half;
    for (const SafetensorsEntry& e : entries) {
      const std::vector<float> v = e.values();
      uint64_t n_expected = 1;
      for (int64_t d : e.shape) n_expected *= static_cast<uint64_t>(d);
      LRLLM_CHECK(v.size() == n_expected, "write_safetensors", e.name + ": values do not fill the shape");
      if (e.dtype == SafetensorsDtype::f32) {
        out.write(reinterpret_cast<const char*>(v.data()), static_cast<std::streamsize>(v.size() * 4));
        continue;
      }
      half.resize(v.size());
      for (std::size_t i = 0; i < v.size(); ++i)
        half[i] = e.dtype == SafetensorsDtype::f16 ? float_to_f16(v[i]) : float_to_bf16(v[i]);
      out.write(reinterpret_cast<const char*>(half.data()), static_cast<std::streamsize>(half.size() * 2));
    }
    out.flush();
    if (!out) throw RuntimeError("cannot write " + tmp + ": " + std::strerror(errno));
  } catch (...) {
    std::error_code ec;
    fs::remove(tmp, ec);
    clear_partial_output();
    throw;
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) throw RuntimeError("cannot rename " + tmp + " to " + path + ": " + ec.message());
  clear_partial_output();
}

}  // namespace lrllm

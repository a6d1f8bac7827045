// safetensors files (docs/design.md, safetensors and Hugging Face folders): an 8-byte little-endian header
// length N, N bytes of JSON naming each tensor's dtype, shape and data_offsets (relative to the byte after
// the header), then the tensors' bytes, contiguous and without holes. The reader maps the file and converts
// one tensor at a time to float32, so a model larger than memory can be read tensor by tensor; the writer
// streams its tensors the same way.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace lrllm {

// IEEE binary16 and bfloat16 from float32, rounded to nearest, ties to even (NaN stays a quiet NaN), and
// back (exact).
uint16_t float_to_f16(float x);
uint16_t float_to_bf16(float x);
float f16_to_float(uint16_t h);
float bf16_to_float(uint16_t h);

struct SafetensorsTensor {
  std::string name;
  std::string dtype;  // as the file spells it: F32, BF16, I64, ...
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // data_offsets, relative to the end of the header
  std::size_t elements() const;
};

// One file, mapped read-only. Opening checks the whole layout against the file; every fault is an
// InputError naming the file (and the tensor).
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::vector<SafetensorsTensor>& tensors() const { return tensors_; }  // in name order
  const SafetensorsTensor* find(const std::string& name) const;
  // The tensor as float32 (from F32, F16 or BF16; InputError for another dtype or a missing name).
  std::vector<float> read(const std::string& name) const;
  // Its stored bytes, as they are in the file.
  const unsigned char* bytes(const SafetensorsTensor& t) const;

 private:
  std::string path_;
  const unsigned char* map_ = nullptr;
  std::size_t size_ = 0;
  std::size_t data_start_ = 0;
  std::map<std::string, std::string> metadata_;
  std::vector<SafetensorsTensor> tensors_;
};

// The tensors of a Hugging Face model folder as one set: model.safetensors.index.json's weight_map (name ->
// shard file) over its shards, or the folder's single model.safetensors.
class SafetensorsSet {
 public:
  explicit SafetensorsSet(const std::string& folder);
  const std::string& folder() const { return folder_; }
  std::vector<std::string> names() const;  // sorted
  const SafetensorsTensor* find(const std::string& name) const;
  std::vector<float> read(const std::string& name) const;
  // The file holding the tensor (for messages).
  const std::string& file_of(const std::string& name) const;

 private:
  std::string folder_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const SafetensorsFile*> where_;
};

enum class SafetensorsDtype { f32, f16, bf16 };
const char* safetensors_dtype_name(SafetensorsDtype d);        // "F32", "F16", "BF16"
SafetensorsDtype parse_export_dtype(const std::string& name);  // "f32", "f16", "bf16"; InputError otherwise

struct SafetensorsEntry {
  std::string name;
  SafetensorsDtype dtype = SafetensorsDtype::f32;
  std::vector<int64_t> shape;
  // The tensor's float32 values (row-major, shape's element count), asked for once, while it is written.
  std::function<std::vector<float>()> values;
};

// Writes path atomically (path.tmp, then rename), tensors in the order given, the header padded with spaces
// to a multiple of 8 bytes so that the data is aligned.
void write_safetensors(const std::string& path, const std::vector<SafetensorsEntry>& entries,
                       const std::map<std::string, std::string>& metadata);

}  // namespace lrllm

// The table of a model's tensors: names (the checkpoint's paths under /model), shapes and offsets into one
// flat buffer. Parameters, gradients and both AdamW moments share this layout, which makes the optimizer,
// gradient norm and gradient averaging single passes over contiguous memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace lrllm {

struct TensorInfo {
  std::string name;  // e.g. "h.0/attn/qkv/A"
  std::vector<int64_t> shape;
  std::size_t offset = 0;
  std::size_t size = 0;
  bool decay = false;  // AdamW weight decay applies to 2-D weights only
};

class ParamTable {
 public:
  // Appends a tensor; offsets are padded to 16 floats so every tensor starts 64-byte aligned.
  std::size_t add(const std::string& name, std::vector<int64_t> shape);
  const TensorInfo* find(const std::string& name) const;
  const TensorInfo& at(const std::string& name) const;
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  std::size_t total() const { return total_; }
  std::size_t count() const;  // number of parameters, without padding

 private:
  std::vector<TensorInfo> tensors_;
  std::size_t total_ = 0;
};

std::string shape_string(const std::vector<int64_t>& shape);

}  // namespace lrllm

#include "lrllm/model/params.h"

#include <algorithm>

#include "lrllm/core/common.h"

namespace lrllm {

bool decays(TensorRole role) {
  return role != TensorRole::norm_gain && role != TensorRole::norm_shift && role != TensorRole::bias;
}

bool is_adapter(TensorRole role) {
  return role == TensorRole::lora_a || role == TensorRole::lora_b || role == TensorRole::token_delta;
}

std::size_t ParamTable::add(const std::string& name, std::vector<int64_t> shape, TensorRole role,
                            const TensorSplit& split) {
  TensorInfo t;
  t.name = name;
  t.role = role;
  t.size = 1;
  for (int64_t d : shape) t.size *= static_cast<std::size_t>(d);
  t.full_shape = shape;
  if (split.axis >= 0) t.full_shape.at(split.axis) *= split.parts;
  t.shape = std::move(shape);
  t.split = split;
  t.offset = total_;
  total_ += (t.size + 15) / 16 * 16;
  tensors_.push_back(std::move(t));
  return tensors_.back().offset;
}

std::size_t TensorInfo::full_size() const {
  std::size_t n = 1;
  for (int64_t d : full_shape) n *= static_cast<std::size_t>(d);
  return n;
}

const TensorInfo* ParamTable::find(const std::string& name) const {
  for (const auto& t : tensors_)
    if (t.name == name) return &t;
  return nullptr;
}

const TensorInfo& ParamTable::at(const std::string& name) const {
  const TensorInfo* t = find(name);
  if (t == nullptr) throw RuntimeError("no tensor named " + name + " in the model");
  return *t;
}

std::size_t ParamTable::count() const {
  std::size_t n = 0;
  for (const auto& t : tensors_) n += t.size;
  return n;
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

namespace {

// Runs copy(local_offset, full_offset, n) over the contiguous runs of t's part inside the full tensor.
template <typename Copy>
void for_each_run(const TensorInfo& t, Copy copy) {
  if (t.split.axis < 0) {
    copy(std::size_t{0}, std::size_t{0}, t.size);
    return;
  }
  // View the tensor as [outer, D, inner] around the split axis; the local D is each group's share, in order.
  const int axis = t.split.axis;
  std::size_t outer = 1, inner = 1;
  for (int i = 0; i < axis; ++i) outer *= t.shape[i];
  for (std::size_t i = axis + 1; i < t.shape.size(); ++i) inner *= t.shape[i];
  const std::size_t local_d = t.shape[axis], full_d = t.full_shape[axis];
  const std::vector<int64_t> groups =
      t.split.groups.empty() ? std::vector<int64_t>{static_cast<int64_t>(full_d)} : t.split.groups;
  for (std::size_t o = 0; o < outer; ++o) {
    std::size_t local = 0, global = 0;
    for (int64_t width : groups) {
      const std::size_t share = static_cast<std::size_t>(width) / t.split.parts;
      copy((o * local_d + local) * inner, (o * full_d + global + t.split.part * share) * inner,
           share * inner);
      local += share;
      global += static_cast<std::size_t>(width);
    }
  }
}

}  // namespace

void extract_part(const TensorInfo& t, const float* full, float* part) {
  for_each_run(t, [&](std::size_t local, std::size_t global, std::size_t n) {
    std::copy(full + global, full + global + n, part + local);
  });
}

void insert_part(const TensorInfo& t, const float* part, float* full) {
  for_each_run(t, [&](std::size_t local, std::size_t global, std::size_t n) {
    std::copy(part + local, part + local + n, full + global);
  });
}

}  // namespace lrllm

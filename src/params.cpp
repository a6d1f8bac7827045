#include "lrllm/params.h"

#include "lrllm/common.h"

namespace lrllm {

std::size_t ParamTable::add(const std::string& name, std::vector<int64_t> shape) {
  TensorInfo t;
  t.name = name;
  t.size = 1;
  for (int64_t d : shape) t.size *= static_cast<std::size_t>(d);
  t.decay = shape.size() >= 2;
  t.shape = std::move(shape);
  t.offset = total_;
  total_ += (t.size + 15) / 16 * 16;
  tensors_.push_back(std::move(t));
  return tensors_.back().offset;
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

}  // namespace lrllm

#include "lrllm/hdf5.h"

#include <algorithm>
#include <filesystem>

#include "lrllm/common.h"
#include "lrllm/params.h"

namespace lrllm {
namespace {

// Closes an HDF5 object (group or dataset) when it leaves scope.
struct Handle {
  hid_t id;
  explicit Handle(hid_t h) : id(h) {}
  ~Handle() {
    if (id >= 0) H5Oclose(id);
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
};

struct TypeHandle {
  hid_t id;
  explicit TypeHandle(hid_t h) : id(h) {}
  ~TypeHandle() {
    if (id >= 0) H5Tclose(id);
  }
};

struct SpaceHandle {
  hid_t id;
  explicit SpaceHandle(hid_t h) : id(h) {}
  ~SpaceHandle() {
    if (id >= 0) H5Sclose(id);
  }
};

struct AttrHandle {
  hid_t id;
  explicit AttrHandle(hid_t h) : id(h) {}
  ~AttrHandle() {
    if (id >= 0) H5Aclose(id);
  }
};

}  // namespace

void hdf5_quiet() {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
}

H5File::H5File(hid_t file, std::string path, bool user_input)
    : file_(file), path_(std::move(path)), user_input_(user_input) {}

H5File::H5File(H5File&& other) noexcept
    : file_(other.file_), path_(std::move(other.path_)), user_input_(other.user_input_) {
  other.file_ = -1;
}

H5File& H5File::operator=(H5File&& other) noexcept {
  if (this != &other) {
    close();
    file_ = other.file_;
    path_ = std::move(other.path_);
    user_input_ = other.user_input_;
    other.file_ = -1;
  }
  return *this;
}

H5File::~H5File() {
  close();
}

void H5File::close() {
  if (file_ >= 0) {
    const hid_t f = file_;
    file_ = -1;
    if (H5Fclose(f) < 0 && !user_input_) {
      // A failed close of a file we wrote loses data; report it unless we are already unwinding.
      if (std::uncaught_exceptions() == 0) fail("H5Fclose", "", __FILE__, __LINE__);
    }
  }
}

void H5File::fail(const char* call, const std::string& what, const char* file, int line) const {
  if (user_input_) {
    throw InputError(path_ + ": " + (what.empty() ? std::string(call) + " failed" : what) +
                     " (not a valid lrllm HDF5 file, or corrupt)");
  }
  fail_call(call, path_ + (what.empty() ? "" : ": " + what), file, line);
}

H5File H5File::create(const std::string& path) {
  hdf5_quiet();
  const hid_t f = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  if (f < 0) fail_call("H5Fcreate", path, __FILE__, __LINE__);
  return H5File(f, path, false);
}

H5File H5File::open_read(const std::string& path) {
  hdf5_quiet();
  if (!std::filesystem::exists(path)) throw InputError(path + ": no such file");
  const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  if (f < 0) throw InputError(path + ": not an HDF5 file, or truncated or corrupt");
  return H5File(f, path, true);
}

H5File H5File::open_write(const std::string& path) {
  hdf5_quiet();
  const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  if (f < 0) fail_call("H5Fopen", path, __FILE__, __LINE__);
  return H5File(f, path, false);
}

bool H5File::exists(const std::string& object) const {
  if (object == "/") return true;
  // H5Lexists needs every parent to exist: walk the path one component at a time.
  std::size_t pos = 0;
  while (true) {
    pos = object.find('/', pos + 1);
    const std::string prefix = object.substr(0, pos);
    if (!prefix.empty() && prefix != "/") {
      const htri_t e = H5Lexists(file_, prefix.c_str(), H5P_DEFAULT);
      if (e <= 0) return false;
    }
    if (pos == std::string::npos) return true;
  }
}

std::vector<std::string> H5File::children(const std::string& group) const {
  std::vector<std::string> names;
  if (!exists(group)) return names;
  Handle g(LRLLM_H5(*this, H5Gopen2(file_, group.c_str(), H5P_DEFAULT), "cannot open group " + group));
  H5G_info_t info;
  LRLLM_H5(*this, H5Gget_info(g.id, &info), "cannot list group " + group);
  for (hsize_t i = 0; i < info.nlinks; ++i) {
    const ssize_t n =
        LRLLM_H5(*this, H5Lget_name_by_idx(g.id, ".", H5_INDEX_NAME, H5_ITER_INC, i, nullptr, 0, H5P_DEFAULT),
                 "cannot list group " + group);
    std::string name(static_cast<std::size_t>(n), '\0');
    LRLLM_H5(*this,
             H5Lget_name_by_idx(g.id, ".", H5_INDEX_NAME, H5_ITER_INC, i, name.data(), n + 1, H5P_DEFAULT),
             "cannot list group " + group);
    names.push_back(name);
  }
  std::sort(names.begin(), names.end());
  return names;
}

std::vector<std::string> H5File::datasets(const std::string& group) const {
  std::vector<std::string> found;
  for (const std::string& child : children(group)) {
    const std::string full = (group == "/" ? "" : group) + "/" + child;
    H5O_info_t info;
    LRLLM_H5(*this, H5Oget_info_by_name2(file_, full.c_str(), &info, H5O_INFO_BASIC, H5P_DEFAULT),
             "cannot inspect " + full);
    if (info.type == H5O_TYPE_GROUP) {
      for (std::string& d : datasets(full)) found.push_back(std::move(d));
    } else if (info.type == H5O_TYPE_DATASET) {
      found.push_back(full);
    }
  }
  std::sort(found.begin(), found.end());
  return found;
}

std::vector<int64_t> H5File::shape(const std::string& dataset) const {
  if (!exists(dataset)) fail("H5Dopen2", "dataset " + dataset + " is missing", __FILE__, __LINE__);
  Handle d(LRLLM_H5(*this, H5Dopen2(file_, dataset.c_str(), H5P_DEFAULT), "cannot open dataset " + dataset));
  SpaceHandle s(LRLLM_H5(*this, H5Dget_space(d.id), "cannot read the shape of " + dataset));
  const int rank = LRLLM_H5(*this, H5Sget_simple_extent_ndims(s.id), "cannot read the shape of " + dataset);
  std::vector<hsize_t> dims(static_cast<std::size_t>(rank));
  LRLLM_H5(*this, H5Sget_simple_extent_dims(s.id, dims.data(), nullptr),
           "cannot read the shape of " + dataset);
  return std::vector<int64_t>(dims.begin(), dims.end());
}

std::string H5File::dtype_name(const std::string& dataset) const {
  Handle d(LRLLM_H5(*this, H5Dopen2(file_, dataset.c_str(), H5P_DEFAULT), "cannot open dataset " + dataset));
  TypeHandle t(LRLLM_H5(*this, H5Dget_type(d.id), "cannot read the type of " + dataset));
  const H5T_class_t cls = H5Tget_class(t.id);
  const std::size_t size = H5Tget_size(t.id);
  if (cls == H5T_FLOAT) return size == 4 ? "float32" : size == 8 ? "float64" : "float";
  if (cls == H5T_INTEGER) {
    const bool is_signed = H5Tget_sign(t.id) == H5T_SGN_2;
    return std::string(is_signed ? "int" : "uint") + std::to_string(size * 8);
  }
  return "other";
}

void H5File::ensure_group(const std::string& group) {
  if (group.empty() || group == "/" || exists(group)) return;
  const std::size_t slash = group.rfind('/');
  if (slash != std::string::npos && slash > 0) ensure_group(group.substr(0, slash));
  Handle g(LRLLM_H5(*this, H5Gcreate2(file_, group.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                    "cannot create group " + group));
}

void H5File::write(const std::string& dataset, const float* data, const std::vector<int64_t>& shape) {
  const std::size_t slash = dataset.rfind('/');
  if (slash != std::string::npos && slash > 0) ensure_group(dataset.substr(0, slash));
  std::vector<hsize_t> dims(shape.begin(), shape.end());
  SpaceHandle s(LRLLM_H5(*this, H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr),
                         "cannot describe " + dataset));
  Handle d(LRLLM_H5(
      *this, H5Dcreate2(file_, dataset.c_str(), H5T_IEEE_F32LE, s.id, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
      "cannot create " + dataset));
  LRLLM_H5(*this, H5Dwrite(d.id, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, data),
           "cannot write " + dataset);
}

void H5File::read(const std::string& dataset, float* out, const std::vector<int64_t>& expected) const {
  const std::vector<int64_t> got = shape(dataset);
  if (got != expected)
    fail("H5Dread",
         "dataset " + dataset + " has shape " + shape_string(got) + ", the model expects " +
             shape_string(expected),
         __FILE__, __LINE__);
  Handle d(LRLLM_H5(*this, H5Dopen2(file_, dataset.c_str(), H5P_DEFAULT), "cannot open dataset " + dataset));
  LRLLM_H5(*this, H5Dread(d.id, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, out),
           "cannot read " + dataset);
}

std::vector<float> H5File::read_all(const std::string& dataset) const {
  const std::vector<int64_t> dims = shape(dataset);
  std::size_t n = 1;
  for (int64_t d : dims) n *= static_cast<std::size_t>(d);
  std::vector<float> out(n);
  read(dataset, out.data(), dims);
  return out;
}

void H5File::write_bytes(const std::string& dataset, const uint8_t* data, const std::vector<int64_t>& shape,
                         bool is_signed) {
  const std::size_t slash = dataset.rfind('/');
  if (slash != std::string::npos && slash > 0) ensure_group(dataset.substr(0, slash));
  std::vector<hsize_t> dims(shape.begin(), shape.end());
  SpaceHandle s(LRLLM_H5(*this, H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr),
                         "cannot describe " + dataset));
  Handle d(LRLLM_H5(*this,
                    H5Dcreate2(file_, dataset.c_str(), is_signed ? H5T_STD_I8LE : H5T_STD_U8LE, s.id,
                               H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                    "cannot create " + dataset));
  // The memory type matches the file type, so HDF5 copies the bytes without converting them.
  LRLLM_H5(
      *this,
      H5Dwrite(d.id, is_signed ? H5T_NATIVE_INT8 : H5T_NATIVE_UINT8, H5S_ALL, H5S_ALL, H5P_DEFAULT, data),
      "cannot write " + dataset);
}

void H5File::read_bytes(const std::string& dataset, uint8_t* out, const std::vector<int64_t>& expected,
                        bool is_signed) const {
  const std::vector<int64_t> got = shape(dataset);
  if (got != expected)
    fail("H5Dread",
         "dataset " + dataset + " has shape " + shape_string(got) + ", expected " + shape_string(expected),
         __FILE__, __LINE__);
  // HDF5 would convert another type (clamping int8 to uint8, rounding floats), which would silently corrupt
  // codes: only the exact type is accepted.
  const std::string want = is_signed ? "int8" : "uint8";
  const std::string type = dtype_name(dataset);
  if (type != want)
    fail("H5Dread", "dataset " + dataset + " has type " + type + ", expected " + want, __FILE__, __LINE__);
  Handle d(LRLLM_H5(*this, H5Dopen2(file_, dataset.c_str(), H5P_DEFAULT), "cannot open dataset " + dataset));
  LRLLM_H5(*this,
           H5Dread(d.id, is_signed ? H5T_NATIVE_INT8 : H5T_NATIVE_UINT8, H5S_ALL, H5S_ALL, H5P_DEFAULT, out),
           "cannot read " + dataset);
}

namespace {

hid_t open_object(const H5File& f, const std::string& object) {
  return H5Oopen(f.id(), object.c_str(), H5P_DEFAULT);
}

}  // namespace

void H5File::set_attr(const std::string& object, const std::string& name, int64_t value) {
  Handle o(LRLLM_H5(*this, open_object(*this, object), "cannot open " + object));
  if (H5Aexists(o.id, name.c_str()) > 0) LRLLM_H5(*this, H5Adelete(o.id, name.c_str()), "attribute " + name);
  SpaceHandle s(LRLLM_H5(*this, H5Screate(H5S_SCALAR), "attribute " + name));
  AttrHandle a(LRLLM_H5(*this, H5Acreate2(o.id, name.c_str(), H5T_STD_I64LE, s.id, H5P_DEFAULT, H5P_DEFAULT),
                        "cannot create attribute " + name));
  LRLLM_H5(*this, H5Awrite(a.id, H5T_NATIVE_INT64, &value), "cannot write attribute " + name);
}

void H5File::set_attr(const std::string& object, const std::string& name, double value) {
  Handle o(LRLLM_H5(*this, open_object(*this, object), "cannot open " + object));
  if (H5Aexists(o.id, name.c_str()) > 0) LRLLM_H5(*this, H5Adelete(o.id, name.c_str()), "attribute " + name);
  SpaceHandle s(LRLLM_H5(*this, H5Screate(H5S_SCALAR), "attribute " + name));
  AttrHandle a(LRLLM_H5(*this, H5Acreate2(o.id, name.c_str(), H5T_IEEE_F64LE, s.id, H5P_DEFAULT, H5P_DEFAULT),
                        "cannot create attribute " + name));
  LRLLM_H5(*this, H5Awrite(a.id, H5T_NATIVE_DOUBLE, &value), "cannot write attribute " + name);
}

void H5File::set_attr(const std::string& object, const std::string& name, const std::string& value) {
  Handle o(LRLLM_H5(*this, open_object(*this, object), "cannot open " + object));
  if (H5Aexists(o.id, name.c_str()) > 0) LRLLM_H5(*this, H5Adelete(o.id, name.c_str()), "attribute " + name);
  // Variable-length UTF-8, which h5py reads back as str.
  TypeHandle t(LRLLM_H5(*this, H5Tcopy(H5T_C_S1), "attribute " + name));
  LRLLM_H5(*this, H5Tset_size(t.id, H5T_VARIABLE), "attribute " + name);
  LRLLM_H5(*this, H5Tset_cset(t.id, H5T_CSET_UTF8), "attribute " + name);
  SpaceHandle s(LRLLM_H5(*this, H5Screate(H5S_SCALAR), "attribute " + name));
  AttrHandle a(LRLLM_H5(*this, H5Acreate2(o.id, name.c_str(), t.id, s.id, H5P_DEFAULT, H5P_DEFAULT),
                        "cannot create attribute " + name));
  const char* text = value.c_str();
  LRLLM_H5(*this, H5Awrite(a.id, t.id, &text), "cannot write attribute " + name);
}

bool H5File::has_attr(const std::string& object, const std::string& name) const {
  if (!exists(object)) return false;
  Handle o(LRLLM_H5(*this, open_object(*this, object), "cannot open " + object));
  return H5Aexists(o.id, name.c_str()) > 0;
}

int64_t H5File::attr_int(const std::string& object, const std::string& name) const {
  if (!has_attr(object, name))
    fail("H5Aopen", "attribute " + object + " " + name + " is missing", __FILE__, __LINE__);
  Handle o(LRLLM_H5(*this, open_object(*this, object), "cannot open " + object));
  AttrHandle a(LRLLM_H5(*this, H5Aopen(o.id, name.c_str(), H5P_DEFAULT), "attribute " + name));
  int64_t value = 0;
  LRLLM_H5(*this, H5Aread(a.id, H5T_NATIVE_INT64, &value), "cannot read attribute " + object + " " + name);
  return value;
}

double H5File::attr_double(const std::string& object, const std::string& name) const {
  if (!has_attr(object, name))
    fail("H5Aopen", "attribute " + object + " " + name + " is missing", __FILE__, __LINE__);
  Handle o(LRLLM_H5(*this, open_object(*this, object), "cannot open " + object));
  AttrHandle a(LRLLM_H5(*this, H5Aopen(o.id, name.c_str(), H5P_DEFAULT), "attribute " + name));
  double value = 0;
  LRLLM_H5(*this, H5Aread(a.id, H5T_NATIVE_DOUBLE, &value), "cannot read attribute " + object + " " + name);
  return value;
}

std::string H5File::attr_string(const std::string& object, const std::string& name) const {
  if (!has_attr(object, name))
    fail("H5Aopen", "attribute " + object + " " + name + " is missing", __FILE__, __LINE__);
  Handle o(LRLLM_H5(*this, open_object(*this, object), "cannot open " + object));
  AttrHandle a(LRLLM_H5(*this, H5Aopen(o.id, name.c_str(), H5P_DEFAULT), "attribute " + name));
  TypeHandle t(LRLLM_H5(*this, H5Aget_type(a.id), "attribute " + name));
  if (H5Tget_class(t.id) != H5T_STRING)
    fail("H5Aread", "attribute " + name + " is not a string", __FILE__, __LINE__);
  if (H5Tis_variable_str(t.id) > 0) {
    TypeHandle mem(LRLLM_H5(*this, H5Tcopy(H5T_C_S1), "attribute " + name));
    LRLLM_H5(*this, H5Tset_size(mem.id, H5T_VARIABLE), "attribute " + name);
    LRLLM_H5(*this, H5Tset_cset(mem.id, H5Tget_cset(t.id)), "attribute " + name);
    char* text = nullptr;
    LRLLM_H5(*this, H5Aread(a.id, mem.id, &text), "cannot read attribute " + name);
    std::string value = text != nullptr ? text : "";
    H5free_memory(text);
    return value;
  }
  const std::size_t size = H5Tget_size(t.id);
  std::string value(size, '\0');
  LRLLM_H5(*this, H5Aread(a.id, t.id, value.data()), "cannot read attribute " + name);
  value.resize(value.find_last_not_of('\0') + 1);
  return value;
}

void H5File::set_attr(const std::string& object, const std::string& name,
                      const std::vector<int64_t>& values) {
  Handle o(LRLLM_H5(*this, open_object(*this, object), "cannot open " + object));
  if (H5Aexists(o.id, name.c_str()) > 0) LRLLM_H5(*this, H5Adelete(o.id, name.c_str()), "attribute " + name);
  const hsize_t n = values.size();
  SpaceHandle s(LRLLM_H5(*this, H5Screate_simple(1, &n, nullptr), "attribute " + name));
  AttrHandle a(LRLLM_H5(*this, H5Acreate2(o.id, name.c_str(), H5T_STD_I64LE, s.id, H5P_DEFAULT, H5P_DEFAULT),
                        "cannot create attribute " + name));
  LRLLM_H5(*this, H5Awrite(a.id, H5T_NATIVE_INT64, values.data()), "cannot write attribute " + name);
}

std::vector<int64_t> H5File::attr_ints(const std::string& object, const std::string& name) const {
  if (!has_attr(object, name))
    fail("H5Aopen", "attribute " + object + " " + name + " is missing", __FILE__, __LINE__);
  Handle o(LRLLM_H5(*this, open_object(*this, object), "cannot open " + object));
  AttrHandle a(LRLLM_H5(*this, H5Aopen(o.id, name.c_str(), H5P_DEFAULT), "attribute " + name));
  TypeHandle t(LRLLM_H5(*this, H5Aget_type(a.id), "attribute " + name));
  if (H5Tget_class(t.id) != H5T_INTEGER)
    fail("H5Aread", "attribute " + object + " " + name + " is not an integer array", __FILE__, __LINE__);
  SpaceHandle s(LRLLM_H5(*this, H5Aget_space(a.id), "attribute " + name));
  const int rank = LRLLM_H5(*this, H5Sget_simple_extent_ndims(s.id), "attribute " + name);
  if (rank > 1) fail("H5Aread", "attribute " + object + " " + name + " is not 1-D", __FILE__, __LINE__);
  const hssize_t n = LRLLM_H5(*this, H5Sget_simple_extent_npoints(s.id), "attribute " + name);
  std::vector<int64_t> values(static_cast<std::size_t>(n));
  LRLLM_H5(*this, H5Aread(a.id, H5T_NATIVE_INT64, values.data()),
           "cannot read attribute " + object + " " + name);
  return values;
}

void H5File::flush() {
  LRLLM_H5(*this, H5Fflush(file_, H5F_SCOPE_GLOBAL), "cannot flush");
}

}  // namespace lrllm

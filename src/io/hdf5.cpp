#include "lrllm/io/hdf5.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <utility>

#include "lrllm/core/common.h"
#include "lrllm/core/config.h"
#include "lrllm/model/params.h"

namespace lrllm {
namespace {

// The longest an old-format file's metadata may take to walk: milliseconds for any real file.
constexpr int kProbeLimitMs = 10000;

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
  // The 1.10 format (superblock 3, version 2 object headers) checksums every piece of metadata; both bounds
  // at 1.10 keep the files readable by HDF5 1.10, which reads the older files of earlier lrllm as well.
  const hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
  LRLLM_CHECK(fapl >= 0, "H5Pcreate", path);
  const herr_t bounds = H5Pset_libver_bounds(fapl, H5F_LIBVER_V110, H5F_LIBVER_V110);
  const hid_t f = bounds < 0 ? -1 : H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
  H5Pclose(fapl);
  LRLLM_CHECK(bounds >= 0, "H5Pset_libver_bounds", path);
  if (f < 0) fail_call("H5Fcreate", path, __FILE__, __LINE__);
  return H5File(f, path, false);
}

void H5File::check_output(const std::string& path, const std::string& option) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_directory(path, ec))
    throw InputError("--" + option + " " + path + " is a folder; give the path of a file to write");
  const fs::path parent = fs::path(path).parent_path().empty() ? fs::path(".") : fs::path(path).parent_path();
  if (!fs::is_directory(parent, ec))
    throw InputError("--" + option + " " + path + ": the folder " + parent.string() + " does not exist");
  if (access(parent.c_str(), W_OK | X_OK) != 0)
    throw InputError("--" + option + " " + path + ": the folder " + parent.string() + " is not writable");
  if (fs::exists(path, ec) && access(path.c_str(), W_OK) != 0)
    throw InputError("--" + option + " " + path + ": the file exists and is not writable");
}

namespace {

// The superblock version of an HDF5 file, whose signature sits at 0, 512, 1024, ... (after a user block);
// -1 where none is found.
int superblock_version(const std::string& path) {
  static constexpr char kSignature[8] = {'\x89', 'H', 'D', 'F', '\r', '\n', '\x1a', '\n'};
  std::ifstream in(path, std::ios::binary);
  for (std::streamoff at = 0; at <= (std::streamoff{1} << 30); at = at == 0 ? 512 : 2 * at) {
    char head[9];
    if (!in.seekg(at) || !in.read(head, sizeof head)) return -1;
    if (std::equal(kSignature, kSignature + 8, head)) return static_cast<unsigned char>(head[8]);
  }
  return -1;
}

herr_t probe_attribute(hid_t object, const char* name, const H5A_info_t*, void*) {
  const hid_t a = H5Aopen(object, name, H5P_DEFAULT);
  const hid_t t = a < 0 ? -1 : H5Aget_type(a);
  const hid_t s = a < 0 ? -1 : H5Aget_space(a);
  const hssize_t n = s < 0 ? -1 : H5Sget_simple_extent_npoints(s);
  const std::size_t bytes = t < 0 ? 0 : H5Tget_size(t) * static_cast<std::size_t>(std::max<hssize_t>(n, 0));
  if (n < 0 || bytes > (std::size_t{1} << 26)) return -1;
  std::vector<char> value(std::max<std::size_t>(bytes, 1));
  return H5Aread(a, t, value.data());  // the probe's process ends soon after: what it allocates is not freed
}

herr_t probe_object(hid_t file, const char* name, const H5O_info_t* info, void*) {
  const hid_t o = H5Oopen(file, name, H5P_DEFAULT);
  if (o < 0 || H5Aiterate2(o, H5_INDEX_NAME, H5_ITER_NATIVE, nullptr, probe_attribute, nullptr) < 0)
    return -1;
  if (info->type == H5O_TYPE_DATASET &&
      (H5Dget_type(o) < 0 || H5Dget_space(o) < 0 || H5Dget_create_plist(o) < 0))
    return -1;
  return H5Oclose(o);
}

// Files in the format before HDF5 1.10 have no metadata checksums, and HDF5 may crash or spin on a damaged
// one. Their metadata is walked first in a child process, with a time limit: a damaged file then ends the
// child, not lrllm. Files found sound are remembered.
bool old_format_file_is_sound(const std::string& path) {
  static std::set<std::string> sound;
  if (sound.count(path) > 0) return true;
  std::fflush(nullptr);
  const pid_t child = fork();
  if (child < 0) return true;  // no probe possible: read the file as it is
  if (child == 0) {
    // Quietly: a crash here is the expected outcome for a damaged file, not one to report (Open MPI's
    // handler would print a backtrace).
    for (int sig : {SIGSEGV, SIGBUS, SIGABRT, SIGFPE, SIGILL}) signal(sig, SIG_DFL);
    const int null = open("/dev/null", O_WRONLY);
    if (null >= 0) dup2(null, STDERR_FILENO);
    const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
    const bool ok = f >= 0 &&
                    H5Ovisit2(f, H5_INDEX_NAME, H5_ITER_NATIVE, probe_object, nullptr, H5O_INFO_BASIC) >= 0 &&
                    H5Fclose(f) >= 0;
    _exit(ok ? 0 : 1);
  }
  int status = 0;
  for (int waited_ms = 0; waitpid(child, &status, WNOHANG) == 0; waited_ms += 10) {
    if (waited_ms >= kProbeLimitMs) {
      kill(child, SIGKILL);
      waitpid(child, &status, 0);
      return false;
    }
    usleep(10000);
  }
  const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
  if (ok) sound.insert(path);
  return ok;
}

void refuse_damaged_old_format(const std::string& path) {
  if (!std::filesystem::exists(path)) throw InputError(path + ": no such file");
  const int version = superblock_version(path);
  if (version >= 0 && version < 2 && !old_format_file_is_sound(path))
    throw InputError(path +
                     ": HDF5 cannot read its metadata: the file is damaged (it is in the format "
                     "before HDF5 1.10, which has no checksums to tell where)");
}

}  // namespace

H5File H5File::open_read(const std::string& path) {
  hdf5_quiet();
  refuse_damaged_old_format(path);
  const hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  if (f < 0) throw InputError(path + ": not an HDF5 file, or truncated or corrupt");
  return H5File(f, path, true);
}

H5File H5File::open_in_memory(const std::string& path) {
  hdf5_quiet();
  refuse_damaged_old_format(path);
  const hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
  LRLLM_CHECK(fapl >= 0, "H5Pcreate", path);
  // The core driver without a backing store: the whole file in memory, and nothing written back; so no
  // write lock either, which would fail while other ranks read the same file.
  const herr_t core = H5Pset_fapl_core(fapl, std::size_t{1} << 20, false);
  const herr_t unlocked = core < 0 ? -1 : H5Pset_file_locking(fapl, false, true);
  const hid_t f = unlocked < 0 ? -1 : H5Fopen(path.c_str(), H5F_ACC_RDWR, fapl);
  H5Pclose(fapl);
  LRLLM_CHECK(core >= 0, "H5Pset_fapl_core", path);
  LRLLM_CHECK(unlocked >= 0, "H5Pset_file_locking", path);
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

namespace {

// lrllm's files nest a few groups deep; a hand-made link from a group to one of its parents nests forever.
constexpr int kMaxGroupDepth = 32;

void collect_datasets(const H5File& f, const std::string& group, int depth, std::vector<std::string>& found) {
  if (depth > kMaxGroupDepth)
    f.fail("H5Oget_info_by_name2",
           "groups nest deeper than " + std::to_string(kMaxGroupDepth) + " at " + group + " (a link cycle?)",
           __FILE__, __LINE__);
  for (const std::string& child : f.children(group)) {
    const std::string full = (group == "/" ? "" : group) + "/" + child;
    H5O_info_t info;
    LRLLM_H5(f, H5Oget_info_by_name2(f.id(), full.c_str(), &info, H5O_INFO_BASIC, H5P_DEFAULT),
             "cannot inspect " + full);
    if (info.type == H5O_TYPE_GROUP)
      collect_datasets(f, full, depth + 1, found);
    else if (info.type == H5O_TYPE_DATASET)
      found.push_back(full);
  }
}

// What a read takes from a stored value: its class must be this one.
enum class Want { integer, number, string };

bool fits(hid_t type, Want want) {
  const H5T_class_t c = H5Tget_class(type);
  switch (want) {
    case Want::integer:
      return c == H5T_INTEGER;
    case Want::number:
      return c == H5T_INTEGER || c == H5T_FLOAT;
    case Want::string:
      return c == H5T_STRING;
  }
  return false;
}

const char* want_name(Want want) {
  return want == Want::integer ? "an integer" : want == Want::number ? "a number" : "a string";
}

std::string class_name(hid_t type) {
  switch (H5Tget_class(type)) {
    case H5T_INTEGER:
      return "integer";
    case H5T_FLOAT:
      return "float";
    case H5T_STRING:
      return "string";
    case H5T_ARRAY:
      return "array-typed";
    case H5T_COMPOUND:
      return "compound";
    case H5T_ENUM:
      return "enum";
    default:
      return "non-numeric";
  }
}

// The dimensions of a dataspace (none for a scalar) and its number of values.
std::vector<int64_t> extent(const H5File& f, hid_t space, const std::string& what, hssize_t* points) {
  const int rank = LRLLM_H5(f, H5Sget_simple_extent_ndims(space), "cannot read the shape of " + what);
  std::vector<hsize_t> dims(static_cast<std::size_t>(rank));
  LRLLM_H5(f, H5Sget_simple_extent_dims(space, dims.data(), nullptr), "cannot read the shape of " + what);
  *points = LRLLM_H5(f, H5Sget_simple_extent_npoints(space), "cannot read the shape of " + what);
  return std::vector<int64_t>(dims.begin(), dims.end());
}

// The check every read of an attribute or dataset goes through, before a byte is read: the stored class is
// the wanted one, and the shape has the wanted rank (0: exactly one value, a scalar; -1: any). call names
// the read it guards.
void check_stored(const H5File& f, const char* call, hid_t type, hid_t space, Want want, int rank,
                  const std::string& what) {
  if (!fits(type, want))
    f.fail(call, what + " is " + class_name(type) + ", expected " + want_name(want), __FILE__, __LINE__);
  hssize_t points = 0;
  const std::vector<int64_t> dims = extent(f, space, what, &points);
  const bool scalar = H5Sget_simple_extent_type(space) == H5S_SCALAR;
  if (rank == 0 && !scalar)
    f.fail(call,
           what + " holds " + std::to_string(points) + " values of shape " + shape_string(dims) +
               ", expected one value (a scalar)",
           __FILE__, __LINE__);
  if (rank > 0 && static_cast<int>(dims.size()) != rank)
    f.fail(call, what + " has shape " + shape_string(dims) + ", expected " + std::to_string(rank) + "-D",
           __FILE__, __LINE__);
}

// Values of a dataset shape, checked against overflow and against what memory can hold before a buffer of
// them is allocated.
std::size_t checked_count(const H5File& f, const std::vector<int64_t>& dims, std::size_t value_bytes,
                          const std::string& what) {
  const std::size_t limit = physical_memory_bytes() / value_bytes;
  std::size_t n = 1;
  for (int64_t d : dims) {
    if (d < 0 || (d > 0 && n > limit / static_cast<std::size_t>(d)))
      f.fail("H5Dread", what + " of shape " + shape_string(dims) + " does not fit in memory", __FILE__,
             __LINE__);
    n *= static_cast<std::size_t>(d);
  }
  return n;
}

}  // namespace

std::vector<std::string> H5File::datasets(const std::string& group) const {
  std::vector<std::string> found;
  collect_datasets(*this, group, 0, found);
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
  TypeHandle t(LRLLM_H5(*this, H5Dget_type(d.id), "cannot read the type of " + dataset));
  SpaceHandle s(LRLLM_H5(*this, H5Dget_space(d.id), "cannot read the shape of " + dataset));
  check_stored(*this, "H5Dread", t.id, s.id, Want::number, -1, "dataset " + dataset);
  LRLLM_H5(*this, H5Dread(d.id, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, out),
           "cannot read " + dataset);
}

std::vector<float> H5File::read_all(const std::string& dataset) const {
  const std::vector<int64_t> dims = shape(dataset);
  std::vector<float> out(checked_count(*this, dims, sizeof(float), "dataset " + dataset));
  read(dataset, out.data(), dims);
  return out;
}

std::vector<double> H5File::read_series(const std::string& dataset) const {
  if (!exists(dataset)) fail("H5Dopen2", "dataset " + dataset + " is missing", __FILE__, __LINE__);
  Handle d(LRLLM_H5(*this, H5Dopen2(file_, dataset.c_str(), H5P_DEFAULT), "cannot open dataset " + dataset));
  TypeHandle t(LRLLM_H5(*this, H5Dget_type(d.id), "cannot read the type of " + dataset));
  SpaceHandle s(LRLLM_H5(*this, H5Dget_space(d.id), "cannot read the shape of " + dataset));
  check_stored(*this, "H5Dread", t.id, s.id, Want::number, 1, "dataset " + dataset);
  std::vector<double> out(checked_count(*this, shape(dataset), sizeof(double), "dataset " + dataset));
  if (!out.empty())
    LRLLM_H5(*this, H5Dread(d.id, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data()),
             "cannot read " + dataset);
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

namespace {

// Opens attribute name of object after check_stored: the one way every attribute read starts. rank 0: a
// scalar; 1: a scalar or a 1-D array.
hid_t checked_attr(const H5File& f, const std::string& object, const std::string& name, Want want, int rank) {
  const std::string what = "attribute " + name + " of " + object;
  if (!f.has_attr(object, name)) f.fail("H5Aopen", what + " is missing", __FILE__, __LINE__);
  Handle o(LRLLM_H5(f, open_object(f, object), "cannot open " + object));
  AttrHandle a(LRLLM_H5(f, H5Aopen(o.id, name.c_str(), H5P_DEFAULT), "cannot open " + what));
  TypeHandle t(LRLLM_H5(f, H5Aget_type(a.id), "cannot read the type of " + what));
  SpaceHandle s(LRLLM_H5(f, H5Aget_space(a.id), "cannot read the shape of " + what));
  const bool scalar = H5Sget_simple_extent_type(s.id) == H5S_SCALAR;
  check_stored(f, "H5Aread", t.id, s.id, want, rank == 1 && scalar ? 0 : rank, what);
  return std::exchange(a.id, -1);
}

// Fixed-length strings in lrllm's files are short; a longer one is a damaged size field.
constexpr std::size_t kMaxStringBytes = std::size_t{1} << 20;

}  // namespace

int64_t H5File::attr_int(const std::string& object, const std::string& name) const {
  AttrHandle a(checked_attr(*this, object, name, Want::integer, 0));
  int64_t value = 0;
  LRLLM_H5(*this, H5Aread(a.id, H5T_NATIVE_INT64, &value), "cannot read attribute " + name + " of " + object);
  return value;
}

double H5File::attr_double(const std::string& object, const std::string& name) const {
  AttrHandle a(checked_attr(*this, object, name, Want::number, 0));
  double value = 0;
  LRLLM_H5(*this, H5Aread(a.id, H5T_NATIVE_DOUBLE, &value),
           "cannot read attribute " + name + " of " + object);
  return value;
}

std::string H5File::attr_string(const std::string& object, const std::string& name) const {
  const std::string what = "attribute " + name + " of " + object;
  AttrHandle a(checked_attr(*this, object, name, Want::string, 0));
  TypeHandle t(LRLLM_H5(*this, H5Aget_type(a.id), "cannot read the type of " + what));
  if (H5Tis_variable_str(t.id) > 0) {
    TypeHandle mem(LRLLM_H5(*this, H5Tcopy(H5T_C_S1), what));
    LRLLM_H5(*this, H5Tset_size(mem.id, H5T_VARIABLE), what);
    LRLLM_H5(*this, H5Tset_cset(mem.id, H5Tget_cset(t.id)), what);
    char* text = nullptr;
    LRLLM_H5(*this, H5Aread(a.id, mem.id, &text), "cannot read " + what);
    std::string value = text != nullptr ? text : "";
    H5free_memory(text);
    return value;
  }
  const std::size_t size = H5Tget_size(t.id);
  if (size == 0 || size > kMaxStringBytes)
    fail("H5Aread", what + " claims a string of " + std::to_string(size) + " bytes", __FILE__, __LINE__);
  std::string value(size, '\0');
  LRLLM_H5(*this, H5Aread(a.id, t.id, value.data()), "cannot read " + what);
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
  const std::string what = "attribute " + name + " of " + object;
  AttrHandle a(checked_attr(*this, object, name, Want::integer, 1));
  SpaceHandle s(LRLLM_H5(*this, H5Aget_space(a.id), "cannot read the shape of " + what));
  const hssize_t n = LRLLM_H5(*this, H5Sget_simple_extent_npoints(s.id), "cannot read the shape of " + what);
  std::vector<int64_t> values(static_cast<std::size_t>(n));
  LRLLM_H5(*this, H5Aread(a.id, H5T_NATIVE_INT64, values.data()), "cannot read " + what);
  return values;
}

void H5File::flush() {
  LRLLM_H5(*this, H5Fflush(file_, H5F_SCOPE_GLOBAL), "cannot flush");
}

}  // namespace lrllm

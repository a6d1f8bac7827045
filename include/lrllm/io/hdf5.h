// A thin, checked layer over HDF5's C API: every run file (checkpoints, metrics, exports) goes through it.
// Failures name the HDF5 call, the file and the source line. Files opened for reading are user input, so a
// missing dataset, a wrong shape or a corrupt file is an InputError (exit 2), not a crash.
#pragma once

#include <hdf5.h>

#include <cstdint>
#include <string>
#include <vector>

namespace lrllm {

class H5File {
 public:
  // Truncates. New files use the 1.10 format, whose metadata is checksummed: a damaged file then fails at
  // open or read instead of sending the library through garbage offsets.
  static H5File create(const std::string& path);
  static H5File open_read(const std::string& path);   // read-only, user input
  static H5File open_write(const std::string& path);  // read-write, an existing file of ours
  // Read-write in memory, user input: changes are never written back, so a run's first changes to a file
  // can be tried before the run starts.
  static H5File open_in_memory(const std::string& path);
  H5File(H5File&& other) noexcept;
  H5File& operator=(H5File&& other) noexcept;
  ~H5File();
  void close();
  const std::string& path() const { return path_; }
  hid_t id() const { return file_; }

  bool exists(const std::string& object) const;
  // Children names of a group, sorted.
  std::vector<std::string> children(const std::string& group) const;
  // Every dataset below group, recursively, as full paths, sorted.
  std::vector<std::string> datasets(const std::string& group) const;
  std::vector<int64_t> shape(const std::string& dataset) const;
  std::string dtype_name(const std::string& dataset) const;

  void write(const std::string& dataset, const float* data, const std::vector<int64_t>& shape);
  // Reads a float32 dataset whose shape must equal expected.
  void read(const std::string& dataset, float* out, const std::vector<int64_t>& expected) const;
  std::vector<float> read_all(const std::string& dataset) const;
  // A 1-D numeric dataset (a metrics series), as float64.
  std::vector<double> read_series(const std::string& dataset) const;
  // 8-bit integer datasets (quantized codes): stored as int8 when is_signed, else uint8; the bytes are copied
  // as they are either way.
  void write_bytes(const std::string& dataset, const uint8_t* data, const std::vector<int64_t>& shape,
                   bool is_signed);
  // Reads an 8-bit integer dataset of that signedness whose shape must equal expected.
  void read_bytes(const std::string& dataset, uint8_t* out, const std::vector<int64_t>& expected,
                  bool is_signed) const;

  void set_attr(const std::string& object, const std::string& name, int64_t value);
  void set_attr(const std::string& object, const std::string& name, double value);
  void set_attr(const std::string& object, const std::string& name, const std::string& value);
  bool has_attr(const std::string& object, const std::string& name) const;
  int64_t attr_int(const std::string& object, const std::string& name) const;
  double attr_double(const std::string& object, const std::string& name) const;
  std::string attr_string(const std::string& object, const std::string& name) const;
  // Every attribute read checks the attribute's class (integer; float or integer for attr_double; string)
  // and that it holds one value (a scalar) before reading, so that a hand-altered file is an InputError
  // naming the object, never a read past the end of a scalar.
  // A 1-D int64 array attribute (e.g. a shape), which h5py reads back as a numpy array.
  void set_attr(const std::string& object, const std::string& name, const std::vector<int64_t>& values);
  std::vector<int64_t> attr_ints(const std::string& object, const std::string& name) const;

  void ensure_group(const std::string& group);
  void flush();

  // Checks, before any work, that path can be created as an output file: not a folder, in a folder that
  // exists and is writable. Throws InputError naming option.
  static void check_output(const std::string& path, const std::string& option);

  // Reports a failed HDF5 call: InputError for a file read as user input, RuntimeError otherwise.
  [[noreturn]] void fail(const char* call, const std::string& what, const char* file, int line) const;

 private:
  H5File(hid_t file, std::string path, bool user_input);
  hid_t file_ = -1;
  std::string path_;
  bool user_input_ = false;
};

// Quiets HDF5's own error stack printing: failures are reported once, by us.
void hdf5_quiet();

}  // namespace lrllm

#define LRLLM_H5(file, call, what)                                           \
  ([&]() {                                                                   \
    auto lrllm_h5_result = (call);                                           \
    if (lrllm_h5_result < 0) (file).fail(#call, (what), __FILE__, __LINE__); \
    return lrllm_h5_result;                                                  \
  }())

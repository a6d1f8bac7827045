#include "lrllm/io/metrics.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <set>

#include "lrllm/core/common.h"
#include "lrllm/core/version.h"
#include "lrllm/io/hdf5.h"

namespace lrllm {
namespace {

constexpr hsize_t kChunkRows = 256;
constexpr const char* kMetricsFormat = "lrllm-metrics";

hsize_t rows_of(H5File& f, const std::string& dataset) {
  return static_cast<hsize_t>(f.shape(dataset).at(0));
}

void create_series(H5File& f, const std::string& dataset, hsize_t rows) {
  const hsize_t dims[1] = {0}, max_dims[1] = {H5S_UNLIMITED}, chunk[1] = {kChunkRows};
  const hid_t space = LRLLM_H5(f, H5Screate_simple(1, dims, max_dims), dataset);
  const hid_t plist = LRLLM_H5(f, H5Pcreate(H5P_DATASET_CREATE), dataset);
  LRLLM_H5(f, H5Pset_chunk(plist, 1, chunk), dataset);
  // A checksum per chunk: a damaged series fails its read instead of returning garbage.
  LRLLM_H5(f, H5Pset_fletcher32(plist), dataset);
  const hid_t d =
      LRLLM_H5(f, H5Dcreate2(f.id(), dataset.c_str(), H5T_IEEE_F64LE, space, H5P_DEFAULT, plist, H5P_DEFAULT),
               "cannot create " + dataset);
  H5Pclose(plist);
  H5Sclose(space);
  H5Dclose(d);
  if (rows > 0) {
    // A metric that appears after others already have rows: its earlier rows are NaN.
    std::vector<double> nan(rows, std::numeric_limits<double>::quiet_NaN());
    const hid_t dd = LRLLM_H5(f, H5Dopen2(f.id(), dataset.c_str(), H5P_DEFAULT), dataset);
    const hsize_t size[1] = {rows};
    LRLLM_H5(f, H5Dset_extent(dd, size), dataset);
    LRLLM_H5(f, H5Dwrite(dd, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, nan.data()), dataset);
    H5Dclose(dd);
  }
}

// Appends values to a 1-D extendible dataset.
void append_values(H5File& f, const std::string& dataset, const std::vector<double>& values) {
  const hid_t d = LRLLM_H5(f, H5Dopen2(f.id(), dataset.c_str(), H5P_DEFAULT), "cannot open " + dataset);
  const hsize_t old_rows = rows_of(f, dataset);
  const hsize_t new_size[1] = {old_rows + values.size()};
  LRLLM_H5(f, H5Dset_extent(d, new_size), "cannot extend " + dataset);
  const hid_t file_space = LRLLM_H5(f, H5Dget_space(d), dataset);
  const hsize_t start[1] = {old_rows}, count[1] = {values.size()};
  LRLLM_H5(f, H5Sselect_hyperslab(file_space, H5S_SELECT_SET, start, nullptr, count, nullptr), dataset);
  const hid_t mem_space = LRLLM_H5(f, H5Screate_simple(1, count, nullptr), dataset);
  LRLLM_H5(f, H5Dwrite(d, H5T_NATIVE_DOUBLE, mem_space, file_space, H5P_DEFAULT, values.data()),
           "cannot write " + dataset);
  H5Sclose(mem_space);
  H5Sclose(file_space);
  H5Dclose(d);
}

void truncate_series(H5File& f, const std::string& dataset, hsize_t rows) {
  const hid_t d = LRLLM_H5(f, H5Dopen2(f.id(), dataset.c_str(), H5P_DEFAULT), "cannot open " + dataset);
  const hsize_t size[1] = {rows};
  LRLLM_H5(f, H5Dset_extent(d, size), "cannot shrink " + dataset);
  H5Dclose(d);
}

}  // namespace

Metrics::Metrics(const std::string& path, int64_t resume_step) : path_(path) {
  if (!std::filesystem::exists(path)) {
    H5File f = H5File::create(path);
    f.set_attr("/", "format", std::string(kMetricsFormat));
    f.set_attr("/", "lrllm_version", std::string(kVersion));
    f.set_attr("/", "created", now_iso8601());
    f.ensure_group("/metrics");
    f.close();
    return;
  }
  // Only world rank 0 gets here, past the ranks' joint checks (resume and eval run this one among them): an
  // InputError now would leave the other ranks waiting for this one, so it ends the job instead.
  try {
    check_metrics_file(path);
  } catch (const InputError& e) {
    throw RuntimeError(e.what());
  }
  H5File f = H5File::open_write(path);
  f.ensure_group("/metrics");
  if (!f.exists("/metrics/step")) return;
  const std::vector<double> steps = f.read_series("/metrics/step");
  const hsize_t rows = steps.size();
  hsize_t keep = 0;
  while (keep < rows && steps[keep] <= static_cast<double>(resume_step)) ++keep;
  for (const std::string& name : f.children("/metrics"))
    truncate_series(f, "/metrics/" + name, std::min(keep, rows_of(f, "/metrics/" + name)));
  f.flush();
}

void write_run_record(H5File& f, const std::string& resolved, const std::string& command_line) {
  if (resolved.empty()) return;
  f.set_attr("/", "run_config", resolved);
  f.set_attr("/", "command_line", command_line);
}

void print_run_record(const H5File& f) {
  if (!f.has_attr("/", "run_config")) return;
  if (f.has_attr("/", "command_line"))
    std::printf("command line: %s\n", f.attr_string("/", "command_line").c_str());
  std::printf("run configuration (--config reads it back):\n%s", f.attr_string("/", "run_config").c_str());
}

void Metrics::record_run(const std::string& resolved, const std::string& command_line) {
  H5File f = H5File::open_write(path_);
  write_run_record(f, resolved, command_line);
  f.close();
}

void Metrics::append(const std::map<std::string, double>& row) {
  pending_.push_back(row);
}

namespace {

// Appends rows to the series of one group; a series new to the group starts with NaN for the earlier rows.
void append_rows(H5File& f, const std::string& group, const std::vector<std::map<std::string, double>>& rows,
                 const std::string& length_series) {
  f.ensure_group(group);
  std::set<std::string> names;
  for (const std::string& n : f.children(group)) names.insert(n);
  for (const auto& row : rows)
    for (const auto& [name, value] : row) names.insert(name);
  const std::string counter = group + "/" + length_series;
  const hsize_t existing = f.exists(counter) ? rows_of(f, counter) : 0;
  for (const std::string& name : names) {
    const std::string dataset = group + "/" + name;
    if (!f.exists(dataset)) create_series(f, dataset, existing);
    std::vector<double> values;
    values.reserve(rows.size());
    for (const auto& row : rows) {
      const auto it = row.find(name);
      values.push_back(it != row.end() ? it->second : std::numeric_limits<double>::quiet_NaN());
    }
    append_values(f, dataset, values);
  }
}

}  // namespace

void Metrics::append_eval(const std::string& task, const std::map<std::string, double>& row) {
  pending_eval_.emplace_back(task, row);
}

void Metrics::flush() {
  if (pending_.empty() && pending_eval_.empty()) return;
  H5File f = H5File::open_write(path_);
  if (!pending_.empty()) append_rows(f, "/metrics", pending_, "step");
  for (const auto& [task, row] : pending_eval_) append_rows(f, "/eval/" + task, {row}, "n");
  f.flush();
  f.close();
  pending_.clear();
  pending_eval_.clear();
}

void check_metrics_file(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return;
  try {
    if (!std::filesystem::is_regular_file(path, ec)) throw InputError(path + " is not a regular file");
    {
      const H5File f = H5File::open_read(path);
      std::vector<std::string> groups = {"/metrics"};
      for (const std::string& task : f.children("/eval")) groups.push_back("/eval/" + task);
      for (const std::string& group : groups)
        for (const std::string& name : f.children(group)) f.read_series(group + "/" + name);
    }
    // What a run does first, tried on a copy in memory (once the file is closed: HDF5 opens a file once): a
    // file that reads well may still fail to change.
    H5File scratch = H5File::open_in_memory(path);
    scratch.ensure_group("/metrics");
    for (const std::string& name : scratch.children("/metrics")) {
      const std::string series = "/metrics/" + name;
      truncate_series(scratch, series, rows_of(scratch, series));
      append_values(scratch, series, {0.0});
    }
    scratch.flush();
  } catch (const InputError& e) {
    throw InputError(std::string(e.what()) + "; the checkpoints are not affected: move " + path +
                     " aside (or delete it) and run again to start a new one");
  }
}

bool is_metrics_file(const std::string& path) {
  const H5File f = H5File::open_read(path);
  if (f.has_attr("/", "format")) return f.attr_string("/", "format") == kMetricsFormat;
  return f.exists("/metrics");
}

void print_metrics_info(const std::string& path) {
  const H5File f = H5File::open_read(path);
  std::printf("%s: lrllm metrics", path.c_str());
  if (f.has_attr("/", "lrllm_version"))
    std::printf(", written by lrllm %s, created %s", f.attr_string("/", "lrllm_version").c_str(),
                f.attr_string("/", "created").c_str());
  std::printf("\n  %-24s %8s %14s %14s %14s\n", "series", "rows", "last", "min", "max");
  for (const std::string& name : f.children("/metrics")) {
    const std::vector<double> v = f.read_series("/metrics/" + name);
    // NaN marks rows where a metric was not measured (val_loss between evaluations): skip them.
    std::vector<double> measured;
    for (double x : v)
      if (!std::isnan(x)) measured.push_back(x);
    if (measured.empty()) {
      std::printf("  %-24s %8zu %14s\n", name.c_str(), v.size(), "-");
      continue;
    }
    const auto [lo, hi] = std::minmax_element(measured.begin(), measured.end());
    std::printf("  %-24s %8zu %14.6g %14.6g %14.6g\n", name.c_str(), v.size(), measured.back(), *lo, *hi);
  }
  if (f.exists("/eval")) {
    std::printf("  %-24s %8s %14s %14s %14s\n", "evaluation (latest)", "n", "accuracy", "f1_macro",
                "f1_weighted");
    for (const std::string& task : f.children("/eval")) {
      const std::string g = "/eval/" + task + "/";
      const auto last = [&](const char* key) {
        const std::vector<double> v = f.exists(g + key) ? f.read_series(g + key) : std::vector<double>{};
        return v.empty() ? NAN : v.back();
      };
      std::printf("  %-24s %8.0f %14.4f %14.4f %14.4f\n", task.c_str(), last("n"), last("accuracy"),
                  last("f1_macro"), last("f1_weighted"));
    }
  }
  print_run_record(f);
}

}  // namespace lrllm

// metrics.h5 (docs/design.md, Metrics file): one extendible float64 dataset per metric under /metrics,
// appended row by row and written at every flush, so a crash loses at most one log interval.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace lrllm {

class H5File;

// The run record (docs/design.md, Run record): the resolved configuration of the run that wrote a file
// (Config::resolved, INI that --config reads back) and its command line, as the root attributes run_config
// and command_line of checkpoints, adapter files and metrics.h5. Nothing is written for an empty record.
void write_run_record(H5File& f, const std::string& resolved, const std::string& command_line);
// Prints a file's record for --mode info, if it has one.
void print_run_record(const H5File& f);

class Metrics {
 public:
  // Opens (or creates) path. Rows whose step is above resume_step are dropped: after a resume, the file holds
  // one history, the one the checkpoint continues.
  Metrics(const std::string& path, int64_t resume_step);
  // Queues one row; a metric missing from a row is stored as NaN.
  void append(const std::map<std::string, double>& row);
  // Queues one evaluation result of a task: one row of the series under /eval/<task>/ (accuracy, f1_macro,
  // ...).
  void append_eval(const std::string& task, const std::map<std::string, double>& row);
  // Writes queued rows to the file and flushes it.
  void flush();
  // Stores the record of the run now appending (write_run_record): the latest run's replaces an earlier's.
  void record_run(const std::string& resolved, const std::string& command_line);

 private:
  std::string path_;
  std::vector<std::map<std::string, double>> pending_;
  std::vector<std::pair<std::string, std::map<std::string, double>>> pending_eval_;
};

// Whether path is a metrics file (root attribute format "lrllm-metrics", or, from before that attribute, a
// /metrics group), and a summary of one for --mode info: each series with its rows, last, min and max, and
// each task's latest evaluation. InputError on a file that is missing or not HDF5.
bool is_metrics_file(const std::string& path);
// Checks a run's metrics file before a run appends to it (a missing one is fine): every series must be a
// readable 1-D numeric dataset. InputError says what is wrong and that moving the file aside lets the run go
// on; checkpoints are never touched.
void check_metrics_file(const std::string& path);
void print_metrics_info(const std::string& path);

}  // namespace lrllm

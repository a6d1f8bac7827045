// metrics.h5 (docs/design.md, Metrics file): one extendible float64 dataset per metric under /metrics,
// appended row by row and written at every flush, so a crash loses at most one log interval.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace lrllm {

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

#include "lrllm/core/signals.h"

#include <unistd.h>

#include <atomic>
#include <csignal>

namespace lrllm {
namespace {

volatile std::sig_atomic_t stop_flag = 0;

extern "C" void on_stop_signal(int) {
  stop_flag = 1;
}

// The handler may only read memory the program does not change under it: a fixed buffer, and a flag set
// once the buffer holds a whole path.
char partial_path[4096];
volatile std::sig_atomic_t partial_set = 0;

extern "C" void on_exit_signal(int sig) {
  if (partial_set) unlink(partial_path);
  _exit(128 + sig);
}

}  // namespace

void install_exit_handlers() {
  struct sigaction action {};
  action.sa_handler = on_exit_signal;
  sigemptyset(&action.sa_mask);
  for (int sig : {SIGTERM, SIGINT, SIGUSR1}) sigaddset(&action.sa_mask, sig);
  for (int sig : {SIGTERM, SIGINT, SIGUSR1}) sigaction(sig, &action, nullptr);
}

void set_partial_output(const std::string& path) {
  partial_set = 0;
  if (path.size() >= sizeof partial_path) return;  // not removable on a signal; such paths do not occur
  path.copy(partial_path, path.size());
  partial_path[path.size()] = '\0';
  std::atomic_signal_fence(std::memory_order_release);  // the path is whole before the flag says so
  partial_set = 1;
}

void clear_partial_output() {
  partial_set = 0;
}

void install_stop_handlers() {
  struct sigaction action {};
  action.sa_handler = on_stop_signal;
  sigemptyset(&action.sa_mask);
  // Restart interrupted system calls: MPI and HDF5 should not see EINTR because of the flag.
  action.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGUSR1, &action, nullptr);
}

bool stop_requested() {
  return stop_flag != 0;
}

}  // namespace lrllm

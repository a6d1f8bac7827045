// Error types and checking macros shared by every component.
#pragma once

#include <stdexcept>
#include <string>

namespace lrllm {

// Bad input from the user (an option, a file, a value): one line on stderr and exit status 2.
struct InputError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Another rank hit an InputError and reported it; this rank exits 2 without repeating it.
struct PeerInputError : InputError {
  PeerInputError() : InputError("input error reported by another rank") {}
};

// A failure of the system or a library call during a run: one line on stderr and exit status 1.
struct RuntimeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Training diverged (NaN/Inf loss): exit status 3; the last good checkpoint is left untouched.
struct DivergenceError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] void fail_call(const char* call, const std::string& detail, const char* file, int line);

std::string strprintf(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// The current UTC time as 2026-01-31T12:00:00Z (files record when they were written).
std::string now_iso8601();

}  // namespace lrllm

// Checks a library call whose failure is a negative return value (HDF5) or a non-success code.
#define LRLLM_CHECK(cond, call, detail)                                \
  do {                                                                 \
    if (!(cond)) ::lrllm::fail_call(call, detail, __FILE__, __LINE__); \
  } while (0)

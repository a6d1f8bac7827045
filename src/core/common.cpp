#include "lrllm/core/common.h"

#include <cstdarg>
#include <cstdio>
#include <ctime>

namespace lrllm {

void fail_call(const char* call, const std::string& detail, const char* file, int line) {
  std::string msg = std::string(call) + " failed";
  if (!detail.empty()) msg += ": " + detail;
  msg += strprintf(" (%s:%d)", file, line);
  throw RuntimeError(msg);
}

std::string strprintf(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  va_list copy;
  va_copy(copy, args);
  const int n = std::vsnprintf(nullptr, 0, fmt, copy);
  va_end(copy);
  std::string out(n > 0 ? n : 0, '\0');
  if (n > 0) std::vsnprintf(out.data(), out.size() + 1, fmt, args);
  va_end(args);
  return out;
}

std::string now_iso8601() {
  const std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

}  // namespace lrllm

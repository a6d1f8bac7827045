#pragma once

namespace lrllm {
inline constexpr const char* kVersion = "0.1.0";
}

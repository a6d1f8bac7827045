// What the model consumes: one micro-step's rows on the host (docs/design.md, Batches), filled by a
// BatchSource (io/data.h) and run by Model and Pipeline.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace lrllm {

// One micro-step's rows on the host (docs/design.md, Batches): `rows` rows of T <= seq_len tokens.
struct Batch {
  int rows = 0, T = 0;
  std::vector<int32_t> tokens, targets;  // [rows, T]; a target < 0 carries no loss (prompt, padding)
  // [rows, T] when several examples are packed in a row: each token's position inside its example, and
  // attention at t reaches back to t - positions[t] only. Empty: one sequence a row at positions 0 .. T - 1.
  std::vector<int32_t> positions;
  int64_t real_tokens = 0;  // tokens that are not padding: what tokens/s counts
  // Shapes the batch for rows x T (contents unset, no positions; every token counted as real).
  void resize(int rows_, int T_) {
    rows = rows_;
    T = T_;
    tokens.resize(static_cast<std::size_t>(rows) * T);
    targets.resize(tokens.size());
    positions.clear();
    real_tokens = static_cast<int64_t>(tokens.size());
  }
  const int32_t* positions_or_null() const { return positions.empty() ? nullptr : positions.data(); }
};

}  // namespace lrllm

// --mode decompose: a dense checkpoint becomes a low-rank model file by truncated SVD (docs/design.md,
// Linear layers):
// W = U S V^T  ->  A = sqrt(S_r) V_r^T [r, in],  B = U_r sqrt(S_r) [out, r].
#pragma once

#include <vector>

#include "lrllm/core/config.h"

namespace lrllm {

struct Factorization {
  std::vector<float> A, B;  // [r, in], [out, r]
  double relative_error;    // ||W - B A||_F / ||W||_F
};

// Truncated SVD of W [out, in] at rank r, in double precision.
Factorization factorize(const float* W, int out, int in, int r);

int run_decompose(const Config& cfg);

}  // namespace lrllm

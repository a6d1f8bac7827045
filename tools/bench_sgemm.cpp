// Measures what OpenBLAS sgemm sustains on this machine, the yardstick `make bench` holds lrllm's model FLOP
// rate against. Prints machine-readable lines: the OpenBLAS kernel set in use (its runtime CPU detection
// picks it; OPENBLAS_CORETYPE overrides it), then one line per measurement:
//   openblas <corename>
//   sgemm <label> M N K transA transB threads gflops
// Usage: bench_sgemm [--threads N] [--square S] [--shape LABEL M N K TA TB]... [--reps R] [--as-installed]
// With no --shape, only the square product is measured. Like lrllm, it first replaces OpenBLAS's generic
// fallback kernels with the ones this CPU supports (lrllm::ensure_blas_kernels), so that it measures what
// lrllm gets;
// --as-installed skips that.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "lrllm/backend/backend.h"

namespace {

struct Shape {
  std::string label;
  int M, N, K;
  bool ta, tb;
};

float* alloc_filled(std::size_t n, unsigned seed) {
  float* p = static_cast<float*>(std::aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64));
  if (p == nullptr) {
    std::fprintf(stderr, "bench_sgemm: out of memory (%zu floats)\n", n);
    std::exit(1);
  }
  // A cheap deterministic fill in [-0.5, 0.5); the values only need to be ordinary floats.
  unsigned s = seed;
  for (std::size_t i = 0; i < n; ++i) {
    s = s * 1664525u + 1013904223u;
    p[i] = static_cast<float>(s >> 8) / 16777216.0f - 0.5f;
  }
  return p;
}

// Best GFLOP/s over `reps` timed calls after one warm-up call; the repetition count shrinks for big shapes so
// that each measurement stays near a second.
double measure(const Shape& s, int reps) {
  const std::size_t a_n = static_cast<std::size_t>(s.M) * s.K, b_n = static_cast<std::size_t>(s.K) * s.N,
                    c_n = static_cast<std::size_t>(s.M) * s.N;
  float* A = alloc_filled(a_n, 1);
  float* B = alloc_filled(b_n, 2);
  float* C = alloc_filled(c_n, 3);
  const int lda = s.ta ? s.M : s.K, ldb = s.tb ? s.K : s.N;
  auto call = [&] {
    cblas_sgemm(CblasRowMajor, s.ta ? CblasTrans : CblasNoTrans, s.tb ? CblasTrans : CblasNoTrans, s.M, s.N,
                s.K, 1.0f, A, lda, B, ldb, 0.0f, C, s.N);
  };
  const double flops = 2.0 * s.M * s.N * s.K;
  auto t0 = std::chrono::steady_clock::now();
  call();
  const double first = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const int n = std::max(2, std::min(reps, static_cast<int>(1.5 / std::max(first, 1e-6))));
  double best = 0;
  for (int r = 0; r < n; ++r) {
    t0 = std::chrono::steady_clock::now();
    call();
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, flops / dt / 1e9);
  }
  std::free(A);
  std::free(B);
  std::free(C);
  return best;
}

[[noreturn]] void usage() {
  std::fprintf(stderr,
               "usage: bench_sgemm [--threads N] [--square S] [--reps R] [--shape LABEL M N K TA TB]... "
               "[--as-installed]\n"
               "  TA/TB are 0 (no transpose) or 1 (transpose), row-major as lrllm calls cblas_sgemm\n");
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 2, square = 2048, reps = 5;
  bool as_installed = false;
  std::vector<Shape> shapes;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto need = [&](int k) {
      if (i + k >= argc) usage();
    };
    if (a == "--threads") {
      need(1);
      threads = std::atoi(argv[++i]);
    } else if (a == "--square") {
      need(1);
      square = std::atoi(argv[++i]);
    } else if (a == "--reps") {
      need(1);
      reps = std::atoi(argv[++i]);
    } else if (a == "--as-installed") {
      as_installed = true;
    } else if (a == "--shape") {
      need(6);
      Shape s{argv[i + 1],
              std::atoi(argv[i + 2]),
              std::atoi(argv[i + 3]),
              std::atoi(argv[i + 4]),
              std::atoi(argv[i + 5]) != 0,
              std::atoi(argv[i + 6]) != 0};
      if (s.M <= 0 || s.N <= 0 || s.K <= 0) usage();
      shapes.push_back(s);
      i += 6;
    } else {
      usage();
    }
  }
  if (threads <= 0 || reps <= 0) usage();
  if (!as_installed) lrllm::ensure_blas_kernels(argv);
  openblas_set_num_threads(threads);
  omp_set_num_threads(threads);
  std::printf("openblas %s\n", openblas_get_corename());
  std::vector<Shape> all;
  if (square > 0) all.push_back({"square", square, square, square, false, false});
  all.insert(all.end(), shapes.begin(), shapes.end());
  for (const Shape& s : all) {
    const double g = measure(s, reps);
    std::printf("sgemm %s %d %d %d %d %d %d %.2f\n", s.label.c_str(), s.M, s.N, s.K, s.ta ? 1 : 0,
                s.tb ? 1 : 0, threads, g);
    std::fflush(stdout);
  }
  return 0;
}

// Deterministic random numbers whose sequence is fixed by this code alone (the standard library's
// distributions differ between implementations, and a checkpoint must resume to the same bits anywhere).
#pragma once

#include <cmath>
#include <cstdint>
#include <string_view>

#ifdef __CUDACC__
#define LRLLM_HOST_DEVICE __host__ __device__
#else
#define LRLLM_HOST_DEVICE
#endif

namespace lrllm {

// The k-th value (from 0) that SplitMix64 seeded with `seed` returns: SplitMix64 is a counter passed through
// a mixer, so any element of a sequence can be computed on its own (a GPU thread per element).
LRLLM_HOST_DEVICE inline uint64_t splitmix64_at(uint64_t seed, uint64_t k) {
  uint64_t z = seed + (k + 1) * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Uniform in [0, 1) with 53 random bits, from one 64-bit value.
LRLLM_HOST_DEVICE inline double uniform_of(uint64_t bits) {
  return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

// A standard normal by Box-Muller from two 64-bit values: the first gives the radius, the second the angle.
inline double box_muller(uint64_t first, uint64_t second) {
  const double u1 = 1.0 - uniform_of(first);
  const double u2 = uniform_of(second);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
}

// The k-th value (from 0) that normal() returns from a fresh Rng(seed), computed on its own: each normal()
// takes two values of the sequence, so threads can draw parts of a tensor without sharing a generator.
inline double normal_at(uint64_t seed, uint64_t k) {
  return box_muller(splitmix64_at(seed, 2 * k), splitmix64_at(seed, 2 * k + 1));
}

class Rng {
 public:
  explicit Rng(uint64_t seed) : seed_(seed) {}
  uint64_t next() { return splitmix64_at(seed_, count_++); }
  double uniform() { return uniform_of(next()); }
  // Uniform integer in [0, n).
  uint64_t below(uint64_t n) { return n == 0 ? 0 : next() % n; }
  // Standard normal by Box-Muller.
  double normal() {
    const uint64_t first = next();
    return box_muller(first, next());
  }

 private:
  uint64_t seed_;
  uint64_t count_ = 0;
};

// A seed derived from a base seed and a name (FNV-1a), so each tensor's values do not depend on order.
inline uint64_t derive_seed(uint64_t seed, std::string_view name) {
  uint64_t h = 0xcbf29ce484222325ULL ^ seed;
  for (unsigned char c : name) h = (h ^ c) * 0x100000001b3ULL;
  return h;
}

}  // namespace lrllm

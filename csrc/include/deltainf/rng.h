// Counter-based random numbers for the JL projection matrix Omega.
//
// Omega's entry (row j, column c) is a pure function of (seed, j, c): no generator state, no
// dependence on how work is split across threads, blocks or SMs. That is what makes the matrix
// identical on the CPU and on every GPU (TRAK's fast_jl keys its cuRAND streams by feature tile,
// so its matrix changes with the SM count), and what lets a caller project a long vector chunk by
// chunk with an offset. The mixer is splitmix64's finaliser (Steele, Lea & Flood 2014), a
// bijection with full avalanche; deltainf/reference.py re-expresses the same arithmetic in torch.
#pragma once

#include <cmath>
#include <cstdint>

#include "deltainf/macros.h"

namespace deltainf {
namespace rng {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kMix1 = 0xBF58476D1CE4E5B9ULL;
constexpr uint64_t kMix2 = 0x94D049BB133111EBULL;
// Gaussian draws use a different key stream than Rademacher draws for the same seed.
constexpr uint64_t kSaltGaussian = 0x6A09E667F3BCC909ULL;

enum Dist : int { kRademacher = 0, kGaussian = 1 };

DELTAINF_HOST_DEVICE uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * kMix1;
  z = (z ^ (z >> 27)) * kMix2;
  return z ^ (z >> 31);
}

// Key of one matrix row; computed once per row, then one mix per 64-bit draw.
DELTAINF_HOST_DEVICE uint64_t row_key(uint64_t seed, uint64_t row, uint64_t salt) {
  return mix64(mix64(seed ^ salt) + (row + 1) * kGolden);
}

DELTAINF_HOST_DEVICE uint64_t draw(uint64_t key, uint64_t counter) {
  return mix64(key + (counter + 1) * kGolden);
}

// Rademacher: column c takes bit (c % 64) of draw(key, c / 64); 0 -> +scale, 1 -> -scale.
template <typename T>
DELTAINF_HOST_DEVICE T rademacher(uint64_t bits, int bit, T scale) {
  return ((bits >> bit) & 1ULL) ? -scale : scale;
}

// Gaussian: columns 2m and 2m+1 are the Box-Muller pair of draw(key, m), built from its top
// 24 bits (u1 in (0, 1], never 0 so the log is finite) and the next 24 bits (u2 in [0, 1)).
// 24-bit uniforms are exact in float32, so the float and double paths see the same u1, u2.
template <typename T>
DELTAINF_HOST_DEVICE void gaussian_pair(uint64_t bits, T scale, T* z0, T* z1) {
  using std::cos;
  using std::log;
  using std::sin;
  using std::sqrt;
  const T u1 = (static_cast<T>((bits >> 40) & 0xFFFFFFULL) + T(1)) * T(5.9604644775390625e-08);
  const T u2 = static_cast<T>((bits >> 16) & 0xFFFFFFULL) * T(5.9604644775390625e-08);
  const T r = sqrt(T(-2) * log(u1)) * scale;
  const T theta = T(6.283185307179586) * u2;
  *z0 = r * cos(theta);
  *z1 = r * sin(theta);
}

}  // namespace rng
}  // namespace deltainf

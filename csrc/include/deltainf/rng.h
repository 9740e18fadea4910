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
#include <cstring>

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
// 24 bits n1 (u1 = (n1 + 1) 2^-24 in (0, 1], never 0 so the log is finite) and the next 24 bits n2
// (u2 = n2 2^-24 in [0, 1)). 24-bit uniforms are exact in float32, so float and double see the same
// u1, u2. The pair is split out of the draw first so that a CPU loop can run the math on arrays of
// fields (the 64-bit mixing has no SSE/AVX form; the math below does).
DELTAINF_HOST_DEVICE uint32_t gaussian_field1(uint64_t bits) { return static_cast<uint32_t>((bits >> 40) & 0xFFFFFFULL) + 1u; }
DELTAINF_HOST_DEVICE uint32_t gaussian_field2(uint64_t bits) { return static_cast<uint32_t>((bits >> 16) & 0xFFFFFFULL); }

DELTAINF_HOST_DEVICE int32_t float_as_int(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(x);
#else
  int32_t i;
  std::memcpy(&i, &x, sizeof(i));
  return i;
#endif
}

DELTAINF_HOST_DEVICE float int_as_float(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  float x;
  std::memcpy(&x, &i, sizeof(x));
  return x;
#endif
}

// float32: branch-free polynomials instead of logf/cosf/sinf, so the CPU fill vectorises (libm calls
// do not) and CPU and CUDA run the same arithmetic. Largest error against the float64 libm pair
// about 7e-7 in N(0, 1) units, below float32 libm's own (~1e-6).
//   log(u1) = log(n1) - 24 log 2: n1 (exact in float) = m 2^e with m in [sqrt(1/2), sqrt(2)),
//     log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.172, series to s^9 (error < 1e-9).
//   cos/sin(2 pi u2): quarter-turn reduction q = round(4 u2) done exactly on the integer n2, then
//     x = 2 pi (u2 - q / 4) in [-pi/4, pi/4], Taylor to x^9 / x^10, and a swap/sign chosen by q.
DELTAINF_HOST_DEVICE void gaussian_pair_fields(uint32_t n1, uint32_t n2, float scale, float* z0, float* z1) {
  // Only integer/bit operations and arithmetic below, no branches or selects, so compilers vectorise
  // the loop. n1 <= 2^24 and n2 < 2^24: signed conversions (unsigned -> float has no SSE2 form).
  // Normalisation as in musl's logf: subtracting the bits of sqrt(1/2) puts m in [sqrt(1/2), sqrt(2)).
  const int32_t ix = float_as_int(static_cast<float>(static_cast<int32_t>(n1))) - 0x3F3504F3;
  const int32_t e = ix >> 23;
  const float m = int_as_float((ix & 0x007FFFFF) + 0x3F3504F3);
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  const float atanh_s = s * (1.0f + s2 * (0.333333333f + s2 * (0.2f + s2 * (0.142857143f + s2 * 0.111111111f))));
  const float k = static_cast<float>(e - 24);
  // ln 2 split in two so that k ln 2 keeps full precision (ln2_hi = 355/512: k ln2_hi is exact)
  const float log_u1 = 2.0f * atanh_s + k * -2.12194440e-4f + k * 0.693359375f;
  const float r = std::sqrt(-2.0f * log_u1) * scale;

  const int32_t i2 = static_cast<int32_t>(n2);
  const int32_t q = (i2 + (1 << 21)) >> 22;  // round(4 u2), 0..4
  const float x = static_cast<float>(i2 - (q << 22)) * 3.74507028e-07f;  // 2 pi 2^-24
  const float x2 = x * x;
  const float sn = x * (1.0f - x2 * (1.0f / 6) * (1.0f - x2 * (1.0f / 20) * (1.0f - x2 * (1.0f / 42) *
                                                                                  (1.0f - x2 * (1.0f / 72)))));
  const float cs = 1.0f - x2 * 0.5f * (1.0f - x2 * (1.0f / 12) * (1.0f - x2 * (1.0f / 30) *
                                                                   (1.0f - x2 * (1.0f / 56) * (1.0f - x2 * (1.0f / 90)))));
  // theta = x + q pi/2: (cos, sin) = (cs, sn), (-sn, cs), (-cs, -sn), (sn, -cs) for q mod 4 = 0..3:
  // swap the two when q is odd, flip cos's sign when q mod 4 is 1 or 2, sin's when it is 2 or 3.
  const uint32_t uq = static_cast<uint32_t>(q);
  const uint32_t swap = 0u - (uq & 1u);  // all ones when q is odd
  const uint32_t sn_bits = static_cast<uint32_t>(float_as_int(sn)), cs_bits = static_cast<uint32_t>(float_as_int(cs));
  const uint32_t c_bits = ((sn_bits & swap) | (cs_bits & ~swap)) ^ (((uq + 1u) & 2u) << 30);
  const uint32_t t_bits = ((cs_bits & swap) | (sn_bits & ~swap)) ^ ((uq & 2u) << 30);
  *z0 = r * int_as_float(static_cast<int32_t>(c_bits));
  *z1 = r * int_as_float(static_cast<int32_t>(t_bits));
}

// float64: libm (the vectorisation gain is small next to a float64 GEMM, and the reference matches
// it to 1e-12).
DELTAINF_HOST_DEVICE void gaussian_pair_fields(uint32_t n1, uint32_t n2, double scale, double* z0, double* z1) {
  using std::cos;
  using std::log;
  using std::sin;
  using std::sqrt;
  const double u1 = static_cast<double>(n1) * 5.9604644775390625e-08;
  const double u2 = static_cast<double>(n2) * 5.9604644775390625e-08;
  const double r = sqrt(-2.0 * log(u1)) * scale;
  const double theta = 6.283185307179586 * u2;
  *z0 = r * cos(theta);
  *z1 = r * sin(theta);
}

template <typename T>
DELTAINF_HOST_DEVICE void gaussian_pair(uint64_t bits, T scale, T* z0, T* z1) {
  gaussian_pair_fields(gaussian_field1(bits), gaussian_field2(bits), scale, z0, z1);
}

}  // namespace rng
}  // namespace deltainf

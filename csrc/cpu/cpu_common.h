// Pieces shared by the CPU kernels: ISA clones, vectorisable exp and log, online softmax
// statistics and the chunked loads they work on.
#pragma once

#include "../divergences.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace kdkernels {
namespace cpu {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KD_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KD_CPU_CLONES
#endif
#define KD_INLINE inline __attribute__((always_inline))

constexpr int64_t kChunk = 256;

// Float exp and log for the vector loops: Cephes' polynomials (about 1 ulp), branch-free so
// that they vectorise. exp underflows to exactly 0 below -87, so exp(-inf) = 0; log expects a
// positive normal argument.
struct FastMath {
  static KD_INLINE float exp(float x) {
    const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
    float poly = 1.9875691500e-4f;
    poly = poly * r + 1.3981999507e-3f;
    poly = poly * r + 8.3334519073e-3f;
    poly = poly * r + 4.1665795894e-2f;
    poly = poly * r + 1.6666665459e-1f;
    poly = poly * r + 5.0000001201e-1f;
    poly = poly * r * r + r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return x < -87.0f ? 0.0f : poly * scale;
  }
  static KD_INLINE float log(float x) {
    int32_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    float e = static_cast<float>(((bits >> 23) & 0xff) - 126);
    const int32_t mantissa_bits = (bits & 0x007fffff) | 0x3f000000;
    float m;
    std::memcpy(&m, &mantissa_bits, sizeof(m));
    const bool below_sqrt_half = m < 0.707106781186547524f;
    e = below_sqrt_half ? e - 1.0f : e;
    m = below_sqrt_half ? m + m - 1.0f : m - 1.0f;
    const float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z + e * -2.12194440e-4f - 0.5f * z;
    return (m + y) + e * 0.693359375f;
  }
  // Its odd Taylor polynomial below |x| = 1/2, else 1 - 2 / (e^{2|x|} + 1) with the sign of x.
  static KD_INLINE float tanh(float x) {
    const float z = x * x;
    float poly = 1.455834387e-3f;
    poly = poly * z - 3.592128036e-3f;
    poly = poly * z + 8.863235530e-3f;
    poly = poly * z - 2.186948854e-2f;
    poly = poly * z + 5.396825397e-2f;
    poly = poly * z - 1.333333333e-1f;
    poly = poly * z + 3.333333333e-1f;
    const float small = x - x * z * poly;
    const float ax = x < 0.0f ? -x : x;
    const float large = 1.0f - 2.0f / (exp(2.0f * ax) + 1.0f);
    return ax < 0.5f ? small : (x < 0.0f ? -large : large);
  }
};

struct StdMath {  // double inputs (gradcheck): the C library, exact to rounding
  static KD_INLINE double exp(double x) { return std::exp(x); }
  static KD_INLINE double log(double x) { return std::log(x); }
  static KD_INLINE double tanh(double x) { return std::tanh(x); }
};

template <typename acc_t>
using MathFor = std::conditional_t<std::is_same_v<acc_t, double>, StdMath, FastMath>;

// Running (max, sum of exp(x - max)) of one input, with the support sums of divergences that
// take their row sums from the statistics; all rescaled together when the max moves.
template <typename acc_t>
struct OnlineSide {
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  acc_t sum = 0, mass = 0, logratio = 0;

  KD_INLINE void merge(acc_t chunk_max, acc_t chunk_sum, acc_t chunk_mass, acc_t chunk_logratio) {
    if (!(chunk_sum > 0)) return;
    if (chunk_max > max) {
      const acc_t r = std::exp(max - chunk_max);
      sum = sum * r + chunk_sum;
      mass = mass * r + chunk_mass;
      logratio = logratio * r + chunk_logratio;
      max = chunk_max;
    } else {
      const acc_t r = std::exp(chunk_max - max);
      sum += chunk_sum * r;
      mass += chunk_mass * r;
      logratio += chunk_logratio * r;
    }
  }
  KD_INLINE LogNormaliser<acc_t> normaliser() const { return {max, std::log(sum)}; }
};

template <typename scalar_t, typename acc_t>
KD_INLINE void load_scaled(const scalar_t* src, int64_t n, acc_t scale, acc_t* dst) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]) * scale;
}

template <typename scalar_t, typename acc_t>
KD_INLINE void store(const acc_t* src, int64_t n, scalar_t* dst) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

// Max of x[0:n]; sets `bad` if an entry is NaN or +inf (-inf is a valid, masked entry).
template <typename acc_t>
KD_INLINE acc_t chunk_max(const acc_t* x, int64_t n, int& bad) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  int b = 0;
#pragma omp simd reduction(max : m) reduction(| : b)
  for (int64_t i = 0; i < n; ++i) {
    m = x[i] > m ? x[i] : m;
    b |= !(x[i] <= std::numeric_limits<acc_t>::max());
  }
  bad |= b;
  return m;
}

// The exp offset of a chunk: its max, or 0 when the chunk is all -inf (every exp is then 0).
template <typename acc_t>
KD_INLINE acc_t exp_offset(acc_t chunk_max) {
  return chunk_max == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : chunk_max;
}

// Adds x[0:n]'s exps to the online statistics; with `kept`, also keeps each exp(x - offset) there.
template <typename acc_t>
KD_INLINE void accumulate_exp(const acc_t* x, int64_t n, acc_t chunk_max, OnlineSide<acc_t>& side,
                              acc_t* kept = nullptr) {
  using Math = MathFor<acc_t>;
  const acc_t offset = exp_offset(chunk_max);
  acc_t sum = 0;
  if (kept) {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) {
      kept[i] = Math::exp(x[i] - offset);
      sum += kept[i];
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) sum += Math::exp(x[i] - offset);
  }
  side.merge(chunk_max, sum, 0, 0);
}

// The factor that turns a chunk's kept exps exp(x - chunk_max) into probabilities, 0 for a chunk
// with no finite entry.
template <typename acc_t>
KD_INLINE acc_t chunk_scale(const LogNormaliser<acc_t>& norm, acc_t chunk_max) {
  return chunk_max == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : std::exp(norm.log_prob(chunk_max));
}

// A kept exp times its chunk_scale: a probability, flushed to 0 below the smallest normal as exp
// flushes (no subnormal arithmetic downstream).
template <typename acc_t>
KD_INLINE acc_t scaled_exp(acc_t kept, acc_t scale) {
  const acc_t x = kept * scale;
  return x < std::numeric_limits<acc_t>::min() ? acc_t(0) : x;
}

}  // namespace cpu
}  // namespace kdkernels

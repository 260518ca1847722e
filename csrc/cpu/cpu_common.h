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

// Float exp and log for the vector loops, branch-free so that they vectorise. exp: Cephes' range
// reduction and a degree-6 minimax polynomial (about 1 ulp), its scale built from the bits of the
// rounding sum; it underflows to exactly 0 below -87 (so exp(-inf) = 0), where the unclamped
// reduction's garbage is masked, and saturates at exp(88). log: Cephes' polynomial (about 1 ulp)
// after a reduction in integer arithmetic; it expects a positive normal argument.
struct FastMath {
  static KD_INLINE float exp(float x) {
    const float xc = x > 88.0f ? 88.0f : x;
    const float rounding_sum = xc * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23 + round(xc / ln 2)
    const float n = rounding_sum - 12582912.0f;
    const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
    float poly = 1.3879691250622272e-3f;
    poly = poly * r + 8.36869329214096e-3f;
    poly = poly * r + 4.166722670197487e-2f;
    poly = poly * r + 1.666652113199234e-1f;
    poly = poly * r + 4.999999701976776e-1f;
    poly = poly * (r * r) + r + 1.0f;
    uint32_t sum_bits;
    std::memcpy(&sum_bits, &rounding_sum, sizeof(sum_bits));
    const uint32_t bits = (sum_bits << 23) + (127u << 23);  // the sum's low bits hold n
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return x < -87.0f ? 0.0f : poly * scale;
  }
  static KD_INLINE float log(float x) {
    // x = 2^e * (1 + m) with 1 + m in [sqrt(1/2), sqrt(2)): adding the bits of 1 minus those of
    // sqrt(1/2) carries into the exponent exactly where the significand is at least sqrt(2).
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    bits += 0x3f800000u - 0x3f3504f3u;
    const float e = static_cast<float>(static_cast<int32_t>(bits >> 23) - 0x7f);
    const uint32_t mantissa_bits = (bits & 0x007fffffu) + 0x3f3504f3u;
    float mantissa;
    std::memcpy(&mantissa, &mantissa_bits, sizeof(mantissa));
    const float m = mantissa - 1.0f;
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

// The sum of value(i) over [0, n); with `kept`, also keeps each value there. One loop per case,
// so that each vectorises.
template <typename acc_t, typename Value>
KD_INLINE acc_t sum_keeping(int64_t n, acc_t* kept, Value value) {
  acc_t sum = 0;
  if (kept) {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) {
      const acc_t v = value(i);
      kept[i] = v;
      sum += v;
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) sum += value(i);
  }
  return sum;
}

// Adds x[0:n]'s exps to the online statistics; with `kept`, also keeps each exp(x - offset) there.
template <typename acc_t>
KD_INLINE void accumulate_exp(const acc_t* x, int64_t n, acc_t chunk_max, OnlineSide<acc_t>& side,
                              acc_t* kept = nullptr) {
  using Math = MathFor<acc_t>;
  const acc_t offset = exp_offset(chunk_max);
  const acc_t sum = sum_keeping(n, kept, [x, offset](int64_t i) __attribute__((always_inline)) {
    return Math::exp(x[i] - offset);
  });
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

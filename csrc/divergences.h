// Divergence terms shared by the C++ backends (CPU and CUDA).
//
// A divergence of a row is D = sum_j f(p_j, q_j), summed over the entries where both logits
// are finite (an entry that is -inf in either input contributes 0), with
// p = softmax(teacher / T) and q = softmax(student / T), each normalised over its own
// finite entries. A divergence supplies, per entry,
//   value      f(p, q)
//   d_student  q * df/dq   (the derivative of f with respect to log q)
//   d_teacher  p * df/dp   (the derivative of f with respect to log p)
// and the kernels turn these into logit gradients through the softmax Jacobian:
//   dD/d(student_k / T) = d_student_k - q_k * sum_j d_student_j, and the same for the teacher.
// The row sums of the three terms therefore decide the gradient. A divergence whose row sums
// follow from the statistics of the first read (forward and reverse KL) sets kSumsFromStats
// and provides row_sums(); the kernels then skip the reduction read where anchors_hold().
//
// Adding a divergence: a struct with its kId, terms() (and row_sums() if kSumsFromStats), an
// enum value, a case in dispatch_divergence() and, if it takes keyword arguments, their slot in
// make_divergence_params(); one built on the mixture m of p and q derives from MixtureDivergence.
// Math supplies exp and log for the backend.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__CUDACC__)
#define KD_HD __host__ __device__ __forceinline__
#define KD_UNROLL _Pragma("unroll")
#else
#define KD_HD inline
#define KD_UNROLL _Pragma("GCC unroll 32")
#endif

namespace kdkernels {

enum class Divergence : int {
  kForwardKL = 0,
  kReverseKL = 1,
  kJSD = 2,
  kSkewKL = 3,
  kSkewReverseKL = 4,
  kTVD = 5,
  kAlphaBeta = 6,
  kAdaptiveKL = 7,
};

// Terms of the AB divergence's series in the spread of its nodes (AlphaBeta), enough that the
// first left out, at most (k + 1) / (k + 2)! 2^-k, is below the rounding error of acc_t.
template <typename acc_t>
constexpr int kNearTerms = sizeof(acc_t) == 8 ? 19 : 8;

// The constants of the AB divergence (AlphaBeta below), prepared on the host per call. Its three
// nodes x_q = g log q, m = alpha log p + beta log q and x_p = g log p (g = alpha + beta) are
// x_q + c u with c = 0, alpha, g and u = log p - log q. Ordered by c, node k is
// node_teacher[k] * log p + node_student[k] * log q.
template <typename acc_t>
struct AlphaBetaParams {
  acc_t node_teacher[3], node_student[3];
  acc_t gap[2], inv_gap[2];  // c of node 1 minus that of node 0, of node 2 minus node 1; 1 / gap, inf for 0
  acc_t spread, inv_spread;  // gap[0] + gap[1], and 1 / spread (inf for 0)
  // u exp[x_q, m] and u exp[m, x_p] as combinations of the adjacent pairs' u exp[node 0, node 1]
  // and u exp[node 1, node 2]: (1, 0), (0, 1), or for the outer pair (r, 1 - r), r = gap[0] / spread.
  acc_t to_qm[2], to_mp[2];
  acc_t near[kNearTerms<acc_t>];  // coefficients of the series of exp[node 0, node 1, node 2] in spread * u
};

// The constants of a divergence, prepared on the host (make_divergence_params).
template <typename acc_t>
struct DivergenceParams {
  // Mixture m = w * p + (1 - w) * q of JSD (w = beta) and skew KL (w = skew; 1 - skew for the
  // reverse): w and 1 - w, each flushed to 0 below the smallest normal, and their logs.
  // AdaptiveKL: the weights of forward and reverse KL, set per row by the kernel.
  acc_t weight, complement, log_weight, log_complement;
  AlphaBetaParams<acc_t> ab;
  acc_t head_mass;  // AdaptiveKL: mu, the teacher mass that bounds the head
};

// Per-entry terms, and the same three quantities summed over a row.
template <typename acc_t>
struct Terms {
  acc_t value, d_student, d_teacher;
};

// Statistics of the first read, normalised: over the entries finite in both inputs,
// student_mass = sum q, student_logratio = sum q * (a' - b'),
// teacher_mass = sum p, teacher_logratio = sum p * (b' - a'),
// where a = student / T, b = teacher / T, and ' marks a value minus its row's anchor (the max of
// the row's first kAnchorEntries entries, 0 if they are all -inf); lse_* are the log-normalisers
// of a' and b'. The anchors keep a constant offset between student and teacher logits (or just
// large logits) from cancelling in lse_student - lse_teacher: the log-ratios stay small numbers.
constexpr int kAnchorEntries = 16;

// The statistics' row sums hold to within 6 bits of the (max, log_sum) form where each anchor
// lies within kAnchorSlack of its row's max; a row whose first entries lie far below (masked by a
// large finite negative, say) has its row sums summed from the terms in a read of their own.
constexpr double kAnchorSlack = 64;
template <typename acc_t>
KD_HD bool anchors_hold(acc_t max_a, acc_t anchor_a, acc_t max_b, acc_t anchor_b) {
  const acc_t gap_a = max_a - anchor_a, gap_b = max_b - anchor_b;
  return gap_a <= acc_t(kAnchorSlack) && gap_a >= acc_t(-kAnchorSlack) && gap_b <= acc_t(kAnchorSlack) &&
         gap_b >= acc_t(-kAnchorSlack);
}

// A row's log-normaliser log(sum exp x) kept as (max, log of the sum at that max): log-probs
// are formed as (x - max) - log_sum, exact where x - max is, rather than x - lse with a
// rounded lse, which loses digits when the logits are large.
template <typename acc_t>
struct LogNormaliser {
  acc_t max, log_sum;
  KD_HD acc_t log_prob(acc_t x) const { return (x - max) - log_sum; }
};

template <typename acc_t>
struct SupportStats {
  acc_t lse_student, lse_teacher;
  acc_t student_mass, student_logratio, teacher_mass, teacher_logratio;
};

struct ForwardKL {  // KL(p || q)
  static constexpr Divergence kId = Divergence::kForwardKL;
  static constexpr bool kSumsFromStats = true;
  template <typename Math, typename acc_t>
  static KD_HD Terms<acc_t> terms(acc_t lp, acc_t lq, acc_t p, acc_t q, const DivergenceParams<acc_t>&) {
    const acc_t value = p * (lp - lq);
    return {value, -p, value + p};
  }
  template <typename acc_t>
  static KD_HD Terms<acc_t> row_sums(const SupportStats<acc_t>& s, const DivergenceParams<acc_t>&) {
    const acc_t value = s.teacher_logratio + (s.lse_student - s.lse_teacher) * s.teacher_mass;
    return {value, -s.teacher_mass, value + s.teacher_mass};
  }
};

struct ReverseKL {  // KL(q || p)
  static constexpr Divergence kId = Divergence::kReverseKL;
  static constexpr bool kSumsFromStats = true;
  template <typename Math, typename acc_t>
  static KD_HD Terms<acc_t> terms(acc_t lp, acc_t lq, acc_t p, acc_t q, const DivergenceParams<acc_t>&) {
    const acc_t value = q * (lq - lp);
    return {value, value + q, -q};
  }
  template <typename acc_t>
  static KD_HD Terms<acc_t> row_sums(const SupportStats<acc_t>& s, const DivergenceParams<acc_t>&) {
    const acc_t value = s.student_logratio + (s.lse_teacher - s.lse_student) * s.student_mass;
    return {value, value + s.student_mass, -s.student_mass};
  }
};

template <typename acc_t>
struct Mixture {
  acc_t log_m, q_over_m;
};

// log m and the ratio q / m of m = w * p + (1 - w) * q: the larger of the two weighted terms
// (compared through the logs of the weights) factored out, m = p * (w + (1 - w) * q / p) or
// q * (w * p / q + 1 - w), so that the log's argument lies in [w, 2w] or [1 - w, 2(1 - w)] and
// neither underflows; exact where p or q underflows, at w = 0 or 1, and (up to the rounding of
// w + (1 - w)) where p == q, where m = p and identical inputs get terms of 0. The ratio of the
// smaller probability to the larger is exp of their log-ratio, capped at the largest finite
// value (which its zero weight cancels where w is 0 or 1); or, with kFromProbabilities, their
// quotient. The kernels' p and q are exact to a few ulp down to the smallest normal and off by
// less than twice it below (flushed to 0), so the quotient is exact where the larger weighted
// term is at least 2^-100 (2^-967 in double), which the kernels check per chunk
// (mixture_from_probabilities_exact). One log, one division, and an exp or a second division.
template <typename Math, bool kFromProbabilities, typename acc_t>
KD_HD Mixture<acc_t> mixture(acc_t lp, acc_t lq, acc_t p, acc_t q, const DivergenceParams<acc_t>& prm) {
  const bool teacher_term_larger = lp + prm.log_weight >= lq + prm.log_complement;
  acc_t ratio;
  if constexpr (kFromProbabilities) {
    ratio = (teacher_term_larger ? q : p) / (teacher_term_larger ? p : q);
  } else {
    constexpr acc_t kMax = std::numeric_limits<acc_t>::max();
    const acc_t d = lq - lp;
    const acc_t exp_d = Math::exp(teacher_term_larger ? d : -d);
    ratio = exp_d < kMax ? exp_d : kMax;
  }
  const acc_t factor = teacher_term_larger ? prm.weight + prm.complement * ratio : prm.weight * ratio + prm.complement;
  return {(teacher_term_larger ? lp : lq) + Math::log(factor), (teacher_term_larger ? ratio : acc_t(1)) / factor};
}

// Whether the larger weighted term w * p or (1 - w) * q is at least 2^-100 (2^-967) at every entry
// of a chunk whose smallest log p and log q are min_lp and min_lq.
template <typename acc_t>
KD_HD bool mixture_from_probabilities_exact(acc_t min_lp, acc_t min_lq, const DivergenceParams<acc_t>& prm) {
  constexpr acc_t kLogFloor =
      (std::numeric_limits<acc_t>::min_exponent + std::numeric_limits<acc_t>::digits + 1) * 0.6931471805599453;
  return min_lp + prm.log_weight >= kLogFloor || min_lq + prm.log_complement >= kLogFloor;
}

// The divergences built on the mixture (JSD, skew KL, skew reverse KL) take kFromProbabilities in
// terms(), for mixture().
struct MixtureDivergence {};
template <typename Div>
constexpr bool kMixes = std::is_base_of_v<MixtureDivergence, Div>;

// Div's terms, a mixture divergence's with kFromProbabilities.
template <typename Div, typename Math, bool kFromProbabilities, typename acc_t>
KD_HD Terms<acc_t> divergence_terms(acc_t lp, acc_t lq, acc_t p, acc_t q, const DivergenceParams<acc_t>& prm) {
  if constexpr (kMixes<Div>) {
    return Div::template terms<Math, kFromProbabilities>(lp, lq, p, q, prm);
  } else {
    return Div::template terms<Math>(lp, lq, p, q, prm);
  }
}

// 1 / (k + 1)! for k < kTerms, the coefficients of exp_ratio_series.
template <typename acc_t, int kTerms>
struct InverseFactorials {
  acc_t value[kTerms];
  constexpr InverseFactorials() : value{} {
    double inverse = 1;
    for (int k = 0; k < kTerms; ++k) value[k] = static_cast<acc_t>(inverse /= k + 1);
  }
};

// Series of the divided differences of exp (AlphaBeta), for arguments below 1/2 in magnitude,
// truncated below the rounding error of acc_t (the first term left out is 2^-kTerms / (kTerms + 1)!).
// (e^d - 1) / d = sum_k d^k / (k + 1)!, which is exp[x, x + d] / e^x.
template <typename acc_t>
KD_HD acc_t exp_ratio_series(acc_t d) {
  constexpr int kTerms = sizeof(acc_t) == 8 ? 16 : 8;
  constexpr InverseFactorials<acc_t, kTerms> kCoefficients{};
  acc_t series = kCoefficients.value[kTerms - 1];
  KD_UNROLL
  for (int k = kTerms - 2; k >= 0; --k) series = series * d + kCoefficients.value[k];
  return series;
}

// Generalised JSD: beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta * p + (1 - beta) * q.
// df/dq = (1 - beta) * log(q / m) and df/dp = beta * log(p / m).
struct JSD : MixtureDivergence {
  static constexpr Divergence kId = Divergence::kJSD;
  static constexpr bool kSumsFromStats = false;
  template <typename Math, bool kFromProbabilities = false, typename acc_t>
  static KD_HD Terms<acc_t> terms(acc_t lp, acc_t lq, acc_t p, acc_t q, const DivergenceParams<acc_t>& prm) {
    const acc_t log_m = mixture<Math, kFromProbabilities>(lp, lq, p, q, prm).log_m;
    const acc_t d_teacher = prm.weight * p * (lp - log_m);
    const acc_t d_student = prm.complement * q * (lq - log_m);
    return {d_teacher + d_student, d_student, d_teacher};
  }
};

// Skew KL (DistiLLM): KL(p || m), m = w * p + (1 - w) * q with w = skew; w = 0 is forward KL.
// q df/dq = -(1 - w) p q / m and p df/dp = f + p - w p^2 / m = f + (1 - w) p q / m, the form
// without cancellation as w nears 1.
struct SkewKL : MixtureDivergence {
  static constexpr Divergence kId = Divergence::kSkewKL;
  static constexpr bool kSumsFromStats = false;
  template <typename Math, bool kFromProbabilities = false, typename acc_t>
  static KD_HD Terms<acc_t> terms(acc_t lp, acc_t lq, acc_t p, acc_t q, const DivergenceParams<acc_t>& prm) {
    const Mixture<acc_t> m = mixture<Math, kFromProbabilities>(lp, lq, p, q, prm);
    const acc_t value = p * (lp - m.log_m), d_student = -prm.complement * p * m.q_over_m;
    return {value, d_student, value - d_student};
  }
};

// Skew reverse KL: KL(q || m), m = (1 - skew) * p + skew * q; SkewKL with the roles swapped
// (make_divergence_params prepares the weight of p, w = 1 - skew).
struct SkewReverseKL : MixtureDivergence {
  static constexpr Divergence kId = Divergence::kSkewReverseKL;
  static constexpr bool kSumsFromStats = false;
  template <typename Math, bool kFromProbabilities = false, typename acc_t>
  static KD_HD Terms<acc_t> terms(acc_t lp, acc_t lq, acc_t p, acc_t q, const DivergenceParams<acc_t>& prm) {
    const DivergenceParams<acc_t> swapped{prm.complement, prm.weight, prm.log_complement, prm.log_weight, {}, 0};
    const Terms<acc_t> t = SkewKL::terms<Math, kFromProbabilities>(lq, lp, q, p, swapped);
    return {t.value, t.d_teacher, t.d_student};
  }
};

// Total variation distance: f = |p - q| / 2, with subgradient 0 where p == q.
struct TVD {
  static constexpr Divergence kId = Divergence::kTVD;
  static constexpr bool kSumsFromStats = false;
  template <typename Math, typename acc_t>
  static KD_HD Terms<acc_t> terms(acc_t, acc_t, acc_t p, acc_t q, const DivergenceParams<acc_t>&) {
    const acc_t half_sign = p > q ? acc_t(0.5) : (p < q ? acc_t(-0.5) : acc_t(0));
    return {half_sign * (p - q), -half_sign * q, half_sign * p};
  }
};

// Alpha-beta divergence (ABKD): with g = alpha + beta,
//   f = -1 / (alpha beta) * (p^alpha q^beta - alpha / g * p^g - beta / g * q^g),
// and its limits where alpha, beta or g is 0. With u = log p - log q and the nodes
// x_q = g log q, m = alpha log p + beta log q = x_q + alpha u, x_p = g log p = x_q + g u, the
// divided differences of exp give
//   f = u^2 exp[x_q, m, x_p],  p df/dp = u exp[m, x_p],  q df/dq = -u exp[x_q, m],
// one formula continuous in (alpha, beta) across every special case: (1, 0) is forward KL,
// (0, 1) reverse KL, (0, 0) half the squared log-ratio. With the nodes ordered by c, each
// adjacent pair's G = u exp[a, b] is (e^b - e^a) / (c_b - c_a), or where |(c_b - c_a) u| < 1/2 a
// Taylor series in place of that difference (no division by u); the outer pair's G is their
// average weighted by the gaps, with no cancellation. f is the difference of the two adjacent G
// over the spread of c, or where the nodes lie within 1/2 its series:
// exp[x, x + y1, x + y2] / e^x = sum_k h_k(y1, y2) / (k + 2)! with h_k the complete homogeneous
// polynomials, and as y1 = r y2 with r fixed per call, h_k(y1, y2) = y2^k h_k(r, 1): a polynomial
// in y2 = spread * u with coefficients prepared on the host (near). Three exps and no division
// per entry.
struct AlphaBeta {
  static constexpr Divergence kId = Divergence::kAlphaBeta;
  static constexpr bool kSumsFromStats = false;
  template <typename acc_t>
  static KD_HD acc_t g_pair(acc_t u, acc_t gap, acc_t inv_gap, acc_t e_a, acc_t e_b) {  // u exp[a, b]
    const acc_t d = gap * u;
    return d < acc_t(0.5) && d > acc_t(-0.5) ? u * e_a * exp_ratio_series(d) : (e_b - e_a) * inv_gap;
  }
  template <typename Math, typename acc_t>
  static KD_HD Terms<acc_t> terms(acc_t lp, acc_t lq, acc_t, acc_t, const DivergenceParams<acc_t>& prm) {
    const AlphaBetaParams<acc_t>& ab = prm.ab;
    const auto node_exp = [&](int k) { return Math::exp(ab.node_teacher[k] * lp + ab.node_student[k] * lq); };
    const acc_t u = lp - lq, e_low = node_exp(0), e_middle = node_exp(1), e_high = node_exp(2);
    const acc_t g_low = g_pair(u, ab.gap[0], ab.inv_gap[0], e_low, e_middle);
    const acc_t g_high = g_pair(u, ab.gap[1], ab.inv_gap[1], e_middle, e_high);
    const acc_t spread_u = ab.spread * u;
    acc_t series = ab.near[kNearTerms<acc_t> - 1];
    KD_UNROLL
    for (int k = kNearTerms<acc_t> - 2; k >= 0; --k) series = series * spread_u + ab.near[k];
    const acc_t value = spread_u < acc_t(0.5) && spread_u > acc_t(-0.5) ? u * u * e_low * series
                                                                        : (g_high - g_low) * ab.inv_spread;
    return {value, -(ab.to_qm[0] * g_low + ab.to_qm[1] * g_high), ab.to_mp[0] * g_low + ab.to_mp[1] * g_high};
  }
};

// Adaptive KL (Wu et al., 2025): w * KL(p || q) + (1 - w) * KL(q || p), where the kernel sets
// w = g_head / (g_head + g_tail) per row (treated as a constant, as the authors detach it) from
// g = sum |p - q| over the head (the largest p whose cumulative mass is <= mu, ties together,
// the top value always in) and over the tail; w = 1/2 where p == q everywhere.
struct AdaptiveKL {
  static constexpr Divergence kId = Divergence::kAdaptiveKL;
  static constexpr bool kSumsFromStats = true;
  template <typename Math, typename acc_t>
  static KD_HD Terms<acc_t> terms(acc_t lp, acc_t lq, acc_t p, acc_t q, const DivergenceParams<acc_t>& prm) {
    return mix(ForwardKL::terms<Math>(lp, lq, p, q, prm), ReverseKL::terms<Math>(lp, lq, p, q, prm), prm);
  }
  template <typename acc_t>
  static KD_HD Terms<acc_t> row_sums(const SupportStats<acc_t>& s, const DivergenceParams<acc_t>& prm) {
    return mix(ForwardKL::row_sums(s, prm), ReverseKL::row_sums(s, prm), prm);
  }
  template <typename acc_t>
  static KD_HD Terms<acc_t> mix(const Terms<acc_t>& forward, const Terms<acc_t>& reverse,
                                const DivergenceParams<acc_t>& prm) {
    return {prm.weight * forward.value + prm.complement * reverse.value,
            prm.weight * forward.d_student + prm.complement * reverse.d_student,
            prm.weight * forward.d_teacher + prm.complement * reverse.d_teacher};
  }
};

// Calls fn(Div{}) with the divergence type named by `divergence`; returns false if unknown.
template <typename Fn>
inline bool dispatch_divergence(Divergence divergence, Fn&& fn) {
  switch (divergence) {
    case Divergence::kForwardKL: fn(ForwardKL{}); return true;
    case Divergence::kReverseKL: fn(ReverseKL{}); return true;
    case Divergence::kJSD: fn(JSD{}); return true;
    case Divergence::kSkewKL: fn(SkewKL{}); return true;
    case Divergence::kSkewReverseKL: fn(SkewReverseKL{}); return true;
    case Divergence::kTVD: fn(TVD{}); return true;
    case Divergence::kAlphaBeta: fn(AlphaBeta{}); return true;
#if !defined(__CUDACC__)  // the CUDA kernel has no head search; Triton runs adaptive KL on the GPU
    case Divergence::kAdaptiveKL: fn(AdaptiveKL{}); return true;
#else
    case Divergence::kAdaptiveKL: return false;
#endif
  }
  return false;
}

// The AB constants: the nodes ordered by their coefficient c, the gaps and their inverses, the
// adjacent pairs' weights in the two G of the gradient, and the near series' coefficients
// h_k(r, 1) / (k + 2)! = (1 + r + ... + r^k) / (k + 2)!, r = gap[0] / spread (0 where the nodes
// coincide).
template <typename acc_t>
AlphaBetaParams<acc_t> make_alpha_beta_params(double alpha, double beta) {
  enum Node { kQ = 0, kM = 1, kP = 2 };
  // Node = c log p + student log q, with student written out rather than g - c, which would not
  // give beta exactly.
  const double c[3] = {0.0, alpha, alpha + beta}, student[3] = {alpha + beta, beta, 0.0};
  int order[3] = {kQ, kM, kP};
  std::sort(order, order + 3, [&](int x, int y) { return c[x] < c[y]; });
  const auto inverse = [](double x) { return static_cast<acc_t>(1.0 / x); };  // inf for 0
  const double gap[2] = {c[order[1]] - c[order[0]], c[order[2]] - c[order[1]]}, spread = gap[0] + gap[1];
  const double ratio = spread > 0 ? gap[0] / spread : 0.0;
  AlphaBetaParams<acc_t> params{};
  for (int k = 0; k < 3; ++k) {
    params.node_teacher[k] = static_cast<acc_t>(c[order[k]]);
    params.node_student[k] = static_cast<acc_t>(student[order[k]]);
  }
  for (int k = 0; k < 2; ++k) {
    params.gap[k] = static_cast<acc_t>(gap[k]);
    params.inv_gap[k] = inverse(gap[k]);
  }
  params.spread = static_cast<acc_t>(spread);
  params.inv_spread = inverse(spread);
  const auto set_pair_weights = [&](Node x, Node y, acc_t* weights) {
    const auto rank = [&](Node node) { return static_cast<int>(std::find(order, order + 3, node) - order); };
    const int low = std::min(rank(x), rank(y)), high = std::max(rank(x), rank(y));
    weights[0] = static_cast<acc_t>(high == 1 ? 1.0 : low == 1 ? 0.0 : ratio);
    weights[1] = static_cast<acc_t>(high == 1 ? 0.0 : low == 1 ? 1.0 : 1.0 - ratio);
  };
  set_pair_weights(kQ, kM, params.to_qm);
  set_pair_weights(kM, kP, params.to_mp);
  double h = 0, ratio_power = 1, inverse_factorial = 1;
  for (int k = 0; k < kNearTerms<acc_t>; ++k, ratio_power *= ratio) {
    h += ratio_power;
    inverse_factorial /= k + 2;
    params.near[k] = static_cast<acc_t>(h * inverse_factorial);
  }
  return params;
}

// The constants of a divergence from its keyword arguments, in the order of kdkernels/ops/
// kd_loss.py (DIVERGENCES): JSD (beta), skew KL and skew reverse KL (skew), AB (alpha, beta),
// adaptive KL (mu).
// Computed in double on the host, so that log w is exact for any w.
template <typename acc_t>
DivergenceParams<acc_t> make_divergence_params(Divergence divergence, const std::vector<double>& args) {
  const double first = args.size() > 0 ? args[0] : 0.0, second = args.size() > 1 ? args[1] : 0.0;
  double weight = 0, complement = 1;
  if (divergence == Divergence::kJSD || divergence == Divergence::kSkewKL) {
    weight = first;
    complement = 1.0 - first;
  } else if (divergence == Divergence::kSkewReverseKL) {
    weight = 1.0 - first;
    complement = first;
  }
  const auto flush = [](double w) { return w < std::numeric_limits<acc_t>::min() ? 0.0 : w; };
  weight = flush(weight);
  complement = flush(complement);
  const bool ab = divergence == Divergence::kAlphaBeta;
  return {static_cast<acc_t>(weight), static_cast<acc_t>(complement), static_cast<acc_t>(std::log(weight)),
          static_cast<acc_t>(std::log(complement)), make_alpha_beta_params<acc_t>(ab ? first : 0.0, ab ? second : 0.0),
          static_cast<acc_t>(divergence == Divergence::kAdaptiveKL ? first : 0.0)};
}

}  // namespace kdkernels

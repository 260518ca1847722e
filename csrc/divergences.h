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
// and provides row_sums(); the kernels then skip the reduction read.
//
// Adding a divergence: a struct with terms() (and row_sums() if kSumsFromStats), an enum
// value, and a case in dispatch_divergence(). Math supplies exp and log for the backend.
#pragma once

#if defined(__CUDACC__)
#define KD_HD __host__ __device__ __forceinline__
#else
#define KD_HD inline
#endif

namespace kdkernels {

enum class Divergence : int { kForwardKL = 0, kReverseKL = 1, kJSD = 2 };

template <typename acc_t>
struct DivergenceParams {
  acc_t beta;  // JSD mixture weight of the teacher
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
  static constexpr bool kSumsFromStats = true;
  template <typename Math, typename acc_t>
  static KD_HD Terms<acc_t> terms(acc_t lp, acc_t lq, acc_t p, acc_t q, const DivergenceParams<acc_t>&) {
    const acc_t value = p * (lp - lq);
    return {value, -p, value + p};
  }
  template <typename acc_t>
  static KD_HD Terms<acc_t> row_sums(const SupportStats<acc_t>& s) {
    const acc_t value = s.teacher_logratio + (s.lse_student - s.lse_teacher) * s.teacher_mass;
    return {value, -s.teacher_mass, value + s.teacher_mass};
  }
};

struct ReverseKL {  // KL(q || p)
  static constexpr bool kSumsFromStats = true;
  template <typename Math, typename acc_t>
  static KD_HD Terms<acc_t> terms(acc_t lp, acc_t lq, acc_t p, acc_t q, const DivergenceParams<acc_t>&) {
    const acc_t value = q * (lq - lp);
    return {value, value + q, -q};
  }
  template <typename acc_t>
  static KD_HD Terms<acc_t> row_sums(const SupportStats<acc_t>& s) {
    const acc_t value = s.student_logratio + (s.lse_teacher - s.lse_student) * s.student_mass;
    return {value, value + s.student_mass, -s.student_mass};
  }
};

// Generalised JSD: beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta * p + (1 - beta) * q.
// df/dq = (1 - beta) * log(q / m) and df/dp = beta * log(p / m).
struct JSD {
  static constexpr bool kSumsFromStats = false;
  template <typename Math, typename acc_t>
  static KD_HD Terms<acc_t> terms(acc_t lp, acc_t lq, acc_t p, acc_t q, const DivergenceParams<acc_t>& prm) {
    // log m as a log-sum-exp of (lp + log beta, lq + log(1 - beta)): one exp and one log,
    // exact where p or q underflows.
    const acc_t beta = prm.beta;
    const acc_t diff = lq - lp;
    const bool teacher_larger = diff <= acc_t(0);
    const acc_t small = Math::exp(teacher_larger ? diff : -diff);
    const acc_t log_m = (teacher_larger ? lp : lq) +
        Math::log(teacher_larger ? beta + (acc_t(1) - beta) * small : beta * small + (acc_t(1) - beta));
    const acc_t d_teacher = beta * p * (lp - log_m);
    const acc_t d_student = (acc_t(1) - beta) * q * (lq - log_m);
    return {d_teacher + d_student, d_student, d_teacher};
  }
};

// Calls fn(Div{}) with the divergence type named by `divergence`; returns false if unknown.
template <typename Fn>
inline bool dispatch_divergence(Divergence divergence, Fn&& fn) {
  switch (divergence) {
    case Divergence::kForwardKL: fn(ForwardKL{}); return true;
    case Divergence::kReverseKL: fn(ReverseKL{}); return true;
    case Divergence::kJSD: fn(JSD{}); return true;
  }
  return false;
}

}  // namespace kdkernels

// CPU kernel of kd_loss, included by the kd_loss_cpu_part*.cpp files that instantiate it. Rows
// are spread over threads with at::parallel_for; each row is read in chunks small enough for L1,
// converted to the accumulation type once per read.
//   read 1: online (max, sum) statistics of student/T, teacher/T and, for the CE term at
//           T != 1, student (at T = 2 or 4 from the kept exps of student/T); for kSumsFromStats
//           divergences also the support sums; and the exps that read 2 and read 3 take from
//           the row cache (RowCache).
//   read 2: for divergences without kSumsFromStats, for all with standardize, and for rows
//           whose anchors do not hold (anchors_hold): row sums of the divergence terms; for
//           adaptive KL, the head search (set_adaptive_weights: a read of both rows and one or
//           two of the teacher) that weights its two KL terms.
//   read 3: the gradients (skipped when no gradient is wanted), from the kept exps, or after
//           a read 2 from the terms and probabilities that it kept (kCachesTerms).
// The inner loops are plain element loops that the compiler vectorises (omp simd); the
// kernel is cloned per x86 ISA level and picked at load time.
#pragma once

#include "../divergences.h"
#include "../row_status.h"
#include "cpu_common.h"
#include "kd_loss_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace kdkernels {
namespace cpu {

template <typename scalar_t, typename acc_t>
struct RowArgs {
  const scalar_t* student;
  const scalar_t* teacher;
  int64_t student_stride, teacher_stride;
  const int64_t* target;  // nullptr without target
  acc_t* loss;
  scalar_t* grad_student;  // [N, V] contiguous, or nullptr
  scalar_t* grad_teacher;
  int8_t* status;
  int64_t vocab, ignore_index;
  acc_t inv_temperature, soft_weight, hard_weight;
  bool unit_temperature;
  int ce_squarings;  // k where T = 2^k, k = 1 or 2 (the CE term's exps are the soft exps squared k times); else 0
  acc_t softcap;    // the soft term sees softcap * tanh(x / softcap); 0: off
  acc_t cap_scale;  // 1 / (softcap / T), so that tanh(x / softcap) = a * cap_scale; 0: off
  bool standardize;  // the soft term sees (x - mean) / (std + 1e-7) of each row (not with softcap)
  DivergenceParams<acc_t> params;
};

// The soft term's view of one input's row: a = (x - center) * scale, then softcap if set. center
// = 0 and scale = 1 / T, or with standardize the row's mean and 1 / (T (std + 1e-7)); `coupling`
// is the standardize gradient's term through the mean and std (set after the row sums).
template <typename acc_t>
struct SoftView {
  acc_t center, scale, count, std, coupling;
  KD_INLINE acc_t soft(acc_t x) const { return (x - center) * scale; }
};

// A vocab-parallel stage (process_shard_row): norms holds each row's whole-vocabulary
// log-normalisers of student/T, teacher/T and the raw student as (max, log_sum) pairs
// (kShardStatsWidth per row, stages kShardSums and kShardGradient), sums the whole row's
// divergence term sums (kShardSumsWidth per row, stage kShardGradient); out receives the
// stage's per-row output (kShardStats: the slice's (max, sum of exp(x - max)) pairs;
// kShardSums: the slice's term sums and raw target logit).
template <typename acc_t>
struct ShardArgs {
  int stage;
  const acc_t* norms;
  const acc_t* sums;
  acc_t* out;
};

// The soft term's view of n logits: x / T, or softcap * tanh(x / softcap) / T (values that are not
// finite pass through, so that -inf stays masked and NaN or +inf are still found).
template <typename scalar_t, typename acc_t>
KD_INLINE void load_soft(const RowArgs<scalar_t, acc_t>& args, const SoftView<acc_t>& view, const scalar_t* src,
                         int64_t n, acc_t* dst) {
  using Math = MathFor<acc_t>;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = view.soft(static_cast<acc_t>(src[i]));
  if (args.softcap == 0) return;
  const acc_t inv_cap = acc_t(1) / args.softcap, cap_over_t = args.softcap * args.inv_temperature;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const acc_t x = static_cast<acc_t>(src[i]);
    const bool finite = x <= std::numeric_limits<acc_t>::max() && x >= -std::numeric_limits<acc_t>::max();
    dst[i] = finite ? cap_over_t * Math::tanh(x * inv_cap) : dst[i];
  }
}

// d(softcap * tanh(x / softcap)) / dx = 1 - tanh^2, from the soft value a; 1 without softcap, 0
// at masked entries.
template <typename acc_t>
KD_INLINE acc_t softcap_slope(acc_t a, acc_t cap_scale) {
  const acc_t t = a * cap_scale;
  return t * t < acc_t(1) ? acc_t(1) - t * t : acc_t(0);
}

// Both inputs' exp sums plus the support sums (entries finite in both): mass and
// mass-weighted log-ratio of anchored values for each side (SupportStats); with kKeep, also
// keeps the exps of a and b in kept[i] and kept[kChunk + i].
template <bool kKeep, typename acc_t>
KD_INLINE void accumulate_exp_with_support(const acc_t* a, const acc_t* b, int64_t n, acc_t max_a,
                                           acc_t max_b, acc_t anchor_a, acc_t anchor_b,
                                           OnlineSide<acc_t>& side_a, OnlineSide<acc_t>& side_b, acc_t* kept) {
  using Math = MathFor<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const acc_t off_a = exp_offset(max_a), off_b = exp_offset(max_b);
  acc_t sum_a = 0, sum_b = 0, mass_a = 0, mass_b = 0, lr_a = 0, lr_b = 0;
#pragma omp simd reduction(+ : sum_a, sum_b, mass_a, mass_b, lr_a, lr_b)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t ea = Math::exp(a[i] - off_a), eb = Math::exp(b[i] - off_b);
    if constexpr (kKeep) {
      kept[i] = ea;
      kept[kChunk + i] = eb;
    }
    const bool shared = (a[i] > kNegInf) & (b[i] > kNegInf);
    const acc_t diff = shared ? (a[i] - anchor_a) - (b[i] - anchor_b) : acc_t(0);
    sum_a += ea;
    sum_b += eb;
    mass_a += shared ? ea : acc_t(0);
    mass_b += shared ? eb : acc_t(0);
    lr_a += ea * diff;
    lr_b -= eb * diff;
  }
  side_a.merge(max_a, sum_a, mass_a, lr_a);
  side_b.merge(max_b, sum_b, mass_b, lr_b);
}

// At T = 2^kSquarings (x / T exact), the CE term's exps of a chunk, exp(x - T m) with m its max of
// x / T, from the kept soft exps exp(x / T - m): each squared kSquarings times (within 2^kSquarings
// ulp, far cheaper than a read and an exp of their own) and flushed to 0 below the smallest normal
// as exp flushes; with `kept`, also kept there. Returns the chunk's CE max, T m.
template <int kSquarings, typename acc_t>
KD_INLINE acc_t accumulate_exp_powers(const acc_t* soft_exps, int64_t n, acc_t soft_max, OnlineSide<acc_t>& side,
                                      acc_t* kept) {
  const acc_t sum = sum_keeping(n, kept, [soft_exps](int64_t i) __attribute__((always_inline)) {
    acc_t e = soft_exps[i];
    for (int k = 0; k < kSquarings; ++k) e *= e;
    return e < std::numeric_limits<acc_t>::min() ? acc_t(0) : e;
  });
  const acc_t max = soft_max * acc_t(1 << kSquarings);
  side.merge(max, sum, 0, 0);
  return max;
}

// The anchor of a row (SupportStats): the max of the soft values of its first kAnchorEntries
// entries, or 0 if they are all -inf.
template <typename scalar_t, typename acc_t>
KD_INLINE acc_t row_anchor(const RowArgs<scalar_t, acc_t>& args, const SoftView<acc_t>& view, const scalar_t* x) {
  acc_t head[kAnchorEntries];
  const int64_t n = std::min<int64_t>(args.vocab, kAnchorEntries);
  load_soft(args, view, x, n, head);
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < n; ++j) m = head[j] > m ? head[j] : m;
  return exp_offset(m);
}

// The standardize view of a row x: mean and unbiased std over its finite entries (each chunk's
// two-pass moments merged by Chan's formula), std = 0 below two entries. One read of the row.
template <typename scalar_t, typename acc_t>
KD_INLINE SoftView<acc_t> standardized_view(const RowArgs<scalar_t, acc_t>& args, const scalar_t* x, acc_t* buffer) {
  constexpr acc_t kMax = std::numeric_limits<acc_t>::max();
  acc_t count = 0, mean = 0, m2 = 0;
  for (int64_t j0 = 0; j0 < args.vocab; j0 += kChunk) {
    const int64_t n = std::min(kChunk, args.vocab - j0);
    load_scaled(x + j0, n, acc_t(1), buffer);
    acc_t chunk_count = 0, sum = 0;
#pragma omp simd reduction(+ : chunk_count, sum)
    for (int64_t i = 0; i < n; ++i) {
      const bool finite = buffer[i] <= kMax && buffer[i] >= -kMax;
      chunk_count += finite ? acc_t(1) : acc_t(0);
      sum += finite ? buffer[i] : acc_t(0);
    }
    if (chunk_count == 0) continue;
    const acc_t chunk_mean = sum / chunk_count;
    acc_t chunk_m2 = 0;
#pragma omp simd reduction(+ : chunk_m2)
    for (int64_t i = 0; i < n; ++i) {
      const acc_t d = buffer[i] <= kMax && buffer[i] >= -kMax ? buffer[i] - chunk_mean : acc_t(0);
      chunk_m2 += d * d;
    }
    const acc_t total = count + chunk_count, delta = chunk_mean - mean;
    mean += delta * (chunk_count / total);
    m2 += chunk_m2 + delta * delta * (count * chunk_count / total);
    count = total;
  }
  const acc_t std = count > 1 ? std::sqrt(m2 / (count - 1)) : acc_t(0);
  return {mean, args.inv_temperature / (std + acc_t(1e-7)), count, std, 0};
}

template <typename scalar_t, typename acc_t>
KD_INLINE void zero_gradients(const RowArgs<scalar_t, acc_t>& args, int64_t row) {
  if (args.grad_student) std::fill_n(args.grad_student + row * args.vocab, args.vocab, scalar_t(0));
  if (args.grad_teacher) std::fill_n(args.grad_teacher + row * args.vocab, args.vocab, scalar_t(0));
}

template <typename scalar_t, typename acc_t>
KD_INLINE void finish_without_loss(const RowArgs<scalar_t, acc_t>& args, int64_t row, RowStatus status) {
  args.status[row] = status;
  args.loss[row] = 0;
  zero_gradients(args, row);
}

constexpr int kHeadBuckets = 2048;
constexpr double kHeadSearchRange = 40;  // the first pass buckets [max - 40, max]; below is one bucket

// Teacher mass and |p - q| (over entries finite in both) of the candidates of one head-search
// pass, by bucket of the teacher value b; from the second pass on, also each bucket's min and max b.
template <typename acc_t>
struct HeadBuckets {
  acc_t mass[kHeadBuckets], error[kHeadBuckets], low[kHeadBuckets], high[kHeadBuckets];

  void clear() {
    std::fill_n(mass, kHeadBuckets, acc_t(0));
    std::fill_n(error, kHeadBuckets, acc_t(0));
    std::fill_n(low, kHeadBuckets, std::numeric_limits<acc_t>::infinity());
    std::fill_n(high, kHeadBuckets, -std::numeric_limits<acc_t>::infinity());
  }
  // The bucket where the teacher mass from the top bucket down passes mu (-1 if none), adding
  // the mass above it to `above` and the errors above and below it to head and tail (with -1,
  // every bucket's error to head).
  int crossing(acc_t mu, acc_t& above, acc_t& head, acc_t& tail) const {
    int k = kHeadBuckets - 1;
    for (; k >= 0 && !(above + mass[k] > mu); --k) {
      above += mass[k];
      head += error[k];
    }
    for (int j = 0; j < k; ++j) tail += error[j];
    return k;
  }
};

template <typename acc_t>
KD_INLINE int32_t head_bucket(acc_t b, acc_t map_lo, acc_t span) {
  return static_cast<int32_t>(std::min(std::max((b - map_lo) / span * kHeadBuckets, acc_t(0)),
                                       acc_t(kHeadBuckets - 1)));
}

// Adaptive KL's per-row weights g_head / (g_head + g_tail) and g_tail / (g_head + g_tail), with
// g = sum |p - q| over the head (the largest teacher values whose cumulative probability is
// <= mu, a tie group that would pass mu is tail, the top value always head) and the tail; 1/2
// each where p == q everywhere. The head is found without sorting: each pass buckets the
// candidate teacher values by value, with the mass and the error of each bucket; the bucket
// where the cumulative mass from the top passes mu holds the cut, and its values are the next
// pass's candidates, until they are one value. Buckets are monotone in b, so a pass keeps
// exactly one bucket's entries. Pass 1 reads both rows (every p, q); pass 2 keeps the entries of
// pass 1's bucket (same mapping), later passes those within [min, max] of the previous bucket,
// and compute p and q for their few candidates only. The first range is 40 wide (all the mass
// of a row lies within 40 of its max at any V below 2^40): the cut is found in 2 or 3 passes.
template <typename scalar_t, typename acc_t>
KD_INLINE void set_adaptive_weights(const RowArgs<scalar_t, acc_t>& args, const SoftView<acc_t>& view_a,
                                    const SoftView<acc_t>& view_b, const scalar_t* student, const scalar_t* teacher,
                                    const LogNormaliser<acc_t>& norm_a, const LogNormaliser<acc_t>& norm_b,
                                    DivergenceParams<acc_t>& params, acc_t* a, acc_t* b, acc_t* c) {
  using Math = MathFor<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const acc_t mu = args.params.head_mass, top = norm_b.max;
  HeadBuckets<acc_t> buckets;
  int32_t bucket[kChunk];
  const auto error_of = [&](acc_t x, acc_t y) {  // |p - q| of student value x and teacher value y
    const acc_t gap = Math::exp(norm_b.log_prob(y)) - Math::exp(norm_a.log_prob(x));
    return (x > kNegInf) & (y > kNegInf) ? (gap < 0 ? -gap : gap) : acc_t(0);
  };

  // Pass 1: every finite teacher value, over [first_lo, top] (a logit range wider than 40 where
  // 40 is below the spacing of the values).
  const acc_t first_lo = top - std::max(acc_t(kHeadSearchRange), std::abs(top) * acc_t(1e-3));
  const acc_t first_span = top - first_lo;
  buckets.clear();
  for (int64_t j0 = 0; j0 < args.vocab; j0 += kChunk) {
    const int64_t n = std::min(kChunk, args.vocab - j0);
    load_soft(args, view_a, student + j0, n, a);
    load_soft(args, view_b, teacher + j0, n, b);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      c[i] = error_of(a[i], b[i]);
      a[i] = Math::exp(norm_b.log_prob(b[i]));
      bucket[i] = b[i] > kNegInf ? head_bucket(b[i], first_lo, first_span) : -1;
    }
    for (int64_t i = 0; i < n; ++i) {
      const int32_t k = bucket[i];
      if (k < 0) continue;
      buckets.mass[k] += a[i];
      buckets.error[k] += c[i];
    }
  }
  acc_t above = 0, g_head = 0, g_tail = 0;
  // first < 0: every finite entry fits (possible only through rounding); crossing() has
  // counted all their errors as head.
  const int first = buckets.crossing(mu, above, g_head, g_tail);
  // Later passes: the candidates, and the range their buckets split.
  acc_t lo = 0, hi = 0, map_lo = first_lo + first_span * first / kHeadBuckets, span = first_span / kHeadBuckets;
  for (int pass = 2; first >= 0; ++pass) {
    buckets.clear();
    for (int64_t j0 = 0; j0 < args.vocab; j0 += kChunk) {
      const int64_t n = std::min(kChunk, args.vocab - j0);
      load_soft(args, view_b, teacher + j0, n, b);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const bool candidate = pass == 2 ? (b[i] > kNegInf) & (head_bucket(b[i], first_lo, first_span) == first)
                                         : (b[i] >= lo) & (b[i] <= hi);
        bucket[i] = candidate ? head_bucket(b[i], map_lo, span) : -1;
      }
      for (int64_t i = 0; i < n; ++i) {
        const int32_t k = bucket[i];
        if (k < 0) continue;
        acc_t x;
        load_soft(args, view_a, student + j0 + i, 1, &x);
        buckets.mass[k] += Math::exp(norm_b.log_prob(b[i]));
        buckets.error[k] += error_of(x, b[i]);
        buckets.low[k] = std::min(buckets.low[k], b[i]);
        buckets.high[k] = std::max(buckets.high[k], b[i]);
      }
    }
    const int k = buckets.crossing(mu, above, g_head, g_tail);
    if (k < 0) break;  // every candidate fits, and is counted as head
    if (buckets.low[k] == buckets.high[k]) {  // one value: a tie group, head only if it is the top
      (buckets.low[k] == top ? g_head : g_tail) += buckets.error[k];
      break;
    }
    lo = map_lo = buckets.low[k];
    hi = buckets.high[k];
    span = hi - lo;
  }
  const acc_t total = g_head + g_tail;
  params.weight = total > 0 ? g_head / total : acc_t(0.5);
  params.complement = total > 0 ? g_tail / total : acc_t(0.5);
}

// The row sums of the divergence terms and, with standardize, the moments its gradient needs:
// sum d_student * a and sum q * a over the student's finite entries, the same for the teacher.
template <typename acc_t>
struct RowSums : Terms<acc_t> {
  acc_t student_moment = 0, student_mean = 0, teacher_moment = 0, teacher_mean = 0;
  RowSums() : Terms<acc_t>{0, 0, 0} {}
  RowSums(const Terms<acc_t>& t) : Terms<acc_t>(t) {}  // NOLINT(runtime/explicit)
  RowSums& operator+=(const RowSums& other) {
    this->value += other.value;
    this->d_student += other.d_student;
    this->d_teacher += other.d_teacher;
    student_moment += other.student_moment;
    student_mean += other.student_mean;
    teacher_moment += other.teacher_moment;
    teacher_mean += other.teacher_mean;
    return *this;
  }
};

// The row cache, per thread and chunk-major. Read 1 keeps each chunk's exps of student/T and
// teacher/T (exp(x - chunk max)) with the chunk maxima, and read 2 and read 3 scale them into q
// and p rather than computing exps again; with gradients, read 1 also keeps the exps of the raw
// student for the CE term at T != 1. For the divergences with a read 2 (kCachesTerms: all but
// forward and reverse KL and adaptive KL), read 2 also keeps what read 3 needs when gradients are
// wanted: each entry's d_student and q (kStudentTerms: only the student's gradient is wanted) and
// also d_teacher and p (kAllTerms); read 3 then computes no terms and, without softcap or
// standardize, reads no logits. The slots of a chunk's block, kChunk floats each (kSlot* offsets):
//   kExpsOnly:     q, p, ce
//   kStudentTerms: q, p then d_student, ce
//   kAllTerms:     q, p, d_student, d_teacher, ce
// then three chunk maxima (student/T, teacher/T, raw student) per chunk after the blocks. Up to
// 5 V floats per thread (2.5 MiB at V = 128k), within L2 or L3 for the vocabularies of today's
// models. kUncached: nothing reads the exps (forward and reverse KL or adaptive KL without
// gradients or standardize, and the vocab-parallel stages).
template <typename Div>
constexpr bool kCachesTerms = !Div::kSumsFromStats;
enum CacheUse : int { kUncached = 0, kExpsOnly = 1, kStudentTerms = 2, kAllTerms = 3 };
template <int kUse>
using UseTag = std::integral_constant<int, kUse>;
constexpr int64_t kSlotQ = 0, kSlotP = kChunk, kSlotDTeacher = 3 * kChunk;
constexpr int64_t slot_d_student(int use) { return use == kAllTerms ? 2 * kChunk : kChunk; }
constexpr int64_t slot_ce(int use) { return use == kAllTerms ? 4 * kChunk : 2 * kChunk; }
constexpr int64_t block_width(int use) { return kChunk * (use == kAllTerms ? 5 : use == kUncached ? 0 : 3); }

template <typename acc_t>
struct RowCache {
  int use;
  acc_t* data;
  int64_t chunks;
  static RowCache none() { return {kUncached, nullptr, 0}; }
  KD_INLINE acc_t* block(int64_t j0) const { return data + j0 / kChunk * block_width(use); }
  KD_INLINE acc_t* maxima(int64_t j0) const { return data + chunks * block_width(use) + j0 / kChunk * 3; }
};

// Smallest finite entry of x[0:n] (+inf if none).
template <typename acc_t>
KD_INLINE acc_t finite_min(const acc_t* x, int64_t n) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  acc_t m = kInf;
  // The select before the min keeps the loop's dependency chain to the min alone (a select on
  // both conditions took 2.5 times as long).
#pragma omp simd reduction(min : m)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t finite = x[i] > kNegInf ? x[i] : kInf;
    m = finite < m ? finite : m;
  }
  return m;
}

// term_sums of one chunk, whose soft values are (x - center) * scale of the values x in xa and xb
// (with read_a and read_b the centers and scales); kFromProbabilities: a mixture divergence's
// ratio of p and q as their quotient (mixture()).
template <typename Div, bool kStandardize, int kUse, bool kFromProbabilities, typename acc_t>
KD_INLINE RowSums<acc_t> chunk_term_sums(int64_t n, const acc_t* xa, const acc_t* xb, const SoftView<acc_t> read_a,
                                         const SoftView<acc_t> read_b, const LogNormaliser<acc_t> norm_a,
                                         const LogNormaliser<acc_t> norm_b, const DivergenceParams<acc_t> params,
                                         acc_t scale_a, acc_t scale_b, acc_t* block) {
  // The views, normalisers and params by value: in registers, the loop can read them under a
  // mask (a reference could alias xa, xb or block, and the loop would not vectorise).
  using Math = MathFor<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  // The teacher's sums feed only the teacher's gradient: with kStudentTerms they stay 0.
  constexpr bool kTeacherSums = kUse != kStudentTerms;
  acc_t value = 0, d_student = 0, d_teacher = 0, s_moment = 0, s_mean = 0, t_moment = 0, t_mean = 0;
#pragma omp simd reduction(+ : value, d_student, d_teacher, s_moment, s_mean, t_moment, t_mean)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t a = read_a.soft(xa[i]), b = read_b.soft(xb[i]);
    const bool shared = (a > kNegInf) & (b > kNegInf);
    const acc_t lq = shared ? norm_a.log_prob(a) : acc_t(0);
    const acc_t lp = shared ? norm_b.log_prob(b) : acc_t(0);
    const acc_t q = kUse != kUncached ? scaled_exp(block[kSlotQ + i], scale_a)
                                      : Math::exp(norm_a.log_prob(a));  // 0 at -inf
    const acc_t p = kUse != kUncached ? scaled_exp(block[kSlotP + i], scale_b) : Math::exp(norm_b.log_prob(b));
    const Terms<acc_t> t = divergence_terms<Div, Math, kFromProbabilities>(lp, lq, p, q, params);
    const acc_t entry_d_student = shared ? t.d_student : acc_t(0), entry_d_teacher = shared ? t.d_teacher : acc_t(0);
    value += shared ? t.value : acc_t(0);
    d_student += entry_d_student;
    if constexpr (kTeacherSums) d_teacher += entry_d_teacher;
    if constexpr (kStandardize) {
      const acc_t a_finite = a > kNegInf ? a : acc_t(0);
      s_moment += entry_d_student * a_finite;
      s_mean += q * a_finite;
    }
    if constexpr (kStandardize && kTeacherSums) {
      const acc_t b_finite = b > kNegInf ? b : acc_t(0);
      t_moment += entry_d_teacher * b_finite;
      t_mean += p * b_finite;
    }
    if constexpr (kUse == kStudentTerms || kUse == kAllTerms) {
      block[kSlotQ + i] = q;
      block[slot_d_student(kUse) + i] = entry_d_student;
    }
    if constexpr (kUse == kAllTerms) {
      block[kSlotP + i] = p;
      block[kSlotDTeacher + i] = entry_d_teacher;
    }
  }
  RowSums<acc_t> sums(Terms<acc_t>{value, d_student, d_teacher});
  sums.student_moment = s_moment;
  sums.student_mean = s_mean;
  sums.teacher_moment = t_moment;
  sums.teacher_mean = t_mean;
  return sums;
}

// The values of one input's chunk that chunk_term_sums reads, and in `read` how it forms the soft
// values from them: with softcap, the soft values themselves (in buffer); without, the logits (in
// place where they are acc_t, else converted into buffer) and the row's view.
template <typename scalar_t, typename acc_t>
KD_INLINE const acc_t* chunk_values(const RowArgs<scalar_t, acc_t>& args, const SoftView<acc_t>& view,
                                    const scalar_t* x, int64_t n, acc_t* buffer, SoftView<acc_t>& read) {
  if (args.softcap != 0) {
    load_soft(args, view, x, n, buffer);
    read = {0, 1, 0, 0, 0};
    return buffer;
  }
  read = view;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return x;
  } else {
    load_scaled(x, n, acc_t(1), buffer);
    return buffer;
  }
}

// Read 2: the row sums of the divergence terms (and the standardize moments), from the exps in
// `cache` (kUse, a CacheUse) or computing them (kUncached); with kStudentTerms and kAllTerms, the
// entries' terms (d_student and d_teacher 0 where not shared) are kept there for read 3. A
// mixture divergence divides p and q for its mixture in the chunks where that is exact.
template <typename Div, bool kStandardize, int kUse, typename scalar_t, typename acc_t>
KD_INLINE RowSums<acc_t> term_sums(const RowArgs<scalar_t, acc_t>& args, const scalar_t* student,
                                   const scalar_t* teacher, const SoftView<acc_t>& view_a,
                                   const SoftView<acc_t>& view_b, const LogNormaliser<acc_t> norm_a,
                                   const LogNormaliser<acc_t> norm_b, const DivergenceParams<acc_t> params, acc_t* a,
                                   acc_t* b, const RowCache<acc_t> cache) {
  RowSums<acc_t> sums;
  for (int64_t j0 = 0; j0 < args.vocab; j0 += kChunk) {
    const int64_t n = std::min(kChunk, args.vocab - j0);
    acc_t* block = kUse != kUncached ? cache.block(j0) : nullptr;
    const acc_t* maxima = kUse != kUncached ? cache.maxima(j0) : nullptr;
    const acc_t scale_a = kUse != kUncached ? chunk_scale(norm_a, maxima[0]) : acc_t(0);
    const acc_t scale_b = kUse != kUncached ? chunk_scale(norm_b, maxima[1]) : acc_t(0);
    SoftView<acc_t> read_a, read_b;
    const acc_t* xa = chunk_values(args, view_a, student + j0, n, a, read_a);
    const acc_t* xb = chunk_values(args, view_b, teacher + j0, n, b, read_b);
    bool from_probabilities = false;
    if constexpr (kMixes<Div>) {  // the smallest soft values, from the smallest values (the view is monotone)
      from_probabilities = mixture_from_probabilities_exact(
          norm_b.log_prob(read_b.soft(finite_min(xb, n))), norm_a.log_prob(read_a.soft(finite_min(xa, n))), params);
    }
    sums += from_probabilities ? chunk_term_sums<Div, kStandardize, kUse, true>(n, xa, xb, read_a, read_b, norm_a,
                                                                                norm_b, params, scale_a, scale_b, block)
                               : chunk_term_sums<Div, kStandardize, kUse, false>(n, xa, xb, read_a, read_b, norm_a,
                                                                                 norm_b, params, scale_a, scale_b, block);
  }
  return sums;
}

// The standardize gradient's term through the row's mean and std: with G = dL/da (a the soft
// values), dL/dx = scale * G - coupling * a, coupling = T * sum(G a) / ((n - 1) std), and
// sum(G a) = soft_weight * (moment - sum_d * mean) (G sums to 0: the softmax is shift-invariant,
// so the term through the mean vanishes). 0 where std = 0 (a constant row: a = 0).
template <typename scalar_t, typename acc_t>
KD_INLINE acc_t standardize_coupling(const RowArgs<scalar_t, acc_t>& args, const SoftView<acc_t>& view, acc_t sum_d,
                                     acc_t moment, acc_t mean) {
  if (!(view.count > 1 && view.std > 0)) return 0;
  return args.soft_weight * (moment - sum_d * mean) / (args.inv_temperature * (view.count - 1) * view.std);
}

// The soft term's gradient at a logit whose soft value is v: weight * factor through the softcap
// slope at v, minus the standardize coupling term (kValues; without, v is not read: no softcap,
// no standardize).
template <bool kValues, typename acc_t>
KD_INLINE acc_t logit_gradient(acc_t weight, acc_t factor, const SoftView<acc_t>& view, acc_t v, acc_t cap_scale) {
  if constexpr (kValues) {
    return weight * factor * softcap_slope(v, cap_scale) -
           (v > -std::numeric_limits<acc_t>::infinity() ? view.coupling * v : acc_t(0));
  } else {
    return weight * factor;
  }
}

template <typename acc_t>
struct GradientScales {
  LogNormaliser<acc_t> norm_a, norm_b, norm_c;
  SoftView<acc_t> view_a, view_b;
  acc_t soft_weight;
  acc_t hard_weight;  // 0 without the CE term
  acc_t sum_d_student, sum_d_teacher;
};

// Writes the gradients of one row's loss: the soft term (kSoft) through the softmax Jacobian
// of the divergence terms (computed from the logits and q, p, or read from what term_sums kept
// in the row cache; kUse: where q, p and the terms come from, with kStudentTerms only the
// student's gradient), plus the CE term softmax(student) - onehot(y) (from student/T when
// T = 1, else from the raw student logits in c or their kept exps: kSeparateCE). kValues: the
// soft values are read, as they must be but for cached terms on rows without softcap or
// standardize (slope 1, no coupling term). Writes the gradients wanted (through a and b where
// they are not acc_t).
template <typename Div, bool kSoft, bool kSeparateCE, int kUse, bool kValues, typename scalar_t, typename acc_t>
KD_INLINE void gradient_row(const RowArgs<scalar_t, acc_t>& args, const DivergenceParams<acc_t> params, int64_t row,
                            int64_t y, const GradientScales<acc_t> g, acc_t* a, acc_t* b, acc_t* c,
                            const RowCache<acc_t> cache) {  // params, g and cache by value, as in term_sums
  constexpr bool kCached = kUse != kUncached, kCachedTerms = kUse == kStudentTerms || kUse == kAllTerms;
  static_assert(kValues || kCachedTerms, "only cached terms do without the soft values");
  // acc_t gradients are written to the outputs directly, others through a and b.
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;
  using Math = MathFor<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t vocab = args.vocab;
  const scalar_t* student = args.student + row * args.student_stride;
  const scalar_t* teacher = args.teacher + row * args.teacher_stride;
  for (int64_t j0 = 0; j0 < vocab; j0 += kChunk) {
    const int64_t n = std::min(kChunk, vocab - j0);
    const acc_t* block = kCached ? cache.block(j0) : nullptr;
    const acc_t* maxima = kCached ? cache.maxima(j0) : nullptr;
    const acc_t scale_a = kUse == kExpsOnly ? chunk_scale(g.norm_a, maxima[0]) : acc_t(0);
    const acc_t scale_b = kUse == kExpsOnly && kSoft ? chunk_scale(g.norm_b, maxima[1]) : acc_t(0);
    const acc_t scale_c = kCached && kSeparateCE ? chunk_scale(g.norm_c, maxima[2]) : acc_t(0);
    if constexpr (kValues) {
      load_soft(args, g.view_a, student + j0, n, a);
      if constexpr (kSoft && kUse != kStudentTerms) load_soft(args, g.view_b, teacher + j0, n, b);
    }
    if constexpr (kSeparateCE && !kCached) load_scaled(student + j0, n, acc_t(1), c);
    acc_t* out_s = a;
    acc_t* out_t = b;
    if constexpr (kDirect) {
      if (args.grad_student) out_s = args.grad_student + row * vocab + j0;
      if (args.grad_teacher) out_t = args.grad_teacher + row * vocab + j0;
    }
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const acc_t q = kCachedTerms        ? block[kSlotQ + i]
                      : kUse == kExpsOnly ? scaled_exp(block[kSlotQ + i], scale_a)
                                          : Math::exp(g.norm_a.log_prob(a[i]));
      const acc_t ce_q = !kSeparateCE ? q
                         : kCached    ? scaled_exp(block[slot_ce(kUse) + i], scale_c)
                                      : Math::exp(g.norm_c.log_prob(c[i]));
      acc_t grad_s = g.hard_weight * ce_q;
      acc_t grad_t = 0;
      if constexpr (kSoft) {
        acc_t d_student, d_teacher = 0, p = 0;
        if constexpr (kCachedTerms) {
          d_student = block[slot_d_student(kUse) + i];
          if constexpr (kUse == kAllTerms) {
            d_teacher = block[kSlotDTeacher + i];
            p = block[kSlotP + i];
          }
        } else {
          p = kUse == kExpsOnly ? scaled_exp(block[kSlotP + i], scale_b) : Math::exp(g.norm_b.log_prob(b[i]));
          const bool shared = (a[i] > kNegInf) & (b[i] > kNegInf);
          const acc_t lq = shared ? g.norm_a.log_prob(a[i]) : acc_t(0);
          const acc_t lp = shared ? g.norm_b.log_prob(b[i]) : acc_t(0);
          const Terms<acc_t> t = Div::template terms<Math>(lp, lq, p, q, params);
          d_student = shared ? t.d_student : acc_t(0);
          d_teacher = shared ? t.d_teacher : acc_t(0);
        }
        grad_s += logit_gradient<kValues>(g.soft_weight * g.view_a.scale, d_student - q * g.sum_d_student, g.view_a,
                                          kValues ? a[i] : acc_t(0), args.cap_scale);
        if constexpr (kUse != kStudentTerms) {
          grad_t = logit_gradient<kValues>(g.soft_weight * g.view_b.scale, d_teacher - p * g.sum_d_teacher, g.view_b,
                                           kValues ? b[i] : acc_t(0), args.cap_scale);
        }
      }
      out_s[i] = grad_s;
      out_t[i] = grad_t;
    }
    if (y >= j0 && y < j0 + n) out_s[y - j0] -= g.hard_weight;
    if constexpr (!kDirect) {
      if (args.grad_student) store(a, n, args.grad_student + row * vocab + j0);
      if (args.grad_teacher) store(b, n, args.grad_teacher + row * vocab + j0);
    }
  }
}

// The gradients of one row, from what read 1 and term_sums kept in `cache` where they did.
template <typename Div, typename scalar_t, typename acc_t>
KD_INLINE void write_gradients(const RowArgs<scalar_t, acc_t>& args, const DivergenceParams<acc_t>& params,
                               int64_t row, int64_t y, bool soft, bool separate_ce, const GradientScales<acc_t>& scales,
                               acc_t* a, acc_t* b, acc_t* c, const RowCache<acc_t>& cache) {
  const auto soft_row = [&](auto use, auto values) __attribute__((always_inline)) {
    constexpr int kUse = decltype(use)::value;
    constexpr bool kValues = decltype(values)::value;
    separate_ce ? gradient_row<Div, true, true, kUse, kValues>(args, params, row, y, scales, a, b, c, cache)
                : gradient_row<Div, true, false, kUse, kValues>(args, params, row, y, scales, a, b, c, cache);
  };
  if constexpr (kCachesTerms<Div>) {
    // Cached terms read the soft values only for the softcap slope and the standardize coupling.
    const bool values = args.softcap != 0 || args.standardize;
    const auto cached_row = [&](auto use) __attribute__((always_inline)) {
      values ? soft_row(use, std::true_type{}) : soft_row(use, std::false_type{});
    };
    if (soft && cache.use == kStudentTerms) return cached_row(UseTag<kStudentTerms>{});
    if (soft && cache.use == kAllTerms) return cached_row(UseTag<kAllTerms>{});
  } else {
    if (soft && cache.use == kExpsOnly) return soft_row(UseTag<kExpsOnly>{}, std::true_type{});
  }
  if (soft) return soft_row(UseTag<kUncached>{}, std::true_type{});
  separate_ce ? gradient_row<Div, false, true, kUncached, true>(args, params, row, y, scales, a, b, c, cache)
              : gradient_row<Div, false, false, kUncached, true>(args, params, row, y, scales, a, b, c, cache);
}

// One whole row, with the thread's row cache.
template <typename Div, typename scalar_t, typename acc_t>
KD_INLINE void process_row(const RowArgs<scalar_t, acc_t>& args, int64_t row, acc_t* a, acc_t* b, acc_t* c,
                           const RowCache<acc_t>& cache) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t vocab = args.vocab;
  const scalar_t* student = args.student + row * args.student_stride;
  const scalar_t* teacher = args.teacher + row * args.teacher_stride;
  const bool has_target = args.target != nullptr;
  const int64_t y = has_target ? args.target[row] : -1;
  if (has_target && y == args.ignore_index) return finish_without_loss(args, row, kOk);
  if (has_target && (y < 0 || y >= vocab)) return finish_without_loss(args, row, kTargetOutOfRange);
  const bool need_soft = args.soft_weight != 0;
  const bool need_ce = has_target && args.hard_weight != 0;
  // CE needs softmax of the raw student logits: a read of its own unless a = student.
  const bool separate_ce = need_ce && (!args.unit_temperature || args.softcap != 0 || args.standardize);

  // Read 0, with standardize: each row's mean and std.
  SoftView<acc_t> view_a{0, args.inv_temperature, 0, 0, 0}, view_b = view_a;
  if (args.standardize) {
    view_a = standardized_view(args, student, a);
    if (need_soft) view_b = standardized_view(args, teacher, b);
  }

  // Read 1: statistics.
  const acc_t anchor_a = row_anchor(args, view_a, student), anchor_b = row_anchor(args, view_b, teacher);
  OnlineSide<acc_t> side_a, side_b, side_c;
  int bad_student = 0, bad_teacher = 0;
  const bool cached = cache.use != kUncached && need_soft;
  const bool keep_ce = cached && separate_ce && (args.grad_student || args.grad_teacher);
  // At T = 2 or 4 the CE term's exps come from the kept soft exps of the student (no softcap or
  // standardize: soft value = student / T exactly).
  const bool ce_from_soft = cached && separate_ce && args.ce_squarings && args.softcap == 0 && !args.standardize;
  for (int64_t j0 = 0; j0 < vocab; j0 += kChunk) {
    const int64_t n = std::min(kChunk, vocab - j0);
    acc_t* block = cached ? cache.block(j0) : nullptr;
    acc_t* maxima = cached ? cache.maxima(j0) : nullptr;
    load_soft(args, view_a, student + j0, n, a);
    const acc_t max_a = chunk_max(a, n, bad_student);
    if (need_soft) {
      load_soft(args, view_b, teacher + j0, n, b);
      const acc_t max_b = chunk_max(b, n, bad_teacher);
      if constexpr (Div::kSumsFromStats) {
        cached ? accumulate_exp_with_support<true>(a, b, n, max_a, max_b, anchor_a, anchor_b, side_a, side_b, block)
               : accumulate_exp_with_support<false>(a, b, n, max_a, max_b, anchor_a, anchor_b, side_a, side_b, block);
      } else {
        accumulate_exp(a, n, max_a, side_a, cached ? block + kSlotQ : nullptr);
        accumulate_exp(b, n, max_b, side_b, cached ? block + kSlotP : nullptr);
      }
      if (cached) {
        maxima[0] = max_a;
        maxima[1] = max_b;
      }
    } else {
      accumulate_exp(a, n, max_a, side_a);
    }
    if (ce_from_soft) {
      acc_t* kept_ce = keep_ce ? block + slot_ce(cache.use) : nullptr;
      const acc_t max_c = args.ce_squarings == 1 ? accumulate_exp_powers<1>(block + kSlotQ, n, max_a, side_c, kept_ce)
                                                 : accumulate_exp_powers<2>(block + kSlotQ, n, max_a, side_c, kept_ce);
      if (keep_ce) maxima[2] = max_c;
    } else if (separate_ce) {
      load_scaled(student + j0, n, acc_t(1), c);
      const acc_t max_c = chunk_max(c, n, bad_student);
      accumulate_exp(c, n, max_c, side_c, keep_ce ? block + slot_ce(cache.use) : nullptr);
      if (keep_ce) maxima[2] = max_c;
    }
  }
  if (bad_student) return finish_without_loss(args, row, kStudentNonFinite);
  if (bad_teacher) return finish_without_loss(args, row, kTeacherNonFinite);
  if (!(side_a.sum > 0)) return finish_without_loss(args, row, kStudentAllMasked);
  if (need_soft && !(side_b.sum > 0)) return finish_without_loss(args, row, kTeacherAllMasked);
  const LogNormaliser<acc_t> norm_a = side_a.normaliser();
  const LogNormaliser<acc_t> norm_b = need_soft ? side_b.normaliser() : LogNormaliser<acc_t>{0, 0};
  const LogNormaliser<acc_t> norm_c = separate_ce ? side_c.normaliser() : norm_a;

  acc_t ce = 0;
  if (need_ce) {
    const acc_t logit_y = static_cast<acc_t>(student[y]);
    if (logit_y == kNegInf) return finish_without_loss(args, row, kTargetMasked);
    ce = -norm_c.log_prob(logit_y);
  }

  // Row sums of the divergence terms: from the statistics, or read 2.
  DivergenceParams<acc_t> params = args.params;
  if constexpr (std::is_same_v<Div, AdaptiveKL>) {
    if (need_soft) set_adaptive_weights(args, view_a, view_b, student, teacher, norm_a, norm_b, params, a, b, c);
  }
  RowSums<acc_t> sums{};
  bool summed = !need_soft;
  if constexpr (Div::kSumsFromStats) {
    if (need_soft && !args.standardize && anchors_hold(norm_a.max, anchor_a, norm_b.max, anchor_b)) {
      sums = Div::row_sums(SupportStats<acc_t>{
          (norm_a.max - anchor_a) + norm_a.log_sum, (norm_b.max - anchor_b) + norm_b.log_sum,
          side_a.mass / side_a.sum, side_a.logratio / side_a.sum, side_b.mass / side_b.sum,
          side_b.logratio / side_b.sum},
                           params);
      summed = true;
    }
  }
  if (!summed) {
    // Inlined, so that it is built for the ISA of the clone it runs in.
    const auto sum_terms = [&](auto use) __attribute__((always_inline)) {
      constexpr int kUse = decltype(use)::value;
      return args.standardize ? term_sums<Div, true, kUse>(args, student, teacher, view_a, view_b, norm_a, norm_b,
                                                           params, a, b, cache)
                              : term_sums<Div, false, kUse>(args, student, teacher, view_a, view_b, norm_a, norm_b,
                                                            params, a, b, cache);
    };
    if (cache.use == kUncached) sums = sum_terms(UseTag<kUncached>{});
    if (cache.use == kExpsOnly) sums = sum_terms(UseTag<kExpsOnly>{});
    if constexpr (kCachesTerms<Div>) {
      if (cache.use == kStudentTerms) sums = sum_terms(UseTag<kStudentTerms>{});
      if (cache.use == kAllTerms) sums = sum_terms(UseTag<kAllTerms>{});
    }
  }
  args.loss[row] = args.soft_weight * sums.value + args.hard_weight * ce;
  args.status[row] = kOk;
  if (!args.grad_student && !args.grad_teacher) return;
  if (args.standardize && need_soft) {
    view_a.coupling = standardize_coupling(args, view_a, sums.d_student, sums.student_moment, sums.student_mean);
    view_b.coupling = standardize_coupling(args, view_b, sums.d_teacher, sums.teacher_moment, sums.teacher_mean);
  }

  // Read 3: gradients of the row loss.
  write_gradients<Div>(args, params, row, y, need_soft, separate_ce,
                       {norm_a, norm_b, norm_c, view_a, view_b, args.soft_weight,
                        need_ce ? args.hard_weight : acc_t(0), sums.d_student, sums.d_teacher},
                       a, b, c, cache);
}

// The vocab-parallel stages (ShardStage) of one row of a rank's slice of the vocabulary; the
// caller combines the ranks' outputs between stages (kdkernels/ops/vocab_parallel.py). target
// holds slice-local ids: ignore_index for an ignored row (no loss, zero gradients), a value
// outside [0, V_local) for a target on another slice. Softcap applies; standardize and adaptive
// KL need whole-row values inside the reads and are refused by the caller.
template <typename Div, typename scalar_t, typename acc_t>
KD_INLINE void process_shard_row(const RowArgs<scalar_t, acc_t>& args, const ShardArgs<acc_t>& shard, int64_t row,
                                 acc_t* a, acc_t* b, acc_t* c) {
  const int64_t vocab = args.vocab;
  const scalar_t* student = args.student + row * args.student_stride;
  const scalar_t* teacher = args.teacher + row * args.teacher_stride;
  const bool has_target = args.target != nullptr;
  const int64_t y = has_target ? args.target[row] : -1;
  const bool ignored = has_target && y == args.ignore_index;
  const int64_t local_y = has_target && y >= 0 && y < vocab ? y : -1;
  const bool need_soft = args.soft_weight != 0;
  const bool need_ce = has_target && args.hard_weight != 0;
  const bool separate_ce = need_ce && (!args.unit_temperature || args.softcap != 0);
  const SoftView<acc_t> view{0, args.inv_temperature, 0, 0, 0};
  args.status[row] = kOk;

  if (shard.stage == kShardStats) {  // read 1
    OnlineSide<acc_t> side_a, side_b, side_c;
    int bad_student = 0, bad_teacher = 0;
    for (int64_t j0 = 0; j0 < vocab && !ignored; j0 += kChunk) {
      const int64_t n = std::min(kChunk, vocab - j0);
      load_soft(args, view, student + j0, n, a);
      accumulate_exp(a, n, chunk_max(a, n, bad_student), side_a);
      if (need_soft) {
        load_soft(args, view, teacher + j0, n, b);
        accumulate_exp(b, n, chunk_max(b, n, bad_teacher), side_b);
      }
      if (separate_ce) {
        load_scaled(student + j0, n, acc_t(1), c);
        accumulate_exp(c, n, chunk_max(c, n, bad_student), side_c);
      }
    }
    if (bad_student) args.status[row] = kStudentNonFinite;
    if (bad_teacher && !bad_student) args.status[row] = kTeacherNonFinite;
    if (!separate_ce) side_c = side_a;
    const acc_t stats[kShardStatsWidth] = {side_a.max, side_a.sum, side_b.max, side_b.sum, side_c.max, side_c.sum};
    std::copy_n(stats, kShardStatsWidth, shard.out + row * kShardStatsWidth);
    return;
  }

  const acc_t* n = shard.norms + row * kShardStatsWidth;
  const LogNormaliser<acc_t> norm_a{n[0], n[1]}, norm_b{n[2], n[3]}, norm_c{n[4], n[5]};
  if (shard.stage == kShardSums) {  // read 2
    RowSums<acc_t> sums{};
    if (need_soft && !ignored) {
      sums = term_sums<Div, false, kUncached>(args, student, teacher, view, view, norm_a, norm_b, args.params, a, b,
                                              RowCache<acc_t>::none());
    }
    const acc_t target_logit = need_ce && !ignored && local_y >= 0 ? static_cast<acc_t>(student[local_y]) : acc_t(0);
    const acc_t out[kShardSumsWidth] = {sums.value, sums.d_student, sums.d_teacher, target_logit};
    std::copy_n(out, kShardSumsWidth, shard.out + row * kShardSumsWidth);
    return;
  }

  if (ignored) return zero_gradients(args, row);  // read 3
  const acc_t* sums = shard.sums + row * kShardSumsWidth;
  write_gradients<Div>(args, args.params, row, local_y, need_soft, separate_ce,
                       {norm_a, norm_b, norm_c, view, view, args.soft_weight, need_ce ? args.hard_weight : acc_t(0),
                        sums[1], sums[2]},
                       a, b, c, RowCache<acc_t>::none());
}

// Whole rows, or with `shard` one vocab-parallel stage of them.
template <typename Div, typename scalar_t, typename acc_t>
KD_INLINE void process_row_range(const RowArgs<scalar_t, acc_t>& args, const ShardArgs<acc_t>* shard, int64_t begin,
                                 int64_t end) {
  alignas(64) acc_t a[kChunk], b[kChunk], c[kChunk];
  // The row cache's use: none where no read after the first takes the exps (a read 2 or 3).
  const bool gradients = args.grad_student || args.grad_teacher;
  const bool later_reads = kCachesTerms<Div> || gradients || args.standardize;
  int use = kUncached;
  if (!shard && later_reads) {
    use = !(kCachesTerms<Div> && gradients) ? kExpsOnly : args.grad_teacher ? kAllTerms : kStudentTerms;
  }
  const int64_t chunks = (args.vocab + kChunk - 1) / kChunk;
  std::vector<acc_t> storage(use == kUncached ? 0 : chunks * (block_width(use) + 3));
  const RowCache<acc_t> cache{use, storage.data(), chunks};
  for (int64_t row = begin; row < end; ++row) {
    shard ? process_shard_row<Div>(args, *shard, row, a, b, c)
          : process_row<Div>(args, row, a, b, c, cache);
  }
}

// Cloned per ISA level for the float accumulation of fp32, bf16 and fp16 inputs; fp64 inputs
// (gradcheck, references) take the one default build, which keeps the compile time down.
template <typename Div, typename scalar_t, typename acc_t>
KD_CPU_CLONES void process_rows_cloned(const RowArgs<scalar_t, acc_t>& args, const ShardArgs<acc_t>* shard,
                                       int64_t begin, int64_t end) {
  process_row_range<Div>(args, shard, begin, end);
}

template <typename Div, typename scalar_t, typename acc_t>
void process_rows(const RowArgs<scalar_t, acc_t>& args, const ShardArgs<acc_t>* shard, int64_t begin, int64_t end) {
  if constexpr (std::is_same_v<acc_t, double>) {
    process_row_range<Div>(args, shard, begin, end);
  } else {
    process_rows_cloned<Div>(args, shard, begin, end);
  }
}

// The rows of one call, with the divergences whose id is kPart modulo kKdLossParts (the others
// compile to nothing here): false if the call's divergence is not among them.
template <int kPart>
bool kd_loss_part(const KDLossCall& call) {
  bool ran = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, call.student.scalar_type(), "kd_loss_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t rows = call.student.size(0), vocab = call.student.size(1);
    const RowArgs<scalar_t, acc_t> args{
        call.student.data_ptr<scalar_t>(), call.teacher.data_ptr<scalar_t>(), call.student.stride(0),
        call.teacher.stride(0), call.target.defined() ? call.target.data_ptr<int64_t>() : nullptr,
        call.loss.data_ptr<acc_t>(), call.grad_student.numel() ? call.grad_student.data_ptr<scalar_t>() : nullptr,
        call.grad_teacher.numel() ? call.grad_teacher.data_ptr<scalar_t>() : nullptr, call.status.data_ptr<int8_t>(),
        vocab, call.ignore_index, static_cast<acc_t>(1.0 / call.temperature), static_cast<acc_t>(call.soft_weight),
        static_cast<acc_t>(call.hard_weight), call.temperature == 1.0,
        call.temperature == 2.0 ? 1 : call.temperature == 4.0 ? 2 : 0, static_cast<acc_t>(call.softcap),
        static_cast<acc_t>(call.softcap > 0 ? call.temperature / call.softcap : 0.0), call.standardize,
        make_divergence_params<acc_t>(call.divergence, call.divergence_args)};
    const ShardArgs<acc_t> shard{call.shard_stage, call.norms.defined() ? call.norms.data_ptr<acc_t>() : nullptr,
                                 call.sums.defined() ? call.sums.data_ptr<acc_t>() : nullptr,
                                 call.loss.data_ptr<acc_t>()};
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(vocab, 1));
    dispatch_divergence(call.divergence, [&](auto div) {
      using Div = decltype(div);
      if constexpr (static_cast<int>(Div::kId) % kKdLossParts == kPart) {
        at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
          process_rows<Div, scalar_t, acc_t>(args, call.shard_stage < 0 ? nullptr : &shard, begin, end);
        });
        ran = true;
      }
    });
  });
  return ran;
}

}  // namespace cpu
}  // namespace kdkernels

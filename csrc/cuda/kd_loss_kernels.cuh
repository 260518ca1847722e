// CUDA kernels of kd_loss, free of torch headers (csrc/cuda/kd_loss_cuda.cu launches them).
// Same algorithm and semantics as the CPU kernel (csrc/cpu/kd_loss_cpu.cpp), one CTA per row:
//   read 1: online (max, sum) statistics of student/T, teacher/T and, for the CE term at
//           T != 1, student; for kSumsFromStats divergences also the support sums. Each
//           thread keeps running statistics; a block reduction merges them.
//   read 2: for divergences without kSumsFromStats (and rows whose anchors do not hold):
//           row sums of the divergence terms.
//   read 3: the gradients (skipped when no gradient is wanted).
// A row is read in packs of kVec elements (one 16-byte access) from its first 16-byte aligned
// element on, the unaligned head and tail one element at a time; kVec = 1 is the scalar
// fallback for rows whose tensors are not equally misaligned. When the launcher finds room,
// the row is first copied into shared memory with asynchronous copies, all in flight at once,
// and the reads use that copy, so that global memory is read once; otherwise every read reads
// global memory (reads 2 and 3 mostly from L2).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline_primitives.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../divergences.h"
#include "../row_status.h"

namespace kdkernels {
namespace cuda_kernels {

constexpr int kWarpSize = 32;

// Launch bounds: at most 64 registers per thread in float, so that two CTAs of 512 threads
// fit an SM; fp64 (gradcheck) gets 128 registers and 256 threads.
template <typename acc_t>
constexpr int kMaxThreads = sizeof(acc_t) == 8 ? 256 : 512;
constexpr int kMinBlocksPerSM = 2;
constexpr int kMaxWarps = kMaxThreads<float> / kWarpSize;

// Elements of scalar_t in one 16-byte access.
template <typename scalar_t>
constexpr int kVectorWidth = 16 / static_cast<int>(sizeof(scalar_t));

// Elements reserved per input in the shared-memory row copy: the row stored at the same
// offset modulo kVec as in global memory, and rounded up so that the next input's copy starts
// 16-byte aligned.
__host__ __device__ constexpr int64_t cache_elems(int64_t vocab, int kVec) {
  return (vocab + kVec - 1 + kVec - 1) / kVec * kVec;
}

template <typename scalar_t, typename acc_t>
struct KernelArgs {
  const scalar_t* student;
  const scalar_t* teacher;
  int64_t student_stride, teacher_stride;
  const int64_t* target;  // nullptr without target
  acc_t* loss;
  scalar_t* grad_student;  // [N, V] contiguous, or nullptr
  scalar_t* grad_teacher;
  int8_t* status;
  const float* row_weight;  // 0-d weight of every row (e.g. 1 / rows counted), read on the device; or nullptr
  int vocab;  // below 2^31 - 64: indices within a row are 32-bit, row offsets 64-bit
  int64_t ignore_index;
  acc_t inv_temperature, soft_weight, hard_weight;
  bool unit_temperature;
  bool cache_rows;  // copy the row into dynamic shared memory first, and read it there
  DivergenceParams<acc_t> params;
};

// exp and log per element (fast intrinsics in float), and precise ones for the per-row and
// per-merge scalars, where the error of __expf (growing with |x|) would not average out.
template <typename acc_t>
struct DeviceMath;

template <>
struct DeviceMath<float> {
  static __device__ __forceinline__ float exp(float x) { return __expf(x); }
  static __device__ __forceinline__ float log(float x) { return __logf(x); }
  static __device__ __forceinline__ float precise_exp(float x) { return expf(x); }
  static __device__ __forceinline__ float precise_log(float x) { return logf(x); }
};

template <>
struct DeviceMath<double> {
  static __device__ __forceinline__ double exp(double x) { return ::exp(x); }
  static __device__ __forceinline__ double log(double x) { return ::log(x); }
  static __device__ __forceinline__ double precise_exp(double x) { return ::exp(x); }
  static __device__ __forceinline__ double precise_log(double x) { return ::log(x); }
};

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -static_cast<acc_t>(INFINITY);
}

// False for NaN and +inf; -inf is a valid, masked logit.
__device__ __forceinline__ bool below_inf(float x) { return x <= FLT_MAX; }
__device__ __forceinline__ bool below_inf(double x) { return x <= DBL_MAX; }

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t from_acc(acc_t x) {
  if constexpr (std::is_same_v<scalar_t, __nv_bfloat16>) {
    return __float2bfloat16(x);
  } else if constexpr (std::is_same_v<scalar_t, __half>) {
    return __float2half(x);
  } else {
    return static_cast<scalar_t>(x);
  }
}

// ---------------------------------------------------------------------------------------------
// Packs of N elements, moved as one N * sizeof(scalar_t)-byte word.

template <typename scalar_t, int N>
struct alignas(sizeof(scalar_t) * N) Pack {
  scalar_t v[N];
};

template <int kBytes> struct RawWord;
template <> struct RawWord<16> { using type = uint4; };
template <> struct RawWord<8> { using type = uint2; };
template <> struct RawWord<4> { using type = unsigned int; };
template <> struct RawWord<2> { using type = unsigned short; };

template <typename scalar_t, int N>
using PackWord = typename RawWord<sizeof(Pack<scalar_t, N>)>::type;

template <typename scalar_t, int N>
__device__ __forceinline__ PackWord<scalar_t, N> to_word(const Pack<scalar_t, N>& pack) {
  PackWord<scalar_t, N> word;
  memcpy(&word, &pack, sizeof(pack));
  return word;
}

// Starts an asynchronous copy of a pack from global to shared memory (cp.async for 4, 8 and
// 16 bytes; a plain copy for a single 16-bit element).
template <int N, typename scalar_t>
__device__ __forceinline__ void copy_to_shared_async(scalar_t* dst, const scalar_t* src) {
  constexpr int kBytes = sizeof(Pack<scalar_t, N>);
  if constexpr (kBytes >= 4) {
    __pipeline_memcpy_async(dst, src, kBytes);
  } else {
    *reinterpret_cast<Pack<scalar_t, N>*>(dst) = *reinterpret_cast<const Pack<scalar_t, N>*>(src);
  }
}

// A pack of the row, from its shared-memory copy or from global memory. Loaded as the aligned
// Pack type: a word load followed by the memcpy to the pack would be merged into a byte-wise
// copy.
template <int N, typename scalar_t>
__device__ __forceinline__ Pack<scalar_t, N> load_any(const scalar_t* p) {
  return *reinterpret_cast<const Pack<scalar_t, N>*>(p);
}

// Gradients are not read again by this kernel: streaming stores keep L2 for the input rows.
template <int N, typename scalar_t>
__device__ __forceinline__ void store_streaming(scalar_t* p, const Pack<scalar_t, N>& pack) {
  __stcs(reinterpret_cast<PackWord<scalar_t, N>*>(p), to_word(pack));
}

template <int N>
using Width = std::integral_constant<int, N>;

// Calls fn(Width<n>{}, j) for the packs of a row of `vocab` elements: packs of kVec elements
// from `head` (the first aligned element) on, spread over the threads in order so that a warp
// reads consecutive words, then the unaligned head and tail elements one by one. Every pass
// over a row uses this same mapping, so each thread reads from shared memory what it copied.
template <int kVec, typename Fn>
__device__ __forceinline__ void for_each_pack(int vocab, int head, Fn&& fn) {
  const int packs = (vocab - head) / kVec;
  for (int k = threadIdx.x; k < packs; k += blockDim.x) fn(Width<kVec>{}, head + k * kVec);
  if constexpr (kVec > 1) {
    const int body_end = head + packs * kVec;
    const int singles = head + (vocab - body_end);
    for (int k = threadIdx.x; k < singles; k += blockDim.x) {
      fn(Width<1>{}, k < head ? k : body_end + (k - head));
    }
  }
}

template <int N, typename scalar_t, typename acc_t>
__device__ __forceinline__ void to_acc_scaled(const Pack<scalar_t, N>& pack, acc_t scale, acc_t (&out)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_acc(pack.v[i]) * scale;
}

// Max of x; sets `bad` if an entry is NaN or +inf.
template <int N, typename acc_t>
__device__ __forceinline__ acc_t pack_max(const acc_t (&x)[N], int& bad) {
  acc_t m = neg_inf<acc_t>();
  bool b = false;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    m = x[i] > m ? x[i] : m;
    b |= !below_inf(x[i]);
  }
  bad |= b;
  return m;
}

// ---------------------------------------------------------------------------------------------
// Block reductions. T provides identity() and combine(); every thread gets the same result
// (lane 0's, broadcast), so that branches on it are uniform across the block.

// A warp shuffle of any T, as 32-bit words: shuffle(word) -> word.
template <typename T, typename Shuffle>
__device__ __forceinline__ T shuffle_words(const T& value, Shuffle shuffle) {
  static_assert(sizeof(T) % 4 == 0, "shuffled as 32-bit words");
  unsigned int words[sizeof(T) / 4];
  memcpy(words, &value, sizeof(T));
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(T) / 4); ++i) words[i] = shuffle(words[i]);
  T out;
  memcpy(&out, words, sizeof(T));
  return out;
}

template <typename T>
__device__ __forceinline__ T warp_reduce(T value) {
#pragma unroll
  for (int delta = kWarpSize / 2; delta > 0; delta /= 2) {
    const T other = shuffle_words(value, [delta](unsigned int w) { return __shfl_down_sync(~0u, w, delta); });
    value = T::combine(value, other);
  }
  return shuffle_words(value, [](unsigned int w) { return __shfl_sync(~0u, w, 0); });
}

// blockDim.x must be a multiple of the warp size.
template <typename T>
__device__ __forceinline__ T block_reduce(T value) {
  __shared__ __align__(16) unsigned char storage[kMaxWarps * sizeof(T)];
  T* partials = reinterpret_cast<T*>(storage);
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  value = warp_reduce(value);
  if (lane == 0) partials[warp] = value;
  __syncthreads();
  value = warp_reduce(lane < static_cast<int>(blockDim.x / kWarpSize) ? partials[lane] : T::identity());
  __syncthreads();  // partials may be overwritten by the next reduction
  return value;
}

// Running max of one input and sums rescaled with it: sum[0] is the sum of exp(x - max); with
// kSums = 3 (divergences that take their row sums from the statistics) sum[1] and sum[2] are
// the support sums, mass and mass-weighted log-ratio.
template <typename acc_t, int kSums>
struct OnlineSide {
  acc_t max;
  acc_t sum[kSums];

  static __device__ __forceinline__ OnlineSide identity() {
    OnlineSide side;
    side.max = neg_inf<acc_t>();
#pragma unroll
    for (int k = 0; k < kSums; ++k) side.sum[k] = 0;
    return side;
  }

  // Merge of two partial statistics, as OnlineSide::merge of the CPU kernel.
  static __device__ __forceinline__ OnlineSide combine(OnlineSide x, const OnlineSide& o) {
    if (!(o.sum[0] > 0)) return x;
    if (o.max > x.max) {
      x.rescale(DeviceMath<acc_t>::precise_exp(x.max - o.max));
      x.max = o.max;
#pragma unroll
      for (int k = 0; k < kSums; ++k) x.sum[k] += o.sum[k];
    } else {
      const acc_t r = DeviceMath<acc_t>::precise_exp(o.max - x.max);
#pragma unroll
      for (int k = 0; k < kSums; ++k) x.sum[k] += o.sum[k] * r;
    }
    return x;
  }

  __device__ __forceinline__ void rescale(acc_t r) {
#pragma unroll
    for (int k = 0; k < kSums; ++k) sum[k] *= r;
  }

  // Moves the max up to m (if above), rescaling the sums.
  __device__ __forceinline__ void raise_max(acc_t m) {
    if (m > max) {
      rescale(DeviceMath<acc_t>::precise_exp(max - m));
      max = m;
    }
  }

  // The exp offset: the max, or 0 while everything seen is -inf (every exp is then 0).
  __device__ __forceinline__ acc_t offset() const { return max == neg_inf<acc_t>() ? acc_t(0) : max; }

  __device__ __forceinline__ acc_t lse() const { return max + DeviceMath<acc_t>::precise_log(sum[0]); }
  // lse() - anchor, without forming the (possibly large) lse first.
  __device__ __forceinline__ acc_t lse_above(acc_t anchor) const {
    return (max - anchor) + DeviceMath<acc_t>::precise_log(sum[0]);
  }

  // The support sums normalised by the exp sum.
  __device__ __forceinline__ acc_t mass() const { return sum[1] / sum[0]; }
  __device__ __forceinline__ acc_t logratio() const { return sum[2] / sum[0]; }

  template <int N>
  __device__ __forceinline__ void accumulate_exp(const acc_t (&x)[N], acc_t pack_max) {
    raise_max(pack_max);
    const acc_t off = offset();
#pragma unroll
    for (int i = 0; i < N; ++i) sum[0] += DeviceMath<acc_t>::exp(x[i] - off);
  }
};

// The anchor of a row (SupportStats): the max of its first kAnchorEntries entries times scale,
// or 0 if they are all -inf. Every thread reads the same few entries.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t row_anchor(const scalar_t* x, int vocab, acc_t scale) {
  acc_t m = neg_inf<acc_t>();
  for (int j = 0; j < min(vocab, kAnchorEntries); ++j) {
    const acc_t v = to_acc(x[j]) * scale;
    m = v > m ? v : m;
  }
  return m == neg_inf<acc_t>() ? acc_t(0) : m;
}

// Both inputs' exp sums plus the support sums (entries finite in both): mass and
// mass-weighted log-ratio of anchored values for each side (SupportStats).
template <int N, typename acc_t>
__device__ __forceinline__ void accumulate_exp_with_support(const acc_t (&a)[N], const acc_t (&b)[N], acc_t max_a,
                                                            acc_t max_b, acc_t anchor_a, acc_t anchor_b,
                                                            OnlineSide<acc_t, 3>& side_a,
                                                            OnlineSide<acc_t, 3>& side_b) {
  side_a.raise_max(max_a);
  side_b.raise_max(max_b);
  const acc_t off_a = side_a.offset(), off_b = side_b.offset();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const acc_t ea = DeviceMath<acc_t>::exp(a[i] - off_a), eb = DeviceMath<acc_t>::exp(b[i] - off_b);
    const bool shared = (a[i] > neg_inf<acc_t>()) & (b[i] > neg_inf<acc_t>());
    const acc_t diff = shared ? (a[i] - anchor_a) - (b[i] - anchor_b) : acc_t(0);
    side_a.sum[0] += ea;
    side_b.sum[0] += eb;
    side_a.sum[1] += shared ? ea : acc_t(0);
    side_b.sum[1] += shared ? eb : acc_t(0);
    side_a.sum[2] += ea * diff;
    side_b.sum[2] -= eb * diff;
  }
}

// Read 1 statistics of a row: a = student / T, b = teacher / T (with the support sums when
// kSupport), c = student (CE at T != 1); the NaN / +inf flags of the two inputs.
template <typename acc_t, bool kSupport>
struct RowStats {
  using Side = OnlineSide<acc_t, kSupport ? 3 : 1>;
  using CESide = OnlineSide<acc_t, 1>;
  Side a, b;
  CESide c;
  int bad_student, bad_teacher;

  static __device__ __forceinline__ RowStats identity() {
    return {Side::identity(), Side::identity(), CESide::identity(), 0, 0};
  }
  static __device__ __forceinline__ RowStats combine(const RowStats& x, const RowStats& o) {
    return {Side::combine(x.a, o.a), Side::combine(x.b, o.b), CESide::combine(x.c, o.c),
            x.bad_student | o.bad_student, x.bad_teacher | o.bad_teacher};
  }
};

// Read 2 sums of the divergence terms.
template <typename acc_t>
struct TermSums {
  Terms<acc_t> t;

  static __device__ __forceinline__ TermSums identity() { return {{0, 0, 0}}; }
  static __device__ __forceinline__ TermSums combine(const TermSums& x, const TermSums& o) {
    return {{x.t.value + o.t.value, x.t.d_student + o.t.d_student, x.t.d_teacher + o.t.d_teacher}};
  }
};

// ---------------------------------------------------------------------------------------------

// One row as seen by its CTA: the input rows, the gradient rows (nullptr when not wanted), the
// first 16-byte aligned element, and where the reads find the inputs.
template <typename scalar_t>
struct RowView {
  const scalar_t* student;
  const scalar_t* teacher;
  scalar_t* grad_student;
  scalar_t* grad_teacher;
  scalar_t* cache_student;  // shared-memory copies, at the misalignment of the global rows
  scalar_t* cache_teacher;
  const scalar_t* src_student;  // the copies when cached, else the global rows
  const scalar_t* src_teacher;
  int head;
};

// Loss, status and gradients of a row whose target is not ignore_index. Returns kOk when it
// wrote them, else the status of a row that gets loss 0 and zero gradients.
template <typename Div, int kVec, typename scalar_t, typename acc_t>
__device__ __forceinline__ RowStatus process_row(const KernelArgs<scalar_t, acc_t>& args, const RowView<scalar_t>& r,
                                                 int64_t row, int64_t target) {
  using Math = DeviceMath<acc_t>;
  const int vocab = args.vocab;
  const bool has_target = args.target != nullptr;
  if (has_target && (target < 0 || target >= vocab)) return kTargetOutOfRange;
  const int y = static_cast<int>(target);  // -1 without target
  const bool need_soft = args.soft_weight != 0;
  const bool need_ce = has_target && args.hard_weight != 0;
  const bool separate_ce = need_ce && !args.unit_temperature;  // CE needs softmax(student) at T = 1
  const acc_t inv_t = args.inv_temperature;

  // The shared-memory copy of the row, all requests in flight at once. Each thread only reads
  // back the packs it copied itself (same mapping), so waiting for its own copies suffices.
  if (args.cache_rows) {
    for_each_pack<kVec>(vocab, r.head, [&](auto width, int j) {
      constexpr int n = decltype(width)::value;
      copy_to_shared_async<n>(r.cache_student + j, r.student + j);
      if (need_soft) copy_to_shared_async<n>(r.cache_teacher + j, r.teacher + j);
    });
    __pipeline_commit();
    __pipeline_wait_prior(0);
  }

  // Read 1: statistics.
  const acc_t anchor_a = Div::kSumsFromStats ? row_anchor(r.student, vocab, inv_t) : acc_t(0);
  const acc_t anchor_b = Div::kSumsFromStats && need_soft ? row_anchor(r.teacher, vocab, inv_t) : acc_t(0);
  using Stats = RowStats<acc_t, Div::kSumsFromStats>;
  Stats stats = Stats::identity();
  for_each_pack<kVec>(vocab, r.head, [&](auto width, int j) {
    constexpr int n = decltype(width)::value;
    const Pack<scalar_t, n> s = load_any<n>(r.src_student + j);
    acc_t a[n];
    to_acc_scaled(s, inv_t, a);
    const acc_t max_a = pack_max(a, stats.bad_student);
    if (need_soft) {
      acc_t b[n];
      to_acc_scaled(load_any<n>(r.src_teacher + j), inv_t, b);
      const acc_t max_b = pack_max(b, stats.bad_teacher);
      if constexpr (Div::kSumsFromStats) {
        accumulate_exp_with_support(a, b, max_a, max_b, anchor_a, anchor_b, stats.a, stats.b);
      } else {
        stats.a.accumulate_exp(a, max_a);
        stats.b.accumulate_exp(b, max_b);
      }
    } else {
      stats.a.accumulate_exp(a, max_a);
    }
    if (separate_ce) {
      acc_t c[n];
      to_acc_scaled(s, acc_t(1), c);
      stats.c.accumulate_exp(c, pack_max(c, stats.bad_student));
    }
  });
  stats = block_reduce(stats);
  if (stats.bad_student) return kStudentNonFinite;
  if (stats.bad_teacher) return kTeacherNonFinite;
  if (!(stats.a.sum[0] > 0)) return kStudentAllMasked;
  if (need_soft && !(stats.b.sum[0] > 0)) return kTeacherAllMasked;
  const acc_t lse_a = stats.a.lse();
  const acc_t lse_b = need_soft ? stats.b.lse() : acc_t(0);
  const acc_t lse_c = separate_ce ? stats.c.lse() : lse_a;

  acc_t ce = 0;
  if (need_ce) {
    const acc_t logit_y = to_acc(r.student[y]);
    if (logit_y == neg_inf<acc_t>()) return kTargetMasked;
    ce = lse_c - logit_y;
  }

  // Row sums of the divergence terms: from the statistics, or read 2.
  Terms<acc_t> sums{0, 0, 0};
  if (need_soft) {
    bool from_stats = false;
    if constexpr (Div::kSumsFromStats) {
      from_stats = anchors_hold(stats.a.max, anchor_a, stats.b.max, anchor_b);
      if (from_stats) {
        sums = Div::row_sums(SupportStats<acc_t>{stats.a.lse_above(anchor_a), stats.b.lse_above(anchor_b),
                                                 stats.a.mass(), stats.a.logratio(), stats.b.mass(),
                                                 stats.b.logratio()},
                             args.params);
      }
    }
    if (!from_stats) {
      TermSums<acc_t> part = TermSums<acc_t>::identity();
      for_each_pack<kVec>(vocab, r.head, [&](auto width, int j) {
        constexpr int n = decltype(width)::value;
        acc_t a[n], b[n];
        to_acc_scaled(load_any<n>(r.src_student + j), inv_t, a);
        to_acc_scaled(load_any<n>(r.src_teacher + j), inv_t, b);
#pragma unroll
        for (int i = 0; i < n; ++i) {
          const bool shared = (a[i] > neg_inf<acc_t>()) & (b[i] > neg_inf<acc_t>());
          const acc_t lq = shared ? a[i] - lse_a : acc_t(0), lp = shared ? b[i] - lse_b : acc_t(0);
          const Terms<acc_t> t = Div::template terms<Math>(lp, lq, Math::exp(lp), Math::exp(lq), args.params);
          part.t.value += shared ? t.value : acc_t(0);
          part.t.d_student += shared ? t.d_student : acc_t(0);
          part.t.d_teacher += shared ? t.d_teacher : acc_t(0);
        }
      });
      sums = block_reduce(part).t;
    }
  }
  const acc_t weight = args.row_weight ? static_cast<acc_t>(*args.row_weight) : acc_t(1);
  if (threadIdx.x == 0) {
    args.loss[row] = weight * (args.soft_weight * sums.value + args.hard_weight * ce);
    args.status[row] = kOk;
  }
  if (!r.grad_student && !r.grad_teacher) return kOk;

  // Read 3: gradients of the row loss: the soft term through the softmax Jacobian of the
  // divergence terms, plus the CE term softmax(student) - onehot(y).
  const acc_t soft_scale = weight * args.soft_weight * inv_t;
  const acc_t hard_weight = need_ce ? weight * args.hard_weight : acc_t(0);
  for_each_pack<kVec>(vocab, r.head, [&](auto width, int j) {
    constexpr int n = decltype(width)::value;
    const Pack<scalar_t, n> s = load_any<n>(r.src_student + j);
    Pack<scalar_t, n> t{};
    if (need_soft) t = load_any<n>(r.src_teacher + j);
    Pack<scalar_t, n> out_student, out_teacher;
#pragma unroll
    for (int i = 0; i < n; ++i) {
      const acc_t a = to_acc(s.v[i]) * inv_t;
      const acc_t q = Math::exp(a - lse_a);
      acc_t grad_s = hard_weight * (separate_ce ? Math::exp(to_acc(s.v[i]) - lse_c) : q);
      acc_t grad_t = 0;
      if (need_soft) {
        const acc_t b = to_acc(t.v[i]) * inv_t;
        const acc_t p = Math::exp(b - lse_b);
        const bool shared = (a > neg_inf<acc_t>()) & (b > neg_inf<acc_t>());
        const acc_t lq = shared ? a - lse_a : acc_t(0), lp = shared ? b - lse_b : acc_t(0);
        const Terms<acc_t> terms = Div::template terms<Math>(lp, lq, p, q, args.params);
        grad_s += soft_scale * ((shared ? terms.d_student : acc_t(0)) - q * sums.d_student);
        grad_t = soft_scale * ((shared ? terms.d_teacher : acc_t(0)) - p * sums.d_teacher);
      }
      if (j + i == y) grad_s -= hard_weight;
      out_student.v[i] = from_acc<scalar_t>(grad_s);
      out_teacher.v[i] = from_acc<scalar_t>(grad_t);
    }
    if (r.grad_student) store_streaming(r.grad_student + j, out_student);
    if (r.grad_teacher) store_streaming(r.grad_teacher + j, out_teacher);
  });
  return kOk;
}

// One CTA per row; blockDim.x a multiple of 32, at most kMaxThreads<acc_t>. With
// args.cache_rows the dynamic shared memory holds cache_elems(vocab, kVec) elements per read
// input (student, then teacher when soft_weight != 0). kVec > 1 requires the student, teacher
// and gradient rows to start at the same element offset modulo kVec.
template <typename Div, int kVec, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxThreads<acc_t>, kMinBlocksPerSM)
    kd_loss_rows_kernel(const KernelArgs<scalar_t, acc_t> args) {
  extern __shared__ __align__(16) unsigned char kd_row_cache[];
  const int64_t row = blockIdx.x;
  const int vocab = args.vocab;

  RowView<scalar_t> r;
  r.student = args.student + row * args.student_stride;
  r.teacher = args.teacher + row * args.teacher_stride;
  r.grad_student = args.grad_student ? args.grad_student + row * vocab : nullptr;
  r.grad_teacher = args.grad_teacher ? args.grad_teacher + row * vocab : nullptr;
  const int misalignment = static_cast<int>(reinterpret_cast<uintptr_t>(r.student) / sizeof(scalar_t) % kVec);
  r.head = (kVec - misalignment) % kVec < vocab ? (kVec - misalignment) % kVec : vocab;
  r.cache_student = reinterpret_cast<scalar_t*>(kd_row_cache) + misalignment;
  r.cache_teacher = r.cache_student + cache_elems(vocab, kVec);
  r.src_student = args.cache_rows ? r.cache_student : r.student;
  r.src_teacher = args.cache_rows ? r.cache_teacher : r.teacher;

  const int64_t target = args.target ? args.target[row] : -1;
  const bool ignored = args.target && target == args.ignore_index;
  const RowStatus status = ignored ? kOk : process_row<Div, kVec>(args, r, row, target);
  if (!ignored && status == kOk) return;

  // Ignored or failed row: loss 0 and zero gradients.
  if (threadIdx.x == 0) {
    args.status[row] = status;
    args.loss[row] = 0;
  }
  for_each_pack<kVec>(vocab, r.head, [&](auto width, int j) {
    constexpr int n = decltype(width)::value;
    Pack<scalar_t, n> zero;
#pragma unroll
    for (int i = 0; i < n; ++i) zero.v[i] = from_acc<scalar_t>(acc_t(0));
    if (r.grad_student) store_streaming(r.grad_student + j, zero);
    if (r.grad_teacher) store_streaming(r.grad_teacher + j, zero);
  });
}

}  // namespace cuda_kernels
}  // namespace kdkernels

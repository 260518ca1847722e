// CPU kernel of top-k KD (csrc/topk_kd_loss.h). Per row, with the k ids sorted:
//   read 1: online (max, sum) statistics of student/T over the entries outside the ids (the
//           ids' entries are taken out of each chunk as the walk along the sorted ids meets
//           them), which give the rest category's log-mass with no cancellation, plus those of
//           the raw student for the CE term at T != 1;
//   then:   the divergence over the k + 1 categories (a scalar loop over the divergence terms of
//           csrc/divergences.h, as the dense kernels use them);
//   read 2: the gradient. With d_c the divergence's q * df/dq of category c and S their sum, the
//           gradient with respect to a category's log-mass is d_c - q_c S, which an entry j of
//           the rest receives in proportion to its share of the rest's mass:
//           T dD/dx_j = d_rest * q_j / q_rest - S q_j, and an id i gets d_i - S q_i.
#include "../topk_kd_loss.h"
#include "../row_status.h"
#include "cpu_common.h"
#include "cpu_outputs.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <numeric>
#include <type_traits>
#include <vector>

namespace kdkernels {
namespace {

using namespace cpu;  // NOLINT(build/namespaces): the shared CPU kernel pieces

template <typename scalar_t, typename acc_t>
struct TopKArgs {
  const scalar_t* student;
  int64_t student_stride;
  const int64_t* indices;  // [N, k], rows sorted ascending
  const acc_t* logprobs;   // [N, k]
  const int64_t* target;   // nullptr without target
  acc_t* loss;
  scalar_t* grad_student;  // [N, V] contiguous, or nullptr
  int8_t* status;
  int64_t vocab, k, ignore_index;
  acc_t inv_temperature, soft_weight, hard_weight;
  bool unit_temperature, bucket;
  Divergence divergence;
  DivergenceParams<acc_t> params;
};

// Per-thread scratch of k + 1 categories: teacher and student values (b, a), their log-probs
// (lp, lq) and the divergence's q * df/dq (d).
template <typename acc_t>
struct Categories {
  std::vector<acc_t> b, a, lp, lq, d;
  std::vector<int64_t> order;
  explicit Categories(int64_t n) : b(n), a(n), lp(n), lq(n), d(n), order(n) {}
};

// log sum exp of x[0:n] as a LogNormaliser; sum 0 when every entry is -inf.
template <typename acc_t>
LogNormaliser<acc_t> normaliser_of(const acc_t* x, int64_t n, acc_t& sum) {
  const acc_t top = exp_offset(*std::max_element(x, x + n));
  sum = 0;
  for (int64_t c = 0; c < n; ++c) sum += std::exp(x[c] - top);
  return {top, std::log(sum)};
}

// Adaptive KL's weights over the categories, by the rule of the dense kernels: sorted by teacher
// value, a tie group is head if the cumulative teacher mass at its end is <= mu, the top group
// always; g = sum |p - q| over the categories finite in both.
template <typename acc_t>
void set_category_weights(Categories<acc_t>& cat, int64_t n, DivergenceParams<acc_t>& params) {
  std::iota(cat.order.begin(), cat.order.begin() + n, int64_t{0});
  std::sort(cat.order.begin(), cat.order.begin() + n, [&](int64_t x, int64_t y) { return cat.b[x] > cat.b[y]; });
  acc_t cumulative = 0, g_head = 0, g_tail = 0;
  for (int64_t start = 0; start < n;) {
    int64_t end = start;
    acc_t mass = 0, error = 0;
    for (; end < n && cat.b[cat.order[end]] == cat.b[cat.order[start]]; ++end) {
      const int64_t c = cat.order[end];
      const acc_t p = std::exp(cat.lp[c]), q = std::exp(cat.lq[c]);
      mass += p;
      const bool shared = std::isfinite(cat.lp[c]) && std::isfinite(cat.lq[c]);
      error += shared ? std::abs(p - q) : acc_t(0);
    }
    cumulative += mass;
    (cumulative <= params.head_mass || start == 0 ? g_head : g_tail) += error;
    start = end;
  }
  const acc_t total = g_head + g_tail;
  params.weight = total > 0 ? g_head / total : acc_t(0.5);
  params.complement = total > 0 ? g_tail / total : acc_t(0.5);
}

// The divergence over the categories: its row sums, with each category's d_student in cat.d
// (0 where a category is masked in either input).
template <typename Div, typename acc_t>
Terms<acc_t> category_terms(Categories<acc_t>& cat, int64_t n, const DivergenceParams<acc_t>& params) {
  Terms<acc_t> sums{0, 0, 0};
  for (int64_t c = 0; c < n; ++c) {
    const bool shared = std::isfinite(cat.lp[c]) && std::isfinite(cat.lq[c]);
    const Terms<acc_t> t =
        shared ? Div::template terms<MathFor<acc_t>>(cat.lp[c], cat.lq[c], std::exp(cat.lp[c]), std::exp(cat.lq[c]), params)
               : Terms<acc_t>{0, 0, 0};
    cat.d[c] = t.d_student;
    sums.value += t.value;
    sums.d_student += t.d_student;
    sums.d_teacher += t.d_teacher;
  }
  return sums;
}

template <typename scalar_t, typename acc_t>
KD_INLINE void finish_row(const TopKArgs<scalar_t, acc_t>& args, int64_t row, RowStatus status) {
  args.status[row] = status;
  args.loss[row] = 0;
  if (args.grad_student) std::fill_n(args.grad_student + row * args.vocab, args.vocab, scalar_t(0));
}

// The status of a row's ids: in [0, V) and, sorted, strictly increasing.
inline RowStatus check_ids(const int64_t* ids, int64_t k, int64_t vocab) {
  if (ids[0] < 0 || ids[k - 1] >= vocab) return kIndexOutOfRange;
  for (int64_t c = 1; c < k; ++c) {
    if (ids[c] == ids[c - 1]) return kDuplicateIndex;
  }
  return kOk;
}

template <typename scalar_t, typename acc_t>
KD_INLINE void topk_row(const TopKArgs<scalar_t, acc_t>& args, int64_t row, acc_t* a, acc_t* c_buf,
                        Categories<acc_t>& cat) {
  using Math = MathFor<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t vocab = args.vocab, k = args.k, rest = k;  // category k is the rest of the vocabulary
  const scalar_t* x = args.student + row * args.student_stride;
  const int64_t* ids = args.indices + row * k;
  const acc_t* logprobs = args.logprobs + row * k;
  const bool has_target = args.target != nullptr;
  const int64_t y = has_target ? args.target[row] : -1;
  if (has_target && y == args.ignore_index) return finish_row(args, row, kOk);
  if (has_target && (y < 0 || y >= vocab)) return finish_row(args, row, kTargetOutOfRange);
  const RowStatus id_status = check_ids(ids, k, vocab);
  if (id_status != kOk) return finish_row(args, row, id_status);
  const bool need_soft = args.soft_weight != 0;
  const bool need_ce = has_target && args.hard_weight != 0;
  const bool separate_ce = need_ce && !args.unit_temperature;
  const acc_t inv_t = args.inv_temperature;

  // The teacher's categories.
  acc_t mass = 0;
  for (int64_t c = 0; c < k; ++c) {
    if (!(logprobs[c] <= std::numeric_limits<acc_t>::max())) return finish_row(args, row, kTeacherNonFinite);
    cat.b[c] = logprobs[c] * inv_t;
    mass += std::exp(logprobs[c]);
  }
  cat.b[rest] = args.bucket && mass < 1 ? std::log1p(-mass) * inv_t : kNegInf;
  acc_t teacher_sum;
  const LogNormaliser<acc_t> norm_b = normaliser_of(cat.b.data(), k + 1, teacher_sum);
  if (need_soft && !(teacher_sum > 0)) return finish_row(args, row, kTeacherAllMasked);

  // Read 1: the rest's statistics; the ids' values are set aside in cat.a as the walk meets them.
  OnlineSide<acc_t> rest_side, side_c;
  int bad = 0;
  int64_t next = 0;
  for (int64_t j0 = 0; j0 < vocab; j0 += kChunk) {
    const int64_t n = std::min(kChunk, vocab - j0);
    load_scaled(x + j0, n, inv_t, a);
    for (; next < k && ids[next] < j0 + n; ++next) {
      cat.a[next] = a[ids[next] - j0];
      a[ids[next] - j0] = kNegInf;
    }
    accumulate_exp(a, n, chunk_max(a, n, bad), rest_side);
    if (separate_ce) {
      load_scaled(x + j0, n, acc_t(1), c_buf);
      accumulate_exp(c_buf, n, chunk_max(c_buf, n, bad), side_c);
    }
  }
  for (int64_t c = 0; c < k; ++c) bad |= !(cat.a[c] <= std::numeric_limits<acc_t>::max());
  if (bad) return finish_row(args, row, kStudentNonFinite);
  const bool rest_live = rest_side.sum > 0;
  const LogNormaliser<acc_t> norm_rest = rest_live ? rest_side.normaliser() : LogNormaliser<acc_t>{0, 0};
  cat.a[rest] = rest_live ? norm_rest.max + norm_rest.log_sum : kNegInf;
  acc_t student_sum;
  const LogNormaliser<acc_t> norm_a = normaliser_of(cat.a.data(), k + 1, student_sum);
  if (!(student_sum > 0)) return finish_row(args, row, kStudentAllMasked);
  // At T = 1 the categories' normaliser is the row's.
  const LogNormaliser<acc_t> norm_c = separate_ce ? side_c.normaliser() : norm_a;

  acc_t ce = 0;
  if (need_ce) {
    const acc_t logit_y = static_cast<acc_t>(x[y]);
    if (logit_y == kNegInf) return finish_row(args, row, kTargetMasked);
    ce = -norm_c.log_prob(logit_y);
  }

  // The divergence over the categories.
  for (int64_t c = 0; c <= k; ++c) {
    cat.lp[c] = norm_b.log_prob(cat.b[c]);
    cat.lq[c] = norm_a.log_prob(cat.a[c]);
  }
  DivergenceParams<acc_t> params = args.params;
  Terms<acc_t> sums{0, 0, 0};
  if (need_soft) {
    if (args.divergence == Divergence::kAdaptiveKL) set_category_weights(cat, k + 1, params);
    dispatch_divergence(args.divergence, [&](auto div) { sums = category_terms<decltype(div)>(cat, k + 1, params); });
  } else {
    std::fill(cat.d.begin(), cat.d.end(), acc_t(0));
  }
  args.loss[row] = args.soft_weight * sums.value + args.hard_weight * ce;
  args.status[row] = kOk;
  if (!args.grad_student) return;

  // Read 2: the gradient, the rest's formula for every entry, then the ids' own.
  const acc_t soft_scale = args.soft_weight * inv_t, sum_d = sums.d_student, d_rest = cat.d[rest];
  const acc_t ce_weight = need_ce ? args.hard_weight : acc_t(0);
  const auto ce_grad = [&](acc_t logit, acc_t a_value) {  // hard_weight * softmax(student) at one entry
    return ce_weight * Math::exp(separate_ce ? norm_c.log_prob(logit) : norm_a.log_prob(a_value));
  };
  scalar_t* grad = args.grad_student + row * vocab;
  next = 0;
  for (int64_t j0 = 0; j0 < vocab; j0 += kChunk) {
    const int64_t n = std::min(kChunk, vocab - j0);
    load_scaled(x + j0, n, inv_t, a);
    if (separate_ce) load_scaled(x + j0, n, acc_t(1), c_buf);
    // Branch-free variants, so that the loop vectorises: with the rest's share q / q_rest where
    // d_rest != 0, with the CE term's softmax of the raw logits where T != 1.
    const auto rest_formula = [&](auto with_share, auto with_separate_ce) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const acc_t q = Math::exp(norm_a.log_prob(a[i]));
        acc_t soft = -sum_d * q;
        if constexpr (decltype(with_share)::value) soft += d_rest * Math::exp(norm_rest.log_prob(a[i]));
        if constexpr (decltype(with_separate_ce)::value) {
          a[i] = soft_scale * soft + ce_weight * Math::exp(norm_c.log_prob(c_buf[i]));
        } else {
          a[i] = soft_scale * soft + ce_weight * q;
        }
      }
    };
    const std::true_type yes;
    const std::false_type no;
    if (d_rest != 0) {
      separate_ce ? rest_formula(yes, yes) : rest_formula(yes, no);
    } else {
      separate_ce ? rest_formula(no, yes) : rest_formula(no, no);
    }
    for (; next < k && ids[next] < j0 + n; ++next) {
      const int64_t i = ids[next] - j0;
      a[i] = soft_scale * (cat.d[next] - sum_d * std::exp(cat.lq[next])) +
             ce_grad(static_cast<acc_t>(x[ids[next]]), cat.a[next]);
    }
    if (y >= j0 && y < j0 + n) a[y - j0] -= ce_weight;
    store(a, n, grad + j0);
  }
}

template <typename scalar_t, typename acc_t>
KD_CPU_CLONES void topk_rows(const TopKArgs<scalar_t, acc_t>& args, int64_t begin, int64_t end) {
  alignas(64) acc_t a[kChunk], c[kChunk];
  Categories<acc_t> cat(args.k + 1);
  for (int64_t row = begin; row < end; ++row) topk_row(args, row, a, c, cat);
}

}  // namespace

TopKKDLossOutputs topk_kd_loss_forward_cpu(const at::Tensor& student, const at::Tensor& indices,
                                           const at::Tensor& logprobs, const std::optional<at::Tensor>& target,
                                           const std::optional<at::Tensor>& row_weight, double temperature,
                                           double soft_weight, double hard_weight, int64_t divergence,
                                           const std::vector<double>& divergence_args, bool bucket,
                                           int64_t ignore_index, bool student_grad) {
  constexpr const char* kEntry = "topk_kd_loss_forward_cpu";
  TORCH_CHECK(student.dim() == 2 && student.device().is_cpu(), kEntry, ": CPU student logits [N, V] expected");
  TORCH_CHECK(student.size(1) <= 1 || student.stride(1) == 1, kEntry, ": unit stride along V expected");
  const int64_t rows = student.size(0), vocab = student.size(1);
  const auto acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(indices.dim() == 2 && indices.size(0) == rows && indices.size(1) >= 1 &&
                  indices.scalar_type() == at::kLong && indices.is_contiguous() && indices.device().is_cpu(),
              kEntry, ": indices must be contiguous int64 [N, k] on the CPU");
  TORCH_CHECK(logprobs.sizes() == indices.sizes() && logprobs.scalar_type() == acc_dtype && logprobs.is_contiguous() &&
                  logprobs.device().is_cpu(),
              kEntry, ": logprobs must be contiguous [N, k] in the accumulation dtype on the CPU");
  TORCH_CHECK(temperature > 0, kEntry, ": temperature must be > 0");
  TORCH_CHECK(!target.has_value() || (target->scalar_type() == at::kLong && target->dim() == 1 &&
                                      target->size(0) == rows && target->device().is_cpu()),
              kEntry, ": target must be int64 [N] on the CPU");
  const at::Tensor target_rows = target.has_value() ? target->contiguous() : at::Tensor();
  if (row_weight.has_value()) {
    TORCH_CHECK(row_weight->numel() == 1 && row_weight->is_floating_point(), kEntry,
                ": row_weight must be a one-element floating tensor");
    const double weight = row_weight->item<double>();
    soft_weight *= weight;
    hard_weight *= weight;
  }
  const auto id = static_cast<Divergence>(divergence);
  TORCH_CHECK_VALUE(dispatch_divergence(id, [](auto) {}), kEntry, ": unknown divergence id ", divergence);
  at::Tensor loss = at::empty({rows}, student.options().dtype(acc_dtype));
  at::Tensor grad_student = empty_output({student_grad ? rows : 0, vocab}, student.options());
  at::Tensor status = at::empty({rows}, student.options().dtype(at::kChar));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), kEntry, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const TopKArgs<scalar_t, acc_t> args{
        student.data_ptr<scalar_t>(), student.stride(0), indices.data_ptr<int64_t>(), logprobs.data_ptr<acc_t>(),
        target_rows.defined() ? target_rows.data_ptr<int64_t>() : nullptr, loss.data_ptr<acc_t>(),
        student_grad ? grad_student.data_ptr<scalar_t>() : nullptr, status.data_ptr<int8_t>(), vocab,
        indices.size(1), ignore_index, static_cast<acc_t>(1.0 / temperature), static_cast<acc_t>(soft_weight),
        static_cast<acc_t>(hard_weight), temperature == 1.0, bucket, id,
        make_divergence_params<acc_t>(id, divergence_args)};
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(vocab, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { topk_rows(args, begin, end); });
  });
  return {loss, grad_student, status};
}

}  // namespace kdkernels

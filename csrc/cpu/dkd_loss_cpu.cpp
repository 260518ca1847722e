// CPU kernel of DKD (csrc/dkd_loss.h). Per row, two reads of student and teacher:
//   read 1: online (max, sum) statistics of student/T and teacher/T over all classes and over the
//           non-target classes, which give log q_y, log(1 - q_y) = log(sum over j != y) - log(sum)
//           (no cancellation where q_y is near 1) and the same for the teacher: the TCKD term;
//   read 2: the NCKD term over the non-target classes and the gradient,
//           T * (alpha * (q_j - (1 - p_y) q^_j) + beta * (q^_j - p^_j)) for j != y and
//           T * alpha * (q_y - p_y) at y (no row sum needed).
#include "../dkd_loss.h"
#include "../kd_loss.h"
#include "../row_status.h"
#include "cpu_common.h"
#include "cpu_outputs.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

namespace kdkernels {
namespace {

using namespace cpu;  // NOLINT(build/namespaces): the shared CPU kernel pieces

template <typename scalar_t, typename acc_t>
struct DKDArgs {
  const scalar_t* student;
  const scalar_t* teacher;
  int64_t student_stride, teacher_stride;
  const int64_t* target;
  acc_t* loss;
  scalar_t* grad_student;  // [N, V] contiguous, or nullptr
  int8_t* status;
  int64_t vocab, ignore_index;
  acc_t inv_temperature, temperature, alpha, beta, weight;
};

// Flags NaN and +-inf: DKD takes finite logits.
template <typename acc_t>
KD_INLINE void flag_non_finite(const acc_t* x, int64_t n, int& bad) {
  int b = 0;
#pragma omp simd reduction(| : b)
  for (int64_t i = 0; i < n; ++i) b |= !(std::abs(x[i]) <= std::numeric_limits<acc_t>::max());
  bad |= b;
}

// Statistics of a chunk over all classes (all) and over the non-target ones (rest, with its own
// max, so that log(1 - q_y) stays exact even where every other class underflows next to y).
template <typename acc_t>
KD_INLINE void accumulate_split(acc_t* x, int64_t n, int64_t target_in_chunk, int& bad, OnlineSide<acc_t>& all,
                                OnlineSide<acc_t>& rest) {
  flag_non_finite(x, n, bad);
  accumulate_exp(x, n, chunk_max(x, n, bad), all);
  if (target_in_chunk >= 0 && target_in_chunk < n) x[target_in_chunk] = -std::numeric_limits<acc_t>::infinity();
  accumulate_exp(x, n, chunk_max(x, n, bad), rest);
}

template <typename scalar_t, typename acc_t>
KD_INLINE void finish_row(const DKDArgs<scalar_t, acc_t>& args, int64_t row, RowStatus status) {
  args.status[row] = status;
  args.loss[row] = 0;
  if (args.grad_student) std::fill_n(args.grad_student + row * args.vocab, args.vocab, scalar_t(0));
}

template <typename scalar_t, typename acc_t>
KD_INLINE void dkd_row(const DKDArgs<scalar_t, acc_t>& args, int64_t row, acc_t* a, acc_t* b) {
  using Math = MathFor<acc_t>;
  const int64_t vocab = args.vocab;
  const int64_t y = args.target[row];
  if (y == args.ignore_index) return finish_row(args, row, kOk);
  if (y < 0 || y >= vocab) return finish_row(args, row, kTargetOutOfRange);
  const scalar_t* student = args.student + row * args.student_stride;
  const scalar_t* teacher = args.teacher + row * args.teacher_stride;
  const acc_t inv_t = args.inv_temperature;

  OnlineSide<acc_t> all_a, rest_a, all_b, rest_b;
  int bad_student = 0, bad_teacher = 0;
  for (int64_t j0 = 0; j0 < vocab; j0 += kChunk) {
    const int64_t n = std::min(kChunk, vocab - j0);
    load_scaled(student + j0, n, inv_t, a);
    load_scaled(teacher + j0, n, inv_t, b);
    accumulate_split(a, n, y - j0, bad_student, all_a, rest_a);
    accumulate_split(b, n, y - j0, bad_teacher, all_b, rest_b);
  }
  if (bad_student) return finish_row(args, row, kStudentNonFinite);
  if (bad_teacher) return finish_row(args, row, kTeacherNonFinite);
  const LogNormaliser<acc_t> norm_a = all_a.normaliser(), norm_b = all_b.normaliser();
  const LogNormaliser<acc_t> norm_rest_a = rest_a.normaliser(), norm_rest_b = rest_b.normaliser();
  const acc_t a_y = static_cast<acc_t>(student[y]) * inv_t, b_y = static_cast<acc_t>(teacher[y]) * inv_t;
  const acc_t log_q_y = norm_a.log_prob(a_y), log_p_y = norm_b.log_prob(b_y);
  // log(1 - q_y) = log(sum over j != y) - log(sum over all j), each taken at its own max.
  const acc_t log_q_rest = norm_a.log_prob(norm_rest_a.max) + norm_rest_a.log_sum;
  const acc_t log_p_rest = norm_b.log_prob(norm_rest_b.max) + norm_rest_b.log_sum;
  const acc_t p_y = std::exp(log_p_y), p_rest = std::exp(log_p_rest);
  const acc_t tckd = p_y * (log_p_y - log_q_y) + p_rest * (log_p_rest - log_q_rest);

  // Read 2: NCKD and the gradient. Non-target log-probs: (x - max) - log(sum over j != y).
  const acc_t scale = args.weight * args.temperature;  // d(T^2 * loss') / d(student) = T * d loss' / d(student / T)
  acc_t nckd = 0;
  for (int64_t j0 = 0; j0 < vocab; j0 += kChunk) {
    const int64_t n = std::min(kChunk, vocab - j0);
    load_scaled(student + j0, n, inv_t, a);
    load_scaled(teacher + j0, n, inv_t, b);
    const int64_t target_in_chunk = y - j0;
    acc_t part = 0;
#pragma omp simd reduction(+ : part)
    for (int64_t i = 0; i < n; ++i) {
      const bool rest = i != target_in_chunk;
      const acc_t lq_hat = norm_rest_a.log_prob(a[i]), lp_hat = norm_rest_b.log_prob(b[i]);
      const acc_t q = Math::exp(norm_a.log_prob(a[i])), q_hat = Math::exp(lq_hat), p_hat = Math::exp(lp_hat);
      part += rest ? p_hat * (lp_hat - lq_hat) : acc_t(0);
      const acc_t grad = rest ? args.alpha * (q - p_rest * q_hat) + args.beta * (q_hat - p_hat)
                              : args.alpha * (q - p_y);
      a[i] = scale * grad;
    }
    nckd += part;
    if (args.grad_student) store(a, n, args.grad_student + row * vocab + j0);
  }
  args.loss[row] = args.weight * args.temperature * args.temperature * (args.alpha * tckd + args.beta * nckd);
  args.status[row] = kOk;
}

template <typename scalar_t, typename acc_t>
KD_CPU_CLONES void dkd_rows(const DKDArgs<scalar_t, acc_t>& args, int64_t begin, int64_t end) {
  alignas(64) acc_t a[kChunk], b[kChunk];
  for (int64_t row = begin; row < end; ++row) dkd_row(args, row, a, b);
}

}  // namespace

DKDLossOutputs dkd_loss_forward_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& target,
                                    const std::optional<at::Tensor>& row_weight, double temperature, double alpha,
                                    double beta, int64_t ignore_index, bool student_grad) {
  const at::Tensor target_rows =
      check_kd_loss_inputs("dkd_loss_forward_cpu", student, teacher, target, row_weight, temperature);
  TORCH_CHECK(student.device().is_cpu(), "dkd_loss_forward_cpu: CPU tensors expected");
  TORCH_CHECK(student.size(1) >= 2, "dkd_loss_forward_cpu: V >= 2 expected");
  const double weight = row_weight.has_value() ? row_weight->item<double>() : 1.0;
  const int64_t rows = student.size(0), vocab = student.size(1);
  const auto acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::empty({rows}, student.options().dtype(acc_dtype));
  at::Tensor grad_student = empty_output({student_grad ? rows : 0, vocab}, student.options());
  at::Tensor status = at::empty({rows}, student.options().dtype(at::kChar));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "dkd_loss_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const DKDArgs<scalar_t, acc_t> args{
        student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(), student.stride(0), teacher.stride(0),
        target_rows.data_ptr<int64_t>(), loss.data_ptr<acc_t>(),
        student_grad ? grad_student.data_ptr<scalar_t>() : nullptr, status.data_ptr<int8_t>(), vocab, ignore_index,
        static_cast<acc_t>(1.0 / temperature), static_cast<acc_t>(temperature), static_cast<acc_t>(alpha),
        static_cast<acc_t>(beta), static_cast<acc_t>(weight)};
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / vocab);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { dkd_rows(args, begin, end); });
  });
  return {loss, grad_student, status};
}

}  // namespace kdkernels

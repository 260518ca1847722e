// CPU kernels of DIST (csrc/dist_loss.h). Rows are handled in fixed blocks of kRowBlock rows,
// each block on one thread; a row's softmax of both inputs is formed once per pass in two
// row-long buffers. Column sums are taken per block and then over the blocks.
//   stats: one pass: the row sums, and the blocks' column sums of d = y - y[0] (shifted by the
//          first row, so that a column that barely varies keeps its digits) and of their
//          products and squares, from which the centred column sums follow;
//   grad: one pass, the row's g (from per-column weights prepared once, contiguous) and its dot
//         with y_s, then the gradient.
// The row loops are cloned per x86 ISA level, as the kd_loss kernel.
#include "../dist_loss.h"
#include "cpu_common.h"
#include "cpu_outputs.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace kdkernels {
namespace {

using namespace cpu;  // NOLINT(build/namespaces): the shared CPU kernel pieces

constexpr int64_t kRowBlock = 32;
constexpr int kColumnSums = 5;  // sum of d_s, d_t, d_s d_t, d_s^2, d_t^2

// softmax(x / T) of one row into y.
template <typename scalar_t, typename acc_t>
KD_INLINE void softmax_row(const scalar_t* x, int64_t n, acc_t inv_t, acc_t* y) {
  using Math = MathFor<acc_t>;
  load_scaled(x, n, inv_t, y);
  int bad = 0;
  const acc_t offset = exp_offset(chunk_max(y, n, bad));
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    y[i] = Math::exp(y[i] - offset);
    sum += y[i];
  }
  const acc_t inv_sum = acc_t(1) / sum;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] *= inv_sum;
}

template <typename scalar_t, typename acc_t>
struct DistArgs {
  const scalar_t* student;
  const scalar_t* teacher;
  int64_t student_stride, teacher_stride, rows, classes;
  acc_t inv_t;
  acc_t* row_stats;       // stats: [N, 3]
  acc_t* column_parts;    // stats: [blocks, kColumnSums, C]
  const acc_t* shift_s;   // stats: y_s and y_t of row 0
  const acc_t* shift_t;
  const acc_t* row_coef;         // grad: [N, 2]
  const acc_t* column_weights;   // grad: ColumnWeights, kColumnWeights x C
  scalar_t* grad;
};

template <typename scalar_t, typename acc_t>
KD_INLINE void stats_row(const DistArgs<scalar_t, acc_t>& args, int64_t block, int64_t row, const acc_t* y_s,
                         const acc_t* y_t) {
  const int64_t classes = args.classes;
  const acc_t row_mean = acc_t(1) / static_cast<acc_t>(classes);
  acc_t ab = 0, aa = 0, bb = 0;
#pragma omp simd reduction(+ : ab, aa, bb)
  for (int64_t j = 0; j < classes; ++j) {
    const acc_t a = y_s[j] - row_mean, b = y_t[j] - row_mean;
    ab += a * b;
    aa += a * a;
    bb += b * b;
  }
  args.row_stats[row * 3] = ab;
  args.row_stats[row * 3 + 1] = aa;
  args.row_stats[row * 3 + 2] = bb;
  acc_t* sum_s = args.column_parts + block * kColumnSums * classes;
  acc_t* sum_t = sum_s + classes;
  acc_t* sum_st = sum_t + classes;
  acc_t* sum_ss = sum_st + classes;
  acc_t* sum_tt = sum_ss + classes;
#pragma omp simd
  for (int64_t j = 0; j < classes; ++j) {
    const acc_t d_s = y_s[j] - args.shift_s[j], d_t = y_t[j] - args.shift_t[j];
    sum_s[j] += d_s;
    sum_t[j] += d_t;
    sum_st[j] += d_s * d_t;
    sum_ss[j] += d_s * d_s;
    sum_tt[j] += d_t * d_t;
  }
}

// The gradient's per-column weights, kColumnWeights rows of C: g of row i, less terms constant
// along the row (which cancel in g - sum_k g y_s), is
//   y_t[j] (row_coef[i, 0] + teacher[j]) - y_s[j] (row_coef[i, 1] + student[j]) + offset[j],
// with teacher = column_coef[:, 0], student = column_coef[:, 1] and
// offset = column_coef[:, 1] m_s - column_coef[:, 0] m_t.
enum ColumnWeights : int { kTeacherWeight = 0, kStudentWeight = 1, kOffset = 2, kColumnWeights = 3 };

template <typename scalar_t, typename acc_t>
KD_INLINE void grad_row(const DistArgs<scalar_t, acc_t>& args, int64_t row, const acc_t* y_s, const acc_t* y_t,
                        acc_t* g) {
  const int64_t classes = args.classes;
  const acc_t row_b = args.row_coef[row * 2], row_a = args.row_coef[row * 2 + 1];
  const acc_t* teacher_weight = args.column_weights + kTeacherWeight * classes;
  const acc_t* student_weight = args.column_weights + kStudentWeight * classes;
  const acc_t* offset = args.column_weights + kOffset * classes;
  acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < classes; ++j) {
    g[j] = y_t[j] * (row_b + teacher_weight[j]) - y_s[j] * (row_a + student_weight[j]) + offset[j];
    dot += g[j] * y_s[j];
  }
  scalar_t* out = args.grad + row * classes;
#pragma omp simd
  for (int64_t j = 0; j < classes; ++j) out[j] = static_cast<scalar_t>(args.inv_t * y_s[j] * (g[j] - dot));
}

// The rows of blocks [begin, end): their softmaxes, then the stats or the gradient of each.
template <bool kGrad, typename scalar_t, typename acc_t>
KD_CPU_CLONES void dist_blocks(const DistArgs<scalar_t, acc_t>& args, int64_t begin, int64_t end, acc_t* y_s,
                               acc_t* y_t, acc_t* g) {
  for (int64_t block = begin; block < end; ++block) {
    for (int64_t row = block * kRowBlock; row < std::min(args.rows, (block + 1) * kRowBlock); ++row) {
      softmax_row(args.student + row * args.student_stride, args.classes, args.inv_t, y_s);
      softmax_row(args.teacher + row * args.teacher_stride, args.classes, args.inv_t, y_t);
      if constexpr (kGrad) {
        grad_row(args, row, y_s, y_t, g);
      } else {
        stats_row(args, block, row, y_s, y_t);
      }
    }
  }
}

template <bool kGrad, typename scalar_t, typename acc_t>
void for_all_blocks(const DistArgs<scalar_t, acc_t>& args) {
  const int64_t blocks = (args.rows + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> y_s(args.classes), y_t(args.classes), g(kGrad ? args.classes : 0);
    dist_blocks<kGrad>(args, begin, end, y_s.data(), y_t.data(), g.data());
  });
}

template <typename scalar_t>
void dist_stats(const at::Tensor& student, const at::Tensor& teacher, double temperature, at::Tensor& row_stats,
                at::Tensor& column_stats, at::Tensor& parts) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = student.size(0), classes = student.size(1), blocks = parts.size(0);
  std::vector<acc_t> shift_s(classes), shift_t(classes);
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  softmax_row(student.data_ptr<scalar_t>(), classes, inv_t, shift_s.data());
  softmax_row(teacher.data_ptr<scalar_t>(), classes, inv_t, shift_t.data());
  const DistArgs<scalar_t, acc_t> args{student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(), student.stride(0),
                                       teacher.stride(0), rows, classes, inv_t, row_stats.data_ptr<acc_t>(),
                                       parts.data_ptr<acc_t>(), shift_s.data(), shift_t.data(), nullptr, nullptr,
                                       nullptr};
  for_all_blocks<false>(args);
  // The blocks' sums, then the column means and centred sums: sum (y - m)(y' - m') = sum d d' - N e e'
  // with e = mean of d.
  const acc_t* part = parts.data_ptr<acc_t>();
  acc_t* out = column_stats.data_ptr<acc_t>();
  const acc_t inv_rows = acc_t(1) / static_cast<acc_t>(rows);
  at::parallel_for(0, classes, 256, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      acc_t sums[kColumnSums] = {0, 0, 0, 0, 0};
      for (int64_t block = 0; block < blocks; ++block) {
        for (int k = 0; k < kColumnSums; ++k) sums[k] += part[(block * kColumnSums + k) * classes + j];
      }
      const acc_t e_s = sums[0] * inv_rows, e_t = sums[1] * inv_rows;
      out[j * 5] = shift_s[j] + e_s;
      out[j * 5 + 1] = shift_t[j] + e_t;
      out[j * 5 + 2] = sums[2] - sums[0] * e_t;
      out[j * 5 + 3] = std::max(sums[3] - sums[0] * e_s, acc_t(0));
      out[j * 5 + 4] = std::max(sums[4] - sums[1] * e_t, acc_t(0));
    }
  });
}

template <typename scalar_t>
void dist_grad(const at::Tensor& student, const at::Tensor& teacher, double temperature, const at::Tensor& row_c,
               const at::Tensor& column_c, const at::Tensor& stats, at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t classes = student.size(1);
  const acc_t* coef = column_c.data_ptr<acc_t>();
  const acc_t* mean = stats.data_ptr<acc_t>();
  std::vector<acc_t> weights(kColumnWeights * classes);
  for (int64_t j = 0; j < classes; ++j) {
    weights[kTeacherWeight * classes + j] = coef[j * 2];
    weights[kStudentWeight * classes + j] = coef[j * 2 + 1];
    weights[kOffset * classes + j] = coef[j * 2 + 1] * mean[j * 5] - coef[j * 2] * mean[j * 5 + 1];
  }
  const DistArgs<scalar_t, acc_t> args{student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(), student.stride(0),
                                       teacher.stride(0), student.size(0), classes,
                                       static_cast<acc_t>(1.0 / temperature), nullptr, nullptr, nullptr, nullptr,
                                       row_c.data_ptr<acc_t>(), weights.data(), grad.data_ptr<scalar_t>()};
  for_all_blocks<true>(args);
}

void check_inputs(const char* op, const at::Tensor& student, const at::Tensor& teacher) {
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu(), op, ": CPU tensors expected");
  TORCH_CHECK(student.dim() == 2 && teacher.sizes() == student.sizes() && student.size(0) >= 1 &&
                  student.stride(1) == 1 && teacher.stride(1) == 1 && teacher.scalar_type() == student.scalar_type(),
              op, ": [N, C] inputs (N >= 1) of one dtype with unit stride along C expected");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> dist_loss_stats_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                       double temperature) {
  check_inputs("dist_loss_stats_cpu", student, teacher);
  const int64_t rows = student.size(0), classes = student.size(1);
  const auto acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto options = student.options().dtype(acc_dtype);
  at::Tensor row_stats = at::empty({rows, 3}, options);
  at::Tensor column_stats = at::empty({classes, 5}, options);
  at::Tensor parts = at::zeros({(rows + kRowBlock - 1) / kRowBlock, kColumnSums, classes}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "dist_loss_stats_cpu", [&] {
    dist_stats<scalar_t>(student, teacher, temperature, row_stats, column_stats, parts);
  });
  return {row_stats, column_stats};
}

at::Tensor dist_loss_grad_cpu(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                              const at::Tensor& row_coef, const at::Tensor& column_coef,
                              const at::Tensor& column_stats) {
  check_inputs("dist_loss_grad_cpu", student, teacher);
  const int64_t rows = student.size(0), classes = student.size(1);
  const auto acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor row_c = row_coef.to(acc_dtype).contiguous(), column_c = column_coef.to(acc_dtype).contiguous();
  const at::Tensor stats = column_stats.to(acc_dtype).contiguous();
  TORCH_CHECK(row_c.sizes() == at::IntArrayRef({rows, 2}) && column_c.sizes() == at::IntArrayRef({classes, 2}) &&
                  stats.sizes() == at::IntArrayRef({classes, 5}),
              "dist_loss_grad_cpu: row_coef [N, 2], column_coef [C, 2] and column_stats [C, 5] expected");
  at::Tensor grad = empty_output({rows, classes}, student.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "dist_loss_grad_cpu", [&] {
    dist_grad<scalar_t>(student, teacher, temperature, row_c, column_c, stats, grad);
  });
  return grad;
}

}  // namespace kdkernels

// CPU kernels of DIST (csrc/dist_loss.h). Rows are handled in fixed blocks of kRowBlock rows,
// each block on one thread; a row's softmax of both inputs is formed once per pass in two
// row-long buffers. Column sums are taken per block and then over the blocks.
//   stats, pass 1: row sums and the blocks' column sums of y (the column means);
//   stats, pass 2: the blocks' column sums of the centred products and squares;
//   grad: one pass, the row's g and its dot with y_s, then the gradient.
#include "../dist_loss.h"
#include "cpu_common.h"

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
struct Rows {
  const scalar_t* student;
  const scalar_t* teacher;
  int64_t student_stride, teacher_stride, rows, classes;
  acc_t inv_t;

  // Calls fn(block, row, y_s, y_t) for every row, with y the row's softmaxes (in the thread's
  // buffers); blocks of kRowBlock rows are spread over the threads.
  template <typename Fn>
  void for_each_row(Fn&& fn) const {
    const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> y_s(classes), y_t(classes);
      for (int64_t block = begin; block < end; ++block) {
        for (int64_t row = block * kRowBlock; row < std::min(rows, (block + 1) * kRowBlock); ++row) {
          softmax_row(student + row * student_stride, classes, inv_t, y_s.data());
          softmax_row(teacher + row * teacher_stride, classes, inv_t, y_t.data());
          fn(block, row, y_s.data(), y_t.data());
        }
      }
    });
  }
};

template <typename scalar_t>
void dist_stats(const at::Tensor& student, const at::Tensor& teacher, double temperature, at::Tensor& row_stats,
                at::Tensor& column_stats, at::Tensor& means, at::Tensor& centred) {
  const int64_t rows = student.size(0), classes = student.size(1);
  const int64_t blocks = means.size(0);
  using acc_t = at::opmath_type<scalar_t>;
  const Rows<scalar_t, acc_t> all{student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(), student.stride(0),
                                  teacher.stride(0), rows, classes, static_cast<acc_t>(1.0 / temperature)};
  const acc_t row_mean = acc_t(1) / static_cast<acc_t>(classes);
  acc_t* row_out = row_stats.data_ptr<acc_t>();
  acc_t* mean_parts = means.data_ptr<acc_t>();
  all.for_each_row([&](int64_t block, int64_t row, const acc_t* y_s, const acc_t* y_t) {
    acc_t ab = 0, aa = 0, bb = 0;
#pragma omp simd reduction(+ : ab, aa, bb)
    for (int64_t j = 0; j < classes; ++j) {
      const acc_t a = y_s[j] - row_mean, b = y_t[j] - row_mean;
      ab += a * b;
      aa += a * a;
      bb += b * b;
    }
    row_out[row * 3] = ab;
    row_out[row * 3 + 1] = aa;
    row_out[row * 3 + 2] = bb;
    acc_t* sum_s = mean_parts + block * 2 * classes;
    acc_t* sum_t = sum_s + classes;
#pragma omp simd
    for (int64_t j = 0; j < classes; ++j) {
      sum_s[j] += y_s[j];
      sum_t[j] += y_t[j];
    }
  });
  // Column means, then the centred sums.
  acc_t* columns = column_stats.data_ptr<acc_t>();
  const acc_t inv_rows = acc_t(1) / static_cast<acc_t>(rows);
  for (int64_t block = 0; block < blocks; ++block) {
    for (int64_t j = 0; j < classes; ++j) {
      columns[j * 5] += mean_parts[block * 2 * classes + j];
      columns[j * 5 + 1] += mean_parts[(block * 2 + 1) * classes + j];
    }
  }
  std::vector<acc_t> m_s(classes), m_t(classes);
  for (int64_t j = 0; j < classes; ++j) {
    m_s[j] = columns[j * 5] *= inv_rows;
    m_t[j] = columns[j * 5 + 1] *= inv_rows;
  }
  acc_t* centred_parts = centred.data_ptr<acc_t>();
  all.for_each_row([&](int64_t block, int64_t, const acc_t* y_s, const acc_t* y_t) {
    acc_t* cd = centred_parts + block * 3 * classes;
    acc_t* cc = cd + classes;
    acc_t* dd = cc + classes;
#pragma omp simd
    for (int64_t j = 0; j < classes; ++j) {
      const acc_t c = y_s[j] - m_s[j], d = y_t[j] - m_t[j];
      cd[j] += c * d;
      cc[j] += c * c;
      dd[j] += d * d;
    }
  });
  for (int64_t block = 0; block < blocks; ++block) {
    for (int64_t k = 0; k < 3; ++k) {
      for (int64_t j = 0; j < classes; ++j) columns[j * 5 + 2 + k] += centred_parts[(block * 3 + k) * classes + j];
    }
  }
}

template <typename scalar_t>
void dist_grad(const at::Tensor& student, const at::Tensor& teacher, double temperature, const at::Tensor& row_c,
               const at::Tensor& column_c, const at::Tensor& stats, at::Tensor& grad) {
  const int64_t rows = student.size(0), classes = student.size(1);
  using acc_t = at::opmath_type<scalar_t>;
  const Rows<scalar_t, acc_t> all{student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(), student.stride(0),
                                  teacher.stride(0), rows, classes, static_cast<acc_t>(1.0 / temperature)};
  const acc_t row_mean = acc_t(1) / static_cast<acc_t>(classes), inv_t = all.inv_t;
  const acc_t* rc = row_c.data_ptr<acc_t>();
  const acc_t* cc = column_c.data_ptr<acc_t>();
  const acc_t* cs = stats.data_ptr<acc_t>();
  scalar_t* out = grad.data_ptr<scalar_t>();
  all.for_each_row([&](int64_t, int64_t row, const acc_t* y_s, const acc_t* y_t) {
    const acc_t row_b = rc[row * 2], row_a = rc[row * 2 + 1];
    const auto g = [&](int64_t j) {
      return row_b * (y_t[j] - row_mean) - row_a * (y_s[j] - row_mean) + cc[j * 2] * (y_t[j] - cs[j * 5 + 1]) -
             cc[j * 2 + 1] * (y_s[j] - cs[j * 5]);
    };
    acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < classes; ++j) dot += g(j) * y_s[j];
    scalar_t* grad_row = out + row * classes;
#pragma omp simd
    for (int64_t j = 0; j < classes; ++j) grad_row[j] = static_cast<scalar_t>(inv_t * y_s[j] * (g(j) - dot));
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> dist_loss_stats_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                       double temperature) {
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu(), "dist_loss_stats_cpu: CPU tensors expected");
  TORCH_CHECK(student.dim() == 2 && teacher.sizes() == student.sizes() && student.stride(1) == 1 &&
                  teacher.stride(1) == 1 && teacher.scalar_type() == student.scalar_type(),
              "dist_loss_stats_cpu: [N, C] inputs of one dtype with unit stride along C expected");
  const int64_t rows = student.size(0), classes = student.size(1);
  const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
  const auto acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto options = student.options().dtype(acc_dtype);
  at::Tensor row_stats = at::empty({rows, 3}, options);
  at::Tensor column_stats = at::zeros({classes, 5}, options);
  at::Tensor means = at::zeros({blocks, 2, classes}, options);
  at::Tensor centred = at::zeros({blocks, 3, classes}, options);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "dist_loss_stats_cpu", [&] {
    dist_stats<scalar_t>(student, teacher, temperature, row_stats, column_stats, means, centred);
  });
  return {row_stats, column_stats};
}

at::Tensor dist_loss_grad_cpu(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                              const at::Tensor& row_coef, const at::Tensor& column_coef,
                              const at::Tensor& column_stats) {
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu(), "dist_loss_grad_cpu: CPU tensors expected");
  TORCH_CHECK(student.dim() == 2 && teacher.sizes() == student.sizes() && student.stride(1) == 1 &&
                  teacher.stride(1) == 1 && teacher.scalar_type() == student.scalar_type(),
              "dist_loss_grad_cpu: [N, C] inputs of one dtype with unit stride along C expected");
  const int64_t rows = student.size(0), classes = student.size(1);
  const auto acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor row_c = row_coef.to(acc_dtype).contiguous(), column_c = column_coef.to(acc_dtype).contiguous();
  const at::Tensor stats = column_stats.to(acc_dtype).contiguous();
  TORCH_CHECK(row_c.sizes() == at::IntArrayRef({rows, 2}) && column_c.sizes() == at::IntArrayRef({classes, 2}) &&
                  stats.sizes() == at::IntArrayRef({classes, 5}),
              "dist_loss_grad_cpu: row_coef [N, 2], column_coef [C, 2] and column_stats [C, 5] expected");
  at::Tensor grad = at::empty({rows, classes}, student.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "dist_loss_grad_cpu", [&] {
    dist_grad<scalar_t>(student, teacher, temperature, row_c, column_c, stats, grad);
  });
  return grad;
}

}  // namespace kdkernels

// Entry points of the DIST (Huang et al., NeurIPS 2022) kernels. With y = softmax(x / T) of each
// row of student (y_s) and teacher (y_t), [N, C] with unit stride along C, same dtype, finite or
// -inf values (no row all -inf), and the row mean of y taken as 1 / C:
//   dist_loss_stats: row_stats [N, 3] = (sum_j a b, sum_j a^2, sum_j b^2) with a = y_s - 1/C,
//     b = y_t - 1/C; column_stats [C, 5] = (m_s, m_t, sum_i c d, sum_i c^2, sum_i d^2) with m the
//     column means of y over the rows, c = y_s - m_s, d = y_t - m_t. Column sums are reduced in two
//     stages (blocks of rows, then the blocks), so the result does not depend on the thread count.
//   dist_loss_grad: the student logit gradient for dL/dy_s[i, j] = g[i, j] =
//     row_coef[i, 0] b - row_coef[i, 1] a + column_coef[j, 0] d - column_coef[j, 1] c, that is
//     (1 / T) y_s (g - sum_k g[i, k] y_s[i, k]), in the input dtype.
// Statistics and coefficients are in the accumulation dtype (fp32, fp64 for fp64 inputs).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace kdkernels {

std::tuple<at::Tensor, at::Tensor> dist_loss_stats_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                       double temperature);

at::Tensor dist_loss_grad_cpu(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                              const at::Tensor& row_coef, const at::Tensor& column_coef,
                              const at::Tensor& column_stats);

}  // namespace kdkernels

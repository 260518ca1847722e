// Entry points of the feature kernels (hints and attention transfer). Sums are in the
// accumulation dtype (fp32, fp64 for fp64 inputs); gradients are in the input dtype.
//   attention_pool: the channel-pooled map a[n, s] = mean_c |x[n, c, s]|^p of [N, C, S] features
//     (unit stride along S), [N, S];
//   attention_grad: dL/dx[n, c, s] = g[n, s] (p / C) |x|^(p - 1) sign(x) for dL/da = g [N, S]
//     (0 where x = 0);
//   squared_error: (sum of (s - t)^2 as a 0-d tensor, and with grad the gradient
//     scale (s - t), or an empty tensor) over two tensors of one shape and dtype, contiguous.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace kdkernels {

at::Tensor attention_pool_cpu(const at::Tensor& x, double p);

at::Tensor attention_grad_cpu(const at::Tensor& x, const at::Tensor& grad_map, double p);

std::tuple<at::Tensor, at::Tensor> squared_error_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                     double scale, bool grad);

}  // namespace kdkernels

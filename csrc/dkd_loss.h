// Entry points of the DKD (decoupled knowledge distillation) kernels. Contract:
//   student, teacher: [N, V] (V >= 2) with unit stride along V, same dtype, finite values;
//   target: [N] int64; row_weight: optional one-element floating tensor (1 / rows counted).
// With p = softmax(teacher / T), q = softmax(student / T), y the target and ^ the non-target
// classes renormalised, row_loss = row_weight * T^2 * (alpha * KL([p_y, 1 - p_y] || [q_y, 1 - q_y])
// + beta * KL(p^ || q^)), 0 at rows whose target is ignore_index. Returns (row_loss [N] in the
// accumulation dtype, grad_student [N, V] or empty [0, V], status [N] int8 RowStatus codes).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace kdkernels {

using DKDLossOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

DKDLossOutputs dkd_loss_forward_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& target,
                                    const std::optional<at::Tensor>& row_weight, double temperature, double alpha,
                                    double beta, int64_t ignore_index, bool student_grad);

}  // namespace kdkernels

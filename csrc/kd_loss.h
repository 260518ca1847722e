// Entry points of the kd_loss kernels. Every backend has the same contract:
//   student, teacher: [N, V] with unit stride along V (any row stride), same dtype;
//   target: optional [N] int64.
// Returns (row_loss [N] in the accumulation dtype, grad_student [N, V] or empty [0, V],
// grad_teacher [N, V] or empty [0, V], status [N] int8 of RowStatus codes). row_loss_i = soft_weight * D_i + hard_weight * CE_i, 0 for rows
// whose target is ignore_index; the gradients are those of row_loss_i (weight 1 per row), so
// that backward only scales them by grad_output. A row with a nonzero status has loss 0 and zero
// gradients; the caller turns the status into an error (kdkernels/ops/kd_loss.py).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace kdkernels {

using KDLossOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

KDLossOutputs kd_loss_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                  const std::optional<at::Tensor>& target, double temperature,
                                  double soft_weight, double hard_weight, int64_t divergence,
                                  double beta, int64_t ignore_index, bool student_grad,
                                  bool teacher_grad);

}  // namespace kdkernels

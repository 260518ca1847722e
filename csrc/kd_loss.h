// Entry points of the kd_loss kernels. Every backend has the same contract:
//   student, teacher: [N, V] with unit stride along V (any row stride), same dtype;
//   target: optional [N] int64; row_weight: optional one-element floating tensor on the logits'
//   device (e.g. 1 / rows counted, for a mean), read where the kernel runs (no host sync on GPU);
//   divergence: a Divergence id, divergence_args: its keyword arguments (make_divergence_params);
//   softcap: > 0 to give the soft term softcap * tanh(x / softcap) of both inputs (the CE term
//   keeps the raw student logits), 0 for off; standardize: the soft term sees each row of both
//   inputs as (x - mean) / (std + 1e-7) over its finite entries (unbiased std; not with softcap).
// Returns (row_loss [N] in the accumulation dtype, grad_student [N, V] or empty [0, V],
// grad_teacher [N, V] or empty [0, V], status [N] int8 of RowStatus codes).
// row_loss_i = row_weight * (soft_weight * D_i + hard_weight * CE_i), 0 for rows whose target is
// ignore_index; the gradients are those of row_loss_i, so that backward only scales them by
// grad_output. A row with a nonzero status has loss 0 and zero gradients; the caller turns the
// status into an error (kdkernels/ops/kd_loss.py).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace kdkernels {

using KDLossOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The checks every entry point makes (`entry` names it in the messages); returns the target as a
// contiguous int64 [N] tensor, or an undefined tensor without target.
inline at::Tensor check_kd_loss_inputs(const char* entry, const at::Tensor& student, const at::Tensor& teacher,
                                       const std::optional<at::Tensor>& target,
                                       const std::optional<at::Tensor>& row_weight, double temperature) {
  TORCH_CHECK(student.dim() == 2 && teacher.sizes() == student.sizes(), entry,
              ": expected student and teacher of the same shape [N, V]");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), entry, ": dtypes differ");
  TORCH_CHECK(teacher.device() == student.device(), entry, ": student and teacher on different devices");
  TORCH_CHECK(student.size(1) <= 1 || (student.stride(1) == 1 && teacher.stride(1) == 1), entry,
              ": unit stride along V expected");
  TORCH_CHECK(temperature > 0, entry, ": temperature must be > 0");
  TORCH_CHECK(!row_weight.has_value() || (row_weight->numel() == 1 && row_weight->is_floating_point() &&
                                          row_weight->device() == student.device()),
              entry, ": row_weight must be a one-element floating tensor on the logits' device");
  if (!target.has_value()) return {};
  TORCH_CHECK(target->scalar_type() == at::kLong && target->dim() == 1 && target->size(0) == student.size(0) &&
                  target->device() == student.device(),
              entry, ": target must be int64 [N] on the logits' device");
  return target->contiguous();
}

KDLossOutputs kd_loss_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                  const std::optional<at::Tensor>& target,
                                  const std::optional<at::Tensor>& row_weight, double temperature, double softcap,
                                  bool standardize, double soft_weight, double hard_weight, int64_t divergence,
                                  const std::vector<double>& divergence_args, int64_t ignore_index, bool student_grad,
                                  bool teacher_grad);

// Vocab-parallel kd_loss (kdkernels/ops/vocab_parallel.py): the reads of the kernel split into
// stages on one rank's slice [N, V_local] of the vocabulary, the ranks' outputs combined between
// them. kd_loss_shard_cpu runs one stage and returns (out, grad_student, grad_teacher, status):
//   kShardStats: out [N, kShardStatsWidth] = the slice's (max, sum of exp(x - max)) of student/T,
//     teacher/T and the raw student (the CE term's; student/T again when T = 1 without softcap);
//     status flags NaN or +inf.
//   kShardSums: with norms [N, kShardStatsWidth], the whole row's log-normalisers as (max,
//     log_sum) pairs: out [N, kShardSumsWidth] = the slice's row sums of the divergence terms
//     (value, d_student, d_teacher) and the raw student logit at the target if the slice holds it.
//   kShardGradient: with norms and sums [N, kShardSumsWidth] of the whole row: the slice's
//     gradients of row_weight * (soft_weight * D + hard_weight * CE).
// target: slice-local ids; ignore_index marks an ignored row, any other id outside [0, V_local)
// a target on another slice. Not with standardize or adaptive KL (whole-row values in a read).
enum ShardStage : int { kShardStats = 0, kShardSums = 1, kShardGradient = 2 };
constexpr int64_t kShardStatsWidth = 6;
constexpr int64_t kShardSumsWidth = 4;

KDLossOutputs kd_loss_shard_cpu(int64_t stage, const at::Tensor& student, const at::Tensor& teacher,
                                const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& norms,
                                const std::optional<at::Tensor>& sums, double temperature, double softcap,
                                double soft_weight, double hard_weight, int64_t divergence,
                                const std::vector<double>& divergence_args, int64_t ignore_index, bool student_grad,
                                bool teacher_grad);

#ifdef KDKERNELS_WITH_CUDA
KDLossOutputs kd_loss_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                   const std::optional<at::Tensor>& target,
                                   const std::optional<at::Tensor>& row_weight, double temperature, double softcap,
                                   bool standardize, double soft_weight, double hard_weight, int64_t divergence,
                                   const std::vector<double>& divergence_args, int64_t ignore_index, bool student_grad,
                                   bool teacher_grad);
#endif

}  // namespace kdkernels

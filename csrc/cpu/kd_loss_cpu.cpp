// kd_loss_forward_cpu and kd_loss_shard_cpu: check a call, allocate its outputs and run the kernel
// part that holds its divergence (csrc/cpu/kd_loss_cpu.h).
#include "kd_loss_cpu.h"

#include "cpu_outputs.h"

#include "../kd_loss.h"

namespace kdkernels {
namespace {

// Runs the kernel part that holds the call's divergence.
void run_parts(const cpu::KDLossCall& call, const char* entry) {
  const bool known = cpu::kd_loss_part<0>(call) || cpu::kd_loss_part<1>(call) || cpu::kd_loss_part<2>(call) ||
                     cpu::kd_loss_part<3>(call);
  TORCH_CHECK_VALUE(known, entry, ": unknown divergence id ", static_cast<int>(call.divergence));
}

}  // namespace

KDLossOutputs kd_loss_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                  const std::optional<at::Tensor>& target,
                                  const std::optional<at::Tensor>& row_weight, double temperature, double softcap,
                                  bool standardize, double soft_weight, double hard_weight, int64_t divergence,
                                  const std::vector<double>& divergence_args, int64_t ignore_index, bool student_grad,
                                  bool teacher_grad) {
  const at::Tensor target_rows =
      check_kd_loss_inputs("kd_loss_forward_cpu", student, teacher, target, row_weight, temperature);
  TORCH_CHECK(student.device().is_cpu(), "kd_loss_forward_cpu: CPU tensors expected");
  TORCH_CHECK_VALUE(!(standardize && softcap != 0), "kd_loss_forward_cpu: standardize and softcap exclude each other");
  if (row_weight.has_value()) {  // on the CPU the weight folds into the two term weights
    const double weight = row_weight->item<double>();
    soft_weight *= weight;
    hard_weight *= weight;
  }
  const int64_t rows = student.size(0), vocab = student.size(1);
  const auto acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const cpu::KDLossCall call{student,
                             teacher,
                             target.has_value() ? target_rows : at::Tensor(),
                             at::empty({rows}, student.options().dtype(acc_dtype)),
                             cpu::empty_output({student_grad ? rows : 0, vocab}, student.options()),
                             cpu::empty_output({teacher_grad ? rows : 0, vocab}, student.options()),
                             at::empty({rows}, student.options().dtype(at::kChar)),
                             temperature,
                             softcap,
                             standardize,
                             soft_weight,
                             hard_weight,
                             static_cast<Divergence>(divergence),
                             divergence_args,
                             ignore_index};
  run_parts(call, "kd_loss_forward_cpu");
  return {call.loss, call.grad_student, call.grad_teacher, call.status};
}

KDLossOutputs kd_loss_shard_cpu(int64_t stage, const at::Tensor& student, const at::Tensor& teacher,
                                const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& norms,
                                const std::optional<at::Tensor>& sums, double temperature, double softcap,
                                double soft_weight, double hard_weight, int64_t divergence,
                                const std::vector<double>& divergence_args, int64_t ignore_index, bool student_grad,
                                bool teacher_grad) {
  const at::Tensor target_rows =
      check_kd_loss_inputs("kd_loss_shard_cpu", student, teacher, target, std::nullopt, temperature);
  TORCH_CHECK(student.device().is_cpu(), "kd_loss_shard_cpu: CPU tensors expected");
  TORCH_CHECK_VALUE(stage >= kShardStats && stage <= kShardGradient, "kd_loss_shard_cpu: unknown stage ", stage);
  TORCH_CHECK_VALUE(divergence != static_cast<int64_t>(Divergence::kAdaptiveKL),
                    "kd_loss_shard_cpu: adaptive KL has no vocab-parallel form");
  const int64_t rows = student.size(0), vocab = student.size(1);
  const auto acc_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto row_input = [&](const std::optional<at::Tensor>& x, int64_t width, const char* name) {
    TORCH_CHECK(x.has_value() && x->sizes() == at::IntArrayRef({rows, width}) && x->scalar_type() == acc_dtype &&
                    x->is_contiguous() && x->device() == student.device(),
                "kd_loss_shard_cpu: ", name, " must be a contiguous [N, ", width, "] tensor of the accumulation dtype");
    return *x;
  };
  const int64_t width = stage == kShardStats ? kShardStatsWidth : stage == kShardSums ? kShardSumsWidth : 0;
  const bool gradient = stage == kShardGradient;
  cpu::KDLossCall call{student,
                       teacher,
                       target.has_value() ? target_rows : at::Tensor(),
                       at::empty({rows, width}, student.options().dtype(acc_dtype)),
                       cpu::empty_output({gradient && student_grad ? rows : 0, vocab}, student.options()),
                       cpu::empty_output({gradient && teacher_grad ? rows : 0, vocab}, student.options()),
                       at::empty({rows}, student.options().dtype(at::kChar)),
                       temperature,
                       softcap,
                       false,
                       soft_weight,
                       hard_weight,
                       static_cast<Divergence>(divergence),
                       divergence_args,
                       ignore_index,
                       static_cast<int>(stage)};
  if (stage != kShardStats) call.norms = row_input(norms, kShardStatsWidth, "norms");
  if (gradient) call.sums = row_input(sums, kShardSumsWidth, "sums");
  run_parts(call, "kd_loss_shard_cpu");
  return {call.loss, call.grad_student, call.grad_teacher, call.status};
}

}  // namespace kdkernels

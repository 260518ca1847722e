// kd_loss_forward_cpu: checks a call, allocates its outputs and runs the kernel part that holds
// its divergence (csrc/cpu/kd_loss_cpu.h).
#include "kd_loss_cpu.h"

#include "../kd_loss.h"

namespace kdkernels {

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
                             at::empty({student_grad ? rows : 0, vocab}, student.options()),
                             at::empty({teacher_grad ? rows : 0, vocab}, student.options()),
                             at::empty({rows}, student.options().dtype(at::kChar)),
                             temperature,
                             softcap,
                             standardize,
                             soft_weight,
                             hard_weight,
                             static_cast<Divergence>(divergence),
                             divergence_args,
                             ignore_index};
  const bool known = cpu::kd_loss_part<0>(call) || cpu::kd_loss_part<1>(call) || cpu::kd_loss_part<2>(call) ||
                     cpu::kd_loss_part<3>(call);
  TORCH_CHECK_VALUE(known, "kd_loss_forward_cpu: unknown divergence id ", divergence);
  return {call.loss, call.grad_student, call.grad_teacher, call.status};
}

}  // namespace kdkernels

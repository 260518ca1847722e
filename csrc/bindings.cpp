// Python bindings of the compiled kernels (module kdkernels._C).
#include <torch/extension.h>

#include "dist_loss.h"
#include "dkd_loss.h"
#include "kd_loss.h"
#include "topk_kd_loss.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kdkernels compiled kernels";
  m.def("kd_loss_forward_cpu", &kdkernels::kd_loss_forward_cpu,
        "Fused KD loss forward on CPU: row losses and logit gradients");
  m.def("dkd_loss_forward_cpu", &kdkernels::dkd_loss_forward_cpu,
        "Fused DKD loss forward on CPU: row losses and student logit gradients");
  m.def("dist_loss_stats_cpu", &kdkernels::dist_loss_stats_cpu,
        "DIST on CPU: row and column statistics of the softmaxes");
  m.def("topk_kd_loss_forward_cpu", &kdkernels::topk_kd_loss_forward_cpu,
        "Top-k KD loss forward on CPU: row losses and student logit gradients");
  m.def("dist_loss_grad_cpu", &kdkernels::dist_loss_grad_cpu, "DIST on CPU: the student logit gradient");
#ifdef KDKERNELS_WITH_CUDA
  m.def("kd_loss_forward_cuda", &kdkernels::kd_loss_forward_cuda,
        "Fused KD loss forward on CUDA: row losses and logit gradients");
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}

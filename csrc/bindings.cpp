// Python bindings of the compiled kernels (module kdkernels._C).
#include <torch/extension.h>

#include "dist_loss.h"
#include "dkd_loss.h"
#include "feature.h"
#include "kd_loss.h"
#include "relation.h"
#include "topk_kd_loss.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kdkernels compiled kernels";
  m.def("kd_loss_forward_cpu", &kdkernels::kd_loss_forward_cpu,
        "Fused KD loss forward on CPU: row losses and logit gradients");
  m.def("kd_loss_shard_cpu", &kdkernels::kd_loss_shard_cpu,
        "One vocab-parallel stage of the KD loss on CPU, on a rank's slice of the vocabulary");
  m.def("dkd_loss_forward_cpu", &kdkernels::dkd_loss_forward_cpu,
        "Fused DKD loss forward on CPU: row losses and student logit gradients");
  m.def("dist_loss_stats_cpu", &kdkernels::dist_loss_stats_cpu,
        "DIST on CPU: row and column statistics of the softmaxes");
  m.def("topk_kd_loss_forward_cpu", &kdkernels::topk_kd_loss_forward_cpu,
        "Top-k KD loss forward on CPU: row losses and student logit gradients");
  m.def("relation_matrix_cpu", &kdkernels::relation_matrix_cpu,
        "Pairwise relation matrix (Gram, cosine, distances) of [N, D] features on CPU");
  m.def("rkd_angle_triplets_cpu", &kdkernels::rkd_angle_triplets_cpu,
        "Angle-wise RKD on CPU: the triplet loss and gradient sums from the Gram matrices");
  m.def("attention_pool_cpu", &kdkernels::attention_pool_cpu,
        "Attention transfer on CPU: channel-pooled |x|^p maps of [N, C, S] features");
  m.def("attention_grad_cpu", &kdkernels::attention_grad_cpu,
        "Attention transfer on CPU: the feature gradient from the maps' gradient");
  m.def("squared_error_cpu", &kdkernels::squared_error_cpu,
        "Sum of squared differences and its scaled gradient in one pass on CPU");
  m.def("dist_loss_grad_cpu", &kdkernels::dist_loss_grad_cpu, "DIST on CPU: the student logit gradient");
#ifdef KDKERNELS_WITH_CUDA
  m.def("kd_loss_forward_cuda", &kdkernels::kd_loss_forward_cuda,
        "Fused KD loss forward on CUDA: row losses and logit gradients");
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}

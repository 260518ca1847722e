// Entry points of the relation kernels: pairwise relation matrices of [N, D] features and the
// triplet sums of angle-wise RKD. Matrices and sums are in the accumulation dtype (fp32, fp64 for
// fp64 inputs).
//   relation_matrix: the [N, N] matrix of `kind` from the Gram matrix G = x x^T, with n_i = |x_i|
//     taken from its diagonal:
//       kGram            G_ij
//       kCosine          G_ij m_i m_j, m = 1 / max(n, eps)      (torch.nn.functional.normalize)
//       kCosineOffset    G_ij m_i m_j, m = 1 / (n + eps)        (Passalis & Tefas' code)
//       kSquaredDistance max(n_i^2 + n_j^2 - 2 G_ij, eps), 0 on the diagonal
//       kDistance        the square root of kSquaredDistance    (Park et al.'s code)
//   rkd_angle_triplets: with the Gram matrices g_s, g_t of student and teacher and the inverse
//     distances inv_s, inv_t (inv_ij = 1 / |x_j - x_i|, 0 where the pair coincides), the cosine at
//     anchor i between j and k, c_ijk = (G_jk - G_ij - G_ik + G_ii) inv_ij inv_ik, for both sides,
//     delta = c_s - c_t and smooth-L1 (beta 1) h(delta):
//       loss_parts: partial sums of h whose total is the sum over all N^3 triplets;
//     and with grad, for w_ijk = scale * clamp(delta, -1, 1) inv_ij inv_ik (dL/dP_ijk):
//       anchor_sums [N, N]:  B_jk = sum_i w_ijk,
//       pair_sums [N, N]:    C_ij = sum_k w_ijk,
//       radial_sums [N, N]:  R_ij = inv_ij^2 sum_k scale * clamp(delta, -1, 1) c_ijk.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace kdkernels {

enum RelationKind : int64_t { kGram = 0, kCosine = 1, kCosineOffset = 2, kSquaredDistance = 3, kDistance = 4 };

at::Tensor relation_matrix_cpu(const at::Tensor& x, int64_t kind, double eps);

std::vector<at::Tensor> rkd_angle_triplets_cpu(const at::Tensor& gram_s, const at::Tensor& gram_t,
                                               const at::Tensor& inv_s, const at::Tensor& inv_t, double scale,
                                               bool grad);

}  // namespace kdkernels

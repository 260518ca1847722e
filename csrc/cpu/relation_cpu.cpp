// CPU relation kernels (csrc/relation.h).
//   relation_matrix: the product x x^T from the BLAS into the output, then one pass of the
//     epilogue over it in place (norms from its diagonal): no N x N temporary besides the output.
//   rkd_angle_triplets: one thread per block of j; for each anchor i the cosines of both sides
//     along k come from rows i and j of the Gram matrices, so the N^3 triplets are never stored
//     and every sum is owned by one thread (B row j, C and R column j).
#include "../relation.h"
#include "cpu_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace kdkernels {
namespace {

template <typename acc_t>
void relation_epilogue(acc_t* out, int64_t n, int64_t kind, acc_t eps) {
  std::vector<acc_t> diag(n), scale(n);
  for (int64_t i = 0; i < n; ++i) {
    diag[i] = out[i * n + i];
    const acc_t norm = std::sqrt(std::max(diag[i], acc_t(0)));
    scale[i] = kind == kCosine ? acc_t(1) / std::max(norm, eps) : acc_t(1) / (norm + eps);
  }
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t* row = out + i * n;
      const acc_t d_i = diag[i], s_i = scale[i];
      if (kind == kCosine || kind == kCosineOffset) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) row[j] *= s_i * scale[j];
      } else {
        const bool root = kind == kDistance;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          const acc_t squared = std::max(d_i + diag[j] - 2 * row[j], eps);
          row[j] = root ? std::sqrt(squared) : squared;
        }
        row[i] = 0;
      }
    }
  });
}

template <typename acc_t>
struct TripletArgs {
  const acc_t *gs, *gt, *inv_s, *inv_t;
  int64_t n;
  acc_t scale;
  acc_t *loss_parts, *anchor_sums, *pair_sums, *radial_sums;
};

// Every anchor i for the pairs (j, k) of rows j in [begin, end).
template <bool kGrad, typename acc_t>
KD_CPU_CLONES void triplet_rows(const TripletArgs<acc_t>& a, int64_t begin, int64_t end) {
  const int64_t n = a.n;
  for (int64_t j = begin; j < end; ++j) {
    const acc_t* gs_j = a.gs + j * n;
    const acc_t* gt_j = a.gt + j * n;
    acc_t* b_j = kGrad ? a.anchor_sums + j * n : nullptr;
    acc_t loss = 0;
    for (int64_t i = 0; i < n; ++i) {
      const acc_t* gs_i = a.gs + i * n;
      const acc_t* gt_i = a.gt + i * n;
      const acc_t* inv_s_i = a.inv_s + i * n;
      const acc_t* inv_t_i = a.inv_t + i * n;
      const acc_t base_s = gs_i[i] - gs_i[j], base_t = gt_i[i] - gt_i[j];
      const acc_t inv_s_ij = inv_s_i[j], inv_t_ij = inv_t_i[j];
      acc_t pair = 0, radial = 0;
#pragma omp simd reduction(+ : loss, pair, radial)
      for (int64_t k = 0; k < n; ++k) {
        const acc_t c_s = (gs_j[k] - gs_i[k] + base_s) * inv_s_ij * inv_s_i[k];
        const acc_t c_t = (gt_j[k] - gt_i[k] + base_t) * inv_t_ij * inv_t_i[k];
        const acc_t delta = c_s - c_t, magnitude = std::abs(delta);
        loss += magnitude < 1 ? acc_t(0.5) * delta * delta : magnitude - acc_t(0.5);
        if constexpr (kGrad) {
          const acc_t slope = a.scale * std::min(std::max(delta, acc_t(-1)), acc_t(1));
          const acc_t w = slope * inv_s_ij * inv_s_i[k];
          b_j[k] += w;
          pair += w;
          radial += slope * c_s;
        }
      }
      if constexpr (kGrad) {
        a.pair_sums[i * n + j] = pair;
        a.radial_sums[i * n + j] = radial * inv_s_ij * inv_s_ij;
      }
    }
    a.loss_parts[j] = loss;
  }
}

void check_square(const char* name, const at::Tensor& m, const at::Tensor& like) {
  TORCH_CHECK(m.device().is_cpu() && m.dim() == 2 && m.size(0) == m.size(1) && m.sizes() == like.sizes() &&
                  m.is_contiguous() && m.scalar_type() == like.scalar_type() &&
                  (m.scalar_type() == at::kFloat || m.scalar_type() == at::kDouble),
              "rkd_angle_triplets_cpu: ", name, " must be a contiguous square fp32 or fp64 CPU matrix like gram_s");
}

}  // namespace

at::Tensor relation_matrix_cpu(const at::Tensor& x, int64_t kind, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "relation_matrix_cpu: [N, D] CPU features expected");
  TORCH_CHECK(kind >= kGram && kind <= kDistance, "relation_matrix_cpu: unknown kind ", kind);
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor features = x.to(acc_dtype);
  at::Tensor out = at::mm(features, features.t());
  if (kind != kGram) {
    AT_DISPATCH_FLOATING_TYPES(acc_dtype, "relation_matrix_cpu", [&] {
      relation_epilogue<scalar_t>(out.data_ptr<scalar_t>(), out.size(0), kind, static_cast<scalar_t>(eps));
    });
  }
  return out;
}

std::vector<at::Tensor> rkd_angle_triplets_cpu(const at::Tensor& gram_s, const at::Tensor& gram_t,
                                               const at::Tensor& inv_s, const at::Tensor& inv_t, double scale,
                                               bool grad) {
  check_square("gram_s", gram_s, gram_s);
  check_square("gram_t", gram_t, gram_s);
  check_square("inv_s", inv_s, gram_s);
  check_square("inv_t", inv_t, gram_s);
  const int64_t n = gram_s.size(0);
  at::Tensor loss_parts = at::empty({n}, gram_s.options());
  std::vector<at::Tensor> sums;
  for (int s = 0; s < (grad ? 3 : 0); ++s) sums.push_back(at::zeros({n, n}, gram_s.options()));
  AT_DISPATCH_FLOATING_TYPES(gram_s.scalar_type(), "rkd_angle_triplets_cpu", [&] {
    const TripletArgs<scalar_t> args{gram_s.data_ptr<scalar_t>(), gram_t.data_ptr<scalar_t>(),
                                     inv_s.data_ptr<scalar_t>(), inv_t.data_ptr<scalar_t>(), n,
                                     static_cast<scalar_t>(scale), loss_parts.data_ptr<scalar_t>(),
                                     grad ? sums[0].data_ptr<scalar_t>() : nullptr,
                                     grad ? sums[1].data_ptr<scalar_t>() : nullptr,
                                     grad ? sums[2].data_ptr<scalar_t>() : nullptr};
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      if (grad) {
        triplet_rows<true>(args, begin, end);
      } else {
        triplet_rows<false>(args, begin, end);
      }
    });
  });
  sums.insert(sums.begin(), loss_parts);
  return sums;
}

}  // namespace kdkernels

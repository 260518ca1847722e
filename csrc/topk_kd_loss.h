// Entry points of the top-k KD kernels: KD against a teacher stored as the log-probabilities of
// its k most likely ids. Contract:
//   student: [N, V] with unit stride along V; indices: [N, k] int64, each row sorted ascending
//   (the caller sorts, so that the kernels walk the ids along the row); logprobs: [N, k] in the
//   accumulation dtype (fp32; fp64 for fp64 students), aligned with indices, -inf for a masked id;
//   target: optional [N] int64; row_weight: optional one-element floating tensor (1 / rows).
// The divergence is taken over k + 1 categories: the k ids and the rest of the vocabulary. The
// teacher's are logprobs / T and, with bucket, log(1 - sum exp(logprobs)) / T for the rest (-inf,
// i.e. masked, when that mass is <= 0 or without bucket), normalised; the student's are
// softmax(student / T) summed per category. With D over the categories finite in both
// (csrc/divergences.h), row_loss = row_weight * (soft_weight * D + hard_weight * CE(student, y)),
// 0 at rows whose target is ignore_index. Returns (row_loss [N] in the accumulation dtype,
// grad_student [N, V] or empty [0, V], status [N] int8 RowStatus codes).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace kdkernels {

using TopKKDLossOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

TopKKDLossOutputs topk_kd_loss_forward_cpu(const at::Tensor& student, const at::Tensor& indices,
                                           const at::Tensor& logprobs, const std::optional<at::Tensor>& target,
                                           const std::optional<at::Tensor>& row_weight, double temperature,
                                           double soft_weight, double hard_weight, int64_t divergence,
                                           const std::vector<double>& divergence_args, bool bucket,
                                           int64_t ignore_index, bool student_grad);

}  // namespace kdkernels

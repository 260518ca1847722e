"""The top-k KD custom op `kdkernels::topk_kd_loss_rows`: its kernels per backend, fake kernel and
autograd (the student gradient is written in the forward; backward only scales it)."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from kdkernels.ops import backends, saved_gradients
from kdkernels.ops.kd_loss import DIVERGENCES, raise_for_status

Tensor = torch.Tensor

# The largest k the Triton kernel takes: it keeps the k + 1 categories of a row in registers.
TRITON_MAX_K = 2047


def kernel(backend: str) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """The top-k KD forward kernel of a backend (csrc/topk_kd_loss.h contract)."""
    return backends.kernels(backend, "topk_kd_loss", "topk_kd_loss_forward")[0]


def sorted_topk(indices: Tensor, logprobs: Tensor, logits_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The ids and logprobs as the kernels take them: each row sorted by id (the kernels walk the
    ids along the row), int64, and the logprobs in the accumulation dtype of the logits."""
    acc_dtype = backends.accumulation_dtype(logits_dtype)
    indices, order = indices.sort(dim=-1)
    return indices.long().contiguous(), logprobs.gather(-1, order).to(acc_dtype).contiguous()


def raise_for_topk_status(status: Tensor, target: Optional[Tensor], vocab: int, ignore_index: int) -> None:
    raise_for_status(status, target, vocab, ignore_index, "topk_kd_loss", teacher="teacher_topk_logprobs")


@torch.library.custom_op("kdkernels::topk_kd_loss_rows", mutates_args=())
def topk_kd_loss_rows(student: Tensor, indices: Tensor, logprobs: Tensor, target: Optional[Tensor],
                      row_weight: Optional[Tensor], temperature: float, soft_weight: float, hard_weight: float,
                      divergence: str, divergence_args: list[float], bucket: bool, ignore_index: int,
                      student_grad: bool, backend: str) -> tuple[Tensor, Tensor]:
    """Row losses ``row_weight * (soft_weight * D + hard_weight * CE)`` of [N, V] student logits
    against a teacher's top-k ids [N, k] (int32 or int64, any order) and log-probabilities [N, k]
    (any float dtype), 0 at rows whose target is ignore_index, and their student gradients (empty
    [0, V] when not asked for). D is over the k ids and the rest of the vocabulary, the rest with
    the teacher's remaining mass when `bucket`, else masked (csrc/topk_kd_loss.h)."""
    indices, logprobs = sorted_topk(indices, logprobs, student.dtype)
    loss, grad_student, status = kernel(backend)(
        student, indices, logprobs, target, row_weight, temperature, soft_weight, hard_weight,
        DIVERGENCES[divergence].kernel_id, divergence_args, bucket, ignore_index, student_grad)
    raise_for_topk_status(status, target, student.shape[1], ignore_index)
    return loss, grad_student


@topk_kd_loss_rows.register_fake
def _(student, indices, logprobs, target, row_weight, temperature, soft_weight, hard_weight, divergence,
      divergence_args, bucket, ignore_index, student_grad, backend):
    rows, vocab = student.shape
    acc_dtype = backends.accumulation_dtype(student.dtype)
    return student.new_empty(rows, dtype=acc_dtype), student.new_empty(rows if student_grad else 0, vocab)


saved_gradients.register_leading_gradients_autograd(topk_kd_loss_rows, num_inputs=14, per_row=True)

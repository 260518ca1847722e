"""The DKD custom op `kdkernels::dkd_loss_rows`: its kernels per backend, fake kernel and autograd
(the gradient is written in the forward; backward only scales it)."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from kdkernels.ops import backends, saved_gradients
from kdkernels.ops.kd_loss import raise_for_status

Tensor = torch.Tensor


def kernel(backend: str) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """The DKD forward kernel of a backend (csrc/dkd_loss.h contract)."""
    return backends.kernels(backend, "dkd_loss", "dkd_loss_forward")[0]


@torch.library.custom_op("kdkernels::dkd_loss_rows", mutates_args=())
def dkd_loss_rows(student: Tensor, teacher: Tensor, target: Tensor, row_weight: Optional[Tensor], temperature: float,
                  alpha: float, beta: float, ignore_index: int, student_grad: bool,
                  backend: str) -> tuple[Tensor, Tensor]:
    """Row losses ``row_weight * T^2 * (alpha * TCKD + beta * NCKD)`` of [N, V] logits (0 at rows
    whose target is ignore_index) and their student gradients (empty [0, V] when not asked for)."""
    loss, grad_student, status = kernel(backend)(student, teacher, target, row_weight, temperature, alpha, beta,
                                                 ignore_index, student_grad)
    raise_for_status(status, target, student.shape[1], ignore_index, "dkd_loss", "NaN or +-inf (finite logits expected)")
    return loss, grad_student


@dkd_loss_rows.register_fake
def _(student, teacher, target, row_weight, temperature, alpha, beta, ignore_index, student_grad, backend):
    rows, vocab = student.shape
    acc_dtype = backends.accumulation_dtype(student.dtype)
    return student.new_empty(rows, dtype=acc_dtype), student.new_empty(rows if student_grad else 0, vocab)


saved_gradients.register_leading_gradients_autograd(dkd_loss_rows, num_inputs=10, per_row=True)

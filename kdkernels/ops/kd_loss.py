"""The kd_loss custom op: `kdkernels::kd_loss_rows`, its kernels per backend, fake kernel and
autograd formula.

The op returns the per-row losses together with their logit gradients, computed in the same
pass over the logits; autograd saves the gradients and backward only scales them by the
incoming per-row gradient."""

from __future__ import annotations

import dataclasses
import enum
from typing import Callable, Optional

import torch

from kdkernels.ops import backends, saved_gradients

Tensor = torch.Tensor


@dataclasses.dataclass(frozen=True)
class DivergenceSpec:
    """A divergence as the kernels know it: its id (csrc/divergences.h, enum Divergence) and the
    kd_loss keywords it takes, in the order of its kernel arguments (make_divergence_params)."""

    kernel_id: int
    keywords: tuple[str, ...] = ()


DIVERGENCES = {
    "forward_kl": DivergenceSpec(0),
    "reverse_kl": DivergenceSpec(1),
    "jsd": DivergenceSpec(2, ("beta",)),
    "skew_kl": DivergenceSpec(3, ("skew",)),
    "skew_reverse_kl": DivergenceSpec(4, ("skew",)),
    "tvd": DivergenceSpec(5),
    "ab": DivergenceSpec(6, ("ab_alpha", "ab_beta")),
    "akl": DivergenceSpec(7, ("akl_mu",)),
}

# (row_loss, grad_student, grad_teacher, status): the contract of csrc/kd_loss.h.
KernelOutputs = tuple[Tensor, Tensor, Tensor, Tensor]


class RowStatus(enum.IntEnum):
    """Per-row outcome codes written by the kernels (csrc/row_status.h)."""

    OK = 0
    TARGET_OUT_OF_RANGE = 1
    TARGET_MASKED = 2
    STUDENT_NON_FINITE = 3
    TEACHER_NON_FINITE = 4
    STUDENT_ALL_MASKED = 5
    TEACHER_ALL_MASKED = 6
    INDEX_OUT_OF_RANGE = 7
    DUPLICATE_INDEX = 8


def raise_for_status(status: Tensor, target: Optional[Tensor], vocab: int, ignore_index: int, op: str = "kd_loss",
                     non_finite: str = "NaN or +inf", teacher: str = "teacher_logits") -> None:
    """Raises ValueError for the first row a kernel flagged, naming the input and the row;
    `non_finite` says which values the op rejects, `teacher` names the teacher's input."""
    bad = status.nonzero()
    if not bad.numel():
        return
    row = int(bad[0, 0])
    code = RowStatus(int(status[row]))
    label = int(target[row]) if target is not None else None
    messages = {
        RowStatus.TARGET_OUT_OF_RANGE:
            f"target[{row}] = {label} is outside [0, {vocab}) and is not ignore_index ({ignore_index})",
        RowStatus.TARGET_MASKED: f"target[{row}] = {label} points at a -inf student logit, so its cross-entropy is infinite",
        RowStatus.STUDENT_NON_FINITE: f"student_logits row {row} contains {non_finite}",
        RowStatus.TEACHER_NON_FINITE: f"{teacher} row {row} contains {non_finite}",
        RowStatus.STUDENT_ALL_MASKED: f"student_logits row {row} is all -inf",
        RowStatus.TEACHER_ALL_MASKED: f"{teacher} row {row} is all -inf",
        RowStatus.INDEX_OUT_OF_RANGE: f"teacher_topk_indices row {row} holds an id outside [0, {vocab})",
        RowStatus.DUPLICATE_INDEX: f"teacher_topk_indices row {row} holds an id twice",
    }
    raise ValueError(f"{op}: {messages[code]} (rows of the inputs flattened to [N, V])")


def kernel(backend: str) -> Callable[..., KernelOutputs]:
    """The forward kernel of a backend; all share the contract of csrc/kd_loss.h."""
    return backends.kernels(backend, "kd_loss", "kd_loss_forward")[0]


@torch.library.custom_op("kdkernels::kd_loss_rows", mutates_args=())
def kd_loss_rows(student: Tensor, teacher: Tensor, target: Optional[Tensor], row_weight: Optional[Tensor],
                 temperature: float, softcap: float, standardize: bool, soft_weight: float, hard_weight: float,
                 divergence: str, divergence_args: list[float], ignore_index: int, student_grad: bool,
                 teacher_grad: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Row losses ``row_weight * (soft_weight * D + hard_weight * CE)`` of [N, V] logits (0 at
    rows whose target is ignore_index), and their gradients (empty [0, V] when not asked for).
    row_weight (a 0-d tensor, e.g. 1 / number of rows for a mean; None for 1) is folded into
    the kernel, so that the common backward from a plain sum needs no pass over the gradients.
    divergence_args: the values of the divergence's keywords (DIVERGENCES); softcap > 0 gives the
    soft term softcap * tanh(z / softcap) of both logits (0: off); standardize gives it each row of
    both as (z - mean) / (std + 1e-7)."""
    loss, grad_student, grad_teacher, status = kernel(backend)(
        student, teacher, target, row_weight, temperature, softcap, standardize, soft_weight, hard_weight,
        DIVERGENCES[divergence].kernel_id, divergence_args, ignore_index, student_grad, teacher_grad)
    raise_for_status(status, target, student.shape[1], ignore_index)
    return loss, grad_student, grad_teacher


def rows_like(student: Tensor, student_grad: bool, teacher_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The fake (meta) outputs of a per-row KD op on [N, V] logits: row losses in the accumulation
    dtype and the gradients of both logits (empty [0, V] when not asked for)."""
    rows, vocab = student.shape
    return (student.new_empty(rows, dtype=backends.accumulation_dtype(student.dtype)),
            student.new_empty(rows if student_grad else 0, vocab),
            student.new_empty(rows if teacher_grad else 0, vocab))


@kd_loss_rows.register_fake
def _(student, teacher, target, row_weight, temperature, softcap, standardize, soft_weight, hard_weight, divergence,
      divergence_args, ignore_index, student_grad, teacher_grad, backend):
    return rows_like(student, student_grad, teacher_grad)


saved_gradients.register_leading_gradients_autograd(kd_loss_rows, num_inputs=15, per_row=True)

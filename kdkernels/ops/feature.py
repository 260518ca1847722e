"""Feature custom ops: `kdkernels::attention_transfer_loss` (one pair of feature maps) and
`kdkernels::squared_error` (the hint loss). The kernels (csrc/feature.h) pool the maps and write
the feature gradient; the normalisation and the loss between the [N, S] maps are O(N S) in
between. Both ops compute the student gradient in the forward; backward only scales it."""

from __future__ import annotations

import torch

from kdkernels.ops import backends, saved_gradients
from kdkernels.ops.relation import check_finite_loss

Tensor = torch.Tensor

NORMALIZE_EPS = 1e-12


@torch.library.custom_op("kdkernels::attention_transfer_loss", mutates_args=())
def attention_transfer_loss(student: Tensor, teacher: Tensor, p: float, student_grad: bool,
                            backend: str) -> tuple[Tensor, Tensor]:
    """Attention transfer between [N, C_s, S] and [N, C_t, S] features (unit stride along S): the
    loss (0-d, accumulation dtype) and the student gradient (empty when not asked for)."""
    pool, pool_grad = backends.kernels(backend, "feature", "attention_pool", "attention_grad")
    maps_s, maps_t = pool(student, p), pool(teacher, p)
    norm_s = maps_s.norm(dim=1, keepdim=True)
    unit_s = maps_s.div_(norm_s.clamp_min(NORMALIZE_EPS))
    diff = unit_s - maps_t.div_(maps_t.norm(dim=1, keepdim=True).clamp_min(NORMALIZE_EPS))
    loss = diff.square().mean()
    check_finite_loss("attention_transfer_loss", loss)
    if not student_grad:
        return loss, student.new_empty((0, *student.shape[1:]))
    grad_unit = diff.mul_(2 / diff.numel())
    # F.normalize: (dL/du - u <dL/du, u>) / |a| where |a| > eps, dL/du / eps elsewhere.
    dot = torch.where(norm_s > NORMALIZE_EPS, (grad_unit * unit_s).sum(1, keepdim=True), 0.0)
    grad_maps = grad_unit.addcmul_(unit_s, dot, value=-1).div_(norm_s.clamp_min(NORMALIZE_EPS))
    return loss, pool_grad(student, grad_maps, p)


@attention_transfer_loss.register_fake
def _(student, teacher, p, student_grad, backend):
    acc = backends.accumulation_dtype(student.dtype)
    return (student.new_empty((), dtype=acc),
            student.new_empty(student.shape if student_grad else (0, *student.shape[1:])))


saved_gradients.register_leading_gradients_autograd(attention_transfer_loss, num_inputs=5)


@torch.library.custom_op("kdkernels::squared_error", mutates_args=())
def squared_error(student: Tensor, teacher: Tensor, student_grad: bool, backend: str) -> tuple[Tensor, Tensor]:
    """The mean squared error of contiguous tensors of one shape (0-d, accumulation dtype) and its
    student gradient (empty when not asked for), from one pass."""
    (kernel,) = backends.kernels(backend, "feature", "squared_error")
    numel = max(student.numel(), 1)
    total, grad = kernel(student, teacher, 2.0 / numel, student_grad)
    loss = total / numel
    check_finite_loss("hint_loss", loss)
    return loss, grad


@squared_error.register_fake
def _(student, teacher, student_grad, backend):
    acc = backends.accumulation_dtype(student.dtype)
    return student.new_empty((), dtype=acc), student.new_empty(student.shape if student_grad else (0,))


saved_gradients.register_leading_gradients_autograd(squared_error, num_inputs=4)

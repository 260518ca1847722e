"""The DIST custom op `kdkernels::dist_loss`: the row and column statistics of both softmaxes from
a kernel (csrc/dist_loss.h), the Pearson correlations and their derivatives from those O(N + C)
statistics, and the student gradient from a second kernel, all in the forward; backward only
scales the saved gradient."""

from __future__ import annotations


import torch

from kdkernels.ops import backends, saved_gradients

Tensor = torch.Tensor


def _pearson(sums: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """From (sum a b, sum a^2, sum b^2) of centred vectors a, b: the correlation
    r = sum a b / (|a| |b| + eps) and (u, v) with dr/da = u b - v a (no term through the centring,
    since a and b sum to 0; v = 0 where |a| = 0, the subgradient of the norm there)."""
    ab, norm_a, norm_b = sums[:, 0], sums[:, 1].sqrt(), sums[:, 2].sqrt()
    denominator = norm_a * norm_b + eps
    u = 1 / denominator
    v = torch.where(norm_a > 0, ab * norm_b / (norm_a.clamp_min(torch.finfo(sums.dtype).tiny) * denominator**2), 0.0)
    return ab / denominator, torch.stack([u, v], dim=1)


def _check_values(student: Tensor, teacher: Tensor) -> None:
    """ValueError for NaN, +inf or a row all -inf in either input (the kernels assume none), from
    one reduction per input and one host sync: a row's max is NaN or +inf, or -inf."""
    row_max = torch.stack([student.amax(-1), teacher.amax(-1)])
    bad = ~(row_max < float("inf")) | (row_max == float("-inf"))
    if bool(bad.any()):
        side, row = bad.nonzero()[0].tolist()
        what = "is all -inf" if row_max[side, row] == float("-inf") else "contains NaN or +inf"
        raise ValueError(f"dist_loss: {('student_logits', 'teacher_logits')[side]} row {row} {what}")


@torch.library.custom_op("kdkernels::dist_loss", mutates_args=())
def dist_loss_op(student: Tensor, teacher: Tensor, temperature: float, beta: float, gamma: float, eps: float,
                 student_grad: bool, backend: str) -> tuple[Tensor, Tensor]:
    """The DIST loss of [N, C] logits (a 0-d tensor in the accumulation dtype) and its student
    gradient (empty [0, C] when not asked for)."""
    _check_values(student, teacher)
    stats, grad = backends.kernels(backend, "dist_loss", "dist_loss_stats", "dist_loss_grad")
    row_stats, column_stats = stats(student, teacher, temperature)
    rows, classes = student.shape
    # Rows and columns in one pass of the small ops: [N + C, 3] sums.
    r, coef = _pearson(torch.cat([row_stats, column_stats[:, 2:]]), eps)
    (row_r, column_r), (row_coef, column_coef) = r.split([rows, classes]), coef.split([rows, classes])
    scale = temperature**2
    loss = scale * (beta * (1 - row_r.mean()) + gamma * (1 - column_r.mean()))
    if not student_grad:
        return loss, student.new_empty(0, classes)
    return loss, grad(student, teacher, temperature, row_coef * (-scale * beta / rows),
                      column_coef * (-scale * gamma / classes), column_stats)


@dist_loss_op.register_fake
def _(student, teacher, temperature, beta, gamma, eps, student_grad, backend):
    acc_dtype = backends.accumulation_dtype(student.dtype)
    return student.new_empty((), dtype=acc_dtype), student.new_empty(student.shape[0] if student_grad else 0,
                                                                     student.shape[1])


saved_gradients.register_leading_gradients_autograd(dist_loss_op, num_inputs=8)

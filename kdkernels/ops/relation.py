"""Relation custom ops: `kdkernels::relation_matrix` (pairwise relation matrices of features) and
`kdkernels::relation_loss` (RKD distance and angle, similarity-preserving, PKT). The kernels
(csrc/relation.h) give the matrices and the angle triplet sums; every gradient flows through the
Gram matrix G = x x^T: each relation's dL/dG (O(N^2)) and then dL/dx = (dL/dG + dL/dG^T) x."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from kdkernels.ops import backends, saved_gradients

Tensor = torch.Tensor

# Relation kinds and their codes in csrc/relation.h.
KINDS = {"gram": 0, "cosine": 1, "cosine_offset": 2, "squared_distance": 3, "distance": 4}


def check_finite_loss(op: str, value: Tensor) -> None:
    """ValueError when a feature loss is NaN or inf: the kernels take finite features whose squares
    (powers) fit the accumulation dtype, and report the rest through the loss."""
    if not bool(torch.isfinite(value)):
        raise ValueError(f"{op} is not finite: the features hold NaN or inf, or values whose squares or powers "
                         f"overflow {value.dtype}")


def _accumulation(x: Tensor) -> Tensor:
    return x.to(backends.accumulation_dtype(x.dtype))


def _features_gradient(x: Tensor, grad_gram: Tensor) -> Tensor:
    """dL/dx from dL/dG for G = x x^T, in the accumulation dtype."""
    return (grad_gram + grad_gram.T) @ _accumulation(x)


def _gram_gradient_(kind: str, x: Tensor, matrix: Tensor, grad: Tensor, eps: float) -> Tensor:
    """dL/dG from dL/dR (`grad`, overwritten) for the relation matrix R (`matrix`) of `kind` of x
    (csrc/relation.h); R is symmetric."""
    if kind == "gram":
        return grad
    if kind in ("cosine", "cosine_offset"):
        norm = _accumulation(x).norm(dim=1)
        scale = 1 / (norm.clamp_min(eps) if kind == "cosine" else norm + eps)
        # R_ij = G_ij m_i m_j with m_i = m(|x_i|), |x_i| = sqrt(G_ii); m is constant below eps for "cosine".
        weighted = grad * matrix
        grad_scale = (weighted.sum(1) + weighted.sum(0)) / scale
        del weighted
        scale_slope = -scale * scale if kind == "cosine_offset" else torch.where(norm > eps, -scale * scale, 0.0)
        diagonal = torch.where(norm > 0, grad_scale * scale_slope / (2 * norm.clamp_min(torch.finfo(norm.dtype).tiny)),
                               0.0)
        grad = grad.mul_(scale[:, None]).mul_(scale[None, :])
        grad.diagonal().add_(diagonal)
        return grad
    # R_ij = max(G_ii + G_jj - 2 G_ij, eps) (and its root): no gradient where clamped or on the diagonal.
    floor = _distance_floor(kind, eps, matrix.dtype)
    clamped = matrix <= floor
    if kind == "distance":
        grad = grad.div_(matrix.clamp_min(floor)).div_(2)
    return _squared_distance_gradient_(grad.masked_fill_(clamped, 0.0))


@torch.library.custom_op("kdkernels::relation_matrix", mutates_args=())
def relation_matrix(x: Tensor, kind: str, eps: float, backend: str) -> Tensor:
    """The [N, N] relation matrix of `kind` of [N, D] features (unit stride along D), in the
    accumulation dtype."""
    return backends.kernels(backend, "relation", "relation_matrix")[0](x, KINDS[kind], eps)


@relation_matrix.register_fake
def _(x, kind, eps, backend):
    return x.new_empty((x.shape[0], x.shape[0]), dtype=backends.accumulation_dtype(x.dtype))


def _relation_setup(ctx, inputs, output) -> None:
    x, kind, eps, _ = inputs
    ctx.save_for_backward(x, output)
    ctx.kind, ctx.eps = kind, eps


def _relation_backward(ctx, grad: Tensor):
    saved_gradients.check_first_order()
    x, matrix = ctx.saved_tensors
    grad_gram = _gram_gradient_(ctx.kind, x, matrix, grad.to(matrix.dtype, copy=True), ctx.eps)
    return _features_gradient(x, grad_gram).to(x.dtype), None, None, None


relation_matrix.register_autograd(_relation_backward, setup_context=_relation_setup)


def _distance_floor(kind: str, eps: float, dtype: torch.dtype) -> float:
    """The value of a clamped entry of a distance matrix: eps, or its square root for "distance"
    (rounded as the kernels round it)."""
    floor = torch.tensor(eps, dtype=dtype)
    return (floor.sqrt() if kind == "distance" else floor).item()


def _rkd_distance(student: Tensor, d_s: Tensor, d_t: Tensor) -> tuple[Tensor, Tensor]:
    """Loss and dL/dG_s of distance-wise RKD, in place on the distance matrices. Every off-diagonal
    distance is positive (clamped at sqrt(eps) > 0), so the mean of the positive entries is their
    sum over N (N - 1)."""
    rows = d_s.shape[0]
    pairs = rows * (rows - 1)
    clamped = d_s <= _distance_floor("distance", DISTANCE_EPS, d_s.dtype)
    mean_s = d_s.sum() / pairs
    s = d_s.div_(mean_s)
    t = d_t.div_(d_t.sum() / pairs)
    loss = torch.nn.functional.smooth_l1_loss(s, t)
    slope = t.sub_(s).neg_().clamp_(-1, 1).div_(rows * rows)
    # s = d_s / mean: the mean's share of the gradient spreads over the off-diagonal entries.
    slope.sub_(torch.dot(slope.view(-1), s.view(-1)) / pairs).diagonal().zero_()
    # dL/dS for S = d^2: (slope / mean) / (2 d) with d = s mean, 0 where clamped.
    w = slope.div_(s.mul_(2 * mean_s * mean_s)).masked_fill_(clamped, 0.0)
    return loss, _squared_distance_gradient_(w)


def _squared_distance_gradient_(w: Tensor) -> Tensor:
    """dL/dG from dL/dS for S_ij = G_ii + G_jj - 2 G_ij, in place."""
    diagonal = w.sum(0) + w.sum(1)
    grad = w.mul_(-2)
    grad.diagonal().add_(diagonal)
    return grad


def _similarity_preserving(student: Tensor, g_s: Tensor, g_t: Tensor) -> tuple[Tensor, Tensor]:
    """Loss and dL/dG_s of SP, in place on the Gram matrices (rows L2-normalised as F.normalize,
    eps 1e-12)."""
    eps = 1e-12
    rows = g_s.shape[0]
    norm = g_s.norm(dim=1, keepdim=True)
    s = g_s.div_(norm.clamp_min(eps))
    diff = g_t.div_(g_t.norm(dim=1, keepdim=True).clamp_min(eps)).sub_(s)
    loss = torch.linalg.vector_norm(diff).square() / rows**2
    grad = diff.mul_(-2 / rows**2)
    # Row normalisation: (dL/ds - s <dL/ds, s>) / |g| where |g| > eps, dL/ds / eps elsewhere.
    dot = torch.where(norm > eps, (grad * s).sum(1, keepdim=True), 0.0)
    return loss, grad.addcmul_(s, dot, value=-1).div_(norm.clamp_min(eps))


PKT_EPS = 1e-7
DISTANCE_EPS = 1e-12


def _pkt(student: Tensor, c_s: Tensor, c_t: Tensor) -> tuple[Tensor, Tensor]:
    """Loss and dL/dG_s of PKT on the cosine matrices (features divided by norm + eps)."""
    def probabilities(c: Tensor) -> tuple[Tensor, Tensor]:
        p = (c + 1) / 2
        total = p.sum(1, keepdim=True)
        return p.div_(total), total

    q, total = probabilities(c_s)
    p, _ = probabilities(c_t)
    shifted_q = q + PKT_EPS
    loss = (p + PKT_EPS).div_(shifted_q).log_().mul_(p).mean()
    grad_q = p.div_(shifted_q).div_(-p.numel())
    del shifted_q
    grad_c = grad_q.sub_((grad_q * q).sum(1, keepdim=True)).div_(2 * total)
    return loss, _gram_gradient_("cosine_offset", student, c_s, grad_c, PKT_EPS)


@dataclass(frozen=True)
class RelationLoss:
    """A loss of the relation matrices of one kind of student and teacher:
    (student, R_s, R_t) -> (loss, dL/dG_s), free to overwrite R_s and R_t."""

    kind: str
    eps: float
    function: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


RELATION_LOSSES = {
    "rkd_distance": RelationLoss("distance", DISTANCE_EPS, _rkd_distance),
    "similarity_preserving": RelationLoss("gram", 0.0, _similarity_preserving),
    "pkt": RelationLoss("cosine_offset", PKT_EPS, _pkt),
}
LOSSES = (*RELATION_LOSSES, "rkd_angle")


def coincidence_tolerance(features: int, dtype: torch.dtype) -> float:
    """Relative tolerance below which a pair's squared distance, taken from the Gram matrix, is
    rounding noise: 8 sqrt(D) ulps of |x_i|^2 + |x_j|^2."""
    return 8 * math.sqrt(features) * torch.finfo(dtype).eps


def _inverse_distances(gram: Tensor, tolerance: float) -> Tensor:
    """1 / |x_j - x_i| from the Gram matrix, 0 where the pair coincides (to the tolerance) and on
    the diagonal: F.normalize's zero vector for a zero difference."""
    diagonal = gram.diagonal()
    scale = diagonal[:, None] + diagonal[None, :]
    squared = scale - 2 * gram
    return torch.where(squared > tolerance * scale, squared.clamp_min(torch.finfo(gram.dtype).tiny).rsqrt(), 0.0)


def _rkd_angle(student: Tensor, teacher: Tensor, student_grad: bool, backend: str) -> tuple[Tensor, Optional[Tensor]]:
    """Angle-wise RKD from the Gram matrices of the centred features (angles are translation
    invariant; centring keeps the differences' digits) and the triplet kernel."""
    matrix, triplets = backends.kernels(backend, "relation", "relation_matrix", "rkd_angle_triplets")
    centred = [x - x.mean(0) for x in map(_accumulation, (student, teacher))]
    grams = [matrix(x, KINDS["gram"], 0.0) for x in centred]
    inverse = [_inverse_distances(g, coincidence_tolerance(x.shape[1], g.dtype)) for g, x in zip(grams, centred)]
    rows = student.shape[0]
    scale = 1.0 / rows**3
    parts = triplets(grams[0], grams[1], inverse[0], inverse[1], scale, student_grad)
    loss = parts[0].sum() * scale
    if not student_grad:
        return loss, None
    anchor, pair, radial = parts[1:]
    # dL/dG over P_ijk = G_jk - G_ij - G_ik + G_ii (B, C) and r_ij = sqrt(G_ii + G_jj - 2 G_ij) (R).
    diagonal = pair.sum(1) - radial.sum(1) - radial.sum(0)
    grad_gram = anchor - 2 * pair + 2 * radial + torch.diag(diagonal)
    grad = _features_gradient(centred[0], grad_gram)
    return loss, grad - grad.mean(0)


@torch.library.custom_op("kdkernels::relation_loss", mutates_args=())
def relation_loss(student: Tensor, teacher: Tensor, loss: str, student_grad: bool,
                  backend: str) -> tuple[Tensor, Tensor]:
    """A relation loss of [N, D_s] student and [N, D_t] teacher features (unit stride along D): the
    loss (0-d, accumulation dtype) and the student gradient (empty [0, D_s] when not asked for)."""
    if loss == "rkd_angle":
        value, grad = _rkd_angle(student, teacher, student_grad, backend)
    else:
        spec = RELATION_LOSSES[loss]
        (matrix,) = backends.kernels(backend, "relation", "relation_matrix")
        value, grad_gram = spec.function(student, matrix(student, KINDS[spec.kind], spec.eps),
                                         matrix(teacher, KINDS[spec.kind], spec.eps))
        grad = _features_gradient(student, grad_gram) if student_grad else None
    check_finite_loss(f"{loss}_loss", value)
    return value, (grad.to(student.dtype) if grad is not None else student.new_empty(0, student.shape[1]))


@relation_loss.register_fake
def _(student, teacher, loss, student_grad, backend):
    return (student.new_empty((), dtype=backends.accumulation_dtype(student.dtype)),
            student.new_empty(student.shape if student_grad else (0, student.shape[1])))


saved_gradients.register_leading_gradients_autograd(relation_loss, num_inputs=5)

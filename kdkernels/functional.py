"""Public functional API."""

from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch

from kdkernels import reference
from kdkernels.ops import DIVERGENCES, kd_loss_rows, resolve_backend

Tensor = torch.Tensor

REDUCTIONS = ("batchmean", "sum", "none")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_logits(student_logits: Tensor, teacher_logits: Tensor) -> None:
    for name, value in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")
        if value.dim() < 1 or value.shape[-1] < 1:
            raise ValueError(f"{name} must have shape [..., V] with V >= 1, got {tuple(value.shape)}")
    if teacher_logits.dtype != student_logits.dtype:
        raise TypeError(
            f"teacher_logits dtype {teacher_logits.dtype} differs from student_logits dtype {student_logits.dtype}")
    if teacher_logits.device != student_logits.device:
        raise ValueError(
            f"teacher_logits is on {teacher_logits.device} but student_logits is on {student_logits.device}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} differs from student_logits shape "
            f"{tuple(student_logits.shape)} (same leading shape and vocabulary size V expected)")


def _check_target(target: Tensor, student_logits: Tensor) -> None:
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor or None, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must hold class indices as int64 (or int32), got {target.dtype}")
    if target.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal the leading shape of student_logits "
            f"{tuple(student_logits.shape[:-1])}")
    if target.device != student_logits.device:
        raise ValueError(f"target is on {target.device} but student_logits is on {student_logits.device}")


def _check_number(name: str, value: object, low: float, high: float, *, open_low: bool = False,
                  open_high: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    below = value <= low if open_low else value < low
    above = value >= high if open_high else value > high
    if math.isnan(value) or below or above:
        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value}")
    return value


def _divergence_args(divergence: str, beta: float, skew: float, ab_alpha: Optional[float],
                     ab_beta: Optional[float]) -> list[float]:
    """The checked values of the divergence's keywords, in its kernel order (DIVERGENCES)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {sorted(DIVERGENCES)}, got {divergence!r}")
    checks = {
        "beta": lambda: _check_number("beta", beta, 0.0, 1.0, open_low=True, open_high=True),
        "skew": lambda: _check_number("skew", skew, 0.0, 1.0, open_high=True),
        "ab_alpha": lambda: _check_ab("ab_alpha", ab_alpha),
        "ab_beta": lambda: _check_ab("ab_beta", ab_beta),
    }
    return [checks[keyword]() for keyword in DIVERGENCES[divergence].keywords]


def _check_ab(name: str, value: Optional[float]) -> float:
    if value is None:
        raise ValueError(f"divergence='ab' needs {name} (the alpha-beta divergence has no default order)")
    return _check_number(name, value, -math.inf, math.inf, open_low=True, open_high=True)


def _check_options(temperature: float, alpha: float, reduction: str,
                   num_items: Optional[Union[int, Tensor]]) -> tuple[float, float]:
    temperature = _check_number("temperature", temperature, 0.0, math.inf, open_low=True, open_high=True)
    alpha = _check_number("alpha", alpha, 0.0, 1.0)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if num_items is not None:
        if reduction != "batchmean":
            raise ValueError(f"num_items applies to reduction='batchmean' only, got reduction={reduction!r}")
        if isinstance(num_items, Tensor):
            if num_items.numel() != 1 or num_items.requires_grad:
                raise ValueError("num_items must be a number or a one-element tensor without grad, "
                                 f"got shape {tuple(num_items.shape)}")
        else:
            _check_number("num_items", num_items, 0.0, math.inf, open_low=True, open_high=True)
    return temperature, alpha


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    ab_alpha: Optional[float] = None,
    ab_beta: Optional[float] = None,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    scale_by_temperature: bool = True,
    num_items: Optional[Union[int, Tensor]] = None,
    logit_scale: float = 1.0,
    backend: str = "auto",
) -> Tensor:
    """Knowledge-distillation loss on logits, fused: softmax, divergence, hard-label CE and
    their gradients in one kernel.

    For each row (a length-V vector of ``[..., V]`` inputs), with ``P_t = softmax(teacher/T)``
    and ``P_s = softmax(student/T)`` computed in fp32 (fp64 for fp64 inputs):

    - ``divergence``: ``"forward_kl"`` KL(P_t || P_s); ``"reverse_kl"`` KL(P_s || P_t); ``"jsd"``
      beta KL(P_t || M) + (1 - beta) KL(P_s || M) with M = beta P_t + (1 - beta) P_s,
      ``0 < beta < 1``; ``"skew_kl"`` KL(P_t || skew P_t + (1 - skew) P_s) and
      ``"skew_reverse_kl"`` KL(P_s || (1 - skew) P_t + skew P_s), ``0 <= skew < 1`` (DistiLLM;
      skew = 0 gives forward / reverse KL); ``"tvd"`` sum |P_t - P_s| / 2 (subgradient 0 where
      equal); ``"ab"`` the alpha-beta divergence of ABKD with ``ab_alpha``, ``ab_beta`` (both
      required): -1/(a b) sum [P_t^a P_s^b - a/(a+b) P_t^(a+b) - b/(a+b) P_s^(a+b)] and its
      continuous limits where a, b or a + b is 0 ((1, 0) is forward KL, (0, 1) reverse KL).
      Each sums over the entries finite in both inputs.
    - ``logit_scale=c`` (> 0): the soft term sees ``c * logits`` of both inputs (Cohere-style heads);
      ``T`` still scales the soft term by ``T^2``; the CE term reads the raw logits.
    - ``soft = divergence * (T^2 if scale_by_temperature else 1)``.
    - with ``target``: ``alpha * soft + (1 - alpha) * CE(softmax(student), target)``; rows whose
      target is ``ignore_index`` count in neither term. Without target: ``soft``.
    - ``reduction``: ``"batchmean"`` (sum over counted rows / their number, or / ``num_items``),
      ``"sum"``, or ``"none"`` (per-row losses of the leading shape, 0 at ignored rows).

    Entries equal to -inf (masked vocabulary) contribute 0; a row that is all -inf, NaN or +inf
    in an input, or a target outside [0, V), raises ValueError. Gradients flow to both logits.
    The loss is returned in fp32 (fp64 for fp64 inputs). ``backend``: "auto" or one of
    :func:`kdkernels.available_backends`.
    """
    _check_logits(student_logits, teacher_logits)
    if target is not None:
        _check_target(target, student_logits)
    temperature, alpha = _check_options(temperature, alpha, reduction, num_items)
    logit_scale = _check_number("logit_scale", logit_scale, 0.0, math.inf, open_low=True, open_high=True)
    divergence_args = _divergence_args(divergence, beta, skew, ab_alpha, ab_beta)
    backend = resolve_backend(backend, student_logits.device)
    if backend == "reference":
        return reference.kd_loss(
            student_logits, teacher_logits, target, temperature=temperature, alpha=alpha,
            divergence=divergence, beta=beta, skew=skew, ab_alpha=ab_alpha, ab_beta=ab_beta, reduction=reduction,
            ignore_index=ignore_index, scale_by_temperature=scale_by_temperature, num_items=num_items,
            logit_scale=logit_scale)

    vocab = student_logits.shape[-1]
    lead_shape = student_logits.shape[:-1]
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.reshape(-1, vocab)
    if student.stride(-1) != 1:
        student = student.contiguous()
    if teacher.stride(-1) != 1:
        teacher = teacher.contiguous()
    rows_target = None if target is None else target.reshape(-1).long()
    soft_scale = temperature**2 if scale_by_temperature else 1.0
    soft_weight = soft_scale * (alpha if target is not None else 1.0)
    hard_weight = 1.0 - alpha if target is not None else 0.0
    row_weight = None
    if reduction == "batchmean":
        weight_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
        if num_items is not None:
            denominator = torch.as_tensor(num_items, device=student.device)
        elif rows_target is None:
            denominator = torch.tensor(max(student.shape[0], 1), device=student.device)
        else:
            denominator = (rows_target != ignore_index).sum().clamp_min(1)
        row_weight = denominator.to(weight_dtype).reciprocal()
    grad_enabled = torch.is_grad_enabled()
    # logit_scale c scales the soft term's logits: softmax(c z / T) is softmax(z / (T / c)). The CE
    # term reads the raw student logits (at T / c = 1 the kernels take them from the same read).
    rows, _, _ = kd_loss_rows(
        student, teacher, rows_target, row_weight, temperature / logit_scale, soft_weight, hard_weight, divergence,
        divergence_args,
        int(ignore_index), grad_enabled and student_logits.requires_grad,
        grad_enabled and teacher_logits.requires_grad, backend)
    if reduction == "none":
        return rows.reshape(lead_shape)
    return rows.sum()

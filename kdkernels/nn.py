"""Public nn.Module API."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from kdkernels.functional import dkd_loss, fused_linear_kd_loss, kd_loss

Tensor = torch.Tensor


class KDLoss(torch.nn.Module):
    """Module form of :func:`kdkernels.kd_loss`, with its keywords fixed at construction."""

    def __init__(self, *, temperature: float = 1.0, alpha: float = 0.5, divergence: str = "forward_kl",
                 beta: float = 0.5, skew: float = 0.1, ab_alpha: Optional[float] = None,
                 ab_beta: Optional[float] = None, reduction: str = "batchmean", ignore_index: int = -100,
                 scale_by_temperature: bool = True, num_items: Optional[Union[int, Tensor]] = None,
                 logit_scale: float = 1.0, backend: str = "auto") -> None:
        super().__init__()
        self.options = dict(temperature=temperature, alpha=alpha, divergence=divergence, beta=beta, skew=skew,
                            ab_alpha=ab_alpha, ab_beta=ab_beta, reduction=reduction, ignore_index=ignore_index,
                            scale_by_temperature=scale_by_temperature, num_items=num_items, logit_scale=logit_scale,
                            backend=backend)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor] = None) -> Tensor:
        return kd_loss(student_logits, teacher_logits, target, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self.options.items())


class FusedLinearKDLoss(torch.nn.Module):
    """Module form of :func:`kdkernels.fused_linear_kd_loss`, with its keywords fixed at construction:
    ``forward(student_hidden, student_weight, teacher_hidden, teacher_weight, target=None,
    student_bias=None, teacher_bias=None)``, e.g. with the ``lm_head`` weights of both models."""

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = options

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
                target: Optional[Tensor] = None, student_bias: Optional[Tensor] = None,
                teacher_bias: Optional[Tensor] = None) -> Tensor:
        return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, target,
                                    student_bias=student_bias, teacher_bias=teacher_bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self.options.items())


class DKDLoss(torch.nn.Module):
    """Module form of :func:`kdkernels.dkd_loss`: ``forward(student_logits, teacher_logits, target)``."""

    def __init__(self, *, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, ignore_index: int = -100,
                 backend: str = "auto") -> None:
        super().__init__()
        self.options = dict(alpha=alpha, beta=beta, temperature=temperature, ignore_index=ignore_index,
                            backend=backend)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
        return dkd_loss(student_logits, teacher_logits, target, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self.options.items())

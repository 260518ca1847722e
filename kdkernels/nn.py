"""Public nn.Module API."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import torch

from kdkernels.functional import (dist_loss, dkd_loss, fused_linear_kd_loss, fused_linear_topk_kd_loss, kd_loss,
                                  topk_kd_loss)

Tensor = torch.Tensor


class _KeywordLoss(torch.nn.Module):
    """A loss module that fixes the keyword arguments of its function at construction; unknown
    keywords are a TypeError there, not at the first forward."""

    function: Callable[..., Tensor]

    def __init__(self, **options: Any) -> None:
        super().__init__()
        keywords = {name for name, parameter in inspect.signature(type(self).function).parameters.items()
                    if parameter.kind == inspect.Parameter.KEYWORD_ONLY}
        unknown = sorted(set(options) - keywords)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown keywords {unknown}; it takes {sorted(keywords)}")
        self.options = options

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self.options.items())


class KDLoss(_KeywordLoss):
    """Module form of :func:`kdkernels.kd_loss`, with its keywords fixed at construction:
    ``forward(student_logits, teacher_logits, target=None)``."""

    function = staticmethod(kd_loss)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor] = None) -> Tensor:
        return kd_loss(student_logits, teacher_logits, target, **self.options)


class FusedLinearKDLoss(_KeywordLoss):
    """Module form of :func:`kdkernels.fused_linear_kd_loss`, with its keywords fixed at construction:
    ``forward(student_hidden, student_weight, teacher_hidden, teacher_weight, target=None,
    student_bias=None, teacher_bias=None)``, e.g. with the ``lm_head`` weights of both models."""

    function = staticmethod(fused_linear_kd_loss)

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
                target: Optional[Tensor] = None, student_bias: Optional[Tensor] = None,
                teacher_bias: Optional[Tensor] = None) -> Tensor:
        return fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, target,
                                    student_bias=student_bias, teacher_bias=teacher_bias, **self.options)


class TopKKDLoss(_KeywordLoss):
    """Module form of :func:`kdkernels.topk_kd_loss`, with its keywords fixed at construction:
    ``forward(student_logits, teacher_topk_indices, teacher_topk_logprobs, target=None)``."""

    function = staticmethod(topk_kd_loss)

    def forward(self, student_logits: Tensor, teacher_topk_indices: Tensor, teacher_topk_logprobs: Tensor,
                target: Optional[Tensor] = None) -> Tensor:
        return topk_kd_loss(student_logits, teacher_topk_indices, teacher_topk_logprobs, target, **self.options)


class FusedLinearTopKKDLoss(_KeywordLoss):
    """Module form of :func:`kdkernels.fused_linear_topk_kd_loss`, with its keywords fixed at
    construction: ``forward(student_hidden, student_weight, teacher_topk_indices,
    teacher_topk_logprobs, target=None, student_bias=None)``."""

    function = staticmethod(fused_linear_topk_kd_loss)

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_topk_indices: Tensor,
                teacher_topk_logprobs: Tensor, target: Optional[Tensor] = None,
                student_bias: Optional[Tensor] = None) -> Tensor:
        return fused_linear_topk_kd_loss(student_hidden, student_weight, teacher_topk_indices, teacher_topk_logprobs,
                                         target, student_bias=student_bias, **self.options)


class DKDLoss(_KeywordLoss):
    """Module form of :func:`kdkernels.dkd_loss`, with its keywords fixed at construction:
    ``forward(student_logits, teacher_logits, target)``."""

    function = staticmethod(dkd_loss)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
        return dkd_loss(student_logits, teacher_logits, target, **self.options)


class DISTLoss(_KeywordLoss):
    """Module form of :func:`kdkernels.dist_loss`, with its keywords fixed at construction:
    ``forward(student_logits, teacher_logits)``."""

    function = staticmethod(dist_loss)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return dist_loss(student_logits, teacher_logits, **self.options)

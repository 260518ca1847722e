"""Public nn.Module API."""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from kdkernels.functional import (attention_transfer_loss, dist_loss, dkd_loss, fused_linear_kd_loss,
                                  fused_linear_topk_kd_loss, hint_loss, kd_loss, pkt_loss, rkd_angle_loss,
                                  rkd_distance_loss, similarity_preserving_loss, topk_kd_loss)

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


class _WeightedLoss(_KeywordLoss):
    """A loss between student and teacher features, times ``weight`` (a term of a weighted sum,
    e.g. Park et al.'s 25 for RKD distances and 50 for angles): ``forward(student, teacher)``."""

    def __init__(self, weight: float = 1.0, **options: Any) -> None:
        super().__init__(**options)
        self.weight = float(weight)

    def forward(self, student: Any, teacher: Any) -> Tensor:
        return self.weight * type(self).function(student, teacher, **self.options)

    def extra_repr(self) -> str:
        return ", ".join([f"weight={self.weight}"] + ([super().extra_repr()] if self.options else []))


class RKDDistanceLoss(_WeightedLoss):
    """Module form of :func:`kdkernels.rkd_distance_loss`, times ``weight``."""

    function = staticmethod(rkd_distance_loss)


class RKDAngleLoss(_WeightedLoss):
    """Module form of :func:`kdkernels.rkd_angle_loss`, times ``weight``."""

    function = staticmethod(rkd_angle_loss)


class SimilarityPreservingLoss(_WeightedLoss):
    """Module form of :func:`kdkernels.similarity_preserving_loss`, times ``weight``."""

    function = staticmethod(similarity_preserving_loss)


class PKTLoss(_WeightedLoss):
    """Module form of :func:`kdkernels.pkt_loss`, times ``weight``."""

    function = staticmethod(pkt_loss)


class AttentionTransferLoss(_WeightedLoss):
    """Module form of :func:`kdkernels.attention_transfer_loss` (its ``p`` fixed at construction),
    times ``weight`` (Zagoruyko & Komodakis use 1000 with their mean): ``forward(student_feats,
    teacher_feats)`` with one map or a sequence of maps per side."""

    function = staticmethod(attention_transfer_loss)


_INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}


class HintAdapter(torch.nn.Module):
    """The regressor of FitNets and the adaptation layer of Chen et al. (NeurIPS 2017): a 1x1
    convolution from ``student_channels`` to ``teacher_channels`` (a linear map for [N, C]
    features), then, when a spatial size is given and differs, interpolation to it (linear,
    bilinear or trilinear for 1-, 2- or 3-D maps, ``align_corners=False``). Called by
    :func:`kdkernels.hint_loss` as ``adapter(student_feat, teacher_spatial_size)``."""

    def __init__(self, student_channels: int, teacher_channels: int, *, bias: bool = True) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(teacher_channels, student_channels))
        self.bias = torch.nn.Parameter(torch.empty(teacher_channels)) if bias else None
        # As nn.Conv2d and nn.Linear initialise themselves (fan-in = student_channels for a 1x1 kernel).
        torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(student_channels)
            torch.nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor, size: Optional[Sequence[int]] = None) -> Tensor:
        if x.dim() == 2:
            return F.linear(x, self.weight, self.bias)
        spatial = x.dim() - 2
        if spatial not in _INTERPOLATION:
            raise ValueError(f"HintAdapter takes [N, C] or [N, C, *spatial] features with 1 to 3 spatial dims, "
                             f"got shape {tuple(x.shape)}")
        convolution = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
        y = convolution(x, self.weight.view(*self.weight.shape, *([1] * spatial)), self.bias)
        if size is not None and tuple(size) and tuple(y.shape[2:]) != tuple(size):
            y = F.interpolate(y, size=tuple(size), mode=_INTERPOLATION[spatial], align_corners=False)
        return y

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, bias={self.bias is not None}"


class HintLoss(torch.nn.Module):
    """Module form of :func:`kdkernels.hint_loss` that owns its adapter (when given), times
    ``weight``: ``forward(student_feat, teacher_feat)``."""

    def __init__(self, adapter: Optional[torch.nn.Module] = None, *, weight: float = 1.0, backend: str = "auto") -> None:
        super().__init__()
        self.adapter = adapter
        self.weight = float(weight)
        self.backend = backend

    def forward(self, student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
        return self.weight * hint_loss(student_feat, teacher_feat, self.adapter, backend=self.backend)

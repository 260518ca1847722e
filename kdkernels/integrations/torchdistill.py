"""torchdistill's mid-level losses on kdkernels' kernels. Importing this module registers
``kdkernels.KDLoss``, ``kdkernels.LogitStdKDLoss``, ``kdkernels.DISTLoss``, ``kdkernels.RKDLoss``,
``kdkernels.SPKDLoss``, ``kdkernels.PKTLoss`` and ``kdkernels.ATLoss`` in torchdistill's registry:
a YAML config switches by changing its ``key`` (``KDLoss`` -> ``kdkernels.KDLoss``). Each class
subclasses torchdistill's own, so constructor arguments, attributes and the
``forward(student_io_dict, teacher_io_dict, targets)`` convention are torchdistill's, as are the
numbers (its ``alpha`` weights the CE, its KL has no T^2 without targets, its SP normalises the
rows of the Gram matrix with p = 1). Options the fused kernels do not cover (noted per class) run
torchdistill's own code. Needs torchdistill (``pip install 'kdkernels[torchdistill]'``)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

try:
    from torchdistill.losses import mid_level
    from torchdistill.losses.registry import register_mid_level_loss
except ImportError as exc:
    raise ImportError("kdkernels.integrations.torchdistill needs torchdistill: "
                      "pip install 'kdkernels[torchdistill]'") from exc

from kdkernels.functional import (attention_transfer_loss, dist_loss, gram, kd_loss, pkt_loss, rkd_angle_loss,
                                  rkd_distance_loss)
from kdkernels.ops.relation import PKT_EPS

Tensor = torch.Tensor

_STANDARDIZE_EPS = 1e-7  # kd_loss(standardize=True)'s


def _logits(io_dict: dict, path: str, io: str) -> Tensor:
    return io_dict[path][io]


class _KLDivKD:
    """torchdistill's KDLoss / LogitStdKDLoss as one fused kd_loss call: ``alpha * CE + beta * T^2 *
    KL`` with ``alpha`` and ``beta`` arbitrary (a scaled convex combination), or the KL alone (no
    T^2) when ``alpha`` is None or 0 or there are no targets. Covered: [N, C] logits, reduction
    "batchmean" or "sum", a plain CE (no class weights or label smoothing) and targets without
    its ignore_index; anything else runs torchdistill's forward."""

    standardize = False

    def _fused(self, student_logits: Tensor, teacher_logits: Tensor, targets: Optional[Tensor]) -> Optional[Tensor]:
        ce = self.cross_entropy_loss
        plain = (student_logits.dim() == 2 and self.reduction in ("batchmean", "sum") and ce.weight is None
                 and ce.label_smoothing == 0)
        if not plain:
            return None
        options = dict(temperature=float(self.temperature), reduction=self.reduction, standardize=self.standardize)
        if self.alpha is None or self.alpha == 0 or targets is None:
            return kd_loss(student_logits, teacher_logits, alpha=1.0, scale_by_temperature=False, **options)
        if bool((targets == ce.ignore_index).any()):
            return None
        total = float(self.alpha) + float(self.beta)
        if total <= 0 or self.alpha < 0 or self.beta < 0:
            return None
        return total * kd_loss(student_logits, teacher_logits, targets, alpha=float(self.beta) / total, **options)

    def forward(self, student_io_dict: dict, teacher_io_dict: dict, targets: Optional[Tensor] = None, *args,
                **kwargs) -> Tensor:
        student_logits = _logits(student_io_dict, self.student_module_path, self.student_module_io)
        teacher_logits = _logits(teacher_io_dict, self.teacher_module_path, self.teacher_module_io)
        fused = self._fused(student_logits, teacher_logits, targets)
        if fused is None:
            return super().forward(student_io_dict, teacher_io_dict, targets, *args, **kwargs)
        return fused


@register_mid_level_loss(key="kdkernels.KDLoss")
class KDLoss(_KLDivKD, mid_level.KDLoss):
    """torchdistill's ``KDLoss`` (Hinton et al.), fused."""


@register_mid_level_loss(key="kdkernels.LogitStdKDLoss")
class LogitStdKDLoss(_KLDivKD, mid_level.LogitStdKDLoss):
    """torchdistill's ``LogitStdKDLoss`` (Sun et al., CVPR 2024), fused; ``eps`` other than 1e-7
    runs torchdistill's code."""

    standardize = True

    def _fused(self, student_logits: Tensor, teacher_logits: Tensor, targets: Optional[Tensor]) -> Optional[Tensor]:
        return super()._fused(student_logits, teacher_logits, targets) if self.eps == _STANDARDIZE_EPS else None


@register_mid_level_loss(key="kdkernels.DISTLoss")
class DISTLoss(mid_level.DISTLoss):
    """torchdistill's ``DISTLoss`` (Huang et al., NeurIPS 2022), fused."""

    def forward(self, student_io_dict: dict, teacher_io_dict: dict, *args, **kwargs) -> Tensor:
        student_logits = _logits(student_io_dict, self.student_module_path, self.student_module_io)
        teacher_logits = _logits(teacher_io_dict, self.teacher_module_path, self.teacher_module_io)
        return dist_loss(student_logits, teacher_logits.detach(), beta=self.beta, gamma=self.gamma,
                         temperature=self.tau, eps=self.eps)


@register_mid_level_loss(key="kdkernels.RKDLoss")
class RKDLoss(mid_level.RKDLoss):
    """torchdistill's ``RKDLoss`` (Park et al., CVPR 2019): ``dist_factor`` times the distance-wise
    and ``angle_factor`` times the angle-wise loss, the angles in O(N^2) memory; a ``reduction``
    other than "mean" runs torchdistill's code."""

    def forward(self, student_io_dict: dict, teacher_io_dict: dict, *args, **kwargs) -> Tensor:
        if self.smooth_l1_loss.reduction != "mean":
            return super().forward(student_io_dict, teacher_io_dict, *args, **kwargs)
        student = student_io_dict[self.student_output_path]["output"].flatten(1)
        teacher = teacher_io_dict[self.teacher_output_path]["output"].flatten(1).detach()
        loss = 0
        if self.dist_factor:
            loss = loss + self.dist_factor * rkd_distance_loss(student, teacher)
        if self.angle_factor:
            loss = loss + self.angle_factor * rkd_angle_loss(student, teacher)
        return loss


@register_mid_level_loss(key="kdkernels.SPKDLoss")
class SPKDLoss(mid_level.SPKDLoss):
    """torchdistill's ``SPKDLoss`` (Tung & Mori, ICCV 2019), its Gram matrices from the fused
    kernel; as torchdistill, their rows are normalised with p = 1 (``normalize(g, 1)``)."""

    def matmul_and_normalize(self, z: Tensor) -> Tensor:
        return F.normalize(gram(z.flatten(1)), 1)


@register_mid_level_loss(key="kdkernels.PKTLoss")
class PKTLoss(mid_level.PKTLoss):
    """torchdistill's ``PKTLoss`` (Passalis & Tefas, ECCV 2018), fused; ``eps`` other than 1e-7
    runs torchdistill's code."""

    def forward(self, student_io_dict: dict, teacher_io_dict: dict, *args, **kwargs) -> Tensor:
        if self.eps != PKT_EPS:
            return super().forward(student_io_dict, teacher_io_dict, *args, **kwargs)
        student = _logits(student_io_dict, self.student_module_path, self.student_module_io)
        teacher = _logits(teacher_io_dict, self.teacher_module_path, self.teacher_module_io)
        return pkt_loss(student, teacher.detach())


@register_mid_level_loss(key="kdkernels.ATLoss")
class ATLoss(mid_level.ATLoss):
    """torchdistill's ``ATLoss`` (Zagoruyko & Komodakis, ICLR 2017), fused in its default
    ``mode="code"``; ``mode="paper"`` runs torchdistill's code."""

    def forward(self, student_io_dict: dict, teacher_io_dict: dict, *args, **kwargs) -> Tensor:
        if self.mode != "code":
            return super().forward(student_io_dict, teacher_io_dict, *args, **kwargs)
        loss = 0
        for pair in self.at_pairs.values():
            student = _logits(student_io_dict, pair["student"]["path"], pair["student"]["io"])
            teacher = _logits(teacher_io_dict, pair["teacher"]["path"], pair["teacher"]["io"])
            loss = loss + pair.get("weight", 1) * attention_transfer_loss(student, teacher.detach(), p=2.0)
        return loss

"""Liger-Kernel's distillation losses with their signatures and semantics, on kdkernels' kernels
(CPU and GPU): swap ``from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss`` or
``from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss`` for
``from kdkernels.integrations.liger import ...``. Liger itself is not needed. Losses are fp32."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from kdkernels.functional import fused_linear_kd_loss, kd_loss
from kdkernels.integrations import generalized_jsd_options

Tensor = torch.Tensor


class LigerFusedLinearJSDLoss(torch.nn.Module):
    """``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss``: from the hidden states and LM heads,
    ``weight_hard_loss * CE + weight_soft_loss * JSD_beta(softmax(t / T), softmax(s / T))``, each
    summed over the rows whose label is not ``ignore_index`` and divided by their number (no T^2;
    the CE reads the untempered student logits). Logits are formed chunk by chunk
    (:func:`kdkernels.fused_linear_kd_loss`); ``compiled`` is accepted and unused. With
    ``return_soft_hard_loss`` the soft and hard terms come from one pass each. Liger pads a smaller
    student vocabulary with zero logits; that is not reproduced: different vocabulary sizes raise
    ValueError (use ``kdkernels.fused_linear_kd_loss(shared_vocab=...)``)."""

    def __init__(self, weight_hard_loss: float = 0.5, weight_soft_loss: float = 0.5, beta: float = 0.5,
                 ignore_index: int = -100, temperature: float = 1.0, compiled: bool = True, chunk_size: int = 1024,
                 return_soft_hard_loss: bool = False) -> None:
        super().__init__()
        if temperature == 0:
            raise ValueError("Temperature cannot be 0.")
        if weight_hard_loss < 0 or weight_soft_loss < 0:
            raise ValueError(f"weight_hard_loss and weight_soft_loss must be >= 0, got {weight_hard_loss} and "
                             f"{weight_soft_loss}")
        self.weight_hard_loss = weight_hard_loss
        self.weight_soft_loss = weight_soft_loss
        self.beta = beta
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.compiled = compiled
        self.chunk_size = chunk_size
        self.return_soft_hard_loss = return_soft_hard_loss
        self._divergence = generalized_jsd_options(beta)

    def _loss(self, alpha: float, student_input: Tensor, student_weight: Tensor, teacher_input: Tensor,
              teacher_weight: Tensor, true_labels: Tensor, student_bias: Optional[Tensor],
              teacher_bias: Optional[Tensor]) -> Tensor:
        return fused_linear_kd_loss(student_input, student_weight, teacher_input, teacher_weight, true_labels,
                                    student_bias=student_bias, teacher_bias=teacher_bias, chunk_size=self.chunk_size,
                                    temperature=self.temperature, alpha=alpha, ignore_index=self.ignore_index,
                                    scale_by_temperature=False, **self._divergence)

    def forward(self, student_input: Tensor, student_weight: Tensor, teacher_input: Tensor, teacher_weight: Tensor,
                true_labels: Tensor, student_bias: Optional[Tensor] = None,
                teacher_bias: Optional[Tensor] = None) -> Union[Tensor, tuple[Tensor, Tensor, Tensor]]:
        args = (student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias, teacher_bias)
        if self.return_soft_hard_loss:
            soft, hard = self._loss(1.0, *args), self._loss(0.0, *args)
            return self.weight_soft_loss * soft + self.weight_hard_loss * hard, soft, hard
        total = self.weight_hard_loss + self.weight_soft_loss
        alpha = self.weight_soft_loss / total if total > 0 else 1.0
        return total * self._loss(alpha, *args)


class LigerJSD(torch.nn.Module):
    """``liger_kernel.transformers.LigerJSD``: ``forward(log_q, log_p, shift_labels=None)`` with
    the student's and the teacher's log-probabilities ``[BT, V]``; the generalized JSD of
    :class:`LigerFusedLinearJSDLoss` per row, summed over the rows whose label is not
    ``ignore_index`` and divided by their number (all rows without labels)."""

    def __init__(self, beta: float = 0.5, ignore_index: int = -100) -> None:
        super().__init__()
        self.beta = beta
        self.ignore_index = ignore_index
        self._divergence = generalized_jsd_options(beta)

    def forward(self, log_q: Tensor, log_p: Tensor, shift_labels: Optional[Tensor] = None) -> Tensor:
        return kd_loss(log_q, log_p, shift_labels, alpha=1.0, ignore_index=self.ignore_index,
                       scale_by_temperature=False, **self._divergence)


class LigerKLDIVLoss(torch.nn.KLDivLoss):
    """``liger_kernel.transformers.LigerKLDIVLoss`` (an ``nn.KLDivLoss``): ``forward(y_pred,
    y_true)`` with the student's log-probabilities and the target's probabilities (log-probabilities
    with ``log_target=True``), ``sum y_true (log y_true - y_pred)`` over the last dimension, reduced
    by ``reduction`` ("batchmean": over the first dimension, "mean": over every entry, "sum").
    The fused kernel takes y_pred as log-probabilities (log-softmax outputs, as KD passes them):
    it normalises each row. ``reduction="none"`` returns every entry and runs
    ``F.kl_div`` itself. ``eps`` (Liger's floor for log y_true) is kept for the signature."""

    def __init__(self, eps: float = 1e-10, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, y_pred: Tensor, y_true: Tensor) -> Tensor:
        if self.reduction == "none":
            return F.kl_div(y_pred, y_true, reduction="none", log_target=self.log_target)
        teacher = y_true if self.log_target else torch.log(y_true)
        total = kd_loss(y_pred, teacher, alpha=1.0, reduction="sum", scale_by_temperature=False)
        if self.reduction == "batchmean":
            return total / y_pred.shape[0]
        if self.reduction == "mean":
            return total / y_pred.numel()
        return total

"""torchtune's KD losses (torchtune.modules.loss) with their signatures and values, on kdkernels'
kernels: ``ForwardKLLoss``, ``ReverseKLLoss``, ``SymmetricKLLoss`` and their
``...WithChunkedOutputLoss`` forms, which take the chunk lists torchtune's models return and never
concatenate them. Swap ``from torchtune.modules.loss import ForwardKLWithChunkedOutputLoss`` for
``from kdkernels.integrations.torchtune import ForwardKLWithChunkedOutputLoss``; torchtune itself is
not needed.

torchtune's "forward KL" is the cross-entropy ``-sum_v p_t log q_s`` (the KL divergence without
the teacher's entropy, which has no student gradient); to give the same numbers these modules add
the teacher's entropy, taken without grad, to the fused KL. The teacher is a constant, as in
torchtune's KD recipes (teacher logits that require grad raise ValueError). Losses are fp32; rows
whose label is ``ignore_index`` count in neither sum nor mean; with ``normalize=True`` and no valid
label the loss is 0, as in torchtune."""

from __future__ import annotations

import math

import torch

from kdkernels.functional import kd_loss

Tensor = torch.Tensor

# Rows per block of the exact entropy sum (a student with masked entries): bounds its temporaries.
_ENTROPY_BLOCK_ROWS = 1024


def _teacher_entropy_sum(student: Tensor, teacher: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """sum over the valid rows of -sum_v p_t log p_t over the entries where the student's logit is
    finite (torchtune masks the others), without grad. Fused when the student has no -inf entry:
    H(p_t) = log V - KL(p_t || uniform), the KL from the kernel against a broadcast zero row."""
    valid = target != ignore_index
    with torch.no_grad():
        if not bool(student.amin() == float("-inf")):
            vocab = teacher.shape[-1]
            uniform = teacher.new_zeros(1, vocab).expand(teacher.shape[0], vocab)
            kl = kd_loss(teacher, uniform, target, divergence="reverse_kl", alpha=1.0, reduction="sum",
                         ignore_index=ignore_index, scale_by_temperature=False)
            return valid.sum() * math.log(vocab) - kl
        total = torch.zeros((), dtype=torch.float32, device=teacher.device)
        for start in range(0, teacher.shape[0], _ENTROPY_BLOCK_ROWS):
            rows = slice(start, start + _ENTROPY_BLOCK_ROWS)
            log_p = torch.log_softmax(teacher[rows].float(), dim=-1)
            terms = torch.special.entr(log_p.exp()).masked_fill_(torch.isinf(student[rows]), 0.0)
            total += terms.sum(-1)[valid[rows]].sum()
        return total


def _check_teacher(teacher_logits: Tensor) -> None:
    if teacher_logits.requires_grad and torch.is_grad_enabled():
        raise ValueError("the teacher is a constant in torchtune's KD recipes: pass teacher_logits.detach()")


def _summed(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, ignore_index: int,
            forward_weight: float) -> Tensor:
    """sum over valid rows of forward_weight * torchtune's forward loss + (1 - forward_weight) * reverse KL."""
    _check_teacher(teacher_logits)
    student = student_logits.reshape(-1, student_logits.shape[-1])
    teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    target = labels.reshape(-1)
    options = dict(temperature=1.0, alpha=1.0, reduction="sum", ignore_index=ignore_index, scale_by_temperature=False)
    total = torch.zeros((), dtype=torch.float32, device=student.device)
    if forward_weight > 0:
        forward = kd_loss(student, teacher, target, divergence="forward_kl", **options)
        entropy = _teacher_entropy_sum(student, teacher, target, ignore_index)
        total = total + forward_weight * (forward + entropy)
    if forward_weight < 1:
        total = total + (1 - forward_weight) * kd_loss(student, teacher, target, divergence="reverse_kl", **options)
    return total


def _normalized(total: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    count = (labels != ignore_index).sum()
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


class _KLLoss(torch.nn.Module):
    forward_weight = 1.0

    def __init__(self, ignore_index: int = -100) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, normalize: bool = True) -> Tensor:
        total = _summed(student_logits, teacher_logits, labels, self.ignore_index, self.forward_weight)
        return _normalized(total, labels, self.ignore_index) if normalize else total


class ForwardKLLoss(_KLLoss):
    """torchtune's ``ForwardKLLoss``: ``-sum_v p_t log q_s`` per valid row, averaged (``normalize``)
    or summed."""


class ReverseKLLoss(_KLLoss):
    """torchtune's ``ReverseKLLoss``: ``KL(q_s || p_t)`` per valid row, averaged or summed."""

    forward_weight = 0.0


class SymmetricKLLoss(_KLLoss):
    """torchtune's ``SymmetricKLLoss``: ``sym_kd_ratio * forward + (1 - sym_kd_ratio) * reverse``."""

    def __init__(self, sym_kd_ratio: float = 0.5, ignore_index: int = -100) -> None:
        if sym_kd_ratio < 0.0 or sym_kd_ratio > 1.0:
            raise ValueError("sym_kd_ratio must be in the range [0, 1]")
        super().__init__(ignore_index)
        self.sym_kd_ratio = sym_kd_ratio
        self.forward_weight = sym_kd_ratio


class _ChunkedLoss(torch.nn.Module):
    """Over torchtune's output chunks ``[B, T / n, V]`` and labels ``[B, T]`` (split into n chunks
    along T as torchtune does): the summed losses of the chunks over the valid labels."""

    forward_weight = 1.0

    def __init__(self, num_output_chunks: int = 8, ignore_index: int = -100) -> None:
        super().__init__()
        self.num_output_chunks = num_output_chunks
        self.ignore_index = ignore_index

    def forward(self, student_logits: list[Tensor], teacher_logits: list[Tensor], labels: Tensor) -> Tensor:
        chunks = labels.chunk(self.num_output_chunks, dim=1)
        if not len(student_logits) == len(teacher_logits) == len(chunks):
            raise ValueError(f"expected {len(chunks)} logit chunks per model (labels split into "
                             f"num_output_chunks = {self.num_output_chunks} along dim 1), got "
                             f"{len(student_logits)} and {len(teacher_logits)}")
        total = sum(_summed(student, teacher, label_chunk, self.ignore_index, self.forward_weight)
                    for student, teacher, label_chunk in zip(student_logits, teacher_logits, chunks))
        return _normalized(total, labels, self.ignore_index)


class ForwardKLWithChunkedOutputLoss(_ChunkedLoss):
    """torchtune's ``ForwardKLWithChunkedOutputLoss``."""


class ReverseKLWithChunkedOutputLoss(_ChunkedLoss):
    """torchtune's ``ReverseKLWithChunkedOutputLoss``."""

    forward_weight = 0.0


class SymmetricKLWithChunkedOutputLoss(_ChunkedLoss):
    """torchtune's ``SymmetricKLWithChunkedOutputLoss``."""

    def __init__(self, num_output_chunks: int = 8, sym_kd_ratio: float = 0.5, ignore_index: int = -100) -> None:
        if sym_kd_ratio < 0.0 or sym_kd_ratio > 1.0:
            raise ValueError("sym_kd_ratio must be in the range [0, 1]")
        super().__init__(num_output_chunks, ignore_index)
        self.sym_kd_ratio = sym_kd_ratio
        self.forward_weight = sym_kd_ratio

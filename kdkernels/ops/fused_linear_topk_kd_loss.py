"""The op `kdkernels::fused_linear_topk_kd_loss`: the student's LM head and top-k KD against a
stored teacher, chunk by chunk over rows, so that no more than one chunk's logits ever exist
(the top-k twin of kdkernels/ops/fused_linear_kd_loss.py)."""

from __future__ import annotations

from typing import Optional

import torch

from kdkernels.ops import backends, saved_gradients
from kdkernels.ops.fused_linear_kd_loss import (accumulate_gradients, gradient_buffers, gradients_like, project,
                                                rounded_gradients)
from kdkernels.ops.kd_loss import DIVERGENCES
from kdkernels.ops.topk_kd_loss import kernel, raise_for_topk_status, sorted_topk

Tensor = torch.Tensor


@torch.library.custom_op("kdkernels::fused_linear_topk_kd_loss", mutates_args=())
def fused_linear_topk_kd_loss(student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                              indices: Tensor, logprobs: Tensor, target: Optional[Tensor],
                              row_weight: Optional[Tensor], temperature: float, soft_weight: float,
                              hard_weight: float, divergence: str, divergence_args: list[float], bucket: bool,
                              ignore_index: int, chunk_rows: int, student_grad: bool,
                              backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sum over rows of topk_kd_loss_rows on student_hidden @ W^T + b ([N, H] hidden states,
    logits [chunk, V] in their dtype) against the teacher's ids and logprobs [N, k], with the
    gradients of the hidden states, weight and bias (empty unless student_grad)."""
    rows, vocab = student_hidden.shape[0], student_weight.shape[0]
    forward = kernel(backend)
    indices, logprobs = sorted_topk(indices, logprobs, student_hidden.dtype)
    loss = torch.zeros((), dtype=logprobs.dtype, device=student_hidden.device)
    status = torch.zeros(rows, dtype=torch.int8, device=student_hidden.device)
    grads = gradient_buffers(student_hidden, student_weight, student_bias, student_grad)
    for start in range(0, rows, chunk_rows):
        chunk = slice(start, min(start + chunk_rows, rows))
        hidden = student_hidden[chunk]
        rows_loss, grad_logits, rows_status = forward(
            project(hidden, student_weight, student_bias), indices[chunk], logprobs[chunk],
            None if target is None else target[chunk], row_weight, temperature, soft_weight, hard_weight,
            DIVERGENCES[divergence].kernel_id, divergence_args, bucket, ignore_index, student_grad)
        loss += rows_loss.sum()
        status[chunk] = rows_status
        if student_grad:
            accumulate_gradients(grads, grad_logits, hidden, student_weight, chunk)
    raise_for_topk_status(status, target, vocab, ignore_index)
    return (loss, *rounded_gradients(grads, student_weight))


@fused_linear_topk_kd_loss.register_fake
def _(student_hidden, student_weight, student_bias, indices, logprobs, target, row_weight, temperature, soft_weight,
      hard_weight, divergence, divergence_args, bucket, ignore_index, chunk_rows, student_grad, backend):
    acc_dtype = backends.accumulation_dtype(student_hidden.dtype)
    return (student_hidden.new_empty((), dtype=acc_dtype),
            *gradients_like(student_hidden, student_weight, student_bias, student_grad))


saved_gradients.register_leading_gradients_autograd(fused_linear_topk_kd_loss, num_inputs=17)

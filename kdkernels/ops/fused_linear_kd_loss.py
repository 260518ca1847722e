"""The fused-linear KD op `kdkernels::fused_linear_kd_loss`: the student and teacher LM heads and
kd_loss, chunk by chunk over rows, so that no more than one chunk's logits ever exist.

For each chunk the logits are projected, the kd_loss kernel of the chosen backend writes their
row losses and logit gradients, and the gradients of the hidden states, weights and biases are
formed right away (two matmuls); autograd saves them and backward only scales them."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from kdkernels.ops import backends, saved_gradients
from kdkernels.ops.kd_loss import DIVERGENCES, kernel, raise_for_status

Tensor = torch.Tensor


# A chunk holds at least this many rows, so that its matmuls stay efficient (on CPU, 64-row chunks
# at V = 32000 took 1.8x the time of 256-row ones).
MIN_CHUNK_ROWS = 256


def default_chunk_rows(rows: int, vocab: int, hidden: int) -> int:
    """Rows per chunk, a power of two: a chunk's logits about as large as all the hidden states
    (rows * hidden entries), but not below MIN_CHUNK_ROWS nor above all rows."""
    chunk = 1 << max(0, math.floor(math.log2(max(1, rows * hidden // max(vocab, 1)))))
    return min(max(chunk, MIN_CHUNK_ROWS), max(rows, 1))


def project(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return torch.nn.functional.linear(hidden, weight, bias)


def gradient_buffers(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], wanted: bool) -> list[Tensor]:
    """(d hidden, d weight, d bias) to fill chunk by chunk, empty when not wanted. Weight and bias
    gradients sum over every chunk: accumulated in fp32 (fp64), rounded once (rounded_gradients)."""
    if not wanted:
        return [hidden.new_empty(0) for _ in range(3)]
    acc_dtype = backends.accumulation_dtype(hidden.dtype)
    return [torch.empty_like(hidden), torch.zeros_like(weight, dtype=acc_dtype),
            torch.zeros(weight.shape[0] if bias is not None else 0, dtype=acc_dtype, device=weight.device)]


def accumulate_gradients(grads: list[Tensor], grad_logits: Tensor, hidden: Tensor, weight: Tensor,
                         chunk: slice) -> None:
    """Adds one chunk's share to gradient_buffers from its logit gradients and hidden states."""
    grad_hidden, grad_weight, grad_bias = grads
    torch.matmul(grad_logits, weight, out=grad_hidden[chunk])
    grad_weight.addmm_(grad_logits.t().to(grad_weight.dtype), hidden.to(grad_weight.dtype))
    if grad_bias.numel():
        grad_bias += grad_logits.sum(0, dtype=grad_bias.dtype)


def rounded_gradients(grads: list[Tensor], weight: Tensor) -> list[Tensor]:
    """gradient_buffers with the weight and bias gradients in the weight's dtype."""
    return [grads[0], grads[1].to(weight.dtype), grads[2].to(weight.dtype)]


def gradients_like(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], wanted: bool) -> list[Tensor]:
    """The fake (meta) form of rounded_gradients."""
    if not wanted:
        return [hidden.new_empty(0) for _ in range(3)]
    return [torch.empty_like(hidden), torch.empty_like(weight),
            weight.new_empty(weight.shape[0] if bias is not None else 0)]


def chunked_heads(student: tuple, teacher: tuple, chunk_rows: int, student_grad: bool, teacher_grad: bool,
                  chunk_loss: Callable[[slice, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]
                  ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The chunk loop of the fused-linear ops over the (hidden [N, H], weight, bias) of both heads:
    for each chunk of rows, chunk_loss(chunk, student logits, teacher logits) gives the row losses
    and logit gradients (the logits are freed when it returns), and the gradients of the hidden
    states, weights and biases wanted are formed at once. Returns the summed loss (fp32; fp64 for
    fp64 inputs) and both sides' gradient_buffers."""
    (student_hidden, student_weight, student_bias), (teacher_hidden, teacher_weight, teacher_bias) = student, teacher
    rows = student_hidden.shape[0]
    loss = torch.zeros((), dtype=backends.accumulation_dtype(student_hidden.dtype), device=student_hidden.device)
    student_grads = gradient_buffers(student_hidden, student_weight, student_bias, student_grad)
    teacher_grads = gradient_buffers(teacher_hidden, teacher_weight, teacher_bias, teacher_grad)
    for start in range(0, rows, chunk_rows):
        chunk = slice(start, min(start + chunk_rows, rows))
        h_s, h_t = student_hidden[chunk], teacher_hidden[chunk]
        rows_loss, grad_s, grad_t = chunk_loss(chunk, project(h_s, student_weight, student_bias),
                                               project(h_t, teacher_weight, teacher_bias))
        loss += rows_loss.sum()
        for wanted, grad_logits, hidden, weight, grads in (
                (student_grad, grad_s, h_s, student_weight, student_grads),
                (teacher_grad, grad_t, h_t, teacher_weight, teacher_grads)):
            if wanted:
                accumulate_gradients(grads, grad_logits, hidden, weight, chunk)
    return loss, student_grads, teacher_grads


@torch.library.custom_op("kdkernels::fused_linear_kd_loss", mutates_args=())
def fused_linear_kd_loss(student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                         teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Optional[Tensor],
                         target: Optional[Tensor], row_weight: Optional[Tensor], temperature: float,
                         softcap: float, standardize: bool, soft_weight: float, hard_weight: float, divergence: str,
                         divergence_args: list[float],
                         ignore_index: int, chunk_rows: int, student_grad: bool, teacher_grad: bool,
                         backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Sum over rows of kd_loss_rows on (student_hidden @ W_s^T + b_s, teacher_hidden @ W_t^T +
    b_t), with its gradients for the student side (student_grad) and the teacher side
    (teacher_grad): (loss, d student_hidden, d W_s, d b_s, d teacher_hidden, d W_t, d b_t), each
    gradient empty when not asked for. Hidden states are [N, H]; logits [chunk, V] in their dtype."""
    vocab = student_weight.shape[0]
    forward = kernel(backend)
    status = torch.zeros(student_hidden.shape[0], dtype=torch.int8, device=student_hidden.device)

    def chunk_loss(chunk: slice, logits_s: Tensor, logits_t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        rows_loss, grad_s, grad_t, rows_status = forward(
            logits_s, logits_t, None if target is None else target[chunk], row_weight, temperature, softcap,
            standardize, soft_weight, hard_weight, DIVERGENCES[divergence].kernel_id, divergence_args, ignore_index,
            student_grad, teacher_grad)
        status[chunk] = rows_status
        return rows_loss, grad_s, grad_t

    loss, student_grads, teacher_grads = chunked_heads(
        (student_hidden, student_weight, student_bias), (teacher_hidden, teacher_weight, teacher_bias), chunk_rows,
        student_grad, teacher_grad, chunk_loss)
    raise_for_status(status, target, vocab, ignore_index)
    return (loss, *rounded_gradients(student_grads, student_weight), *rounded_gradients(teacher_grads, teacher_weight))


@fused_linear_kd_loss.register_fake
def _(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, target, row_weight,
      temperature, softcap, standardize, soft_weight, hard_weight, divergence, divergence_args, ignore_index, chunk_rows,
      student_grad, teacher_grad, backend):
    acc_dtype = backends.accumulation_dtype(student_hidden.dtype)
    return (student_hidden.new_empty((), dtype=acc_dtype),
            *gradients_like(student_hidden, student_weight, student_bias, student_grad),
            *gradients_like(teacher_hidden, teacher_weight, teacher_bias, teacher_grad))


saved_gradients.register_leading_gradients_autograd(fused_linear_kd_loss, num_inputs=20)

"""Triton kernel of DKD: one program per row, the same two reads as the C++ kernel
(csrc/cpu/dkd_loss_cpu.cpp) and the same contract (csrc/dkd_loss.h):

1. online (max, sum-exp) statistics of student/T and teacher/T over all classes and over the
   non-target classes (with their own max, so that log(1 - p_y) never underflows): TCKD;
2. NCKD over the non-target classes, and the student gradient."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kdkernels.triton.kd_loss import _online, row_block, row_outputs

Tensor = torch.Tensor

_TARGET_OUT_OF_RANGE = tl.constexpr(1)
_STUDENT_NON_FINITE = tl.constexpr(3)
_TEACHER_NON_FINITE = tl.constexpr(4)


@triton.jit
def _dkd_kernel(S, T, Y, W, LOSS, GS, STATUS, s_stride, t_stride, V, inv_t, temperature, alpha, beta, ignore_index,
                HAS_WEIGHT: tl.constexpr, STUDENT_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * s_stride
    t_row = T + row * t_stride
    cols = tl.arange(0, BLOCK)
    neg_inf = float("-inf")
    weight = 1.0
    if HAS_WEIGHT:
        weight = tl.load(W).to(ACC)
    y = tl.load(Y + row)
    ignored = y == ignore_index
    status = tl.where((y < 0) | (y >= V), _TARGET_OUT_OF_RANGE, 0)

    # Read 1: statistics over all classes (m, z) and over the others (m_r, z_r).
    zero = tl.zeros((), ACC)
    m_a, z_a, m_ra, z_ra = zero + neg_inf, zero, zero + neg_inf, zero
    m_b, z_b, m_rb, z_rb = zero + neg_inf, zero, zero + neg_inf, zero
    bad_s = 0
    bad_t = 0
    for start in range(0, V, BLOCK):
        offs = start + cols
        inside = offs < V
        a = tl.load(s_row + offs, mask=inside, other=neg_inf).to(ACC) * inv_t
        b = tl.load(t_row + offs, mask=inside, other=neg_inf).to(ACC) * inv_t
        bad_s += tl.sum((inside & ~(tl.abs(a) < float("inf"))).to(tl.int32))
        bad_t += tl.sum((inside & ~(tl.abs(b) < float("inf"))).to(tl.int32))
        m_a, z_a = _online(m_a, z_a, a)
        m_b, z_b = _online(m_b, z_b, b)
        m_ra, z_ra = _online(m_ra, z_ra, tl.where(offs == y, neg_inf, a))
        m_rb, z_rb = _online(m_rb, z_rb, tl.where(offs == y, neg_inf, b))
    if status == 0:
        status = tl.where(bad_s > 0, _STUDENT_NON_FINITE, tl.where(bad_t > 0, _TEACHER_NON_FINITE, 0))
    status = tl.where(ignored, 0, status)
    live = (status == 0) & (not ignored)
    y_safe = tl.where((y >= 0) & (y < V), y, 0)
    logz_a = tl.log(z_a)
    logz_b = tl.log(z_b)
    logz_ra = tl.log(z_ra)
    logz_rb = tl.log(z_rb)
    log_q_y = (tl.load(s_row + y_safe).to(ACC) * inv_t - m_a) - logz_a
    log_p_y = (tl.load(t_row + y_safe).to(ACC) * inv_t - m_b) - logz_b
    log_q_rest = (m_ra - m_a) - logz_a + logz_ra  # log(1 - q_y)
    log_p_rest = (m_rb - m_b) - logz_b + logz_rb
    p_y = tl.exp(log_p_y)
    p_rest = tl.exp(log_p_rest)
    tckd = p_y * (log_p_y - log_q_y) + p_rest * (log_p_rest - log_q_rest)

    # Read 2: NCKD and the gradient.
    scale = weight * temperature
    nckd = zero
    for start in range(0, V, BLOCK):
        offs = start + cols
        inside = offs < V
        a = tl.load(s_row + offs, mask=inside, other=neg_inf).to(ACC) * inv_t
        b = tl.load(t_row + offs, mask=inside, other=neg_inf).to(ACC) * inv_t
        rest = inside & (offs != y)
        lq_hat = tl.where(rest, (a - m_ra) - logz_ra, 0.0)
        lp_hat = tl.where(rest, (b - m_rb) - logz_rb, 0.0)
        q = tl.exp((a - m_a) - logz_a)
        q_hat = tl.where(rest, tl.exp(lq_hat), 0.0)
        p_hat = tl.where(rest, tl.exp(lp_hat), 0.0)
        nckd += tl.sum(tl.where(rest, p_hat * (lp_hat - lq_hat), 0.0))
        if STUDENT_GRAD:
            grad = tl.where(rest, alpha * (q - p_rest * q_hat) + beta * (q_hat - p_hat), alpha * (q - p_y))
            tl.store(GS + row * V + offs, tl.where(live, scale * grad, 0.0).to(GS.dtype.element_ty), mask=inside)
    loss = weight * temperature * temperature * (alpha * tckd + beta * nckd)
    tl.store(LOSS + row, tl.where(live, loss, 0.0))
    tl.store(STATUS + row, status.to(tl.int8))


def dkd_loss_forward_triton(student: Tensor, teacher: Tensor, target: Tensor, row_weight: Optional[Tensor],
                            temperature: float, alpha: float, beta: float, ignore_index: int,
                            student_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The DKD contract of csrc/dkd_loss.h; inputs [N, V] with unit stride along V."""
    rows, vocab = student.shape
    loss, grad_student, status = row_outputs(student, student_grad)
    if rows == 0:
        return loss, grad_student, status
    block = row_block(vocab)
    _dkd_kernel[(rows,)](
        student, teacher, target, row_weight if row_weight is not None else loss, loss, grad_student, status,
        student.stride(0), teacher.stride(0), vocab, 1.0 / temperature, temperature, alpha, beta, ignore_index,
        HAS_WEIGHT=row_weight is not None, STUDENT_GRAD=student_grad,
        ACC=tl.float64 if loss.dtype == torch.float64 else tl.float32, BLOCK=block, num_warps=4)
    return loss, grad_student, status

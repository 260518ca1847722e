"""Triton kernels of DIST with the contract of csrc/dist_loss.h. A program takes a block of ROWS
rows and walks the classes in blocks, after one walk for the rows' softmax normalisers:

- stats, pass 1: row sums, and the block's column sums of y (one row of partial sums per
  program; their sum over programs is the second stage of the reduction);
- stats, pass 2: the block's column sums of the centred products and squares;
- grad: the rows' dot of g with y_s, then the gradient."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdkernels.triton.kd_loss import _merge

Tensor = torch.Tensor

_ROWS = 16


@triton.jit
def _logits(S, T, rows, offs, N, C, s_stride, t_stride, inv_t, ACC: tl.constexpr):
    """student / T and teacher / T at [rows, offs] (-inf outside the input) and the in-bounds mask."""
    inside = (rows[:, None] < N) & (offs[None, :] < C)
    x_s = tl.load(S + rows[:, None] * s_stride + offs[None, :], mask=inside, other=float("-inf")).to(ACC) * inv_t
    x_t = tl.load(T + rows[:, None] * t_stride + offs[None, :], mask=inside, other=float("-inf")).to(ACC) * inv_t
    return x_s, x_t, inside


@triton.jit
def _normalisers(S, T, rows, N, C, s_stride, t_stride, inv_t, ACC: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK: tl.constexpr):
    """Per row: (max, log sum of exp) of student / T and of teacher / T; (0, 0) past the last row."""
    cols = tl.arange(0, BLOCK)
    m_s = tl.full((ROWS,), float("-inf"), ACC)
    m_t = tl.full((ROWS,), float("-inf"), ACC)
    z_s = tl.zeros((ROWS,), ACC)
    z_t = tl.zeros((ROWS,), ACC)
    for start in range(0, C, BLOCK):
        x_s, x_t, _ = _logits(S, T, rows, start + cols, N, C, s_stride, t_stride, inv_t, ACC)
        m_s, offset, rescale = _merge(m_s, tl.max(x_s, axis=1))
        z_s = z_s * rescale + tl.sum(tl.exp(x_s - offset[:, None]), axis=1)
        m_t, offset, rescale = _merge(m_t, tl.max(x_t, axis=1))
        z_t = z_t * rescale + tl.sum(tl.exp(x_t - offset[:, None]), axis=1)
    live = rows < N
    return (tl.where(live, m_s, 0.0), tl.log(tl.where(live, z_s, 1.0)), tl.where(live, m_t, 0.0),
            tl.log(tl.where(live, z_t, 1.0)))


@triton.jit
def _softmaxes(S, T, rows, offs, N, C, s_stride, t_stride, inv_t, m_s, lz_s, m_t, lz_t, ACC: tl.constexpr):
    """y_s and y_t at [rows, offs] (0 outside the input) and the in-bounds mask."""
    x_s, x_t, inside = _logits(S, T, rows, offs, N, C, s_stride, t_stride, inv_t, ACC)
    return (tl.exp((x_s - m_s[:, None]) - lz_s[:, None]), tl.exp((x_t - m_t[:, None]) - lz_t[:, None]), inside)


@triton.jit
def _stats_pass(S, T, ROW_STATS, MEANS, SUMS, N, C, s_stride, t_stride, inv_t, PASS: tl.constexpr,
                ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """PASS 1: row sums into ROW_STATS and the block's column sums of y_s, y_t into SUMS[pid];
    PASS 2: the block's column sums of the centred products and squares (column means MEANS)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    m_s, lz_s, m_t, lz_t = _normalisers(S, T, rows, N, C, s_stride, t_stride, inv_t, ACC, ROWS, BLOCK)
    row_mean = 1.0 / C
    ab = tl.zeros((ROWS,), ACC)
    aa = tl.zeros((ROWS,), ACC)
    bb = tl.zeros((ROWS,), ACC)
    for start in range(0, C, BLOCK):
        offs = start + cols
        in_c = offs < C
        y_s, y_t, inside = _softmaxes(S, T, rows, offs, N, C, s_stride, t_stride, inv_t, m_s, lz_s, m_t, lz_t, ACC)
        if PASS == 1:
            a = tl.where(inside, y_s - row_mean, 0.0)
            b = tl.where(inside, y_t - row_mean, 0.0)
            ab += tl.sum(a * b, axis=1)
            aa += tl.sum(a * a, axis=1)
            bb += tl.sum(b * b, axis=1)
            tl.store(SUMS + pid * 2 * C + offs, tl.sum(y_s, axis=0), mask=in_c)
            tl.store(SUMS + (pid * 2 + 1) * C + offs, tl.sum(y_t, axis=0), mask=in_c)
        else:
            c = tl.where(inside, y_s - tl.load(MEANS + offs, mask=in_c, other=0.0)[None, :], 0.0)
            d = tl.where(inside, y_t - tl.load(MEANS + C + offs, mask=in_c, other=0.0)[None, :], 0.0)
            tl.store(SUMS + pid * 3 * C + offs, tl.sum(c * d, axis=0), mask=in_c)
            tl.store(SUMS + (pid * 3 + 1) * C + offs, tl.sum(c * c, axis=0), mask=in_c)
            tl.store(SUMS + (pid * 3 + 2) * C + offs, tl.sum(d * d, axis=0), mask=in_c)
    if PASS == 1:
        live = rows < N
        tl.store(ROW_STATS + rows * 3, ab, mask=live)
        tl.store(ROW_STATS + rows * 3 + 1, aa, mask=live)
        tl.store(ROW_STATS + rows * 3 + 2, bb, mask=live)


@triton.jit
def _g(y_s, y_t, inside, offs, row_b, row_a, COLUMNS, C, ACC: tl.constexpr):
    """dL/dy_s of csrc/dist_loss.h at [rows, offs]; COLUMNS holds column_coef [C, 2] then the means [C, 2]."""
    row_mean = 1.0 / C
    in_c = offs < C
    col_d = tl.load(COLUMNS + offs * 2, mask=in_c, other=0.0).to(ACC)
    col_c = tl.load(COLUMNS + offs * 2 + 1, mask=in_c, other=0.0).to(ACC)
    mean_s = tl.load(COLUMNS + 2 * C + offs * 2, mask=in_c, other=0.0).to(ACC)
    mean_t = tl.load(COLUMNS + 2 * C + offs * 2 + 1, mask=in_c, other=0.0).to(ACC)
    g = (row_b[:, None] * (y_t - row_mean) - row_a[:, None] * (y_s - row_mean) + col_d[None, :] * (y_t - mean_t[None, :])
         - col_c[None, :] * (y_s - mean_s[None, :]))
    return tl.where(inside, g, 0.0)


@triton.jit
def _grad_kernel(S, T, ROW_COEF, COLUMNS, GRAD, N, C, s_stride, t_stride, inv_t, ACC: tl.constexpr,
                 ROWS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    live = rows < N
    m_s, lz_s, m_t, lz_t = _normalisers(S, T, rows, N, C, s_stride, t_stride, inv_t, ACC, ROWS, BLOCK)
    row_b = tl.load(ROW_COEF + rows * 2, mask=live, other=0.0).to(ACC)
    row_a = tl.load(ROW_COEF + rows * 2 + 1, mask=live, other=0.0).to(ACC)
    dot = tl.zeros((ROWS,), ACC)
    for start in range(0, C, BLOCK):
        offs = start + cols
        y_s, y_t, inside = _softmaxes(S, T, rows, offs, N, C, s_stride, t_stride, inv_t, m_s, lz_s, m_t, lz_t, ACC)
        dot += tl.sum(_g(y_s, y_t, inside, offs, row_b, row_a, COLUMNS, C, ACC) * y_s, axis=1)
    for start in range(0, C, BLOCK):
        offs = start + cols
        y_s, y_t, inside = _softmaxes(S, T, rows, offs, N, C, s_stride, t_stride, inv_t, m_s, lz_s, m_t, lz_t, ACC)
        g = _g(y_s, y_t, inside, offs, row_b, row_a, COLUMNS, C, ACC)
        grad = inv_t * y_s * (g - dot[:, None])
        tl.store(GRAD + rows[:, None] * C + offs[None, :], grad.to(GRAD.dtype.element_ty), mask=inside)


def _launch(student: Tensor) -> tuple[tuple[int], dict]:
    rows, classes = student.shape
    acc = tl.float64 if student.dtype == torch.float64 else tl.float32
    block = min(max(triton.next_power_of_2(classes), 16), 256)
    return (triton.cdiv(rows, _ROWS),), dict(ACC=acc, ROWS=_ROWS, BLOCK=block, num_warps=4)


def dist_loss_stats_triton(student: Tensor, teacher: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(row_stats [N, 3], column_stats [C, 5]) of csrc/dist_loss.h."""
    rows, classes = student.shape
    acc_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    grid, meta = _launch(student)
    strides = (rows, classes, student.stride(0), teacher.stride(0), 1.0 / temperature)
    row_stats = torch.empty(rows, 3, dtype=acc_dtype, device=student.device)
    sums = torch.empty(grid[0], 2, classes, dtype=acc_dtype, device=student.device)
    _stats_pass[grid](student, teacher, row_stats, sums, sums, *strides, PASS=1, **meta)
    means = sums.sum(0) / rows
    centred = torch.empty(grid[0], 3, classes, dtype=acc_dtype, device=student.device)
    _stats_pass[grid](student, teacher, row_stats, means, centred, *strides, PASS=2, **meta)
    return row_stats, torch.cat([means.T, centred.sum(0).T], dim=1)


def dist_loss_grad_triton(student: Tensor, teacher: Tensor, temperature: float, row_coef: Tensor, column_coef: Tensor,
                          column_stats: Tensor) -> Tensor:
    """The student gradient of csrc/dist_loss.h."""
    rows, classes = student.shape
    grid, meta = _launch(student)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    columns = torch.cat([column_coef.contiguous().reshape(-1), column_stats[:, :2].contiguous().reshape(-1)])
    _grad_kernel[grid](student, teacher, row_coef.contiguous(), columns, grad, rows, classes, student.stride(0),
                       teacher.stride(0), 1.0 / temperature, **meta)
    return grad

"""Triton feature kernels with the contract of csrc/feature.h: channel pooling of |x|^p (a
program per sample and spatial block walks the channels), its gradient (a program per channel row
and spatial block), and the squared error with its gradient in one pass (per-block partial sums)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

_BLOCK = 1024


@triton.jit
def _power(x, p, SQUARE: tl.constexpr):
    """|x|^p (0 at x = 0)."""
    if SQUARE:
        return x * x
    magnitude = tl.abs(x)
    return tl.where(magnitude > 0, tl.exp2(p * tl.log2(tl.maximum(magnitude, 1e-38))), 0.0)


@triton.jit
def _power_slope(x, p, SQUARE: tl.constexpr):
    """p |x|^(p - 1) sign(x) (0 at x = 0)."""
    if SQUARE:
        return 2 * x
    magnitude = tl.abs(x)
    sign = tl.where(x > 0, 1.0, -1.0)
    return tl.where(magnitude > 0, p * tl.exp2((p - 1) * tl.log2(tl.maximum(magnitude, 1e-38))) * sign, 0.0)


@triton.jit
def _pool_kernel(X, OUT, channels, size, stride_n, stride_c, p, inv_channels, SQUARE: tl.constexpr,
                 ACC: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = s < size
    pooled = tl.zeros((BLOCK,), ACC)
    for c in range(0, channels):
        x = tl.load(X + n * stride_n + c * stride_c + s, mask=inside, other=0.0).to(ACC)
        pooled += _power(x, p, SQUARE)
    tl.store(OUT + n * size + s, pooled * inv_channels, mask=inside)


@triton.jit
def _pool_grad_kernel(X, G, OUT, channels, size, stride_n, stride_c, p, inv_channels, SQUARE: tl.constexpr,
                      ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n = row // channels
    c = row % channels
    s = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = s < size
    x = tl.load(X + n * stride_n + c * stride_c + s, mask=inside, other=0.0).to(ACC)
    g = tl.load(G + n * size + s, mask=inside, other=0.0)
    tl.store(OUT + row * size + s, (g * inv_channels * _power_slope(x, p, SQUARE)).to(OUT.dtype.element_ty),
             mask=inside)


def _accumulation(x: Tensor) -> tuple[torch.dtype, tl.dtype]:
    return (torch.float64, tl.float64) if x.dtype == torch.float64 else (torch.float32, tl.float32)


def _launch(x: Tensor, p: float) -> tuple[int, int, dict]:
    samples, channels, size = x.shape
    return samples, channels, dict(size=size, stride_n=x.stride(0), stride_c=x.stride(1), p=p,
                                   inv_channels=1.0 / channels, SQUARE=p == 2.0, ACC=_accumulation(x)[1],
                                   BLOCK=min(_BLOCK, triton.next_power_of_2(size)))


def attention_pool_triton(x: Tensor, p: float) -> Tensor:
    """[N, S] channel-pooled |x|^p of [N, C, S] features (unit stride along S)."""
    samples, channels, options = _launch(x, p)
    out = torch.empty(samples, options["size"], dtype=_accumulation(x)[0], device=x.device)
    _pool_kernel[(samples, triton.cdiv(options["size"], options["BLOCK"]))](x, out, channels, **options)
    return out


def attention_grad_triton(x: Tensor, grad_map: Tensor, p: float) -> Tensor:
    """dL/dx [N, C, S] in the input dtype for dL/da = grad_map [N, S]."""
    samples, channels, options = _launch(x, p)
    grad_map = grad_map.to(_accumulation(x)[0]).contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _pool_grad_kernel[(samples * channels, triton.cdiv(options["size"], options["BLOCK"]))](
        x, grad_map, out, channels, **options)
    return out


@triton.jit
def _squared_error_kernel(S, T, GRAD, PARTIAL, numel, scale, WITH_GRAD: tl.constexpr, ACC: tl.constexpr,
                          BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < numel
    d = tl.load(S + offsets, mask=inside, other=0.0).to(ACC) - tl.load(T + offsets, mask=inside, other=0.0).to(ACC)
    tl.store(PARTIAL + tl.program_id(0), tl.sum(d * d, axis=0))
    if WITH_GRAD:
        tl.store(GRAD + offsets, (scale * d).to(GRAD.dtype.element_ty), mask=inside)


def squared_error_triton(student: Tensor, teacher: Tensor, scale: float, grad: bool) -> tuple[Tensor, Tensor]:
    """(sum of (s - t)^2, scale (s - t) or an empty tensor) of contiguous tensors of one shape."""
    numel = student.numel()
    acc, acc_tl = _accumulation(student)
    blocks = max(triton.cdiv(numel, _BLOCK), 1)
    partial = torch.empty(blocks, dtype=acc, device=student.device)
    gradient = torch.empty_like(student) if grad else student.new_empty(0)
    _squared_error_kernel[(blocks,)](student, teacher, gradient if grad else partial, partial, numel, scale,
                                     WITH_GRAD=grad, ACC=acc_tl, BLOCK=_BLOCK)
    return partial.sum(), gradient

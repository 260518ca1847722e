"""Triton relation kernels with the contract of csrc/relation.h.

- relation_matrix: a tiled product x x^T whose K loop also sums the squares of the two row blocks
  it loads (the norms), with the epilogue (cosine scaling or clamped distances) applied to the
  tile before its only store: norms, product and epilogue in one kernel.
- rkd_angle_triplets: the cosines of a [BJ, BK] tile of pairs (j, k) at one anchor i come from
  rows i and j of the Gram matrices; one kernel walks k for each (i, j block) (the loss, C and R
  sums over k), another walks the anchors i for each (j, k) tile (the B sums over i). The N^3
  triplets are never stored and no sum crosses programs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdkernels.triton.kd_loss import interpreting

Tensor = torch.Tensor

# Kind codes of csrc/relation.h.
GRAM, COSINE, COSINE_OFFSET, SQUARED_DISTANCE, DISTANCE = range(5)


@triton.jit
def _sqrt(x, ACC: tl.constexpr):
    """Correctly rounded square root (tl.sqrt is approximate in fp32)."""
    if ACC == tl.float64:
        return tl.sqrt(x)
    return tl.sqrt_rn(x)


@triton.jit
def _relation_kernel(X, OUT, n, d, stride, eps, KIND: tl.constexpr, ACC: tl.constexpr, IEEE: tl.constexpr,
                     WIDEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    product = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    square_m = tl.zeros((BLOCK_M,), ACC)
    square_n = tl.zeros((BLOCK_N,), ACC)
    for start in range(0, d, BLOCK_K):
        inside = start + cols < d
        a = tl.load(X + rows_m[:, None] * stride + (start + cols)[None, :],
                    mask=(rows_m[:, None] < n) & inside[None, :], other=0.0)
        b = tl.load(X + rows_n[:, None] * stride + (start + cols)[None, :],
                    mask=(rows_n[:, None] < n) & inside[None, :], other=0.0)
        if WIDEN:
            a = a.to(ACC)
            b = b.to(ACC)
        if IEEE:
            product += tl.dot(a, tl.trans(b), input_precision="ieee", out_dtype=ACC)
        else:
            product += tl.dot(a, tl.trans(b), out_dtype=ACC)
        a = a.to(ACC)
        b = b.to(ACC)
        square_m += tl.sum(a * a, axis=1)
        square_n += tl.sum(b * b, axis=1)
    if KIND == COSINE:
        product = product / tl.maximum(_sqrt(square_m, ACC), eps)[:, None] / tl.maximum(_sqrt(square_n, ACC), eps)[None, :]
    if KIND == COSINE_OFFSET:
        product = product / (_sqrt(square_m, ACC) + eps)[:, None] / (_sqrt(square_n, ACC) + eps)[None, :]
    if KIND == SQUARED_DISTANCE or KIND == DISTANCE:
        product = tl.maximum(square_m[:, None] + square_n[None, :] - 2 * product, eps)
        if KIND == DISTANCE:
            product = _sqrt(product, ACC)
        product = tl.where(rows_m[:, None] == rows_n[None, :], 0.0, product)
    tl.store(OUT + rows_m[:, None] * n + rows_n[None, :], product, mask=(rows_m[:, None] < n) & (rows_n[None, :] < n))


def relation_matrix_triton(x: Tensor, kind: int, eps: float) -> Tensor:
    """The [N, N] relation matrix of `kind` of [N, D] features with unit stride along D."""
    n, d = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.empty(n, n, dtype=acc, device=x.device)
    block = 32 if acc == torch.float64 else 64
    # Triton's interpreter multiplies half-precision blocks wrongly in tl.dot: widen them there
    # (exact, as the products are accumulated in fp32 anyway).
    widen = interpreting() and x.dtype in (torch.float16, torch.bfloat16)
    # fp32 and fp64 products in IEEE precision (no TF32), as the reference's matmul.
    ieee = widen or x.dtype in (torch.float32, torch.float64)
    grid = (triton.cdiv(n, block), triton.cdiv(n, block))
    _relation_kernel[grid](x, out, n, d, x.stride(0), eps, KIND=kind,
                           ACC=tl.float64 if acc == torch.float64 else tl.float32, IEEE=ieee, WIDEN=widen,
                           BLOCK_M=block, BLOCK_N=block, BLOCK_K=32, num_warps=4)
    return out


@triton.jit
def _side_cosines(G, INV, n, i, j, k):
    """c_ijk of one side on the [j, k] tile at anchor i (0 outside the matrix) and inv_ij, inv_ik."""
    j_in = j < n
    k_in = k < n
    base = tl.load(G + i * n + i) - tl.load(G + i * n + j, mask=j_in, other=0.0)
    inv_ij = tl.load(INV + i * n + j, mask=j_in, other=0.0)
    inv_ik = tl.load(INV + i * n + k, mask=k_in, other=0.0)
    g_jk = tl.load(G + j[:, None] * n + k[None, :], mask=j_in[:, None] & k_in[None, :], other=0.0)
    g_ik = tl.load(G + i * n + k, mask=k_in, other=0.0)
    return (g_jk - g_ik[None, :] + base[:, None]) * inv_ij[:, None] * inv_ik[None, :], inv_ij, inv_ik


@triton.jit
def _triplet_tile(GS, GT, IS, IT, n, i, j, k):
    """On the [j, k] tile at anchor i: smooth-L1 of delta = c_s - c_t, its slope, c_s, inv_s_ij and inv_s_ik."""
    c_s, inv_ij, inv_ik = _side_cosines(GS, IS, n, i, j, k)
    c_t, _, _ = _side_cosines(GT, IT, n, i, j, k)
    delta = c_s - c_t
    magnitude = tl.abs(delta)
    huber = tl.where(magnitude < 1, 0.5 * delta * delta, magnitude - 0.5)
    return huber, tl.minimum(tl.maximum(delta, -1.0), 1.0), c_s, inv_ij, inv_ik


@triton.jit
def _pair_kernel(GS, GT, IS, IT, LOSS, PAIR, RADIAL, n, scale, GRAD: tl.constexpr, ACC: tl.constexpr,
                 BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    """Anchor i and a block of j: the sums over k of h (LOSS[i, j]) and, with GRAD, C and R."""
    i = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
    loss = tl.zeros((BLOCK_J,), ACC)
    pair = tl.zeros((BLOCK_J,), ACC)
    radial = tl.zeros((BLOCK_J,), ACC)
    inv_ij = tl.zeros((BLOCK_J,), ACC)
    for start in range(0, n, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K).to(tl.int64)
        huber, slope, c_s, inv_ij, inv_ik = _triplet_tile(GS, GT, IS, IT, n, i, j, k)
        loss += tl.sum(huber, axis=1)
        if GRAD:
            pair += tl.sum(slope * inv_ik[None, :], axis=1)
            radial += tl.sum(slope * c_s, axis=1)
    inside = j < n
    tl.store(LOSS + i * n + j, loss, mask=inside)
    if GRAD:
        tl.store(PAIR + i * n + j, scale * pair * inv_ij, mask=inside)
        tl.store(RADIAL + i * n + j, scale * radial * inv_ij * inv_ij, mask=inside)


@triton.jit
def _anchor_kernel(GS, GT, IS, IT, ANCHOR, n, scale, ACC: tl.constexpr, BLOCK_J: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """A [j, k] tile: the sums over the anchors i of w_ijk (B)."""
    j = tl.program_id(0).to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
    k = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    anchor = tl.zeros((BLOCK_J, BLOCK_K), ACC)
    for i in range(0, n):
        _, slope, _, inv_ij, inv_ik = _triplet_tile(GS, GT, IS, IT, n, i, j, k)
        anchor += slope * inv_ij[:, None] * inv_ik[None, :]
    tl.store(ANCHOR + j[:, None] * n + k[None, :], scale * anchor, mask=(j[:, None] < n) & (k[None, :] < n))


def rkd_angle_triplets_triton(gram_s: Tensor, gram_t: Tensor, inv_s: Tensor, inv_t: Tensor, scale: float,
                              grad: bool) -> list[Tensor]:
    """[loss_parts] or [loss_parts, B, C, R] of csrc/relation.h from contiguous fp32/fp64 matrices."""
    n = gram_s.shape[0]
    acc = tl.float64 if gram_s.dtype == torch.float64 else tl.float32
    block = 32
    loss = torch.empty_like(gram_s)
    sums = [torch.empty_like(gram_s) for _ in range(3 if grad else 0)]
    pair, radial = (sums[1], sums[2]) if grad else (loss, loss)
    _pair_kernel[(n, triton.cdiv(n, block))](gram_s, gram_t, inv_s, inv_t, loss, pair, radial, n, scale, GRAD=grad,
                                             ACC=acc, BLOCK_J=block, BLOCK_K=block, num_warps=4)
    if grad:
        _anchor_kernel[(triton.cdiv(n, block), triton.cdiv(n, block))](gram_s, gram_t, inv_s, inv_t, sums[0], n,
                                                                       scale, ACC=acc, BLOCK_J=block, BLOCK_K=block,
                                                                       num_warps=4)
    return [loss, *sums]

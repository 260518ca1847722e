"""Triton kernel of top-k KD: one program per row, the same reads as the C++ kernel
(csrc/cpu/topk_kd_loss_cpu.cpp) and the same contract (csrc/topk_kd_loss.h). The k + 1
categories of a row (its sorted ids and the rest of the vocabulary) live in registers as
vectors of CATS = next_power_of_2(k + 1) lanes, the rest in lane k.

1. online (max, sum-exp) statistics of student/T over the entries outside the ids (each block
   masks the ids that fall inside it, found by counting the sorted ids below its bounds), and of
   the raw student for the CE term at T != 1; the ids' values are gathered;
2. the divergence over the categories (`_terms` of the kd_loss kernel), and the gradient: the
   rest's formula for every entry of a block, the ids' own written over it."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kdkernels.triton.kd_loss import (_STUDENT_ALL_MASKED, _STUDENT_NON_FINITE, _TEACHER_ALL_MASKED,
                                      _TEACHER_NON_FINITE, ADAPTIVE_KL, _non_finite, _online, _terms, divergence_params,
                                      hard_label_term, row_block, row_outputs, row_target)

Tensor = torch.Tensor

# Row status codes of csrc/row_status.h that only the top-k kernel reports.
_INDEX_OUT_OF_RANGE = tl.constexpr(7)
_DUPLICATE_INDEX = tl.constexpr(8)


@triton.jit
def _log_normaliser(x):
    """(max, log sum exp(x - max)) of a vector; the max is 0 when x is all -inf (log sum = -inf)."""
    top = tl.max(x)
    top = tl.where(top == float("-inf"), 0.0, top)
    return top, tl.log(tl.sum(tl.exp(x - top)))


@triton.jit
def _category_weights(b, lp, lq, shared, mu, CATS: tl.constexpr):
    """Adaptive KL's weights over the categories (set_category_weights in the C++ kernel): a
    category is head if the teacher mass of the categories with b >= its b is <= mu, or it holds
    the top value; g = sum |p - q| over the categories finite in both."""
    lanes = tl.arange(0, CATS)
    p = tl.exp(lp)
    cumulative = tl.zeros((CATS,), lp.dtype)
    for other in range(0, CATS):
        b_other = tl.sum(tl.where(lanes == other, b, 0.0))
        p_other = tl.sum(tl.where(lanes == other, p, 0.0))
        cumulative += tl.where(b_other >= b, p_other, 0.0)
    head = (cumulative <= mu) | (b == tl.max(b))
    error = tl.where(shared, tl.abs(p - tl.exp(lq)), 0.0)
    g_head = tl.sum(tl.where(head, error, 0.0))
    g_tail = tl.sum(tl.where(head, 0.0, error))
    total = g_head + g_tail
    return tl.where(total > 0, g_head / total, 0.5), tl.where(total > 0, g_tail / total, 0.5)


@triton.jit
def _mask_ids(x, offs, i_row, lo, hi, value):
    """x with the entries of the sorted ids i_row[lo:hi] (those inside this block) set to value."""
    for c in range(lo, hi):
        x = tl.where(offs == tl.load(i_row + c), value, x)
    return x


@triton.jit
def _topk_kd_loss_kernel(
    S, I, L, Y, W, LOSS, GS, STATUS,
    s_stride, V, K, inv_t, soft_weight, hard_weight, ignore_index,
    mix_weight, mix_complement, log_mix_weight, log_mix_complement, ab_alpha, ab_beta, ab_inv_alpha, ab_inv_beta,
    ab_inv_sum, ab_offset_middle, ab_spread, ab_lowest, ab_middle, head_mass,
    HAS_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, NEED_SOFT: tl.constexpr, SEPARATE_CE: tl.constexpr,
    BUCKET: tl.constexpr, STUDENT_GRAD: tl.constexpr, DIVERGENCE: tl.constexpr, TERMS: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr, CATS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * s_stride
    i_row = I + row * K
    cols = tl.arange(0, BLOCK)
    lanes = tl.arange(0, CATS)
    is_id = lanes < K
    neg_inf = float("-inf")
    zero = tl.zeros((), ACC)
    if HAS_WEIGHT:
        weight = tl.load(W).to(ACC)
        soft_weight = soft_weight * weight
        hard_weight = hard_weight * weight
    y, ignored, status = row_target(Y, row, V, ignore_index, HAS_TARGET)

    # The ids (sorted: in range, and each above the one before) and the teacher's categories.
    ids = tl.load(i_row + lanes, mask=is_id, other=0)
    previous = tl.load(i_row + lanes - 1, mask=is_id & (lanes > 0), other=-1)
    if status == 0:
        status = tl.where(tl.sum((is_id & ((ids < 0) | (ids >= V))).to(tl.int32)) > 0, _INDEX_OUT_OF_RANGE, 0)
    if status == 0:
        status = tl.where(tl.sum((is_id & (ids == previous)).to(tl.int32)) > 0, _DUPLICATE_INDEX, 0)
    logprobs = tl.load(L + row * K + lanes, mask=is_id, other=neg_inf).to(ACC)
    if status == 0:
        status = tl.where(_non_finite(logprobs) > 0, _TEACHER_NON_FINITE, 0)
    rest_logprob = zero + neg_inf
    if BUCKET:
        mass = tl.sum(tl.exp(logprobs))
        rest_logprob = tl.where(mass < 1, tl.log(tl.where(mass < 1, 1 - mass, 1.0)), neg_inf)
    b = tl.where(is_id, logprobs, tl.where(lanes == K, rest_logprob, neg_inf)) * inv_t
    m_b, logz_b = _log_normaliser(b)
    if NEED_SOFT:
        if status == 0:
            status = tl.where(logz_b > neg_inf, 0, _TEACHER_ALL_MASKED)

    # Read 1: statistics of the rest (m_r, z_r) and, for CE at T != 1, of the raw student (m_c, z_c).
    m_r, z_r = zero + neg_inf, zero
    m_c, z_c = zero + neg_inf, zero
    bad_s = 0
    safe_ids = tl.where(is_id, ids, V + BLOCK)  # beyond every block: the counts below skip the other lanes
    for start in range(0, V, BLOCK):
        offs = start + cols
        c = tl.load(s_row + offs, mask=offs < V, other=neg_inf).to(ACC)
        lo = tl.sum((safe_ids < start).to(tl.int32))
        hi = tl.sum((safe_ids < start + BLOCK).to(tl.int32))
        a = _mask_ids(c * inv_t, offs, i_row, lo, hi, neg_inf)
        bad_s += _non_finite(a)
        m_r, z_r = _online(m_r, z_r, a)
        if SEPARATE_CE:
            m_c, z_c = _online(m_c, z_c, c)
    in_range = is_id & (ids >= 0) & (ids < V)
    a_ids = tl.load(s_row + tl.where(in_range, ids, 0), mask=in_range, other=neg_inf).to(ACC) * inv_t
    bad_s += _non_finite(a_ids)
    if status == 0:
        status = tl.where(bad_s > 0, _STUDENT_NON_FINITE, 0)
    rest_live = z_r > 0
    logz_r = tl.log(tl.where(rest_live, z_r, 1.0))
    a_cat = tl.where(is_id, a_ids, tl.where(lanes == K, tl.where(rest_live, m_r + logz_r, neg_inf), neg_inf))
    m_a, logz_a = _log_normaliser(a_cat)
    if status == 0:
        status = tl.where(logz_a > neg_inf, 0, _STUDENT_ALL_MASKED)
    if not SEPARATE_CE:
        m_c = m_a
        logz_c = logz_a
    else:
        logz_c = tl.log(z_c)
    ce, status, live = hard_label_term(s_row, y, V, m_c, logz_c, hard_weight, status, ignored, HAS_TARGET)

    # The divergence over the categories.
    shared = (a_cat > neg_inf) & (b > neg_inf)
    lq = tl.where(shared, (a_cat - m_a) - logz_a, 0.0)
    lp = tl.where(shared, (b - m_b) - logz_b, 0.0)
    value = zero
    d_cat = tl.zeros((CATS,), ACC)
    if NEED_SOFT:
        if DIVERGENCE == ADAPTIVE_KL:
            mix_weight, mix_complement = _category_weights(
                b, (b - m_b) - logz_b, (a_cat - m_a) - logz_a, shared, head_mass, CATS)
        v, ds, dt = _terms(lp, lq, tl.exp(lp), tl.exp(lq), mix_weight, mix_complement, log_mix_weight,
                           log_mix_complement, ab_alpha, ab_beta, ab_inv_alpha, ab_inv_beta, ab_inv_sum,
                           ab_offset_middle, ab_spread, ab_lowest, ab_middle, DIVERGENCE, TERMS)
        value = tl.sum(tl.where(shared, v, 0.0))
        d_cat = tl.where(shared, ds, 0.0)
    loss = soft_weight * value
    if HAS_TARGET:
        loss += tl.where(hard_weight != 0, hard_weight * ce, 0.0)  # the CE term off: ce may be inf
    tl.store(LOSS + row, tl.where(live, loss, 0.0))
    tl.store(STATUS + row, status.to(tl.int8))

    # Read 2: the gradient (csrc/cpu/topk_kd_loss_cpu.cpp): the rest's formula for every entry,
    # then each id's own, soft_weight / T * (d_c - S q_c), plus the CE term's.
    if STUDENT_GRAD:
        soft_scale = soft_weight * inv_t
        sum_d = tl.sum(d_cat)
        d_rest = tl.sum(tl.where(lanes == K, d_cat, 0.0))
        g_cat = soft_scale * (d_cat - sum_d * tl.exp((a_cat - m_a) - logz_a))
        ce_weight = tl.where(HAS_TARGET, hard_weight, 0.0)
        for start in range(0, V, BLOCK):
            offs = start + cols
            c = tl.load(s_row + offs, mask=offs < V, other=neg_inf).to(ACC)
            a = c * inv_t
            q = tl.exp((a - m_a) - logz_a)
            share = tl.where(d_rest != 0, tl.exp((a - m_r) - logz_r), 0.0)  # q / q_rest
            if SEPARATE_CE:
                hard = ce_weight * tl.exp((c - m_c) - logz_c)
            else:
                hard = ce_weight * q
            grad = soft_scale * (d_rest * share - sum_d * q) + hard
            lo = tl.sum((safe_ids < start).to(tl.int32))
            hi = tl.sum((safe_ids < start + BLOCK).to(tl.int32))
            for lane in range(lo, hi):
                grad = tl.where(offs == tl.load(i_row + lane), hard + tl.sum(tl.where(lanes == lane, g_cat, 0.0)),
                                grad)
            grad = tl.where(offs == y, grad - ce_weight, grad)
            tl.store(GS + row * V + offs, tl.where(live, grad, 0.0).to(GS.dtype.element_ty), mask=offs < V)


def topk_kd_loss_forward_triton(student: Tensor, indices: Tensor, logprobs: Tensor, target: Optional[Tensor],
                                row_weight: Optional[Tensor], temperature: float, soft_weight: float,
                                hard_weight: float, divergence: int, divergence_args: list[float], bucket: bool,
                                ignore_index: int, student_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The top-k KD contract of csrc/topk_kd_loss.h; student [N, V] with unit stride along V,
    indices [N, k] int64 sorted per row, logprobs [N, k] in the accumulation dtype."""
    rows, vocab = student.shape
    k = indices.shape[1]
    loss, grad_student, status = row_outputs(student, student_grad)
    acc_dtype = loss.dtype
    if rows == 0:
        return loss, grad_student, status
    has_target = target is not None
    block = row_block(vocab)
    _topk_kd_loss_kernel[(rows,)](
        student, indices, logprobs, target if has_target else status, row_weight if row_weight is not None else loss,
        loss, grad_student, status, student.stride(0), vocab, k, 1.0 / temperature, soft_weight, hard_weight,
        ignore_index, *divergence_params(divergence, divergence_args, acc_dtype),
        HAS_TARGET=has_target, HAS_WEIGHT=row_weight is not None, NEED_SOFT=soft_weight != 0,
        SEPARATE_CE=has_target and hard_weight != 0 and temperature != 1.0, BUCKET=bucket,
        STUDENT_GRAD=student_grad, DIVERGENCE=divergence, TERMS=17 if acc_dtype == torch.float64 else 8,
        ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32, BLOCK=block,
        CATS=triton.next_power_of_2(k + 1), num_warps=8 if block >= 4096 else 4)
    return loss, grad_student, status

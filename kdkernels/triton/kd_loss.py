"""Triton kernel of kd_loss: one program per row, the same three reads as the C++ kernels
(csrc/cpu/kd_loss_cpu.cpp) and the same contract (csrc/kd_loss.h):

1. online (max, sum-exp) statistics of student/T, teacher/T and, for the CE term at T != 1,
   student, block by block; for forward/reverse KL also the support sums (mass and log-ratio
   over entries finite in both inputs) that give the divergence and its gradient's row sums;
2. for divergences whose row sums do not follow from the statistics: those row sums; for
   adaptive KL: the head search (_head_cut) and the head and tail sums of |p - q|;
3. the gradients, written in the input dtype.

A divergence is one branch of `_terms` (its value and its derivatives with respect to log q and
log p) and, if its row sums follow from the statistics, one branch of `_row_sums`. Offsets are
64-bit, so N * V may exceed 2^31."""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

# Divergence ids of csrc/divergences.h; the two with kSumsFromStats there.
FORWARD_KL, REVERSE_KL, JSD, SKEW_KL, SKEW_REVERSE_KL, TVD, ALPHA_BETA, ADAPTIVE_KL = range(8)
SUMS_FROM_STATS = (FORWARD_KL, REVERSE_KL, ADAPTIVE_KL)

# Row status codes of csrc/row_status.h.
_TARGET_OUT_OF_RANGE = tl.constexpr(1)
_TARGET_MASKED = tl.constexpr(2)
_STUDENT_NON_FINITE = tl.constexpr(3)
_TEACHER_NON_FINITE = tl.constexpr(4)
_STUDENT_ALL_MASKED = tl.constexpr(5)
_TEACHER_ALL_MASKED = tl.constexpr(6)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def divergence_params(divergence: int, args: list[float], acc_dtype: torch.dtype) -> tuple:
    """The kernel's divergence constants, as make_divergence_params (csrc/divergences.h) prepares
    them: the mixture's (weight, complement, log weight, log complement) of JSD and skew KL, then
    AB's (alpha, beta, 1 / alpha, 1 / beta, 1 / (alpha + beta), middle and highest coefficient
    minus the lowest, lowest node, middle node) with nodes q, m, p = 0, 1, 2, then adaptive KL's mu."""
    weight, complement = 0.0, 1.0
    if divergence in (JSD, SKEW_KL):
        weight, complement = args[0], 1.0 - args[0]
    elif divergence == SKEW_REVERSE_KL:
        weight, complement = 1.0 - args[0], args[0]
    smallest = torch.finfo(acc_dtype).tiny
    weight, complement = (w if w >= smallest else 0.0 for w in (weight, complement))
    mixture = (weight, complement, math.log(weight) if weight else -math.inf,
               math.log(complement) if complement else -math.inf)
    alpha, beta = args if divergence == ALPHA_BETA else (0.0, 0.0)
    coefficients = (0.0, alpha, alpha + beta)
    order = sorted(range(3), key=coefficients.__getitem__)
    lowest = coefficients[order[0]]

    def inverse(x: float) -> float:
        return 1.0 / x if x else math.inf

    head_mass = args[0] if divergence == ADAPTIVE_KL else 0.0
    return (*mixture, alpha, beta, inverse(alpha), inverse(beta), inverse(alpha + beta), coefficients[order[1]] - lowest,
            coefficients[order[2]] - lowest, order[0], order[1], head_mass)


@triton.jit
def _log_mixture(lp, lq, weight, complement, log_weight, log_complement):
    """log(w p + (1 - w) q) with the larger weighted term factored out, the ratio capped where its
    weight is 0 (csrc/divergences.h)."""
    teacher_larger = lp + log_weight >= lq + log_complement
    d = lq - lp
    ratio = tl.minimum(tl.exp(tl.where(teacher_larger, d, -d)), 3.4e38)
    return tl.where(teacher_larger, lp, lq) + tl.log(
        tl.where(teacher_larger, weight + complement * ratio, weight * ratio + complement))


@triton.jit
def _exp_ratio_series(d, TERMS: tl.constexpr):
    """(e^d - 1) / d as its Taylor series (|d| < 1/2)."""
    series = d * 0 + 1
    for i in tl.static_range(TERMS):
        series = 1 + series * d * (1.0 / (TERMS - i + 1))
    return series


@triton.jit
def _exp_second_ratio_series(y1, y2, TERMS: tl.constexpr):
    """sum_k h_k(y1, y2) / (k + 2)!, h_k the complete homogeneous polynomials."""
    h = y1 * 0 + 1
    y1_power = h
    inv_factorial = h * 0.5
    series = inv_factorial
    for k in tl.static_range(1, TERMS + 2):
        y1_power = y1_power * y1
        h = y2 * h + y1_power
        inv_factorial = inv_factorial * (1.0 / (k + 2))
        series += h * inv_factorial
    return series


@triton.jit
def _g_pair(u, c, inv_c, e_a, e_b, TERMS: tl.constexpr):
    """u exp[a, b] for nodes whose coefficients differ by c (AlphaBeta in csrc/divergences.h)."""
    d = c * u
    return tl.where(tl.abs(d) < 0.5, u * e_a * _exp_ratio_series(d, TERMS), (e_b - e_a) * inv_c)


@triton.jit
def _terms(lp, lq, p, q, weight, complement, log_weight, log_complement, ab_alpha, ab_beta, ab_inv_alpha,
           ab_inv_beta, ab_inv_sum, ab_offset_middle, ab_spread, ab_lowest, ab_middle, DIVERGENCE: tl.constexpr,
           TERMS: tl.constexpr):
    """Per-entry (value, q * df/dq, p * df/dp) of the divergence sum_j f(p_j, q_j); the formulas
    and their derivation are those of csrc/divergences.h."""
    if DIVERGENCE == 0:  # KL(p || q)
        value = p * (lp - lq)
        d_student = -p
        d_teacher = value + p
    elif DIVERGENCE == 1:  # KL(q || p)
        value = q * (lq - lp)
        d_student = value + q
        d_teacher = -q
    elif DIVERGENCE == 2:  # beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
        log_m = _log_mixture(lp, lq, weight, complement, log_weight, log_complement)
        d_teacher = weight * p * (lp - log_m)
        d_student = complement * q * (lq - log_m)
        value = d_teacher + d_student
    elif DIVERGENCE == 3:  # KL(p || m), m = w p + (1 - w) q
        log_m = _log_mixture(lp, lq, weight, complement, log_weight, log_complement)
        value = p * (lp - log_m)
        d_student = -complement * p * tl.exp(lq - log_m)
        d_teacher = value - d_student
    elif DIVERGENCE == 4:  # KL(q || m), m = w p + (1 - w) q with w = 1 - skew
        log_m = _log_mixture(lp, lq, weight, complement, log_weight, log_complement)
        value = q * (lq - log_m)
        d_teacher = -weight * q * tl.exp(lp - log_m)
        d_student = value - d_teacher
    elif DIVERGENCE == 5:  # |p - q| / 2
        half_sign = tl.where(p > q, 0.5, tl.where(p < q, -0.5, 0.0))
        value = half_sign * (p - q)
        d_student = -half_sign * q
        d_teacher = half_sign * p
    elif DIVERGENCE == 6:  # alpha-beta: f = u^2 exp[x_q, m, x_p], p df/dp = u exp[m, x_p], q df/dq = -u exp[x_q, m]
        u = lp - lq
        g = ab_alpha + ab_beta
        e_q = tl.exp(g * lq)
        e_m = tl.exp(ab_alpha * lp + ab_beta * lq)
        e_p = tl.exp(g * lp)
        g_qm = _g_pair(u, ab_alpha, ab_inv_alpha, e_q, e_m, TERMS)
        g_mp = _g_pair(u, ab_beta, ab_inv_beta, e_m, e_p, TERMS)
        g_qp = _g_pair(u, g, ab_inv_sum, e_q, e_p, TERMS)
        apart = tl.where(ab_middle == 1, (g_mp - g_qm) * ab_inv_sum,
                         tl.where(ab_middle == 0, (g_qp - g_qm) * ab_inv_beta, (g_mp - g_qp) * ab_inv_alpha))
        e_lowest = tl.where(ab_lowest == 0, e_q, tl.where(ab_lowest == 1, e_m, e_p))
        near = u * u * e_lowest * _exp_second_ratio_series(ab_offset_middle * u, ab_spread * u, TERMS)
        value = tl.where(tl.abs(ab_spread * u) < 0.5, near, apart)
        d_student = -g_qm
        d_teacher = g_mp
    else:  # adaptive KL: w KL(p || q) + (1 - w) KL(q || p) with the row's w, 1 - w in weight, complement
        forward = p * (lp - lq)
        reverse = q * (lq - lp)
        value = weight * forward + complement * reverse
        d_student = -weight * p + complement * (reverse + q)
        d_teacher = weight * (forward + p) - complement * q
    return value, d_student, d_teacher


@triton.jit
def _shared_terms(a, b, m_a, logz_a, m_b, logz_b, weight, complement, log_weight, log_complement, ab_alpha, ab_beta,
                  ab_inv_alpha, ab_inv_beta, ab_inv_sum, ab_offset_middle, ab_spread, ab_lowest, ab_middle,
                  DIVERGENCE: tl.constexpr, TERMS: tl.constexpr):
    """(p, q, value, d_student, d_teacher) of soft values a (student) and b (teacher) with the
    rows' (max, log sum) normalisers: the _terms, 0 where either entry is -inf (masked)."""
    shared = (a > float("-inf")) & (b > float("-inf"))
    q = tl.exp((a - m_a) - logz_a)
    p = tl.exp((b - m_b) - logz_b)
    lq = tl.where(shared, (a - m_a) - logz_a, 0.0)
    lp = tl.where(shared, (b - m_b) - logz_b, 0.0)
    v, ds, dt = _terms(lp, lq, p, q, weight, complement, log_weight, log_complement, ab_alpha, ab_beta, ab_inv_alpha,
                       ab_inv_beta, ab_inv_sum, ab_offset_middle, ab_spread, ab_lowest, ab_middle, DIVERGENCE, TERMS)
    return p, q, tl.where(shared, v, 0.0), tl.where(shared, ds, 0.0), tl.where(shared, dt, 0.0)


@triton.jit
def _row_sums(lse_a, lse_b, mass_a, logratio_a, mass_b, logratio_b, weight, complement, DIVERGENCE: tl.constexpr):
    """Row sums of _terms from the normalised support sums (divergences with SUMS_FROM_STATS); the
    log-normalisers and log-ratios are of anchored values (csrc/divergences.h, SupportStats)."""
    forward = logratio_b + (lse_a - lse_b) * mass_b
    reverse = logratio_a + (lse_b - lse_a) * mass_a
    if DIVERGENCE == 0:
        value = forward
        sum_d_student = -mass_b
        sum_d_teacher = forward + mass_b
    elif DIVERGENCE == 1:
        value = reverse
        sum_d_student = reverse + mass_a
        sum_d_teacher = -mass_a
    else:  # adaptive KL
        value = weight * forward + complement * reverse
        sum_d_student = -weight * mass_b + complement * (reverse + mass_a)
        sum_d_teacher = weight * (forward + mass_b) - complement * mass_a
    return value, sum_d_student, sum_d_teacher


@triton.jit
def _head_cut(t_row, V, center, scale, softcap, m_b, logz_b, mu, SOFTCAP: tl.constexpr, ACC: tl.constexpr,
              BLOCK: tl.constexpr, BUCKETS: tl.constexpr):
    """Adaptive KL's head without sorting, with the rule of set_adaptive_weights in
    csrc/cpu/kd_loss_cpu.cpp: the teacher values b with b > cut (b >= cut if inclusive), plus the
    row's top value. Each pass
    buckets the candidate values by value, with each bucket's mass, min and max; the bucket where
    the cumulative mass from the top passes mu holds the cut, and its [min, max] are the next
    candidates, until they are one value (a tie group that would pass mu is tail)."""
    neg_inf = float("-inf")
    buckets = tl.arange(0, BUCKETS)
    cols = tl.arange(0, BLOCK)
    lo = m_b * 0 + neg_inf  # candidates: lo <= b <= hi
    hi = m_b
    above = m_b * 0  # mass of b > hi
    map_lo = m_b - tl.maximum(40.0, tl.abs(m_b) * 1e-3)  # buckets split [map_lo, hi]
    cut = lo
    inclusive = 0
    searching = 1
    while searching == 1:
        mass = tl.zeros((BUCKETS,), ACC)
        low = tl.full((BUCKETS,), float("inf"), ACC)
        high = tl.full((BUCKETS,), neg_inf, ACC)
        span = hi - map_lo
        for start in range(0, V, BLOCK):
            offs = start + cols
            b = _load_soft(t_row + offs, offs < V, center, scale, softcap, SOFTCAP, ACC)
            candidate = (b >= lo) & (b <= hi) & (b > neg_inf)
            position = tl.minimum(tl.maximum((b - map_lo) / span * BUCKETS, 0.0), BUCKETS - 1)
            hit = (tl.where(candidate, position.to(tl.int32), -1)[:, None] == buckets[None, :])
            mass += tl.sum(tl.where(hit, tl.exp((b - m_b) - logz_b)[:, None], 0.0), axis=0)
            low = tl.minimum(low, tl.min(tl.where(hit, b[:, None], float("inf")), axis=0))
            high = tl.maximum(high, tl.max(tl.where(hit, b[:, None], neg_inf), axis=0))
        from_top = tl.sum(mass) - tl.cumsum(mass, axis=0) + mass  # mass of the buckets >= each
        k = tl.max(tl.where((above + from_top > mu) & (mass > 0), buckets, -1))
        bucket_low = tl.sum(tl.where(buckets == k, low, 0.0))
        bucket_high = tl.sum(tl.where(buckets == k, high, 0.0))
        if k < 0:  # every candidate fits (possible only through rounding)
            cut = lo
            inclusive = 1
            searching = 0
        elif bucket_low == bucket_high:
            cut = bucket_low
            searching = 0
        else:
            above += tl.sum(tl.where(buckets > k, mass, 0.0))
            lo = bucket_low
            map_lo = bucket_low
            hi = bucket_high
    return cut, inclusive


@triton.jit
def _tanh(x):
    """tanh as the C++ kernels compute it: odd Taylor polynomial below |x| = 1/2, else
    1 - 2 / (e^{2|x|} + 1) with the sign of x."""
    z = x * x
    poly = 1.455834387e-3 * z - 3.592128036e-3
    poly = poly * z + 8.863235530e-3
    poly = poly * z - 2.186948854e-2
    poly = poly * z + 5.396825397e-2
    poly = poly * z - 1.333333333e-1
    poly = poly * z + 3.333333333e-1
    ax = tl.abs(x)
    large = 1 - 2 / (tl.exp(tl.minimum(2 * ax, 88.0)) + 1)
    return tl.where(ax < 0.5, x - x * z * poly, tl.where(x < 0, -large, large))


@triton.jit
def _soft(x, center, scale, softcap, SOFTCAP: tl.constexpr):
    """The soft term's view of logits x: (x - center) * scale, with center = 0 and scale = 1 / T or
    the row's standardize view; with softcap, softcap * tanh(x / softcap) / T (values that are not
    finite pass through: -inf stays masked, NaN and +inf are still found)."""
    if SOFTCAP:
        finite = tl.abs(x) < float("inf")
        x = tl.where(finite, softcap * _tanh(tl.where(finite, x, 0.0) / softcap), x)
    return (x - center) * scale


@triton.jit
def _load_soft(pointer, mask, center, scale, softcap, SOFTCAP: tl.constexpr, ACC: tl.constexpr):
    """_soft of the logits at pointer (-inf where mask is off)."""
    return _soft(tl.load(pointer, mask=mask, other=float("-inf")).to(ACC), center, scale, softcap, SOFTCAP)


@triton.jit
def _standardized(row, V, inv_t, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """(center, scale, count, std) of a row for standardize: mean and unbiased std of its finite
    entries (each block's two-pass moments merged by Chan's formula; std 0 below two entries) and
    scale = 1 / (T (std + 1e-7))."""
    cols = tl.arange(0, BLOCK)
    count = tl.zeros((), ACC)
    mean = tl.zeros((), ACC)
    m2 = tl.zeros((), ACC)
    for start in range(0, V, BLOCK):
        offs = start + cols
        x = tl.load(row + offs, mask=offs < V, other=float("-inf")).to(ACC)
        finite = (x > float("-inf")) & (x < float("inf"))
        n = tl.sum(finite.to(ACC))
        block_mean = tl.sum(tl.where(finite, x, 0.0)) / tl.maximum(n, 1.0)
        d = tl.where(finite, x - block_mean, 0.0)
        total = count + n
        share = tl.where(total > 0, n / tl.maximum(total, 1.0), 0.0)
        delta = block_mean - mean
        mean += delta * share
        m2 += tl.sum(d * d) + delta * delta * count * share
        count = total
    std = tl.where(count > 1, tl.sqrt(m2 / tl.maximum(count - 1, 1.0)), 0.0)
    return mean, inv_t / (std + 1e-7), count, std


@triton.jit
def _softcap_slope(a, cap_scale, SOFTCAP: tl.constexpr):
    """d(softcap tanh(x / softcap)) / dx = 1 - tanh^2 from the soft value a (tanh = a * cap_scale);
    0 at masked entries."""
    if SOFTCAP:
        t = a * cap_scale
        return tl.where(t * t < 1, 1 - t * t, 0.0)
    else:
        return 1.0


@triton.jit
def _merge(m, chunk_max):
    """Online max update: the new max, its exp offset (0 while everything is -inf, so that
    exp(-inf - offset) = 0) and the factor that rescales the sums taken at the old max."""
    new_m = tl.maximum(m, chunk_max)
    offset = tl.where(new_m == float("-inf"), 0.0, new_m)
    return new_m, offset, tl.exp(m - offset)


@triton.jit
def _online(m, z, x):
    """(max, sum of exp(x - max)) updated with the block x."""
    m, offset, rescale = _merge(m, tl.max(x))
    return m, z * rescale + tl.sum(tl.exp(x - offset))


@triton.jit
def _non_finite(x):
    """The number of NaN and +inf entries of the block x (-inf is a valid, masked entry)."""
    return tl.sum(((x != x) | (x == float("inf"))).to(tl.int32))


@triton.jit
def row_target(Y, row, V, ignore_index, HAS_TARGET: tl.constexpr):
    """A row's target y (-1 without target), whether it is ignore_index, and its status: target
    out of range or 0."""
    ignored = False
    status = 0
    y = -1
    if HAS_TARGET:
        y = tl.load(Y + row)
        ignored = y == ignore_index
        status = tl.where((y < 0) | (y >= V), _TARGET_OUT_OF_RANGE, 0)
    return y, ignored, status


@triton.jit
def hard_label_term(s_row, y, V, m_c, logz_c, hard_weight, status, ignored, HAS_TARGET: tl.constexpr):
    """A row's CE term -log softmax(student)[y] from the student's (max m_c, log sum logz_c) at
    T = 1, its final status (a target on a -inf logit is an error where the CE term is on; an
    ignored row is fine) and whether the row counts."""
    ce = tl.zeros_like(m_c)
    if HAS_TARGET:
        logit_y = tl.load(s_row + tl.where((y >= 0) & (y < V), y, 0)).to(m_c.dtype)
        if status == 0:
            status = tl.where((logit_y == float("-inf")) & (hard_weight != 0), _TARGET_MASKED, 0)
        ce = (m_c - logit_y) + logz_c
    status = tl.where(ignored, 0, status)
    return ce, status, (status == 0) & (not ignored)


def row_outputs(student: Tensor, student_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The outputs of a row kernel on [N, V] logits: loss [N] in the accumulation dtype, the
    student gradient [N, V] (empty [0, V] when not wanted) and status [N] int8."""
    rows, vocab = student.shape
    acc_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    loss = torch.empty(rows, dtype=acc_dtype, device=student.device)
    status = torch.empty(rows, dtype=torch.int8, device=student.device)
    return loss, student.new_empty((rows if student_grad else 0, vocab)), status


def row_block(vocab: int) -> int:
    """Block width of an untuned row kernel: the row, between 16 and 4096 (1024 when interpreted)."""
    return min(max(triton.next_power_of_2(vocab), 16), 1024 if interpreting() else 4096)


@triton.jit
def _write_gradients(s_row, t_row, gs_row, gt_row, V, y, live, center_a, scale_a, coupling_a, center_b, scale_b,
                     coupling_b, m_a, logz_a, m_b, logz_b, m_c, logz_c, sum_d_student, sum_d_teacher, soft_weight,
                     hard_weight, softcap, cap_scale, mix_weight, mix_complement, log_mix_weight, log_mix_complement,
                     ab_alpha, ab_beta, ab_inv_alpha, ab_inv_beta, ab_inv_sum, ab_offset_middle, ab_spread, ab_lowest,
                     ab_middle, HAS_TARGET: tl.constexpr, NEED_SOFT: tl.constexpr, SEPARATE_CE: tl.constexpr,
                     STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr, DIVERGENCE: tl.constexpr,
                     TERMS: tl.constexpr, SOFTCAP: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """The last read of a row: the gradients of its loss, soft_weight * D through the softmax
    Jacobian of the soft views (x - center) * scale (less coupling * a, standardize's term
    through the mean and std) plus hard_weight * CE at target y (-1: none here), written to the
    gradient rows (zeros where the row is not live)."""
    neg_inf = float("-inf")
    cols = tl.arange(0, BLOCK)
    ce_weight = tl.where(HAS_TARGET, hard_weight, 0.0)
    for start in range(0, V, BLOCK):
        offs = start + cols
        inside = offs < V
        c = tl.load(s_row + offs, mask=inside, other=neg_inf).to(ACC)
        a = _soft(c, center_a, scale_a, softcap, SOFTCAP)
        q = tl.exp((a - m_a) - logz_a)
        if SEPARATE_CE:
            grad_s = ce_weight * tl.exp((c - m_c) - logz_c)
        else:
            grad_s = ce_weight * q
        grad_s = tl.where(offs == y, grad_s - ce_weight, grad_s)
        grad_t = tl.zeros((BLOCK,), ACC)
        if NEED_SOFT:
            b = _load_soft(t_row + offs, inside, center_b, scale_b, softcap, SOFTCAP, ACC)
            p, q, v, ds, dt = _shared_terms(
                a, b, m_a, logz_a, m_b, logz_b, mix_weight, mix_complement, log_mix_weight, log_mix_complement,
                ab_alpha, ab_beta, ab_inv_alpha, ab_inv_beta, ab_inv_sum, ab_offset_middle, ab_spread, ab_lowest,
                ab_middle, DIVERGENCE, TERMS)
            grad_s += soft_weight * scale_a * (ds - q * sum_d_student) * _softcap_slope(
                a, cap_scale, SOFTCAP) - tl.where(a > neg_inf, coupling_a * a, 0.0)
            grad_t = soft_weight * scale_b * (dt - p * sum_d_teacher) * _softcap_slope(
                b, cap_scale, SOFTCAP) - tl.where(b > neg_inf, coupling_b * b, 0.0)
        if STUDENT_GRAD:
            tl.store(gs_row + offs, tl.where(live, grad_s, 0.0).to(gs_row.dtype.element_ty), mask=inside)
        if TEACHER_GRAD:
            tl.store(gt_row + offs, tl.where(live, grad_t, 0.0).to(gt_row.dtype.element_ty), mask=inside)


@triton.jit
def _kd_loss_kernel(
    S, T, Y, W, LOSS, GS, GT, STATUS,
    s_stride, t_stride, V, v_bucket, inv_t, softcap, cap_scale, soft_weight, hard_weight, ignore_index,
    mix_weight, mix_complement, log_mix_weight, log_mix_complement, ab_alpha, ab_beta, ab_inv_alpha, ab_inv_beta,
    ab_inv_sum, ab_offset_middle, ab_spread, ab_lowest, ab_middle, head_mass,
    HAS_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, NEED_SOFT: tl.constexpr, SEPARATE_CE: tl.constexpr,
    STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr, DIVERGENCE: tl.constexpr,
    SUMS_FROM_STATS: tl.constexpr, TERMS: tl.constexpr, SOFTCAP: tl.constexpr, STANDARDIZE: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr, HEAD_BLOCK: tl.constexpr = 256, HEAD_BUCKETS: tl.constexpr = 32,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * s_stride
    t_row = T + row * t_stride
    cols = tl.arange(0, BLOCK)
    neg_inf = float("-inf")
    if HAS_WEIGHT:
        weight = tl.load(W).to(ACC)
        soft_weight = soft_weight * weight
        hard_weight = hard_weight * weight
    # Read 0, with standardize: each row's mean and std (the soft view (x - center) * scale).
    zero = tl.zeros((), ACC)
    center_a, scale_a, count_a, std_a = zero, zero + inv_t, zero, zero
    center_b, scale_b, count_b, std_b = zero, zero + inv_t, zero, zero
    if STANDARDIZE:
        center_a, scale_a, count_a, std_a = _standardized(s_row, V, inv_t, ACC, BLOCK)
        if NEED_SOFT:
            center_b, scale_b, count_b, std_b = _standardized(t_row, V, inv_t, ACC, BLOCK)

    y, ignored, status = row_target(Y, row, V, ignore_index, HAS_TARGET)

    # Read 1: statistics. a = student / T, b = teacher / T (or their standardize views), c = student.
    m_a, z_a, mass_a, lr_a = zero + neg_inf, zero, zero, zero
    m_b, z_b, mass_b, lr_b = zero + neg_inf, zero, zero, zero
    m_c, z_c = zero + neg_inf, zero
    bad_s = 0
    bad_t = 0
    # Row anchors (csrc/divergences.h, SupportStats): max of the first 16 entries, 0 if all -inf.
    head = tl.arange(0, 16)
    anchor_a = tl.max(_load_soft(s_row + head, head < V, center_a, scale_a, softcap, SOFTCAP, ACC))
    anchor_a = tl.where(anchor_a == neg_inf, 0.0, anchor_a)
    anchor_b = zero
    if NEED_SOFT:
        anchor_b = tl.max(_load_soft(t_row + head, head < V, center_b, scale_b, softcap, SOFTCAP, ACC))
        anchor_b = tl.where(anchor_b == neg_inf, 0.0, anchor_b)
    for start in range(0, V, BLOCK):
        offs = start + cols
        inside = offs < V
        c = tl.load(s_row + offs, mask=inside, other=neg_inf).to(ACC)
        a = _soft(c, center_a, scale_a, softcap, SOFTCAP)
        bad_s += _non_finite(a)
        m_a, offset_a, rescale_a = _merge(m_a, tl.max(a))
        ea = tl.exp(a - offset_a)
        z_a = z_a * rescale_a + tl.sum(ea)
        if NEED_SOFT:
            b = _load_soft(t_row + offs, inside, center_b, scale_b, softcap, SOFTCAP, ACC)
            bad_t += _non_finite(b)
            m_b, offset_b, rescale_b = _merge(m_b, tl.max(b))
            eb = tl.exp(b - offset_b)
            z_b = z_b * rescale_b + tl.sum(eb)
            if SUMS_FROM_STATS:
                shared = (a > neg_inf) & (b > neg_inf)
                diff = tl.where(shared, (a - anchor_a) - (b - anchor_b), 0.0)
                mass_a = mass_a * rescale_a + tl.sum(tl.where(shared, ea, 0.0))
                lr_a = lr_a * rescale_a + tl.sum(ea * diff)
                mass_b = mass_b * rescale_b + tl.sum(tl.where(shared, eb, 0.0))
                lr_b = lr_b * rescale_b - tl.sum(eb * diff)
        if SEPARATE_CE:
            m_c, z_c = _online(m_c, z_c, c)

    if status == 0:
        status = tl.where(bad_s > 0, _STUDENT_NON_FINITE, status)
    if status == 0:
        status = tl.where(bad_t > 0, _TEACHER_NON_FINITE, status)
    if status == 0:
        status = tl.where(z_a > 0, 0, _STUDENT_ALL_MASKED)
    if NEED_SOFT:
        if status == 0:
            status = tl.where(z_b > 0, 0, _TEACHER_ALL_MASKED)
    # Log-normalisers as (max, log sum): log-probs are (x - max) - log_sum, exact for large logits.
    logz_a = tl.log(z_a)
    logz_b = tl.log(z_b)
    if not SEPARATE_CE:
        m_c = m_a
        logz_c = logz_a
    else:
        logz_c = tl.log(z_c)
    ce, status, live = hard_label_term(s_row, y, V, m_c, logz_c, hard_weight, status, ignored, HAS_TARGET)

    # Row sums of the divergence terms: from the statistics, or read 2.
    value = zero
    sum_d_student = zero
    sum_d_teacher = zero
    moment_a, mean_a, moment_b, mean_b = zero, zero, zero, zero  # standardize: sum d a, sum q a; the same for b
    if NEED_SOFT:
        if DIVERGENCE == 7:  # adaptive KL: the row's weights of forward and reverse KL
            mix_weight = zero + 0.5
            mix_complement = zero + 0.5
            if live:
                cut, inclusive = _head_cut(t_row, V, center_b, scale_b, softcap, m_b, logz_b, head_mass, SOFTCAP, ACC,
                                           HEAD_BLOCK, HEAD_BUCKETS)
                g_head = zero
                g_tail = zero
                for start in range(0, V, BLOCK):
                    offs = start + cols
                    inside = offs < V
                    a = _load_soft(s_row + offs, inside, center_a, scale_a, softcap, SOFTCAP, ACC)
                    b = _load_soft(t_row + offs, inside, center_b, scale_b, softcap, SOFTCAP, ACC)
                    shared = (a > neg_inf) & (b > neg_inf)
                    error = tl.where(shared, tl.abs(tl.exp((b - m_b) - logz_b) - tl.exp((a - m_a) - logz_a)), 0.0)
                    head = tl.where(inclusive == 1, b >= cut, b > cut) | (b == m_b)
                    g_head += tl.sum(tl.where(head, error, 0.0))
                    g_tail += tl.sum(tl.where(head, 0.0, error))
                mix_weight = tl.where(g_head + g_tail > 0, g_head / (g_head + g_tail), 0.5)
                mix_complement = tl.where(g_head + g_tail > 0, g_tail / (g_head + g_tail), 0.5)
        # The statistics' sums hold where the anchors lie within 64 of the maxima (csrc/divergences.h,
        # kAnchorSlack); elsewhere read 2 sums the terms.
        from_stats = zero != zero
        if SUMS_FROM_STATS:
            from_stats = (tl.abs(m_a - anchor_a) <= 64.0) & (tl.abs(m_b - anchor_b) <= 64.0)
        if from_stats:
            value, sum_d_student, sum_d_teacher = _row_sums(
                (m_a - anchor_a) + logz_a, (m_b - anchor_b) + logz_b, mass_a / z_a, lr_a / z_a,
                mass_b / z_b, lr_b / z_b, mix_weight, mix_complement, DIVERGENCE)
        else:
            for start in range(0, V, BLOCK):
                offs = start + cols
                inside = offs < V
                a = _load_soft(s_row + offs, inside, center_a, scale_a, softcap, SOFTCAP, ACC)
                b = _load_soft(t_row + offs, inside, center_b, scale_b, softcap, SOFTCAP, ACC)
                p, q, v, ds, dt = _shared_terms(
                    a, b, m_a, logz_a, m_b, logz_b, mix_weight, mix_complement, log_mix_weight, log_mix_complement,
                    ab_alpha, ab_beta, ab_inv_alpha, ab_inv_beta, ab_inv_sum, ab_offset_middle, ab_spread, ab_lowest,
                    ab_middle, DIVERGENCE, TERMS)
                value += tl.sum(v)
                sum_d_student += tl.sum(ds)
                sum_d_teacher += tl.sum(dt)
                if STANDARDIZE:
                    a_finite = tl.where(a > neg_inf, a, 0.0)
                    b_finite = tl.where(b > neg_inf, b, 0.0)
                    moment_a += tl.sum(ds * a_finite)
                    mean_a += tl.sum(q * a_finite)
                    moment_b += tl.sum(dt * b_finite)
                    mean_b += tl.sum(p * b_finite)
    loss = soft_weight * value
    if HAS_TARGET:
        loss += tl.where(hard_weight != 0, hard_weight * ce, 0.0)  # the CE term off: ce may be inf
    tl.store(LOSS + row, tl.where(live, loss, 0.0))
    tl.store(STATUS + row, status.to(tl.int8))

    # Read 3: gradients of the row loss.
    if STUDENT_GRAD or TEACHER_GRAD:
        # Standardize's term through the mean and std (csrc/cpu/kd_loss_cpu.cpp, standardize_coupling).
        coupling_a = tl.where((count_a > 1) & (std_a > 0), soft_weight * (moment_a - sum_d_student * mean_a) /
                              (inv_t * tl.maximum(count_a - 1, 1.0) * tl.where(std_a > 0, std_a, 1.0)), 0.0)
        coupling_b = tl.where((count_b > 1) & (std_b > 0), soft_weight * (moment_b - sum_d_teacher * mean_b) /
                              (inv_t * tl.maximum(count_b - 1, 1.0) * tl.where(std_b > 0, std_b, 1.0)), 0.0)
        _write_gradients(s_row, t_row, GS + row * V, GT + row * V, V, y, live, center_a, scale_a, coupling_a,
                         center_b, scale_b, coupling_b, m_a, logz_a, m_b, logz_b, m_c, logz_c, sum_d_student,
                         sum_d_teacher, soft_weight, hard_weight, softcap, cap_scale, mix_weight, mix_complement,
                         log_mix_weight, log_mix_complement, ab_alpha, ab_beta, ab_inv_alpha, ab_inv_beta, ab_inv_sum,
                         ab_offset_middle, ab_spread, ab_lowest, ab_middle, HAS_TARGET, NEED_SOFT, SEPARATE_CE,
                         STUDENT_GRAD, TEACHER_GRAD, DIVERGENCE, TERMS, SOFTCAP, ACC, BLOCK)


# Tuned once per power-of-two bucket of V (v_bucket) and kernel variant.
_CONFIGS = [triton.Config({"BLOCK": block}, num_warps=warps) for block in (1024, 2048, 4096, 8192)
            for warps in (4, 8, 16) if block // (32 * warps) >= 4]


def _prune_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Blocks wider than the row (beyond the smallest) only waste lanes."""
    return [c for c in configs if c.kwargs["BLOCK"] <= max(1024, named_args["v_bucket"])]


_tuned_kernel = triton.autotune(configs=_CONFIGS, key=["v_bucket", "NEED_SOFT", "SEPARATE_CE", "STUDENT_GRAD", "SOFTCAP",
                                                       "STANDARDIZE", "TEACHER_GRAD", "DIVERGENCE"],
                                prune_configs_by={"early_config_prune": _prune_configs})(_kd_loss_kernel)


def kd_loss_forward_triton(student: Tensor, teacher: Tensor, target: Optional[Tensor], row_weight: Optional[Tensor],
                           temperature: float, softcap: float, standardize: bool, soft_weight: float,
                           hard_weight: float, divergence: int, divergence_args: list[float], ignore_index: int,
                           student_grad: bool, teacher_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The kd_loss contract of csrc/kd_loss.h, with the row weight (a 0-d tensor or None)
    read on the device. Inputs [N, V] with unit stride along V."""
    rows, vocab = student.shape
    acc_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    loss, grad_student, status = row_outputs(student, student_grad)
    grad_teacher = student.new_empty((rows if teacher_grad else 0, vocab))
    if rows == 0:
        return loss, grad_student, grad_teacher, status
    has_target = target is not None
    args = (student, teacher, target if has_target else status, row_weight if row_weight is not None else loss,
            loss, grad_student, grad_teacher, status, student.stride(0), teacher.stride(0), vocab,
            triton.next_power_of_2(vocab), 1.0 / temperature, softcap or 1.0, temperature / softcap if softcap else 0.0,
            soft_weight, hard_weight, ignore_index,
            *divergence_params(divergence, divergence_args, acc_dtype))
    flags = dict(HAS_TARGET=has_target, HAS_WEIGHT=row_weight is not None, NEED_SOFT=soft_weight != 0,
                 SEPARATE_CE=has_target and hard_weight != 0 and (temperature != 1.0 or softcap != 0 or standardize),
                 STUDENT_GRAD=student_grad, TEACHER_GRAD=teacher_grad, DIVERGENCE=divergence,
                 SUMS_FROM_STATS=divergence in SUMS_FROM_STATS and not standardize,
                 TERMS=17 if acc_dtype == torch.float64 else 8, SOFTCAP=softcap != 0, STANDARDIZE=standardize,
                 ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32)
    if interpreting():
        _kd_loss_kernel[(rows,)](*args, **flags, BLOCK=row_block(vocab))
    else:
        _tuned_kernel[(rows,)](*args, **flags)
    return loss, grad_student, grad_teacher, status


@triton.jit
def _kd_loss_shard_kernel(
    S, T, Y, NORMS, SUMS, OUT, GS, GT, STATUS,
    s_stride, t_stride, V, inv_t, softcap, cap_scale, soft_weight, hard_weight, ignore_index,
    mix_weight, mix_complement, log_mix_weight, log_mix_complement, ab_alpha, ab_beta, ab_inv_alpha, ab_inv_beta,
    ab_inv_sum, ab_offset_middle, ab_spread, ab_lowest, ab_middle,
    STAGE: tl.constexpr, HAS_TARGET: tl.constexpr, NEED_SOFT: tl.constexpr, SEPARATE_CE: tl.constexpr,
    STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr, DIVERGENCE: tl.constexpr, TERMS: tl.constexpr,
    SOFTCAP: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """One vocab-parallel stage of one row of a rank's vocabulary slice (kd_loss_shard_cpu in
    csrc/kd_loss.h): STAGE 0 writes the slice's (max, sum exp) of a = student/T, b = teacher/T and
    c = student to OUT [N, 6]; STAGE 1, from the whole row's (max, log_sum) pairs in NORMS,
    writes the slice's term sums and raw target logit to OUT [N, 4]; STAGE 2, with the whole row's
    term sums in SUMS, writes the slice's gradients."""
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * s_stride
    t_row = T + row * t_stride
    cols = tl.arange(0, BLOCK)
    neg_inf = float("-inf")
    zero = tl.zeros((), ACC)
    y = -1
    ignored = False
    if HAS_TARGET:
        y = tl.load(Y + row)
        ignored = y == ignore_index
    if STAGE == 0:
        m_a, z_a, m_b, z_b, m_c, z_c = zero + neg_inf, zero, zero + neg_inf, zero, zero + neg_inf, zero
        bad_s = 0
        bad_t = 0
        for start in range(0, V, BLOCK):
            offs = start + cols
            inside = offs < V
            c = tl.load(s_row + offs, mask=inside, other=neg_inf).to(ACC)
            a = _soft(c, zero, zero + inv_t, softcap, SOFTCAP)
            bad_s += _non_finite(a)
            m_a, z_a = _online(m_a, z_a, a)
            if NEED_SOFT:
                b = _load_soft(t_row + offs, inside, zero, zero + inv_t, softcap, SOFTCAP, ACC)
                bad_t += _non_finite(b)
                m_b, z_b = _online(m_b, z_b, b)
            if SEPARATE_CE:
                m_c, z_c = _online(m_c, z_c, c)
        if not SEPARATE_CE:
            m_c = m_a
            z_c = z_a
        status = tl.where(bad_s > 0, _STUDENT_NON_FINITE, tl.where(bad_t > 0, _TEACHER_NON_FINITE, 0))
        tl.store(STATUS + row, tl.where(ignored, 0, status).to(tl.int8))
        out = OUT + row * 6
        tl.store(out, m_a)
        tl.store(out + 1, z_a)
        tl.store(out + 2, m_b)
        tl.store(out + 3, z_b)
        tl.store(out + 4, m_c)
        tl.store(out + 5, z_c)
    else:
        tl.store(STATUS + row, tl.zeros((), tl.int8))
        norms = NORMS + row * 6
        m_a, logz_a = tl.load(norms).to(ACC), tl.load(norms + 1).to(ACC)
        m_b, logz_b = tl.load(norms + 2).to(ACC), tl.load(norms + 3).to(ACC)
        m_c, logz_c = tl.load(norms + 4).to(ACC), tl.load(norms + 5).to(ACC)
        owned = (y >= 0) & (y < V) & (not ignored)
        if STAGE == 1:
            value = zero
            sum_d_student = zero
            sum_d_teacher = zero
            if NEED_SOFT:
                if not ignored:
                    for start in range(0, V, BLOCK):
                        offs = start + cols
                        inside = offs < V
                        a = _load_soft(s_row + offs, inside, zero, zero + inv_t, softcap, SOFTCAP, ACC)
                        b = _load_soft(t_row + offs, inside, zero, zero + inv_t, softcap, SOFTCAP, ACC)
                        _, _, v, ds, dt = _shared_terms(
                            a, b, m_a, logz_a, m_b, logz_b, mix_weight, mix_complement, log_mix_weight,
                            log_mix_complement, ab_alpha, ab_beta, ab_inv_alpha, ab_inv_beta, ab_inv_sum,
                            ab_offset_middle, ab_spread, ab_lowest, ab_middle, DIVERGENCE, TERMS)
                        value += tl.sum(v)
                        sum_d_student += tl.sum(ds)
                        sum_d_teacher += tl.sum(dt)
            target_logit = zero
            if HAS_TARGET:
                logit_y = tl.load(s_row + tl.where(owned, y, 0)).to(ACC)
                target_logit = tl.where(owned & (hard_weight != 0), logit_y, 0.0)
            out = OUT + row * 4
            tl.store(out, value)
            tl.store(out + 1, sum_d_student)
            tl.store(out + 2, sum_d_teacher)
            tl.store(out + 3, target_logit)
        else:
            sum_d_student = tl.load(SUMS + row * 4 + 1).to(ACC)
            sum_d_teacher = tl.load(SUMS + row * 4 + 2).to(ACC)
            _write_gradients(s_row, t_row, GS + row * V, GT + row * V, V, tl.where(owned, y, -1), not ignored, zero,
                             zero + inv_t, zero, zero, zero + inv_t, zero, m_a, logz_a, m_b, logz_b, m_c, logz_c,
                             sum_d_student, sum_d_teacher, soft_weight, hard_weight, softcap, cap_scale, mix_weight,
                             mix_complement, log_mix_weight, log_mix_complement, ab_alpha, ab_beta, ab_inv_alpha,
                             ab_inv_beta, ab_inv_sum, ab_offset_middle, ab_spread, ab_lowest, ab_middle, HAS_TARGET,
                             NEED_SOFT, SEPARATE_CE, STUDENT_GRAD, TEACHER_GRAD, DIVERGENCE, TERMS, SOFTCAP, ACC, BLOCK)


def kd_loss_shard_triton(stage: int, student: Tensor, teacher: Tensor, target: Optional[Tensor],
                         norms: Optional[Tensor], sums: Optional[Tensor], temperature: float, softcap: float,
                         soft_weight: float, hard_weight: float, divergence: int, divergence_args: list[float],
                         ignore_index: int, student_grad: bool,
                         teacher_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One vocab-parallel stage: the contract of kd_loss_shard_cpu (csrc/kd_loss.h)."""
    rows, vocab = student.shape
    acc_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    width = (6, 4, 0)[stage]
    out = torch.empty(rows, width, dtype=acc_dtype, device=student.device)
    status = torch.empty(rows, dtype=torch.int8, device=student.device)
    gradient = stage == 2
    grad_student = student.new_empty((rows if gradient and student_grad else 0, vocab))
    grad_teacher = student.new_empty((rows if gradient and teacher_grad else 0, vocab))
    if rows == 0:
        return out, grad_student, grad_teacher, status
    has_target = target is not None
    block = row_block(vocab)
    _kd_loss_shard_kernel[(rows,)](
        student, teacher, target if has_target else status, norms if norms is not None else out,
        sums if sums is not None else out, out, grad_student, grad_teacher, status, student.stride(0),
        teacher.stride(0), vocab, 1.0 / temperature, softcap or 1.0, temperature / softcap if softcap else 0.0,
        soft_weight, hard_weight, ignore_index, *divergence_params(divergence, divergence_args, acc_dtype)[:13],
        STAGE=stage, HAS_TARGET=has_target, NEED_SOFT=soft_weight != 0,
        SEPARATE_CE=has_target and hard_weight != 0 and (temperature != 1.0 or softcap != 0),
        STUDENT_GRAD=gradient and student_grad, TEACHER_GRAD=gradient and teacher_grad, DIVERGENCE=divergence,
        TERMS=17 if acc_dtype == torch.float64 else 8, SOFTCAP=softcap != 0,
        ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return out, grad_student, grad_teacher, status

"""Reference implementations in plain PyTorch: the correctness oracle of every test and the
baseline of every benchmark. Written the way a user would write them in eager PyTorch
(log-softmax, elementwise terms, autograd), sharing no code with the kernels they check.
Imports torch only."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _log_mixture(log_p: Tensor, log_q: Tensor, weight: float) -> Tensor:
    """log(weight * p + (1 - weight) * q)."""
    log_weight = math.log(weight) if weight > 0 else -math.inf
    log_complement = math.log1p(-weight) if weight < 1 else -math.inf
    return torch.logaddexp(log_p + log_weight, log_q + log_complement)


def _alpha_beta_terms(log_p: Tensor, log_q: Tensor, a: float, b: float) -> Tensor:
    """The alpha-beta divergence's entries as ABKD writes them, with its special cases; the powers
    as exp(k log x), whose gradients stay finite where x underflows to 0 (x**k's would be NaN)."""
    def p_to(k: float) -> Tensor:
        return torch.exp(k * log_p)

    def q_to(k: float) -> Tensor:
        return torch.exp(k * log_q)

    if a != 0 and b != 0 and a + b != 0:
        return -(p_to(a) * q_to(b) - a / (a + b) * p_to(a + b) - b / (a + b) * q_to(a + b)) / (a * b)
    if a != 0 and b == 0:
        return (p_to(a) * (a * log_p - a * log_q) - p_to(a) + q_to(a)) / a**2
    if a == 0 and b != 0:
        return (q_to(b) * (b * log_q - b * log_p) - q_to(b) + p_to(b)) / b**2
    if a != 0:  # a = -b
        ratio = torch.exp(a * (log_q - log_p))
        return (torch.log(ratio) + 1 / ratio - 1) / a**2
    return 0.5 * (log_p - log_q) ** 2


@torch.no_grad()
def _adaptive_kl_weights(log_p: Tensor, log_q: Tensor, shared: Tensor, mu: float) -> tuple[Tensor, Tensor]:
    """Adaptive KL's detached per-row weights of forward and reverse KL, as its authors compute
    them: sort the teacher's probabilities, the head is where their cumulative sum is <= mu (the
    top entry always), g = sum |p - q| over head and tail. Equal teacher values count together:
    each takes the cumulative sum at the end of its tie group."""
    sorted_log_p, order = log_p.sort(-1, descending=True)
    cumulative = sorted_log_p.exp().cumsum(-1)
    group_end = torch.searchsorted(-sorted_log_p, -sorted_log_p, right=True) - 1
    head_sorted = (cumulative.gather(-1, group_end) <= mu) | (sorted_log_p == sorted_log_p[..., :1])
    head = torch.empty_like(head_sorted).scatter_(-1, order, head_sorted)
    error = torch.where(shared, (log_p.exp() - log_q.exp()).abs(), 0.0)
    g_head, g_tail = (error * head).sum(-1, keepdim=True), (error * ~head).sum(-1, keepdim=True)
    total = g_head + g_tail
    return (torch.where(total > 0, g_head / total, 0.5), torch.where(total > 0, g_tail / total, 0.5))


def _divergence_rows(log_p: Tensor, log_q: Tensor, divergence: str, beta: float, skew: float,
                     ab_alpha: Optional[float], ab_beta: Optional[float], akl_mu: float) -> Tensor:
    """Row divergence between p = exp(log_p) (teacher) and q = exp(log_q) (student), summed
    over entries finite in both (the other entries contribute 0)."""
    shared = torch.isfinite(log_p) & torch.isfinite(log_q)
    if divergence == "akl":
        forward_weight, reverse_weight = _adaptive_kl_weights(log_p, log_q, shared, akl_mu)
    # Masked entries get harmless stand-ins so that no inf reaches a product or its gradient.
    log_p = torch.where(shared, log_p, torch.zeros_like(log_p))
    log_q = torch.where(shared, log_q, torch.zeros_like(log_q))
    p, q = log_p.exp(), log_q.exp()
    if divergence == "forward_kl":
        terms = p * (log_p - log_q)
    elif divergence == "reverse_kl":
        terms = q * (log_q - log_p)
    elif divergence == "jsd":
        log_m = _log_mixture(log_p, log_q, beta)
        terms = beta * p * (log_p - log_m) + (1 - beta) * q * (log_q - log_m)
    elif divergence == "skew_kl":
        terms = p * (log_p - _log_mixture(log_p, log_q, skew))
    elif divergence == "skew_reverse_kl":
        terms = q * (log_q - _log_mixture(log_p, log_q, 1 - skew))
    elif divergence == "tvd":
        terms = 0.5 * (p - q).abs()
    elif divergence == "ab":
        terms = _alpha_beta_terms(log_p, log_q, ab_alpha, ab_beta)
    elif divergence == "akl":
        terms = forward_weight * p * (log_p - log_q) + reverse_weight * q * (log_q - log_p)
    else:
        raise ValueError(f"unknown divergence {divergence!r}")
    return torch.where(shared, terms, torch.zeros_like(terms)).sum(-1)


def _standardize(z: Tensor) -> Tensor:
    """Logit standardisation (Sun et al., CVPR 2024): (z - mean) / (std + 1e-7) per row, unbiased
    std, over the row's finite entries (-inf stays -inf; std 0 below two entries)."""
    finite = torch.isfinite(z)
    count = finite.sum(-1, keepdim=True)
    mean = torch.where(finite, z, 0.0).sum(-1, keepdim=True) / count.clamp_min(1)
    centred = torch.where(finite, z - mean, 0.0)
    variance = (centred**2).sum(-1, keepdim=True) / (count - 1).clamp_min(1)
    # sqrt's gradient at 0 is inf: a constant row (variance 0) gets the subgradient 0 instead.
    std = variance.clamp_min(torch.finfo(z.dtype).tiny).sqrt()
    return torch.where(finite, centred / (std + 1e-7), z)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    ab_alpha: Optional[float] = None,
    ab_beta: Optional[float] = None,
    akl_mu: float = 0.5,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    scale_by_temperature: bool = True,
    num_items: Optional[int | Tensor] = None,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    standardize: bool = False,
) -> Tensor:
    """Hinton's distillation loss, ``alpha * T^2 * D(softmax(t/T), softmax(s/T)) +
    (1 - alpha) * CE(s, y)`` per row; see :func:`kdkernels.kd_loss` for the full semantics."""
    vocab = student_logits.shape[-1]
    lead_shape = student_logits.shape[:-1]
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    s = student_logits.reshape(-1, vocab).to(dtype)
    t = teacher_logits.reshape(-1, vocab).to(dtype)
    soft_s, soft_t = logit_scale * s, logit_scale * t
    if softcap is not None:  # -inf (masked) entries stay -inf
        soft_s = torch.where(soft_s == -math.inf, soft_s, softcap * torch.tanh(soft_s / softcap))
        soft_t = torch.where(soft_t == -math.inf, soft_t, softcap * torch.tanh(soft_t / softcap))
    if standardize:
        soft_s, soft_t = _standardize(soft_s), _standardize(soft_t)
    log_q = F.log_softmax(soft_s / temperature, dim=-1)
    log_p = F.log_softmax(soft_t / temperature, dim=-1)
    soft = _divergence_rows(log_p, log_q, divergence, beta, skew, ab_alpha, ab_beta, akl_mu)
    return _combine(soft, s, target, lead_shape, temperature=temperature, alpha=alpha, reduction=reduction,
                    ignore_index=ignore_index, scale_by_temperature=scale_by_temperature, num_items=num_items)


def _combine(soft: Tensor, s: Tensor, target: Optional[Tensor], lead_shape: torch.Size, *, temperature: float,
             alpha: float, reduction: str, ignore_index: int, scale_by_temperature: bool,
             num_items: Optional[int | Tensor]) -> Tensor:
    """The loss from the row divergences `soft` and the student logits `s` [N, V]: the soft term
    (times T^2), the CE term with target, and the reduction."""
    if scale_by_temperature:
        soft = soft * temperature**2
    if target is None:
        rows = soft
        counted = torch.ones_like(rows, dtype=torch.bool)
    else:
        y = target.reshape(-1).long()
        counted = y != ignore_index
        ce = F.cross_entropy(s, y, ignore_index=ignore_index, reduction="none")
        rows = torch.where(counted, alpha * soft + (1 - alpha) * ce, torch.zeros_like(soft))
    if reduction == "none":
        return rows.reshape(lead_shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        denominator = num_items if num_items is not None else counted.sum().clamp_min(1)
        return total / denominator
    raise ValueError(f"unknown reduction {reduction!r}")


def topk_kd_loss(
    student_logits: Tensor,
    teacher_topk_indices: Tensor,
    teacher_topk_logprobs: Tensor,
    target: Optional[Tensor] = None,
    *,
    tail: str = "renormalize",
    temperature: float = 1.0,
    alpha: float = 0.5,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    ab_alpha: Optional[float] = None,
    ab_beta: Optional[float] = None,
    akl_mu: float = 0.5,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    scale_by_temperature: bool = True,
    num_items: Optional[int | Tensor] = None,
) -> Tensor:
    """KD against a teacher stored as its top-k log-probabilities: the divergence between the
    teacher and the student over k + 1 categories, the k ids and the rest of the vocabulary; see
    :func:`kdkernels.topk_kd_loss`."""
    vocab, k = student_logits.shape[-1], teacher_topk_indices.shape[-1]
    lead_shape = student_logits.shape[:-1]
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    s = student_logits.reshape(-1, vocab).to(dtype)
    ids = teacher_topk_indices.reshape(-1, k).long()
    teacher_logprobs = teacher_topk_logprobs.reshape(-1, k).to(dtype)
    log_q = F.log_softmax(s / temperature, dim=-1)
    rest = torch.ones_like(log_q, dtype=torch.bool).scatter(-1, ids, False) & (log_q > -math.inf)
    has_rest = rest.any(-1, keepdim=True)
    # The student's mass outside the k ids (a row with none gets -inf, and no NaN in its gradient).
    log_q_rest = log_q.masked_fill(~rest, -math.inf).masked_fill(~has_rest, 0.0).logsumexp(-1, keepdim=True)
    log_q_rest = log_q_rest.masked_fill(~has_rest, -math.inf)
    if tail == "bucket":
        mass = teacher_logprobs.exp().sum(-1, keepdim=True)
        log_p_rest = torch.log1p(-mass.clamp(max=1.0))
    elif tail == "renormalize":
        log_p_rest = torch.full_like(teacher_logprobs[:, :1], -math.inf)
    else:
        raise ValueError(f"unknown tail {tail!r}")
    log_p = F.log_softmax(torch.cat([teacher_logprobs, log_p_rest], -1) / temperature, dim=-1)
    log_q = torch.cat([log_q.gather(-1, ids), log_q_rest], -1)
    soft = _divergence_rows(log_p, log_q, divergence, beta, skew, ab_alpha, ab_beta, akl_mu)
    return _combine(soft, s, target, lead_shape, temperature=temperature, alpha=alpha, reduction=reduction,
                    ignore_index=ignore_index, scale_by_temperature=scale_by_temperature, num_items=num_items)


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    ignore_index: int = -100,
) -> Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): ``T^2 * (alpha * TCKD + beta * NCKD)`` per row,
    averaged over the rows whose target is not ignore_index; see :func:`kdkernels.dkd_loss`."""
    vocab = student_logits.shape[-1]
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    a = student_logits.reshape(-1, vocab).to(dtype) / temperature
    b = teacher_logits.reshape(-1, vocab).to(dtype) / temperature
    y = target.reshape(-1).long()
    counted = y != ignore_index
    is_target = F.one_hot(torch.where(counted, y, torch.zeros_like(y)), vocab).bool()
    rest_a, rest_b = a.masked_fill(is_target, -math.inf), b.masked_fill(is_target, -math.inf)
    # The binary [p_y, 1 - p_y], with log(1 - p_y) from the sum over the other classes.
    log_q_y = (a - a.logsumexp(-1, keepdim=True)).masked_fill(~is_target, 0).sum(-1)
    log_p_y = (b - b.logsumexp(-1, keepdim=True)).masked_fill(~is_target, 0).sum(-1)
    log_q_rest = rest_a.logsumexp(-1) - a.logsumexp(-1)
    log_p_rest = rest_b.logsumexp(-1) - b.logsumexp(-1)
    tckd = log_p_y.exp() * (log_p_y - log_q_y) + log_p_rest.exp() * (log_p_rest - log_q_rest)
    # The other classes renormalised (the target's -inf stand-in replaced before any product).
    log_q_hat = torch.where(is_target, 0.0, F.log_softmax(rest_a, -1))
    log_p_hat = torch.where(is_target, 0.0, F.log_softmax(rest_b, -1))
    nckd = torch.where(is_target, 0.0, log_p_hat.exp() * (log_p_hat - log_q_hat)).sum(-1)
    rows = torch.where(counted, temperature**2 * (alpha * tckd + beta * nckd), 0.0)
    return rows.sum() / counted.sum().clamp_min(1)


def _pearson(a: Tensor, b: Tensor, eps: float) -> Tensor:
    """Pearson correlation of the rows of a and b, as torchdistill's DISTLoss computes it:
    cosine of the centred rows, with eps added to the product of the norms."""
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    eps: float = 1e-8,
) -> Tensor:
    """DIST (Huang et al., NeurIPS 2022): with y = softmax(z / T) of [N, C] logits,
    ``T^2 * (beta * (1 - mean_i pearson(y_s[i], y_t[i])) + gamma * (1 - mean_j pearson(y_s[:, j], y_t[:, j])))``;
    see :func:`kdkernels.dist_loss`."""
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    y_s = torch.softmax(student_logits.to(dtype) / temperature, dim=-1)
    y_t = torch.softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    inter = 1 - _pearson(y_s, y_t, eps).mean()
    intra = 1 - _pearson(y_s.T, y_t.T, eps).mean()
    return temperature**2 * (beta * inter + gamma * intra)


def _features(x: Tensor) -> Tensor:
    """[N, ...] features as [N, D] in the accumulation dtype (fp32, or fp64 for fp64 inputs)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.reshape(x.shape[0], -1).to(dtype)


def pairwise_distance(x: Tensor, *, squared: bool = False, eps: float = 1e-12) -> Tensor:
    """Euclidean distances between the rows of [N, ...] features as Park et al.'s RKD code
    computes them: ``|x_i|^2 + |x_j|^2 - 2 x_i.x_j`` clamped below at eps, its square root unless
    squared, and a zero diagonal. In the input dtype."""
    e = _features(x)
    e_square = e.pow(2).sum(dim=1)
    prod = e @ e.t()
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps)
    if not squared:
        res = res.sqrt()
    res = res.clone()
    res[range(len(e)), range(len(e))] = 0
    return res.to(x.dtype)


def gram(x: Tensor, *, normalize: Optional[str] = None, eps: float = 1e-12) -> Tensor:
    """The Gram matrix ``x x^T`` of [N, ...] features flattened from dim 1; "rows" L2-normalises
    its rows (Tung & Mori's similarity matrix), "cosine" L2-normalises the features first (cosine
    similarities), both as ``F.normalize(., eps=eps)``. In the input dtype."""
    e = _features(x)
    if normalize == "cosine":
        e = F.normalize(e, dim=1, eps=eps)
    g = e @ e.t()
    if normalize == "rows":
        g = F.normalize(g, dim=1, eps=eps)
    return g.to(x.dtype)


def rkd_distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Distance-wise RKD (Park et al., CVPR 2019), as the authors' code: pairwise distances of
    each side divided by the mean of its positive entries, smooth-L1 (beta 1) averaged over all
    N x N pairs; the teacher side without grad."""
    with torch.no_grad():
        t_d = pairwise_distance(_features(teacher))
        t_d = t_d / t_d[t_d > 0].mean()
    d = pairwise_distance(_features(student))
    d = d / d[d > 0].mean()
    return F.smooth_l1_loss(d, t_d, reduction="mean")


def rkd_angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Angle-wise RKD (Park et al., CVPR 2019), as the authors' code: the cosine of the angle
    at every anchor i between every j and k, ``<normalize(x_j - x_i), normalize(x_k - x_i)>``
    (an [N, N, N] tensor built from [N, N, D] differences), smooth-L1 averaged over all N^3
    triplets; the teacher side without grad."""
    with torch.no_grad():
        t = _features(teacher)
        td = t.unsqueeze(0) - t.unsqueeze(1)
        norm_td = F.normalize(td, p=2, dim=2)
        t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
    s = _features(student)
    sd = s.unsqueeze(0) - s.unsqueeze(1)
    norm_sd = F.normalize(sd, p=2, dim=2)
    s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
    return F.smooth_l1_loss(s_angle, t_angle, reduction="mean")


def similarity_preserving_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Similarity-preserving KD (Tung & Mori, ICCV 2019): with G = row-L2-normalised ``x x^T`` of
    the flattened features, ``||G_t - G_s||_F^2 / N^2``."""
    g_s = F.normalize(_features(student) @ _features(student).t())
    g_t = F.normalize(_features(teacher) @ _features(teacher).t())
    g_diff = g_t - g_s
    return (g_diff * g_diff).sum() / (student.shape[0] ** 2)


def _pkt_probabilities(x: Tensor, eps: float) -> Tensor:
    x = x / (torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)) + eps)
    similarity = (torch.mm(x, x.transpose(0, 1)) + 1.0) / 2.0
    return similarity / torch.sum(similarity, dim=1, keepdim=True)


def pkt_loss(student: Tensor, teacher: Tensor, *, eps: float = 1e-7) -> Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018), as the authors' code:
    cosine similarities (features divided by norm + eps) mapped to [0, 1] by (c + 1) / 2, rows
    normalised to conditional probabilities, and ``mean(p_t * log((p_t + eps) / (p_s + eps)))``
    over all N x N entries."""
    p_s = _pkt_probabilities(_features(student), eps)
    p_t = _pkt_probabilities(_features(teacher), eps)
    return torch.mean(p_t * torch.log((p_t + eps) / (p_s + eps)))


def _attention_map(x: Tensor, p: float) -> Tensor:
    """Zagoruyko & Komodakis' attention map: |x|^p averaged over the channels, flattened and
    L2-normalised per sample."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return F.normalize(x.to(dtype).abs().pow(p).mean(1).view(x.size(0), -1))


def attention_transfer_loss(student_feats: list[Tensor], teacher_feats: list[Tensor], *, p: float = 2.0) -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017), as the authors' code: for every pair
    of [N, C, *spatial] maps, ``(at(s) - at(t)).pow(2).mean()`` with at the normalised
    channel-pooled |x|^p map, summed over the pairs."""
    return sum((_attention_map(s, p) - _attention_map(t, p)).pow(2).mean()
               for s, t in zip(student_feats, teacher_feats))


def hint_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """FitNets' hint loss as usually implemented: the mean squared error between the (adapted)
    student features and the teacher's hint, in fp32 (fp64 for fp64 inputs)."""
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    return F.mse_loss(student.to(dtype), teacher.to(dtype))


def _reduced(rows: Tensor, reduction: str, count: Optional[Tensor] = None) -> Tensor:
    """"none": the rows; "sum"; "mean": the sum over `count` rows (all by default), at least 1."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / (torch.tensor(rows.numel()) if count is None else count).clamp_min(1)
    raise ValueError(f"unknown reduction {reduction!r}")


def pixelwise_kd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor] = None, *,
                      temperature: float = 1.0, alpha: float = 0.5, reduction: str = "batchmean",
                      ignore_index: int = -100) -> Tensor:
    """Pixel-wise distillation (Liu et al., CVPR 2019) over dim 1 of [B, C, *spatial] logits:
    ``T^2 KL(p_t || p_s)`` per pixel, with target ``alpha`` times that plus ``(1 - alpha)`` times
    the pixel's cross-entropy (pixels at ignore_index in neither), summed over the pixels and,
    for "batchmean", divided by the number counted."""
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    s, t = student_logits.to(dtype), teacher_logits.to(dtype)
    log_q = F.log_softmax(s / temperature, dim=1)
    log_p = F.log_softmax(t / temperature, dim=1)
    kl = temperature**2 * (log_p.exp() * (log_p - log_q)).sum(1)
    if target is None:
        pixels, counted = kl, torch.ones_like(kl, dtype=torch.bool)
    else:
        counted = target != ignore_index
        ce = F.cross_entropy(s, target.long(), ignore_index=ignore_index, reduction="none")
        pixels = torch.where(counted, alpha * kl + (1 - alpha) * ce, 0.0)
    return _reduced(pixels, "mean" if reduction == "batchmean" else reduction, counted.sum())


def class_weighted_soft_ce(student_logits: Tensor, teacher_logits: Tensor, *, class_weights, temperature: float = 1.0,
                           reduction: str = "mean") -> Tensor:
    """Chen et al.'s (NeurIPS 2017) soft-label loss, ``-sum_c w_c P_t,c log P_s,c`` per row of
    [..., C] logits with ``P = softmax(z / T)``, averaged over the rows."""
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    w = torch.as_tensor(class_weights, dtype=dtype)
    p_t = F.softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    log_p_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    return _reduced(-(w * p_t * log_p_s).sum(-1), reduction)


def bounded_regression_loss(student_reg: Tensor, teacher_reg: Tensor, target_reg: Tensor, *, margin: float = 0.0,
                            reduction: str = "mean") -> Tensor:
    """Chen et al.'s (NeurIPS 2017) teacher-bounded regression loss per box:
    ``||R_s - y||^2`` if ``||R_s - y||^2 + m > ||R_t - y||^2``, else 0."""
    dtype = torch.float64 if student_reg.dtype == torch.float64 else torch.float32
    y = target_reg.to(dtype)
    student_distance = ((student_reg.to(dtype) - y) ** 2).sum(-1)
    teacher_distance = ((teacher_reg.to(dtype) - y) ** 2).sum(-1)
    bounded = student_distance + margin > teacher_distance
    return _reduced(student_distance * bounded, reduction)


def localization_distillation_loss(student_bins: Tensor, teacher_bins: Tensor, *, temperature: float = 10.0,
                                   weight: Optional[Tensor] = None, reduction: str = "mean") -> Tensor:
    """Localization distillation (Zheng et al., CVPR 2022) as the authors' code computes it: the
    edges' bins as rows [-1, n + 1], ``kl_div(log_softmax(s / T), softmax(t / T)).mean(1) * T * T``
    per edge (KnowledgeDistillationKLDivLoss), times the weight, then mmdet's reduction (mean over
    the edges, or sum). Gradients reach the teacher too (the authors detach it)."""
    dtype = torch.float64 if student_bins.dtype == torch.float64 else torch.float32
    bins = student_bins.shape[-1]
    pred = student_bins.reshape(-1, bins).to(dtype)
    soft_label = teacher_bins.reshape(-1, bins).to(dtype)
    target = F.softmax(soft_label / temperature, dim=1)
    loss = F.kl_div(F.log_softmax(pred / temperature, dim=1), target, reduction="none").mean(1) * (
        temperature * temperature)
    loss = loss.reshape(student_bins.shape[:-1])
    if weight is not None:
        loss = loss * weight
    return _reduced(loss, reduction)


def _renormalised_log(a: Tensor) -> Tensor:
    """log(a / sum(a)) over the last dim: -inf where a is 0, and no gradient to the zero entries
    (the softmax that produced them would pass none back)."""
    positive = a > 0
    total = torch.where(positive, a, 0.0).sum(-1, keepdim=True)
    return torch.where(positive, torch.where(positive, a, 1.0).log() - total.log(), -math.inf)


def attention_distribution_loss(student_attn: Tensor, teacher_attn: Tensor, *, attention_mask: Optional[Tensor] = None,
                                inputs_are: str = "probs", reduction: str = "mean") -> Tensor:
    """MobileBERT's attention transfer (Sun et al., ACL 2020): ``KL(a_t || a_s)`` of every query's
    attention over the keys of [B, heads, Q, K] inputs, averaged over the samples, heads and
    queries. Probabilities are renormalised; zero ones get no gradient. With attention_mask [B, K]
    (self-attention), padded keys leave both distributions and padded queries are not counted; a
    sample without tokens keeps its keys and counts no query."""
    dtype = torch.float64 if student_attn.dtype == torch.float64 else torch.float32
    s, t = student_attn.to(dtype), teacher_attn.to(dtype)
    batch, heads, queries, keys = s.shape
    tokens = torch.ones(batch, keys, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    visible = (tokens | ~tokens.any(-1, keepdim=True))[:, None, None, :]
    if inputs_are == "logits":
        log_a_s = F.log_softmax(s.masked_fill(~visible, -math.inf), dim=-1)
        log_a_t = F.log_softmax(t.masked_fill(~visible, -math.inf), dim=-1)
    else:
        log_a_s, log_a_t = (_renormalised_log(a * visible) for a in (s, t))
    # Keys the teacher gives no attention contribute a_t log(a_t / a_s) = 0; stand-ins keep the
    # infinities out of the products and their gradients.
    attended = log_a_t > -math.inf
    log_a_t = torch.where(attended, log_a_t, 0.0)
    log_a_s = torch.where(attended, log_a_s, 0.0)
    kl = torch.where(attended, log_a_t.exp() * (log_a_t - log_a_s), 0.0).sum(-1)
    counted = (tokens[:, None, :] if attention_mask is not None else torch.ones_like(tokens[:, None, :1])).expand(
        batch, heads, queries)
    return _reduced(torch.where(counted, kl, 0.0), reduction, counted.sum())

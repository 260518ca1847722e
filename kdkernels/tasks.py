"""Task-specific distillation losses for segmentation, detection and transformer attention: thin
wrappers over the fused kernels (mainly :func:`kdkernels.kd_loss`) with the normalisations of the
papers that introduced them, and their module forms."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import torch

from kdkernels.functional import _check_floats, _check_number, _check_temperature, kd_loss
from kdkernels.nn import _KeywordLoss
from kdkernels.ops.backends import accumulation_dtype

Tensor = torch.Tensor

TASK_REDUCTIONS = ("mean", "sum", "none")
ATTENTION_INPUTS = ("probs", "logits")


def _check_reduction(reduction: str) -> None:
    if reduction not in TASK_REDUCTIONS:
        raise ValueError(f"reduction must be one of {TASK_REDUCTIONS}, got {reduction!r}")


def _check_pair(student_name: str, student: Tensor, teacher_name: str, teacher: Tensor, dims: str,
                reduction: str) -> None:
    """Float tensors of one shape, and a known reduction."""
    _check_floats({student_name: student, teacher_name: teacher}, dims)
    if teacher.shape != student.shape:
        raise ValueError(f"{teacher_name} shape {tuple(teacher.shape)} must equal {student_name} shape "
                         f"{tuple(student.shape)}")
    _check_reduction(reduction)


def _reduce(rows: Tensor, reduction: str, count: Optional[Union[int, Tensor]] = None) -> Tensor:
    """Per-row losses as they are ("none"), summed, or summed over `count` rows (default: all; at
    least 1, so that no rows give 0)."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if count is None:
        count = rows.numel()
    return total / (count.clamp_min(1) if isinstance(count, Tensor) else max(count, 1))


def pixelwise_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    divergence: str = "forward_kl",
    reduction: str = "batchmean",
    ignore_index: int = -100,
    backend: str = "auto",
    **kd_options: Any,
) -> Tensor:
    """Pixel-wise distillation for semantic segmentation (Liu et al., CVPR 2019, "Structured
    Knowledge Distillation for Semantic Segmentation", its pixel-wise term): :func:`kd_loss`
    between the class distributions of every pixel of ``[B, C, *spatial]`` logits (any number of
    spatial dims, none for ``[B, C]``), taken over the channel dim.

    ``target`` ``[B, *spatial]`` adds ``(1 - alpha) * CE`` as in kd_loss; pixels whose target is
    ``ignore_index`` (e.g. 255 for the void label) count in neither term. ``reduction``:
    ``"batchmean"`` divides the sum over pixels by the number of counted pixels (B times the
    spatial size, less the ignored ones): a mean per pixel; ``"sum"``; ``"none"``, the
    ``[B, *spatial]`` map. The authors' code sums the cross-entropy against the teacher's
    probabilities over the batch and divides it by H * W: ``num_items=H * W`` gives that
    normaliser (their cross-entropy is this KL plus the teacher's entropy, a constant). The other
    keywords of kd_loss (``beta``, ``scale_by_temperature``, ``num_items``, ...) pass through.
    The channel dim is moved last as a view; kd_loss gathers the rows it reads, without a copy for
    ``channels_last`` inputs. Gradients flow to both logits.
    """
    _check_floats({"student_logits": student_logits, "teacher_logits": teacher_logits}, "[B, C, *spatial]")
    if student_logits.dim() < 2:
        raise ValueError(f"student_logits must be [B, C, *spatial] logits (classes along dim 1), got shape "
                         f"{tuple(student_logits.shape)}")
    if (teacher_logits.dim() != student_logits.dim() or teacher_logits.shape[0] != student_logits.shape[0]
            or teacher_logits.shape[2:] != student_logits.shape[2:]):
        raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} must match student_logits shape "
                         f"{tuple(student_logits.shape)} in its batch and spatial dims")
    return kd_loss(student_logits.movedim(1, -1), teacher_logits.movedim(1, -1), target, temperature=temperature,
                   alpha=alpha, divergence=divergence, reduction=reduction, ignore_index=ignore_index,
                   backend=backend, **kd_options)


def _class_weights(class_weights: Union[Tensor, Sequence[float]], classes: int, like: Tensor) -> Tensor:
    """The checked class weights as a [C] tensor in the accumulation dtype of `like`."""
    dtype = accumulation_dtype(like.dtype)
    try:
        weights = torch.as_tensor(class_weights, dtype=dtype, device=like.device)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"class_weights must be a tensor or a sequence of numbers, got "
                        f"{type(class_weights).__name__}") from error
    if weights.shape != (classes,):
        raise ValueError(f"class_weights must hold one weight per class, shape ({classes},) (the last dimension of "
                         f"student_logits), got shape {tuple(weights.shape)}")
    if bool(~torch.isfinite(weights).all() | (weights < 0).any() | ~(weights > 0).any()):
        raise ValueError(f"class_weights must be finite and >= 0 with at least one > 0, got {weights.tolist()}")
    return weights


def class_weighted_soft_ce(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    class_weights: Union[Tensor, Sequence[float]],
    temperature: float = 1.0,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """The soft-label term of Chen et al. (NeurIPS 2017, "Learning Efficient Object Detection
    Models with Knowledge Distillation"): per row of ``[..., C]`` class logits (RoIs or anchors),
    ``L_soft = -sum_c w_c P_t,c log P_s,c`` with ``P = softmax(logits / T)``, a cross-entropy
    against the teacher's probabilities whose class weights ``w`` counter the imbalance of
    background and objects (the paper: 1.5 for the background class, 1 for the others). No
    ``T^2`` factor, as the paper writes it. ``class_weights``: ``[C]``, finite, ``>= 0``, at least
    one ``> 0``. ``reduction``: ``"mean"`` over rows, ``"sum"`` or ``"none"`` (``[...]``).

    Weighted, it is no KL divergence, but one scaled and shifted by terms of the teacher alone: with
    ``p' = softmax(t / T + log w)`` (the teacher reweighted and renormalised) and
    ``S = sum_c w_c P_t,c``, ``L_soft = S * KL(p' || P_s) + S log S - sum_c xlogy(w_c P_t,c, w_c P_t,c)``.
    The KL and the student's gradient ``S (P_s - p') / T`` come from kd_loss's kernel; S and the
    rest from the teacher's log-softmax. The kernel reads the shifted teacher logits in fp32 (fp64
    for fp64 inputs), so half-precision inputs are upcast. Gradients flow to both logits; the loss
    is fp32 (fp64 for fp64 inputs).
    """
    _check_pair("student_logits", student_logits, "teacher_logits", teacher_logits, "[..., C]", reduction)
    temperature = _check_temperature(temperature)
    weights = _class_weights(class_weights, student_logits.shape[-1], student_logits)
    dtype = weights.dtype
    teacher = teacher_logits.to(dtype)
    log_p = torch.log_softmax(teacher / temperature, dim=-1)
    p = log_p.exp()
    weighted = weights * p
    mass = weighted.sum(-1)
    # sum_c xlogy(w p, w p) as sum w p log p + sum p xlogy(w, w): finite gradients where w or p is 0.
    weighted_log = (weighted * torch.where(p > 0, log_p, 0.0) + p * torch.special.xlogy(weights, weights)).sum(-1)
    rest = torch.special.xlogy(mass, mass) - weighted_log
    kl = kd_loss(student_logits.to(dtype), teacher + temperature * weights.log(), temperature=temperature,
                 divergence="forward_kl", reduction="none", scale_by_temperature=False, backend=backend)
    return _reduce(mass * kl + rest, reduction)


def bounded_regression_loss(
    student_reg: Tensor,
    teacher_reg: Tensor,
    target_reg: Tensor,
    *,
    margin: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """The teacher-bounded regression loss of Chen et al. (NeurIPS 2017, "Learning Efficient
    Object Detection Models with Knowledge Distillation"): per box (the last dim: 4 offsets, or
    any number), with the squared L2 distances ``d_s = ||R_s - y||^2`` and ``d_t = ||R_t - y||^2``
    to the ground truth y, ``L_b = d_s`` if ``d_s + margin > d_t``, else 0, as the paper defines
    it: the teacher's error is an upper bound, and a student already better than the teacher by
    ``margin`` gets no regression signal from it. The paper adds it to the student's smooth-L1
    loss with a weight (0.5). ``reduction``: ``"mean"`` over boxes, ``"sum"`` or ``"none"``
    (``[...]``). Computed in fp32 (fp64 for fp64 inputs); the gradient is ``2 (R_s - y)`` on the
    active boxes, and none reaches the teacher.
    """
    named = {"student_reg": student_reg, "teacher_reg": teacher_reg, "target_reg": target_reg}
    _check_floats(named, "[..., D]")
    for name, value in named.items():
        if value.shape != student_reg.shape:
            raise ValueError(f"{name} shape {tuple(value.shape)} must equal student_reg shape "
                             f"{tuple(student_reg.shape)} (one [..., D] regression per box)")
    margin = _check_number("margin", margin, 0.0, math.inf, open_high=True)
    _check_reduction(reduction)
    dtype = accumulation_dtype(student_reg.dtype)
    target = target_reg.to(dtype)
    student_error = (student_reg.to(dtype) - target).square().sum(-1)
    teacher_error = (teacher_reg.to(dtype) - target).square().sum(-1)
    rows = torch.where(student_error + margin > teacher_error, student_error, 0.0)
    return _reduce(rows, reduction)


def localization_distillation_loss(
    student_bins: Tensor,
    teacher_bins: Tensor,
    *,
    temperature: float = 10.0,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """Localization distillation (Zheng et al., CVPR 2022, "Localization Distillation for Dense
    Object Detection"): each box edge is a distribution over n + 1 discrete offsets (the general
    distribution of GFL), and the student's edges learn the teacher's. The last dim of
    ``[..., n + 1]`` logits holds one edge's bins (view a head's ``[N, 4 (n + 1)]`` output as
    ``[N, 4, n + 1]``). Per edge, as the authors' ``KnowledgeDistillationKLDivLoss``:
    ``T^2 * KL(softmax(t / T) || softmax(s / T)) / (n + 1)`` (its ``kl_div(...).mean(1)``
    averages the KL's terms over the bins), at the paper's ``T = 10`` by default.

    ``weight``, broadcastable to the leading shape ``[...]`` (``w[:, None]`` gives one weight per
    box of ``[N, 4, n + 1]`` bins), multiplies each edge. ``reduction``: ``"mean"`` (the weighted
    sum over the number of edges, mmdet's mean), ``"sum"`` or ``"none"`` (``[...]``). The authors'
    LD head weights each positive box by its largest (detached) classification score and takes
    ``0.25 * sum / 4`` (loss weight 0.25, avg_factor 4):
    ``0.25 * localization_distillation_loss(s, t, weight=score[:, None], reduction="sum") / 4``.
    The KL comes from kd_loss's kernel; gradients flow to both inputs (the authors detach the
    teacher); the loss is fp32 (fp64 for fp64 inputs).
    """
    _check_pair("student_bins", student_bins, "teacher_bins", teacher_bins, "[..., n + 1]", reduction)
    temperature = _check_temperature(temperature)
    edges = student_bins.shape[:-1]
    if weight is not None:
        if not isinstance(weight, Tensor) or not weight.is_floating_point():
            raise TypeError(f"weight must be a floating tensor or None, got "
                            f"{getattr(weight, 'dtype', type(weight).__name__)}")
        try:
            broadcast = torch.broadcast_shapes(weight.shape, edges)
        except RuntimeError:
            broadcast = None
        if broadcast != edges:
            raise ValueError(f"weight must broadcast to the leading shape of student_bins {tuple(edges)} (one weight "
                             f"per edge), got shape {tuple(weight.shape)}")
    rows = kd_loss(student_bins, teacher_bins, temperature=temperature, divergence="forward_kl", reduction="none",
                   backend=backend) / student_bins.shape[-1]
    if weight is not None:
        rows = rows * weight.to(rows.dtype)
    return _reduce(rows, reduction)


def _log_probabilities(probs: Tensor) -> Tensor:
    """log of probabilities in the accumulation dtype: -inf where 0, with a zero (not NaN)
    gradient there."""
    x = probs.to(accumulation_dtype(probs.dtype))
    zero = x == 0
    return torch.where(zero, -math.inf, torch.where(zero, 1.0, x).log())


def _key_mask(attention_mask: Tensor, attn: Tensor) -> Tensor:
    """The checked [B, K] padding mask as bool (True: a token)."""
    batch, _, queries, keys = attn.shape
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask must be a tensor or None, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != (batch, keys):
        raise ValueError(f"attention_mask must be [B, K] = ({batch}, {keys}) (1 for tokens, 0 for padding), got shape "
                         f"{tuple(attention_mask.shape)}")
    if queries != keys:
        raise ValueError(f"attention_mask masks self-attention, whose queries are its keys (Q = K), got Q = {queries} "
                         f"and K = {keys}")
    if attention_mask.device != attn.device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but student_attn is on {attn.device}")
    return attention_mask != 0


def attention_distribution_loss(
    student_attn: Tensor,
    teacher_attn: Tensor,
    *,
    attention_mask: Optional[Tensor] = None,
    inputs_are: str = "probs",
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """Attention transfer of MobileBERT (Sun et al., ACL 2020, "MobileBERT: a Compact
    Task-Agnostic BERT for Resource-Limited Devices"): the KL divergence from the teacher's
    attention distribution of each query over the keys to the student's,
    ``L_AT = 1 / (T A) sum_t sum_a KL(a_t^tr || a_t^st)`` over the A heads and T positions (and the
    batch).

    Inputs ``[B, heads, Q, K]``: attention probabilities (``inputs_are="probs"``, e.g. a Hugging
    Face model's ``output_attentions``; each row is renormalised to sum 1, as stored
    probabilities rarely sum exactly to 1) or pre-softmax scores (``"logits"``). Probabilities are
    logged in fp32 (fp64 for fp64 inputs): 0 becomes -inf, and kd_loss drops the -inf entries
    from the sum, so keys that are 0 in both (padding, a causal mask) or in the teacher contribute
    0, exactly, and one that is 0 in the student only is dropped as well (its KL term would be
    infinite); zero probabilities get no gradient (the softmax that made them passes none back).
    ``attention_mask`` ``[B, K]`` (1 for tokens, 0 for padding; self-attention, Q = K): padded
    keys leave both distributions, padded query rows are not counted, and a sample without tokens
    contributes nothing. ``reduction``: ``"mean"`` over the counted (sample, head, query)
    rows, ``"sum"``, or ``"none"`` (``[B, heads, Q]``, 0 at padded queries). Gradients flow to
    both inputs; the loss is fp32 (fp64 for fp64 inputs).
    """
    _check_pair("student_attn", student_attn, "teacher_attn", teacher_attn, "[B, heads, Q, K]", reduction)
    if student_attn.dim() != 4:
        raise ValueError(f"student_attn must be [B, heads, Q, K] attention, got shape {tuple(student_attn.shape)}")
    if inputs_are not in ATTENTION_INPUTS:
        raise ValueError(f"inputs_are must be one of {ATTENTION_INPUTS}, got {inputs_are!r}")
    tokens = None if attention_mask is None else _key_mask(attention_mask, student_attn)
    student, teacher = student_attn, teacher_attn
    if inputs_are == "probs":
        student, teacher = _log_probabilities(student), _log_probabilities(teacher)
    if tokens is not None:
        # A sample without tokens keeps its keys (finite rows), and none of its rows counts.
        padding = ~(tokens | ~tokens.any(-1, keepdim=True))[:, None, None, :]
        student, teacher = student.masked_fill(padding, -math.inf), teacher.masked_fill(padding, -math.inf)
    rows = kd_loss(student, teacher, temperature=1.0, divergence="forward_kl", reduction="none", backend=backend)
    if tokens is None:
        return _reduce(rows, reduction)
    counted = tokens[:, None, :].expand(rows.shape)
    return _reduce(torch.where(counted, rows, 0.0), reduction, counted.sum())


class PixelwiseKDLoss(_KeywordLoss):
    """Module form of :func:`pixelwise_kd_loss`, with its keywords (those of kd_loss) fixed at
    construction: ``forward(student_logits, teacher_logits, target=None)``."""

    function = staticmethod(kd_loss)  # the keywords pixelwise_kd_loss takes and passes on

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor] = None) -> Tensor:
        return pixelwise_kd_loss(student_logits, teacher_logits, target, **self.options)


class ClassWeightedSoftCELoss(_KeywordLoss):
    """Module form of :func:`class_weighted_soft_ce`; ``class_weights`` is a buffer (it follows the
    module's device), the other keywords are fixed at construction:
    ``forward(student_logits, teacher_logits)``."""

    function = staticmethod(class_weighted_soft_ce)

    def __init__(self, class_weights: Union[Tensor, Sequence[float]], **options: Any) -> None:
        super().__init__(**options)
        self.register_buffer("class_weights", torch.as_tensor(class_weights, dtype=torch.float32).clone(),
                             persistent=False)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return class_weighted_soft_ce(student_logits, teacher_logits, class_weights=self.class_weights,
                                      **self.options)


class BoundedRegressionLoss(_KeywordLoss):
    """Module form of :func:`bounded_regression_loss`, with its keywords fixed at construction:
    ``forward(student_reg, teacher_reg, target_reg)``."""

    function = staticmethod(bounded_regression_loss)

    def forward(self, student_reg: Tensor, teacher_reg: Tensor, target_reg: Tensor) -> Tensor:
        return bounded_regression_loss(student_reg, teacher_reg, target_reg, **self.options)


class LocalizationDistillationLoss(_KeywordLoss):
    """Module form of :func:`localization_distillation_loss`, with its keywords fixed at
    construction: ``forward(student_bins, teacher_bins, weight=None)``."""

    function = staticmethod(localization_distillation_loss)

    def forward(self, student_bins: Tensor, teacher_bins: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        return localization_distillation_loss(student_bins, teacher_bins, weight=weight, **self.options)


class AttentionDistributionLoss(_KeywordLoss):
    """Module form of :func:`attention_distribution_loss`, with its keywords fixed at construction:
    ``forward(student_attn, teacher_attn, attention_mask=None)``."""

    function = staticmethod(attention_distribution_loss)

    def forward(self, student_attn: Tensor, teacher_attn: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        return attention_distribution_loss(student_attn, teacher_attn, attention_mask=attention_mask, **self.options)

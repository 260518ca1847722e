"""Public functional API."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist

from kdkernels import reference
from kdkernels.ops import DIVERGENCES, kd_loss_rows, resolve_backend
from kdkernels.ops.backends import BACKENDS, accumulation_dtype
from kdkernels.ops.dist_loss import dist_loss_op
from kdkernels.ops.dkd_loss import dkd_loss_rows
from kdkernels.ops.feature import attention_transfer_loss as attention_transfer_op
from kdkernels.ops.feature import squared_error
from kdkernels.ops.fused_linear_kd_loss import default_chunk_rows
from kdkernels.ops.fused_linear_kd_loss import fused_linear_kd_loss as fused_linear_kd_loss_op
from kdkernels.ops.fused_linear_topk_kd_loss import fused_linear_topk_kd_loss as fused_linear_topk_kd_loss_op
from kdkernels.ops.relation import relation_loss, relation_matrix
from kdkernels.ops.topk_kd_loss import TRITON_MAX_K, topk_kd_loss_rows
from kdkernels.ops.vocab_parallel import WHOLE_ROW_DIVERGENCES, gather_blocks
from kdkernels.ops.vocab_parallel import group_name as vocab_parallel_group_name
from kdkernels.ops.vocab_parallel import vocab_parallel_fused_linear_kd_loss as vocab_parallel_fused_linear_kd_loss_op
from kdkernels.ops.vocab_parallel import vocab_parallel_kd_loss_rows

Tensor = torch.Tensor

REDUCTIONS = ("batchmean", "sum", "none")
VOCAB_PARALLEL_BACKENDS = ("cpu", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_floats(named: dict[str, Tensor], dims: str) -> None:
    """Each is a floating tensor with a last dimension >= 1, all of one dtype and device."""
    for name, value in named.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")
        if value.dim() < 1 or value.shape[-1] < 1:
            raise ValueError(f"{name} must have shape {dims} with a last dimension >= 1, got {tuple(value.shape)}")
    (first, reference_value), *others = named.items()
    for name, value in others:
        if value.dtype != reference_value.dtype:
            raise TypeError(f"{name} dtype {value.dtype} differs from {first} dtype {reference_value.dtype}")
        if value.device != reference_value.device:
            raise ValueError(f"{name} is on {value.device} but {first} is on {reference_value.device}")


def _shared_vocab(student_vocab: int, teacher_vocab: int, shared_vocab: Optional[int], what: str) -> int:
    """The vocabulary size to distil over: V of both, or the explicit shared prefix."""
    if shared_vocab is None:
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"the student's vocabulary has {student_vocab} entries ({what}) but the teacher's has "
                f"{teacher_vocab}; pass shared_vocab=N to distil over the first N entries of both (e.g. when one "
                "is padded)")
        return student_vocab
    if isinstance(shared_vocab, bool) or not isinstance(shared_vocab, int) or not (
            1 <= shared_vocab <= min(student_vocab, teacher_vocab)):
        raise ValueError(f"shared_vocab must be an int in [1, {min(student_vocab, teacher_vocab)}] (the smaller "
                         f"vocabulary), got {shared_vocab!r}")
    return shared_vocab


def _check_logits(student_logits: Tensor, teacher_logits: Tensor, shared_vocab: Optional[int]) -> int:
    """Checks the logits; returns the vocabulary size to distil over."""
    _check_floats({"student_logits": student_logits, "teacher_logits": teacher_logits}, "[..., V]")
    if teacher_logits.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} differs from student_logits shape "
            f"{tuple(student_logits.shape)} (same leading shape expected)")
    return _shared_vocab(student_logits.shape[-1], teacher_logits.shape[-1], shared_vocab, "last dimension")


def _check_target(target: Tensor, student_logits: Tensor, name: str = "student_logits") -> None:
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor or None, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must hold class indices as int64 (or int32), got {target.dtype}")
    if target.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal the leading shape of {name} "
            f"{tuple(student_logits.shape[:-1])}")
    if target.device != student_logits.device:
        raise ValueError(f"target is on {target.device} but {name} is on {student_logits.device}")


def _kernel_rows(logits: Tensor, vocab: int) -> Tensor:
    """[..., V] logits as the kernels take them: [N, V] with unit stride along V (a view when
    possible)."""
    rows = logits.reshape(-1, vocab)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _check_constant_teacher(teacher: Tensor, op: str, name: str = "teacher_logits") -> None:
    if teacher.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op} treats the teacher as a constant: pass {name}.detach()")


def _check_number(name: str, value: object, low: float, high: float, *, open_low: bool = False,
                  open_high: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    below = value <= low if open_low else value < low
    above = value >= high if open_high else value > high
    if math.isnan(value) or below or above:
        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value}")
    return value


def _check_temperature(temperature: float) -> float:
    return _check_number("temperature", temperature, 0.0, math.inf, open_low=True, open_high=True)


def _divergence_args(divergence: str, beta: float, skew: float, ab_alpha: Optional[float],
                     ab_beta: Optional[float], akl_mu: float) -> list[float]:
    """The checked values of the divergence's keywords, in its kernel order (DIVERGENCES)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {sorted(DIVERGENCES)}, got {divergence!r}")
    checks = {
        "beta": lambda: _check_number("beta", beta, 0.0, 1.0, open_low=True, open_high=True),
        "skew": lambda: _check_number("skew", skew, 0.0, 1.0, open_high=True),
        "ab_alpha": lambda: _check_ab("ab_alpha", ab_alpha),
        "ab_beta": lambda: _check_ab("ab_beta", ab_beta),
        "akl_mu": lambda: _check_number("akl_mu", akl_mu, 0.0, 1.0, open_low=True, open_high=True),
    }
    return [checks[keyword]() for keyword in DIVERGENCES[divergence].keywords]


def _check_ab(name: str, value: Optional[float]) -> float:
    if value is None:
        raise ValueError(f"divergence='ab' needs {name} (the alpha-beta divergence has no default order)")
    return _check_number(name, value, -math.inf, math.inf, open_low=True, open_high=True)


def _check_options(temperature: float, alpha: float, reduction: str,
                   num_items: Optional[Union[int, Tensor]]) -> tuple[float, float]:
    temperature = _check_temperature(temperature)
    alpha = _check_number("alpha", alpha, 0.0, 1.0)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if num_items is not None:
        if reduction != "batchmean":
            raise ValueError(f"num_items applies to reduction='batchmean' only, got reduction={reduction!r}")
        if isinstance(num_items, Tensor):
            if num_items.numel() != 1 or num_items.requires_grad:
                raise ValueError("num_items must be a number or a one-element tensor without grad, "
                                 f"got shape {tuple(num_items.shape)}")
        else:
            _check_number("num_items", num_items, 0.0, math.inf, open_low=True, open_high=True)
    return temperature, alpha


# The keywords that every logit-KD loss shares with its reference (reference.kd_loss,
# reference.topk_kd_loss); kd_loss and fused_linear_kd_loss add those on the teacher's logits.
_SOFT_KEYWORDS = ("temperature", "alpha", "divergence", "beta", "skew", "ab_alpha", "ab_beta", "akl_mu", "reduction",
                  "ignore_index", "scale_by_temperature", "num_items")
_KD_KEYWORDS = _SOFT_KEYWORDS + ("logit_scale", "softcap", "standardize")


def _kd_keywords(arguments: dict, names: tuple[str, ...] = _KD_KEYWORDS) -> dict:
    """The KD keywords among a function's arguments (its locals())."""
    return {name: arguments[name] for name in names}


@dataclasses.dataclass(frozen=True)
class _SoftOptions:
    """The checked keywords of a KD loss, as the kernels take them."""

    kernel_temperature: float  # T / logit_scale: softmax(c z / T) is softmax(z / (T / c))
    softcap: float  # 0: off; the kernels apply it to logit_scale * z
    standardize: bool
    soft_weight: float
    hard_weight: float
    divergence: str
    divergence_args: list[float]
    reduction: str
    num_items: Optional[Union[int, Tensor]]
    ignore_index: int

    @classmethod
    def checked(cls, keywords: dict, has_target: bool) -> "_SoftOptions":
        """From the KD keywords of kd_loss (as reference.kd_loss takes them); those on the
        teacher's logits (logit_scale, softcap, standardize) may be absent."""
        temperature, alpha = _check_options(keywords["temperature"], keywords["alpha"], keywords["reduction"],
                                            keywords["num_items"])
        logit_scale = _check_number("logit_scale", keywords.get("logit_scale", 1.0), 0.0, math.inf, open_low=True,
                                    open_high=True)
        divergence = keywords["divergence"]
        divergence_args = _divergence_args(divergence, keywords["beta"], keywords["skew"], keywords["ab_alpha"],
                                           keywords["ab_beta"], keywords["akl_mu"])
        softcap = keywords.get("softcap")
        if softcap is not None:
            softcap = _check_number("softcap", softcap, 0.0, math.inf, open_low=True, open_high=True)
        standardize = keywords.get("standardize", False)
        if not isinstance(standardize, bool):
            raise TypeError(f"standardize must be a bool, got {type(standardize).__name__}")
        if standardize and (softcap is not None or logit_scale != 1.0):
            raise ValueError("standardize=True takes neither softcap nor logit_scale (it rescales each row itself)")
        soft_scale = temperature**2 if keywords["scale_by_temperature"] else 1.0
        # softcap(c z) = c * softcap'(z) with softcap' = softcap / c: the kernels see z at T / c.
        return cls(temperature / logit_scale, softcap / logit_scale if softcap else 0.0, standardize,
                   soft_scale * (alpha if has_target else 1.0), 1.0 - alpha if has_target else 0.0, divergence,
                   divergence_args, keywords["reduction"], keywords["num_items"], int(keywords["ignore_index"]))

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends with kernels for these options (the CUDA kernel has neither softcap,
        standardize nor adaptive KL)."""
        if self.softcap or self.standardize or self.divergence == "akl":
            return ("cpu", "triton", "reference")
        return BACKENDS

    def row_weight(self, rows_target: Optional[Tensor], rows: Tensor) -> Optional[Tensor]:
        """The weight of every row for the reduction (None unless batchmean)."""
        if self.reduction != "batchmean":
            return None
        return _mean_weight(rows_target, rows, self.ignore_index, self.num_items)


def _mean_weight(rows_target: Optional[Tensor], rows: Tensor, ignore_index: int,
                 num_items: Optional[Union[int, Tensor]] = None) -> Tensor:
    """1 / counted rows (or 1 / num_items) as a 0-d tensor on the device of `rows` (the [N, ...]
    inputs), exact in fp32 (fp64 for fp64 inputs)."""
    device = rows.device
    if num_items is not None:
        denominator = torch.as_tensor(num_items, device=device)
    elif rows_target is None:
        denominator = torch.tensor(max(rows.shape[0], 1), device=device)
    else:
        denominator = (rows_target != ignore_index).sum().clamp_min(1)
    weight_dtype = accumulation_dtype(rows.dtype)
    return denominator.to(weight_dtype).reciprocal()


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
    num_items: Optional[Union[int, Tensor]] = None,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    standardize: bool = False,
    shared_vocab: Optional[int] = None,
    backend: str = "auto",
) -> Tensor:
    """Knowledge-distillation loss on logits, fused: softmax, divergence, hard-label CE and
    their gradients in one kernel.

    For each row (a length-V vector of ``[..., V]`` inputs), with ``P_t = softmax(teacher/T)``
    and ``P_s = softmax(student/T)`` computed in fp32 (fp64 for fp64 inputs):

    - ``divergence``: ``"forward_kl"`` KL(P_t || P_s); ``"reverse_kl"`` KL(P_s || P_t); ``"jsd"``
      beta KL(P_t || M) + (1 - beta) KL(P_s || M) with M = beta P_t + (1 - beta) P_s,
      ``0 < beta < 1``; ``"skew_kl"`` KL(P_t || skew P_t + (1 - skew) P_s) and
      ``"skew_reverse_kl"`` KL(P_s || (1 - skew) P_t + skew P_s), ``0 <= skew < 1`` (DistiLLM;
      skew = 0 gives forward / reverse KL); ``"tvd"`` sum |P_t - P_s| / 2 (subgradient 0 where
      equal); ``"ab"`` the alpha-beta divergence of ABKD with ``ab_alpha``, ``ab_beta`` (both
      required): -1/(a b) sum [P_t^a P_s^b - a/(a+b) P_t^(a+b) - b/(a+b) P_s^(a+b)] and its
      continuous limits where a, b or a + b is 0 ((1, 0) is forward KL, (0, 1) reverse KL);
      ``"akl"`` adaptive KL (Wu et al., 2025) with ``0 < akl_mu < 1``: w KL(P_t || P_s) +
      (1 - w) KL(P_s || P_t), w = g_head / (g_head + g_tail) per row (no gradient through w), g
      the sums of |P_t - P_s| over the head (the largest P_t whose cumulative sum is <= akl_mu;
      equal teacher logits count together, so a tie group that would pass akl_mu is tail; the
      top value is always head) and over the tail; w = 1/2 where P_t = P_s. The head is found
      without sorting, by a search over teacher values that reads the teacher row 2-3 more times
      (cpu and triton backends).
      Each sums over the entries finite in both inputs.
    - ``logit_scale=c`` (> 0): the soft term sees ``c * logits`` of both inputs (Cohere-style heads);
      ``T`` still scales the soft term by ``T^2``; the CE term reads the raw logits.
    - ``softcap=c`` (> 0): the soft term sees ``c * tanh(z / c)`` of both inputs' (scaled) logits
      z (Gemma-2 ``final_logit_softcapping``), inside the kernel with its exact gradient; the CE
      term reads the raw logits; -inf entries stay masked. Runs on the cpu and triton backends.
    - ``standardize=True``: logit standardisation (Sun et al., CVPR 2024): the soft term sees each
      row of both inputs as ``(z - mean) / (std + 1e-7)`` (unbiased std, over the row's finite
      entries; 0 for a constant row), with the gradient through the mean and std; the CE term
      reads the raw logits. It costs one more read of each row for the mean and std, and the
      divergence's row sums come from a read of their own (forward and reverse KL otherwise take
      them from the statistics). Not with ``softcap`` or ``logit_scale``; cpu and triton backends.
    - ``soft = divergence * (T^2 if scale_by_temperature else 1)``.
    - ``shared_vocab=N``: distil over the first N vocabulary entries of both inputs, whose V may
      then differ (one padded, e.g. 151936 vs 152064); without it, differing V is an error.
    - with ``target``: ``alpha * soft + (1 - alpha) * CE(softmax(student), target)``; rows whose
      target is ``ignore_index`` count in neither term. Without target: ``soft``.
    - ``reduction``: ``"batchmean"`` (sum over counted rows / their number, or / ``num_items``),
      ``"sum"``, or ``"none"`` (per-row losses of the leading shape, 0 at ignored rows).

    Entries equal to -inf (masked vocabulary) contribute 0; a row that is all -inf, NaN or +inf
    in an input, or a target outside [0, V), raises ValueError. Gradients flow to both logits.
    The loss is returned in fp32 (fp64 for fp64 inputs). ``backend``: "auto" or one of
    :func:`kdkernels.available_backends`.
    """
    keywords = _kd_keywords(locals())
    vocab = _check_logits(student_logits, teacher_logits, shared_vocab)
    student_logits, teacher_logits = student_logits[..., :vocab], teacher_logits[..., :vocab]
    if target is not None:
        _check_target(target, student_logits)
    options = _SoftOptions.checked(keywords, target is not None)
    backend = resolve_backend(backend, student_logits.device, options.backends)
    if backend == "reference":
        return reference.kd_loss(student_logits, teacher_logits, target, **keywords)

    lead_shape = student_logits.shape[:-1]
    student, teacher = _kernel_rows(student_logits, vocab), _kernel_rows(teacher_logits, vocab)
    rows_target = None if target is None else target.reshape(-1).long()
    grad_enabled = torch.is_grad_enabled()
    rows, _, _ = kd_loss_rows(
        student, teacher, rows_target, options.row_weight(rows_target, student), options.kernel_temperature,
        options.softcap, options.standardize, options.soft_weight, options.hard_weight, divergence,
        options.divergence_args, options.ignore_index, grad_enabled and student_logits.requires_grad,
        grad_enabled and teacher_logits.requires_grad, backend)
    if reduction == "none":
        return rows.reshape(lead_shape)
    return rows.sum()


def _check_head(side: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    """An LM head's shapes: weight [V, H] matching hidden [..., H], bias [V]."""
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{side}_weight must be [V, H] with H = {hidden.shape[-1]} (the last dimension of "
                         f"{side}_hidden), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{side}_bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")


def _check_heads(heads: dict[str, Optional[Tensor]], vocab: str) -> None:
    """Both LM heads of a fused-linear loss (`heads`: its hidden states, weights and biases by
    argument name): floating tensors of one dtype and device, each head's shapes, and hidden
    states with the same leading shape. `vocab` names the weights' row count in the messages."""
    _check_floats({name: x for name, x in heads.items() if x is not None},
                  f"[..., H] (hidden), [{vocab}, H] (weight), [{vocab}] (bias)")
    for side in ("student", "teacher"):
        _check_head(side, heads[f"{side}_hidden"], heads[f"{side}_weight"], heads[f"{side}_bias"])
    student_hidden, teacher_hidden = heads["student_hidden"], heads["teacher_hidden"]
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(f"teacher_hidden shape {tuple(teacher_hidden.shape)} and student_hidden shape "
                         f"{tuple(student_hidden.shape)} differ in their leading dimensions")


def _check_chunk_options(reduction: str, chunk_size: Optional[int]) -> None:
    if reduction == "none":
        raise ValueError("the fused-linear losses take reduction='batchmean' or 'sum' (the weight gradient sums over "
                         "rows); use the loss on the logits for per-row losses")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (rows per chunk), got {chunk_size!r}")


def _head_rows(student: tuple, teacher: tuple, target: Optional[Tensor], chunk_size: Optional[int],
               vocab: Optional[int] = None) -> tuple[Tensor, Tensor, Optional[Tensor], bool, bool, int]:
    """The fused-linear ops' inputs from the (hidden, weight, bias) of both heads: the hidden
    states as [N, H] rows, the target as [N] int64, whether each side wants gradients, and the
    rows per chunk (chunk_size, or the default for `vocab` logit columns, default the student's)."""
    h_s, h_t = (side[0].reshape(-1, side[0].shape[-1]) for side in (student, teacher))
    rows_target = None if target is None else target.reshape(-1).long()
    student_grad, teacher_grad = (torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in side)
                                  for side in (student, teacher))
    chunk_rows = chunk_size or default_chunk_rows(h_s.shape[0], vocab or student[1].shape[0], h_s.shape[1])
    return h_s, h_t, rows_target, student_grad, teacher_grad, chunk_rows


def fused_linear_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    target: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    shared_vocab: Optional[int] = None,
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
    num_items: Optional[Union[int, Tensor]] = None,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    standardize: bool = False,
    backend: str = "auto",
) -> Tensor:
    """:func:`kd_loss` of ``student_hidden @ student_weight.T + student_bias`` against
    ``teacher_hidden @ teacher_weight.T + teacher_bias``, without ever holding more than one
    chunk of rows' logits: the LM heads and the loss run chunk by chunk, and each chunk's
    gradients for the hidden states, weights and biases are formed as it goes.

    Hidden states are ``[..., H_s]`` and ``[..., H_t]`` with the same leading shape; weights
    ``[V, H_s]`` and ``[V_t, H_t]`` (``nn.Linear`` layout); biases ``[V]`` and ``[V_t]``. All of one
    floating dtype and device; the logits are formed in that dtype, as the heads would. ``V`` and
    ``V_t`` must match unless ``shared_vocab`` names the prefix to distil over. ``chunk_size``:
    rows per chunk (default: a power of two that keeps a chunk's logits about as large as the
    hidden states). Gradients flow to the student side, and to the teacher side for whichever of
    its tensors requires grad. ``reduction`` is ``"batchmean"`` or ``"sum"`` (the weight gradient
    sums over rows, so per-row losses are not offered); the other keywords are those of
    :func:`kd_loss`, with the same semantics.
    """
    _check_heads({"student_hidden": student_hidden, "student_weight": student_weight, "student_bias": student_bias,
                  "teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight, "teacher_bias": teacher_bias},
                 "V")
    vocab = _shared_vocab(student_weight.shape[0], teacher_weight.shape[0], shared_vocab, "rows of the weights")
    if target is not None:
        _check_target(target, student_hidden, "student_hidden")
    _check_chunk_options(reduction, chunk_size)
    keywords = _kd_keywords(locals())
    options = _SoftOptions.checked(keywords, target is not None)
    backend = resolve_backend(backend, student_hidden.device, options.backends)
    student_weight, teacher_weight = student_weight[:vocab], teacher_weight[:vocab]
    student_bias = None if student_bias is None else student_bias[:vocab]
    teacher_bias = None if teacher_bias is None else teacher_bias[:vocab]
    if backend == "reference":
        return reference.kd_loss(
            torch.nn.functional.linear(student_hidden, student_weight, student_bias),
            torch.nn.functional.linear(teacher_hidden, teacher_weight, teacher_bias), target, **keywords)

    h_s, h_t, rows_target, student_grad, teacher_grad, chunk_rows = _head_rows(
        (student_hidden, student_weight, student_bias), (teacher_hidden, teacher_weight, teacher_bias), target,
        chunk_size)
    loss, *_ = fused_linear_kd_loss_op(
        h_s, student_weight, student_bias, h_t, teacher_weight, teacher_bias, rows_target,
        options.row_weight(rows_target, h_s), options.kernel_temperature, options.softcap, options.standardize,
        options.soft_weight, options.hard_weight, divergence, options.divergence_args, options.ignore_index, chunk_rows,
        student_grad, teacher_grad, backend)
    return loss


def _vocab_start(vocab_start: object) -> int:
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be an int >= 0 (the global id of the slice's first entry), "
                         f"got {vocab_start!r}")
    return vocab_start


def _vocab_parallel_options(keywords: dict, has_target: bool, device: torch.device,
                            backend: str) -> tuple[_SoftOptions, str]:
    """The checked KD keywords of a vocab-parallel loss and its backend."""
    options = _SoftOptions.checked(keywords, has_target)
    if options.divergence in WHOLE_ROW_DIVERGENCES:
        raise NotImplementedError(f"divergence={options.divergence!r} has no vocab-parallel form: its weights need a "
                                  "threshold over the whole row's sorted teacher probabilities")
    if options.standardize:
        raise NotImplementedError("standardize=True has no vocab-parallel form: it needs each whole row's mean and "
                                  "std before the first read")
    return options, resolve_backend(backend, device, VOCAB_PARALLEL_BACKENDS)


def _vocab_parallel_logits_checks(student_logits: Tensor, teacher_logits: Tensor, target: Optional[Tensor],
                                  vocab_start: int, keywords: dict, backend: str) -> tuple[_SoftOptions, str]:
    """The local checks of vocab_parallel_kd_loss: its options and backend."""
    _check_logits(student_logits, teacher_logits, None)
    if target is not None:
        _check_target(target, student_logits)
    _vocab_start(vocab_start)
    return _vocab_parallel_options(keywords, target is not None, student_logits.device, backend)


def _vocab_parallel_heads_checks(heads: dict[str, Optional[Tensor]], target: Optional[Tensor], vocab_start: int,
                                 chunk_size: Optional[int], keywords: dict, backend: str) -> tuple[_SoftOptions, str]:
    """The local checks of vocab_parallel_fused_linear_kd_loss (`heads`: its hidden states,
    weights and biases by argument name): its options and backend."""
    _check_heads(heads, "V_local")
    student_hidden = heads["student_hidden"]
    if heads["teacher_weight"].shape[0] != heads["student_weight"].shape[0]:
        raise ValueError(f"student_weight and teacher_weight must hold the same vocabulary slice, got "
                         f"{heads['student_weight'].shape[0]} and {heads['teacher_weight'].shape[0]} rows")
    if target is not None:
        _check_target(target, student_hidden, "student_hidden")
    _check_chunk_options(keywords["reduction"], chunk_size)
    _vocab_start(vocab_start)
    return _vocab_parallel_options(keywords, target is not None, student_hidden.device, backend)


def _target_fingerprint(target: object) -> tuple[int, int]:
    """Two sums that differ when two ranks hold different targets (ids, or their order): -1, -1
    without a (valid) target."""
    if not isinstance(target, Tensor) or target.is_floating_point() or target.is_complex():
        return -1, -1
    ids = target.reshape(-1).long()
    return int(ids.sum()), int((ids * torch.arange(1, ids.numel() + 1, device=ids.device)).sum())


def _agreed_across_ranks(check: Callable[[], tuple], group: Optional[dist.ProcessGroup], device: torch.device,
                         vocab_start: object, vocab: int, rows: int, dtype: torch.dtype,
                         target: object) -> tuple[tuple, int]:
    """check()'s result once every rank of `group` has passed its own checks and the ranks agree
    (one all_gather of a few integers): the same row count, dtype and target (presence and ids),
    and vocabulary slices that tile [0, V) without gap or overlap; with it, the largest slice size.
    Otherwise every rank raises, so that none waits in a collective the others never reach: its
    own error, or a ValueError naming the ranks at fault."""
    try:
        result, error = check(), None
    except (TypeError, ValueError, NotImplementedError) as exc:
        result, error = None, exc
    start = vocab_start if isinstance(vocab_start, int) and not isinstance(vocab_start, bool) else -1
    dtype_code = _FLOAT_DTYPES.index(dtype) if dtype in _FLOAT_DTYPES else -1
    mine = torch.tensor([error is not None, start, vocab, rows, dtype_code, target is not None,
                         *_target_fingerprint(target)], device=device)
    table = gather_blocks(mine, group).tolist()
    if error is not None:
        raise error
    failed = [rank for rank, row in enumerate(table) if row[0]]
    if failed:
        raise ValueError(f"vocab-parallel KD: the inputs of rank(s) {failed} failed their checks (see the error there)")
    for columns, what in (((3,), "row counts"), ((4,), "dtypes"),
                          ((5,), "target presence (some ranks pass target, others not)"),
                          ((6, 7), "targets (every rank must pass the same global ids)")):
        if len({tuple(row[c] for c in columns) for row in table}) > 1:
            raise ValueError(f"vocab-parallel KD: the ranks' {what} differ")
    slices = sorted((row[1], row[1] + row[2], rank) for rank, row in enumerate(table))
    end = 0
    for first, last, rank in slices:
        if first != end:
            raise ValueError(f"vocab-parallel KD: the vocabulary slices [vocab_start, vocab_start + V_local) of the "
                             f"ranks must tile [0, V); rank {rank} starts at {first} where {end} was expected "
                             f"({'a gap' if first > end else 'an overlap'}); slices by rank: "
                             f"{[(row[1], row[1] + row[2]) for row in table]}")
        end = last
    return result, max(row[2] for row in table)


def vocab_parallel_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Optional[Tensor] = None,
    *,
    vocab_start: int,
    group: Optional[dist.ProcessGroup] = None,
    validate: bool = True,
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
    num_items: Optional[Union[int, Tensor]] = None,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    standardize: bool = False,
    backend: str = "auto",
) -> Tensor:
    """:func:`kd_loss` of logits split over the vocabulary across the ranks of a
    ``torch.distributed`` process group (tensor-parallel LM heads).

    Each rank passes its slice ``[..., V_local]`` of both logits, for the vocabulary ids
    ``[vocab_start, vocab_start + V_local)``; slices may differ in size (an uneven last slice, a
    padded vocabulary masked with -inf) and must tile ``[0, V)``. ``target`` holds global ids and
    is the same on every rank. Every rank gets the same value: exactly ``kd_loss`` of the
    concatenated full-vocabulary logits with the same keywords, and gradients for its own slices
    (the teacher's too where it requires grad).

    How: three fused reads of the local slices and two collectives on ``group`` (default: the
    world) per call. The first read gives each row's slice statistics, (max, sum of exp) of
    student/T, teacher/T and the raw student, which one all_gather of 9 values per row
    exchanges; every rank combines them into the rows' log-normalisers. The second read sums
    the divergence's terms (and picks the raw target logit on the rank that holds it), and one
    ``all_reduce`` of 4 values per row adds them up. The third read writes the gradients. A rank
    sends 52 bytes per row (fp32; 104 for fp64 logits) whatever V is, against ``V_local`` values
    per row to gather the logits. ``validate=True`` adds one small ``all_gather`` of 8 integers per
    rank that checks the slices tile ``[0, V)`` and that the ranks agree on rows, dtype and target;
    a failed check raises on every rank rather than leaving the others waiting. Without it, the
    caller vouches for the layout (a target in no slice or in two is still caught); under
    ``torch.compile(fullgraph=True)`` pass ``validate=False`` (the check reads the exchanged
    integers on the host).

    All divergences but ``"akl"`` (its head threshold needs the whole sorted row) are supported,
    with ``logit_scale`` and ``softcap``; ``standardize`` is not (NotImplementedError). Backends:
    cpu (e.g. gloo) and triton (CUDA tensors, e.g. NCCL).
    """
    keywords = _kd_keywords(locals())
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab_parallel_kd_loss needs an initialised torch.distributed process group")
    checked = functools.partial(_vocab_parallel_logits_checks, student_logits, teacher_logits, target, vocab_start,
                                keywords, backend)
    if validate:
        shape = getattr(student_logits, "shape", (0,))
        device = student_logits.device if isinstance(student_logits, Tensor) else torch.device("cpu")
        (options, kernel_backend), _ = _agreed_across_ranks(
            checked, group, device, vocab_start, shape[-1] if shape else 0, math.prod(shape[:-1]),
            getattr(student_logits, "dtype", None), target)
    else:
        options, kernel_backend = checked()
    lead_shape, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    student, teacher = _kernel_rows(student_logits, vocab), _kernel_rows(teacher_logits, vocab)
    rows_target = None if target is None else target.reshape(-1).long()
    grad_enabled = torch.is_grad_enabled()
    rows, _, _ = vocab_parallel_kd_loss_rows(
        student, teacher, rows_target, options.row_weight(rows_target, student), vocab_start,
        options.kernel_temperature, options.softcap, options.soft_weight, options.hard_weight, divergence,
        options.divergence_args, options.ignore_index, grad_enabled and student_logits.requires_grad,
        grad_enabled and teacher_logits.requires_grad, vocab_parallel_group_name(group), kernel_backend)
    if reduction == "none":
        return rows.reshape(lead_shape)
    return rows.sum()


def vocab_parallel_fused_linear_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    target: Optional[Tensor] = None,
    *,
    vocab_start: int,
    group: Optional[dist.ProcessGroup] = None,
    validate: bool = True,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
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
    num_items: Optional[Union[int, Tensor]] = None,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    standardize: bool = False,
    backend: str = "auto",
) -> Tensor:
    """:func:`fused_linear_kd_loss` with tensor-parallel LM heads: each rank holds the rows
    ``[vocab_start, vocab_start + V_local)`` of both heads' weights ``[V_local, H]`` (and biases),
    as a Megatron ``ColumnParallelLinear`` does, and the hidden states of all rows (the same on
    every rank). Never more than one chunk of local logits exists.

    Per chunk of rows, the logits of the local slice are projected and
    :func:`vocab_parallel_kd_loss`'s three reads and two collectives run on them; the weight and
    bias gradients are this rank's rows; the hidden-state gradients are those of the whole loss,
    summed over the ranks by one more ``all_reduce`` at the end (so pass the hidden states
    themselves, not the output of a copy-to-tensor-parallel region whose backward would add them
    up again). Collectives per call: ``2 * ceil(N / chunk_size) + 1`` (the last only when a side's
    gradients are wanted), plus one with ``validate``. Every rank must use the same chunks: the
    default ``chunk_size`` follows the largest slice, which ``validate`` exchanges, so
    ``validate=False`` needs an explicit ``chunk_size``. Keywords as in :func:`fused_linear_kd_loss`
    and :func:`vocab_parallel_kd_loss`.
    """
    keywords = _kd_keywords(locals())
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab_parallel_fused_linear_kd_loss needs an initialised torch.distributed process group")
    heads = {"student_hidden": student_hidden, "student_weight": student_weight, "student_bias": student_bias,
             "teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight, "teacher_bias": teacher_bias}
    checked = functools.partial(_vocab_parallel_heads_checks, heads, target, vocab_start, chunk_size, keywords,
                                backend)
    if validate:
        vocab = student_weight.shape[0] if isinstance(student_weight, Tensor) and student_weight.dim() else 0
        rows = math.prod(student_hidden.shape[:-1]) if isinstance(student_hidden, Tensor) else 0
        device = student_hidden.device if isinstance(student_hidden, Tensor) else torch.device("cpu")
        (options, kernel_backend), largest_slice = _agreed_across_ranks(
            checked, group, device, vocab_start, vocab, rows, getattr(student_hidden, "dtype", None), target)
    else:
        options, kernel_backend = checked()
        if chunk_size is None:
            raise ValueError("validate=False needs an explicit chunk_size, the same on every rank (the default "
                             "depends on the largest vocabulary slice, which validate exchanges)")
        largest_slice = student_weight.shape[0]
    h_s, h_t, rows_target, student_grad, teacher_grad, chunk_rows = _head_rows(
        (student_hidden, student_weight, student_bias), (teacher_hidden, teacher_weight, teacher_bias), target,
        chunk_size, largest_slice)
    loss, *_ = vocab_parallel_fused_linear_kd_loss_op(
        h_s, student_weight, student_bias, h_t, teacher_weight, teacher_bias, rows_target,
        options.row_weight(rows_target, h_s), vocab_start, options.kernel_temperature, options.softcap,
        options.soft_weight, options.hard_weight, divergence, options.divergence_args, options.ignore_index, chunk_rows,
        student_grad, teacher_grad, vocab_parallel_group_name(group), kernel_backend)
    return loss


def global_num_items(targets: Union[Tensor, Sequence[Tensor]], *, ignore_index: int = -100,
                     group: Optional[dist.ProcessGroup] = None, average_gradients: bool = True) -> Tensor:
    """The ``num_items`` that makes data-parallel training with gradient accumulation give the
    gradient of one big batch: the number of targets that are not ``ignore_index`` in ``targets``
    (this rank's micro-batches of one optimizer step) summed over the ranks of ``group`` (default:
    the world) by one ``all_reduce``. Pass it as ``num_items`` to every micro-batch's
    ``reduction="batchmean"`` loss. DDP and FSDP average the gradients over the ranks, so with
    ``average_gradients=True`` the count is divided by the group size: the averaged gradient is then
    that of the loss summed over the whole global batch and divided by its count. Returns the same
    0-d fp64 tensor on every rank, on the targets' device (which must suit the group's backend:
    CUDA tensors for NCCL)."""
    targets = [targets] if isinstance(targets, Tensor) else list(targets)
    if not targets or not all(isinstance(t, Tensor) and not t.is_floating_point() for t in targets):
        raise TypeError("targets must be an integer tensor or a non-empty sequence of them (one per micro-batch)")
    count = sum((t != ignore_index).sum() for t in targets).to(torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count, group=group)
        if average_gradients:
            count = count / dist.get_world_size(group)
    return count


TOPK_TAILS = ("renormalize", "bucket")


def _check_topk(student: Tensor, indices: Tensor, logprobs: Tensor, tail: str, student_name: str = "student_logits",
                student_dims: str = "[..., V]") -> None:
    _check_floats({student_name: student}, student_dims)
    if not isinstance(indices, Tensor) or indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"teacher_topk_indices must be an int64 (or int32) tensor of vocabulary ids, got "
                        f"{getattr(indices, 'dtype', type(indices).__name__)}")
    _check_floats({"teacher_topk_logprobs": logprobs}, "[..., k]")
    lead = tuple(student.shape[:-1])
    if indices.dim() < 1 or tuple(indices.shape[:-1]) != lead or indices.shape[-1] < 1:
        raise ValueError(f"teacher_topk_indices must have shape {lead + ('k',)} with k >= 1 (the leading shape of "
                         f"{student_name}), got {tuple(indices.shape)}")
    if logprobs.shape != indices.shape:
        raise ValueError(f"teacher_topk_logprobs shape {tuple(logprobs.shape)} differs from teacher_topk_indices "
                         f"shape {tuple(indices.shape)}")
    for name, value in (("teacher_topk_indices", indices), ("teacher_topk_logprobs", logprobs)):
        if value.device != student.device:
            raise ValueError(f"{name} is on {value.device} but {student_name} is on {student.device}")
    if tail not in TOPK_TAILS:
        raise ValueError(f"tail must be one of {TOPK_TAILS}, got {tail!r}")
    if logprobs.requires_grad and torch.is_grad_enabled():
        raise ValueError("topk_kd_loss treats the teacher as a constant: pass teacher_topk_logprobs.detach()")


def _check_topk_ids(indices: Tensor, vocab: int) -> None:
    """The checks the kernels make of the ids, for the reference backend: in [0, V), no repeats."""
    ids = indices.reshape(-1, indices.shape[-1]).sort(-1).values
    out_of_range = ((ids < 0) | (ids >= vocab)).any(-1)
    repeated = (ids[:, 1:] == ids[:, :-1]).any(-1)
    for bad, what in ((out_of_range, f"an id outside [0, {vocab})"), (repeated, "an id twice")):
        if bad.any():
            raise ValueError(f"topk_kd_loss: teacher_topk_indices row {int(bad.nonzero()[0, 0])} holds {what} "
                             "(rows of the inputs flattened to [N, k])")


def _topk_backend(backend: str, device: torch.device, k: int) -> str:
    backend = resolve_backend(backend, device, supported=("cpu", "triton", "reference"))
    if backend == "triton" and k > TRITON_MAX_K:
        raise ValueError(f"the triton backend of topk_kd_loss takes k <= {TRITON_MAX_K}, got k = {k}")
    return backend


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
    num_items: Optional[Union[int, Tensor]] = None,
    backend: str = "auto",
) -> Tensor:
    """KD against a sparse teacher, e.g. one stored offline: its top-k ids ``[..., k]`` and their
    log-probabilities ``[..., k]`` (at T = 1), fused with the student's full-vocabulary softmax.

    The divergence is taken over k + 1 categories: the k ids and the rest of the vocabulary. The
    student's are ``softmax(student / T)`` over all V entries, summed per category (the rest's
    mass from its own log-sum-exp, exact however small). The teacher's are its log-probabilities
    re-tempered, ``logprobs / T``, normalised, with the rest by ``tail``:

    - ``"renormalize"``: the rest is dropped (masked), so the teacher is its top-k renormalised,
      ``softmax(logprobs / T)`` over the k ids: exact at any T, and the logprobs are needed only up
      to a per-row constant (top-k logits work too). Forward KL is then
      ``sum_k p^_k (log p^_k - log q_k)``, the usual sparse-KD loss; the student's mass outside
      the ids still enters through its log-softmax.
    - ``"bucket"``: the rest is one category of mass ``1 - sum exp(logprobs)`` (dropped where that
      is <= 0, e.g. through the rounding of fp16 or bf16 logprobs), compared with the student's
      mass outside the same ids. Exact at T = 1; at T != 1 the rest is re-tempered as one
      category (its members' logprobs are not stored).

    ``divergence`` and its keywords, ``temperature``, ``alpha``, ``target``, ``reduction``,
    ``ignore_index``, ``scale_by_temperature`` and ``num_items`` are those of :func:`kd_loss`,
    with the categories in place of the vocabulary (a category masked in either input contributes
    0, as a -inf logit does there). The ids of a row must be distinct and in [0, V), in any order;
    rows whose target is ``ignore_index`` are not checked. The teacher is a constant (no gradient);
    -inf logprobs mask their ids. The kernels read the student row once for its statistics,
    gather the k entries and write the gradient in a second read. ``backend``: "auto", "cpu",
    "triton" (k <= 2047) or "reference".
    """
    _check_topk(student_logits, teacher_topk_indices, teacher_topk_logprobs, tail)
    vocab, k = student_logits.shape[-1], teacher_topk_indices.shape[-1]
    if target is not None:
        _check_target(target, student_logits)
    soft_keywords = _kd_keywords(locals(), _SOFT_KEYWORDS)
    options = _SoftOptions.checked(soft_keywords, target is not None)
    backend = _topk_backend(backend, student_logits.device, k)
    if backend == "reference":
        _check_topk_ids(teacher_topk_indices, vocab)
        return reference.topk_kd_loss(student_logits, teacher_topk_indices, teacher_topk_logprobs, target, tail=tail,
                                      **soft_keywords)
    lead_shape = student_logits.shape[:-1]
    student = _kernel_rows(student_logits, vocab)
    rows_target = None if target is None else target.reshape(-1).long()
    rows, _ = topk_kd_loss_rows(
        student, teacher_topk_indices.reshape(-1, k), teacher_topk_logprobs.reshape(-1, k), rows_target,
        options.row_weight(rows_target, student), options.kernel_temperature, options.soft_weight, options.hard_weight,
        divergence, options.divergence_args, tail == "bucket", options.ignore_index,
        torch.is_grad_enabled() and student_logits.requires_grad, backend)
    if reduction == "none":
        return rows.reshape(lead_shape)
    return rows.sum()


def fused_linear_topk_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_topk_indices: Tensor,
    teacher_topk_logprobs: Tensor,
    target: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
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
    num_items: Optional[Union[int, Tensor]] = None,
    backend: str = "auto",
) -> Tensor:
    """:func:`topk_kd_loss` of ``student_hidden @ student_weight.T + student_bias`` against a stored
    teacher's top-k ids and log-probabilities, without ever holding more than one chunk of rows'
    logits (as :func:`fused_linear_kd_loss` does for a live teacher). Hidden states ``[..., H]``,
    weight ``[V, H]``, bias ``[V]``, ids and logprobs ``[..., k]``; gradients flow to the hidden
    states, weight and bias. ``reduction`` is ``"batchmean"`` or ``"sum"``; ``chunk_size`` and
    the other keywords as in :func:`fused_linear_kd_loss` and :func:`topk_kd_loss`."""
    _check_topk(student_hidden, teacher_topk_indices, teacher_topk_logprobs, tail, "student_hidden", "[..., H]")
    named = {"student_hidden": student_hidden, "student_weight": student_weight}
    if student_bias is not None:
        named["student_bias"] = student_bias
    _check_floats(named, "[..., H] (hidden), [V, H] (weight), [V] (bias)")
    _check_head("student", student_hidden, student_weight, student_bias)
    if target is not None:
        _check_target(target, student_hidden, "student_hidden")
    _check_chunk_options(reduction, chunk_size)
    soft_keywords = _kd_keywords(locals(), _SOFT_KEYWORDS)
    options = _SoftOptions.checked(soft_keywords, target is not None)
    vocab, k = student_weight.shape[0], teacher_topk_indices.shape[-1]
    backend = _topk_backend(backend, student_hidden.device, k)
    if backend == "reference":
        _check_topk_ids(teacher_topk_indices, vocab)
        return reference.topk_kd_loss(torch.nn.functional.linear(student_hidden, student_weight, student_bias),
                                      teacher_topk_indices, teacher_topk_logprobs, target, tail=tail, **soft_keywords)
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    rows_target = None if target is None else target.reshape(-1).long()
    student_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (student_hidden, student_weight, student_bias))
    loss, *_ = fused_linear_topk_kd_loss_op(
        hidden, student_weight, student_bias, teacher_topk_indices.reshape(-1, k),
        teacher_topk_logprobs.reshape(-1, k), rows_target, options.row_weight(rows_target, hidden),
        options.kernel_temperature, options.soft_weight, options.hard_weight, divergence, options.divergence_args,
        tail == "bucket", options.ignore_index, chunk_size or default_chunk_rows(hidden.shape[0], vocab, hidden.shape[1]),
        student_grad, backend)
    return loss


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    ignore_index: int = -100,
    backend: str = "auto",
) -> Tensor:
    """Decoupled knowledge distillation (Zhao et al., CVPR 2022), fused.

    Per row with target ``y``, ``P = softmax(teacher / T)``, ``Q = softmax(student / T)``:
    TCKD = ``KL([P_y, 1 - P_y] || [Q_y, 1 - Q_y])`` and NCKD = ``KL(P^ || Q^)`` over the non-target
    classes renormalised; loss = ``T^2 * (alpha * TCKD + beta * NCKD)``, averaged over the rows
    whose target is not ``ignore_index`` (0 when there are none). ``1 - P_y`` is the sum over the
    other classes (exact where ``P_y`` is near 1); V = 2 gives NCKD = 0. Logits ``[..., V]`` with
    ``V >= 2`` and finite values; the teacher is a constant (pass it detached). Gradients flow to
    the student logits; the loss is fp32 (fp64 for fp64 inputs). ``backend``: "auto", "cpu",
    "triton" or "reference".
    """
    vocab = _check_logits(student_logits, teacher_logits, None)
    if vocab < 2:
        raise ValueError(f"dkd_loss needs V >= 2 classes, got V = {vocab}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor of class indices, got {type(target).__name__}")
    _check_target(target, student_logits)
    _check_constant_teacher(teacher_logits, "dkd_loss")
    temperature = _check_temperature(temperature)
    alpha = _check_number("alpha", alpha, 0.0, math.inf, open_high=True)
    beta = _check_number("beta", beta, 0.0, math.inf, open_high=True)
    backend = resolve_backend(backend, student_logits.device, supported=("cpu", "triton", "reference"))
    if backend == "reference":
        return reference.dkd_loss(student_logits, teacher_logits, target, alpha=alpha, beta=beta,
                                  temperature=temperature, ignore_index=ignore_index)
    student, teacher = _kernel_rows(student_logits, vocab), _kernel_rows(teacher_logits, vocab)
    rows_target = target.reshape(-1).long()
    rows, _ = dkd_loss_rows(student, teacher, rows_target, _mean_weight(rows_target, student, ignore_index), temperature,
                            alpha, beta, int(ignore_index), torch.is_grad_enabled() and student_logits.requires_grad,
                            backend)
    return rows.sum()


def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    eps: float = 1e-8,
    backend: str = "auto",
) -> Tensor:
    """DIST (Huang et al., NeurIPS 2022), fused; the definition of torchdistill's ``DISTLoss``.

    With ``y = softmax(z / T)`` of ``[N, C]`` logits (N >= 2 rows) and ``pearson(u, v)`` the
    cosine of the centred vectors with ``eps`` added to the product of their norms:
    inter = ``1 - mean_i pearson(y_s[i, :], y_t[i, :])`` (over the classes of each row), intra =
    ``1 - mean_j pearson(y_s[:, j], y_t[:, j])`` (over the rows of each class), loss =
    ``T^2 * (beta * inter + gamma * intra)``. The row mean of y is taken as ``1 / C`` (the mean of a
    softmax). The column sums are reduced in two stages (blocks of rows, then the blocks) with no
    transposed copy; the kernels read the logits three times and once more for the gradient. -inf
    entries are valid (y = 0); NaN, +inf or a row all -inf raise ValueError. The teacher is a
    constant (pass it detached); the loss is fp32 (fp64 for fp64 inputs). ``backend``: "auto",
    "cpu", "triton" or "reference".
    """
    _check_floats({"student_logits": student_logits, "teacher_logits": teacher_logits}, "[N, C]")
    if student_logits.dim() != 2 or teacher_logits.shape != student_logits.shape:
        raise ValueError(f"dist_loss takes [N, C] logits of one shape, got student_logits "
                         f"{tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)}")
    if student_logits.shape[0] < 2:
        raise ValueError(f"dist_loss needs N >= 2 rows (its intra-class term correlates each class over the rows), "
                         f"got N = {student_logits.shape[0]}")
    _check_constant_teacher(teacher_logits, "dist_loss")
    temperature = _check_temperature(temperature)
    beta = _check_number("beta", beta, 0.0, math.inf, open_high=True)
    gamma = _check_number("gamma", gamma, 0.0, math.inf, open_high=True)
    eps = _check_number("eps", eps, 0.0, math.inf, open_high=True)
    backend = resolve_backend(backend, student_logits.device, supported=("cpu", "triton", "reference"))
    if backend == "reference":
        return reference.dist_loss(student_logits, teacher_logits, beta=beta, gamma=gamma, temperature=temperature,
                                   eps=eps)
    classes = student_logits.shape[-1]
    student, teacher = _kernel_rows(student_logits, classes), _kernel_rows(teacher_logits, classes)
    loss, _ = dist_loss_op(student, teacher, temperature, beta, gamma, eps,
                           torch.is_grad_enabled() and student_logits.requires_grad, backend)
    return loss


_RELATION_BACKENDS = ("cpu", "triton", "reference")


def _flat_features(name: str, x: Tensor) -> Tensor:
    """[N, ...] features as [N, D] with unit stride along D (a view when possible)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() < 2 or x.shape[0] < 1 or x[0].numel() < 1:
        raise ValueError(f"{name} must be [N, ...] features with N >= 1 and at least one feature per sample, "
                         f"got shape {tuple(x.shape)}")
    rows = x.reshape(x.shape[0], -1)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _relation_eps(eps: float) -> float:
    return _check_number("eps", eps, 0.0, math.inf, open_low=True, open_high=True)


def pairwise_distance(x: Tensor, *, squared: bool = False, eps: float = 1e-12, backend: str = "auto") -> Tensor:
    """Euclidean distances between the N samples of ``x [N, ...]`` (flattened from dim 1), ``[N, N]``
    in the input dtype: ``max(|x_i|^2 + |x_j|^2 - 2 x_i.x_j, eps)``, its square root unless
    ``squared``, and 0 on the diagonal (Park et al.'s ``pdist``, the distances of RKD). Norms,
    product and epilogue in one kernel, fp32 accumulation; the gradient is 0 where clamped.
    ``backend``: "auto", "cpu", "triton" or "reference"."""
    rows = _flat_features("x", x)
    eps = _relation_eps(eps)
    backend = resolve_backend(backend, x.device, supported=_RELATION_BACKENDS)
    if backend == "reference":
        return reference.pairwise_distance(x, squared=squared, eps=eps)
    return relation_matrix(rows, "squared_distance" if squared else "distance", eps, backend).to(x.dtype)


_GRAM_NORMALIZATIONS = (None, "rows", "cosine")


def gram(x: Tensor, *, normalize: Optional[str] = None, eps: float = 1e-12, backend: str = "auto") -> Tensor:
    """The Gram matrix ``x x^T`` of the N samples of ``x [N, ...]`` (flattened from dim 1), ``[N, N]``
    in the input dtype. ``normalize="rows"`` L2-normalises its rows (the similarity matrix of Tung &
    Mori's SP); ``"cosine"`` divides every sample by its norm first (cosine similarities); both as
    ``F.normalize(., eps=eps)``. fp32 accumulation. ``backend``: "auto", "cpu", "triton" or
    "reference"."""
    if normalize not in _GRAM_NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {_GRAM_NORMALIZATIONS}, got {normalize!r}")
    rows = _flat_features("x", x)
    eps = _relation_eps(eps)
    backend = resolve_backend(backend, x.device, supported=_RELATION_BACKENDS)
    if backend == "reference":
        return reference.gram(x, normalize=normalize, eps=eps)
    matrix = relation_matrix(rows, "cosine" if normalize == "cosine" else "gram", eps, backend)
    if normalize == "rows":
        matrix = matrix / matrix.norm(dim=1, keepdim=True).clamp_min(eps)
    return matrix.to(x.dtype)


def _relation_loss(name: str, student: Tensor, teacher: Tensor, backend: str) -> Tensor:
    """Checks both feature tensors, then the op (or the reference) of relation loss `name`."""
    rows_s, rows_t = _flat_features("student", student), _flat_features("teacher", teacher)
    if teacher.shape[0] != student.shape[0]:
        raise ValueError(f"student and teacher must hold the same N samples, got N = {student.shape[0]} and "
                         f"{teacher.shape[0]}")
    _check_floats({"student": student, "teacher": teacher}, "[N, ...]")
    _check_constant_teacher(teacher, f"{name}_loss", "teacher")
    backend = resolve_backend(backend, student.device, supported=_RELATION_BACKENDS)
    if backend == "reference":
        return getattr(reference, f"{name}_loss")(student, teacher)
    loss, _ = relation_loss(rows_s, rows_t, name, torch.is_grad_enabled() and student.requires_grad, backend)
    return loss


def rkd_distance_loss(student: Tensor, teacher: Tensor, *, backend: str = "auto") -> Tensor:
    """Distance-wise relational KD (Park et al., CVPR 2019). With d the pairwise distances of the
    samples of ``[N, ...]`` features (:func:`pairwise_distance`, eps 1e-12) divided by the mean of
    their positive entries, the smooth-L1 (beta 1) between student and teacher averaged over all
    N x N pairs (the authors' code). Student and teacher may differ in feature size; the teacher is
    a constant. N >= 2. The loss is fp32 (fp64 for fp64 inputs). ``backend``: "auto", "cpu",
    "triton" or "reference"."""
    if student.dim() >= 1 and student.shape[0] < 2:
        raise ValueError(f"rkd_distance_loss needs N >= 2 samples (it normalises by their mean distance), "
                         f"got N = {student.shape[0]}")
    return _relation_loss("rkd_distance", student, teacher, backend)


def rkd_angle_loss(student: Tensor, teacher: Tensor, *, backend: str = "auto") -> Tensor:
    """Angle-wise relational KD (Park et al., CVPR 2019): for every anchor i and pair (j, k) of the
    N samples, the cosine ``<e_ij, e_ik>`` with ``e_ij = normalize(x_j - x_i)`` (a zero vector where
    the samples coincide); smooth-L1 (beta 1) between student and teacher averaged over all N^3
    triplets (the authors' code). In O(N^2) memory: the cosines follow from the Gram matrix of the
    centred features and its distances, and the kernels walk the triplets without storing them,
    the gradient included. Pairs whose squared distance is below ``8 sqrt(D)`` ulps of
    ``|x_i|^2 + |x_j|^2`` (after centring) count as coinciding: the Gram matrix cannot tell them
    apart from rounding. The teacher is a constant; the loss is fp32 (fp64 for fp64 inputs).
    ``backend``: "auto", "cpu", "triton" or "reference"."""
    return _relation_loss("rkd_angle", student, teacher, backend)


def similarity_preserving_loss(student: Tensor, teacher: Tensor, *, backend: str = "auto") -> Tensor:
    """Similarity-preserving KD (Tung & Mori, ICCV 2019): with ``G = x x^T`` of the flattened
    ``[N, ...]`` features and its rows L2-normalised (``F.normalize``),
    ``||G_t - G_s||_F^2 / N^2``. The teacher is a constant; the loss is fp32 (fp64 for fp64
    inputs). ``backend``: "auto", "cpu", "triton" or "reference"."""
    return _relation_loss("similarity_preserving", student, teacher, backend)


def pkt_loss(student: Tensor, teacher: Tensor, *, backend: str = "auto") -> Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018), as the authors' code: the
    cosine similarities of the flattened ``[N, ...]`` features (each divided by its norm + 1e-7)
    mapped to [0, 1] by ``(c + 1) / 2``, rows normalised to conditional probabilities p (teacher)
    and q (student), and ``mean(p * log((p + 1e-7) / (q + 1e-7)))`` over all N x N entries. The
    teacher is a constant; the loss is fp32 (fp64 for fp64 inputs). ``backend``: "auto", "cpu",
    "triton" or "reference"."""
    return _relation_loss("pkt", student, teacher, backend)


def _check_feature_pair(what: str, student: Tensor, teacher: Tensor) -> None:
    """One dtype and device, the same N, the teacher a constant."""
    _check_floats({f"{what} student": student, f"{what} teacher": teacher}, "[N, ...]")
    if student.dim() < 2 or teacher.dim() < 2 or teacher.shape[0] != student.shape[0]:
        raise ValueError(f"{what}: student and teacher must be [N, ...] features of the same N samples, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if teacher.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{what}: the teacher is a constant: pass teacher features detached")


FeatureMaps = Union[Tensor, Sequence[Tensor]]


def attention_transfer_loss(student_feats: FeatureMaps, teacher_feats: FeatureMaps, *, p: float = 2.0,
                            backend: str = "auto") -> Tensor:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017), as the authors' code, over one or
    several pairs of ``[N, C, *spatial]`` feature maps: with ``at(x)`` the channel mean of
    ``|x|^p``, flattened and L2-normalised per sample (``F.normalize``), each pair contributes
    ``mean((at(s) - at(t))^2)`` over the N samples and positions; the loss is their sum. Channels
    may differ within a pair, spatial sizes may not (interpolate one map first). One kernel pools
    the channels, one writes the feature gradient; the maps in between are ``[N, S]``. The teacher
    is a constant; the loss is fp32 (fp64 for fp64 inputs). ``backend``: "auto", "cpu", "triton"
    or "reference"."""
    pairs = [(student_feats, teacher_feats)] if isinstance(student_feats, Tensor) else None
    if pairs is None:
        if isinstance(teacher_feats, Tensor) or len(student_feats) != len(teacher_feats) or not student_feats:
            raise ValueError("student_feats and teacher_feats must be two tensors or two equally long, non-empty "
                             "sequences of tensors (one pair of maps per layer)")
        pairs = list(zip(student_feats, teacher_feats))
    p = _check_number("p", p, 0.0, math.inf, open_low=True, open_high=True)
    for index, (student, teacher) in enumerate(pairs):
        what = f"attention_transfer_loss pair {index}"
        _check_feature_pair(what, student, teacher)
        if student.dim() < 3 or teacher.shape[2:] != student.shape[2:] or student.shape[1] < 1 or teacher.shape[1] < 1:
            raise ValueError(f"{what}: maps must be [N, C, *spatial] with the same spatial size, got "
                             f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    backend = resolve_backend(backend, pairs[0][0].device, supported=_RELATION_BACKENDS)
    if backend == "reference":
        return reference.attention_transfer_loss([s for s, _ in pairs], [t for _, t in pairs], p=p)
    total = None
    for student, teacher in pairs:
        maps = [x.reshape(x.shape[0], x.shape[1], -1) for x in (student, teacher)]
        maps = [x if x.stride(-1) == 1 else x.contiguous() for x in maps]
        loss, _ = attention_transfer_op(maps[0], maps[1], p, torch.is_grad_enabled() and student.requires_grad,
                                        backend)
        total = loss if total is None else total + loss
    return total


def hint_loss(student_feat: Tensor, teacher_feat: Tensor, adapter: Optional[Callable[..., Tensor]] = None, *,
              backend: str = "auto") -> Tensor:
    """FitNets' hint loss (Romero et al., ICLR 2015): the mean squared error between the student's
    features, mapped by ``adapter`` when given, and the teacher's hint. ``adapter`` is called as
    ``adapter(student_feat, teacher_feat.shape[2:])`` (the teacher's spatial size):
    :class:`kdkernels.HintAdapter` matches channels with a 1x1 convolution and the spatial size by
    interpolation (Chen et al., NeurIPS 2017). The loss and its gradient come from one pass; the
    teacher is a constant; the loss is fp32 (fp64 for fp64 inputs). ``backend``: "auto", "cpu",
    "triton" or "reference"."""
    student = student_feat if adapter is None else adapter(student_feat, tuple(teacher_feat.shape[2:]))
    _check_feature_pair("hint_loss", student, teacher_feat)
    if student.shape != teacher_feat.shape:
        raise ValueError(f"hint_loss: the student features{' after the adapter' if adapter else ''} have shape "
                         f"{tuple(student.shape)} but the teacher's {tuple(teacher_feat.shape)}; map them with "
                         f"kdkernels.HintAdapter")
    backend = resolve_backend(backend, student.device, supported=_RELATION_BACKENDS)
    if backend == "reference":
        return reference.hint_loss(student, teacher_feat)
    loss, _ = squared_error(student.contiguous(), teacher_feat.contiguous(),
                            torch.is_grad_enabled() and student.requires_grad, backend)
    return loss

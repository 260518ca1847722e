"""TRL's generalized JSD loss on kdkernels' kernels. ``patch()`` replaces the static
``generalized_jsd_loss`` of ``GKDTrainer`` (and of every TRL trainer whose static loss has the same
signature) with :func:`generalized_jsd_loss`, of identical signature and semantics; ``unpatch()``
restores TRL's, and ``with patched(): ...`` does both. Needs TRL (``pip install 'kdkernels[trl]'``).

    from kdkernels.integrations import trl as kdk_trl
    kdk_trl.patch()          # before trainer.train()"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from typing import Callable, Iterator, Optional, Union

import torch

try:
    import trl  # noqa: F401
except ImportError as exc:
    raise ImportError("kdkernels.integrations.trl needs TRL: pip install 'kdkernels[trl]'") from exc

from kdkernels.functional import kd_loss
from kdkernels.integrations import generalized_jsd_options

Tensor = torch.Tensor

# Where TRL keeps trainers with a static generalized_jsd_loss (its experimental package from 1.0, its
# trainer package before).
_TRAINER_MODULES = ("trl.experimental.gkd.gkd_trainer", "trl.experimental.gold.gold_trainer",
                    "trl.experimental.iw_opd.iw_opd_trainer", "trl.trainer.gkd_trainer")
_PARAMETERS = ("student_logits", "teacher_logits", "labels", "beta", "temperature", "reduction", "num_items_in_batch")


def _trainers() -> list[type]:
    """TRL's trainer classes that define the static generalized_jsd_loss of GKDTrainer's signature."""
    found = []
    for name in _TRAINER_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for cls in vars(module).values():
            loss = vars(cls).get("generalized_jsd_loss") if isinstance(cls, type) else None
            if isinstance(loss, staticmethod) and tuple(inspect.signature(loss.__func__).parameters) == _PARAMETERS:
                found.append(cls)
    return found


_ORIGINALS: dict[type, staticmethod] = {cls: vars(cls)["generalized_jsd_loss"] for cls in _trainers()}
if not _ORIGINALS:
    raise ImportError(f"kdkernels.integrations.trl found no TRL trainer with GKDTrainer's generalized_jsd_loss "
                      f"(TRL {trl.__version__}); looked in {', '.join(_TRAINER_MODULES)}")
_TRL_LOSS: Callable[..., Tensor] = next(iter(_ORIGINALS.values())).__func__


def generalized_jsd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None,
                         beta: float = 0.5, temperature: float = 1.0, reduction: str = "batchmean",
                         num_items_in_batch: Optional[Union[int, Tensor]] = None) -> Tensor:
    """TRL's ``GKDTrainer.generalized_jsd_loss``, fused: the generalized JSD of
    ``softmax(teacher / T)`` and ``softmax(student / T)`` per position (forward KL at beta = 0,
    reverse KL at beta = 1; no T^2), positions whose label is -100 left out, then
    ``num_items_in_batch`` (the sum divided by it), or ``reduction``: "batchmean" (divided by the
    number of labelled positions, or by ``student_logits.size(0)`` without labels, as TRL does),
    "sum", or "mean" (divided by the number of entries, positions times vocabulary).
    ``reduction="none"`` returns TRL's per-entry tensor and runs TRL's own code. The loss is fp32."""
    if reduction == "none" and num_items_in_batch is None:
        return _TRL_LOSS(student_logits, teacher_logits, labels, beta, temperature, reduction, num_items_in_batch)
    total = kd_loss(student_logits, teacher_logits, labels, temperature=temperature, alpha=1.0, reduction="sum",
                    ignore_index=-100, scale_by_temperature=False, **generalized_jsd_options(beta))
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    positions = (labels != -100).sum() if labels is not None else student_logits[..., 0].numel()
    if reduction == "batchmean":
        return total / (positions.clamp_min(1) if labels is not None else max(student_logits.size(0), 1))
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / (positions * student_logits.shape[-1])
    raise ValueError(f"reduction must be 'batchmean', 'sum', 'mean' or 'none', got {reduction!r}")


def patch() -> list[type]:
    """Make TRL's trainers use :func:`generalized_jsd_loss`; returns the patched classes."""
    for cls in _ORIGINALS:
        cls.generalized_jsd_loss = staticmethod(generalized_jsd_loss)
    return list(_ORIGINALS)


def unpatch() -> None:
    """Give TRL's trainers their own loss back."""
    for cls, original in _ORIGINALS.items():
        cls.generalized_jsd_loss = original


@contextlib.contextmanager
def patched() -> Iterator[list[type]]:
    """``patch()`` for the duration of a ``with`` block."""
    try:
        yield patch()
    finally:
        unpatch()

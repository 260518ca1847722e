"""The pieces of a distillation objective: what a model produced in one forward pass (its logits
and the outputs of tapped submodules) and the loss terms that read it. A term is an
``nn.Module``, so what it learns (e.g. a hint adapter) trains with the student; its weight lives
in its loss module (``weight=`` of the feature losses, ``alpha`` of ``KDLoss``)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

import kdkernels

Tensor = torch.Tensor
Logits = Union[Tensor, list[Tensor]]


@dataclass
class Outputs:
    """One forward pass: ``logits`` (a list, shallow to deep, for models with several exits) and
    the outputs of the tapped submodules by name."""

    logits: Logits
    features: dict[str, Tensor] = field(default_factory=dict)

    def detach(self) -> "Outputs":
        logits = [x.detach() for x in self.logits] if isinstance(self.logits, list) else self.logits.detach()
        return Outputs(logits, {name: x.detach() for name, x in self.features.items()})


class FeatureTaps:
    """Forward hooks that keep the outputs of ``model``'s submodules named in ``names`` (as in
    ``model.named_modules()``, e.g. ``"features.2"``) during :meth:`run`."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        missing = [name for name in names if name not in modules]
        if missing:
            known = ", ".join(name for name in modules if name) or "none"
            raise ValueError(f"{type(model).__name__} has no submodule named {', '.join(map(repr, missing))}; "
                             f"its submodules are: {known}")
        self._features: Optional[dict[str, Tensor]] = None
        self._handles = [modules[name].register_forward_hook(self._keeper(name)) for name in dict.fromkeys(names)]

    def _keeper(self, name: str) -> Callable[..., None]:
        def keep(module: torch.nn.Module, args: Any, output: Tensor) -> None:
            if self._features is not None:  # only inside run(): other calls keep nothing alive
                self._features[name] = output
        return keep

    def run(self, model: torch.nn.Module, inputs: Tensor) -> Outputs:
        """``model(inputs)`` with the tapped features of that call."""
        self._features = {}
        try:
            logits = model(inputs)
            return Outputs(logits, self._features)
        finally:
            self._features = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class Term(torch.nn.Module):
    """A loss term: ``forward(student, teacher, target) -> scalar``. ``student_layers`` and
    ``teacher_layers`` name the submodules whose outputs it reads; ``needs_teacher`` says whether
    it reads the teacher at all."""

    needs_teacher = True

    @property
    def student_layers(self) -> tuple[str, ...]:
        return ()

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        return ()

    def forward(self, student: Outputs, teacher: Optional[Outputs], target: Tensor) -> Tensor:
        raise NotImplementedError


def cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """The mean cross-entropy over the targets that are not -100 (as the KD losses count rows):
    0, not torch's NaN, when every target is ignored."""
    total = F.cross_entropy(logits, target, label_smoothing=label_smoothing, reduction="sum")
    return total / (target != -100).sum().clamp_min(1)


class CrossEntropy(Term):
    """``weight * cross_entropy(student logits, target)``: the hard-label loss on its own (the
    student trained alone, or next to feature terms); targets of -100 are ignored."""

    needs_teacher = False

    def __init__(self, weight: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.weight = float(weight)
        self.label_smoothing = float(label_smoothing)

    def forward(self, student: Outputs, teacher: Optional[Outputs], target: Tensor) -> Tensor:
        return self.weight * cross_entropy(student.logits, target, self.label_smoothing)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, label_smoothing={self.label_smoothing}"


def _takes_target(criterion: torch.nn.Module) -> bool:
    """Whether ``criterion``'s forward takes a third positional argument."""
    parameters = inspect.signature(criterion.forward).parameters.values()
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in parameters)


class LogitDistillation(Term):
    """Response-based KD: ``criterion(student logits, teacher logits[, target])`` with any
    logit criterion of kdkernels (``KDLoss``, the default: Hinton's loss with ``alpha``,
    ``temperature`` and the hard-label CE fused in; ``DKDLoss``, ``DISTLoss``, ...).
    ``with_target``: pass the target (default: when the criterion's forward takes a third
    positional argument)."""

    def __init__(self, criterion: Optional[torch.nn.Module] = None, *, with_target: Optional[bool] = None,
                 **kd_options: Any) -> None:
        super().__init__()
        if criterion is not None and kd_options:
            raise ValueError("LogitDistillation takes a criterion or KDLoss keywords, not both")
        self.criterion = criterion if criterion is not None else kdkernels.KDLoss(**kd_options)
        self._with_target = _takes_target(self.criterion) if with_target is None else with_target

    def forward(self, student: Outputs, teacher: Optional[Outputs], target: Tensor) -> Tensor:
        if self._with_target:
            return self.criterion(student.logits, teacher.logits, target)
        return self.criterion(student.logits, teacher.logits)


class FeatureDistillation(Term):
    """Feature- or relation-based KD between the output of the student's submodule
    ``student_layer`` and the teacher's ``teacher_layer``: ``loss(student_feature,
    teacher_feature)`` with a feature loss of kdkernels (``HintLoss``, ``AttentionTransferLoss``,
    ``RKDDistanceLoss``, ``RKDAngleLoss``, ``SimilarityPreservingLoss``, ``PKTLoss``)."""

    def __init__(self, loss: torch.nn.Module, student_layer: str, teacher_layer: str) -> None:
        super().__init__()
        self.loss = loss
        self.student_layer = student_layer
        self.teacher_layer = teacher_layer

    @property
    def student_layers(self) -> tuple[str, ...]:
        return (self.student_layer,)

    @property
    def teacher_layers(self) -> tuple[str, ...]:
        return (self.teacher_layer,)

    def forward(self, student: Outputs, teacher: Optional[Outputs], target: Tensor) -> Tensor:
        return self.loss(student.features[self.student_layer], teacher.features[self.teacher_layer])

    def extra_repr(self) -> str:
        return f"student_layer={self.student_layer!r}, teacher_layer={self.teacher_layer!r}"

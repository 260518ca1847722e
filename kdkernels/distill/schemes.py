"""Distillation schemes: what one training step optimises, as an ``nn.Module`` whose forward is
the loss of a batch (so a ``DistributedDataParallel`` around it trains every model in it).

- :class:`Offline`: a frozen pre-trained teacher (eval mode, no grad); without a teacher, the
  student alone (the baseline).
- :class:`Online`: deep mutual learning, peers trained together.
- :class:`SelfTeacher`: the teacher is an EMA or previous-epoch snapshot of the student.
- :class:`DeepToShallow`: the deepest exit of a multi-exit student teaches its shallow exits.
"""

from __future__ import annotations

import copy
from typing import Mapping, Optional, Sequence, Union

import torch

import kdkernels
from kdkernels.distill.terms import (CrossEntropy, FeatureDistillation, FeatureTaps, LogitDistillation, Outputs, Term,
                                     cross_entropy)

Tensor = torch.Tensor
Metrics = dict[str, Tensor]


class Scheme(torch.nn.Module):
    """``forward(inputs, target, index) -> (loss, metrics)``: the loss of a batch (``index``: the
    samples' positions in the data set, used by caches) and its parts, detached."""

    def models(self) -> dict[str, torch.nn.Module]:
        """The trained models to evaluate on held-out data, by name."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after each optimizer step."""

    def after_epoch(self) -> None:
        """Called after each epoch."""

    def close(self) -> None:
        """Remove the scheme's forward hooks from the models (they stay usable elsewhere)."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def _labels(terms: Sequence[Term]) -> list[str]:
    """A unique metric name per term: its class (its loss's class and layer for feature terms)."""
    labels: list[str] = []
    for term in terms:
        label = (f"{type(term.loss).__name__}({term.student_layer})" if isinstance(term, FeatureDistillation)
                 else type(term).__name__)
        labels.append(label if label not in labels else f"{label}#{len(labels)}")
    return labels


class _TeacherCache:
    """The teacher's outputs per sample index, stored on first sight (for deterministic data and
    a teacher in eval mode, the outputs of later epochs would be the same)."""

    def __init__(self) -> None:
        self.filled: Optional[Tensor] = None
        self.logits: Optional[Tensor] = None
        self.features: dict[str, Tensor] = {}

    def get(self, index: Tensor) -> Optional[Outputs]:
        if self.filled is None or int(index.max()) >= len(self.filled) or not bool(self.filled[index].all()):
            return None
        return Outputs(self.logits[index], {name: x[index] for name, x in self.features.items()})

    @staticmethod
    def _grown(store: Optional[Tensor], rows: int, like: Tensor) -> Tensor:
        if store is not None and len(store) >= rows:
            return store
        grown = like.new_zeros((rows, *like.shape[1:]))
        if store is not None:
            grown[:len(store)] = store
        return grown

    def put(self, index: Tensor, outputs: Outputs) -> None:
        if isinstance(outputs.logits, list):
            raise ValueError("cache_teacher needs a teacher with one output, not a list of exits")
        rows = int(index.max()) + 1
        self.filled = self._grown(self.filled, rows, torch.zeros(1, dtype=torch.bool, device=index.device))
        self.filled[index] = True
        self.logits = self._grown(self.logits, rows, outputs.logits)
        self.logits[index] = outputs.logits
        for name, x in outputs.features.items():
            self.features[name] = self._grown(self.features.get(name), rows, x)
            self.features[name][index] = x


class Offline(Scheme):
    """A student learns from a frozen ``teacher`` (kept in eval mode, run under ``no_grad``)
    through weighted ``terms`` (default: ``LogitDistillation()``, Hinton's KD with the hard-label
    CE). Without a teacher, the student alone (default term: ``CrossEntropy()``).
    ``cache_teacher``: keep the teacher's outputs per sample (the batches must carry the sample
    indices) and run the teacher once per sample, not once per epoch (under torch.distributed
    each process caches the samples of its own shares)."""

    def __init__(self, student: torch.nn.Module, teacher: Optional[torch.nn.Module] = None,
                 terms: Optional[Sequence[Term]] = None, *, cache_teacher: bool = False) -> None:
        super().__init__()
        terms = list(terms) if terms is not None else [LogitDistillation() if teacher is not None else CrossEntropy()]
        if not terms:
            raise ValueError("terms must hold at least one loss term")
        if teacher is None and any(term.needs_teacher for term in terms):
            needing = ", ".join(label for label, term in zip(_labels(terms), terms) if term.needs_teacher)
            raise ValueError(f"the terms {needing} read a teacher, but teacher is None")
        self.student = student
        self.teacher = teacher
        self.terms = torch.nn.ModuleList(terms)
        self._labels = _labels(terms)
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self._student_taps = FeatureTaps(student, [name for term in terms for name in term.student_layers])
        self._teacher_taps = (FeatureTaps(teacher, [name for term in terms for name in term.teacher_layers])
                              if teacher is not None else None)
        self._cache = _TeacherCache() if cache_teacher else None

    def close(self) -> None:
        self._student_taps.remove()
        if self._teacher_taps is not None:
            self._teacher_taps.remove()

    def train(self, mode: bool = True) -> "Offline":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def models(self) -> dict[str, torch.nn.Module]:
        return {"student": self.student}

    def _teacher_outputs(self, inputs: Tensor, index: Optional[Tensor]) -> Outputs:
        if self._cache is not None:
            if index is None:
                raise ValueError("cache_teacher=True needs batches that carry the sample indices")
            cached = self._cache.get(index)
            if cached is not None:
                return cached
        with torch.no_grad():
            outputs = self._teacher_taps.run(self.teacher, inputs)
        if self._cache is not None:
            self._cache.put(index, outputs)
        return outputs

    def _uses_teacher(self) -> bool:
        return self.teacher is not None

    def forward(self, inputs: Tensor, target: Tensor, index: Optional[Tensor] = None) -> tuple[Tensor, Metrics]:
        student = self._student_taps.run(self.student, inputs)
        if self._uses_teacher():
            teacher = self._teacher_outputs(inputs, index)
            parts = {label: term(student, teacher, target) for label, term in zip(self._labels, self.terms)}
        else:
            parts = {label: term(student, None, target) for label, term in zip(self._labels, self.terms)
                     if not term.needs_teacher}
            parts = parts or {"CrossEntropy": CrossEntropy()(student, None, target)}
        return torch.stack(list(parts.values())).sum(), {label: part.detach() for label, part in parts.items()}


class SelfTeacher(Offline):
    """Self-distillation from a teacher that is the student's own past: an exponential moving
    average of its weights (``every="step"``, mean-teacher style, with the decay ramped up as
    ``min(decay, (1 + n) / (10 + n))`` after n updates) or a snapshot taken after each epoch
    (``every="epoch"``; ``decay=0``, its default, copies the weights: the previous-epoch
    teacher; the first epoch, with no snapshot yet, trains on the terms that need no teacher, or
    on the hard labels). The teacher runs in eval mode and is evaluated next to the student.
    Under DDP with ``every="epoch"``, terms with parameters (a hint adapter) idle in the first
    epoch: pass ``find_unused_parameters=True`` to the Trainer."""

    def __init__(self, student: torch.nn.Module, terms: Optional[Sequence[Term]] = None, *,
                 decay: Optional[float] = None, every: str = "step") -> None:
        if every not in ("step", "epoch"):
            raise ValueError(f"every must be 'step' or 'epoch', got {every!r}")
        decay = (0.999 if every == "step" else 0.0) if decay is None else decay
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        super().__init__(student, copy.deepcopy(student), terms)
        self.decay = float(decay)
        self.every = every
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self._has_teacher = every == "step"
        # Loading a state (directly or through a parent module) restores whether a snapshot exists.
        self.register_load_state_dict_post_hook(SelfTeacher._after_load)

    @staticmethod
    def _after_load(module: "SelfTeacher", incompatible_keys: object) -> None:
        module._has_teacher = module.every == "step" or int(module.updates) > 0

    def models(self) -> dict[str, torch.nn.Module]:
        return {"student": self.student, "teacher": self.teacher}

    def _uses_teacher(self) -> bool:
        return self._has_teacher

    @torch.no_grad()
    def _update(self, decay: float) -> None:
        for mean, current in zip(self.teacher.parameters(), self.student.parameters()):
            mean.lerp_(current, 1.0 - decay)
        for mean, current in zip(self.teacher.buffers(), self.student.buffers()):
            mean.copy_(current)
        self.updates += 1
        self._has_teacher = True

    def after_step(self) -> None:
        if self.every == "step":
            updates = int(self.updates)
            self._update(min(self.decay, (1 + updates) / (10 + updates)))

    def after_epoch(self) -> None:
        if self.every == "epoch":
            self._update(self.decay if int(self.updates) else 0.0)


class Online(Scheme):
    """Deep mutual learning (Zhang et al., CVPR 2018): ``peers`` trained together from scratch,
    each on ``criterion(its logits, another peer's detached logits, target)`` averaged over the
    other peers (default ``KDLoss(alpha=0.5)``: half of DML's CE + KL, at T = 1). All peers are
    updated in one step from the same predictions (the paper's algorithm updates them in turn,
    predicting again between updates)."""

    def __init__(self, peers: Union[Mapping[str, torch.nn.Module], Sequence[torch.nn.Module]],
                 criterion: Optional[torch.nn.Module] = None) -> None:
        super().__init__()
        named = dict(peers) if isinstance(peers, Mapping) else {f"peer{i}": peer for i, peer in enumerate(peers)}
        if len(named) < 2:
            raise ValueError(f"Online needs at least two peers, got {len(named)}")
        self.peers = torch.nn.ModuleDict(named)
        self.criterion = LogitDistillation(criterion) if criterion is not None else LogitDistillation(alpha=0.5)

    def models(self) -> dict[str, torch.nn.Module]:
        return dict(self.peers)

    def forward(self, inputs: Tensor, target: Tensor, index: Optional[Tensor] = None) -> tuple[Tensor, Metrics]:
        outputs = {name: Outputs(peer(inputs)) for name, peer in self.peers.items()}
        detached = {name: out.detach() for name, out in outputs.items()}
        losses = {name: torch.stack([self.criterion(out, detached[other], target) for other in outputs if other != name]
                                    ).mean() for name, out in outputs.items()}
        return torch.stack(list(losses.values())).sum(), {name: loss.detach() for name, loss in losses.items()}


class _DeepestExit(torch.nn.Module):
    """A multi-exit model seen through its deepest exit (for evaluation)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Tensor) -> Tensor:
        return self.model(inputs)[-1]


class DeepToShallow(Scheme):
    """Be Your Own Teacher (Zhang et al., ICCV 2019): ``student(inputs)`` returns the logits of
    each exit, shallow to deep; the deepest learns from the labels, each shallower exit from
    ``(1 - alpha) * CE + alpha * KL(deepest / T || exit / T)``, as the authors' code
    (``loss_coefficient=0.3``, ``temperature=3``, no T^2 factor; its soft cross-entropy differs
    from this KL by the deepest exit's entropy, a constant) plus, when ``feature_layers`` names
    one tapped submodule per exit, the paper's feature hint: ``feature_weight`` times the mean
    squared error between each exit's features and the deepest's (same shapes; the authors'
    code leaves it out)."""

    def __init__(self, student: torch.nn.Module, *, temperature: float = 3.0, alpha: float = 0.3,
                 feature_layers: Sequence[str] = (), feature_weight: float = 0.03) -> None:
        super().__init__()
        self.student = student
        self.kd = kdkernels.KDLoss(temperature=temperature, alpha=alpha, scale_by_temperature=False)
        self.feature_layers = tuple(feature_layers)
        self.feature_weight = float(feature_weight)
        self._taps = FeatureTaps(student, self.feature_layers)

    def close(self) -> None:
        self._taps.remove()

    def models(self) -> dict[str, torch.nn.Module]:
        return {"student": _DeepestExit(self.student)}

    def forward(self, inputs: Tensor, target: Tensor, index: Optional[Tensor] = None) -> tuple[Tensor, Metrics]:
        outputs = self._taps.run(self.student, inputs)
        exits = outputs.logits
        if not isinstance(exits, (list, tuple)) or len(exits) < 2:
            raise ValueError("DeepToShallow needs a student that returns a list of at least two exits' logits")
        if self.feature_layers and len(self.feature_layers) != len(exits):
            raise ValueError(f"feature_layers names {len(self.feature_layers)} submodules for {len(exits)} exits")
        deepest = exits[-1].detach()
        metrics = {f"exit{len(exits) - 1}": cross_entropy(exits[-1], target)}
        for i, logits in enumerate(exits[:-1]):
            metrics[f"exit{i}"] = self.kd(logits, deepest, target)
        if self.feature_layers:
            features = [outputs.features[name] for name in self.feature_layers]
            metrics["features"] = self.feature_weight * torch.stack(
                [kdkernels.hint_loss(shallow, features[-1].detach()) for shallow in features[:-1]]).sum()
        loss = torch.stack(list(metrics.values())).sum()
        return loss, {name: value.detach() for name, value in metrics.items()}

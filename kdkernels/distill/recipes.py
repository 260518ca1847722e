"""Distillation recipes on data that ships with installed packages (nothing is downloaded): the
data set, the teacher and student architectures, and the training settings of each.

- ``mnist1d``: MNIST-1D (Greydanus, 2020) made locally by the ``mnist1d`` package; a 1-D CNN
  teacher, a small MLP student that cannot learn shift invariance on its own.
- ``digits``: scikit-learn's 8x8 handwritten digits; Hinton et al.'s MLP set-up scaled down
  (a 1200-1200 teacher with dropout, a 32-32 student; T = 4, alpha = 0.9).
- ``features``: MNIST-1D with a 32-channel CNN student that learns from the teacher's logits, hints,
  attention maps and sample relations (KD + FitNets + AT + RKD + SP together).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

import kdkernels
from kdkernels.distill.terms import FeatureDistillation, LogitDistillation, Term

Tensor = torch.Tensor


@dataclass
class Data:
    """A classification data set split into training and held-out samples."""

    train_inputs: Tensor
    train_target: Tensor
    test_inputs: Tensor
    test_target: Tensor
    classes: int


def _split(inputs: Tensor, target: Tensor, classes: int, test_fraction: float, seed: int) -> Data:
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))
    test = order[:round(test_fraction * len(inputs))]
    train = order[len(test):]
    return Data(inputs[train], target[train], inputs[test], target[test], classes)


def mnist1d_data(cache: Optional[Path] = None, samples: int = 5000) -> Data:
    """MNIST-1D from its generator (``samples`` sequences of length 40, 80 % for training, the
    generator's own split), cached in ``cache`` when given."""
    path = cache / f"mnist1d-{samples}.pt" if cache is not None else None
    if path is not None and path.exists():
        return Data(**torch.load(path, weights_only=True))
    from mnist1d.data import get_dataset_args, make_dataset
    args = get_dataset_args()
    args.num_samples = samples
    made = make_dataset(args)
    data = Data(torch.tensor(made["x"], dtype=torch.float32), torch.tensor(made["y"], dtype=torch.long),
                torch.tensor(made["x_test"], dtype=torch.float32), torch.tensor(made["y_test"], dtype=torch.long), 10)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(vars(data), path)
    return data


def digits_data(cache: Optional[Path] = None) -> Data:
    """scikit-learn's 1797 handwritten digits (8x8, scaled to [0, 1]), 20 % held out."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    return _split(inputs, torch.tensor(digits.target, dtype=torch.long), 10, 0.2, seed=0)


class MLP(torch.nn.Module):
    """Fully connected ReLU layers (``layers.i``: linear, ReLU, dropout) and a linear ``head``.
    With ``exits``, every hidden layer but the last also gets a linear head (``exit_heads.i``) and
    the forward returns the logits of all exits, shallow to deep (for deep-to-shallow
    self-distillation)."""

    def __init__(self, inputs: int, hidden: Sequence[int], classes: int, *, dropout: float = 0.0,
                 input_dropout: float = 0.0, exits: bool = False) -> None:
        super().__init__()
        widths = [inputs, *hidden]
        self.input_dropout = torch.nn.Dropout(input_dropout)
        self.layers = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(a, b), torch.nn.ReLU(), torch.nn.Dropout(dropout))
            for a, b in zip(widths, widths[1:]))
        self.head = torch.nn.Linear(widths[-1], classes)
        self.exit_heads = torch.nn.ModuleList(torch.nn.Linear(width, classes) for width in hidden[:-1]) if exits else None

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        x = self.input_dropout(x.flatten(1))
        exits = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.exit_heads is not None and i < len(self.exit_heads):
                exits.append(self.exit_heads[i](x))
        logits = self.head(x)
        return exits + [logits] if self.exit_heads is not None else logits


class ConvNet1d(torch.nn.Module):
    """Three strided 1-D convolutions with ReLU (``features.0`` to ``features.2``; length 40 →
    20 → 10 → 5) and a linear ``head`` on the flattened maps."""

    def __init__(self, channels: int, classes: int = 10, length: int = 40) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Sequential(torch.nn.Conv1d(1, channels, 5, stride=2, padding=2), torch.nn.ReLU()),
            torch.nn.Sequential(torch.nn.Conv1d(channels, channels, 3, stride=2, padding=1), torch.nn.ReLU()),
            torch.nn.Sequential(torch.nn.Conv1d(channels, channels, 3, stride=2, padding=1), torch.nn.ReLU()))
        self.head = torch.nn.Linear(channels * ((length + 7) // 8), classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x.unsqueeze(1)).flatten(1))


@dataclass(frozen=True)
class Recipe:
    """One distillation experiment: data, models and training settings. ``student(exits)``
    builds the student (with auxiliary exits for deep-to-shallow self-distillation when the
    architecture has them); ``feature_terms()`` adds terms to the offline logit KD."""

    name: str
    data: Callable[[Optional[Path]], Data]
    teacher: Callable[[], torch.nn.Module]
    student: Callable[[bool], torch.nn.Module]
    teacher_epochs: int
    epochs: int
    batch_size: int = 128
    lr: float = 3e-3
    teacher_lr: float = 3e-3
    weight_decay: float = 1e-2
    temperature: float = 4.0
    alpha: float = 0.9
    feature_terms: Callable[[], list[Term]] = field(default=lambda: [])

    def distillation_terms(self) -> list[Term]:
        return [LogitDistillation(temperature=self.temperature, alpha=self.alpha), *self.feature_terms()]


def _feature_terms() -> list[Term]:
    """Hints from the middle block (a 1x1 adapter from 32 to 128 channels), attention maps of the
    last block, and RKD distances and angles and SP between the last blocks' maps. The weights are
    a tenth of the papers' (FitNets 1, AT 1000 for the mean form, RKD 25 and 50, SP 3000): at the
    papers' weights the feature terms outweigh the logit term for this small student."""
    return [FeatureDistillation(kdkernels.HintLoss(kdkernels.HintAdapter(32, 128), weight=0.1), "features.1", "features.1"),
            FeatureDistillation(kdkernels.AttentionTransferLoss(weight=100.0), "features.2", "features.2"),
            FeatureDistillation(kdkernels.RKDDistanceLoss(weight=2.5), "features.2", "features.2"),
            FeatureDistillation(kdkernels.RKDAngleLoss(weight=5.0), "features.2", "features.2"),
            FeatureDistillation(kdkernels.SimilarityPreservingLoss(weight=300.0), "features.2", "features.2")]


RECIPES: dict[str, Recipe] = {
    "mnist1d": Recipe("mnist1d", mnist1d_data, teacher=lambda: ConvNet1d(128),
                      student=lambda exits: MLP(40, [256, 256], 10, exits=exits), teacher_epochs=40, epochs=80),
    "digits": Recipe("digits", digits_data,
                     teacher=lambda: MLP(64, [1200, 1200], 10, dropout=0.5, input_dropout=0.2),
                     student=lambda exits: MLP(64, [32, 32], 10, exits=exits), teacher_epochs=60, epochs=100,
                     batch_size=64, teacher_lr=1e-3),
    "features": Recipe("features", mnist1d_data, teacher=lambda: ConvNet1d(128),
                       student=lambda exits: ConvNet1d(32), teacher_epochs=40, epochs=60, temperature=2.0,
                       alpha=0.5, feature_terms=_feature_terms),
}

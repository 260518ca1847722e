"""``kdkernels distill``: train a recipe's teacher (once, kept in the output directory), then the
student alone and the student with distillation over several seeds; print a table (held-out
accuracy mean ± std, parameters, inference latency) and write JSON and CSV logs and PNG curves."""

from __future__ import annotations

import csv
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

import kdkernels
from kdkernels.distill.recipes import RECIPES, Data, Recipe
from kdkernels.distill.schemes import DeepToShallow, Offline, Online, Scheme, SelfTeacher
from kdkernels.distill.trainer import Batches, Record, Trainer, cosine_with_warmup

MODES = ("offline", "online", "self")
SELF_TEACHERS = ("ema", "epoch", "byot")
LATENCY_BATCH = 256


@dataclass
class Run:
    """One trained model of the experiment."""

    role: str
    seed: int
    history: list[Record]
    model: torch.nn.Module
    model_name: str = "student"

    @property
    def accuracy(self) -> float:
        return self.history[-1][f"val/accuracy/{self.model_name}"]


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _latency_ms(model: torch.nn.Module, inputs: torch.Tensor, repeats: int = 30) -> float:
    """Median wall time of one forward pass over ``inputs`` in eval mode."""
    model.eval()
    times = []
    for i in range(repeats + 5):
        if inputs.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(inputs)
        if inputs.is_cuda:
            torch.cuda.synchronize()
        if i >= 5:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


class Experiment:
    """The runs of ``kdkernels distill`` for one recipe and mode, under ``out``."""

    def __init__(self, recipe: Recipe, *, mode: str = "offline", self_teacher: str = "ema",
                 epochs: Optional[int] = None, teacher_epochs: Optional[int] = None, seeds: int = 3,
                 device: str = "cpu", amp: bool = False, out: Path = Path("kdkernels-runs"), resume: bool = False, progress: bool = True,
                 log: Callable[[str], None] = print) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if self_teacher not in SELF_TEACHERS:
            raise ValueError(f"self_teacher must be one of {', '.join(SELF_TEACHERS)}, got {self_teacher!r}")
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {seeds}")
        self.recipe, self.mode, self.self_teacher = recipe, mode, self_teacher
        self.epochs = epochs if epochs is not None else recipe.epochs
        self.teacher_epochs = teacher_epochs if teacher_epochs is not None else recipe.teacher_epochs
        if min(self.epochs, self.teacher_epochs) < 1:
            raise ValueError(f"epochs and teacher_epochs must be >= 1, got {self.epochs} and {self.teacher_epochs}")
        self.seeds, self.device, self.resume, self.progress, self.log = seeds, torch.device(device), resume, progress, log
        self.amp = torch.bfloat16 if amp else None
        self.out = Path(out) / recipe.name
        self.data: Data = recipe.data(Path(out))

    def _train(self, scheme: Scheme, directory: str, epochs: int, seed: int, resume: bool,
               lr: Optional[float] = None) -> list[Record]:
        recipe, data = self.recipe, self.data
        train = Batches(data.train_inputs, data.train_target, recipe.batch_size, shuffle=True, seed=seed)
        test = Batches(data.test_inputs, data.test_target, 1024)
        optimizer = torch.optim.AdamW(scheme.trainable_parameters(), lr=lr or recipe.lr, weight_decay=recipe.weight_decay)
        scheduler = cosine_with_warmup(optimizer, epochs * len(train), warmup_steps=len(train))
        trainer = Trainer(scheme, optimizer, scheduler, device=self.device, amp=self.amp,
                          checkpoint_dir=self.out / directory, progress=self.progress)
        started = time.perf_counter()
        history = trainer.fit(train, test, epochs=epochs, resume=resume)
        scheme.close()
        accuracies = ", ".join(f"{key.rsplit('/', 1)[-1]} {100 * value:.2f} %" for key, value in history[-1].items()
                               if key.startswith("val/accuracy/"))
        self.log(f"{directory}: {epochs} epochs, held-out accuracy {accuracies} ({time.perf_counter() - started:.1f} s)")
        return history

    def _student(self, seed: int, exits: bool = False) -> torch.nn.Module:
        torch.manual_seed(seed)
        return self.recipe.student(exits)

    def teacher(self) -> Run:
        """The recipe's teacher, trained alone with seed 0 (reused when its run is complete)."""
        torch.manual_seed(0)
        scheme = Offline(self.recipe.teacher())
        history = self._train(scheme, f"teacher-e{self.teacher_epochs}{self._precision}", self.teacher_epochs, 0,
                              resume=True, lr=self.recipe.teacher_lr)
        return Run("teacher", 0, history, scheme.student)

    def alone(self, seed: int) -> Run:
        scheme = Offline(self._student(seed))
        return Run("student alone", seed, self._train(scheme, f"alone-e{self.epochs}{self._precision}-s{seed}",
                                                         self.epochs, seed, self.resume), scheme.student)

    def distilled(self, seed: int, teacher: Optional[torch.nn.Module]) -> tuple[Run, Optional[Run]]:
        """The distilled student of ``seed`` and, for online distillation, its peer."""
        recipe = self.recipe
        if self.mode == "offline":
            scheme = Offline(self._student(seed), teacher, recipe.distillation_terms(), cache_teacher=True)
        elif self.mode == "online":
            student = self._student(seed)
            scheme = Online({"student": student, "peer": recipe.teacher()},
                            kdkernels.KDLoss(temperature=recipe.temperature, alpha=0.5))
        elif self.self_teacher == "byot":
            scheme = DeepToShallow(self._student(seed, exits=True))
        else:
            scheme = SelfTeacher(self._student(seed), recipe.distillation_terms()[:1],
                                 every="step" if self.self_teacher == "ema" else "epoch")
        # A distilled run's name says which teacher it learned from.
        teacher_epochs = f"-t{self.teacher_epochs}" if self.mode == "offline" else ""
        history = self._train(scheme, f"{self.label}{teacher_epochs}-e{self.epochs}{self._precision}-s{seed}",
                              self.epochs, seed, self.resume)
        models = scheme.models()
        peer = Run("peer", seed, history, models["peer"], "peer") if "peer" in models else None
        # A multi-exit student is timed and counted with its exit heads.
        student = scheme.student if isinstance(scheme, DeepToShallow) else models["student"]
        return Run("distilled student", seed, history, student), peer

    def run(self) -> tuple[dict, list[Run]]:
        """All runs, and the summary of them that :meth:`write` stores."""
        teacher = self.teacher() if self.mode == "offline" else None
        runs: list[Run] = [teacher] if teacher is not None else []
        for seed in range(self.seeds):
            runs.append(self.alone(seed))
            distilled, peer = self.distilled(seed, teacher.model if teacher is not None else None)
            runs += [distilled] + ([peer] if peer is not None else [])
        return self.summary(runs), runs

    def summary(self, runs: list[Run]) -> dict:
        sample = self.data.test_inputs[:LATENCY_BATCH].to(self.device)
        rows = []
        for role in dict.fromkeys(run.role for run in runs):
            group = [run for run in runs if run.role == role]
            accuracies = [run.accuracy for run in group]
            model = group[0].model
            rows.append({"model": role, "architecture": type(model).__name__, "accuracies": accuracies,
                         "mean": statistics.mean(accuracies),
                         "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                         "parameters": _parameters(model), "latency_ms": _latency_ms(model, sample)})
        by_role = {row["model"]: row for row in rows}
        alone, distilled = by_role["student alone"], by_role["distilled student"]
        return {
            "recipe": self.recipe.name, "mode": self.mode,
            "self_teacher": self.self_teacher if self.mode == "self" else None,
            "epochs": self.epochs, "teacher_epochs": self.teacher_epochs, "seeds": self.seeds,
            "temperature": self.recipe.temperature, "alpha": self.recipe.alpha,
            "train_samples": len(self.data.train_inputs), "test_samples": len(self.data.test_inputs),
            "latency_batch": LATENCY_BATCH, "device": str(self.device), "torch": torch.__version__,
            "kdkernels": kdkernels.__version__, "python": platform.python_version(),
            "rows": rows,
            "margin": distilled["mean"] - alone["mean"],
            "seeds_better": sum(d > a for d, a in zip(distilled["accuracies"], alone["accuracies"])),
        }

    @property
    def _precision(self) -> str:
        return "-bf16" if self.amp is not None else ""

    @property
    def label(self) -> str:
        """The mode as runs and logs are named: offline, online, self-ema, self-epoch, self-byot."""
        return self.mode if self.mode != "self" else f"self-{self.self_teacher}"

    def write(self, summary: dict, runs: list[Run]) -> list[Path]:
        """summary.json, history.csv (every epoch of every run) and curves.png in ``out/RECIPE/MODE``."""
        directory = self.out / self.label
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        keys = sorted({key for run in runs for record in run.history for key in record})
        with open(directory / "history.csv", "w", newline="") as file:
            writer = csv.DictWriter(file, ["model", "seed", *keys])
            writer.writeheader()
            for run in runs:
                for record in run.history:
                    writer.writerow({"model": run.role, "seed": run.seed, **record})
        written = [directory / "summary.json", directory / "history.csv"]
        if _plot(runs, directory / "curves.png", f"{self.recipe.name}, {self.label}"):
            written.append(directory / "curves.png")
        return written


def _plot(runs: list[Run], path: Path, title: str) -> bool:
    """Training loss, held-out loss and accuracy per epoch, averaged over seeds per model role;
    False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = (("train/loss", "training loss"), ("val/loss/", "held-out loss"), ("val/accuracy/", "held-out accuracy"))
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for role in dict.fromkeys(run.role for run in runs):
        group = [run for run in runs if run.role == role]
        for axis, (key, label) in zip(axes, panels):
            column = key if key == "train/loss" else key + group[0].model_name
            curves = torch.tensor([[record[column] for record in run.history] for run in group])
            axis.plot(range(1, curves.shape[1] + 1), curves.mean(0).tolist(), label=f"{role} ({len(group)})")
            axis.set_title(label)
            axis.set_xlabel("epoch")
    axes[0].set_yscale("log")
    axes[2].legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def format_table(summary: dict) -> str:
    """The summary as a plain-text table."""
    lines = [f"{summary['recipe']} ({summary['mode']}{', ' + summary['self_teacher'] if summary['self_teacher'] else ''}):"
             f" {summary['seeds']} seeds, {summary['epochs']} epochs, {summary['train_samples']} training and "
             f"{summary['test_samples']} held-out samples, {summary['device']}",
             f"{'model':<20} {'architecture':<12} {'held-out accuracy':>20} {'parameters':>11} "
             f"{'ms / ' + str(summary['latency_batch']) + ' samples':>16}"]
    for row in summary["rows"]:
        accuracy = f"{100 * row['mean']:.2f}" + (f" ± {100 * row['std']:.2f}" if len(row["accuracies"]) > 1 else "")
        lines.append(f"{row['model']:<20} {row['architecture']:<12} {accuracy + ' %':>20} {row['parameters']:>11,} "
                     f"{row['latency_ms']:>16.3f}")
    lines.append(f"distilled − alone: {100 * summary['margin']:+.2f} points (better on {summary['seeds_better']} of "
                 f"{summary['seeds']} seeds)")
    return "\n".join(lines)


def main(recipe: str, **options) -> dict:
    """Run, print the table, write the logs; returns the summary."""
    experiment = Experiment(RECIPES[recipe], **options)
    summary, runs = experiment.run()
    print(format_table(summary))
    for path in experiment.write(summary, runs):
        print(f"wrote {path}")
    return summary

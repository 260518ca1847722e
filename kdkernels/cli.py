"""The `kdkernels` command: `info` (versions, live backends), `bench` (kdkernels against the
reference, side by side) and `distill` (a distillation recipe on built-in data)."""

from __future__ import annotations

import argparse
import platform
from pathlib import Path
from typing import Optional

import torch

import kdkernels
from kdkernels import benchmark
from kdkernels.ops import extension


def info() -> int:
    print(f"kdkernels {kdkernels.__version__}")
    print(f"python    {platform.python_version()} ({platform.machine()})")
    print(f"torch     {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton
        print(f"triton    {triton.__version__}")
    except ImportError:
        print("triton    not installed")
    module = extension.compiled()
    if module is None:
        print(f"compiled extension: MISSING ({extension.load_error})")
    else:
        print(f"compiled extension: {module.__file__} (CUDA kernels: {'yes' if module.with_cuda else 'no'})")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        print(f"backends on {device}: {', '.join(kdkernels.available_backends(device))}")
    return 0 if module is not None else 1


def add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    # The recipe names without importing the trainer's optional dependencies.
    parser.add_argument("--recipe", default="mnist1d", choices=("mnist1d", "digits", "features"),
                        help="data set and models (default: mnist1d)")
    parser.add_argument("--mode", default="offline", choices=("offline", "online", "self"),
                        help="offline: frozen teacher; online: deep mutual learning; self: self-distillation")
    parser.add_argument("--self-teacher", default="ema", choices=("ema", "epoch", "byot"),
                        help="with --mode self: EMA of the student, previous-epoch snapshot, or deep-to-shallow exits")
    parser.add_argument("--epochs", type=int, default=None, help="student epochs (default: the recipe's)")
    parser.add_argument("--teacher-epochs", type=int, default=None, help="teacher epochs (default: the recipe's)")
    parser.add_argument("--seeds", type=int, default=3, help="student seeds (default: 3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--out", type=Path, default=Path("kdkernels-runs"), help="checkpoints, logs and plots")
    parser.add_argument("--resume", action="store_true", help="continue unfinished runs, reuse finished ones")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="kdkernels", description="Fused knowledge-distillation kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions and the backends that are live")
    bench = commands.add_parser("bench", help="time and memory of kd_loss against the reference")
    benchmark.add_arguments(bench)
    distill = commands.add_parser("distill", help="train a recipe's teacher and its student with and without KD")
    add_distill_arguments(distill)
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "distill":
        from kdkernels.distill import experiment
        experiment.main(args.recipe, mode=args.mode, self_teacher=args.self_teacher, epochs=args.epochs,
                        teacher_epochs=args.teacher_epochs, seeds=args.seeds, device=args.device, amp=args.amp,
                        out=args.out, resume=args.resume, progress=not args.no_progress)
        return 0
    benchmark.run_from_args(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

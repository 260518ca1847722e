"""The `kdkernels` command: `info` (versions, live backends) and `bench` (kdkernels against
the reference, side by side)."""

from __future__ import annotations

import argparse
import platform
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


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="kdkernels", description="Fused knowledge-distillation kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions and the backends that are live")
    bench = commands.add_parser("bench", help="time and memory of kd_loss against the reference")
    benchmark.add_arguments(bench)
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    benchmark.run_from_args(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

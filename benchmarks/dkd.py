"""dkd_loss forward + backward against its eager reference and torch.compile of it, at the shapes
of classification distillation (N in {256, 4096}, V in {100, 1000}); median times and ratios,
optionally written as JSON. CPU by default; --device cuda times the Triton kernel with CUDA events.

    python benchmarks/dkd.py --json benchmarks/results/cpu_dkd.json"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import kdkernels
from kdkernels import reference
from kdkernels.benchmark import cuda_seconds, environment

OPTIONS = dict(alpha=1.0, beta=8.0, temperature=4.0)


def _time(fn, device: str, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            times.append(cuda_seconds(fn))
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    compiled = torch.compile(reference.dkd_loss, dynamic=False)
    impls = {"kdkernels": kdkernels.dkd_loss, "reference": reference.dkd_loss, "reference_compiled": compiled}
    results = []
    print("| N x V | kdkernels ms | reference ms | compiled ms | reference / kdkernels | compiled / kdkernels |")
    print("|---|---:|---:|---:|---:|---:|")
    for rows in (256, 4096):
        for vocab in (100, 1000):
            generator = torch.Generator(device=args.device).manual_seed(0)
            student = torch.randn(rows, vocab, device=args.device, generator=generator).mul_(3).requires_grad_()
            teacher = torch.randn(rows, vocab, device=args.device, generator=generator).mul_(3)
            target = torch.randint(0, vocab, (rows,), device=args.device, generator=generator)

            def step(fn):
                def run():
                    student.grad = None
                    fn(student, teacher, target, **OPTIONS).backward()
                return run

            times = {name: _time(step(fn), args.device, args.repeats) for name, fn in impls.items()}
            results.append({"rows": rows, "vocab": vocab, "median_ms": times})
            print(f"| {rows} x {vocab} | {times['kdkernels']:.3f} | {times['reference']:.3f} | "
                  f"{times['reference_compiled']:.3f} | {times['reference'] / times['kdkernels']:.1f}x | "
                  f"{times['reference_compiled'] / times['kdkernels']:.1f}x |", flush=True)
    if args.json_path:
        with open(args.json_path, "w") as out:
            json.dump({"environment": environment(args.device), "options": OPTIONS, "results": results}, out, indent=2)


if __name__ == "__main__":
    main()

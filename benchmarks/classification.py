"""The classification-logit losses (dkd_loss, dist_loss) forward + backward against their eager
references and torch.compile of them, at the shapes of classification distillation (N in
{256, 4096}, C in {100, 1000}); median times and ratios, optionally written as JSON. CPU by
default; --device cuda times the Triton kernels with CUDA events.

    python benchmarks/classification.py --json benchmarks/results/cpu_classification.json"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import kdkernels
from kdkernels import reference
from kdkernels.benchmark import environment, step_seconds

LOSSES = {
    "dkd": (kdkernels.dkd_loss, reference.dkd_loss, dict(alpha=1.0, beta=8.0, temperature=4.0)),
    "dist": (kdkernels.dist_loss, reference.dist_loss, dict(beta=1.0, gamma=1.0, temperature=4.0)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    results = []
    print("| loss | N x C | kdkernels ms | reference ms | compiled ms | reference / kdkernels | compiled / kdkernels |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for loss, (ours, eager, options) in LOSSES.items():
        impls = {"kdkernels": ours, "reference": eager, "reference_compiled": torch.compile(eager, dynamic=False)}
        for rows in (256, 4096):
            for classes in (100, 1000):
                generator = torch.Generator(device=args.device).manual_seed(0)
                student = torch.randn(rows, classes, device=args.device, generator=generator).mul_(3).requires_grad_()
                teacher = torch.randn(rows, classes, device=args.device, generator=generator).mul_(3)
                target = torch.randint(0, classes, (rows,), device=args.device, generator=generator)
                inputs = (student, teacher, target) if loss == "dkd" else (student, teacher)

                def step(fn):
                    def run(_: int) -> None:
                        student.grad = None
                        fn(*inputs, **options).backward()
                    return run

                times = {name: statistics.median(step_seconds(step(fn), args.device, args.repeats)) * 1e3
                         for name, fn in impls.items()}
                results.append({"loss": loss, "rows": rows, "classes": classes, "median_ms": times})
                print(f"| {loss} | {rows} x {classes} | {times['kdkernels']:.3f} | {times['reference']:.3f} | "
                      f"{times['reference_compiled']:.3f} | {times['reference'] / times['kdkernels']:.1f}x | "
                      f"{times['reference_compiled'] / times['kdkernels']:.1f}x |", flush=True)
    if args.json_path:
        options = {loss: spec[2] for loss, spec in LOSSES.items()}
        with open(args.json_path, "w") as out:
            json.dump({"environment": environment(args.device), "options": options, "results": results}, out, indent=2)


if __name__ == "__main__":
    main()

"""The relation losses (RKD distance and angle, SP, PKT) and the feature losses (hint, attention
transfer) forward + backward against their eager references (the authors' code): median time and
peak memory above the inputs at N in {128, 512, 1024} and D in {512, 25088} (a flattened ResNet
layer4 map, [512, 7, 7] for attention transfer; [32, 4, 4] at D = 512), plus N = 512, D = 2048
([128, 4, 4]); fp32 features, teacher of the same size. The reference RKD-angle builds [N, N, D]
differences: it is run only where they fit in --reference-gib (the skip is printed with the bytes
it would need). CPU by default (peak memory from the process's RSS high-water mark); --device cuda
times the Triton kernels with CUDA events.

    python benchmarks/relation.py --json benchmarks/results/cpu_relation.json
    python benchmarks/relation.py --losses hint attention_transfer --json benchmarks/results/cpu_feature.json"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

import kdkernels
from kdkernels import reference
from kdkernels.benchmark import environment, peak_bytes, step_seconds

RELATION_LOSSES = ("rkd_distance", "rkd_angle", "similarity_preserving", "pkt")
LOSSES = {
    **{name: (getattr(kdkernels, f"{name}_loss"), getattr(reference, f"{name}_loss")) for name in RELATION_LOSSES},
    "hint": (kdkernels.hint_loss, reference.hint_loss),
    "attention_transfer": (kdkernels.attention_transfer_loss,
                           lambda s, t: reference.attention_transfer_loss([s], [t])),
}
SHAPES = [(n, d) for d in (512, 25088) for n in (128, 512, 1024)] + [(512, 2048)]
MAPS = {512: (32, 4, 4), 2048: (128, 4, 4), 25088: (512, 7, 7)}


def reference_bytes(loss: str, rows: int, features: int) -> int:
    """What the reference needs at least: four [N, N, D] fp32 tensors for the angles (differences,
    normalised differences and their gradients), a few [N, N] matrices otherwise."""
    return 4 * rows * rows * features * 4 if loss == "rkd_angle" else 8 * rows * rows * 4


def measure(loss_fn, student: torch.Tensor, device: str, repeats: int) -> dict:
    """Peak (from a first, warm-up call) and median time of forward + backward; one timed call only
    when a call takes over 5 s."""
    def step(_: int = 0) -> None:
        student.grad = None
        loss_fn().backward()

    student.grad = None  # every implementation's peak then counts the gradient it writes
    begin = time.perf_counter()
    peak = peak_bytes(step, device)
    slow = time.perf_counter() - begin > 5
    median = statistics.median(step_seconds(step, device, 1 if slow else repeats)) * 1e3
    return {"median_ms": median, "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--losses", nargs="+", choices=list(LOSSES), default=list(RELATION_LOSSES))
    parser.add_argument("--reference-gib", type=float, default=12.0)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    if args.device == "cpu" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc then returns freed buffers at once, so that RSS follows the live tensors.
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
    small = torch.randn(16, 8, 2, 2, device=args.device, requires_grad=True)
    for loss in args.losses:  # one-time initialisation (libraries, thread pools) outside the measurements
        for function in LOSSES[loss]:
            function(small, small.detach()).backward()
    results = []
    print("| loss | N x D | kdkernels ms | reference ms | kdkernels MiB | reference MiB | time ratio | memory ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for rows, features in SHAPES:
        generator = torch.Generator(device=args.device).manual_seed(0)
        student = torch.randn(rows, *MAPS[features], device=args.device, generator=generator).requires_grad_()
        teacher = torch.randn(rows, *MAPS[features], device=args.device, generator=generator)
        for loss in args.losses:
            ours, eager = LOSSES[loss]
            row = {"loss": loss, "rows": rows, "features": features,
                   "kdkernels": measure(lambda: ours(student, teacher), student, args.device, args.repeats)}
            needed = reference_bytes(loss, rows, features)
            if needed <= args.reference_gib * 2**30:
                row["reference"] = measure(lambda: eager(student, teacher), student, args.device, args.repeats)
            else:
                row["reference"] = {"skipped": f"needs at least {needed / 2**30:.0f} GiB"}
            results.append(row)
            mine, theirs = row["kdkernels"], row["reference"]
            if "skipped" in theirs:
                print(f"| {loss} | {rows} x {features} | {mine['median_ms']:.1f} | {theirs['skipped']} | "
                      f"{mine['peak_bytes'] / 2**20:.0f} | | | |", flush=True)
                continue
            print(f"| {loss} | {rows} x {features} | {mine['median_ms']:.1f} | {theirs['median_ms']:.1f} | "
                  f"{mine['peak_bytes'] / 2**20:.1f} | {theirs['peak_bytes'] / 2**20:.1f} | "
                  f"{theirs['median_ms'] / mine['median_ms']:.2f}x faster | "
                  f"{theirs['peak_bytes'] / max(mine['peak_bytes'], 1):.1f}x less |", flush=True)
    if args.json_path:
        with open(args.json_path, "w") as out:
            json.dump({"environment": environment(args.device), "dtype": "float32", "results": results}, out,
                      indent=2)


if __name__ == "__main__":
    main()

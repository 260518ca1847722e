"""topk_kd_loss forward + backward against its eager reference and torch.compile of it, and against
the dense path it replaces (kd_loss on full teacher logits): median time and peak memory above the
inputs, at N = 512 rows, V in {32000, 128256}, k = 64, fp32, both tails; plus the bytes of a top-k
store (int32 ids + fp16 logprobs) against full fp16 teacher logits. CPU by default (peak memory
from the process's RSS high-water mark); --device cuda times the Triton kernel with CUDA events.

    python benchmarks/topk.py --json benchmarks/results/cpu_topk.json"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

import kdkernels
from kdkernels import reference
from kdkernels.benchmark import environment, peak_bytes, step_seconds

OPTIONS = dict(temperature=2.0, alpha=0.5)
K = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    if args.device == "cpu" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc then returns freed buffers at once, so that RSS follows the live tensors.
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
    compiled_reference = torch.compile(reference.topk_kd_loss, dynamic=False)
    results = []
    print("| V | tail | implementation | fwd+bwd ms | peak MiB | time / kdkernels | peak / kdkernels |")
    print("|---|---|---|---:|---:|---:|---:|")
    for vocab in args.vocab:
        generator = torch.Generator(device=args.device).manual_seed(0)
        student = torch.randn(args.rows, vocab, device=args.device, generator=generator).mul_(2).requires_grad_()
        teacher = torch.randn(args.rows, vocab, device=args.device, generator=generator).mul_(2)
        target = torch.randint(0, vocab, (args.rows,), device=args.device, generator=generator)
        logprobs, ids = teacher.log_softmax(-1).topk(K, dim=-1)
        ids, logprobs = ids.int(), logprobs.half()
        store_ratio = (ids.nbytes + logprobs.nbytes) / (args.rows * vocab * 2)
        for tail in ("renormalize", "bucket"):
            impls = {
                "kdkernels": lambda: kdkernels.topk_kd_loss(student, ids, logprobs, target, tail=tail, **OPTIONS),
                "reference": lambda: reference.topk_kd_loss(student, ids, logprobs, target, tail=tail, **OPTIONS),
                "reference_compiled": lambda: compiled_reference(student, ids, logprobs, target, tail=tail, **OPTIONS),
                "dense kd_loss": lambda: kdkernels.kd_loss(student, teacher, target, **OPTIONS),
            }
            rows = {}
            for name, loss_fn in impls.items():
                def step(_: int = 0) -> None:
                    student.grad = None
                    loss_fn().backward()

                median = statistics.median(step_seconds(step, args.device, args.repeats)) * 1e3
                student.grad = None
                rows[name] = {"median_ms": median, "peak_bytes": peak_bytes(step, args.device)}
            ours = rows["kdkernels"]
            for name, row in rows.items():
                print(f"| {vocab} | {tail} | {name} | {row['median_ms']:.1f} | {row['peak_bytes'] / 2**20:.0f} | "
                      f"{row['median_ms'] / ours['median_ms']:.2f}x | {row['peak_bytes'] / ours['peak_bytes']:.1f}x |",
                      flush=True)
            results.append({"rows": args.rows, "vocab": vocab, "k": K, "tail": tail, "store_bytes_vs_fp16_logits":
                            store_ratio, "results": rows})
        print(f"top-{K} store (int32 ids + fp16 logprobs) at V = {vocab}: {100 * store_ratio:.2f} % of fp16 logits")
    if args.json_path:
        with open(args.json_path, "w") as out:
            json.dump({"environment": environment(args.device), "options": OPTIONS, "results": results}, out, indent=2)


if __name__ == "__main__":
    main()

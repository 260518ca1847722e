"""Benchmark of the loss step of LLM distillation from hidden states: fused_linear_kd_loss against
the unfused path (both LM heads materialise the full logits, then kd_loss) and against the
reference (the same heads, then kdkernels.reference.kd_loss); and, against a teacher stored as its
top-64 (int32 ids, fp16 logprobs, tail="bucket"), fused_linear_topk_kd_loss against its unfused
path (the student head's full logits, then topk_kd_loss). Forward + backward time and peak memory
above the inputs, gradients of the student's hidden states and head weight included.

Each CPU measurement runs in a fresh process, as in kdkernels.benchmark."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Callable, Optional

import torch

import kdkernels
from kdkernels import reference
from kdkernels.benchmark import DTYPES, environment, reset_peak_rss, rss_bytes, step_seconds

IMPLEMENTATIONS = ("unfused", "fused", "reference", "unfused_topk", "fused_topk")
LOSS_OPTIONS = dict(temperature=2.0, alpha=0.5)
TOPK = 64


def _baseline(impl: str) -> str:
    """The unfused path that an implementation is compared with."""
    return "unfused_topk" if impl.endswith("topk") else "unfused"


def _loss_fn(impl: str) -> Callable[..., torch.Tensor]:
    def unfused(loss: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def step(h_s, w_s, h_t, w_t, y):
            logits_s = torch.nn.functional.linear(h_s, w_s)
            with torch.no_grad():
                logits_t = torch.nn.functional.linear(h_t, w_t)
            return loss(logits_s, logits_t, y, **LOSS_OPTIONS)
        return step

    if impl == "fused":
        return lambda h_s, w_s, h_t, w_t, y: kdkernels.fused_linear_kd_loss(h_s, w_s, h_t, w_t, y, **LOSS_OPTIONS)
    if impl == "unfused":
        return unfused(kdkernels.kd_loss)
    if impl == "reference":
        return unfused(reference.kd_loss)
    if impl == "fused_topk":
        return lambda h_s, w_s, ids, logprobs, y: kdkernels.fused_linear_topk_kd_loss(
            h_s, w_s, ids, logprobs, y, tail="bucket", **LOSS_OPTIONS)
    if impl == "unfused_topk":
        return lambda h_s, w_s, ids, logprobs, y: kdkernels.topk_kd_loss(
            torch.nn.functional.linear(h_s, w_s), ids, logprobs, y, tail="bucket", **LOSS_OPTIONS)
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {impl!r}")


def measure(impl: str, rows: int, hidden: int, vocab: int, dtype: str, device: str, repeats: int) -> dict:
    """Median forward+backward time and peak memory above the inputs of one configuration."""
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, device=device, generator=generator) * scale).to(DTYPES[dtype])

    h_s, w_s = randn(rows, hidden, scale=1.0).requires_grad_(), randn(vocab, hidden, scale=0.05).requires_grad_()
    h_t, w_t = randn(rows, hidden, scale=1.0), randn(vocab, hidden, scale=0.05)
    target = torch.randint(0, vocab, (rows,), device=device, generator=generator)
    teacher: tuple[torch.Tensor, ...] = (h_t, w_t)
    if impl.endswith("topk"):
        with torch.no_grad():
            logprobs, ids = torch.nn.functional.linear(h_t, w_t).float().log_softmax(-1).topk(TOPK, dim=-1)
        teacher = (ids.int(), logprobs.half())
        del h_t, w_t
    fn = _loss_fn(impl)

    def step() -> None:
        h_s.grad = w_s.grad = None
        fn(h_s, w_s, *teacher, target).backward()

    times = step_seconds(lambda _: step(), device, repeats)
    h_s.grad = w_s.grad = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = rss_bytes("VmRSS")
        peak = -1
        if reset_peak_rss():
            step()
            peak = rss_bytes("VmHWM") - base
    logits_bytes = rows * vocab * h_s.element_size()
    return {"impl": impl, "rows": rows, "hidden": hidden, "vocab": vocab, "dtype": dtype, "device": device,
            "median_ms": statistics.median(times) * 1e3, "times_ms": [t * 1e3 for t in times], "peak_bytes": peak,
            "peak_in_logits": peak / logits_bytes if peak >= 0 else None}


def _measure_in_subprocess(impl: str, rows: int, hidden: int, vocab: int, dtype: str, repeats: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    command = [sys.executable, "-m", "kdkernels.benchmark_fused_linear", "--measure", impl, "--rows", str(rows),
               "--hidden", str(hidden), "--vocab", str(vocab), "--dtype", dtype, "--device", "cpu",
               "--repeats", str(repeats)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measurement {impl} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_table(results: list[dict]) -> str:
    """Markdown table with time and peak memory relative to the unfused path of the same teacher."""
    lines = ["| N x H x V | dtype | implementation | fwd+bwd ms | peak MiB | peak / logits | time / unfused "
             "| peak / unfused |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        unfused = next(o for o in results if o["impl"] == _baseline(r["impl"])
                       and (o["vocab"], o["dtype"]) == (r["vocab"], r["dtype"]))
        peak_ratio = f"{r['peak_bytes'] / unfused['peak_bytes']:.3f}" if r["peak_bytes"] > 0 < unfused["peak_bytes"] else ""
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if r["peak_bytes"] >= 0 else "n/a"
        in_logits = f"{r['peak_in_logits']:.2f}" if r["peak_in_logits"] is not None else "n/a"
        lines.append(f"| {r['rows']} x {r['hidden']} x {r['vocab']} | {r['dtype']} | {r['impl']} | {r['median_ms']:.1f} "
                     f"| {peak} | {in_logits} | {r['median_ms'] / unfused['median_ms']:.2f}x | {peak_ratio} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS,
                        help="what to measure (each is compared with its unfused path, which is measured too)")
    parser.add_argument("--json", dest="json_path", default=None)
    parser.add_argument("--measure", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    implementations = [impl for impl in IMPLEMENTATIONS
                       if impl in args.implementations or impl in map(_baseline, args.implementations)]
    if args.measure:
        print(json.dumps(measure(args.measure, args.rows, args.hidden, args.vocab[0], args.dtype[0], args.device,
                                 args.repeats)))
        return 0
    results = []
    for vocab in args.vocab:
        for dtype in args.dtype:
            for impl in implementations:
                if args.device == "cpu":
                    result = _measure_in_subprocess(impl, args.rows, args.hidden, vocab, dtype, args.repeats)
                else:
                    result = measure(impl, args.rows, args.hidden, vocab, dtype, args.device, args.repeats)
                results.append(result)
                print(json.dumps({k: v for k, v in result.items() if k != "times_ms"}), flush=True)
    print(format_table(results))
    if args.json_path:
        with open(args.json_path, "w") as out:
            json.dump({"environment": environment(args.device), "loss_options": LOSS_OPTIONS, "results": results},
                      out, indent=2)
        print(f"wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

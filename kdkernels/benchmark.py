"""Side-by-side benchmark of kd_loss against kdkernels.reference (eager and torch.compile):
forward + backward time and peak memory. Each measurement runs in a fresh process, so that
compile caches, allocator state and the peak-memory counter start clean."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional

import torch

import kdkernels
from kdkernels import reference

IMPLEMENTATIONS = ("kdkernels", "reference", "reference_compiled")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOSS_OPTIONS = dict(temperature=2.0, alpha=0.5, divergence="forward_kl")


def _loss_fn(impl: str, backend: str) -> Callable[..., torch.Tensor]:
    if impl == "kdkernels":
        return lambda s, t, y: kdkernels.kd_loss(s, t, y, backend=backend, **LOSS_OPTIONS)
    if impl == "reference":
        return lambda s, t, y: reference.kd_loss(s, t, y, **LOSS_OPTIONS)
    if impl == "reference_compiled":
        compiled = torch.compile(reference.kd_loss, dynamic=False)
        return lambda s, t, y: compiled(s, t, y, **LOSS_OPTIONS)
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {impl!r}")


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def measure(impl: str, rows: int, vocab: int, dtype: str, device: str, repeats: int, backend: str = "auto") -> dict:
    """Median forward+backward time and peak memory above the inputs of one configuration."""
    torch.manual_seed(0)
    dev = torch.device(device)
    student = (torch.randn(rows, vocab, device=dev) * 2).to(DTYPES[dtype]).requires_grad_(True)
    teacher = (torch.randn(rows, vocab, device=dev) * 2).to(DTYPES[dtype])
    target = torch.randint(0, vocab, (rows,), device=dev)
    fn = _loss_fn(impl, backend)

    def step() -> None:
        student.grad = None
        fn(student, teacher, target).backward()

    def synchronize() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: compilation, first-touch allocations
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)

    student.grad = None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_bytes("VmRSS")
        peak = -1  # unknown where the kernel cannot reset the high-water mark
        if _reset_peak_rss():
            step()
            peak = _rss_bytes("VmHWM") - base
    grad_bytes = rows * vocab * student.element_size()
    return {
        "impl": impl, "rows": rows, "vocab": vocab, "dtype": dtype, "device": device,
        "median_ms": statistics.median(times) * 1e3, "times_ms": [t * 1e3 for t in times],
        "peak_bytes": peak, "peak_in_gradients": peak / grad_bytes if peak >= 0 else None,
    }


def _measure_in_subprocess(impl: str, rows: int, vocab: int, dtype: str, device: str, repeats: int) -> dict:
    # A fixed mmap threshold makes glibc return freed buffers at once, so that RSS tracks
    # the live tensors and its high-water mark is the peak of the measured step.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    command = [sys.executable, "-m", "kdkernels.benchmark", "--measure", impl, "--rows", str(rows),
               "--vocab", str(vocab), "--dtype", dtype, "--device", device, "--repeats", str(repeats)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measurement {impl} V={vocab} {dtype} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def environment(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "kdkernels": kdkernels.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "processor": platform.processor(), "cpu_threads": torch.get_num_threads(),
        "device": device,
    }
    if device == "cuda":
        info["device_name"] = torch.cuda.get_device_name()
    return info


def run(rows: int, vocabs: list[int], dtypes: list[str], device: str, repeats: int,
        impls: tuple[str, ...] = IMPLEMENTATIONS, json_path: Optional[str] = None) -> list[dict]:
    """Measures every configuration, prints the table with ratios, optionally writes JSON."""
    results = []
    for vocab in vocabs:
        for dtype in dtypes:
            for impl in impls:
                results.append(_measure_in_subprocess(impl, rows, vocab, dtype, device, repeats))
    print(format_table(results))
    if json_path:
        with open(json_path, "w") as out:
            json.dump({"environment": environment(device), "loss_options": LOSS_OPTIONS, "results": results}, out,
                      indent=2)
        print(f"wrote {json_path}")
    return results


def format_table(results: list[dict]) -> str:
    """Markdown table: time and peak memory per implementation, and the speed-up of kdkernels."""
    by_key = {(r["vocab"], r["dtype"], r["impl"]): r for r in results}
    lines = ["| rows x V | dtype | implementation | fwd+bwd ms | peak MiB | peak / grad | kdkernels speed-up |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in results:
        ours = by_key.get((r["vocab"], r["dtype"], "kdkernels"))
        speedup = f"{r['median_ms'] / ours['median_ms']:.1f}x" if ours and r is not ours else ""
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if r["peak_bytes"] >= 0 else "n/a"
        ratio = f"{r['peak_in_gradients']:.2f}" if r["peak_in_gradients"] is not None else "n/a"
        lines.append(f"| {r['rows']} x {r['vocab']} | {r['dtype']} | {r['impl']} | {r['median_ms']:.1f} | {peak} "
                     f"| {ratio} | {speedup} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--impl", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--json", dest="json_path", default=None, help="write the results here")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    parser.add_argument("--measure", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.rows, args.vocab[0], args.dtype[0], args.device, args.repeats)))
        return 0
    run(args.rows, args.vocab, args.dtype, args.device, args.repeats, tuple(args.impl), args.json_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

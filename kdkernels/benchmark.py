"""Side-by-side benchmark of kd_loss against kdkernels.reference (eager and torch.compile), and on
CUDA against Liger-Kernel: forward + backward time and peak memory, and on CUDA the achieved
bandwidth on the minimal bytes (student and teacher read once, the student gradient written once:
3 * N * V * itemsize) against the measured device-to-device copy bandwidth.

On CPU each measurement runs in a fresh process, so that compile caches, allocator state and the
peak-memory counter start clean; on CUDA the caching allocator's peak counter is reset instead."""

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

IMPLEMENTATIONS = ("kdkernels", "kdkernels-triton", "kdkernels-cuda", "reference", "reference_compiled", "liger")
DEFAULT_IMPLEMENTATIONS = {
    "cpu": ("kdkernels", "reference", "reference_compiled"),
    "cuda": ("kdkernels-triton", "kdkernels-cuda", "reference", "reference_compiled", "liger"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOSS_OPTIONS = dict(temperature=2.0, alpha=0.5)
# The soft terms that can be timed (`--divergence`): a divergence with the keywords it is timed
# with, or "<divergence>+standardize" for it on standardised logits.
DIVERGENCE_KEYWORDS: dict[str, dict[str, object]] = {
    "forward_kl": {}, "reverse_kl": {}, "jsd": {"beta": 0.5}, "skew_kl": {"skew": 0.1},
    "skew_reverse_kl": {"skew": 0.1}, "tvd": {}, "ab": {"ab_alpha": 0.5, "ab_beta": 0.5}, "akl": {"akl_mu": 0.5},
    "forward_kl+standardize": {"standardize": True},
}


def _liger_loss() -> Callable[..., torch.Tensor]:
    """Liger-Kernel's path for the same loss with forward KL: log-softmax, LigerKLDIVLoss and
    LigerCrossEntropyLoss."""
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss

    kl, ce = LigerKLDIVLoss(reduction="batchmean", log_target=True), LigerCrossEntropyLoss()
    temperature, alpha = LOSS_OPTIONS["temperature"], LOSS_OPTIONS["alpha"]

    def loss(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        soft = kl(torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1))
        return alpha * temperature**2 * soft + (1 - alpha) * ce(s, y)

    return loss


def _loss_fn(impl: str, divergence: str) -> Callable[..., torch.Tensor]:
    options = dict(LOSS_OPTIONS, divergence=divergence.partition("+")[0], **DIVERGENCE_KEYWORDS[divergence])
    if impl.startswith("kdkernels"):
        backend = impl.partition("-")[2] or "auto"
        return lambda s, t, y: kdkernels.kd_loss(s, t, y, backend=backend, **options)
    if impl == "liger":
        if divergence != "forward_kl":
            raise ValueError("the Liger path is timed with forward_kl only")
        return _liger_loss()
    if impl == "reference":
        return lambda s, t, y: reference.kd_loss(s, t, y, **options)
    if impl == "reference_compiled":
        compiled = torch.compile(reference.kd_loss, dynamic=False)
        return lambda s, t, y: compiled(s, t, y, **options)
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {impl!r}")


def rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_bytes(run: Callable[[], object], device: str) -> int:
    """Peak memory of one call of run() above what was live before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        return torch.cuda.max_memory_allocated() - base
    base = rss_bytes("VmRSS")
    if not reset_peak_rss():
        return -1
    run()
    return rss_bytes("VmHWM") - base


def _inputs(rows: int, vocab: int, dtype: str, device: str, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator(device=device).manual_seed(seed)
    student = torch.randn(rows, vocab, device=device, generator=generator).mul_(2).to(DTYPES[dtype])
    teacher = torch.randn(rows, vocab, device=device, generator=generator).mul_(2).to(DTYPES[dtype])
    target = torch.randint(0, vocab, (rows,), device=device, generator=generator)
    return student.requires_grad_(True), teacher, target


def measure(impl: str, rows: int, vocab: int, dtype: str, device: str, repeats: int,
            divergence: str = "forward_kl") -> dict:
    """Median forward+backward time and peak memory above the inputs of one configuration. On
    CUDA the timed steps rotate over input sets (as many as fit, up to 3) so that no step finds
    its inputs in L2, and are timed with CUDA events."""
    dev = torch.device(device)
    set_bytes = 2 * rows * vocab * torch.finfo(DTYPES[dtype]).bits // 8
    sets = 1 if dev.type == "cpu" else max(1, min(3, int(0.25 * torch.cuda.mem_get_info()[0]) // set_bytes))
    input_sets = [_inputs(rows, vocab, dtype, device, seed) for seed in range(sets)]
    fn = _loss_fn(impl, divergence)

    def step(inputs: tuple[torch.Tensor, ...]) -> None:
        inputs[0].grad = None
        fn(*inputs).backward()

    times = step_seconds(lambda i: step(input_sets[i % sets]), device, repeats)

    for inputs in input_sets:
        inputs[0].grad = None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(input_sets[0])
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = rss_bytes("VmRSS")
        peak = -1  # unknown where the kernel cannot reset the high-water mark
        if reset_peak_rss():
            step(input_sets[0])
            peak = rss_bytes("VmHWM") - base
    grad_bytes = rows * vocab * input_sets[0][0].element_size()
    median = statistics.median(times)
    return {
        "impl": impl, "divergence": divergence, "rows": rows, "vocab": vocab, "dtype": dtype, "device": device,
        "median_ms": median * 1e3, "times_ms": [t * 1e3 for t in times],
        "minimal_bytes": 3 * grad_bytes, "gbps": 3 * grad_bytes / median / 1e9,
        "peak_bytes": peak, "peak_in_gradients": peak / grad_bytes if peak >= 0 else None,
    }


WARMUP_SECONDS = 3.0


def step_seconds(step: Callable[[int], object], device: str, repeats: int) -> list[float]:
    """Times of `repeats` calls step(i), i = 0, 1, ..., after untimed warm-up calls for
    WARMUP_SECONDS, at least one (compilation, autotuning, first-touch allocations; on a virtual
    machine the first steps that fault in fresh memory also wait for the host to back it, up to
    25x slower for a 2 MiB page here, until freed pages come round again): CUDA events on CUDA,
    the wall clock on CPU."""
    cuda = torch.device(device).type == "cuda"
    begin = time.perf_counter()
    while True:
        step(0)
        if cuda:
            torch.cuda.synchronize()
        if time.perf_counter() - begin >= WARMUP_SECONDS:
            break
    if cuda:
        return [cuda_seconds(lambda: step(i)) for i in range(repeats)]
    times = []
    for i in range(repeats):
        begin = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - begin)
    return times


def cuda_seconds(fn: Callable[[], object]) -> float:
    """Device time of fn's work on the current stream, from CUDA events around it."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def copy_bandwidth_gbps(device: str, nbytes: int = 2**32) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    return 2 * nbytes / statistics.median(cuda_seconds(lambda: dst.copy_(src)) for _ in range(10)) / 1e9


def _measure_here(impl: str, rows: int, vocab: int, dtype: str, device: str, repeats: int, divergence: str) -> dict:
    """A CUDA measurement in this process; an implementation that runs out of memory is recorded so."""
    try:
        return measure(impl, rows, vocab, dtype, device, repeats, divergence)
    except torch.OutOfMemoryError:
        return {"impl": impl, "divergence": divergence, "rows": rows, "vocab": vocab, "dtype": dtype, "device": device,
                "error": "out of memory"}
    finally:
        torch.cuda.empty_cache()


def _measure_in_subprocess(impl: str, rows: int, vocab: int, dtype: str, device: str, repeats: int,
                           divergence: str) -> dict:
    # A fixed mmap threshold makes glibc return freed buffers at once, so that RSS tracks
    # the live tensors and its high-water mark is the peak of the measured step.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    command = [sys.executable, "-m", "kdkernels.benchmark", "--measure", impl, "--rows", str(rows),
               "--vocab", str(vocab), "--dtype", dtype, "--device", device, "--repeats", str(repeats),
               "--divergence", divergence]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measurement {impl} {divergence} V={vocab} {dtype} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _pooled(rounds: list[dict]) -> dict:
    """One configuration's measurements over the rounds as one: the median of all their times, the
    largest peak; an error if any round had one."""
    failed = next((r for r in rounds if "median_ms" not in r), None)
    if failed is not None:
        return failed
    times = [t for r in rounds for t in r["times_ms"]]
    median = statistics.median(times)
    peak = max(rounds, key=lambda r: r["peak_bytes"])
    return dict(rounds[0], median_ms=median, times_ms=times, gbps=rounds[0]["minimal_bytes"] / median / 1e6,
                peak_bytes=peak["peak_bytes"], peak_in_gradients=peak["peak_in_gradients"], rounds=len(rounds))


def environment(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "kdkernels": kdkernels.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "processor": _cpu_model(), "cpu_isa": torch.backends.cpu.get_cpu_capability(),
        "cpu_threads": torch.get_num_threads(), "device": device,
    }
    if device == "cuda":
        import triton

        info.update(device_name=torch.cuda.get_device_name(), cuda=torch.version.cuda, triton=triton.__version__,
                    driver=_nvidia_smi("driver_version"), copy_gbps=copy_bandwidth_gbps(device))
    return info


def _cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), which platform.processor() leaves empty there."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                        platform.processor())
    except OSError:
        return platform.processor()


def _nvidia_smi(field: str) -> Optional[str]:
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                              text=True, check=True)
        return done.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run(rows: int, vocabs: list[int], dtypes: list[str], device: str, repeats: int,
        impls: Optional[tuple[str, ...]] = None, json_path: Optional[str] = None,
        divergences: tuple[str, ...] = ("forward_kl",), rounds: int = 1) -> list[dict]:
    """Measures every configuration, prints the table with ratios, optionally writes JSON (and,
    with matplotlib installed, a PNG plot beside it). Liger is timed with forward_kl only. With
    rounds > 1 the configurations are measured round-robin that many times and each one's times
    pooled, so that a slow drift of the machine falls on all of them alike rather than on the
    ones measured last."""
    impls = impls or DEFAULT_IMPLEMENTATIONS[device]
    measure_one = _measure_in_subprocess if device == "cpu" else _measure_here
    configs = [(vocab, dtype, divergence, impl) for vocab in vocabs for dtype in dtypes for divergence in divergences
               for impl in impls if impl != "liger" or divergence == "forward_kl"]
    measured: dict[tuple, list[dict]] = {config: [] for config in configs}
    for _ in range(rounds):
        for vocab, dtype, divergence, impl in configs:
            measured[vocab, dtype, divergence, impl].append(
                measure_one(impl, rows, vocab, dtype, device, repeats, divergence))
    results = [_pooled(measured[config]) for config in configs]
    for result in results:
        print(json.dumps({k: v for k, v in result.items() if k != "times_ms"}), flush=True)
    env = environment(device)
    print(format_table(results, env.get("copy_gbps")))
    if json_path:
        with open(json_path, "w") as out:
            json.dump({"environment": env, "loss_options": LOSS_OPTIONS, "divergence_keywords": DIVERGENCE_KEYWORDS,
                       "results": results}, out, indent=2)
        print(f"wrote {json_path}")
        _plot(results, os.path.splitext(json_path)[0] + ".png")
    return results


def _plot(results: list[dict], path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in results})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        for impl in dict.fromkeys(r["impl"] for r in results):
            points = [(r["vocab"], r["median_ms"]) for r in results
                      if r["impl"] == impl and r["dtype"] == dtype and "median_ms" in r
                      and r["divergence"] == "forward_kl"]
            if points:
                ax.plot(*zip(*points), marker="o", label=impl)
        ax.set(title=f"kd_loss (forward KL) fwd+bwd, {dtype}, {results[0]['rows']} rows", xlabel="V", ylabel="ms",
               yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def format_table(results: list[dict], copy_gbps: Optional[float] = None) -> str:
    """Markdown table: time, bandwidth and peak memory per implementation, how much slower each is
    than the fastest kdkernels backend of its configuration and, for kdkernels with a divergence
    other than forward KL, its time relative to forward KL on the same backend."""
    def config(r: dict) -> tuple:
        return r["vocab"], r["dtype"], r["divergence"]

    def fastest_ours(r: dict) -> Optional[dict]:
        ours = [o for o in results if o["impl"].startswith("kdkernels") and "median_ms" in o and config(o) == config(r)]
        return min(ours, key=lambda o: o["median_ms"], default=None)

    def forward_kl_twin(r: dict) -> Optional[dict]:
        return next((o for o in results if "median_ms" in o and o["impl"] == r["impl"]
                     and config(o) == (r["vocab"], r["dtype"], "forward_kl")), None)

    bandwidth = f" (% of copy {copy_gbps:.0f} GB/s)" if copy_gbps else ""
    lines = [f"| rows x V | dtype | divergence | implementation | fwd+bwd ms | GB/s{bandwidth} | peak MiB | peak / grad "
             "| time / kdkernels | time / forward_kl |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        head = f"| {r['rows']} x {r['vocab']} | {r['dtype']} | {r['divergence']} | {r['impl']} "
        if "median_ms" not in r:
            lines.append(head + f"| {r['error']} | | | | | |")
            continue
        ours, twin = fastest_ours(r), forward_kl_twin(r)
        ratio = f"{r['median_ms'] / ours['median_ms']:.2f}x" if ours else ""
        vs_forward_kl = (f"{r['median_ms'] / twin['median_ms']:.2f}x"
                         if twin and r["impl"].startswith("kdkernels") and r["divergence"] != "forward_kl" else "")
        gbps = f"{r['gbps']:.0f}" + (f" ({100 * r['gbps'] / copy_gbps:.0f} %)" if copy_gbps else "")
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if r["peak_bytes"] >= 0 else "n/a"
        grads = f"{r['peak_in_gradients']:.2f}" if r["peak_in_gradients"] is not None else "n/a"
        lines.append(head + f"| {r['median_ms']:.2f} | {gbps} | {peak} | {grads} | {ratio} | {vs_forward_kl} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure the configurations round-robin this many times, pooling their times")
    parser.add_argument("--impl", nargs="+", default=None, choices=IMPLEMENTATIONS,
                        help="default: all that apply to the device")
    parser.add_argument("--divergence", nargs="+", default=["forward_kl"], choices=list(DIVERGENCE_KEYWORDS),
                        help="divergences to time (keywords: DIVERGENCE_KEYWORDS)")
    parser.add_argument("--json", dest="json_path", default=None, help="write the results here")


def run_from_args(args: argparse.Namespace) -> list[dict]:
    """run() with the options of add_arguments()."""
    return run(args.rows, args.vocab, args.dtype, args.device, args.repeats, args.impl and tuple(args.impl),
               args.json_path, tuple(args.divergence), args.rounds)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    parser.add_argument("--measure", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.rows, args.vocab[0], args.dtype[0], args.device, args.repeats,
                                 args.divergence[0])))
        return 0
    run_from_args(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

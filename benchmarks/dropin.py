"""One loss step (forward + backward) of each drop-in integration against the framework's own
loss, in one run: TRL's generalized_jsd_loss (patched vs TRL's), Liger's LigerFusedLinearJSDLoss
(Liger's chunked torch code, compiled=False on CPU) and LigerJSD, torchtune's
ForwardKLWithChunkedOutputLoss (8 chunks, loaded from torchtune's source), torchdistill's KDLoss
(4096 x 1000 logits, T = 4, alpha = 0.5), RKDLoss (256 samples of [512, 2, 2] features, factors
25 and 50) and ATLoss (two pairs of [64, 128 / 256, 28, 28] maps). Median time and peak memory
above the inputs, fp32; the LLM losses at B = 4 sequences of T = 512 tokens, V = 32000, H = 1024. CPU by
default (peak from the process's RSS high-water mark); --device cuda uses CUDA events.

    python benchmarks/dropin.py --json benchmarks/results/cpu_dropin.json"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import pathlib
import statistics
import sys
from typing import Callable

import torch
import torch.nn.functional as F

from kdkernels.benchmark import environment, peak_bytes, step_seconds


def _torchtune_losses():
    """torchtune's kd_losses module from its installed source (its package import needs torchao)."""
    spec = importlib.util.find_spec("torchtune")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "modules" / "loss" / "kd_losses.py"
    loader = importlib.util.spec_from_file_location("torchtune_kd_losses", path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module


def cases(batch: int, tokens: int, vocab: int, hidden: int, device: str) -> dict[str, tuple[Callable, Callable, list]]:
    """name -> (kdkernels step, framework step, tensors requiring grad)."""
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int, grad: bool = False, scale: float = 2.0) -> torch.Tensor:
        return (torch.randn(*shape, device=device, generator=generator) * scale).requires_grad_(grad)

    student, teacher = randn(batch, tokens, vocab, grad=True), randn(batch, tokens, vocab)
    labels = torch.randint(0, vocab, (batch, tokens), device=device, generator=generator)
    labels[:, : tokens // 4] = -100  # the prompt
    hidden_s, weight_s = randn(batch * tokens, hidden, grad=True, scale=0.05), randn(vocab, hidden, grad=True,
                                                                                      scale=0.05)
    hidden_t, weight_t = randn(batch * tokens, hidden, scale=0.05), randn(vocab, hidden, scale=0.05)
    flat_labels = labels.view(-1)
    found = {}

    kdk_trl = importlib.import_module("kdkernels.integrations.trl")
    found["TRL generalized_jsd_loss"] = (
        lambda: kdk_trl.generalized_jsd_loss(student, teacher, labels, beta=0.5, temperature=2.0),
        lambda: kdk_trl._TRL_LOSS(student, teacher, labels, 0.5, 2.0), [student])

    from kdkernels.integrations import liger as kdk_liger
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    ours, theirs = kdk_liger.LigerFusedLinearJSDLoss(beta=0.5), LigerFusedLinearJSDLoss(beta=0.5, compiled=False)
    found["Liger LigerFusedLinearJSDLoss"] = (
        lambda: ours(hidden_s, weight_s, hidden_t, weight_t, flat_labels),
        lambda: theirs(hidden_s, weight_s, hidden_t, weight_t, flat_labels), [hidden_s, weight_s])
    if device == "cuda":  # Liger's LigerJSD is a Triton kernel
        from liger_kernel.transformers import LigerJSD
        flat_s, flat_t = student.view(-1, vocab), teacher.view(-1, vocab)
        found["Liger LigerJSD"] = (
            lambda: kdk_liger.LigerJSD(beta=0.5)(F.log_softmax(flat_s, -1), F.log_softmax(flat_t, -1), flat_labels),
            lambda: LigerJSD(beta=0.5)(F.log_softmax(flat_s, -1), F.log_softmax(flat_t, -1), flat_labels), [student])

    from kdkernels.integrations import torchtune as kdk_torchtune
    torchtune_losses = _torchtune_losses()
    student_chunks, teacher_chunks = list(student.chunk(8, dim=1)), list(teacher.chunk(8, dim=1))
    ours_tt, theirs_tt = (kdk_torchtune.ForwardKLWithChunkedOutputLoss(),
                          torchtune_losses.ForwardKLWithChunkedOutputLoss())
    found["torchtune ForwardKLWithChunkedOutputLoss"] = (
        lambda: ours_tt(student_chunks, teacher_chunks, labels),
        lambda: theirs_tt(student_chunks, teacher_chunks, labels), [student])

    import yaml
    importlib.import_module("kdkernels.integrations.torchdistill")
    from torchdistill.losses.registry import get_mid_level_loss

    def torchdistill_pair(name: str, config: str) -> tuple[Callable, Callable]:
        kwargs = yaml.safe_load(config)
        return (get_mid_level_loss({"key": f"kdkernels.{name}", "kwargs": dict(kwargs)}),
                get_mid_level_loss({"key": name, "kwargs": dict(kwargs)}))

    logits_s, logits_t = randn(4096, 1000, grad=True), randn(4096, 1000)
    classes = torch.randint(0, 1000, (4096,), device=device, generator=generator)
    features_s, features_t = randn(256, 512, 2, 2, grad=True, scale=1.0), randn(256, 512, 2, 2, scale=1.0)
    maps_s, maps_t = randn(64, 128, 28, 28, grad=True, scale=1.0), randn(64, 256, 28, 28, scale=1.0)
    student_io = {"fc": {"output": logits_s}, "layer4": {"output": features_s}, "layer3": {"output": maps_s}}
    teacher_io = {"fc": {"output": logits_t}, "layer4": {"output": features_t}, "layer3": {"output": maps_t}}
    for name, config, params in (
            ("KDLoss", "{student_module_path: fc, student_module_io: output, teacher_module_path: fc, "
                       "teacher_module_io: output, temperature: 4.0, alpha: 0.5}", [logits_s]),
            ("RKDLoss", "{student_output_path: layer4, teacher_output_path: layer4, dist_factor: 25.0, "
                        "angle_factor: 50.0, reduction: mean}", [features_s]),
            ("ATLoss", "{at_pairs: {a: {student: {path: layer3, io: output}, teacher: {path: layer3, io: output}, "
                       "weight: 1}}}", [maps_s])):
        ours_td, theirs_td = torchdistill_pair(name, config)
        found[f"torchdistill {name}"] = (lambda loss=ours_td: loss(student_io, teacher_io, classes),
                                         lambda loss=theirs_td: loss(student_io, teacher_io, classes), params)
    return found


def measure(loss_fn: Callable, params: list, device: str, repeats: int) -> dict:
    def step(_: int = 0) -> None:
        for p in params:
            p.grad = None
        loss_fn().backward()

    median = statistics.median(step_seconds(step, device, repeats)) * 1e3
    for p in params:
        p.grad = None
    return {"median_ms": median, "peak_bytes": peak_bytes(step, device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    if args.device == "cpu" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc then returns freed buffers at once, so that RSS follows the live tensors.
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
    results = []
    print("| integration | framework ms | kdkernels ms | speed-up | framework peak MiB | kdkernels peak MiB | memory |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (ours, theirs, params) in cases(args.batch, args.tokens, args.vocab, args.hidden, args.device).items():
        row = {"integration": name, "kdkernels": measure(ours, params, args.device, args.repeats),
               "framework": measure(theirs, params, args.device, args.repeats)}
        results.append(row)
        mine, other = row["kdkernels"], row["framework"]
        print(f"| {name} | {other['median_ms']:.1f} | {mine['median_ms']:.1f} | "
              f"{other['median_ms'] / mine['median_ms']:.2f}x | {other['peak_bytes'] / 2**20:.0f} | "
              f"{mine['peak_bytes'] / 2**20:.0f} | {other['peak_bytes'] / max(mine['peak_bytes'], 1):.1f}x less |",
              flush=True)
    if args.json_path:
        shape = {"batch": args.batch, "tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden,
                 "dtype": "float32"}
        with open(args.json_path, "w") as out:
            json.dump({"environment": environment(args.device), "shape": shape, "results": results}, out, indent=2)


if __name__ == "__main__":
    main()

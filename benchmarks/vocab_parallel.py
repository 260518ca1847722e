"""Vocab-parallel KD (forward + backward) on 2 gloo processes, each holding half of the
vocabulary, against two ways of doing without it, at N = 4096 rows, V = 32000, fp32,
forward KL + CE:

- ``kdkernels``: kdkernels.vocab_parallel_kd_loss (three fused reads, two collectives of
  O(N) values; validate=False, as in a training loop whose layout was checked once);
- ``gather to rank 0``: the logit slices gathered to rank 0, kd_loss on the full logits there,
  each rank's gradient slice scattered back;
- ``eager all-reduce``: the communication pattern of NVIDIA ModelOpt's tensor-parallel
  ``LogitsKLLoss`` (modelopt/torch/distill/plugins/megatron.py) in plain torch ops: fp32 copies
  of both slices, all_reduce MAX and SUM of each side's row max and exp-sum (4 collectives of N
  values), the partial KL summed locally, a scalar all_reduce, and one more all_reduce of N values
  in backward. It has no CE term (ModelOpt adds the LM loss separately), so it is timed with
  the KL alone and does less work than the other two.

Reports the median wall time of rank 0 over repeats, the collectives per step and the bytes
each rank sends per row.

    python benchmarks/vocab_parallel.py --json benchmarks/results/cpu_vocab_parallel.json"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

import kdkernels
from kdkernels.benchmark import environment

WORLD = 2


class _AllReduceSum(torch.autograd.Function):
    """all_reduce SUM in forward, and of the gradient in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def eager_all_reduce_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Forward KL per row over vocabulary slices, mean over rows: ModelOpt's collective pattern."""
    s = student.float() / temperature
    t = teacher.detach().float() / temperature
    t_max = t.max(-1).values
    dist.all_reduce(t_max, op=dist.ReduceOp.MAX)
    t = t - t_max[:, None]
    t_sum = _AllReduceSum.apply(t.exp().sum(-1))
    s_max = s.detach().max(-1).values
    dist.all_reduce(s_max, op=dist.ReduceOp.MAX)
    s = s - s_max[:, None]
    s_sum = _AllReduceSum.apply(s.exp().sum(-1))
    t_logp = t - t_sum.log()[:, None]
    s_logp = s - s_sum.log()[:, None]
    loss = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    total = loss.detach().clone()
    dist.all_reduce(total)
    return loss + (total - loss.detach())  # the summed value, with the local slice's gradient


def gather_to_rank_zero(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor,
                        options: dict) -> None:
    """kd_loss on logits gathered to rank 0; the gradient slices scattered back (fwd + bwd)."""
    rank = dist.get_rank()
    student_parts = [torch.empty_like(student) for _ in range(WORLD)] if rank == 0 else None
    teacher_parts = [torch.empty_like(teacher) for _ in range(WORLD)] if rank == 0 else None
    dist.gather(student.detach(), student_parts)
    dist.gather(teacher, teacher_parts)
    grads = None
    if rank == 0:
        full = torch.cat(student_parts, -1).requires_grad_()
        kdkernels.kd_loss(full, torch.cat(teacher_parts, -1), target, **options).backward()
        grads = list(full.grad.split(student.shape[-1], -1))
    grad = torch.empty_like(student)
    dist.scatter(grad, grads)
    student.grad = grad


def _worker(rank: int, init_file: str, args: argparse.Namespace, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(minutes=10))
    torch.set_num_threads(1)
    local = args.vocab // WORLD
    generator = torch.Generator().manual_seed(0)
    student_full = torch.randn(args.rows, args.vocab, generator=generator) * 2
    teacher_full = torch.randn(args.rows, args.vocab, generator=generator) * 2
    target = torch.randint(0, args.vocab, (args.rows,), generator=generator)
    student = student_full[:, rank * local:(rank + 1) * local].contiguous().requires_grad_()
    teacher = teacher_full[:, rank * local:(rank + 1) * local].contiguous()
    options = {"temperature": 2.0, "alpha": 0.5}
    kl_only = {"temperature": 2.0, "scale_by_temperature": False}
    steps = {
        "kdkernels": lambda: kdkernels.vocab_parallel_kd_loss(student, teacher, target, vocab_start=rank * local,
                                                              validate=False, **options).backward(),
        "gather to rank 0": lambda: gather_to_rank_zero(student, teacher, target, options),
        "kdkernels, KL only": lambda: kdkernels.vocab_parallel_kd_loss(student, teacher, vocab_start=rank * local,
                                                                       validate=False, **kl_only).backward(),
        "eager all-reduce, KL only": lambda: eager_all_reduce_kl(student, teacher, 2.0).backward(),
    }
    # Collectives per step, and the values per row each rank contributes or receives (fp32: 4 bytes each):
    # kdkernels 9 gathered + 4 reduced; gather 2 slices sent + 1 gradient slice received; eager 4 + 1 reduced.
    payload_per_row = {"kdkernels": (2, 9 + 4), "gather to rank 0": (3, 3 * local),
                    "kdkernels, KL only": (2, 9 + 4), "eager all-reduce, KL only": (6, 5)}
    results = {}
    for name, step in steps.items():
        times = []
        for repeat in range(args.repeats + 1):
            student.grad = None
            dist.barrier()
            begin = time.perf_counter()
            step()
            elapsed = torch.tensor(time.perf_counter() - begin)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if repeat:
                times.append(float(elapsed))
        collectives, values = payload_per_row[name]
        results[name] = {"median_ms": statistics.median(times) * 1e3, "collectives": collectives,
                         "payload_bytes_per_row": 4 * values}
    if rank == 0:
        with open(out_file, "w") as out:
            json.dump(results, out)
    dist.barrier()
    dist.destroy_process_group()
    # Results written: skip the interpreter's teardown, where gloo's transport threads can abort
    # the process at exit (SIGABRT after the work succeeded), as the tests' workers do.
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        out_file = os.path.join(scratch, "results.json")
        torch.multiprocessing.spawn(_worker, args=(os.path.join(scratch, "init"), args, out_file), nprocs=WORLD)
        with open(out_file) as out:
            results = json.load(out)
    ours = results["kdkernels"]["median_ms"]
    ours_kl = results["kdkernels, KL only"]["median_ms"]
    print(f"N = {args.rows}, V = {args.vocab} over {WORLD} gloo processes (1 thread each), fp32, fwd+bwd")
    print("| implementation | ms | time / kdkernels | collectives | payload bytes per row per rank |")
    print("|---|---:|---:|---:|---:|")
    for name, row in results.items():
        base = ours_kl if "KL only" in name else ours
        row["time_vs_kdkernels"] = row["median_ms"] / base
        print(f"| {name} | {row['median_ms']:.1f} | {row['time_vs_kdkernels']:.2f}x | {row['collectives']} | "
              f"{row['payload_bytes_per_row']} |")
    if args.json_path:
        with open(args.json_path, "w") as out:
            json.dump({"environment": environment("cpu"), "world_size": WORLD, "rows": args.rows,
                       "vocab": args.vocab, "dtype": "float32", "results": results}, out, indent=2)


if __name__ == "__main__":
    main()

"""Vocab-parallel KD on gloo: spawned ranks that each hold a slice of the vocabulary must give
the loss and gradients of kd_loss / fused_linear_kd_loss on the whole vocabulary, with the
collectives the docstrings state, and bad layouts must raise on every rank."""

from __future__ import annotations

import datetime
import itertools
import os
import re
from typing import Callable

import pytest
import torch
import torch.distributed as dist

import kdkernels as kdk

VOCAB, ROWS, PAD = 37, 6, 3  # the last PAD entries of the padded cases are -inf on the last slice

DIVERGENCE_CASES = [
    {"divergence": "forward_kl"},
    {"divergence": "reverse_kl"},
    {"divergence": "jsd", "beta": 0.3},
    {"divergence": "skew_kl", "skew": 0.2},
    {"divergence": "skew_reverse_kl", "skew": 0.2},
    {"divergence": "tvd"},
    {"divergence": "ab", "ab_alpha": 0.7, "ab_beta": 0.4},
    {"divergence": "ab", "ab_alpha": 1.0, "ab_beta": 0.0},
    {"divergence": "forward_kl", "temperature": 2.0, "softcap": 3.0},
    {"divergence": "reverse_kl", "temperature": 1.5, "logit_scale": 0.5},
]


def _slices(vocab: int, world: int) -> list[tuple[int, int]]:
    """Uneven contiguous slices (start, size): the first vocab % world one longer."""
    sizes = [vocab // world + (rank < vocab % world) for rank in range(world)]
    starts = [sum(sizes[:rank]) for rank in range(world)]
    return list(zip(starts, sizes))


class CollectiveCounter:
    """Counts the calls of torch.distributed's all_gather and all_reduce collectives, by
    wrapping them."""

    KINDS = {"all_gather": ("all_gather", "all_gather_into_tensor", "all_gather_single"),
             "all_reduce": ("all_reduce",)}

    def __init__(self) -> None:
        self.calls = {kind: 0 for kind in self.KINDS}
        self._originals = {name: getattr(dist, name) for names in self.KINDS.values() for name in names
                           if hasattr(dist, name)}

    def __enter__(self) -> "CollectiveCounter":
        for kind, names in self.KINDS.items():
            for name in names:
                if name in self._originals:
                    setattr(dist, name, self._counting(kind, self._originals[name]))
        return self

    def _counting(self, kind: str, original: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            self.calls[kind] += 1
            return original(*args, **kwargs)
        return wrapper

    def __exit__(self, *exc) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)


def _full_inputs(dtype: torch.dtype, padded: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(ROWS, VOCAB, generator=generator) * 2).to(dtype)
    teacher = (torch.randn(ROWS, VOCAB, generator=generator) * 2).to(dtype)
    if padded:
        student[:, -PAD:] = float("-inf")
        teacher[:, -PAD:] = float("-inf")
    target = torch.randint(0, VOCAB - PAD, (ROWS,), generator=generator)
    target[1] = -100
    return student, teacher, target


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    tolerance = {"atol": 2e-3, "rtol": 1e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-4}
    torch.testing.assert_close(actual.float(), expected.float(), **tolerance, msg=lambda m: f"{what}: {m}")


def _check_logits_case(rank: int, world: int, dtype: torch.dtype, padded: bool, with_target: bool,
                       teacher_grad: bool, reduction: str, keywords: dict, backend: str = "cpu") -> None:
    start, size = _slices(VOCAB, world)[rank]
    student, teacher, target = _full_inputs(dtype, padded)
    target = target if with_target else None
    full_s = student.clone().requires_grad_()
    full_t = teacher.clone().requires_grad_(teacher_grad)
    expected = kdk.kd_loss(full_s, full_t, target, reduction=reduction, backend="cpu", **keywords)
    weights = torch.linspace(0.5, 1.5, ROWS) if reduction == "none" else torch.tensor(1.0)
    (expected * weights).sum().backward()

    shard_s = student[:, start:start + size].clone().requires_grad_()
    shard_t = teacher[:, start:start + size].clone().requires_grad_(teacher_grad)
    with CollectiveCounter() as counter:
        actual = kdk.vocab_parallel_kd_loss(shard_s, shard_t, target, vocab_start=start, reduction=reduction,
                                            backend=backend, **keywords)
    assert counter.calls == {"all_gather": 2, "all_reduce": 1}, counter.calls
    (actual * weights).sum().backward()
    what = f"rank {rank} {backend} {dtype} padded={padded} target={with_target} {reduction} {keywords}"
    _close(actual, expected, torch.float32, f"loss, {what}")
    _close(shard_s.grad, full_s.grad[:, start:start + size], dtype, f"student grad, {what}")
    if teacher_grad:
        _check_teacher = full_t.grad[:, start:start + size]
        _close(shard_t.grad, _check_teacher, dtype, f"teacher grad, {what}")


def _logits_worker(rank: int, world: int) -> None:
    for keywords, with_target, padded in itertools.product(DIVERGENCE_CASES, (False, True), (False, True)):
        _check_logits_case(rank, world, torch.float32, padded, with_target, teacher_grad=padded,
                           reduction="batchmean", keywords=keywords)
    for dtype, reduction in ((torch.float64, "none"), (torch.bfloat16, "sum"), (torch.bfloat16, "batchmean")):
        _check_logits_case(rank, world, dtype, True, True, True, reduction, {"divergence": "jsd", "temperature": 2.0})
    # The Triton shard kernel, under Triton's interpreter (conftest sets TRITON_INTERPRET=1).
    for keywords, dtype in itertools.product(DIVERGENCE_CASES, (torch.float32, torch.bfloat16)):
        _check_logits_case(rank, world, dtype, True, True, True, "batchmean", keywords, backend="triton")
    _check_logits_case(rank, world, torch.float64, False, False, False, "none", {"divergence": "ab", "ab_alpha": 0.5,
                                                                                 "ab_beta": 0.5}, backend="triton")
    # Every row ignored: 0, with zero gradients.
    start, size = _slices(VOCAB, world)[rank]
    student = torch.randn(ROWS, size, requires_grad=True)
    loss = kdk.vocab_parallel_kd_loss(student, torch.randn(ROWS, size), torch.full((ROWS,), -100),
                                      vocab_start=start)
    loss.backward()
    assert float(loss) == 0 and not student.grad.any()
    # Without gradients the third read is skipped; the loss is the same.
    full_student, full_teacher, target = _full_inputs(torch.float32, padded=False)
    shard_s, shard_t = full_student[:, start:start + size], full_teacher[:, start:start + size]
    with torch.no_grad():
        without_grad = kdk.vocab_parallel_kd_loss(shard_s, shard_t, target, vocab_start=start)
    with_grad = kdk.vocab_parallel_kd_loss(shard_s.clone().requires_grad_(), shard_t, target, vocab_start=start)
    torch.testing.assert_close(without_grad, with_grad.detach())
    # Without validate: one collective fewer.
    with CollectiveCounter() as counter:
        kdk.vocab_parallel_kd_loss(torch.randn(ROWS, size), torch.randn(ROWS, size), vocab_start=start,
                                   validate=False)
    assert counter.calls == {"all_gather": 1, "all_reduce": 1}, counter.calls


def _fused_linear_worker(rank: int, world: int) -> None:
    hidden_s, hidden_t, chunk = 5, 7, 4
    start, size = _slices(VOCAB, world)[rank]
    generator = torch.Generator().manual_seed(1)
    h_s, h_t = torch.randn(ROWS + 3, hidden_s, generator=generator), torch.randn(ROWS + 3, hidden_t, generator=generator)
    w_s, w_t = torch.randn(VOCAB, hidden_s, generator=generator), torch.randn(VOCAB, hidden_t, generator=generator)
    b_s, b_t = torch.randn(VOCAB, generator=generator), torch.randn(VOCAB, generator=generator)
    target = torch.randint(0, VOCAB, (ROWS + 3,), generator=generator)
    target[2] = -100
    for keywords, teacher_grad in (({"divergence": "forward_kl", "temperature": 2.0}, False),
                                   ({"divergence": "tvd"}, True), ({"divergence": "jsd", "softcap": 4.0}, True)):
        full = [x.clone().requires_grad_(i < 3 or teacher_grad) for i, x in enumerate((h_s, w_s, b_s, h_t, w_t, b_t))]
        expected = kdk.fused_linear_kd_loss(full[0], full[1], full[3], full[4], target, student_bias=full[2],
                                            teacher_bias=full[5], backend="cpu", **keywords)
        expected.backward()
        mine = [h_s, w_s[start:start + size], b_s[start:start + size], h_t, w_t[start:start + size],
                b_t[start:start + size]]
        mine = [x.clone().requires_grad_(i < 3 or teacher_grad) for i, x in enumerate(mine)]
        with CollectiveCounter() as counter:
            actual = kdk.vocab_parallel_fused_linear_kd_loss(
                mine[0], mine[1], mine[3], mine[4], target, vocab_start=start, student_bias=mine[2],
                teacher_bias=mine[5], chunk_size=chunk, **keywords)
        chunks = -(-(ROWS + 3) // chunk)
        assert counter.calls == {"all_gather": chunks + 1, "all_reduce": chunks + 1}, counter.calls
        actual.backward()
        what = f"rank {rank} {keywords}"
        _close(actual, expected, torch.float32, f"loss, {what}")
        for index in range(6 if teacher_grad else 3):
            expected_grad = full[index].grad if index in (0, 3) else full[index].grad[start:start + size]
            _close(mine[index].grad, expected_grad, torch.float32, f"grad {index}, {what}")
    # The default chunk size: 1024 rows, H = 8, V = 33; at 2 ranks the slices (17, 16) alone would
    # give 256 and 512 rows per chunk, so the default follows the largest slice.
    rows, vocab = 1024, 33
    first, width = _slices(vocab, world)[rank]
    h, w = torch.randn(rows, 8, generator=generator), torch.randn(vocab, 8, generator=generator)
    y = torch.randint(0, vocab, (rows,), generator=generator)
    expected = kdk.fused_linear_kd_loss(h, w, h, w.flip(0), y, backend="cpu")
    actual = kdk.vocab_parallel_fused_linear_kd_loss(h, w[first:first + width], h, w.flip(0)[first:first + width], y,
                                                     vocab_start=first)
    _close(actual, expected, torch.float32, "default chunk size")
    with pytest.raises(ValueError, match="validate=False needs an explicit chunk_size"):
        kdk.vocab_parallel_fused_linear_kd_loss(h, w[first:first + width], h, w[first:first + width], y,
                                                vocab_start=first, validate=False)
    poisoned = h_s.clone()
    poisoned[6, 0] = float("nan")  # row 2 of the second chunk, on every rank's slice
    with pytest.raises(ValueError, match=r"student_logits row 2 contains NaN.*counted from row 4 "):
        kdk.vocab_parallel_fused_linear_kd_loss(poisoned, w_s[start:start + size], h_t, w_t[start:start + size],
                                                target, vocab_start=start, chunk_size=chunk)


def _expect_error(error: type, pattern: str, call: Callable[[], object]) -> None:
    with pytest.raises(error, match=pattern):
        call()


def _errors_worker(rank: int, world: int) -> None:
    start, size = _slices(VOCAB, world)[rank]
    student, teacher, target = _full_inputs(torch.float32, padded=False)
    shard_s, shard_t = student[:, start:start + size], teacher[:, start:start + size]

    def loss(s=shard_s, t=shard_t, y=target, **keywords):
        return kdk.vocab_parallel_kd_loss(s, t, y, **{"vocab_start": start, **keywords})

    last = rank == world - 1
    # Slices that overlap or leave a gap: every rank raises.
    _expect_error(ValueError, "must tile", lambda: loss(vocab_start=start - 1 if last else start))
    _expect_error(ValueError, "must tile", lambda: loss(vocab_start=start + 1 if last else start))
    # A target outside the global vocabulary, with or without validate.
    bad_target = target.clone()
    bad_target[3] = VOCAB
    for validate in (True, False):
        _expect_error(ValueError, re.escape(f"target[3] = {VOCAB} is outside [0, {VOCAB})"),
                      lambda: loss(y=bad_target, validate=validate))
    # Overlapping slices without validate: caught where a target lies in both.
    overlap_target = torch.full_like(target, start + size - 1 if rank == 0 else -100)
    overlap_target = overlap_target.clone()
    dist.broadcast(overlap_target, src=0)
    _expect_error(ValueError, "several ranks",
                  lambda: loss(y=overlap_target, vocab_start=start - 1 if rank == 1 else start, validate=False))
    # Dtypes that differ across ranks, or one rank's own bad input.
    _expect_error((TypeError, ValueError), "dtypes differ" if rank else "dtypes differ",
                  lambda: loss(s=shard_s.double() if last else shard_s, t=shard_t.double() if last else shard_t))
    pattern = "temperature must lie" if rank == 0 else r"rank\(s\) \[0\] failed"
    _expect_error(ValueError, pattern, lambda: loss(temperature=-1.0 if rank == 0 else 1.0))
    # NaN on one rank's slice: every rank names the row.
    poisoned = shard_s.clone()
    if last:
        poisoned[4, 0] = float("nan")
    _expect_error(ValueError, "student_logits row 4 contains NaN", lambda: loss(s=poisoned))
    # A target at a -inf logit of one slice.
    masked = shard_s.clone()
    owner = int(target[0])
    if start <= owner < start + size:
        masked[0, owner - start] = float("-inf")
    _expect_error(ValueError, r"target\[0\] = .* points at a -inf", lambda: loss(s=masked))
    # Targets that differ across ranks: caught by validate, and ignored rows that differ without it.
    shifted = torch.where(target >= 0, (target + rank) % VOCAB, target)
    _expect_error(ValueError, "targets", lambda: loss(y=shifted))
    unignored = target.clone()
    if rank == 0:
        unignored[1] = 5
    _expect_error(ValueError, "ignore different rows", lambda: loss(y=unignored, validate=False))
    _expect_error(NotImplementedError, "akl", lambda: loss(divergence="akl"))
    _expect_error(NotImplementedError, "standardize", lambda: loss(standardize=True))
    # The group is still in step: a good call after all of that.
    expected = kdk.kd_loss(student, teacher, target, backend="cpu")
    torch.testing.assert_close(loss(), expected)


def _opcheck_worker(rank: int, world: int) -> None:
    start, size = _slices(VOCAB, world)[rank]
    student, teacher, target = _full_inputs(torch.float32, padded=True)
    args = (student[:, start:start + size].contiguous().requires_grad_(), teacher[:, start:start + size].contiguous(),
            target, torch.tensor(0.25), start, 2.0, 0.0, 4.0, 0.5, "jsd", [0.5], -100, True, False,
            kdk.ops.vocab_parallel.group_name(None), "cpu")
    torch.library.opcheck(torch.ops.kdkernels.vocab_parallel_kd_loss_rows.default, args)


def _num_items_worker(rank: int, world: int) -> None:
    """Data parallel with two micro-batches per rank and uneven ignored targets: with
    global_num_items as num_items, DDP's mean of the accumulated gradients is the gradient of one
    big batch."""
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(world, 2, 5, VOCAB, generator=generator)
    teacher = torch.randn(world, 2, 5, VOCAB, generator=generator)
    target = torch.randint(0, VOCAB, (world, 2, 5), generator=generator)
    target[(target % 3 == 0) & (torch.arange(world)[:, None, None] == 0)] = -100
    bias = torch.zeros(VOCAB, requires_grad=True)
    num_items = kdk.global_num_items([target[rank, micro] for micro in range(2)])
    for micro in range(2):
        kdk.kd_loss(student[rank, micro] + bias, teacher[rank, micro], target[rank, micro],
                    num_items=num_items).backward()
    averaged = bias.grad.clone()
    dist.all_reduce(averaged)
    averaged /= world
    big_batch = torch.zeros(VOCAB, requires_grad=True)
    kdk.kd_loss(student.reshape(-1, VOCAB) + big_batch, teacher.reshape(-1, VOCAB), target.reshape(-1)).backward()
    torch.testing.assert_close(averaged, big_batch.grad)


def _nccl_worker(rank: int, world: int) -> None:
    """The Triton shard kernel on each rank's GPU over NCCL, at V = 128256 bf16 (uneven slices)."""
    torch.cuda.set_device(rank)
    vocab = 128256
    start, size = _slices(vocab, world)[rank]
    generator = torch.Generator().manual_seed(3)
    student = (torch.randn(64, vocab, generator=generator) * 3).to("cuda", torch.bfloat16)
    teacher = (torch.randn(64, vocab, generator=generator) * 3).to("cuda", torch.bfloat16)
    target = torch.randint(0, vocab, (64,), generator=generator).cuda()
    for divergence in ("forward_kl", "jsd", "tvd"):
        full = student.clone().requires_grad_()
        expected = kdk.kd_loss(full, teacher, target, divergence=divergence, temperature=2.0)
        expected.backward()
        mine = student[:, start:start + size].clone().requires_grad_()
        actual = kdk.vocab_parallel_kd_loss(mine, teacher[:, start:start + size], target, vocab_start=start,
                                            divergence=divergence, temperature=2.0)
        actual.backward()
        _close(actual, expected, torch.float32, divergence)
        _close(mine.grad, full.grad[:, start:start + size], torch.bfloat16, divergence)


def _entry(rank: int, world: int, init_file: str, worker: Callable[[int, int], None]) -> None:
    backend = "nccl" if worker is _nccl_worker else "gloo"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    worker(rank, world)
    dist.barrier()  # no rank tears down its connections while a peer still finishes a collective
    dist.destroy_process_group()
    # Done and checked: skip the interpreter's teardown, where gloo's transport threads have been
    # seen to abort a process at exit on a loaded machine (SIGABRT after the work succeeded).
    os._exit(0)


def _spawn(worker: Callable[[int, int], None], world: int, tmp_path) -> None:
    torch.multiprocessing.spawn(_entry, args=(world, str(tmp_path / "init"), worker), nprocs=world)


@pytest.mark.parametrize("world", [2, 3])
def test_logits_match_kd_loss_on_the_whole_vocabulary(world, tmp_path):
    _spawn(_logits_worker, world, tmp_path)


@pytest.mark.parametrize("world", [2, 3])
def test_fused_linear_matches_fused_linear_kd_loss(world, tmp_path):
    _spawn(_fused_linear_worker, world, tmp_path)


def test_bad_layouts_raise_on_every_rank(tmp_path):
    _spawn(_errors_worker, 3, tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_triton_matches_kd_loss(tmp_path):
    _spawn(_nccl_worker, 2, tmp_path)


def test_global_num_items_gives_the_big_batch_gradient(tmp_path):
    _spawn(_num_items_worker, 2, tmp_path)


def test_opcheck(tmp_path):
    _spawn(_opcheck_worker, 2, tmp_path)


def test_global_num_items_single_process():
    targets = [torch.tensor([1, -100, 3]), torch.tensor([[-100, 2], [5, 6]])]
    assert float(kdk.global_num_items(targets)) == 5
    assert float(kdk.global_num_items(targets[0], ignore_index=3)) == 2
    with pytest.raises(TypeError, match="targets must be"):
        kdk.global_num_items([torch.zeros(2)])


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_torch_compile_fullgraph(one_rank_group):
    student, teacher, target = _full_inputs(torch.float32, padded=True)
    student.requires_grad_()
    compiled = torch.compile(lambda s, t, y: kdk.vocab_parallel_kd_loss(s, t, y, vocab_start=0, validate=False,
                                                                         divergence="tvd", temperature=2.0),
                             fullgraph=True)
    loss = compiled(student, teacher, target)
    (grad,) = torch.autograd.grad(loss, student)
    expected_student = student.detach().clone().requires_grad_()
    expected = kdk.kd_loss(expected_student, teacher, target, divergence="tvd", temperature=2.0)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_student.grad)


def test_needs_a_process_group():
    with pytest.raises(RuntimeError, match="initialised torch.distributed"):
        kdk.vocab_parallel_kd_loss(torch.randn(2, 3), torch.randn(2, 3), vocab_start=0)

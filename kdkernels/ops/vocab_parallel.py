"""Vocab-parallel kd_loss on torch.distributed: each rank of a process group holds one slice of
the vocabulary of every row (Megatron-style column-parallel LM heads), and the ranks together
compute exactly kd_loss of the whole rows.

A block of rows takes three reads of the local slice by the kd_loss kernel's shard stages
(csrc/kd_loss.h, kd_loss_shard_<backend>) and two collectives between them:

1. stats read: per row, the slice's (max, sum of exp) of student/T, teacher/T and the raw
   student, packed with the row's status code, whether the slice holds its target and whether
   the row is ignored (PACKED_WIDTH values; one more packed row carries the slice's size);
2. one all_gather (gather_blocks) of that [N + 1, 9] block: every rank combines the same
   whole-row log-normalisers and checks the same rows, so that an error is raised on every rank;
3. sums read: the slice's divergence term sums and raw target logit, [N, 4], and one
   ``all_reduce`` (SUM) of them;
4. gradient read: the slice's logit gradients; the row losses follow from the reduced sums.

Per row, a rank sends 9 values to the all_gather and 4 to the all_reduce, in the accumulation
dtype (fp32; fp64 for fp64 logits): 52 bytes, whatever the vocabulary size.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from kdkernels.ops import backends, saved_gradients
from kdkernels.ops.fused_linear_kd_loss import chunked_heads, gradients_like, rounded_gradients
from kdkernels.ops.kd_loss import DIVERGENCES, RowStatus, raise_for_status, rows_like

Tensor = torch.Tensor

# The kernel's stages and the widths of their per-row outputs (csrc/kd_loss.h).
STATS, SUMS, GRADIENT = 0, 1, 2
STATS_WIDTH, SUMS_WIDTH = 6, 4
# + the status code, the target-owner flag and the ignored-row flag
STATUS, OWNER, IGNORED_ROW = STATS_WIDTH, STATS_WIDTH + 1, STATS_WIDTH + 2
PACKED_WIDTH = STATS_WIDTH + 3
# The kernel's mark of an ignored row in the slice-local target.
IGNORED = -1
# Divergences whose terms need more than the row's log-normalisers inside a read.
WHOLE_ROW_DIVERGENCES = ("akl",)


def group_name(group: Optional[dist.ProcessGroup]) -> str:
    """The name under which a custom op can find `group` again (None: the default group)."""
    return (group if group is not None else dist.group.WORLD).group_name


def _group(name: str) -> dist.ProcessGroup:
    return dist.distributed_c10d._resolve_process_group(name)


def gather_blocks(block: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """Every rank's `block` stacked, [W, *block.shape]: one all_gather into a flat tensor
    (all_gather_single where torch has it, all_gather_into_tensor before)."""
    gathered = block.new_empty(dist.get_world_size(group) * block.numel())
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    all_gather(gathered, block.contiguous().flatten(), group=group)
    return gathered.view(-1, *block.shape)


def _local_target(target: Tensor, vocab_start: int, vocab: int, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """(slice-local target, ignored rows, rows whose target the slice holds): local ids where the
    slice holds the target, IGNORED at ignored rows, `vocab` (outside the slice) elsewhere."""
    ignored = target == ignore_index
    local = target - vocab_start
    owned = (local >= 0) & (local < vocab) & ~ignored
    local = torch.where(owned, local, torch.where(ignored, IGNORED, vocab))
    return local, ignored, owned


def _combined_normalisers(gathered: Tensor) -> Tensor:
    """The ranks' [W, N, STATS_WIDTH] slice statistics, (max, sum of exp(x - max)) pairs, as the
    whole rows' [N, STATS_WIDTH] (max, log of the sum at that max) pairs."""
    maxima, sums = gathered[..., 0::2], gathered[..., 1::2]
    top = maxima.amax(0)
    total = torch.where(sums > 0, sums * torch.exp(maxima - top), 0).sum(0)
    return torch.stack([top, total.log()], -1).flatten(1)


def _combined_status(gathered: Tensor, ignored: Optional[Tensor], need_soft: bool, has_target: bool) -> Tensor:
    """One RowStatus per row from the ranks' [W, N, PACKED_WIDTH] blocks: the first rank's
    non-finite input, then an all-masked row, then a target in no slice (TARGET_OUT_OF_RANGE) or
    in several (DUPLICATE_INDEX); OK at ignored rows."""
    codes = gathered[..., STATUS].to(torch.int8)
    status = codes.gather(0, (codes != 0).to(torch.int8).argmax(0, keepdim=True))[0]
    sums = gathered[..., 1:STATS_WIDTH:2].sum(0)
    checks = [(sums[:, 0] <= 0, RowStatus.STUDENT_ALL_MASKED)]
    if need_soft:
        checks.append((sums[:, 1] <= 0, RowStatus.TEACHER_ALL_MASKED))
    if has_target:
        owners = gathered[..., OWNER].sum(0)
        checks += [(owners == 0, RowStatus.TARGET_OUT_OF_RANGE), (owners > 1, RowStatus.DUPLICATE_INDEX)]
    for failed, code in checks:
        status = torch.where((status == RowStatus.OK) & failed, int(code), status)
    return status if ignored is None else status.masked_fill(ignored, RowStatus.OK)


def _raise_for_rows(status: Tensor, target: Optional[Tensor], vocab: int, ignore_index: int) -> None:
    if bool((status == RowStatus.DUPLICATE_INDEX).any()):
        row = int((status == RowStatus.DUPLICATE_INDEX).nonzero()[0, 0])
        raise ValueError(f"vocab_parallel_kd_loss: target[{row}] = {int(target[row])} lies in the vocabulary slices "
                         "of several ranks: their vocab_start and sizes overlap")
    raise_for_status(status, target, vocab, ignore_index, op="vocab_parallel_kd_loss")


def shard_rows(student: Tensor, teacher: Tensor, target: Optional[Tensor], weight: float, vocab_start: int,
               temperature: float, softcap: float, soft_weight: float, hard_weight: float, divergence: str,
               divergence_args: list[float], ignore_index: int, student_grad: bool, teacher_grad: bool,
               group: dist.ProcessGroup, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Row losses ``weight * (soft_weight * D + hard_weight * CE)`` of the whole rows whose slice
    [N, V_local] this rank holds (the same on every rank), and the gradients for that slice:
    the stages and collectives of the module docstring."""
    (shard,) = backends.kernels(backend, "kd_loss", "kd_loss_shard")
    rows, vocab = student.shape
    acc_dtype = backends.accumulation_dtype(student.dtype)
    need_soft, need_ce = soft_weight != 0, target is not None and hard_weight != 0
    local, ignored, owned = (None, None, None) if target is None else _local_target(target, vocab_start, vocab,
                                                                                    ignore_index)
    options = (temperature, softcap, weight * soft_weight, weight * hard_weight, DIVERGENCES[divergence].kernel_id,
               divergence_args, IGNORED)

    stats, _, _, status = shard(STATS, student, teacher, local, None, None, *options, False, False)
    packed = torch.zeros(rows + 1, PACKED_WIDTH, dtype=acc_dtype, device=student.device)
    packed[:rows, :STATS_WIDTH] = stats
    packed[:rows, STATUS] = status
    if target is not None:
        packed[:rows, OWNER] = owned
        packed[:rows, IGNORED_ROW] = ignored
    packed[rows, 0] = vocab
    gathered = gather_blocks(packed, group)
    total_vocab = int(gathered[:, rows, 0].sum())
    gathered = gathered[:, :rows]
    if target is not None and bool((gathered[..., IGNORED_ROW] != gathered[0, :, IGNORED_ROW]).any()):
        raise ValueError("vocab_parallel_kd_loss: the ranks' targets ignore different rows (every rank must pass "
                         "the same global ids)")
    _raise_for_rows(_combined_status(gathered, ignored, need_soft, target is not None), target, total_vocab,
                    ignore_index)
    norms = _combined_normalisers(gathered[..., :STATS_WIDTH]).contiguous()

    sums = shard(SUMS, student, teacher, local, norms, None, *options, False, False)[0]
    dist.all_reduce(sums, group=group)
    loss = soft_weight * sums[:, 0]
    if need_ce:
        target_logit = sums[:, 3]
        masked = (target_logit == float("-inf")) & ~ignored
        _raise_for_rows(torch.where(masked, int(RowStatus.TARGET_MASKED), 0).to(torch.int8), target, total_vocab,
                        ignore_index)
        loss = loss + hard_weight * (norms[:, 5] - (target_logit - norms[:, 4]))
    if ignored is not None:
        loss = loss.masked_fill(ignored, 0)

    if not (student_grad or teacher_grad):
        return weight * loss, student.new_empty(0, vocab), student.new_empty(0, vocab)
    _, grad_student, grad_teacher, _ = shard(GRADIENT, student, teacher, local, norms, sums, *options, student_grad,
                                             teacher_grad)
    return weight * loss, grad_student, grad_teacher


@torch.library.custom_op("kdkernels::vocab_parallel_kd_loss_rows", mutates_args=())
def vocab_parallel_kd_loss_rows(student: Tensor, teacher: Tensor, target: Optional[Tensor], row_weight: Optional[Tensor],
                                vocab_start: int, temperature: float, softcap: float, soft_weight: float,
                                hard_weight: float, divergence: str, divergence_args: list[float], ignore_index: int,
                                student_grad: bool, teacher_grad: bool, group_name: str,
                                backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """kd_loss_rows of the whole rows whose vocabulary slice [N, V_local], ids [vocab_start,
    vocab_start + V_local), this rank holds; target holds global ids. Collectives on the process
    group named group_name (group_name())."""
    weight = 1.0 if row_weight is None else float(row_weight)
    return shard_rows(student, teacher, target, weight, vocab_start, temperature, softcap, soft_weight, hard_weight,
                      divergence, divergence_args, ignore_index, student_grad, teacher_grad, _group(group_name),
                      backend)


@vocab_parallel_kd_loss_rows.register_fake
def _(student, teacher, target, row_weight, vocab_start, temperature, softcap, soft_weight, hard_weight, divergence,
      divergence_args, ignore_index, student_grad, teacher_grad, group_name, backend):
    return rows_like(student, student_grad, teacher_grad)


saved_gradients.register_leading_gradients_autograd(vocab_parallel_kd_loss_rows, num_inputs=16, per_row=True)


@torch.library.custom_op("kdkernels::vocab_parallel_fused_linear_kd_loss", mutates_args=())
def vocab_parallel_fused_linear_kd_loss(
        student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor], teacher_hidden: Tensor,
        teacher_weight: Tensor, teacher_bias: Optional[Tensor], target: Optional[Tensor],
        row_weight: Optional[Tensor], vocab_start: int, temperature: float, softcap: float, soft_weight: float,
        hard_weight: float, divergence: str, divergence_args: list[float], ignore_index: int, chunk_rows: int,
        student_grad: bool, teacher_grad: bool, group_name: str,
        backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """fused_linear_kd_loss with each rank holding the rows [vocab_start, vocab_start + V_local)
    of both LM heads' weights (and biases) and the hidden states of every rank (replicated):
    (loss, d student_hidden, d W_s, d b_s, d teacher_hidden, d W_t, d b_t) as in
    fused_linear_kd_loss, the weight and bias gradients for this rank's rows. The hidden-state
    gradients are those of the whole loss (summed over the ranks by one all_reduce at the end);
    each chunk of rows takes the two collectives of shard_rows."""
    group = _group(group_name)
    weight = 1.0 if row_weight is None else float(row_weight)

    def chunk_loss(chunk: slice, logits_s: Tensor, logits_t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        try:
            return shard_rows(logits_s, logits_t, None if target is None else target[chunk], weight, vocab_start,
                              temperature, softcap, soft_weight, hard_weight, divergence, divergence_args,
                              ignore_index, student_grad, teacher_grad, group, backend)
        except ValueError as error:  # the same on every rank: name the chunk its row numbers count from
            raise ValueError(f"{error}; rows counted from row {chunk.start} of the hidden states (the chunk of "
                             f"{chunk.stop - chunk.start} rows that failed)") from None

    loss, student_grads, teacher_grads = chunked_heads(
        (student_hidden, student_weight, student_bias), (teacher_hidden, teacher_weight, teacher_bias), chunk_rows,
        student_grad, teacher_grad, chunk_loss)
    hidden_grads = [grads[0] for grads in (student_grads, teacher_grads) if grads[0].numel()]
    if hidden_grads:
        flat = torch.cat([grad.flatten().to(loss.dtype) for grad in hidden_grads])
        dist.all_reduce(flat, group=group)
        for grad, part in zip(hidden_grads, flat.split([grad.numel() for grad in hidden_grads])):
            grad.copy_(part.view_as(grad))
    return (loss, *rounded_gradients(student_grads, student_weight), *rounded_gradients(teacher_grads, teacher_weight))


@vocab_parallel_fused_linear_kd_loss.register_fake
def _(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, target, row_weight,
      vocab_start, temperature, softcap, soft_weight, hard_weight, divergence, divergence_args, ignore_index,
      chunk_rows, student_grad, teacher_grad, group_name, backend):
    return (student_hidden.new_empty((), dtype=backends.accumulation_dtype(student_hidden.dtype)),
            *gradients_like(student_hidden, student_weight, student_bias, student_grad),
            *gradients_like(teacher_hidden, teacher_weight, teacher_bias, teacher_grad))


saved_gradients.register_leading_gradients_autograd(vocab_parallel_fused_linear_kd_loss, num_inputs=21)

"""A plain PyTorch training loop for a distillation :class:`~kdkernels.distill.schemes.Scheme`:
mini-batches of in-memory tensors, AMP, per-step scheduling, a checkpoint per epoch written
atomically, an exact resume, gradient accumulation, and ``DistributedDataParallel`` when
``torch.distributed`` is initialised (each process takes its share of every global batch, so that
N processes train as one would on the same batches)."""

from __future__ import annotations

import contextlib
import math
import os
import random
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

import kdkernels
from kdkernels.distill.schemes import Scheme

Tensor = torch.Tensor
Record = dict[str, float]
Batch = tuple[Tensor, Tensor, Tensor]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)


class Batches:
    """Mini-batches ``(inputs, target, index)`` of in-memory tensors (``index``: the samples'
    rows, for teacher caches). ``shuffle`` draws a new order each epoch from ``seed`` and the
    epoch, so an epoch's batches do not depend on what ran before (an exact resume).

    Under ``torch.distributed`` every process gets an equal contiguous share of each global
    batch: ``batch_size`` must be a multiple of the world size, and an incomplete last batch is
    cut to a multiple of it. Then the mean of the processes' mean losses is the global batch's
    mean loss, for terms that are means over samples; a relation term (RKD, SP, PKT) sees one
    process's share, and BatchNorm statistics are per process unless converted with
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``."""

    def __init__(self, inputs: Tensor, target: Tensor, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False) -> None:
        if len(inputs) != len(target):
            raise ValueError(f"inputs and target must have as many samples, got {len(inputs)} and {len(target)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.inputs, self.target = inputs, target
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        if len(self) == 0:
            raise ValueError(f"no batches: {len(inputs)} samples, batch_size {batch_size}, drop_last {drop_last}")

    def __len__(self) -> int:
        full, rest = divmod(len(self.inputs), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of epoch ``epoch`` (counted from 0)."""
        if self.shuffle:
            order = torch.randperm(len(self.inputs), generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        else:
            order = torch.arange(len(self.inputs))
        rank, world = _rank_and_world()
        if self.batch_size % world:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of the world size {world}")
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch = order[start:start + self.batch_size]
            batch = batch[:len(batch) - len(batch) % world]
            if len(batch):
                index = batch.view(world, -1)[rank]
                yield self.inputs[index], self.target[index], index


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                       final_factor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps`` to the optimizer's learning rate, then a cosine decay
    to ``final_factor`` times it at ``total_steps``; step it once per optimizer step."""
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps and total_steps >= 1, got {warmup_steps} and "
                         f"{total_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _save_atomically(state: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same directory, then rename over ``path``: a crash
    leaves the previous checkpoint whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


class Trainer:
    """Trains ``scheme`` with ``optimizer`` (over ``scheme.trainable_parameters()``) and an
    optional per-step ``scheduler``.

    - ``device``: where the scheme and batches go (default: where the scheme is).
    - ``amp``: an autocast dtype (``torch.bfloat16``; ``torch.float16`` adds a gradient scaler).
    - ``grad_clip``: clip the gradients' global norm to this.
    - ``checkpoint_dir``: write ``checkpoint.pt`` there after each epoch (model, optimizer,
      scheduler, scaler, every process's RNG, epoch, history); ``fit(resume=True)`` continues
      from it. A teacher cache is not saved: after a resume the teacher runs again on the
      batches of the epoch it resumes at, which on a GPU may round differently.
    - ``on_epoch``: called with each epoch's record.
    - ``find_unused_parameters``: passed to ``DistributedDataParallel`` (for terms that skip
      some of their parameters on some steps).
    - ``accumulation_steps``: split each process's share of a batch into this many micro-batches,
      a forward and backward each (DDP synchronises the gradients on the last one only), and step
      the optimizer once per batch.

    Each micro-batch's loss is weighted by its number of targets that are not ``ignore_index``
    over :func:`kdkernels.global_num_items` of the whole step (one all_reduce under
    torch.distributed, the count of one process's average share). The step's gradient is then
    exactly that of the global batch, whatever the micro-batch sizes and ignored targets, for the
    terms that average over the counted targets (the logit losses and ``CrossEntropy``); for
    feature terms, which average over a micro-batch's samples, it is when no target is ignored,
    and a relation term's matrix spans one micro-batch."""

    def __init__(self, scheme: Scheme, optimizer: torch.optim.Optimizer,
                 scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None, *,
                 device: Optional[Union[str, torch.device]] = None, amp: Optional[torch.dtype] = None,
                 grad_clip: Optional[float] = None, checkpoint_dir: Optional[Union[str, Path]] = None,
                 progress: bool = False, on_epoch: Optional[Callable[[Record], None]] = None,
                 find_unused_parameters: bool = False, accumulation_steps: int = 1,
                 ignore_index: int = -100) -> None:
        if amp not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"amp must be None, torch.bfloat16 or torch.float16, got {amp}")
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
        self.scheme = scheme
        self.device = torch.device(device) if device is not None else next(scheme.parameters()).device
        scheme.to(self.device)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.amp, self.grad_clip = amp, grad_clip
        self.scaler = torch.amp.GradScaler(self.device.type) if amp is torch.float16 else None
        self.checkpoint = Path(checkpoint_dir) / "checkpoint.pt" if checkpoint_dir is not None else None
        self.progress, self.on_epoch = progress, on_epoch
        self.accumulation_steps, self.ignore_index = accumulation_steps, ignore_index
        self.model: torch.nn.Module = scheme
        if _distributed():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            self.model = torch.nn.parallel.DistributedDataParallel(
                scheme, device_ids=[self.device] if self.device.type == "cuda" else None,
                find_unused_parameters=find_unused_parameters)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None)

    def _to_device(self, batch: Batch) -> Batch:
        return tuple(x.to(self.device, non_blocking=True) for x in batch)

    def _backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _update(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.scheme.trainable_parameters(), self.grad_clip)
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.scaler.get_scale() < scale:  # inf/NaN gradients: the step was skipped
                return
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.scheme.after_step()

    def _train_step(self, batch: Batch) -> dict[str, Tensor]:
        """One optimizer step on this process's share of a batch, in micro-batches; returns the
        loss and its parts, each weighted as it enters the gradient."""
        micro = [part for part in zip(*(x.tensor_split(self.accumulation_steps) for x in self._to_device(batch)))
                 if len(part[1])]
        num_items = kdkernels.global_num_items([target for _, target, _ in micro], ignore_index=self.ignore_index)
        self.optimizer.zero_grad(set_to_none=True)
        weighted: dict[str, Tensor] = {}
        for i, (inputs, target, index) in enumerate(micro):
            counted = (target != self.ignore_index).sum()
            weight = torch.where(num_items > 0, counted / num_items, 0.0).float()
            last = i == len(micro) - 1
            synchronised = (self.model.no_sync() if isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
                            and not last else contextlib.nullcontext())
            with synchronised:
                with self._autocast():
                    loss, parts = self.model(inputs, target, index)
                self._backward(loss * weight)
            for name, value in {"loss": loss.detach(), **parts}.items():
                weighted[name] = weighted.get(name, 0.0) + value.float() * weight
        self._update()
        return weighted

    def _train_epoch(self, batches: Batches, epoch: int, epochs: int) -> Record:
        self.scheme.train()
        sums: dict[str, Tensor] = {}
        count = 0
        steps = batches.epoch(epoch)
        if self.progress and _rank_and_world()[0] == 0:
            from tqdm.auto import tqdm
            steps = tqdm(steps, total=len(batches), desc=f"epoch {epoch + 1}/{epochs}", leave=False)
        for batch in steps:
            count += 1
            for name, value in self._train_step(batch).items():
                sums[name] = sums.get(name, 0.0) + value
        self.scheme.after_epoch()
        names = sorted(sums)
        means = torch.stack([sums[name] for name in names]) / count
        if _distributed():
            dist.all_reduce(means)
            means /= dist.get_world_size()
        record = {f"train/{name}": value for name, value in zip(names, means.tolist())}
        if not math.isfinite(record["train/loss"]):
            raise FloatingPointError(f"the training loss of epoch {epoch + 1} is {record['train/loss']}; parts: "
                                     f"{record}")
        return record

    @torch.no_grad()
    def evaluate(self, batches: Batches) -> Record:
        """Mean cross-entropy and accuracy of each of the scheme's models on ``batches`` (over the
        targets that are not ``ignore_index``)."""
        record: Record = {}
        for name, model in self.scheme.models().items():
            model.eval()
            totals = torch.zeros(3, dtype=torch.float64, device=self.device)
            for batch in batches.epoch(0):
                inputs, target, _ = self._to_device(batch)
                with self._autocast():
                    logits = model(inputs).float()
                counted = target != self.ignore_index
                totals += torch.stack([
                    F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="sum").double(),
                    (logits.argmax(-1) == target)[counted].sum().double(), counted.sum().double()])
            if _distributed():
                dist.all_reduce(totals)
            loss, correct, count = totals.tolist()
            record[f"val/loss/{name}"] = loss / count if count else math.nan
            record[f"val/accuracy/{name}"] = correct / count if count else math.nan
        return record

    def _save(self, epoch: int, history: list[Record]) -> None:
        rng = [None] * _rank_and_world()[1]
        if _distributed():
            dist.all_gather_object(rng, _rng_state(self.device))
        else:
            rng[0] = _rng_state(self.device)
        if _rank_and_world()[0] == 0:
            _save_atomically({"epoch": epoch, "history": history, "rng": rng,
                              "scheme": self.scheme.state_dict(), "optimizer": self.optimizer.state_dict(),
                              "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                              "scaler": self.scaler.state_dict() if self.scaler is not None else None},
                             self.checkpoint)
        if _distributed():
            dist.barrier()  # every process sees the new checkpoint before going on

    def _load(self) -> tuple[int, list[Record]]:
        state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        rank, world = _rank_and_world()
        if len(state["rng"]) != world:
            raise ValueError(f"{self.checkpoint} was written by {len(state['rng'])} processes, not {world}")
        self.scheme.load_state_dict(state["scheme"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"][rank], self.device)
        return state["epoch"], state["history"]

    def fit(self, train: Batches, val: Optional[Batches] = None, *, epochs: int, resume: bool = False) -> list[Record]:
        """Train until ``epochs`` epochs are done; with ``resume``, start from the checkpoint
        when there is one. Returns one record per epoch (train loss and its parts, validation
        loss and accuracy per model, learning rate)."""
        start, history = 0, []
        if resume:
            if self.checkpoint is None:
                raise ValueError("resume=True needs a checkpoint_dir")
            if self.checkpoint.exists():
                start, history = self._load()
            if start > epochs:
                raise ValueError(f"{self.checkpoint} holds {start} epochs, more than the {epochs} asked for")
        for epoch in range(start, epochs):
            record: Record = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"]}
            record.update(self._train_epoch(train, epoch, epochs))
            if val is not None:
                record.update(self.evaluate(val))
            history.append(record)
            if self.checkpoint is not None:
                self._save(epoch + 1, history)
            if self.on_epoch is not None:
                self.on_epoch(record)
        return history

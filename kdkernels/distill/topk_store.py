"""Offline teacher store: a teacher's top-k ids and log-probabilities at every position of a
token dataset, written once and read back, aligned with the tokens, for
:func:`kdkernels.topk_kd_loss`.

A store is a directory of NumPy files, memory-mapped when read:

- ``meta.json``: format, version, ``k``, ``vocab``, ``logprob_dtype``, sequence and token counts
  (written last: a store without it is incomplete);
- ``offsets.npy``: int64 ``[sequences + 1]``, where each sequence's tokens start;
- ``tokens.npy``: int32 ``[tokens]``, the inputs;
- ``ids.npy``: int32 ``[tokens, k]``, the teacher's top-k ids at each position, most likely first;
- ``logprobs.npy``: ``[tokens, k]`` log-probabilities at T = 1 (fp16, fp32, or bf16 kept as its
  uint16 bits, which NumPy lacks), of the teacher's softmax over its full vocabulary.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch

Tensor = torch.Tensor

FORMAT, VERSION = "kdkernels-topk-store", 1
LOGPROB_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# How each logprob dtype is kept on disk (NumPy has no bfloat16: its bits as uint16).
_DISK_DTYPES = {"float16": (np.float16, torch.float16), "bfloat16": (np.uint16, torch.int16),
                "float32": (np.float32, torch.float32)}

Teacher = Callable[[Tensor, Tensor], Tensor]


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in LOGPROB_DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"logprob_dtype must be one of {list(LOGPROB_DTYPES.values())}, got {dtype}")


def _right_padded(sequences: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """[B, L] token ids padded with 0 on the right, and the [B, L] mask of real tokens."""
    length = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, :len(sequence)] = sequence
        mask[row, :len(sequence)] = 1
    return ids, mask


@torch.no_grad()
def topk_logprobs(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top-k ids and their log-probabilities (fp32) of ``[..., V]`` logits, without forming the
    full log-softmax: the top-k values minus the log-sum-exp of the row."""
    values, ids = logits.topk(k, dim=-1)
    return ids, values.float() - logits.float().logsumexp(-1, keepdim=True)


@torch.no_grad()
def write_topk_store(path: Union[str, os.PathLike], teacher: Teacher, sequences: Iterable[Union[Tensor, Sequence[int]]],
                     *, k: int = 64, batch_size: int = 8, logprob_dtype: torch.dtype = torch.float16,
                     device: Optional[Union[str, torch.device]] = None) -> "TopKStore":
    """Runs ``teacher(input_ids [B, L], attention_mask [B, L]) -> logits [B, L, V]`` over the token
    sequences (batches of ``batch_size``, right-padded with 0 and masked; e.g.
    ``lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits`` for a Hugging Face
    causal LM) and writes each position's top-k ids and log-probabilities to a new store at
    `path`. The teacher must not let padding change the real positions (a causal LM with the
    mask does not); batch_size=1 needs no padding at all. Returns the store, opened."""
    sequences = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in sequences]
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("sequences must be a non-empty collection of non-empty token sequences")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    dtype_name = _dtype_name(logprob_dtype)
    os.makedirs(path, exist_ok=False)
    lengths = torch.tensor([len(s) for s in sequences])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    tokens_total = int(offsets[-1])
    disk_dtype, view_dtype = _DISK_DTYPES[dtype_name]
    np.save(os.path.join(path, "offsets.npy"), offsets.numpy())
    np.save(os.path.join(path, "tokens.npy"), torch.cat(sequences).int().numpy())
    ids_file = np.lib.format.open_memmap(os.path.join(path, "ids.npy"), "w+", np.int32, (tokens_total, k))
    logprobs_file = np.lib.format.open_memmap(os.path.join(path, "logprobs.npy"), "w+", disk_dtype, (tokens_total, k))
    vocab = None
    for first in range(0, len(sequences), batch_size):
        batch = sequences[first:first + batch_size]
        input_ids, mask = _right_padded(batch)
        logits = teacher(input_ids.to(device), mask.to(device))
        if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(input_ids.shape):
            raise ValueError(f"teacher must return logits [B, L, V] for input_ids {tuple(input_ids.shape)}, got "
                             f"{tuple(logits.shape)}")
        if vocab is None:
            vocab = logits.shape[-1]
            if k > vocab:
                raise ValueError(f"k = {k} exceeds the teacher's vocabulary of {vocab}")
        ids, logprobs = topk_logprobs(logits, k)
        ids, logprobs = ids.int().cpu(), logprobs.to(logprob_dtype).cpu().view(view_dtype)
        for row, sequence in enumerate(batch):
            start = int(offsets[first + row])
            ids_file[start:start + len(sequence)] = ids[row, :len(sequence)].numpy()
            logprobs_file[start:start + len(sequence)] = logprobs[row, :len(sequence)].numpy()
    ids_file.flush()
    logprobs_file.flush()
    meta = {"format": FORMAT, "version": VERSION, "k": k, "vocab": vocab, "logprob_dtype": dtype_name,
            "sequences": len(sequences), "tokens": tokens_total}
    with open(os.path.join(path, "meta.json"), "w") as out:
        json.dump(meta, out, indent=2)
    return TopKStore(path)


class TopKStore(torch.utils.data.Dataset):
    """A store written by :func:`write_topk_store`, memory-mapped. Item ``i`` is sequence ``i`` as
    a dict: ``input_ids`` int64 ``[L]``, ``teacher_topk_indices`` int32 ``[L, k]`` and
    ``teacher_topk_logprobs`` ``[L, k]`` in the store's dtype, where position t holds the teacher's
    distribution after reading tokens 0..t (its prediction of token t + 1)."""

    def __init__(self, path: Union[str, os.PathLike]) -> None:
        meta_path = os.path.join(path, "meta.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{path} is not a complete top-k store (no meta.json)")
        with open(meta_path) as meta_file:
            self.meta = json.load(meta_file)
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise ValueError(f"{path} holds {self.meta.get('format')} version {self.meta.get('version')}, not "
                             f"{FORMAT} version {VERSION}")
        self.k, self.vocab = int(self.meta["k"]), int(self.meta["vocab"])
        self.logprob_dtype = LOGPROB_DTYPES[self.meta["logprob_dtype"]]
        self._view_dtype = _DISK_DTYPES[self.meta["logprob_dtype"]][1]

        def load(name: str) -> np.ndarray:
            return np.load(os.path.join(path, name), mmap_mode="r")

        self._offsets, self._tokens = load("offsets.npy"), load("tokens.npy")
        self._ids, self._logprobs = load("ids.npy"), load("logprobs.npy")

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sequence {index} is outside a store of {len(self)}")
        index %= len(self)
        start, end = int(self._offsets[index]), int(self._offsets[index + 1])
        return {
            "input_ids": torch.from_numpy(np.array(self._tokens[start:end])).long(),
            "teacher_topk_indices": torch.from_numpy(np.array(self._ids[start:end])),
            "teacher_topk_logprobs": torch.from_numpy(np.array(self._logprobs[start:end])).view(self.logprob_dtype),
        }

    @property
    def nbytes(self) -> int:
        """Bytes of the teacher's part of the store (ids and logprobs)."""
        return self._ids.nbytes + self._logprobs.nbytes


def collate_topk(batch: list[dict[str, Tensor]], ignore_index: int = -100) -> dict[str, Tensor]:
    """Right-pads store items into a batch for a causal LM student: ``input_ids`` and
    ``attention_mask`` [B, L], ``teacher_topk_indices`` and ``teacher_topk_logprobs`` [B, L, k], and
    ``target`` [B, L], the next token (``ignore_index`` at each sequence's last position and at
    padding, so that those positions count in neither term of topk_kd_loss). Padded positions get
    the ids 0..k-1 with log-probability 0."""
    input_ids, mask = _right_padded([item["input_ids"] for item in batch])
    k = batch[0]["teacher_topk_indices"].shape[-1]
    ids = torch.arange(k, dtype=torch.int32).expand(*input_ids.shape, k).clone()
    logprobs = torch.zeros(*input_ids.shape, k, dtype=batch[0]["teacher_topk_logprobs"].dtype)
    target = torch.full_like(input_ids, ignore_index)
    for row, item in enumerate(batch):
        length = len(item["input_ids"])
        ids[row, :length] = item["teacher_topk_indices"]
        logprobs[row, :length] = item["teacher_topk_logprobs"]
        target[row, :length - 1] = item["input_ids"][1:]
    return {"input_ids": input_ids, "attention_mask": mask, "teacher_topk_indices": ids,
            "teacher_topk_logprobs": logprobs, "target": target}

"""The offline teacher store: written from a teacher over variable-length sequences and read back
exactly, aligned with the tokens; its size against full fp16 logits; the batches it collates
feed topk_kd_loss."""

from __future__ import annotations

import json
import os

import pytest
import torch

import kdkernels as kdk
from kdkernels.distill import TopKStore, collate_topk, topk_logprobs, write_topk_store


class _RandomTeacher(torch.nn.Module):
    """A causal stand-in for an LM: each position's logits are a random row for its token plus
    half the row for the token before (gathers and adds only, so batching cannot change a bit)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)) * 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        previous = torch.nn.functional.pad(input_ids, (1, 0))[:, :-1]
        return self.table[input_ids] + 0.5 * self.table[previous]


def _sequences(vocab: int, lengths: list[int]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=generator) for n in lengths]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_round_trip_is_exact(tmp_path, dtype, batch_size):
    vocab, k = 500, 8
    teacher = _RandomTeacher(vocab)
    sequences = _sequences(vocab, [5, 1, 12, 7, 3])
    store = write_topk_store(tmp_path / "store", teacher, sequences, k=k, batch_size=batch_size, logprob_dtype=dtype)
    reopened = TopKStore(tmp_path / "store")
    assert len(reopened) == len(sequences) and reopened.k == k and reopened.vocab == vocab
    for index, sequence in enumerate(sequences):
        item = reopened[index]
        ids, logprobs = topk_logprobs(teacher(sequence[None], torch.ones_like(sequence)[None])[0], k)
        assert torch.equal(item["input_ids"], sequence)
        assert torch.equal(item["teacher_topk_indices"], ids.int())
        assert item["teacher_topk_logprobs"].dtype == dtype
        assert torch.equal(item["teacher_topk_logprobs"], logprobs.to(dtype))
    assert torch.equal(store[-1]["input_ids"], sequences[-1])
    with pytest.raises(IndexError):
        store[len(sequences)]


def test_topk_logprobs_are_those_of_the_full_softmax():
    logits = torch.randn(3, 4, 1000, dtype=torch.float64) * 5
    ids, logprobs = topk_logprobs(logits, 10)
    full = logits.log_softmax(-1)
    torch.testing.assert_close(logprobs.double(), full.gather(-1, ids), rtol=1e-6, atol=1e-6)
    assert torch.equal(ids, full.topk(10, -1).indices)


def test_top64_store_is_under_one_percent_of_fp16_logits(tmp_path):
    vocab, k = 32000, 64
    sequences = _sequences(vocab, [40, 24])
    store = write_topk_store(tmp_path / "store", lambda ids, mask: torch.randn(*ids.shape, vocab), sequences, k=k)
    full_fp16_bytes = 64 * vocab * 2
    assert store.nbytes / full_fp16_bytes < 0.01
    assert store.nbytes == 64 * k * (4 + 2)


def test_collated_batch_feeds_topk_kd_loss(tmp_path):
    vocab, k = 300, 16
    sequences = _sequences(vocab, [6, 9, 2])
    store = write_topk_store(tmp_path / "store", _RandomTeacher(vocab), sequences, k=k)
    batch = collate_topk([store[i] for i in range(len(store))])
    assert batch["target"].tolist()[2] == [sequences[2][1].item()] + [-100] * 8
    student = torch.randn(3, 9, vocab, requires_grad=True)
    loss = kdk.topk_kd_loss(student, batch["teacher_topk_indices"], batch["teacher_topk_logprobs"], batch["target"],
                            tail="bucket")
    counted = batch["target"] != -100
    expected = kdk.topk_kd_loss(student[counted], batch["teacher_topk_indices"][counted],
                                batch["teacher_topk_logprobs"][counted], batch["target"][counted], tail="bucket")
    torch.testing.assert_close(loss, expected)


def test_bad_use_is_a_clear_error(tmp_path):
    teacher = _RandomTeacher(50)
    with pytest.raises(ValueError, match="exceeds the teacher's vocabulary"):
        write_topk_store(tmp_path / "a", teacher, _sequences(50, [3]), k=51)
    with pytest.raises(ValueError, match="non-empty"):
        write_topk_store(tmp_path / "b", teacher, [torch.tensor([], dtype=torch.long)])
    with pytest.raises(ValueError, match="teacher must return logits"):
        write_topk_store(tmp_path / "c", lambda ids, mask: torch.zeros(3), _sequences(50, [3]))
    with pytest.raises(FileExistsError):
        write_topk_store(tmp_path / "c", teacher, _sequences(50, [3]))
    with pytest.raises(FileNotFoundError, match="not a complete top-k store"):
        TopKStore(tmp_path / "c")
    store = write_topk_store(tmp_path / "d", teacher, _sequences(50, [3]), k=4)
    meta = dict(store.meta, version=99)
    with open(os.path.join(tmp_path / "d", "meta.json"), "w") as out:
        json.dump(meta, out)
    with pytest.raises(ValueError, match="version 99"):
        TopKStore(tmp_path / "d")

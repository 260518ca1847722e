"""Hugging Face integration (extra `hf`): tiny randomly initialised Llama models at vocabulary
128256 (nothing downloaded); the fused distillation loss against the unfused path on full logits,
live and offline teacher, and a DistillationTrainer step."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import kdkernels as kdk  # noqa: E402
from kdkernels.distill import TopKStore, collate_topk, write_topk_store  # noqa: E402
from kdkernels.distill.hf import DistillationTrainer, distillation_loss  # noqa: E402

VOCAB = 128256


def _llama(hidden: int, seed: int) -> "transformers.LlamaForCausalLM":
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).float()


def _batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, VOCAB, (2, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, :2] = -100  # a prompt
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _student_grads(student) -> list[torch.Tensor]:
    return [p.grad.clone() for p in (student.lm_head.weight, student.model.embed_tokens.weight, student.model.norm.weight)]


def test_live_teacher_matches_the_unfused_path():
    student, teacher, batch = _llama(16, 0), _llama(32, 1), _batch()
    options = dict(temperature=2.0, alpha=0.5, divergence="jsd", beta=0.3)
    loss = distillation_loss(student, batch, teacher=teacher, chunk_size=4, **options)
    loss.backward()
    grads = _student_grads(student)
    student.zero_grad()
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    target = batch["labels"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    expected = kdk.kd_loss(logits, teacher_logits, target, backend="reference", **options)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=2e-5, atol=2e-5)
    for grad, expected_grad in zip(grads, _student_grads(student)):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4 * expected_grad.abs().max().item())


def test_offline_teacher_from_a_store_matches_the_unfused_path(tmp_path):
    student, teacher = _llama(16, 0), _llama(32, 1)
    generator = torch.Generator().manual_seed(4)
    sequences = [torch.randint(0, VOCAB, (n,), generator=generator) for n in (7, 4)]
    write_topk_store(tmp_path / "store", lambda ids, mask: teacher(input_ids=ids, attention_mask=mask).logits,
                     sequences, k=32)
    batch = collate_topk([item for item in TopKStore(tmp_path / "store")])
    loss = distillation_loss(student, batch, tail="bucket", temperature=1.0)
    loss.backward()
    grads = _student_grads(student)
    student.zero_grad()
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = kdk.topk_kd_loss(logits, batch["teacher_topk_indices"], batch["teacher_topk_logprobs"], batch["target"],
                                tail="bucket", backend="reference")
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=2e-5, atol=2e-5)
    for grad, expected_grad in zip(grads, _student_grads(student)):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4 * expected_grad.abs().max().item())


def test_trainer_step_lowers_the_loss(tmp_path):
    student, teacher, batch = _llama(16, 0), _llama(32, 1), _batch()
    dataset = [{name: value[row] for name, value in batch.items()} for row in range(2)]
    arguments = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3,
                                               learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1,
                                               use_cpu=True)
    trainer = DistillationTrainer(model=student, args=arguments, train_dataset=dataset, teacher=teacher,
                                  kd_options={"temperature": 2.0, "alpha": 0.5})
    before = distillation_loss(student, batch, teacher=teacher, temperature=2.0, alpha=0.5).item()
    trainer.train()
    after = distillation_loss(student, batch, teacher=teacher, temperature=2.0, alpha=0.5).item()
    assert after < before
    assert all(p.grad is None or not p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("offline", [False, True])
def test_example_script_runs(offline):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "distill_hf.py"
    spec = importlib.util.spec_from_file_location("distill_hf", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    loss = example.main(["--steps", "2", "--sequences", "4", "--length", "8"] + (["--offline"] if offline else []))
    assert loss == loss and loss > 0

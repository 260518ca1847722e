"""Hugging Face integration (extra ``hf``): distil a causal LM (``AutoModelForCausalLM``) into a
student with the fused-linear losses, from each model's last hidden states and ``lm_head``
weights, so that no full logits tensor is ever formed. The teacher is live (a model run under
no_grad) or offline (a batch of a top-k store, kdkernels.distill.collate_topk).

``distillation_loss`` is the loss of one batch; ``DistillationTrainer`` is a
``transformers.Trainer`` whose loss it is."""

from __future__ import annotations

from typing import Any, Optional

import torch
import transformers

import kdkernels

Tensor = torch.Tensor


def last_hidden_states(model: transformers.PreTrainedModel, input_ids: Tensor,
                       attention_mask: Optional[Tensor]) -> Tensor:
    """The hidden states that the model's LM head reads: its backbone's last_hidden_state."""
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _lm_head(model: transformers.PreTrainedModel) -> tuple[Tensor, Optional[Tensor]]:
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"{type(model).__name__}'s output embeddings are {type(head).__name__}, not the "
                        "torch.nn.Linear LM head that the fused losses read")
    return head.weight, head.bias


def distillation_loss(student: transformers.PreTrainedModel, batch: dict[str, Tensor], *,
                      teacher: Optional[transformers.PreTrainedModel] = None, ignore_index: int = -100,
                      **keywords: Any) -> Tensor:
    """The KD loss of one batch for a causal LM student.

    - Live teacher (``teacher`` given): ``batch`` holds ``input_ids``, optionally
      ``attention_mask`` and ``labels`` (Hugging Face's convention: the tokens themselves, -100
      where not to be learned; position t predicts labels[t + 1]). The loss is
      :func:`kdkernels.fused_linear_kd_loss` of both models' last hidden states and LM heads over
      the shifted positions, with the CE term on the labels when present (and padding, by
      attention_mask, ignored).
    - Offline teacher (``teacher`` None): ``batch`` is a :func:`kdkernels.distill.collate_topk`
      batch (``input_ids``, ``attention_mask``, ``teacher_topk_indices``,
      ``teacher_topk_logprobs``, ``target``); the loss is
      :func:`kdkernels.fused_linear_topk_kd_loss`.

    ``keywords`` are those of the loss (temperature, alpha, divergence, tail, chunk_size,
    num_items, ...)."""
    input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
    student_weight, student_bias = _lm_head(student)
    hidden = last_hidden_states(student, input_ids, attention_mask)
    if teacher is None:
        return kdkernels.fused_linear_topk_kd_loss(hidden, student_weight, batch["teacher_topk_indices"],
                                                   batch["teacher_topk_logprobs"], batch["target"],
                                                   student_bias=student_bias, ignore_index=ignore_index, **keywords)
    with torch.no_grad():
        teacher_hidden = last_hidden_states(teacher, input_ids, attention_mask)
    teacher_weight, teacher_bias = _lm_head(teacher)
    target = None
    if batch.get("labels") is not None:
        target = batch["labels"][:, 1:]
        if attention_mask is not None:
            target = target.masked_fill(attention_mask[:, 1:] == 0, ignore_index)
    return kdkernels.fused_linear_kd_loss(hidden[:, :-1], student_weight, teacher_hidden[:, :-1], teacher_weight,
                                          target, student_bias=student_bias, teacher_bias=teacher_bias,
                                          ignore_index=ignore_index, **keywords)


class DistillationTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains its model (the student) on
    :func:`distillation_loss`: with ``teacher`` (a frozen causal LM on the student's device) on
    batches with ``input_ids``, ``attention_mask`` and ``labels``, or without it on batches of a
    top-k store (``data_collator=kdkernels.distill.collate_topk``). ``kd_options`` are the loss's
    keywords. Batches reach the loss whole (``remove_unused_columns`` is turned off). Under
    gradient accumulation the Trainer's count of label tokens becomes the loss's
    ``num_items``, so that the accumulated gradient is that of one big batch."""

    def __init__(self, *args: Any, teacher: Optional[transformers.PreTrainedModel] = None,
                 kd_options: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The batches carry more than the model's forward takes (targets, the store's top-k).
        self.args.remove_unused_columns = False
        self.teacher = teacher
        self.kd_options = dict(kd_options or {})
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Tensor], return_outputs: bool = False,
                     num_items_in_batch: Optional[Any] = None) -> Any:
        options = dict(self.kd_options)
        if num_items_in_batch is not None and "num_items" not in options:
            options["num_items"] = num_items_in_batch
        loss = distillation_loss(self.accelerator.unwrap_model(model), inputs, teacher=self.teacher, **options)
        return (loss, None) if return_outputs else loss

"""Distil a Hugging Face causal LM into a smaller one with kdkernels' fused-linear KD loss, through
kdkernels.distill.hf.DistillationTrainer: live teacher by default, or offline through a top-k
store (--offline: the teacher runs once over the data, then training reads its top-k).

    python examples/distill_hf.py                        # tiny random Llama models, random tokens
    python examples/distill_hf.py --teacher PATH --student PATH --steps 100

With no model paths it builds tiny randomly initialised Llama models at vocabulary 128256 and
trains on random token sequences (nothing is downloaded): a smoke run of the whole path."""

from __future__ import annotations

import argparse
import tempfile
from typing import Optional

import torch
import transformers

from kdkernels.distill import TopKStore, collate_topk, write_topk_store
from kdkernels.distill.hf import DistillationTrainer


def _model(path: Optional[str], hidden: int, seed: int) -> transformers.PreTrainedModel:
    if path:
        return transformers.AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=128256, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=256, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def main(argv: Optional[list[str]] = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", help="teacher model path or name (default: a tiny random Llama)")
    parser.add_argument("--student", help="student model path or name (default: a tiny random Llama)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--offline", action="store_true", help="distil from a top-k store of the teacher")
    parser.add_argument("--k", type=int, default=64, help="top-k of the store")
    args = parser.parse_args(argv)
    teacher, student = _model(args.teacher, 64, 0), _model(args.student, 32, 1)
    generator = torch.Generator().manual_seed(2)
    vocab = student.config.vocab_size
    sequences = [torch.randint(0, vocab, (args.length,), generator=generator) for _ in range(args.sequences)]
    with tempfile.TemporaryDirectory() as workdir:
        training = transformers.TrainingArguments(output_dir=workdir, per_device_train_batch_size=4,
                                                  max_steps=args.steps, learning_rate=3e-3, report_to=[],
                                                  save_strategy="no", logging_steps=max(1, args.steps // 5))
        options = {"temperature": 2.0, "alpha": 0.5}
        if args.offline:
            store = write_topk_store(f"{workdir}/store", lambda ids, mask: teacher(input_ids=ids,
                                                                                  attention_mask=mask).logits,
                                     sequences, k=args.k)
            print(f"top-{args.k} store: {store.nbytes / 2**20:.1f} MiB for {store.meta['tokens']} tokens")
            trainer = DistillationTrainer(model=student, args=training, train_dataset=TopKStore(f"{workdir}/store"),
                                          data_collator=collate_topk, kd_options=dict(options, tail="bucket"))
        else:
            dataset = [{"input_ids": s, "attention_mask": torch.ones_like(s), "labels": s} for s in sequences]
            trainer = DistillationTrainer(model=student, args=training, train_dataset=dataset, teacher=teacher,
                                          kd_options=options)
        result = trainer.train()
    print(f"final training loss {result.training_loss:.4f}")
    return result.training_loss


if __name__ == "__main__":
    main()

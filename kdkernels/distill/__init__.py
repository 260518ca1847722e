"""Distillation tooling on the public API: the trainer (schemes, loss terms, loop), the
``kdkernels distill`` recipes, and the offline top-k teacher store."""

from kdkernels.distill.schemes import DeepToShallow, Offline, Online, Scheme, SelfTeacher
from kdkernels.distill.terms import (CrossEntropy, FeatureDistillation, FeatureTaps, LogitDistillation, Outputs,
                                     Term)
from kdkernels.distill.topk_store import TopKStore, collate_topk, topk_logprobs, write_topk_store
from kdkernels.distill.trainer import Batches, Trainer, cosine_with_warmup

__all__ = ["Batches", "CrossEntropy", "DeepToShallow", "FeatureDistillation", "FeatureTaps", "LogitDistillation",
           "Offline", "Online", "Outputs", "Scheme", "SelfTeacher", "Term", "TopKStore", "Trainer", "collate_topk",
           "cosine_with_warmup", "topk_logprobs", "write_topk_store"]

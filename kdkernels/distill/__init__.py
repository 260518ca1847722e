"""Distillation tooling on top of the public API: the offline teacher store."""

from kdkernels.distill.topk_store import TopKStore, collate_topk, topk_logprobs, write_topk_store

__all__ = ["TopKStore", "collate_topk", "topk_logprobs", "write_topk_store"]

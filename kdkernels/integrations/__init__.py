"""Drop-in replacements for the KD losses of other frameworks: same signatures, same numbers,
kdkernels' kernels underneath. `liger` and `torchtune` re-create those APIs and need neither
framework installed; `trl` patches TRL's trainers and `torchdistill` registers in torchdistill's
loss registry, each needing its framework (the `trl` and `torchdistill` extras)."""

from __future__ import annotations


def generalized_jsd_options(beta: float) -> dict:
    """kd_loss's divergence for the generalized JSD of TRL and Liger (P teacher, Q student):
    forward KL(P || Q) at beta = 0, reverse KL(Q || P) at beta = 1, else
    beta KL(P || M) + (1 - beta) KL(Q || M) with M = beta P + (1 - beta) Q."""
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if beta == 0.0:
        return {"divergence": "forward_kl"}
    if beta == 1.0:
        return {"divergence": "reverse_kl"}
    return {"divergence": "jsd", "beta": beta}

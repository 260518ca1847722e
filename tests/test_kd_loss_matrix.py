"""kd_loss on the CPU kernel against kdkernels.reference: every divergence x reduction x
temperature x target mode x dtype x shape x vocabulary size x layout, values and gradients of
student and teacher."""

import pytest
import torch

import kdkernels as kdk
from conftest import assert_matches_reference, make_logits, make_target

# The CPU kernel here; with CUDA, the GPU backends run the same matrix on the GPU.
BACKENDS = [("cpu", "cpu")] + [("cuda", b) for b in ("triton", "cuda")
                               if torch.cuda.is_available() and b in kdk.available_backends("cuda")]

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
REDUCTIONS = ["batchmean", "sum", "none"]
TEMPERATURES = [0.5, 1.0, 4.0, 20.0]
TARGETS = ["none", "target", "ignored"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = {"2d": (6,), "3d": (2, 3)}
VOCABS = [1, 7, 1000, 32001]


@pytest.mark.parametrize("device, backend", BACKENDS, ids=[b for _, b in BACKENDS])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target_mode", TARGETS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_reference(divergence, reduction, temperature, target_mode, dtype, shape, vocab, contiguous, device,
                           backend):
    lead = SHAPES[shape]
    student = make_logits(lead, vocab, dtype, contiguous=contiguous, seed=1, device=device)
    teacher = make_logits(lead, vocab, dtype, contiguous=contiguous, seed=2, device=device)
    target = None if target_mode == "none" else make_target(lead, vocab, ignored=target_mode == "ignored",
                                                            device=device)
    assert_matches_reference(student, teacher, target, backend=backend, temperature=temperature,
                             divergence=divergence, reduction=reduction, alpha=0.3, beta=0.3)

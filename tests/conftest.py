"""Shared helpers: input factories and the comparison against kdkernels.reference. Without CUDA,
the Triton kernels run on CPU tensors under Triton's interpreter: TRITON_INTERPRET=1 is set here,
before any test module imports something that imports triton."""

from __future__ import annotations

import os
from typing import Optional

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import kdkernels as kdk
from kdkernels import reference

# Every divergence with its keyword arguments, for the tests that run them all.
DIVERGENCE_CASES = {
    "forward_kl": {},
    "reverse_kl": {},
    "jsd": {"beta": 0.35},
    "skew_kl": {"skew": 0.1},
    "skew_reverse_kl": {"skew": 0.2},
    "tvd": {},
    "ab": {"ab_alpha": 0.6, "ab_beta": 0.3},
    "akl": {"akl_mu": 0.5},
}

# Gradient tolerance per dtype, relative to the largest reference gradient; losses are always
# accumulated in fp32 (fp64) and compared tightly.
GRAD_TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
LOSS_RTOL = {torch.float64: 1e-10, torch.float32: 5e-5, torch.bfloat16: 5e-5, torch.float16: 5e-5}


def make_logits(lead: tuple[int, ...], vocab: int, dtype: torch.dtype, *, contiguous: bool = True,
                scale: float = 3.0, seed: int = 0, requires_grad: bool = True, device: str = "cpu") -> torch.Tensor:
    """Random logits of shape lead + (vocab,); the non-contiguous variant is a strided view
    (wider rows sliced for 2-D inputs, a transposed layout otherwise)."""
    generator = torch.Generator().manual_seed(seed)
    def randn(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=generator) * scale).to(device=device, dtype=dtype)

    if contiguous:
        x = randn(*lead, vocab)
    elif len(lead) == 1:
        x = randn(lead[0], vocab + 5)[:, 2:vocab + 2]
    else:
        x = randn(vocab, *lead).movedim(0, -1)
    assert x.is_contiguous() == contiguous or vocab == 1
    return x.detach().requires_grad_(requires_grad)


def make_target(lead: tuple[int, ...], vocab: int, *, ignored: bool, seed: int = 1,
                ignore_index: int = -100, device: str = "cpu") -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, vocab, lead, generator=generator)
    if ignored:
        flat = target.view(-1)
        flat[:: 3] = ignore_index
    return target.to(device)


def loss_and_grads(fn, student: torch.Tensor, teacher: torch.Tensor, target: Optional[torch.Tensor], **kwargs):
    loss = fn(student, teacher, target, **kwargs)
    inputs = [x for x in (student, teacher) if x.requires_grad]
    # A fixed, non-uniform upstream gradient also checks how backward scales per row.
    weight = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    grads = torch.autograd.grad((loss * weight).sum(), inputs, allow_unused=True)
    return loss.detach(), grads


def _as_fp64_leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().double().requires_grad_(x.requires_grad)


def assert_matches_reference(student: torch.Tensor, teacher: torch.Tensor, target: Optional[torch.Tensor],
                             backend: str = "cpu", **kwargs) -> None:
    """kd_loss on `backend` equals kdkernels.reference.kd_loss evaluated in fp64 on the same input
    values, in value and gradients: within the dtype's tolerance, or within 4x the error of the
    reference itself run in the input dtype (eager PyTorch's own rounding)."""
    loss, grads = loss_and_grads(kdk.kd_loss, student, teacher, target, backend=backend, **kwargs)
    exact_loss, exact_grads = loss_and_grads(reference.kd_loss, _as_fp64_leaf(student), _as_fp64_leaf(teacher),
                                             target, **kwargs)
    _, eager_grads = loss_and_grads(reference.kd_loss, student, teacher, target, **kwargs)
    dtype = student.dtype
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.shape == exact_loss.shape
    rtol = LOSS_RTOL[dtype]
    torch.testing.assert_close(loss.double(), exact_loss, rtol=rtol, atol=rtol * max(1.0, exact_loss.abs().max().item()))
    for grad, exact, eager in zip(grads, exact_grads, eager_grads):
        assert grad.dtype == dtype and grad.shape == exact.shape
        if not exact.numel():
            continue
        eager_error = (eager.double() - exact).abs().max().item()
        # The floor covers rows whose exact gradient is 0 (V = 1), where rounding is all there is.
        atol = max(GRAD_TOLERANCE[dtype] * exact.abs().max().item(), 4 * eager_error, 1e-2 * GRAD_TOLERANCE[dtype])
        torch.testing.assert_close(grad.double(), exact, rtol=GRAD_TOLERANCE[dtype], atol=atol)


def make_topk(lead: tuple[int, ...], vocab: int, k: int, *, dtype: torch.dtype = torch.float32, seed: int = 2,
              index_dtype: torch.dtype = torch.int64, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A random teacher's top-k ids and log-probabilities at T = 1, in a shuffled order."""
    teacher = make_logits(lead, vocab, torch.float64, seed=seed, requires_grad=False)
    logprobs, ids = teacher.log_softmax(-1).topk(k, dim=-1)
    order = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    return ids[..., order].to(device, index_dtype), logprobs[..., order].to(device, dtype)


def gradients_of(loss_fn, student: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """A loss and its gradient for the student, under a non-uniform upstream gradient."""
    x = student.detach().clone().requires_grad_()
    loss = loss_fn(x, *args, **kwargs)
    weight = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    (grad,) = torch.autograd.grad((loss * weight).sum(), [x])
    return loss.detach(), grad


def assert_topk_matches_reference(s, ids, logprobs, target, backend, **kwargs) -> None:
    """topk_kd_loss on `backend` equals kdkernels.reference.topk_kd_loss in fp64, value and gradient."""
    loss, grad = gradients_of(kdk.topk_kd_loss, s, ids, logprobs, target, backend=backend, **kwargs)
    exact, exact_grad = gradients_of(reference.topk_kd_loss, s.double(), ids, logprobs.double(), target, **kwargs)
    assert grad.dtype == s.dtype and loss.dtype == (torch.float64 if s.dtype == torch.float64 else torch.float32)
    rtol = 1e-10 if s.dtype == torch.float64 else 5e-5
    torch.testing.assert_close(loss.double(), exact, rtol=rtol, atol=rtol * max(1.0, exact.abs().max().item()))
    tolerance = GRAD_TOLERANCE[s.dtype]
    torch.testing.assert_close(grad.double(), exact_grad, rtol=tolerance,
                               atol=tolerance * max(exact_grad.abs().max().item(), 1e-3))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)

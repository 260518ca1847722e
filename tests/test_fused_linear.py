"""fused_linear_kd_loss against kd_loss on the materialised logits: values and the gradients of
hidden states, weights and biases, student and teacher side; chunking, ignored rows, vocabulary
prefix, torch.library and bad input."""

from __future__ import annotations

import pytest
import torch

import kdkernels as kdk
from conftest import DIVERGENCE_CASES

Tensor = torch.Tensor


def _inputs(rows: int, hidden_s: int, hidden_t: int, vocab: int, dtype: torch.dtype, *, vocab_t: int | None = None,
            bias: bool = False, seed: int = 0) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(dtype).requires_grad_()

    tensors = {"student_hidden": randn(rows, hidden_s), "student_weight": randn(vocab, hidden_s, scale=0.3),
               "teacher_hidden": randn(rows, hidden_t), "teacher_weight": randn(vocab_t or vocab, hidden_t, scale=0.3)}
    if bias:
        tensors.update(student_bias=randn(vocab), teacher_bias=randn(vocab_t or vocab))
    return tensors


def _unfused(tensors: dict[str, Tensor], target, vocab: int, **kwargs) -> Tensor:
    student = torch.nn.functional.linear(tensors["student_hidden"], tensors["student_weight"][:vocab],
                                         tensors.get("student_bias", None)[:vocab] if "student_bias" in tensors else None)
    teacher = torch.nn.functional.linear(tensors["teacher_hidden"], tensors["teacher_weight"][:vocab],
                                         tensors.get("teacher_bias", None)[:vocab] if "teacher_bias" in tensors else None)
    return kdk.kd_loss(student, teacher, target, **kwargs)


def _fused(tensors: dict[str, Tensor], target, **kwargs) -> Tensor:
    return kdk.fused_linear_kd_loss(tensors["student_hidden"], tensors["student_weight"], tensors["teacher_hidden"],
                                    tensors["teacher_weight"], target, student_bias=tensors.get("student_bias"),
                                    teacher_bias=tensors.get("teacher_bias"), **kwargs)


def _assert_same(tensors: dict[str, Tensor], target, vocab: int, *, rtol: float, **kwargs) -> None:
    names = list(tensors)
    loss = _fused(tensors, target, **kwargs)
    grads = torch.autograd.grad(loss, [tensors[n] for n in names])
    unfused_kwargs = {k: v for k, v in kwargs.items() if k not in ("chunk_size", "shared_vocab")}
    expected = _unfused(tensors, target, vocab, **unfused_kwargs)
    expected_grads = torch.autograd.grad(expected, [tensors[n] for n in names])
    torch.testing.assert_close(loss, expected, rtol=rtol, atol=rtol)
    for name, grad, expected_grad in zip(names, grads, expected_grads):
        assert grad.dtype == tensors[name].dtype and grad.shape == tensors[name].shape, name
        scale = expected_grad.abs().max().item()
        torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=rtol, atol=rtol * scale, msg=name)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd", "ab"])
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64])
@pytest.mark.parametrize("with_target", [False, True])
def test_matches_kd_loss_on_materialised_logits(divergence, chunk_size, with_target):
    tensors = _inputs(23, 16, 24, 301, torch.float64, bias=True, seed=1)
    target = None
    if with_target:
        target = torch.randint(0, 301, (23,), generator=torch.Generator().manual_seed(2))
        target[::4] = -100
    _assert_same(tensors, target, 301, rtol=1e-10, chunk_size=chunk_size, divergence=divergence, temperature=2.0,
                 alpha=0.3, **DIVERGENCE_CASES[divergence])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_low_precision_and_3d_inputs(dtype, reduction):
    tensors = _inputs(2 * 9, 32, 32, 500, dtype, seed=3)
    tensors = {name: (t.detach().reshape(2, 9, -1) if "hidden" in name else t.detach()).requires_grad_()
               for name, t in tensors.items()}
    target = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(4))
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    _assert_same(tensors, target, 500, rtol=rtol, chunk_size=4, temperature=1.5, reduction=reduction)


def test_teacher_without_grad_gets_no_gradient():
    tensors = _inputs(10, 8, 8, 50, torch.float32, seed=5)
    for name in ("teacher_hidden", "teacher_weight"):
        tensors[name].requires_grad_(False)
    loss = _fused(tensors, None, chunk_size=3)
    loss.backward()
    assert tensors["student_weight"].grad is not None and tensors["teacher_weight"].grad is None


def test_shared_vocab_prefix():
    tensors = _inputs(12, 8, 8, 100, torch.float64, vocab_t=112, bias=True, seed=6)
    with pytest.raises(ValueError, match="100 entries.*112.*shared_vocab"):
        _fused(tensors, None)
    _assert_same(tensors, None, 100, rtol=1e-10, shared_vocab=100, chunk_size=5)
    # The same option on the logits.
    student = torch.randn(3, 100, dtype=torch.float64)
    teacher = torch.randn(3, 112, dtype=torch.float64)
    torch.testing.assert_close(kdk.kd_loss(student, teacher, shared_vocab=100),
                               kdk.kd_loss(student, teacher[:, :100]))
    with pytest.raises(ValueError, match="shared_vocab"):
        kdk.kd_loss(student, teacher)


def test_num_items_gives_the_gradient_of_one_big_batch():
    tensors = _inputs(16, 8, 8, 40, torch.float64, seed=7)
    target = torch.randint(0, 40, (16,), generator=torch.Generator().manual_seed(8))
    target[:5] = -100
    full = _fused(tensors, target)
    expected = torch.autograd.grad(full, [tensors["student_weight"]])[0]
    counted = int((target != -100).sum())
    total = torch.zeros_like(tensors["student_weight"])
    for half in (slice(0, 8), slice(8, 16)):
        part = {n: (t[half] if "hidden" in n else t) for n, t in tensors.items()}
        total += torch.autograd.grad(_fused(part, target[half], num_items=counted), [tensors["student_weight"]])[0]
    torch.testing.assert_close(total, expected)


def test_module_opcheck_and_compile():
    tensors = _inputs(9, 8, 6, 33, torch.float32, bias=True, seed=9)
    target = torch.tensor([1, -100, 3, 32, 0, 5, 6, 7, 8])
    module = kdk.FusedLinearKDLoss(temperature=2.0, chunk_size=4)
    loss = module(tensors["student_hidden"], tensors["student_weight"], tensors["teacher_hidden"],
                  tensors["teacher_weight"], target, tensors["student_bias"], tensors["teacher_bias"])
    torch.testing.assert_close(loss, _fused(tensors, target, temperature=2.0, chunk_size=4))
    args = (tensors["student_hidden"], tensors["student_weight"], tensors["student_bias"], tensors["teacher_hidden"],
            tensors["teacher_weight"].detach(), None, target, torch.tensor(0.125), 2.0, 0.0, False, 2.0, 0.5,
            "forward_kl", [], -100, 4, True, False, "cpu")
    torch.library.opcheck(torch.ops.kdkernels.fused_linear_kd_loss.default, args)

    def step(h, w, ht, wt):
        return kdk.fused_linear_kd_loss(h * 1.0, w, ht, wt, target, chunk_size=4)

    compiled = torch.compile(step, fullgraph=True)
    inputs = [tensors[n] for n in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")]
    torch.testing.assert_close(compiled(*inputs), step(*inputs))


@pytest.mark.parametrize("change, match", [
    (lambda k: {**k, "student_weight": k["student_weight"][:, :5]}, r"student_weight must be \[V, H\] with H = 8"),
    (lambda k: {**k, "teacher_hidden": k["teacher_hidden"][:4]}, "leading dimensions"),
    (lambda k: {**k, "teacher_weight": k["teacher_weight"].double()}, "teacher_weight dtype"),
    (lambda k: {**k, "student_bias": torch.zeros(3)}, "student_bias must be"),
    (lambda k: {**k, "reduction": "none"}, "reduction"),
    (lambda k: {**k, "chunk_size": 0}, "chunk_size"),
    (lambda k: {**k, "shared_vocab": 99}, "shared_vocab"),
])
def test_bad_input_is_a_clear_error(change, match):
    tensors = _inputs(6, 8, 8, 20, torch.float32, seed=10)
    kwargs = change(dict(tensors))
    positional = [kwargs.pop(n) for n in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")]
    with pytest.raises(ValueError if "dtype" not in match else TypeError, match=match):
        kdk.fused_linear_kd_loss(*positional, **kwargs)


def test_bad_rows_are_named():
    tensors = _inputs(6, 8, 8, 20, torch.float32, seed=11)
    with pytest.raises(ValueError, match=r"target\[4\] = 20"):
        _fused(tensors, torch.tensor([0, 1, 2, 3, 20, 5]), chunk_size=2)

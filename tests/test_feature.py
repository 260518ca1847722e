"""Feature-based ops (attention transfer, hint loss, HintAdapter) on the CPU and Triton kernels:
against the papers' definitions written here in fp64, against kdkernels.reference (the authors'
code) in every dtype, gradcheck, zero maps, opcheck, torch.compile and bad input. The Triton
kernels run under TRITON_INTERPRET=1 without a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdkernels as kdk
from kdkernels import reference

BACKENDS = ["cpu", "triton"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _maps(shape: tuple[int, ...], dtype: torch.dtype, seed: int, *, channels_last: bool = False,
          requires_grad: bool = True) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if channels_last:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    return x.requires_grad_(requires_grad)


def _grad(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(value, [x])
    return grad


def _paper_attention(student: list[torch.Tensor], teacher: list[torch.Tensor], p: float) -> torch.Tensor:
    """Zagoruyko & Komodakis eq. (2) with F(A) = sum_c |A_c|^p and the authors' mean: Q / ||Q||_2
    per sample, squared differences averaged over samples and positions, summed over the pairs."""
    total = 0
    for s, t in zip(student, teacher):
        def q(x):
            pooled = (x.abs() ** p).sum(1).flatten(1)
            return pooled / pooled.norm(dim=1, keepdim=True)

        total = total + ((q(s) - q(t)) ** 2).mean()
    return total


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [1.0, 2.0, 3.5])
def test_attention_paper_definition(p, backend):
    student = [_maps((3, 4, 5, 6), torch.float64, 1), _maps((3, 2, 3, 3), torch.float64, 2)]
    teacher = [_maps((3, 7, 5, 6), torch.float64, 3, requires_grad=False), _maps((3, 5, 3, 3), torch.float64, 4,
                                                                                   requires_grad=False)]
    loss = kdk.attention_transfer_loss(student, teacher, p=p, backend=backend)
    expected = _paper_attention(student, teacher, p)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-14)
    for x in student:
        torch.testing.assert_close(_grad(loss, x), _grad(expected, x), rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (5, 1, 7), (3, 4, 2, 3, 2), (4, 6, 33, 35)], ids=str)
def test_attention_matches_reference(shape, dtype, backend):
    student = _maps(shape, dtype, 5, channels_last=len(shape) == 4 and shape[0] == 2)
    teacher = _maps((shape[0], 3, *shape[2:]), dtype, 6, requires_grad=False)
    for p in (2.0, 1.5):
        loss = kdk.attention_transfer_loss(student, teacher, p=p, backend=backend)
        s64 = student.detach().double().requires_grad_()
        expected = reference.attention_transfer_loss([s64], [teacher.double()], p=p)
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(loss.double(), expected.detach(), rtol=max(TOLERANCE[dtype], 1e-5) / 10, atol=1e-9)
        grad, expected_grad = _grad(loss, student), _grad(expected, s64)
        assert grad.dtype == dtype and grad.shape == student.shape
        torch.testing.assert_close(grad.double(), expected_grad, rtol=TOLERANCE[dtype],
                                   atol=TOLERANCE[dtype] * expected_grad.abs().max()
                                   + torch.finfo(dtype).tiny * torch.finfo(dtype).eps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_zero_maps_and_gradcheck(backend):
    student = _maps((3, 2, 4, 4), torch.float64, 7, requires_grad=False)
    student[1] = 0
    student.requires_grad_(True)
    teacher = _maps((3, 5, 4, 4), torch.float64, 8, requires_grad=False)
    loss = kdk.attention_transfer_loss(student, teacher, backend=backend)
    torch.testing.assert_close(loss, reference.attention_transfer_loss([student], [teacher]))
    assert torch.isfinite(_grad(loss, student)).all()
    x = _maps((2, 3, 3, 2), torch.float64, 9)
    for p in (2.0, 1.5):
        assert torch.autograd.gradcheck(lambda v: kdk.attention_transfer_loss(v, teacher[:2, :, :3, :2], p=p,
                                                                              backend=backend), (x,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_hint_matches_mse(dtype, backend):
    student = _maps((4, 3, 5, 5), dtype, 10)
    teacher = _maps((4, 3, 5, 5), dtype, 11, requires_grad=False)
    loss = kdk.hint_loss(student, teacher, backend=backend)
    s64 = student.detach().double().requires_grad_()
    expected = F.mse_loss(s64, teacher.double())
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-6, atol=0)
    grad = _grad(loss, student)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), _grad(expected, s64), rtol=TOLERANCE[dtype], atol=1e-7)


def test_hint_adapter_is_a_1x1_convolution_with_interpolation():
    adapter = kdk.HintAdapter(3, 8)
    conv = torch.nn.Conv2d(3, 8, 1)
    with torch.no_grad():
        conv.weight.copy_(adapter.weight.view(8, 3, 1, 1))
        conv.bias.copy_(adapter.bias)
    x = _maps((2, 3, 4, 6), torch.float32, 12)
    torch.testing.assert_close(adapter(x), conv(x))
    torch.testing.assert_close(adapter(x, (8, 12)), F.interpolate(conv(x), size=(8, 12), mode="bilinear",
                                                                  align_corners=False))
    torch.testing.assert_close(adapter(x[:, :, 0, 0]), conv(x[:, :, :1, :1]).flatten(1))
    teacher = _maps((2, 8, 8, 12), torch.float32, 13, requires_grad=False)
    hint = kdk.HintLoss(adapter, weight=0.5)
    loss = hint(x, teacher)
    expected = 0.5 * F.mse_loss(F.interpolate(conv(x), size=(8, 12), mode="bilinear", align_corners=False), teacher)
    torch.testing.assert_close(loss, expected)
    grad_x, grad_weight = torch.autograd.grad(loss, [x, adapter.weight])
    expected_x, expected_weight = torch.autograd.grad(expected, [x, conv.weight])
    torch.testing.assert_close(grad_x, expected_x)
    torch.testing.assert_close(grad_weight, expected_weight.view(8, 3))
    assert "3, 8" in repr(adapter) and set(dict(hint.named_parameters())) == {"adapter.weight", "adapter.bias"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_and_compile(backend):
    student = _maps((2, 3, 4, 4), torch.float32, 14)
    teacher = _maps((2, 5, 4, 4), torch.float32, 15, requires_grad=False)
    for p in (2.0, 1.5):
        torch.library.opcheck(torch.ops.kdkernels.attention_transfer_loss.default,
                              (student.flatten(2), teacher.flatten(2), p, True, backend))
    torch.library.opcheck(torch.ops.kdkernels.squared_error.default, (student, student.detach() * 2, True, backend))
    if backend == "triton":
        return
    adapter = kdk.HintAdapter(3, 5)

    def total(x):
        return (kdk.attention_transfer_loss([x, x[:, :, ::2, ::2]], [teacher, teacher[:, :, ::2, ::2]])
                + kdk.hint_loss(x, teacher, adapter))

    compiled = torch.compile(total, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(student), total(student))
    torch.testing.assert_close(_grad(compiled(student), student), _grad(total(student), student))


def test_modules():
    student = [_maps((2, 3, 4, 4), torch.float32, 16), _maps((2, 4, 2, 2), torch.float32, 17)]
    teacher = [_maps((2, 6, 4, 4), torch.float32, 18, requires_grad=False),
               _maps((2, 8, 2, 2), torch.float32, 19, requires_grad=False)]
    module = kdk.AttentionTransferLoss(weight=1000.0, p=2.0)
    torch.testing.assert_close(module(student, teacher), 1000 * kdk.attention_transfer_loss(student, teacher))
    assert "weight=1000.0" in repr(module) and "p=2.0" in repr(module)


def test_bad_input():
    s = _maps((2, 3, 4, 4), torch.float32, 20)
    t = _maps((2, 3, 4, 4), torch.float32, 21, requires_grad=False)
    with pytest.raises(ValueError, match="same spatial size"):
        kdk.attention_transfer_loss(s, t[:, :, :2])
    with pytest.raises(ValueError, match="equally long"):
        kdk.attention_transfer_loss([s, s], [t])
    with pytest.raises(ValueError, match="same N samples"):
        kdk.attention_transfer_loss(s, t[:1])
    with pytest.raises(ValueError, match="p must lie in"):
        kdk.attention_transfer_loss(s, t, p=0.0)
    with pytest.raises(ValueError, match="teacher is a constant"):
        kdk.hint_loss(s, t.clone().requires_grad_())
    with pytest.raises(ValueError, match="HintAdapter"):
        kdk.hint_loss(s, t[:, :2])
    with pytest.raises(ValueError, match="not finite"):
        kdk.hint_loss(s.detach() * float("inf"), t, backend="cpu")
    with pytest.raises(TypeError, match="dtype"):
        kdk.hint_loss(s, t.double())


def test_saved_gradient_becomes_grad_without_a_copy():
    """The gradient the forward wrote is the leaf's .grad itself (no second buffer), also when the
    op's input is the leaf (no view in between)."""
    from kdkernels.ops.feature import squared_error

    student = _maps((4, 3, 5, 5), torch.float32, 22)
    loss, written = squared_error(student, student.detach() * 0.5, True, "cpu")
    loss.backward()
    assert student.grad.data_ptr() == written.data_ptr()

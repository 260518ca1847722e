"""dkd_loss (Decoupled KD) on the CPU kernel and, under TRITON_INTERPRET=1 or on a GPU, the Triton
kernel: against the paper's formula written here in fp64, the library's reference, gradcheck,
its edge cases (V = 2, target probability near 1, ignored rows) and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdkernels as kdk
from conftest import make_logits, make_target


def _paper_dkd(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, alpha: float, beta: float,
               temperature: float) -> torch.Tensor:
    """TCKD and NCKD as Zhao et al. define them, row by row in fp64, mean over rows."""
    losses = []
    for s, t, y in zip(student.double(), teacher.double(), target.tolist()):
        q, p = F.softmax(s / temperature, -1), F.softmax(t / temperature, -1)
        b_q = torch.stack([q[y], 1 - q[y]])
        b_p = torch.stack([p[y], 1 - p[y]])
        tckd = (b_p * (b_p / b_q).log()).sum()
        others = [j for j in range(s.numel()) if j != y]
        q_hat, p_hat = q[others] / q[others].sum(), p[others] / p[others].sum()
        nckd = (p_hat * (p_hat / q_hat).log()).sum()
        losses.append(temperature**2 * (alpha * tckd + beta * nckd))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("vocab", [2, 3, 10, 100, 1000])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_paper_formula(vocab, dtype):
    s = make_logits((6,), vocab, dtype, seed=1)
    t = make_logits((6,), vocab, dtype, seed=2, requires_grad=False)
    y = make_target((6,), vocab, ignored=False)
    loss = kdk.dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=4.0, backend="cpu")
    (grad,) = torch.autograd.grad(loss, [s])
    s64 = s.detach().double().requires_grad_()
    expected = _paper_dkd(s64, t, y, 1.0, 8.0, 4.0)
    (expected_grad,) = torch.autograd.grad(expected, [s64])
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=tolerance, atol=tolerance * expected_grad.abs().max())


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("vocab", [2, 100, 1000, 1500])
def test_matches_reference_with_ignored_rows(backend, dtype, vocab):
    s = make_logits((2, 3), vocab, dtype, seed=3, contiguous=vocab != 100)
    t = make_logits((2, 3), vocab, dtype, seed=4, requires_grad=False)
    y = make_target((2, 3), vocab, ignored=True)
    loss = kdk.dkd_loss(s, t, y, alpha=0.7, beta=2.0, temperature=3.0, backend=backend)
    (grad,) = torch.autograd.grad(loss, [s])
    s64 = s.detach().double().requires_grad_()
    expected = kdk.reference.dkd_loss(s64, t.double(), y, alpha=0.7, beta=2.0, temperature=3.0)
    (expected_grad,) = torch.autograd.grad(expected, [s64])
    assert grad.dtype == dtype
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=5e-5, atol=5e-5)
    tolerance = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(grad.double(), expected_grad, rtol=tolerance, atol=tolerance * expected_grad.abs().max())



@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_largest_finite_teacher_logits_are_valid_input(backend):
    """Teacher classes at -3.4e38 (the fp32 minimum, a finite mask) at T = 1 are input like any
    other, on both kernels: not mistaken for -inf or NaN."""
    if backend == "triton":
        pytest.importorskip("triton")
    s = make_logits((4,), 50, torch.float32, seed=5)
    t = make_logits((4,), 50, torch.float32, seed=6, requires_grad=False)
    t[:, 10:20] = torch.finfo(torch.float32).min
    y = torch.tensor([1, 2, 3, 4])
    loss = kdk.dkd_loss(s, t, y, temperature=1.0, backend=backend)
    (grad,) = torch.autograd.grad(loss, [s])
    s64 = s.detach().double().requires_grad_()
    expected = kdk.reference.dkd_loss(s64, t.double(), y, temperature=1.0)
    (expected_grad,) = torch.autograd.grad(expected, [s64])
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=2e-5, atol=2e-5 * expected_grad.abs().max())

def test_gradcheck_fp64():
    s = make_logits((4,), 7, torch.float64, seed=5)
    t = make_logits((4,), 7, torch.float64, seed=6, requires_grad=False)
    y = torch.tensor([1, -100, 6, 0])
    assert torch.autograd.gradcheck(lambda x: kdk.dkd_loss(x, t, y, temperature=2.0, backend="cpu"), (s,))


def test_target_probability_near_one_stays_finite():
    """A target logit 200 above the rest: 1 - p_y underflows in fp32 as 1 - p_y, not as the sum
    over the other classes. TCKD and NCKD stay finite and exact."""
    s = torch.zeros(3, 50, dtype=torch.float64)
    t = torch.zeros(3, 50, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    s[torch.arange(3), y] = 200.0
    t[torch.arange(3), y] = 150.0
    t[:, 10] = 1.0
    exact = kdk.reference.dkd_loss(s, t, y, temperature=1.0)
    student = s.float().requires_grad_()
    loss = kdk.dkd_loss(student, t.float(), y, temperature=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    torch.testing.assert_close(loss.double(), exact, rtol=1e-5, atol=1e-6)


def test_all_rows_ignored_gives_zero_and_module_matches():
    s = make_logits((4,), 10, torch.float32, seed=7)
    t = make_logits((4,), 10, torch.float32, seed=8, requires_grad=False)
    loss = kdk.dkd_loss(s, t, torch.full((4,), -100))
    (grad,) = torch.autograd.grad(loss, [s])
    assert loss.item() == 0.0 and torch.all(grad == 0)
    y = torch.tensor([1, 2, 3, 4])
    torch.testing.assert_close(kdk.DKDLoss(beta=2.0)(s, t, y), kdk.dkd_loss(s, t, y, beta=2.0))


def test_opcheck_and_compile():
    s = make_logits((5,), 12, torch.float32, seed=9)
    t = make_logits((5,), 12, torch.float32, seed=10, requires_grad=False)
    y = torch.tensor([1, -100, 3, 11, 0])
    torch.library.opcheck(torch.ops.kdkernels.dkd_loss_rows.default,
                          (s, t, y, torch.tensor(0.25), 4.0, 1.0, 8.0, -100, True, "cpu"))
    compiled = torch.compile(lambda a: kdk.dkd_loss(a * 1.0, t, y), fullgraph=True)
    torch.testing.assert_close(compiled(s), kdk.dkd_loss(s, t, y))


@pytest.mark.parametrize("change, error, match", [
    (lambda s, t, y: (s[:, :1], t[:, :1], y.clamp(max=0), {}), ValueError, "V >= 2"),
    (lambda s, t, y: (s, t, torch.tensor([0, 1, 12, 2]), {}), ValueError, r"target\[2\] = 12"),
    (lambda s, t, y: (s, t.clone().fill_(float("inf")), y, {}), ValueError, "teacher_logits row 0 contains NaN or"),
    (lambda s, t, y: (s.detach().clone().fill_(float("-inf")).requires_grad_(), t, y, {}), ValueError,
     "student_logits row 0 contains"),
    (lambda s, t, y: (s, t.requires_grad_(), y, {}), ValueError, "teacher_logits.detach"),
    (lambda s, t, y: (s, t, y, {"temperature": 0.0}), ValueError, "temperature"),
    (lambda s, t, y: (s, t, y, {"beta": -1.0}), ValueError, "beta"),
    (lambda s, t, y: (s, t, y, {"backend": "cuda"}), ValueError, "backend 'cuda' has no kernel"),
])
def test_bad_input_is_a_clear_error(change, error, match):
    s = make_logits((4,), 12, torch.float32, seed=11)
    t = make_logits((4,), 12, torch.float32, seed=12, requires_grad=False)
    s, t, y, kwargs = change(s, t, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(error, match=match):
        kdk.dkd_loss(s, t, y, **kwargs)

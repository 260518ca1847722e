"""dist_loss (DIST) on the CPU kernel: against the paper's definition written here in fp64 (as
torchdistill's DISTLoss computes it), the library's reference, gradcheck, degenerate rows and
columns, and bad input. The Triton kernels are checked in test_triton.py."""

from __future__ import annotations

import pytest
import torch

import kdkernels as kdk
from conftest import make_logits


def _paper_dist(student: torch.Tensor, teacher: torch.Tensor, beta: float, gamma: float, temperature: float,
                eps: float = 1e-8) -> torch.Tensor:
    """Huang et al.: Pearson correlations of the softmaxes over each row and over each column."""
    y_s, y_t = torch.softmax(student.double() / temperature, 1), torch.softmax(teacher.double() / temperature, 1)

    def pearson(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        u, v = u - u.mean(), v - v.mean()
        return (u * v).sum() / (u.norm() * v.norm() + eps)

    inter = 1 - torch.stack([pearson(y_s[i], y_t[i]) for i in range(y_s.shape[0])]).mean()
    intra = 1 - torch.stack([pearson(y_s[:, j], y_t[:, j]) for j in range(y_s.shape[1])]).mean()
    return temperature**2 * (beta * inter + gamma * intra)


@pytest.mark.parametrize("shape", [(2, 5), (8, 10), (64, 100), (37, 1000), (100, 3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_paper_formula(shape, dtype):
    s = make_logits(shape[:1], shape[1], dtype, seed=1)
    t = make_logits(shape[:1], shape[1], dtype, seed=2, requires_grad=False)
    loss = kdk.dist_loss(s, t, beta=2.0, gamma=0.5, temperature=4.0, backend="cpu")
    (grad,) = torch.autograd.grad(loss, [s])
    s64 = s.detach().double().requires_grad_()
    expected = _paper_dist(s64, t, 2.0, 0.5, 4.0)
    (expected_grad,) = torch.autograd.grad(expected, [s64])
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=tolerance, atol=tolerance * expected_grad.abs().max())


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(4, 1000), (256, 100), (33, 7)])
def test_matches_reference(backend, dtype, shape):
    s = make_logits(shape[:1], shape[1], dtype, seed=3, contiguous=shape[1] != 100)
    t = make_logits(shape[:1], shape[1], dtype, seed=4, requires_grad=False)
    loss = kdk.dist_loss(s, t, temperature=2.0, backend=backend)
    (grad,) = torch.autograd.grad(loss, [s])
    s64 = s.detach().double().requires_grad_()
    expected = kdk.reference.dist_loss(s64, t.double(), temperature=2.0)
    (expected_grad,) = torch.autograd.grad(expected, [s64])
    assert grad.dtype == dtype
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=5e-5, atol=5e-5)
    tolerance = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(grad.double(), expected_grad, rtol=tolerance, atol=tolerance * expected_grad.abs().max())


def test_gradcheck_fp64():
    s = make_logits((6,), 5, torch.float64, seed=5)
    t = make_logits((6,), 5, torch.float64, seed=6, requires_grad=False)
    assert torch.autograd.gradcheck(lambda x: kdk.dist_loss(x, t, beta=1.3, gamma=0.6, temperature=1.5,
                                                            backend="cpu"), (s,))


def test_constant_rows_columns_and_masked_entries():
    """A constant student row (y uniform, zero norm after centring), a column the same in every
    row, and -inf entries: finite values and gradients equal to the reference's, except the
    constant row's, where the correlation's gradient has no limit (the kernel takes the norm's
    subgradient 0; the reference divides rounding noise by its norm)."""
    s = make_logits((6,), 8, torch.float64, seed=7, requires_grad=False)
    t = make_logits((6,), 8, torch.float64, seed=8, requires_grad=False)
    s[0] = 1.5
    s[:, 3] = 0.25
    t[:, 3] = -0.5
    s[2, 5] = float("-inf")
    t[4, 1] = float("-inf")
    s.requires_grad_(True)
    loss = kdk.dist_loss(s, t, backend="cpu")
    (grad,) = torch.autograd.grad(loss, [s])
    s64 = s.detach().clone().requires_grad_()
    expected = kdk.reference.dist_loss(s64, t)
    (expected_grad,) = torch.autograd.grad(expected, [s64])
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad[1:], expected_grad[1:], rtol=1e-10, atol=1e-12)


def test_result_does_not_depend_on_the_thread_count():
    s = make_logits((300,), 50, torch.float32, seed=9)
    t = make_logits((300,), 50, torch.float32, seed=10, requires_grad=False)
    threads = torch.get_num_threads()
    results = []
    for count in (1, max(2, threads)):
        torch.set_num_threads(count)
        loss = kdk.dist_loss(s, t)
        results.append((loss, torch.autograd.grad(loss, [s])[0]))
    torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_module_opcheck_and_compile():
    s = make_logits((5,), 12, torch.float32, seed=11)
    t = make_logits((5,), 12, torch.float32, seed=12, requires_grad=False)
    torch.testing.assert_close(kdk.DISTLoss(beta=2.0, temperature=3.0)(s, t),
                               kdk.dist_loss(s, t, beta=2.0, temperature=3.0))
    for student_grad in (True, False):
        torch.library.opcheck(torch.ops.kdkernels.dist_loss.default, (s, t, 2.0, 1.0, 0.5, 1e-8, student_grad, "cpu"))
    compiled = torch.compile(lambda a: kdk.dist_loss(a * 1.0, t, temperature=2.0), fullgraph=True)
    torch.testing.assert_close(compiled(s), kdk.dist_loss(s, t, temperature=2.0))


@pytest.mark.parametrize("change, error, match", [
    (lambda s, t: (s[:1], t[:1], {}), ValueError, "N >= 2"),
    (lambda s, t: (s.unsqueeze(0), t.unsqueeze(0), {}), ValueError, r"\[N, C\]"),
    (lambda s, t: (s, t[:, :5], {}), ValueError, r"\[N, C\]"),
    (lambda s, t: (s, t.clone().fill_(float("nan")), {}), ValueError, "teacher_logits row 0 contains NaN or"),
    (lambda s, t: (s.detach().clone().index_fill_(0, torch.tensor([2]), float("-inf")).requires_grad_(), t, {}),
     ValueError, "student_logits row 2 is all -inf"),
    (lambda s, t: (s, t.requires_grad_(), {}), ValueError, "teacher_logits.detach"),
    (lambda s, t: (s, t, {"temperature": 0.0}), ValueError, "temperature"),
    (lambda s, t: (s, t, {"gamma": -1.0}), ValueError, "gamma"),
    (lambda s, t: (s, t, {"eps": float("nan")}), ValueError, "eps"),
    (lambda s, t: (s, t, {"backend": "cuda"}), ValueError, "backend 'cuda' has no kernel"),
])
def test_bad_input_is_a_clear_error(change, error, match):
    s = make_logits((4,), 12, torch.float32, seed=13)
    t = make_logits((4,), 12, torch.float32, seed=14, requires_grad=False)
    s, t, kwargs = change(s, t)
    with pytest.raises(error, match=match):
        kdk.dist_loss(s, t, **kwargs)

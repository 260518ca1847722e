"""Relation ops (pairwise_distance, gram, RKD distance and angle, SP, PKT) on the CPU and Triton
kernels: against the papers' definitions written here from their text in fp64, against
kdkernels.reference (the authors' code) in every dtype, gradcheck, degenerate samples, opcheck,
torch.compile and bad input. The Triton kernels run under TRITON_INTERPRET=1 without a GPU."""

from __future__ import annotations

import itertools

import pytest
import torch

import kdkernels as kdk
from kdkernels import reference

BACKENDS = ["cpu", "triton"]
LOSSES = ["rkd_distance", "rkd_angle", "similarity_preserving", "pkt"]


def _features(shape: tuple[int, ...], dtype: torch.dtype, seed: int, *, contiguous: bool = True,
              requires_grad: bool = True) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator)
    if not contiguous:
        x = torch.randn(*shape[::-1], generator=generator).permute(*range(len(shape) - 1, -1, -1))
    return x.to(dtype).requires_grad_(requires_grad)


def _huber(delta: torch.Tensor) -> torch.Tensor:
    return torch.where(delta.abs() < 1, 0.5 * delta**2, delta.abs() - 0.5)


def _paper_rkd_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Park et al. eq. (3)-(4): psi_D = ||x_i - x_j|| / mu, mu the mean distance over the pairs i != j."""
    def psi(x):
        d = torch.stack([torch.stack([(x[i] - x[j]).norm() for j in range(len(x))]) for i in range(len(x))])
        off = ~torch.eye(len(x), dtype=torch.bool)
        return d / d[off].mean()

    return _huber(psi(s) - psi(t)).mean()


def _paper_rkd_angle(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Park et al. eq. (5): psi_A(t_i, t_j, t_k) = <e_ij, e_kj>, e_ij = (t_i - t_j) / ||t_i - t_j||, over
    all triplets (0 where two samples coincide), averaged."""
    def psi(x):
        n = len(x)
        values = []
        for i, j, k in itertools.product(range(n), repeat=3):
            a, b = x[j] - x[i], x[k] - x[i]
            if a.norm() == 0 or b.norm() == 0:
                values.append(x.new_zeros(()))
            else:
                values.append((a / a.norm()) @ (b / b.norm()))
        return torch.stack(values)

    return _huber(psi(s) - psi(t)).mean()


def _paper_sp(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Tung & Mori eq. (2)-(4): G = Q Q^T, rows divided by their L2 norm, ||G_t - G_s||_F^2 / b^2."""
    def g(x):
        q = x.reshape(len(x), -1)
        gram = q @ q.T
        return gram / gram.norm(dim=1, keepdim=True)

    return ((g(t) - g(s)) ** 2).sum() / len(s) ** 2


def _paper_pkt(s: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Passalis & Tefas eq. (13)-(14) with the cosine kernel K = (c + 1) / 2: conditional
    probabilities p_{i|j} = K_ij / sum_k K_ik and the KL divergence of teacher to student, averaged
    (eps as the authors' code adds it to the norms and inside the logarithm)."""
    def p(x):
        unit = x / (x.norm(dim=1, keepdim=True) + eps)
        kernel = (unit @ unit.T + 1) / 2
        return kernel / kernel.sum(1, keepdim=True)

    p_t, p_s = p(t), p(s)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


PAPER = {"rkd_distance": _paper_rkd_distance, "rkd_angle": _paper_rkd_angle, "similarity_preserving": _paper_sp,
         "pkt": _paper_pkt}


def _loss(name: str):
    return getattr(kdk, f"{name}_loss")


def _grad(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(value, [x])
    return grad


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_paper_definition(name, dtype):
    s = _features((7, 5), dtype, seed=1)
    t = _features((7, 9), dtype, seed=2, requires_grad=False)
    loss = _loss(name)(s, t, backend="cpu")
    s64 = s.detach().double().requires_grad_()
    expected = PAPER[name](s64, t.double())
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=tolerance, atol=tolerance * 1e-2)
    expected_grad = _grad(expected, s64)
    torch.testing.assert_close(_grad(loss, s).double(), expected_grad, rtol=tolerance,
                               atol=tolerance * expected_grad.abs().max())


GRAD_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _matches_reference(ours, theirs, x: torch.Tensor, dtype: torch.dtype, weight: torch.Tensor | None = None,
                       grad_floor: float = 1e-6) -> None:
    """ours(x) against theirs(x in fp64): values and gradients (of the weighted sum for matrices),
    within the dtype's tolerance of the largest gradient (at least grad_floor) plus its smallest
    subnormal step."""
    x64 = x.detach().double().requires_grad_()
    value, expected = ours(x), theirs(x64)
    assert value.dtype == (dtype if value.dim() else (torch.float64 if dtype == torch.float64 else torch.float32))
    tolerance = GRAD_TOLERANCE[dtype]
    torch.testing.assert_close(value.double(), expected.detach(), rtol=tolerance,
                               atol=tolerance * max(expected.abs().max().item(), 1e-3))
    if weight is not None:
        value, expected = (value * weight.to(value.dtype)).sum(), (expected * weight.double()).sum()
    grad, expected_grad = _grad(value, x), _grad(expected, x64)
    assert grad.dtype == dtype and grad.shape == x.shape
    torch.testing.assert_close(grad.double(), expected_grad, rtol=tolerance,
                               atol=tolerance * max(expected_grad.abs().max().item(), grad_floor)
                               + torch.finfo(dtype).tiny * torch.finfo(dtype).eps)


SHAPES = [(2, 3), (5, 3, 4), (40, 70), (67, 33)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", LOSSES)
def test_losses_match_reference(name, shape, dtype, backend):
    if name == "rkd_angle" and backend == "triton" and shape[0] > 40 and dtype != torch.float32:
        pytest.skip("interpreted triplet kernels are slow; fp32 covers this shape")
    s = _features(shape, dtype, seed=3, contiguous=shape != (40, 70))
    t = _features((shape[0], 11), dtype, seed=4, requires_grad=False)
    _matches_reference(lambda x: _loss(name)(x, t, backend=backend),
                       lambda x: getattr(reference, f"{name}_loss")(x, t.double()), s, dtype)


MATRICES = {
    "distance": (lambda x, b: kdk.pairwise_distance(x, backend=b), reference.pairwise_distance),
    "squared_distance": (lambda x, b: kdk.pairwise_distance(x, squared=True, backend=b),
                         lambda x: reference.pairwise_distance(x, squared=True)),
    "gram": (lambda x, b: kdk.gram(x, backend=b), reference.gram),
    "rows": (lambda x, b: kdk.gram(x, normalize="rows", backend=b), lambda x: reference.gram(x, normalize="rows")),
    "cosine": (lambda x, b: kdk.gram(x, normalize="cosine", backend=b),
               lambda x: reference.gram(x, normalize="cosine")),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (2, 1), *SHAPES], ids=str)
@pytest.mark.parametrize("kind", MATRICES)
def test_matrices_match_reference(kind, shape, dtype, backend):
    x = _features(shape, dtype, seed=5, contiguous=shape != (40, 70))
    ours, theirs = MATRICES[kind]
    weight = torch.randn(shape[0], shape[0], generator=torch.Generator().manual_seed(6))
    if dtype in (torch.bfloat16, torch.float16):
        # Half-precision outputs round each entry; compare the fp32 accumulation through fp32 inputs.
        x = x.detach().float().requires_grad_()
        dtype = torch.float32
    _matches_reference(lambda v: ours(v, backend), theirs, x, dtype, weight, grad_floor=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_fp64(backend):
    s = _features((6, 4), torch.float64, seed=7)
    t = _features((6, 3), torch.float64, seed=8, requires_grad=False)
    for name in LOSSES:
        assert torch.autograd.gradcheck(lambda x: _loss(name)(x, t, backend=backend), (s,))
    for kind, (ours, _) in MATRICES.items():
        assert torch.autograd.gradcheck(lambda x: ours(x, backend), (s,)), kind


@pytest.mark.parametrize("backend", BACKENDS)
def test_coinciding_and_zero_samples(backend):
    """Repeated samples (zero distances, F.normalize's zero vectors), features with a large common
    offset, and a zero sample: the reference's values, finite gradients. The offset costs the
    distances of the Gram expansion (ours and the reference's alike) about 1e-4 of their digits."""
    s = _features((9, 16), torch.float32, seed=9, requires_grad=False).relu() + 4
    s[3] = s[5]
    s[7] = s[5]
    t = _features((9, 6), torch.float32, seed=10, requires_grad=False)
    t[1] = t[2]
    s.requires_grad_(True)
    for name in LOSSES:
        value = _loss(name)(s, t, backend=backend)
        torch.testing.assert_close(value, getattr(reference, f"{name}_loss")(s, t), rtol=2e-4, atol=1e-7)
        assert torch.isfinite(_grad(value, s)).all(), name
    same = s.detach()[:1].expand(5, 16).clone().requires_grad_()
    value = kdk.rkd_angle_loss(same, t[:5], backend=backend)
    torch.testing.assert_close(value, reference.rkd_angle_loss(same, t[:5]))
    assert torch.isfinite(_grad(value, same)).all()
    zero = s.detach().clone()
    zero[0] = 0
    zero.requires_grad_(True)
    for name in ("similarity_preserving", "pkt"):
        value = _loss(name)(zero, t, backend=backend)
        torch.testing.assert_close(value, getattr(reference, f"{name}_loss")(zero, t), rtol=1e-5, atol=1e-7)
        assert torch.isfinite(_grad(value, zero)).all(), name


def test_angle_kernels_agree_and_scale():
    """The CPU and Triton triplet kernels give the same sums; the loss is translation invariant."""
    s = _features((37, 12), torch.float64, seed=11)
    t = _features((37, 5), torch.float64, seed=12, requires_grad=False)
    values = [kdk.rkd_angle_loss(s, t, backend=backend) for backend in BACKENDS]
    grads = [_grad(value, s) for value in values]
    torch.testing.assert_close(values[0], values[1], rtol=1e-12, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-14)
    shifted = kdk.rkd_angle_loss(s.detach() + 100, t, backend="cpu")
    torch.testing.assert_close(shifted, values[0].detach(), rtol=1e-9, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_and_compile(backend):
    s = _features((6, 5), torch.float32, seed=13)
    t = _features((6, 3), torch.float32, seed=14, requires_grad=False)
    for name in ("rkd_distance", "rkd_angle", "similarity_preserving", "pkt"):
        torch.library.opcheck(torch.ops.kdkernels.relation_loss.default, (s, t, name, True, backend))
    for kind in ("gram", "cosine", "cosine_offset", "squared_distance", "distance"):
        torch.library.opcheck(torch.ops.kdkernels.relation_matrix.default, (s, kind, 1e-12, backend))
    if backend == "triton":
        return

    def total(x):
        return (kdk.rkd_distance_loss(x, t) + kdk.rkd_angle_loss(x, t) + kdk.similarity_preserving_loss(x, t)
                + kdk.pkt_loss(x, t) + kdk.pairwise_distance(x).sum() + kdk.gram(x, normalize="rows").sum())

    compiled = torch.compile(total, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(s), total(s))
    torch.testing.assert_close(_grad(compiled(s), s), _grad(total(s), s))


def test_modules_weight_terms():
    s = _features((8, 3, 2, 2), torch.float32, seed=15)
    t = _features((8, 20), torch.float32, seed=16, requires_grad=False)
    terms = [kdk.RKDDistanceLoss(weight=25.0), kdk.RKDAngleLoss(weight=50.0), kdk.SimilarityPreservingLoss(),
             kdk.PKTLoss(backend="cpu")]
    total = sum(term(s, t) for term in terms)
    expected = (25 * kdk.rkd_distance_loss(s, t) + 50 * kdk.rkd_angle_loss(s, t) + kdk.similarity_preserving_loss(s, t)
                + kdk.pkt_loss(s, t))
    torch.testing.assert_close(total, expected)
    assert "weight=50.0" in repr(terms[1]) and "backend='cpu'" in repr(terms[3])
    with pytest.raises(TypeError, match="unknown keywords"):
        kdk.RKDAngleLoss(temperature=2.0)


def test_bad_input():
    s = _features((4, 3), torch.float32, seed=17)
    t = _features((4, 3), torch.float32, seed=18, requires_grad=False)
    with pytest.raises(ValueError, match="same N samples"):
        kdk.rkd_angle_loss(s, t[:3])
    with pytest.raises(TypeError, match="teacher dtype"):
        kdk.pkt_loss(s, t.double())
    with pytest.raises(TypeError, match="student must be float16"):
        kdk.similarity_preserving_loss(s.detach().long(), t)
    with pytest.raises(ValueError, match="teacher as a constant"):
        kdk.rkd_distance_loss(s, t.clone().requires_grad_())
    with pytest.raises(ValueError, match="N >= 2"):
        kdk.rkd_distance_loss(s[:1], t[:1])
    with pytest.raises(ValueError, match=r"\[N, \.\.\.\] features"):
        kdk.pkt_loss(s[:, 0], t[:, 0])
    with pytest.raises(ValueError, match=r"\[N, \.\.\.\] features"):
        kdk.gram(torch.zeros(3, 0))
    with pytest.raises(ValueError, match="NaN or inf"):
        kdk.rkd_angle_loss(s.detach().clone().fill_(float("nan")), t, backend="cpu")
    with pytest.raises(ValueError, match="eps"):
        kdk.pairwise_distance(s, eps=0.0)
    with pytest.raises(ValueError, match="normalize must be"):
        kdk.gram(s, normalize="columns")

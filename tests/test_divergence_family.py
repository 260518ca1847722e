"""The divergences beyond KL and JSD (skew KL, skew reverse KL, TVD, alpha-beta, adaptive KL) on the CPU kernel:
against their papers' formulas written here in fp64 (not the library's reference), their
identities and limits, the reference matrix, and bad input."""

from __future__ import annotations

import pytest
import torch

import kdkernels as kdk
from conftest import DIVERGENCE_CASES, assert_matches_reference, make_logits, make_target

Tensor = torch.Tensor


def _skew_kl(p: Tensor, q: Tensor, skew: float) -> Tensor:  # DistiLLM, KL(p || skew p + (1 - skew) q)
    return (p * torch.log(p / (skew * p + (1 - skew) * q))).sum(-1)


def _skew_reverse_kl(p: Tensor, q: Tensor, skew: float) -> Tensor:  # KL(q || (1 - skew) p + skew q)
    return (q * torch.log(q / ((1 - skew) * p + skew * q))).sum(-1)


def _tvd(p: Tensor, q: Tensor) -> Tensor:
    return 0.5 * (p - q).abs().sum(-1)


def _alpha_beta(p: Tensor, q: Tensor, a: float, b: float) -> Tensor:
    """ABKD's alpha-beta divergence with its published special cases."""
    if a != 0 and b != 0 and a + b != 0:
        terms = -(p**a * q**b - a / (a + b) * p ** (a + b) - b / (a + b) * q ** (a + b)) / (a * b)
    elif b == 0 and a != 0:
        terms = (p**a * torch.log(p**a / q**a) - p**a + q**a) / a**2
    elif a == 0 and b != 0:
        terms = (q**b * torch.log(q**b / p**b) - q**b + p**b) / b**2
    elif a != 0:  # a = -b
        terms = (torch.log(q**a / p**a) + (q**a / p**a) ** -1 - 1) / a**2
    else:
        terms = 0.5 * (torch.log(p) - torch.log(q)) ** 2
    return terms.sum(-1)


def _adaptive_kl(p: Tensor, q: Tensor, mu: float) -> Tensor:
    """AKL as its authors' code computes it: sort p, the head is where the cumulative sum is <= mu
    (the first entry always), g = sum |p - q| over head and tail, weights detached."""
    sorted_p, order = p.sort(-1, descending=True)
    error = (sorted_p - q.gather(-1, order)).abs()
    head = sorted_p.cumsum(-1) <= mu
    head[..., 0] = True
    g_head, g_tail = (error * head).sum(-1).detach(), (error * ~head).sum(-1).detach()
    forward, reverse = (p * torch.log(p / q)).sum(-1), (q * torch.log(q / p)).sum(-1)
    return (g_head * forward + g_tail * reverse) / (g_head + g_tail)


PAPER_FORMULAS = {
    ("skew_kl", 0.1): lambda p, q: _skew_kl(p, q, 0.1),
    ("skew_kl", 0.5): lambda p, q: _skew_kl(p, q, 0.5),
    ("skew_reverse_kl", 0.1): lambda p, q: _skew_reverse_kl(p, q, 0.1),
    ("skew_reverse_kl", 0.9): lambda p, q: _skew_reverse_kl(p, q, 0.9),
    ("tvd", None): _tvd,
    ("ab", (0.5, 0.3)): lambda p, q: _alpha_beta(p, q, 0.5, 0.3),
    ("ab", (-0.3, 1.2)): lambda p, q: _alpha_beta(p, q, -0.3, 1.2),
    ("ab", (1.5, -0.4)): lambda p, q: _alpha_beta(p, q, 1.5, -0.4),
    ("ab", (0.7, 0.0)): lambda p, q: _alpha_beta(p, q, 0.7, 0.0),
    ("ab", (0.0, 0.4)): lambda p, q: _alpha_beta(p, q, 0.0, 0.4),
    ("ab", (0.8, -0.8)): lambda p, q: _alpha_beta(p, q, 0.8, -0.8),
    ("ab", (0.0, 0.0)): lambda p, q: _alpha_beta(p, q, 0.0, 0.0),
    ("akl", 0.5): lambda p, q: _adaptive_kl(p, q, 0.5),
    ("akl", 0.2): lambda p, q: _adaptive_kl(p, q, 0.2),
    ("akl", 1e-6): lambda p, q: _adaptive_kl(p, q, 1e-6),  # mu -> 0: the head is the top entry
    ("akl", 0.999): lambda p, q: _adaptive_kl(p, q, 0.999),  # mu -> 1: the tail is the smallest entries
}


def _keywords(divergence: str, setting) -> dict:
    if divergence.startswith("skew"):
        return {"skew": setting}
    if divergence == "ab":
        return {"ab_alpha": setting[0], "ab_beta": setting[1]}
    if divergence == "akl":
        return {"akl_mu": setting}
    return {}


def _case_id(case) -> str:
    divergence, setting = case
    return divergence if setting is None else f"{divergence}-{setting}"


@pytest.mark.parametrize("case", list(PAPER_FORMULAS), ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_paper_formula(case, dtype):
    """Values and both gradients of T^2 * D(softmax(t / T), softmax(s / T)) per row."""
    divergence, setting = case
    if divergence == "akl" and dtype == torch.bfloat16:
        pytest.skip("bf16 teacher logits repeat, and at ties a sort's arbitrary order is not AKL's tie rule "
                    "(test_adaptive_kl_ties_count_together; the reference matrix covers bf16)")
    temperature = 2.0
    s = make_logits((5,), 300, dtype, seed=11)
    t = make_logits((5,), 300, dtype, seed=12)
    loss = kdk.kd_loss(s, t, divergence=divergence, temperature=temperature, reduction="none", backend="cpu",
                       **_keywords(divergence, setting))
    grads = torch.autograd.grad((loss * torch.linspace(0.5, 1.5, 5, dtype=loss.dtype)).sum(), [s, t])

    s64, t64 = (x.detach().double().requires_grad_() for x in (s, t))
    p, q = torch.softmax(t64 / temperature, -1), torch.softmax(s64 / temperature, -1)
    exact = temperature**2 * PAPER_FORMULAS[case](p, q)
    exact_grads = torch.autograd.grad((exact * torch.linspace(0.5, 1.5, 5, dtype=torch.float64)).sum(), [s64, t64])
    tolerance = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 2e-5}[dtype]
    torch.testing.assert_close(loss.detach().double(), exact.detach(), rtol=tolerance,
                               atol=tolerance * exact.abs().max().item())
    for grad, exact_grad in zip(grads, exact_grads):
        scale = exact_grad.abs().max().item()
        # bf16 gradients: one rounding of each entry into bf16.
        grad_tolerance = 8e-3 if dtype == torch.bfloat16 else tolerance
        torch.testing.assert_close(grad.double(), exact_grad, rtol=grad_tolerance, atol=grad_tolerance * scale)


@pytest.mark.parametrize("divergence, keywords, equals", [
    ("skew_kl", {"skew": 0.0}, "forward_kl"),
    ("skew_reverse_kl", {"skew": 0.0}, "reverse_kl"),
    ("ab", {"ab_alpha": 1.0, "ab_beta": 0.0}, "forward_kl"),
    ("ab", {"ab_alpha": 0.0, "ab_beta": 1.0}, "reverse_kl"),
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_identities(divergence, keywords, equals, dtype):
    s = make_logits((6,), 500, dtype, seed=13)
    t = make_logits((6,), 500, dtype, seed=14)
    target = make_target((6,), 500, ignored=True)
    _assert_divergences_agree(s, t, (divergence, keywords), (equals, {}), target=target, temperature=3.0)


def _assert_divergences_agree(s, t, first, second, **options):
    """kd_loss with the divergence (name, keywords) `first` equals it with `second`, in value and
    in both gradients, to the rounding of s's dtype."""
    results = []
    for name, extra in (first, second):
        loss = kdk.kd_loss(s, t, divergence=name, reduction="none", **options, **extra)
        results.append((loss, torch.autograd.grad(loss.sum(), [s, t])))
    (loss, grads), (expected, expected_grads) = results
    tolerance = 1e-12 if s.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=tolerance, atol=tolerance)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=tolerance, atol=tolerance * expected_grad.abs().max().item())


@pytest.mark.parametrize("backend, dtype", [("cpu", torch.float64), ("cpu", torch.float32), ("triton", torch.float32)],
                         ids=str)
@pytest.mark.parametrize("divergence, equals", [("skew_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")])
def test_zero_skew_with_logits_far_apart(divergence, equals, backend, dtype):
    """At skew 0 the mixture's ratio has weight 0, and with logits 1e4 apart it overflows: the
    loss must still equal forward (reverse) KL, with no 0 * inf."""
    if backend == "triton":
        pytest.importorskip("triton")
    s = make_logits((4,), 300, dtype, seed=40, requires_grad=False)
    t = make_logits((4,), 300, dtype, seed=41, requires_grad=False)
    s[0, :100] -= 1e4
    t[1, :100] -= 1e4
    s.requires_grad_(True)
    t.requires_grad_(True)
    _assert_divergences_agree(s, t, (divergence, {"skew": 0.0}), (equals, {}), temperature=2.0, backend=backend)


def test_alpha_beta_where_probabilities_underflow():
    """Student entries 1e4 below the rest, whose q underflows to 0 (q^beta too): the gradients stay
    finite, the kernel's as the reference's, and agree."""
    s = make_logits((3,), 300, torch.float32, seed=42, requires_grad=False)
    s[:, -30:] -= 1e4
    s.requires_grad_(True)
    t = make_logits((3,), 300, torch.float32, seed=43)
    assert_matches_reference(s, t, None, divergence="ab", ab_alpha=0.6, ab_beta=0.3, temperature=1.0)


@pytest.mark.parametrize("special, nearby", [
    ((1.0, 0.0), (1.0, 1e-7)),
    ((0.0, 1.0), (1e-7, 1.0)),
    ((0.5, -0.5), (0.5, -0.5 + 1e-7)),
    ((0.0, 0.0), (1e-7, -2e-7)),
    ((0.7, 0.0), (0.7, -1e-7)),
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_alpha_beta_is_continuous_at_its_special_cases(special, nearby, dtype):
    """No cancellation next to the special cases: a 1e-7 step in (alpha, beta) moves the loss and
    its gradients by about 1e-6 relative, in fp32 as in fp64 (the textbook formula, dividing by
    alpha * beta, would lose all digits of fp32 here)."""
    s = make_logits((4,), 400, dtype, seed=15)
    t = make_logits((4,), 400, dtype, seed=16)
    results = []
    for a, b in (special, nearby):
        loss = kdk.kd_loss(s, t, divergence="ab", ab_alpha=a, ab_beta=b, temperature=2.0, reduction="none")
        results.append((loss, torch.autograd.grad(loss.sum(), [s, t])))
    (loss, grads), (near_loss, near_grads) = results
    tolerance = 1e-5 if dtype == torch.float64 else 3e-5
    torch.testing.assert_close(near_loss.detach(), loss.detach(), rtol=tolerance, atol=0.0)
    for grad, near_grad in zip(grads, near_grads):
        torch.testing.assert_close(near_grad, grad, rtol=tolerance, atol=tolerance * grad.abs().max().item())


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("divergence", list(DIVERGENCE_CASES))
def test_identical_distributions_give_exactly_zero(divergence, backend):
    """A student identical to its teacher: every divergence is exactly 0, not rounding noise (the
    mixture divergences factor m = p out where p == q)."""
    if backend == "triton":
        pytest.importorskip("triton")
    s = make_logits((4,), 3000, torch.float32, seed=44, requires_grad=False)
    loss = kdk.kd_loss(s, s.clone(), divergence=divergence, temperature=2.0, reduction="none", backend=backend,
                       **DIVERGENCE_CASES[divergence])
    assert torch.all(loss == 0), loss


def test_tvd_of_identical_distributions_has_zero_gradient():
    s = make_logits((3,), 64, torch.float32, seed=17)
    t = s.detach().clone().requires_grad_()
    target = torch.tensor([1, 2, 3])
    loss = kdk.kd_loss(s, t, target, alpha=1.0, divergence="tvd", temperature=2.0)
    grad_s, grad_t = torch.autograd.grad(loss, [s, t])
    assert loss.item() == 0.0
    assert torch.all(grad_s == 0) and torch.all(grad_t == 0)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_adaptive_kl_ties_count_together(backend):
    """Equal teacher logits whose group would pass mu are all tail; the top value is always head.
    Row 0: p = [a, b, b, c, ...] with a < mu < a + 2b: head {0}. Row 1: a flat teacher is all one tie
    group at the top, so it is all head and AKL equals forward KL."""
    teacher = torch.tensor([[3.0, 1.0, 1.0, -1.0, -2.0, -3.0], [0.5] * 6], dtype=torch.float64)
    student = make_logits((2,), 6, torch.float64, seed=30)
    p, q = torch.softmax(teacher, -1), torch.softmax(student.detach(), -1)
    mu = p[0, 0].item() + 0.5 * p[0, 1].item()  # the pair at index 1, 2 straddles mu
    loss = kdk.kd_loss(student, teacher, divergence="akl", akl_mu=mu, reduction="none", backend=backend)
    error = (p - q).abs()
    g_head = error[0, 0]
    w = g_head / error[0].sum()
    forward, reverse = (p * (p / q).log()).sum(-1), (q * (q / p).log()).sum(-1)
    expected = torch.stack([w * forward[0] + (1 - w) * reverse[0], forward[1]])
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_adaptive_kl_mu_at_a_cumulative_sum(backend):
    """mu within rounding of the cumulative teacher mass of the top 4 entries: the head is the top 3
    or the top 4 (the sums round either way), and the weights must be those of one of them, each
    error counted once."""
    t = torch.tensor([[2.083162546157837, -1.3574793338775635, 0.4339940845966339, 2.074967384338379,
                       2.0753188133239746, -1.4066030979156494, 2.084601879119873]])
    s = torch.tensor([[0.6613521575927734, 0.266924113035202, 0.06167725846171379, 0.6213173270225525,
                       -0.4519059658050537, -0.16613022983074188, -1.522768497467041]])
    loss = kdk.kd_loss(s, t, divergence="akl", akl_mu=0.9399178624153137, reduction="none", backend=backend)
    p, q = torch.softmax(t.double(), -1)[0], torch.softmax(s.double(), -1)[0]
    forward, reverse = (p * (p / q).log()).sum(), (q * (q / p).log()).sum()
    error, order = (p - q).abs(), p.argsort(descending=True)
    candidates = []
    for size in (3, 4):
        g_head = error[order[:size]].sum()
        w = g_head / error.sum()
        candidates.append((w * forward + (1 - w) * reverse).item())
    assert min(abs(loss.item() - c) for c in candidates) < 1e-5, (loss.item(), candidates)


@pytest.mark.parametrize("shape", ["peaked", "offset_logits", "wide"])
def test_adaptive_kl_head_search_on_hard_rows(shape):
    """The head search on rows that stress it: one logit far above the rest (the head is the top
    alone), logits near 1e5 (the first bucket range widens) and 32001 entries with duplicates."""
    t = make_logits((3,), 32001 if shape == "wide" else 400, torch.float32, seed=31, requires_grad=False)
    if shape == "peaked":
        t[:, 7] = 60.0
    elif shape == "offset_logits":
        t = t + 1e5  # logits so large that the first bucket range widens
    else:
        t = t.round()  # many ties
    s = make_logits(tuple(t.shape[:-1]), t.shape[-1], torch.float32, seed=32)
    t.requires_grad_(True)
    for mu in (0.1, 0.5, 0.9):
        assert_matches_reference(s, t, None, backend="cpu", divergence="akl", akl_mu=mu, temperature=2.0)


@pytest.mark.parametrize("divergence", ["skew_kl", "skew_reverse_kl", "tvd", "ab", "akl"])
def test_all_ignored_batch_gives_zero(divergence):
    s = make_logits((4,), 33, torch.float32, seed=18)
    t = make_logits((4,), 33, torch.float32, seed=19)
    target = torch.full((4,), -100)
    loss = kdk.kd_loss(s, t, target, divergence=divergence, **_keywords(divergence, (0.5, 0.5) if divergence == "ab"
                                                                        else 0.1))
    grads = torch.autograd.grad(loss, [s, t])
    assert loss.item() == 0.0 and all(torch.all(g == 0) for g in grads)


MATRIX_CASES = [("skew_kl", {"skew": 0.1}), ("skew_reverse_kl", {"skew": 0.3}), ("tvd", {}),
                ("ab", {"ab_alpha": 0.5, "ab_beta": 0.3}), ("ab", {"ab_alpha": -0.3, "ab_beta": 1.2}),
                ("ab", {"ab_alpha": 0.2, "ab_beta": -0.2}), ("akl", {"akl_mu": 0.5})]


@pytest.mark.parametrize("vocab", [1, 7, 1000, 32001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("target_mode", ["none", "target", "ignored"])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("divergence, keywords", MATRIX_CASES, ids=[f"{d}{list(k.values())}" for d, k in MATRIX_CASES])
def test_matches_reference(divergence, keywords, temperature, target_mode, dtype, vocab):
    student = make_logits((2, 3), vocab, dtype, contiguous=vocab != 1000, seed=1)
    teacher = make_logits((2, 3), vocab, dtype, seed=2)
    target = None if target_mode == "none" else make_target((2, 3), vocab, ignored=target_mode == "ignored")
    assert_matches_reference(student, teacher, target, backend="cpu", temperature=temperature, divergence=divergence,
                             reduction="none" if temperature == 1.0 else "batchmean", alpha=0.3, **keywords)


@pytest.mark.parametrize("keywords, match", [
    ({"divergence": "skew_kl", "skew": 1.0}, "skew"),
    ({"divergence": "skew_reverse_kl", "skew": -0.1}, "skew"),
    ({"divergence": "skew_kl", "skew": float("nan")}, "skew"),
    ({"divergence": "ab", "ab_beta": 0.5}, "ab_alpha"),
    ({"divergence": "ab", "ab_alpha": 0.5}, "ab_beta"),
    ({"divergence": "ab", "ab_alpha": float("inf"), "ab_beta": 0.5}, "ab_alpha"),
    ({"divergence": "akl", "akl_mu": 0.0}, "akl_mu"),
    ({"divergence": "akl", "akl_mu": 1.0}, "akl_mu"),
    ({"divergence": "akl", "akl_mu": float("nan")}, "akl_mu"),
])
def test_bad_keywords_are_clear_errors(keywords, match):
    s = make_logits((2,), 5, torch.float32, seed=20)
    with pytest.raises(ValueError, match=match):
        kdk.kd_loss(s, s.detach(), **keywords)


# ---- logit transforms ------------------------------------------------------------------------

@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "ab"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_logit_scale_matches_reference(divergence, temperature):
    keywords = {"ab": {"ab_alpha": 0.5, "ab_beta": 0.3}}.get(divergence, {})
    s = make_logits((2, 3), 257, torch.float32, seed=21)
    t = make_logits((2, 3), 257, torch.float32, seed=22)
    target = make_target((2, 3), 257, ignored=True)
    assert_matches_reference(s, t, target, temperature=temperature, divergence=divergence, logit_scale=2.5, **keywords)


def test_logit_scale_is_a_scaling_of_both_inputs():
    """Soft term only: the loss of (s, t) at scale c is that of (c s, c t); the gradient with
    respect to s is c times the gradient with respect to c s (the chain rule through z -> c z)."""
    c = 0.4
    s = make_logits((4,), 100, torch.float64, seed=23)
    t = make_logits((4,), 100, torch.float64, seed=24)
    loss = kdk.kd_loss(s, t, temperature=2.0, logit_scale=c, divergence="reverse_kl")
    grads = torch.autograd.grad(loss, [s, t])
    scaled = [(c * x).detach().requires_grad_() for x in (s, t)]
    expected = kdk.kd_loss(*scaled, temperature=2.0, divergence="reverse_kl")
    expected_grads = torch.autograd.grad(expected, scaled)
    torch.testing.assert_close(loss, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, c * expected_grad)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_logit_scale_is_a_clear_error(value):
    s = make_logits((2,), 5, torch.float32, seed=25)
    with pytest.raises(ValueError, match="logit_scale"):
        kdk.kd_loss(s, s.detach(), logit_scale=value)


def _softcapped(z: torch.Tensor, cap: float) -> torch.Tensor:  # Gemma-2's final_logit_softcapping
    return cap * torch.tanh(z / cap)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd", "ab"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("teacher_grad", [True, False], ids=["teacher_grad", "frozen_teacher"])
def test_softcap_matches_the_formula(divergence, temperature, dtype, teacher_grad):
    """The soft term of (s, t) with softcap c is the divergence of softcap(s), softcap(t); the CE
    term reads the raw student logits; gradients by autograd through tanh in fp64."""
    cap, alpha = 5.0, 0.6
    s = make_logits((7,), 300, dtype, seed=26, scale=6.0)
    t = make_logits((7,), 300, dtype, seed=27, scale=6.0, requires_grad=teacher_grad)
    target = make_target((7,), 300, ignored=True)
    keywords = DIVERGENCE_CASES_FOR_SOFTCAP.get(divergence, {})
    loss = kdk.kd_loss(s, t, target, softcap=cap, temperature=temperature, alpha=alpha, divergence=divergence,
                       **keywords)
    grads = torch.autograd.grad(loss, [s, t] if teacher_grad else [s])
    s64, t64 = (x.detach().double().requires_grad_() for x in (s, t))
    soft = kdk.kd_loss(_softcapped(s64, cap), _softcapped(t64, cap), None, temperature=temperature,
                       divergence=divergence, reduction="none", backend="reference", **keywords)
    counted = target != -100
    ce = torch.nn.functional.cross_entropy(s64, target, ignore_index=-100, reduction="none")
    exact = torch.where(counted, alpha * soft + (1 - alpha) * ce, 0.0).sum() / counted.sum()
    exact_grads = torch.autograd.grad(exact, [s64, t64] if teacher_grad else [s64])
    tolerance = {torch.float64: 1e-10, torch.float32: 3e-5, torch.bfloat16: 3e-5}[dtype]
    torch.testing.assert_close(loss.double(), exact.detach(), rtol=tolerance, atol=tolerance)
    grad_tolerance = 8e-3 if dtype == torch.bfloat16 else tolerance
    for grad, exact_grad in zip(grads, exact_grads):
        torch.testing.assert_close(grad.double(), exact_grad, rtol=grad_tolerance,
                                   atol=grad_tolerance * exact_grad.abs().max().item())


DIVERGENCE_CASES_FOR_SOFTCAP = {"jsd": {"beta": 0.3}, "ab": {"ab_alpha": 0.6, "ab_beta": 0.3}}


def test_softcap_with_logit_scale_masks_and_fused_linear():
    s = make_logits((4,), 64, torch.float64, seed=28, scale=8.0, requires_grad=False)
    t = make_logits((4,), 64, torch.float64, seed=29, scale=8.0, requires_grad=False)
    s[:, 60:] = float("-inf")
    t[:, 60:] = float("-inf")
    s.requires_grad_(True)
    options = dict(softcap=3.0, logit_scale=0.5, temperature=1.5)
    loss = kdk.kd_loss(s, t, **options)
    (grad,) = torch.autograd.grad(loss, [s])
    expected = kdk.kd_loss(s, t, backend="reference", **options)
    (expected_grad,) = torch.autograd.grad(expected, [s])
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)
    assert torch.all(grad[:, 60:] == 0)
    # Inside fused_linear_kd_loss, where the logits never exist outside the kernel's chunk.
    h_s = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    w_s, h_t, w_t = (torch.randn(*shape, dtype=torch.float64) for shape in ((40, 8), (6, 8), (40, 8)))
    fused = kdk.fused_linear_kd_loss(h_s, w_s, h_t, w_t, softcap=2.0, chunk_size=4)
    unfused = kdk.kd_loss(h_s @ w_s.T, h_t @ w_t.T, softcap=2.0)
    torch.testing.assert_close(fused, unfused)
    torch.testing.assert_close(torch.autograd.grad(fused, [h_s])[0], torch.autograd.grad(unfused, [h_s])[0])


def test_softcap_gradcheck_and_bad_values():
    s = make_logits((3,), 9, torch.float64, seed=30, scale=4.0)
    t = make_logits((3,), 9, torch.float64, seed=31, scale=4.0)
    target = torch.tensor([1, -100, 8])
    assert torch.autograd.gradcheck(
        lambda a, b: kdk.kd_loss(a, b, target, softcap=2.5, temperature=1.3, reduction="none", backend="cpu"), (s, t))
    for value in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="softcap"):
            kdk.kd_loss(s, t, softcap=value)


def _paper_standardize(z: Tensor) -> Tensor:  # Sun et al.'s normalize(): unbiased std, 1e-7
    return (z - z.mean(-1, keepdim=True)) / (1e-7 + z.std(-1, keepdim=True))


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd", "akl"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("teacher_grad", [True, False], ids=["teacher_grad", "frozen_teacher"])
def test_standardize_matches_the_paper(divergence, dtype, teacher_grad):
    """T^2 * D(softmax(std(t) / T), softmax(std(s) / T)) + CE on the raw logits, values and both
    gradients, against Sun et al.'s normalize() in fp64 with autograd through mean and std."""
    if divergence == "akl" and dtype == torch.bfloat16:
        pytest.skip("bf16 ties: see test_paper_formula")
    temperature, alpha = 2.0, 0.7
    s = make_logits((5,), 300, dtype, seed=32, scale=2.0)
    t = make_logits((5,), 300, dtype, seed=33, scale=5.0, requires_grad=teacher_grad)
    target = torch.tensor([3, -100, 299, 0, 17])
    keywords = {"jsd": {"beta": 0.3}, "akl": {"akl_mu": 0.5}}.get(divergence, {})
    loss = kdk.kd_loss(s, t, target, divergence=divergence, temperature=temperature, alpha=alpha, standardize=True,
                       reduction="none", backend="cpu", **keywords)
    weights = torch.linspace(0.5, 1.5, 5, dtype=torch.float64)
    grads = torch.autograd.grad((loss * weights.to(loss.dtype)).sum(), [s, t] if teacher_grad else [s])

    s64, t64 = (x.detach().double().requires_grad_() for x in (s, t))
    p = torch.softmax(_paper_standardize(t64) / temperature, -1)
    q = torch.softmax(_paper_standardize(s64) / temperature, -1)
    soft = {"forward_kl": lambda: (p * (p / q).log()).sum(-1), "reverse_kl": lambda: (q * (q / p).log()).sum(-1),
            "jsd": lambda: (0.3 * p * (p / (0.3 * p + 0.7 * q)).log()
                            + 0.7 * q * (q / (0.3 * p + 0.7 * q)).log()).sum(-1),
            "tvd": lambda: _tvd(p, q), "akl": lambda: _adaptive_kl(p, q, 0.5)}[divergence]()
    ce = torch.nn.functional.cross_entropy(s64, target, reduction="none")
    exact = torch.where(target != -100, alpha * temperature**2 * soft + (1 - alpha) * ce, 0.0)
    exact_grads = torch.autograd.grad((exact * weights).sum(), [s64, t64] if teacher_grad else [s64])
    tolerance = {torch.float64: 1e-9, torch.float32: 3e-5, torch.bfloat16: 3e-5}[dtype]
    torch.testing.assert_close(loss.detach().double(), exact.detach(), rtol=tolerance,
                               atol=tolerance * exact.abs().max().item())
    for grad, exact_grad in zip(grads, exact_grads):
        grad_tolerance = 8e-3 if dtype == torch.bfloat16 else tolerance
        torch.testing.assert_close(grad.double(), exact_grad, rtol=grad_tolerance,
                                   atol=grad_tolerance * exact_grad.abs().max().item())


def test_standardize_constant_rows_masks_gradcheck_and_fused_linear():
    """A constant row standardises to 0 (no NaN; its gradient through the std is the subgradient
    0); -inf entries stay masked and the statistics skip them; gradcheck in fp64; inside
    fused_linear_kd_loss."""
    s = make_logits((4,), 40, torch.float64, seed=34, requires_grad=False)
    t = make_logits((4,), 40, torch.float64, seed=35, requires_grad=False)
    s[0] = 2.0
    t[1] = -1.0
    s[2, 30:] = float("-inf")
    t[3, :5] = float("-inf")
    s.requires_grad_(True)
    t.requires_grad_(True)
    assert_matches_reference(s, t, None, backend="cpu", temperature=1.5, standardize=True)
    loss = kdk.kd_loss(s, t, standardize=True, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(torch.autograd.grad(loss.sum(), [s])[0]).all()
    a = make_logits((3,), 8, torch.float64, seed=36)
    b = make_logits((3,), 8, torch.float64, seed=37)
    target = torch.tensor([1, -100, 7])
    assert torch.autograd.gradcheck(lambda x, y: kdk.kd_loss(x, y, target, standardize=True, temperature=1.3,
                                                             divergence="jsd", reduction="none", backend="cpu"), (a, b))
    h_s = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    w_s, h_t, w_t = (torch.randn(*shape, dtype=torch.float64) for shape in ((40, 8), (6, 8), (40, 8)))
    fused = kdk.fused_linear_kd_loss(h_s, w_s, h_t, w_t, standardize=True, chunk_size=4)
    unfused = kdk.kd_loss(h_s @ w_s.T, h_t @ w_t.T, standardize=True)
    torch.testing.assert_close(fused, unfused)
    torch.testing.assert_close(torch.autograd.grad(fused, [h_s])[0], torch.autograd.grad(unfused, [h_s])[0])


@pytest.mark.parametrize("keywords, error, match", [
    ({"standardize": True, "softcap": 3.0}, ValueError, "standardize"),
    ({"standardize": True, "logit_scale": 2.0}, ValueError, "standardize"),
    ({"standardize": "yes"}, TypeError, "standardize"),
])
def test_bad_standardize_is_a_clear_error(keywords, error, match):
    s = make_logits((2,), 5, torch.float32, seed=38)
    with pytest.raises(error, match=match):
        kdk.kd_loss(s, s.detach(), **keywords)

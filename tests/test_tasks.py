"""Task-specific losses (kdkernels.tasks) on the CPU and Triton kernels: against
kdkernels.reference in fp64 (values and gradients of both inputs), formulas written out here from
the papers, the authors' normalisations, gradcheck, awkward shapes and layouts, masking, the
modules and bad input. Shapes stay tiny: the Triton interpreter runs each row in Python."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kdkernels as kdk
from kdkernels import reference
from conftest import GRAD_TOLERANCE, LOSS_RTOL, make_logits, make_target

BACKENDS = ["cpu", "triton"]
DTYPES = [torch.float32, torch.bfloat16]


def _loss_and_grads(fn, inputs: list, kwargs: dict):
    """fn(*inputs, **kwargs) and the gradients of the inputs that require grad, under a fixed,
    non-uniform upstream gradient (None for an input the loss does not depend on)."""
    loss = fn(*inputs, **kwargs)
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    weight = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    return loss.detach(), torch.autograd.grad((loss * weight).sum(), leaves, allow_unused=True)


def assert_matches(fn, reference_fn, inputs: list, backend: str | None = None, **kwargs) -> None:
    """fn (on `backend`) equals reference_fn evaluated in fp64 on the same input values: the loss
    within the dtype's tolerance, each gradient within it relative to the largest entry, or within
    4x the error of the reference itself run in the input dtype."""
    floats = [x for x in inputs if isinstance(x, torch.Tensor) and x.is_floating_point()]
    dtype = floats[0].dtype
    exact_inputs = [x.detach().double().requires_grad_(x.requires_grad) if any(x is f for f in floats) else x
                    for x in inputs]
    loss, grads = _loss_and_grads(fn, inputs, kwargs if backend is None else {**kwargs, "backend": backend})
    exact, exact_grads = _loss_and_grads(reference_fn, exact_inputs, kwargs)
    _, eager_grads = _loss_and_grads(reference_fn, inputs, kwargs)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.shape == exact.shape
    rtol = LOSS_RTOL[dtype]
    torch.testing.assert_close(loss.double(), exact, rtol=rtol, atol=rtol * max(1.0, exact.abs().max().item()))
    for grad, exact_grad, eager in zip(grads, exact_grads, eager_grads):
        if exact_grad is None:
            assert grad is None
            continue
        assert grad.dtype == dtype
        eager_error = (eager.double() - exact_grad).abs().max().item()
        atol = max(GRAD_TOLERANCE[dtype] * exact_grad.abs().max().item(), 4 * eager_error, 1e-2 * GRAD_TOLERANCE[dtype])
        torch.testing.assert_close(grad.double(), exact_grad, rtol=GRAD_TOLERANCE[dtype], atol=atol)


def _maps(shape: tuple[int, ...], dtype: torch.dtype, seed: int, *, scale: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype).requires_grad_()


# ---------------------------------------------------------------------------------------------
# Pixel-wise distillation (Liu et al., CVPR 2019)

PIXEL_CASES = {  # student shape, target, reduction
    "2d-ignored-none": ((1, 3, 2, 3), "ignored", "none"),
    "no-spatial-target-sum": ((2, 4), "target", "sum"),
    "3d-no-target-batchmean": ((1, 2, 1, 2, 2), None, "batchmean"),
}


@pytest.mark.parametrize("case", list(PIXEL_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_pixelwise_matches_reference(backend, dtype, case):
    shape, target_mode, reduction = PIXEL_CASES[case]
    s, t = _maps(shape, dtype, 1), _maps(shape, dtype, 2)
    pixels = (shape[0],) + shape[2:]
    y = None if target_mode is None else make_target(pixels, shape[1], ignored=target_mode == "ignored",
                                                     ignore_index=255)
    assert_matches(kdk.pixelwise_kd_loss, reference.pixelwise_kd_loss, [s, t, y], backend, temperature=2.0,
                   alpha=0.3, reduction=reduction, ignore_index=255)


@pytest.mark.parametrize("layout", ["channels_last", "strided", "one_class", "one_pixel"])
def test_pixelwise_layouts_and_awkward_shapes(layout):
    if layout == "channels_last":
        s = _maps((2, 5, 3, 2), torch.float32, 3).detach().to(memory_format=torch.channels_last).requires_grad_()
        t = _maps((2, 5, 3, 2), torch.float32, 4).detach().to(memory_format=torch.channels_last)
    elif layout == "strided":  # every other channel, the spatial dims transposed
        s = _maps((2, 10, 2, 3), torch.float32, 3)[:, ::2].transpose(2, 3)
        t = _maps((2, 10, 2, 3), torch.float32, 4)[:, ::2].transpose(2, 3)
    else:
        shape = (2, 1, 3, 2) if layout == "one_class" else (1, 6, 1, 1)
        s, t = _maps(shape, torch.float32, 3), _maps(shape, torch.float32, 4)
    y = make_target((s.shape[0],) + s.shape[2:], s.shape[1], ignored=True)
    assert_matches(kdk.pixelwise_kd_loss, reference.pixelwise_kd_loss, [s, t, y], "cpu", temperature=1.5)


def test_pixelwise_passes_kd_loss_keywords_through():
    """Other divergences, num_items and scale_by_temperature reach kd_loss over the channel dim."""
    s, t = _maps((2, 4, 2, 2), torch.float64, 5), _maps((2, 4, 2, 2), torch.float64, 6)
    y = make_target((2, 2, 2), 4, ignored=True)
    options = dict(temperature=3.0, divergence="jsd", beta=0.3, num_items=5, scale_by_temperature=False)
    loss = kdk.pixelwise_kd_loss(s, t, y, **options)
    expected = reference.kd_loss(s.movedim(1, -1), t.movedim(1, -1), y, **options)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


def test_pixelwise_authors_normaliser():
    """The authors' CriterionPixelWise, sum over all pixels of -p_t log p_s divided by H * W, is
    this loss with num_items=H * W plus the teacher's entropy over the same normaliser, with the
    same student gradient."""
    s, t = _maps((2, 5, 3, 4), torch.float64, 7), _maps((2, 5, 3, 4), torch.float64, 8).detach()
    classes, height, width = s.shape[1:]
    p_t = F.softmax(t.permute(0, 2, 3, 1).reshape(-1, classes), dim=1)
    authors = torch.sum(-p_t * F.log_softmax(s.permute(0, 2, 3, 1).reshape(-1, classes), dim=1)) / height / width
    ours = kdk.pixelwise_kd_loss(s, t, num_items=height * width)
    entropy = -(p_t * p_t.log()).sum() / (height * width)
    torch.testing.assert_close(ours + entropy, authors, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours, s)[0], torch.autograd.grad(authors, s)[0])


def test_pixelwise_gradcheck_fp64():
    s, t = _maps((1, 3, 2, 2), torch.float64, 9), _maps((1, 3, 2, 2), torch.float64, 10)
    y = torch.tensor([[[0, 255], [2, 1]]])
    assert torch.autograd.gradcheck(lambda a, b: kdk.pixelwise_kd_loss(a, b, y, temperature=2.0, ignore_index=255,
                                                                       reduction="none", backend="cpu"), (s, t))


# ---------------------------------------------------------------------------------------------
# Class-weighted soft cross-entropy (Chen et al., NeurIPS 2017)

WEIGHTS = [1.5, 1.0, 0.0, 1.0, 2.0, 1.0]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_class_weighted_soft_ce_matches_reference(backend, dtype, reduction):
    s, t = make_logits((5,), 6, dtype, seed=11), make_logits((5,), 6, dtype, seed=12)
    assert_matches(kdk.class_weighted_soft_ce, reference.class_weighted_soft_ce, [s, t], backend,
                   class_weights=WEIGHTS, temperature=2.0, reduction=reduction)


def test_class_weighted_soft_ce_independent_formula():
    """-sum_c w_c P_t,c log P_s,c with Python floats, the background weighted 1.5 (the paper's)."""
    s = [[1.0, -2.0, 0.5], [0.0, 0.3, 2.5]]
    t = [[2.0, 1.5, -1.0], [-1.0, 0.0, 0.5]]
    weights, temperature = [1.5, 1.0, 1.0], 2.0

    def softmax(row):
        e = [math.exp(v / temperature) for v in row]
        return [v / sum(e) for v in e]

    rows = [-sum(w * p * math.log(q) for w, p, q in zip(weights, softmax(t_row), softmax(s_row)))
            for s_row, t_row in zip(s, t)]
    loss = kdk.class_weighted_soft_ce(torch.tensor(s), torch.tensor(t), class_weights=weights,
                                      temperature=temperature, reduction="none")
    assert loss.tolist() == pytest.approx(rows, rel=1e-6)


def test_class_weighted_soft_ce_gradcheck_fp64():
    s, t = make_logits((3,), 6, torch.float64, seed=13), make_logits((3,), 6, torch.float64, seed=14)
    assert torch.autograd.gradcheck(
        lambda a, b: kdk.class_weighted_soft_ce(a, b, class_weights=WEIGHTS, temperature=1.5, reduction="none",
                                                backend="cpu"), (s, t))


@pytest.mark.parametrize("case", ["one_class", "strided_3d", "masked_class", "tensor_weights"])
def test_class_weighted_soft_ce_awkward_inputs(case):
    weights = torch.tensor(WEIGHTS)
    if case == "one_class":
        s, t = make_logits((4,), 1, torch.float32, seed=15), make_logits((4,), 1, torch.float32, seed=16)
        weights = [2.0]
    elif case == "strided_3d":
        s = make_logits((2, 3), 6, torch.float32, contiguous=False, seed=15)
        t = make_logits((2, 3), 6, torch.float32, contiguous=False, seed=16)
    else:
        s, t = make_logits((4,), 6, torch.float64, seed=15), make_logits((4,), 6, torch.float64, seed=16)
        if case == "masked_class":  # a class the teacher rules out, weighted or not
            t = t.detach().index_fill(1, torch.tensor([1, 2]), -math.inf).requires_grad_()
        else:
            weights = weights.double()
    assert_matches(kdk.class_weighted_soft_ce, reference.class_weighted_soft_ce, [s, t], "cpu", class_weights=weights,
                   temperature=3.0, reduction="none")
    if case == "one_class":
        assert torch.all(kdk.class_weighted_soft_ce(s, t, class_weights=weights, reduction="none") == 0)


# ---------------------------------------------------------------------------------------------
# Teacher-bounded regression (Chen et al., NeurIPS 2017)

def test_bounded_regression_independent_formula():
    """L_b = ||R_s - y||^2 if ||R_s - y||^2 + m > ||R_t - y||^2 else 0, per box, written out."""
    y = [[0.0, 0.0, 1.0, 1.0], [2.0, 2.0, 4.0, 4.0], [0.0, 1.0, 2.0, 3.0]]
    r_s = [[0.5, 0.0, 1.0, 1.5], [2.0, 2.1, 4.0, 4.0], [0.0, 1.0, 2.0, 3.5]]
    r_t = [[0.0, 0.0, 1.0, 1.2], [2.0, 3.0, 4.0, 4.0], [0.0, 1.0, 2.0, 3.0]]
    margin = 0.25
    distance = [sum((a - b) ** 2 for a, b in zip(row, truth)) for row, truth in zip(r_s, y)]
    teacher = [sum((a - b) ** 2 for a, b in zip(row, truth)) for row, truth in zip(r_t, y)]
    # box 0: student worse than the teacher; box 1: better by more than the margin; box 2: worse
    # by exactly the margin, not beyond it (the inequality is strict).
    expected = [d if d + margin > d_t else 0.0 for d, d_t in zip(distance, teacher)]
    assert expected[0] > 0 and expected[1] == 0 and distance[2] == teacher[2] + margin
    student = torch.tensor(r_s, dtype=torch.float64, requires_grad=True)
    loss = kdk.bounded_regression_loss(student, torch.tensor(r_t, dtype=torch.float64),
                                       torch.tensor(y, dtype=torch.float64), margin=margin, reduction="none")
    assert loss.tolist() == pytest.approx(expected, rel=1e-12)
    loss.sum().backward()
    active = torch.tensor([d + margin > d_t for d, d_t in zip(distance, teacher)], dtype=torch.float64)[:, None]
    torch.testing.assert_close(student.grad, 2 * (student.detach() - torch.tensor(y, dtype=torch.float64)) * active)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64] + DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 4), (2, 3, 1), (5,), (2, 4, 7)])
def test_bounded_regression_matches_reference(shape, dtype, reduction):
    y = _maps(shape, dtype, 17).detach()
    s, t = (y + _maps(shape, dtype, 18, scale=0.3)).detach().requires_grad_(), (y + _maps(shape, dtype, 19, scale=0.3))
    assert_matches(kdk.bounded_regression_loss, reference.bounded_regression_loss, [s, t, y], margin=0.1,
                   reduction=reduction)
    assert torch.autograd.grad(kdk.bounded_regression_loss(s, t, y), t, allow_unused=True) == (None,)


def test_bounded_regression_gradcheck_fp64():
    y = _maps((6, 4), torch.float64, 20).detach()
    s, t = y + _maps((6, 4), torch.float64, 21, scale=0.5), y + _maps((6, 4), torch.float64, 22, scale=0.5).detach()
    assert torch.autograd.gradcheck(lambda a: kdk.bounded_regression_loss(a, t, y, margin=0.2, reduction="none"), (s,))


# ---------------------------------------------------------------------------------------------
# Localization distillation (Zheng et al., CVPR 2022)

LD_WEIGHTS = {"none": (None, "mean"), "per_box": ((2, 1), "sum"), "per_edge": ((2, 4), "none")}


@pytest.mark.parametrize("weight", list(LD_WEIGHTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_localization_distillation_matches_authors_formula(backend, dtype, weight):
    weight_shape, reduction = LD_WEIGHTS[weight]
    s, t = make_logits((2, 4), 8, dtype, seed=23), make_logits((2, 4), 8, dtype, seed=24)
    w = None if weight_shape is None else torch.rand(weight_shape, generator=torch.Generator().manual_seed(25))
    assert_matches(kdk.localization_distillation_loss, reference.localization_distillation_loss, [s, t], backend,
                   weight=w, reduction=reduction)


@pytest.mark.parametrize("case", ["one_bin", "one_edge", "strided", "low_temperature"])
def test_localization_distillation_awkward_inputs(case):
    options = {"reduction": "none"}
    if case == "one_bin":
        s, t = make_logits((3, 4), 1, torch.float32, seed=26), make_logits((3, 4), 1, torch.float32, seed=27)
    elif case == "one_edge":
        s, t = make_logits((), 17, torch.float32, seed=26), make_logits((), 17, torch.float32, seed=27)
    elif case == "strided":
        s = make_logits((3, 4), 17, torch.float32, contiguous=False, seed=26)
        t = make_logits((3, 4), 17, torch.float32, contiguous=False, seed=27)
    else:
        s, t = make_logits((3, 4), 17, torch.float64, seed=26), make_logits((3, 4), 17, torch.float64, seed=27)
        options = {"temperature": 0.5, "weight": torch.rand(4, dtype=torch.float64), "reduction": "mean"}
    assert_matches(kdk.localization_distillation_loss, reference.localization_distillation_loss, [s, t], "cpu",
                   **options)
    if case == "one_bin":
        assert torch.all(kdk.localization_distillation_loss(s, t, reduction="none") == 0)


def test_localization_distillation_defaults_and_gradcheck():
    s, t = make_logits((2, 4), 5, torch.float64, seed=28), make_logits((2, 4), 5, torch.float64, seed=29)
    torch.testing.assert_close(kdk.localization_distillation_loss(s, t),
                               reference.localization_distillation_loss(s, t, temperature=10.0, reduction="mean"))
    w = torch.rand(2, 1, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: kdk.localization_distillation_loss(
        a, b, temperature=2.0, weight=w, reduction="none", backend="cpu"), (s, t))


# ---------------------------------------------------------------------------------------------
# Attention distribution transfer (MobileBERT, Sun et al., ACL 2020)

PADDING = torch.tensor([[1, 1, 0]])  # one sample of three positions, the last padding


def _attention(shape, dtype, seed, inputs_are, *, mask=None):
    scores = _maps(shape, torch.float64, seed, scale=1.5).detach()
    if inputs_are == "probs":  # as a Hugging Face model computes them: an additive mask, then softmax
        if mask is not None:
            scores = scores + (1 - mask[:, None, None, :].double()) * torch.finfo(torch.float64).min
        scores = scores.softmax(-1)
    return scores.to(dtype).requires_grad_()


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "padding"])
@pytest.mark.parametrize("inputs_are", ["probs", "logits"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_distribution_matches_reference(backend, dtype, inputs_are, masked):
    mask = PADDING if masked else None
    s = _attention((1, 2, 3, 3), dtype, 30, inputs_are, mask=mask)
    t = _attention((1, 2, 3, 3), dtype, 31, inputs_are, mask=mask)
    assert_matches(kdk.attention_distribution_loss, reference.attention_distribution_loss, [s, t], backend,
                   attention_mask=mask, inputs_are=inputs_are)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_attention_distribution_reductions_and_cross_attention(reduction):
    """Q != K without a mask; every (sample, head, query) row is counted."""
    s, t = _attention((2, 2, 3, 5), torch.float32, 32, "probs"), _attention((2, 2, 3, 5), torch.float32, 33, "probs")
    assert_matches(kdk.attention_distribution_loss, reference.attention_distribution_loss, [s, t], "cpu",
                   reduction=reduction)


def test_attention_distribution_paper_formula():
    """L_AT = 1 / (T A) sum_t sum_a KL(a_t^tr || a_t^st), averaged over the batch, with loops."""
    s, t = (_attention((2, 3, 4, 4), torch.float64, seed, "probs").detach() for seed in (34, 35))
    batch, heads, length, _ = s.shape
    expected = sum(float((t[b, a, i] * (t[b, a, i] / s[b, a, i]).log()).sum())
                   for b in range(batch) for a in range(heads) for i in range(length)) / (batch * heads * length)
    assert kdk.attention_distribution_loss(s, t).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_distribution_zero_probabilities_and_infinite_scores(backend):
    """A causal mask: zero probabilities (logged to -inf) and -inf scores at the same keys of both
    inputs contribute 0, with finite gradients, 0 at those keys."""
    causal = torch.ones(3, 3, dtype=torch.bool).tril()
    for inputs_are in ("probs", "logits"):
        s = _attention((1, 2, 3, 3), torch.float32, 36, "logits").detach().masked_fill(~causal, -math.inf)
        t = _attention((1, 2, 3, 3), torch.float32, 37, "logits").detach().masked_fill(~causal, -math.inf)
        if inputs_are == "probs":
            s, t = s.softmax(-1), t.softmax(-1)
        s.requires_grad_(), t.requires_grad_()
        assert_matches(kdk.attention_distribution_loss, reference.attention_distribution_loss, [s, t], backend,
                       inputs_are=inputs_are)
        grads = torch.autograd.grad(kdk.attention_distribution_loss(s, t, inputs_are=inputs_are, backend=backend),
                                    [s, t])
        assert all(torch.isfinite(g).all() and torch.all(g[..., ~causal] == 0) for g in grads)


def test_attention_distribution_ignores_padding():
    """Values at padded keys and padded query rows change nothing and get no gradient; a sample
    without tokens contributes nothing; probabilities from an additive mask give the loss of the
    masked scores."""
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    scores_s, scores_t = _attention((3, 2, 4, 4), torch.float64, 38, "logits"), _attention(
        (3, 2, 4, 4), torch.float64, 39, "logits")
    loss = kdk.attention_distribution_loss(scores_s, scores_t, attention_mask=mask, inputs_are="logits")
    padded = (mask == 0)[:, None, :, None] | (mask == 0)[:, None, None, :]
    noise = _maps((3, 2, 4, 4), torch.float64, 40).detach() * padded
    moved = kdk.attention_distribution_loss(scores_s + noise, scores_t - noise, attention_mask=mask,
                                            inputs_are="logits")
    torch.testing.assert_close(moved, loss, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(loss, [scores_s, scores_t])
    assert all(torch.all(g[padded.expand_as(g)] == 0) for g in grads)
    # The samples with tokens alone, their rows counted as before.
    alone = kdk.attention_distribution_loss(scores_s[:2], scores_t[:2], attention_mask=mask[:2], inputs_are="logits")
    torch.testing.assert_close(alone, loss, rtol=1e-12, atol=1e-12)
    probs_s, probs_t = (_attention((3, 2, 4, 4), torch.float64, seed, "probs", mask=mask) for seed in (38, 39))
    from_probs = kdk.attention_distribution_loss(probs_s, probs_t, attention_mask=mask)
    torch.testing.assert_close(from_probs, loss, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("inputs_are", ["probs", "logits"])
def test_attention_distribution_gradcheck_fp64(inputs_are):
    s = _attention((1, 2, 3, 3), torch.float64, 41, inputs_are)
    t = _attention((1, 2, 3, 3), torch.float64, 42, inputs_are)
    assert torch.autograd.gradcheck(lambda a, b: kdk.attention_distribution_loss(
        a, b, attention_mask=PADDING, inputs_are=inputs_are, reduction="none", backend="cpu"), (s, t))


# ---------------------------------------------------------------------------------------------
# Modules and bad input

def test_modules_equal_their_functions():
    s, t = make_logits((2, 3), 6, torch.float32, seed=43), make_logits((2, 3), 6, torch.float32, seed=44)
    maps_s, maps_t = s.reshape(2, 3, 2, 3), t.reshape(2, 3, 2, 3)
    assert kdk.PixelwiseKDLoss(temperature=2.0, divergence="jsd", beta=0.3)(maps_s, maps_t) == kdk.pixelwise_kd_loss(
        maps_s, maps_t, temperature=2.0, divergence="jsd", beta=0.3)
    module = kdk.ClassWeightedSoftCELoss(WEIGHTS, temperature=2.0).double()
    assert module.class_weights.dtype == torch.float64 and "class_weights" not in module.state_dict()
    assert module(s, t) == kdk.class_weighted_soft_ce(s, t, class_weights=WEIGHTS, temperature=2.0)
    w = torch.rand(2, 3)
    assert kdk.LocalizationDistillationLoss(temperature=4.0)(s, t, w) == kdk.localization_distillation_loss(
        s, t, temperature=4.0, weight=w)
    assert kdk.BoundedRegressionLoss(margin=0.5)(s, t, t * 0.5) == kdk.bounded_regression_loss(s, t, t * 0.5,
                                                                                            margin=0.5)
    attn_s, attn_t = s.reshape(2, 2, 3, 3).softmax(-1), t.reshape(2, 2, 3, 3).softmax(-1)
    mask = PADDING.expand(2, 3)
    assert kdk.AttentionDistributionLoss(reduction="sum")(attn_s, attn_t, mask) == kdk.attention_distribution_loss(
        attn_s, attn_t, attention_mask=mask, reduction="sum")
    with pytest.raises(TypeError, match="unknown keywords"):
        kdk.LocalizationDistillationLoss(T=10)


def _bad_calls():
    s4, t4 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    rows, boxes, bins = torch.randn(5, 6), torch.randn(5, 4), torch.randn(5, 4, 8)
    attn = torch.randn(1, 2, 3, 3)
    pixelwise, weighted, bounded = kdk.pixelwise_kd_loss, kdk.class_weighted_soft_ce, kdk.bounded_regression_loss
    ld, attention = kdk.localization_distillation_loss, kdk.attention_distribution_loss
    w = WEIGHTS
    return [
        (lambda: pixelwise(s4[0, 0, 0], t4[0, 0, 0]), ValueError, r"student_logits must be \[B, C, \*spatial\]"),
        (lambda: pixelwise(s4, t4[:, :, :3]), ValueError, "teacher_logits shape"),
        (lambda: pixelwise(s4.long(), t4), TypeError, "student_logits must be float"),
        (lambda: pixelwise(s4, t4, torch.zeros(2, 4, dtype=torch.long)), ValueError, "target shape"),
        (lambda: pixelwise(s4, t4, temperature=0.0), ValueError, "temperature"),
        (lambda: pixelwise(s4, t4, reduction="mean"), ValueError, "reduction"),
        (lambda: weighted(rows, rows, class_weights=w[:5]), ValueError, r"one weight per class, shape \(6,\)"),
        (lambda: weighted(rows, rows, class_weights=[[1.0] * 6]), ValueError, "class_weights must hold"),
        (lambda: weighted(rows, rows, class_weights=[1.0, -1.0, 1, 1, 1, 1]), ValueError, "class_weights .* >= 0"),
        (lambda: weighted(rows, rows, class_weights=[0.0] * 6), ValueError, "at least one > 0"),
        (lambda: weighted(rows, rows, class_weights=[math.nan] + w[1:]), ValueError, "class_weights must be finite"),
        (lambda: weighted(rows, rows, class_weights="background"), TypeError, "class_weights must be a tensor"),
        (lambda: weighted(rows, rows, class_weights=w, temperature=-1.0), ValueError, "temperature"),
        (lambda: weighted(rows, rows[:4], class_weights=w), ValueError, "teacher_logits shape"),
        (lambda: weighted(rows, rows, class_weights=w, reduction="batchmean"), ValueError, "reduction"),
        (lambda: bounded(boxes, boxes, boxes, margin=-0.1), ValueError, "margin"),
        (lambda: bounded(boxes, boxes, boxes, margin="1"), TypeError, "margin must be a real number"),
        (lambda: bounded(boxes, boxes[:, :2], boxes), ValueError, "teacher_reg shape"),
        (lambda: bounded(boxes, boxes, boxes[:3]), ValueError, "target_reg shape"),
        (lambda: bounded(boxes, boxes, boxes.double()), TypeError, "target_reg dtype"),
        (lambda: bounded(boxes, boxes, boxes, reduction="batchmean"), ValueError, "reduction"),
        (lambda: ld(bins, bins, temperature=0.0), ValueError, "temperature"),
        (lambda: ld(bins, bins[..., :7]), ValueError, "teacher_bins shape"),
        (lambda: ld(bins.tolist(), bins), TypeError, "student_bins must be a torch.Tensor"),
        (lambda: ld(bins, bins, weight=torch.ones(5)), ValueError, r"weight must broadcast to .* \(5, 4\)"),
        (lambda: ld(bins, bins, weight=torch.ones(5, 4, dtype=torch.long)), TypeError, "weight must be a floating"),
        (lambda: attention(attn[0], attn[0]), ValueError, r"student_attn must be \[B, heads, Q, K\]"),
        (lambda: attention(attn, attn[:, :1]), ValueError, "teacher_attn shape"),
        (lambda: attention(attn, attn, attention_mask=torch.ones(1, 4)), ValueError, r"\[B, K\] = \(1, 3\)"),
        (lambda: attention(attn[..., :2], attn[..., :2], attention_mask=torch.ones(1, 2)), ValueError, "Q = K"),
        (lambda: attention(attn, attn, attention_mask=[[1, 1, 0]]), TypeError, "attention_mask must be a tensor"),
        (lambda: attention(attn, attn, inputs_are="scores"), ValueError, "inputs_are"),
        (lambda: attention(attn, attn, reduction="batchmean"), ValueError, "reduction"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_input_is_a_clear_error(index):
    call, error, match = _bad_calls()[index]
    with pytest.raises(error, match=match):
        call()

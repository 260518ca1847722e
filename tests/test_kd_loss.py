"""kd_loss semantics beyond the reference matrix: independent formulas, gradcheck, masking,
ignored rows, gradient accumulation, bad input, torch.library and torch.compile."""

import math

import pytest
import torch

import kdkernels as kdk
from kdkernels import reference
from kdkernels.ops import extension
from conftest import DIVERGENCE_CASES, assert_matches_reference, make_logits, make_target

DIVERGENCES = list(DIVERGENCE_CASES)


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _softmax(x: list[float], temperature: float) -> list[float]:
    m = max(x)
    e = [math.exp((v - m) / temperature) for v in x]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_independent_formula(divergence):
    """Hinton's loss written out with Python floats, not with the reference."""
    s = [[1.0, -2.0, 0.5, 3.0], [0.0, 0.1, -0.3, 2.5]]
    t = [[0.5, 1.5, -1.0, 2.0], [1.0, -1.0, 0.0, 0.5]]
    y = [3, 1]
    temperature, alpha, beta = 2.0, 0.7, 0.25
    expected = 0.0
    for srow, trow, label in zip(s, t, y):
        p, q = _softmax(trow, temperature), _softmax(srow, temperature)
        if divergence == "forward_kl":
            div = _kl(p, q)
        elif divergence == "reverse_kl":
            div = _kl(q, p)
        else:
            m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
            div = beta * _kl(p, m) + (1 - beta) * _kl(q, m)
        ce = -math.log(_softmax(srow, 1.0)[label])
        expected += alpha * temperature**2 * div + (1 - alpha) * ce
    expected /= len(s)
    loss = kdk.kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), temperature=temperature,
                       alpha=alpha, divergence=divergence, beta=beta)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_independent_gradient_forward_kl():
    """d/ds of T^2 KL(p || q) at temperature T is T * (q - p), per row (reduction='sum')."""
    s = make_logits((3,), 11, torch.float64, seed=3)
    t = make_logits((3,), 11, torch.float64, seed=4, requires_grad=False)
    temperature = 3.0
    kdk.kd_loss(s, t, temperature=temperature, reduction="sum").backward()
    p, q = torch.softmax(t / temperature, -1), torch.softmax(s.detach() / temperature, -1)
    torch.testing.assert_close(s.grad, temperature * (q - p))


# Adaptive KL's weights are detached (as its authors do), so its gradient is not the derivative
# of its value; test_divergence_family checks it against that formula instead.
#
# At T = 2 and 4 a CPU row whose exps are kept (gradients wanted, or a divergence with a read of its
# own) squares the kept exps of student / T for the CE term instead of taking exps of its own.
@pytest.mark.parametrize("divergence", [name for name in DIVERGENCES if name != "akl"])
@pytest.mark.parametrize("with_target", [False, True])
@pytest.mark.parametrize("temperature", [1.7, 2.0, 4.0])
def test_gradcheck_fp64(divergence, with_target, temperature):
    s = make_logits((4,), 9, torch.float64, seed=5)
    t = make_logits((4,), 9, torch.float64, seed=6)
    target = torch.tensor([1, -100, 8, 0]) if with_target else None

    def fn(student, teacher):
        return kdk.kd_loss(student, teacher, target, temperature=temperature, alpha=0.4, divergence=divergence,
                           reduction="none", backend="cpu", **DIVERGENCE_CASES[divergence])

    assert torch.autograd.gradcheck(fn, (s, t))


def _power_of_two_temperature_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows with masked entries, widely spread logits (squared exps that flush to 0) and a large
    offset, and targets including an ignored row."""
    s = make_logits((5,), 300, torch.float32, seed=11)
    t = make_logits((5,), 300, torch.float32, seed=12, requires_grad=False)
    with torch.no_grad():
        s[0, :40] = -math.inf
        s[1] *= 40
        s[2] += 1e4
        t[3, 5:9] = -math.inf
    return s, t, torch.tensor([50, 3, 7, 299, -100])


@pytest.mark.parametrize("temperature", [2.0, 4.0])
@pytest.mark.parametrize("divergence", ["forward_kl", "skew_kl"])
def test_ce_at_power_of_two_temperatures_matches_fp64(temperature, divergence):
    s, t, target = _power_of_two_temperature_case()
    assert_matches_reference(s, t, target, temperature=temperature, alpha=0.5, divergence=divergence,
                             reduction="none", **DIVERGENCE_CASES[divergence])


@pytest.mark.parametrize("temperature", [2.0, 4.0])
def test_ce_at_power_of_two_temperatures_matches_its_own_exps(temperature):
    """Forward KL without gradients keeps no exps and takes the CE term's own: the two losses agree
    to a few ulp."""
    s, t, target = _power_of_two_temperature_case()
    options = dict(temperature=temperature, alpha=0.5, reduction="none")
    with torch.no_grad():
        own_exps = kdk.kd_loss(s, t, target, **options)
    torch.testing.assert_close(kdk.kd_loss(s, t, target, **options).detach(), own_exps, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_entries_contribute_zero(divergence):
    """-inf entries (padded or masked vocabulary) in one or both inputs contribute 0."""
    s = make_logits((4,), 50, torch.float32, seed=7, requires_grad=False)
    t = make_logits((4,), 50, torch.float32, seed=8, requires_grad=False)
    s[:, 40:] = float("-inf")  # padded vocabulary in both
    t[:, 40:] = float("-inf")
    t[0, 3] = float("-inf")  # teacher-only mask
    s[1, 5] = float("-inf")  # student-only mask
    s.requires_grad_(True)
    t.requires_grad_(True)
    target = torch.tensor([0, 1, 2, -100])
    options = dict(divergence=divergence, temperature=2.0, **DIVERGENCE_CASES[divergence])
    assert_matches_reference(s, t, target, **options)
    loss = kdk.kd_loss(s, t, target, **options)
    grad_s, grad_t = torch.autograd.grad(loss, [s, t])
    assert torch.isfinite(loss)
    assert torch.all(grad_s[:, 40:] == 0) and torch.all(grad_t[:, 40:] == 0)
    # Padding with -inf does not change the value of the unpadded rows.
    unpadded = kdk.kd_loss(s[2:3, :40], t[2:3, :40], target[2:3], **options)
    assert unpadded.item() == pytest.approx(kdk.kd_loss(s[2:3], t[2:3], target[2:3], **options).item(), rel=1e-6)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_all_rows_ignored_gives_zero(reduction):
    s = make_logits((2, 3), 17, torch.float32, seed=9)
    t = make_logits((2, 3), 17, torch.float32, seed=10)
    target = torch.full((2, 3), -100)
    loss = kdk.kd_loss(s, t, target, reduction=reduction)
    assert torch.all(loss == 0)
    grad_s, grad_t = torch.autograd.grad(loss.sum(), [s, t])
    assert torch.all(grad_s == 0) and torch.all(grad_t == 0)


def test_custom_ignore_index():
    s = make_logits((5,), 13, torch.float32, seed=11)
    t = make_logits((5,), 13, torch.float32, seed=12)
    target = torch.tensor([0, -1, 4, -1, 12])
    assert_matches_reference(s, t, target, ignore_index=-1, temperature=2.0)


def test_num_items_gives_the_gradient_of_one_big_batch():
    s = make_logits((8,), 31, torch.float32, seed=13)
    t = make_logits((8,), 31, torch.float32, seed=14, requires_grad=False)
    target = make_target((8,), 31, ignored=True)
    kdk.kd_loss(s, t, target, temperature=2.0).backward()
    full_grad = s.grad.clone()
    s.grad = None
    num_items = int((target != -100).sum())
    for part in (slice(0, 3), slice(3, 8)):
        kdk.kd_loss(s[part], t[part], target[part], temperature=2.0, num_items=num_items).backward()
    torch.testing.assert_close(s.grad, full_grad)


def test_teacher_without_grad_and_inference():
    s = make_logits((3,), 20, torch.float32, seed=15)
    t = make_logits((3,), 20, torch.float32, seed=16, requires_grad=False)
    loss = kdk.kd_loss(s, t)
    (grad_s,) = torch.autograd.grad(loss, [s])
    assert grad_s.shape == s.shape
    with torch.no_grad():
        assert kdk.kd_loss(s, t).item() == pytest.approx(loss.item())


def test_module_matches_functional():
    s = make_logits((2, 4), 10, torch.float32, seed=17)
    t = make_logits((2, 4), 10, torch.float32, seed=18)
    target = make_target((2, 4), 10, ignored=True)
    options = dict(temperature=3.0, alpha=0.2, divergence="jsd", beta=0.6, reduction="sum")
    module = kdk.KDLoss(**options)
    assert module(s, t, target).item() == pytest.approx(kdk.kd_loss(s, t, target, **options).item())
    assert "jsd" in repr(module)


def test_compiled_extension_is_built():
    assert extension.compiled() is not None, extension.load_error
    assert kdk.available_backends("cpu")[0] == "cpu"
    assert "reference" in kdk.available_backends("cpu")


def test_reference_backend_matches_cpu():
    s = make_logits((4,), 33, torch.float32, seed=19)
    t = make_logits((4,), 33, torch.float32, seed=20)
    a = kdk.kd_loss(s, t, backend="reference", temperature=2.0)
    b = kdk.kd_loss(s, t, backend="cpu", temperature=2.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


# ---- bad input -------------------------------------------------------------------------------

def _valid():
    s = torch.randn(4, 10, requires_grad=True)
    return s, torch.randn(4, 10), torch.randint(0, 10, (4,))


@pytest.mark.parametrize("change, error, match", [
    (lambda s, t, y, kw: (s, t[:, :9], y, kw), ValueError, "shared_vocab"),
    (lambda s, t, y, kw: (s, t[:3], y, kw), ValueError, "teacher_logits shape"),
    (lambda s, t, y, kw: (s, t.double(), y, kw), TypeError, "teacher_logits dtype"),
    (lambda s, t, y, kw: (s, t.to("meta"), y, kw), ValueError, "teacher_logits is on"),
    (lambda s, t, y, kw: (s.long(), t, y, kw), TypeError, "student_logits must be"),
    (lambda s, t, y, kw: (s, t, y, {**kw, "temperature": 0.0}), ValueError, "temperature"),
    (lambda s, t, y, kw: (s, t, y, {**kw, "temperature": -1.0}), ValueError, "temperature"),
    (lambda s, t, y, kw: (s, t, y, {**kw, "temperature": float("nan")}), ValueError, "temperature"),
    (lambda s, t, y, kw: (s, t, y, {**kw, "alpha": 1.5}), ValueError, "alpha"),
    (lambda s, t, y, kw: (s, t, y, {**kw, "alpha": -0.1}), ValueError, "alpha"),
    (lambda s, t, y, kw: (s, t, y, {**kw, "divergence": "jsd", "beta": 0.0}), ValueError, "beta"),
    (lambda s, t, y, kw: (s, t, y, {**kw, "divergence": "jsd", "beta": 1.0}), ValueError, "beta"),
    (lambda s, t, y, kw: (s, t, y[:3], kw), ValueError, "target shape"),
    (lambda s, t, y, kw: (s, t, y.float(), kw), TypeError, "target must hold"),
    (lambda s, t, y, kw: (s, t, torch.tensor([0, 1, 10, 2]), kw), ValueError, r"target\[2\] = 10"),
    (lambda s, t, y, kw: (s, t, torch.tensor([0, 1, -5, 2]), kw), ValueError, r"target\[2\] = -5"),
    (lambda s, t, y, kw: (s, t, y, {**kw, "reduction": "mean"}), ValueError, "reduction"),
    (lambda s, t, y, kw: (s, t, y, {**kw, "divergence": "kl"}), ValueError, "divergence"),
    (lambda s, t, y, kw: (s, t, y, {**kw, "backend": "tpu"}), ValueError, "backend"),
    (lambda s, t, y, kw: (s, t, y, {**kw, "backend": "cuda"}), ValueError, "not available"),
    (lambda s, t, y, kw: (s, t, y, {**kw, "num_items": 0}), ValueError, "num_items"),
    (lambda s, t, y, kw: (s, t, y, {**kw, "num_items": 4, "reduction": "sum"}), ValueError, "num_items"),
])
def test_bad_input_is_a_clear_error(change, error, match):
    s, t, y, kwargs = change(*_valid(), {})
    with pytest.raises(error, match=match):
        kdk.kd_loss(s, t, y, **kwargs)


@pytest.mark.parametrize("which", ["student_logits", "teacher_logits"])
@pytest.mark.parametrize("value, match", [(float("nan"), "contains NaN or \\+inf"), (float("inf"), "contains NaN or \\+inf"),
                                          ("all -inf", "is all -inf")])
def test_non_finite_rows_are_errors(which, value, match):
    s, t, y = _valid()
    x = (s if which == "student_logits" else t).detach().clone()
    if value == "all -inf":
        x[2] = float("-inf")
    else:
        x[2, 3] = value
    args = (x, t) if which == "student_logits" else (s.detach(), x)
    with pytest.raises(ValueError, match=f"{which} row 2 {match}"):
        kdk.kd_loss(*args, y)


def test_target_on_masked_logit_is_an_error():
    s, t, y = _valid()
    s = s.detach().clone()
    s[1, y[1]] = float("-inf")
    with pytest.raises(ValueError, match=r"target\[1\].*-inf student logit"):
        kdk.kd_loss(s, t, y)


# ---- torch.library and torch.compile --------------------------------------------------------

@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_opcheck(divergence):
    s = make_logits((5,), 37, torch.float32, seed=21)
    t = make_logits((5,), 37, torch.float32, seed=22)
    target = torch.tensor([1, -100, 3, 36, 0])
    divergence_args = list(DIVERGENCE_CASES[divergence].values())
    for args in [
        (s, t, target, torch.tensor(0.25), 2.0, 0.0, False, 4.0 * 0.5, 0.5, divergence, divergence_args, -100, True,
         True, "cpu"),
        (s, t.detach(), None, None, 1.0, 3.0, False, 1.0, 0.0, divergence, divergence_args, -100, True, False, "cpu"),
        (s, t, None, None, 1.5, 0.0, True, 1.0, 0.0, divergence, divergence_args, -100, True, True, "cpu"),
    ]:
        torch.library.opcheck(torch.ops.kdkernels.kd_loss_rows.default, args)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_torch_compile_fullgraph(divergence):
    s = make_logits((2, 3), 64, torch.float32, seed=23)
    t = make_logits((2, 3), 64, torch.float32, seed=24)
    target = make_target((2, 3), 64, ignored=True)

    def step(student, teacher, labels):
        return kdk.kd_loss(student * 1.5, teacher, labels, temperature=2.0, divergence=divergence,
                           **DIVERGENCE_CASES[divergence])

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    results = []
    for fn in (compiled, step):
        loss = fn(s, t, target)
        results.append((loss, torch.autograd.grad(loss, [s, t])))
    (loss, grads), (ref_loss, ref_grads) = results
    torch.testing.assert_close(loss, ref_loss)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref)


def test_backward_three_times_with_retained_graph():
    s = make_logits((4,), 19, torch.float32, seed=25)
    t = make_logits((4,), 19, torch.float32, seed=26, requires_grad=False)
    loss = kdk.kd_loss(s, t, temperature=2.0)
    loss.backward(retain_graph=True)
    once = s.grad.clone()
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(s.grad, 3 * once)
    (again,) = torch.autograd.grad(kdk.kd_loss(s, t, temperature=2.0), [s])
    torch.testing.assert_close(again, once)


def test_scaled_backward_with_and_without_retained_graph():
    s = make_logits((4,), 19, torch.float32, seed=25)
    t = make_logits((4,), 19, torch.float32, seed=26)
    unit = torch.autograd.grad(kdk.kd_loss(s, t, temperature=2.0), [s, t])
    loss = kdk.kd_loss(s, t, temperature=2.0) * 0.5
    loss.backward(retain_graph=True)  # the graph keeps its saved gradients: scaled into new tensors
    loss.backward()  # the last backward owns them: scaled in place
    for leaf, grad in zip((s, t), unit):
        torch.testing.assert_close(leaf.grad, grad)


def test_fp16_gradients_survive_a_loss_scale():
    s = make_logits((4,), 64, torch.float16, seed=27)
    t = make_logits((4,), 64, torch.float16, seed=28, requires_grad=False)
    target = make_target((4,), 64, ignored=False)
    (kdk.kd_loss(s, t, target, temperature=2.0) * 65536).backward()
    exact = s.detach().double().requires_grad_(True)
    (reference.kd_loss(exact, t.double(), target, temperature=2.0) * 65536).backward()
    assert torch.isfinite(s.grad).all()
    torch.testing.assert_close(s.grad.double(), exact.grad, rtol=4e-3, atol=4e-3 * exact.grad.abs().max().item())


@pytest.mark.parametrize("num_items", [None, 3, torch.tensor(3)])
def test_fp64_reduction_weight_is_exact(num_items):
    s = make_logits((3,), 5, torch.float64, seed=29)
    t = make_logits((3,), 5, torch.float64, seed=30)
    ours = kdk.kd_loss(s, t, num_items=num_items)
    assert ours.item() == pytest.approx(reference.kd_loss(s, t, num_items=num_items).item(), rel=1e-13)


def test_double_backward_is_a_clear_error():
    s = make_logits((2,), 6, torch.float64, seed=31)
    t = make_logits((2,), 6, torch.float64, seed=32, requires_grad=False)
    with pytest.raises(NotImplementedError, match="create_graph"):
        torch.autograd.grad(kdk.kd_loss(s, t), [s], create_graph=True)


def test_int32_target_on_every_backend():
    s, t, y = _valid()
    values = [kdk.kd_loss(s, t, y.int(), backend=backend).item() for backend in ("cpu", "reference")]
    assert values[0] == pytest.approx(values[1], rel=1e-5)


def test_target_on_masked_logit_without_ce_term_is_fine():
    s, t, y = _valid()
    s = s.detach().clone()
    s[1, y[1]] = float("-inf")
    assert torch.isfinite(kdk.kd_loss(s, t, y, alpha=1.0))


@pytest.mark.parametrize("num_items", [torch.tensor([2, 3]), torch.tensor(2.0, requires_grad=True)])
def test_num_items_tensor_is_checked(num_items):
    s, t, y = _valid()
    with pytest.raises(ValueError, match="num_items"):
        kdk.kd_loss(s, t, y, num_items=num_items)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("offset", [300.0, 1e4])
def test_offset_between_student_and_teacher_costs_no_precision(divergence, offset):
    """A constant shift of the student logits leaves softmax unchanged; the row sums taken from
    the anchored statistics must not cancel catastrophically (the loss stays exact to fp32)."""
    t = make_logits((16,), 1000, torch.float32, seed=33, requires_grad=False)
    s = t + 0.1 * make_logits((16,), 1000, torch.float32, seed=34, requires_grad=False) + offset
    options = dict(divergence=divergence, reduction="none", temperature=2.0, **DIVERGENCE_CASES[divergence])
    loss = kdk.kd_loss(s, t, **options)
    exact = reference.kd_loss(s.double(), t.double(), **options)
    assert (loss >= 0).all()
    torch.testing.assert_close(loss.double(), exact, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("softcap", [None, 20.0])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "akl"])
@pytest.mark.parametrize("mask", [-1e4, -1e30, torch.finfo(torch.float32).min])
def test_first_entries_masked_by_a_large_finite_value(divergence, mask, softcap, backend):
    """Rows whose first entries hold a mask that is finite, not -inf (teacher, student, both):
    the anchors lie far below the rows' maxima, and the row sums must not come from the anchored
    statistics, which would cancel to inf or garbage. With softcap the masks map to -softcap,
    the fp32 minimum too (it is finite)."""
    if backend == "triton":
        pytest.importorskip("triton")
    t = make_logits((4,), 600, torch.float32, seed=35, requires_grad=False)
    s = make_logits((4,), 600, torch.float32, seed=36, requires_grad=False)
    t[0, :20] = mask
    s[1, :20] = mask
    t[2, :20] = mask
    s[2, :20] = mask
    s.requires_grad_(True)
    t.requires_grad_(True)
    options = dict(divergence=divergence, reduction="none", temperature=2.0, softcap=softcap)
    loss = kdk.kd_loss(s, t, backend=backend, **options)
    grads = torch.autograd.grad(loss.sum(), [s, t])
    s64, t64 = (x.detach().double().requires_grad_(True) for x in (s, t))
    exact = reference.kd_loss(s64, t64, **options)
    exact_grads = torch.autograd.grad(exact.sum(), [s64, t64])
    torch.testing.assert_close(loss.double(), exact.detach(), rtol=1e-5, atol=1e-5)
    for grad, exact_grad in zip(grads, exact_grads):
        torch.testing.assert_close(grad.double(), exact_grad, rtol=1e-4, atol=1e-5 * exact_grad.abs().max().item())

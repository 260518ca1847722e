"""topk_kd_loss on the CPU kernel: against the sparse-KD formulas written here in fp64, the
library's reference for every divergence and both tails, the dense kd_loss where the two must
agree, gradcheck, masked entries, a student tail far below fp32's resolution, torch.library and
torch.compile, and bad input. The Triton kernel's tests are in test_triton.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdkernels as kdk
from conftest import (DIVERGENCE_CASES, assert_topk_matches_reference, gradients_of, make_logits, make_target,
                      make_topk)


def _sparse_kd(student, ids, logprobs, target, temperature, alpha, tail):
    """Forward-KL sparse KD as it is usually written, row by row in fp64: the teacher's top-k
    re-tempered and renormalised (or with its rest as one bucket at T = 1), the student's
    full-vocabulary log-softmax gathered at the ids; T^2-scaled, mixed with CE, mean over rows."""
    rows = []
    for s, i, lp, y in zip(student.double(), ids, logprobs.double(), target.tolist()):
        log_q = F.log_softmax(s / temperature, -1)
        if tail == "renormalize":
            p = F.softmax(lp / temperature, -1)
            kl = (p * (p.log() - log_q[i])).sum()
        else:
            p, q = lp.exp(), log_q[i].exp()
            p_rest, q_rest = 1 - p.sum(), 1 - q.sum()
            kl = (p * (p / q).log()).sum() + p_rest * (p_rest / q_rest).log()
        rows.append(alpha * temperature**2 * kl + (1 - alpha) * F.cross_entropy(s, torch.tensor(y)))
    return torch.stack(rows).mean()


@pytest.mark.parametrize("tail, temperature", [("renormalize", 1.0), ("renormalize", 2.5), ("bucket", 1.0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_sparse_kd_formula(tail, temperature, dtype):
    s = make_logits((5,), 300, dtype, seed=1)
    ids, logprobs = make_topk((5,), 300, 16, dtype=torch.float64)
    y = make_target((5,), 300, ignored=False)
    loss, grad = gradients_of(kdk.topk_kd_loss, s, ids, logprobs, y, tail=tail, temperature=temperature, alpha=0.7)
    expected, expected_grad = gradients_of(_sparse_kd, s.double(), ids, logprobs, y, temperature, 0.7, tail)
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(loss.double(), expected, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=tolerance, atol=tolerance * expected_grad.abs().max())


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("divergence", list(DIVERGENCE_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_reference(divergence, tail, dtype):
    s = make_logits((2, 3), 700, dtype, seed=3, contiguous=False)
    ids, logprobs = make_topk((2, 3), 700, 20, dtype=torch.bfloat16)
    y = make_target((2, 3), 700, ignored=True)
    assert_topk_matches_reference(s, ids, logprobs, y, "cpu", tail=tail, divergence=divergence, temperature=2.0,
                                  alpha=0.4, **DIVERGENCE_CASES[divergence])


@pytest.mark.parametrize("vocab, k", [(1, 1), (7, 7), (7, 1), (300, 299), (1500, 64)])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_awkward_shapes_and_reductions(vocab, k, reduction, tail):
    s = make_logits((4,), vocab, torch.float32, seed=4)
    ids, logprobs = make_topk((4,), vocab, k, dtype=torch.float16, index_dtype=torch.int32)
    y = make_target((4,), vocab, ignored=True)
    assert_topk_matches_reference(s, ids, logprobs, y, "cpu", tail=tail, reduction=reduction, temperature=1.5)
    assert_topk_matches_reference(s, ids, logprobs, None, "cpu", tail=tail, reduction=reduction,
                                  divergence="jsd", beta=0.3)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd", "ab"])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_renormalize_is_kd_loss_on_the_masked_teacher(divergence, temperature):
    """With the rest dropped, the loss is kd_loss against the teacher's logprobs with -inf
    everywhere outside its top k (the dense kernel's rule for masked entries)."""
    s = make_logits((6,), 500, torch.float64, seed=5)
    ids, logprobs = make_topk((6,), 500, 32, dtype=torch.float64)
    dense = torch.full((6, 500), float("-inf"), dtype=torch.float64).scatter(-1, ids, logprobs)
    y = make_target((6,), 500, ignored=True)
    kwargs = dict(divergence=divergence, temperature=temperature, **DIVERGENCE_CASES[divergence])
    loss, grad = gradients_of(kdk.topk_kd_loss, s, ids, logprobs, y, **kwargs)
    expected, expected_grad = gradients_of(kdk.kd_loss, s, dense, y, **kwargs)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tail, temperature", [("renormalize", 2.0), ("bucket", 1.0)])
def test_all_ids_is_kd_loss(tail, temperature):
    """k = V: no rest, and the loss is kd_loss against the teacher's full log-softmax. (With the
    bucket at T != 1, the rounding left in 1 - sum p would be re-tempered into a visible rest.)"""
    s = make_logits((4,), 50, torch.float64, seed=6)
    ids, logprobs = make_topk((4,), 50, 50, dtype=torch.float64)
    dense = torch.empty(4, 50, dtype=torch.float64).scatter(-1, ids, logprobs)
    kwargs = dict(divergence="skew_kl", temperature=temperature)
    loss, grad = gradients_of(kdk.topk_kd_loss, s, ids, logprobs, tail=tail, **kwargs)
    expected, expected_grad = gradients_of(kdk.kd_loss, s, dense, **kwargs)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "ab"])
def test_gradcheck_fp64(divergence, tail):
    s = make_logits((3,), 9, torch.float64, seed=7)
    ids, logprobs = make_topk((3,), 9, 4, dtype=torch.float64)
    y = torch.tensor([1, -100, 8])
    kwargs = dict(tail=tail, divergence=divergence, temperature=2.0, **DIVERGENCE_CASES[divergence])
    assert torch.autograd.gradcheck(lambda x: kdk.topk_kd_loss(x, ids, logprobs, y, backend="cpu", **kwargs), (s,))


def test_masked_entries():
    """-inf student entries (a masked vocabulary) outside the ids, -inf teacher logprobs."""
    s = make_logits((4,), 200, torch.float32, seed=8, requires_grad=False)
    s[:, 150:] = float("-inf")
    ids, logprobs = make_topk((4,), 150, 10)
    logprobs[0, 3] = float("-inf")
    for tail in ("renormalize", "bucket"):
        for divergence in ("forward_kl", "skew_reverse_kl", "akl"):
            assert_topk_matches_reference(s, ids, logprobs, None, "cpu", tail=tail, divergence=divergence,
                                          **DIVERGENCE_CASES[divergence])


def test_rest_far_below_fp32_resolution():
    """A student whose mass outside the ids is about 1e-40 of the total: the rest's log-mass comes
    from its own log-sum-exp, so the bucket term is exact where 1 - sum q would be 0."""
    s = torch.zeros(2, 1000)
    s[:, :4] = 100.0
    ids = torch.arange(4).expand(2, 4)
    logprobs = torch.tensor([-1.5, -1.5, -1.6, -1.7]).expand(2, 4)
    loss, grad = gradients_of(kdk.topk_kd_loss, s, ids, logprobs, tail="bucket")
    exact, exact_grad = gradients_of(kdk.reference.topk_kd_loss, s.double(), ids, logprobs.double(), tail="bucket")
    assert torch.isfinite(loss).all() and loss.item() > 10
    torch.testing.assert_close(loss.double(), exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), exact_grad, rtol=1e-5, atol=1e-6)


def test_num_items_gives_the_gradient_of_one_big_batch():
    s = make_logits((8,), 100, torch.float32, seed=9)
    ids, logprobs = make_topk((8,), 100, 8)
    y = make_target((8,), 100, ignored=True)
    counted = int((y != -100).sum())
    whole, whole_grad = gradients_of(kdk.topk_kd_loss, s, ids, logprobs, y)
    parts = [gradients_of(kdk.topk_kd_loss, s[half], ids[half], logprobs[half], y[half], num_items=counted)
             for half in (slice(0, 4), slice(4, 8))]
    torch.testing.assert_close(parts[0][0] + parts[1][0], whole)
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]), whole_grad)


def test_ignored_rows_are_not_checked_and_module_matches():
    s = make_logits((3,), 20, torch.float32, seed=10)
    ids, logprobs = make_topk((3,), 20, 4)
    ids[1] = 0  # a padding row of the store: repeated ids, ignored by its target
    y = torch.tensor([3, -100, 5])
    loss = kdk.topk_kd_loss(s, ids, logprobs, y, backend="cpu")
    keep = torch.tensor([0, 2])
    torch.testing.assert_close(loss, kdk.topk_kd_loss(s[keep], ids[keep], logprobs[keep], y[keep]))
    module = kdk.TopKKDLoss(tail="bucket", temperature=2.0)
    torch.testing.assert_close(module(s, ids, logprobs, y),
                               kdk.topk_kd_loss(s, ids, logprobs, y, tail="bucket", temperature=2.0))


def test_opcheck_and_compile():
    s = make_logits((5,), 30, torch.float32, seed=11)
    ids, logprobs = make_topk((5,), 30, 6)
    y = torch.tensor([1, -100, 3, 29, 0])
    for bucket in (False, True):
        torch.library.opcheck(torch.ops.kdkernels.topk_kd_loss_rows.default,
                              (s, ids, logprobs, y, torch.tensor(0.25), 2.0, 0.5, 0.5, "jsd", [0.5], bucket, -100,
                               True, "cpu"))
    compiled = torch.compile(lambda a: kdk.topk_kd_loss(a * 1.0, ids, logprobs, y, tail="bucket"), fullgraph=True)
    torch.testing.assert_close(compiled(s), kdk.topk_kd_loss(s, ids, logprobs, y, tail="bucket"))


def _with_row_value(x: torch.Tensor, value: float) -> torch.Tensor:
    x = x.detach().clone()
    x[2, 1] = value
    return x


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("change, error, match", [
    (lambda s, i, l, y: (s, i.clone().fill_(3), l, y, {}), ValueError, "teacher_topk_indices row 0 holds an id twice"),
    (lambda s, i, l, y: (s, i + 30, l, y, {}), ValueError, r"outside \[0, 30\)"),
    (lambda s, i, l, y: (s, i, _with_row_value(l, float("nan")), y, {}), ValueError,
     "teacher_topk_logprobs row 2 contains NaN"),
    (lambda s, i, l, y: (_with_row_value(s, float("inf")), i, l, y, {}), ValueError, "student_logits row 2 contains"),
    (lambda s, i, l, y: (s, i[:, :3], l, y, {}), ValueError, "teacher_topk_logprobs shape"),
    (lambda s, i, l, y: (s, i[:2], l[:2], y, {}), ValueError, "teacher_topk_indices must have shape"),
    (lambda s, i, l, y: (s, i.float(), l, y, {}), TypeError, "int64"),
    (lambda s, i, l, y: (s, i, l.requires_grad_(), y, {}), ValueError, "teacher_topk_logprobs.detach"),
    (lambda s, i, l, y: (s, i, l, y, {"tail": "drop"}), ValueError, "tail must be one of"),
    (lambda s, i, l, y: (s, i, l, y, {"temperature": -1.0}), ValueError, "temperature"),
    (lambda s, i, l, y: (s, i, l, torch.tensor([0, 1, 30, 2]), {}), ValueError, r"target\[2\] = 30"),
])
def test_bad_input_is_a_clear_error(backend, change, error, match):
    if backend == "reference" and "row 2 contains" in match:
        pytest.skip("the reference computes with the values it is given")
    s = make_logits((4,), 30, torch.float32, seed=12)
    ids, logprobs = make_topk((4,), 30, 5)
    s, ids, logprobs, y, kwargs = change(s, ids, logprobs, torch.tensor([0, 1, 2, 3]))
    if backend == "reference" and "target" in match:
        pytest.skip("the reference takes the target as F.cross_entropy does")
    with pytest.raises(error, match=match):
        kdk.topk_kd_loss(s, ids, logprobs, y, backend=backend, **kwargs)


# ---- fused_linear_topk_kd_loss ---------------------------------------------------------------

def _head(dtype: torch.dtype, vocab: int = 300, hidden: int = 24, seed: int = 13):
    generator = torch.Generator().manual_seed(seed)
    h = (torch.randn(2, 7, hidden, generator=generator)).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden, generator=generator) / hidden**0.5).to(dtype).requires_grad_()
    bias = torch.randn(vocab, generator=generator).to(dtype).requires_grad_()
    return h, weight, bias


@pytest.mark.parametrize("chunk_size", [None, 1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_fused_linear_matches_topk_on_the_logits(tail, dtype, chunk_size):
    h, weight, bias = _head(dtype)
    ids, logprobs = make_topk((2, 7), 300, 12, dtype=torch.float16)
    y = make_target((2, 7), 300, ignored=True)
    kwargs = dict(tail=tail, divergence="jsd", beta=0.3, temperature=2.0, alpha=0.6)
    loss = kdk.fused_linear_topk_kd_loss(h, weight, ids, logprobs, y, student_bias=bias, chunk_size=chunk_size,
                                         **kwargs)
    grads = torch.autograd.grad(loss, [h, weight, bias])
    exact_inputs = [x.detach().double().requires_grad_() for x in (h, weight, bias)]
    exact = kdk.reference.topk_kd_loss(torch.nn.functional.linear(*exact_inputs), ids, logprobs.double(), y, **kwargs)
    exact_grads = torch.autograd.grad(exact, exact_inputs)
    # bf16 logits are rounded before the kernel sees them, as a bf16 head would round them.
    tolerance = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(loss.double(), exact.detach(), rtol=tolerance, atol=tolerance)
    for grad, exact_grad, x in zip(grads, exact_grads, (h, weight, bias)):
        assert grad.dtype == x.dtype and grad.shape == x.shape
        torch.testing.assert_close(grad.double(), exact_grad, rtol=tolerance,
                                   atol=tolerance * exact_grad.abs().max().item())


def test_fused_linear_gradcheck_opcheck_and_module():
    h, weight, bias = (x.detach().double().requires_grad_() for x in _head(torch.float32, vocab=11, hidden=3))
    ids, logprobs = make_topk((2, 7), 11, 4, dtype=torch.float64)
    y = make_target((2, 7), 11, ignored=True)
    assert torch.autograd.gradcheck(
        lambda a, w, b: kdk.fused_linear_topk_kd_loss(a, w, ids, logprobs, y, student_bias=b, chunk_size=4,
                                                      tail="bucket", temperature=1.5), (h, weight, bias))
    torch.library.opcheck(torch.ops.kdkernels.fused_linear_topk_kd_loss.default,
                          (h.reshape(14, 3), weight, bias, ids.reshape(14, 4), logprobs.reshape(14, 4),
                           y.reshape(14), torch.tensor(0.1, dtype=torch.float64), 1.0, 0.5, 0.5, "forward_kl", [],
                           True, -100, 4, True, "cpu"))
    module = kdk.FusedLinearTopKKDLoss(tail="bucket", chunk_size=4)
    torch.testing.assert_close(module(h, weight, ids, logprobs, y, student_bias=bias),
                               kdk.fused_linear_topk_kd_loss(h, weight, ids, logprobs, y, student_bias=bias,
                                                             tail="bucket", chunk_size=4))
    with pytest.raises(ValueError, match="reduction='batchmean' or 'sum'"):
        kdk.fused_linear_topk_kd_loss(h, weight, ids, logprobs, reduction="none")
    with pytest.raises(ValueError, match=r"student_weight must be \[V, H\] with H = 3"):
        kdk.fused_linear_topk_kd_loss(h, weight.T, ids, logprobs)
    with pytest.raises(ValueError, match="teacher_topk_indices row 0 holds an id twice"):
        kdk.fused_linear_topk_kd_loss(h, weight, ids.clone().fill_(1), logprobs)

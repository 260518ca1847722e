"""The Triton kernel against kdkernels.reference. On a machine without a GPU it runs on CPU
tensors under Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py before anything imports
triton); with CUDA it runs on the GPU."""

import pytest
import torch

CUDA = torch.cuda.is_available()
pytest.importorskip("triton")

import kdkernels as kdk  # noqa: E402
from kdkernels import reference  # noqa: E402
from conftest import (DIVERGENCE_CASES, assert_matches_reference, assert_topk_matches_reference, make_logits,  # noqa: E402
                      make_target, make_topk)

DEVICE = "cuda" if CUDA else "cpu"


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("vocab", [1, 7, 1500])
@pytest.mark.parametrize("target_mode", ["none", "target", "ignored"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_triton_matches_reference(divergence, reduction, dtype, target_mode, vocab, temperature):
    student = make_logits((4,), vocab, dtype, seed=1, device=DEVICE)
    teacher = make_logits((4,), vocab, dtype, seed=2, device=DEVICE)
    target = None if target_mode == "none" else make_target((4,), vocab, ignored=target_mode == "ignored", device=DEVICE)
    assert_matches_reference(student, teacher, target, backend="triton", divergence=divergence, reduction=reduction,
                             temperature=temperature, alpha=0.3, beta=0.3)


@pytest.mark.parametrize("vocab", [1, 7, 1500])
@pytest.mark.parametrize("target_mode", ["none", "ignored"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("divergence", ["skew_kl", "skew_reverse_kl", "tvd", "ab", "akl"])
def test_triton_divergence_family(divergence, dtype, target_mode, vocab):
    student = make_logits((2, 3), vocab, dtype, seed=1, device=DEVICE)
    teacher = make_logits((2, 3), vocab, dtype, seed=2, device=DEVICE)
    target = None if target_mode == "none" else make_target((2, 3), vocab, ignored=True, device=DEVICE)
    assert_matches_reference(student, teacher, target, backend="triton", divergence=divergence, temperature=4.0,
                             alpha=0.3, **DIVERGENCE_CASES[divergence])


@pytest.mark.parametrize("shape", ["ties", "peaked", "offset_logits"])
@pytest.mark.parametrize("mu", [1e-6, 0.3, 0.999])
def test_triton_adaptive_kl_head_search(shape, mu):
    """The Triton head search (few buckets, more passes than the C++ one) on rows with tie
    groups, one dominant logit and logits near 1e5."""
    t = make_logits((3,), 3000, torch.float32, seed=5, requires_grad=False, device=DEVICE)
    if shape == "ties":
        t = t.round()
    elif shape == "peaked":
        t[:, 11] = 60.0
    else:
        t = t + 1e5  # logits so large that the first bucket range widens
    s = make_logits((3,), 3000, torch.float32, seed=6, device=DEVICE)
    assert_matches_reference(s, t.requires_grad_(True), None, backend="triton", divergence="akl", akl_mu=mu,
                             temperature=1.5)


@pytest.mark.parametrize("divergence", list(DIVERGENCE_CASES))
def test_triton_strided_3d_masked(divergence):
    student = make_logits((2, 3), 700, torch.float32, contiguous=False, seed=3, requires_grad=False, device=DEVICE)
    teacher = make_logits((2, 3), 700, torch.float32, contiguous=False, seed=4, requires_grad=False, device=DEVICE)
    student[..., 600:] = float("-inf")
    teacher[..., 600:] = float("-inf")
    teacher[0, 0, 5] = float("-inf")
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    target = make_target((2, 3), 600, ignored=True, device=DEVICE)
    assert_matches_reference(student, teacher, target, backend="triton", divergence=divergence, temperature=2.0,
                             **DIVERGENCE_CASES[divergence])


def test_triton_errors_and_ignored_rows():
    student = make_logits((3,), 9, torch.float32, seed=5, device=DEVICE)
    teacher = make_logits((3,), 9, torch.float32, seed=6, device=DEVICE)
    with pytest.raises(ValueError, match=r"target\[1\] = 9"):
        kdk.kd_loss(student, teacher, torch.tensor([0, 9, 1], device=DEVICE), backend="triton")
    bad = teacher.detach().clone()
    bad[2, 4] = float("nan")
    with pytest.raises(ValueError, match="teacher_logits row 2 contains NaN"):
        kdk.kd_loss(student, bad, backend="triton")
    # Ignored rows may hold anything, even all -inf.
    masked = student.detach().clone()
    masked[1] = float("-inf")
    loss = kdk.kd_loss(masked, teacher, torch.tensor([0, -100, 1], device=DEVICE), backend="triton")
    assert torch.isfinite(loss)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_triton_offset_logits(divergence):
    t = make_logits((8,), 1000, torch.float32, seed=7, requires_grad=False, device=DEVICE)
    s = t + 0.1 * make_logits((8,), 1000, torch.float32, seed=8, requires_grad=False, device=DEVICE) + 1e4
    loss = kdk.kd_loss(s, t, backend="triton", divergence=divergence, reduction="none", temperature=2.0)
    exact = reference.kd_loss(s.double(), t.double(), divergence=divergence, reduction="none", temperature=2.0)
    torch.testing.assert_close(loss.double(), exact, rtol=1e-4, atol=2e-6)


def test_triton_target_on_masked_logit_without_ce_term():
    student = make_logits((3,), 9, torch.float32, seed=9, requires_grad=False, device=DEVICE)
    teacher = make_logits((3,), 9, torch.float32, seed=10, device=DEVICE)
    target = torch.tensor([0, 4, 1], device=DEVICE)
    student[1, 4] = float("-inf")
    assert torch.isfinite(kdk.kd_loss(student, teacher, target, alpha=1.0, backend="triton"))


def test_triton_inside_fused_linear():
    generator = torch.Generator().manual_seed(12)
    h_s, h_t = (torch.randn(10, 16, generator=generator).to(DEVICE).requires_grad_() for _ in range(2))
    w_s, w_t = (torch.randn(300, 16, generator=generator).mul(0.3).to(DEVICE).requires_grad_() for _ in range(2))
    target = torch.randint(0, 300, (10,), generator=generator).to(DEVICE)
    results = []
    for backend in ("triton", "reference"):
        loss = kdk.fused_linear_kd_loss(h_s, w_s, h_t, w_t, target, chunk_size=4, temperature=2.0, backend=backend)
        results.append((loss, torch.autograd.grad(loss, [h_s, w_s, h_t, w_t])))
    (loss, grads), (expected, expected_grads) = results
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("vocab", [2, 100, 1500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_dkd(vocab, dtype):
    student = make_logits((2, 3), vocab, dtype, seed=13, device=DEVICE)
    teacher = make_logits((2, 3), vocab, dtype, seed=14, requires_grad=False, device=DEVICE)
    target = make_target((2, 3), vocab, ignored=True, device=DEVICE)
    loss = kdk.dkd_loss(student, teacher, target, alpha=0.7, beta=2.0, temperature=3.0, backend="triton")
    (grad,) = torch.autograd.grad(loss, [student])
    exact_student = student.detach().double().requires_grad_()
    expected = reference.dkd_loss(exact_student, teacher.double(), target, alpha=0.7, beta=2.0, temperature=3.0)
    (expected_grad,) = torch.autograd.grad(expected, [exact_student])
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=5e-5, atol=5e-5)
    tolerance = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(grad.double(), expected_grad, rtol=tolerance, atol=tolerance * expected_grad.abs().max())
    with pytest.raises(ValueError, match="teacher_logits row 1 contains"):
        bad = teacher.clone()
        bad[0, 1, 0] = float("nan")
        kdk.dkd_loss(student, bad, target.clamp(min=0), backend="triton")


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "akl"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_triton_standardize(divergence, dtype):
    """standardize=True: the row statistics read, the row sums read (also for forward KL) and the
    gradient through the mean and std, with a constant row and masked entries."""
    student = make_logits((2, 3), 700, dtype, seed=19, requires_grad=False, device=DEVICE)
    teacher = make_logits((2, 3), 700, dtype, seed=20, scale=5.0, requires_grad=False, device=DEVICE)
    student[0, 0] = 1.0
    teacher[1, 2, 600:] = float("-inf")
    target = make_target((2, 3), 700, ignored=True, device=DEVICE)
    assert_matches_reference(student.requires_grad_(True), teacher.requires_grad_(True), target, backend="triton",
                             divergence=divergence, temperature=2.0, standardize=True, alpha=0.6,
                             **DIVERGENCE_CASES[divergence])


@pytest.mark.parametrize("shape", [(2, 1), (37, 10), (5, 300), (40, 1000)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_triton_dist(shape, dtype):
    """DIST's three Triton kernels (row pass, column pass, gradient) against the reference in fp64,
    with a -inf entry and a partial last block of rows."""
    student = make_logits(shape[:1], shape[1], dtype, seed=17, requires_grad=False, device=DEVICE)
    teacher = make_logits(shape[:1], shape[1], dtype, seed=18, requires_grad=False, device=DEVICE)
    if shape[1] > 1:
        teacher[-1, 0] = float("-inf")
    student.requires_grad_(True)
    loss = kdk.dist_loss(student, teacher, beta=1.5, gamma=0.7, temperature=2.0, backend="triton")
    (grad,) = torch.autograd.grad(loss, [student])
    exact_student = student.detach().double().requires_grad_()
    expected = reference.dist_loss(exact_student, teacher.double(), beta=1.5, gamma=0.7, temperature=2.0)
    (expected_grad,) = torch.autograd.grad(expected, [exact_student])
    tolerance = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=max(tolerance, 5e-5) if dtype != torch.float64
                               else tolerance, atol=1e-5 if dtype != torch.float64 else tolerance)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=tolerance,
                               atol=tolerance * max(expected_grad.abs().max().item(), 1e-3))


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_triton_softcap(divergence):
    student = make_logits((5,), 700, torch.float32, seed=15, scale=6.0, device=DEVICE)
    teacher = make_logits((5,), 700, torch.float32, seed=16, scale=6.0, device=DEVICE)
    target = make_target((5,), 700, ignored=True, device=DEVICE)
    assert_matches_reference(student, teacher, target, backend="triton", divergence=divergence, temperature=2.0,
                             softcap=4.0, logit_scale=1.5, **DIVERGENCE_CASES[divergence])


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("divergence", list(DIVERGENCE_CASES))
def test_triton_topk(divergence, tail):
    """Top-k KD: ids in a shuffled order with a masked logprob, a masked student entry outside
    them, ignored rows, CE at T != 1."""
    student = make_logits((2, 3), 1500, torch.float32, seed=19, requires_grad=False, device=DEVICE)
    student[0, 0, 1400:] = float("-inf")
    ids, logprobs = make_topk((2, 3), 1400, 24, dtype=torch.bfloat16, device=DEVICE)
    logprobs[1, 2, 5] = float("-inf")
    target = make_target((2, 3), 1400, ignored=True, device=DEVICE)
    assert_topk_matches_reference(student, ids, logprobs, target, "triton", tail=tail, divergence=divergence,
                                  temperature=2.0, alpha=0.4, **DIVERGENCE_CASES[divergence])


@pytest.mark.parametrize("vocab, k", [(1, 1), (7, 7), (300, 1), (2100, 300)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_triton_topk_shapes(vocab, k, dtype):
    """V = 1, k = V, k = 1, and k spread over several blocks with T = 1 (CE from the same statistics)."""
    student = make_logits((4,), vocab, dtype, seed=20, device=DEVICE)
    ids, logprobs = make_topk((4,), vocab, k, device=DEVICE, index_dtype=torch.int32)
    target = make_target((4,), vocab, ignored=True, device=DEVICE)
    for tail in ("renormalize", "bucket"):
        assert_topk_matches_reference(student, ids, logprobs, target, "triton", tail=tail, divergence="jsd", beta=0.3)


def test_triton_topk_errors_and_ignored_rows():
    student = make_logits((4,), 30, torch.float32, seed=21, device=DEVICE)
    ids, logprobs = make_topk((4,), 30, 5, device=DEVICE)
    target = torch.tensor([0, -100, 2, 3], device=DEVICE)
    ids[1] = 0  # an ignored row is not checked
    counted = torch.tensor([0, 2, 3], device=DEVICE)
    torch.testing.assert_close(kdk.topk_kd_loss(student, ids, logprobs, target, backend="triton"),
                               kdk.topk_kd_loss(student[counted], ids[counted], logprobs[counted], target[counted],
                                                backend="triton"))
    ids[2, 1] = ids[2, 0]
    with pytest.raises(ValueError, match="teacher_topk_indices row 2 holds an id twice"):
        kdk.topk_kd_loss(student, ids, logprobs, target, backend="triton")
    ids[2, 1] = 30
    with pytest.raises(ValueError, match=r"row 2 holds an id outside \[0, 30\)"):
        kdk.topk_kd_loss(student, ids, logprobs, target, backend="triton")
    with pytest.raises(ValueError, match="k <= 2047"):
        kdk.topk_kd_loss(make_logits((1,), 3000, torch.float32, device=DEVICE),
                         *make_topk((1,), 3000, 2048, device=DEVICE), backend="triton")


def test_triton_fused_linear_topk():
    generator = torch.Generator().manual_seed(22)
    hidden = torch.randn(9, 16, generator=generator).to(DEVICE).requires_grad_()
    weight = (torch.randn(700, 16, generator=generator) / 4).to(DEVICE).requires_grad_()
    ids, logprobs = make_topk((9,), 700, 32, device=DEVICE)
    target = make_target((9,), 700, ignored=True, device=DEVICE)
    kwargs = dict(tail="bucket", divergence="skew_kl", temperature=2.0)
    loss = kdk.fused_linear_topk_kd_loss(hidden, weight, ids, logprobs, target, chunk_size=4, backend="triton",
                                         **kwargs)
    grads = torch.autograd.grad(loss, [hidden, weight])
    expected = kdk.fused_linear_topk_kd_loss(hidden, weight, ids, logprobs, target, backend="reference", **kwargs)
    expected_grads = torch.autograd.grad(expected, [hidden, weight])
    torch.testing.assert_close(loss, expected, rtol=5e-5, atol=5e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=2e-5, atol=2e-5 * expected_grad.abs().max().item())

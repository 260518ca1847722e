"""GPU-only checks (skipped without CUDA): both GPU backends on LLM vocabularies, N * V > 2^31,
backend="auto", and torch.compile(fullgraph=True); the Triton top-k, relation and feature kernels likewise."""

import pytest
import torch

import kdkernels as kdk
from kdkernels import reference
from conftest import assert_matches_reference, assert_topk_matches_reference, make_logits, make_target, make_topk

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GPU_BACKENDS = [b for b in ("triton", "cuda") if torch.cuda.is_available() and b in kdk.available_backends("cuda")]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("vocab", [32000, 128256, 151936, 256000])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_llm_vocabularies(backend, vocab, divergence, dtype):
    student = make_logits((24,), vocab, dtype, seed=1, device="cuda")
    teacher = make_logits((24,), vocab, dtype, seed=2, device="cuda")
    target = make_target((24,), vocab, ignored=True, device="cuda")
    assert_matches_reference(student, teacher, target, backend=backend, divergence=divergence, temperature=2.0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_more_than_2_31_elements(backend):
    rows, vocab = 16384, 151936  # N * V = 2.49e9 > 2^31
    generator = torch.Generator(device="cuda").manual_seed(0)
    student = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16, generator=generator).requires_grad_(True)
    teacher = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16, generator=generator)
    target = torch.randint(0, vocab, (rows,), device="cuda", generator=generator)
    loss = kdk.kd_loss(student, teacher, target, temperature=2.0, reduction="none", backend=backend)
    (grad,) = torch.autograd.grad(loss.sum(), [student])
    for rows_checked in (slice(0, 4), slice(rows - 4, rows)):  # the last rows lie past 2^31 elements
        s = student.detach()[rows_checked].double().requires_grad_(True)
        ref = reference.kd_loss(s, teacher[rows_checked].double(), target[rows_checked], temperature=2.0,
                                reduction="none")
        (ref_grad,) = torch.autograd.grad(ref.sum(), [s])
        torch.testing.assert_close(loss[rows_checked].double(), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grad[rows_checked].double(), ref_grad, rtol=2e-2, atol=2e-2 * ref_grad.abs().max().item())


def test_auto_picks_a_gpu_backend():
    assert kdk.available_backends("cuda")[0] in ("cuda", "triton")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_torch_compile_fullgraph_cuda(backend):
    s = make_logits((2, 8), 4096, torch.bfloat16, seed=3, device="cuda")
    t = make_logits((2, 8), 4096, torch.bfloat16, seed=4, device="cuda")
    y = make_target((2, 8), 4096, ignored=True, device="cuda")

    def step(student, teacher, labels):
        return kdk.kd_loss(student * 1.5, teacher, labels, temperature=2.0, backend=backend)

    compiled = torch.compile(step, fullgraph=True)
    loss, ref = compiled(s, t, y), step(s, t, y)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(torch.autograd.grad(loss, [s])[0], torch.autograd.grad(ref, [s])[0])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_matches_reference_small(backend):
    s = make_logits((3, 5), 1000, torch.float16, contiguous=False, seed=5, device="cuda")
    t = make_logits((3, 5), 1000, torch.float16, contiguous=False, seed=6, device="cuda")
    y = make_target((3, 5), 1000, ignored=True, device="cuda")
    assert_matches_reference(s, t, y, backend=backend, divergence="jsd", temperature=4.0, reduction="none")


@pytest.mark.parametrize("vocab, k", [(128256, 64), (151936, 1024), (256000, 8)])
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_topk_llm_vocabularies(vocab, k, tail):
    student = make_logits((16,), vocab, torch.bfloat16, seed=7, device="cuda")
    ids, logprobs = make_topk((16,), vocab, k, dtype=torch.float16, device="cuda")
    target = make_target((16,), vocab, ignored=True, device="cuda")
    assert_topk_matches_reference(student, ids, logprobs, target, "triton", tail=tail, temperature=2.0)


def test_topk_more_than_2_31_elements():
    rows, vocab, k = 16384, 151936, 64
    generator = torch.Generator(device="cuda").manual_seed(0)
    student = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16, generator=generator).requires_grad_(True)
    ids = torch.stack([torch.randperm(vocab, device="cuda", generator=generator)[:k] for _ in range(8)]).repeat(
        rows // 8, 1)
    logprobs = torch.randn(rows, k, device="cuda", generator=generator).log_softmax(-1) - 0.1
    loss = kdk.topk_kd_loss(student, ids, logprobs, tail="bucket", reduction="none", backend="triton")
    (grad,) = torch.autograd.grad(loss.sum(), [student])
    for rows_checked in (slice(0, 4), slice(rows - 4, rows)):  # the last rows lie past 2^31 elements
        s = student.detach()[rows_checked].double().requires_grad_(True)
        ref = reference.topk_kd_loss(s, ids[rows_checked], logprobs[rows_checked].double(), tail="bucket",
                                     reduction="none")
        (ref_grad,) = torch.autograd.grad(ref.sum(), [s])
        torch.testing.assert_close(loss[rows_checked].double(), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grad[rows_checked].double(), ref_grad, rtol=2e-2,
                                   atol=2e-2 * ref_grad.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("name", ["rkd_distance", "rkd_angle", "similarity_preserving", "pkt"])
def test_relation_losses_cuda(name, dtype):
    """The Triton relation kernels at the benchmark's shape, against the reference in fp64 (the
    angle reference at N = 128 only: it needs [N, N, D] differences)."""
    rows = 128 if name == "rkd_angle" else 512
    generator = torch.Generator(device="cuda").manual_seed(0)
    student = torch.randn(rows, 2048, device="cuda", generator=generator).to(dtype).requires_grad_(True)
    teacher = torch.randn(rows, 1024, device="cuda", generator=generator).to(dtype)
    loss = getattr(kdk, f"{name}_loss")(student, teacher, backend="triton")
    (grad,) = torch.autograd.grad(loss, [student])
    s64 = student.detach().double().requires_grad_(True)
    expected = getattr(reference, f"{name}_loss")(s64, teacher.double())
    (expected_grad,) = torch.autograd.grad(expected, [s64])
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-4, atol=1e-6)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(grad.double(), expected_grad, rtol=tolerance, atol=tolerance * expected_grad.abs().max())


def test_relation_matrices_and_features_cuda():
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1000, 777, device="cuda", generator=generator)
    torch.testing.assert_close(kdk.pairwise_distance(x, backend="triton"), reference.pairwise_distance(x.double()).float(),
                               rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(kdk.gram(x.bfloat16(), normalize="cosine", backend="triton").float(),
                               reference.gram(x.bfloat16().double(), normalize="cosine").float(), rtol=1e-2, atol=1e-2)
    maps = torch.randn(32, 256, 28, 28, device="cuda", generator=generator).bfloat16().requires_grad_(True)
    teacher = torch.randn(32, 512, 28, 28, device="cuda", generator=generator).bfloat16()
    loss = kdk.attention_transfer_loss(maps, teacher, backend="triton") + kdk.hint_loss(maps, teacher[:, :256],
                                                                                       backend="triton")
    (grad,) = torch.autograd.grad(loss, [maps])
    m64 = maps.detach().double().requires_grad_(True)
    expected = (reference.attention_transfer_loss([m64], [teacher.double()])
                + reference.hint_loss(m64, teacher[:, :256].double()))
    (expected_grad,) = torch.autograd.grad(expected, [m64])
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=2e-2, atol=2e-2 * expected_grad.abs().max())

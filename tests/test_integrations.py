"""Drop-in integrations against the frameworks' own code: TRL's generalized_jsd_loss (every
reduction, beta, temperature, masking, num_items_in_batch) and one real GKDTrainer step on tiny
random Llama models with and without the patch; Liger's LigerFusedLinearJSDLoss, LigerJSD and
LigerKLDIVLoss; torchtune's KD losses (loaded from its installed source: torchtune's package import
needs torchao). Each framework's tests skip when it is not installed."""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import sys
import tempfile
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from kdkernels.integrations import liger as kdk_liger
from kdkernels.integrations import torchtune as kdk_torchtune


def _close(ours: torch.Tensor, theirs: torch.Tensor, inputs: list[torch.Tensor], rtol: float = 1e-5) -> None:
    """Equal values and equal gradients with respect to each input."""
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=rtol, atol=1e-6)
    grads = torch.autograd.grad(ours.sum(), inputs)
    expected = torch.autograd.grad(theirs.sum(), inputs)
    for grad, want in zip(grads, expected):
        torch.testing.assert_close(grad.float(), want.float(), rtol=rtol, atol=rtol * want.abs().max().item())


def _logits(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32, scale: float = 2.0,
            requires_grad: bool = True) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale
    return x.to(dtype).requires_grad_(requires_grad)


def _labels(shape: tuple[int, ...], vocab: int, seed: int = 3) -> torch.Tensor:
    labels = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))
    labels.view(-1)[: max(1, labels.numel() // 4)] = -100
    return labels


# ---------------------------------------------------------------------------------------------- TRL


@pytest.fixture(scope="module")
def kdk_trl():
    pytest.importorskip("trl")
    return importlib.import_module("kdkernels.integrations.trl")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_trl_loss_matches(kdk_trl, beta, dtype):
    student, teacher = _logits((2, 6, 40), 1, dtype), _logits((2, 6, 40), 2, dtype, requires_grad=False)
    labels = _labels((2, 6), 40)
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    for temperature in (1.0, 2.0):
        for reduction in ("batchmean", "sum", "mean", "none"):
            for target in (labels, None):
                for items in (None, torch.tensor(7)):
                    options = (target, beta, temperature, reduction, items)
                    # TRL rounds every step to bf16 for bf16 inputs: its fp32 numbers are the oracle, except
                    # for reduction="none" without num_items_in_batch, which runs TRL's own code.
                    fallback = reduction == "none" and items is None
                    oracle = (student, teacher) if fallback else (student.float(), teacher.float())
                    _close(kdk_trl.generalized_jsd_loss(student, teacher, *options), kdk_trl._TRL_LOSS(*oracle, *options),
                           [student], rtol)


def _gkd_step(patch: bool, kdk_trl) -> tuple[float, dict[str, torch.Tensor], int]:
    """One GKDTrainer step (SGD, lr 1) of a 2-layer student with a 3-layer teacher on 8 chat
    samples: the logged loss, the parameter updates, and how many times the fused loss ran."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    words = [f"w{i}" for i in range(24)]
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", "user", "assistant", ":"] + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                               "{% if add_generation_prompt %}assistant : {% endif %}")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(8):
        ids = torch.randint(0, 24, (9,), generator=generator).tolist()
        rows.append({"messages": [{"role": "user", "content": " ".join(words[i] for i in ids[:4])},
                                  {"role": "assistant", "content": " ".join(words[i] for i in ids[4:])}]})

    def model(seed: int, layers: int) -> LlamaForCausalLM:
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                                            eos_token_id=2, initializer_range=0.5))

    student = model(0, 2)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    with tempfile.TemporaryDirectory() as out, mock.patch.object(kdk_trl, "kd_loss", wraps=kdk_trl.kd_loss) as fused:
        args = GKDConfig(output_dir=out, per_device_train_batch_size=4, max_steps=1, lmbda=0.0, seq_kd=False,
                         beta=0.4, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", report_to=[],
                         use_cpu=True, save_strategy="no", logging_steps=1, max_length=32, seed=0)
        trainer = GKDTrainer(model=student, teacher_model=model(1, 3), args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer)
        if patch:
            with kdk_trl.patched() as classes:
                assert GKDTrainer in classes
                trainer.train()
        else:
            trainer.train()
        assert vars(GKDTrainer)["generalized_jsd_loss"].__func__ is kdk_trl._TRL_LOSS
        calls = fused.call_count
    updates = {name: p.detach() - before[name] for name, p in student.named_parameters()}
    return trainer.state.log_history[0]["loss"], updates, calls


def test_trl_gkd_trainer_step(kdk_trl):
    loss, updates, calls = _gkd_step(False, kdk_trl)
    patched_loss, patched_updates, patched_calls = _gkd_step(True, kdk_trl)
    assert calls == 0 and patched_calls >= 1
    assert loss > 0
    torch.testing.assert_close(patched_loss, loss, rtol=1e-5, atol=0)
    largest = max(update.abs().max().item() for update in updates.values())
    assert largest > 0
    for name, update in updates.items():
        torch.testing.assert_close(patched_updates[name], update, rtol=1e-4, atol=1e-5 * largest, msg=name)


def test_trl_missing_raises_naming_the_extra():
    with mock.patch.dict(sys.modules, {"trl": None, "kdkernels.integrations.trl": None}):
        sys.modules.pop("kdkernels.integrations.trl")
        with pytest.raises(ImportError, match=r"kdkernels\[trl\]"):
            importlib.import_module("kdkernels.integrations.trl")


# -------------------------------------------------------------------------------------------- Liger


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_liger_fused_linear_jsd_matches(beta, dtype):
    """Against Liger's chunked PyTorch code, on fp32 copies of the inputs for bf16 (Liger's softmax
    then runs in bf16; ours accumulates in fp32)."""
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    hidden, weight = _logits((16, 12), 4, dtype, scale=1.0), _logits((40, 12), 5, dtype, scale=1.0)
    teacher_hidden, teacher_weight = _logits((16, 20), 6, dtype, scale=1.0, requires_grad=False), _logits(
        (40, 20), 7, dtype, scale=1.0, requires_grad=False)
    labels = _labels((16,), 40)
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    for options in ({}, {"weight_hard_loss": 0.2, "weight_soft_loss": 0.7, "temperature": 2.0},
                    {"weight_hard_loss": 0.0, "weight_soft_loss": 1.0}, {"return_soft_hard_loss": True}):
        args = (hidden, weight, teacher_hidden, teacher_weight)
        ours = kdk_liger.LigerFusedLinearJSDLoss(beta=beta, **options)(*args, labels)
        theirs = chunked.LigerFusedLinearJSDLoss(beta=beta, compiled=False, **options)(
            *(x.float() for x in args), labels)
        if options.get("return_soft_hard_loss"):
            for part, want in zip(ours[1:], theirs[1:]):
                torch.testing.assert_close(part, want, rtol=rtol, atol=1e-6)
            ours, theirs = ours[0], theirs[0]
        _close(ours, theirs, [hidden, weight], rtol)


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_liger_jsd_matches(beta):
    transformers_api = pytest.importorskip("liger_kernel.transformers")
    student, teacher = _logits((16, 40), 8), _logits((16, 40), 9, requires_grad=False)
    labels = _labels((16,), 40)
    log_p = F.log_softmax(teacher, -1)
    ours = kdk_liger.LigerJSD(beta=beta)(F.log_softmax(student, -1), log_p, labels)
    theirs = transformers_api.LigerJSD(beta=beta)(F.log_softmax(student, -1), log_p, labels)
    _close(ours, theirs, [student])


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("log_target", [False, True])
def test_liger_kl_div_is_kl_div_loss(reduction, log_target):
    """LigerKLDIVLoss is nn.KLDivLoss (its Triton kernel does not run on CPU tensors)."""
    student, teacher = _logits((3, 5, 40), 10), _logits((3, 5, 40), 11, requires_grad=False)
    target = F.log_softmax(teacher, -1) if log_target else F.softmax(teacher, -1)
    module = kdk_liger.LigerKLDIVLoss(reduction=reduction, log_target=log_target)
    assert isinstance(module, torch.nn.KLDivLoss)
    ours = module(F.log_softmax(student, -1), target)
    theirs = torch.nn.KLDivLoss(reduction=reduction, log_target=log_target)(F.log_softmax(student, -1), target)
    _close(ours, theirs, [student])


# ---------------------------------------------------------------------------------------- torchtune


@pytest.fixture(scope="module")
def torchtune_losses():
    spec = importlib.util.find_spec("torchtune")
    if spec is None:
        pytest.skip("torchtune is not installed")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "modules" / "loss" / "kd_losses.py"
    loader_spec = importlib.util.spec_from_file_location("torchtune_kd_losses", path)
    module = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["ForwardKLLoss", "ReverseKLLoss", "SymmetricKLLoss"])
def test_torchtune_losses_match(torchtune_losses, name, dtype):
    student, teacher = _logits((24, 50), 12, dtype), _logits((24, 50), 13, dtype, requires_grad=False)
    if name == "ForwardKLLoss":  # masked entries (torchtune's reverse KL has NaN gradients at them)
        teacher.detach()[3, 7] = float("-inf")
        student.detach()[5, 9] = float("-inf")
    labels = _labels((24,), 50)
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    for normalize in (True, False):
        ours = getattr(kdk_torchtune, name)()(student, teacher, labels, normalize)
        theirs = getattr(torchtune_losses, name)()(student, teacher, labels, normalize)
        _close(ours, theirs, [student], rtol)
    all_ignored = torch.full_like(labels, -100)
    torch.testing.assert_close(getattr(kdk_torchtune, name)()(student, teacher, all_ignored), torch.tensor(0.0))


@pytest.mark.parametrize("name", ["ForwardKLWithChunkedOutputLoss", "ReverseKLWithChunkedOutputLoss",
                                  "SymmetricKLWithChunkedOutputLoss"])
def test_torchtune_chunked_losses_match(torchtune_losses, name):
    student, teacher = _logits((2, 12, 50), 14), _logits((2, 12, 50), 15, requires_grad=False)
    labels = _labels((2, 12), 50)
    chunks = lambda x: list(x.chunk(4, dim=1))  # noqa: E731
    ours = getattr(kdk_torchtune, name)(num_output_chunks=4)(chunks(student), chunks(teacher), labels)
    theirs = getattr(torchtune_losses, name)(num_output_chunks=4)(chunks(student), chunks(teacher), labels)
    _close(ours, theirs, [student])
    with pytest.raises(ValueError, match="logit chunks"):
        getattr(kdk_torchtune, name)(num_output_chunks=3)(chunks(student), chunks(teacher), labels)


def test_torchtune_teacher_must_be_constant():
    student, teacher = _logits((4, 10), 16), _logits((4, 10), 17)
    with pytest.raises(ValueError, match="teacher is a constant"):
        kdk_torchtune.ForwardKLLoss()(student, teacher, torch.zeros(4, dtype=torch.long))


# -------------------------------------------------------------------------------------- torchdistill


@pytest.fixture(scope="module")
def torchdistill_registry():
    pytest.importorskip("torchdistill")
    importlib.import_module("kdkernels.integrations.torchdistill")
    return importlib.import_module("torchdistill.losses.registry")


TORCHDISTILL_CONFIGS = {
    "KDLoss": [
        "{student_module_path: fc, student_module_io: output, teacher_module_path: fc, teacher_module_io: output, "
        "temperature: 4.0, alpha: 0.5, reduction: batchmean}",
        "{student_module_path: fc, student_module_io: output, teacher_module_path: fc, teacher_module_io: output, "
        "temperature: 2.0, alpha: 0.3, beta: 0.9, reduction: sum}",
        "{student_module_path: fc, student_module_io: output, teacher_module_path: fc, teacher_module_io: output, "
        "temperature: 3.0, alpha: 0.0, reduction: batchmean}",
        "{student_module_path: fc, student_module_io: output, teacher_module_path: fc, teacher_module_io: output, "
        "temperature: 4.0, alpha: 0.5, reduction: batchmean, label_smoothing: 0.1}",
    ],
    "LogitStdKDLoss": [
        "{student_module_path: fc, student_module_io: output, teacher_module_path: fc, teacher_module_io: output, "
        "temperature: 2.0, alpha: 0.1, beta: 9.0}",
    ],
    "DISTLoss": [
        "{student_module_path: fc, student_module_io: output, teacher_module_path: fc, teacher_module_io: output, "
        "beta: 2.0, gamma: 2.0, tau: 4.0}",
    ],
    "RKDLoss": ["{student_output_path: layer4, teacher_output_path: layer4, dist_factor: 25.0, angle_factor: 50.0, "
                "reduction: mean}"],
    "SPKDLoss": ["{student_output_path: layer4, teacher_output_path: layer4, reduction: batchmean}"],
    "PKTLoss": ["{student_module_path: pool, student_module_io: output, teacher_module_path: pool, "
                "teacher_module_io: output}"],
    "ATLoss": [
        "{at_pairs: {a: {student: {path: layer3, io: output}, teacher: {path: layer3, io: output}, weight: 1}, "
        "b: {student: {path: layer4, io: output}, teacher: {path: layer4, io: output}, weight: 2}}, mode: code}",
        "{at_pairs: {a: {student: {path: layer3, io: output}, teacher: {path: layer3, io: output}, weight: 1}}, "
        "mode: paper}",
    ],
}


def _io_dicts(seed: int) -> tuple[dict, dict, list[torch.Tensor], torch.Tensor]:
    student = {"fc": _logits((8, 10), seed), "pool": _logits((8, 24), seed + 1),
               "layer3": _logits((8, 4, 6, 6), seed + 2), "layer4": _logits((8, 6, 3, 3), seed + 3)}
    teacher = {"fc": _logits((8, 10), seed + 4, requires_grad=False),
               "pool": _logits((8, 40), seed + 5, requires_grad=False),
               "layer3": _logits((8, 7, 6, 6), seed + 6, requires_grad=False),
               "layer4": _logits((8, 9, 3, 3), seed + 7, requires_grad=False)}
    targets = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(seed))
    return ({name: {"output": x} for name, x in student.items()}, {name: {"output": x} for name, x in teacher.items()},
            list(student.values()), targets)


@pytest.mark.parametrize("name", list(TORCHDISTILL_CONFIGS))
def test_torchdistill_losses_match(torchdistill_registry, name):
    import yaml

    for config in TORCHDISTILL_CONFIGS[name]:
        kwargs = yaml.safe_load(config)
        ours = torchdistill_registry.get_mid_level_loss({"key": f"kdkernels.{name}", "kwargs": dict(kwargs)})
        theirs = torchdistill_registry.get_mid_level_loss({"key": name, "kwargs": dict(kwargs)})
        assert type(ours).__module__ == "kdkernels.integrations.torchdistill" and isinstance(ours, type(theirs))
        student_io, teacher_io, inputs, targets = _io_dicts(20)
        used = [x for x in inputs if x is not None]
        value, expected = ours(student_io, teacher_io, targets), theirs(student_io, teacher_io, targets)
        torch.testing.assert_close(value.float(), expected.float(), rtol=1e-5, atol=1e-6)
        grads = torch.autograd.grad(value, used, allow_unused=True)
        expected_grads = torch.autograd.grad(expected, used, allow_unused=True)
        for grad, want in zip(grads, expected_grads):
            if want is None:
                assert grad is None or not grad.any()
                continue
            torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_torchdistill_kd_losses_bf16(torchdistill_registry):
    """bf16 logits against torchdistill on fp32 copies (its softmax then runs in bf16)."""
    import yaml

    for name in ("KDLoss", "LogitStdKDLoss", "DISTLoss"):
        kwargs = yaml.safe_load(TORCHDISTILL_CONFIGS[name][0])
        ours = torchdistill_registry.get_mid_level_loss({"key": f"kdkernels.{name}", "kwargs": dict(kwargs)})
        theirs = torchdistill_registry.get_mid_level_loss({"key": name, "kwargs": dict(kwargs)})
        student, teacher = _logits((8, 10), 50, torch.bfloat16), _logits((8, 10), 51, torch.bfloat16,
                                                                         requires_grad=False)
        targets = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(52))
        value = ours({"fc": {"output": student}}, {"fc": {"output": teacher}}, targets)
        expected = theirs({"fc": {"output": student.float()}}, {"fc": {"output": teacher.float()}}, targets)
        _close(value, expected, [student], rtol=2e-2)


def test_torchdistill_kd_loss_without_targets_and_with_ignored_targets(torchdistill_registry):
    import yaml

    kwargs = yaml.safe_load(TORCHDISTILL_CONFIGS["KDLoss"][0])
    ours = torchdistill_registry.get_mid_level_loss({"key": "kdkernels.KDLoss", "kwargs": dict(kwargs)})
    theirs = torchdistill_registry.get_mid_level_loss({"key": "KDLoss", "kwargs": dict(kwargs)})
    student_io, teacher_io, _, targets = _io_dicts(30)
    targets[0] = -100
    for target in (None, targets):
        torch.testing.assert_close(ours(student_io, teacher_io, target), theirs(student_io, teacher_io, target))


def test_torchdistill_missing_raises_naming_the_extra():
    with mock.patch.dict(sys.modules, {"torchdistill": None, "torchdistill.losses": None,
                                       "kdkernels.integrations.torchdistill": None}):
        sys.modules.pop("kdkernels.integrations.torchdistill")
        with pytest.raises(ImportError, match=r"kdkernels\[torchdistill\]"):
            importlib.import_module("kdkernels.integrations.torchdistill")


def test_torchdistill_runs_the_fused_kernels(torchdistill_registry):
    import yaml

    module = importlib.import_module("kdkernels.integrations.torchdistill")
    student_io, teacher_io, _, targets = _io_dicts(40)
    for name, function in (("KDLoss", "kd_loss"), ("RKDLoss", "rkd_angle_loss"), ("ATLoss", "attention_transfer_loss"),
                           ("PKTLoss", "pkt_loss"), ("DISTLoss", "dist_loss"), ("SPKDLoss", "gram")):
        loss = torchdistill_registry.get_mid_level_loss(
            {"key": f"kdkernels.{name}", "kwargs": yaml.safe_load(TORCHDISTILL_CONFIGS[name][0])})
        with mock.patch.object(module, function, wraps=getattr(module, function)) as kernel:
            loss(student_io, teacher_io, targets)
        assert kernel.call_count >= 1, name

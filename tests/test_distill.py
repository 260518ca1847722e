"""The distillation trainer: schemes, terms, checkpoints and exact resume, DDP on gloo, and the
``kdkernels distill`` recipes."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import kdkernels as kdk
from kdkernels.distill import (Batches, CrossEntropy, DeepToShallow, FeatureDistillation, FeatureTaps,
                               LogitDistillation, Offline, Online, SelfTeacher, Trainer, cosine_with_warmup)
from kdkernels.distill.recipes import MLP, RECIPES, ConvNet1d


def _data(n=96, d=12, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, (x[:, :classes].argmax(1) + (x[:, -1] > 1).long()) % classes


def _mlp(d=12, hidden=(16,), classes=4, seed=0, **options):
    torch.manual_seed(seed)
    return MLP(d, list(hidden), classes, **options)


def _fit(scheme, x, y, epochs, *, checkpoint_dir=None, resume=False, batch_size=16, amp=None, planned_epochs=None,
         accumulation_steps=1):
    """Train for ``epochs`` epochs of a schedule planned for ``planned_epochs`` (an interrupted run)."""
    optimizer = torch.optim.AdamW(scheme.trainable_parameters(), lr=1e-2)
    batches = Batches(x, y, batch_size, shuffle=True, seed=3)
    scheduler = cosine_with_warmup(optimizer, (planned_epochs or epochs) * len(batches), warmup_steps=2)
    trainer = Trainer(scheme, optimizer, scheduler, checkpoint_dir=checkpoint_dir, amp=amp,
                      accumulation_steps=accumulation_steps)
    return trainer.fit(batches, Batches(x, y, 40), epochs=epochs, resume=resume)


def test_feature_taps_keep_named_outputs_and_reject_unknown_names():
    model = _mlp(hidden=(16, 8))
    taps = FeatureTaps(model, ["layers.0", "layers.1.0"])
    out = taps.run(model, torch.randn(5, 12))
    assert out.logits.shape == (5, 4)
    assert out.features["layers.0"].shape == (5, 16) and out.features["layers.1.0"].shape == (5, 8)
    model(torch.randn(5, 12))  # outside run(): nothing kept alive
    assert taps._features is None
    taps.remove()
    assert taps.run(model, torch.randn(5, 12)).features == {}
    with pytest.raises(ValueError, match=r"no submodule named 'layers\.7'.*layers\.0"):
        FeatureTaps(model, ["layers.7"])


def test_offline_freezes_the_teacher_and_sums_the_terms():
    x, y = _data()
    teacher, student = _mlp(hidden=(32,), seed=1), _mlp()
    teacher.train()
    adapter = kdk.HintAdapter(16, 32)
    scheme = Offline(student, teacher, [LogitDistillation(temperature=2.0, alpha=0.7),
                                        FeatureDistillation(kdk.HintLoss(adapter, weight=0.5), "layers.0", "layers.0"),
                                        FeatureDistillation(kdk.RKDDistanceLoss(weight=2.0), "layers.0", "layers.0")])
    scheme.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert {id(p) for p in scheme.trainable_parameters()} == {id(p) for p in [*student.parameters(), *adapter.parameters()]}
    loss, parts = scheme(x, y)
    hidden_s, hidden_t = student.layers[0](x), teacher.layers[0](x)
    expected = (kdk.kd_loss(student(x), teacher(x), y, temperature=2.0, alpha=0.7)
                + 0.5 * F.mse_loss(adapter(hidden_s), hidden_t) + 2.0 * kdk.rkd_distance_loss(hidden_s, hidden_t))
    torch.testing.assert_close(loss, expected)
    assert set(parts) == {"LogitDistillation", "HintLoss(layers.0)", "RKDDistanceLoss(layers.0)"}


def test_offline_without_teacher_trains_alone_and_rejects_teacher_terms():
    x, y = _data()
    loss, parts = Offline(_mlp())(x, y)
    assert set(parts) == {"CrossEntropy"}
    with pytest.raises(ValueError, match="LogitDistillation read a teacher, but teacher is None"):
        Offline(_mlp(), None, [LogitDistillation()])


def test_logit_distillation_takes_any_kdkernels_criterion():
    x, y = _data()
    student, teacher = _mlp(), _mlp(seed=1)
    with torch.no_grad():
        teacher_logits = teacher(x)
    for criterion, expected in [(kdk.DISTLoss(), kdk.dist_loss(student(x), teacher_logits)),
                                (kdk.DKDLoss(), kdk.dkd_loss(student(x), teacher_logits, y))]:
        loss, _ = Offline(student, teacher, [LogitDistillation(criterion)])(x, y)
        torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="not both"):
        LogitDistillation(kdk.KDLoss(), temperature=2.0)

    class Wrapped(torch.nn.Module):  # e.g. what torch.compile gives: forward(*args)
        def __init__(self, loss):
            super().__init__()
            self.loss = loss

        def forward(self, *args):
            return self.loss(*args)

    loss, _ = Offline(student, teacher, [LogitDistillation(Wrapped(kdk.KDLoss(alpha=0.5)))])(x, y)
    torch.testing.assert_close(loss, kdk.kd_loss(student(x), teacher_logits, y, alpha=0.5))
    loss, _ = Offline(student, teacher, [LogitDistillation(Wrapped(kdk.DISTLoss()), with_target=False)])(x, y)
    torch.testing.assert_close(loss, kdk.dist_loss(student(x), teacher_logits))


def test_cached_teacher_gives_the_uncached_training():
    x, y = _data()
    runs = []
    for cache in (False, True):
        scheme = Offline(_mlp(), _mlp(hidden=(32,), seed=1), cache_teacher=cache)
        runs.append((_fit(scheme, x, y, 3), scheme.student.state_dict()))
    assert runs[0][0] == runs[1][0]
    for name, value in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][name], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="sample indices"):
        Offline(_mlp(), _mlp(seed=1), cache_teacher=True)(x, y)


def test_online_peers_learn_from_each_others_detached_predictions():
    x, y = _data()
    peers = [_mlp(seed=0), _mlp(seed=1), _mlp(hidden=(8,), seed=2)]
    scheme = Online(peers, kdk.KDLoss(alpha=0.5, temperature=2.0))
    loss, parts = scheme(x, y)
    logits = [peer(x) for peer in peers]
    expected = [torch.stack([kdk.kd_loss(logits[k], logits[j].detach(), y, alpha=0.5, temperature=2.0)
                             for j in range(3) if j != k]).mean() for k in range(3)]
    for k in range(3):
        torch.testing.assert_close(parts[f"peer{k}"], expected[k].detach())
    grads = torch.autograd.grad(loss, list(peers[0].parameters()))
    own = torch.autograd.grad(expected[0], list(peers[0].parameters()))
    for g, e in zip(grads, own):
        torch.testing.assert_close(g, e)
    assert set(scheme.models()) == {"peer0", "peer1", "peer2"}
    with pytest.raises(ValueError, match="at least two peers"):
        Online([peers[0]])


def test_self_teacher_ema_follows_the_student_with_a_ramped_decay():
    x, y = _data()
    scheme = SelfTeacher(_mlp(), decay=0.99)
    before = [p.detach().clone() for p in scheme.teacher.parameters()]
    _fit(scheme, x, y, 1)
    assert int(scheme.updates) == 6
    # Replay the EMA over the student's own trajectory is not possible after the fact; check one update instead.
    mean = [p.detach().clone() for p in scheme.teacher.parameters()]
    scheme.after_step()
    n = 6
    d = min(0.99, (1 + n) / (10 + n))
    for t, m, s in zip(scheme.teacher.parameters(), mean, scheme.student.parameters()):
        torch.testing.assert_close(t, m + (1 - d) * (s - m))
    assert any(not torch.equal(b, m) for b, m in zip(before, mean))
    assert not any(p.requires_grad for p in scheme.teacher.parameters())


def test_self_teacher_epoch_snapshot_starts_on_labels_then_copies_the_student():
    x, y = _data()
    scheme = SelfTeacher(_mlp(), every="epoch", decay=0.0)
    _, parts = scheme(x, y)
    assert set(parts) == {"CrossEntropy"}
    scheme.after_epoch()
    for t, s in zip(scheme.teacher.parameters(), scheme.student.parameters()):
        assert torch.equal(t, s)
    loss, parts = scheme(x, y)
    assert set(parts) == {"LogitDistillation"}
    torch.testing.assert_close(loss, kdk.kd_loss(scheme.student(x), scheme.student(x), y))
    restored = SelfTeacher(_mlp(), every="epoch")
    restored.load_state_dict(scheme.state_dict())
    assert set(restored(x, y)[1]) == {"LogitDistillation"}
    with pytest.raises(ValueError, match="every must be"):
        SelfTeacher(_mlp(), every="batch")
    with pytest.raises(ValueError, match="decay must be"):
        SelfTeacher(_mlp(), decay=1.0)


def test_deep_to_shallow_matches_the_byot_formula():
    """The authors' code: CE for the deepest exit; for the others 0.7 CE + 0.3 soft CE at T = 3,
    no T^2 (the soft CE is this KL plus a constant); the paper's feature hint on top."""
    x, y = _data()
    student = _mlp(hidden=(16, 16, 16), exits=True)
    scheme = DeepToShallow(student, temperature=3.0, alpha=0.3, feature_layers=["layers.0", "layers.1", "layers.2"],
                           feature_weight=0.03)
    loss, parts = scheme(x, y)
    exits = student(x)
    h0 = student.layers[0](x)
    h1 = student.layers[1](h0)
    h2 = student.layers[2](h1)
    expected = (F.cross_entropy(exits[2], y)
                + sum(0.7 * F.cross_entropy(e, y) + 0.3 * F.kl_div(F.log_softmax(e / 3, -1), F.softmax(exits[2].detach() / 3, -1),
                                                                    reduction="batchmean") for e in exits[:2])
                + 0.03 * (F.mse_loss(h0, h2.detach()) + F.mse_loss(h1, h2.detach())))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert set(parts) == {"exit0", "exit1", "exit2", "features"}
    torch.testing.assert_close(scheme.models()["student"](x), exits[2])
    with pytest.raises(ValueError, match="list of at least two exits"):
        DeepToShallow(_mlp())(x, y)


def test_cosine_with_warmup_schedule():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = cosine_with_warmup(optimizer, total_steps=12, warmup_steps=4, final_factor=0.1)
    lrs = []
    for _ in range(13):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert lrs[8] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert lrs[12] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_with_warmup(optimizer, total_steps=3, warmup_steps=4)


def test_batches_shuffle_per_epoch_and_cover_every_sample():
    x, y = _data(n=50)
    batches = Batches(x, y, 16, shuffle=True, seed=1)
    assert len(batches) == 4 and len(Batches(x, y, 16, drop_last=True)) == 3
    first = torch.cat([index for _, _, index in batches.epoch(0)])
    assert sorted(first.tolist()) == list(range(50))
    assert torch.equal(first, torch.cat([index for _, _, index in batches.epoch(0)]))
    assert not torch.equal(first, torch.cat([index for _, _, index in batches.epoch(1)]))
    with pytest.raises(ValueError, match="as many samples"):
        Batches(x, y[:3], 4)


def test_resume_continues_exactly(tmp_path):
    x, y = _data()

    def scheme():
        # Dropout draws from the RNG, so the resumed run must restore it.
        return Offline(_mlp(dropout=0.3), _mlp(hidden=(32,), seed=1))

    straight = scheme()
    history = _fit(straight, x, y, 4)
    stopped = scheme()
    _fit(stopped, x, y, 2, checkpoint_dir=tmp_path, planned_epochs=4)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]
    resumed = scheme()
    torch.manual_seed(1234)  # whatever the RNG does before the resume
    resumed_history = _fit(resumed, x, y, 4, checkpoint_dir=tmp_path, resume=True)
    assert resumed_history == history
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0)
    done = _fit(scheme(), x, y, 4, checkpoint_dir=tmp_path, resume=True)
    assert done == history
    with pytest.raises(ValueError, match="holds 4 epochs, more than the 3"):
        _fit(scheme(), x, y, 3, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="needs a checkpoint_dir"):
        _fit(scheme(), x, y, 1, resume=True)


@pytest.mark.parametrize("every", ["step", "epoch"])
def test_self_teacher_resumes_exactly(tmp_path, every):
    x, y = _data()
    straight = SelfTeacher(_mlp(), every=every)
    history = _fit(straight, x, y, 3)
    _fit(SelfTeacher(_mlp(), every=every), x, y, 1, checkpoint_dir=tmp_path, planned_epochs=3)
    resumed = SelfTeacher(_mlp(), every=every)
    assert _fit(resumed, x, y, 3, checkpoint_dir=tmp_path, resume=True) == history
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0)
    assert "val/accuracy/teacher" in history[-1]


def test_bfloat16_autocast_trains():
    x, y = _data()
    history = _fit(Offline(_mlp(), _mlp(hidden=(32,), seed=1)), x, y, 3, amp=torch.bfloat16)
    assert all(math.isfinite(value) for record in history for value in record.values())
    with pytest.raises(ValueError, match="amp must be"):
        Trainer(Offline(_mlp()), torch.optim.SGD(_mlp().parameters(), lr=0.1), amp=torch.float64)


def test_a_non_finite_loss_stops_training():
    x, y = _data()
    x[5] = float("nan")
    with pytest.raises(FloatingPointError, match="training loss of epoch 1 is nan"):
        _fit(Offline(_mlp()), x, y, 1)
    with pytest.raises(ValueError, match="no batches"):
        Batches(x[:3], y[:3], 4, drop_last=True)


def _accumulation_case(ignored):
    """A scheme and data (100 samples) whose terms are exact under accumulation and DDP: with
    ignored targets, terms that average over the counted targets; without, also a feature term."""
    torch.manual_seed(5)
    x, y = _data(n=100)
    if ignored:
        y[torch.randperm(100, generator=torch.Generator().manual_seed(2))[:30]] = -100
        terms = [LogitDistillation(temperature=2.0), CrossEntropy(weight=0.5)]
    else:
        terms = [LogitDistillation(temperature=2.0),
                 FeatureDistillation(kdk.HintLoss(kdk.HintAdapter(16, 32), weight=0.5), "layers.0", "layers.0")]
    return Offline(_mlp(), _mlp(hidden=(32,), seed=1), terms), x, y


def _assert_same_training(a, history_a, b, history_b):
    for name, value in a.state_dict().items():
        torch.testing.assert_close(value, b.state_dict()[name], rtol=1e-4, atol=1e-5)
    for record_a, record_b in zip(history_a, history_b):
        for key in ("train/loss", "val/loss/student", "val/accuracy/student"):
            assert record_a[key] == pytest.approx(record_b[key], rel=1e-4)


@pytest.mark.parametrize("ignored", [False, True])
def test_gradient_accumulation_trains_as_whole_batches(ignored):
    """Micro-batches of uneven sizes (16 rows in 3: 6, 5, 5; the last batch of 4 in 3: 2, 1, 1),
    with or without ignored targets, give the whole batches' steps."""
    whole, x, y = _accumulation_case(ignored)
    history = _fit(whole, x, y, 2)
    accumulated, _, _ = _accumulation_case(ignored)
    _assert_same_training(accumulated, _fit(accumulated, x, y, 2, accumulation_steps=3), whole, history)
    with pytest.raises(ValueError, match="accumulation_steps must be >= 1"):
        Trainer(whole, torch.optim.SGD(whole.trainable_parameters(), lr=0.1), accumulation_steps=0)


def _ddp_worker(rank, world, init_file, out_dir, ignored, accumulation_steps):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        scheme, x, y = _accumulation_case(ignored)  # the last global batch, 4 samples, gives each process 2
        with pytest.raises(ValueError, match="multiple of the world size 2"):
            next(Batches(x, y, 15).epoch(0))
        history = _fit(scheme, x, y, 3, checkpoint_dir=out_dir, accumulation_steps=accumulation_steps)
        if rank == 0:
            torch.save({"state": scheme.state_dict(), "history": history}, os.path.join(out_dir, "ddp.pt"))
        torch.distributed.barrier()  # neither process leaves the group while the other still uses it
    finally:
        torch.distributed.destroy_process_group()
    # Done and checked: skip the interpreter's teardown, where gloo's transport threads have been
    # seen to abort a process at exit on a loaded machine (SIGABRT after the work succeeded).
    os._exit(0)


@pytest.mark.parametrize("ignored, accumulation_steps", [(False, 1), (True, 2)])
def test_ddp_on_gloo_matches_single_process_training(tmp_path, ignored, accumulation_steps):
    """Two processes, each with half of every batch, train as one process does: for terms that
    are means over samples; with ignored targets spread unevenly over the processes and
    micro-batches, for terms that are means over the counted targets (the trainer normalises by
    kdkernels.global_num_items). A relation term's matrix would span one process's share only."""
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), ignored,
                                                   accumulation_steps), nprocs=2)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    single, x, y = _accumulation_case(ignored)
    history = _fit(single, x, y, 3)
    distributed, _, _ = _accumulation_case(ignored)
    distributed.load_state_dict(ddp["state"])
    _assert_same_training(distributed, ddp["history"], single, history)


def test_recipe_models_and_data():
    pytest.importorskip("sklearn")
    data = RECIPES["digits"].data(None)
    assert data.train_inputs.shape[1:] == (64,) and len(data.train_inputs) + len(data.test_inputs) == 1797
    assert 0.0 <= float(data.train_inputs.min()) and float(data.train_inputs.max()) <= 1.0
    assert ConvNet1d(8)(torch.randn(3, 40)).shape == (3, 10)
    exits = MLP(40, [16, 16, 16], 10, exits=True)(torch.randn(3, 40))
    assert [e.shape for e in exits] == [(3, 10)] * 3


def test_mnist1d_is_generated_locally_and_cached(tmp_path):
    pytest.importorskip("mnist1d")
    from kdkernels.distill.recipes import mnist1d_data
    data = mnist1d_data(tmp_path, samples=200)
    assert data.train_inputs.shape == (160, 40) and data.test_inputs.shape == (40, 40) and data.classes == 10
    again = mnist1d_data(tmp_path, samples=200)
    assert torch.equal(again.train_inputs, data.train_inputs) and (tmp_path / "mnist1d-200.pt").exists()


@pytest.mark.parametrize("mode, label", [(["--mode", "offline"], "offline"), (["--mode", "online"], "online"),
                                         (["--mode", "self"], "self-ema"),
                                         (["--mode", "self", "--self-teacher", "epoch"], "self-epoch"),
                                         (["--mode", "self", "--self-teacher", "byot"], "self-byot")])
def test_cli_distill_writes_the_table_and_logs(tmp_path, capsys, mode, label):
    pytest.importorskip("sklearn")
    from kdkernels import cli
    argv = ["distill", "--recipe", "digits", "--epochs", "2", "--teacher-epochs", "1", "--seeds", "2",
            "--out", str(tmp_path), "--no-progress", *mode]
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    assert "student alone" in table and "distilled student" in table and "distilled − alone" in table
    logs = tmp_path / "digits" / label
    summary = json.loads((logs / "summary.json").read_text())
    roles = [row["model"] for row in summary["rows"]]
    expected = {"offline": ["teacher"], "online": ["peer"]}.get(mode[1], [])
    assert sorted(roles) == sorted(expected + ["student alone", "distilled student"])
    assert all(len(row["accuracies"]) == (1 if row["model"] == "teacher" else 2) for row in summary["rows"])
    lines = (logs / "history.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * 2 * 2 + (2 * 2 if mode[1] == "online" else 0) + (1 if mode[1] == "offline" else 0)
    assert (logs / "curves.png").stat().st_size > 0
    if mode[1] == "offline":
        cli.main(argv + ["--resume"])
        assert json.loads((logs / "summary.json").read_text())["rows"][1]["accuracies"] == \
            summary["rows"][1]["accuracies"]


def test_experiment_rejects_bad_settings():
    from kdkernels.distill.experiment import Experiment
    for options, message in [({"mode": "peer"}, "mode must be"), ({"seeds": 0}, "seeds must be"),
                             ({"self_teacher": "x"}, "self_teacher must be"), ({"epochs": 0}, "epochs")]:
        with pytest.raises(ValueError, match=message):
            Experiment(RECIPES["digits"], **options)

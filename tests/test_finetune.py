"""Tests of fyc_convert.train.finetune: evaluate, calibrate, the fine-tuning loop, checkpoints, resume, NaN, DDP."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _ddp_worker import build
from _stream_worker import build_image_run, image_config
from image_folders import write_class_folders
from torch import nn
from torch.utils.data import TensorDataset

import fyc_convert.train.finetune as ft
from fyc_convert.data.datasets import UNLABELLED, NpyDataset, load_data
from fyc_convert.errors import DataError, TrainingError
from fyc_convert.head.heads import HadamardHead, OrthogonalHead
from fyc_convert.train.finetune import (
    CHECKPOINT_NAME,
    FinetuneConfig,
    calibrate,
    evaluate,
    finetune,
    gradient_bytes,
    resolve_device,
    resolve_precision,
)

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "_ddp_worker.py"
STREAM_WORKER = REPO / "tests" / "_stream_worker.py"


def _cfg(**kw) -> FinetuneConfig:
    # optimizer and distill given: left at None, recipe.plan would choose them from the model (test_recipe.py)
    return FinetuneConfig(**{"epochs": 2, "batch_size": 8, "lr": 0.05, "optimizer": "sgd", "distill": False,
                             "device": "cpu", **kw})


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class _Recorder:
    """rich.progress.Progress stand-in: records calls; optionally raises or runs a hook at a given update."""

    def __init__(self, at: int = 0, action=None):
        self.tasks: list[tuple[str, dict]] = []
        self.updates: list[dict] = []
        self.at, self.action = at, action

    def add_task(self, description: str, **fields) -> int:
        self.tasks.append((description, fields))
        return len(self.tasks) - 1

    def update(self, task: int, **fields) -> None:
        self.updates.append(fields)
        if len(self.updates) == self.at:
            self.action()


def _run(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a worker in its own process group; on timeout kill the whole group (torchrun's workers too)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _interrupt():
    raise KeyboardInterrupt


# ------------------------------------------------------------------------------------------ small helpers


def test_gradient_bytes_counts_trainable_parameters_only():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    assert gradient_bytes(model) == (4 * 3 + 3 + 3 * 2 + 2) * 4
    model[0].weight.requires_grad_(False)
    assert gradient_bytes(model) == (3 + 3 * 2 + 2) * 4
    assert gradient_bytes(model.double()) == (3 + 3 * 2 + 2) * 8


def test_gradient_bytes_shrink_by_the_classifier_weights_after_the_swap():
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 100))
    before = gradient_bytes(model)
    model[2] = HadamardHead.from_linear(model[2])
    # the 64×100 weight is gone; α (1) replaces it, the bias (100) stays
    assert before - gradient_bytes(model) == (64 * 100 - 1) * 4


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(TrainingError, match="unknown device"):
        resolve_device("tpu")


def test_evaluate_accuracy_loss_and_agreement():
    # the model's logits are the inputs themselves
    x = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [2.0, 0.0, 0.0]])
    y = torch.tensor([0, 1, 0, 2])  # right, right, wrong, wrong
    ref = nn.Sequential(nn.Linear(3, 3, bias=False))
    with torch.no_grad():
        ref[0].weight.copy_(torch.eye(3)[[0, 1, 0]])  # predicts class 0 for the third sample too
    m = evaluate(nn.Identity(), TensorDataset(x, y), FinetuneConfig(device="cpu", eval_batch_size=3),
                 reference_model=ref)
    assert m.accuracy == 0.5
    assert m.agreement == 0.75
    assert m.samples == 4
    expected = torch.nn.functional.cross_entropy(x, y).item()
    assert m.loss == pytest.approx(expected, rel=1e-6)


def test_evaluate_unlabelled_gives_no_accuracy_and_restores_train_mode():
    model = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5)).train()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    m = evaluate(model, TensorDataset(x, torch.full((5,), UNLABELLED)), FinetuneConfig(device="cpu"),
                 reference_model=model)
    assert (m.accuracy, m.loss, m.agreement, m.samples) == (None, None, 1.0, 5)
    assert model.training


# ------------------------------------------------------------------------------------------ calibration


def test_calibrate_fits_only_scale_and_bias_to_the_optimum():
    model, head, bundle = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cal = calibrate(model, head, bundle.train, FinetuneConfig(device="cpu"))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"5.scale", "5.bias"}
    assert cal.loss_after < cal.loss_before
    assert cal.samples == 90
    assert cal.scale == float(head.scale.detach())
    # the fit is a convex problem: at the optimum the gradient of the training loss in (α, b) vanishes
    x, y = bundle.train.tensors
    model.eval()
    loss = nn.functional.cross_entropy(model(x), y)
    g_scale, g_bias = torch.autograd.grad(loss, [head.scale, head.bias])
    assert float(g_scale.abs()) < 1e-4 and float(g_bias.abs().max()) < 1e-4
    assert loss.item() == pytest.approx(cal.loss_after, rel=1e-4)


def test_calibrate_and_finetune_an_orthogonal_head():
    model, _, bundle = build()
    model[5] = head = OrthogonalHead(16, 4)
    matrix = head.class_vectors().clone()
    cal = calibrate(model, head, bundle.train, FinetuneConfig(device="cpu"))
    assert cal.loss_after < cal.loss_before
    result = finetune(model, head, bundle, _cfg(epochs=1))
    assert result.history[0].scale != cal.scale  # α is trained
    assert torch.equal(head.class_vectors(), matrix)  # the fixed projection did not move


def test_calibrate_leaves_a_fixed_scale_alone():
    model, _, bundle = build()
    model[5] = head = HadamardHead(16, 4, fixed_scale=3.0)
    calibrate(model, head, bundle.train, FinetuneConfig(device="cpu"))
    assert float(head.scale.detach()) == 3.0
    assert float(head.bias.detach().abs().sum()) > 0


def test_calibrate_unlabelled_needs_distill_and_fits_the_teacher():
    teacher, _, bundle = build(seed=1)
    model, head, _ = build()
    x, _ = bundle.train.tensors
    unlabelled = TensorDataset(x, torch.full((len(x),), UNLABELLED))
    with pytest.raises(DataError, match="--distill"):
        calibrate(model, head, unlabelled, FinetuneConfig(device="cpu"))
    cal = calibrate(model, head, unlabelled, FinetuneConfig(device="cpu", distill=True), teacher=teacher)
    assert cal.loss_after < cal.loss_before


def test_calibration_samples_cap_samples_times_classes():
    assert ft.calibration_samples(10) == 20_000  # few classes: max_samples
    assert ft.calibration_samples(21_843) == ft.CALIBRATION_FLOATS // 21_843 == 1536
    assert ft.calibration_samples(4_191) * 4_191 <= ft.CALIBRATION_FLOATS
    assert ft.calibration_samples(100_000) == ft.CALIBRATION_MIN_SAMPLES  # the floor
    assert ft.calibration_samples(10, 500) == 500


def test_calibrate_uses_at_most_the_float_budget_of_samples(monkeypatch: pytest.MonkeyPatch):
    model, head, bundle = build()  # 90 training samples, 4 classes
    monkeypatch.setattr(ft, "CALIBRATION_FLOATS", 4 * 40)
    monkeypatch.setattr(ft, "CALIBRATION_MIN_SAMPLES", 8)
    cal = calibrate(model, head, bundle.train, FinetuneConfig(device="cpu"))
    assert cal.samples == 40 and cal.loss_after < cal.loss_before


def test_calibrate_rejects_a_head_outside_the_model():
    model, _, bundle = build()
    with pytest.raises(TrainingError, match="not a submodule"):
        calibrate(model, HadamardHead(16, 4), bundle.train, FinetuneConfig(device="cpu"))


# ------------------------------------------------------------------------------------------ the loop


def test_finetune_trains_backbone_scale_and_bias_and_keeps_the_fixed_structure(tmp_path):
    model, head, bundle = build()
    calibrate(model, head, bundle.train, FinetuneConfig(device="cpu"))
    start = copy.deepcopy(model)
    rows, signs = head.rows.clone(), head.signs.clone()
    result = finetune(model, head, bundle, _cfg(epochs=3, out_dir=tmp_path))
    assert [h.epoch for h in result.history] == [1, 2, 3]
    assert not torch.equal(start[0].weight, model[0].weight)
    assert float(start[5].scale.detach()) != float(head.scale.detach())
    assert not torch.equal(start[5].bias, head.bias)
    assert torch.equal(head.rows, rows) and torch.equal(head.signs, signs)
    first_acc = evaluate(start, bundle.val, FinetuneConfig(device="cpu")).accuracy
    assert result.final.accuracy > first_acc
    assert result.history[-1].lr == pytest.approx(0.0, abs=1e-12)  # cosine to 0
    assert result.history[-1].scale == float(head.scale.detach())
    assert all(h.samples_per_s > 0 and h.seconds > 0 for h in result.history)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["epoch"] == 3


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_finetune_is_deterministic_for_a_seed(optimizer):
    runs = []
    for _ in range(2):
        model, head, bundle = build()
        finetune(model, head, bundle, _cfg(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 3e-3))
        runs.append(model)
    assert _same_weights(*runs)
    other, head, bundle = build()
    finetune(other, head, bundle, _cfg(optimizer=optimizer, seed=1))
    assert not _same_weights(runs[0], other)


def test_finetune_leaves_the_callers_rng_alone():
    model, head, bundle = build()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    finetune(model, head, bundle, _cfg(epochs=1))
    assert torch.equal(torch.rand(3), expected)


def test_weight_decay_applies_to_alpha():
    runs = {}
    for wd in (0.0, 0.5):
        model, head, bundle = build()
        # freeze everything but α: its change then comes from the loss and (with wd) the decay only
        for p in model.parameters():
            p.requires_grad_(p is head.scale)
        finetune(model, head, bundle, _cfg(epochs=1, weight_decay=wd, cosine=False))
        runs[wd] = float(head.scale.detach())
    assert runs[0.5] < runs[0.0]


def test_epochs_zero_trains_nothing_and_writes_the_start_checkpoint(tmp_path):
    model, head, bundle = build()
    start = copy.deepcopy(model)
    result = finetune(model, head, bundle, _cfg(epochs=0, out_dir=tmp_path))
    assert result.history == [] and result.final is None
    assert _same_weights(start, model)
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["epoch"] == 0


def test_progress_gets_one_task_per_epoch_and_one_update_per_step():
    model, head, bundle = build()
    progress = _Recorder()
    finetune(model, head, bundle, _cfg(epochs=2, batch_size=8), progress=progress)
    steps = 90 // 8  # drop_last: 11 full batches
    assert [d for d, _ in progress.tasks] == ["epoch 1/2", "epoch 2/2"]
    assert all(f["total"] == steps for _, f in progress.tasks)
    assert len(progress.updates) == 2 * steps
    assert all(u["advance"] == 1 and u["loss"] > 0 and 0 <= u["acc"] <= 1 and u["samples_per_s"] > 0
               and 0 < u["data_share"] < 1 for u in progress.updates)
    assert all(f["data_share"] == 0.0 for _, f in progress.tasks)


def test_distill_without_labels_learns_from_the_teacher():
    teacher, t_head, bundle = build(seed=1)
    finetune(teacher, t_head, bundle, _cfg(epochs=3))  # a trained original model
    model, head, _ = build()
    x, _ = bundle.train.tensors
    xv, _ = bundle.val.tensors
    unlabelled = dataclasses.replace(
        bundle, train=TensorDataset(x, torch.full((len(x),), UNLABELLED)),
        val=TensorDataset(xv, torch.full((len(xv),), UNLABELLED)), labelled=False, num_classes=0)
    start = evaluate(model, unlabelled.val, FinetuneConfig(device="cpu"), reference_model=teacher).agreement
    result = finetune(model, head, unlabelled, _cfg(epochs=4, distill=True, temperature=2.0), teacher=teacher)
    assert result.history[-1].accuracy is None and result.final.accuracy is None
    assert result.final.agreement > start
    assert result.final.agreement >= 0.8


def test_distill_with_labels_mixes_ce_and_kl():
    teacher, _, bundle = build(seed=1)
    model, head, _ = build()
    result = finetune(model, head, bundle, _cfg(epochs=2, distill=True), teacher=teacher)
    assert result.final.accuracy is not None and result.final.agreement is not None


def test_bad_options_are_refused():
    model, head, bundle = build()
    with pytest.raises(TrainingError, match="teacher"):
        finetune(model, head, bundle, _cfg(distill=True))
    unlabelled = dataclasses.replace(bundle, labelled=False)
    with pytest.raises(DataError, match="--distill"):
        finetune(model, head, unlabelled, _cfg())
    with pytest.raises(TrainingError, match="unknown optimizer"):
        finetune(model, head, bundle, _cfg(optimizer="lion"))
    with pytest.raises(TrainingError, match="--resume needs"):
        finetune(model, head, bundle, _cfg(resume=True))


def test_class_lr_runs_through_the_loop_and_equals_plain_sgd_at_cutoff_zero():
    # with the cutoff at 0 the per-class optimizer is plain SGD (no momentum, no weight decay)
    plain, head, bundle = build()
    finetune(plain, head, bundle, _cfg(optimizer="sgd", momentum=0.0, weight_decay=0.0))
    model, head, bundle = build()
    finetune(model, head, bundle, _cfg(optimizer="class-lr", class_lr_cutoff=0, weight_decay=0.0))
    assert _same_weights(plain, model)
    model, head, bundle = build()
    result = finetune(model, head, bundle, _cfg(optimizer="class-lr", class_lr_cutoff=1, class_lr_eta_mu=10.0))
    assert len(result.history) == 2 and not _same_weights(plain, model)


# ------------------------------------------------------------------------------------------ checkpoints


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    reference, head, bundle = build()
    full = finetune(reference, head, bundle, _cfg(epochs=3))

    model, head, bundle = build()
    with pytest.raises(KeyboardInterrupt):  # interrupted in the middle of epoch 2
        finetune(model, head, bundle, _cfg(epochs=3, out_dir=tmp_path), progress=_Recorder(at=16, action=_interrupt))
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["epoch"] == 1

    model, head, bundle = build()  # a fresh process would rebuild the model like this
    result = finetune(model, head, bundle, _cfg(epochs=3, out_dir=tmp_path, resume=True))
    assert result.resumed_from_epoch == 1
    assert [h.epoch for h in result.history] == [1, 2, 3]
    assert _same_weights(model, reference)
    assert result.final == full.final


@pytest.mark.slow
def test_killed_process_resumes_and_finishes_the_same_epochs(tmp_path):
    ckpt, res = tmp_path / "ckpt", tmp_path / "res"
    base = [sys.executable, str(WORKER), "--out", str(ckpt), "--result", str(res), "--epochs", "3"]
    killed = _run(base + ["--kill-at-step", "16"])
    assert killed.returncode == -9, killed.stderr
    assert torch.load(ckpt / CHECKPOINT_NAME, weights_only=True)["epoch"] == 1
    assert not res.exists()
    resumed = _run(base + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    out = torch.load(res / "rank0.pt", weights_only=True)
    assert [h["epoch"] for h in out["history"]] == [1, 2, 3]

    reference, head, bundle = build()  # the same run, uninterrupted, in this process
    calibrate(reference, head, bundle.train, FinetuneConfig(device="cpu"))
    finetune(reference, head, bundle, _cfg(epochs=3))
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(out["state_dict"][k], v, rtol=1e-5, atol=1e-6)


def test_resume_refuses_other_options_and_a_missing_checkpoint(tmp_path):
    model, head, bundle = build()
    with pytest.raises(TrainingError, match="no checkpoint to resume"):
        finetune(model, head, bundle, _cfg(out_dir=tmp_path, resume=True))
    finetune(model, head, bundle, _cfg(epochs=1, out_dir=tmp_path))
    with pytest.raises(TrainingError, match=r"checkpoint .* was written with lr=0.05 but this run has lr=0.1; "
                                            r"resume with the same options"):
        finetune(model, head, bundle, _cfg(epochs=1, lr=0.1, out_dir=tmp_path, resume=True))
    other = nn.Sequential(nn.Linear(12, 4))
    with pytest.raises(TrainingError, match="does not fit this model"):
        finetune(other, other[0], bundle, _cfg(epochs=1, out_dir=tmp_path, resume=True))


def test_resume_of_a_finished_run_does_nothing_more(tmp_path):
    model, head, bundle = build()
    finetune(model, head, bundle, _cfg(epochs=2, out_dir=tmp_path))
    done = copy.deepcopy(model)
    again, head, bundle = build()
    result = finetune(again, head, bundle, _cfg(epochs=2, out_dir=tmp_path, resume=True))
    assert result.resumed_from_epoch == 2 and len(result.history) == 2
    assert _same_weights(done, again)


class _Poisoned(nn.Module):
    """Multiplies its input by `factor` (set to NaN by the test mid-run)."""

    def __init__(self):
        super().__init__()
        self.factor = 1.0

    def forward(self, x):
        return x * self.factor


def test_nan_loss_stops_with_training_error_and_keeps_the_last_good_checkpoint(tmp_path):
    model, head, bundle = build()
    poison = _Poisoned()
    model.insert(0, poison)
    good = {}

    def poison_now():  # first step of epoch 2 done: keep its weights, poison the next forward pass
        good.update({k: v.clone() for k, v in model.state_dict().items()})
        poison.factor = float("nan")

    with pytest.raises(TrainingError, match=r"loss became nan at epoch 2 step 2; the last good checkpoint"):
        finetune(model, head, bundle, _cfg(epochs=3, out_dir=tmp_path), progress=_Recorder(at=12, action=poison_now))
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert saved["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    assert _same_weights_dict(model.state_dict(), good)  # the NaN step was not applied


def _same_weights_dict(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ distributed


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path):
    ckpt, res = tmp_path / "ckpt", tmp_path / "res"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           "--out", str(ckpt), "--result", str(res), "--epochs", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = _run(cmd, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(res / "rank0.pt", weights_only=True)
    r1 = torch.load(res / "rank1.pt", weights_only=True)
    assert r0["world_size"] == r1["world_size"] == 2
    assert _same_weights_dict(r0["state_dict"], r1["state_dict"])  # DDP kept the ranks in step
    for key in ("scale", "loss_after", "samples"):  # calibration: shards summed, same fit on both ranks
        assert r0["calibration"][key] == r1["calibration"][key]
    assert r0["calibration"]["samples"] == 90
    assert [h["epoch"] for h in r0["history"]] == [1, 2]
    assert r0["final"] == r1["final"]  # metrics reduced across ranks
    # only rank 0 wrote the checkpoint, and it holds the final weights
    assert sorted(p.name for p in ckpt.iterdir()) == [CHECKPOINT_NAME]
    saved = torch.load(ckpt / CHECKPOINT_NAME, weights_only=True)
    assert saved["epoch"] == 2 and saved["world_size"] == 2
    assert _same_weights_dict(saved["model"], r0["state_dict"])
    # the accuracy rank 0 reports is the accuracy of the final weights on the whole validation split
    model, _, bundle = build()
    model.load_state_dict(r0["state_dict"])
    single = evaluate(model, bundle.val, FinetuneConfig(device="cpu"))
    assert r0["final"]["accuracy"] == single.accuracy
    assert r0["final"]["samples"] == single.samples == 30
    assert r0["final"]["loss"] == pytest.approx(single.loss, rel=1e-5)
    # resuming the finished run: rank 0 reads the checkpoint and hands it to rank 1
    again = _run(cmd + ["--resume"], env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    for r in range(2):
        out = torch.load(res / f"rank{r}.pt", weights_only=True)
        assert out["resumed_from_epoch"] == 2 and len(out["history"]) == 2
        assert _same_weights_dict(out["state_dict"], r0["state_dict"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_finetune_on_cuda():
    model, head, bundle = build()
    calibrate(model, head, bundle.train, FinetuneConfig(device="cuda"))
    result = finetune(model, head, bundle, _cfg(device="cuda"))
    assert result.device.startswith("cuda")
    assert head.scale.device.type == "cuda"
    assert result.final.samples == 30


# ------------------------------------------------------------------------------------------ streaming data


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """3 classes x 8 noisy 20x18 PNGs (class = brightness), written once for the module."""
    root = tmp_path_factory.mktemp("images") / "imgs"
    write_class_folders(root, ["a", "b", "c"], 8, size=(20, 18), noise=25)
    return root


def test_finetune_streams_an_image_folder_the_same_with_any_number_of_workers(image_folder):
    runs = {}
    for workers in (0, 2):
        model, head, bundle = build_image_run(image_folder, workers=workers)
        assert bundle.kind == "images" and bundle.preprocessing.augment
        cal = calibrate(model, head, bundle.plain_train, FinetuneConfig(device="cpu"), workers=workers)
        assert cal.samples == len(bundle.train) == 18
        result = finetune(model, head, bundle, image_config(epochs=2))
        runs[workers] = (model, result)
    (m0, r0), (m2, r2) = runs[0], runs[2]
    assert _same_weights(m0, m2)  # the same batches, crops and flips with 0 or 2 workers
    assert [h.loss for h in r0.history] == [h.loss for h in r2.history]
    assert r0.final.samples == 6 and r0.final.accuracy is not None
    assert all(0 <= h.data_share <= 1 for h in r0.history + r2.history)


@pytest.mark.slow
def test_killed_image_run_with_workers_resumes_to_the_same_weights(image_folder, tmp_path):
    ckpt, res = tmp_path / "ckpt", tmp_path / "res.pt"
    base = [sys.executable, str(STREAM_WORKER), "--data", str(image_folder), "--out", str(ckpt), "--result", str(res),
            "--workers", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = _run(base + ["--kill-at-step", "7"], env=env)  # 5 steps an epoch: killed in the middle of epoch 2
    assert killed.returncode == -9, killed.stderr
    assert torch.load(ckpt / CHECKPOINT_NAME, weights_only=True)["epoch"] == 1
    assert not res.exists()
    resumed = _run(base + ["--resume"], env=env)
    assert resumed.returncode == 0, resumed.stderr
    out = torch.load(res, weights_only=True)
    assert out["resumed_from_epoch"] == 1 and [h["epoch"] for h in out["history"]] == [1, 2, 3]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers ran: conv reductions round differently with another thread count
    try:
        reference, head, bundle = build_image_run(image_folder, workers=0)  # uninterrupted, in this process
        calibrate(reference, head, bundle.plain_train, FinetuneConfig(device="cpu"))
        finetune(reference, head, bundle, image_config())
    finally:
        torch.set_num_threads(threads)
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(out["state_dict"][k], v, rtol=1e-5, atol=1e-6)


def test_unreadable_image_mid_training_stops_in_one_line_or_is_skipped(tmp_path):
    root = tmp_path / "imgs"
    write_class_folders(root, ["a", "b", "c"], 8, size=(20, 18))
    bad = root / "b" / "img_003.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
    model, head, bundle = build_image_run(root, workers=2)
    with pytest.raises(DataError) as err:
        finetune(model, head, bundle, image_config(epochs=1))
    assert str(err.value).startswith(f"cannot read image {bad}: ") and "\n" not in str(err.value)
    model, head, bundle = build_image_run(root, workers=2)
    bundle.train.skip_bad_images = True  # shared by the train/eval views' loaders
    for ds in (bundle.val, bundle.train_eval):
        ds.skip_bad_images = True
    result = finetune(model, head, bundle, image_config(epochs=2))
    assert result.skipped_images == 1 and bundle.skipped_images() == [str(bad)]
    assert len(result.history) == 2


def test_memory_mapped_npy_data_trains(tmp_path):
    _, _, blobs = build()  # the separable blobs, written as .npy files
    (tmp_path / "arrays").mkdir()
    for split, ds in (("train", blobs.train), ("val", blobs.val)):
        np.save(tmp_path / "arrays" / f"x_{split}.npy", ds.tensors[0].numpy())
        np.save(tmp_path / "arrays" / f"y_{split}.npy", ds.tensors[1].numpy())
    bundle = load_data(tmp_path / "arrays", workers=1)
    assert isinstance(bundle.train, NpyDataset) and (len(bundle.train), len(bundle.val)) == (90, 30)
    model, head, _ = build()
    start = evaluate(model, bundle.val, FinetuneConfig(device="cpu"), workers=1).accuracy
    calibrate(model, head, bundle.train, FinetuneConfig(device="cpu"), workers=1)
    result = finetune(model, head, bundle, _cfg(epochs=3))
    assert result.final.accuracy > start and result.final.accuracy >= 0.8
    reference, head, tensors = build()  # the same run on the in-memory tensors: the same weights
    calibrate(reference, head, tensors.train, FinetuneConfig(device="cpu"))
    finetune(reference, head, tensors, _cfg(epochs=3))
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)


def test_calibrate_streams_a_bounded_seeded_subset(image_folder):
    model, head, bundle = build_image_run(image_folder, workers=0)
    a = calibrate(model, head, bundle.plain_train, FinetuneConfig(device="cpu", seed=1), max_samples=10)
    assert a.samples == 10
    scale = float(head.scale.detach())
    model, head, bundle = build_image_run(image_folder, workers=1)
    b = calibrate(model, head, bundle.plain_train, FinetuneConfig(device="cpu", seed=1), max_samples=10,
                  workers=1)
    assert b.samples == 10 and float(head.scale.detach()) == scale and b.loss_after == a.loss_after


# ------------------------------------------------------------------------------------------ precision, memory format


def test_resolve_precision():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16" and resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(TrainingError, match="unknown precision 'half'; pass --precision auto, fp32, bf16 or fp16"):
        resolve_precision("half", cpu)
    with pytest.raises(TrainingError, match="class-lr computes its own per-class gradients in fp32"):
        resolve_precision("bf16", cpu, optimizer="class-lr")
    if torch.cuda.is_available():
        expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        assert resolve_precision("auto", "cuda") == expected
        assert resolve_precision("auto", "cuda", optimizer="class-lr") == "fp32"


def test_bf16_autocast_trains_fp32_weights_on_cpu():
    fp32, _, bundle = build()
    finetune(fp32, fp32[5], bundle, _cfg(epochs=2, precision="fp32"))
    model, head, bundle = build()
    result = finetune(model, head, bundle, _cfg(epochs=2, precision="bf16"))
    assert result.precision == "bf16"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not _same_weights(model, fp32)  # the matmuls ran in bf16
    assert result.final.accuracy >= 0.8 and result.history[-1].loss < result.history[0].loss * 1.5


def test_fp16_loss_scaling_is_checkpointed_and_resumes(tmp_path):
    reference, head, bundle = build()
    finetune(reference, head, bundle, _cfg(epochs=3, precision="fp16"))
    model, head, bundle = build()
    with pytest.raises(KeyboardInterrupt):
        finetune(model, head, bundle, _cfg(epochs=3, precision="fp16", out_dir=tmp_path),
                 progress=_Recorder(at=16, action=_interrupt))
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert saved["precision"] == "fp16" and saved["scaler"]["scale"] > 0
    model, head, bundle = build()
    with pytest.raises(TrainingError, match="was written with precision='fp16' but this run has precision='fp32'"):
        finetune(model, head, bundle, _cfg(epochs=3, precision="fp32", out_dir=tmp_path, resume=True))
    result = finetune(model, head, bundle, _cfg(epochs=3, precision="fp16", out_dir=tmp_path, resume=True))
    assert result.resumed_from_epoch == 1 and result.precision == "fp16"
    assert _same_weights(model, reference)


def test_channels_last_trains_and_hands_back_contiguous_weights(image_folder):
    teacher, _, bundle = build_image_run(image_folder, workers=0, seed=1)
    runs = {}
    for channels_last in (True, False):
        model, head, bundle = build_image_run(image_folder, workers=0)
        result = finetune(model, head, bundle, image_config(epochs=1, channels_last=channels_last, distill=True),
                          teacher=teacher)
        assert result.channels_last is channels_last
        # conv weights (O, I, kH, kW) in channels_last are not contiguous: both models are handed back contiguous
        assert all(t.is_contiguous() for m in (model, teacher) for t in m.state_dict().values())
        runs[channels_last] = model
    for k, v in runs[False].state_dict().items():  # the same training, up to float reassociation
        torch.testing.assert_close(runs[True].state_dict()[k], v, rtol=1e-4, atol=1e-5)
    default = finetune(*build_image_run(image_folder, workers=0)[:3], image_config(epochs=0))
    assert not default.channels_last  # None: channels_last on CUDA only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_precision_and_channels_last_on_cuda_by_default(image_folder):
    model, head, bundle = build_image_run(image_folder, workers=1)
    result = finetune(model, head, bundle, image_config(epochs=1, device="cuda"))
    assert result.precision in ("bf16", "fp16") and result.channels_last
    assert all(t.is_contiguous() for t in model.state_dict().values())
    assert result.final.samples == 6


# ------------------------------------------------------------------------------------------ shipped samples

SAMPLES = REPO / "sample_models"


def _sample_run(name: str, data: Path, config: FinetuneConfig) -> dict[str, float]:
    """The pipeline's path on a shipped sample: swap (α, b fitted on features), calibrate, fine-tune."""
    from fyc_convert.data.datasets import check_data, load_data
    from fyc_convert.model.loading import load_model
    from fyc_convert.model.surgery import capture_features, swap_classifier

    meta = torch.load(SAMPLES / f"{name}.pt", weights_only=True)["meta"]
    model = load_model(SAMPLES / f"{name}.pt", arch=meta["arch"]).model
    bundle = load_data(data, input_shape=meta["input_shape"], mean=meta.get("mean"), std=meta.get("std"))
    check_data(bundle, num_classes=len(meta["classes"]), input_shape=tuple(meta["input_shape"]))
    original = copy.deepcopy(model)
    swap = swap_classifier(model, layer="fc", features=capture_features(model, "fc", bundle.train.tensors[0][:2048]))
    assert bundle.preprocessing.sources["mean"] == "option" and not bundle.preprocessing.augment
    acc = {"original": evaluate(original, bundle.val, FinetuneConfig(device="cpu")).accuracy,
           "swapped": evaluate(model, bundle.val, FinetuneConfig(device="cpu")).accuracy}
    calibrate(model, swap.head, bundle.train, FinetuneConfig(device="cpu"))
    acc["calibrated"] = evaluate(model, bundle.val, FinetuneConfig(device="cpu")).accuracy
    result = finetune(model, swap.head, bundle, config, teacher=original)
    acc["finetuned"] = result.final.accuracy
    acc["agreement"] = result.final.agreement
    return acc


@pytest.fixture(scope="module")
def digits_run() -> dict[str, float]:
    config = _cfg(epochs=10, batch_size=64, lr=None, distill=True, temperature=2.0)
    return _sample_run("digits_cnn", SAMPLES / "digits.npz", config)


@pytest.mark.slow
def test_digits_sample_fine_tuned_within_half_a_point_of_the_original(digits_run):
    assert digits_run["original"] >= 0.99
    assert digits_run["calibrated"] > digits_run["swapped"]
    assert digits_run["finetuned"] >= digits_run["original"] - 0.005
    assert digits_run["agreement"] >= 0.98


@pytest.mark.slow
def test_digits_sample_calibration_alone_reaches_95_percent(digits_run):
    assert digits_run["calibrated"] >= 0.95


# ------------------------------------------------------------------------------------------ options reach every stage


def _convert_without_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **options) -> nn.Module:
    """convert() on the digits sample up to the export (stubbed out): the converted model as it would be exported."""
    from fyc_convert import pipeline
    from fyc_convert.pipeline import convert

    seen: list[nn.Module] = []
    monkeypatch.setattr(pipeline, "_export_and_verify", lambda model, *a, **k: seen.append(model))
    convert(SAMPLES / "digits_cnn.pt", arch="sample_models.archs:digits_cnn", data=SAMPLES / "digits.npz",
            output_dir=tmp_path / f"out{len(list(tmp_path.iterdir()))}", device="cpu", **options)
    assert len(seen) == 1
    return seen[0]


def _alpha(model: nn.Module) -> float:
    return float(model.fc.scale.detach())


def test_temperature_and_distill_weight_reach_calibration(tmp_path, monkeypatch):
    # epochs 0: the exported α is the calibrated one; it depends on the KL's temperature and weight
    base = _alpha(_convert_without_export(tmp_path, monkeypatch, epochs=0, distill=True))
    same = _alpha(_convert_without_export(tmp_path, monkeypatch, epochs=0, distill=True, temperature=4.0,
                                          distill_weight=0.5))
    hot = _alpha(_convert_without_export(tmp_path, monkeypatch, epochs=0, distill=True, temperature=1.0))
    heavy = _alpha(_convert_without_export(tmp_path, monkeypatch, epochs=0, distill=True, distill_weight=1.0))
    assert same == base
    assert abs(hot - base) > 1e-3 * abs(base) and abs(heavy - base) > 1e-3 * abs(base)


def test_eval_batch_size_is_what_every_evaluation_uses(tmp_path, monkeypatch):
    from fyc_convert.train import finetune as loop

    sizes: list[int] = []
    make_loader = loop.make_loader

    def recording(data, *, batch_size, **kw):
        if not kw.get("shuffle"):  # every pass but the training one: evaluations and calibration's feature pass
            sizes.append(batch_size)
        return make_loader(data, batch_size=batch_size, **kw)

    monkeypatch.setattr(loop, "make_loader", recording)
    _convert_without_export(tmp_path, monkeypatch, epochs=1, eval_batch_size=50)
    # original, swapped, calibrated, after epoch 1, fine-tuned, agreement: 6 evaluations + the feature pass
    assert len(sizes) >= 7 and set(sizes) == {50}


def test_a_run_ending_below_its_calibration_says_so_and_what_to_try(tmp_path, monkeypatch):
    from fyc_convert import pipeline

    reports = []
    real = pipeline._finetune

    def keep_report(*args, report, **kw):
        reports.append(report)
        return real(*args, report=report, **kw)

    monkeypatch.setattr(pipeline, "_finetune", keep_report)
    # plain SGD at lr 3 wrecks the calibrated head in one epoch (nothing earlier to keep: one epoch)
    _convert_without_export(tmp_path, monkeypatch, epochs=1, lr=3.0, optimizer="sgd", distill=False)
    acc = reports[0].accuracy
    assert acc.finetuned < acc.calibrated
    line = (f"fine-tuning ended at {100 * acc.finetuned:.2f}%, below the calibrated {100 * acc.calibrated:.2f}%; "
            "try --no-augment, --epochs auto or a lower --lr (e.g. 0.75)")
    assert line in reports[0].notes


# ------------------------------------------------------------------------------------------ the resume contract


def test_run_state_and_checkpoint_mismatches_read_alike(tmp_path):
    from fyc_convert.options import ConvertOptions
    from fyc_convert.report import AccuracyReport
    from fyc_convert.train.run_state import RUN_STATE, read_run_state, write_run_state

    opts = ConvertOptions(data=Path("d.npz"), temperature=2.0)
    write_run_state(tmp_path / "checkpoints", opts, dataclasses.asdict(AccuracyReport(original=0.9)))
    assert read_run_state(tmp_path / "checkpoints", opts)["accuracy"]["original"] == 0.9
    with pytest.raises(TrainingError) as job:
        read_run_state(tmp_path / "checkpoints", dataclasses.replace(opts, temperature=3.0))
    assert str(job.value) == (f"the interrupted run in {tmp_path} was written with temperature=2.0 but this run has "
                              "temperature=3.0; resume with the same options or start over (--force instead of "
                              "--resume)")
    # a run state written before temperature and distill_weight were recorded still resumes
    path = tmp_path / "checkpoints" / RUN_STATE
    state = json.loads(path.read_text())
    del state["options"]["temperature"], state["options"]["distill_weight"]
    path.write_text(json.dumps(state))
    assert read_run_state(tmp_path / "checkpoints", dataclasses.replace(opts, temperature=3.0)) is not None

    model, head, bundle = build()
    finetune(model, head, bundle, _cfg(epochs=1, out_dir=tmp_path / "loop"))
    with pytest.raises(TrainingError) as loop:
        finetune(model, head, bundle, _cfg(epochs=1, temperature=3.0, out_dir=tmp_path / "loop", resume=True))
    assert str(loop.value) == (f"checkpoint {tmp_path / 'loop' / CHECKPOINT_NAME} was written with temperature=4.0 "
                               "but this run has temperature=3.0; resume with the same options or start over "
                               "(--force instead of --resume)")

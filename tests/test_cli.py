"""The command line as a user meets it: one full run on the digits sample, dry runs, refusals, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from fyc_convert.cli import app
from fyc_convert.head.heads import HadamardHead
from fyc_convert.head.record import decode_heads
from fyc_convert.model.loading import load_model
from fyc_convert.model.weights import load_converted

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_models" / "digits_cnn.pt"
DATA = ROOT / "sample_models" / "digits.npz"
ARCH = "sample_models.archs:digits_cnn"
runner = CliRunner()


def _run(*args: str | Path) -> object:
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("cli") / "digits_fyc"
    result = _run(SAMPLE, "--arch", ARCH, "--data", DATA, "--epochs", "1", "-o", out, "--bench", "--quiet")
    return out, result


@pytest.mark.slow
def test_full_run_writes_every_output(full_run: tuple[Path, object]) -> None:
    out, result = full_run
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir() if p.is_file())
    assert names == ["model.onnx", "model.safetensors", "original.onnx", "report.json"]
    assert not (out / "checkpoints").exists(), "the training state outlived a verified run"
    assert not list(out.glob(".*.tmp")), "temporary files left behind"


@pytest.mark.slow
def test_full_run_report_values(full_run: tuple[Path, object]) -> None:
    out, _ = full_run
    rep = json.loads((out / "report.json").read_text())
    for key in ("status", "checkpoint", "head", "layer", "in_features", "num_classes", "hadamard_size", "params",
                "onnx", "accuracy", "latency_ms", "files", "coherence", "elapsed_s"):
        assert key in rep, key
    assert rep["status"] == "ok" and rep["head"] == "hadamard" and rep["layer"] == "fc"
    fc = load_model(SAMPLE, arch=ARCH).model.fc
    n_feat, n_cls = fc.in_features, fc.out_features
    assert (rep["in_features"], rep["num_classes"]) == (n_feat, n_cls) and n_cls == 10
    p = rep["params"]
    assert p["original"] == sum(t.numel() for t in load_model(SAMPLE, arch=ARCH).model.parameters())
    assert p["head_before"] == n_feat * n_cls + n_cls and p["head_after"] == 1 + n_cls
    assert p["original"] - p["converted"] == p["removed"] == n_feat * n_cls - 1
    assert p["removed_pct"] == pytest.approx(100 * p["removed"] / p["original"], abs=1e-3)
    o = rep["onnx"]
    assert o["converted_bytes"] == (out / "model.onnx").stat().st_size
    assert o["original_bytes"] == (out / "original.onnx").stat().st_size
    n, c, emb = rep["in_features"], rep["num_classes"], rep["embed_size"]
    # The bound: at least 4·N·C − 4·(C + n) − 16 KiB smaller (a 128→10 head saves ~5 KB of weights but
    # its add/sub graph costs a few KB of node descriptions, so here the bound only caps the growth).
    assert o["original_bytes"] - o["converted_bytes"] >= 4 * n * c - 4 * (c + emb) - 16 * 1024
    assert o["size_reduction_pct"] == pytest.approx(100 * (1 - o["converted_bytes"] / o["original_bytes"]), abs=1e-3)
    assert o["max_abs_diff"] < 1e-4
    assert not {"MatMul", "Gemm", "Conv"} & set(o["head_ops"]) and o["head_ops"].get("Add", 0) > 0
    a = rep["accuracy"]
    for k in ("original", "swapped", "calibrated", "finetuned", "agreement"):
        assert 0.0 <= a[k] <= 1.0, k
    assert a["original"] >= 0.95  # accuracy targets of calibration/fine-tuning are tested in test_finetune.py
    assert rep["training"]["epochs"] == 1 and len(rep["training"]["history"]) == 1
    lat = rep["latency_ms"]
    assert lat["model_b1"]["original"] > 0 and lat["head_b64"]["converted"] > 0


@pytest.mark.slow
def test_full_run_onnx_and_safetensors_match_the_converted_model(full_run: tuple[Path, object]) -> None:
    out, _ = full_run
    # The original architecture + the written weights = the converted model (head rebuilt from the header).
    model = load_converted(load_model(SAMPLE, arch=ARCH).model, out / "model.safetensors")
    assert isinstance(model.fc, HadamardHead)
    state = load_file(str(out / "model.safetensors"))
    assert torch.equal(model.fc.rows, state["fc.rows"]) and torch.equal(model.fc.scale, state["fc.scale"])
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    rep = json.loads((out / "report.json").read_text())
    (record,) = decode_heads(meta)
    assert meta["fyc_convert.head"] == "hadamard" and record.layer == "fc"
    assert record.in_features == model.fc.in_features and record.num_classes == 10
    assert record.hadamard_size == rep["hadamard_size"] == model.fc.hadamard_size
    x = np.load(DATA)["x_val"][:16].astype(np.float32)
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_existing_output_folder_needs_force(full_run: tuple[Path, object]) -> None:
    out, _ = full_run
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    result = runner.invoke(app, [str(SAMPLE), "--arch", ARCH, "-o", str(out)])
    assert result.exit_code == 1
    assert "--force" in result.output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched


def test_dry_run_writes_only_the_report(tmp_path: Path) -> None:
    rep_path = tmp_path / "r.json"
    out = tmp_path / "never"
    result = _run(SAMPLE, "--arch", ARCH, "--dry-run", "--report", rep_path, "-o", out)
    assert result.exit_code == 0, result.output
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    rep = json.loads(rep_path.read_text())
    assert rep["status"] == "dry_run" and rep["onnx"] is None
    fc = load_model(SAMPLE, arch=ARCH).model.fc
    assert rep["params"]["removed"] == fc.in_features * fc.out_features - 1
    assert rep["accuracy"]["original"] is None


def test_hadamard_size_option(tmp_path: Path) -> None:
    rep_path = tmp_path / "r.json"
    result = _run(SAMPLE, "--arch", ARCH, "--dry-run", "--report", rep_path, "--hadamard-size", "16")
    assert result.exit_code == 0, result.output
    rep = json.loads(rep_path.read_text())
    assert (rep["hadamard_size"], rep["embed_size"], rep["in_features"]) == (16, 64, 64)  # the 4-to-1 fold
    for args, message in [(("--hadamard-size", "1000"), "power of two"),
                          (("--head", "orthogonal", "--hadamard-size", "16"), "hadamard head only")]:
        result = _run(SAMPLE, "--arch", ARCH, "--dry-run", "--report", tmp_path / "x.json", *args)
        assert result.exit_code == 2 and message in result.output  # a bad option: a usage error
        assert "Traceback" not in result.output and not (tmp_path / "x.json").exists()


def test_without_data_accuracy_is_not_measured(tmp_path: Path) -> None:
    out = tmp_path / "o"
    result = _run(SAMPLE, "--arch", ARCH, "-o", out, "--quiet")
    assert result.exit_code == 0, result.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["accuracy"]["finetuned"] is None and rep["accuracy"]["measured_on"] is None
    assert any("accuracy not measured" in n for n in rep["notes"])


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--head", "dense"], 2, "dense"),  # usage error from Typer
        (["--input-shape", "3,a"], 2, "shape"),
        (["--epochs", "-1"], 2, "epochs"),
    ],
)
def test_usage_errors_exit_2(args: list[str], code: int, needle: str, tmp_path: Path) -> None:
    result = runner.invoke(app, [str(SAMPLE), "--arch", ARCH, "-o", str(tmp_path / "o"), *args])
    assert result.exit_code == code
    assert needle in result.output


@pytest.mark.slow
def test_missing_checkpoint_exits_1_with_one_line(tmp_path: Path, cli) -> None:
    proc = cli(tmp_path / "nope.pt", "-o", tmp_path / "o")
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def _export_a_wrong_head_bias(monkeypatch: pytest.MonkeyPatch) -> None:
    """Export every head with a bias 0.5 off the PyTorch model's (the ONNX graph is wrong, the model is fine)."""
    import dataclasses

    from fyc_convert.export import onnx_head

    real = onnx_head.HeadSpec.from_module.__func__

    def tampered(cls, head):
        spec = real(cls, head)
        return dataclasses.replace(spec, bias=spec.bias + 0.5)

    monkeypatch.setattr(onnx_head.HeadSpec, "from_module", classmethod(tampered))


@pytest.mark.slow
def test_verification_failure_exits_3_and_keeps_only_failed_name(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _export_a_wrong_head_bias(monkeypatch)  # the real onnxruntime comparison must catch it
    out = tmp_path / "o"
    result = runner.invoke(app, [str(SAMPLE), "--arch", ARCH, "-o", str(out), "--quiet"])
    assert result.exit_code == 3, result.output
    assert (out / "model.failed.onnx").exists() and not (out / "model.onnx").exists()
    rep = json.loads((out / "report.json").read_text())
    assert rep["status"] == "verification_failed" and rep["onnx"]["max_abs_diff"] >= 0.4
    assert rep["elapsed_s"] > 0
    # the PyTorch model is fine: its weights are saved for whoever debugs the export
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["model.failed.onnx", "model.safetensors",
                                                                    "original.onnx", "report.json"]
    assert load_converted(load_model(SAMPLE, arch=ARCH).model, out / "model.safetensors").fc.num_classes == 10


@pytest.mark.slow
def test_verification_failure_after_training_keeps_the_training_state(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed export keeps checkpoints/ (and lists it): --resume then redoes the export without training."""
    _export_a_wrong_head_bias(monkeypatch)
    out = tmp_path / "o"
    result = runner.invoke(app, [str(SAMPLE), "--arch", ARCH, "--data", str(DATA), "--epochs", "1", "-o", str(out),
                                 "--quiet"])
    assert result.exit_code == 3, result.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["files"]["checkpoints"] == str(out / "checkpoints")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["finetune.pt", "run.json"]


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="needs a non-root user")
def test_read_only_output_folder_exits_1(cli) -> None:
    base = Path(tempfile.mkdtemp(dir="/tmp"))  # world-traversable, unlike pytest's tmp_path under root
    try:
        base.chmod(0o755)
        out = base / "ro"
        out.mkdir()
        out.chmod(0o555)
        user = "65534" if os.geteuid() == 0 else None  # root ignores permissions: run as nobody
        proc = cli(SAMPLE, "--arch", ARCH, "-o", out, "--quiet", user=user)
        assert proc.returncode == 1, proc.stderr
        assert "not writable" in proc.stderr and "Traceback" not in proc.stderr
        assert list(out.iterdir()) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_leaves_no_half_written_file(sig: int, code: int, tmp_path: Path) -> None:
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "fyc_convert", str(SAMPLE), "--arch", ARCH, "--data", str(DATA),
                             "--epochs", "3", "-o", str(out), "--quiet"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Interrupt once training has written its first checkpoint, i.e. in the middle of the run.
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not list((out / "checkpoints").glob("*")):
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "--resume finishes the run" in err and "Traceback" not in err
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == [], leftovers
    assert not (out / "model.onnx").exists() and not (out / "report.json").exists()
    for ckpt in (out / "checkpoints").glob("*.pt"):
        torch.load(ckpt, weights_only=False)  # complete files only: each loads
    for state in (out / "checkpoints").glob("*.json"):
        json.loads(state.read_text())


def test_the_live_bar_labels_training_accuracy_as_such() -> None:
    # the bar shows accuracy on the augmented training batches; the epoch line after it says "val acc"
    from rich.progress import Progress

    from fyc_convert.cli import _MetricsColumn

    with Progress(disable=True) as bars:
        task = bars.add_task("epoch 1/3", total=10, loss=0.25, acc=0.875, samples_per_s=1234.0)
        text = _MetricsColumn().render(bars.tasks[task]).plain
    assert text == "loss 0.2500  train acc 87.50%  1,234 samples/s"


@pytest.mark.parametrize("adapter", ["auto", "on"])
def test_adapter_option_counts_the_map_in_the_classifier(tmp_path: Path, adapter: str) -> None:
    """--adapter on gives the head a learned map (the rule's width: at least N, so 64 x 64 for 10 classes; 4,160
    more parameters, said in a note); auto leaves the digits head (10 classes on 64 features) without one."""
    rep_path = tmp_path / "r.json"
    result = _run(SAMPLE, "--arch", ARCH, "--dry-run", "--report", rep_path, "--adapter", adapter)
    assert result.exit_code == 0, result.output
    rep = json.loads(rep_path.read_text())
    extra = 64 * 64 + 64 if adapter == "on" else 0
    assert rep["params"]["head_after"] == 1 + 10 + extra
    said = [n for n in rep["notes"] if "learned 64 → 64 map" in n]
    assert len(said) == (adapter == "on") and (not said or said[0].endswith("--adapter on"))

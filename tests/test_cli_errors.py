"""Every way a user can get an option or a run wrong: one line on stderr, the right exit code, no traceback, and
nothing left behind (no output folder, no partial file). Each case runs the real command in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fyc_convert import convert
from fyc_convert.cli import app
from fyc_convert.errors import CheckpointError, OptionsError
from fyc_convert.model.weights import load_converted

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_models" / "digits_cnn.pt"
DATA = ROOT / "sample_models" / "digits.npz"
ARCH = "sample_models.archs:digits_cnn"


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    return lines[0]


# (flags, exit code, a word the message must contain)
BAD = [
    (["--epochs", "-1"], 2, "--epochs"),
    (["--epochs", "abc"], 2, "--epochs"),
    (["--epochs", "1.5"], 2, "--epochs"),
    (["--batch-size", "0"], 2, "--batch-size"),
    (["--batch-size", "x"], 2, "--batch-size"),
    (["--lr", "-1"], 2, "--lr"),
    (["--lr", "0"], 2, "--lr"),
    (["--lr", "nan"], 2, "--lr"),
    (["--lr", "inf"], 2, "--lr"),
    (["--lr", "fast"], 2, "--lr"),
    (["--val-split", "1"], 2, "--val-split"),
    (["--val-split", "-0.1"], 2, "--val-split"),
    (["--fixed-scale", "0"], 2, "--fixed-scale"),
    (["--fixed-scale", "-2"], 2, "--fixed-scale"),
    (["--hadamard-size", "1000"], 2, "power of two"),
    (["--hadamard-size", "1"], 2, "power of two"),
    (["--hadamard-size", "-8"], 2, "power of two"),
    (["--head", "orthogonal", "--hadamard-size", "16"], 2, "hadamard head only"),
    (["--opset", "5"], 2, "--opset"),
    (["--opset", "99"], 2, "--opset"),
    (["--opset", "x"], 2, "--opset"),
    (["--atol", "-1"], 2, "--atol"),
    (["--rtol", "nan"], 2, "--rtol"),
    (["--seed", "-1"], 2, "--seed"),
    (["--input-shape", "3,a"], 2, "shape"),
    (["--input-shape", "0,8,8"], 2, "shape"),
    (["--class-lr-eta-mu", "0"], 2, "--class-lr-eta-mu"),
    (["--class-lr-cutoff", "-1"], 2, "--class-lr-cutoff"),
    (["--class-lr-layers", ","], 2, "--class-lr-layers"),
    (["--head", "dense"], 2, "--head"),
    (["--optimizer", "rmsprop"], 2, "--optimizer"),
    (["--device", "tpu"], 2, "--device"),
    (["--dtype", "int8"], 2, "--dtype"),
    (["--quantize", "int4"], 2, "--quantize"),
    (["--quantize", "int8", "--dtype", "fp16"], 2, "drop --dtype fp16"),
    (["--int8-max-drop", "-1"], 2, "--int8-max-drop"),
    (["--bogus"], 2, "--bogus"),
    (["--resume", "--dry-run"], 2, "--resume"),
    (["--report", "/nonexistent/dir/r.json"], 2, "does not exist"),
    (["--arch-kwargs", "{bad"], 1, "--arch-kwargs"),
    (["--arch-kwargs", "[1]"], 1, "--arch-kwargs"),
    (["--data", "/nonexistent/data.npz"], 1, "data not found"),
]
if not __import__("torch").cuda.is_available():
    BAD.append((["--device", "cuda"], 2, "CUDA"))


@pytest.mark.slow
@pytest.mark.parametrize(("flags", "code", "needle"), BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_option_exits_before_any_work(flags: list[str], code: int, needle: str, tmp_path: Path, cli) -> None:
    out = tmp_path / "o"
    t0 = time.perf_counter()
    proc = cli(SAMPLE, "--arch", ARCH, "--data", DATA, "-o", out, *flags)
    line = _one_error_line(proc)
    assert proc.returncode == code, proc.stderr
    assert needle in line, line
    assert not out.exists()
    assert time.perf_counter() - t0 < 60  # refused up front, not after training (a generous bound)


@pytest.mark.slow
def test_report_path_that_is_a_folder(tmp_path: Path, cli) -> None:
    proc = cli(SAMPLE, "--arch", ARCH, "--dry-run", "--report", tmp_path)
    assert proc.returncode == 2 and "is a folder" in _one_error_line(proc)


@pytest.mark.slow
def test_missing_checkpoint(tmp_path: Path, cli) -> None:
    proc = cli(tmp_path / "nope.pt", "-o", tmp_path / "o")
    assert proc.returncode == 1 and "nope.pt" in _one_error_line(proc)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_model_that_fails_on_the_data_leaves_no_folder(tmp_path: Path, cli) -> None:
    # Runs on the 2-sample probe that finds the classifier, fails on real batches (feature capture).
    arch = tmp_path / "badarch.py"
    arch.write_text(textwrap.dedent("""
        import torch
        from sample_models.archs import DigitsCNN

        class Fragile(DigitsCNN):
            def forward(self, x):
                if x.shape[0] > 2:
                    raise RuntimeError("boom: this model only takes tiny batches")
                return super().forward(x)

        def build():
            return Fragile()
    """))
    out = tmp_path / "o"
    proc = cli(SAMPLE, "--arch", f"{arch}:build", "--data", DATA, "-o", out)
    line = _one_error_line(proc)
    assert proc.returncode == 1 and "failed during" in line and "boom" in line, line
    assert not out.exists()


@pytest.mark.slow
def test_ignored_options_are_said_on_stderr_and_in_the_report(tmp_path: Path, cli) -> None:
    out = tmp_path / "o"
    proc = cli(SAMPLE, "--arch", ARCH, "-o", out, "--quiet", "--epochs", "2", "--lr", "0.1", "--distill",
                "--class-lr-eta-mu", "100")
    assert proc.returncode == 0, proc.stderr
    notes = [ln for ln in proc.stderr.splitlines() if ln.startswith("note:")]
    assert any("--epochs, --lr, --distill ignored" in n for n in notes), proc.stderr
    assert any("--class-lr-eta-mu ignored" in n for n in notes), proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert any("--epochs, --lr, --distill ignored" in n for n in report["notes"])


@pytest.mark.slow
def test_fp16_tolerance_is_said(tmp_path: Path, cli) -> None:
    proc = cli(SAMPLE, "--arch", ARCH, "--dry-run", "--dtype", "fp16")
    assert proc.returncode == 0, proc.stderr
    assert "tolerance is atol 0.05" in proc.stderr


def test_save_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors import SafetensorError

    import fyc_convert.model.weights as weights

    def broken(*_a, **_k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(weights, "save_file", broken)
    out = tmp_path / "o"
    result = CliRunner().invoke(app, [str(SAMPLE), "--arch", ARCH, "-o", str(out), "--quiet"])
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and "model.safetensors" in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()  # nothing was moved into place: the folder it created is gone again


def test_unknown_convert_keyword_is_an_options_error(tmp_path: Path) -> None:
    with pytest.raises(OptionsError, match="unknown option 'epoch'.*epochs"):
        convert(SAMPLE, arch=ARCH, epoch=3, output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_partial_safetensors_header_is_a_checkpoint_error(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from fyc_convert.model.loading import load_model

    model = load_model(SAMPLE, arch=ARCH).model
    path = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"fyc_convert.head": "hadamard", "fyc_convert.heads": '[{"kind": "hadamard", "layer": "fc"}]'})
    with pytest.raises(CheckpointError, match="lacks in_features, num_classes, hadamard_size, embedding for head 'fc'"):
        load_converted(model, path)


@pytest.mark.slow
def test_torchrun_failure_on_rank0_ends_every_rank(tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "user-file.txt").write_text("keep me")  # an existing folder without --force: rank 0 refuses
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "fyc_convert", str(SAMPLE), "--arch", ARCH, "--data", str(DATA), "-o", str(out),
                           "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    elapsed = time.perf_counter() - t0
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:") and "already exists" in ln]
    assert len(errors) == 2, proc.stderr  # both ranks end with rank 0's one-line error
    assert elapsed < 120, elapsed  # promptly: not after a collective's 30-minute timeout
    assert sorted(p.name for p in out.iterdir()) == ["user-file.txt"]

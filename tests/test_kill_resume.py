"""A run killed (SIGKILL) at any moment leaves nothing misleading, and the next run finishes it.

The digits job is killed at moments spread over its stages (found by watching its progress lines and its training
checkpoint), then the folder is checked: no `model.onnx` without a verified `report.json`, every file under a final
name complete. A copy of the folder is finished with `--resume`, another with `--force`; both must exit 0 with
exactly the accuracy of an uninterrupted run (CPU training is deterministic), leaving no temporary name behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import onnx
import pytest
import torch
from safetensors import safe_open

from fyc_convert.files import is_temp_name

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_models" / "digits_cnn.pt"
DATA = ROOT / "sample_models" / "digits.npz"
ARCH = "sample_models.archs:digits_cnn"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FINAL = ("original.onnx", "model.onnx", "model.failed.onnx", "model.safetensors", "report.json")


def _args(out: Path, bench: bool) -> list[str]:
    return [sys.executable, "-m", "fyc_convert", str(SAMPLE), "--arch", ARCH, "--data", str(DATA), "--epochs", "2",
            "-o", str(out), *(["--bench"] if bench else [])]


def _run(out: Path, *extra: str, bench: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([*_args(out, bench), *extra], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=ENV)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("reference") / "o"
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr
    return json.loads((out / "report.json").read_text())


def _kill_at(out: Path, *, after: str, delay: float, bench: bool) -> int | None:
    """Start the job, SIGKILL it `delay` s after its output shows `after`; returns the exit code (None if killed).

    `after` is a progress line's start ("· calibrating") or "checkpoint N" for the N-th write of the training
    checkpoint (0: the starting point written before epoch 1; 1: after epoch 1).
    """
    proc = subprocess.Popen(_args(out, bench), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV)
    seen = threading.Event()
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith(after):
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.time() + 300
    if after.startswith("checkpoint"):
        want, inodes = int(after.split()[1]) + 1, set()
        ckpt = out / "checkpoints" / "finetune.pt"
        while proc.poll() is None and time.time() < deadline and len(inodes) < want:
            try:
                st = ckpt.stat()
                inodes.add((st.st_ino, st.st_mtime_ns))
            except FileNotFoundError:
                pass
            time.sleep(0.005)
    else:
        while proc.poll() is None and time.time() < deadline and not seen.wait(0.01):
            pass
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    code = proc.wait(timeout=60)
    reader.join(timeout=10)
    return None if code == -signal.SIGKILL else code


def _assert_nothing_misleading(out: Path) -> None:
    if not out.exists():
        return
    if (out / "model.onnx").exists():
        report = json.loads((out / "report.json").read_text())  # a model.onnx only beside its verified report
        assert report["status"] == "ok" and report["onnx"]["max_abs_diff"] < 1e-4
    for name in FINAL:  # everything under a final name is complete
        path = out / name
        if not path.exists():
            continue
        if name.endswith(".onnx"):
            onnx.checker.check_model(onnx.load(str(path)))
        elif name.endswith(".safetensors"):
            with safe_open(str(path), "pt") as f:
                assert f.metadata()["fyc_convert.head"] == "hadamard"
        else:
            json.loads(path.read_text())
    for ckpt in (out / "checkpoints").glob("*.pt"):
        torch.load(ckpt, map_location="cpu", weights_only=True)
    for state in (out / "checkpoints").glob("*.json"):
        json.loads(state.read_text())


def _assert_finished(out: Path, proc: subprocess.CompletedProcess, reference: dict) -> dict:
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok"
    assert report["accuracy"]["finetuned"] == reference["accuracy"]["finetuned"]
    assert report["accuracy"]["calibrated"] == reference["accuracy"]["calibrated"]
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["model.onnx", "model.safetensors",
                                                                    "original.onnx", "report.json"]
    assert not (out / "checkpoints").exists()  # the training state served --resume only: removed once verified
    leftovers = [p.name for p in out.iterdir() if is_temp_name(p.name)]
    assert leftovers == []
    return report


MOMENTS = [
    ("· loading", 0.0, False),
    ("· swapping", 0.3, False),
    ("· calibrating", 0.2, False),
    ("checkpoint 0", 0.5, False),  # in the middle of epoch 1
    ("checkpoint 1", 0.0, False),  # epoch 1 saved, epoch 2 starting
    ("checkpoint 2", 0.0, False),  # training finished, final evaluation
    ("· exporting", 0.1, False),
    ("· saving", 0.0, False),
    ("· verifying", 0.1, False),
    ("· benchmarking", 0.3, True),  # after verification, before the report and the renames
]


@pytest.mark.slow
@pytest.mark.parametrize(("after", "delay", "bench"), MOMENTS, ids=[f"{m[0].strip('· ')}+{m[1]}s" for m in MOMENTS])
def test_kill_anywhere_then_resume_or_force(after: str, delay: float, bench: bool, tmp_path: Path,
                                            reference: dict) -> None:
    out = tmp_path / "o"
    code = _kill_at(out, after=after, delay=delay, bench=bench)
    assert code is None, f"the job ended ({code}) before the kill at {after} + {delay} s"
    _assert_nothing_misleading(out)
    forced = tmp_path / "forced"
    if out.exists():
        shutil.copytree(out, forced)
    report = _assert_finished(out, _run(out, "--resume", bench=bench), reference)
    if (tmp_path / "o" / "checkpoints" / "run.json").exists() and after.startswith("checkpoint"):
        assert report["resumed"], report  # the report says what was taken from the interrupted run
    _assert_finished(forced, _run(forced, "--force", bench=bench), reference)

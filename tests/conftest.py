"""Fixtures shared by the test modules, and the test suite's two speeds.

    python -m pytest -m "not slow"   # the fast inner loop: in-process tests, no end-to-end subprocess runs
    python -m pytest                 # everything (CI): the slow end-to-end, subprocess, kill and torchrun tests too

A test that starts the CLI in a subprocess, trains a sample end to end, kills a run, or launches torchrun is
marked `@pytest.mark.slow` (or its module has `pytestmark = pytest.mark.slow`).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sample:
    """A shipped sample: its checkpoint, the --arch that builds it, and its data."""

    checkpoint: Path
    arch: str
    data: Path

    def args(self, *, data: bool = True) -> list[str]:
        """The CLI arguments that name it: CHECKPOINT --arch ARCH [--data DATA]."""
        return [str(self.checkpoint), "--arch", self.arch, *(["--data", str(self.data)] if data else [])]


DIGITS = Sample(ROOT / "sample_models" / "digits_cnn.pt", "sample_models.archs:digits_cnn",
                ROOT / "sample_models" / "digits.npz")


@pytest.fixture(scope="session")
def digits() -> Sample:
    """The digits sample (64 → 10 head, 1,797 UCI digits): the quick path of the CLI tests."""
    return DIGITS


CliRun = Callable[..., subprocess.CompletedProcess]


@pytest.fixture(scope="session")
def cli() -> CliRun:
    """Run `python -m fyc_convert ARGS` in a subprocess from the repository root (so `sample_models` imports).

    Keywords: cwd (default the repository root), env, timeout (s, default 300), user (run as that user via
    setpriv, for permission tests).
    """

    def run(*args: str | Path, cwd: Path = ROOT, env: dict | None = None, timeout: float = 300,
            user: str | None = None) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "fyc_convert", *map(str, args)]
        if user is not None:
            cmd = ["setpriv", "--reuid", user, "--regid", user, "--clear-groups", *cmd]
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)

    return run

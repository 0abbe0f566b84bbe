"""The interop suite (issue 11): original and converted models through the deployment tools that follow.

Runs only when FYC_INTEROP=1 (`.ci/interop.sh` sets it, after creating the tools' virtual environments);
the main `python -m pytest` skips these tests. Other settings, all environment variables of the suite:
  FYC_INTEROP_DIR        where the exported models are built and reused (default: a pytest temp folder)
  FYC_INTEROP_TFLITE     python of the onnx2tf + LiteRT venv (default: .venv-interop/tflite/bin/python)
  FYC_INTEROP_TORCH      python of a venv with torch, torchvision and onnx2torch
                         (default: .venv-interop/torch/bin/python)
  FYC_INTEROP_REPORT     a JSON file to write every tool's result into (original and converted)
  FYC_INTEROP_CASES      comma-separated subset of the cases (default: all of zoo.CASES)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

RESULTS: list[dict] = []  # one entry per (tool, case, variant): what the report and the summary show


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "interop: runs a deployment tool on exported models (FYC_INTEROP=1)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("FYC_INTEROP") == "1":
        return
    skip = pytest.mark.skip(reason="interop suite: run .ci/interop.sh (or set FYC_INTEROP=1)")
    for item in items:
        if "interop" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("FYC_INTEROP_DIR")
    return Path(folder) if folder else tmp_path_factory.mktemp("interop")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not RESULTS:
        return
    terminalreporter.section("interop results")
    for r in RESULTS:
        diff = "" if r.get("max_abs_diff") is None else (
            f" max|Δ| {r['max_abs_diff']:.2e} (|ref| <= {r['max_abs_ref']:.3g}), top-1 {r['top1_agreement']:.0%}")
        terminalreporter.write_line(
            f"{r['tool']:<16} {r['case']:<15} {r['variant']:<11} {r['status']:<8}{diff} {r.get('note', '')}")
    report = os.environ.get("FYC_INTEROP_REPORT")
    if report:
        Path(report).write_text(json.dumps(RESULTS, indent=1))

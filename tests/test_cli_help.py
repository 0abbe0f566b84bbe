"""The command line's own surface: --help readable at 80 columns, --version, the examples."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from fyc_convert import __version__
from fyc_convert.options import cli_fields


def _cli(*args: str, columns: int = 80) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "dumb"}
    return subprocess.run([sys.executable, "-m", "fyc_convert", *args], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.fixture(scope="module")
def help_text() -> str:
    done = _cli("--help")
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_help_fits_80_columns(help_text):
    assert [line for line in help_text.splitlines() if len(line) > 80] == []
    assert "…" not in help_text  # nothing truncated, no ellipsis metavars


def test_help_shows_every_flag_and_choice_whole(help_text):
    for f in cli_fields():
        flag = f.metadata.get("flag") or f"--{f.name.replace('_', '-')}"
        for name in flag.split("/"):
            assert name in help_text, name
        for choice in f.metadata.get("choices") or ():
            assert str(choice) in help_text, (f.name, choice)
    assert "<bool>" not in help_text


def test_help_has_examples_and_output_default(help_text):
    examples = [line for line in help_text.splitlines() if line.strip().startswith("fyc-convert ")]
    assert len(examples) == 3
    assert "Examples:" in help_text
    assert "[default: <checkpoint stem>_fyc/" in " ".join(help_text.split())


def test_help_groups_options_by_panel(help_text):
    panels = {f.metadata["panel"] for f in cli_fields()}
    positions = [help_text.index(f"\n{panel}:\n") for panel in ("Arguments", "Model and head", "Data", "Training",
                                                                  "Export", "Output")]
    assert positions == sorted(positions)
    assert panels <= {"Model and head", "Data", "Training", "Export", "Output"}


def test_version():
    done = _cli("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"fyc-convert {__version__}"


def test_version_matches_the_package_metadata():
    from importlib.metadata import version

    assert version("fyc-convert") == __version__


def test_cli_fields_have_help():
    assert all(f.metadata.get("help") for f in cli_fields() if isinstance(f, dataclasses.Field))

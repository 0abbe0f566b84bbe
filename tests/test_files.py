"""Atomic output files: all or nothing under the final name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fyc_convert.errors import OutputError
from fyc_convert.files import atomic_path, write_text_atomic


def test_write_replaces_atomically_with_normal_permissions(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    target.write_text("previous good file")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("half writ")
        raise KeyboardInterrupt  # the user pressed Ctrl-C mid-write
    assert target.read_text() == "previous good file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_missing_folder_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="is not writable"):
        write_text_atomic(tmp_path / "no" / "such" / "dir" / "x.json", "{}")

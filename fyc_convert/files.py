"""Output files that appear whole or not at all, and the clean-up of what an interrupted run left behind.

Every temporary name this package creates is ``.fyc-<pid>-<stem>.<random>.tmp`` (files and folders), written
next to its final place and renamed onto it when complete. A run that is killed leaves such names behind;
`remove_stale_temps` deletes exactly those (ours, of processes that are gone) and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fyc_convert.errors import OutputError

_TEMP = re.compile(r"^\.fyc-(\d+)-.+\.tmp$")


def _prefix(stem: str) -> str:
    return f".fyc-{os.getpid()}-{stem}."


def is_temp_name(name: str) -> bool:
    """Whether `name` is one of this package's temporary names."""
    return _TEMP.match(name) is not None


def _writable_here(path: Path, e: OSError) -> OutputError:
    return OutputError(f"folder {path.parent} is not writable ({e.strerror}); choose a writable -o/--output-dir")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it onto `path`, on error delete it.

    Example:
        with atomic_path(out / "report.json") as tmp:
            tmp.write_text(text)
    """
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=_prefix(path.name), suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _writable_here(path, e) from e
    os.close(fd)
    tmp = Path(tmp_name)
    mode = _file_mode()
    os.chmod(tmp, mode)  # mkstemp makes 0600 files; outputs get the usual permissions
    try:
        yield tmp
        # again: a writer may have replaced the file at `tmp` with a new one of its own (safetensors writes 0600)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _file_mode() -> int:
    """0666 less the umask: the permissions an ordinary new file gets (0644 with the usual umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def temp_dir(parent: str | Path, stem: str) -> Path:
    """A new temporary folder in `parent` (removed by `remove_stale_temps` once this process is gone)."""
    parent = Path(parent)
    try:
        return Path(tempfile.mkdtemp(prefix=_prefix(stem), suffix=".tmp", dir=parent))
    except OSError as e:
        raise _writable_here(parent / stem, e) from e


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(folder: str | Path) -> list[str]:
    """Delete the temporary files and folders of dead runs directly in `folder`; returns their names.

    Only names of the form ``.fyc-<pid>-….tmp`` whose process no longer exists are touched.
    """
    folder = Path(folder)
    removed: list[str] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMP.match(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return sorted(removed)

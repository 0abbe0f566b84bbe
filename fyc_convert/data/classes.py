"""The class names of a model, in class-index order, and where they came from.

Each source is tried in this order and the first that names exactly C classes (the classifier's outputs) wins:

1. the checkpoint's meta, `meta["classes"]` (a list, or a dict {index: name}); a zoo folder's loader puts the
   Hugging Face `config.id2label` or timm's `label_names` there (`meta_source` names it then);
2. the data's own names (`DataBundle.classes`: an image folder's class folders or class list, an array file's
   `classes`);
3. a class list beside the checkpoint: `classes.txt` or `<stem>_classes.txt` (for a model folder: inside it),
   one name a line.

A source that names a different number of classes is skipped with a note (the names would be misleading).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fyc_convert.errors import DataError, describe

__all__ = ["ClassNames", "class_list_files", "meta_classes_source", "resolve_classes"]

CLASS_LIST = "classes.txt"


@dataclass(frozen=True)
class ClassNames:
    """Class names by index and their source.

    Attributes:
        names: one name per class, index i is the model's output i.
        source: "checkpoint meta", "config.id2label", "data", a file path, ...
    """

    names: tuple[str, ...]
    source: str

    def describe(self) -> dict[str, Any]:
        """Plain values for reports: {"names": [...], "source": ...}."""
        return {"names": list(self.names), "source": self.source}


def class_list_files(checkpoint: str | Path) -> list[Path]:
    """Where a class list beside `checkpoint` may be, in the order they are tried."""
    ckpt = Path(checkpoint)
    if ckpt.is_dir():
        return [ckpt / CLASS_LIST]
    return [ckpt.parent / CLASS_LIST, ckpt.parent / f"{ckpt.stem}_{CLASS_LIST}"]


def resolve_classes(num_classes: int, *, meta: Mapping[str, Any] | None = None, meta_source: str = "checkpoint meta",
                    data_classes: Sequence[str] | None = None,
                    checkpoint: str | Path | None = None) -> tuple[ClassNames | None, list[str]]:
    """The class names from the first source that names `num_classes` of them (see the module docstring).

    Args:
        num_classes: C, the classifier's outputs.
        meta: the checkpoint's meta (`LoadedModel.meta`).
        meta_source: what to call meta's classes in the report (`meta_classes_source` of the loaded format).
        data_classes: the data's class names (`DataBundle.classes`).
        checkpoint: the checkpoint path, for a class list beside it.

    Returns:
        (ClassNames or None when no source names the classes, notes about skipped sources).

    Raises:
        DataError: a class list file exists but cannot be read as text.
    """
    notes: list[str] = []
    meta = meta or {}
    candidates: list[tuple[str, list[str] | None]] = [
        (meta_source, _names(meta.get("classes"))),
        ("data", [str(c) for c in data_classes] if data_classes is not None else None),
    ]
    if checkpoint is not None:
        candidates += [(str(f), _read_list(f)) for f in class_list_files(checkpoint) if f.is_file()]
    for source, names in candidates:
        if names is None:
            continue
        if len(names) == num_classes:
            return ClassNames(tuple(names), source), notes
        notes.append(f"class names from {source} ignored: {_count(len(names), 'name')} for a classifier with "
                     f"{_count(num_classes, 'output')}")
    return None, notes


def meta_classes_source(fmt: str) -> str:
    """Where a loaded model's `meta["classes"]` came from, by `LoadedModel.format`."""
    return {"huggingface": "config.id2label", "timm": "config.json label_names"}.get(fmt, "checkpoint meta")


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _names(value: Any) -> list[str] | None:
    """A list of names, or a mapping {index: name} with the indices 0..C-1; None otherwise."""
    if isinstance(value, Mapping):
        try:
            by_index = {int(k): str(v) for k, v in value.items()}
        except (TypeError, ValueError):
            return None
        return [by_index[i] for i in range(len(by_index))] if sorted(by_index) == list(range(len(by_index))) \
            else None
    if isinstance(value, (list, tuple)) and value:
        return [str(v) for v in value]
    return None


def _read_list(path: Path) -> list[str]:
    """One name a line; blank lines at the end are dropped, a name keeps its inner spaces."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the class list {path} ({describe(e)}); save it as UTF-8 text, one class "
                        "name a line, or move it away") from e
    lines = [line.rstrip("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines

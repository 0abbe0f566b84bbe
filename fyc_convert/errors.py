"""Typed errors. The library raises these and never exits; the CLI maps them to exit codes.

Every message is one line that says what was wrong and what to do instead.
"""

from __future__ import annotations

from typing import Any

_MAX_LINE = 300  # characters of a foreign exception kept in our one-line messages


class FycError(Exception):
    """Base class for every error a user can cause. Exit code 1 in the CLI."""

    exit_code: int = 1


class OptionsError(FycError):
    """An option has a bad value or does not fit the other options. Exit code 2 (a usage error) in the CLI."""

    exit_code = 2


class CheckpointError(FycError):
    """The checkpoint cannot be read, is unsafe to read, or does not fit the architecture."""


class ArchError(CheckpointError):
    """`--arch` / `--arch-kwargs` do not resolve to a callable that builds the model."""


class ClassifierNotFoundError(FycError):
    """No single nn.Linear classifier could be identified (or `--layer` is wrong)."""


class HeadError(FycError):
    """A fixed head cannot be built for the requested sizes or options."""


class DataError(FycError):
    """The data cannot be read or does not fit the model."""


class ModelRunError(FycError):
    """The user's model raised while it ran (feature capture, calibration, training or evaluation)."""


class TrainingError(FycError):
    """Training diverged (NaN/inf loss) or could not resume."""


class ExportError(FycError):
    """ONNX export failed, or the exported head is not the slim add/sub graph it must be."""


class VerificationError(FycError):
    """onnxruntime output differs from PyTorch beyond tolerance. Exit code 3 in the CLI.

    Attributes:
        max_abs_diff, mean_abs_diff: the converted model's differences (None when not measured).
        verdict: `export.verify.Verdict` (whom to blame: "head" or "model"), when the verification got that far.
        report: the conversion's `report.Report`, set by `convert()` before it re-raises (the CLI prints it).
        int8: `report.Int8Result` when the int8 model missed `--int8-max-drop`.
    """

    exit_code = 3

    def __init__(self, message: str, *, max_abs_diff: float | None = None, mean_abs_diff: float | None = None,
                 verdict: Any = None, report: Any = None, int8: Any = None):
        super().__init__(message)
        self.max_abs_diff = max_abs_diff
        self.mean_abs_diff = mean_abs_diff
        self.verdict = verdict  # export.verify.Verdict | None (typed loosely: errors.py imports nothing of ours)
        self.report = report  # report.Report | None
        self.int8 = int8  # report.Int8Result | None


class OutputExistsError(FycError):
    """The output folder exists and `--force` was not given."""


class OutputError(FycError):
    """The output folder cannot be created or written (permissions, disk full, a file in the way)."""


class ClassLRError(TrainingError):
    """Per-class learning rates cannot be set up: unknown layer, bad labels, or μ would not fit in memory."""


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's text, at most 300 characters ("" when it has none).

    Exporters, onnxruntime and torch raise multi-line messages; ours quote only their first line.
    """
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[0][:_MAX_LINE] if lines else ""


def describe(e: BaseException) -> str:
    """An exception as ``"TypeName: first line"`` (just the type name when it has no text)."""
    line = first_line(e)
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def few(items: list[str], limit: int = 6) -> str:
    """At most `limit` items, comma-separated, then how many more (for messages that list candidates)."""
    shown = ", ".join(items[:limit])
    return shown + (f", … ({len(items) - limit} more)" if len(items) > limit else "")

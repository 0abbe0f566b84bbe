"""The `fyc-convert` command: parse options, call `fyc_convert.pipeline.convert`, render the report.

This is the single place where errors become exit codes: 0 ok, 1 error, 2 usage, 3 verification failed.
"""

from __future__ import annotations

import dataclasses
import inspect
import signal
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

from fyc_convert.errors import FycError, VerificationError
from fyc_convert.options import cli_fields

EXAMPLES = """Examples:

\b
# the shipped digits sample: fine-tune on its data, export, verify
fyc-convert sample_models/digits_cnn.pt \\
    --arch sample_models.archs:digits_cnn \\
    --data sample_models/digits.npz -o out/digits
\b
# a timm model on an image folder (preprocessing from the model)
fyc-convert resnet50.pth --arch timm:create_model --data images/ \\
    --arch-kwargs '{"model_name": "resnet50", "num_classes": 100}'
\b
# what would be saved, without training or writing anything
fyc-convert model.pt --arch mypkg.models:build --dry-run

Exit codes: 0 ok, 1 error, 2 usage, 3 verification failed. Docs: README.md, docs/."""


class _GroupedCommand(typer.core.TyperCommand):
    """Plain-text --help whose options are grouped by panel: readable at 80 columns, nothing truncated."""

    def format_options(self, ctx: Any, formatter: Any) -> None:
        panels: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                panel = "Arguments" if param.param_type_name == "argument" else \
                    getattr(param, "rich_help_panel", None) or "Options"
                panels.setdefault(panel, []).append(record)
        order = ["Arguments", "Model and head", "Data", "Training", "Export", "Output"]
        for panel in sorted(panels, key=lambda name: order.index(name) if name in order else len(order)):
            rows = panels[panel]
            with formatter.section(panel):
                formatter.write_dl(rows, col_max=34)


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
err_console = Console(stderr=True, highlight=False)


def _parse(kind: str, name: str, text: str) -> Any:
    """A comma-separated option value ("ints", "floats", "names"), or an integer or the word auto ("int_or_auto")."""
    if kind == "int_or_auto":
        if text.strip().lower() == "auto":
            return "auto"
        try:
            return int(text)
        except ValueError:
            raise typer.BadParameter(f"{text!r} is neither an integer nor auto", param_hint=name) from None
    parts = [p.strip() for p in text.replace("x", ",").split(",")] if kind == "ints" else \
        [p.strip() for p in text.split(",")]
    try:
        if kind == "ints":
            return tuple(int(p) for p in parts if p)
        if kind == "floats":
            return tuple(float(p) for p in parts if p)
    except ValueError:
        example = "3,224,224" if kind == "ints" else "0.485,0.456,0.406"
        raise typer.BadParameter(f"{text!r} is not a list of {'integers' if kind == 'ints' else 'numbers'}; "
                                 f"write them like {example}", param_hint=name) from None
    return tuple(parts)


def _annotation(f: dataclasses.Field) -> tuple[Any, Any]:
    """(typer annotation, default) for one option field."""
    meta = f.metadata
    text = str(f.type)
    choices = meta.get("choices")
    if meta.get("parse"):
        base: Any = str
    elif choices is not None and all(isinstance(c, str) for c in choices):
        base = Enum(f"{f.name.title().replace('_', '')}Choice", {c.replace("-", "_"): c for c in choices}, type=str)
    elif text.startswith("bool"):
        base = bool
    elif text.startswith("int"):
        base = int
    elif text.startswith("float"):
        base = float
    elif text.startswith("Path"):
        base = Path
    else:
        base = str
    default = f.default if f.default is not dataclasses.MISSING else None
    if isinstance(base, type) and issubclass(base, Enum) and default is not None:
        default = base(default)
    flag = meta.get("flag") or f"--{f.name.replace('_', '-')}"
    names = [flag] if flag.count("/") == 1 and flag.startswith("--") and base is bool else flag.split("/")
    bounds = {}
    if base in (int, float) and not meta.get("parse"):
        bounds = {k: meta[k] for k in ("ge",) if meta.get(k) is not None}
        bounds = {"min": bounds["ge"]} if bounds else {}
    metavar = {"ints": "N,N", "floats": "X,X", "names": "NAME,NAME", "int_or_auto": "N|auto"}.get(
        meta.get("parse") or "") or \
        {int: "N", float: "X", Path: "PATH", str: "TEXT", bool: ""}.get(base)
    option = typer.Option(*names, help=meta.get("help", ""), rich_help_panel=meta.get("panel"), metavar=metavar,
                          show_default=default is not None and base is not bool, **bounds)
    return Annotated[Optional[base] if default is None else base, option], default


def _command() -> Callable[..., None]:
    """The `fyc-convert` command, its flags made from `ConvertOptions`' fields (one option, one field)."""
    fields = cli_fields()
    params = [inspect.Parameter("checkpoint", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[
        Path, typer.Argument(help="Trained model: state_dict/checkpoint .pt (+ --arch), .safetensors (+ --arch), a "
                                  "Hugging Face or timm model folder, a pickled module (+ --trust-pickle), "
                                  "TorchScript.")])]
    for f in fields:
        annotation, default = _annotation(f)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=annotation))
    params += [
        inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
            bool, typer.Option("--quiet", "-q", help="Print only errors, notes and the final status line.",
                               rich_help_panel=_PANEL_OUT)]),
        inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
            bool, typer.Option("--verbose", "-v", help="Show tracebacks on errors.", rich_help_panel=_PANEL_OUT)]),
        inspect.Parameter("version", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
            bool, typer.Option("--version", help="Print the version and exit.", callback=_print_version,
                               is_eager=True, rich_help_panel=_PANEL_OUT)]),
    ]

    def convert(checkpoint: Path, **kwargs: Any) -> None:
        """Swap a trained classifier for a fixed Hadamard head, fine-tune, export a slim verified ONNX model."""
        quiet, verbose = kwargs.pop("quiet"), kwargs.pop("verbose")
        kwargs.pop("version")
        values: dict[str, Any] = {}
        for f in fields:
            value = kwargs[f.name]
            if isinstance(value, Enum):
                value = value.value
            kind = f.metadata.get("parse")
            if kind and value is not None:
                value = _parse(kind, f"--{f.name.replace('_', '-')}", value)
            values[f.name] = value
        raise typer.Exit(_run(checkpoint, values, quiet=quiet, verbose=verbose))

    convert.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    convert.__annotations__ = {p.name: p.annotation for p in params}
    return convert


_PANEL_OUT = "Output"


def _print_version(value: bool) -> None:
    """--version: the installed version, then exit 0 (eager: no other option is looked at)."""
    if value:
        from fyc_convert import __version__

        Console(highlight=False).print(f"fyc-convert {__version__}")
        raise typer.Exit(0)


app.command(cls=_GroupedCommand, epilog=EXAMPLES)(_command())


def _run(checkpoint: Path, fields: dict, *, quiet: bool, verbose: bool) -> int:
    """Run the conversion; the one place where errors become exit codes and one line on stderr."""
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)  # schedulers send SIGTERM: handle it like Ctrl-C
    except ValueError:  # not the main thread (an embedding application): leave its handlers alone
        previous = None
    distributed = rank0 = False
    console = Console(quiet=True)
    try:
        from fyc_convert import distributed as dist
        from fyc_convert.options import check_options, make_options
        from fyc_convert.pipeline import convert as run_convert
        from fyc_convert.report import render

        if dist.launched_by_torchrun():
            dist.init_from_env(fields["device"])
            distributed = True
        rank0 = dist.is_main()
        console = Console(quiet=quiet or not rank0, highlight=False)
        opts = make_options(None, fields)
        if rank0:
            for note in check_options(opts):
                err_console.print(f"[yellow]note:[/] {note}", soft_wrap=True)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _MetricsColumn(),
                      TimeElapsedColumn(),
                      console=console, transient=True, disable=quiet or not rank0) as bars:
            def say(msg: str) -> None:  # one line per message, however narrow the terminal or log
                console.print(f"[dim]·[/] {msg}", soft_wrap=True)

            result = run_convert(checkpoint, opts, progress=say, epoch_progress=None if quiet or not rank0 else bars)
    except FycError as e:
        if verbose:
            err_console.print_exception()
        report = e.report if isinstance(e, VerificationError) else None
        if report is not None and rank0:
            from fyc_convert.report import render

            render(report, console)
        err_console.print(f"[red]error:[/] {e}", soft_wrap=True)
        return e.exit_code
    except OSError as e:  # a file the library did not expect to fail (disk full, permissions)
        if verbose:
            err_console.print_exception()
        where = f": {e.filename}" if e.filename else ""
        err_console.print(f"[red]error:[/] {e.strerror or e}{where}; check the path and free space, "
                          f"or rerun with --verbose", soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/]: no partial output was left under a final name; "
                          "--resume finishes the run", soft_wrap=True)
        return 130
    except _Terminated:
        err_console.print("[red]terminated[/]: no partial output was left under a final name; "
                          "--resume finishes the run", soft_wrap=True)
        return 143
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, never a traceback
        if verbose:
            err_console.print_exception()
        from fyc_convert.errors import describe

        err_console.print(f"[red]error:[/] unexpected {describe(e)}; rerun with --verbose and report it",
                          soft_wrap=True)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if distributed:
            from fyc_convert import distributed as dist

            dist.shutdown()
    if rank0:
        if quiet:
            Console(highlight=False).print(f"status: {result.status}")
        else:
            render(result, console)
    return 0


class _Terminated(BaseException):
    """SIGTERM arrived (a scheduler or `kill`): unwinds like KeyboardInterrupt, so temporaries are removed."""


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated


class _MetricsColumn(ProgressColumn):
    """loss, training accuracy (on the augmented batches, so labelled "train acc") and throughput of the running
    epoch (fields set by the training loop); the validation accuracy follows in the epoch's line ("val acc")."""

    def render(self, task: Task) -> Text:
        f = task.fields
        parts = []
        if isinstance(f.get("loss"), float) and f["loss"] == f["loss"]:
            parts.append(f"loss {f['loss']:.4f}")
        if f.get("acc") is not None:  # on the training batches as they are fed (augmented), not validation
            parts.append(f"train acc {100 * f['acc']:.2f}%")
        if f.get("samples_per_s"):
            parts.append(f"{f['samples_per_s']:,.0f} samples/s")
        return Text("  ".join(parts))


def main() -> None:
    """Console-script entry point (`fyc-convert`, `python -m fyc_convert`): usage errors as one line, exit 2."""
    try:
        code = app(standalone_mode=False)
    except typer.Abort:  # Ctrl-C while the command line is parsed
        sys.exit(130)
    except Exception as e:
        # Typer's (vendored click) usage errors: they carry their exit code (2) and a one-line message
        message, exit_code = getattr(e, "format_message", None), getattr(e, "exit_code", None)
        if not callable(message) or not isinstance(exit_code, int):
            raise
        err_console.print(f"[red]error:[/] {message()} (see fyc-convert --help)", soft_wrap=True)
        sys.exit(exit_code)
    sys.exit(code if isinstance(code, int) else 0)

"""The `fyc-convert` command: parse options, call `fyc_convert.pipeline.convert`, render the report.

This is the single place where errors become exit codes: 0 ok, 1 error, 2 usage, 3 verification failed.
"""

from __future__ import annotations

import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

from fyc_convert.errors import FycError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})
err_console = Console(stderr=True, highlight=False)


class HeadKind(str, Enum):
    hadamard = "hadamard"
    orthogonal = "orthogonal"


class OptimizerKind(str, Enum):
    sgd = "sgd"
    adamw = "adamw"
    class_lr = "class-lr"


class DeviceKind(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class HeadLayout(str, Enum):
    portable = "portable"
    batch_switched = "batch-switched"


class DType(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"


def _shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise typer.BadParameter(f"{text!r} is not a shape; write positive integers like 3,224,224")
    return shape


def _check_shape(text: str | None) -> str | None:
    _shape(text)  # raises typer.BadParameter (exit code 2) on a malformed shape
    return text


@app.command()
def convert(
    checkpoint: Annotated[Path, typer.Argument(help="Trained model: state_dict/checkpoint .pt (+ --arch), "
                                                     ".safetensors (+ --arch), pickled module (+ --trust-pickle), TorchScript.")],
    head: Annotated[HeadKind, typer.Option(help="Fixed head to swap in.")] = HeadKind.hadamard,
    arch: Annotated[Optional[str], typer.Option(help="MODULE:CALLABLE (or path/file.py:CALLABLE) that builds the model.")] = None,
    arch_kwargs: Annotated[Optional[str], typer.Option(help="JSON keyword arguments for --arch.")] = None,
    trust_pickle: Annotated[bool, typer.Option(help="Allow unpickling a whole model: this RUNS CODE from the file.")] = False,
    layer: Annotated[Optional[str], typer.Option(help="Dotted name of the classifier (found automatically otherwise).")] = None,
    input_shape: Annotated[Optional[str], typer.Option(callback=_check_shape, help="One sample's shape, e.g. 3,224,224 (when data/metadata lack it).")] = None,
    data: Annotated[Optional[Path], typer.Option(help=".npz, ImageFolder folder or .pt dict: calibrate, fine-tune, measure accuracy.")] = None,
    val_split: Annotated[float, typer.Option(help="Validation share when the data has no validation split.")] = 0.1,
    epochs: Annotated[Optional[int], typer.Option(min=0, help="Fine-tuning epochs (0 = calibrate α and bias only). [default: 3]", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (default: per optimizer).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="[default: 64]", show_default=False)] = None,
    optimizer: Annotated[Optional[OptimizerKind], typer.Option(help="sgd (momentum), adamw, or class-lr (per-class learning rates). [default: sgd]", show_default=False)] = None,
    distill: Annotated[bool, typer.Option(help="Learn from the original model's outputs too (works without labels).")] = False,
    fixed_scale: Annotated[Optional[float], typer.Option(help="Use this fixed α instead of learning it.")] = None,
    no_bias: Annotated[bool, typer.Option("--no-bias", help="Head without a bias.")] = False,
    hadamard_size: Annotated[Optional[int], typer.Option(help="Transform size of the hadamard head, a power of two (default: nextpow2(max(N, C+1)), the widest row choice; a fold size such as 1024 for 2048 → 1000 exports a faster head).")] = None,
    device: Annotated[DeviceKind, typer.Option()] = DeviceKind.auto,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    resume: Annotated[bool, typer.Option(help="Finish an interrupted run in the output folder (training continues from its checkpoint).")] = False,
    output_dir: Annotated[Optional[Path], typer.Option("-o", "--output-dir", help="Default: <checkpoint stem>_fyc/ next to the checkpoint.")] = None,
    opset: Annotated[Optional[int], typer.Option(help="ONNX opset, 13 to 20. [default: 17, what most edge converters take]", show_default=False)] = None,
    head_layout: Annotated[HeadLayout, typer.Option(help="ONNX head graph: portable (every edge runtime) or batch-switched (an If on the batch size, faster in onnxruntime servers for large heads at large batches).")] = HeadLayout.portable,
    static_batch: Annotated[Optional[int], typer.Option(min=1, help="Export with this fixed batch size (edge compilers, NPUs) instead of a dynamic batch axis.")] = None,
    dtype: Annotated[DType, typer.Option(help="Precision of the exported backbone; inputs/outputs stay fp32.")] = DType.fp32,
    atol: Annotated[Optional[float], typer.Option(help="Verification tolerance on logits (absolute). [default: 1e-4; fp16: 5e-2]", show_default=False)] = None,
    rtol: Annotated[Optional[float], typer.Option(help="Verification tolerance on logits (relative). [default: as --atol]", show_default=False)] = None,
    report: Annotated[Optional[Path], typer.Option(help="Also write the JSON report here (the only output of --dry-run).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Load, find and swap; report parameter savings; train and write nothing.")] = False,
    bench: Annotated[bool, typer.Option(help="Add onnxruntime latency of original vs converted to the report.")] = False,
    force: Annotated[bool, typer.Option(help="Write into an existing output folder.")] = False,
    class_lr_eta_mu: Annotated[Optional[float], typer.Option(help="class-lr: meta learning rate of the per-class factors μ. [default: 1e4]", show_default=False)] = None,
    class_lr_cutoff: Annotated[Optional[int], typer.Option(help="class-lr: epoch after which plain gradients return. [default: 10]", show_default=False)] = None,
    class_lr_layers: Annotated[Optional[str], typer.Option(help="class-lr: comma-separated layer names (default: hidden Linear layers).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors and the final status line.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks on errors.")] = False,
) -> None:
    """Swap a trained classifier's last nn.Linear for a fixed Hadamard head, fine-tune, export slim ONNX."""
    opts = dict(
        head=head.value, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle, layer=layer,
        input_shape=_shape(input_shape), data=data, val_split=val_split, epochs=epochs, lr=lr,
        batch_size=batch_size, optimizer=optimizer.value if optimizer is not None else None, distill=distill,
        fixed_scale=fixed_scale, bias=not no_bias, hadamard_size=hadamard_size, device=device.value, seed=seed,
        resume=resume, output_dir=output_dir, opset=opset, head_layout=head_layout.value, static_batch=static_batch,
        dtype=dtype.value, atol=atol, rtol=rtol,
        report_path=report, dry_run=dry_run, bench=bench, force=force,
        class_lr_eta_mu=class_lr_eta_mu, class_lr_cutoff=class_lr_cutoff,
        class_lr_layers=tuple(s.strip() for s in class_lr_layers.split(",")) if class_lr_layers else None,
    )
    raise typer.Exit(_run(checkpoint, opts, quiet=quiet, verbose=verbose))


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
            result = run_convert(checkpoint, opts, progress=lambda msg: console.print(f"[dim]·[/] {msg}"),
                                 epoch_progress=None if quiet or not rank0 else bars)
    except FycError as e:
        if verbose:
            err_console.print_exception()
        if getattr(e, "report", None) is not None and rank0:
            from fyc_convert.report import render

            render(e.report, console)  # type: ignore[attr-defined]
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
    """loss, accuracy and throughput of the running epoch (fields set by the training loop)."""

    def render(self, task: Task) -> Text:
        f = task.fields
        parts = []
        if isinstance(f.get("loss"), float) and f["loss"] == f["loss"]:
            parts.append(f"loss {f['loss']:.4f}")
        if f.get("acc") is not None:
            parts.append(f"acc {100 * f['acc']:.2f}%")
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

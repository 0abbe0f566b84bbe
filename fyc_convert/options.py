"""Every option of a conversion in one dataclass, and the checks that run before any long work starts.

`check_options` validates each field and the combinations (bad values raise `OptionsError`, exit code 2) and
returns one note per option that would have no effect in this run (the CLI prints them, the report keeps them).
It reads no data and loads no model, so a typo costs nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fyc_convert.errors import DataError, OptionsError

HEADS = ("hadamard", "orthogonal")
OPTIMIZERS = ("sgd", "adamw", "class-lr")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("fp32", "fp16")
HEAD_LAYOUTS = ("portable", "batch-switched")
DEFAULT_EPOCHS = 3
DEFAULT_BATCH_SIZE = 64
DEFAULT_OPTIMIZER = "sgd"
DEFAULT_CLASS_LR_ETA_MU = 1e4
DEFAULT_CLASS_LR_CUTOFF = 10
DEFAULT_TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2}  # onnxruntime vs PyTorch on logits (atol and rtol)


@dataclass
class ConvertOptions:
    """Every option of a conversion; the CLI flags map one to one onto these fields.

    None means "not given": the run picks the value (and says so where it matters), so an option that was
    given but has no effect can be reported instead of silently ignored.
    """

    head: Literal["hadamard", "orthogonal"] = "hadamard"  # kind of fixed head to swap in
    arch: str | None = None  # "module:callable" or "path/file.py:callable" building the model (state_dicts)
    arch_kwargs: str | dict[str, Any] | None = None  # JSON (or dict) of keyword arguments for `arch`
    trust_pickle: bool = False  # allow unpickling a whole nn.Module (runs code from the file)
    layer: str | None = None  # dotted name of the classifier; found automatically when None
    input_shape: tuple[int, ...] | None = None  # one sample's shape, e.g. (3, 224, 224), when data/meta lack it
    data: str | Path | None = None  # .npz / ImageFolder / .pt data for calibration, fine-tuning and accuracy
    val_split: float = 0.1  # validation share when the data has no validation split
    epochs: int | None = None  # fine-tuning epochs (None: 3); 0 = calibrate alpha and bias only
    lr: float | None = None  # learning rate; None = the optimizer's default
    batch_size: int | None = None  # samples per step (None: 64)
    optimizer: Literal["sgd", "adamw", "class-lr"] | None = None  # None: sgd
    distill: bool = False  # learn from the original model's outputs (KL) as well as labels
    fixed_scale: float | None = None  # a fixed alpha instead of a learned one
    bias: bool = True  # keep a learned bias in the head
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    hadamard_size: int | None = None  # transform size m of the hadamard head; None = from_linear's widest choice
    resume: bool = False  # finish an interrupted run in the output folder (training from its checkpoint)
    output_dir: str | Path | None = None  # default: <checkpoint stem>_fyc/ next to the checkpoint
    opset: int | None = None  # ONNX opset; None = export.DEFAULT_OPSET
    head_layout: Literal["portable", "batch-switched"] = "portable"  # ONNX head graph (batch-switched: ORT servers)
    static_batch: int | None = None  # export with this fixed batch size instead of a dynamic batch axis
    dtype: Literal["fp32", "fp16"] = "fp32"  # precision of the exported backbone (inputs/outputs stay fp32)
    atol: float | None = None  # onnxruntime-vs-PyTorch tolerance on logits (None: 1e-4, fp16: 5e-2)
    rtol: float | None = None  # relative tolerance (None: as atol)
    report_path: str | Path | None = None  # extra copy of report.json (the only output of --dry-run)
    dry_run: bool = False  # load, find, swap and count; train and write nothing (but `report_path`)
    bench: bool = False  # add onnxruntime latencies of original vs converted to the report
    force: bool = False  # allow writing into an existing output folder
    class_lr_eta_mu: float | None = None  # per-class learning rates: meta learning rate of mu (None: 1e4)
    class_lr_cutoff: int | None = None  # per-class learning rates: epoch after which plain gradients return (None: 10)
    class_lr_layers: tuple[str, ...] | None = None  # per-class learning rates: layers (default: hidden Linears)

    # ------------------------------------------------------------------ values the run uses
    @property
    def epochs_value(self) -> int:
        return DEFAULT_EPOCHS if self.epochs is None else self.epochs

    @property
    def batch_size_value(self) -> int:
        return DEFAULT_BATCH_SIZE if self.batch_size is None else self.batch_size

    @property
    def optimizer_value(self) -> str:
        return DEFAULT_OPTIMIZER if self.optimizer is None else self.optimizer

    @property
    def tolerance(self) -> tuple[float, float]:
        """(atol, rtol) of the verification."""
        default = DEFAULT_TOLERANCE[self.dtype]
        atol = default if self.atol is None else self.atol
        return atol, (default if self.rtol is None else self.rtol)


def make_options(options: ConvertOptions | None, fields: dict[str, Any]) -> ConvertOptions:
    """`options` with `fields` replaced; an unknown field is an OptionsError naming the known ones."""
    known = {f.name for f in dataclasses.fields(ConvertOptions)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise OptionsError(f"unknown option {', '.join(map(repr, unknown))} for convert(); known options: "
                           f"{', '.join(sorted(known))}")
    return dataclasses.replace(options or ConvertOptions(), **fields)


def check_options(opts: ConvertOptions) -> list[str]:
    """Validate every option and the combinations; return a note for each given option without effect.

    Raises:
        OptionsError: a value out of range, of the wrong type, or a combination that cannot work.
        DataError: `data` does not exist.
    """
    _choice("--head", opts.head, HEADS)
    _choice("--device", opts.device, DEVICES)
    _choice("--dtype", opts.dtype, DTYPES)
    if opts.optimizer is not None:
        _choice("--optimizer", opts.optimizer, OPTIMIZERS)
    if opts.input_shape is not None and (not opts.input_shape or any(not _is_int(s) or s < 1 for s in opts.input_shape)):
        raise OptionsError(f"--input-shape {opts.input_shape} is not a shape; write positive integers like 3,224,224")
    if not (isinstance(opts.val_split, (int, float)) and 0.0 <= opts.val_split < 1.0):
        raise OptionsError(f"--val-split must be in [0, 1), got {opts.val_split!r}; pass e.g. --val-split 0.1")
    _int_at_least("--epochs", opts.epochs, 0)
    _int_at_least("--batch-size", opts.batch_size, 1)
    _int_at_least("--seed", opts.seed, 0)
    _int_at_least("--class-lr-cutoff", opts.class_lr_cutoff, 0)
    _int_at_least("--static-batch", opts.static_batch, 1)
    _choice("--head-layout", opts.head_layout, HEAD_LAYOUTS)
    _positive("--lr", opts.lr)
    _positive("--fixed-scale", opts.fixed_scale)
    _positive("--class-lr-eta-mu", opts.class_lr_eta_mu)
    for name, value in (("--atol", opts.atol), ("--rtol", opts.rtol)):
        if value is not None and not (_is_number(value) and math.isfinite(value) and value >= 0):
            raise OptionsError(f"{name} must be a number >= 0, got {value!r}")
    if opts.hadamard_size is not None:
        if opts.head != "hadamard":
            raise OptionsError(f"--hadamard-size applies to the hadamard head only; leave it unset for --head "
                               f"{opts.head}")
        if not _is_int(opts.hadamard_size) or opts.hadamard_size < 2 or opts.hadamard_size & (opts.hadamard_size - 1):
            raise OptionsError(f"--hadamard-size must be a power of two >= 2, got {opts.hadamard_size!r}; "
                               "e.g. 1024 or 2048")
    if opts.opset is not None:
        from fyc_convert.export import MAX_OPSET, MIN_OPSET

        if not _is_int(opts.opset) or not MIN_OPSET <= opts.opset <= MAX_OPSET:
            raise OptionsError(f"--opset {opts.opset!r} is not supported; pass an opset from {MIN_OPSET} to "
                               f"{MAX_OPSET}")
    if opts.class_lr_layers is not None and not all(isinstance(s, str) and s for s in opts.class_lr_layers):
        raise OptionsError("--class-lr-layers must be comma-separated layer names, e.g. features.0,features.2")
    if opts.arch_kwargs is not None:
        from fyc_convert.loading import parse_arch_kwargs

        parse_arch_kwargs(opts.arch_kwargs)
    if opts.resume and opts.dry_run:
        raise OptionsError("--resume finishes an interrupted run, --dry-run writes nothing; pass one of them")
    if opts.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise OptionsError("--device cuda but CUDA is not available; use --device auto or cpu")
    if opts.data is not None and not Path(opts.data).exists():
        raise DataError(f"data not found: {opts.data}; pass an .npz/.pt file or an ImageFolder directory to --data")
    if opts.report_path is not None:
        _check_writable_file("--report", Path(opts.report_path))
    return _ignored(opts)


def _ignored(opts: ConvertOptions) -> list[str]:
    """One note per option that was given but has no effect with the other options."""
    notes: list[str] = []
    if opts.data is None and not opts.dry_run:
        given = [flag for flag, value in (("--epochs", opts.epochs), ("--lr", opts.lr),
                                          ("--batch-size", opts.batch_size), ("--optimizer", opts.optimizer))
                 if value is not None] + (["--distill"] if opts.distill else []) + (["--resume"] if opts.resume else [])
        if given:
            notes.append(f"{', '.join(given)} ignored: there is no --data to calibrate or fine-tune on")
    if opts.dry_run:
        given = [flag for flag, on in (("--epochs", opts.epochs is not None), ("--lr", opts.lr is not None),
                                       ("--optimizer", opts.optimizer is not None), ("--distill", opts.distill),
                                       ("--bench", opts.bench), ("--opset", opts.opset is not None),
                                       ("--static-batch", opts.static_batch is not None),
                                       ("--force", opts.force)) if on]
        if given:
            notes.append(f"{', '.join(given)} ignored: --dry-run trains and exports nothing")
    if opts.optimizer_value != "class-lr":
        given = [flag for flag, value in (("--class-lr-eta-mu", opts.class_lr_eta_mu),
                                          ("--class-lr-cutoff", opts.class_lr_cutoff),
                                          ("--class-lr-layers", opts.class_lr_layers)) if value is not None]
        if given:
            notes.append(f"{', '.join(given)} ignored: they apply to --optimizer class-lr only")
    if opts.epochs == 0 and (opts.lr is not None or opts.optimizer is not None):
        notes.append("--lr/--optimizer ignored: --epochs 0 calibrates α and the bias only")
    if opts.dtype == "fp16" and opts.atol is None and opts.rtol is None:
        atol, rtol = opts.tolerance
        notes.append(f"verification tolerance is atol {atol:g}, rtol {rtol:g} for an fp16 backbone "
                     "(pass --atol/--rtol to change it)")
    return notes


def _choice(flag: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise OptionsError(f"{flag} {value!r} is not one of: {', '.join(choices)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_at_least(flag: str, value: Any, low: int) -> None:
    if value is not None and (not _is_int(value) or value < low):
        raise OptionsError(f"{flag} must be an integer >= {low}, got {value!r}")


def _positive(flag: str, value: Any) -> None:
    if value is not None and not (_is_number(value) and math.isfinite(value) and value > 0):
        raise OptionsError(f"{flag} must be a number > 0, got {value!r}")


def _check_writable_file(flag: str, path: Path) -> None:
    """The file can be created or replaced: its folder exists and is writable, and it is not a folder."""
    if path.is_dir():
        raise OptionsError(f"{flag} {path} is a folder; pass a file name such as {path / 'report.json'}")
    folder = path.parent
    if not folder.is_dir():
        raise OptionsError(f"{flag} {path}: folder {folder} does not exist; create it or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OptionsError(f"{flag} {path}: folder {folder} is not writable; choose a writable path")


def options_json(opts: ConvertOptions) -> str:
    """The options as JSON (paths as strings), for fingerprints and reports."""
    return json.dumps(dataclasses.asdict(opts), default=str, sort_keys=True)

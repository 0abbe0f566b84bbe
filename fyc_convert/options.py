"""Every option of a conversion, declared once, and the checks that run before any long work starts.

Each option is one dataclass field made with `option(...)`: its type, default, help text, flag, and the checks of
its value live together. Three dataclasses group them by concern — `DataOptions` (how `--data` is read),
`FinetuneConfig` (the training loop) and `ConvertOptions` (the whole job, which inherits both, so the pipeline
hands `opts` itself to `load_data` and `finetune`, with no copying) — and the CLI builds its flags from
`ConvertOptions`' fields. Adding an option is adding a field here.

`check_options` validates each field (its metadata) and the combinations (bad values raise `OptionsError`, exit
code 2) and returns one note per option that would have no effect in this run (the CLI prints them, the report
keeps them). This module imports no torch: `fyc-convert --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fyc_convert.errors import ArchError, DataError, OptionsError

MIN_OPSET, MAX_OPSET = 13, 20  # the head builder's forms exist from 13; torch's TorchScript exporter stops at 20
DEFAULT_OPSET = 17  # onnx2torch, ncnn/pnnx and older runtimes take <= 17
HEAD_LAYOUTS = ("portable", "batch-switched", "kron", "ncnn")
GRID_MIN_OPSET = 16  # GridSample (the ncnn head layout's row pick) is in the default domain from opset 16
QUANTIZE_MODES = ("none", "int8")
INTERPOLATIONS = ("nearest", "lanczos", "bilinear", "bicubic", "box", "hamming")
DEFAULT_TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2}  # onnxruntime vs PyTorch on logits (atol and rtol)


def option(default: Any = None, help: str = "", *, flag: str | None = None, panel: str = "Options",
           cli: bool = True, choices: tuple[Any, ...] | None = None, ge: float | None = None,
           gt: float | None = None, lt: float | None = None, parse: str | None = None,
           factory: Any = None) -> Any:
    """A dataclass field that is also a command-line option.

    Args:
        default: the default (None: "not given"; the run decides and says so where it matters).
        help: the --help text.
        flag: the flag, e.g. "-o/--output-dir" or "--bias/--no-bias"; default "--<name with dashes>".
        panel: --help section.
        cli: False for fields the CLI does not offer (set by the library itself).
        choices: allowed values.
        ge, gt, lt: numeric bounds (checked on numbers; `ge=0` on an int field also says "an integer").
        parse: how the CLI reads the text: "ints" / "floats" (comma-separated), "names" (comma-separated),
            "int_or_auto".
        factory: default_factory instead of a default.
    """
    meta = {"help": help, "flag": flag, "panel": panel, "cli": cli, "choices": choices, "ge": ge, "gt": gt,
            "lt": lt, "parse": parse}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_DATA, _TRAIN, _MODEL, _EXPORT, _OUT = "Data", "Training", "Model and head", "Export", "Output"


@dataclass
class DataOptions:
    """How `--data` is read and fed to the model."""

    val_split: float = option(0.1, "Share held out (seeded) when the data has no validation split of its own.",
                              panel=_DATA, ge=0.0, lt=1.0)
    input_shape: tuple[int, ...] | None = option(
        None, "One sample's shape, e.g. 3,224,224 (default: checkpoint meta, the model's config, then the data).",
        panel=_DATA, parse="ints", ge=1)
    mean: tuple[float, ...] | None = option(
        None, "Per-channel mean of inputs in [0, 1], e.g. 0.485,0.456,0.406 (default: meta, the model's config).",
        panel=_DATA, parse="floats")
    std: tuple[float, ...] | None = option(
        None, "Per-channel std, e.g. 0.229,0.224,0.225 (default: meta, the model's config, else 1).",
        panel=_DATA, parse="floats", gt=0.0)
    crop_pct: float | None = option(None, "Eval crop: resize the shorter side to H / crop_pct, then centre crop "
                                          "(default: meta, the model's config, else 1.0).", panel=_DATA, gt=0.0)
    interpolation: str | None = option(None, "Resampling filter for images (default: meta, the model's config, "
                                             "else bilinear).", panel=_DATA, choices=INTERPOLATIONS)
    augment: bool | None = option(None, "Random-resized crop + flip on training images (default: meta, else on for "
                                        "images; arrays are never augmented).", flag="--augment/--no-augment",
                                  panel=_DATA)
    workers: int | None = option(None, "DataLoader worker processes (default: 0 for arrays, a share of the cores "
                                       "for images).", panel=_DATA, ge=0)
    skip_bad_images: bool = option(False, "Skip images that cannot be decoded (counted in the report) instead of "
                                          "stopping.", panel=_DATA)


@dataclass
class FinetuneConfig:
    """Options of the training loop (`finetune.finetune`, `calibrate`, `evaluate`); None: decided by
    `train.recipe.plan` (the one place training defaults are chosen; the help texts describe its rules)."""

    epochs: int | Literal["auto"] | None = option(
        None, "Fine-tuning epochs, or auto: evaluate after each epoch and stop once within --target-drop of the "
              "original, when it stops improving, or at --max-epochs (0 = calibrate α and the bias only). "
              "Default: auto with a validation split, else 3.", panel=_TRAIN, ge=0, parse="int_or_auto")
    max_epochs: int | None = option(None, "Most epochs of --epochs auto (default 10; 30 from 16 classes per "
                                          "feature).", panel=_TRAIN, ge=1)
    target_drop: float = option(0.5, "--epochs auto stops once validation accuracy is within this many points of "
                                     "the original's.", panel=_TRAIN, ge=0.0)
    patience: int | None = option(None, "--epochs auto stops after this many epochs without a better validation "
                                        "accuracy (default 2; 5 with the 30-epoch budget).", panel=_TRAIN, ge=1)
    lr: float | None = option(None, "Peak learning rate (default: chosen with the optimizer, linear in the batch size; "
                                   "see the report).",
                              panel=_TRAIN, gt=0.0)
    batch_size: int | None = option(
        None, "Samples per step and process (default: 128 from 10,000 training samples, else 64).", panel=_TRAIN,
        ge=1)
    optimizer: Literal["sgd", "adamw", "class-lr"] | None = option(
        None, "sgd (momentum), adamw, or class-lr (per-class learning rates); default: adamw for many-class "
              "heads, else sgd.", panel=_TRAIN,
        choices=("sgd", "adamw", "class-lr"))
    momentum: float = option(0.9, "SGD momentum.", panel=_TRAIN, ge=0.0, lt=1.0)
    weight_decay: float = option(5e-4, "Weight decay on every trained parameter, α included (class-lr: none).",
                                 panel=_TRAIN, ge=0.0)
    cosine: bool = option(True, "Cosine decay of the learning rate to 0 over the training steps.",
                          flag="--cosine/--no-cosine", panel=_TRAIN)
    distill: bool | None = option(None, "Learn from the original model's outputs (KL) as well as the labels; "
                                        "unlabelled data always does (default: on; see the report's reasons).",
                                  flag="--distill/--no-distill", panel=_TRAIN)
    temperature: float = option(4.0, "Softening temperature of the distillation KL.", panel=_TRAIN, gt=0.0)
    distill_weight: float = option(0.5, "Weight of the KL term against cross-entropy with labels.", panel=_TRAIN,
                                   ge=0.0)
    seed: int = option(0, "Seeds the split, shuffling, augmentation, dropout and the head's signs.", panel=_TRAIN,
                       ge=0)
    device: Literal["auto", "cpu", "cuda"] = option("auto", "Where to train (auto: CUDA when available).",
                                                     panel=_TRAIN, choices=("auto", "cpu", "cuda"))
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", "Training precision (auto: bf16 or fp16 mixed precision on CUDA, fp32 on CPU).", panel=_TRAIN,
        choices=("auto", "fp32", "bf16", "fp16"))
    channels_last: bool | None = option(None, "channels_last memory format for conv nets (default: on CUDA).",
                                        flag="--channels-last/--no-channels-last", panel=_TRAIN)
    eval_batch_size: int = option(256, "Batch size of evaluation.", panel=_TRAIN, ge=1)
    resume: bool = option(False, "Finish an interrupted run in the output folder (training continues from its "
                                 "checkpoint).", panel=_OUT)
    out_dir: Path | None = option(None, "Checkpoint folder of the loop (the job uses <output>/checkpoints).",
                                  cli=False)
    class_lr_eta_mu: float | None = option(None, "class-lr: learning rate of the per-class factors μ. "
                                                 "[default: 1e4]", panel=_TRAIN, gt=0.0)
    class_lr_cutoff: int | None = option(None, "class-lr: epoch from which plain gradients return. [default: 10]",
                                         panel=_TRAIN, ge=0)
    class_lr_layers: tuple[str, ...] | None = option(
        None, "class-lr: comma-separated nn.Linear names (default: the hidden Linear layers).", panel=_TRAIN,
        parse="names")


@dataclass
class ConvertOptions(DataOptions, FinetuneConfig):
    """Every option of a conversion (the CLI's flags are these fields, in this order in --help's panels)."""

    head: Literal["hadamard", "orthogonal"] = option("hadamard", "Fixed head to swap in.", panel=_MODEL,
                                                     choices=("hadamard", "orthogonal"))
    arch: str | None = option(None, "MODULE:CALLABLE (or path/file.py:CALLABLE) that builds the model.",
                              panel=_MODEL)
    arch_kwargs: str | dict[str, Any] | None = option(None, "JSON keyword arguments for --arch.", panel=_MODEL)
    trust_pickle: bool = option(False, "Allow unpickling a whole model: this RUNS CODE from the file.",
                                panel=_MODEL)
    trust_remote_code: bool = option(False, "Allow a model folder's own Python code (Hugging Face auto_map): "
                                            "this RUNS CODE from the folder.", panel=_MODEL)
    layer: str | None = option(None, "Dotted name of the classifier, or NAME,NAME for several (found "
                                     "automatically otherwise).", panel=_MODEL)
    hadamard_size: int | None = option(None, "Transform size of the hadamard head, a power of two (default: the "
                                             "widest row choice).", panel=_MODEL)
    adapter: Literal["auto", "on", "off"] = option(
        "auto", "A learned map from the N features to W = min(8N, C/4), at least N, before a fixed head on W "
                "features (W·N + W parameters; the orthogonal head: N x N): auto puts it where classes outnumber "
                "features 16 to 1 and fine-tuning follows, where it recovers far more accuracy.", panel=_MODEL,
        choices=("auto", "on", "off"))
    fixed_scale: float | None = option(None, "A fixed α instead of a learned one.", panel=_MODEL, gt=0.0)
    bias: bool = option(True, "Keep a learned bias in the head.", flag="--bias/--no-bias", panel=_MODEL)
    data: Path | None = option(None, ".npz, .pt, a folder of .npy arrays or an image folder: calibrate, "
                                     "fine-tune and measure accuracy.", panel=_DATA)
    opset: int | None = option(None, f"ONNX opset, {MIN_OPSET} to {MAX_OPSET}. [default: {DEFAULT_OPSET}, what "
                                     "most edge converters take]", panel=_EXPORT, ge=MIN_OPSET)
    exporter: Literal["auto", "torchscript", "dynamo"] = option(
        "auto", "ONNX exporter: auto (TorchScript, then torch.export where it fails), torchscript or dynamo.",
        panel=_EXPORT, choices=("auto", "torchscript", "dynamo"))
    head_layout: Literal["portable", "batch-switched", "kron", "ncnn"] = option(
        "portable", "ONNX head graph: portable (add/sub only, every edge runtime), batch-switched (an If on the "
                    "batch size; onnxruntime servers with large heads and batches), kron (MatMuls by ±1 "
                    "blocks of at most 32 x 32; runtimes with fast GEMM kernels, NPUs) or ncnn (portable, rows "
                    "picked by GridSample: ncnn has no gather; with --static-batch 1).", panel=_EXPORT,
        choices=HEAD_LAYOUTS)
    static_batch: int | None = option(None, "Export with this fixed batch size (edge compilers, NPUs) instead of "
                                            "a dynamic batch axis.", panel=_EXPORT, ge=1)
    dtype: Literal["fp32", "fp16"] = option("fp32", "Precision of the exported backbone; inputs and outputs stay "
                                                    "fp32.", panel=_EXPORT, choices=("fp32", "fp16"))
    embed_preprocessing: bool = option(
        False, "Normalise inside both graphs: they take raw pixels (see --pixel-range) instead of (x - mean) / std.",
        panel=_EXPORT)
    pixel_range: Literal["0-1", "0-255"] | None = option(
        None, "With --embed-preprocessing, the graphs' input values: 0-1 (images scaled to [0, 1]) or 0-255 (8-bit "
              "pixel values, as float32). [default: 0-1]", panel=_EXPORT, choices=("0-1", "0-255"))
    quantize: Literal["none", "int8"] = option(
        "none", "Also write model.int8.onnx (onnxruntime static QDQ, per-channel weights, the fixed head exact "
                "inside) and original.int8.onnx, calibrated on a seeded subset of --data's training split.",
        panel=_EXPORT, choices=QUANTIZE_MODES)
    int8_max_drop: float = option(1.0, "Largest accuracy drop, in points, of model.int8.onnx against the float32 "
                                       "model.onnx (exit 3 beyond it).", panel=_EXPORT, ge=0.0)
    atol: float | None = option(None, "Verification tolerance on the logits, absolute. [default: 1e-4; fp16: "
                                      "5e-2]", panel=_EXPORT, ge=0.0)
    rtol: float | None = option(None, "Verification tolerance, relative. [default: as --atol]", panel=_EXPORT,
                                ge=0.0)
    output_dir: Path | None = option(None, "Output folder. [default: <checkpoint stem>_fyc/ beside the checkpoint]",
                                     flag="-o/--output-dir", panel=_OUT)
    report_path: Path | None = option(None, "Also write the JSON report here (the only output of --dry-run).",
                                      flag="--report", panel=_OUT)
    dry_run: bool = option(False, "Load, find and swap; report the savings; train and write nothing.",
                           panel=_OUT)
    bench: bool = option(False, "Add onnxruntime latencies of original vs converted to the report.", panel=_OUT)
    force: bool = option(False, "Write into an existing output folder (its earlier outputs are replaced).",
                         panel=_OUT)

    # ------------------------------------------------------------------ values the run uses
    @property
    def tolerance(self) -> tuple[float, float]:
        """(atol, rtol) of the verification."""
        default = DEFAULT_TOLERANCE[self.dtype]
        atol = default if self.atol is None else self.atol
        return atol, (default if self.rtol is None else self.rtol)


def cli_fields() -> list[dataclasses.Field]:
    """The fields the CLI offers as flags (ConvertOptions' own first, then data, then training)."""
    own = {f.name for f in dataclasses.fields(ConvertOptions)} - {f.name for f in dataclasses.fields(DataOptions)} \
        - {f.name for f in dataclasses.fields(FinetuneConfig)}
    every = dataclasses.fields(ConvertOptions)
    ordered = [f for f in every if f.name in own] + [f for f in every if f.name not in own]
    return [f for f in ordered if f.metadata.get("cli", True)]


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
    for f in dataclasses.fields(opts):
        _check_field(f, getattr(opts, f.name))
    if opts.hadamard_size is not None:
        if opts.head != "hadamard":
            raise OptionsError(f"--hadamard-size applies to the hadamard head only; leave it unset for --head "
                               f"{opts.head}")
        if opts.hadamard_size < 2 or opts.hadamard_size & (opts.hadamard_size - 1):
            raise OptionsError(f"--hadamard-size must be a power of two >= 2, got {opts.hadamard_size!r}; "
                               "e.g. 1024 or 2048")
    if opts.opset is not None and opts.opset > MAX_OPSET:
        raise OptionsError(f"--opset {opts.opset!r} is not supported; pass an opset from {MIN_OPSET} to {MAX_OPSET}")
    if opts.head_layout == "ncnn" and opts.opset is not None and opts.opset < GRID_MIN_OPSET:
        raise OptionsError(f"--head-layout ncnn picks the class rows with GridSample (opset {GRID_MIN_OPSET} and "
                           f"newer); pass --opset {GRID_MIN_OPSET} or higher, or leave --opset unset")
    if opts.mean is not None and opts.std is not None and len(opts.mean) != len(opts.std):
        raise OptionsError(f"--mean has {len(opts.mean)} values but --std {len(opts.std)}; give one per channel")
    if opts.arch_kwargs is not None:
        parse_arch_kwargs(opts.arch_kwargs)
    if opts.resume and opts.dry_run:
        raise OptionsError("--resume finishes an interrupted run, --dry-run writes nothing; pass one of them")
    if opts.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise OptionsError("--device cuda but CUDA is not available; use --device auto or cpu")
    if opts.data is not None and not Path(opts.data).exists():
        raise DataError(f"data not found: {opts.data}; pass an .npz/.pt file or an ImageFolder directory to --data")
    if opts.quantize == "int8":
        _check_int8(opts)
    if opts.report_path is not None:
        # a report inside the -o folder is fine before that folder exists: the run creates it first
        will_exist = None if opts.dry_run or opts.output_dir is None else Path(opts.output_dir)
        _check_writable_file("--report", Path(opts.report_path), will_exist=will_exist)
    return _ignored(opts)


def _check_int8(opts: ConvertOptions) -> None:
    """`--quantize int8` needs calibration samples and the float32 export it quantizes."""
    if opts.data is None:
        raise OptionsError("--quantize int8 needs --data: static quantization calibrates on training samples; "
                           "pass --data or drop --quantize")
    if opts.dtype != "fp32":
        raise OptionsError(f"--quantize int8 quantizes the float32 export; drop --dtype {opts.dtype}")


def _flag(f: dataclasses.Field) -> str:
    """The flag a user typed for field `f` (its long form)."""
    flag = f.metadata.get("flag") or f"--{f.name.replace('_', '-')}"
    return next(part for part in flag.split("/") if part.startswith("--"))


def _check_field(f: dataclasses.Field, value: Any) -> None:
    """The checks in the field's metadata: choices, bounds (and integer-ness for int fields), element bounds."""
    meta = f.metadata
    if value is None or not meta or not isinstance(meta.get("help"), str):
        return
    flag = _flag(f)
    if meta.get("parse") == "int_or_auto" and value == "auto":
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise OptionsError(f"{flag} {value!r} is not one of: {', '.join(map(str, choices))}")
    text = str(f.type).split("Literal[")[0]  # a Literal's values ("int8") name no type
    kind = "int" if "int" in text and "float" not in text else "float" if "float" in text else ""
    values = value if isinstance(value, (tuple, list)) else (value,)
    if meta.get("parse") == "names":
        if not values or not all(isinstance(v, str) and v.strip() for v in values):
            raise OptionsError(f"{flag} must be comma-separated names, e.g. features.0,features.2")
        return
    if isinstance(value, (tuple, list)) and not value:
        raise OptionsError(f"{flag} needs at least one value")
    for v in values:
        if kind and not _is_number(v, integer=kind == "int"):
            raise OptionsError(f"{flag} must be {'an integer' if kind == 'int' else 'a number'}, got {value!r}")
        if not kind:
            continue
        if not math.isfinite(v):
            raise OptionsError(f"{flag} must be a finite number, got {value!r}")
        for bound, ok, words in (("ge", lambda x, b: x >= b, ">="), ("gt", lambda x, b: x > b, ">"),
                                 ("lt", lambda x, b: x < b, "<")):
            b = meta.get(bound)
            if b is not None and not ok(v, b):
                what = "an integer" if kind == "int" else "a number"
                raise OptionsError(f"{flag} must be {what} {words} {b:g}, got {value!r}")


def _is_number(value: Any, *, integer: bool) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if integer else isinstance(value, (int, float))


def _ignored(opts: ConvertOptions) -> list[str]:
    """One note per option that was given but has no effect with the other options."""
    notes: list[str] = []
    training = [flag for flag, on in (("--epochs", opts.epochs is not None), ("--lr", opts.lr is not None),
                                      ("--batch-size", opts.batch_size is not None),
                                      ("--optimizer", opts.optimizer is not None),
                                      ("--distill", opts.distill is not None))
                if on]
    if opts.data is None and not opts.dry_run:
        given = training + (["--resume"] if opts.resume else [])
        if given:
            notes.append(f"{', '.join(given)} ignored: there is no --data to calibrate or fine-tune on")
    if opts.dry_run:
        given = training + [flag for flag, on in (("--bench", opts.bench), ("--opset", opts.opset is not None),
                                                   ("--static-batch", opts.static_batch is not None),
                                                   ("--quantize", opts.quantize != "none"),
                                                   ("--force", opts.force)) if on]
        if given:
            notes.append(f"{', '.join(given)} ignored: --dry-run trains and exports nothing")
    if opts.optimizer != "class-lr":
        given = [flag for flag, value in (("--class-lr-eta-mu", opts.class_lr_eta_mu),
                                          ("--class-lr-cutoff", opts.class_lr_cutoff),
                                          ("--class-lr-layers", opts.class_lr_layers)) if value is not None]
        if given:
            notes.append(f"{', '.join(given)} ignored: they apply to --optimizer class-lr only")
    if opts.epochs == 0 and (opts.lr is not None or opts.optimizer is not None):
        notes.append("--lr/--optimizer ignored: --epochs 0 calibrates α and the bias only")
    if opts.pixel_range is not None and not opts.embed_preprocessing:
        notes.append("--pixel-range ignored: it applies with --embed-preprocessing only")
    if opts.dtype == "fp16" and opts.atol is None and opts.rtol is None:
        atol, rtol = opts.tolerance
        notes.append(f"verification tolerance is atol {atol:g}, rtol {rtol:g} for an fp16 backbone "
                     "(pass --atol/--rtol to change it)")
    return notes


def _check_writable_file(flag: str, path: Path, *, will_exist: Path | None = None) -> None:
    """The file can be created or replaced: its folder exists (or is `will_exist`, which the run creates) and is
    writable, and it is not a folder."""
    if path.is_dir():
        raise OptionsError(f"{flag} {path} is a folder; pass a file name such as {path / 'report.json'}")
    folder = path.parent
    if will_exist is not None and not folder.exists() and folder.resolve() == will_exist.resolve():
        return  # the run creates it (and reports there if it cannot)
    if not folder.is_dir():
        raise OptionsError(f"{flag} {path}: folder {folder} does not exist; create it or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OptionsError(f"{flag} {path}: folder {folder} is not writable; choose a writable path")


def parse_arch_kwargs(arch_kwargs: str | dict | None) -> dict[str, Any]:
    """`--arch-kwargs` as a dict (a JSON object string, a dict, or None for {}); torch-free, so options own it.

    Raises:
        ArchError: not JSON, or not a JSON object.
    """
    if arch_kwargs is None:
        return {}
    if isinstance(arch_kwargs, str):
        try:
            arch_kwargs = json.loads(arch_kwargs)
        except json.JSONDecodeError as e:
            raise ArchError(f"--arch-kwargs is not valid JSON ({e}); pass an object like "
                            "'{\"num_classes\": 10}'") from e
    if not isinstance(arch_kwargs, dict):
        raise ArchError(f"--arch-kwargs must be a JSON object, got {type(arch_kwargs).__name__}; pass an object "
                        "like '{\"num_classes\": 10}'")
    return arch_kwargs

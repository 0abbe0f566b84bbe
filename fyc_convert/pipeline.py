"""`convert()`: the whole job — load, swap, calibrate/fine-tune, export, verify, report.

The CLI is a thin shell over this function; Python users call it directly:

    from fyc_convert import convert
    report = convert("model.pt", arch="mypkg.models:resnet", data="data.npz", epochs=3)
    print(report.accuracy.finetuned, report.onnx.converted_bytes)
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from fyc_convert.errors import OutputError, OutputExistsError, VerificationError
from fyc_convert.files import write_text_atomic
from fyc_convert.report import AccuracyReport, OnnxReport, ParamsReport, Report

Progress = Callable[[str], None]  # receives one-line status messages ("exporting ONNX", ...)


@dataclass
class ConvertOptions:
    """Every option of a conversion; the CLI flags map one to one onto these fields."""

    head: Literal["hadamard", "orthogonal"] = "hadamard"  # kind of fixed head to swap in
    arch: str | None = None  # "module:callable" or "path/file.py:callable" building the model (state_dicts)
    arch_kwargs: str | dict[str, Any] | None = None  # JSON (or dict) of keyword arguments for `arch`
    trust_pickle: bool = False  # allow unpickling a whole nn.Module (runs code from the file)
    layer: str | None = None  # dotted name of the classifier; found automatically when None
    input_shape: tuple[int, ...] | None = None  # one sample's shape, e.g. (3, 224, 224), when data/meta lack it
    data: str | Path | None = None  # .npz / ImageFolder / .pt data for calibration, fine-tuning and accuracy
    val_split: float = 0.1  # validation share when the data has no validation split
    epochs: int = 3  # fine-tuning epochs; 0 = calibrate alpha and bias only
    lr: float | None = None  # learning rate; None = the optimizer's default
    batch_size: int = 64
    optimizer: Literal["sgd", "adamw", "class-lr"] = "sgd"
    distill: bool = False  # learn from the original model's outputs (KL) as well as labels
    fixed_scale: float | None = None  # a fixed alpha instead of a learned one
    bias: bool = True  # keep a learned bias in the head
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    hadamard_size: int | None = None  # transform size m of the hadamard head; None = from_linear's widest choice
    resume: bool = False  # continue an interrupted fine-tuning run from the output folder's checkpoint
    output_dir: str | Path | None = None  # default: <checkpoint stem>_fyc/ next to the checkpoint
    opset: int | None = None  # ONNX opset; None = export.DEFAULT_OPSET
    dtype: Literal["fp32", "fp16"] = "fp32"  # precision of the exported backbone (inputs/outputs stay fp32)
    atol: float = 1e-4  # onnxruntime-vs-PyTorch tolerance on logits
    rtol: float = 1e-4
    report_path: str | Path | None = None  # extra copy of report.json (the only output of --dry-run)
    dry_run: bool = False  # load, find, swap and count; train and write nothing (but `report_path`)
    bench: bool = False  # add onnxruntime latencies of original vs converted to the report
    force: bool = False  # allow writing into an existing output folder
    class_lr_eta_mu: float = 1e4  # per-class learning rates: meta learning rate of mu
    class_lr_cutoff: int = 10  # per-class learning rates: epoch after which plain gradients return
    class_lr_layers: tuple[str, ...] | None = None  # per-class learning rates: layers (default: hidden Linears)


def convert(checkpoint: str | Path, options: ConvertOptions | None = None, *,
            progress: Progress | None = None, epoch_progress: Any = None, **fields: Any) -> Report:
    """Convert a trained classifier checkpoint; returns the report (also written to the output folder).

    Args:
        checkpoint: path of the trained model (state_dict/checkpoint dict + `arch`, .safetensors + `arch`,
            pickled module with `trust_pickle`, TorchScript).
        options: all settings; keyword `fields` override single ones (`convert(p, epochs=0)`).
        progress: receives one-line status messages.
        epoch_progress: passed to the training loop (a rich Progress to draw per-epoch bars), or None.

    Raises:
        FycError subclasses with a one-line message; VerificationError (with `.report`) when the
        exported model does not match PyTorch — the ONNX file is then kept only as `model.failed.onnx`.
    """
    opts = dataclasses.replace(options or ConvertOptions(), **fields)
    say = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    ckpt = Path(checkpoint)
    out_dir = Path(opts.output_dir) if opts.output_dir else ckpt.parent / f"{ckpt.stem}_fyc"
    writes = not opts.dry_run and _is_main_process()
    if writes:
        _prepare_output_dir(out_dir, force=opts.force, resume=opts.resume)

    # Imports here keep `import fyc_convert` (and `fyc-convert --help`) fast.
    from fyc_convert.loading import load_model
    from fyc_convert.surgery import capture_features, find_classifier, swap_classifier

    say(f"loading {ckpt}")
    loaded = load_model(ckpt, arch=opts.arch, arch_kwargs=opts.arch_kwargs, trust_pickle=opts.trust_pickle)
    model = loaded.model.eval()
    meta = loaded.meta or {}

    from fyc_convert.data import DataOptions
    from fyc_convert.preprocess import resolve_preprocessing

    data_opts = DataOptions(val_split=opts.val_split, input_shape=opts.input_shape)
    bundle = None
    if opts.data is not None:
        from fyc_convert.data import load_data

        say(f"reading data {opts.data}")
        bundle = load_data(opts.data, data_opts, seed=opts.seed, meta=meta, model=model)
    # the model's input shape: options, checkpoint meta, the model's own config, then the data
    prep = bundle.preprocessing if bundle is not None else resolve_preprocessing(data_opts, meta=meta, model=model)
    input_shape = prep.input_shape

    original = copy.deepcopy(model)
    layer, linear = find_classifier(model, layer=opts.layer, input_shape=input_shape)
    features = None
    if bundle is not None:
        from fyc_convert.data import check_data
        from fyc_convert.loader import subset_loader

        check_data(bundle, num_classes=linear.out_features, input_shape=input_shape)
        # row-assignment features of a seeded random subset (sorted data must not bias it), streamed
        features = capture_features(model, layer, subset_loader(bundle.plain_train, 2048, seed=opts.seed,
                                                                workers=bundle.workers))

    say(f"swapping {layer} ({linear.in_features} → {linear.out_features}) for a fixed {opts.head} head")
    swap = swap_classifier(model, head=opts.head, layer=layer, input_shape=input_shape, features=features,
                           bias=opts.bias, fixed_scale=opts.fixed_scale, seed=opts.seed,
                           hadamard_size=opts.hadamard_size)
    head = swap.head
    pc = swap.params
    report = Report(
        status="dry_run" if opts.dry_run else "ok",
        checkpoint=str(ckpt),
        head=opts.head,
        layer=swap.layer,
        in_features=swap.in_features,
        num_classes=swap.num_classes,
        hadamard_size=getattr(head, "hadamard_size", None),
        embed_size=getattr(head, "embed_size", None),
        embedding=getattr(head, "embedding", None),
        coherence=float(head.coherence()),
        params=ParamsReport(original=pc.original, converted=pc.converted, removed=pc.removed,
                            removed_pct=pc.removed_pct, head_before=pc.head_before, head_after=pc.head_after,
                            trainable=pc.trainable),
    )
    from fyc_convert.finetune import gradient_bytes

    report.gradient_bytes = {"original": gradient_bytes(original), "converted": gradient_bytes(model)}
    if opts.head == "orthogonal":
        report.notes.append("the orthogonal head has no fast transform: it is exported as a dense constant, "
                            "so its savings are in trained parameters only, not in file size or compute")

    if bundle is not None:
        report.notes.append(_data_note(bundle))
    if bundle is not None and not opts.dry_run:
        _train(model, original, head, bundle, opts, out_dir if writes else None, report, say, epoch_progress)
    elif bundle is None:
        report.notes.append("accuracy not measured: pass --data to calibrate, fine-tune and measure accuracy")

    if opts.dry_run:
        report.elapsed_s = time.perf_counter() - t0
        if opts.report_path is not None and _is_main_process():
            write_text_atomic(opts.report_path, report.to_json())
            report.files["report"] = str(opts.report_path)
        return report
    if not writes:  # non-zero ranks under torchrun: rank 0 exports and writes
        return report

    if input_shape is None:
        from fyc_convert.errors import ExportError

        raise ExportError("cannot export without the input shape: pass --input-shape C,H,W or --data")
    _export_and_verify(model, original, swap, bundle, input_shape, opts, out_dir, report, say)
    report.elapsed_s = time.perf_counter() - t0
    _write_report(report, out_dir, opts)
    return report


def _train(model, original, head, bundle, opts: ConvertOptions, out_dir: Path | None, report: Report,
           say: Progress, epoch_progress: Any) -> None:
    """Accuracy before/after the swap, calibration, fine-tuning — all through finetune.py's one loop."""
    from fyc_convert.finetune import FinetuneConfig, calibrate, evaluate, finetune

    device = opts.device
    held_out = bundle.val if bundle.val is not None else bundle.train
    where = "val" if bundle.val is not None else "train (no validation split)"
    acc = AccuracyReport(measured_on=f"{where}, {len(held_out)} samples")

    def accuracy(m) -> float | None:
        return evaluate(m, held_out, device=device, workers=bundle.workers).accuracy

    acc.original = accuracy(original)
    acc.swapped = accuracy(model)
    say("calibrating α and bias with the backbone frozen")
    calibrate(model, head, bundle.plain_train, device=device, seed=opts.seed, workers=bundle.workers,
              teacher=original if opts.distill or not bundle.labelled else None,
              distill=opts.distill or not bundle.labelled)
    acc.calibrated = accuracy(model)
    if opts.epochs > 0:
        cfg = FinetuneConfig(
            epochs=opts.epochs, lr=opts.lr, batch_size=opts.batch_size, optimizer=opts.optimizer,
            distill=opts.distill or not bundle.labelled, seed=opts.seed, device=opts.device,
            out_dir=None if out_dir is None else out_dir / "checkpoints", resume=opts.resume,
            class_lr_eta_mu=opts.class_lr_eta_mu, class_lr_cutoff=opts.class_lr_cutoff,
            class_lr_layers=list(opts.class_lr_layers) if opts.class_lr_layers else None)
        say(f"fine-tuning {opts.epochs} epoch(s) with {opts.optimizer}")
        result = finetune(model, head, bundle, cfg, teacher=original if cfg.distill else None,
                          progress=epoch_progress)
        for h in result.history:
            val = f", val acc {_pct(h.val.accuracy)}" if h.val is not None and h.val.accuracy is not None else ""
            say(f"epoch {h.epoch}: loss {h.loss:.4f}{val}, {h.seconds:.1f} s, {h.samples_per_s:,.0f} samples/s")
        acc.finetuned = accuracy(model)
        report.training = {"epochs": opts.epochs, "optimizer": opts.optimizer, "device": result.device,
                           "world_size": result.world_size, "resumed_from_epoch": result.resumed_from_epoch,
                           "precision": result.precision, "channels_last": result.channels_last,
                           "data": bundle.summary() | {"skipped_images": result.skipped_images},
                           "history": [dataclasses.asdict(h) for h in result.history]}
        if result.skipped_images:
            report.notes.append(f"skipped {result.skipped_images} unreadable image(s) (--skip-bad-images)")
    acc.agreement = evaluate(model, held_out, device=device, reference_model=original,
                             workers=bundle.workers).agreement
    report.accuracy = acc
    model.cpu().eval()


def _export_and_verify(model, original, swap, bundle, input_shape, opts: ConvertOptions, out_dir: Path,
                       report: Report, say: Progress) -> None:
    from fyc_convert.export import DEFAULT_OPSET, export_onnx
    from fyc_convert.verify import check_head_static, mark_failed, verify_onnx

    opset = opts.opset or DEFAULT_OPSET
    model.cpu().eval()
    original.cpu().eval()
    say("exporting original.onnx and model.onnx")
    orig_res = export_onnx(original, out_dir / "original.onnx", input_shape=input_shape, opset=opset,
                           dtype=opts.dtype)
    manifest = {"fyc_convert.checkpoint": Path(report.checkpoint).name}
    conv_res = export_onnx(model, out_dir / "model.onnx", input_shape=input_shape, opset=opset, dtype=opts.dtype,
                           head_layer=swap.layer, metadata=manifest)
    report.files["original_onnx"] = str(orig_res.path)
    onnx_rep = OnnxReport(original_bytes=orig_res.bytes, converted_bytes=conv_res.bytes,
                          size_reduction_pct=100.0 * (1 - conv_res.bytes / orig_res.bytes),
                          head_ops=dict(conv_res.head_ops), original_nodes=orig_res.node_count,
                          converted_nodes=conv_res.node_count, opset=opset, dtype=opts.dtype)
    report.onnx = onnx_rep

    say("verifying model.onnx against PyTorch with onnxruntime")
    if opts.head == "hadamard":
        check_head_static(conv_res.path, num_classes=swap.num_classes, embed_size=swap.head.embed_size)
    real = None
    if bundle is not None:
        from fyc_convert.loader import sample_inputs

        real = sample_inputs(bundle.val if bundle.val is not None else bundle.plain_train, 64, seed=opts.seed,
                             workers=bundle.workers)
    atol, rtol = (opts.atol, opts.rtol) if opts.dtype == "fp32" else (max(opts.atol, 5e-2), max(opts.rtol, 5e-2))
    try:
        ver = verify_onnx(conv_res.path, model, inputs=real, input_shape=input_shape, atol=atol, rtol=rtol,
                          seed=opts.seed)
    except VerificationError as err:
        failed = mark_failed(conv_res.path)
        report.status = "verification_failed"
        report.onnx.max_abs_diff, report.onnx.mean_abs_diff = err.max_abs_diff, err.mean_abs_diff
        report.files["failed_onnx"] = str(failed)
        _write_report(report, out_dir, opts)
        err.report = report  # type: ignore[attr-defined]
        raise
    onnx_rep.max_abs_diff, onnx_rep.mean_abs_diff = ver.max_abs_diff, ver.mean_abs_diff
    report.files["model_onnx"] = str(conv_res.path)

    say("saving model.safetensors")
    from fyc_convert.weights import save_converted

    report.files["model_safetensors"] = str(save_converted(model, out_dir / "model.safetensors", layer=swap.layer,
                                                           head=swap.head))

    if opts.bench:
        say("benchmarking with onnxruntime (1 thread)")
        report.latency_ms = _bench(orig_res.path, conv_res.path, swap, input_shape)


def _bench(original_path: Path, converted_path: Path, swap, input_shape) -> dict[str, Any]:
    import numpy as np

    from fyc_convert.bench import compare_latency, gemm_head_model, session
    from fyc_convert.onnx_head import HeadSpec, head_model

    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"threads": 1, "runtime": "onnxruntime CPU", "statistic": "median"}
    sessions = [session(original_path), session(converted_path)]
    for b in (1, 32):
        x = rng.standard_normal((b, *input_shape)).astype(np.float32)
        o, c = compare_latency(sessions, x, repeats=30)
        out[f"model_b{b}"] = {"original": o, "converted": c}
    if swap.head.head_kind == "hadamard":
        lin = swap.original_head
        gemm = session(gemm_head_model(lin.weight.detach().numpy(),
                                       None if lin.bias is None else lin.bias.detach().numpy()))
        fast = session(head_model(HeadSpec.from_module(swap.head)))
        for b in (1, 64):
            f = rng.standard_normal((b, swap.in_features)).astype(np.float32)
            o, c = compare_latency([gemm, fast], f, repeats=100)
            out[f"head_b{b}"] = {"original": o, "converted": c}
    return out


def _write_report(report: Report, out_dir: Path, opts: ConvertOptions) -> None:
    report.files["report"] = str(out_dir / "report.json")
    text = report.to_json()
    write_text_atomic(out_dir / "report.json", text)
    if opts.report_path is not None:
        write_text_atomic(opts.report_path, text)


def _prepare_output_dir(out_dir: Path, *, force: bool, resume: bool) -> None:
    try:
        if out_dir.exists() and not out_dir.is_dir():
            raise OutputError(f"{out_dir} exists and is not a folder; pass a different -o/--output-dir")
        if out_dir.exists() and any(out_dir.iterdir()) and not (force or resume):
            raise OutputExistsError(f"output folder {out_dir} already exists; pass --force to overwrite its files, "
                                    f"--resume to continue, or -o to choose another folder")
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".fyc-write-test-{os.getpid()}.tmp"
        probe.touch()
        probe.unlink()
        for stale in out_dir.glob(".*.tmp"):  # temp files of an interrupted earlier run
            stale.unlink(missing_ok=True)
    except OSError as e:
        raise OutputError(f"output folder {out_dir} is not writable ({e.strerror}); "
                          f"choose a writable -o/--output-dir") from e


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _data_note(bundle) -> str:
    """One line for the report: the data's format and the preprocessing used, each value with its source."""
    p = bundle.preprocessing
    parts = [f"input {'x'.join(map(str, p.input_shape))} ({p.sources.get('input_shape', 'default')})"]
    for name in ("mean", "std"):
        value = getattr(p, name)
        if value is not None:
            parts.append(f"{name} {', '.join(f'{v:g}' for v in value)} ({p.sources.get(name)})")
    if bundle.kind == "images":
        parts.append(f"crop_pct {p.crop_pct:g} ({p.sources.get('crop_pct', 'default')})")
        parts.append(f"{p.interpolation} ({p.sources.get('interpolation', 'default')})")
    parts.append(f"augment {'on' if p.augment else 'off'} ({p.sources.get('augment', 'default')})")
    return f"data: {bundle.kind}, {len(bundle.train)} train / {len(bundle.val) if bundle.val else 0} val; " \
           f"preprocessing: {'; '.join(parts)}"


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0

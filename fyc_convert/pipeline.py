"""`convert()`: the whole job — load, swap, calibrate/fine-tune, export, verify, report.

The CLI is a thin shell over this function; Python users call it directly:

    from fyc_convert import convert
    report = convert("model.pt", arch="mypkg.models:resnet", data="data.npz", epochs=3)
    print(report.accuracy.finetuned, report.onnx.converted_bytes)

Outputs and interruptions: every option is checked before any work (`options.check_options`). The ONNX files,
the weights and the report are written into a temporary folder inside the output folder and only moved to their
final names once the converted model has been verified; `report.json` is moved before `model.onnx`, so a
`model.onnx` never exists without the verified report beside it. A killed run leaves only temporary names,
which the next run removes; `--resume` then finishes it: training continues from its last checkpoint (or is
skipped when it had finished, calibration too), and export, verification, saving and the report run again.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fyc_convert.distributed import is_main, on_main
from fyc_convert.errors import (
    FycError,
    ModelRunError,
    OutputError,
    OutputExistsError,
    VerificationError,
    describe,
)
from fyc_convert.files import remove_stale_temps, temp_dir, write_text_atomic
from fyc_convert.options import ConvertOptions, check_options, make_options
from fyc_convert.report import AccuracyReport, OnnxReport, ParamsReport, Report, swap_verdict

__all__ = ["ConvertOptions", "OUTPUT_NAMES", "convert"]

Progress = Callable[[str], None]  # receives one-line status messages ("exporting ONNX", ...)

CHECKPOINT_DIR = "checkpoints"  # training checkpoints and the run state (train/run_state.py), for --resume
# Final output names, in the order an earlier run's outputs are retired (model.onnx first: it must never be
# left beside a report that does not describe it); an ONNX file's external data goes with it.
OUTPUT_NAMES = ("model.onnx", "model.int8.onnx", "model.failed.onnx", "model.int8.failed.onnx", "report.json",
                "original.onnx", "original.int8.onnx", "model.safetensors")
_FEATURE_SAMPLES = 2048  # training samples whose classifier inputs choose the head's rows


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
        FycError subclasses with a one-line message; OptionsError for a bad option (before any work);
        VerificationError (with `.report`) when the exported model does not match PyTorch — the ONNX file is
        then kept only as `model.failed.onnx`, beside `model.safetensors` and the report.
    """
    opts = make_options(options, fields)
    notes = check_options(opts)
    t0 = time.perf_counter()
    say = progress or (lambda _msg: None)
    ckpt = Path(checkpoint)
    out_dir = Path(opts.output_dir) if opts.output_dir else ckpt.parent / f"{ckpt.stem}_fyc"
    created = False
    if not opts.dry_run:
        created = bool(on_main(lambda: _prepare_output_dir(out_dir, force=opts.force, resume=opts.resume)))
    try:
        return _run(ckpt, opts, out_dir, notes, t0, say, epoch_progress)
    except BaseException:
        if not opts.dry_run and is_main():
            _remove_if_empty(out_dir, created)
        raise


def _run(ckpt: Path, opts: ConvertOptions, out_dir: Path, notes: list[str], t0: float, say: Progress,
         epoch_progress: Any) -> Report:
    model, bundle, prep, notes, loaded = _load_inputs(ckpt, opts, notes, say)
    input_shape = prep.input_shape
    original = copy.deepcopy(model)
    swap, found = _swap(model, bundle, input_shape, opts, say)
    report = _swap_report(ckpt, opts, swap, found, prep, notes)
    _describe_usage(report, loaded.format, loaded.meta or {}, bundle, ckpt, opts, input_shape)
    if (kept := found.kept_note()) is not None:  # --layer left a learned classifier: said, never a plain "ok"
        report.notes.append(kept)
    from fyc_convert.train.finetune import gradient_bytes

    report.gradient_bytes = {"original": gradient_bytes(original), "converted": gradient_bytes(model)}
    if bundle is not None and not opts.dry_run:
        _train(model, original, swap, bundle, opts, out_dir, report, say, epoch_progress, input_shape)
    elif bundle is None:
        report.notes.append("accuracy not measured: pass --data to calibrate, fine-tune and measure accuracy")

    if opts.dry_run:
        report.elapsed_s = time.perf_counter() - t0
        report.verdict = swap_verdict(report)
        if opts.report_path is not None and is_main():
            write_text_atomic(opts.report_path, report.to_json())
            report.files["report"] = str(opts.report_path)
        return report
    if input_shape is None:
        from fyc_convert.errors import ExportError

        raise ExportError("cannot export without the input shape: pass --input-shape C,H,W or --data")
    # rank 0 exports, verifies and writes; the other ranks wait and end with its exit code
    on_main(lambda: _export_and_verify(model, original, swap, bundle, input_shape, opts, out_dir, report, say, t0))
    return report


def _load_inputs(ckpt: Path, opts: ConvertOptions, notes: list[str], say: Progress):
    """The model (eval mode), the data bundle (None without --data), the preprocessing with the input shape
    (options, checkpoint meta, the model's own config, the data, then a checked guess), the notes so far, and the
    loaded checkpoint (its format and meta)."""
    # Imports here keep `import fyc_convert` (and `fyc-convert --help`) fast.
    from fyc_convert.data.preprocess import resolve_preprocessing
    from fyc_convert.model.loading import load_model
    from fyc_convert.model.surgery import guess_input_shape

    say(f"loading {ckpt}")
    loaded = load_model(ckpt, arch=opts.arch, arch_kwargs=opts.arch_kwargs, trust_pickle=opts.trust_pickle,
                        trust_remote_code=opts.trust_remote_code)
    model = loaded.model.eval()
    meta = loaded.meta or {}
    notes = [*notes, *loaded.notes]
    bundle = None
    preprocessor_config = meta.get("preprocessor_config")
    if opts.data is not None:
        from fyc_convert.data.datasets import load_data

        say(f"reading data {opts.data}")
        bundle = load_data(opts.data, opts, seed=opts.seed, meta=meta, model=model,
                           preprocessor_config=preprocessor_config)
    prep = bundle.preprocessing if bundle is not None else resolve_preprocessing(
        opts, meta=meta, model=model, preprocessor_config=preprocessor_config)
    if prep.input_shape is None and (guess := guess_input_shape(model)) is not None:
        input_shape, how = guess
        prep = prep.with_value("input_shape", tuple(input_shape), how)
        notes.append(f"input shape {'x'.join(map(str, input_shape))} guessed from {how}; pass --input-shape if "
                     "the model was trained at another size")
    return model, bundle, prep, notes, loaded


def _swap(model, bundle, input_shape, opts: ConvertOptions, say: Progress):
    """Find the classifier(s), check the data against them, swap in the fixed head: (swap, found)."""
    from fyc_convert.model.surgery import find_classifiers, swap_classifier

    found = find_classifiers(model, layer=opts.layer, input_shape=input_shape)
    inputs = None
    if bundle is not None:
        from fyc_convert.data.datasets import check_data
        from fyc_convert.data.loader import subset_loader

        check_data(bundle, num_classes=found.num_classes, input_shape=input_shape)
        # the rows are chosen from the features of a seeded random subset (sorted data must not bias them)
        inputs = subset_loader(bundle.plain_train, _FEATURE_SAMPLES, seed=opts.seed, workers=bundle.workers)

    say(f"swapping {found.describe()} for a fixed {opts.head} head")
    with _model_run("capturing the classifier's input features", input_shape):
        swap = swap_classifier(model, head=opts.head, classifiers=found, inputs=inputs, bias=opts.bias,
                               fixed_scale=opts.fixed_scale, seed=opts.seed, hadamard_size=opts.hadamard_size,
                               adapter=_adapter_request(opts))
    for line in _adapter_lines(swap, opts):
        say(line)
    return swap, found


def _adapter_request(opts: ConvertOptions) -> bool | None:
    """What swap_classifier gets for --adapter: True for on, None (its own rule) for auto when fine-tuning follows
    (untrained, the map would only add weights), else False."""
    trains = opts.data is not None and opts.epochs != 0
    if opts.adapter == "on":
        return True
    return None if opts.adapter == "auto" and trains and opts.head == "hadamard" else False


def _adapter_lines(swap, opts: ConvertOptions) -> list[str]:
    """One line per head with a learned map before it: its size, its cost and why it is there."""
    lines = []
    for s in swap.heads:
        adapter = getattr(s.head, "adapter", None)
        if adapter is not None:
            n, w = adapter.in_features, adapter.out_features
            why = f"{s.num_classes:,} classes on {n} features" if opts.adapter == "auto" else "--adapter on"
            lines.append(f"{s.layer}: a learned {n} → {w} map before a fixed head on {w} features "
                         f"({n * w + w:,} parameters, in the classifier's count): {why}")
    return lines


def _swap_report(ckpt: Path, opts: ConvertOptions, swap, found, prep, notes: list[str]) -> Report:
    """The report as far as the swap: the head, the classifier it replaced, the parameter counts."""
    head = swap.head
    pc = swap.params
    report = Report(
        status="dry_run" if opts.dry_run else "ok",
        checkpoint=str(ckpt),
        head=opts.head,
        layer=",".join(swap.layers),
        in_features=swap.in_features,
        num_classes=swap.num_classes,
        hadamard_size=getattr(head, "hadamard_size", None),
        embed_size=getattr(head, "embed_size", None),
        embedding=getattr(head, "embedding", None),
        coherence=float(head.coherence()),
        classifier=found.describe(),
        preprocessing=prep.describe(),
        params=ParamsReport(original=pc.original, converted=pc.converted, removed=pc.removed,
                            removed_pct=pc.removed_pct, head_before=pc.head_before, head_after=pc.head_after,
                            trainable=pc.trainable),
        notes=[*notes, *_adapter_lines(swap, opts)],
    )
    if opts.head == "orthogonal":
        report.notes.append("the orthogonal head has no fast transform: it is exported as a dense constant, "
                            "so its savings are in trained parameters only, not in file size or compute")
    return report


def _describe_usage(report: Report, fmt: str, meta: dict, bundle, ckpt: Path, opts: ConvertOptions,
                    input_shape) -> None:
    """The class names, the resize step and the ONNX input as a user feeds it, into the report (model_card.py)."""
    from fyc_convert.data.classes import meta_classes_source, resolve_classes
    from fyc_convert.export.model_card import feed_line, input_spec, observed_range, with_resize
    from fyc_convert.export.onnx_export import INPUT_NAME

    classes, skipped = resolve_classes(report.num_classes, meta=meta, meta_source=meta_classes_source(fmt),
                                       data_classes=bundle.classes if bundle is not None else None, checkpoint=ckpt)
    report.classes = classes.describe() if classes is not None else None
    report.notes.extend(skipped)
    report.preprocessing = with_resize(report.preprocessing or {})
    if input_shape is not None:
        embedded = opts.embed_preprocessing
        value_range = ([0, 255 if opts.pixel_range == "0-255" else 1] if embedded
                       else observed_range(bundle, input_shape))
        report.input = input_spec(name=INPUT_NAME, input_shape=input_shape, value_range=value_range,
                                  in_graph=embedded, static_batch=opts.static_batch)
        report.feed = feed_line(report.input, report.preprocessing)


# ---------------------------------------------------------------------------------------------- training


def _train(model, original, swap, bundle, opts: ConvertOptions, out_dir: Path, report: Report, say: Progress,
           epoch_progress: Any, input_shape) -> None:
    """Accuracy before/after the swap, calibration, fine-tuning — all through finetune.py's one loop, with the
    config `recipe.plan` decides (every calibration, evaluation and epoch gets that one object).

    With --resume and a training checkpoint in the output folder, the accuracies measured before fine-tuning
    come from the run state and calibration is skipped: the checkpoint holds the calibrated (or further
    trained) model.
    """
    from fyc_convert.train.recipe import Facts, plan
    from fyc_convert.train.run_state import CHECKPOINT_NAME, read_run_state

    ckpt_dir = out_dir / CHECKPOINT_DIR
    # the training options left unset, chosen from what is known now (the same in an interrupted run)
    facts = Facts(in_features=swap.in_features, num_classes=swap.num_classes,
                  head_share=report.params.head_before / max(report.params.original, 1), labelled=bundle.labelled,
                  train_samples=len(bundle.train), has_val=bundle.val is not None)
    # opts is the loop's config too (ConvertOptions is a FinetuneConfig): only the job's own choices change
    cfg, reasons = plan(dataclasses.replace(opts, out_dir=ckpt_dir), facts)
    trains = cfg.epochs == "auto" or cfg.epochs > 0
    resuming = opts.resume and trains and bool(on_main(lambda: (ckpt_dir / CHECKPOINT_NAME).is_file()))
    state = on_main(lambda: read_run_state(ckpt_dir, opts)) if resuming else None
    if opts.resume and not resuming:
        report.notes.append("--resume: no training checkpoint in the output folder, so the run started over")
    measure = _Measure(bundle, cfg, input_shape)
    acc = _before_training(model, original, swap, bundle, cfg, measure, state=state, resuming=resuming,
                           report=report, say=say)
    if trains:
        if state is None:
            on_main(lambda: _write_run_state(ckpt_dir, opts, acc))
        _finetune(model, original, swap, bundle, dataclasses.replace(cfg, resume=resuming), reasons, acc, measure,
                  report=report, say=say, epoch_progress=epoch_progress)
    with _model_run("evaluation", input_shape):
        acc.agreement = measure(model, reference_model=original).agreement
    report.accuracy = acc
    model.cpu().eval()


class _Measure:
    """Evaluation on the held-out split (validation, else train) with the run's config: `measure(model)`."""

    def __init__(self, bundle, cfg, input_shape):
        self.bundle, self.cfg, self.input_shape = bundle, cfg, input_shape
        self.held_out = bundle.val if bundle.val is not None else bundle.train
        self.where = "val" if bundle.val is not None else "train (no validation split)"

    def __call__(self, model, *, reference_model=None):
        from fyc_convert.train.finetune import evaluate

        return evaluate(model, self.held_out, self.cfg, reference_model=reference_model, workers=self.bundle.workers)

    def accuracy(self, model) -> float | None:
        with _model_run("evaluation", self.input_shape):
            return self(model).accuracy


def _before_training(model, original, swap, bundle, cfg, measure: _Measure, *, state: dict[str, Any] | None,
                     resuming: bool, report: Report, say: Progress) -> AccuracyReport:
    """The accuracies of the original, of the swapped model, and after calibration (which runs here), or those
    an interrupted run recorded (`state`)."""
    from fyc_convert.train.finetune import calibrate
    from fyc_convert.train.run_state import RUN_STATE

    if state is not None:
        report.resumed.append(f"calibration and the accuracies before it, from {CHECKPOINT_DIR}/{RUN_STATE}")
        return AccuracyReport(**state["accuracy"])
    acc = AccuracyReport(measured_on=f"{measure.where}, {len(measure.held_out)} samples")
    acc.original = measure.accuracy(original)
    acc.swapped = measure.accuracy(model)
    if resuming:  # a checkpoint without run state (written by an older version): the model comes from it
        report.notes.append("--resume: the calibrated accuracy was not recorded by the interrupted run")
        return acc
    say("calibrating α and bias with the backbone frozen")
    with _model_run("calibration", measure.input_shape):
        for swapped in swap.heads:  # each fixed head against the labels (or the teacher) on its own
            calibrate(model, swapped.head, bundle.plain_train, cfg, teacher=original if cfg.distill else None,
                      workers=bundle.workers)
    acc.calibrated = measure.accuracy(model)
    return acc


def _finetune(model, original, swap, bundle, cfg, reasons: list[str], acc: AccuracyReport, measure: _Measure, *,
              report: Report, say: Progress, epoch_progress: Any) -> None:
    """The training loop with the planned config; its outcome into `acc.finetuned` and `report.training`."""
    from fyc_convert.train.finetune import finetune
    from fyc_convert.train.run_state import CHECKPOINT_NAME

    say(f"fine-tuning: {_training_line(cfg)}")
    for reason in reasons:
        say(f"  chosen: {reason}")

    def epoch_line(h) -> None:
        train = f", train acc {100 * h.accuracy:.2f}%" if h.accuracy is not None else ""
        val = f", val acc {100 * h.val.accuracy:.2f}%" if h.val is not None and h.val.accuracy is not None else ""
        say(f"epoch {h.epoch}: loss {h.loss:.4f}{train}{val}, {h.seconds:.1f} s, {h.samples_per_s:,.0f} samples/s")

    with _model_run("fine-tuning", measure.input_shape):
        result = finetune(model, swap.head, bundle, cfg, teacher=original if cfg.distill else None,
                          progress=epoch_progress, reference_accuracy=acc.original, on_epoch=epoch_line)
    if result.resumed_from_epoch:
        done = result.resumed_from_epoch
        finished = result.stop_reason != "epochs" or done >= len(result.history)
        report.resumed.append(f"fine-tuning epochs 1–{done}, from {CHECKPOINT_DIR}/{CHECKPOINT_NAME}"
                              + (" (training had finished)" if finished and done == len(result.history) else ""))
    kept = (f"kept epoch {result.kept_epoch}'s weights, the best on validation (epoch {len(result.history)} "
            "validated worse)" if result.kept_epoch else "")
    if result.stop_reason != "epochs":
        say(f"stopped after {len(result.history)} epoch(s): {_STOP_WORDS[result.stop_reason]}"
            + (f"; {kept}" if kept else ""))
    elif kept:
        say(f"{len(result.history)} epoch(s): {kept}")
    if kept:
        report.notes.append(kept)
    acc.finetuned = measure.accuracy(model)
    if acc.finetuned is not None and acc.calibrated is not None and acc.finetuned < acc.calibrated:
        line = (f"fine-tuning ended at {100 * acc.finetuned:.2f}%, below the calibrated {100 * acc.calibrated:.2f}%; "
                f"try --no-augment, --epochs auto or a lower --lr (e.g. {cfg.lr / 4:g})")
        say(line)
        report.notes.append(line)
    report.training = _training_report(cfg, reasons, result, bundle)
    if result.skipped_images:
        report.notes.append(f"skipped {result.skipped_images} unreadable image(s) (--skip-bad-images)")


def _training_report(cfg, reasons: list[str], result, bundle) -> dict[str, Any]:
    """`report.training`: the settings trained with, why, and what the loop did."""
    return {"epochs": len(result.history), "epochs_option": cfg.epochs,
            "max_epochs": cfg.max_epochs if cfg.epochs == "auto" else None,
            "stop_reason": result.stop_reason, "kept_epoch": result.kept_epoch,
            "optimizer": cfg.optimizer, "lr": cfg.lr, "batch_size": cfg.batch_size, "distill": cfg.distill,
            "chosen": reasons, "device": result.device,
            "world_size": result.world_size, "resumed_from_epoch": result.resumed_from_epoch,
            "precision": result.precision, "channels_last": result.channels_last,
            "data": bundle.summary() | {"skipped_images": result.skipped_images},
            "history": [dataclasses.asdict(h) for h in result.history]}


_STOP_WORDS = {"recovered": "validation accuracy within the target of the original",
               "plateau": "validation accuracy stopped improving", "max_epochs": "the epoch budget was spent"}


def _training_line(cfg) -> str:
    """The training settings in one line, e.g. "adamw, lr 0.002, batch 128, distillation, epochs auto (≤ 10)"."""
    epochs = f"auto (≤ {cfg.max_epochs})" if cfg.epochs == "auto" else str(cfg.epochs)
    return (f"{cfg.optimizer}, lr {cfg.lr:g}, batch {cfg.batch_size}{', distillation' if cfg.distill else ''}, "
            f"epochs {epochs}")


def _write_run_state(ckpt_dir: Path, opts: ConvertOptions, acc: AccuracyReport) -> None:
    from fyc_convert.train.run_state import write_run_state

    write_run_state(ckpt_dir, opts, dataclasses.asdict(acc))


# ---------------------------------------------------------------------------------------------- export


def _export_and_verify(model, original, swap, bundle, input_shape, opts: ConvertOptions, out_dir: Path,
                       report: Report, say: Progress, t0: float) -> None:
    """Export both models into a temporary folder, verify, save the weights, then move everything into place.

    Every swapped head (`swap.layers`) is spliced in under its own scope and checked statically; verification
    runs original.onnx on the same inputs as model.onnx, so that a backbone whose export already misses the
    tolerance is reported as such and only a head that adds error of its own fails the run (exit 3).
    """
    from fyc_convert.model.weights import save_converted

    model.cpu().eval()
    original.cpu().eval()
    stage = temp_dir(out_dir, "outputs")
    try:
        _retire_outputs(out_dir)
        say("exporting original.onnx and model.onnx")
        ex = _export_models(model, original, swap, report, opts, input_shape)  # --embed-preprocessing wraps them
        orig_res, conv_res, opset = _export_both(ex, input_shape, opts, stage, report, say)
        onnx_rep = _onnx_report(orig_res, conv_res, opset, opts, swap)
        report.onnx = onnx_rep
        say("saving model.safetensors")
        save_converted(model, stage / "model.safetensors")  # every fixed head described in its header
        outputs = ["model.safetensors", *_with_data(stage, "original.onnx")]
        report.files["original_onnx"] = str(out_dir / "original.onnx")
        report.files["model_safetensors"] = str(out_dir / "model.safetensors")

        say("verifying model.onnx (and original.onnx) against PyTorch with onnxruntime")
        try:
            _verify(ex, swap, model, bundle, input_shape, opts, orig_res, conv_res, report, say)
        except VerificationError as err:
            from fyc_convert.export.verify import mark_failed

            failed = mark_failed(conv_res.path)
            report.status = "verification_failed"
            onnx_rep.max_abs_diff, onnx_rep.mean_abs_diff = err.max_abs_diff, err.mean_abs_diff
            if err.verdict is not None:
                _record_verdict(onnx_rep, err.verdict)
            report.files["failed_onnx"] = str(out_dir / failed.name)
            if (out_dir / CHECKPOINT_DIR).is_dir():  # kept: --resume redoes the export without training again
                report.files["checkpoints"] = str(out_dir / CHECKPOINT_DIR)
            _commit(stage, out_dir, [*outputs, *_with_data(stage, failed.name)], report, opts, t0)
            err.report = report
            raise
        report.files["model_onnx"] = str(out_dir / "model.onnx")
        if opts.quantize == "int8":  # after the float32 verification: the int8 models are judged against it
            outputs += _quantize(stage, out_dir, bundle, ex, input_shape, opts, report, say, t0, outputs)

        if opts.bench:
            say("benchmarking with onnxruntime (1 thread)")
            report.latency_ms = _bench(orig_res.path, conv_res.path, swap, input_shape, opts)
        _commit(stage, out_dir, [*outputs, *_with_data(stage, "model.onnx")], report, opts, t0)
        _remove_training_state(out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _remove_training_state(out_dir: Path) -> None:
    """After a verified run: the training checkpoint and run state served only --resume; remove them (and the folder
    when nothing else is in it), so that the output folder holds exactly the outputs the report lists."""
    from fyc_convert.train.run_state import CHECKPOINT_NAME, RUN_STATE

    ckpt_dir = out_dir / CHECKPOINT_DIR
    for name in (CHECKPOINT_NAME, RUN_STATE):
        (ckpt_dir / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # absent, or holds files of the user's: leave it
        ckpt_dir.rmdir()


def _export_both(ex, input_shape, opts: ConvertOptions, stage: Path, report: Report, say: Progress):
    """original.onnx and model.onnx of the models to export (`_export_models`) into `stage`, both with the usage
    metadata: (original's result, converted's result, the opset used)."""
    from fyc_convert.errors import ExportError, first_line
    from fyc_convert.export.onnx_export import export_onnx
    from fyc_convert.options import DEFAULT_OPSET

    opset = opts.opset or DEFAULT_OPSET
    card = _model_card(report)
    manifest = {"fyc_convert.checkpoint": Path(report.checkpoint).name, **card}

    def export_both(opset: int):
        orig = export_onnx(ex.original, stage / "original.onnx", input_shape=input_shape, opset=opset,
                           dtype=opts.dtype, metadata=card, static_batch=opts.static_batch, exporter=opts.exporter)
        conv = export_onnx(ex.converted, stage / "model.onnx", input_shape=input_shape, opset=opset,
                           dtype=opts.dtype, head_layer=ex.head_layers, metadata=manifest,
                           head_layout=opts.head_layout, static_batch=opts.static_batch, exporter=opts.exporter)
        return orig, conv

    try:
        return (*export_both(opset), opset)
    except ExportError as err:
        # Some backbones need ops that exist only from opset 18 (Col2Im for nn.Fold: neither exporter can
        # write them at 17). The default opset is a preference, not the user's choice: take 18 and say so.
        if opts.opset is not None or opset >= _FALLBACK_OPSET:
            raise
        line = (f"exported at opset {_FALLBACK_OPSET}: at opset {opset} (the default) {first_line(err)}; "
                f"pass --opset {_FALLBACK_OPSET} to choose it")
        done = (*export_both(_FALLBACK_OPSET), _FALLBACK_OPSET)
        say(line)
        report.notes.append(line)
        return done


def _onnx_report(orig_res, conv_res, opset: int, opts: ConvertOptions, swap) -> OnnxReport:
    rep = OnnxReport(original_bytes=orig_res.bytes, converted_bytes=conv_res.bytes,
                     size_reduction_pct=100.0 * (1 - conv_res.bytes / orig_res.bytes),
                     head_ops=dict(conv_res.head_ops), original_nodes=orig_res.node_count,
                     converted_nodes=conv_res.node_count, opset=opset, dtype=opts.dtype,
                     exporter=conv_res.exporter, exporter_failures=list(conv_res.exporter_failures),
                     heads=[{"layer": h.layer, "scope": h.scope, "ops": dict(h.ops)} for h in conv_res.heads])
    if opts.head == "hadamard" and opts.head_layout == "kron":  # its MatMuls' cost, stated in the report
        from fyc_convert.export.onnx_head_kron import kron_head_macs

        rep.head_macs = kron_head_macs([h.head for h in swap.heads])
    return rep


def _verify(ex, swap, model, bundle, input_shape, opts: ConvertOptions, orig_res, conv_res, report: Report,
            say: Progress) -> None:
    """The static head checks, no learned classifier left, and onnxruntime against PyTorch (the exported models
    `ex`); the verdict into `report.onnx` (raises VerificationError when the converted model fails)."""
    from fyc_convert.export.leftover import check_no_learned_classifier
    from fyc_convert.export.verify import VerifyConfig, check_head_static, verify_converted

    if opts.head == "hadamard":  # each head from the written file, under its own scope
        for h in conv_res.heads:
            check_head_static(conv_res.path, num_classes=h.num_classes, embed_size=h.embed_size, prefix=h.scope)
    real = None
    if bundle is not None:
        from fyc_convert.data.loader import sample_inputs

        real = sample_inputs(bundle.val if bundle.val is not None else bundle.plain_train, 64, seed=opts.seed,
                             workers=bundle.workers)
        real = ex.to_raw(real)  # embedded normalisation: the raw values that normalise to these samples
    atol, rtol = opts.tolerance
    check_no_learned_classifier(conv_res.path, swap, model)  # a learned C×N weight left: exit 3
    check = VerifyConfig(input_shape, real, atol, rtol, seed=opts.seed, static_batch=opts.static_batch)
    result = verify_converted(conv_res.path, ex.converted, check, original_path=orig_res.path, original=ex.original)
    _record_verdict(report.onnx, result)
    if result.blame == "backbone":
        floor = result.floor
        line = (f"original.onnx already differs from PyTorch by {floor.max_abs_diff:.3g} (beyond atol {atol:g} + "
                f"rtol {rtol:g}): the backbone's float error; model.onnx differs by "
                f"{result.converted.max_abs_diff:.3g}, the fixed head alone by {result.head_max_abs_diff:.3g} "
                "(within tolerance): accepted")
        say(line)
        report.notes.append(line)


_FALLBACK_OPSET = 18  # tried when the default opset cannot express the backbone


def _quantize(stage: Path, out_dir: Path, bundle, ex, input_shape, opts: ConvertOptions, report: Report,
              say: Progress, t0: float, outputs: list[str]) -> list[str]:
    """--quantize int8: original.int8.onnx and model.int8.onnx from the verified float32 files, calibrated on a
    seeded subset of the training split and judged on the held-out split (export/quantize.py). A miss of
    --int8-max-drop commits the float32 outputs with model.int8.failed.onnx and raises (exit 3)."""
    import torch

    from fyc_convert.data.loader import make_loader, subset_loader
    from fyc_convert.export.quantize import CALIBRATION_SAMPLES, Int8Config, write_int8_models

    samples = min(CALIBRATION_SAMPLES, len(bundle.plain_train))
    say(f"quantizing to int8 (calibrated on {samples} training samples) and measuring it")

    def calibration():
        for x, _ in subset_loader(bundle.plain_train, samples, seed=opts.seed, batch_size=64, workers=bundle.workers):
            yield ex.to_raw(x).numpy()

    def evaluation():
        held_out = bundle.val if bundle.val is not None else bundle.plain_train
        for x, y in make_loader(held_out, batch_size=64, device=torch.device("cpu"), workers=bundle.workers):
            yield ex.to_raw(x).numpy(), y.numpy() if bundle.labelled else None

    config = Int8Config(max_drop=opts.int8_max_drop, static_batch=opts.static_batch, bench=opts.bench,
                        input_shape=tuple(input_shape))
    report.files["original_int8_onnx"] = str(out_dir / "original.int8.onnx")
    try:
        report.int8 = write_int8_models(stage, calibration, evaluation(), config, calibration_samples=samples,
                                        measured_on=report.accuracy.measured_on or "")
    except VerificationError as err:
        report.int8, report.status = err.int8, "int8_verification_failed"
        report.files["failed_int8_onnx"] = str(out_dir / "model.int8.failed.onnx")
        names = [*outputs, "original.int8.onnx", "model.int8.failed.onnx", *_with_data(stage, "model.onnx")]
        _commit(stage, out_dir, names, report, opts, t0)
        err.report = report
        raise
    report.files["model_int8_onnx"] = str(out_dir / "model.int8.onnx")
    return ["original.int8.onnx", "model.int8.onnx"]


def _model_card(report: Report) -> dict[str, str]:
    """Both ONNX files' usage metadata: input, preprocessing, classes, the feed line (export/model_card.py)."""
    from fyc_convert.export.model_card import metadata

    return metadata(report.input, report.preprocessing, report.classes) if report.input is not None else {}


def _export_models(model, original, swap, report: Report, opts: ConvertOptions, input_shape):
    """The models to export and verify: with --embed-preprocessing both wrapped in `Normalized` (export/embed.py),
    so that the graphs and their PyTorch references take the raw input; else the models as they are."""
    from fyc_convert.export.embed import Embedded, embed_preprocessing

    if not opts.embed_preprocessing:
        return Embedded(model, original, list(swap.layers))

    prep = report.preprocessing or {}
    return embed_preprocessing(model, original, head_layers=swap.layers,
                               mean=(prep.get("mean") or {}).get("value"), std=(prep.get("std") or {}).get("value"),
                               pixel_range=opts.pixel_range or "0-1", sample_shape=input_shape)


def _record_verdict(onnx_rep: OnnxReport, verdict) -> None:
    """The verification numbers into the report: the converted model, the floor, the heads alone, the blame."""
    onnx_rep.max_abs_diff = verdict.converted.max_abs_diff
    onnx_rep.mean_abs_diff = verdict.converted.mean_abs_diff
    if verdict.floor is not None:
        onnx_rep.floor_max_abs_diff = verdict.floor.max_abs_diff
        onnx_rep.floor_mean_abs_diff = verdict.floor.mean_abs_diff
    onnx_rep.head_max_abs_diff = verdict.head_max_abs_diff
    onnx_rep.blame = verdict.blame


def _with_data(folder: Path, name: str) -> list[str]:
    """`name` and, when the export put the weights beside it, its external data file (listed first)."""
    from fyc_convert.export.onnx_export import external_data_files

    plain = [d for d in external_data_files(folder / name) if Path(d).name == d and d not in (".", "..")]
    return [*sorted(plain), name]


def _commit(stage: Path, out_dir: Path, names: list[str], report: Report, opts: ConvertOptions, t0: float) -> None:
    """Move the staged outputs to their final names; report.json goes before model.onnx."""
    report.files["report"] = str(out_dir / "report.json")
    report.elapsed_s = time.perf_counter() - t0
    report.verdict = swap_verdict(report)
    write_text_atomic(stage / "report.json", report.to_json())
    last = [n for n in names if n.startswith(("model.onnx", "model.int8.onnx"))]
    try:
        for name in [n for n in names if n not in last] + ["report.json"] + last:
            os.replace(stage / name, out_dir / name)
    except OSError as e:
        raise OutputError(f"cannot move the outputs into {out_dir} ({e.strerror}); check the folder and free "
                          "space") from e
    if opts.report_path is not None:
        write_text_atomic(opts.report_path, report.to_json())


def _retire_outputs(out_dir: Path) -> None:
    """Remove an earlier run's final outputs (--force/--resume), model.onnx first, each ONNX file before its data."""
    for name in OUTPUT_NAMES:
        path = out_dir / name
        if path.is_dir():
            raise OutputError(f"{path} is a folder where fyc-convert writes a file; move it away")
        data = _with_data(out_dir, name)[:-1] if name.endswith(".onnx") and path.is_file() else []
        path.unlink(missing_ok=True)
        for extra in data:
            (out_dir / extra).unlink(missing_ok=True)


def _bench(original_path: Path, converted_path: Path, swap, input_shape, opts: ConvertOptions) -> dict[str, Any]:
    """onnxruntime medians, 1 thread: both whole models, and the learned Gemm head beside the fixed one."""
    import numpy as np

    from fyc_convert.export.bench import REPORT_MIN_SECONDS, REPORT_REPEATS, compare_latency, gemm_head_model, session
    from fyc_convert.export.onnx_head import HeadSpec, head_model

    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"threads": 1, "runtime": "onnxruntime CPU", "statistic": "median"}
    sessions = [session(original_path), session(converted_path)]
    fixed = (opts.static_batch,) if opts.static_batch else None
    for b in fixed or (1, 32):
        x = rng.standard_normal((b, *input_shape)).astype(np.float32)
        o, c = compare_latency(sessions, x, repeats=REPORT_REPEATS, min_seconds=REPORT_MIN_SECONDS)
        out[f"model_b{b}"] = {"original": o, "converted": c}
    if swap.head.head_kind == "hadamard":
        lin = swap.original_head
        gemm = session(gemm_head_model(lin.weight.detach().numpy(),
                                       None if lin.bias is None else lin.bias.detach().numpy()))
        fast = session(head_model(HeadSpec.from_module(swap.head), layout=opts.head_layout,
                                  static_batch=opts.static_batch))
        for b in fixed or (1, 64):
            f = rng.standard_normal((b, swap.in_features)).astype(np.float32)
            o, c = compare_latency([gemm, fast], f, repeats=100)
            out[f"head_b{b}"] = {"original": o, "converted": c}
    return out


# ---------------------------------------------------------------------------------------------- output folder


def _prepare_output_dir(out_dir: Path, *, force: bool, resume: bool) -> bool:
    """Check (and create) the output folder, remove the temporaries of interrupted runs; True if created."""
    try:
        if out_dir.exists() and not out_dir.is_dir():
            raise OutputError(f"{out_dir} exists and is not a folder; pass a different -o/--output-dir")
        if out_dir.exists() and any(out_dir.iterdir()) and not (force or resume):
            raise OutputExistsError(f"output folder {out_dir} already exists; pass --force to overwrite its files, "
                                    f"--resume to continue, or -o to choose another folder")
        created = not out_dir.exists()
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = temp_dir(out_dir, "write-test")
        probe.rmdir()
        remove_stale_temps(out_dir)
        remove_stale_temps(out_dir / CHECKPOINT_DIR)
        return created
    except OSError as e:
        raise OutputError(f"output folder {out_dir} is not writable ({e.strerror}); "
                          f"choose a writable -o/--output-dir") from e


def _remove_if_empty(out_dir: Path, created: bool) -> None:
    """After a failed run: the folder it created, if nothing of value was written (an empty checkpoints/ included)."""
    if not created or not out_dir.is_dir():
        return
    try:
        ckpt_dir = out_dir / CHECKPOINT_DIR
        if ckpt_dir.is_dir() and not any(ckpt_dir.iterdir()):
            ckpt_dir.rmdir()
        if not any(out_dir.iterdir()):
            out_dir.rmdir()
    except OSError:
        pass  # a file appeared meanwhile: keep the folder


# ---------------------------------------------------------------------------------------------- helpers


@contextmanager
def _model_run(stage: str, input_shape) -> Iterator[None]:
    """Turn an exception raised by the user's model during `stage` into a one-line ModelRunError."""
    try:
        yield
    except (FycError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - the model's own forward can raise anything
        shape = f" of shape {tuple(input_shape)}" if input_shape else ""
        raise ModelRunError(f"the model failed during {stage} ({describe(e)}); check that it runs on the data's "
                            f"samples{shape} (--verbose shows the traceback)") from e

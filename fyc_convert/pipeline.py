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

import copy
import dataclasses
import json
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
    TrainingError,
    VerificationError,
    describe,
)
from fyc_convert.files import remove_stale_temps, temp_dir, write_text_atomic
from fyc_convert.options import ConvertOptions, check_options, make_options
from fyc_convert.report import AccuracyReport, OnnxReport, ParamsReport, Report, verdict

__all__ = ["ConvertOptions", "OUTPUT_NAMES", "convert"]

Progress = Callable[[str], None]  # receives one-line status messages ("exporting ONNX", ...)

CHECKPOINT_DIR = "checkpoints"  # training checkpoints and the run state, for --resume
RUN_STATE = "run.json"  # what happened before fine-tuning (accuracies, calibration), written before epoch 0
_RUN_FORMAT = "fyc-run/1"
# Options the state before fine-tuning depends on: a resumed run must have the same.
_RUN_FIELDS = ("head", "arch", "arch_kwargs", "layer", "data", "val_split", "distill", "fixed_scale", "bias",
               "seed", "hadamard_size")
# Final output names, in the order an earlier run's outputs are retired (model.onnx first: it must never be
# left beside a report that does not describe it); an ONNX file's external data goes with it.
OUTPUT_NAMES = ("model.onnx", "model.failed.onnx", "report.json", "original.onnx", "model.safetensors")
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
    # Imports here keep `import fyc_convert` (and `fyc-convert --help`) fast.
    from fyc_convert.model.loading import load_model
    from fyc_convert.model.surgery import find_classifiers, guess_input_shape, swap_classifier

    say(f"loading {ckpt}")
    loaded = load_model(ckpt, arch=opts.arch, arch_kwargs=opts.arch_kwargs, trust_pickle=opts.trust_pickle,
                        trust_remote_code=opts.trust_remote_code)
    model = loaded.model.eval()
    meta = loaded.meta or {}
    notes = [*notes, *loaded.notes]

    from fyc_convert.data.preprocess import resolve_preprocessing

    bundle = None
    preprocessor_config = meta.get("preprocessor_config")
    if opts.data is not None:
        from fyc_convert.data.datasets import load_data

        say(f"reading data {opts.data}")
        bundle = load_data(opts.data, opts, seed=opts.seed, meta=meta, model=model,
                           preprocessor_config=preprocessor_config)
    # the model's input shape: options, checkpoint meta, the model's own config, the data, then a checked guess
    prep = bundle.preprocessing if bundle is not None else resolve_preprocessing(
        opts, meta=meta, model=model, preprocessor_config=preprocessor_config)
    input_shape = prep.input_shape
    if input_shape is None and (guess := guess_input_shape(model)) is not None:
        input_shape, how = guess
        prep = prep.with_value("input_shape", tuple(input_shape), how)
        notes.append(f"input shape {'x'.join(map(str, input_shape))} guessed from {how}; pass --input-shape if "
                     "the model was trained at another size")

    original = copy.deepcopy(model)
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
                               fixed_scale=opts.fixed_scale, seed=opts.seed, hadamard_size=opts.hadamard_size)
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
        notes=list(notes),
    )
    _describe_usage(report, loaded.format, meta, bundle, ckpt, opts, input_shape)
    if (kept := found.kept_note()) is not None:  # --layer left a learned classifier: said, never a plain "ok"
        report.notes.append(kept)
    from fyc_convert.train.finetune import gradient_bytes

    report.gradient_bytes = {"original": gradient_bytes(original), "converted": gradient_bytes(model)}
    if opts.head == "orthogonal":
        report.notes.append("the orthogonal head has no fast transform: it is exported as a dense constant, "
                            "so its savings are in trained parameters only, not in file size or compute")

    if bundle is not None and not opts.dry_run:
        _train(model, original, swap, bundle, opts, out_dir, report, say, epoch_progress, input_shape)
    elif bundle is None:
        report.notes.append("accuracy not measured: pass --data to calibrate, fine-tune and measure accuracy")

    if opts.dry_run:
        report.elapsed_s = time.perf_counter() - t0
        report.verdict = verdict(report)
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


def _describe_usage(report: Report, fmt: str, meta: dict, bundle, ckpt: Path, opts: ConvertOptions,
                    input_shape) -> None:
    """The class names, the resize step and the ONNX input as a user feeds it, into the report (model_card.py)."""
    from fyc_convert.data.classes import meta_classes_source, resolve_classes
    from fyc_convert.export.model_card import input_spec, observed_range, with_resize
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


# ---------------------------------------------------------------------------------------------- training


def _train(model, original, swap, bundle, opts: ConvertOptions, out_dir: Path, report: Report, say: Progress,
           epoch_progress: Any, input_shape) -> None:
    """Accuracy before/after the swap, calibration, fine-tuning — all through finetune.py's one loop.

    With --resume and a training checkpoint in the output folder, the accuracies measured before fine-tuning
    come from the run state and calibration is skipped: the checkpoint holds the calibrated (or further
    trained) model.
    """
    from fyc_convert.train.finetune import CHECKPOINT_NAME, calibrate, default_lr, evaluate, finetune, resolved
    from fyc_convert.train.recipe import Facts, choose

    device = opts.device
    held_out = bundle.val if bundle.val is not None else bundle.train
    where = "val" if bundle.val is not None else "train (no validation split)"
    ckpt_dir = out_dir / CHECKPOINT_DIR
    # the training options left unset, chosen from what is known now (the same in an interrupted run)
    facts = Facts(in_features=swap.in_features, num_classes=swap.num_classes,
                  head_share=report.params.head_before / max(report.params.original, 1), labelled=bundle.labelled,
                  train_samples=len(bundle.train), has_val=bundle.val is not None)
    chosen, reasons = choose(opts, facts)
    # opts is the loop's config too (ConvertOptions is a FinetuneConfig): only the job's own choices change
    cfg = resolved(dataclasses.replace(opts, **chosen, out_dir=ckpt_dir))
    if not bundle.labelled:
        cfg = dataclasses.replace(cfg, distill=True)  # the original model supplies the targets
    distill, epochs = cfg.distill, cfg.epochs
    trains = epochs == "auto" or epochs > 0
    resuming = opts.resume and trains and bool(on_main(lambda: (ckpt_dir / CHECKPOINT_NAME).is_file()))
    state = on_main(lambda: _read_run_state(ckpt_dir, opts)) if resuming else None
    if opts.resume and not resuming:
        report.notes.append("--resume: no training checkpoint in the output folder, so the run started over")

    def accuracy(m) -> float | None:
        with _model_run("evaluation", input_shape):
            return evaluate(m, held_out, device=device, workers=bundle.workers).accuracy

    if state is not None:
        acc = AccuracyReport(**state["accuracy"])
        report.resumed.append(f"calibration and the accuracies before it, from {CHECKPOINT_DIR}/{RUN_STATE}")
    else:
        acc = AccuracyReport(measured_on=f"{where}, {len(held_out)} samples")
        acc.original = accuracy(original)
        acc.swapped = accuracy(model)
        if not resuming:
            say("calibrating α and bias with the backbone frozen")
            with _model_run("calibration", input_shape):
                for swapped in swap.heads:  # each fixed head against the labels (or the teacher) on its own
                    calibrate(model, swapped.head, bundle.plain_train, device=device, seed=opts.seed,
                              workers=bundle.workers, teacher=original if distill else None, distill=distill)
            acc.calibrated = accuracy(model)
        else:  # a checkpoint without run state (written by an older version): the model comes from it
            report.notes.append("--resume: the calibrated accuracy was not recorded by the interrupted run")
    if trains:
        if state is None:
            on_main(lambda: _write_run_state(ckpt_dir, opts, acc))
        cfg = dataclasses.replace(cfg, resume=resuming)
        say(f"fine-tuning: {_training_line(cfg)}")
        for reason in reasons:
            say(f"  chosen: {reason}")

        def epoch_line(h) -> None:
            val = f", val acc {100 * h.val.accuracy:.2f}%" if h.val is not None and h.val.accuracy is not None else ""
            say(f"epoch {h.epoch}: loss {h.loss:.4f}{val}, {h.seconds:.1f} s, {h.samples_per_s:,.0f} samples/s")

        with _model_run("fine-tuning", input_shape):
            result = finetune(model, swap.head, bundle, cfg, teacher=original if cfg.distill else None,
                              progress=epoch_progress, reference_accuracy=acc.original, on_epoch=epoch_line)
        if result.resumed_from_epoch:
            done = result.resumed_from_epoch
            finished = result.stop_reason != "epochs" or done >= len(result.history)
            report.resumed.append(f"fine-tuning epochs 1–{done}, from {CHECKPOINT_DIR}/{CHECKPOINT_NAME}"
                                  + (" (training had finished)" if finished and done == len(result.history) else ""))
        if result.stop_reason != "epochs":
            kept = f"; kept epoch {result.kept_epoch}'s weights, the best on validation" if result.kept_epoch else ""
            say(f"stopped after {len(result.history)} epoch(s): {_STOP_WORDS[result.stop_reason]}{kept}")
        acc.finetuned = accuracy(model)
        report.training = {"epochs": len(result.history), "epochs_option": epochs,
                           "max_epochs": cfg.max_epochs if epochs == "auto" else None,
                           "stop_reason": result.stop_reason, "kept_epoch": result.kept_epoch,
                           "optimizer": cfg.optimizer,
                           "lr": cfg.lr if cfg.lr is not None else default_lr(cfg.optimizer),
                           "batch_size": cfg.batch_size, "distill": cfg.distill, "chosen": reasons,
                           "device": result.device,
                           "world_size": result.world_size, "resumed_from_epoch": result.resumed_from_epoch,
                           "precision": result.precision, "channels_last": result.channels_last,
                           "data": bundle.summary() | {"skipped_images": result.skipped_images},
                           "history": [dataclasses.asdict(h) for h in result.history]}
        if result.skipped_images:
            report.notes.append(f"skipped {result.skipped_images} unreadable image(s) (--skip-bad-images)")
    with _model_run("evaluation", input_shape):
        acc.agreement = evaluate(model, held_out, device=device, reference_model=original,
                                 workers=bundle.workers).agreement
    report.accuracy = acc
    model.cpu().eval()


_STOP_WORDS = {"recovered": "validation accuracy within the target of the original",
               "plateau": "validation accuracy stopped improving", "max_epochs": "the epoch budget was spent"}


def _training_line(cfg) -> str:
    """The training settings in one line, e.g. "adamw, lr 0.002, batch 128, distillation, epochs auto (≤ 10)"."""
    from fyc_convert.train.finetune import default_lr

    lr = cfg.lr if cfg.lr is not None else default_lr(cfg.optimizer)
    epochs = f"auto (≤ {cfg.max_epochs})" if cfg.epochs == "auto" else str(cfg.epochs)
    return (f"{cfg.optimizer}, lr {lr:g}, batch {cfg.batch_size}{', distillation' if cfg.distill else ''}, "
            f"epochs {epochs}")


def _run_fields(opts: ConvertOptions) -> dict[str, Any]:
    return json.loads(json.dumps({k: getattr(opts, k) for k in _RUN_FIELDS}, default=str))


def _write_run_state(ckpt_dir: Path, opts: ConvertOptions, acc: AccuracyReport) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = {"format": _RUN_FORMAT, "options": _run_fields(opts), "accuracy": dataclasses.asdict(acc)}
    write_text_atomic(ckpt_dir / RUN_STATE, json.dumps(state, indent=2) + "\n")


def _read_run_state(ckpt_dir: Path, opts: ConvertOptions) -> dict[str, Any] | None:
    """The state an interrupted run wrote before fine-tuning, checked against this run's options."""
    path = ckpt_dir / RUN_STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TrainingError(f"cannot read {path} ({describe(e)}); run with --force instead of --resume to start "
                            "over") from e
    if not isinstance(state, dict) or state.get("format") != _RUN_FORMAT:
        raise TrainingError(f"{path} is not a fyc-convert run state; run with --force instead of --resume")
    now = _run_fields(opts)
    for key, value in now.items():
        if state["options"].get(key) != value:
            raise TrainingError(f"the interrupted run in {ckpt_dir.parent} used {key}={state['options'].get(key)!r}, "
                                f"this run has {key}={value!r}; resume with the same options or pass --force to "
                                "start over")
    return state


# ---------------------------------------------------------------------------------------------- export


def _export_and_verify(model, original, swap, bundle, input_shape, opts: ConvertOptions, out_dir: Path,
                       report: Report, say: Progress, t0: float) -> None:
    """Export both models into a temporary folder, verify, save the weights, then move everything into place.

    Every swapped head (`swap.layers`) is spliced in under its own scope and checked statically; verification
    runs original.onnx on the same inputs as model.onnx, so that a backbone whose export already misses the
    tolerance is reported as such and only a head that adds error of its own fails the run (exit 3).
    """
    from fyc_convert.errors import ExportError, first_line
    from fyc_convert.export.leftover import check_no_learned_classifier
    from fyc_convert.export.onnx_export import export_onnx
    from fyc_convert.export.onnx_head_kron import kron_head_macs
    from fyc_convert.export.verify import VerifyConfig, check_head_static, mark_failed, verify_converted
    from fyc_convert.model.weights import save_converted
    from fyc_convert.options import DEFAULT_OPSET

    opset = opts.opset or DEFAULT_OPSET
    model.cpu().eval()
    original.cpu().eval()
    stage = temp_dir(out_dir, "outputs")
    try:
        _retire_outputs(out_dir)
        say("exporting original.onnx and model.onnx")
        card = _model_card(report)
        manifest = {"fyc_convert.checkpoint": Path(report.checkpoint).name, **card}
        ex = _export_models(model, original, swap, report, opts, input_shape)  # --embed-preprocessing wraps them

        def export_both(opset: int):
            orig = export_onnx(ex.original, stage / "original.onnx", input_shape=input_shape, opset=opset,
                               dtype=opts.dtype, metadata=card, static_batch=opts.static_batch, exporter=opts.exporter)
            conv = export_onnx(ex.converted, stage / "model.onnx", input_shape=input_shape, opset=opset,
                               dtype=opts.dtype, head_layer=ex.head_layers, metadata=manifest,
                               head_layout=opts.head_layout, static_batch=opts.static_batch, exporter=opts.exporter)
            return orig, conv

        try:
            orig_res, conv_res = export_both(opset)
        except ExportError as err:
            # Some backbones need ops that exist only from opset 18 (Col2Im for nn.Fold: neither exporter can
            # write them at 17). The default opset is a preference, not the user's choice: take 18 and say so.
            if opts.opset is not None or opset >= _FALLBACK_OPSET:
                raise
            line = (f"exported at opset {_FALLBACK_OPSET}: at opset {opset} (the default) {first_line(err)}; "
                    f"pass --opset {_FALLBACK_OPSET} to choose it")
            opset = _FALLBACK_OPSET
            orig_res, conv_res = export_both(opset)
            say(line)
            report.notes.append(line)
        onnx_rep = OnnxReport(original_bytes=orig_res.bytes, converted_bytes=conv_res.bytes,
                              size_reduction_pct=100.0 * (1 - conv_res.bytes / orig_res.bytes),
                              head_ops=dict(conv_res.head_ops), original_nodes=orig_res.node_count,
                              converted_nodes=conv_res.node_count, opset=opset, dtype=opts.dtype,
                              exporter=conv_res.exporter, exporter_failures=list(conv_res.exporter_failures),
                              heads=[{"layer": h.layer, "scope": h.scope, "ops": dict(h.ops)}
                                     for h in conv_res.heads])
        if opts.head == "hadamard" and opts.head_layout == "kron":  # its MatMuls' cost, stated in the report
            onnx_rep.head_macs = kron_head_macs([h.head for h in swap.heads])
        report.onnx = onnx_rep
        say("saving model.safetensors")
        save_converted(model, stage / "model.safetensors")  # every fixed head described in its header
        outputs = ["model.safetensors", *_with_data(stage, "original.onnx")]
        report.files["original_onnx"] = str(out_dir / "original.onnx")
        report.files["model_safetensors"] = str(out_dir / "model.safetensors")

        say("verifying model.onnx (and original.onnx) against PyTorch with onnxruntime")
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
        try:
            check_no_learned_classifier(conv_res.path, swap, model)  # a learned C×N weight left: exit 3
            check = VerifyConfig(input_shape, real, atol, rtol, seed=opts.seed, static_batch=opts.static_batch)
            verdict = verify_converted(conv_res.path, ex.converted, check, original_path=orig_res.path,
                                       original=ex.original)
        except VerificationError as err:
            failed = mark_failed(conv_res.path)
            report.status = "verification_failed"
            onnx_rep.max_abs_diff, onnx_rep.mean_abs_diff = err.max_abs_diff, err.mean_abs_diff
            if (v := getattr(err, "verdict", None)) is not None:
                _record_verdict(onnx_rep, v)
            report.files["failed_onnx"] = str(out_dir / failed.name)
            _commit(stage, out_dir, [*outputs, *_with_data(stage, failed.name)], report, opts, t0)
            err.report = report  # type: ignore[attr-defined]
            raise
        _record_verdict(onnx_rep, verdict)
        if verdict.blame == "backbone":
            floor = verdict.floor
            line = (f"original.onnx already differs from PyTorch by {floor.max_abs_diff:.3g} (beyond atol {atol:g} + "
                    f"rtol {rtol:g}): the backbone's float error; model.onnx differs by "
                    f"{verdict.converted.max_abs_diff:.3g}, the fixed head alone by {verdict.head_max_abs_diff:.3g} "
                    "(within tolerance): accepted")
            say(line)
            report.notes.append(line)
        report.files["model_onnx"] = str(out_dir / "model.onnx")

        if opts.bench:
            say("benchmarking with onnxruntime (1 thread)")
            report.latency_ms = _bench(orig_res.path, conv_res.path, swap, input_shape, opts)
        _commit(stage, out_dir, [*outputs, *_with_data(stage, "model.onnx")], report, opts, t0)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


_FALLBACK_OPSET = 18  # tried when the default opset cannot express the backbone


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
    report.verdict = verdict(report)
    write_text_atomic(stage / "report.json", report.to_json())
    last = [n for n in names if n.startswith("model.onnx")]
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

    from fyc_convert.export.bench import compare_latency, gemm_head_model, session
    from fyc_convert.export.onnx_head import HeadSpec, head_model

    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"threads": 1, "runtime": "onnxruntime CPU", "statistic": "median"}
    sessions = [session(original_path), session(converted_path)]
    fixed = (opts.static_batch,) if opts.static_batch else None
    for b in fixed or (1, 32):
        x = rng.standard_normal((b, *input_shape)).astype(np.float32)
        o, c = compare_latency(sessions, x, repeats=30)
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

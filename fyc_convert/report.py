"""The conversion report: gathered as dataclasses, rendered as a rich table or as JSON.

This is the only module that formats numbers for people. The JSON schema is documented in
docs/report-schema.md; `SCHEMA_VERSION` changes whenever a key is renamed or removed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich import filesize
from rich.console import Console
from rich.table import Table

SCHEMA_VERSION = 1


@dataclass
class ParamsReport:
    original: int  # all parameters of the loaded model
    converted: int  # all parameters after the swap (alpha and bias included)
    removed: int  # original - converted
    removed_pct: float  # 100 * removed / original: the paper's Table 1 "% fixed params"
    head_before: int  # N*C (+ C bias) of the learned nn.Linear
    head_after: int  # alpha (when learned) + C bias
    trainable: int  # parameters that fine-tuning updates after the swap


@dataclass
class OnnxReport:
    original_bytes: int | None = None  # original.onnx (+ external data) on disk
    converted_bytes: int | None = None  # model.onnx (+ external data) on disk
    size_reduction_pct: float | None = None  # 100 * (1 - converted / original)
    max_abs_diff: float | None = None  # onnxruntime vs PyTorch on the converted model
    mean_abs_diff: float | None = None
    head_ops: dict[str, int] = field(default_factory=dict)  # op census of the fyc_head/ subgraph
    original_nodes: int | None = None
    converted_nodes: int | None = None
    opset: int | None = None
    dtype: str | None = None
    # original.onnx vs the original PyTorch model on the same inputs: the backbone's own export error
    floor_max_abs_diff: float | None = None
    floor_mean_abs_diff: float | None = None
    head_max_abs_diff: float | None = None  # worst fixed head alone on onnxruntime's features (when measured)
    blame: str | None = None  # None within tolerance; "backbone" (accepted), "head" or "model" (exit 3)
    exporter: str | None = None  # "torchscript" or "dynamo": whose graph model.onnx is
    exporter_failures: list[str] = field(default_factory=list)  # exporters tried before it, one line each
    heads: list[dict[str, Any]] = field(default_factory=list)  # every fixed head: layer, scope, ops
    head_macs: int | None = None  # --head-layout kron: multiply-adds per sample of its ±1 block MatMuls


@dataclass
class AccuracyReport:
    original: float | None = None  # the unmodified model on the validation split
    swapped: float | None = None  # right after the swap (rows, alpha, bias from the trained layer)
    calibrated: float | None = None  # after fitting alpha and bias with the backbone frozen
    finetuned: float | None = None  # after fine-tuning backbone + alpha + bias
    agreement: float | None = None  # top-1 agreement of the final model with the original
    measured_on: str | None = None  # e.g. "val (360 samples)"; None: no data given


@dataclass
class Int8Model:
    """One int8 file beside its float32 source, measured on the same samples."""

    file: str  # e.g. "model.int8.onnx" ("model.int8.failed.onnx" after a miss)
    bytes: int
    float_bytes: int  # its float32 source
    accuracy: float | None = None  # int8, on the evaluation samples; None without labels
    float_accuracy: float | None = None  # its float32 source on the same samples (onnxruntime)
    agreement: float | None = None  # top-1 agreement with its float32 source
    latency_ms: dict[str, dict[str, float]] | None = None  # with bench: {"b1": {"float32": ms, "int8": ms}, ...}


@dataclass
class Int8Result:
    """The int8 stage: both models, how they were judged, and the head's exactness."""

    original: Int8Model
    converted: Int8Model
    measured_on: str  # e.g. "val, 2400 samples"
    calibration_samples: int
    max_drop: float
    drop: float  # points lost by model.int8.onnx against model.onnx: accuracy, or top-1 agreement unlabelled
    drop_metric: str  # "accuracy" or "agreement"
    passed: bool
    excluded_nodes: int  # fyc_head/ nodes left in float32
    head_max_abs_diff: float | None = None  # `head_exactness` on the first evaluation batch
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    status: str  # "ok" | "dry_run" | "verification_failed" | "int8_verification_failed"
    checkpoint: str
    head: str  # "hadamard" | "orthogonal"
    layer: str  # dotted name of the replaced classifier
    in_features: int
    num_classes: int
    hadamard_size: int | None  # transform size m (None for the orthogonal head)
    embed_size: int | None  # embedded length n
    embedding: str | None  # "tile" | "pad"
    coherence: float | None  # max |cos| between class vectors
    params: ParamsReport
    classifier: str | None = None  # which layer(s) were swapped and how they were found
    preprocessing: dict[str, Any] | None = None  # input shape, mean, std, resize, ... each {"value", "source"}
    input: dict[str, Any] | None = None  # the ONNX input as fed: name, dtype, layout, shape, range, normalization
    classes: dict[str, Any] | None = None  # {"names": [...], "source": ...} when some source names the classes
    feed: str | None = None  # one line saying what to feed the ONNX models (export/model_card.feed_line)
    onnx: OnnxReport | None = None
    accuracy: AccuracyReport = field(default_factory=AccuracyReport)
    training: dict[str, Any] | None = None  # epochs, per-epoch seconds and metrics
    latency_ms: dict[str, Any] | None = None  # --bench: onnxruntime medians
    int8: Int8Result | None = None  # --quantize int8: both int8 models beside their float32 files
    gradient_bytes: dict[str, int] | None = None  # per-step DDP all-reduce volume, original vs converted
    elapsed_s: float = 0.0
    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)  # stages taken from an interrupted run (--resume)
    verdict: str | None = None  # one line when the swap does not pay off here (see `verdict`); None when it does
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"


def _clean(obj: Any) -> Any:
    """JSON has no NaN/inf: map them to None; round floats for a readable file."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float):
        if not math.isfinite(obj):
            return None
        return float(f"{obj:.6g}")
    return obj


SMALL_SHARE = 10.0  # below this % of the parameters removed, and with no smaller file, the swap is not worth it


def swap_verdict(report: Report) -> str | None:
    """One line saying that the swap does not pay off for this model, or None when it does.

    It does not pay off when it removes under `SMALL_SHARE` % of the parameters and the exported file is not
    smaller by that much either; the measured cost (a larger file, a slower model under --bench) is named.
    """
    p, o = report.params, report.onnx
    file_pct = None if o is None or o.size_reduction_pct is None else o.size_reduction_pct
    if p.removed_pct >= SMALL_SHARE or (file_pct is not None and file_pct >= SMALL_SHARE):
        return None
    costs = []
    if file_pct is not None:
        costs.append(f"ONNX file {-file_pct:+.1f}%".replace("-", "−"))
    entry = (report.latency_ms or {}).get("model_b1")
    if entry and entry["converted"] > entry["original"]:
        costs.append(f"{entry['converted'] / entry['original']:.2f}× slower at batch 1")
    cost = f" ({', '.join(costs)})" if costs else ""
    return (f"the classifier ({report.in_features} → {report.num_classes}) holds {p.removed_pct:.1f}% of the "
            f"parameters, so a fixed head saves little here{cost}; it pays off for heads of many classes or wide "
            "features (from about a million weights, docs/benchmarks.md)")


def _int(n: int | None) -> str:
    return "—" if n is None else f"{n:,}"


def _bytes(n: int | None) -> str:
    """Decimal units (1 kB = 1000 B), as rich and most file managers print them."""
    return "—" if n is None else filesize.decimal(n)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f} ms"


def preprocessing_line(report: Report) -> str:
    """The preprocessing used, each value with its source: "input 3x224x224 (model.pretrained_cfg), mean …"."""
    prep = report.preprocessing or {}

    def item(name: str, label: str) -> str | None:
        entry = prep.get(name)
        if not entry or entry.get("value") is None:
            return None
        if name in ("crop_pct", "interpolation") and entry.get("source", "default") == "default":
            return None  # image-only settings left at their defaults: nothing to say
        value = entry["value"]
        if name == "input_shape":
            text = "x".join(map(str, value))
        elif isinstance(value, list):
            text = ",".join(f"{v:g}" for v in value)
        elif isinstance(value, bool):
            text = "on" if value else "off"
        elif isinstance(value, float):
            text = f"{value:g}"
        else:
            text = str(value)
        return f"{label}{' ' if label else ''}{text} ({entry.get('source', 'default')})"

    parts = [item("input_shape", "input"), item("mean", "mean"), item("std", "std"), item("crop_pct", "crop"),
             item("interpolation", ""), item("augment", "augment")]
    return ", ".join(p for p in parts if p)


def _classes_line(classes: dict[str, Any]) -> str:
    """"10 (0, 1, 2, …, 9) from checkpoint meta": the count, the first and last names, the source."""
    names = [str(n) for n in classes.get("names", [])]
    shown = ", ".join(names) if len(names) <= 6 else ", ".join([*names[:3], "…", names[-1]])
    return f"{len(names)} ({shown}) from {classes.get('source', '?')}"


def _int8_rows(t: Table, q: Int8Result) -> None:
    """The int8 models beside float32: file, accuracy (and its drop against float32 model.onnx), agreement,
    latency."""
    o, c = q.original, q.converted
    t.add_row("int8 ONNX file", _bytes(o.bytes), _bytes(c.bytes),
              f"{100 * c.bytes / c.float_bytes:.0f}% of fp32" if c.float_bytes else "")
    if c.accuracy is not None:
        change = f"{0.0 - q.drop:+.2f} pts vs fp32".replace("-", "−")
        t.add_row("int8 accuracy", _pct(o.accuracy), _pct(c.accuracy), change)
    t.add_row("  int8 agreement", _pct(o.agreement), _pct(c.agreement), "top-1 vs fp32")
    for key in c.latency_ms or {}:  # "b1", "b32", or the --static-batch size
        lo, lc = (o.latency_ms or {}).get(key), (c.latency_ms or {}).get(key)
        if lo and lc:
            t.add_row(f"int8 latency, batch {key[1:]}", _ms(lo["int8"]), _ms(lc["int8"]),
                      f"fp32 {lc['float32']:.3f} ms")


def render(report: Report, console: Console) -> None:
    """Print the before/after table a user reads in five seconds (fits 80 columns)."""
    p = report.params
    t = Table(title=f"{report.layer}: {report.in_features} → {report.num_classes}, fixed {report.head} head",
              header_style="bold", title_style="bold")
    t.add_column("")
    t.add_column("original", justify="right")
    t.add_column("converted", justify="right")
    t.add_column("change", justify="right")
    t.add_row("parameters", _int(p.original), _int(p.converted), f"{-p.removed_pct:+.2f}%".replace("-", "−"))
    t.add_row("classifier params", _int(p.head_before), _int(p.head_after),
              ("−" if p.removed >= 0 else "+") + _int(abs(p.removed)))
    o = report.onnx
    if o is not None and o.original_bytes is not None:
        red = "" if o.size_reduction_pct is None else f"{-o.size_reduction_pct:+.1f}%".replace("-", "−")
        t.add_row("ONNX file", _bytes(o.original_bytes), _bytes(o.converted_bytes), red)
        total = sum(o.head_ops.values())
        addsub = o.head_ops.get("Add", 0) + o.head_ops.get("Sub", 0)
        dense = sum(o.head_ops.get(k, 0) for k in ("MatMul", "Gemm", "Conv"))
        # with an If on the batch size the census holds both branches; each call runs one of them
        paths = ", 2 paths" if o.head_ops.get("If") else ""
        t.add_row("classifier ops", "1 Gemm", f"{_int(total)} ({_int(addsub)} add/sub{paths})", f"{dense} MatMul")
        if o.head_macs is not None:  # the kron layout's ±1 blocks; the Gemm's are its weights (N·C)
            t.add_row("classifier multiply-adds", "", _int(o.head_macs), "per sample")
    a = report.accuracy
    if a.measured_on is None:
        t.add_row("accuracy", "—", "—", "no --data")
    else:
        final = a.finetuned if a.finetuned is not None else a.calibrated
        delta = "" if final is None or a.original is None else f"{100 * (final - a.original):+.2f} pts"
        t.add_row("accuracy", _pct(a.original), _pct(final), delta.replace("-", "−"))
        t.add_row("  swapped → calibrated", "", f"{_pct(a.swapped)} → {_pct(a.calibrated)}", "")
        if a.agreement is not None:
            t.add_row("  agreement", "", _pct(a.agreement), "top-1")
    for key, label in (("model_b1", "latency, batch 1"), ("model_b32", "latency, batch 32"),
                       ("head_b1", "head only, batch 1"), ("head_b64", "head only, batch 64")):
        entry = (report.latency_ms or {}).get(key)
        if entry:
            ratio = entry["original"] / entry["converted"]
            t.add_row(label, _ms(entry["original"]), _ms(entry["converted"]),
                      f"{ratio:.2f}× faster" if ratio >= 1 else f"{1 / ratio:.2f}× slower")
    if report.int8 is not None:
        _int8_rows(t, report.int8)
    if o is not None and o.max_abs_diff is not None:
        t.add_row("ONNX vs PyTorch", "", f"{o.max_abs_diff:.1e}", "max |Δ|")
    if report.coherence is not None:
        t.add_row("coherence", "", f"{report.coherence:.3f}", "max |cos|")
    console.print(t)
    if report.classifier:
        console.print(f"[dim]classifier:[/] {report.classifier}")
    if report.preprocessing:
        console.print(f"[dim]preprocessing:[/] {preprocessing_line(report)}")
    if report.feed is not None:
        console.print(f"[dim]feed:[/] {report.feed}", soft_wrap=True)
    if report.classes is not None:
        console.print(f"[dim]classes:[/] {_classes_line(report.classes)}")
    where = f" on {a.measured_on}" if a.measured_on else ""
    if a.measured_on:
        console.print(f"[dim]accuracy measured{where}[/]")
    if report.verdict:
        console.print(f"[yellow]verdict:[/] {report.verdict}", soft_wrap=True)
    for note in report.notes:
        console.print(f"[dim]note:[/] {note}")
    for stage in report.resumed:
        console.print(f"[dim]resumed:[/] {stage}")
    if report.files:
        folder = Path(next(iter(report.files.values()))).parent
        console.print(f"[dim]wrote to {folder}/:[/] " + ", ".join(Path(f).name for f in report.files.values()))
    status_style = {"ok": "green", "dry_run": "cyan"}.get(report.status, "red")
    console.print(f"[{status_style}]status: {report.status}[/]  ({report.elapsed_s:.1f} s)")

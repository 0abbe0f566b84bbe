"""int8 models with the fixed head exact inside (`--quantize int8`): quantization, checks, verification.

`quantize_int8` runs onnxruntime's static QDQ quantizer (int8 activations and per-channel int8 weights,
MinMax calibration on the samples it is given) with every `fyc_head/` node excluded. The head holds no weights,
and its add/sub levels on dequantized int8 features are sums of ±1 terms that float32 keeps exact, so the head is
quantized only at its boundaries: a Quantize/Dequantize pair on its input (the backbone's last activation),
float32 inside. Left to itself the quantizer re-quantizes every butterfly level (one per-tensor scale each): on a
512 × 32,000 head top-1 fell to 81% (docs/deploy.md). `check_head_boundary` proves the boundary from the graph,
`head_exactness` measures it: the int8 model's head against the float32 head graph fed the int8 model's own
features (the reference), which must agree to float rounding.

`write_int8_models` is the job's int8 stage: original.int8.onnx and model.int8.onnx side by side, top-1
agreement with their float32 files and accuracy on the evaluation samples (onnxruntime, both), and the judgement:
model.int8.onnx may lose at most `Int8Config.max_drop` points of accuracy against float32 model.onnx (of top-1
agreement when the data has no labels). A miss raises VerificationError (exit 3, carrying the `Int8Result` as
`.int8`) and keeps the file only as `model.int8.failed.onnx`.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from fyc_convert.errors import ExportError, VerificationError, describe
from fyc_convert.export.onnx_head import HEAD_PREFIX, adapter_prefix, check_head_static
from fyc_convert.files import atomic_path, temp_dir
from fyc_convert.report import Int8Model, Int8Result

CALIBRATION_SAMPLES = 512  # training samples the activation ranges are calibrated on (seeded subset)
QUANTIZATION_KEY = "fyc_convert.quantization"  # metadata of the int8 files: how they were quantized
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_EXACT_ATOL = 1e-4  # the int8 model's head against the float32 head on the same (dequantized) features

Batches = Iterable[np.ndarray]  # (B, *input_shape) float32 model inputs
Labelled = Iterable[tuple[np.ndarray, np.ndarray | None]]  # inputs and (B,) integer labels (None: unlabelled)


@dataclass(frozen=True)
class Int8Config:
    """How the int8 models are made and judged.

    Attributes:
        max_drop: points of accuracy model.int8.onnx may lose against float32 model.onnx (of top-1 agreement
            with it when the evaluation data has no labels); beyond it: VerificationError.
        per_channel: one weight scale per output channel (else per tensor).
        static_batch: the batch size the models were exported with; None for a dynamic batch axis.
        bench: also time float32 and int8 with onnxruntime (1 thread, interleaved medians).
        input_shape: one sample's shape (what `bench` feeds); needed with `bench` only.
    """

    max_drop: float = 1.0
    per_channel: bool = True
    static_batch: int | None = None
    bench: bool = False
    input_shape: tuple[int, ...] | None = None


# ------------------------------------------------------------------------------------------- quantization


class _Reader:
    """onnxruntime's CalibrationDataReader over model inputs (re-batched to a static batch when there is one)."""

    def __init__(self, name: str, batches: Batches, static_batch: int | None):
        self._items = ({name: x} for x, _ in _rebatch(((b, None) for b in batches), static_batch))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def head_node_names(model: onnx.ModelProto, prefix: str = HEAD_PREFIX) -> list[str]:
    """Names of the fixed heads' nodes (every head's scope starts with `fyc_head/`): what quantization excludes."""
    return [n.name for n in model.graph.node if n.name.startswith(prefix)]


def quantize_int8(src: str | Path, dst: str | Path, calibration: Batches, *, per_channel: bool = True,
                  static_batch: int | None = None, float_head: bool = True) -> int:
    """Static QDQ int8 quantization of `src` into `dst`, the fixed head's nodes left in float32.

    Args:
        src: the float32 ONNX model (original.onnx or model.onnx).
        dst: the int8 model to write (written whole, via a temporary name).
        calibration: model inputs the activation ranges are taken from (MinMax), e.g. a seeded subset of the
            training split.
        per_channel: per-output-channel weight scales.
        static_batch: the model's fixed batch size; the calibration batches are re-cut to it.
        float_head: exclude the fixed heads' nodes (False only to measure what the quantizer does to the head
            on its own: benchmarks/int8_heads.py).

    Returns:
        How many nodes were excluded (the fixed heads' nodes; 0 for an original model).

    Raises:
        ExportError: the quantizer failed (its first line quoted).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src), Path(dst)
    work = temp_dir(dst.parent, "quantize")  # our temp name: a killed run's is removed by the next one
    try:
        pre, out = work / "pre.onnx", work / "int8.onnx"
        try:
            # shape inference and the basic graph optimisations the quantizer expects (no symbolic shapes: the
            # exported graphs name their batch axis)
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            proto = onnx.load(str(pre), load_external_data=False)
            exclude = head_node_names(proto) if float_head else []
            quantize_static(str(pre), str(out), _Reader(proto.graph.input[0].name, calibration, static_batch),
                            quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=exclude)
        except Exception as e:  # noqa: BLE001 - the quantizer and onnxruntime raise anything
            raise ExportError(f"int8 quantization of {src.name} failed ({describe(e)}); run without --quantize "
                              "to keep the float32 outputs") from e
        model = onnx.load(str(out))
        _drop_zero_points(model)
        _copy_metadata(onnx.load(str(src), load_external_data=False), model, excluded=len(exclude),
                       per_channel=per_channel)
        with atomic_path(dst) as tmp:
            onnx.save(model, str(tmp))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return len(exclude)


def _drop_zero_points(model: onnx.ModelProto) -> None:
    """Remove the all-zero zero points of constant weights' and biases' DequantizeLinear nodes (symmetric int8
    weights, int32 biases): the input is optional and 0 by default, so the values are the same and the file is
    smaller (3.2 kB of the glyph sample's 288 kB). Activations' zero points stay: a QuantizeLinear without one
    would produce uint8."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if (node.op_type == "DequantizeLinear" and len(node.input) == 3 and node.input[0] in inits
                and node.input[2] in inits and not numpy_helper.to_array(inits[node.input[2]]).any()):
            del node.input[2]
    used = {name for node in model.graph.node for name in node.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def _copy_metadata(src: onnx.ModelProto, dst: onnx.ModelProto, *, excluded: int, per_channel: bool) -> None:
    """The float model's metadata (head record, model card) on the int8 model, and how it was quantized."""
    keep = {p.key: p.value for p in src.metadata_props}
    keep[QUANTIZATION_KEY] = (f"int8 static QDQ (onnxruntime), {'per-channel' if per_channel else 'per-tensor'} "
                              f"int8 weights, int8 activations (MinMax); {excluded} {HEAD_PREFIX} nodes in float32")
    del dst.metadata_props[:]
    for key, value in keep.items():
        dst.metadata_props.add(key=key, value=value)


# ------------------------------------------------------------------------------------------- the head's checks


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def check_head_boundary(model_or_path: onnx.ModelProto | str | Path, heads: list[dict[str, Any]]) -> int:
    """Check that each fixed head of an int8 model is quantized only at its boundary.

    Inside the head no tensor goes through QuantizeLinear and no head node reads a dequantized constant; only
    the head's input (the backbone's features, or its learned map's output) may arrive through a
    Quantize/Dequantize pair. Then each head
    is checked as in float32 (`check_head_static`: no dense op, no constant beyond max(C, n)).

    Args:
        model_or_path: the int8 model.
        heads: its head records (`onnx_export.head_entries`): scope, input, output, num_classes, embed_size, kind.

    Returns:
        How many heads take their input through a Quantize/Dequantize pair.

    Raises:
        ExportError: a tensor inside a head is quantized, or the head is not slim.
    """
    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else onnx.load(str(model_or_path))
    producer = _producers(model)
    constants = {t.name for t in model.graph.initializer}
    at_boundary = 0
    for head in heads:
        scope = head["scope"]
        nodes = [n for n in model.graph.node if n.name.startswith(scope) and n.op_type not in _QDQ]
        inside = {out for n in nodes for out in n.output} - {head["output"]}
        for node in model.graph.node:
            if node.op_type == "QuantizeLinear" and node.input[0] in inside:
                raise ExportError(f"the int8 model quantizes {node.input[0]!r} inside the fixed head {scope!r}; "
                                  f"exclude the {scope} nodes from quantization")
        fed = {t for n in nodes for t in n.input} - inside
        for tensor in fed:
            dq = producer.get(tensor)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            if dq.input[0] in constants:
                raise ExportError(f"the int8 model quantizes the constant {dq.input[0]!r} of the fixed head {scope!r}; "
                                  f"exclude the {scope} nodes from quantization")
            q = producer.get(dq.input[0])
            source = q.input[0] if q is not None and q.op_type == "QuantizeLinear" else None
            if source != head["input"] and not _same_values(model, source, head["input"]) and not _adapter_out(
                    producer, source, scope):
                raise ExportError(f"the fixed head {scope!r} reads a dequantized tensor {source!r} other than its "
                                  f"input {head['input']!r}")
            at_boundary += 1
        if head.get("kind", "hadamard") == "hadamard":
            check_head_static(model, num_classes=head["num_classes"], embed_size=head["embed_size"], prefix=scope)
    return at_boundary


_VIEW_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity")


def _same_values(model: onnx.ModelProto, tensor: str | None, target: str) -> bool:
    """`tensor` is `target` seen through views (Flatten/Reshape/...): the quantizer may move a Q/DQ pair there."""
    producer = _producers(model)
    seen = 0
    while tensor is not None and seen < 16:
        if tensor == target:
            return True
        node = producer.get(tensor)
        if node is None or node.op_type not in (*_VIEW_OPS, *_QDQ):
            return False
        tensor, seen = node.input[0], seen + 1
    return False


def _adapter_out(producer: dict[str, onnx.NodeProto], tensor: str | None, scope: str) -> bool:
    """Whether `tensor` is made by the head's learned map before it (`--adapter`, scope `adapter_prefix(scope)`)."""
    node = producer.get(tensor) if tensor is not None else None
    return node is not None and node.name.startswith(adapter_prefix(scope))


def head_exactness(int8_path: str | Path, float_path: str | Path, x: np.ndarray) -> float:
    """Largest |Δ| between the int8 model's head outputs and the float32 heads fed the int8 model's features.

    The reference is model.onnx's own head subgraph (extracted from the tensor its nodes read, the features or an
    adapter's output, to the head's logits), run on the dequantized values the int8 graph hands its head: a head
    that runs exact inside matches it to float32 rounding (~1e-6), a re-quantized one by the int8 steps of its
    levels.

    Args:
        int8_path: model.int8.onnx.
        float_path: model.onnx, whose head records name each head's input and output tensors.
        x: (B, *input_shape) model inputs.
    """
    import onnxruntime as ort

    from fyc_convert.export.onnx_export import head_entries

    float_model = onnx.load(str(float_path), load_external_data=False)
    heads = head_entries(float_model)
    int8 = onnx.load(str(int8_path))
    feeds = {h["output"]: _head_feed(int8, h) for h in heads}
    wanted = [*feeds.values(), *feeds.keys()]
    present = {o.name for o in int8.graph.output}
    for name in wanted:
        if name not in present:
            int8.graph.output.add(name=name)
    sess = _session(int8.SerializeToString(), ort)
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x}),
                   strict=True))
    worst = 0.0
    with tempfile.TemporaryDirectory() as work:
        for h in heads:
            part = Path(work) / "head.onnx"
            # from what the head's own nodes read: the features, or a learned adapter's output before the head
            onnx.utils.extract_model(str(float_path), str(part), [_head_feed(float_model, h)], [h["output"]])
            ref = _session(str(part), ort)
            feats = got[feeds[h["output"]]].reshape(_fixed(ref.get_inputs()[0].shape, got[feeds[h["output"]]]))
            want = ref.run(None, {ref.get_inputs()[0].name: feats})[0]
            worst = max(worst, float(np.abs(got[h["output"]] - want).max()))
    return worst


def _head_feed(model: onnx.ModelProto, head: dict[str, Any]) -> str:
    """The tensor the int8 graph's head nodes read from outside the head (its dequantized input)."""
    nodes = [n for n in model.graph.node if n.name.startswith(head["scope"]) and n.op_type not in _QDQ]
    inside = {out for n in nodes for out in n.output}
    constants = {t.name for t in model.graph.initializer}
    outside = [t for n in nodes for t in n.input if t and t not in inside and t not in constants]
    if not outside:
        raise ExportError(f"the fixed head {head['scope']!r} reads no tensor from outside it")
    return outside[0]


def _fixed(shape: list[Any], like: np.ndarray) -> tuple[int, ...]:
    """The head input's shape with symbolic axes taken from the features actually computed."""
    return tuple(d if isinstance(d, int) else like.shape[i] for i, d in enumerate(shape))


def _session(model: str | bytes, ort: Any) -> Any:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------------------- verification


_NO_LABEL, _PAD = -2, -3  # labels of re-cut batches: no label given; a padding row of a static batch


def _rebatch(batches: Labelled, size: int | None) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Batches as given (size None), or re-cut to exactly `size` rows (the last one padded by repeating its
    first row; the padding rows are labelled `_PAD`, and the counts leave them out)."""
    if size is None:
        yield from batches
        return
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    have = 0
    for x, y in batches:
        xs.append(x)
        ys.append(np.full(len(x), _NO_LABEL) if y is None else np.asarray(y))
        have += len(x)
        while have >= size:
            cat_x, cat_y = np.concatenate(xs), np.concatenate(ys)
            yield cat_x[:size], _label(cat_y[:size])
            xs, ys, have = [cat_x[size:]], [cat_y[size:]], have - size
    if have:
        cat_x, cat_y = np.concatenate(xs), np.concatenate(ys)
        pad = size - have
        yield (np.concatenate([cat_x, np.repeat(cat_x[:1], pad, axis=0)]),
               np.concatenate([cat_y, np.full(pad, _PAD)]))


def _label(y: np.ndarray) -> np.ndarray | None:
    return None if (y == _NO_LABEL).all() else y


@dataclass
class _Pair:
    """Running counts of one int8 model against its float32 source."""

    float_sess: Any
    int8_sess: Any
    n: int = 0
    labelled: int = 0
    agree: int = 0
    float_right: int = 0
    int8_right: int = 0

    def add(self, x: np.ndarray, y: np.ndarray | None) -> None:
        keep = np.ones(len(x), bool) if y is None else y != _PAD
        f = _top1(self.float_sess, x)[keep]
        q = _top1(self.int8_sess, x)[keep]
        self.n += int(keep.sum())
        self.agree += int((f == q).sum())
        if y is not None and (y[keep] >= 0).all():
            t = y[keep]
            self.labelled += len(t)
            self.float_right += int((f == t).sum())
            self.int8_right += int((q == t).sum())

    def fill(self, model: Int8Model) -> None:
        model.agreement = self.agree / self.n if self.n else None
        if self.labelled and self.labelled == self.n:
            model.accuracy = self.int8_right / self.n
            model.float_accuracy = self.float_right / self.n


def _top1(sess: Any, x: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)})[0].argmax(-1)


def compare_top1(pairs: list[tuple[Path, Path]], evaluation: Labelled, models: list[Int8Model], *,
                 static_batch: int | None = None) -> np.ndarray | None:
    """Top-1 agreement of each (float32, int8) pair and, with labels, both accuracies, in one pass over the data.

    Fills each `models[i]` (agreement, accuracy, float_accuracy); returns the first evaluation batch (the
    inputs `head_exactness` runs on), or None when there was no data.
    """
    import onnxruntime as ort

    counts = [_Pair(_session(str(f), ort), _session(str(q), ort)) for f, q in pairs]
    first = None
    for x, y in _rebatch(evaluation, static_batch):
        x = np.ascontiguousarray(x, dtype=np.float32)
        first = x if first is None else first
        for c in counts:
            c.add(x, y)
    for c, model in zip(counts, models, strict=True):
        c.fill(model)
    return first


def judge(converted: Int8Model) -> tuple[float, str]:
    """(points lost by model.int8.onnx against model.onnx, the metric): accuracy with labels, else agreement."""
    if converted.accuracy is not None and converted.float_accuracy is not None:
        return 100.0 * (converted.float_accuracy - converted.accuracy), "accuracy"
    return 100.0 * (1.0 - (converted.agreement or 0.0)), "agreement"


def bench_int8(pairs: list[tuple[Path, Path]], input_shape: tuple[int, ...], *,
               static_batch: int | None = None) -> list[dict[str, dict[str, float]]]:
    """onnxruntime medians (1 thread) of each (float32, int8) pair, all four files interleaved per batch size."""
    from fyc_convert.export.bench import REPORT_MIN_SECONDS, REPORT_REPEATS, compare_latency, session

    rng = np.random.default_rng(0)
    sessions = [session(p) for pair in pairs for p in pair]
    out: list[dict[str, dict[str, float]]] = [{} for _ in pairs]
    for b in (static_batch,) if static_batch else (1, 32):
        x = rng.standard_normal((b, *input_shape)).astype(np.float32)
        ms = compare_latency(sessions, x, repeats=REPORT_REPEATS, min_seconds=REPORT_MIN_SECONDS)
        for i, entry in enumerate(out):
            entry[f"b{b}"] = {"float32": ms[2 * i], "int8": ms[2 * i + 1]}
    return out


def write_int8_models(folder: str | Path, calibration: Callable[[], Batches], evaluation: Labelled,
                      config: Int8Config, *, measured_on: str, calibration_samples: int) -> Int8Result:
    """Write original.int8.onnx and model.int8.onnx beside original.onnx and model.onnx in `folder`, and verify.

    Args:
        folder: holds original.onnx and model.onnx (the verified float32 exports); the int8 files go there.
        calibration: returns a fresh iterable of calibration inputs (called once per model).
        evaluation: (inputs, labels) batches of the held-out data (labels None when unlabelled).
        config: how the models are made and judged.
        measured_on: what `evaluation` is, for the report ("val, 360 samples").
        calibration_samples: how many samples `calibration` yields, for the report.

    Returns:
        The measured Int8Result (passed).

    Raises:
        ExportError: quantization failed, or a head is quantized inside (`check_head_boundary`).
        VerificationError: model.int8.onnx loses more than `config.max_drop` points against model.onnx; the
            file is then kept only as model.int8.failed.onnx and the error carries the Int8Result as `.int8`.
    """
    from fyc_convert.export.onnx_export import head_entries
    from fyc_convert.export.verify import mark_failed

    folder = Path(folder)
    names = {"original": ("original.onnx", "original.int8.onnx"), "converted": ("model.onnx", "model.int8.onnx")}
    excluded = 0
    for src, dst in names.values():
        excluded += quantize_int8(folder / src, folder / dst, calibration(), per_channel=config.per_channel,
                                  static_batch=config.static_batch)
    heads = head_entries(onnx.load(str(folder / "model.onnx"), load_external_data=False))
    check_head_boundary(folder / "model.int8.onnx", heads)
    pairs = [(folder / f, folder / q) for f, q in names.values()]
    models = [Int8Model(file=q, bytes=(folder / q).stat().st_size, float_bytes=_bytes(folder / f))
              for f, q in names.values()]
    first = compare_top1(pairs, evaluation, models, static_batch=config.static_batch)
    if config.bench and config.input_shape is not None:
        for model, latency in zip(models, bench_int8(pairs, config.input_shape, static_batch=config.static_batch),
                                  strict=True):
            model.latency_ms = latency
    drop, metric = judge(models[1])
    result = Int8Result(original=models[0], converted=models[1], measured_on=measured_on,
                        calibration_samples=calibration_samples, max_drop=config.max_drop, drop=drop,
                        drop_metric=metric, passed=drop <= config.max_drop, excluded_nodes=excluded)
    if first is not None and heads:
        result.head_max_abs_diff = head_exactness(folder / "model.int8.onnx", folder / "model.onnx", first)
        if result.head_max_abs_diff > _EXACT_ATOL:
            result.notes.append(f"the int8 head differs from the float32 head on the same features by "
                                f"{result.head_max_abs_diff:.3g}")
    if not result.passed:
        failed = mark_failed(folder / "model.int8.onnx")
        result.converted.file = failed.name
        raise VerificationError(f"model.int8.onnx loses {drop:.2f} points of {metric} against model.onnx "
                                f"({measured_on}), more than --int8-max-drop {config.max_drop:g}; kept as "
                                f"{failed.name}: ship model.onnx, or raise --int8-max-drop", int8=result)
    return result


def _bytes(path: Path) -> int:
    """A model's size on disk with its external data file, if any."""
    from fyc_convert.export.onnx_export import external_data_files

    return path.stat().st_size + sum((path.parent / d).stat().st_size for d in external_data_files(path)
                                     if (path.parent / d).is_file())

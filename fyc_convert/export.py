"""ONNX export of the whole model, with the swapped head as a slim add/sub subgraph.

How: the head module is temporarily replaced by a placeholder that the (TorchScript) exporter writes as
one marker node `fyc::HeadMarker`; onnx-graphsurgeon then replaces that node by the butterfly subgraph
from `fyc_convert.onnx_head.build_head` under the `fyc_head/` scope
(import -> edit -> cleanup().toposort() -> export). No generic simplifier or constant folding runs on the
result, so the head keeps its compact constants; `onnx_head.check_head_static` re-checks it after the edit.
"""

from __future__ import annotations

import base64
import copy
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from torch import nn

from fyc_convert.errors import ExportError, describe
from fyc_convert.files import temp_dir
from fyc_convert.onnx_head import (
    DEFAULT_OPSET,
    HEAD_LAYOUTS,
    HEAD_PREFIX,
    MIN_OPSET,
    HeadLayout,
    HeadSpec,
    _Ops,
    build_head,
    check_head_static,
    head_op_census,
)
from fyc_convert.surgery import eval_mode, logits_of

EXTERNAL_DATA_THRESHOLD = 2_000_000_000  # bytes of weights; protobuf cannot serialise a model over 2 GiB
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_AXIS = "batch_size"

_MARKER_DOMAIN = "fyc"
_MARKER_OP = "HeadMarker"



@dataclass
class ExportResult:
    """What `export_onnx` wrote.

    Attributes:
        path: the .onnx file.
        bytes: size on disk of the model plus its external data file, if any.
        external_data: the external data file (next to the model), or None when the weights are inline.
        opset: ONNX opset of the default domain.
        dtype: "fp32" or "fp16" (the backbone's precision; inputs and outputs are float32 either way).
        head_kind: "hadamard" (add/sub subgraph), "orthogonal" (a dense constant matrix: its savings are in
            trained parameters only, not in file size or speed) or "original" (the model as it was).
        head_ops: op census of the `fyc_head/` subgraph, e.g. {"Add": 11, "Sub": 11, ...}; {} for the original.
        node_count: number of nodes in the whole graph.
    """

    path: Path
    bytes: int
    external_data: Path | None
    opset: int
    dtype: str
    head_kind: str
    head_ops: dict[str, int]
    node_count: int


class _HeadMarker(torch.autograd.Function):
    """Stands in for the head during tracing; exported as the single node fyc::HeadMarker."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, num_classes: int) -> torch.Tensor:  # (..., N) -> (..., C)
        # Values do not matter: the node is replaced in the ONNX graph. Zeros keep shapes and dtype.
        return x.new_zeros(*x.shape[:-1], num_classes)

    @staticmethod
    def symbolic(g, x, num_classes: int):
        out = g.op(f"{_MARKER_DOMAIN}::{_MARKER_OP}", x, num_classes_i=num_classes)
        sizes = x.type().varyingSizes()
        if sizes is not None:
            out.setType(x.type().with_sizes(sizes[:-1] + [num_classes]))
        return out


class _Placeholder(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.calls = 0
        self.feature_shape: tuple[int, ...] = ()  # the features' shape without the batch, e.g. (N,) or (T, N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.feature_shape = tuple(int(d) for d in x.shape[1:])
        return _HeadMarker.apply(x, self.num_classes)


class _LogitsOnly(nn.Module):
    """What is exported: float32 input -> float32 logits, the model's other outputs dropped.

    With `half`, the model runs in float16 between a Cast at the input and a Cast at the output.
    """

    def __init__(self, model: nn.Module, *, half: bool):
        super().__init__()
        self.model, self.half = model, half

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.half:
            return logits_of(self.model(x.half())).float()
        return logits_of(self.model(x))


@contextmanager
def _swapped(model: nn.Module, layer: str, module: nn.Module) -> Iterator[None]:
    """Temporarily put `module` at the dotted name `layer`."""
    parent_name, _, child = layer.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
        old = parent.get_submodule(child)
    except AttributeError as e:
        raise ExportError(f"head layer {layer!r} not found in the model; pass the dotted name from the swap") from e
    setattr(parent, child, module)
    try:
        yield
    finally:
        setattr(parent, child, old)


def compact_rows(rows: np.ndarray | torch.Tensor | list[int]) -> str:
    """Rows as a short string for the manifest; `parse_rows` reverses it.

    Runs such as "1-3,7,9-10" when that is shorter, else "b64u16:" ("b64u32:" for rows >= 65536) and the
    base64 of the little-endian integers: a permutation of 1000 rows takes 2.7 kB instead of 4 kB.
    """
    values = np.asarray(rows.tolist() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64)
    parts: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    runs = ",".join(parts)
    width = 16 if values.size == 0 or values.max() < 2**16 else 32
    packed = f"b64u{width}:" + base64.b64encode(values.astype(f"<u{width // 8}").tobytes()).decode("ascii")
    return runs if len(runs) <= len(packed) else packed


def parse_rows(text: str) -> np.ndarray:
    """The (C,) int64 rows of a `compact_rows` string."""
    if text.startswith(("b64u16:", "b64u32:")):
        return np.frombuffer(base64.b64decode(text[7:]), dtype=f"<u{int(text[4:6]) // 8}").astype(np.int64)
    out: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return np.asarray(out, dtype=np.int64)


def _head_kind(head: nn.Module) -> str:
    from fyc_convert.heads import HadamardHead, OrthogonalHead

    if isinstance(head, HadamardHead):
        return "hadamard"
    if isinstance(head, OrthogonalHead):
        return "orthogonal"
    raise ExportError(
        f"head_layer points at a {type(head).__name__}, not a HadamardHead or OrthogonalHead; "
        "pass head_layer=None to export the original model"
    )


def _manifest(head: nn.Module | None, kind: str, layer: str | None) -> dict[str, str]:
    if head is None:
        return {"fyc_convert.head": "original"}
    manifest = {
        "fyc_convert.head": kind,
        "fyc_convert.layer": str(layer),
        "fyc_convert.in_features": str(head.in_features),
        "fyc_convert.num_classes": str(head.num_classes),
        "fyc_convert.seed": str(int(head.seed)),
    }
    if kind == "hadamard":
        manifest |= {
            "fyc_convert.hadamard_size": str(head.hadamard_size),
            "fyc_convert.embed_size": str(head.embed_size),
            "fyc_convert.embedding": str(head.embedding),
            "fyc_convert.rows": compact_rows(head.rows),
        }
    return manifest


def _trace(module: nn.Module, sample: torch.Tensor, onnx_path: Path, *, opset: int, marker: bool,
           dynamic: bool) -> None:
    """Export `module` with the TorchScript exporter (fast, and it honours the marker's `symbolic`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            module,
            (sample,),
            str(onnx_path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}} if dynamic else None,
            custom_opsets={_MARKER_DOMAIN: 1} if marker else None,
            do_constant_folding=True,  # folds the backbone only: the head is a single opaque marker here
        )


def _rewire(graph: gs.Graph, old: gs.Variable, new: gs.Variable) -> None:
    """Make every consumer of `old` (and the graph outputs) read `new`; a graph output keeps its name."""
    for node in list(old.outputs):
        for i, t in enumerate(node.inputs):
            if t is old:
                node.inputs[i] = new
    for i, out in enumerate(graph.outputs):
        if out is old:
            name, shape = old.name, old.shape
            old.name = f"{name}__replaced"
            new.name, new.shape = name, shape
            new.dtype = np.float32 if new.dtype is None else new.dtype
            graph.outputs[i] = new


def _dense_head(ops: _Ops, feats: gs.Variable, head: nn.Module) -> gs.Variable:
    """OrthogonalHead: logits = α/(‖x‖+eps) · x Qᵀ + b, with Q (C, N) as one constant (no fast transform)."""
    q = head.class_vectors().detach().to("cpu", torch.float32).numpy()  # (C, N)
    sumsq = ops.reduce_sum(ops.op1("Mul", [feats, feats]), [-1], keepdims=1)  # (B, 1)
    norm = ops.op1("Add", [ops.op1("Sqrt", [sumsq]), ops.const("eps", np.asarray([head.eps], np.float32))])
    factor = ops.op1("Div", [ops.const("scale", np.asarray([float(head.scale.detach())], np.float32)), norm])
    z = ops.op1("MatMul", [feats, ops.const("weight_t", q.T)])  # (B, C)
    logits = ops.op1("Mul", [z, factor])
    if head.bias is not None:
        logits = ops.op1("Add", [logits, ops.const("bias", head.bias.detach().cpu().float().numpy())])
    return logits


def _splice_head(graph: gs.Graph, head: nn.Module, kind: str, *, half: bool, feature_shape: tuple[int, ...],
                 layout: HeadLayout, static_batch: int | None) -> None:
    """Replace the marker node by the head subgraph, in float32 (cast in and out around an fp16 backbone)."""
    markers = [n for n in graph.nodes if n.op == _MARKER_OP and n.domain == _MARKER_DOMAIN]
    if len(markers) != 1:  # 0: the head's output was not part of the exported logits
        raise ExportError(
            "the head's output does not reach the model's logits output; make the model return the head's "
            "output as a tensor, first in a tuple, or under 'logits'"
        )
    marker = markers[0]
    feats, out = marker.inputs[0], marker.outputs[0]
    marker.inputs.clear()
    marker.outputs.clear()
    # the casts' own scope under the head's: build_head's nodes count their names from zero as well
    ops = _Ops(graph, HEAD_PREFIX if kind != "hadamard" else f"{HEAD_PREFIX}io/", np.float32)
    if half:
        feats = ops.op1("Cast", [feats], attrs={"to": onnx.TensorProto.FLOAT}, name="cast_in")
    if kind == "hadamard":
        logits = build_head(graph, feats, HeadSpec.from_module(head), prefix=HEAD_PREFIX, dtype=np.float32,
                            layout=layout, static_batch=static_batch, feature_shape=feature_shape)
    else:
        flat = ops.reshape(feats, [-1, head.in_features]) if len(feature_shape) > 1 else feats
        logits = _dense_head(ops, flat, head)
        if len(feature_shape) > 1:  # (B', C) -> (B, *lead, C), the lead axes as traced
            logits = ops.reshape(logits, [-1, *feature_shape[:-1], head.num_classes])
    logits.dtype = np.float32
    if half:
        # Consumers that cast straight back to float32 (the output boundary) read the float32 logits.
        for node in list(out.outputs):
            if node.op == "Cast" and node.attrs.get("to") == onnx.TensorProto.FLOAT:
                _rewire(graph, node.outputs[0], logits)
                node.inputs.clear()
        if out.outputs or any(o is out for o in graph.outputs):
            logits = ops.op1("Cast", [logits], attrs={"to": onnx.TensorProto.FLOAT16}, dtype=np.float16,
                             name="cast_out")
            _rewire(graph, out, logits)
    else:
        _rewire(graph, out, logits)


def _finish(graph: gs.Graph, *, opset: int, metadata: dict[str, str]) -> onnx.ModelProto:
    graph.cleanup().toposort()
    graph.opset = opset
    graph.import_domains = [d for d in (graph.import_domains or []) if d.domain != _MARKER_DOMAIN] or None
    model = gs.export_onnx(graph)
    # gs writes a dtype-only value_info per head tensor: bytes with no use (onnxruntime infers them)
    head_info = [v for v in model.graph.value_info if v.name.startswith(HEAD_PREFIX)]
    for v in head_info:
        model.graph.value_info.remove(v)
    del model.opset_import[:]
    model.opset_import.append(onnx.helper.make_opsetid("", opset))
    # the lowest IR version for the opset: onnx 1.23 writes IR 14 by default, which onnxruntime 1.31 refuses
    model.ir_version = onnx.helper.find_min_ir_version_for(model.opset_import)
    model.producer_name = "fyc-convert"
    for key, value in metadata.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    return model


def _weight_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        total += int(np.prod(t.dims, dtype=np.int64)) * dtype.itemsize
    return total


def external_data_files(path: Path) -> set[str]:
    """Names of the external data files the ONNX model at `path` reads (empty when none or unreadable)."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - a damaged old file just has no data files we know of
        return set()
    return {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}


def _save(model: onnx.ModelProto, path: Path, work: Path, *, external_threshold: int) -> Path | None:
    """Save into `work` (a temp folder next to `path`), check, then move into place; returns the .data path.

    The weights file gets a fresh name (`<stem>.<token>.onnx.data`) so that one rename switches `path` from
    the old complete model (with its old data file) to the new complete one; the old data file is removed
    only after the switch. No reader ever sees a model next to a data file that is not its own.
    """
    tmp_model = work / path.name
    external = _weight_bytes(model) > external_threshold
    data_name = f"{path.stem}.{uuid.uuid4().hex[:8]}.onnx.data" if external else None
    if data_name is not None:
        # Written fresh inside `work`: never appended to an old file.
        onnx.save_model(
            model, tmp_model, save_as_external_data=True, all_tensors_to_one_file=True,
            location=data_name, size_threshold=1024,
        )
    else:
        onnx.save_model(model, tmp_model)
    try:
        onnx.checker.check_model(str(tmp_model))
    except onnx.checker.ValidationError as e:
        raise ExportError(f"exported graph failed onnx.checker ({describe(e)}); try another --opset") from e
    old = external_data_files(path) | {f"{path.name}.data"} if path.exists() else {f"{path.name}.data"}
    if data_name is not None:
        os.replace(work / data_name, path.with_name(data_name))  # a new name: nothing reads it yet
    os.replace(tmp_model, path)  # the switch
    for stale in old - {data_name}:
        if "/" not in stale and stale != path.name:
            path.with_name(stale).unlink(missing_ok=True)
    return path.with_name(data_name) if data_name is not None else None


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    input_shape: tuple[int, ...],
    opset: int = DEFAULT_OPSET,
    dtype: Literal["fp32", "fp16"] = "fp32",
    head_layer: str | None = None,
    metadata: dict[str, str] | None = None,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    head_layout: HeadLayout = "portable",
    static_batch: int | None = None,
) -> ExportResult:
    """Export `model` to ONNX with a dynamic batch axis `batch_size`, the head as an add/sub subgraph.

    The file appears atomically: it is built in a temporary folder next to `path` and renamed into place;
    on any error nothing is left behind and an existing file at `path` is untouched.

    Args:
        model: the PyTorch model (converted or original); it is not modified.
        path: the .onnx file to write.
        input_shape: shape of one sample, without the batch axis, e.g. (3, 224, 224).
        opset: ONNX opset (>= 13; default 17, which onnx2torch, ncnn/pnnx and older runtimes take).
        dtype: "fp32", or "fp16" for a half-precision backbone with float32 inputs and outputs
            (the head itself runs in float32).
        head_layer: dotted name of the swapped HadamardHead / OrthogonalHead; None exports the model as is.
        metadata: extra key/value pairs for the model's metadata_props, next to the head manifest:
            fyc_convert.head ("hadamard", "orthogonal" or "original"), .layer, .in_features, .num_classes,
            .seed, and for a Hadamard head .hadamard_size, .embed_size, .embedding and .rows
            (`compact_rows`; `parse_rows` reads it back).
        external_data_threshold: weights above this many bytes go to `<stem>.<token>.onnx.data` next to the
            model (a fresh name per export, see `ExportResult.external_data`).
        head_layout: "portable" (the default: no If or Shape, static reshapes, ops every edge converter
            takes) or "batch-switched" (an If on the batch size picks a cache-blocked branch from 16
            samples on; faster for large heads at large batches in onnxruntime, not portable).
        static_batch: Export with this fixed batch size in the whole graph (input, head, output) instead of
            the dynamic axis `batch_size`; what many edge compilers and NPUs want.

    Returns:
        ExportResult with sizes, the head op census and the node count.

    Raises:
        ExportError: the model cannot be traced or exported, or the head subgraph is not slim.
    """
    path = Path(path)
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old for the head subgraph; pass --opset {MIN_OPSET} or newer")
    if head_layout not in HEAD_LAYOUTS:
        raise ExportError(f"head layout {head_layout!r} is unknown; pass one of {', '.join(HEAD_LAYOUTS)}")
    if static_batch is not None and (not isinstance(static_batch, int) or static_batch < 1):
        raise ExportError(f"static batch must be a positive integer, got {static_batch!r}; pass e.g. 1")
    if dtype not in ("fp32", "fp16"):
        raise ExportError(f"dtype {dtype!r} is not supported; pass fp32 or fp16")
    if not path.parent.is_dir():
        raise ExportError(f"output folder {path.parent} does not exist; create it or choose another path")
    half = dtype == "fp16"
    param = next(model.parameters(), None)
    # batch 2: a batch of 1 can hide batch-dependent reshapes; a private generator leaves the global RNG alone
    batch = 2 if static_batch is None else static_batch
    sample = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0))
    sample = sample.to(param.device if param is not None else "cpu")

    try:
        head = model.get_submodule(head_layer) if head_layer is not None else None
    except AttributeError as e:
        raise ExportError(f"head layer {head_layer!r} not found in the model; pass the swapped layer's name") from e
    kind = _head_kind(head) if head is not None else "original"

    net = copy.deepcopy(model).half() if half else model  # never change the caller's model
    placeholder = _Placeholder(head.num_classes) if head is not None else None
    work = temp_dir(path.parent, path.name)  # OutputError when the folder is not writable
    try:
        traced = work / "traced.onnx"
        try:
            with eval_mode(net):
                if placeholder is not None:
                    with _swapped(net, head_layer, placeholder):
                        _trace(_LogitsOnly(net, half=half), sample, traced, opset=opset, marker=True,
                               dynamic=static_batch is None)
                else:
                    _trace(_LogitsOnly(net, half=half), sample, traced, opset=opset, marker=False,
                           dynamic=static_batch is None)
        except ExportError:
            raise
        except Exception as e:  # the exporter raises many types; the user needs one line
            raise ExportError(
                f"torch.onnx.export failed: {describe(e)}; check that the model runs on input_shape {input_shape}"
            ) from e
        if placeholder is not None and placeholder.calls != 1:
            raise ExportError(
                f"the head {head_layer!r} ran {placeholder.calls} times in one forward pass; "
                "fyc-convert exports models whose classifier runs exactly once"
            )
        graph = gs.import_onnx(onnx.load(str(traced)))
        if head is not None:
            _splice_head(graph, head, kind, half=half, feature_shape=placeholder.feature_shape,
                         layout=head_layout, static_batch=static_batch)
        manifest = _manifest(head, kind, head_layer)
        if kind == "hadamard":
            manifest["fyc_convert.head_layout"] = head_layout
        proto = _finish(graph, opset=opset, metadata={**(metadata or {}), **manifest})
        head_ops = head_op_census(proto, HEAD_PREFIX) if head is not None else {}
        if kind == "hadamard":
            check_head_static(proto, num_classes=head.num_classes, embed_size=head.embed_size, prefix=HEAD_PREFIX)
        node_count = len(proto.graph.node)
        external = _save(proto, path, work, external_threshold=external_data_threshold)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = path.stat().st_size + (external.stat().st_size if external is not None else 0)
    return ExportResult(
        path=path, bytes=size, external_data=external, opset=opset, dtype=dtype,
        head_kind=kind, head_ops=head_ops, node_count=node_count,
    )

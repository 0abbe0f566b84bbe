"""ONNX export of the whole model, with each swapped head as a slim add/sub subgraph.

How: every fixed head is temporarily replaced by a placeholder that the exporter writes as one marker node
`fyc::HeadMarker` (its `index` attribute says which head); onnx-graphsurgeon then replaces each marker by the
butterfly subgraph from `fyc_convert.export.onnx_head.build_head` under that head's own scope (`fyc_head/` for one
head, `fyc_head/<i>/` for head i of several), import -> edit -> cleanup().toposort() -> export. No generic
simplifier runs on the result, so the heads keep their compact constants; `onnx_head.check_head_static`
re-checks each of them after the edit.

Two exporters trace the model: torch's TorchScript exporter (`dynamo=False`) and the torch.export-based one
(`dynamo=True`). The marker is one `torch.library` custom op (`fyc::head_marker`) called from an autograd
Function: TorchScript writes the Function's `symbolic`, torch.export records the custom op and our ONNX
translation (an onnxscript call of `fyc::HeadMarker`) writes the same node. `exporter="auto"` tries them in
`AUTO_ORDER` and keeps the first whose graph passes; which one that is, and why the other failed, is in the
result. The new exporter writes opset >= 18; lower opsets are converted down by onnx's version converter
before the heads are spliced in (the heads are built for the target opset directly).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from torch import nn

from fyc_convert.errors import ExportError, HeadError, describe, first_line
from fyc_convert.export.head_spec import adapter_weights
from fyc_convert.export.onnx_head import (
    DEFAULT_OPSET,
    HEAD_LAYOUTS,
    HEAD_PREFIX,
    MIN_OPSET,
    HeadLayout,
    HeadSpec,
    adapter_prefix,
    adapter_subgraph,
    build_head,
    check_head_static,
    head_op_census,
)
from fyc_convert.export.ops import Ops
from fyc_convert.files import temp_dir
from fyc_convert.head.record import KIND_KEY, HeadRecord, decode_heads, encode_heads
from fyc_convert.model.surgery import eval_mode, logits_of

EXTERNAL_DATA_THRESHOLD = 2_000_000_000  # bytes of weights; protobuf cannot serialise a model over 2 GiB
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_AXIS = "batch_size"

Exporter = Literal["auto", "torchscript", "dynamo"]
EXPORTERS = ("auto", "torchscript", "dynamo")
# The order "auto" tries the exporters in (measured on the stand-ins and the timm sample: see README and
# benchmarks/exporters.py): TorchScript is much faster and as robust on the stand-ins; dynamo takes what it refuses.
AUTO_ORDER: tuple[str, ...] = ("torchscript", "dynamo")
DYNAMO_MIN_OPSET = 18  # torch's ONNX translations exist from opset 18; lower ones are converted down

_MARKER_DOMAIN = "fyc"
_MARKER_OP = "HeadMarker"
_QUIET_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch.fx", "onnxscript", "onnx_ir")


@dataclass(frozen=True)
class ExportedHead:
    """One fixed head as it stands in the exported graph.

    Attributes:
        layer: dotted name of the head in the PyTorch model.
        scope: name prefix of its nodes, "fyc_head/" (one head) or "fyc_head/<i>/" (head i of several).
        kind: "hadamard" or "orthogonal".
        num_classes: C.
        embed_size: n of a Hadamard head (the limit of its constants is max(C, n)); None for orthogonal.
        input_name: the graph tensor holding the head's features (what verification substitutes).
        input_dtype: that tensor's element type, "float32" or "float16".
        output_name: the graph tensor holding the head's float32 logits (B, ..., C), before any combining.
        ops: op census of its scope.
    """

    layer: str
    scope: str
    kind: str
    num_classes: int
    embed_size: int | None
    input_name: str
    input_dtype: str
    output_name: str
    ops: dict[str, int]


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
        head_ops: op census of every head's nodes together (the `fyc_head/` scope), e.g. {"Add": 11, ...};
            {} for the original.
        node_count: number of nodes in the whole graph.
        exporter: the exporter whose graph was kept, "torchscript" or "dynamo".
        exporter_failures: one line per exporter tried before it, e.g. ["dynamo: Unsupported: ..."].
        heads: each fixed head in the graph, in the order of `head_layer`.
    """

    path: Path
    bytes: int
    external_data: Path | None
    opset: int
    dtype: str
    head_kind: str
    head_ops: dict[str, int]
    node_count: int
    exporter: str = "torchscript"
    exporter_failures: list[str] = field(default_factory=list)
    heads: tuple[ExportedHead, ...] = ()


# ---------------------------------------------------------------------------------------------- the marker


@torch.library.custom_op("fyc::head_marker", mutates_args=())
def _head_marker(x: torch.Tensor, num_classes: int, index: int) -> torch.Tensor:
    """(..., N) -> (..., C) zeros: values do not matter, the node is replaced in the ONNX graph."""
    return x.new_zeros(*x.shape[:-1], num_classes)


@_head_marker.register_fake
def _(x: torch.Tensor, num_classes: int, index: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], num_classes)


class _HeadMarker(torch.autograd.Function):
    """Stands in for head `index` during tracing; exported as the single node fyc::HeadMarker by either exporter.

    TorchScript writes `symbolic`; torch.export sees the custom op inside `forward` (see `_dynamo_marker`).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, num_classes: int, index: int) -> torch.Tensor:  # (..., N) -> (..., C)
        return torch.ops.fyc.head_marker(x, num_classes, index)

    @staticmethod
    def symbolic(g, x, num_classes: int, index: int):
        out = g.op(f"{_MARKER_DOMAIN}::{_MARKER_OP}", x, num_classes_i=num_classes, index_i=index)
        sizes = x.type().varyingSizes()
        if sizes is not None:
            out.setType(x.type().with_sizes(sizes[:-1] + [num_classes]))
        return out


def _dynamo_marker() -> Any:
    """The custom op's ONNX translation for the torch.export-based exporter: one fyc::HeadMarker node.

    The op has no registered ONNX schema (it never reaches a runtime), so the onnxscript Op is given a
    private one: it only tells the exporter's graph builder the input, output and attributes.
    """
    import onnxscript
    from onnx.defs import OpSchema

    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
    schema = OpSchema(
        _MARKER_OP, _MARKER_DOMAIN, 1,
        inputs=[OpSchema.FormalParameter("features", "T")], outputs=[OpSchema.FormalParameter("logits", "T")],
        type_constraints=[("T", floats, "float tensors")],
        attributes=[OpSchema.Attribute("num_classes", OpSchema.AttrType.INT, "C"),
                    OpSchema.Attribute("index", OpSchema.AttrType.INT, "which head")],
    )
    op = onnxscript.values.Op(onnxscript.values.Opset(_MARKER_DOMAIN, 1), _MARKER_OP, schema)

    def head_marker(features: Any, num_classes: int, index: int) -> Any:
        return op(features, num_classes=num_classes, index=index)

    return head_marker


class _Placeholder(nn.Module):
    def __init__(self, num_classes: int, index: int, layer: str):
        super().__init__()
        self.num_classes, self.index, self.layer = num_classes, index, layer
        self.feature_shape: tuple[int, ...] = ()  # the features' shape without the batch, e.g. (N,) or (T, N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch.export traces with symbolic sizes: such an axis stays dynamic (-1); TorchScript's are numbers
        self.feature_shape = tuple(-1 if isinstance(d, torch.SymInt) else int(d) for d in x.shape[1:])
        return _HeadMarker.apply(x, self.num_classes, self.index)


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
def _swapped(model: nn.Module, layers: Sequence[str], modules: Sequence[nn.Module]) -> Iterator[None]:
    """Temporarily put each of `modules` at the dotted name of the same position in `layers`."""
    with ExitStack() as stack:
        for layer, module in zip(layers, modules, strict=True):
            parent_name, _, child = layer.rpartition(".")
            try:
                parent = model.get_submodule(parent_name)
                old = parent.get_submodule(child)
            except AttributeError as e:
                raise ExportError(f"head layer {layer!r} not found in the model; pass the dotted name from the "
                                  "swap") from e
            setattr(parent, child, module)
            stack.callback(setattr, parent, child, old)
        yield


def _head_kind(head: nn.Module) -> str:
    from fyc_convert.head.heads import HadamardHead, OrthogonalHead

    if isinstance(head, HadamardHead):
        return "hadamard"
    if isinstance(head, OrthogonalHead):
        return "orthogonal"
    raise ExportError(
        f"head_layer points at a {type(head).__name__}, not a HadamardHead or OrthogonalHead; "
        "pass head_layer=None to export the original model"
    )


def _manifest(model: nn.Module, kind: str, heads: Sequence[ExportedHead], layout: str) -> dict[str, str]:
    """The head list of the model's metadata_props (`fyc_convert.head.record`: one record per head, placed), and
    the Hadamard heads' layout."""
    if not heads:
        return {KIND_KEY: "original"}
    manifest = encode_heads([HeadRecord.of(model, e.layer).placed(scope=e.scope, input=e.input_name,
                                                                   input_dtype=e.input_dtype, output=e.output_name)
                             for e in heads])
    return manifest | ({"fyc_convert.head_layout": layout} if kind == "hadamard" else {})


def head_entries(proto: onnx.ModelProto) -> list[dict[str, Any]]:
    """The head list of an exported model, one `HeadRecord.to_dict` per head (layer, scope, input, input_dtype,
    output, sizes); [] if it has none or it cannot be read."""
    meta = {p.key: p.value for p in proto.metadata_props}
    try:
        return [record.to_dict() for record in decode_heads(meta)]
    except HeadError:
        return []


# ---------------------------------------------------------------------------------------------- exporters


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' deprecation warnings and log lines (the library never prints); levels restored."""
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _root_cause(e: BaseException) -> BaseException:
    """The innermost cause: torch.export's errors wrap the informative one under several generic layers."""
    seen = {id(e)}
    while e.__cause__ is not None and id(e.__cause__) not in seen and first_line(e.__cause__):
        e = e.__cause__
        seen.add(id(e))
    return e


def _torchscript(module: nn.Module, sample: torch.Tensor, onnx_path: Path, *, opset: int, marker: bool,
                 dynamic: bool, external: bool) -> None:
    """Export `module` with the TorchScript exporter (fast; it writes the marker's `symbolic`)."""
    with _quiet():
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
            do_constant_folding=True,  # folds the backbone only: each head is a single opaque marker here
        )


def _dynamo(module: nn.Module, sample: torch.Tensor, onnx_path: Path, *, opset: int, marker: bool,
            dynamic: bool, external: bool) -> None:
    """Export `module` with the torch.export-based exporter at opset >= 18; converted down to `opset` after."""
    dims = ({0: torch.export.Dim(BATCH_AXIS)},) if dynamic else None
    with _quiet():
        torch.onnx.export(
            module,
            (sample,),
            str(onnx_path),
            dynamo=True,
            opset_version=max(opset, DYNAMO_MIN_OPSET),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=dims,
            custom_translation_table={torch.ops.fyc.head_marker.default: _dynamo_marker()} if marker else None,
            external_data=external,
            verbose=False,
            optimize=True,  # onnxscript's constant folding and dead-code removal, on the backbone
        )


_EXPORT = {"torchscript": _torchscript, "dynamo": _dynamo}


def _to_opset(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Convert the default domain to `opset` with onnx's version converter; custom-domain nodes pass unchanged.

    Large weights are set aside while the converter runs (it serialises the model, which protobuf limits to
    2 GiB); small constants stay, since adapters such as ReduceMean's axes input -> attribute read them.
    """
    current = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    if current == opset:
        return proto
    aside: dict[str, onnx.TensorProto] = {}
    inputs = []
    for init in list(proto.graph.initializer):
        if init.ByteSize() > 1 << 20:
            aside[init.name] = init
            inputs.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    if aside:
        kept = [t for t in proto.graph.initializer if t.name not in aside]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(kept)
        proto.graph.input.extend(inputs)
    try:
        converted = onnx.version_converter.convert_version(proto, opset)
    finally:
        if aside:  # the caller's proto back as it was
            del proto.graph.input[len(proto.graph.input) - len(inputs):]
            proto.graph.initializer.extend(aside.values())
    if aside:
        names = set(aside)
        kept_inputs = [v for v in converted.graph.input if v.name not in names]
        del converted.graph.input[:]
        converted.graph.input.extend(kept_inputs)
        converted.graph.initializer.extend(aside.values())
    if opset < 18:
        _drop_noop_attribute(converted)
    return converted


# Reductions that took `noop_with_empty_axes` only from opset 18 (ReduceSum has it from 13).
_REDUCE_18 = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
              "ReduceProd", "ReduceSumSquare"}


def _drop_noop_attribute(proto: onnx.ModelProto) -> None:
    """Remove the opset-18 attribute `noop_with_empty_axes` that onnx's 18 -> 17 adapters leave on reductions.

    onnx.checker refuses it below opset 18. Its value 0 is the older opsets' only behaviour (no axes: reduce
    over all), so dropping it changes nothing; 1 has no equivalent there.
    """
    nodes = [*proto.graph.node, *(n for f in proto.functions for n in f.node)]
    for node in nodes:
        if node.domain not in ("", "ai.onnx") or node.op_type not in _REDUCE_18:
            continue
        for attr in list(node.attribute):
            if attr.name == "noop_with_empty_axes":
                if attr.i:
                    raise ExportError(f"{node.op_type} {node.name!r} needs noop_with_empty_axes=1, which opset < 18 "
                                      "does not have; pass --opset 18")
                node.attribute.remove(attr)


def _check_graph(proto: onnx.ModelProto, *, dynamic: bool, static_batch: int | None) -> None:
    """What both exporters must give: one input and one output, batch axis dynamic (or the static size)."""
    if len(proto.graph.input) != 1 or len(proto.graph.output) != 1:
        raise ExportError(f"the graph has {len(proto.graph.input)} inputs and {len(proto.graph.output)} outputs, "
                          "expected one of each")
    for value in (proto.graph.input[0], proto.graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        if not dims:
            raise ExportError(f"the exporter gave {value.name!r} no shape")
        if dynamic and not dims[0].dim_param:
            raise ExportError(f"the exporter fixed the batch axis of {value.name!r} at {dims[0].dim_value}")
        if not dynamic and dims[0].dim_value != static_batch:
            raise ExportError(f"the exporter gave {value.name!r} batch {dims[0].dim_value or dims[0].dim_param}, "
                              f"not the static batch {static_batch}")


class _HeadUse(ExportError):
    """The heads are not used as the exporter needs (a property of the model: no other exporter can help)."""


def _trace(module: nn.Module, sample: torch.Tensor, work: Path, *, opset: int, marker: bool,
           static_batch: int | None, exporter: Exporter, external: bool,
           placeholders: Sequence[_Placeholder]) -> tuple[onnx.ModelProto, str, list[str]]:
    """Export with the chosen exporter(s): (the graph at `opset`, the exporter used, why earlier ones failed)."""
    order = AUTO_ORDER if exporter == "auto" else (exporter,)
    failures: list[str] = []
    dynamic = static_batch is None
    for name in order:
        folder = work / name
        folder.mkdir()
        traced = folder / "traced.onnx"
        try:
            _EXPORT[name](module, sample, traced, opset=opset, marker=marker, dynamic=dynamic, external=external)
            proto = onnx.load(str(traced))
            proto = _to_opset(proto, opset)
            _check_graph(proto, dynamic=dynamic, static_batch=static_batch)
            _count_markers(proto, placeholders)
        except _HeadUse:
            raise
        except Exception as e:  # noqa: BLE001 - the exporters raise many types; the user needs one line each
            failures.append(f"{name}: {describe(_root_cause(e))}")
            continue
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return proto, name, failures
    tried = "; ".join(failures)
    raise ExportError(f"torch.onnx.export failed ({tried}); check that the model runs on the input shape")


def _count_markers(proto: onnx.ModelProto, placeholders: Sequence[_Placeholder]) -> None:
    counts = {p.index: 0 for p in placeholders}
    for node in proto.graph.node:
        if node.op_type == _MARKER_OP and node.domain == _MARKER_DOMAIN:
            index = next((a.i for a in node.attribute if a.name == "index"), -1)
            counts[index] = counts.get(index, 0) + 1
    for p in placeholders:
        if counts[p.index] == 0:  # the head's output was not part of the exported logits
            raise _HeadUse(
                "the head's output does not reach the model's logits output; make the model return the head's "
                "output as a tensor, first in a tuple, or under 'logits'"
            )
        if counts[p.index] > 1:
            raise _HeadUse(
                f"the head {p.layer!r} ran {counts[p.index]} times in one forward pass; "
                "fyc-convert exports models whose classifier runs exactly once"
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


def _dense_head(ops: Ops, feats: gs.Variable, head: nn.Module) -> gs.Variable:
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


def _splice_head(graph: gs.Graph, marker: gs.Node, head: nn.Module, kind: str, *, scope: str, half: bool,
                 feature_shape: tuple[int, ...], layout: HeadLayout,
                 static_batch: int | None) -> tuple[gs.Variable, gs.Variable]:
    """Replace one marker node by its head subgraph, in float32 (cast in and out around an fp16 backbone).

    Returns the features variable the head reads and its float32 logits variable.
    """
    feats, out = marker.inputs[0], marker.outputs[0]
    marker.inputs.clear()
    marker.outputs.clear()
    # the casts' own scope under the head's: build_head's nodes count their names from zero as well
    ops = Ops(graph, scope if kind != "hadamard" else f"{scope}io/", np.float32)
    x = feats
    if half:
        x = ops.op1("Cast", [feats], attrs={"to": onnx.TensorProto.FLOAT}, name="cast_in")
    if kind == "hadamard":
        logits = build_head(graph, x, HeadSpec.from_module(head), prefix=scope, dtype=np.float32,
                            layout=layout, static_batch=static_batch, feature_shape=feature_shape)
    else:
        flat = ops.reshape(x, [-1, head.input_features]) if len(feature_shape) > 1 else x
        weights = adapter_weights(head)
        if weights is not None:  # the learned map before the head, beside its scope (as build_head puts it)
            flat = adapter_subgraph(Ops(graph, adapter_prefix(scope), np.float32), flat, weights)
        logits = _dense_head(ops, flat, head)
        if len(feature_shape) > 1:  # (B', C) -> (B, *lead, C), the lead axes as traced
            logits = ops.reshape(logits, [-1, *feature_shape[:-1], head.num_classes])
    logits.dtype = np.float32
    head_out = logits  # the float32 logits, whatever casts follow
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
    return feats, head_out


def _finish(graph: gs.Graph, *, opset: int, metadata: dict[str, str]) -> onnx.ModelProto:
    graph.cleanup().toposort()
    graph.opset = opset
    graph.import_domains = [d for d in (graph.import_domains or []) if d.domain != _MARKER_DOMAIN] or None
    model = gs.export_onnx(graph)
    # gs writes a dtype-only value_info per head tensor: bytes with no use (onnxruntime infers them)
    head_info = [v for v in model.graph.value_info if v.name.startswith(HEAD_PREFIX)]
    for v in head_info:
        model.graph.value_info.remove(v)
    # the default domain at `opset`, and any other domain a node (or local function) still uses
    used = {n.domain for n in model.graph.node} | {n.domain for f in model.functions for n in f.node}
    used |= {f.domain for f in model.functions}
    others = [(o.domain, o.version) for o in model.opset_import
              if o.domain not in ("", "ai.onnx", _MARKER_DOMAIN) and o.domain in used]
    del model.opset_import[:]
    model.opset_import.append(onnx.helper.make_opsetid("", opset))
    model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in others)
    # the lowest IR version for the opset: onnx 1.23 writes IR 14 by default, which onnxruntime 1.31 refuses
    model.ir_version = onnx.helper.find_min_ir_version_for(model.opset_import[:1])
    model.producer_name = "fyc-convert"
    del model.metadata_props[:]  # the exporter's own notes are not ours to ship
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


def _feature_shape(feats: gs.Variable, placeholder: _Placeholder) -> tuple[int, ...]:
    """The head's features without the batch, e.g. (N,) or (T, N); a named (symbolic) axis is -1.

    As the placeholder saw them when it ran (TorchScript traces the module itself), else from the graph,
    where the exporter typed the marker's input (torch.export traces a copy of the module).
    """
    if placeholder.feature_shape or feats.shape is None or len(feats.shape) < 2:
        return placeholder.feature_shape
    return tuple(int(d) if isinstance(d, (int, np.integer)) and d > 0 else -1 for d in feats.shape[1:])


def _layers(head_layer: str | Sequence[str] | None) -> tuple[str, ...]:
    if head_layer is None:
        return ()
    layers = (head_layer,) if isinstance(head_layer, str) else tuple(head_layer)
    if not layers or len(set(layers)) != len(layers) or not all(isinstance(n, str) and n for n in layers):
        raise ExportError(f"head layers {list(layers)!r} must be distinct dotted names; pass SwapResult.layers")
    return layers


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    input_shape: tuple[int, ...],
    opset: int = DEFAULT_OPSET,
    dtype: Literal["fp32", "fp16"] = "fp32",
    head_layer: str | Sequence[str] | None = None,
    metadata: dict[str, str] | None = None,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    head_layout: HeadLayout = "portable",
    static_batch: int | None = None,
    exporter: Exporter = "auto",
) -> ExportResult:
    """Export `model` to ONNX with a dynamic batch axis `batch_size`, each fixed head as an add/sub subgraph.

    The file appears atomically: it is built in a temporary folder next to `path` and renamed into place;
    on any error nothing is left behind and an existing file at `path` is untouched.

    Args:
        model: the PyTorch model (converted or original); it is not modified.
        path: the .onnx file to write.
        input_shape: shape of one sample, without the batch axis, e.g. (3, 224, 224).
        opset: ONNX opset (>= 13; default 17, which onnx2torch, ncnn/pnnx and older runtimes take).
        dtype: "fp32", or "fp16" for a half-precision backbone with float32 inputs and outputs
            (the heads themselves run in float32).
        head_layer: dotted name of the swapped HadamardHead / OrthogonalHead, or the names of several
            (`SwapResult.layers`: heads whose outputs are averaged or summed), each spliced in under its own
            scope ("fyc_head/" for one head, "fyc_head/<i>/" for head i of several); None exports the model as is.
        metadata: extra key/value pairs for the model's metadata_props, beside the head list that
            `fyc_convert.head.record.encode_heads` writes (`head_entries` reads it) and fyc_convert.head_layout.
        external_data_threshold: weights above this many bytes go to `<stem>.<token>.onnx.data` next to the
            model (a fresh name per export, see `ExportResult.external_data`).
        head_layout: "portable" (the default: no If or Shape, static reshapes, ops every edge converter
            takes) or "batch-switched" (an If on the batch size picks a cache-blocked branch from 16
            samples on; faster for large heads at large batches in onnxruntime, not portable).
        static_batch: Export with this fixed batch size in the whole graph (input, head, output) instead of
            the dynamic axis `batch_size`; what many edge compilers and NPUs want.
        exporter: "auto" (the exporters in `AUTO_ORDER`, the first whose graph passes), "torchscript"
            (`torch.onnx.export(dynamo=False)`) or "dynamo" (the torch.export-based exporter).

    Returns:
        ExportResult with sizes, the heads and their op census, the node count and the exporter used.

    Raises:
        ExportError: the model cannot be traced or exported, or a head subgraph is not slim.
    """
    path = Path(path)
    _check_request(path, opset=opset, dtype=dtype, head_layout=head_layout, exporter=exporter,
                   static_batch=static_batch)
    layers, heads, kind = _find_heads(model, head_layer)
    half = dtype == "fp16"
    net = copy.deepcopy(model).half() if half else model  # never change the caller's model
    placeholders = [_Placeholder(h.num_classes, i, layer) for i, (h, layer) in enumerate(zip(heads, layers))]
    external = sum(p.numel() * p.element_size() for p in net.parameters()) > external_data_threshold
    work = temp_dir(path.parent, path.name)  # OutputError when the folder is not writable
    try:
        # 1. export: the backbone traced with one marker node per head
        with eval_mode(net), _swapped(net, layers, placeholders):
            proto, used, failures = _trace(_LogitsOnly(net, half=half), _sample(model, input_shape, static_batch),
                                           work, opset=opset, marker=bool(heads), static_batch=static_batch,
                                           exporter=exporter, external=external, placeholders=placeholders)
        # 2. splice: each marker replaced by its head subgraph; 3. cleanup: toposort, opsets, IR version, metadata
        graph = gs.import_onnx(proto)
        del proto
        draft = _splice_heads(graph, heads, placeholders, kind, half=half, layout=head_layout,
                              static_batch=static_batch)
        proto = _finish(graph, opset=opset, metadata={**(metadata or {}), **_manifest(model, kind, draft, head_layout)})
        # 4. static checks of every head, then the atomic save
        exported = _check_heads(proto, draft, kind)
        head_ops = head_op_census(proto, HEAD_PREFIX) if heads else {}
        node_count = len(proto.graph.node)
        saved = _save(proto, path, work, external_threshold=external_data_threshold)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = path.stat().st_size + (saved.stat().st_size if saved is not None else 0)
    return ExportResult(
        path=path, bytes=size, external_data=saved, opset=opset, dtype=dtype, head_kind=kind, head_ops=head_ops,
        node_count=node_count, exporter=used, exporter_failures=failures, heads=exported,
    )


def _check_request(path: Path, *, opset: int, dtype: str, head_layout: str, exporter: str,
                   static_batch: int | None) -> None:
    """The export options a user passes, checked before any work."""
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old for the head subgraph; pass --opset {MIN_OPSET} or newer")
    if head_layout not in HEAD_LAYOUTS:
        raise ExportError(f"head layout {head_layout!r} is unknown; pass one of {', '.join(HEAD_LAYOUTS)}")
    if exporter not in EXPORTERS:
        raise ExportError(f"exporter {exporter!r} is unknown; pass one of {', '.join(EXPORTERS)}")
    if static_batch is not None and (not isinstance(static_batch, int) or static_batch < 1):
        raise ExportError(f"static batch must be a positive integer, got {static_batch!r}; pass e.g. 1")
    if dtype not in ("fp32", "fp16"):
        raise ExportError(f"dtype {dtype!r} is not supported; pass fp32 or fp16")
    if not path.parent.is_dir():
        raise ExportError(f"output folder {path.parent} does not exist; create it or choose another path")


def _find_heads(model: nn.Module, head_layer: str | Sequence[str] | None) -> tuple[tuple[str, ...], list[nn.Module],
                                                                                    str]:
    """(layers, the head modules there, their one kind: "hadamard", "orthogonal" or "original" for none)."""
    layers = _layers(head_layer)
    heads = []
    for layer in layers:
        try:
            heads.append(model.get_submodule(layer))
        except AttributeError as e:
            raise ExportError(f"head layer {layer!r} not found in the model; pass the swapped layer's name") from e
    kinds = sorted({_head_kind(h) for h in heads})
    if len(kinds) > 1:
        raise ExportError(f"the heads are of different kinds ({', '.join(kinds)}); swap them all with one --head")
    return layers, heads, kinds[0] if kinds else "original"


def _sample(model: nn.Module, input_shape: tuple[int, ...], static_batch: int | None) -> torch.Tensor:
    """The traced input, on the model's device: batch 2 (a batch of 1 can hide batch-dependent reshapes) or the
    static batch, from a private generator (the global RNG is left alone)."""
    param = next(model.parameters(), None)
    batch = 2 if static_batch is None else static_batch
    sample = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0))
    return sample.to(param.device if param is not None else "cpu")


def _splice_heads(graph: gs.Graph, heads: Sequence[nn.Module], placeholders: Sequence[_Placeholder], kind: str, *,
                  half: bool, layout: HeadLayout, static_batch: int | None) -> list[ExportedHead]:
    """Replace every head's marker by its subgraph; the heads as they stand in the graph (ops not yet counted)."""
    scopes = [HEAD_PREFIX] if len(heads) == 1 else [f"{HEAD_PREFIX}{i}/" for i in range(len(heads))]
    markers = {int(n.attrs.get("index", -1)): n for n in graph.nodes
               if n.op == _MARKER_OP and n.domain == _MARKER_DOMAIN}
    spliced = []
    for head, ph, scope in zip(heads, placeholders, scopes, strict=True):
        marker = markers[ph.index]
        feats, logits = _splice_head(graph, marker, head, kind, scope=scope, half=half,
                                     feature_shape=_feature_shape(marker.inputs[0], ph), layout=layout,
                                     static_batch=static_batch)
        spliced.append((feats.name, logits))
    # the logits' names are read after every splice: a later rewire can rename a graph output
    dtype = "float16" if half else "float32"
    return [ExportedHead(ph.layer, scope, kind, h.num_classes, getattr(h, "embed_size", None), name, dtype,
                         logits.name, {})
            for ph, scope, h, (name, logits) in zip(placeholders, scopes, heads, spliced, strict=True)]


def _check_heads(proto: onnx.ModelProto, draft: Sequence[ExportedHead], kind: str) -> tuple[ExportedHead, ...]:
    """Each head with its op census; a Hadamard head checked on its own: no dense op, no constant beyond its
    own max(C, n)."""
    exported = []
    for entry in draft:
        if kind == "hadamard":
            ops = check_head_static(proto, num_classes=entry.num_classes, embed_size=entry.embed_size,
                                    prefix=entry.scope)
        else:
            ops = head_op_census(proto, entry.scope)
        exported.append(dataclasses.replace(entry, ops=ops))
    return tuple(exported)

"""No learned classifier left behind: scan an exported ONNX file for C×N class weights that feed the logits.

Discovery (`fyc_convert.model.surgery`) decides which layers to swap; this check looks at what was written, so
a layout that discovery misses cannot pass as converted. From the graph's first output (the logits) it walks
back through the ops that keep the class axis (additions, scaling, reductions over tokens, reshapes, casts,
softmax) and stops at the first op that mixes features into classes (MatMul, Gemm, Conv and their quantized
forms) and at the fixed heads' own subgraphs (the `fyc_head/` scopes). A constant input of such a mixing op
with a dimension equal to C and another of at least 2 (a C×N matrix, or its N×C transpose, or a C×N×1×1 conv
kernel; through DequantizeLinear, Cast, Transpose, Reshape) is a learned class matrix still in the file.

`check_no_learned_classifier` is the pipeline's decision: a leftover that is one of the fixed heads' own
matrices (the orthogonal head is exported as a dense constant) is not learned; one that is the weight of a
layer the user left out with `--layer` is allowed (the report's note names it, see `Classifiers.kept_note`);
anything else fails the run.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from torch import Tensor, nn

from fyc_convert.errors import VerificationError, few
from fyc_convert.export.onnx_head import HEAD_PREFIX
from fyc_convert.model.surgery import SwapResult

# ops whose output keeps its input's class axis (the walk from the logits passes through them)
_CLASS_WISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Max", "Min", "Mean", "Sum", "Identity", "Cast", "Reshape", "Flatten",
    "Squeeze", "Unsqueeze", "ReduceMax", "ReduceMin", "ReduceMean", "ReduceSum", "GlobalAveragePool",
    "GlobalMaxPool", "Gather", "Slice", "Softmax", "LogSoftmax", "Sigmoid", "BatchNormalization", "Clip",
})
# ops that turn features into classes with a weight (where a learned classifier shows)
_MIXING = frozenset({"MatMul", "Gemm", "Conv", "MatMulInteger", "QLinearMatMul", "ConvInteger", "QLinearConv"})
# ops between a stored constant and the mixing op that uses it
_CONST_PATH = frozenset({"DequantizeLinear", "Cast", "Transpose", "Identity", "Reshape", "Squeeze", "Unsqueeze"})


@dataclass(frozen=True)
class LearnedWeight:
    """A constant that still maps features to the classes in an exported graph.

    Attributes:
        name: The initializer's (or Constant node's output) name.
        shape: Its shape, e.g. (1000, 384) or (384, 1000).
        node: The mixing node that uses it ("MatMul /aux_head/MatMul").
        values: Its values as float32 (to tell a fixed head's matrix or a kept layer's weight from the rest).
    """

    name: str
    shape: tuple[int, ...]
    node: str
    values: np.ndarray

    def describe(self) -> str:
        return f"{self.name} {list(self.shape)} ({self.node})"


def find_learned_class_weights(onnx_path: str | Path, num_classes: int) -> list[LearnedWeight]:
    """Every constant C×N matrix (any layout, see the module docstring) that feeds the logits of `onnx_path`.

    Args:
        onnx_path: The exported model (external data beside it is read).
        num_classes: C.

    Returns:
        The weights found, in graph order; [] when none is left.
    """
    graph = onnx.load(str(onnx_path)).graph
    consts = {t.name: t for t in graph.initializer}
    consts.update({n.output[0]: a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute
                   if a.name == "value"})
    producer = {out: n for n in graph.node for out in n.output}
    found: dict[str, LearnedWeight] = {}
    seen: set[str] = set()
    queue = deque(o.name for o in graph.output[:1])  # the logits
    while queue:
        tensor = queue.popleft()
        node = producer.get(tensor)
        if tensor in seen or node is None or node.name.startswith(HEAD_PREFIX):
            continue
        seen.add(tensor)
        if node.op_type in _MIXING:
            for name in node.input:
                source = _constant_source(name, producer, consts)
                if source is None or source in found:
                    continue
                values = numpy_helper.to_array(consts[source])
                if _is_class_matrix(values.shape, num_classes):
                    found[source] = LearnedWeight(source, tuple(values.shape), f"{node.op_type} {node.name}",
                                                  values.astype(np.float32))
        elif node.op_type in _CLASS_WISE:
            queue.extend(name for name in node.input if name and name not in consts)
    return list(found.values())


def check_no_learned_classifier(onnx_path: str | Path, swap: SwapResult, model: nn.Module) -> list[LearnedWeight]:
    """Fail unless every learned C×N class weight left in `onnx_path` is one the user chose to keep.

    Args:
        onnx_path: The converted model's ONNX file.
        swap: What `swap_classifier` did (its fixed heads, and `kept`: layers left learned by `--layer`).
        model: The converted model that was exported (the kept layers' weights are read from it).

    Returns:
        The learned class weights found in the file that belong to kept layers (the report notes them from
        `Classifiers.kept_note`).

    Raises:
        VerificationError: a learned class matrix is left that is neither a fixed head's nor a kept layer's.
    """
    fixed = [t for h in swap.heads for t in _matrices(h.head)]
    kept = {name: _matrices(model.get_submodule(name)) for name in swap.kept}
    kept_found: list[LearnedWeight] = []
    left: list[LearnedWeight] = []
    for weight in find_learned_class_weights(onnx_path, swap.num_classes):
        if any(_same(weight.values, t) for t in fixed):
            continue
        owner = next((name for name, ts in kept.items() if any(_same(weight.values, t) for t in ts)), None)
        (left if owner is None else kept_found).append(weight)
    if left:
        raise VerificationError(
            f"model.onnx still holds {len(left)} learned class weight(s) feeding the logits: "
            f"{few([w.describe() for w in left])}; the classifier was only partly converted, name every "
            f"classifier layer with --layer (e.g. --layer {','.join(swap.layers)},NAME)")
    return kept_found


def _constant_source(name: str, producer: dict[str, onnx.NodeProto], consts: dict[str, onnx.TensorProto]
                     ) -> str | None:
    """The stored constant behind `name` (through casts, transposes, dequantization), or None."""
    for _ in range(8):
        if name in consts:
            return name
        node = producer.get(name)
        if node is None or node.op_type not in _CONST_PATH or not node.input:
            return None
        name = node.input[0]
    return None


def _is_class_matrix(shape: Sequence[int], num_classes: int) -> bool:
    """A dimension equal to C and at least one other of 2 or more (C×N, N×C, C×N×1×1, ...)."""
    if len(shape) < 2 or num_classes not in shape:
        return False
    rest = list(shape)
    rest.remove(num_classes)
    return any(d >= 2 for d in rest)


def _matrices(module: nn.Module) -> list[np.ndarray]:
    """The module's parameters and buffers of two or more dimensions, as float32 arrays."""
    tensors: Iterable[Tensor] = [*module.parameters(), *module.buffers()]
    return [t.detach().float().cpu().numpy() for t in tensors if t.dim() >= 2]


def _same(values: np.ndarray, reference: np.ndarray) -> bool:
    """`values` holds `reference` or its transpose (a conv kernel's 1×1 axes squeezed), to fp16 rounding."""
    v, r = values.squeeze(), reference.squeeze()
    candidates = (r, r.T) if r.ndim == 2 else (r,)
    return any(c.shape == v.shape and np.allclose(v, c, rtol=1e-2, atol=1e-3) for c in candidates)

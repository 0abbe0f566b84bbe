"""The one ONNX node factory of the head layouts (`Ops`) and the one add/sub butterfly builder (`butterflies`).

Both ONNX head layouts (`onnx_head` portable, `onnx_head_switched` batch-switched) and the exporter's splice
(`onnx_export`) add their nodes through `Ops`; every butterfly stage of either layout is `butterflies` on the
parts of a Split.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from fyc_convert.options import DEFAULT_OPSET

__all__ = ["Ops", "butterflies"]


class Ops:
    """The one ONNX node factory of the project: prefixed nodes and constants added with `gs.Graph.layer`.

    Every node and constant name is `prefix` + a stem + a counter; tensor names are short (`prefix` + the
    counter), since each is stored at its producer and at every consumer. Forms that differ between
    opsets (Split's sizes) are chosen from `opset`.
    """

    def __init__(self, graph: gs.Graph, prefix: str, dtype: Any, *, opset: int | None = None):
        self.graph, self.prefix, self.dtype = graph, prefix, np.dtype(dtype)
        self.opset = int(opset if opset is not None else (graph.opset or DEFAULT_OPSET))
        self._count = 0
        self._ints: dict[tuple, gs.Constant] = {}

    def name(self, stem: str) -> str:
        self._count += 1
        return f"{self.prefix}{stem}_{self._count}"

    def const(self, stem: str, values: Any, dtype: Any = None) -> gs.Constant:
        values = np.asarray(values, dtype=dtype if dtype is not None else None)
        return gs.Constant(self.name(stem), np.ascontiguousarray(values))

    def ints(self, stem: str, values: list[int]) -> gs.Constant:
        """An int64 constant (shapes, axes, sizes), shared by every node that reads the same values."""
        key = (stem, *values)
        if key not in self._ints:
            self._ints[key] = self.const(stem, np.asarray(values, dtype=np.int64))
        return self._ints[key]

    def op(self, op: str, inputs: list, *, attrs: dict | None = None, outputs: int = 1, dtype: Any = None,
           name: str | None = None) -> list[gs.Variable]:
        node_name = self.name(op) if name is None else f"{self.prefix}{name}"
        dtype = self.dtype if dtype is None else dtype
        stem = f"{self.prefix}{self._count}" if name is None else node_name  # named nodes: unique by their name
        outs = [gs.Variable(f"{stem}.{i}", dtype=dtype) for i in range(outputs)]
        # a copy: `layer` returns the node's own output list, which callers must be free to edit
        return list(self.graph.layer(op=op, name=node_name, attrs=attrs or {}, inputs=inputs, outputs=outs))

    def op1(self, op: str, inputs: list, **kw: Any) -> gs.Variable:
        return self.op(op, inputs, **kw)[0]

    def reshape(self, x: gs.Variable, shape: list[int]) -> gs.Variable:
        return self.op1("Reshape", [x, self.ints("shape", shape)])

    def transpose(self, x: gs.Variable, perm: list[int] | None = None) -> gs.Variable:
        return self.op1("Transpose", [x], attrs={"perm": perm or [1, 0]})

    def slice(self, x: gs.Variable, start: int, end: int, axis: int = 0) -> gs.Variable:
        """x[start:end] along `axis`."""
        return self.op1("Slice", [x, self.ints("start", [start]), self.ints("end", [end]), self.ints("axes", [axis])])

    def split(self, x: gs.Variable, count: int, axis: int, sizes: list[int] | None = None) -> list[gs.Variable]:
        """Split along `axis` into `count` equal pieces, or pieces of the given constant `sizes`.

        Equal pieces: the `num_outputs` attribute from opset 18 on; below 18 no `split` input (which those
        opsets define as equal pieces), so the pieces may have a dynamic size (a multiple of the batch).
        Given sizes are the `split` input, the form every opset from 13 on reads.
        """
        if sizes is not None:
            return self.op("Split", [x, self.ints("split", sizes)], attrs={"axis": axis}, outputs=len(sizes))
        attrs = {"axis": axis, "num_outputs": count} if self.opset >= 18 else {"axis": axis}
        return self.op("Split", [x], attrs=attrs, outputs=count)

    def reduce_sum(self, x: gs.Variable, axes: list[int], *, keepdims: int) -> gs.Variable:
        return self.op1("ReduceSum", [x, self.ints("axes", axes)], attrs={"keepdims": keepdims})

    def concat(self, parts: list[gs.Variable], axis: int) -> gs.Variable:
        return parts[0] if len(parts) == 1 else self.op1("Concat", parts, attrs={"axis": axis})

    def branch(self, build: Any) -> gs.Graph:
        """A subgraph (an If branch) holding the nodes `build()` adds; it reads outer tensors by name.

        Node and tensor names keep counting from the outer graph, so every name in the model stays unique.
        """
        outer, outer_ints = self.graph, self._ints
        self.graph, self._ints = gs.Graph(opset=outer.opset), {}
        try:
            out = build()
            self.graph.outputs = [out]
            return self.graph
        finally:
            self.graph, self._ints = outer, outer_ints


def butterflies(ops: Ops, parts: list[gs.Variable]) -> list[gs.Variable]:
    """The unnormalised WHT across a list of 2^r parts: (a, b) -> (a + b, a - b) for each bit, in place.

    Part t of the result is Σ_u (-1)^popcount(t & u) · parts[u] (Sylvester order, `fwht_reference` over the
    list); r·2^r Add/Sub nodes, lowest bit first.
    """
    count = len(parts)
    assert count & (count - 1) == 0, "butterflies need a power-of-two number of parts"
    bit = 1
    while bit < count:
        for t in range(count):
            if not t & bit:
                a, b = parts[t], parts[t | bit]
                parts[t], parts[t | bit] = ops.op1("Add", [a, b]), ops.op1("Sub", [a, b])
        bit *= 2
    return parts

"""The Hadamard head as an ONNX subgraph of add/sub butterflies (no MatMul, Gemm or Conv).

Math (docs/design.md): ``logits = scale / (‖x‖ + eps) · (H_m · fold(embed(x)))[rows] + bias``. The
normalisation and α are one per-sample factor α / (‖x‖ + eps), applied to whichever of the N inputs and
the C outputs is smaller (the map is linear in x, so both orders give the same function).
The only multiplies are x·x for the norm, that one by the factor, and the embedding's one: the ±1 sign
flip of "tile", or, when x̃ is whole copies of x, the integer table that also does the top levels.

Layout decides onnxruntime speed (benchmarks/head_onnx.py measures it against the Gemm head):

- whole copies (N a power of two, n = m = T·N; the default sizing whenever C >= N and N does not fold):
  H_m = H_T ⊗ H_N, so the sign flip and the top log2(T) butterfly levels are one Mul of x by the table
  H_T·S (S the T×N signs; only the K tiles holding class rows are kept, K·N <= n entries), then K
  independent N-point transforms run side by side on an (N, B, K) layout (one Transpose from natural
  order). From 16 samples on (one If on the batch size) the K transforms run in chunks of about 2048
  points, so that each chunk's butterflies stay in the L2 cache; below that, fewer and larger nodes
  win. See `_tiled`;
- otherwise the norm and the fold (one ReduceSum over a (B, n/m, m) view) run on (B, ·) rows; everything
  after runs batch-minor, on (·, B), so that every Split/Concat/Gather moves runs of (multiples of) B
  floats and the Transposes of a batch are cheap;
- the "tile" embedding is log2(n/N) doubling Concats of x and one Mul by the ±1 signs (n elements); "pad"
  is one Pad;
- transforms of ≤ 64 points run radix-2 Split/Add/Sub/Concat stages (node count is all that matters
  there), those of ≤ 4096 points radix-4 stages, all in natural order (their Split/Concat runs of
  2^bit·B floats are long enough); larger ones view the index as (hi, lo) bit halves, run radix-4 stages
  (radix-8 from 8192 points) on the high bits, so that every Split/Concat moves runs of ≥ 2^|lo|·B floats
  rather than the 1–4 floats of the lowest bits, transpose once so that the low bits become the high
  ones, and run their stages the same way. From 16 samples on, unfolded transforms of ≥ 8192 points
  instead run their top levels across blocks of 2048 points and then each block while in cache (`_general`);
- contiguous class rows (the default) are one Transpose back to natural order and one Slice; other rows
  are one Gather (of rows of B floats) at their transposed positions; one Transpose gives (B, C).
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from fyc_convert.errors import ExportError

__all__ = ["HeadSpec", "build_head", "head_model", "head_op_census", "largest_head_constant"]

# Radix of the Split/Add/Sub/Concat stages, by transform size. Measured (onnxruntime, 1 thread, each head
# right after the Gemm): at batch 1 fewer nodes win (radix-2 up to 64 points, radix-4 beats radix-8 by ~12%
# at 1024 points and ~4% at 32768); at batch 64 fewer passes over the batch win from 2^13 points on
# (radix-8 beats radix-4 by ~10% at 32768 points; radix-16 another ~8%, but +20% at batch 1).
_SMALL_RADIX_BITS = 1
_SMALL_MAX_BITS = 6
_RADIX_BITS = 2
_LARGE_RADIX_BITS = 3
_LARGE_MIN_BITS = 13
# Transforms of up to 2^12 points run without the mid Transpose. Measured (1 thread, after the Gemm, batch
# 64 / 1): 1024 points 410 / 86 us without vs 433 / 90 us with it; 4096 points 2.0 / 0.093 ms vs 2.2 /
# 0.094 ms; at 8192 points and up the Transpose wins (5.2 vs 6.0 ms at batch 64).
_TRANSPOSE_MIN_BITS = 12


@dataclass(frozen=True)
class HeadSpec:
    """Everything the ONNX builder needs to know about a HadamardHead (plain numpy, no torch).

    Attributes:
        in_features: N, the feature length.
        num_classes: C.
        hadamard_size: m, the transform size (a power of two).
        embed_size: n, a multiple of m with n >= N.
        embedding: "tile" or "pad" (informational; `signs` carries the values).
        eps: Added to ‖x‖ before dividing.
        signs: (n - N,) float, ±1 ("tile") or 0 ("pad"), the embedding signs s_i for i >= N.
        rows: (C,) int64 in [0, m), the transform output given to each class.
        scale: α, the logit scale.
        bias: (C,) float or None.
    """

    in_features: int
    num_classes: int
    hadamard_size: int
    embed_size: int
    embedding: str
    eps: float
    signs: np.ndarray
    rows: np.ndarray
    scale: float
    bias: np.ndarray | None

    def __post_init__(self) -> None:
        n_feat, c, m, n = self.in_features, self.num_classes, self.hadamard_size, self.embed_size
        if m < 1 or m & (m - 1):
            raise ExportError(f"hadamard_size must be a power of two, got {m}; rebuild the head with a valid size")
        if n < n_feat or n % m:
            raise ExportError(
                f"embed_size {n} must be a multiple of hadamard_size {m} and >= in_features {n_feat}; "
                "rebuild the head with consistent sizes"
            )
        if self.signs.shape != (n - n_feat,):
            raise ExportError(
                f"signs must have shape ({n - n_feat},), got {self.signs.shape}; pass the n - N embedding signs"
            )
        if not np.all(np.isin(self.signs, (-1.0, 0.0, 1.0))):
            raise ExportError("signs must be -1, 0 or +1; use the head's `signs` buffer unchanged")
        if self.rows.shape != (c,) or (c and (self.rows.min() < 0 or self.rows.max() >= m)):
            raise ExportError(f"rows must be {c} indices in [0, {m}); use the head's `rows` buffer unchanged")
        if self.bias is not None and self.bias.shape != (c,):
            raise ExportError(f"bias must have shape ({c},), got {self.bias.shape}; use the head's `bias` unchanged")

    @classmethod
    def from_module(cls, head: Any) -> HeadSpec:
        """Read a `fyc_convert.heads.HadamardHead` (its attributes and buffers) into a spec.

        Args:
            head: A HadamardHead (anything with the same attributes and buffers).

        Returns:
            The spec, with float64 signs/bias copies and int64 rows on the CPU.
        """
        bias = getattr(head, "bias", None)
        return cls(
            in_features=int(head.in_features),
            num_classes=int(head.num_classes),
            hadamard_size=int(head.hadamard_size),
            embed_size=int(head.embed_size),
            embedding=str(head.embedding),
            eps=float(head.eps),
            signs=head.signs.detach().cpu().double().numpy().copy(),
            rows=head.rows.detach().cpu().numpy().astype(np.int64),
            scale=float(head.scale.detach().cpu()),
            bias=None if bias is None else bias.detach().cpu().double().numpy().copy(),
        )


class _Ops:
    """Adds prefixed nodes and constants to a graph; every name is `prefix` + a counter."""

    def __init__(self, graph: gs.Graph, prefix: str, dtype: np.dtype):
        self.graph, self.prefix, self.dtype = graph, prefix, np.dtype(dtype)
        self._count = 0
        self._ints: dict[tuple, gs.Constant] = {}

    def name(self, stem: str) -> str:
        self._count += 1
        return f"{self.prefix}{stem}_{self._count}"

    def const(self, stem: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self.name(stem), np.ascontiguousarray(values))

    def ints(self, stem: str, values: list[int]) -> gs.Constant:
        """An int64 constant (shapes, axes, slice bounds), shared by every node that reads the same values."""
        key = (stem, *values)
        if key not in self._ints:
            self._ints[key] = self.const(stem, np.asarray(values, dtype=np.int64))
        return self._ints[key]

    def op(self, op: str, inputs: list, *, attrs: dict | None = None, outputs: int = 1, dtype: Any = None) -> list:
        node_name = self.name(op)
        dtype = self.dtype if dtype is None else dtype
        # short tensor names: the head has hundreds of them and each is stored at its producer and consumers
        outs = [gs.Variable(f"{self.prefix}{self._count}.{i}", dtype=dtype) for i in range(outputs)]
        self.graph.nodes.append(gs.Node(op=op, name=node_name, attrs=attrs or {}, inputs=inputs, outputs=outs))
        return outs

    def op1(self, op: str, inputs: list, **kw: Any) -> gs.Variable:
        return self.op(op, inputs, **kw)[0]

    def reshape(self, x: gs.Variable, shape: list[int]) -> gs.Variable:
        return self.op1("Reshape", [x, self.ints("shape", shape)])

    def slice(self, x: gs.Variable, start: int, end: int, axis: int = 0) -> gs.Variable:
        """x[start:end] along `axis` (default: the rows of a (K, B) tensor)."""
        return self.op1("Slice", [x, self.ints("start", [start]), self.ints("end", [end]), self.ints("axes", [axis])])

    def branch(self, build: Callable[[], gs.Variable]) -> gs.Graph:
        """A subgraph (an If branch) holding the nodes `build` adds; it reads outer tensors by name.

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


def _embed_fold(ops: _Ops, x: gs.Variable, spec: HeadSpec) -> gs.Variable:
    """(B, N) -> (m, B): x̃ = embed(x) (tile/pad signs), then the fold y_k = Σ_t x̃_{k + t·m}, transposed.

    The fold of the default sizing (n = N) runs before the Transpose, on (B, n/m, m): onnxruntime reduces
    a middle axis fast but the leading axis of a (n/m, m·B) view ~10x slower.
    """
    n_feat, m, n = spec.in_features, spec.hadamard_size, spec.embed_size
    if n == n_feat:
        if n > m:
            x = ops.op1("ReduceSum", [ops.reshape(x, [-1, n // m, m]), ops.ints("axes", [1])], attrs={"keepdims": 0})
        return ops.op1("Transpose", [x], attrs={"perm": [1, 0]})  # (m, B)
    x = ops.op1("Transpose", [x], attrs={"perm": [1, 0]})  # (N, B)
    if not np.any(spec.signs):  # "pad": zeros after x
        x = ops.op1("Pad", [x, ops.ints("pads", [0, 0, n - n_feat, 0])])
    else:  # "tile": copies of x (data movement), then one sign flip by a ±1 constant of n elements
        # Doubling Concats: log2(n/N) copies of growing runs, not n/N small ones. They stack copies on a
        # new leading axis: onnxruntime would move the Transpose above past Concats of the (N, B) matrix
        # itself and transpose the n-row result instead.
        tiled, copies = ops.reshape(x, [1, n_feat, -1]), 1  # (copies, N, B)
        while 2 * copies * n_feat <= n:
            tiled, copies = ops.op1("Concat", [tiled, tiled], attrs={"axis": 0}), 2 * copies
        tiled, width = ops.reshape(tiled, [copies * n_feat, -1]), copies * n_feat
        if width < n:
            tiled = ops.op1("Concat", [tiled, ops.slice(tiled, 0, n - width)], attrs={"axis": 0})
        signs = np.concatenate([np.ones(n_feat), spec.signs]).astype(ops.dtype)[:, None]  # (n, 1)
        x = ops.op1("Mul", [tiled, ops.const("signs", signs)])  # (n, B)
    if n > m:
        x = ops.op1("ReduceSum", [ops.reshape(x, [n // m, m, -1]), ops.ints("axes", [0])], attrs={"keepdims": 0})
    return x  # (m, B)


def _butterfly_parts(ops: _Ops, view: gs.Variable, axis: int, r: int) -> list[gs.Variable]:
    """The r-point WHT along `axis` (of size r) of `view`, as its r slices: one Split, r·log2(r) Add/Sub."""
    parts = ops.op("Split", [view], attrs={"axis": axis, "num_outputs": r}, outputs=r)
    bit = 1
    while bit < r:
        for j in range(r):
            if not j & bit:
                a, b = parts[j], parts[j | bit]
                parts[j], parts[j | bit] = ops.op1("Add", [a, b]), ops.op1("Sub", [a, b])
        bit *= 2
    return parts


def _butterflies(ops: _Ops, view: gs.Variable, axis: int, r: int) -> gs.Variable:
    """The r-point WHT along `axis` (of size r) of `view`: one Split, r·log2(r) Add/Sub, one Concat."""
    return ops.op1("Concat", _butterfly_parts(ops, view, axis, r), attrs={"axis": axis})


def _stage(ops: _Ops, y: gs.Variable, m: int, lo: int, hi: int) -> gs.Variable:
    """Butterflies on position bits [lo, hi) of an (m, B) tensor: Split/Add/Sub/Concat on runs of 2^lo·B floats.

    Returns the result viewed as (m/2^hi, 2^(hi-lo), 2^lo·B); callers reshape as they need.
    """
    return _butterflies(ops, ops.reshape(y, [m >> hi, 1 << (hi - lo), -1]), 1, 1 << (hi - lo))


def _bit_groups(lo: int, hi: int, max_bits: int) -> list[tuple[int, int]]:
    """Split bits [lo, hi) into groups of at most `max_bits`, as even as possible."""
    count = -(-(hi - lo) // max_bits)
    edges = [lo + round(i * (hi - lo) / count) for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _wht(ops: _Ops, y: gs.Variable, m: int) -> tuple[gs.Variable, int, int]:
    """Unnormalised Sylvester WHT of an (m, B) tensor (one transform per column), left in a transposed layout.

    The natural output index k = hi · 2^p_lo + lo (p_lo low bits) is split in two halves; the high half's
    stages run first on runs of 2^p_lo·B floats, one Transpose makes the low half the high one, and its
    stages run on runs of 2^p_hi·B floats. Up to m = 2^_TRANSPOSE_MIN_BITS the Transpose costs more than
    it saves: p_lo = 0 and all stages run in natural order.

    Returns:
        (z, 2^p_lo, 2^p_hi): z holds output k = hi · 2^p_lo + lo at row lo · 2^p_hi + hi (natural order
        when p_lo = 0), in some (..., B) view.
    """
    p = m.bit_length() - 1
    p_lo = p // 2 if p > _TRANSPOSE_MIN_BITS else 0
    p_hi = p - p_lo
    if p <= _SMALL_MAX_BITS:
        max_bits = _SMALL_RADIX_BITS
    else:
        max_bits = _LARGE_RADIX_BITS if p >= _LARGE_MIN_BITS else _RADIX_BITS
    for lo, hi in _bit_groups(p_lo, p, max_bits):  # high bits: runs of >= 2^p_lo·B floats
        y = _stage(ops, y, m, lo, hi)
    if p_lo:
        y = ops.op1("Transpose", [ops.reshape(y, [1 << p_hi, 1 << p_lo, -1])], attrs={"perm": [1, 0, 2]})
        for lo, hi in _bit_groups(p_hi, p, max_bits):  # the old low bits, now high: runs of >= 2^p_hi·B floats
            y = _stage(ops, y, m, lo, hi)
    return y, 1 << p_lo, 1 << p_hi


def _pick_rows(ops: _Ops, z: gs.Variable, rows: np.ndarray, size_lo: int, size_hi: int) -> gs.Variable:
    """Transform output (see `_wht`) -> (C, B) = z_natural[rows].

    Contiguous rows (the default): back to natural order (one Transpose unless already natural) and one
    Slice. Others: one Gather of rows of B floats at their transposed positions.
    """
    m = size_lo * size_hi
    c = len(rows)
    if c and np.array_equal(rows, np.arange(rows[0], rows[0] + c)):
        if size_lo > 1:
            z = ops.op1("Transpose", [ops.reshape(z, [size_lo, size_hi, -1])], attrs={"perm": [1, 0, 2]})
        return ops.slice(ops.reshape(z, [m, -1]), int(rows[0]), int(rows[0]) + c)  # (m, B) -> (C, B)
    pos = (rows % size_lo) * size_hi + rows // size_lo  # where output k = rows[c] sits
    idx = ops.const("rows", pos.astype(np.int32))  # int32: half the bytes, Gather takes either
    return ops.op1("Gather", [ops.reshape(z, [m, -1]), idx], attrs={"axis": 0})  # (C, B)


# Whole-copy tiling (N a power of two, n = m = T·N: the default sizing whenever C >= N and N does not fold).
# Index i = t·N + j, so H_m = H_T ⊗ H_N and the top log2(T) butterfly levels act on whole copies of x:
# (H_T ⊗ I)(s ⊙ tile(x)) = (H_T S) ⊙ tile(x) with S the (T, N) table of embedding signs. Those levels and
# the sign flip are therefore one Mul by the integer table H_T S (only the K tiles that hold class rows;
# K·N <= n entries, values in [-T, T]) — the multiply the sign flip took anyway — and the rest is K
# independent N-point transforms. Measured (1 thread, right after the Gemm), against the 32768-point
# transform of 16/64 signed copies: N=2048, C=18000 batch 1 401 -> ~280 us, batch 64 28.7 -> 16.4 ms
# (N=512, C=32000 gained at batch 1 only: 294 -> ~205 us).
# From _BLOCK_MIN_BATCH samples on, the transforms run in chunks of about _BLOCK_POINTS points (one If on
# the batch size picks the branch): each chunk's whole butterfly chain then stays in the 2 MB L2 (batch
# 64: N=2048, C=18000 16.4 -> 5.8 ms; N=512, C=32000 18 -> 7.7 ms). Below it the chunked branch loses
# (batch 8: 2.4 against 1.2 ms at N=512, C=32000; the two cross near 16 samples at both sizes) and one
# transform of all K tiles runs instead. The If costs 10-40 us at batch 1 right after a large Gemm.
_BLOCK_MIN_BATCH = 16
_BLOCK_POINTS = 1 << 11
_BLOCK_MIN_POINTS = 1 << 13


def _whole_tiles(spec: HeadSpec) -> bool:
    """Whether x̃ is T >= 2 whole copies of x laid out on the transform's high index bits."""
    n_feat, m, n = spec.in_features, spec.hadamard_size, spec.embed_size
    return n == m and n_feat < m and n_feat & (n_feat - 1) == 0


def _np_wht(a: np.ndarray) -> np.ndarray:
    """Sylvester WHT along axis 0 (length a power of two), float64, for the constant tables."""
    t = a.shape[0]
    a = a.astype(np.float64).reshape(t, -1)
    h = 1
    while h < t:
        v = a.reshape(t // (2 * h), 2, h, -1)
        a = np.concatenate([v[:, :1] + v[:, 1:], v[:, :1] - v[:, 1:]], axis=1).reshape(t, -1)
        h *= 2
    return a


def _tile_table(spec: HeadSpec) -> tuple[np.ndarray, np.ndarray]:
    """(tiles, table): the sorted tiles kt that hold class rows, and (H_T S)[tiles] as an (N, K) array."""
    n_feat, m = spec.in_features, spec.hadamard_size
    signs = np.concatenate([np.ones(n_feat), spec.signs]).reshape(m // n_feat, n_feat)  # S, (T, N)
    tiles = np.unique(spec.rows // n_feat)
    return tiles, _np_wht(signs)[tiles].T


def _tile_stages(ops: _Ops, y: gs.Variable, n_feat: int, max_bits: int) -> gs.Variable:
    """N-point transforms along axis 0 of an (N, ...) tensor (runs of 2^lo·(the rest) floats per stage).

    One Reshape gives each group of index bits its own axis, highest bits outermost, so that the stages
    need no Reshape in between. Returns that multi-axis view (same memory order as the input).
    """
    p = n_feat.bit_length() - 1
    groups = _bit_groups(0, p, max_bits) if p else []
    if groups:
        y = ops.reshape(y, [*(1 << (hi - lo) for lo, hi in reversed(groups)), -1])
    for i, (lo, hi) in enumerate(groups):  # lowest bits (innermost of the index axes) first
        y = _butterflies(ops, y, len(groups) - 1 - i, 1 << (hi - lo))
    return y


def _tile_pick(ops: _Ops, y: gs.Variable, n_feat: int, k: int, start: int, end: int) -> gs.Variable:
    """(N, B, k) transforms -> (B, end - start): the chunk's natural outputs [start, end).

    Output kt·N + kj sits at (kj, ·, kt): one Transpose, (N, B·k) -> (B·k, N) = (B, k, N), gives natural order.
    """
    z = ops.op1("Transpose", [ops.reshape(y, [n_feat, -1])], attrs={"perm": [1, 0]})
    z = ops.reshape(z, [-1, k * n_feat])
    return z if (start, end) == (0, k * n_feat) else ops.slice(z, start, end, axis=1)


def _chunked(
    ops: _Ops,
    spec: HeadSpec,
    bias: gs.Variable | None,
    size: int,
    tiles: np.ndarray,
    start: Callable[[int, int], gs.Variable],
    chunk: int,
) -> gs.Variable:
    """Logits (B, C), plus `bias`, from transforms of `size` points run chunk by chunk, each while in cache.

    Natural output r = kt·size + kj comes from tile kt = r // size; `tiles` are the sorted tiles holding class
    rows and ``start(t0, t1)`` gives tiles[t0:t1] ready for their `size`-point transforms along axis 0, as
    (size, B·k) for contiguous rows or (size, k·B) for others.
    """
    c, rows = spec.num_classes, spec.rows
    contiguous = c > 0 and np.array_equal(rows, np.arange(rows[0], rows[0] + c))
    tile_pos = np.searchsorted(tiles, rows // size)
    first = int(rows[0] - tiles[0] * size) if c else 0
    pieces: list[gs.Variable] = []
    order: list[int] = []
    for t0 in range(0, len(tiles), chunk):
        t1 = min(len(tiles), t0 + chunk)
        y = _tile_stages(ops, start(t0, t1), size, _LARGE_RADIX_BITS)
        if contiguous:  # the chunk's natural outputs that are class rows, bias added while in cache
            lo = max(first, t0 * size) - t0 * size
            hi = min(first + c, t1 * size) - t0 * size
            if hi > lo:
                cls = t0 * size + lo - first
                z = _tile_pick(ops, y, size, t1 - t0, lo, hi)
                pieces.append(z if bias is None else ops.op1("Add", [z, ops.slice(bias, cls, cls + hi - lo)]))
        else:  # rows of B floats at the chunk's positions of its classes
            mine = np.flatnonzero((tile_pos >= t0) & (tile_pos < t1))
            if len(mine):
                pos = (rows[mine] % size) * (t1 - t0) + tile_pos[mine] - t0
                flat = ops.reshape(y, [size * (t1 - t0), -1])
                pieces.append(ops.op1("Gather", [flat, ops.const("rows", pos.astype(np.int32))], attrs={"axis": 0}))
                order.extend(mine)
    if contiguous:
        return ops.op1("Concat", pieces, attrs={"axis": 1}) if len(pieces) > 1 else pieces[0]
    z = ops.op1("Concat", pieces, attrs={"axis": 0}) if len(pieces) > 1 else pieces[0]  # (C, B), chunk order
    if not np.array_equal(order, np.arange(c)):
        back = np.empty(c, np.int32)
        back[np.asarray(order)] = np.arange(c, dtype=np.int32)
        z = ops.op1("Gather", [z, ops.const("order", back)], attrs={"axis": 0})  # (C, B), class order
    z = ops.op1("Transpose", [z], attrs={"perm": [1, 0]})
    return z if bias is None else ops.op1("Add", [z, bias])


def _batch_switch(ops: _Ops, x: gs.Variable, large: Callable[[], gs.Variable],
                  small: Callable[[], gs.Variable]) -> gs.Variable:
    """One If on the batch size: `large` from _BLOCK_MIN_BATCH samples on, else `small` (each an If branch)."""
    batch = ops.op1("Shape", [x], attrs={"start": 0, "end": 1}, dtype=np.int64)
    cond = ops.op1("Greater", [batch, ops.ints("min_batch", [_BLOCK_MIN_BATCH - 1])], dtype=np.bool_)
    return ops.op1("If", [cond], attrs={"then_branch": ops.branch(large), "else_branch": ops.branch(small)})


def _shared(ops: _Ops, value: gs.Variable | None) -> gs.Variable | None:
    """`value` as an outer tensor for If branches: a constant both branches read would be written into each."""
    return None if value is None else ops.op1("Identity", [value])


def _tiled(ops: _Ops, x: gs.Variable, spec: HeadSpec, bias: gs.Variable | None) -> gs.Variable:
    """The whole-copy head, (B, N) -> (B, C) (plus `bias` when given); see the note above `_BLOCK_MIN_BATCH`."""
    n_feat, c, rows = spec.in_features, spec.num_classes, spec.rows
    tiles, table_np = _tile_table(spec)
    k_all = len(tiles)
    ones = k_all == 1 and np.all(table_np == 1)
    contiguous = c > 0 and np.array_equal(rows, np.arange(rows[0], rows[0] + c))
    chunk = max(1, _BLOCK_POINTS // n_feat)
    switch = k_all * n_feat >= _BLOCK_MIN_POINTS and k_all > chunk
    # (1, K, N) for contiguous rows, (K, 1, N) for others
    table = None if ones else ops.const("table", (table_np.T[None] if contiguous else table_np.T[:, None]).astype(ops.dtype))
    if switch:
        table, bias = _shared(ops, table), _shared(ops, bias)

    def start(t0: int, t1: int) -> gs.Variable:
        """x times the table's tiles [t0, t1) in an (N, B, k) layout (contiguous rows) or (N, k, B) (other rows).

        The Mul broadcasts whole rows of N floats, (B, 1, N) x (1, k, N) or (1, B, N) x (k, 1, N), and one 2-D
        Transpose makes the index j outermost: broadcasting x as (N, ·, 1) instead ran per 1–9 floats (at
        batch 1, N=2048, C=18000: 18 of 112 us). (N, B, k) leaves natural order one Transpose away; (N, k, B)
        puts each output in a run of B floats for the Gather of other rows.
        """
        if table is None:
            return ops.op1("Transpose", [x], attrs={"perm": [1, 0]})  # (N, B)
        part = table if (t0, t1) == (0, k_all) else ops.slice(table, t0, t1, axis=1 if contiguous else 0)
        view = ops.reshape(x, [-1, 1, n_feat] if contiguous else [1, -1, n_feat])
        prod = ops.op1("Mul", [view, part])  # (B, k, N) or (k, B, N)
        return ops.op1("Transpose", [ops.reshape(prod, [-1, n_feat])], attrs={"perm": [1, 0]})

    def whole() -> gs.Variable:  # all K tiles at once: fewest nodes
        y = _tile_stages(ops, start(0, k_all), n_feat, _RADIX_BITS)
        if contiguous:
            first = int(rows[0] - tiles[0] * n_feat)
            z = _tile_pick(ops, y, n_feat, k_all, first, first + c)
        else:
            pos = (rows % n_feat) * k_all + np.searchsorted(tiles, rows // n_feat)  # row r at (r mod N, its tile)
            flat = ops.reshape(y, [n_feat * k_all, -1])
            z = ops.op1("Gather", [flat, ops.const("rows", pos.astype(np.int32))], attrs={"axis": 0})  # (C, B)
            z = ops.op1("Transpose", [z], attrs={"perm": [1, 0]})
        return z if bias is None else ops.op1("Add", [z, bias])

    if not switch:
        return whole()
    return _batch_switch(ops, x, lambda: _chunked(ops, spec, bias, n_feat, tiles, start, chunk), whole)


def _general(ops: _Ops, x: gs.Variable, spec: HeadSpec, bias: gs.Variable | None) -> gs.Variable:
    """Any other head, (B, N) -> (B, C) (plus `bias` when given): embed and fold, then one m-point transform.

    For an unfolded m >= _BLOCK_MIN_POINTS (N not a power of two, many classes) the transform is also run
    in cache-sized pieces from _BLOCK_MIN_BATCH samples on: H_m = H_{m/P} ⊗ H_P with P = _BLOCK_POINTS, so
    the top log2(m/P) levels run first across the m/P blocks of P·B floats (one Split, no Concat) and each
    block that holds class rows then gets its P-point transform while in cache (N=1664, C=18000, batch 64:
    28.6 -> 13.0 ms; batch 1 pays the If, 373 -> 420 us).
    """
    m, n = spec.hadamard_size, spec.embed_size
    y = _embed_fold(ops, x, spec)  # (m, B), shared by both branches of the If below

    def plain() -> gs.Variable:  # the transform runs batch-minor, on (m, B)
        z, size_lo, size_hi = _wht(ops, y, m)
        z = ops.op1("Transpose", [_pick_rows(ops, z, spec.rows, size_lo, size_hi)], attrs={"perm": [1, 0]})
        return z if bias is None else ops.op1("Add", [z, bias])

    size = _BLOCK_POINTS
    if n != m or m < _BLOCK_MIN_POINTS or m <= size:
        return plain()
    bias = _shared(ops, bias)
    tiles = np.unique(spec.rows // size)

    def blocked() -> gs.Variable:
        blocks = _butterfly_parts(ops, ops.reshape(y, [m // size, -1]), 0, m // size)  # cleanup drops unused ones

        def start(t0: int, t1: int) -> gs.Variable:  # chunks of one block
            return ops.reshape(blocks[int(tiles[t0])], [size, -1])

        return _chunked(ops, spec, bias, size, tiles, start, 1)

    return _batch_switch(ops, x, blocked, plain)


def build_head(
    graph: gs.Graph,
    features: gs.Variable,
    spec: HeadSpec,
    *,
    prefix: str = "fyc_head/",
    dtype: np.dtype | type = np.float32,
) -> gs.Variable:
    """Add the Hadamard head to `graph`: features -> logits with add/sub butterflies only.

    Args:
        graph: Graph to add nodes to (nodes are appended; call ``graph.cleanup().toposort()`` after).
        features: (B, N) or (B, T, N) tensor in the graph.
        spec: The head (see `HeadSpec.from_module`).
        prefix: Name prefix of every node and constant added.
        dtype: Float dtype of `features` and the logits.

    Returns:
        The logits variable, (B, C) or (B, T, C).
    """
    ops = _Ops(graph, prefix, dtype)
    n_feat, c = spec.in_features, spec.num_classes
    rank = len(features.shape) if features.shape is not None else 2
    x = features if rank == 2 else ops.reshape(features, [-1, n_feat])  # (B, N)

    # α / (‖x‖ + eps), per sample: (B, 1)
    sq = ops.op1("ReduceSum", [ops.op1("Mul", [x, x]), ops.ints("axes", [1])], attrs={"keepdims": 1})
    den = ops.op1("Add", [ops.op1("Sqrt", [sq]), ops.const("eps", np.asarray(spec.eps, dtype))])
    factor = ops.op1("Div", [ops.const("scale", np.asarray(spec.scale, dtype)), den])

    # The factor multiplies the smaller end: the (B, N) input when C > N (at N=512, C=32000, batch 64 the
    # (B, C) multiply was an 8 MB pass, ~1.5 ms of ~32), else the (B, C) output.
    scale_input = c > n_feat
    if scale_input:
        x = ops.op1("Mul", [x, factor])

    bias = None if spec.bias is None else ops.const("bias", spec.bias.astype(dtype))
    # with the factor on the input the bias goes in as early as the layout allows (per chunk, in cache)
    head = _tiled if _whole_tiles(spec) else _general
    logits = head(ops, x, spec, bias if scale_input else None)
    if not scale_input:
        logits = ops.op1("Mul", [logits, factor])  # (B, C)
        logits = logits if bias is None else ops.op1("Add", [logits, bias])
    if rank != 2:
        lead = ops.op1("Shape", [features], attrs={"start": 0, "end": -1}, dtype=np.int64)
        shape = ops.op1("Concat", [lead, ops.ints("classes", [c])], attrs={"axis": 0}, dtype=np.int64)
        logits = ops.op1("Reshape", [logits, shape])
    return logits


def head_model(
    spec: HeadSpec,
    *,
    opset: int = 18,
    ir_version: int = 10,
    dtype: np.dtype | type = np.float32,
    prefix: str = "fyc_head/",
    time_axis: bool = False,
) -> onnx.ModelProto:
    """A standalone model ``features -> logits`` holding only the head (dynamic axis ``batch_size``).

    Args:
        spec: The head.
        opset: ONNX opset (18 runs well on onnxruntime 1.31).
        ir_version: IR version to write (onnxruntime 1.31 accepts <= 13).
        dtype: Float dtype of input and output.
        prefix: Node name prefix.
        time_axis: Take (batch_size, T, N) features instead of (batch_size, N).

    Returns:
        The checked model.
    """
    shape = ["batch_size", "T", spec.in_features] if time_axis else ["batch_size", spec.in_features]
    features = gs.Variable("features", dtype=dtype, shape=shape)
    graph = gs.Graph(inputs=[features], opset=opset)
    logits = build_head(graph, features, spec, prefix=prefix, dtype=dtype)
    logits.name, logits.shape = "logits", [*shape[:-1], spec.num_classes]
    graph.outputs = [logits]
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    del model.graph.value_info[:]  # dtype-only entries for every head tensor: bytes onnxruntime infers anyway
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The graph's nodes and, recursively, those of its subgraphs (If branches, Loop bodies)."""
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                nodes.extend(_all_nodes(sub))
    return nodes


def _all_initializers(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    inits = list(graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                inits.extend(_all_initializers(sub))
    return inits


def _head_nodes(model: onnx.ModelProto, prefix: str) -> list[onnx.NodeProto]:
    """Nodes named under `prefix`, those inside the head's subgraphs included."""
    return [node for node in _all_nodes(model.graph) if node.name.startswith(prefix)]


def head_op_census(model: onnx.ModelProto, prefix: str = "fyc_head/") -> dict[str, int]:
    """Count the op types of the nodes whose names start with `prefix`.

    Args:
        model: The model.
        prefix: The head's name scope.

    Returns:
        {op_type: count}, sorted by op type.
    """
    census: dict[str, int] = {}
    for node in _head_nodes(model, prefix):
        census[node.op_type] = census.get(node.op_type, 0) + 1
    return dict(sorted(census.items()))


def largest_head_constant(model: onnx.ModelProto, prefix: str = "fyc_head/") -> int:
    """Element count of the largest constant the head uses (initializers and Constant nodes it reads).

    Args:
        model: The model.
        prefix: The head's name scope.

    Returns:
        The largest element count (0 when the head reads no constant).
    """
    sizes = {init.name: int(np.prod(init.dims)) for init in _all_initializers(model.graph)}
    for node in _all_nodes(model.graph):
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    sizes[node.output[0]] = int(np.prod(attr.t.dims))
    used = {name for node in _head_nodes(model, prefix) for name in node.input}
    return max((size for name, size in sizes.items() if name in used), default=0)

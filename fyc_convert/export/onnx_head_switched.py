"""The batch-switched ONNX head layout: one If on the batch size picks a cache-blocked branch.

An onnxruntime-server choice (`build_head(..., layout="batch-switched")`), not portable: the If, Shape and
multi-axis views are what edge converters refuse. Below _BLOCK_MIN_BATCH samples the whole transform runs
at once (fewer, larger nodes); from there on the transforms run in chunks of about _BLOCK_POINTS points so
that each chunk's butterfly chain stays in the L2 cache. Measured against the portable layout by
benchmarks/head_onnx.py (numbers in docs/benchmarks.md).

- whole copies (N a power of two, n = m = T·N): H_m = H_T ⊗ H_N, so the sign flip and the top log2(T)
  butterfly levels are one Mul of x by the table H_T·S (only the K tiles holding class rows), then K
  independent N-point transforms side by side on an (N, B, K) layout; see `_tiled`;
- otherwise the norm and the fold run on (B, ·) rows and everything after runs batch-minor, on (·, B);
  transforms of <= 64 points run radix-2 stages, larger ones radix-4 (radix-8 from 8192 points), and from
  2^12 points on the index is split in bit halves with one Transpose between them (`_wht`);
- contiguous class rows are one Transpose back to natural order and one Slice; other rows one Gather.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from fyc_convert.errors import ExportError
from fyc_convert.export.head_spec import HeadSpec
from fyc_convert.export.ops import Ops, butterflies
from fyc_convert.head.hadamard import fwht_reference

# Radix of the Split/Add/Sub/Concat stages by transform size, and the size from which the index is split
# in two halves with a Transpose between them (measured: see the README's batch-switched rows).
_SMALL_RADIX_BITS = 1
_SMALL_MAX_BITS = 6
_RADIX_BITS = 2
_LARGE_RADIX_BITS = 3
_LARGE_MIN_BITS = 13
_TRANSPOSE_MIN_BITS = 12


def switched_logits(ops: Ops, x: gs.Variable, spec: HeadSpec, bias: gs.Variable | None) -> gs.Variable:
    """(B, N) -> (B, C) raw outputs z[rows] (plus `bias` when given) in the batch-switched layout."""
    if _whole_tiles(spec) or _unpadded_table(spec):
        return _tiled(ops, x, spec, bias)
    if spec.table is not None:
        raise ExportError("the batch-switched head layout has no block-table path for this head; "
                          "export with head_layout='portable'")
    return _general(ops, x, spec, bias)


def _embed_fold(ops: Ops, x: gs.Variable, spec: HeadSpec) -> gs.Variable:
    """(B, N) -> (m, B): x̃ = embed(x) (tile/pad signs), then the fold y_k = Σ_t x̃_{k + t·m}, transposed.

    The fold of the default sizing (n = N) runs before the Transpose, on (B, n/m, m): onnxruntime reduces
    a middle axis fast but the leading axis of a (n/m, m·B) view much slower (measured: benchmarks/head_onnx.py).
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


def _transform_axis(ops: Ops, view: gs.Variable, axis: int, r: int) -> gs.Variable:
    """The r-point WHT along `axis` (of size r) of `view`: one Split, r·log2(r) Add/Sub, one Concat."""
    return ops.op1("Concat", butterflies(ops, ops.split(view, r, axis)), attrs={"axis": axis})


def _stage(ops: Ops, y: gs.Variable, m: int, lo: int, hi: int) -> gs.Variable:
    """Butterflies on position bits [lo, hi) of an (m, B) tensor: Split/Add/Sub/Concat on runs of 2^lo·B floats.

    Returns the result viewed as (m/2^hi, 2^(hi-lo), 2^lo·B); callers reshape as they need.
    """
    return _transform_axis(ops, ops.reshape(y, [m >> hi, 1 << (hi - lo), -1]), 1, 1 << (hi - lo))


def _bit_groups(lo: int, hi: int, max_bits: int) -> list[tuple[int, int]]:
    """Split bits [lo, hi) into groups of at most `max_bits`, as even as possible."""
    count = -(-(hi - lo) // max_bits)
    edges = [lo + round(i * (hi - lo) / count) for i in range(count + 1)]
    return list(itertools.pairwise(edges))


def _wht(ops: Ops, y: gs.Variable, m: int) -> tuple[gs.Variable, int, int]:
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


def _pick_rows(ops: Ops, z: gs.Variable, rows: np.ndarray, size_lo: int, size_hi: int) -> gs.Variable:
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


# Whole-copy tiling: index i = t·N + j, so H_m = H_T ⊗ H_N and the top log2(T) levels act on whole copies
# of x: (H_T ⊗ I)(s ⊙ tile(x)) = (H_T S) ⊙ tile(x), one Mul by the integer table H_T S (K·N <= n entries).
# From _BLOCK_MIN_BATCH samples on (the If) the transforms run in chunks of _BLOCK_POINTS points, each
# chunk's butterflies in cache; below that one transform of all K tiles (fewer nodes) is faster.
_BLOCK_MIN_BATCH = 16
_BLOCK_POINTS = 1 << 11
_BLOCK_MIN_POINTS = 1 << 13


def _whole_tiles(spec: HeadSpec) -> bool:
    """Whether x̃ is T >= 2 whole copies of x laid out on the transform's high index bits."""
    n_feat, m, n = spec.in_features, spec.hadamard_size, spec.embed_size
    return n == m and n_feat < m and n_feat & (n_feat - 1) == 0


def _unpadded_table(spec: HeadSpec) -> bool:
    """Whether the head has a (K, P) block table with P = N (a frame head of N a power of two)."""
    return spec.table is not None and spec.table.shape[1] == spec.in_features


def _tile_table(spec: HeadSpec) -> tuple[np.ndarray, np.ndarray]:
    """(tiles, table): the sorted tiles kt that hold class rows, and their sign rows as an (N, K) array:
    (H_T S)[tiles] for whole copies, the block table's rows for a frame head."""
    n_feat, m = spec.in_features, spec.hadamard_size
    tiles = np.unique(spec.rows // n_feat)
    if _unpadded_table(spec):
        return tiles, spec.table[tiles].T
    signs = np.concatenate([np.ones(n_feat), spec.signs]).reshape(m // n_feat, n_feat)  # S, (T, N)
    return tiles, fwht_reference(signs, axis=0)[tiles].T


def _tile_stages(ops: Ops, y: gs.Variable, n_feat: int, max_bits: int) -> gs.Variable:
    """N-point transforms along axis 0 of an (N, ...) tensor (runs of 2^lo·(the rest) floats per stage).

    One Reshape gives each group of index bits its own axis, highest bits outermost, so that the stages
    need no Reshape in between. Returns that multi-axis view (same memory order as the input).
    """
    p = n_feat.bit_length() - 1
    groups = _bit_groups(0, p, max_bits) if p else []
    if groups:
        y = ops.reshape(y, [*(1 << (hi - lo) for lo, hi in reversed(groups)), -1])
    for i, (lo, hi) in enumerate(groups):  # lowest bits (innermost of the index axes) first
        y = _transform_axis(ops, y, len(groups) - 1 - i, 1 << (hi - lo))
    return y


def _tile_pick(ops: Ops, y: gs.Variable, n_feat: int, k: int, start: int, end: int) -> gs.Variable:
    """(N, B, k) transforms -> (B, end - start): the chunk's natural outputs [start, end).

    Output kt·N + kj sits at (kj, ·, kt): one Transpose, (N, B·k) -> (B·k, N) = (B, k, N), gives natural order.
    """
    z = ops.op1("Transpose", [ops.reshape(y, [n_feat, -1])], attrs={"perm": [1, 0]})
    z = ops.reshape(z, [-1, k * n_feat])
    return z if (start, end) == (0, k * n_feat) else ops.slice(z, start, end, axis=1)


def _chunked(
    ops: Ops,
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


def _batch_switch(ops: Ops, x: gs.Variable, large: Callable[[], gs.Variable],
                  small: Callable[[], gs.Variable]) -> gs.Variable:
    """One If on the batch size: `large` from _BLOCK_MIN_BATCH samples on, else `small` (each an If branch)."""
    batch = ops.op1("Shape", [x], attrs={"start": 0, "end": 1}, dtype=np.int64)
    cond = ops.op1("Greater", [batch, ops.ints("min_batch", [_BLOCK_MIN_BATCH - 1])], dtype=np.bool_)
    return ops.op1("If", [cond], attrs={"then_branch": ops.branch(large), "else_branch": ops.branch(small)})


def _shared(ops: Ops, value: gs.Variable | None) -> gs.Variable | None:
    """`value` as an outer tensor for If branches: a constant both branches read would be written into each."""
    return None if value is None else ops.op1("Identity", [value])


def _tiled(ops: Ops, x: gs.Variable, spec: HeadSpec, bias: gs.Variable | None) -> gs.Variable:
    """The whole-copy head, (B, N) -> (B, C) (plus `bias` when given); see the note above `_BLOCK_MIN_BATCH`."""
    n_feat, c, rows = spec.in_features, spec.num_classes, spec.rows
    tiles, table_np = _tile_table(spec)
    k_all = len(tiles)
    ones = k_all == 1 and np.all(table_np == 1)
    contiguous = c > 0 and np.array_equal(rows, np.arange(rows[0], rows[0] + c))
    chunk = max(1, _BLOCK_POINTS // n_feat)
    switch = k_all * n_feat >= _BLOCK_MIN_POINTS and k_all > chunk
    # (1, K, N) for contiguous rows, (K, 1, N) for others
    laid = table_np.T[None] if contiguous else table_np.T[:, None]
    table = None if ones else ops.const("table", laid.astype(ops.dtype))
    if switch:
        table, bias = _shared(ops, table), _shared(ops, bias)

    def start(t0: int, t1: int) -> gs.Variable:
        """x times the table's tiles [t0, t1) in an (N, B, k) layout (contiguous rows) or (N, k, B) (other rows).

        The Mul broadcasts whole rows of N floats, (B, 1, N) x (1, k, N) or (1, B, N) x (k, 1, N), and one 2-D
        Transpose makes the index j outermost: broadcasting x as (N, ·, 1) instead ran per 1–9 floats.
        (N, B, k) leaves natural order one Transpose away; (N, k, B)
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


def _general(ops: Ops, x: gs.Variable, spec: HeadSpec, bias: gs.Variable | None) -> gs.Variable:
    """Any other head, (B, N) -> (B, C) (plus `bias` when given): embed and fold, then one m-point transform.

    For an unfolded m >= _BLOCK_MIN_POINTS (N not a power of two, many classes) the transform is also run
    in cache-sized pieces from _BLOCK_MIN_BATCH samples on: H_m = H_{m/P} ⊗ H_P with P = _BLOCK_POINTS, so
    the top log2(m/P) levels run first across the m/P blocks of P·B floats (one Split, no Concat) and each
    block that holds class rows then gets its P-point transform while in cache (batch 1 pays the If).
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
        blocks = butterflies(ops, ops.split(ops.reshape(y, [m // size, -1]), m // size, 0))  # cleanup drops unused ones

        def start(t0: int, t1: int) -> gs.Variable:  # chunks of one block
            return ops.reshape(blocks[int(tiles[t0])], [size, -1])

        return _chunked(ops, spec, bias, size, tiles, start, 1)

    return _batch_switch(ops, x, blocked, plain)



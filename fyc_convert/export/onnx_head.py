"""The Hadamard head as an ONNX subgraph (by default add/sub butterflies: no MatMul, Gemm or Conv), and its checks.

Math (docs/design.md): ``logits = scale / (‖x‖ + eps) · (H_m · fold(embed(x)))[rows] + bias``, or with a
block table (K, P): ``logits = scale / (‖x‖ + eps) · (concat_k H_P(table[k] ⊙ pad(x)))[rows] + bias``.
The normalisation and α are one per-sample factor α / (‖x‖ + eps), applied to whichever of the N inputs and
the C outputs is smaller (the map is linear in x, so both orders give the same function).

Three layouts (`build_head(..., layout=...)`):

- "portable" (the default): only ops, and forms of ops, that the edge converters handle (onnx2tf/LiteRT,
  pnnx/ncnn, onnx2torch, OpenVINO, the simplifiers and onnxruntime's quantizer): Transpose, Concat,
  static Reshape (at most one -1, the batch), Split/Slice with constant sizes, Add/Sub, Mul by constants
  broadcast over the batch only, ReduceSum, Sqrt/Div for the norm, Gather of the class rows. No Shape
  arithmetic, no If, nothing that depends on the batch size, every tensor rank 2. The transform runs on
  (R, W) = (rows, columns), batch-minor, in constant geometry, in one of two orders:
  - class rows picked by a Gather (the CLI's heads: rows assigned from the trained layer): leading bits
    first (`_lead_wht`), each stage Splits the rows into 2^r contiguous blocks, runs r levels of Add/Sub
    across them and Concats the results along the columns, no Reshape between stages; the outputs end in
    the order `_lead_position` gives, which the Gather absorbs. With a ±1 block table the first level is
    done once on x and a Gather of rows places it for all K blocks (`_shared_level_embed`).
  - contiguous class rows (a fresh head's): lowest bits first (`_natural_wht`), each stage views (R, W)
    as (R/2^r, 2^r·W) and Splits the columns, so the outputs end in natural order and the rows are one Slice.
  Two levels share one stage above 64 points; the node count is bounded by `portable_node_bound`.
- "batch-switched": onnxruntime-server layout with an If on the batch size (see `onnx_head_switched`).
- "kron": the transform as MatMuls by small ±1 Hadamard blocks, batch last, for runtimes with strong GEMM
  kernels and NPUs; never the default (see `onnx_head_kron`).
- "ncnn": the portable layout with the class rows picked by a nearest-neighbour GridSample on a (1, B, 1, K·P)
  view instead of a Gather: ncnn has no gather layer (pnnx keeps one index of a Gather), but runs GridSample.
  Exact (every sample point lies on a grid point); slower than the Gather in onnxruntime, so never the default.

Speeds of the layouts are measured by benchmarks/head_onnx.py (numbers in docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from fyc_convert.errors import ExportError
from fyc_convert.export.head_embed import embed_fold, kept_table, major_embed, pad_rows, table_embed
from fyc_convert.export.head_spec import HeadSpec
from fyc_convert.export.onnx_head_kron import KRON_CONSTANT_LIMIT, KRON_MAX_BLOCK, kron_logits
from fyc_convert.export.onnx_head_switched import switched_logits
from fyc_convert.export.ops import Ops, butterflies
from fyc_convert.options import DEFAULT_OPSET, GRID_MIN_OPSET, HEAD_LAYOUTS, MIN_OPSET

__all__ = [
    "DENSE_OPS",
    "HEAD_PREFIX",
    "HeadLayout",
    "HeadSpec",
    "LAYOUT_KEY",
    "adapter_prefix",
    "adapter_subgraph",
    "build_head",
    "check_head_static",
    "head_model",
    "head_op_census",
    "largest_head_constant",
    "portable_node_bound",
]

HEAD_PREFIX = "fyc_head/"
ADAPTER_PREFIX = "fyc_adapter/"  # a head's learned map before it (`--adapter`): a dense layer, kept out of its scope
LAYOUT_KEY = "fyc_convert.head_layout"  # metadata: the layout the head was built in (the export writes it too)
HeadLayout = Literal["portable", "batch-switched", "kron", "ncnn"]
# MIN_OPSET: ReduceSum takes its axes as an input from 13 on, Split its sizes 13..17 (num_outputs from 18);
# DEFAULT_OPSET 17: onnx2torch, ncnn/pnnx and older runtimes take <= 17. Declared with the options (no torch).
DENSE_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "MatMulInteger", "QLinearMatMul", "ConvInteger",
             "QLinearConv", "Einsum")


# ------------------------------------------------------------------------------------- portable layout
# Butterfly levels per Split/Concat stage of the portable layout: two (10 nodes per 2 levels, a quarter fewer
# passes over the data than one level at a time) except for transforms of up to 2^_SMALL_MAX_BITS points,
# where only the node count matters (4 per level). Measured by benchmarks/head_onnx.py (docs/benchmarks.md).
_RADIX_BITS = 2
_SMALL_MAX_BITS = 6


def _natural_wht(ops: Ops, y: gs.Variable, rows: int, levels: int, batch: int) -> gs.Variable:
    """`levels` butterfly levels on the lowest index bits of an (R, W) tensor, leaving outputs in natural order.

    Each stage of r levels views (R, W) as (R/2^r, 2^r·W), so that the 2^r rows differing in their lowest r
    bits sit side by side, splits the columns into those 2^r parts, runs the r levels of butterflies and
    concatenates the results along the columns: the stage's output bits become the new highest column bits,
    so after all stages (R/2^L, 2^L·W) holds the transform in natural order (row t, column k·W + w).
    """
    done, width = 0, batch
    radix = 1 if levels <= _SMALL_MAX_BITS else _RADIX_BITS
    while done < levels:
        r = min(radix, levels - done)
        rows >>= r
        view = ops.reshape(y, [rows, -1 if width < 0 else (width << r)])
        # parts[t]: the rows whose lowest r bits are t; constant sizes when the batch is static
        parts = ops.split(view, 1 << r, axis=1, sizes=None if width < 0 else [width] * (1 << r))
        y = ops.concat(butterflies(ops, parts), axis=1)
        width = width << r if width > 0 else width
        done += r
    return y


def _lead_radices(levels: int, radix: int) -> list[int]:
    """The levels done by each stage of `_lead_wht`: `radix` each, the rest in the last."""
    return [radix] * (levels // radix) + ([levels % radix] if levels % radix else [])


def _lead_position(o: np.ndarray, bits: int, radices: list[int]) -> np.ndarray:
    """Where the lead stages leave transform output o of a block of 2^bits points (row q of the final view).

    Stage s takes the next r_s leading input bits and writes the matching output bits (its part index t)
    as the new highest column bits, above everything written before: q = Σ_s digit_s(o) << done_s, the
    digits of o in reverse stage order (radix 1 everywhere: the bit reversal of o).
    """
    q, done = np.zeros_like(o), 0
    for r in radices:
        q |= ((o >> (bits - done - r)) & ((1 << r) - 1)) << done
        done += r
    return q


def _lead_wht(ops: Ops, y: gs.Variable, rows: int, radices: list[int]) -> gs.Variable:
    """Butterfly stages on the leading index bits of an (R, W) tensor, no Reshape between them.

    Each stage of r levels Splits the rows into 2^r contiguous blocks (constant sizes: what pnnx needs), runs
    the r levels of butterflies across them and Concats the results along the columns, (R, W) ->
    (R/2^r, 2^r·W): contiguous copies in, and the stage's output bits become the highest column bits, so
    the outputs end in the order `_lead_position` gives, which the Gather of the class rows absorbs.
    """
    for r in radices:
        parts = ops.split(y, 1 << r, axis=0, sizes=[rows >> r] * (1 << r))
        y = ops.concat(butterflies(ops, parts), axis=1)
        rows >>= r
    return y


def _interleaved_table_embed(ops: Ops, xt: gs.Variable, n_feat: int, table: np.ndarray,
                             batch: int) -> gs.Variable:
    """(N, B) -> (P·K, B): row j·K + k holds table[k, j] · x_j (x zero-padded to P), for `_lead_wht`.

    Row j outermost puts the K transforms on the leading index bits. K copies of x concatenated along the
    columns, (P, K·B) read as (P·K, B), place x_j in rows j·K .. j·K + K - 1.
    """
    k, p = table.shape
    xt = pad_rows(ops, xt, n_feat, p)
    mult = table.T.copy()  # (P, K)
    mult[n_feat:] = 0.0
    if k > 1:
        xt = ops.reshape(ops.concat([ops.reshape(xt, [p, batch])] * k, axis=1), [p * k, batch])
    if k == 1 and p == n_feat and np.all(mult == 1.0):
        return xt
    return ops.op1("Mul", [xt, ops.const("table", mult.reshape(p * k, 1).astype(ops.dtype))])


def _shared_level_embed(ops: Ops, xt: gs.Variable, n_feat: int, table: np.ndarray, batch: int) -> gs.Variable:
    """(N, B) -> the state after the first lead level of all K blocks, (P/2·K, 2B): one level shared by the blocks.

    Block k's first level pairs x_j with x_{j+P/2} (j < P/2) under the signs s = table[k, j], u = table[k, j+P/2]:
    (s·x_j + u·x_{j+P/2}, s·x_j - u·x_{j+P/2}) is s·[A_j, S_j] when u = s and s·[S_j, A_j] when u = -s, with
    A = top + bottom and S = top - bottom computed once on (P/2, B); s·[top_j, top_j] where x_{j+P/2} is padding.
    One Gather of rows of 2B floats from [AS; SA; top top; their negations] places them: row j·K + k of the
    result is block k's pair j, the `_lead_wht` state with the blocks on the lowest row bits. This replaces K
    copies of x, a Mul by the table and the first level on all K blocks by one level on a single block.
    """
    k, p = table.shape
    half = p // 2
    top, bottom = ops.split(pad_rows(ops, xt, n_feat, p), 2, axis=0, sizes=[half, half])
    a, s = ops.op1("Add", [top, bottom]), ops.op1("Sub", [top, bottom])
    parts = [ops.concat([a, s], axis=1), ops.concat([s, a], axis=1)]  # (P/2, 2B) each
    if p > n_feat:
        parts.append(ops.concat([top, top], axis=1))
    src = ops.concat(parts, axis=0)
    minus = ops.op1("Mul", [src, ops.const("minus", np.asarray(-1.0, ops.dtype))])  # Mul, not Neg: the portable ops
    src = ops.concat([src, minus], axis=0)  # rows len(parts)·P/2 + r: the negations

    j, blk = np.meshgrid(np.arange(half), np.arange(k), indexing="ij")
    sign, other = table[blk, j], table[blk, j + half]
    base = np.where(j + half >= n_feat, p + j, np.where(sign * other > 0, j, half + j))
    index = (base + np.where(sign < 0, len(parts) * half, 0)).reshape(-1)
    return ops.op1("Gather", [src, ops.const("embed", index.astype(np.int32))], attrs={"axis": 0})


def _sharable(table: np.ndarray, n_feat: int) -> bool:
    """Whether `_shared_level_embed` applies: ±1 entries on the features, padding (if any) in the bottom half only."""
    p = table.shape[1]
    return p >= 4 and 2 * n_feat > p and bool(np.all(np.abs(table[:, :n_feat]) == 1.0))


def _major_wht(ops: Ops, y: gs.Variable, rows: int, levels: int, batch: int) -> gs.Variable:
    """`levels` butterfly levels on the lowest index bits of a batch-major (B·R, 1) view, natural order.

    The state is (B·R, Q): row b·R + r holds the remaining input bits r, column q the outputs done so far.
    Each stage of r levels views it as (B·R/2^r, 2^r·Q), Splits the columns into 2^r pieces of Q (constant
    sizes), runs the butterflies and Concats the results along the columns, so the stage's output bits
    become the highest column bits: the outputs end in natural order, (B, R·Q) with no Transpose at all.
    """
    done, width = 0, 1
    radix = 1 if levels <= _SMALL_MAX_BITS else _RADIX_BITS
    while done < levels:
        r = min(radix, levels - done)
        rows >>= r
        view = ops.reshape(y, [batch * rows if batch > 0 else -1, width << r])
        parts = ops.split(view, 1 << r, axis=1, sizes=[width] * (1 << r))
        y = ops.concat(butterflies(ops, parts), axis=1)
        width <<= r
        done += r
    return y


# A static batch of up to _MAJOR_MAX_BATCH rows runs batch-major (`_major_wht`: no Transpose, and the
# fewest copies per node at batch 1); larger and dynamic batches run batch-minor, where every Split/Concat
# moves runs of at least B floats. Measured by benchmarks/head_onnx.py (docs/benchmarks.md).
_MAJOR_MAX_BATCH = 4


def _grid_pick(ops: Ops, y: gs.Variable, pos: np.ndarray, width: int, batch: int) -> gs.Variable:
    """(B, W) -> (B, C) = y[:, pos] by a nearest GridSample on the (1, B, 1, W) view: the row pick of the ncnn layout.

    The grid holds x = 2·pos / (W - 1) - 1 with align_corners=1, so each sample point maps back to the integer
    pos (float32 error far below 1/2 for any W < 2^22); y = 0 on the one-row image. Exact: nearest picks one value.
    """
    c = len(pos)
    gx = 2.0 * pos.astype(np.float64) / max(width - 1, 1) - 1.0
    grid = np.stack([gx, np.zeros(c)], axis=-1).reshape(1, 1, c, 2).astype(ops.dtype)
    view = ops.op1("Reshape", [y, ops.ints("shape", [1, batch if batch > 0 else -1, 1, width])])
    z = ops.op1("GridSample", [view, ops.const("grid", grid)],
                attrs={"mode": "nearest", "align_corners": 1, "padding_mode": "border"})  # (1, B, 1, C)
    return ops.reshape(z, [batch if batch > 0 else -1, c])


def _portable(ops: Ops, x: gs.Variable, spec: HeadSpec, batch: int, *, grid: bool = False) -> gs.Variable:
    """(B, N) -> (B, C) raw outputs z[rows] (without scale and bias): the portable layout (`grid`: the ncnn one).

    x̃ᵀ as (K·P, B) (a table) or (m, B), batch-minor. Contiguous class rows above 2^_SMALL_MAX_BITS points: the
    natural-order transform and one Slice. Otherwise the leading-bits transform (`_lead_wht`; radix 1 up to
    2^_SMALL_MAX_BITS points, where the node count is what costs) and one Gather of rows of B floats. A small
    static batch runs batch-major (`_major_wht`), and so does the ncnn layout (`grid`) at every size, its rows
    picked by `_grid_pick`.
    """
    table, rows = kept_table(spec) if spec.table is not None else (None, spec.rows)
    k, p = table.shape if table is not None else (1, spec.hadamard_size)
    bits = p.bit_length() - 1
    # batch-major for ncnn at every size: pnnx takes axis 0 for the batch
    if grid or (0 < batch <= _MAJOR_MAX_BATCH and bits > _SMALL_MAX_BITS):
        y = major_embed(ops, x, spec, table)  # (B, K·P)
        y = ops.reshape(_major_wht(ops, y, p * k, bits, batch), [batch, k * p])  # (B, K·P), natural order
        c = len(rows)
        if c and np.array_equal(rows, np.arange(rows[0], rows[0] + c)):
            return ops.slice(y, int(rows[0]), int(rows[0]) + c, axis=1)  # (B, C)
        if grid:
            return _grid_pick(ops, y, rows, k * p, batch)
        return ops.op1("Gather", [y, ops.const("rows", rows.astype(np.int32))], attrs={"axis": 1})  # (B, C)
    xt = ops.transpose(x)  # (N, B)
    c = len(rows)
    if bits > _SMALL_MAX_BITS and c and np.array_equal(rows, np.arange(rows[0], rows[0] + c)):
        # natural order: contiguous class rows (a fresh head's) are one Slice, no Gather
        y = table_embed(ops, xt, spec.in_features, table, batch) if table is not None else \
            embed_fold(ops, xt, spec, batch)  # (K·P, B), row k·P + j; or (m, B)
        y = ops.reshape(_natural_wht(ops, y, p * k, bits, batch), [k * p, batch])  # (K·P, B), natural order
        return ops.transpose(ops.slice(y, int(rows[0]), int(rows[0]) + c))  # (C, B) -> (B, C)
    # leading bits first, outputs in `_lead_position` order, picked by the Gather (rows of B floats)
    radix = 1 if bits <= _SMALL_MAX_BITS else _RADIX_BITS  # small: 4 nodes per level, the node count is what costs
    if table is not None and bits > _SMALL_MAX_BITS and _sharable(table, spec.in_features):
        y = _shared_level_embed(ops, xt, spec.in_features, table, batch)  # level 1 done: (P/2·K, 2B)
        radices = [1, *_lead_radices(bits - 1, radix)]
        y = _lead_wht(ops, y, p // 2 * k, radices[1:])
    else:
        y = _interleaved_table_embed(ops, xt, spec.in_features, table, batch) if table is not None else \
            embed_fold(ops, xt, spec, batch)  # (P·K, B), row j·K + k; or (m, B)
        radices = _lead_radices(bits, radix)
        y = _lead_wht(ops, y, p * k, radices)
    pos = (rows // p) * p + _lead_position(rows % p, bits, radices)
    y = ops.reshape(y, [k * p, batch])  # block k, row _lead_position(j)
    z = ops.op1("Gather", [y, ops.const("rows", pos.astype(np.int32))], attrs={"axis": 0})  # (C, B)
    return ops.transpose(z)  # (B, C)


def portable_node_bound(spec: HeadSpec, layout: HeadLayout = "portable") -> int:
    """Upper bound on the portable head's node count: at most 5.5 per butterfly level plus 22 (ncnn: 24).

    L = log2(P) levels for a table of P-point blocks, log2(m) otherwise: 4 nodes per level (Split, Add,
    Sub, Concat) up to 6 levels, else 11 per pair of levels (Reshape, Split, 8 Add/Sub, Concat; +5 for an
    odd one out; the leading-bits order needs no Reshape, 10 per pair). The constant covers the norm and
    factor (6 nodes), the embedding (at most Concat, Slice, Reshape, Concat, Mul; the shared first level:
    Split, Add, Sub, 2-3 Concats of pairs, Concat, Mul, Concat, Gather, in place of a level's 4 or 5),
    the fold (Reshape, ReduceSum, Reshape), the pick (Transpose in, Reshape, Gather or Slice, Transpose out;
    the ncnn layout's GridSample reads and writes through two more Reshapes), the bias and a time axis's two
    Reshapes.
    """
    p = spec.table.shape[1] if spec.table is not None else spec.hadamard_size
    levels = p.bit_length() - 1
    per_levels = 4 * levels if levels <= _SMALL_MAX_BITS else 11 * (levels // 2) + 5 * (levels % 2)
    return per_levels + (24 if layout == "ncnn" else 22)


# ----------------------------------------------------------------------------------------- the builder
def build_head(
    graph: gs.Graph,
    features: gs.Variable,
    spec: HeadSpec,
    *,
    prefix: str = HEAD_PREFIX,
    dtype: Any = np.float32,
    layout: HeadLayout = "portable",
    static_batch: int | None = None,
    feature_shape: tuple[int, ...] | None = None,
) -> gs.Variable:
    """Add the Hadamard head to `graph`: features -> logits with add/sub butterflies only.

    Args:
        graph: Graph to add nodes to (nodes are appended; call ``graph.cleanup().toposort()`` after). Its
            `opset` picks the opset-specific forms (Split sizes).
        features: (B, N) or (B, *lead, N) tensor in the graph.
        spec: The head (see `HeadSpec.from_module`).
        prefix: Name prefix of every node and constant added.
        dtype: Float dtype of `features` and the logits.
        layout: "portable" (no If, no Shape, static reshapes; the default), "batch-switched" (an If on the
            batch size picks a cache-blocked branch for large batches; onnxruntime only), "kron" (MatMuls
            by ±1 blocks of at most 32 x 32; GEMM runtimes and NPUs) or "ncnn" (portable, the class rows
            picked by GridSample: ncnn has no gather; opset 16 or newer).
        static_batch: The fixed batch size of the graph, written into every reshape; None: dynamic.
        feature_shape: The feature tensor's shape without the batch, e.g. (T, N); needed for rank > 2
            features to reshape statically (default: read from `features.shape`).

    Returns:
        The logits variable, (B, C) or (B, *lead, C).

    Raises:
        ExportError: an unknown layout, or a spec that layout cannot build.
    """
    ops = Ops(graph, prefix, dtype)
    _check_request(layout, static_batch, ops.opset)
    n_feat, c = spec.input_features, spec.num_classes  # the features taken (the adapter's inputs, if any)
    lead = _lead_shape(features, feature_shape, n_feat)
    rows_per_sample = int(np.prod(lead)) if lead and _is_static(lead) else 1
    batch = -1 if static_batch is None or not _is_static(lead) else static_batch * rows_per_sample
    x = features
    leading = None
    if lead and _is_static(lead):
        x = ops.reshape(features, [batch, n_feat])  # (B·T, N)
    elif lead:  # a dynamic inner axis: only Shape can say how to restore it
        leading = ops.op1("Shape", [features], attrs={"start": 0, "end": -1}, dtype=np.int64)
        x = ops.reshape(features, [-1, n_feat])

    if spec.adapter is not None:  # a learned dense map, named outside the head's scope (not add/sub, not fixed)
        x = adapter_subgraph(Ops(graph, adapter_prefix(prefix), dtype), x, spec.adapter)

    # α / (‖x‖ + eps), per sample: (B, 1)
    sq = ops.reduce_sum(ops.op1("Mul", [x, x]), [1], keepdims=1)
    den = ops.op1("Add", [ops.op1("Sqrt", [sq]), ops.const("eps", np.asarray(spec.eps, ops.dtype))])
    factor = ops.op1("Div", [ops.const("scale", np.asarray(spec.scale, ops.dtype)), den])

    # The factor multiplies the smaller end: the (B, N) input when C > N, else the (B, C) output.
    scale_input = c > n_feat
    if scale_input:
        x = ops.op1("Mul", [x, factor])
    bias = None if spec.bias is None else ops.const("bias", spec.bias.astype(ops.dtype))
    if layout in ("portable", "kron", "ncnn"):
        logits = (kron_logits(ops, x, spec, batch) if layout == "kron"
                  else _portable(ops, x, spec, batch, grid=layout == "ncnn"))
        if not scale_input:
            logits = ops.op1("Mul", [logits, factor])
        if bias is not None:
            logits = ops.op1("Add", [logits, bias])
    else:
        logits = switched_logits(ops, x, spec, bias if scale_input else None)
        if not scale_input:
            logits = ops.op1("Mul", [logits, factor])  # (B, C)
            logits = logits if bias is None else ops.op1("Add", [logits, bias])
    if leading is not None:
        shape = ops.op1("Concat", [leading, ops.ints("classes", [c])], attrs={"axis": 0}, dtype=np.int64)
        logits = ops.op1("Reshape", [logits, shape])
    elif lead:
        logits = ops.reshape(logits, [-1 if static_batch is None else static_batch, *lead, c])
    return logits


def adapter_prefix(prefix: str) -> str:
    """The name scope of a head's adapter: beside the head's, not in it ("fyc_head/1/" -> "fyc_adapter/1/")."""
    if prefix.startswith(HEAD_PREFIX):
        return ADAPTER_PREFIX + prefix[len(HEAD_PREFIX):]
    return prefix.rstrip("/") + "_adapter/"


def adapter_subgraph(ops: Ops, x: gs.Variable, adapter: tuple[np.ndarray, np.ndarray]) -> gs.Variable:
    """(R, n) -> (R, N) = x · weightᵀ + bias: a MatMul and an Add."""
    weight, bias = adapter
    y = ops.op1("MatMul", [x, ops.const("weight", np.ascontiguousarray(weight.T).astype(ops.dtype))])
    return ops.op1("Add", [y, ops.const("bias", bias.astype(ops.dtype))])


def _check_request(layout: str, static_batch: int | None, opset: int) -> None:
    if layout not in HEAD_LAYOUTS:
        raise ExportError(f"head layout {layout!r} is unknown; pass one of {', '.join(HEAD_LAYOUTS)}")
    if static_batch is not None and static_batch < 1:
        raise ExportError(f"static batch must be >= 1, got {static_batch}; pass a positive batch size or None")
    if layout == "ncnn" and opset < GRID_MIN_OPSET:
        raise ExportError(f"the ncnn head layout picks rows with GridSample, which needs opset {GRID_MIN_OPSET} or "
                          f"newer; pass --opset {GRID_MIN_OPSET} or higher (got {opset})")


def _is_static(lead: tuple) -> bool:
    return all(isinstance(d, (int, np.integer)) and d > 0 for d in lead)


def _lead_shape(features: gs.Variable, feature_shape: tuple[int, ...] | None, n_feat: int) -> tuple:
    """The axes between the batch and the N features: () for (B, N) features, (T,) for (B, T, N)."""
    shape = feature_shape if feature_shape is not None else (
        tuple(features.shape[1:]) if features.shape is not None else (n_feat,))
    if not shape or shape[-1] != n_feat and isinstance(shape[-1], (int, np.integer)):
        raise ExportError(f"the head's features have shape {shape}, expected N = {n_feat} last; "
                          "export a model whose classifier reads its features on the last axis")
    return tuple(shape[:-1])


def head_model(
    spec: HeadSpec,
    *,
    opset: int = DEFAULT_OPSET,
    ir_version: int | None = None,
    dtype: Any = np.float32,
    prefix: str = HEAD_PREFIX,
    time_axis: bool = False,
    time_steps: int | None = None,
    layout: HeadLayout = "portable",
    static_batch: int | None = None,
) -> onnx.ModelProto:
    """A standalone model ``features -> logits`` holding only the head.

    Args:
        spec: The head.
        opset: ONNX opset (13 or newer).
        ir_version: IR version to write; default: the lowest for the opset (onnxruntime refuses onnx's
            newest default).
        dtype: Float dtype of input and output.
        prefix: Node name prefix.
        time_axis: Take (batch, T, N) features instead of (batch, N).
        time_steps: T as a fixed size (then every reshape is static); None: a dynamic "T" axis.
        layout: "portable", "batch-switched", "kron" or "ncnn" (see `build_head`); written into the model's
            metadata as ``fyc_convert.head_layout``, which `check_head_static` reads.
        static_batch: A fixed batch size; None: the dynamic axis ``batch_size``.

    Returns:
        The checked model.
    """
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old for the head subgraph; pass an opset of {MIN_OPSET} or newer")
    b: int | str = "batch_size" if static_batch is None else static_batch
    shape: list = [b, time_steps or "T", spec.input_features] if time_axis else [b, spec.input_features]
    features = gs.Variable("features", dtype=dtype, shape=shape)
    graph = gs.Graph(inputs=[features], opset=opset)
    logits = build_head(graph, features, spec, prefix=prefix, dtype=dtype, layout=layout, static_batch=static_batch)
    logits.name, logits.shape = "logits", [*shape[:-1], spec.num_classes]
    graph.outputs = [logits]
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    del model.graph.value_info[:]  # dtype-only entries for every head tensor: bytes onnxruntime infers anyway
    del model.opset_import[:]
    model.opset_import.append(onnx.helper.make_opsetid("", opset))
    model.ir_version = ir_version if ir_version is not None else onnx.helper.find_min_ir_version_for(
        model.opset_import)
    onnx.helper.set_model_props(model, {LAYOUT_KEY: layout})
    onnx.checker.check_model(model)
    return model


# ------------------------------------------------------------------------------------ census and checks
def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    subs: list[onnx.GraphProto] = []
    for attr in node.attribute:
        subs.extend([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs)
    return subs


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The graph's nodes and, recursively, those of its subgraphs (If branches, Loop bodies)."""
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for sub in _subgraphs(node):
            nodes.extend(_all_nodes(sub))
    return nodes


def _all_initializers(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    inits = list(graph.initializer)
    for node in graph.node:
        for sub in _subgraphs(node):
            inits.extend(_all_initializers(sub))
    return inits


def _head_nodes(model: onnx.ModelProto, prefix: str) -> list[onnx.NodeProto]:
    """Nodes named under `prefix`, those inside the head's subgraphs included."""
    return [node for node in _all_nodes(model.graph) if node.name.startswith(prefix)]


def head_op_census(model: onnx.ModelProto, prefix: str = HEAD_PREFIX) -> dict[str, int]:
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


def largest_head_constant(model: onnx.ModelProto, prefix: str = HEAD_PREFIX) -> int:
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


def _layout_of(model: onnx.ModelProto) -> str:
    return next((p.value for p in model.metadata_props if p.key == LAYOUT_KEY), "portable")


def _check_kron_blocks(model: onnx.ModelProto, prefix: str) -> None:
    """Every MatMul of a kron head reads one ±1 square block of at most KRON_MAX_BLOCK (on either side)."""
    inits = {init.name: init for init in _all_initializers(model.graph)}
    for node in _head_nodes(model, prefix):
        if node.op_type != "MatMul":
            continue
        block = next((inits[name] for name in node.input if name in inits), None)
        values = None if block is None else onnx.numpy_helper.to_array(block)
        if values is None or values.ndim != 2 or values.shape[0] != values.shape[1] or (
                values.shape[0] > KRON_MAX_BLOCK or not np.all(np.abs(values) == 1)):
            raise ExportError(
                f"the kron head's MatMul {node.name} does not read a ±1 block of at most {KRON_MAX_BLOCK} x "
                f"{KRON_MAX_BLOCK}; re-export with --head-layout kron and without a simplifier"
            )


def check_head_static(
    model_or_path: onnx.ModelProto | str | Any,
    *,
    num_classes: int,
    embed_size: int,
    prefix: str = HEAD_PREFIX,
    layout: str | None = None,
) -> dict[str, int]:
    """Check that the head subgraph is slim: add/sub and data movement, no dense matrix.

    The "kron" layout may multiply by ±1 Hadamard blocks: MatMul is its one dense op, each reads a square
    ±1 block of at most 32 x 32, and its constants may reach max(C, n, 1024) elements. The "ncnn" layout's
    GridSample grid holds two coordinates per class: its constants may reach max(2·C, n).

    Args:
        model_or_path: the exported model, or its path.
        num_classes: C.
        embed_size: n, the embedded length (the head's `embed_size`).
        prefix: the head's name scope.
        layout: the head's layout; None: the model's ``fyc_convert.head_layout`` metadata ("portable"
            when absent).

    Returns:
        Op census of the head subgraph, {op_type: count}.

    Raises:
        ExportError: no node is under `prefix`, a MatMul/Gemm/Conv is in the head (a kron head: any dense
            op but MatMul by a ±1 block), or a head constant has more than max(num_classes, embed_size)
            elements (kron: max(num_classes, embed_size, 1024); ncnn: max(2·num_classes, embed_size)).
    """
    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else onnx.load(str(model_or_path))
    layout = _layout_of(model) if layout is None else layout
    census = head_op_census(model, prefix)
    if not census:
        raise ExportError(f"no {prefix} nodes in the exported graph; export with head_layer set to the swapped head")
    allowed = ("MatMul",) if layout == "kron" else ()
    dense = sorted(op for op in census if op in DENSE_OPS and op not in allowed)
    if dense:
        raise ExportError(
            f"the head subgraph contains {', '.join(dense)}; it must be add/sub only, re-export without a simplifier"
        )
    if layout == "kron":
        _check_kron_blocks(model, prefix)
    limit = max(num_classes * (2 if layout == "ncnn" else 1), embed_size,
                KRON_CONSTANT_LIMIT if layout == "kron" else 0)
    limit_name = {"kron": f"max(C, n, {KRON_CONSTANT_LIMIT})", "ncnn": "max(2·C, n)"}.get(layout, "max(C, n)")
    largest = largest_head_constant(model, prefix)
    if largest > limit:
        raise ExportError(
            f"the head reads a constant of {largest} elements (limit {limit_name} = {limit}); "
            "a pass re-inflated the head, re-export without constant folding"
        )
    return census

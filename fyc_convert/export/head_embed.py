"""The embed stage of the batch-last head layouts: features (N, B) -> the transform's input, rows = points.

Shared by the portable (`onnx_head`) and Kronecker (`onnx_head_kron`) layouts: the block table's copies of
x times its ±1 entries (one Mul by a (K·P, 1) column), or the tile/pad embedding and the fold; batch-last
on (N, B) (`table_embed`, `embed_fold`) or batch-major on (B, N) (`major_embed`).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from fyc_convert.export.head_spec import HeadSpec
from fyc_convert.export.ops import Ops

__all__ = ["embed_fold", "kept_table", "major_embed", "pad_cols", "pad_rows", "table_embed"]


def kept_table(spec: HeadSpec) -> tuple[np.ndarray, np.ndarray]:
    """(table, rows): only the blocks of the table that hold class rows, rows renumbered into them."""
    assert spec.table is not None
    p = spec.table.shape[1]
    blocks = np.unique(spec.rows // p)
    rows = np.searchsorted(blocks, spec.rows // p) * p + spec.rows % p
    return spec.table[blocks], rows


def embed_fold(ops: Ops, xt: gs.Variable, spec: HeadSpec, batch: int) -> gs.Variable:
    """(N, B) -> (m, B): x̃_i = s_i · x_{i mod N} for i < n, then the fold y_k = Σ_t x̃_{k + t·m}."""
    n_feat, m, n = spec.in_features, spec.hadamard_size, spec.embed_size
    y = xt
    if n > n_feat:
        reps = -(-n // n_feat)
        # a no-op Reshape first: onnxruntime would otherwise move the Transpose that made `xt` below the
        # Concat and transpose the n-row result instead of the N-row input
        y = ops.concat([ops.reshape(xt, [n_feat, batch])] * reps, axis=0)
        y = ops.slice(y, 0, n) if reps * n_feat > n else y
        signs = np.concatenate([np.ones(n_feat), spec.signs]).astype(ops.dtype)[:, None]  # (n, 1)
        y = ops.op1("Mul", [y, ops.const("signs", signs)])
    if n > m:
        y = ops.reduce_sum(ops.reshape(y, [n // m, m * batch if batch > 0 else -1]), [0], keepdims=1)  # (1, m·B)
        y = ops.reshape(y, [m, batch])
    return y


def pad_rows(ops: Ops, xt: gs.Variable, n_feat: int, p: int) -> gs.Variable:
    """(N, B) -> (P, B) by repeating x (rows j >= N: any values; the table's zeros there clear them)."""
    if p <= n_feat:
        return xt
    reps = -(-p // n_feat)
    xt = ops.concat([xt] * reps, axis=0)
    return ops.slice(xt, 0, p) if reps * n_feat > p else xt


def table_embed(ops: Ops, xt: gs.Variable, n_feat: int, table: np.ndarray, batch: int) -> gs.Variable:
    """(N, B) -> (K·P, B): row k·P + j holds table[k, j] · x_j (x zero-padded to P), natural order.

    K copies of x stacked along the rows (K contiguous copies) and one Mul by the (K·P, 1) table column,
    broadcast over the batch only.
    """
    k, p = table.shape
    xt = pad_rows(ops, xt, n_feat, p)
    mult = table.copy()
    mult[:, n_feat:] = 0.0
    if k > 1:
        # a no-op Reshape first: onnxruntime would otherwise move the Transpose that made `xt` below the
        # Concat and transpose the K-times larger result
        xt = ops.concat([ops.reshape(xt, [p, batch])] * k, axis=0)
    if k == 1 and p == n_feat and np.all(mult == 1.0):
        return xt
    return ops.op1("Mul", [xt, ops.const("table", mult.reshape(k * p, 1).astype(ops.dtype))])


def major_embed(ops: Ops, x: gs.Variable, spec: HeadSpec, table: np.ndarray | None) -> gs.Variable:
    """(B, N) -> (B, K·P) = concat_k table[k] ⊙ pad(x) (a table), or (B, m) = fold(embed(x)), batch-major."""
    n_feat = spec.in_features
    if table is not None:
        k, p = table.shape
        y = pad_cols(ops, x, n_feat, p)
        y = ops.concat([y] * k, axis=1)  # (B, K·P), column k·P + j
        mult = table.copy()
        mult[:, n_feat:] = 0.0
        if k == 1 and p == n_feat and np.all(mult == 1.0):
            return y
        return ops.op1("Mul", [y, ops.const("table", mult.reshape(1, k * p).astype(ops.dtype))])
    m, n = spec.hadamard_size, spec.embed_size
    y = x
    if n > n_feat:
        y = pad_cols(ops, x, n_feat, n)
        signs = np.concatenate([np.ones(n_feat), spec.signs]).astype(ops.dtype)[None, :]  # (1, n)
        y = ops.op1("Mul", [y, ops.const("signs", signs)])
    width = n
    while width > m:  # the fold, by halves: y_k = Σ_t x̃_{k + t·m}
        left, right = ops.split(y, 2, axis=1, sizes=[width // 2, width // 2])
        y, width = ops.op1("Add", [left, right]), width // 2
    return y


def pad_cols(ops: Ops, x: gs.Variable, n_feat: int, width: int) -> gs.Variable:
    """(B, N) -> (B, width) by repeating x along the columns (cut to width)."""
    if width <= n_feat:
        return x
    reps = -(-width // n_feat)
    y = ops.concat([x] * reps, axis=1)
    return ops.slice(y, 0, width, axis=1) if reps * n_feat > width else y

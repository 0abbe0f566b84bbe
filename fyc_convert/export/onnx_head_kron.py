"""The Kronecker ONNX head layout (`--head-layout kron`): the transform as MatMuls by small ±1 Hadamard blocks.

For runtimes with strong GEMM kernels and NPUs; an explicit choice, never the default (the default is the
add/sub `portable` layout of `onnx_head`). Sylvester order factors, H_P = H_{s_1} ⊗ … ⊗ H_{s_f} with
s_i <= KRON_MAX_BLOCK, the first factor on the highest index bits. Batch-major for the first GEMM, then
batch last:

    x (B, N) -> embed (`head_embed`: table copies ⊙ ±1, or tile/pad and fold)       (B, K·P)
    the last factor batch-major, one GEMM: (B·K·P/s_f, s_f) @ H_{s_f}, Transpose         (K·P, B)
    each other factor s_i: view (G_i, s_i, W_i) and MatMul(H_{s_i}, view)                (K·P, B)
        G_i = K·s_1…s_{i-1} leading blocks, W_i = s_{i+1}…s_f·B trailing columns
    z[rows]: one Slice for contiguous rows, else one Gather of whole rows (axis 0), Transpose    (B, C)

Static batches above 32 embed batch-last instead and run every factor as the left MatMul. Each block
constant is exactly hadamard(s) (±1, no scale folded in), the form that Qualcomm's QNN backends
rewrite into one HadamardTransform op. Its static checks (`onnx_head.check_head_static` with
layout="kron"): MatMul is the only dense op, each reads a ±1 square block of at most KRON_MAX_BLOCK, and no
constant exceeds max(C, n, 1024). `kron_macs` gives the multiply-adds per sample (the report's figure).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from fyc_convert.export.head_embed import embed_fold, kept_table, major_embed, table_embed
from fyc_convert.export.head_spec import HeadSpec
from fyc_convert.export.ops import Ops
from fyc_convert.head.hadamard import fwht_reference

__all__ = [
    "KRON_CONSTANT_LIMIT", "KRON_MAX_BLOCK", "kron_factors", "kron_head_macs", "kron_logits", "kron_macs",
    "kron_node_bound",
]

KRON_MAX_BLOCK = 32  # the largest ±1 block (32 x 32): small enough for any NPU's MatMul, large for GEMM kernels
# Dynamic batches and static ones up to _MAJOR_MAX_BATCH start batch-major: the lowest block as one GEMM
# (B·K·P/s, s) @ H_s, then one Transpose to batch-last; larger static batches go batch-last at once (each
# block then a batched GEMM over at least B columns). Measured on the glyph head (256 x 1,200, K = 10),
# onnxruntime 1 thread: batch 1 0.57x -> 1.10x the Gemm, batch 32 0.94x -> 1.17x, batch 64 1.04x -> 0.98x.
_MAJOR_MAX_BATCH = 32
KRON_CONSTANT_LIMIT = 1024  # a head constant may hold max(C, n, this) elements


def kron_factors(points: int) -> list[int]:
    """The block sizes s_1 >= … >= s_f (powers of two <= KRON_MAX_BLOCK) whose product is `points`.

    As few blocks as the limit allows, with their bits shared out evenly: 256 -> [16, 16], 128 -> [16, 8],
    2048 -> [16, 16, 8]; 1 -> [].
    """
    assert points >= 1 and points & (points - 1) == 0, "the transform size is a power of two"
    bits, most = points.bit_length() - 1, KRON_MAX_BLOCK.bit_length() - 1
    count = -(-bits // most)
    return [1 << (bits // count + (i < bits % count)) for i in range(count)]


def _shape(spec: HeadSpec) -> tuple[int, int, np.ndarray, np.ndarray | None]:
    """(K, P, rows, table): the blocks kept (those holding class rows), their size and the rows in them."""
    if spec.table is None:
        return 1, spec.hadamard_size, spec.rows, None
    table, rows = kept_table(spec)
    return table.shape[0], table.shape[1], rows, table


def kron_logits(ops: Ops, x: gs.Variable, spec: HeadSpec, batch: int) -> gs.Variable:
    """(B, N) -> (B, C) raw outputs z[rows] (without scale and bias) in the Kronecker layout.

    Args:
        ops: The node factory of the head.
        x: (B, N) features (already scaled when the factor applies at the input).
        spec: The head.
        batch: The static batch (rows of x), or -1 when dynamic.

    Returns:
        The (B, C) outputs z[rows].
    """
    k, p, rows, table = _shape(spec)
    factors = kron_factors(p)
    blocks: dict[int, gs.Constant] = {}

    def block(s: int) -> gs.Constant:  # exactly hadamard(s), symmetric: one constant per block size
        if s not in blocks:
            blocks[s] = ops.const(f"hadamard{s}", fwht_reference(np.eye(s), axis=0).astype(ops.dtype))
        return blocks[s]

    if factors and batch <= _MAJOR_MAX_BATCH:  # dynamic (-1) included
        y = major_embed(ops, x, spec, table)  # (B, K·P), column k·P + j
        last = factors[-1]
        # the lowest bits first, batch-major: one GEMM (B·K·P/s, s) @ H_s
        y = ops.op1("MatMul", [ops.reshape(y, [batch * k * p // last if batch > 0 else -1, last]), block(last)])
        y = ops.transpose(ops.reshape(y, [batch, k * p]))  # (K·P, B)
        factors = factors[:-1]
    elif table is not None:
        y = table_embed(ops, ops.transpose(x), spec.in_features, table, batch)  # (K·P, B), row k·P + j
    else:
        y = embed_fold(ops, ops.transpose(x), spec, batch)  # (m, B)
    lead, trail = k, p
    for s in factors:
        trail //= s
        view = ops.reshape(y, [lead, s, trail * batch if batch > 0 else -1])  # (G, s, W)
        y = ops.op1("MatMul", [block(s), view])  # H_s applied to the middle axis, broadcast over G
        lead *= s
    y = ops.reshape(y, [k * p, batch])  # (K·P, B), natural order
    c = len(rows)
    if c and np.array_equal(rows, np.arange(rows[0], rows[0] + c)):
        return ops.transpose(ops.slice(y, int(rows[0]), int(rows[0]) + c))  # (C, B) -> (B, C)
    z = ops.op1("Gather", [y, ops.const("rows", rows.astype(np.int32))], attrs={"axis": 0})  # (C, B)
    return ops.transpose(z)  # (B, C)


def kron_macs(spec: HeadSpec) -> int:
    """Multiply-adds per sample of the Kronecker head's MatMuls: K·P·(s_1 + … + s_f).

    The Gemm it replaces costs N·C; the embedding's Mul (K·P), the norm (N) and the bias (C) come on top.
    """
    k, p, _, _ = _shape(spec)
    return k * p * sum(kron_factors(p))


def kron_head_macs(heads: Sequence[Any]) -> int:
    """Multiply-adds per sample of the kron MatMuls of every Hadamard head (`kron_macs` summed): the report's
    `onnx.head_macs` for ``--head-layout kron``."""
    return sum(kron_macs(HeadSpec.from_module(head)) for head in heads)


def kron_node_bound(spec: HeadSpec) -> int:
    """Upper bound on the Kronecker head's node count: two per block (Reshape, MatMul), two per halving of
    a fold (Split, Add), plus 22.

    The constant covers the norm and factor (6 nodes), the embedding (at most Concat, Slice, Reshape,
    Concat, Mul, or the fold's Reshape, ReduceSum, Reshape), the Transpose in, the final Reshape, the pick
    (Gather or Slice, Transpose out), the bias and a time axis's two Reshapes.
    """
    _, p, _, table = _shape(spec)
    halvings = 0 if table is not None else (spec.embed_size // spec.hadamard_size).bit_length() - 1
    return 2 * len(kron_factors(p)) + 2 * halvings + 22

"""`HeadSpec`: what the ONNX head layouts need to know about a HadamardHead, as plain numpy (no torch).

Read from the module by `HeadSpec.from_module`; both layouts (`onnx_head`, `onnx_head_switched`) build from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fyc_convert.errors import ExportError
from fyc_convert.head.hadamard import fwht_reference

__all__ = ["HeadSpec", "adapter_weights"]


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
        rows: (C,) int64, the transform output given to each class: in [0, m) without a table, in
            [0, K·P) with one.
        scale: α, the logit scale.
        bias: (C,) float or None.
        table: None (embed/fold + one m-point transform), or (K, P) float, P a power of two >= N:
            z = concat_k H_P(table[k] ⊙ pad(x̂, P)) (length K·P), logits_c = scale · z[rows[c]] + bias_c.
        adapter: None, or the learned map before the head as (weight (N, n), bias (N,)): the head takes n
            features (`input_features`) and sees weight · x + bias.
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
    table: np.ndarray | None = field(default=None)
    adapter: tuple[np.ndarray, np.ndarray] | None = field(default=None)

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
        outputs = m
        if self.table is not None:
            shape = self.table.shape
            if len(shape) != 2 or shape[0] < 1 or shape[1] < n_feat or shape[1] & (shape[1] - 1):
                raise ExportError(
                    f"table must be (K, P) with P a power of two >= in_features {n_feat}, got shape {shape}; "
                    "use the head's block_table() unchanged"
                )
            if not np.all(np.isfinite(self.table)):
                raise ExportError("table holds NaN or inf; use the head's block_table() unchanged")
            outputs = shape[0] * shape[1]
        if self.rows.shape != (c,) or (c and (self.rows.min() < 0 or self.rows.max() >= outputs)):
            raise ExportError(f"rows must be {c} indices in [0, {outputs}); use the head's `rows` buffer unchanged")
        if self.bias is not None and self.bias.shape != (c,):
            raise ExportError(f"bias must have shape ({c},), got {self.bias.shape}; use the head's `bias` unchanged")
        if self.adapter is not None and (self.adapter[0].ndim != 2 or self.adapter[0].shape[0] != n_feat
                                         or self.adapter[1].shape != (n_feat,)):
            raise ExportError(f"the adapter must be an ({n_feat}, n) weight and a ({n_feat},) bias; use the head's "
                              "`adapter` unchanged")

    @property
    def input_features(self) -> int:
        """The features the head takes: the adapter's inputs when there is one, else N."""
        return self.in_features if self.adapter is None else int(self.adapter[0].shape[1])

    @classmethod
    def from_module(cls, head: Any) -> HeadSpec:
        """Read a `fyc_convert.head.heads.HadamardHead` (its attributes and buffers) into a spec.

        The block table comes from ``head.block_table()`` when the head has that method and it returns an
        array; otherwise whole-copy tile heads (N a power of two, n = m = T·N) get the table H_T·S (S the
        (T, N) embedding signs, since H_m = H_T ⊗ H_N: z in natural order is exactly that concatenation, so
        the rows keep their values), and other heads none.

        Args:
            head: A HadamardHead (anything with the same attributes and buffers).

        Returns:
            The spec, with float64 signs/bias/table copies and int64 rows on the CPU.
        """
        bias = getattr(head, "bias", None)
        n_feat, m, n = int(head.in_features), int(head.hadamard_size), int(head.embed_size)
        signs = head.signs.detach().cpu().double().numpy().copy()
        table = None
        block_table = getattr(head, "block_table", None)
        if callable(block_table):
            got = block_table()
            table = None if got is None else np.asarray(got, dtype=np.float64).copy()
        if table is not None and signs.shape != (n - n_feat,):
            # A frame head ("kerdock") keeps its sign table in `signs`; the block table carries it here.
            signs = np.zeros(n - n_feat)
        if table is None and n == m and n_feat < m and n_feat & (n_feat - 1) == 0:
            copies = np.concatenate([np.ones(n_feat), signs]).reshape(m // n_feat, n_feat)  # S, (T, N)
            table = fwht_reference(copies, axis=0)  # H_T · S
        return cls(
            in_features=n_feat,
            num_classes=int(head.num_classes),
            hadamard_size=m,
            embed_size=n,
            embedding=str(head.embedding),
            eps=float(head.eps),
            signs=signs,
            rows=head.rows.detach().cpu().numpy().astype(np.int64),
            scale=float(head.scale.detach().cpu()),
            bias=None if bias is None else bias.detach().cpu().double().numpy().copy(),
            table=table,
            adapter=adapter_weights(head),
        )


def adapter_weights(head: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(weight, bias) float64 copies of the head's learned map before it, or None."""
    adapter = getattr(head, "adapter", None)
    if adapter is None:
        return None
    return (adapter.weight.detach().cpu().double().numpy().copy(),
            adapter.bias.detach().cpu().double().numpy().copy())

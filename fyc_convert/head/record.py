"""`HeadRecord`: the one description of a fixed head in a file, and its one codec.

The same two keys describe the heads of an exported model (ONNX `metadata_props`) and of the converted weights
(the `model.safetensors` header), both string -> string maps:

- ``fyc_convert.head``: the heads' kind, "hadamard" or "orthogonal" ("original" in an ONNX model without a
  fixed head);
- ``fyc_convert.heads``: a JSON list, one object per fixed head (`HeadRecord.to_dict`): ``kind``, ``layer``,
  ``in_features``, ``num_classes``, ``seed``, ``bias``, ``fixed_scale``; a Hadamard head's ``hadamard_size``,
  ``embed_size``, ``embedding`` and ``rows`` (`compact_rows`); ``wrapper`` ("conv1x1") for a head in a conv
  classifier's `ConvHead`; and in an ONNX model where the head stands in the graph: ``scope`` (its node name
  prefix), ``input`` / ``input_dtype`` (its features tensor) and ``output`` (its float32 logits tensor).

`encode_heads` writes the two keys, `decode_heads` reads them back (a `HeadError` that says what to do when
they are missing or incomplete).
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor, nn

from fyc_convert.errors import HeadError
from fyc_convert.head.layouts import WRAPPED_HEAD, ConvHead

__all__ = ["HEADS_KEY", "KIND_KEY", "HeadRecord", "compact_rows", "decode_heads", "encode_heads", "parse_rows"]

KIND_KEY = "fyc_convert.head"
HEADS_KEY = "fyc_convert.heads"
_REQUIRED = ("kind", "layer", "in_features", "num_classes")
_HADAMARD_REQUIRED = ("hadamard_size", "embedding")


@dataclass(frozen=True)
class HeadRecord:
    """One fixed head as a file describes it (see the module docstring for the encoded keys).

    Attributes:
        kind: "hadamard" or "orthogonal".
        layer: dotted name of the head in the converted model.
        in_features: N.
        num_classes: C.
        seed: the head's seed (an OrthogonalHead's Q; a Hadamard head's embedding signs).
        bias: whether the head has a bias.
        fixed_scale: whether α is a constant (a buffer) rather than a parameter.
        hadamard_size: m of a Hadamard head (P for a frame head); None for an orthogonal one.
        embed_size: n of a Hadamard head; None for an orthogonal one.
        embedding: "tile", "pad" or "kerdock"; None for an orthogonal head.
        rows: the C transform outputs of the classes (Hadamard heads); None otherwise.
        wrapper: "conv1x1" when the head stands in a `ConvHead` in place of a 1x1 Conv2d; None otherwise.
        adapter: the input features of the head's learned map before it (`attach_adapter`: N for an N x N map,
            fewer for a head wider than its inputs); None when it has none.
        scope: ONNX only: the name prefix of the head's nodes.
        input: ONNX only: the graph tensor holding the head's features.
        input_dtype: ONNX only: that tensor's element type, "float32" or "float16".
        output: ONNX only: the graph tensor holding the head's float32 logits.
    """

    kind: str
    layer: str
    in_features: int
    num_classes: int
    seed: int = 0
    bias: bool = True
    fixed_scale: bool = False
    hadamard_size: int | None = None
    embed_size: int | None = None
    embedding: str | None = None
    rows: tuple[int, ...] | None = None
    wrapper: str | None = None
    adapter: int | None = None
    scope: str | None = None
    input: str | None = None
    input_dtype: str | None = None
    output: str | None = None

    @classmethod
    def of(cls, model: nn.Module, layer: str) -> HeadRecord:
        """The record of the fixed head at `layer` of `model` (a HadamardHead or OrthogonalHead)."""
        head = model.get_submodule(layer)
        parent, _, attr = layer.rpartition(".")
        wrapped = attr == WRAPPED_HEAD and isinstance(model.get_submodule(parent), ConvHead)
        hadamard = head.head_kind == "hadamard"
        return cls(
            kind=head.head_kind, layer=layer, in_features=int(head.in_features), num_classes=int(head.num_classes),
            seed=int(head.seed), bias=head.bias is not None, fixed_scale=not isinstance(head.scale, nn.Parameter),
            hadamard_size=int(head.hadamard_size) if hadamard else None,
            embed_size=int(head.embed_size) if hadamard else None,
            embedding=str(head.embedding) if hadamard else None,
            rows=tuple(int(r) for r in head.rows.detach().cpu().tolist()) if hadamard else None,
            wrapper="conv1x1" if wrapped else None,  # the original layer (`parent`) was a 1x1 Conv2d
            adapter=None if getattr(head, "adapter", None) is None else int(head.adapter.in_features),
        )

    def placed(self, *, scope: str, input: str, input_dtype: str, output: str) -> HeadRecord:  # noqa: A002
        """The record with where the head stands in an ONNX graph."""
        return dataclasses.replace(self, scope=scope, input=input, input_dtype=input_dtype, output=output)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: rows as `compact_rows`, fields that are None left out."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = compact_rows(value) if f.name == "rows" else value
        return out

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> HeadRecord:
        """The record of one `to_dict` object.

        Raises:
            HeadError: a required key is missing, a value has the wrong type, or the kind is unknown.
        """
        layer = entry.get("layer")
        needed = _REQUIRED + (_HADAMARD_REQUIRED if entry.get("kind") == "hadamard" else ())
        missing = [k for k in needed if k not in entry]
        if missing:
            raise HeadError(f"the fyc-convert head list lacks {', '.join(missing)} for head {layer!r}; "
                            "save or export the converted model again")
        if entry["kind"] not in ("hadamard", "orthogonal"):
            raise HeadError(f"the fyc-convert head list names an unknown head kind {entry['kind']!r}; "
                            "save or export the converted model again")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in entry.items() if k in names}
        try:
            if "rows" in values:
                values["rows"] = tuple(int(r) for r in parse_rows(str(values["rows"])))
            record = cls(**values)
            ints = [record.in_features, record.num_classes, record.seed, record.hadamard_size, record.embed_size,
                    record.adapter]
            flags_ok = all(isinstance(v, bool) for v in (record.bias, record.fixed_scale))
            if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in ints) or not flags_ok:
                raise ValueError("a size, seed or flag of the wrong type")
        except (TypeError, ValueError) as e:
            raise HeadError(f"the fyc-convert head list has a bad entry for head {layer!r} ({e}); save or export "
                            "the converted model again") from e
        return record


def encode_heads(records: Sequence[HeadRecord]) -> dict[str, str]:
    """The two metadata keys describing `records` (none: an ONNX model exported as it was, "original")."""
    if not records:
        return {KIND_KEY: "original"}
    kinds = sorted({r.kind for r in records})
    return {KIND_KEY: ",".join(kinds),
            HEADS_KEY: json.dumps([r.to_dict() for r in records], separators=(",", ":"))}


def decode_heads(meta: Mapping[str, str]) -> list[HeadRecord]:
    """The records of a metadata map that `encode_heads` wrote ([] for "original").

    Raises:
        HeadError: the keys are missing, the list is not JSON, or an entry is incomplete.
    """
    if meta.get(KIND_KEY) == "original" and HEADS_KEY not in meta:
        return []
    if HEADS_KEY not in meta:
        raise HeadError(f"the file has no fyc-convert head list ({HEADS_KEY}); save or export the converted "
                        "model again with this fyc-convert")
    try:
        entries = json.loads(meta[HEADS_KEY])
    except ValueError as e:
        raise HeadError(f"the fyc-convert head list ({HEADS_KEY}) is not JSON ({e}); save or export the "
                        "converted model again") from e
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise HeadError(f"the fyc-convert head list ({HEADS_KEY}) lists no heads; save or export the converted "
                        "model again")
    return [HeadRecord.from_dict(e) for e in entries]


def compact_rows(rows: np.ndarray | Tensor | list[int]) -> str:
    """Rows as a short string for the head list; `parse_rows` reverses it.

    Runs such as "1-3,7,9-10" when that is shorter, else "b64u16:" ("b64u32:" for rows >= 65536) and the
    base64 of the little-endian integers: a permutation of 1000 rows takes 2.7 kB instead of 4 kB.
    """
    values = np.asarray(rows.tolist() if isinstance(rows, Tensor) else rows, dtype=np.int64)
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

"""What an exported model says about how to use it: its input, the preprocessing, the class names.

The same facts go into the ONNX files' `metadata_props` (strings; JSON for structured values), into
`report.json` (`input`, `preprocessing`, `classes`) and into the printed report's one "feed:" line:

    fyc_convert.input           {"name": "input", "dtype": "float32", "layout": "NCHW", "shape": ["N", 1, 8, 8],
                                 "range": [0, 1], "normalization": "caller"}
    fyc_convert.preprocessing   {"input_shape": {"value": [1, 8, 8], "source": ...}, "resize": {...},
                                 "mean": {...}, "std": {...}, "crop_pct": {...}, "interpolation": {...}, ...}
    fyc_convert.classes         ["0", "1", ...]            (only when the classes are known)
    fyc_convert.classes_source  "checkpoint meta"
    fyc_convert.feed            the one-line instruction the report prints

`input.range` is the range of the values before normalisation (pixels in [0, 1] or 0–255, or the data's own
range for arrays; null when unknown). `input.normalization` says who applies `(x - mean) / std`: "caller"
(feed normalised values) or "graph" (`--embed-preprocessing`: feed the values in `range`).

This module imports neither torch nor onnx at import time (the report renders with it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["KEYS", "feed_line", "input_spec", "metadata", "observed_range", "read_model_card", "snap_range",
           "with_resize"]

_PREFIX = "fyc_convert."
KEYS = ("input", "preprocessing", "classes", "classes_source", "feed")  # metadata keys, after the prefix
_LAYOUTS = {1: "NC", 2: "NHW", 3: "NCHW", 4: "NCDHW"}


def with_resize(preprocessing: Mapping[str, Any]) -> dict[str, Any]:
    """The report's preprocessing ({name: {"value", "source"}}) with `resize`: the shorter side before the crop.

    resize = round(H / crop_pct) for image inputs (C, H, W); absent for other inputs.
    """
    out = dict(preprocessing)
    shape = (out.get("input_shape") or {}).get("value")
    crop = (out.get("crop_pct") or {}).get("value") or 1.0
    if shape is not None and len(shape) == 3:
        source = (out.get("crop_pct") or {}).get("source", "default")
        out["resize"] = {"value": int(math.floor(min(shape[1:]) / crop + 0.5)),
                         "source": f"input size / crop_pct ({source})"}
    return out


def snap_range(low: float, high: float) -> list[float] | None:
    """An observed value range, snapped to [0, 1] or [0, 255] when it lies inside; None when it is not finite."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return None
    eps = 1e-3
    if low >= -eps and high <= 1 + eps:
        return [0, 1]
    if low >= -eps and high <= 255 + eps:
        return [0, 255]
    return [float(f"{low:.4g}"), float(f"{high:.4g}")]


def input_spec(*, name: str, input_shape: Sequence[int], value_range: Sequence[float] | None, in_graph: bool,
               static_batch: int | None = None) -> dict[str, Any]:
    """The graph input as a user feeds it (see the module docstring)."""
    return {"name": name, "dtype": "float32", "layout": _LAYOUTS.get(len(input_shape), "N…"),
            "shape": [static_batch or "N", *map(int, input_shape)],
            "range": list(value_range) if value_range is not None else None,
            "normalization": "graph" if in_graph else "caller"}


def feed_line(spec: Mapping[str, Any], preprocessing: Mapping[str, Any] | None) -> str:
    """One line saying what to feed, e.g. "input float32 N×1×8×8, values in [0, 1] minus mean 0.305, divided by
    std 0.376 (resize 8, centre crop 8×8, bilinear)"."""
    prep = preprocessing or {}

    def value(key: str) -> Any:
        return (prep.get(key) or {}).get("value")

    shape = "×".join(str(d) for d in spec["shape"])
    rng = spec.get("range")
    values = f"values in [{_num(rng[0])}, {_num(rng[1])}]" if rng else "values as in the training data"
    mean, std = value("mean"), value("std")
    if spec.get("normalization") == "graph":
        norm = ", normalised inside the graph" if mean is not None or std is not None else ""
    else:
        norm = "".join([f" minus mean {_nums(mean)}" if mean is not None else "",
                        "," if mean is not None and std is not None else "",
                        f" divided by std {_nums(std)}" if std is not None else ""])
    image = ""
    if value("resize") is not None:
        h, w = spec["shape"][-2:]
        image = f" (resize {value('resize')}, centre crop {h}×{w}, {value('interpolation') or 'bilinear'})"
    return f"{spec['name']} {spec['dtype']} {shape}, {values}{norm}{image}"


def metadata(spec: Mapping[str, Any], preprocessing: Mapping[str, Any] | None,
             classes: Mapping[str, Any] | None) -> dict[str, str]:
    """The `metadata_props` (str -> str) of an exported model: input, preprocessing, classes, feed line."""
    out = {_PREFIX + "input": _json(spec), _PREFIX + "preprocessing": _json(preprocessing or {}),
           _PREFIX + "feed": feed_line(spec, preprocessing)}
    if classes is not None:
        out[_PREFIX + "classes"] = _json(list(classes["names"]))
        out[_PREFIX + "classes_source"] = str(classes["source"])
    return out


def read_model_card(path: str | Path) -> dict[str, Any]:
    """The usage metadata of an exported .onnx file, decoded: {"input", "preprocessing", "classes", ...}.

    Keys the file lacks are absent (a file written before this metadata existed gives {}).
    """
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key[len(_PREFIX):]: p.value for p in proto.metadata_props if p.key.startswith(_PREFIX)}
    out: dict[str, Any] = {}
    for key in KEYS:
        if key in props:
            out[key] = props[key] if key in ("classes_source", "feed") else json.loads(props[key])
    return out


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _num(x: float) -> str:
    return f"{x:g}"


def _nums(values: Sequence[float]) -> str:
    """One value plainly, several comma-separated (each to 4 significant digits)."""
    return ",".join(f"{v:.4g}" for v in values)


def observed_range(bundle: Any, input_shape: Sequence[int]) -> list[float] | None:
    """The range of the data's values before normalisation, snapped (`snap_range`); None when unknown.

    Images are decoded to [0, 1]; in-memory arrays (`kind` "arrays") are measured, their normalisation undone;
    other data (memory-mapped arrays) is not read again. Without data, an image input (C, H, W) takes pixels in
    [0, 1]: the convention of every mean/std source (`--mean`, timm's pretrained_cfg, Hugging Face processors).
    """
    if bundle is None:
        return [0, 1] if len(input_shape) == 3 else None
    if bundle.kind == "images":
        return [0, 1]
    tensors = getattr(bundle.train, "tensors", None)
    prep = bundle.preprocessing
    if bundle.kind != "arrays" or not tensors or prep is None:
        return None
    import torch

    x = tensors[0]  # (B, *shape) float32, normalised by load_data when a mean/std was given
    shape = tuple(x.shape[1:])

    def stat(values: Sequence[float] | None, neutral: float) -> torch.Tensor:
        if values is None or len(values) == 1:
            return torch.tensor(neutral if values is None else float(values[0]))
        t = torch.tensor([float(v) for v in values])
        if len(t) == math.prod(shape):
            return t.reshape(shape)
        return t.reshape(len(t), *([1] * (len(shape) - 1)))  # per channel

    if not x.numel():
        return None
    # std > 0, so x -> x * std + mean is increasing per element: undo it on the per-element extremes only
    std, mean = stat(prep.std, 1.0), stat(prep.mean, 0.0)
    low, high = x.amin(0) * std + mean, x.amax(0) * std + mean  # (*shape)
    return snap_range(float(low.min()), float(high.max()))

"""Which preprocessing a model expects: input size, mean, std, interpolation, crop_pct — and where each came from.

Each value is taken from the first source that has it, in this order:

1. explicit options (`DataOptions`; the CLI's `--input-shape`, `--mean`, `--std`, `--crop-pct`, `--interpolation`,
   `--no-augment`);
2. the checkpoint's meta (`input_shape`, `mean`, `std`, `crop_pct`, `interpolation`, `augment`);
3. the model's own configuration, read by duck typing (no timm or transformers import):
   timm's `model.pretrained_cfg` / `model.default_cfg` (`input_size`, `mean`, `std`, `crop_pct`, `interpolation`),
   then a Hugging Face `model.config` (`image_size`, `num_channels`), then a Hugging Face image processor's
   `preprocessor_config.json` when the caller passes it as a dict (`image_mean`, `image_std`, `crop_pct`,
   `crop_size`/`size`, `resample`);
4. the data as given (`load_data` fills in the input shape from the first sample / image) or a default
   (no normalisation, crop_pct 1.0 = resize the shorter side to the input size, bilinear).

`Preprocessing.sources` names the source of every value (the report shows it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fyc_convert.errors import DataError

__all__ = ["INTERPOLATIONS", "Preprocessing", "resolve_preprocessing"]

# Pillow resampling filters by name; the numbers are Hugging Face's `resample` codes (PIL.Image.Resampling values).
INTERPOLATIONS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
_DEFAULT_CROP_PCT = 1.0  # no source: the shorter side is resized to the input size itself (data given at size)
_DEFAULT_INTERPOLATION = "bilinear"  # torchvision's default
_FIELDS = ("input_shape", "mean", "std", "crop_pct", "interpolation", "augment")
# How the CLI spells each option, for messages.
_FLAGS = {"input_shape": "--input-shape", "mean": "--mean", "std": "--std", "crop_pct": "--crop-pct",
          "interpolation": "--interpolation", "augment": "--no-augment"}


@dataclass(frozen=True)
class Preprocessing:
    """The preprocessing of one model, resolved (see the module docstring for the order of sources).

    Attributes:
        input_shape: one sample's shape, (C, H, W) for images or (F,) for vectors; None when no source gives it
            (the data's own shape is used then).
        mean: per-channel (or one, or per-element) mean subtracted from inputs in [0, 1]; None: no normalisation.
        std: per-channel (or one, or per-element) standard deviation; None: 1.
        crop_pct: evaluation crop: resize the shorter side to H / crop_pct, then centre-crop H×W (images only).
        interpolation: Pillow resampling filter name (`INTERPOLATIONS`), for resizing images.
        augment: random-resized crop + horizontal flip while training on images; None: the data decides
            (on for image folders, off for arrays, which are used as stored).
        sources: field name -> where its value came from ("option", "checkpoint meta", "model.pretrained_cfg",
            "model.default_cfg", "model.config", "preprocessor_config", "data", "default").
    """

    input_shape: tuple[int, ...] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    crop_pct: float = _DEFAULT_CROP_PCT
    interpolation: str = _DEFAULT_INTERPOLATION
    augment: bool | None = None
    sources: dict[str, str] = field(default_factory=dict)

    def with_value(self, name: str, value: Any, source: str) -> Preprocessing:
        """A copy with one field set and its source recorded (used by `load_data` for "data" values)."""
        return replace(self, **{name: value}, sources={**self.sources, name: source})

    def describe(self) -> dict[str, Any]:
        """Plain values with their sources, for reports: {"input_shape": {"value": [3, 224, 224], "source": ...}}."""
        out = {}
        for name in _FIELDS:
            value = getattr(self, name)
            out[name] = {"value": list(value) if isinstance(value, tuple) else value,
                         "source": self.sources.get(name, "default")}
        return out


def resolve_preprocessing(
    options: Any = None,
    *,
    meta: Mapping[str, Any] | None = None,
    model: Any = None,
    preprocessor_config: Mapping[str, Any] | None = None,
) -> Preprocessing:
    """Resolve input size, mean, std, crop_pct, interpolation and augmentation from every source, in order.

    Args:
        options: explicit values: any object with some of the attributes `input_shape`, `mean`, `std`,
            `crop_pct`, `interpolation`, `augment` (e.g. `DataOptions`); None values count as not given.
        meta: the checkpoint's meta dict (`LoadedModel.meta`).
        model: the model; its `pretrained_cfg` / `default_cfg` (timm) or `config` (Hugging Face) are read.
        preprocessor_config: a Hugging Face image processor's configuration (`preprocessor_config.json`) as a dict.

    Returns:
        The resolved Preprocessing; fields no source gives keep their defaults (recorded as "default").

    Raises:
        DataError: a value that cannot be used (wrong length, std 0, crop_pct outside (0, 1], unknown
            interpolation); the message names the source and the option to pass instead.
    """
    candidates: list[tuple[str, dict[str, Any]]] = [
        ("option", {k: getattr(options, k, None) for k in _FIELDS} if options is not None else {}),
        ("checkpoint meta", _from_meta(meta or {})),
    ]
    candidates += _from_model(model)
    if preprocessor_config is not None:
        candidates.append(("preprocessor_config", _from_image_processor(preprocessor_config)))
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for source, found in candidates:
        for name in _FIELDS:
            value = found.get(name)
            if name not in values and value is not None:
                values[name] = _checked(name, value, source)
                sources[name] = source
    _check_channels(values, sources)
    return Preprocessing(**values, sources=sources)


# ---------------------------------------------------------------------------------------------- sources


def _from_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {k: meta.get(k) for k in _FIELDS}


def _from_model(model: Any) -> list[tuple[str, dict[str, Any]]]:
    """timm's pretrained_cfg / default_cfg, then a Hugging Face config, as (source, values) pairs."""
    if model is None:
        return []
    out = []
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = _as_mapping(getattr(model, attr, None))
        if cfg:
            out.append((f"model.{attr}", {
                "input_shape": cfg.get("input_size"),
                "mean": cfg.get("mean"),
                "std": cfg.get("std"),
                "crop_pct": cfg.get("crop_pct"),
                "interpolation": _interpolation_name(cfg.get("interpolation")),
            }))
            break  # timm models carry both, the same dict: read one
    config = getattr(model, "config", None)
    image_size = getattr(config, "image_size", None)
    if config is not None and image_size is not None:
        channels = getattr(config, "num_channels", None) or 3
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)[:2]
        out.append(("model.config", {"input_shape": (channels, h, w)}))
    return out


def _from_image_processor(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A Hugging Face image processor's values: mean/std, resample, and crop_pct from crop_pct or crop/resize sizes."""
    found: dict[str, Any] = {}
    if cfg.get("do_normalize", True):
        found["mean"], found["std"] = cfg.get("image_mean"), cfg.get("image_std")
    found["interpolation"] = _interpolation_name(cfg.get("resample"))
    size = _hw(cfg.get("size"))
    crop = _hw(cfg.get("crop_size")) if cfg.get("do_center_crop", "crop_size" in cfg) else None
    target = crop or size
    if target is not None and isinstance(target, tuple):
        found["input_shape"] = (3, *target)
    if cfg.get("crop_pct") is not None:
        found["crop_pct"] = cfg["crop_pct"]
    elif crop is not None and isinstance(cfg.get("size"), Mapping) and "shortest_edge" in cfg["size"]:
        found["crop_pct"] = min(crop) / cfg["size"]["shortest_edge"]  # resize to 256, crop 224: 0.875
    return found


def _hw(size: Any) -> tuple[int, int] | None:
    """A Hugging Face size: int, {"height", "width"}, or {"shortest_edge"} -> (H, W)."""
    if isinstance(size, int):
        return size, size
    if isinstance(size, Mapping):
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        if "shortest_edge" in size:
            return int(size["shortest_edge"]), int(size["shortest_edge"])
    return None


def _as_mapping(cfg: Any) -> Mapping[str, Any] | None:
    """timm keeps a dict, newer versions may keep a dataclass-like object with `to_dict()`."""
    if isinstance(cfg, Mapping):
        return cfg
    to_dict = getattr(cfg, "to_dict", None)
    if callable(to_dict):
        d = to_dict()
        return d if isinstance(d, Mapping) else None
    return None


def _interpolation_name(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return next((k for k, v in INTERPOLATIONS.items() if v == value), f"code {value}")
    name = str(value).lower()
    return "bicubic" if name == "random" else name  # timm's "random" (train-time choice): evaluate bicubic


# ---------------------------------------------------------------------------------------------- checks


def _checked(name: str, value: Any, source: str) -> Any:
    where = "" if source == "option" else f" (from {source})"
    flag = _FLAGS[name]
    if name == "input_shape":
        try:
            shape = tuple(int(d) for d in value)
        except (TypeError, ValueError):
            shape = ()
        if not shape or any(d <= 0 for d in shape):
            raise DataError(f"input shape {value!r}{where} is not a shape; pass {flag} C,H,W with positive sizes")
        return shape
    if name in ("mean", "std"):
        try:
            vals = tuple(float(v) for v in (value if isinstance(value, Sequence) else [value]))
        except (TypeError, ValueError):
            vals = ()
        if not vals or not all(math.isfinite(v) for v in vals):
            raise DataError(f"{name} {value!r}{where} is not a list of numbers; pass {flag} with one value per channel")
        if name == "std" and any(v <= 0 for v in vals):
            raise DataError(f"std {list(vals)}{where} contains a value <= 0; pass a positive {flag}")
        return vals
    if name == "crop_pct":
        try:
            pct = float(value)
        except (TypeError, ValueError):
            pct = float("nan")
        if not 0 < pct <= 1:
            raise DataError(f"crop_pct {value!r}{where} must be in (0, 1]; pass e.g. {flag} 0.875")
        return pct
    if name == "interpolation":
        if value not in INTERPOLATIONS:
            raise DataError(f"unknown interpolation {value!r}{where}; pass {flag} with one of "
                            f"{', '.join(INTERPOLATIONS)}")
        return value
    return bool(value)  # augment


def _check_channels(values: dict[str, Any], sources: dict[str, str]) -> None:
    """mean/std must have 1 value or one per channel when the shape is an image (C, H, W)."""
    shape = values.get("input_shape")
    if shape is None or len(shape) != 3:
        return
    for name in ("mean", "std"):
        vals = values.get(name)
        if vals is not None and len(vals) not in (1, shape[0], math.prod(shape)):
            raise DataError(f"{name} has {len(vals)} values (from {sources[name]}) but the input has {shape[0]} "
                            f"channels (input shape from {sources['input_shape']}); pass {_FLAGS[name]} with "
                            f"{shape[0]} values")

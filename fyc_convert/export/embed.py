"""`--embed-preprocessing`: exported graphs that take pixels and normalise inside, `(x * scale - mean) / std`.

Both models (original and converted) are wrapped in `Normalized` before export, so that the two ONNX files, the
PyTorch references of verification and the benchmark all see the same function of the same raw inputs. The
wrapped model sits under the attribute `model`, so every layer name gains the prefix `model.` (the fixed
heads' names that the export splices by are prefixed accordingly).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fyc_convert.errors import ExportError

__all__ = ["PIXEL_SCALES", "Embedded", "Normalized", "embed_preprocessing"]

PREFIX = "model."  # the wrapped model's attribute, in front of every layer name
PIXEL_SCALES = {"0-1": 1.0, "0-255": 1.0 / 255.0}  # --pixel-range: what the graph's input values are


class Normalized(nn.Module):
    """`model((x * scale - mean) / std)`: the normalisation as the first ops of the graph.

    Args:
        model: the model that expects normalised inputs.
        mean, std: per-channel (C values), per-element (all of `sample_shape`) or one value; None: 0 and 1.
        scale: multiplies the raw input first (1/255 for 8-bit pixel values).
        sample_shape: one sample's shape, e.g. (3, 224, 224) or (30,).
    """

    def __init__(self, model: nn.Module, *, mean: Sequence[float] | None, std: Sequence[float] | None,
                 scale: float, sample_shape: Sequence[int]):
        super().__init__()
        self.model = model
        self.scale = float(scale)
        # buffers: .to() / .half() move them with the model; (1, C, 1, 1), (1, *shape) or (1,)
        self.register_buffer("mean", _stat(mean, 0.0, sample_shape, "mean"), persistent=False)
        self.register_buffer("std", _stat(std, 1.0, sample_shape, "std"), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x * self.scale - self.mean) / self.std)

    def to_raw(self, x: torch.Tensor) -> torch.Tensor:
        """The raw input whose normalisation is `x` (normalised samples -> what the graph takes)."""
        return (x.float() * self.std.float() + self.mean.float()) / self.scale


@dataclass
class Embedded:
    """The models to export and verify (wrapped in `Normalized`, or as they are), and their head layers' names."""

    converted: nn.Module
    original: nn.Module
    head_layers: list[str]

    def to_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised samples -> what the exported graphs take (unchanged when nothing is embedded)."""
        return self.converted.to_raw(x) if isinstance(self.converted, Normalized) else x


def embed_preprocessing(converted: nn.Module, original: nn.Module, *, head_layers: Sequence[str],
                        mean: Sequence[float] | None, std: Sequence[float] | None, pixel_range: str,
                        sample_shape: Sequence[int]) -> Embedded:
    """Wrap both models in `Normalized` (see the module docstring); the models themselves are shared, not copied.

    Raises:
        ExportError: an unknown pixel range, or mean/std that do not fit the sample shape.
    """
    if pixel_range not in PIXEL_SCALES:
        raise ExportError(f"pixel range {pixel_range!r} is unknown; pass one of {', '.join(PIXEL_SCALES)}")
    scale = PIXEL_SCALES[pixel_range]
    kw = dict(mean=mean, std=std, scale=scale, sample_shape=tuple(sample_shape))
    return Embedded(Normalized(converted, **kw).eval(), Normalized(original, **kw).eval(),
                    [PREFIX + layer for layer in head_layers])


def _stat(values: Sequence[float] | None, neutral: float, shape: Sequence[int], name: str) -> torch.Tensor:
    """mean/std as a tensor that broadcasts over a batch (B, *shape)."""
    if values is None:
        return torch.tensor([neutral])
    t = torch.tensor([float(v) for v in values], dtype=torch.float32)
    if len(t) == 1:
        return t
    if len(t) == math.prod(shape):
        return t.reshape(1, *shape)
    if shape and len(t) == shape[0]:
        return t.reshape(1, len(t), *([1] * (len(shape) - 1)))
    raise ExportError(f"{name} has {len(t)} values but the input has shape {tuple(shape)}; give 1, "
                      f"{shape[0] if shape else 1} (per channel) or {math.prod(shape)} values with --{name}")

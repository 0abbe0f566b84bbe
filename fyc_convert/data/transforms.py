"""Image transforms with Pillow and torch (no torchvision): the standard eval and train pipelines, and normalisation.

    eval:   resize (shorter side to H / crop_pct; timm's rule) -> centre crop H×W                  -> uint8 (C, H, W)
    train:  random-resized crop to H×W (scale 0.08–1, ratio 3/4–4/3) -> horizontal flip (p = 0.5) -> uint8 (C, H, W)

Both stop at uint8 tensors: a worker process sends 1 byte per value instead of 4, and `Normalize` turns a whole
batch into float32 `(x / 255 - mean) / std` where it is used (on the GPU when training there). Each step follows
torchvision's `Resize`, `CenterCrop`, `RandomResizedCrop.get_params` and `ToTensor` + `Normalize` (the tests
compare against torchvision when it is installed). Random choices come from a `random.Random` the caller seeds per
sample, so an augmented epoch is the same with any number of DataLoader workers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from fyc_convert.data.preprocess import INTERPOLATIONS

__all__ = ["EvalTransform", "Normalize", "TrainTransform", "center_crop_box", "random_resized_crop_box",
           "resize_for_eval", "to_uint8_tensor"]

CROP_SCALE = (0.08, 1.0)  # RandomResizedCrop's share of the image area (torchvision / timm defaults)
CROP_RATIO = (3 / 4, 4 / 3)  # ... and aspect-ratio range


def resize_for_eval(img, size: tuple[int, int], *, crop_pct: float, interpolation: str):
    """Resize before the centre crop, as timm's eval transform: square inputs get the shorter side set to
    floor(H / crop_pct) (torchvision `Resize(int)`), other inputs are resized to (floor(H / crop_pct),
    floor(W / crop_pct)). `img` is a PIL image, `size` (H, W)."""
    h, w = size
    scale_h, scale_w = math.floor(h / crop_pct), math.floor(w / crop_pct)
    if scale_h == scale_w:
        short, long = sorted(img.size)
        new_short, new_long = scale_h, int(scale_h * long / short)
        new_w, new_h = (new_short, new_long) if img.size[0] <= img.size[1] else (new_long, new_short)
    else:
        new_w, new_h = scale_w, scale_h
    if (new_w, new_h) == img.size:
        return img
    return img.resize((new_w, new_h), INTERPOLATIONS[interpolation])


def center_crop_box(width: int, height: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of torchvision's CenterCrop of an image of width×height to size (H, W)."""
    h, w = size
    top = round((height - h) / 2.0)
    left = round((width - w) / 2.0)
    return left, top, left + w, top + h


def random_resized_crop_box(width: int, height: int, rng: random.Random, *,
                            scale: tuple[float, float] = CROP_SCALE,
                            ratio: tuple[float, float] = CROP_RATIO) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop: area share in `scale`, aspect ratio (log-uniform) in `ratio`.

    torchvision's RandomResizedCrop.get_params with a seeded Python RNG: 10 tries, then the central crop
    clamped to the ratio range.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def to_uint8_tensor(img) -> Tensor:
    """A PIL image ("L" or "RGB") as a uint8 tensor (C, H, W) (a view: the batch stack makes it contiguous)."""
    a = torch.from_numpy(np.array(img, dtype=np.uint8))  # (H, W) or (H, W, 3), a writable copy
    return a.unsqueeze(0) if a.ndim == 2 else a.permute(2, 0, 1)


class EvalTransform:
    """Resize + centre crop to (H, W): PIL image -> uint8 (C, H, W). Deterministic (`rng` is ignored)."""

    random = False  # needs no per-sample seed

    def __init__(self, size: tuple[int, int], *, crop_pct: float, interpolation: str):
        self.size, self.crop_pct, self.interpolation = tuple(size), crop_pct, interpolation

    def __call__(self, img, rng: random.Random | None = None) -> Tensor:
        img = resize_for_eval(img, self.size, crop_pct=self.crop_pct, interpolation=self.interpolation)
        if img.size != (self.size[1], self.size[0]):
            img = img.crop(center_crop_box(*img.size, self.size))
        return to_uint8_tensor(img)


class TrainTransform:
    """Random-resized crop to (H, W) + horizontal flip: PIL image -> uint8 (C, H, W), drawn from `rng`."""

    random = True

    def __init__(self, size: tuple[int, int], *, interpolation: str, flip: bool = True):
        self.size, self.interpolation, self.flip = tuple(size), interpolation, flip

    def __call__(self, img, rng: random.Random | None = None) -> Tensor:
        rng = rng if rng is not None else random.Random(0)
        # crop, then resize (as torchvision; Pillow's resize(box=) also filters pixels beyond the box's edges)
        img = img.crop(random_resized_crop_box(*img.size, rng))
        img = img.resize((self.size[1], self.size[0]), INTERPOLATIONS[self.interpolation])
        x = to_uint8_tensor(img)
        return x.flip(-1) if self.flip and rng.random() < 0.5 else x


class Normalize:
    """Batch normalisation of inputs: (x · scale − mean) / std in float32, on whatever device `x` is.

    `scale` is 1/255 for uint8 data (images, uint8 arrays) and 1 for float data; mean/std broadcast per channel
    (1 or C values for (B, C, ...) batches) or per element (one value per element of a sample). Computed as
    x · a + b (a = scale / std, b = −mean / std) in place on the one float copy of the batch: a 64×3×224×224
    batch is 38 MB of float32, and every extra pass or allocation over it is a visible share of a CPU step.
    """

    def __init__(self, *, scale: float = 1.0, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 sample_shape: tuple[int, ...] = ()):
        self.scale = scale
        self.mean = None if mean is None else _broadcast(mean, sample_shape)
        self.std = None if std is None else _broadcast(std, sample_shape)
        self._on: dict[torch.device, tuple[Tensor | float, Tensor | None]] = {}

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.mean is None and self.std is None

    def _coefficients(self, device: torch.device) -> tuple[Tensor | float, Tensor | None]:
        """(a, b) on `device`, made once per device."""
        if device not in self._on:
            a: Tensor | float = self.scale if self.std is None else (self.scale / self.std).to(device)
            b = None if self.mean is None else (-self.mean / (1.0 if self.std is None else self.std)).to(device)
            self._on[device] = (a, b)
        return self._on[device]

    def __call__(self, x: Tensor) -> Tensor:
        if self.identity:
            return x.float()
        a, b = self._coefficients(x.device)
        # one new float tensor: x.float() copies integer data; float32 input gets its copy from the multiply
        y = torch.mul(x, a) if x.dtype == torch.float32 else x.float().mul_(a)
        return y.add_(b) if b is not None else y

    def __getstate__(self) -> dict:  # device copies stay in the process that made them
        return {**self.__dict__, "_on": {}}


def _broadcast(v: Sequence[float], shape: tuple[int, ...]) -> Tensor:
    """Mean/std as a tensor broadcasting over (B, *shape): one value, one per channel, or one per element."""
    t = torch.as_tensor(v, dtype=torch.float32).reshape(-1)
    if t.numel() == 1 or not shape:
        return t.reshape(()) if t.numel() == 1 else t
    if t.numel() == shape[0]:
        return t.reshape(shape[0], *([1] * (len(shape) - 1)))
    return t.reshape(shape)  # per element; the caller checked the count

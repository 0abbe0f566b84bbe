"""Datasets and their checks: `.npz`, `.pt` dicts of tensors, and ImageFolder trees.

Everything is loaded eagerly into tensors (float32 inputs, int64 labels), normalised once, and wrapped in
`TensorDataset`s, so a bad file fails here with its name instead of mid-epoch in a DataLoader worker.
Unlabelled data (images without class folders, arrays without `y_train`) gets the label -1 everywhere:
fine-tuning then needs `distill` (the original model supplies the targets).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fyc_convert.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "UNLABELLED", "DataBundle", "check_data", "load_data"]

# The extensions torchvision's ImageFolder accepts.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
UNLABELLED = -1  # label of every sample in an unlabelled data set


@dataclass
class DataBundle:
    """Training and validation data, ready for a DataLoader.

    Attributes:
        train: (x, y) samples; x float32 of shape `input_shape`, y an int64 scalar (-1 when unlabelled).
        val: the validation split, or None when there is none (`val_split=0` and no `x_val`).
        num_classes: classes named by the data (class folders / `classes` key), else max label + 1; 0 unlabelled.
        input_shape: the shape of one sample, e.g. (1, 8, 8) or (64,).
        classes: class names in label order when the data names them (folders, a `classes` array), else None.
        labelled: False when the data has no labels at all.
        source: the path the data came from (for messages and reports).
    """

    train: TensorDataset
    val: TensorDataset | None
    num_classes: int
    input_shape: tuple[int, ...]
    classes: list[str] | None
    labelled: bool
    source: str


def load_data(
    path: str | Path,
    *,
    val_split: float = 0.1,
    seed: int = 0,
    input_shape: Sequence[int] | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
) -> DataBundle:
    """Load a data set from an `.npz` file, a `.pt` dict of tensors, or an ImageFolder directory.

    Arrays need `x_train` (and `y_train` unless unlabelled), optionally `x_val`/`y_val` and `classes` (names in
    label order); without a validation
    split one is drawn from the training data with `val_split` and `seed`. Integer inputs (uint8 images) are
    scaled to [0, 1]. Arrays whose samples have `input_shape`'s number of elements are reshaped to it.
    ImageFolder: one sub-folder per class in sorted order (as torchvision), or images directly in the folder
    (unlabelled); images are converted to grayscale/RGB and resized to `input_shape` (C, H, W) when given.

    Args:
        path: the data file or folder.
        val_split: fraction of the training data held out when the data has no validation split (0: none).
        seed: seed of the split's permutation.
        input_shape: the model's sample shape (C, H, W) / (N,), for resizing and reshaping; None keeps the data's.
        mean: per-channel (or scalar, or per-element) mean subtracted after scaling; None: no normalisation.
        std: per-channel (or scalar, or per-element) standard deviation divided by; None: 1.

    Returns:
        The DataBundle with normalised float32 inputs and int64 labels.

    Raises:
        DataError: the path is missing or unreadable, an array is missing, or an image cannot be decoded.
    """
    path = Path(path)
    shape = tuple(int(d) for d in input_shape) if input_shape is not None else None
    if not path.exists():
        raise DataError(f"data not found: {path}; pass an .npz/.pt file or an ImageFolder directory to --data")
    if not 0.0 <= val_split < 1.0:
        raise DataError(f"val_split must be in [0, 1), got {val_split}; pass e.g. --val-split 0.1")
    classes: list[str] | None = None
    if path.is_dir():
        x_train, y_train, classes = _read_image_folder(path, shape)
        x_val = y_val = None
    elif path.suffix in (".npz", ".pt", ".pth"):
        arrays = _load_npz(path) if path.suffix == ".npz" else _load_pt(path)
        x_train, y_train, x_val, y_val = _read_arrays(arrays, path)
        if "classes" in arrays:  # optional class names, in label order
            classes = [str(c) for c in arrays["classes"]]
    else:
        raise DataError(f"unsupported data format: {path.name}; use an .npz or .pt file or an ImageFolder directory")

    labelled = bool(((torch.cat([y_train, y_val]) if y_val is not None else y_train) != UNLABELLED).any())
    if x_val is None and val_split > 0 and len(x_train) >= 2:
        perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))
        n_val = min(max(1, round(val_split * len(x_train))), len(x_train) - 1)
        x_val, y_val = x_train[perm[:n_val]], y_train[perm[:n_val]]
        x_train, y_train = x_train[perm[n_val:]], y_train[perm[n_val:]]

    x_train = _shape_inputs(x_train, shape, path)
    if x_val is not None:
        x_val = _shape_inputs(x_val, shape, path)
        if x_val.shape[1:] != x_train.shape[1:]:
            raise DataError(
                f"{path}: x_val samples have shape {tuple(x_val.shape[1:])} but x_train has "
                f"{tuple(x_train.shape[1:])}; store both splits with the same sample shape"
            )
    sample_shape = tuple(x_train.shape[1:])
    if mean is not None or std is not None:
        m = _broadcastable(0.0 if mean is None else mean, sample_shape, "mean")
        s = _broadcastable(1.0 if std is None else std, sample_shape, "std")
        if (s == 0).any():
            raise DataError("std contains 0; pass a positive --std (or fix the checkpoint's meta)")
        x_train = (x_train - m) / s
        x_val = (x_val - m) / s if x_val is not None else None

    if classes is not None:
        num_classes = len(classes)
    else:
        labels = torch.cat([y_train, y_val]) if y_val is not None else y_train
        num_classes = int(labels.max()) + 1 if labelled and labels.numel() else 0
    return DataBundle(
        train=TensorDataset(x_train, y_train),
        val=TensorDataset(x_val, y_val) if x_val is not None and y_val is not None else None,
        num_classes=num_classes,
        input_shape=sample_shape,
        classes=classes,
        labelled=labelled,
        source=str(path),
    )


def check_data(bundle: DataBundle, *, num_classes: int, input_shape: Sequence[int] | None = None) -> None:
    """Check the data against the model before any training starts.

    Args:
        bundle: the loaded data.
        num_classes: the number of outputs of the model's classifier (C).
        input_shape: the model's sample shape, or None when unknown (not checked then).

    Raises:
        DataError: empty split, class count or label range that does not fit the head, wrong sample shape,
            or NaN/inf inputs; the message says which and what to do.
    """
    splits = {"training": bundle.train, "validation": bundle.val}
    for name, ds in splits.items():
        if ds is not None and len(ds) == 0:
            raise DataError(f"the {name} split of {bundle.source} is empty; add samples or change --val-split")
    if bundle.classes is not None and len(bundle.classes) != num_classes:
        raise DataError(
            f"{bundle.source} has {len(bundle.classes)} classes but the model's classifier has "
            f"{num_classes} outputs; give data with one class per output of the model"
        )
    if input_shape is not None and tuple(input_shape) != bundle.input_shape:
        raise DataError(
            f"{bundle.source}: samples have shape {bundle.input_shape} but the model expects "
            f"{tuple(input_shape)}; reshape/resize the data or pass the right --input-shape"
        )
    for name, ds in splits.items():
        if ds is None:
            continue
        x, y = ds.tensors
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x.reshape(len(x), -1))).any(1).nonzero()[0])
            raise DataError(f"{bundle.source}: {name} sample {bad} contains NaN or inf; clean the data")
        if not bundle.labelled:
            continue
        if (y < 0).any() or (y >= num_classes).any():
            bad = int(((y < 0) | (y >= num_classes)).nonzero()[0])
            raise DataError(
                f"{bundle.source}: {name} label {int(y[bad])} (sample {bad}) is outside 0..{num_classes - 1} "
                f"for a {num_classes}-class model; relabel the data or use the matching checkpoint"
            )


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # zipfile/pickle/value errors: all mean "not a readable .npz"
        raise DataError(f"cannot read {path}: {type(e).__name__}: {e}; pass a valid .npz file") from None


def _load_pt(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"cannot read {path}: {type(e).__name__}; save a dict of tensors with torch.save") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, not a dict; save {{'x_train': ..., 'y_train': ...}}")
    return obj


def _read_arrays(
    arrays: dict, path: Path
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    if "x_train" not in arrays:
        raise DataError(f"{path} has no 'x_train' (keys: {', '.join(sorted(arrays)) or 'none'}); store x_train/y_train")
    x_train = _as_inputs(arrays["x_train"], path, "x_train")
    y_train = _as_labels(arrays.get("y_train"), len(x_train), path, "y_train")
    if ("x_val" in arrays) != ("y_val" in arrays) and "y_train" in arrays:
        raise DataError(f"{path} has only one of x_val/y_val; store both or neither")
    if "x_val" not in arrays:
        return x_train, y_train, None, None
    x_val = _as_inputs(arrays["x_val"], path, "x_val")
    return x_train, y_train, x_val, _as_labels(arrays.get("y_val"), len(x_val), path, "y_val")


def _as_inputs(a, path: Path, key: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a
    if t.ndim < 2:
        raise DataError(f"{path}: {key} has shape {tuple(t.shape)}; store one sample per row, shape (S, ...)")
    if t.dtype == torch.bool or t.is_complex():
        raise DataError(f"{path}: {key} has dtype {t.dtype}; store real numbers")
    if not t.is_floating_point():
        return t.float() / 255.0  # uint8 images, as torchvision's ToTensor
    return t.float()


def _as_labels(a, n: int, path: Path, key: str) -> torch.Tensor:
    if a is None:
        return torch.full((n,), UNLABELLED, dtype=torch.int64)
    t = torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a
    t = t.reshape(-1) if t.ndim == 2 and t.shape[1] == 1 else t
    if t.ndim != 1 or len(t) != n:
        raise DataError(f"{path}: {key} has shape {tuple(t.shape)} for {n} samples; store one integer label per sample")
    if t.is_floating_point():
        if not torch.isfinite(t).all() or (t != t.round()).any():
            raise DataError(f"{path}: {key} holds non-integer values; store integer class indices")
    elif t.dtype == torch.bool or t.is_complex():
        raise DataError(f"{path}: {key} has dtype {t.dtype}; store integer class indices")
    return t.to(torch.int64)


def _shape_inputs(x: torch.Tensor, shape: tuple[int, ...] | None, path: Path) -> torch.Tensor:
    """Reshape samples to `shape` when only the layout differs ((S, 64) -> (S, 1, 8, 8))."""
    if shape is None or tuple(x.shape[1:]) == shape:
        return x
    if math.prod(x.shape[1:]) == math.prod(shape):
        return x.reshape(len(x), *shape)
    return x  # left as is: check_data reports the mismatch


def _broadcastable(v: float | Sequence[float], shape: tuple[int, ...], name: str) -> torch.Tensor:
    """Mean/std as a tensor that broadcasts over samples of `shape`: scalar, per channel, or per element."""
    t = torch.as_tensor(v, dtype=torch.float32).reshape(-1)
    if t.numel() == 1:
        return t.reshape(())
    if t.numel() == shape[0]:
        return t.reshape(shape[0], *([1] * (len(shape) - 1)))
    if t.numel() == math.prod(shape):
        return t.reshape(shape)
    raise DataError(
        f"{name} has {t.numel()} values but samples have shape {shape}; give 1, {shape[0]} (per channel) "
        f"or {math.prod(shape)} values"
    )


def _read_image_folder(root: Path, shape: tuple[int, ...] | None) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    """Decode every image of an ImageFolder tree: x (S, C, H, W) in [0, 1], y (S,), class names."""
    from PIL import Image  # Pillow only when images are used

    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if class_dirs:
        files = [(f, c) for c, d in enumerate(class_dirs) for f in sorted(_image_files(d))]
        classes: list[str] | None = [d.name for d in class_dirs]
    else:
        files = [(f, UNLABELLED) for f in sorted(_image_files(root))]
        classes = None
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root}; use one sub-folder per class")
    if shape is not None and (len(shape) != 3 or shape[0] not in (1, 3)):
        raise DataError(f"images need an input shape (1 or 3, H, W), got {shape}; pass --input-shape C,H,W")
    arrays = []
    for f, _ in files:
        try:
            with Image.open(f) as img:
                img = img.convert("L" if shape is not None and shape[0] == 1 else "RGB")
                if shape is not None and img.size != (shape[2], shape[1]):
                    img = img.resize((shape[2], shape[1]), Image.BILINEAR)
                a = np.asarray(img, dtype=np.uint8)
        except Exception as e:  # PIL raises many types for truncated/corrupt files
            raise DataError(f"cannot read image {f}: {type(e).__name__}: {e}; fix or remove the file") from None
        if arrays and a.shape != arrays[0].shape:
            raise DataError(
                f"image {f} is {a.shape[1]}x{a.shape[0]} but earlier ones are "
                f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; pass --input-shape C,H,W to resize them"
            )
        arrays.append(a)
    x = torch.from_numpy(np.stack(arrays))  # (S, H, W) or (S, H, W, 3)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    y = torch.tensor([c for _, c in files], dtype=torch.int64)
    return x.float().div_(255.0).contiguous(), y, classes


def _image_files(d: Path) -> list[Path]:
    return [f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]

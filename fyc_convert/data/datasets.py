"""Datasets for `--data`: in-memory arrays, memory-mapped `.npy` folders, and image folders that stream.

    bundle = load_data("imagenet/", DataOptions(workers=4), meta=loaded.meta, model=model)
    check_data(bundle, num_classes=1000, input_shape=bundle.input_shape)

Formats:
- `.npz` / `.pt` dict of arrays (`x_train`, `y_train`, optional `x_val`/`y_val`, `classes`): small data, loaded into
  memory and normalised once (`TensorDataset`s), checked completely before training.
- a folder with `x_train.npy` (`y_train.npy`, `x_val.npy`, `y_val.npy`, optional `classes.txt`): opened with
  `mmap_mode="r"` in each process that reads it, so arrays larger than memory stream (`NpyDataset`).
- an image folder (`ImageFolderDataset`): `root/<class>/...` (a seeded `val_split` holds out a share) or
  `root/train/<class>/...` + `root/val/<class>/...` (`validation/`, then `test/`, when there is no `val/`).
  The files are indexed once, sorted like torchvision's ImageFolder (class folders sorted, then the files of each
  class as os.walk gives them, sorted; the same extensions; hidden folders skipped); a `classes.txt` (or
  `class_names.txt`, `labels.txt`, `synsets.txt`: one class a line, the folder name first) gives the class order.
  Images are decoded lazily in DataLoader workers with Pillow: train = random-resized crop + flip (unless
  `augment` is off), eval = resize + centre crop (`fyc_convert.data.transforms`). A file that cannot be decoded fails
  when it is first read, with a one-line DataError naming it, or is skipped with `skip_bad_images`.

Unlabelled data (images without class folders, arrays without `y_train`) gets the label -1 everywhere:
fine-tuning then needs `distill` (the original model supplies the targets). Batches are made by
`fyc_convert.data.loader.make_loader`, which also applies the streaming datasets' normalisation.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from fyc_convert.data.loader import BadSample, default_workers
from fyc_convert.data.preprocess import Preprocessing, resolve_preprocessing
from fyc_convert.data.transforms import EvalTransform, Normalize, TrainTransform
from fyc_convert.errors import DataError, describe
from fyc_convert.options import DataOptions

__all__ = ["CLASS_LISTS", "HELD_OUT_DIRS", "IMAGE_EXTENSIONS", "UNLABELLED", "DataBundle", "DataOptions",
           "ImageFolderDataset", "NpyDataset", "check_data", "load_data"]

# The extensions torchvision's ImageFolder accepts.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
UNLABELLED = -1  # label of every sample in an unlabelled data set
CLASS_LISTS = ("classes.txt", "class_names.txt", "labels.txt", "synsets.txt")  # class order files, looked up in order
HELD_OUT_DIRS = ("val", "validation", "test")  # beside train/: the first that has class folders is the val split
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}  # Pillow modes read as one channel when no shape is given


@dataclass
class DataBundle:
    """Training and validation data, ready for `fyc_convert.data.loader.make_loader`.

    Attributes:
        train: (x, y) training samples (augmented images when `preprocessing.augment`); y int64, -1 when unlabelled.
        val: the validation split, or None when there is none (`val_split=0` and no held-out split).
        num_classes: classes named by the data (class folders / list / `classes` key), else max label + 1; 0 unlabelled.
        input_shape: the shape of one sample as the model gets it, e.g. (1, 8, 8), (3, 224, 224) or (64,).
        classes: class names in label order when the data names them, else None.
        labelled: False when the data has no labels at all.
        source: the path the data came from (for messages and reports).
        train_eval: the training samples without augmentation (calibration, feature capture); None: `train`.
        preprocessing: what was applied and where each value came from; None for bundles built by hand.
        kind: "arrays" (in memory), "npy" (memory-mapped) or "images" (decoded on the fly).
        workers: DataLoader workers for this data's loaders.
    """

    train: Dataset
    val: Dataset | None
    num_classes: int
    input_shape: tuple[int, ...]
    classes: list[str] | None
    labelled: bool
    source: str
    train_eval: Dataset | None = None
    preprocessing: Preprocessing | None = None
    kind: str = "arrays"
    workers: int = 0

    @property
    def plain_train(self) -> Dataset:
        """The training samples as evaluation sees them (no augmentation)."""
        return self.train_eval if self.train_eval is not None else self.train

    def skipped_images(self) -> list[str]:
        """Files skipped so far in this process (`skip_bad_images`), sorted."""
        seen: set[str] = set()
        for ds in (self.train, self.val, self.train_eval):
            seen |= getattr(ds, "skipped", set())
        return sorted(seen)

    def summary(self) -> dict[str, Any]:
        """Plain values for the report: format, sizes, preprocessing with sources, loader workers, skipped files."""
        return {
            "source": self.source,
            "kind": self.kind,
            "train_samples": len(self.train),
            "val_samples": len(self.val) if self.val is not None else 0,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "preprocessing": self.preprocessing.describe() if self.preprocessing is not None else None,
            "workers": self.workers,
            "skipped_images": len(self.skipped_images()),
        }


def load_data(
    path: str | Path,
    options: DataOptions | None = None,
    *,
    seed: int = 0,
    meta: Mapping[str, Any] | None = None,
    model: Any = None,
    preprocessor_config: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> DataBundle:
    """Read (or index) a data set: an `.npz`/`.pt` file, a folder of `.npy` arrays, or an image folder.

    Arrays need `x_train` (and `y_train` unless unlabelled), optionally `x_val`/`y_val` and `classes` (names in
    label order); without a validation split one is drawn with `val_split` and `seed`. Integer inputs (uint8
    images) are scaled to [0, 1]; arrays whose samples have the input shape's number of elements are reshaped to
    it; arrays are not resized or augmented. Images are resized/cropped to the input shape (see the module
    docstring). The preprocessing comes from `options`, then `meta`, then the model's config
    (`fyc_convert.data.preprocess.resolve_preprocessing`), then the data.

    Args:
        path: the data file or folder.
        options: how to read it (`DataOptions`); keyword `overrides` replace single fields
            (`load_data(p, val_split=0)`).
        seed: seed of the held-out split (and nothing else here).
        meta: the checkpoint's meta (input_shape, mean, std, crop_pct, interpolation, augment).
        model: the model, for its own preprocessing config (timm `pretrained_cfg`, Hugging Face `config`).
        preprocessor_config: a Hugging Face image processor config dict, when there is one.

    Returns:
        The DataBundle.

    Raises:
        DataError: the path is missing or unreadable, an array or the class list is wrong, no images,
            a preprocessing value cannot be used; each with a one-line message.
    """
    known = {f.name for f in fields(DataOptions)}
    if set(overrides) - known:
        raise TypeError(f"load_data() got unknown data options: {', '.join(sorted(set(overrides) - known))}")
    opts = replace(options or DataOptions(), **overrides)
    if opts.input_shape is not None:
        opts = replace(opts, input_shape=tuple(int(d) for d in opts.input_shape))
    path = Path(path)
    if not path.exists():
        raise DataError(f"data not found: {path}; pass an .npz/.pt file, a folder of .npy arrays or an image "
                        "folder to --data")
    if not 0.0 <= opts.val_split < 1.0:
        raise DataError(f"val_split must be in [0, 1), got {opts.val_split}; pass e.g. --val-split 0.1")
    if opts.workers is not None and opts.workers < 0:
        raise DataError(f"workers must be >= 0, got {opts.workers}; pass --workers 0 to read data in the main process")
    prep = resolve_preprocessing(opts, meta=meta, model=model, preprocessor_config=preprocessor_config)
    if path.is_dir() and (path / "x_train.npy").exists():
        bundle = _load_npy_folder(path, opts, prep, seed)
    elif path.is_dir():
        bundle = _load_image_folder(path, opts, prep, seed)
    elif path.suffix in (".npz", ".pt", ".pth"):
        bundle = _load_arrays(path, opts, prep, seed)
    else:
        raise DataError(f"unsupported data format: {path.name}; use an .npz or .pt file, a folder of .npy arrays "
                        "or an image folder")
    bundle.workers = opts.workers if opts.workers is not None else (0 if bundle.kind == "arrays" else
                                                                    default_workers())
    return bundle


def check_data(bundle: DataBundle, *, num_classes: int, input_shape: Sequence[int] | None = None) -> None:
    """Check the data against the model before any training starts.

    In-memory arrays are checked completely; streaming data is checked as far as it can be without decoding
    (labels, class count, shape), and each sample when it is read (NaN/inf arrays, unreadable images).

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
            f"{bundle.source} has {_count(len(bundle.classes), 'class', 'classes')} but the model's classifier has "
            f"{_count(num_classes, 'output', 'outputs')}; give data with one class per output of the model"
        )
    if input_shape is not None and tuple(input_shape) != tuple(bundle.input_shape):
        raise DataError(
            f"{bundle.source}: samples have shape {tuple(bundle.input_shape)} but the model expects "
            f"{tuple(input_shape)}; reshape/resize the data or pass the right --input-shape"
        )
    for name, ds in splits.items():
        if ds is None:
            continue
        if isinstance(ds, TensorDataset):
            x = ds.tensors[0]
            if not torch.isfinite(x).all():
                bad = int((~torch.isfinite(x.reshape(len(x), -1))).any(1).nonzero()[0])
                raise DataError(f"{bundle.source}: {name} sample {bad} contains NaN or inf; clean the data")
        if not bundle.labelled:
            continue
        y = ds.tensors[1] if isinstance(ds, TensorDataset) else torch.from_numpy(np.asarray(ds.labels))
        if (y < 0).any() or (y >= num_classes).any():
            bad = int(((y < 0) | (y >= num_classes)).nonzero()[0])
            raise DataError(
                f"{bundle.source}: {name} label {int(y[bad])} (sample {bad}) is outside 0..{num_classes - 1} "
                f"for a {num_classes}-class model; relabel the data or use the matching checkpoint"
            )


def _count(n: int, one: str, many: str) -> str:
    """"1 class", "2 classes"."""
    return f"{n} {one if n == 1 else many}"


# ---------------------------------------------------------------------------------------------- arrays in memory


def _load_arrays(path: Path, opts: DataOptions, prep: Preprocessing, seed: int) -> DataBundle:
    arrays = _load_npz(path) if path.suffix == ".npz" else _load_pt(path)
    x_train, y_train, x_val, y_val = _read_arrays(arrays, path)
    classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else None  # names in label order
    labelled = bool(((torch.cat([y_train, y_val]) if y_val is not None else y_train) != UNLABELLED).any())
    if x_val is None and opts.val_split > 0 and len(x_train) >= 2:
        val_idx, train_idx = _split(len(x_train), opts.val_split, seed)
        x_val, y_val = x_train[val_idx], y_train[val_idx]
        x_train, y_train = x_train[train_idx], y_train[train_idx]

    shape = prep.input_shape
    x_train = _shape_inputs(x_train, shape)
    if x_val is not None:
        x_val = _shape_inputs(x_val, shape)
        if x_val.shape[1:] != x_train.shape[1:]:
            raise DataError(
                f"{path}: x_val samples have shape {tuple(x_val.shape[1:])} but x_train has "
                f"{tuple(x_train.shape[1:])}; store both splits with the same sample shape"
            )
    sample_shape = tuple(x_train.shape[1:])
    prep = _arrays_prep(prep, sample_shape, opts)
    if prep.mean is not None or prep.std is not None:
        norm = Normalize(mean=prep.mean, std=prep.std, sample_shape=_check_stats(prep, sample_shape))
        x_train = norm(x_train)
        x_val = norm(x_val) if x_val is not None else None
    return DataBundle(
        train=TensorDataset(x_train, y_train),
        val=TensorDataset(x_val, y_val) if x_val is not None and y_val is not None else None,
        num_classes=len(classes) if classes is not None else _count_classes(labelled, y_train, y_val),
        input_shape=sample_shape,
        classes=classes,
        labelled=labelled,
        source=str(path),
        preprocessing=prep,
        kind="arrays",
    )


def _arrays_prep(prep: Preprocessing, sample_shape: tuple[int, ...], opts: DataOptions) -> Preprocessing:
    """Arrays are used as stored: their shape is the data's when no source gave one, and they are not augmented."""
    if opts.augment:
        raise DataError("augmentation applies to image folders; arrays are used as stored (turn augment off)")
    if prep.input_shape is None:
        prep = prep.with_value("input_shape", sample_shape, "data")
    return prep.with_value("augment", False, "data: arrays are used as stored")


def _count_classes(labelled: bool, *labels: torch.Tensor | None) -> int:
    ys = [y for y in labels if y is not None and y.numel()]
    return int(max(int(y.max()) for y in ys)) + 1 if labelled and ys else 0


def _split(n: int, val_split: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (val indices, train indices) of range(n), val_split of them held out (at least 1, at most n - 1)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(max(1, round(val_split * n)), n - 1)
    return perm[:n_val], perm[n_val:]


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - zipfile/pickle/value errors: all mean "not a readable .npz"
        raise DataError(f"cannot read {path}: {describe(e)}; pass a valid .npz file") from None


def _load_pt(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for files it cannot read
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
    _check_input_dtype(t.shape, t.dtype == torch.bool or t.is_complex(), path, key)
    if not t.is_floating_point():
        return t.float() / 255.0  # uint8 images, as torchvision's ToTensor
    return t.float()


def _check_input_dtype(shape: Sequence[int], bad_dtype: bool, path: Path | str, key: str) -> None:
    if len(shape) < 2:
        raise DataError(f"{path}: {key} has shape {tuple(shape)}; store one sample per row, shape (S, ...)")
    if bad_dtype:
        raise DataError(f"{path}: {key} holds booleans or complex numbers; store real numbers")


def _as_labels(a, n: int, path: Path | str, key: str) -> torch.Tensor:
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


def _shape_inputs(x: torch.Tensor, shape: tuple[int, ...] | None) -> torch.Tensor:
    """Reshape samples to `shape` when only the layout differs ((S, 64) -> (S, 1, 8, 8))."""
    if shape is None or tuple(x.shape[1:]) == shape:
        return x
    if math.prod(x.shape[1:]) == math.prod(shape):
        return x.reshape(len(x), *shape)
    return x  # left as is: check_data reports the mismatch


def _check_stats(prep: Preprocessing, shape: tuple[int, ...]) -> tuple[int, ...]:
    """mean/std must give 1 value, one per channel (shape[0]) or one per element; returns `shape`."""
    for name in ("mean", "std"):
        vals = getattr(prep, name)
        if vals is not None and len(vals) not in (1, shape[0] if shape else 1, math.prod(shape)):
            raise DataError(
                f"{name} has {len(vals)} values but samples have shape {shape} ({name} from "
                f"{prep.sources.get(name, 'default')}); give 1, {shape[0]} (per channel) or {math.prod(shape)} "
                f"values with --{name}"
            )
    return shape


# ---------------------------------------------------------------------------------------------- .npy folders


class NpyDataset(Dataset):
    """Samples of a memory-mapped `x_*.npy` (one row each), returned raw; `normalize` scales the batch.

    The array is opened with `mmap_mode="r"` lazily in each process (a DataLoader worker opens its own map;
    pickling sends the path, not the data). Items: (tensor of `sample_shape`, int label), or a BadSample for a
    row with NaN/inf values.
    """

    streaming = True
    takes_sample_seeds = False

    def __init__(self, file: Path, rows: np.ndarray, labels: np.ndarray, *, sample_shape: tuple[int, ...],
                 normalize: Normalize):
        self.file, self.rows, self.labels = str(file), rows, labels[rows]
        self.sample_shape, self.normalize = sample_shape, normalize
        self.skipped: set[str] = set()  # never filled: NaN rows are not skippable
        self._x: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | BadSample:
        if self._x is None:
            self._x = np.load(self.file, mmap_mode="r")
        row = int(self.rows[i])
        a = torch.from_numpy(np.array(self._x[row]))  # a copy of one row out of the map
        if a.is_floating_point() and not torch.isfinite(a).all():
            where = f"{self.file} sample {row}"
            return BadSample(where, f"{where} contains NaN or inf; clean the data", skippable=False)
        return a.reshape(self.sample_shape), int(self.labels[i])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_x": None}


def _load_npy_folder(root: Path, opts: DataOptions, prep: Preprocessing, seed: int) -> DataBundle:
    x_train = _open_npy(root / "x_train.npy")
    y_train = _npy_labels(root / "y_train.npy", len(x_train))
    has_val = (root / "x_val.npy").exists()
    if (root / "y_val.npy").exists() != has_val and (root / "y_train.npy").exists():
        raise DataError(f"{root} has only one of x_val.npy/y_val.npy; store both or neither")
    x_val = _open_npy(root / "x_val.npy") if has_val else None
    y_val = _npy_labels(root / "y_val.npy", len(x_val)) if x_val is not None else None
    shape = _npy_sample_shape(x_train, prep.input_shape)
    if x_val is not None and _npy_sample_shape(x_val, prep.input_shape) != shape:
        raise DataError(f"{root}: x_val.npy samples have shape {x_val.shape[1:]} but x_train.npy has "
                        f"{x_train.shape[1:]}; store both splits with the same sample shape")
    prep = _arrays_prep(prep, shape, opts)
    _check_stats(prep, shape)

    def dataset(x: np.ndarray, file: Path, rows: np.ndarray, labels: np.ndarray) -> NpyDataset:
        scale = 1.0 if np.issubdtype(x.dtype, np.floating) else 1 / 255.0  # uint8 images, as ToTensor
        norm = Normalize(scale=scale, mean=prep.mean, std=prep.std, sample_shape=shape)
        return NpyDataset(file, rows, labels, sample_shape=shape, normalize=norm)

    train_rows = np.arange(len(x_train))
    val = None
    if x_val is not None:
        val = dataset(x_val, root / "x_val.npy", np.arange(len(x_val)), y_val)
    elif opts.val_split > 0 and len(x_train) >= 2:
        val_idx, train_idx = _split(len(x_train), opts.val_split, seed)
        val = dataset(x_train, root / "x_train.npy", val_idx.sort().values.numpy(), y_train)
        train_rows = train_idx.sort().values.numpy()
    train = dataset(x_train, root / "x_train.npy", train_rows, y_train)
    labels = np.concatenate([y_train, y_val]) if y_val is not None else y_train
    labelled = bool((labels != UNLABELLED).any())
    classes = _npy_classes(root)
    return DataBundle(
        train=train, val=val,
        num_classes=len(classes) if classes is not None else (int(labels.max()) + 1 if labelled else 0),
        input_shape=shape, classes=classes, labelled=labelled, source=str(root), preprocessing=prep, kind="npy",
    )


def _open_npy(path: Path) -> np.ndarray:
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - a truncated header, a pickled object array, ...
        raise DataError(f"cannot read {path}: {describe(e)}; save it with numpy.save") from None
    _check_input_dtype(x.shape, x.dtype == np.bool_ or np.issubdtype(x.dtype, np.complexfloating) or
                       not np.issubdtype(x.dtype, np.number), path, path.stem)
    return x


def _npy_labels(path: Path, n: int) -> np.ndarray:
    if not path.exists():
        return np.full(n, UNLABELLED, dtype=np.int64)
    try:
        y = np.load(path, allow_pickle=False)  # labels are small (8 bytes a sample): read them into memory
    except Exception as e:  # noqa: BLE001 - as _open_npy
        raise DataError(f"cannot read {path}: {describe(e)}; save it with numpy.save") from None
    return _as_labels(y, n, path, path.stem).numpy()


def _npy_sample_shape(x: np.ndarray, shape: tuple[int, ...] | None) -> tuple[int, ...]:
    stored = tuple(int(d) for d in x.shape[1:])
    if shape is not None and math.prod(stored) == math.prod(shape):
        return tuple(shape)
    return stored


def _npy_classes(root: Path) -> list[str] | None:
    for name in CLASS_LISTS:
        if (root / name).is_file():
            return _read_class_list(root / name)
    if (root / "classes.npy").is_file():
        return [str(c) for c in np.load(root / "classes.npy", allow_pickle=False)]
    return None


# ---------------------------------------------------------------------------------------------- image folders


class _PathIndex:
    """Relative file paths packed into one byte buffer + offsets.

    An index of millions of files stays compact, and DataLoader workers forked from it do not touch per-file
    Python objects, so their copy-on-write pages stay shared.
    """

    def __init__(self, root: Path, paths: list[str], labels: list[int]):
        encoded = [p.encode("utf-8", "surrogateescape") for p in paths]
        self.root = str(root)
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self.offsets[1:])
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        rel = self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape")
        return os.path.join(self.root, rel)


class ImageFolderDataset(Dataset):
    """Images of an indexed folder, decoded with Pillow when read; items are (uint8 (C, H, W), label).

    Args:
        index: the files and labels (one index shared by the train/val/eval views).
        rows: which files of the index this split holds.
        transform: `TrainTransform` (random, seeded per sample) or `EvalTransform`.
        channels: 1 (read as "L") or 3 ("RGB").
        normalize: the batch normalisation the loader applies.
        skip_bad_images: let the loader skip files that cannot be decoded (recorded in `skipped`).
    """

    streaming = True
    takes_sample_seeds = True  # the loader sends (index, seed) pairs when shuffling

    def __init__(self, index: _PathIndex, rows: np.ndarray, *, transform: EvalTransform | TrainTransform,
                 channels: int, normalize: Normalize, skip_bad_images: bool, skipped: set[str] | None = None):
        self.index, self.rows, self.transform = index, np.asarray(rows, dtype=np.int64), transform
        self.mode = "L" if channels == 1 else "RGB"
        self.normalize, self.skip_bad_images = normalize, skip_bad_images
        self.skipped: set[str] = skipped if skipped is not None else set()  # filled by the loader, main process

    @property
    def labels(self) -> np.ndarray:
        return self.index.labels[self.rows]

    def files(self) -> list[str]:
        """The paths of this split's images, in order."""
        return [self.index.path(int(r)) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int] | BadSample:
        i, seed = key if isinstance(key, tuple) else (key, key)
        row = int(self.rows[i])
        path = self.index.path(row)
        try:
            from PIL import Image  # Pillow only when images are used

            with Image.open(path) as f:
                img = f.convert(self.mode)  # decodes: truncated/corrupt files fail here
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for unreadable files
            return BadSample(path, f"cannot read image {path}: {describe(e)}; fix or remove the file, or pass "
                                   "--skip-bad-images to skip such files", skippable=True)
        rng = random.Random(seed) if self.transform.random else None
        return self.transform(img, rng), int(self.index.labels[row])


def _load_image_folder(root: Path, opts: DataOptions, prep: Preprocessing, seed: int) -> DataBundle:
    layout = _image_layout(root)
    train_dir, val_dir = layout
    classes = _image_classes(root, train_dir)
    paths, labels = _index_images(train_dir, root, classes)
    n_train = len(paths)
    if val_dir is not None:
        val_paths, val_labels = _index_images(val_dir, root, classes)
        paths, labels = paths + val_paths, labels + val_labels
    if not paths:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root}; use one sub-folder per class")
    index = _PathIndex(root, paths, labels)

    prep = _image_prep(prep, index, opts)
    channels, h, w = prep.input_shape
    norm = Normalize(scale=1 / 255.0, mean=prep.mean, std=prep.std, sample_shape=prep.input_shape)
    eval_tf = EvalTransform((h, w), crop_pct=prep.crop_pct, interpolation=prep.interpolation)
    train_tf = TrainTransform((h, w), interpolation=prep.interpolation) if prep.augment else eval_tf
    skipped: set[str] = set()

    def view(rows: np.ndarray, transform: EvalTransform | TrainTransform) -> ImageFolderDataset:
        return ImageFolderDataset(index, rows, transform=transform, channels=channels, normalize=norm,
                                  skip_bad_images=opts.skip_bad_images, skipped=skipped)

    train_rows = np.arange(n_train)
    val_rows = np.arange(n_train, len(index)) if val_dir is not None else None
    if val_rows is None and opts.val_split > 0 and n_train >= 2:
        v, t = _split(n_train, opts.val_split, seed)
        val_rows, train_rows = v.sort().values.numpy(), t.sort().values.numpy()
    labelled = classes is not None
    return DataBundle(
        train=view(train_rows, train_tf),
        val=view(val_rows, eval_tf) if val_rows is not None else None,
        num_classes=len(classes) if classes is not None else 0,
        input_shape=(channels, h, w),
        classes=classes,
        labelled=labelled,
        source=str(root),
        train_eval=view(train_rows, eval_tf) if prep.augment else None,
        preprocessing=prep,
        kind="images",
    )


def _image_layout(root: Path) -> tuple[Path, Path | None]:
    """(training folder, held-out folder or None): `root/train` + the first of `HELD_OUT_DIRS` that has class
    folders, when `root/train` has class folders; else `root` itself (one folder per class, or flat)."""
    train = root / "train"
    if not (train.is_dir() and _subdirs(train)):
        return root, None
    held = next((root / d for d in HELD_OUT_DIRS if (root / d).is_dir() and _subdirs(root / d)), None)
    return train, held


def _subdirs(d: Path) -> list[str]:
    """Class folders: sub-folders, sorted, hidden ones (.ipynb_checkpoints, .git) skipped."""
    try:
        return sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise DataError(f"cannot list {d}: {e.strerror}; check the --data folder's permissions") from None


def _image_classes(root: Path, train_dir: Path) -> list[str] | None:
    """Class names in label order: a class list file (root, then the training folder), else sorted folders;
    None for a flat folder of images (unlabelled)."""
    folders = _subdirs(train_dir)
    for d in (root, train_dir):
        for name in CLASS_LISTS:
            if (d / name).is_file():
                classes = _read_class_list(d / name, folders)
                unknown = sorted(set(folders) - set(classes))
                if unknown:
                    raise DataError(f"{train_dir} has class folders not in {d / name}: {', '.join(unknown[:5])}"
                                    f"{' ...' if len(unknown) > 5 else ''}; add them to the list or remove them")
                return classes
    return folders or None


def _read_class_list(path: Path, folders: Sequence[str] = ()) -> list[str]:
    """One class a line (blank lines skipped): the whole line when it names a folder, else its first word
    (ImageNet's `n01440764 tench, Tinca tinca`)."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the class list {path}: {describe(e)}; write one class name a line") from None
    known = set(folders)
    names = [line.split()[0].rstrip(",") if known and line not in known else line for line in lines]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"{path} names {', '.join(dupes[:5])} more than once; list each class once")
    if not names:
        raise DataError(f"the class list {path} is empty; write one class name a line")
    return names


def _index_images(d: Path, root: Path, classes: list[str] | None) -> tuple[list[str], list[int]]:
    """Paths (relative to `root`) and labels, in torchvision's order: classes in label order, each class's files
    from sorted os.walk (following links), sorted by name. Unlabelled (flat) folders: the files of `d`."""
    paths: list[str] = []
    labels: list[int] = []
    if classes is None:
        names = sorted(e.name for e in os.scandir(d) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        return [os.path.relpath(os.path.join(d, n), root) for n in names], [UNLABELLED] * len(names)
    present = set(_subdirs(d))
    unknown = sorted(present - set(classes))
    if unknown:
        raise DataError(f"{d} has class folders the training split does not have: {', '.join(unknown[:5])}; "
                        "give the held-out split the same class folders")
    for label, name in enumerate(classes):
        if name not in present:
            continue  # a class without images in this split
        for dirpath, _, files in sorted(os.walk(d / name, followlinks=True)):
            rel = os.path.relpath(dirpath, root)
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(rel, f))
                    labels.append(label)
    return paths, labels


def _image_prep(prep: Preprocessing, index: _PathIndex, opts: DataOptions) -> Preprocessing:
    """Complete the preprocessing for images: the input shape from the first readable image when no source gave
    one (its size, one channel for grey images), augmentation on unless turned off."""
    if prep.input_shape is None:
        w, h, mode = _first_image(index, skip=opts.skip_bad_images)
        prep = prep.with_value("input_shape", (1 if mode in _GRAY_MODES else 3, h, w), "data")
    shape = prep.input_shape
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise DataError(f"images need an input shape (1 or 3, H, W), got {shape} "
                        f"(from {prep.sources['input_shape']}); pass --input-shape C,H,W")
    _check_stats(prep, shape)
    if prep.augment is None:
        prep = prep.with_value("augment", True, "default (image folder)")
    return prep


def _first_image(index: _PathIndex, *, skip: bool) -> tuple[int, int, str]:
    """(width, height, mode) of the first image whose header reads."""
    from PIL import Image

    for i in range(len(index)):
        path = index.path(i)
        try:
            with Image.open(path) as img:
                return img.size[0], img.size[1], img.mode
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for unreadable files
            if not skip:
                raise DataError(f"cannot read image {path}: {describe(e)}; fix or remove the file, or pass "
                                "--skip-bad-images to skip such files") from None
    raise DataError(f"no readable image in {index.root}; check the files")

"""Rebuild the sample models' data and checkpoints, deterministically (seeded, 1 CPU thread).

    python -m sample_models.build [--only digits|glyphs|glyphs-large|tabular] [--out-dir DIR]

Writes sample_models/{digits.npz, tabular.npz, digits_cnn.pt, glyph_cnn.pt, glyph_large_cnn.pt,
tabular_mlp.pt} and the generated glyph data sample_models/data/{glyphs.npz, glyphs_large.npz}. Each checkpoint is
{"state_dict": ..., "meta": {...}} with plain Python types in meta, loadable with weights_only=True.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from sample_models import archs, glyphs

HERE = Path(__file__).parent
SEED = 0


@dataclass
class TrainConfig:
    epochs: int  # passes over the training set
    lr: float  # peak AdamW learning rate (one-cycle schedule)
    batch_size: int
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    max_shift: int = 0  # random translation of image batches by up to this many pixels (0: none)


@contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Seed torch, use one thread and deterministic algorithms inside; restore the previous settings after."""
    threads, strict, rng = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.get_rng_state()
    torch.manual_seed(seed)
    # one thread: bit-reproducible, and on a busy machine 2 threads spend most of their time spin-waiting
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(strict)
        torch.set_rng_state(rng)


def _shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by a random integer offset, zero-filled. (B, C, H, W) -> (B, C, H, W)."""
    b, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)  # (B, C, H + 2s, W + 2s)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (B, 1, 1, W)
    return padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, *, seed: int) -> float:
    """Train with AdamW and a one-cycle schedule; returns the wall time in seconds."""
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = (len(x) + cfg.batch_size - 1) // cfg.batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch
    )
    start = time.perf_counter()
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=generator)
        for i in range(steps_per_epoch):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            xb, yb = x[idx], y[idx]
            if cfg.max_shift:
                xb = _shift(xb, cfg.max_shift, generator)
            loss = F.cross_entropy(model(xb), yb, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024) -> float:
    """Top-1 accuracy in eval mode, as a fraction."""
    model.eval()
    correct = sum(
        (model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
        for i in range(0, len(x), batch_size)
    )
    return correct / len(x)


def normalise(x: np.ndarray, meta: dict) -> torch.Tensor:
    """Apply meta's per-channel mean/std (if any) to raw inputs (S, C, ...) and return a float32 tensor."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if "mean" in meta:
        shape = (1, -1) + (1,) * (t.dim() - 2)
        t = (t - torch.tensor(meta["mean"]).view(shape)) / torch.tensor(meta["std"]).view(shape)
    return t


def _channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of (S, C, H, W) images, rounded to 4 decimals."""
    mean = x.mean(axis=(0, 2, 3), dtype=np.float64)
    std = x.std(axis=(0, 2, 3), dtype=np.float64)
    return [round(float(m), 4) for m in mean], [round(float(s), 4) for s in std]


def _fit_and_save(
    *,
    name: str,
    builder: Callable[..., nn.Module],
    arch_kwargs: dict,
    data: dict[str, np.ndarray],
    meta: dict,
    cfg: TrainConfig,
    out_dir: Path,
) -> dict:
    """Train `builder(**arch_kwargs)` on `data`, measure val accuracy, save out_dir/name.pt; returns a summary."""
    x_train, x_val = normalise(data["x_train"], meta), normalise(data["x_val"], meta)
    y_train, y_val = torch.from_numpy(data["y_train"]), torch.from_numpy(data["y_val"])
    with _deterministic(SEED):
        model = builder(**arch_kwargs)
        seconds = train(model, x_train, y_train, cfg, seed=SEED)
        val_accuracy = accuracy(model, x_val, y_val)
    meta = {
        **meta,
        "arch": f"sample_models.archs:{builder.__name__}",
        "arch_kwargs": arch_kwargs,
        "val_accuracy": round(val_accuracy, 6),
    }
    path = out_dir / f"{name}.pt"
    torch.save({"state_dict": model.state_dict(), "meta": meta}, path)
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.fc.parameters())
    return {
        "checkpoint": str(path),
        "val_accuracy": val_accuracy,
        "params": total,
        "classifier_params": head,
        "classifier_share": head / total,
        "train_seconds": seconds,
        "bytes": path.stat().st_size,
    }


def build_digits(*, out_dir: Path = HERE) -> dict:
    """sklearn's UCI digits: 8x8 images scaled to [0, 1], seeded stratified 80/20 split, small CNN.

    Args:
        out_dir: writes digits.npz and digits_cnn.pt there.

    Returns:
        A summary: checkpoint path, val_accuracy, params, classifier_params, classifier_share,
        train_seconds, bytes.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8) in [0, 1]
    y = bunch.target.astype(np.int64)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.2, stratify=y, random_state=SEED)
    data = {"x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": y_val}
    np.savez_compressed(out_dir / "digits.npz", **data)
    mean, std = _channel_stats(x_train)
    meta = {
        "input_shape": [1, 8, 8],
        "mean": mean,
        "std": std,
        "classes": [str(d) for d in range(10)],
        "dataset": "UCI handwritten digits (scikit-learn load_digits), 8x8 in [0, 1]; sample_models/digits.npz",
    }
    cfg = TrainConfig(epochs=30, lr=3e-3, batch_size=64, max_shift=1)
    return _fit_and_save(
        name="digits_cnn", builder=archs.digits_cnn, arch_kwargs={"num_classes": 10, "width": 16},
        data=data, meta=meta, cfg=cfg, out_dir=out_dir,
    )


def build_tabular(*, out_dir: Path = HERE) -> dict:
    """sklearn's breast cancer (Wisconsin diagnostic) table: 30 standardised features, 2 classes, MLP.

    Args:
        out_dir: writes tabular.npz and tabular_mlp.pt there.

    Returns:
        A summary as build_digits returns.
    """
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    bunch = load_breast_cancer()
    x = bunch.data.astype(np.float64)
    y = bunch.target.astype(np.int64)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.2, stratify=y, random_state=SEED)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)  # standardise with training statistics
    data = {
        "x_train": ((x_train - mean) / std).astype(np.float32),
        "y_train": y_train,
        "x_val": ((x_val - mean) / std).astype(np.float32),
        "y_val": y_val,
    }
    np.savez_compressed(out_dir / "tabular.npz", **data)
    meta = {
        "input_shape": [x.shape[1]],
        "classes": [str(c) for c in bunch.target_names],
        "dataset": "Breast Cancer Wisconsin (scikit-learn load_breast_cancer), standardised; sample_models/tabular.npz",
    }
    cfg = TrainConfig(epochs=60, lr=3e-3, batch_size=32, weight_decay=1e-2)
    return _fit_and_save(
        name="tabular_mlp", builder=archs.tabular_mlp,
        arch_kwargs={"in_features": x.shape[1], "num_classes": 2, "hidden": [64, 64]},
        data=data, meta=meta, cfg=cfg, out_dir=out_dir,
    )


def build_glyphs(*, out_dir: Path = HERE) -> dict:
    """1,200 Unicode glyphs rendered from seven DejaVu Sans faces; validation on the held-out eighth face.

    Args:
        out_dir: writes glyph_cnn.pt there and the rendered data to out_dir/data/glyphs.npz.

    Returns:
        A summary as build_digits returns.
    """
    return _build_glyph_model(out_dir=out_dir, large=False)


def build_glyphs_large(*, out_dir: Path = HERE) -> dict:
    """The large glyph sample: 4,191 characters of the upright Sans faces on 128 features (most parameters in fc).

    Args:
        out_dir: writes glyph_large_cnn.pt there and the rendered data to out_dir/data/glyphs_large.npz.

    Returns:
        A summary as build_digits returns.
    """
    return _build_glyph_model(out_dir=out_dir, large=True)


def _build_glyph_model(*, out_dir: Path, large: bool) -> dict:
    # (checkpoint name, data file, feature size, architecture builder)
    name, data_name, embed, builder = (("glyph_large_cnn", "glyphs_large.npz", 128, archs.glyph_large_cnn) if large
                                       else ("glyph_cnn", "glyphs.npz", 256, archs.glyph_cnn))
    path = glyphs.render_glyph_dataset(out_dir / "data" / data_name, large=large)
    val_face = glyphs.LARGE_VAL_FACE if large else glyphs.VAL_FACE
    with np.load(path) as npz:
        data = {k: npz[k] for k in ("x_train", "y_train", "x_val", "y_val")}
        classes = [str(c) for c in npz["classes"]]
    mean, std = _channel_stats(data["x_train"])
    meta = {
        "input_shape": [1, glyphs.IMAGE_SIZE, glyphs.IMAGE_SIZE],
        "mean": mean,
        "std": std,
        "classes": classes,
        "dataset": (
            f"DejaVu glyphs, {len(classes)} characters, 32x32 in [0, 1]; validation face {val_face}; "
            f"render with `python -m sample_models.glyphs{' --large' if large else ''}`"
        ),
    }
    cfg = TrainConfig(epochs=8, lr=3e-3, batch_size=128, label_smoothing=0.1)
    return _fit_and_save(
        name=name, builder=builder,
        arch_kwargs={"num_classes": len(classes), "width": 16, "embed": embed, "image_size": glyphs.IMAGE_SIZE},
        data=data, meta=meta, cfg=cfg, out_dir=out_dir,
    )


BUILDERS = {"digits": build_digits, "glyphs": build_glyphs, "glyphs-large": build_glyphs_large,
            "tabular": build_tabular}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(BUILDERS), help="rebuild one sample (default: all)")
    parser.add_argument("--out-dir", type=Path, default=HERE, help=f"where to write (default {HERE})")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in [args.only] if args.only else BUILDERS:
        summary = BUILDERS[name](out_dir=args.out_dir)
        print(
            f"{name}: val accuracy {summary['val_accuracy']:.4f}, params {summary['params']:,} "
            f"(classifier {summary['classifier_params']:,} = {summary['classifier_share']:.1%}), "
            f"trained in {summary['train_seconds']:.1f} s, {summary['bytes'] / 1e6:.2f} MB -> {summary['checkpoint']}"
        )


if __name__ == "__main__":
    main()

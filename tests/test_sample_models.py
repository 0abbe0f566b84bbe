"""The shipped sample models: checkpoints load safely, reproduce their val accuracy, glyph data is deterministic."""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sample_models import glyphs
from sample_models.build import _shift, accuracy, build_tabular, normalise

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
CHECKPOINTS = {"digits_cnn": "digits.npz", "glyph_cnn": None, "tabular_mlp": "tabular.npz"}
META_KEYS = {"input_shape", "classes", "arch", "arch_kwargs", "val_accuracy", "dataset"}
needs_fonts = pytest.mark.skipif(
    not all((glyphs.FONT_DIR / face).exists() for face in (*glyphs.TRAIN_FACES, glyphs.VAL_FACE)),
    reason="needs the DejaVu fonts (Debian fonts-dejavu-core and fonts-dejavu-extra)",
)


def _load(name: str) -> tuple[nn.Module, dict]:
    ckpt = torch.load(SAMPLES / f"{name}.pt", weights_only=True)
    meta = ckpt["meta"]
    module_name, fn_name = meta["arch"].split(":")
    model = getattr(importlib.import_module(module_name), fn_name)(**meta["arch_kwargs"])
    model.load_state_dict(ckpt["state_dict"])  # strict: every key matches
    return model.eval(), meta


def _plain(value: object) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return isinstance(value, str | int | float | bool)


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_checkpoint_loads_with_weights_only_into_its_arch(name: str) -> None:
    model, meta = _load(name)
    assert meta.keys() >= META_KEYS
    assert _plain(meta)
    assert meta["arch"] == f"sample_models.archs:{name}"
    assert isinstance(model.fc, nn.Linear)
    assert model.fc.out_features == len(meta["classes"]) == len(set(meta["classes"]))
    assert (SAMPLES / f"{name}.pt").stat().st_size < 4_000_000
    out = model(torch.zeros(3, *meta["input_shape"]))
    assert out.shape == (3, len(meta["classes"]))


@pytest.mark.parametrize("name", ["digits_cnn", "tabular_mlp"])
def test_shipped_data_reproduces_val_accuracy(name: str) -> None:
    model, meta = _load(name)
    with np.load(SAMPLES / CHECKPOINTS[name]) as data:
        x_val, y_val = normalise(data["x_val"], meta), torch.from_numpy(data["y_val"])
        assert data["x_train"].dtype == np.float32 and data["y_train"].dtype == np.int64
        assert len(data["x_train"]) > len(data["x_val"]) > 0
    assert list(x_val.shape[1:]) == meta["input_shape"]
    # one sample of tolerance for float differences between machines
    assert accuracy(model, x_val, y_val) == pytest.approx(meta["val_accuracy"], abs=1.01 / len(y_val))


def test_digits_data_in_unit_range_and_normalised_by_meta() -> None:
    _, meta = _load("digits_cnn")
    with np.load(SAMPLES / "digits.npz") as data:
        x_train = data["x_train"]
    assert x_train.shape[1:] == (1, 8, 8)
    assert x_train.min() == 0.0 and x_train.max() == 1.0
    assert meta["mean"] == [pytest.approx(float(x_train.mean()), abs=1e-4)]
    assert meta["std"] == [pytest.approx(float(x_train.std()), abs=1e-4)]
    assert meta["val_accuracy"] >= 0.98


def test_tabular_data_is_standardised() -> None:
    _, meta = _load("tabular_mlp")
    assert "mean" not in meta and "std" not in meta  # the .npz is already standardised
    with np.load(SAMPLES / "tabular.npz") as data:
        x_train = data["x_train"]
    assert x_train.shape[1] == meta["input_shape"][0] == 30
    np.testing.assert_allclose(x_train.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(x_train.std(axis=0), 1.0, atol=1e-4)


def test_rebuilding_the_tabular_sample_reproduces_the_shipped_files(tmp_path: Path) -> None:
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    summary = build_tabular(out_dir=tmp_path)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, strict)
    with np.load(SAMPLES / "tabular.npz") as shipped, np.load(tmp_path / "tabular.npz") as rebuilt:
        assert shipped.files == rebuilt.files
        for key in shipped.files:
            np.testing.assert_array_equal(shipped[key], rebuilt[key])
    old = torch.load(SAMPLES / "tabular_mlp.pt", weights_only=True)
    new = torch.load(tmp_path / "tabular_mlp.pt", weights_only=True)
    assert {k: v for k, v in new["meta"].items() if k != "val_accuracy"} == {
        k: v for k, v in old["meta"].items() if k != "val_accuracy"
    }
    assert new["meta"]["val_accuracy"] == pytest.approx(old["meta"]["val_accuracy"], abs=1.01 / 114)
    assert summary["params"] == 6274 and summary["classifier_params"] == 130
    # bit-identical with the same torch build; loose bound for other CPUs' kernels
    for key, value in old["state_dict"].items():
        torch.testing.assert_close(new["state_dict"][key], value, atol=1e-3, rtol=1e-3)


def test_shift_translates_each_image_with_zero_fill() -> None:
    x = torch.arange(1.0, 1 + 5 * 2 * 4 * 4).view(5, 2, 4, 4)
    out = _shift(x, 1, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for i in range(5):
        # some (dy, dx) in [-1, 1]^2 maps the image onto the output, the same for both channels
        matches = [
            (dy, dx)
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if torch.equal(out[i], torch.nn.functional.pad(x[i], (1, 1, 1, 1))[:, 1 + dy : 5 + dy, 1 + dx : 5 + dx])
        ]
        assert len(matches) == 1


def test_glyph_classifier_is_at_least_half_the_parameters() -> None:
    model, meta = _load("glyph_cnn")
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.fc.parameters())
    assert len(meta["classes"]) >= 1000
    assert head == len(meta["classes"]) * (model.fc.in_features + 1)
    assert head / total >= 0.5


def test_glyph_classes_file_matches_checkpoint() -> None:
    _, meta = _load("glyph_cnn")
    classes = glyphs.load_glyph_classes()
    assert classes == meta["classes"]
    assert all(len(c) == 1 for c in classes) and len(set(classes)) == len(classes)
    assert sum(c in classes for c in "A\u0391\u0410") == 1  # Latin A, Greek Alpha, Cyrillic A: one class


@needs_fonts
def test_font_codepoints_reads_the_cmap() -> None:
    cps = glyphs.font_codepoints(glyphs.FONT_DIR / "DejaVuSans.ttf")
    assert {ord("A"), ord("\u03a9"), ord("\u0416")} <= cps  # Latin, Greek, Cyrillic
    assert ord("\u4e2d") not in cps  # CJK is not in DejaVu
    assert all(ord(c) in cps for c in glyphs.load_glyph_classes())


@needs_fonts
def test_glyph_rendering_is_deterministic() -> None:
    chars = glyphs.load_glyph_classes()[::100]  # 12 classes
    faces = glyphs.TRAIN_FACES[:2]
    x1, y1 = glyphs.render_glyphs(chars, faces, copies=3, clean_first=True, seed=5)
    x2, y2 = glyphs.render_glyphs(chars, faces, copies=3, clean_first=True, seed=5)
    x3, _ = glyphs.render_glyphs(chars, faces, copies=3, clean_first=True, seed=6)
    assert x1.shape == (2 * 12 * 3, 1, 32, 32) and x1.dtype == np.float32
    assert hashlib.sha256(x1.tobytes()).digest() == hashlib.sha256(x2.tobytes()).digest()
    assert np.array_equal(y1, y2) and y1.tolist() == [k for _ in faces for k in range(12) for _ in range(3)]
    assert not np.array_equal(x1, x3)  # the seed drives the augmentation
    assert np.array_equal(x1[::3], x3[::3])  # the clean first copies do not depend on it
    assert x1.min() >= 0.0 and x1.max() <= 1.0 and (x1.reshape(len(x1), -1).max(axis=1) > 0.5).all()


@needs_fonts
def test_render_glyphs_refuses_a_character_missing_from_a_face() -> None:
    with pytest.raises(ValueError, match="U\\+4E2D"):
        glyphs.render_glyphs(["a", "\u4e2d"], glyphs.TRAIN_FACES[:1], copies=1, clean_first=True, seed=0)


@pytest.mark.slow
@needs_fonts
def test_render_glyph_dataset_writes_the_npz(tmp_path: Path) -> None:
    chars = ["a", "\u0416", "\u2192"]
    out = glyphs.render_glyph_dataset(tmp_path / "sub" / "g.npz", classes=chars, train_copies=2, val_copies=2)
    with np.load(out) as data:
        assert data["x_train"].shape == (len(glyphs.TRAIN_FACES) * 3 * 2, 1, 32, 32)
        assert data["x_val"].shape == (3 * 2, 1, 32, 32)
        assert data["classes"].tolist() == chars
        assert data["y_val"].tolist() == [0, 0, 1, 1, 2, 2]


@pytest.fixture(scope="module")
def glyph_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    path = glyphs.render_glyph_dataset(tmp_path_factory.mktemp("glyphs") / "glyphs.npz")
    with np.load(path) as data:
        return {k: data[k] for k in ("x_val", "y_val", "classes")}


@pytest.mark.slow
@needs_fonts
def test_generated_glyph_data_reproduces_val_accuracy(glyph_data: dict[str, np.ndarray]) -> None:
    model, meta = _load("glyph_cnn")
    assert glyph_data["classes"].tolist() == meta["classes"]
    x_val, y_val = normalise(glyph_data["x_val"], meta), torch.from_numpy(glyph_data["y_val"])
    assert accuracy(model, x_val, y_val) == pytest.approx(meta["val_accuracy"], abs=0.005)


@needs_fonts
def test_glyph_classes_render_distinctly(glyph_data: dict[str, np.ndarray]) -> None:
    # the first val copy of each class is its clean rendering in the held-out face: (C, 1024)
    x = glyph_data["x_val"][::2].reshape(len(glyph_data["classes"]), -1).astype(np.float64)
    sq = (x**2).sum(axis=1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0) / x.shape[1])  # RMS, (C, C)
    np.fill_diagonal(dist, np.inf)
    assert dist.min() > 0.02

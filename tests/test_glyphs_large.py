"""The large glyph sample: class list, checkpoint, rendering of characters some faces lack, val accuracy."""

from __future__ import annotations

import collections
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

from sample_models import archs, glyphs
from sample_models.build import accuracy, normalise

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "sample_models" / "glyph_large_cnn.pt"

pytestmark = pytest.mark.skipif(
    not all((glyphs.FONT_DIR / f).exists() for f in (*glyphs.LARGE_TRAIN_FACES, glyphs.LARGE_VAL_FACE)),
    reason="needs the DejaVu fonts (fonts-dejavu-core, fonts-dejavu-extra)",
)


def _load() -> tuple[torch.nn.Module, dict]:
    ckpt = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    model = archs.glyph_large_cnn()  # the builder's defaults are the shipped architecture
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt["meta"]


def test_class_list_is_several_thousand_characters_of_four_faces_and_the_checkpoint_matches():
    classes = glyphs.load_glyph_classes(glyphs.LARGE_CLASSES_FILE)
    assert len(classes) == len(set(classes)) > 4000
    assert [ord(c) for c in classes] == sorted(ord(c) for c in classes)  # code point order
    for face in glyphs.LARGE_SELECT_FACES:  # mapped by the four upright Sans faces (so >= 4 Sans faces)
        mapped = glyphs.font_codepoints(glyphs.FONT_DIR / face)
        assert all(ord(c) in mapped for c in classes)
    assert glyphs.LARGE_VAL_FACE in glyphs.LARGE_SELECT_FACES and glyphs.LARGE_VAL_FACE not in glyphs.LARGE_TRAIN_FACES
    assert all(unicodedata.category(c)[0] in "LNPS" for c in classes)
    _, meta = _load()
    assert meta["classes"] == classes and meta["arch"] == "sample_models.archs:glyph_large_cnn"


def test_classifier_is_most_of_the_parameters_and_the_file_stays_small():
    model, meta = _load()
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.fc.parameters())
    assert model.fc.in_features == 128 and model.fc.out_features == len(meta["classes"])
    assert head / total > 0.7
    assert CHECKPOINT.stat().st_size < 3_500_000


def test_faces_without_a_character_skip_it():
    classes = glyphs.load_glyph_classes(glyphs.LARGE_CLASSES_FILE)
    oblique = glyphs.font_codepoints(glyphs.FONT_DIR / "DejaVuSans-Oblique.ttf")
    some = [c for c in classes if ord(c) in oblique][:3] + [c for c in classes if ord(c) not in oblique][:2]
    faces = ("DejaVuSans.ttf", "DejaVuSans-Oblique.ttf")
    with pytest.raises(ValueError, match="has no glyph"):
        glyphs.render_glyphs(some, faces, copies=2, clean_first=False, seed=0)
    x, y = glyphs.render_glyphs(some, faces, copies=2, clean_first=False, seed=0, skip_missing=True)
    counts = collections.Counter(y.tolist())
    assert counts == {0: 4, 1: 4, 2: 4, 3: 2, 4: 2}  # the upright face has all five, the oblique three
    assert x.shape == (16, 1, 32, 32) and float(x.max()) <= 1.0


@pytest.mark.slow
def test_generated_validation_face_reproduces_the_checkpoint_accuracy():
    model, meta = _load()
    classes = meta["classes"]
    # the validation split exactly as render_glyph_dataset(large=True) draws it (seed 0 + 1)
    x_val, y_val = glyphs.render_glyphs(classes, (glyphs.LARGE_VAL_FACE,), copies=2, clean_first=True, seed=1)
    torch.set_num_threads(1)
    acc = accuracy(model, normalise(x_val, meta), torch.from_numpy(y_val))
    assert acc == pytest.approx(meta["val_accuracy"], abs=1e-6)
    assert acc > 0.95
    assert np.array_equal(np.bincount(y_val), np.full(len(classes), 2))

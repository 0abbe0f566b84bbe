"""Tests of fyc_convert.data.transforms: against torchvision when it is installed, and properties that hold anywhere."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from fyc_convert.data.transforms import (
    CROP_RATIO,
    CROP_SCALE,
    EvalTransform,
    Normalize,
    TrainTransform,
    center_crop_box,
    random_resized_crop_box,
    resize_for_eval,
)

SIZES = [(320, 240), (240, 320), (100, 77), (64, 64), (500, 301)]  # (width, height)


def _noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


# ------------------------------------------------------------------------------------------ the reference

@pytest.mark.parametrize(("w", "h"), SIZES)
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_eval_transform_equals_torchvision(w, h, interpolation):
    T = pytest.importorskip("torchvision.transforms")
    img = _noise(w, h)
    for crop_pct in (0.875, 0.9, 1.0):
        ref = T.Compose([T.Resize(math.floor(56 / crop_pct), interpolation=T.InterpolationMode(interpolation)),
                         T.CenterCrop(56), T.PILToTensor()])(img)
        mine = EvalTransform((56, 56), crop_pct=crop_pct, interpolation=interpolation)(img)
        assert torch.equal(mine, ref)


@pytest.mark.parametrize(("w", "h"), SIZES)
def test_train_crop_equals_torchvision_resized_crop_of_the_same_box(w, h):
    F = pytest.importorskip("torchvision.transforms.functional")
    img = _noise(w, h)
    for seed in range(5):
        left, top, right, bottom = random_resized_crop_box(w, h, random.Random(seed))
        ref = F.pil_to_tensor(F.resized_crop(img, top, left, bottom - top, right - left, [24, 32]))
        mine = TrainTransform((24, 32), interpolation="bilinear", flip=False)(img, random.Random(seed))
        assert torch.equal(mine, ref)


def test_normalize_equals_torchvision():
    T = pytest.importorskip("torchvision.transforms")
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    ref = T.Normalize(mean, std)(x.float() / 255)
    torch.testing.assert_close(Normalize(scale=1 / 255, mean=mean, std=std, sample_shape=(3, 5, 5))(x), ref)


# ------------------------------------------------------------------------------------------ properties

def test_normalize_matches_the_formula_per_channel_scalar_and_per_element():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    xf = x.numpy().astype(np.float64) / 255
    mean, std = np.array([0.1, 0.2, 0.3]), np.array([0.5, 0.25, 2.0])
    out = Normalize(scale=1 / 255, mean=mean.tolist(), std=std.tolist(), sample_shape=(3, 4, 4))(x)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), (xf - mean[:, None, None]) / std[:, None, None], rtol=1e-5, atol=1e-6)
    out = Normalize(scale=1 / 255, mean=[0.5], std=[0.25], sample_shape=(3, 4, 4))(x)
    np.testing.assert_allclose(out.numpy(), (xf - 0.5) / 0.25, rtol=1e-5, atol=1e-6)
    per_element = np.linspace(0, 1, 48)
    out = Normalize(mean=per_element.tolist(), sample_shape=(3, 4, 4))(x.float())
    np.testing.assert_allclose(out.numpy(), x.numpy() - per_element.reshape(3, 4, 4), rtol=1e-5, atol=1e-5)
    assert Normalize().identity and not Normalize(scale=0.5).identity


def test_center_crop_box_is_centred():
    assert center_crop_box(10, 8, (4, 6)) == (2, 2, 8, 6)
    assert center_crop_box(11, 9, (4, 4)) == (4, 2, 8, 6)  # round((11 - 4) / 2) = 4 (banker's rounding of 3.5)


def test_eval_resize_follows_timm():
    img = _noise(320, 240)
    assert resize_for_eval(img, (224, 224), crop_pct=0.875, interpolation="bilinear").size == (341, 256)
    assert resize_for_eval(img, (100, 200), crop_pct=0.5, interpolation="bilinear").size == (400, 200)  # (H, W) / pct
    assert resize_for_eval(img, (240, 240), crop_pct=1.0, interpolation="bilinear") is img  # already at size


def test_eval_transform_keeps_images_at_the_input_size_and_gray_channels():
    img = _noise(8, 8, mode="L", seed=1)
    out = EvalTransform((8, 8), crop_pct=1.0, interpolation="bicubic")(img)
    assert out.shape == (1, 8, 8) and out.dtype == torch.uint8
    assert torch.equal(out[0], torch.from_numpy(np.array(img)))  # untouched


@pytest.mark.parametrize(("w", "h"), SIZES)
def test_random_resized_crop_box_stays_in_bounds_with_area_and_ratio_in_range(w, h):
    for seed in range(200):
        left, top, right, bottom = random_resized_crop_box(w, h, random.Random(seed))
        cw, ch = right - left, bottom - top
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
        if (cw, ch) != (w, h):  # not the fallback (whole image, or the ratio-clamped central crop)
            assert CROP_SCALE[0] * 0.9 <= cw * ch / (w * h) <= CROP_SCALE[1] * 1.05
            assert CROP_RATIO[0] * 0.9 <= cw / ch <= CROP_RATIO[1] * 1.1


def test_random_resized_crop_falls_back_to_the_central_crop():
    class Never(random.Random):  # every try asks for a crop larger than the image
        def uniform(self, a, b):
            return b * 4 if a == CROP_SCALE[0] else 0.0

    assert random_resized_crop_box(100, 10, Never(0)) == (43, 0, 56, 10)  # wide image: ratio clamped to 4/3


def test_train_transform_is_seeded_per_sample_and_flips_half_the_time():
    img = _noise(64, 48)
    tf = TrainTransform((16, 16), interpolation="bilinear")
    a, b = tf(img, random.Random(7)), tf(img, random.Random(7))
    assert a.shape == (3, 16, 16) and torch.equal(a, b)
    outs = [tf(img, random.Random(s)) for s in range(40)]
    assert len({o.numpy().tobytes() for o in outs}) == 40
    # with the crop fixed by the seed, flip=True gives either the unflipped crop or its mirror image
    no_flip = TrainTransform((16, 16), interpolation="bilinear", flip=False)
    flipped = [not torch.equal(tf(img, random.Random(s)), no_flip(img, random.Random(s))) for s in range(40)]
    assert all(torch.equal(tf(img, random.Random(s)), no_flip(img, random.Random(s)).flip(-1))
               for s in range(40) if flipped[s])
    assert 8 <= sum(flipped) <= 32

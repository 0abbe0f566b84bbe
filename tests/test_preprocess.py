"""Tests of fyc_convert.data.preprocess: the order of sources, timm / HF conventions by duck typing, errors."""

from __future__ import annotations

import pytest
from torch import nn

from fyc_convert.data.datasets import DataOptions
from fyc_convert.data.preprocess import Preprocessing, resolve_preprocessing
from fyc_convert.errors import DataError

TIMM_CFG = {"input_size": (3, 160, 160), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "crop_pct": 0.95, "interpolation": "bicubic", "num_classes": 10}


class _TimmLike(nn.Module):
    """A stand-in of a timm model: carries `pretrained_cfg` (and `default_cfg`, the same dict)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.fc = nn.Linear(4, 10)
        self.pretrained_cfg = cfg
        self.default_cfg = cfg


class _OldTimmLike(nn.Module):
    """Older timm: only `default_cfg`."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.default_cfg = cfg


class _HFConfig:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class _HFLike(nn.Module):
    """A stand-in of a Hugging Face image model: `model.config` with image_size / num_channels."""

    def __init__(self, **kw):
        super().__init__()
        self.config = _HFConfig(**kw)


def test_nothing_known_gives_the_defaults():
    p = resolve_preprocessing()
    assert p == Preprocessing()
    assert (p.input_shape, p.mean, p.std, p.crop_pct, p.interpolation, p.augment) == (None, None, None, 1.0,
                                                                                      "bilinear", None)
    assert p.sources == {}
    assert p.describe()["crop_pct"] == {"value": 1.0, "source": "default"}


def test_timm_pretrained_cfg_is_read():
    p = resolve_preprocessing(model=_TimmLike(TIMM_CFG))
    assert p.input_shape == (3, 160, 160)
    assert p.mean == (0.485, 0.456, 0.406) and p.std == (0.229, 0.224, 0.225)
    assert (p.crop_pct, p.interpolation) == (0.95, "bicubic")
    assert set(p.sources.values()) == {"model.pretrained_cfg"}
    assert resolve_preprocessing(model=_OldTimmLike(TIMM_CFG)).sources["mean"] == "model.default_cfg"


def test_each_value_from_the_first_source_that_has_it():
    meta = {"input_shape": [3, 96, 96], "mean": [0.5, 0.5, 0.5], "augment": False}
    opts = DataOptions(std=(0.25,), crop_pct=0.8)
    p = resolve_preprocessing(opts, meta=meta, model=_TimmLike(TIMM_CFG))
    assert p.std == (0.25,) and p.crop_pct == 0.8  # options
    assert p.input_shape == (3, 96, 96) and p.mean == (0.5, 0.5, 0.5) and p.augment is False  # meta
    assert p.interpolation == "bicubic"  # the model's config
    assert p.sources == {"std": "option", "crop_pct": "option", "input_shape": "checkpoint meta",
                         "mean": "checkpoint meta", "augment": "checkpoint meta",
                         "interpolation": "model.pretrained_cfg"}


def test_hugging_face_config_and_image_processor():
    model = _HFLike(image_size=64, num_channels=1)
    processor = {"do_normalize": True, "image_mean": [0.5], "image_std": [0.5], "resample": 3,
                 "size": {"shortest_edge": 73}, "crop_size": {"height": 64, "width": 64}, "do_center_crop": True}
    p = resolve_preprocessing(model=model, preprocessor_config=processor)
    assert p.input_shape == (1, 64, 64) and p.sources["input_shape"] == "model.config"
    assert (p.mean, p.std, p.interpolation) == ((0.5,), (0.5,), "bicubic")
    assert p.crop_pct == pytest.approx(64 / 73) and p.sources["crop_pct"] == "preprocessor_config"
    # ConvNeXt-style: crop_pct given; ViT-style: resize to height x width, no crop
    assert resolve_preprocessing(preprocessor_config={"crop_pct": 0.875, "size": {"shortest_edge": 224}}
                                 ).crop_pct == 0.875
    vit = resolve_preprocessing(preprocessor_config={"size": {"height": 32, "width": 48}, "do_normalize": False,
                                                     "image_mean": [0.1], "image_std": [0.2]})
    assert vit.input_shape == (3, 32, 48) and vit.mean is None and vit.crop_pct == 1.0
    # an (H, W) image_size and a model config without image_size (e.g. a text model)
    assert resolve_preprocessing(model=_HFLike(image_size=(30, 40), num_channels=3)).input_shape == (3, 30, 40)
    assert resolve_preprocessing(model=_HFLike(hidden_size=8)).input_shape is None


def test_a_real_tiny_transformers_model_built_from_a_config():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32, num_labels=5)
    model = transformers.ViTForImageClassification(config)
    p = resolve_preprocessing(model=model)
    assert p.input_shape == (3, 32, 32) and p.sources["input_shape"] == "model.config"
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    p = resolve_preprocessing(model=model, preprocessor_config=processor.to_dict())
    assert p.mean == tuple(processor.image_mean) and p.std == tuple(processor.image_std)
    assert p.interpolation == "bilinear"  # ViTImageProcessor's resample is PIL bilinear (2)


@pytest.mark.parametrize(("kw", "message"), [
    ({"std": (0.5, 0.0, 0.5)}, r"std \[0.5, 0.0, 0.5\] contains a value <= 0; pass a positive --std"),
    ({"mean": ("a",)}, r"mean \('a',\) is not a list of numbers; pass --mean"),
    ({"crop_pct": 1.5}, r"crop_pct 1.5 must be in \(0, 1\]; pass e.g. --crop-pct 0.875"),
    ({"interpolation": "cubic"}, r"unknown interpolation 'cubic'; pass --interpolation with one of nearest"),
    ({"input_shape": (3, 0, 4)}, r"is not a shape; pass --input-shape C,H,W"),
    ({"input_shape": (3, 8, 8), "mean": (0.1, 0.2)},
     r"mean has 2 values \(from option\) but the input has 3 channels .*pass --mean with 3 values"),
])
def test_bad_values_name_the_option(kw, message):
    with pytest.raises(DataError, match=message):
        resolve_preprocessing(DataOptions(**kw))


def test_bad_values_from_meta_or_model_name_their_source():
    with pytest.raises(DataError, match=r"crop_pct 0 \(from checkpoint meta\) must be in"):
        resolve_preprocessing(meta={"crop_pct": 0})
    with pytest.raises(DataError, match=r"unknown interpolation 'fancy' \(from model.pretrained_cfg\)"):
        resolve_preprocessing(model=_TimmLike({**TIMM_CFG, "interpolation": "fancy"}))

"""The ImageFolder workflow end to end: a timm-style model (its preprocessing in `pretrained_cfg`) converted,
fine-tuned on a train/val folder of JPEGs with workers, exported and verified, the preprocessing in the report."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from image_folders import TINY_TIMM_ARCH as ARCH
from image_folders import write_class_folders

from fyc_convert import convert
from fyc_convert.report import preprocessing_line


@pytest.mark.slow  # end to end: convert, fine-tune with workers, export, verify
def test_timm_style_model_on_a_train_val_jpeg_folder(tmp_path: Path) -> None:
    (tmp_path / "tiny_timm.py").write_text(ARCH)
    arch = f"{tmp_path / 'tiny_timm.py'}:build"
    spec = importlib.util.spec_from_file_location("tiny_timm", tmp_path / "tiny_timm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the same builder, to make the trained checkpoint
    torch.manual_seed(0)
    torch.save(module.build().state_dict(), tmp_path / "tiny.pt")
    data = tmp_path / "images"
    write_class_folders(data / "train", ["w", "x", "y", "z"], 10, size=(40, 30), ext=".jpg", noise=10)
    write_class_folders(data / "val", ["w", "x", "y", "z"], 3, size=(40, 30), ext=".jpg", noise=10, start=20)

    report = convert(tmp_path / "tiny.pt", arch=arch, data=data, epochs=1, batch_size=8,
                     output_dir=tmp_path / "out", device="cpu")
    assert report.status == "ok"
    assert report.accuracy.measured_on == "val, 12 samples"
    assert report.accuracy.finetuned is not None and report.onnx.max_abs_diff < 1e-4
    prep = report.preprocessing
    assert prep["input_shape"] == {"value": [3, 24, 24], "source": "model.pretrained_cfg"}
    assert prep["crop_pct"] == {"value": 0.875, "source": "model.pretrained_cfg"}
    assert prep["interpolation"] == {"value": "bicubic", "source": "model.pretrained_cfg"}
    assert prep["augment"]["value"] is True and prep["augment"]["source"] == "default (image folder)"
    assert prep["resize"] == {"value": 27, "source": "input size / crop_pct (model.pretrained_cfg)"}  # 24 / 0.875
    assert report.classes == {"names": ["w", "x", "y", "z"], "source": "data"}  # the class folders
    assert report.input["layout"] == "NCHW" and report.input["range"] == [0, 1]
    line = preprocessing_line(report)
    assert "input 3x24x24 (model.pretrained_cfg)" in line and "crop 0.875 (model.pretrained_cfg)" in line
    assert "bicubic" in line and "augment on" in line
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    prep = saved["training"]["data"]["preprocessing"]
    assert prep["mean"] == {"value": [0.5, 0.5, 0.5], "source": "model.pretrained_cfg"}
    assert saved["training"]["data"]["kind"] == "images" and saved["training"]["data"]["workers"] >= 1
    assert saved["training"]["data"]["skipped_images"] == 0

"""Outputs that say how to use them (issue 22): class names, the usage metadata of both ONNX files and
report.json, the printed "feed:" line, --embed-preprocessing, and the small output fixes (0644, --report in a
new -o folder, "1 class")."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file
from torch import nn

from fyc_convert import convert
from fyc_convert.data.classes import ClassNames, meta_classes_source, resolve_classes
from fyc_convert.data.datasets import DataBundle, check_data
from fyc_convert.data.preprocess import Preprocessing
from fyc_convert.errors import DataError, ExportError, OptionsError
from fyc_convert.export.embed import Normalized, embed_preprocessing
from fyc_convert.export.model_card import (
    feed_line,
    input_spec,
    observed_range,
    read_model_card,
    snap_range,
    with_resize,
)
from fyc_convert.files import atomic_path
from fyc_convert.model.loading import load_model
from fyc_convert.model.weights import load_converted
from fyc_convert.options import ConvertOptions, check_options
from fyc_convert.report import render

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_models" / "digits_cnn.pt"
DATA = ROOT / "sample_models" / "digits.npz"
ARCH = "sample_models.archs:digits_cnn"
DIGITS = [str(d) for d in range(10)]


def _meta() -> dict:
    return torch.load(SAMPLE, weights_only=True)["meta"]


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory):
    """A digits conversion whose -o folder does not exist yet, with --report inside it."""
    out = tmp_path_factory.mktemp("outputs") / "new"
    report = convert(SAMPLE, arch=ARCH, data=DATA, epochs=0, output_dir=out, report_path=out / "report.json",
                     device="cpu")
    return out, report


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("outputs") / "embedded"
    report = convert(SAMPLE, arch=ARCH, data=DATA, epochs=0, output_dir=out, embed_preprocessing=True, bench=True,
                     device="cpu")
    return out, report


# ---------------------------------------------------------------------------------------------- conversions


def test_both_onnx_files_carry_classes_input_and_preprocessing(plain) -> None:
    out, report = plain
    meta = _meta()
    for name in ("model.onnx", "original.onnx"):
        card = read_model_card(out / name)
        assert card["classes"] == DIGITS and card["classes_source"] == "checkpoint meta", name
        assert card["input"] == {"name": "input", "dtype": "float32", "layout": "NCHW", "shape": ["N", 1, 8, 8],
                                 "range": [0, 1], "normalization": "caller"}
        prep = card["preprocessing"]
        assert prep["mean"] == {"value": meta["mean"], "source": "checkpoint meta"}
        assert prep["std"] == {"value": meta["std"], "source": "checkpoint meta"}
        assert prep["resize"]["value"] == 8 and prep["crop_pct"]["value"] == 1.0
        assert prep["interpolation"]["value"] == "bilinear"
    # report.json holds the same values
    saved = json.loads((out / "report.json").read_text())
    assert saved["classes"] == {"names": DIGITS, "source": "checkpoint meta"}
    assert saved["input"] == card["input"] and saved["preprocessing"] == card["preprocessing"]
    assert report.classes == saved["classes"]


def test_report_in_the_new_output_folder_and_outputs_0644(plain) -> None:
    out, _ = plain
    assert (out / "report.json").is_file() and (out / "model.onnx").is_file()
    umask = os.umask(0)
    os.umask(umask)
    for f in ("model.onnx", "original.onnx", "model.safetensors", "report.json"):
        assert (out / f).stat().st_mode & 0o777 == 0o666 & ~umask, f


def test_printed_report_says_in_one_line_what_to_feed(plain) -> None:
    _, report = plain
    buf = io.StringIO()
    render(report, Console(file=buf, width=80, color_system=None))
    lines = buf.getvalue().splitlines()
    feed = [line for line in lines if line.startswith("feed: ")]
    assert feed == ["feed: input float32 N×1×8×8, values in [0, 1] minus mean 0.3054, divided by std 0.3761 "
                    "(resize 8, centre crop 8×8, bilinear)"]
    assert "classes: 10 (0, 1, 2, …, 9) from checkpoint meta" in lines
    assert read_model_card(plain[0] / "model.onnx")["feed"] == feed[0][len("feed: "):]


def test_plain_graph_needs_normalised_inputs(plain) -> None:
    """Without --embed-preprocessing model.onnx is fed (x - mean) / std, as the feed line says."""
    out, _ = plain
    x = np.load(DATA)["x_val"].astype(np.float32)
    meta = _meta()
    norm = (x - meta["mean"][0]) / meta["std"][0]
    model = load_converted(load_model(SAMPLE, arch=ARCH).model, out / "model.safetensors").eval()
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": norm.astype(np.float32)})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(norm.astype(np.float32))).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_embedded_graph_fed_pixels_matches_pytorch_fed_normalised_on_every_val_row(embedded) -> None:
    out, report = embedded
    assert report.status == "ok" and report.onnx.max_abs_diff < 1e-4
    assert report.input["normalization"] == "graph" and report.input["range"] == [0, 1]
    assert report.latency_ms["model_b1"]["converted"] > 0  # --bench ran on the embedded graphs
    x = np.load(DATA)["x_val"].astype(np.float32)  # (360, 1, 8, 8) pixels in [0, 1]
    meta = _meta()
    norm = torch.from_numpy((x - meta["mean"][0]) / meta["std"][0]).float()
    converted = load_converted(load_model(SAMPLE, arch=ARCH).model, out / "model.safetensors").eval()
    original = load_model(SAMPLE, arch=ARCH).model.eval()
    for name, model in (("model.onnx", converted), ("original.onnx", original)):
        card = read_model_card(out / name)
        assert card["input"]["normalization"] == "graph" and card["classes"] == DIGITS
        sess = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"input": x})[0]
        with torch.no_grad():
            want = model(norm).numpy()
        assert len(got) == 360
        np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # the safetensors file is the model itself (no wrapper): load_converted and the head's name are unchanged
    assert report.layer == "fc"


# ---------------------------------------------------------------------------------------------- Normalized


def test_normalized_per_channel_uint8_and_to_raw() -> None:
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    wrapped = Normalized(inner, mean=mean, std=std, scale=1 / 255, sample_shape=(3, 6, 6))
    pixels = torch.randint(0, 256, (2, 3, 6, 6)).float()
    norm = (pixels / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(wrapped(pixels), inner(norm))
    torch.testing.assert_close(wrapped.to_raw(norm), pixels, atol=1e-4, rtol=0)
    assert "mean" not in wrapped.state_dict()  # not persistent: the saved weights are the model's own


def test_embed_prefixes_head_layers_and_checks_stats() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    emb = embed_preprocessing(model, model, head_layers=["1"], mean=[0.5], std=None, pixel_range="0-255",
                              sample_shape=(3, 2, 2))
    assert emb.head_layers == ["model.1"] and emb.converted.get_submodule("model.1") is model[1]
    x = torch.rand(4, 3, 2, 2)
    torch.testing.assert_close(emb.converted(x * 255), model(x - 0.5))
    with pytest.raises(ExportError, match="mean has 2 values"):
        embed_preprocessing(model, model, head_layers=["1"], mean=[0.1, 0.2], std=None, pixel_range="0-1",
                            sample_shape=(3, 2, 2))
    with pytest.raises(ExportError, match="pass one of 0-1, 0-255"):
        embed_preprocessing(model, model, head_layers=["1"], mean=None, std=None, pixel_range="0-256",
                            sample_shape=(3, 2, 2))


# ---------------------------------------------------------------------------------------------- class names


def test_class_sources_in_order(tmp_path: Path) -> None:
    ckpt = tmp_path / "net.pt"
    ckpt.write_bytes(b"")
    (tmp_path / "classes.txt").write_text("cat\ndog\nbig bird\n\n")
    from_file = resolve_classes(3, checkpoint=ckpt)
    assert from_file == (ClassNames(("cat", "dog", "big bird"), str(tmp_path / "classes.txt")), [])
    data = resolve_classes(3, data_classes=["a", "b", "c"], checkpoint=ckpt)[0]
    assert data == ClassNames(("a", "b", "c"), "data")
    meta = resolve_classes(3, meta={"classes": {"1": "y", "0": "x", "2": "z"}}, data_classes=["a", "b", "c"])[0]
    assert meta == ClassNames(("x", "y", "z"), "checkpoint meta")
    hf = resolve_classes(3, meta={"classes": ["p", "q", "r"]}, meta_source=meta_classes_source("huggingface"))[0]
    assert hf.source == "config.id2label" and meta_classes_source("checkpoint") == "checkpoint meta"


def test_class_list_named_after_the_checkpoint_and_wrong_counts(tmp_path: Path) -> None:
    ckpt = tmp_path / "glyph.pt"
    ckpt.write_bytes(b"")
    (tmp_path / "glyph_classes.txt").write_text("a\nb\n")
    names, notes = resolve_classes(2, meta={"classes": ["only one"]}, checkpoint=ckpt)
    assert names == ClassNames(("a", "b"), str(tmp_path / "glyph_classes.txt"))
    assert notes == ["class names from checkpoint meta ignored: 1 name for a classifier with 2 outputs"]
    assert resolve_classes(5, checkpoint=ckpt)[0] is None
    assert resolve_classes(2) == (None, [])


def test_unreadable_class_list_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="UTF-8 text, one class name a line"):
        resolve_classes(2, checkpoint=tmp_path / "m.pt")


# ---------------------------------------------------------------------------------------------- model card


def test_feed_line_forms() -> None:
    prep = with_resize({"input_shape": {"value": [3, 224, 224], "source": "option"},
                        "mean": {"value": [0.485, 0.456, 0.406], "source": "option"},
                        "std": {"value": [0.229, 0.224, 0.225], "source": "option"},
                        "crop_pct": {"value": 0.875, "source": "option"},
                        "interpolation": {"value": "bicubic", "source": "option"}})
    assert prep["resize"] == {"value": 256, "source": "input size / crop_pct (option)"}
    spec = input_spec(name="input", input_shape=(3, 224, 224), value_range=[0, 255], in_graph=True, static_batch=1)
    assert spec["shape"] == [1, 3, 224, 224] and spec["layout"] == "NCHW"
    assert feed_line(spec, prep) == ("input float32 1×3×224×224, values in [0, 255], normalised inside the graph "
                                     "(resize 256, centre crop 224×224, bicubic)")
    vec = input_spec(name="input", input_shape=(30,), value_range=None, in_graph=False)
    assert vec["layout"] == "NC"
    assert feed_line(vec, with_resize({"input_shape": {"value": [30], "source": "data"}})) == \
        "input float32 N×30, values as in the training data"


@pytest.mark.parametrize(("low", "high", "snapped"), [(0.0, 1.0, [0, 1]), (0.0, 0.5, [0, 1]), (0, 254.0, [0, 255]),
                                                      (-3.2, 4.75, [-3.2, 4.75]), (0, float("nan"), None)])
def test_snap_range(low: float, high: float, snapped) -> None:
    assert snap_range(low, high) == snapped


def test_observed_range_undoes_the_normalisation() -> None:
    pixels = torch.rand(50, 2, 4, 4)
    mean, std = (0.4, 0.6), (0.2, 0.3)
    norm = (pixels - torch.tensor(mean).view(1, 2, 1, 1)) / torch.tensor(std).view(1, 2, 1, 1)
    ds = torch.utils.data.TensorDataset(norm, torch.zeros(50, dtype=torch.long))
    prep = Preprocessing(input_shape=(2, 4, 4), mean=mean, std=std)
    bundle = DataBundle(train=ds, val=None, num_classes=2, input_shape=(2, 4, 4), classes=None, labelled=True,
                        source="x.npz", preprocessing=prep)
    assert observed_range(bundle, (2, 4, 4)) == [0, 1]
    wide = DataBundle(train=torch.utils.data.TensorDataset(norm * 10, ds.tensors[1]), val=None, num_classes=2,
                      input_shape=(2, 4, 4), classes=None, labelled=True, source="x.npz",
                      preprocessing=Preprocessing(input_shape=(2, 4, 4)))
    low, high = observed_range(wide, (2, 4, 4))
    assert low == pytest.approx(float(norm.min() * 10), rel=1e-3) and high == pytest.approx(float(norm.max() * 10),
                                                                                          rel=1e-3)
    assert observed_range(None, (3, 8, 8)) == [0, 1] and observed_range(None, (30,)) is None
    assert observed_range(DataBundle(train=ds, val=None, num_classes=2, input_shape=(2, 4, 4), classes=None,
                                     labelled=True, source="d/", kind="images"), (2, 4, 4)) == [0, 1]


# ---------------------------------------------------------------------------------------------- small items


def test_atomic_path_gives_0644_even_when_the_writer_replaces_the_file(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "w.safetensors") as tmp:
            save_file({"a": torch.zeros(2)}, str(tmp))  # safetensors writes a new 0600 file
    finally:
        os.umask(umask)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644


def test_report_may_go_into_the_output_folder_that_the_run_creates(tmp_path: Path) -> None:
    new = tmp_path / "new"
    check_options(ConvertOptions(output_dir=new, report_path=new / "report.json"))
    with pytest.raises(OptionsError, match="does not exist"):  # --dry-run creates no folder
        check_options(ConvertOptions(output_dir=new, report_path=new / "report.json", dry_run=True))
    with pytest.raises(OptionsError, match="does not exist"):
        check_options(ConvertOptions(output_dir=new, report_path=tmp_path / "other" / "report.json"))


def test_pixel_range_without_embedding_is_noted() -> None:
    notes = check_options(ConvertOptions(pixel_range="0-255"))
    assert "--pixel-range ignored: it applies with --embed-preprocessing only" in notes
    with pytest.raises(OptionsError, match="--pixel-range '0-100' is not one of: 0-1, 0-255"):
        check_options(ConvertOptions(pixel_range="0-100"))


def test_one_class_is_singular() -> None:
    x = torch.zeros(4, 3)
    ds = torch.utils.data.TensorDataset(x, torch.zeros(4, dtype=torch.long))
    bundle = DataBundle(train=ds, val=None, num_classes=1, input_shape=(3,), classes=["only"], labelled=True,
                        source="d.npz")
    with pytest.raises(DataError, match="d.npz has 1 class but the model's classifier has 2 outputs"):
        check_data(bundle, num_classes=2)


def test_cli_embeds_8bit_pixels_and_reports_into_a_new_output_folder(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fyc_convert.cli import app

    out = tmp_path / "new"
    args = [SAMPLE, "--arch", ARCH, "--data", DATA, "--epochs", "0", "-o", out, "--report", out / "report.json",
            "--embed-preprocessing", "--pixel-range", "0-255", "--device", "cpu", "-q"]
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "report.json").read_text())
    assert saved["input"]["range"] == [0, 255] and saved["input"]["normalization"] == "graph"
    x = np.load(DATA)["x_val"].astype(np.float32)
    meta = _meta()
    model = load_converted(load_model(SAMPLE, arch=ARCH).model, out / "model.safetensors").eval()
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x * 255})[0]
    with torch.no_grad():
        want = model(torch.from_numpy((x - meta["mean"][0]) / meta["std"][0]).float()).numpy()
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)

"""`--quantize int8` (issue 24): the fixed head quantized only at its boundary, the int8 verification, the CLI.

The float32 digits exports come from one in-process conversion (calibration only); the quantizer runs on them.
The reference for "the head runs exact inside" is the float32 head subgraph of model.onnx fed the int8 model's
own features (`head_exactness`); a quantizer that re-quantizes the head must fail both it and the graph check.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

import fyc_convert.export.quantize as quantize
from fyc_convert import convert
from fyc_convert.cli import app
from fyc_convert.errors import ExportError, OptionsError
from fyc_convert.export.onnx_export import head_entries
from fyc_convert.export.onnx_head import HEAD_PREFIX
from fyc_convert.export.quantize import (
    QUANTIZATION_KEY,
    Int8Config,
    Int8Model,
    check_head_boundary,
    compare_top1,
    head_exactness,
    quantize_int8,
    write_int8_models,
)
from fyc_convert.options import ConvertOptions, check_options

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def floats(tmp_path_factory: pytest.TempPathFactory, digits) -> Path:
    """original.onnx and model.onnx of the digits sample (calibrated, not fine-tuned)."""
    out = tmp_path_factory.mktemp("digits") / "out"
    convert(digits.checkpoint, arch=digits.arch, data=digits.data, epochs=0, output_dir=out)
    return out


@pytest.fixture(scope="module")
def rows() -> dict[str, np.ndarray]:
    """Normalised digits: 512 training inputs (calibration), the 360 validation inputs and labels."""
    with np.load(ROOT / "sample_models" / "digits.npz") as d:
        norm = lambda a: ((a - 0.3054) / 0.3761).astype(np.float32)  # noqa: E731 - the checkpoint's meta
        return {"train": norm(d["x_train"][:512]), "x": norm(d["x_val"]), "y": d["y_val"].astype(np.int64)}


def _batches(x: np.ndarray, size: int = 64):
    return (x[i : i + size] for i in range(0, len(x), size))


def _copy(floats: Path, folder: Path) -> Path:
    folder.mkdir()
    for name in ("original.onnx", "model.onnx"):
        shutil.copy(floats / name, folder / name)
    return folder


def _head_tensors(model: onnx.ModelProto) -> set[str]:
    return {o for n in model.graph.node if n.name.startswith(HEAD_PREFIX) and "Quantize" not in n.op_type
            for o in n.output}


def test_head_is_quantized_only_at_its_input_and_runs_exact(floats: Path, rows, tmp_path: Path) -> None:
    dst = tmp_path / "model.int8.onnx"
    excluded = quantize_int8(floats / "model.onnx", dst, _batches(rows["train"]))
    float_model, int8 = onnx.load(str(floats / "model.onnx")), onnx.load(str(dst))
    head_nodes = [n for n in float_model.graph.node if n.name.startswith(HEAD_PREFIX)]
    assert excluded == len(head_nodes) > 30
    quantized = {n.input[0] for n in int8.graph.node if n.op_type == "QuantizeLinear"}
    assert not quantized & _head_tensors(int8)  # nothing inside the head goes through int8
    (entry,) = head_entries(float_model)
    # exactly one Q/DQ pair at the head: its input, the backbone's features
    assert check_head_boundary(int8, head_entries(float_model)) == 1
    assert entry["input"] in quantized
    assert {o.name for o in int8.graph.output} == {"logits"}
    assert head_exactness(dst, floats / "model.onnx", rows["x"][:64]) <= 1e-6
    meta = {p.key: p.value for p in int8.metadata_props}
    assert f"{excluded} {HEAD_PREFIX} nodes in float32" in meta[QUANTIZATION_KEY]
    assert meta["fyc_convert.heads"] == {p.key: p.value for p in float_model.metadata_props}["fyc_convert.heads"]
    # per-channel weights: the first conv's weight scale has one entry per output channel
    scales = [t for t in int8.graph.initializer if t.name.endswith("_scale") and len(t.dims) == 1 and t.dims[0] > 1]
    assert scales


def test_a_requantized_head_is_caught(floats: Path, rows, tmp_path: Path) -> None:
    """Without the exclusion the quantizer puts the butterfly levels through int8: the graph check and the
    float32 reference both see it."""
    dst = tmp_path / "requantized.onnx"
    assert quantize_int8(floats / "model.onnx", dst, _batches(rows["train"]), float_head=False) == 0
    entries = head_entries(onnx.load(str(floats / "model.onnx"), load_external_data=False))
    with pytest.raises(ExportError, match="inside the fixed head"):
        check_head_boundary(dst, entries)
    assert head_exactness(dst, floats / "model.onnx", rows["x"][:64]) > 1e-3


def _top1(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0].argmax(1)


@pytest.mark.parametrize("static_batch", [None, 7])
def test_agreement_and_accuracy_match_a_direct_count(floats: Path, rows, tmp_path: Path, static_batch) -> None:
    """compare_top1 against a plain count; re-cut to a static batch (360 = 51·7 + 3 padding rows left out)."""
    folder = _copy(floats, tmp_path / "f")
    quantize_int8(folder / "model.onnx", folder / "model.int8.onnx", _batches(rows["train"]))
    x, y = rows["x"], rows["y"]
    f, q = _top1(folder / "model.onnx", x), _top1(folder / "model.int8.onnx", x)
    model = Int8Model(file="model.int8.onnx", bytes=0, float_bytes=0)
    first = compare_top1([(folder / "model.onnx", folder / "model.int8.onnx")],
                         ((x[i : i + 50], y[i : i + 50]) for i in range(0, len(x), 50)), [model],
                         static_batch=static_batch)
    assert model.agreement == pytest.approx(float((f == q).mean()))
    assert model.accuracy == pytest.approx(float((q == y).mean()))
    assert model.float_accuracy == pytest.approx(float((f == y).mean()))
    assert len(first) == (static_batch or 50)
    unlabelled = Int8Model(file="model.int8.onnx", bytes=0, float_bytes=0)
    compare_top1([(folder / "model.onnx", folder / "model.int8.onnx")], ((b, None) for b in _batches(x)),
                 [unlabelled], static_batch=static_batch)
    assert unlabelled.accuracy is None and unlabelled.agreement == model.agreement
    assert quantize.judge(unlabelled) == (pytest.approx(100 * (1 - model.agreement)), "agreement")


def test_rebatch_cuts_static_batches_and_marks_padding() -> None:
    x = np.arange(12, dtype=np.float32).reshape(12, 1)
    y = np.arange(12)
    out = list(quantize._rebatch(((x[i : i + 5], y[i : i + 5]) for i in range(0, 12, 5)), 7))
    assert [len(b) for b, _ in out] == [7, 7]
    assert out[1][1].tolist() == [7, 8, 9, 10, 11, quantize._PAD, quantize._PAD]
    assert np.concatenate([b for b, _ in out])[:12, 0].tolist() == list(range(12))
    assert list(quantize._rebatch([(x, None)], 4))[0][1] is None


def _lossy(real):
    """A quantizer whose model.int8.onnx favours class 0 (its bias raised by 100): most rows change their top-1."""

    def run(src, dst, calibration, **kw):
        n = real(src, dst, calibration, **kw)
        if Path(dst).name == "model.int8.onnx":
            model = onnx.load(str(dst))
            (bias,) = [t for t in model.graph.initializer if t.name.startswith(f"{HEAD_PREFIX}bias")]
            values = onnx.numpy_helper.to_array(bias).copy()
            values[0] += 100.0
            bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
            onnx.save(model, str(dst))
        return n

    return run


def test_write_int8_models_measures_both_and_keeps_a_miss_as_failed(floats: Path, rows, tmp_path: Path,
                                                                    monkeypatch) -> None:
    folder = _copy(floats, tmp_path / "ok")
    calib = lambda: _batches(rows["train"])  # noqa: E731
    val = lambda: ((rows["x"][i : i + 64], rows["y"][i : i + 64]) for i in range(0, 360, 64))  # noqa: E731
    res = write_int8_models(folder, calib, val(), Int8Config(), measured_on="val", calibration_samples=512)
    assert res.passed and res.drop_metric == "accuracy" and res.head_max_abs_diff <= 1e-6
    assert res.original.file == "original.int8.onnx" and res.converted.file == "model.int8.onnx"
    for m, f in ((res.original, "original.onnx"), (res.converted, "model.onnx")):
        assert m.bytes == (folder / m.file).stat().st_size and m.float_bytes == (folder / f).stat().st_size
        assert m.bytes < 0.5 * m.float_bytes and m.agreement >= 0.97
    assert abs(res.drop - 100 * (res.converted.float_accuracy - res.converted.accuracy)) < 1e-9

    # a quantizer that loses accuracy (class 0's bias raised in model.int8.onnx): exit-3 error, file renamed
    monkeypatch.setattr(quantize, "quantize_int8", _lossy(quantize.quantize_int8))
    folder = _copy(floats, tmp_path / "miss")
    with pytest.raises(quantize.VerificationError, match="--int8-max-drop") as info:
        write_int8_models(folder, calib, val(), Int8Config(), measured_on="val", calibration_samples=512)
    assert info.value.exit_code == 3
    result = info.value.int8
    assert not result.passed and result.drop > 50 and result.converted.file == "model.int8.failed.onnx"
    assert (folder / "model.int8.failed.onnx").is_file() and not (folder / "model.int8.onnx").exists()
    assert (folder / "original.int8.onnx").is_file()


def test_options_need_data_and_fp32() -> None:
    with pytest.raises(OptionsError, match="--quantize int8 needs --data"):
        check_options(ConvertOptions(quantize="int8"))
    with pytest.raises(OptionsError, match="drop --dtype fp16"):
        check_options(ConvertOptions(quantize="int8", dtype="fp16", data=ROOT / "sample_models" / "digits.npz"))
    with pytest.raises(OptionsError, match="--quantize 'int4' is not one of: none, int8"):
        check_options(ConvertOptions(quantize="int4"))  # type: ignore[arg-type]
    with pytest.raises(OptionsError, match="--int8-max-drop must be a number >= 0"):
        check_options(ConvertOptions(int8_max_drop=-1.0))
    assert check_options(ConvertOptions(quantize="int8", data=ROOT / "sample_models" / "digits.npz")) == []


@pytest.mark.slow
def test_cli_without_data_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, cli, digits) -> None:
    out = tmp_path / "o"
    proc = cli(*digits.args(data=False), "--quantize", "int8", "-o", out)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: --quantize int8 needs --data"), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not out.exists()


def test_cli_writes_both_int8_models_and_reports_them(tmp_path: Path, digits) -> None:
    out = tmp_path / "o"
    result = runner.invoke(app, [*map(str, digits.args()), "--epochs", "0", "--quantize", "int8", "-o", str(out)])
    assert result.exit_code == 0, result.output
    rep = json.loads((out / "report.json").read_text())
    q = rep["int8"]
    assert rep["status"] == "ok" and q["passed"] and q["calibration_samples"] == 512
    assert q["measured_on"] == rep["accuracy"]["measured_on"] == "val, 360 samples"
    assert q["converted"]["float_accuracy"] == pytest.approx(rep["accuracy"]["calibrated"], abs=1 / 360)
    assert q["converted"]["bytes"] == (out / "model.int8.onnx").stat().st_size
    assert q["original"]["bytes"] == (out / "original.int8.onnx").stat().st_size
    assert q["head_max_abs_diff"] == 0.0 and q["converted"]["latency_ms"] is None
    assert rep["files"]["model_int8_onnx"] == str(out / "model.int8.onnx")
    for row in ("int8 ONNX file", "int8 accuracy", "int8 agreement"):
        assert row in result.output
    assert sorted(p.name for p in out.iterdir()) == ["model.int8.onnx", "model.onnx", "model.safetensors",
                                                     "original.int8.onnx", "original.onnx", "report.json"]
    # a later run without --quantize into the same folder leaves no int8 file of the earlier model beside it
    result = runner.invoke(app, [*map(str, digits.args()), "--epochs", "0", "--static-batch", "7", "--bench",
                                 "--quantize", "int8", "-o", str(out), "--force"])
    assert result.exit_code == 0, result.output
    rep = json.loads((out / "report.json").read_text())
    assert list(rep["int8"]["converted"]["latency_ms"]) == ["b7"] and "int8 latency, batch 7" in result.output
    assert rep["int8"]["converted"]["agreement"] >= 0.99  # 360 rows in static batches of 7, the padding left out
    result = runner.invoke(app, [*map(str, digits.args()), "--epochs", "0", "-o", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert not list(out.glob("*int8*")) and json.loads((out / "report.json").read_text())["int8"] is None


def test_cli_int8_miss_exits_3_and_keeps_model_int8_failed(tmp_path: Path, digits, monkeypatch) -> None:
    """A quantizer that loses accuracy: exit 3, the float32 outputs and the failed
    int8 file committed, report status int8_verification_failed."""
    monkeypatch.setattr(quantize, "quantize_int8", _lossy(quantize.quantize_int8))
    out = tmp_path / "o"
    result = runner.invoke(app, [*map(str, digits.args()), "--epochs", "0", "--quantize", "int8", "-o", str(out)])
    assert result.exit_code == 3, result.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["status"] == "int8_verification_failed" and not rep["int8"]["passed"]
    assert rep["int8"]["drop"] > 50 and rep["int8"]["converted"]["file"] == "model.int8.failed.onnx"
    assert sorted(p.name for p in out.iterdir()) == ["model.int8.failed.onnx", "model.onnx", "model.safetensors",
                                                     "original.int8.onnx", "original.onnx", "report.json"]
    assert rep["files"]["failed_int8_onnx"] == str(out / "model.int8.failed.onnx")


@pytest.mark.parametrize("name", ["distilled_vit", "summed_heads"])
def test_several_heads_each_quantized_only_at_its_input(name: str, tmp_path: Path) -> None:
    """Heads under fyc_head/0/, fyc_head/1/: each checked on its own scope, each exact against its float32 head."""
    import torch
    from models import HEAD_LAYOUTS

    from fyc_convert.export.onnx_export import export_onnx
    from fyc_convert.model.surgery import swap_classifier

    layout = HEAD_LAYOUTS[name]()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, *layout.input_shape, generator=gen)
    swap = swap_classifier(layout.model, input_shape=layout.input_shape, inputs=x[:64])
    res = export_onnx(layout.model, tmp_path / "model.onnx", input_shape=layout.input_shape, head_layer=swap.layers)
    heads = head_entries(onnx.load(str(res.path)))
    assert [h["scope"] for h in heads] == [f"{HEAD_PREFIX}{i}/" for i in range(len(swap.layers))]
    dst = tmp_path / "model.int8.onnx"
    quantize_int8(res.path, dst, _batches(x[64:].numpy(), 16))
    assert check_head_boundary(dst, heads) <= len(heads)
    assert head_exactness(dst, res.path, x[:16].numpy()) <= 1e-6
    requantized = tmp_path / "requantized.onnx"
    quantize_int8(res.path, requantized, _batches(x[64:].numpy(), 16), float_head=False)
    with pytest.raises(ExportError, match="fixed head 'fyc_head/"):
        check_head_boundary(requantized, heads)


@pytest.mark.parametrize("name", ["resnet_fc", "summed_heads"])
def test_a_head_with_a_learned_map_is_quantized_at_the_map_and_runs_exact(name: str, tmp_path: Path) -> None:
    """--adapter: the map before each head (scope fyc_adapter/...) is quantized like the backbone; the fixed head
    behind it still takes one Q/DQ pair at its input and runs exact against its float32 self."""
    import torch
    from models import HEAD_LAYOUTS, LAYOUTS

    from fyc_convert.export.onnx_export import export_onnx
    from fyc_convert.model.surgery import swap_classifier

    layout = {**LAYOUTS, **HEAD_LAYOUTS}[name]()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, *layout.input_shape, generator=gen)
    swap = swap_classifier(layout.model, input_shape=layout.input_shape, inputs=x[:64], adapter=True)
    assert all(s.head.in_features >= s.head.input_features and s.head.adapter is not None for s in swap.heads)
    res = export_onnx(layout.model, tmp_path / "model.onnx", input_shape=layout.input_shape, head_layer=swap.layers)
    heads = head_entries(onnx.load(str(res.path)))
    dst = tmp_path / "model.int8.onnx"
    quantize_int8(res.path, dst, _batches(x[64:].numpy(), 16))
    quantized = onnx.load(str(dst))
    adapter_ops = {n.op_type for n in quantized.graph.node if n.name.startswith("fyc_adapter/")}
    assert adapter_ops & {"MatMul", "Gemm"} and "DequantizeLinear" in adapter_ops  # its weights went int8
    assert check_head_boundary(dst, heads) <= len(heads)
    assert head_exactness(dst, res.path, x[:16].numpy()) <= 1e-6

"""Export and verification through the real CLI: several heads, and the verification floor of a backbone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from export_models import DriftingBackbone, FoldBackbone
from models import HEAD_LAYOUTS
from typer.testing import CliRunner

import fyc_convert.export.onnx_export as export_mod
from fyc_convert.cli import app
from fyc_convert.export.ops import Ops

runner = CliRunner()

# name in tests/models.py HEAD_LAYOUTS -> (--arch, --arch-kwargs, head layers, scopes)
MULTI = {
    "distilled_vit": ("models:DistilledVit", {"num_classes": 10, "dim": 16}, ["head", "head_dist"]),
    "averaged_branch_heads": ("models:AveragedBranchHeads", {"num_classes": 6, "widths": [12, 16, 12]},
                              ["heads.0", "heads.1", "heads.2"]),
    "summed_heads": ("models:SummedHeads", {"num_classes": 5, "width": 16}, ["global_fc", "local_fc"]),
}


def _convert(tmp_path: Path, model: torch.nn.Module, arch: str, kwargs: dict, *extra: str):
    ckpt = tmp_path / "model.pt"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "out"
    result = runner.invoke(app, [str(ckpt), "--arch", arch, "--arch-kwargs", json.dumps(kwargs), "--input-shape",
                                 "3,8,8", "-o", str(out), "--quiet", *extra])
    return out, result


@pytest.mark.parametrize("name", sorted(MULTI))
def test_every_head_exported_and_verified_through_the_cli(tmp_path, name):
    arch, kwargs, layers = MULTI[name]
    layout = HEAD_LAYOUTS[name]()
    out, result = _convert(tmp_path, layout.model, arch, kwargs)
    assert result.exit_code == 0, result.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["status"] == "ok" and rep["layer"] == ",".join(layers)
    o = rep["onnx"]
    scopes = [f"fyc_head/{i}/" for i in range(len(layers))]
    assert [h["layer"] for h in o["heads"]] == layers and [h["scope"] for h in o["heads"]] == scopes
    graph = onnx.load(str(out / "model.onnx")).graph
    total: dict[str, int] = {}
    for head, scope in zip(o["heads"], scopes, strict=True):
        ops = [n.op_type for n in graph.node if n.name.startswith(scope)]
        assert ops and not {"MatMul", "Gemm", "Conv"} & set(ops), (scope, ops)
        assert head["ops"] == {op: ops.count(op) for op in sorted(set(ops))}
        for op, k in head["ops"].items():
            total[op] = total.get(op, 0) + k
    assert o["head_ops"] == total  # the census covers every head
    # outside the heads, the original classifiers' dense ops are gone too: only the backbone's stay
    assert sum(n.op_type in ("MatMul", "Gemm") for n in graph.node) < sum(
        n.op_type in ("MatMul", "Gemm") for n in onnx.load(str(out / "original.onnx")).graph.node)
    assert o["max_abs_diff"] < 1e-4 and o["blame"] is None and o["floor_max_abs_diff"] < 1e-4
    assert o["exporter"] in ("torchscript", "dynamo")


def _tamper_heads(monkeypatch, error: float) -> None:
    """Every spliced head adds `error` to its logits: a head that adds error of its own."""
    real = export_mod.build_head

    def build_head(graph, features, spec, *, prefix, **kw):
        logits = real(graph, features, spec, prefix=prefix, **kw)
        ops = Ops(graph, f"{prefix}tamper/", np.float32)
        return ops.op1("Add", [logits, ops.const("error", np.asarray([error], np.float32))])

    monkeypatch.setattr(export_mod, "build_head", build_head)


def _drifting() -> DriftingBackbone:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return DriftingBackbone(6, 16).eval()


def test_backbone_floor_beyond_tolerance_is_reported_and_accepted(tmp_path):
    out, result = _convert(tmp_path, _drifting(), "export_models:DriftingBackbone", {"num_classes": 6, "width": 16})
    assert result.exit_code == 0, result.output
    rep = json.loads((out / "report.json").read_text())
    o = rep["onnx"]
    assert rep["status"] == "ok" and o["exporter"] == "torchscript"  # the drift lives in the TorchScript symbolic
    assert o["floor_max_abs_diff"] > 1e-3 and o["max_abs_diff"] > 1e-3  # both far beyond atol + rtol (1e-4)
    assert o["head_max_abs_diff"] < 1e-5 and o["blame"] == "backbone"
    assert any(n.startswith("original.onnx already differs from PyTorch by") for n in rep["notes"])
    assert (out / "model.onnx").is_file() and not (out / "model.failed.onnx").exists()


@pytest.mark.parametrize("drift", [True, False])
def test_head_that_adds_error_fails_with_exit_3(tmp_path, monkeypatch, drift):
    _tamper_heads(monkeypatch, 1e-2)
    model, arch = (_drifting(), "export_models:DriftingBackbone") if drift else (HEAD_LAYOUTS["distilled_vit"]().model,
                                                                                 "models:DistilledVit")
    kwargs = {"num_classes": 6, "width": 16} if drift else {"num_classes": 10, "dim": 16}
    out, result = _convert(tmp_path, model, arch, kwargs)
    assert result.exit_code == 3, result.output
    assert "adds error of its own" in result.output
    rep = json.loads((out / "report.json").read_text())
    o = rep["onnx"]
    assert rep["status"] == "verification_failed" and o["blame"] == "head"
    assert o["head_max_abs_diff"] == pytest.approx(1e-2, rel=1e-3)
    assert (o["floor_max_abs_diff"] > 1e-3) == drift
    assert (out / "model.failed.onnx").is_file() and not (out / "model.onnx").exists()


def test_a_backbone_beyond_the_default_opset_is_exported_at_18(tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = FoldBackbone(10).eval()
    out, result = _convert(tmp_path, model, "export_models:FoldBackbone", {"num_classes": 10})
    assert result.exit_code == 0, result.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["onnx"]["opset"] == 18 and rep["onnx"]["max_abs_diff"] < 1e-4
    assert [o.version for o in onnx.load(str(out / "model.onnx")).opset_import if o.domain == ""] == [18]
    note = next(n for n in rep["notes"] if n.startswith("exported at opset 18"))
    assert "at opset 17 (the default)" in note and "col2im" in note.lower()
    # an opset the user chose is kept: the same model then fails with the exporters' reasons
    (tmp_path / "given").mkdir()
    out2, result = _convert(tmp_path / "given", model, "export_models:FoldBackbone", {"num_classes": 10},
                            "--opset", "17")
    assert result.exit_code == 1 and "col2im" in result.output.lower()
    assert not (out2 / "model.onnx").exists()

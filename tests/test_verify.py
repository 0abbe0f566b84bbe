"""onnxruntime parity checks and the static head check."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from fyc_convert.errors import ExportError, VerificationError
from fyc_convert.export.onnx_export import HEAD_PREFIX, export_onnx
from fyc_convert.export.verify import VerifyConfig, check_head_static, mark_failed, verify_onnx
from fyc_convert.model.surgery import swap_classifier


def _converted(tmp_path, in_features: int = 64, num_classes: int = 10):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, in_features), nn.Tanh(), nn.Linear(in_features, num_classes)).eval()
    swap = swap_classifier(model, layer="2")
    with torch.no_grad():
        swap.head.bias.copy_(torch.linspace(-1.0, 1.0, num_classes))
    res = export_onnx(model, tmp_path / "model.onnx", input_shape=(8,), head_layer="2")
    return model, swap.head, res


def _tamper_bias(path, delta: float) -> None:
    proto = onnx.load(str(path))
    (bias,) = [t for t in proto.graph.initializer if t.name.startswith(f"{HEAD_PREFIX}bias")]
    values = onnx.numpy_helper.to_array(bias).copy()
    values[3] += delta
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    onnx.save(proto, str(path))


def test_verify_reports_differences_and_batches(tmp_path):
    model, _, res = _converted(tmp_path)
    real = torch.randn(70, 8, generator=torch.Generator().manual_seed(1))
    ver = verify_onnx(res.path, model, inputs=real, input_shape=(8,), n_random=8)
    assert ver.n_samples == 70 + 8 + 1 + 3
    assert ver.batch_sizes == [1, 3, 6, 8, 64]  # real inputs in chunks of 64 (64 + 6), random 8, 1, 3
    assert 0.0 <= ver.mean_abs_diff <= ver.max_abs_diff <= 1e-4
    assert (ver.atol, ver.rtol) == (1e-4, 1e-4)


def test_tampered_bias_raises_verification_error_with_numbers(tmp_path):
    model, _, res = _converted(tmp_path)
    _tamper_bias(res.path, 0.5)
    with pytest.raises(VerificationError, match="max \\|diff\\| 0.5") as info:
        verify_onnx(res.path, model, input_shape=(8,))
    assert info.value.max_abs_diff == pytest.approx(0.5, abs=1e-4)
    assert 0.0 < info.value.mean_abs_diff < 0.5
    assert "\n" not in str(info.value)


def test_tiny_tampering_within_rtol_passes_but_not_with_tight_tolerance(tmp_path):
    model, _, res = _converted(tmp_path)
    _tamper_bias(res.path, 1e-3)
    ver = verify_onnx(res.path, model, input_shape=(8,), atol=2e-3, rtol=0.0)
    assert ver.max_abs_diff == pytest.approx(1e-3, abs=1e-4)
    with pytest.raises(VerificationError):
        verify_onnx(res.path, model, input_shape=(8,), atol=1e-4, rtol=1e-4)


def test_real_inputs_of_the_wrong_shape_are_refused(tmp_path):
    model, _, res = _converted(tmp_path)
    with pytest.raises(VerificationError, match="sample shape \\(9,\\)"):
        verify_onnx(res.path, model, inputs=torch.zeros(4, 9), input_shape=(8,))


def test_unreadable_file_raises_verification_error(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(VerificationError, match="cannot load"):
        verify_onnx(bad, nn.Linear(8, 2), input_shape=(8,))


def test_verify_restores_training_mode(tmp_path):
    model, _, res = _converted(tmp_path)
    model.train()
    verify_onnx(res.path, model, input_shape=(8,))
    assert model.training


def test_mark_failed_renames_model_and_data(tmp_path):
    model, _, res = _converted(tmp_path)
    failed = mark_failed(res.path)
    assert failed == tmp_path / "model.failed.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.failed.onnx"]

    ext = export_onnx(model, tmp_path / "big.onnx", input_shape=(8,), head_layer="2", external_data_threshold=1)
    weights = ext.external_data.read_bytes()
    failed = mark_failed(ext.path)
    assert (tmp_path / "big.failed.onnx.data").read_bytes() == weights
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["big.failed.onnx", "big.failed.onnx.data", "model.failed.onnx"]
    proto = onnx.load(str(failed), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"big.failed.onnx.data"}
    assert len(onnx.load(str(failed)).graph.initializer) > 0  # loads with its renamed data


def test_check_head_static_census(tmp_path):
    _, head, res = _converted(tmp_path)
    census = check_head_static(res.path, num_classes=head.num_classes, embed_size=head.embed_size)
    assert census == res.head_ops
    assert census["Add"] >= 1 and census["Sub"] >= 1 and census["Gather"] >= 1
    assert check_head_static(onnx.load(str(res.path)), num_classes=10, embed_size=head.embed_size) == census


def test_check_head_static_refuses_original_model(tmp_path):
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4)).eval()
    res = export_onnx(model, tmp_path / "original.onnx", input_shape=(8,))
    with pytest.raises(ExportError, match="no fyc_head/ nodes"):
        check_head_static(res.path, num_classes=4, embed_size=16)


def _hand_head(op: str, const_elems: int) -> onnx.ModelProto:
    """x (B, 4) -> fyc_head/<op>(x, constant) with a constant of `const_elems` elements."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    shape = [4, const_elems // 4] if op == "MatMul" else [const_elems // 4, 4]
    w = onnx.numpy_helper.from_array(np.ones(shape, np.float32), f"{HEAD_PREFIX}w")
    node = helper.make_node(op, ["x", w.name], ["y"], name=f"{HEAD_PREFIX}{op}")
    return helper.make_model(helper.make_graph([node], "g", [x], [y], [w]))


def test_check_head_static_refuses_dense_ops_and_big_constants():
    with pytest.raises(ExportError, match="contains MatMul"):
        check_head_static(_hand_head("MatMul", 16), num_classes=4, embed_size=4)
    with pytest.raises(ExportError, match="constant of 40 elements \\(limit max\\(C, n\\) = 10\\)"):
        check_head_static(_hand_head("Add", 40), num_classes=10, embed_size=8)
    assert check_head_static(_hand_head("Add", 40), num_classes=10, embed_size=40) == {"Add": 1}


def _if_head(op: str, const_elems: int) -> onnx.ModelProto:
    """x (B, 4) -> fyc_head/If whose then-branch is `_hand_head`'s node, its constant inside the branch."""
    inner = _hand_head(op, const_elems).graph
    then_out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    then_branch = helper.make_graph(list(inner.node), "then", [], then_out, list(inner.initializer))
    else_node = helper.make_node("Identity", ["x"], ["y_else"], name=f"{HEAD_PREFIX}identity")
    else_branch = helper.make_graph([else_node], "else", [],
                                    [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, None)])
    cond = onnx.numpy_helper.from_array(np.array([True]), f"{HEAD_PREFIX}cond")
    node = helper.make_node("If", [cond.name], ["out"], name=f"{HEAD_PREFIX}if",
                            then_branch=then_branch, else_branch=else_branch)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    return helper.make_model(helper.make_graph([node], "g", [x], [out], [cond]))


def test_check_head_static_looks_inside_if_branches():
    with pytest.raises(ExportError, match="contains MatMul"):
        check_head_static(_if_head("MatMul", 16), num_classes=4, embed_size=4)
    with pytest.raises(ExportError, match="constant of 40 elements"):
        check_head_static(_if_head("Add", 40), num_classes=10, embed_size=8)
    assert check_head_static(_if_head("Add", 40), num_classes=10, embed_size=40) == {"Add": 1, "Identity": 1, "If": 1}


def test_check_head_static_lives_with_the_head_graph():
    from fyc_convert.export import onnx_head, verify

    assert verify.check_head_static is onnx_head.check_head_static


def test_verify_at_a_static_batch_tops_up_the_last_chunk(tmp_path):
    model, _, _ = _converted(tmp_path)
    res = export_onnx(model, tmp_path / "static.onnx", input_shape=(8,), head_layer="2", static_batch=3)
    real = torch.randn(7, 8, generator=torch.Generator().manual_seed(2))
    ver = verify_onnx(res.path, model, inputs=real, input_shape=(8,), static_batch=3)
    assert ver.batch_sizes == [3] and ver.n_samples == 9 + 6 and ver.max_abs_diff <= 1e-4
    with pytest.raises(VerificationError, match="failed at batch 8: .*invalid dimensions"):
        verify_onnx(res.path, model, input_shape=(8,))  # batches of 8, 1, 3 against a batch-3 graph


def _perturbed_backbone(model: nn.Module) -> nn.Module:
    """A copy whose backbone (layer 0) differs from the exported one; the head is the same."""
    import copy

    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].bias.add_(0.05)
    return other


def test_verify_converted_blames_the_head_the_model_or_nobody(tmp_path):
    from fyc_convert.export.verify import measure_heads, verify_converted

    model, head, res = _converted(tmp_path)
    (tmp_path / "orig").mkdir()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        original = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 10)).eval()
    orig = export_onnx(original, tmp_path / "orig" / "original.onnx", input_shape=(8,))
    ok = verify_converted(res.path, model, VerifyConfig((8,)), original_path=orig.path, original=original)
    assert ok.blame is None and ok.converted.passed and ok.floor.passed and ok.heads == {}
    # the head alone on onnxruntime's features: the PyTorch head agrees to float rounding
    alone = measure_heads(res.path, model, VerifyConfig((8,)))
    assert list(alone) == ["2"] and alone["2"].passed and alone["2"].max_abs_diff < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "orig"]  # its temporary copy is gone

    # something outside the head differs while original.onnx is fine: the model is to blame, exit 3
    with pytest.raises(VerificationError, match="although original.onnx is within it") as info:
        verify_converted(res.path, _perturbed_backbone(model), VerifyConfig((8,)), original_path=orig.path,
                         original=original)
    assert info.value.verdict.blame == "model" and info.value.verdict.heads["2"].passed

    # the same, but the original's export misses the tolerance as well: the backbone is to blame, accepted
    judged = verify_converted(res.path, _perturbed_backbone(model), VerifyConfig((8,)), original_path=orig.path,
                              original=_perturbed_backbone(original))
    assert judged.blame == "backbone" and not judged.floor.passed and judged.head_max_abs_diff < 1e-5

    # a head that adds error of its own fails whatever the floor
    _tamper_bias(res.path, 0.01)
    with pytest.raises(VerificationError, match="adds error of its own") as info:
        verify_converted(res.path, model, VerifyConfig((8,)), original_path=orig.path,
                         original=_perturbed_backbone(original))
    assert info.value.verdict.blame == "head" and info.value.verdict.head_max_abs_diff == pytest.approx(0.01, rel=1e-3)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_measure_heads_reads_every_head_in_float32(tmp_path, dtype):
    from models import HEAD_LAYOUTS

    from fyc_convert.export.verify import measure_heads

    layout = HEAD_LAYOUTS["distilled_vit"]()
    swap = swap_classifier(layout.model, input_shape=layout.input_shape)
    res = export_onnx(layout.model, tmp_path / "m.onnx", input_shape=layout.input_shape, head_layer=swap.layers,
                      dtype=dtype)
    alone = measure_heads(res.path, layout.model, VerifyConfig(layout.input_shape))
    assert list(alone) == ["head", "head_dist"]
    assert all(r.passed and r.max_abs_diff < 1e-5 and r.batch_sizes == [1, 3, 8] for r in alone.values())

"""Whole-model ONNX export: slim head subgraph, parity with PyTorch, sizes, fp16, external data, atomicity."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from models import LAYOUTS
from torch import nn

from fyc_convert.errors import ExportError
from fyc_convert.export.onnx_export import HEAD_PREFIX, export_onnx, head_entries
from fyc_convert.export.onnx_head import HeadSpec, portable_node_bound
from fyc_convert.export.onnx_head_kron import kron_node_bound
from fyc_convert.export.verify import check_head_static, verify_onnx
from fyc_convert.head.record import HeadRecord, compact_rows, decode_heads, parse_rows
from fyc_convert.model.surgery import swap_classifier

KIB = 1024


def _swap(model: nn.Module, layer: str | None, head: str = "hadamard", input_shape=None) -> nn.Module:
    """Swap the classifier (found automatically when `layer` is None) in place; returns the new head."""
    res = swap_classifier(model, head=head, layer=layer, input_shape=input_shape)
    with torch.no_grad():  # a non-trivial, trained-looking bias
        if res.head.bias is not None:
            res.head.bias.copy_(torch.linspace(-1.0, 1.0, res.head.num_classes))
    assert model.get_submodule(res.layer) is res.head
    return res.head


class _Tiny(nn.Module):
    """A tiny backbone (B, 8) -> (B, N) and a Linear N -> C classifier."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, in_features), nn.Tanh())
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def _tiny(in_features: int, num_classes: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _Tiny(in_features, num_classes).eval()


def _metadata(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_exports_slim_head_matching_pytorch(name, tmp_path):
    layout = LAYOUTS[name]()
    original = export_onnx(layout.model, tmp_path / "original.onnx", input_shape=layout.input_shape)
    head = _swap(layout.model, None, input_shape=layout.input_shape)  # found as the pipeline finds it
    assert layout.model.get_submodule(layout.layer) is head
    res = export_onnx(layout.model, tmp_path / "model.onnx", input_shape=layout.input_shape, head_layer=layout.layer)

    onnx.checker.check_model(str(res.path))
    assert res.head_kind == "hadamard" and original.head_kind == "original"
    assert original.head_ops == {}
    census = check_head_static(res.path, num_classes=head.num_classes, embed_size=head.embed_size)
    assert census == res.head_ops
    assert not {"MatMul", "Gemm", "Conv"} & set(census)
    ver = verify_onnx(res.path, layout.model, input_shape=layout.input_shape, n_random=64, atol=1e-4, rtol=1e-4)
    assert ver.batch_sizes == [1, 3, 64]
    assert ver.max_abs_diff <= 1e-4
    n_in, n_cls = layout.in_features, layout.num_classes
    assert original.bytes - res.bytes >= 4 * n_in * n_cls - 4 * (n_cls + head.embed_size) - 16 * KIB
    assert sorted(tmp_path.iterdir()) == [tmp_path / "model.onnx", tmp_path / "original.onnx"]


@pytest.mark.parametrize("in_features,num_classes", [(64, 10), (342, 100), (512, 1000), (2048, 1000), (192, 1000)])
def test_sizes_export_slim_and_small(in_features, num_classes, tmp_path):
    model = _tiny(in_features, num_classes)
    original = export_onnx(model, tmp_path / "original.onnx", input_shape=(8,))
    head = _swap(model, "fc")
    res = export_onnx(model, tmp_path / "model.onnx", input_shape=(8,), head_layer="fc")

    onnx.checker.check_model(str(res.path))
    census = check_head_static(res.path, num_classes=num_classes, embed_size=head.embed_size)
    assert census["Add"] > 0 and census["Sub"] > 0
    assert not {"MatMul", "Gemm", "Conv"} & set(census)
    ver = verify_onnx(res.path, model, input_shape=(8,), n_random=64, atol=1e-4, rtol=1e-4)
    assert ver.batch_sizes == [1, 3, 64]
    saved = original.bytes - res.bytes
    assert saved >= 4 * in_features * num_classes - 4 * (num_classes + head.embed_size) - 16 * KIB
    assert res.node_count > original.node_count  # the butterflies replace one Gemm


def test_whole_model_with_batch_switched_head(monkeypatch, tmp_path):
    # 64 features, 1000 classes: 16 whole copies of x. With small block sizes the head holds an If on the
    # batch size; both of its branches run inside the exported model and match PyTorch.
    from fyc_convert.export import onnx_head_switched

    monkeypatch.setattr(onnx_head_switched, "_BLOCK_POINTS", 128)
    monkeypatch.setattr(onnx_head_switched, "_BLOCK_MIN_POINTS", 256)
    monkeypatch.setattr(onnx_head_switched, "_BLOCK_MIN_BATCH", 3)
    model = _tiny(64, 1000)
    head = _swap(model, "fc")
    res = export_onnx(model, tmp_path / "model.onnx", input_shape=(8,), head_layer="fc", head_layout="batch-switched")
    onnx.checker.check_model(str(res.path))
    census = check_head_static(res.path, num_classes=1000, embed_size=head.embed_size)
    assert census["If"] == 1 and not {"MatMul", "Gemm", "Conv"} & set(census)
    assert _metadata(res.path)["fyc_convert.head_layout"] == "batch-switched"
    ver = verify_onnx(res.path, model, input_shape=(8,), n_random=64, atol=1e-4, rtol=1e-4)
    assert ver.batch_sizes == [1, 3, 64] and ver.max_abs_diff <= 1e-4


def test_default_export_is_portable(tmp_path):
    model = _tiny(64, 1000)
    head = _swap(model, "fc")
    res = export_onnx(model, tmp_path / "model.onnx", input_shape=(8,), head_layer="fc")
    assert res.opset == 17
    assert not {"If", "Shape", "MatMul", "Gemm", "Conv"} & set(res.head_ops)
    assert _metadata(res.path)["fyc_convert.head_layout"] == "portable"
    assert sum(res.head_ops.values()) <= portable_node_bound(HeadSpec.from_module(head))


@pytest.mark.parametrize("static_batch", [None, 4, 64])
@pytest.mark.parametrize("name", ["resnet_fc", "vit_head"])
def test_kron_export_matches_pytorch(name, static_batch, tmp_path):
    """--head-layout kron: MatMul by ±1 blocks is the head's one dense op, within its node bound, and the
    whole model matches PyTorch at dynamic and static batches (batch-major first block up to 32, then not)."""
    layout = LAYOUTS[name]()
    head = _swap(layout.model, layout.layer)
    res = export_onnx(layout.model, tmp_path / "model.onnx", input_shape=layout.input_shape, head_layer=layout.layer,
                      head_layout="kron", static_batch=static_batch)
    assert _metadata(res.path)["fyc_convert.head_layout"] == "kron"
    census = check_head_static(res.path, num_classes=head.num_classes, embed_size=head.embed_size)
    assert census == res.head_ops and {"MatMul"} == {"MatMul", "Gemm", "Conv", "If", "Shape"} & set(census)
    assert sum(census.values()) <= kron_node_bound(HeadSpec.from_module(head))
    with pytest.raises(ExportError, match="MatMul"):  # the add/sub-only check refuses it
        check_head_static(res.path, num_classes=head.num_classes, embed_size=head.embed_size, layout="portable")
    real = torch.randn(6, *layout.input_shape, generator=torch.Generator().manual_seed(3))
    ver = verify_onnx(res.path, layout.model, inputs=real, input_shape=layout.input_shape, static_batch=static_batch)
    assert ver.max_abs_diff <= 1e-4


@pytest.mark.parametrize("name", ["resnet_fc", "vit_head"])
def test_static_batch_export(name, tmp_path):
    layout = LAYOUTS[name]()
    _swap(layout.model, layout.layer)
    res = export_onnx(layout.model, tmp_path / "model.onnx", input_shape=layout.input_shape, head_layer=layout.layer,
                      static_batch=4)
    proto = onnx.load(str(res.path))
    for value in (*proto.graph.input, *proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_value == 4 and not dims[0].dim_param
    assert "Shape" not in res.head_ops and "If" not in res.head_ops
    real = torch.randn(6, *layout.input_shape, generator=torch.Generator().manual_seed(3))
    ver = verify_onnx(res.path, layout.model, inputs=real, input_shape=layout.input_shape, static_batch=4)
    assert ver.batch_sizes == [4] and ver.n_samples == 16 and ver.max_abs_diff <= 1e-4
    with pytest.raises(ExportError, match="static batch"):
        export_onnx(layout.model, tmp_path / "m.onnx", input_shape=layout.input_shape, static_batch=0)


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_supported_opsets_export_and_match(opset, tmp_path):
    layout = LAYOUTS["resnet_fc"]()
    _swap(layout.model, layout.layer)
    res = export_onnx(layout.model, tmp_path / "m.onnx", input_shape=layout.input_shape, head_layer=layout.layer,
                      opset=opset)
    assert onnx.load(str(res.path)).opset_import[0].version == opset
    assert verify_onnx(res.path, layout.model, input_shape=layout.input_shape).max_abs_diff <= 1e-4


def test_manifest_in_metadata_props(tmp_path):
    model = _tiny(64, 10)
    head = _swap(model, "fc")
    res = export_onnx(model, tmp_path / "model.onnx", input_shape=(8,), head_layer="fc", metadata={"source": "x.pt"})
    meta = _metadata(res.path)
    assert meta["source"] == "x.pt"
    assert meta["fyc_convert.head"] == "hadamard"
    # one head list (head/record.py), no flat keys of the first head
    assert set(meta) == {"source", "fyc_convert.head", "fyc_convert.heads", "fyc_convert.head_layout"}
    (record,) = decode_heads(meta)
    exported = res.heads[0]
    assert record == HeadRecord(
        kind="hadamard", layer="fc", in_features=64, num_classes=10, seed=0, bias=True, fixed_scale=False,
        hadamard_size=head.hadamard_size, embed_size=head.embed_size, embedding=head.embedding,
        rows=tuple(head.rows.tolist()), scope=HEAD_PREFIX, input=exported.input_name, input_dtype="float32",
        output=exported.output_name)
    assert np.array_equal(parse_rows(json.loads(meta["fyc_convert.heads"])[0]["rows"]), head.rows.numpy())
    assert head_entries(onnx.load(str(res.path))) == [record.to_dict()]


def test_onnx_file_is_runnable_with_batch_size_axis(tmp_path):
    model = _tiny(64, 10)
    _swap(model, "fc")
    res = export_onnx(model, tmp_path / "model.onnx", input_shape=(8,), head_layer="fc")
    proto = onnx.load(str(res.path))
    assert proto.ir_version == 8  # the lowest for opset 17; onnxruntime refuses onnx 1.23's default 14
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", res.opset)]
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, out.name) == ("input", "logits")
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch_size"
    assert out.type.tensor_type.shape.dim[0].dim_param == "batch_size"
    assert all(n.domain == "" for n in proto.graph.node)
    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"input": np.zeros((5, 8), np.float32)})[0].shape == (5, 10)


@pytest.mark.parametrize("opset,ir_version", [(20, 9), (21, 10)])
def test_newer_opsets_get_their_ir_version(opset, ir_version, tmp_path):
    model = _tiny(64, 10)
    _swap(model, "fc")
    res = export_onnx(model, tmp_path / "m.onnx", input_shape=(8,), head_layer="fc", opset=opset)
    proto = onnx.load(str(res.path))
    assert (res.opset, proto.opset_import[0].version, proto.ir_version) == (opset, opset, ir_version)
    assert verify_onnx(res.path, model, input_shape=(8,)).max_abs_diff <= 1e-4


def test_compact_rows():
    assert compact_rows(torch.tensor([1, 2, 3, 7, 9, 10])) == "1-3,7,9-10"
    assert compact_rows(np.arange(1, 1001)) == "1-1000"
    assert compact_rows([5]) == "5"
    assert compact_rows([]) == ""


@pytest.mark.parametrize("name", ["resnet_fc", "seq_linear", "vit_head"])
def test_fp16_backbone_with_float32_boundary(name, tmp_path):
    layout = LAYOUTS[name]()
    _swap(layout.model, layout.layer)
    res = export_onnx(layout.model, tmp_path / "model.onnx", input_shape=layout.input_shape, head_layer=layout.layer,
                      dtype="fp16")
    proto = onnx.load(str(res.path))
    assert res.dtype == "fp16"
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    backbone = [t for t in proto.graph.initializer if not t.name.startswith(HEAD_PREFIX) and len(t.dims) > 1]
    assert backbone and all(t.data_type == onnx.TensorProto.FLOAT16 for t in backbone)
    assert "MatMul" not in res.head_ops and res.head_ops["Cast"] == 1  # features -> float32; logits stay float32
    ver = verify_onnx(res.path, layout.model, input_shape=layout.input_shape, atol=5e-2, rtol=5e-2)
    assert ver.max_abs_diff < 5e-2
    assert ver.max_abs_diff > 0.0  # it really ran in half precision
    assert next(layout.model.parameters()).dtype == torch.float32  # the caller's model is untouched


def test_orthogonal_head_exported_as_dense_constant(tmp_path):
    model = _tiny(64, 10)
    head = _swap(model, "fc", "orthogonal")
    res = export_onnx(model, tmp_path / "model.onnx", input_shape=(8,), head_layer="fc")
    assert res.head_kind == "orthogonal"
    assert res.head_ops["MatMul"] == 1
    assert _metadata(res.path)["fyc_convert.head"] == "orthogonal"
    ver = verify_onnx(res.path, model, input_shape=(8,), atol=1e-4, rtol=1e-4)
    assert ver.max_abs_diff <= 1e-4
    with pytest.raises(ExportError, match="MatMul"):
        check_head_static(res.path, num_classes=head.num_classes, embed_size=head.in_features)


def test_external_data_replaces_old_data_file(tmp_path):
    model = _tiny(342, 100)
    _swap(model, "fc")
    ref = export_onnx(model, tmp_path / "ref.onnx", input_shape=(8,), head_layer="fc", external_data_threshold=1)
    assert ref.external_data.parent == tmp_path and ref.external_data.name.endswith(".onnx.data")

    out = tmp_path / "out"
    out.mkdir()
    stale = out / "model.onnx.data"
    stale.write_bytes(b"\xff" * 100_000)  # an old export's weights, under the old fixed name
    first = export_onnx(model, out / "model.onnx", input_shape=(8,), head_layer="fc", external_data_threshold=1)
    assert first.external_data.read_bytes() == ref.external_data.read_bytes()
    assert first.bytes == (out / "model.onnx").stat().st_size + first.external_data.stat().st_size
    assert sorted(p.name for p in out.iterdir()) == sorted(["model.onnx", first.external_data.name])
    # a second export writes a fresh data file, switches the model in one rename, then drops the old file
    second = export_onnx(model, out / "model.onnx", input_shape=(8,), head_layer="fc", external_data_threshold=1)
    assert second.external_data != first.external_data and not first.external_data.exists()
    onnx.checker.check_model(str(second.path))
    assert verify_onnx(second.path, model, input_shape=(8,)).max_abs_diff <= 1e-4
    assert sorted(p.name for p in out.iterdir()) == sorted(["model.onnx", second.external_data.name])

    small = export_onnx(model, out / "model.onnx", input_shape=(8,), head_layer="fc")
    assert small.external_data is None
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]  # the stale .data is gone


def test_failed_export_leaves_nothing_behind(tmp_path):
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(ExportError, match="torch.onnx.export failed"):
        export_onnx(Broken(), target, input_shape=(8,))
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    model = _tiny(64, 10)
    _swap(model, "fc")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", fail)
    with pytest.raises(OSError):
        export_onnx(model, tmp_path / "model.onnx", input_shape=(8,), head_layer="fc")
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_raise_export_error(tmp_path):
    model = _tiny(64, 10)
    with pytest.raises(ExportError, match="not found"):
        export_onnx(model, tmp_path / "m.onnx", input_shape=(8,), head_layer="nope")
    with pytest.raises(ExportError, match="HadamardHead"):
        export_onnx(model, tmp_path / "m.onnx", input_shape=(8,), head_layer="fc")  # still a Linear
    with pytest.raises(ExportError, match="opset 12 is too old"):
        export_onnx(model, tmp_path / "m.onnx", input_shape=(8,), opset=12)
    with pytest.raises(ExportError, match="head layout 'x' is unknown"):
        export_onnx(model, tmp_path / "m.onnx", input_shape=(8,), head_layout="x")
    with pytest.raises(ExportError, match="does not exist"):
        export_onnx(model, tmp_path / "missing" / "m.onnx", input_shape=(8,))
    assert list(tmp_path.iterdir()) == []


def test_head_running_twice_is_refused(tmp_path):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(x) + self.fc(x)

    model = Twice().eval()
    _swap(model, "fc")
    with pytest.raises(ExportError, match="2 times"):
        export_onnx(model, tmp_path / "m.onnx", input_shape=(64,), head_layer="fc")
    assert list(tmp_path.iterdir()) == []


def test_export_restores_model_and_each_module_mode(tmp_path):
    model = _tiny(64, 10).train()
    head = _swap(model, "fc")
    model.body.eval()  # e.g. a frozen backbone
    export_onnx(model, tmp_path / "m.onnx", input_shape=(8,), head_layer="fc")
    assert model.fc is head
    assert model.training and head.training and not model.body.training


def test_head_output_missing_from_logits_is_refused(tmp_path):
    class FeaturesFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            return x * 2, self.fc(x)  # (features, logits): the first element is taken as the logits

    model = FeaturesFirst().eval()
    _swap(model, "fc")
    with pytest.raises(ExportError, match="does not reach the model's logits"):
        export_onnx(model, tmp_path / "m.onnx", input_shape=(8,), head_layer="fc")


def test_parse_rows_reverses_compact_rows():
    perm = np.random.default_rng(0).permutation(np.arange(1, 1001))
    text = compact_rows(perm)
    assert text.startswith("b64u16:") and len(text) < 3000
    assert np.array_equal(parse_rows(text), perm)
    big = np.array([70000, 3, 5])
    assert np.array_equal(parse_rows(compact_rows(big)), big)
    assert np.array_equal(parse_rows("1-3,7,9-10"), [1, 2, 3, 7, 9, 10])


class _HeadThenOps(nn.Module):
    """The classifier's output feeds further ops (log-softmax, scaling) before the model returns."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.fc(torch.tanh(self.body(x))), dim=-1) * 2.0


@pytest.mark.parametrize("dtype,tol,casts", [("fp32", 1e-4, None), ("fp16", 5e-2, 2)])
def test_head_followed_by_more_ops(dtype, tol, casts, tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _HeadThenOps().eval()
    _swap(model, "fc")
    res = export_onnx(model, tmp_path / "m.onnx", input_shape=(8,), head_layer="fc", dtype=dtype)
    assert res.head_ops.get("Cast") == casts  # fp16: features in, logits back to half for the LogSoftmax
    ops = [n.op_type for n in onnx.load(str(res.path)).graph.node if not n.name.startswith(HEAD_PREFIX)]
    assert "LogSoftmax" in ops and "Gemm" in ops  # the backbone Linear stays, the head's Gemm is gone
    assert ops.count("Gemm") == 1
    assert verify_onnx(res.path, model, input_shape=(8,), atol=tol, rtol=tol).max_abs_diff <= tol


def test_export_and_verify_leave_the_global_rng_alone(tmp_path):
    model = _tiny(64, 10)
    _swap(model, "fc")
    with torch.random.fork_rng():
        torch.manual_seed(5)
        expected = torch.rand(3)
        torch.manual_seed(5)
        res = export_onnx(model, tmp_path / "m.onnx", input_shape=(8,), head_layer="fc")
        verify_onnx(res.path, model, input_shape=(8,))
        assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------------------------------------- the two exporters


def _dynamo_case(name: str):
    from models import HEAD_LAYOUTS

    layout = {**LAYOUTS, **HEAD_LAYOUTS}[name]()
    swap = swap_classifier(layout.model, input_shape=layout.input_shape)
    return layout, swap


@pytest.mark.parametrize("name", ["resnet_fc", "distilled_vit"])  # a ReduceMean below opset 18; two heads
def test_dynamo_exporter_gives_the_same_slim_heads(name, tmp_path):
    layout, swap = _dynamo_case(name)
    res = export_onnx(layout.model, tmp_path / "m.onnx", input_shape=layout.input_shape, head_layer=swap.layers,
                      exporter="dynamo")
    assert res.exporter == "dynamo" and res.exporter_failures == [] and res.opset == 17
    proto = onnx.load(str(res.path))
    onnx.checker.check_model(proto)  # no opset-18 attribute left behind by the version converter
    assert [o.version for o in proto.opset_import if o.domain == ""] == [17]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch_size"
    assert len(res.heads) == len(swap.layers)
    for h, s in zip(res.heads, swap.heads, strict=True):
        ops = check_head_static(proto, num_classes=s.head.num_classes, embed_size=s.head.embed_size, prefix=h.scope)
        assert ops == h.ops and not {"MatMul", "Gemm", "Conv"} & set(ops)
    assert not any(n.domain == "fyc" for n in proto.graph.node)  # every marker replaced
    ver = verify_onnx(res.path, layout.model, input_shape=layout.input_shape)
    assert ver.max_abs_diff < 1e-5 and ver.batch_sizes == [1, 3, 8]


def test_dynamo_exporter_at_a_static_batch(tmp_path):
    layout, swap = _dynamo_case("vit_head")
    res = export_onnx(layout.model, tmp_path / "m.onnx", input_shape=layout.input_shape, head_layer=swap.layers,
                      exporter="dynamo", static_batch=4)
    proto = onnx.load(str(res.path))
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim][0] == 4
    assert verify_onnx(res.path, layout.model, input_shape=layout.input_shape, static_batch=4).max_abs_diff < 1e-5


class _OddAdaptivePool(nn.Module):
    """AdaptiveAvgPool2d(3) on 8x8 maps: the TorchScript exporter refuses (3 is not a factor of 8), dynamo exports."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(3), nn.Flatten())
        self.fc = nn.Linear(36, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def test_auto_falls_back_to_dynamo_and_says_why(tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _OddAdaptivePool().eval()
    swap = swap_classifier(model, input_shape=(3, 8, 8))
    with pytest.raises(ExportError, match="adaptive_avg_pool2d"):
        export_onnx(model, tmp_path / "ts.onnx", input_shape=(3, 8, 8), head_layer=swap.layers, exporter="torchscript")
    res = export_onnx(model, tmp_path / "m.onnx", input_shape=(3, 8, 8), head_layer=swap.layers)  # auto
    assert res.exporter == "dynamo"
    assert len(res.exporter_failures) == 1 and res.exporter_failures[0].startswith("torchscript: ")
    assert "adaptive_avg_pool2d" in res.exporter_failures[0]
    check_head_static(res.path, num_classes=10, embed_size=swap.head.embed_size)
    assert verify_onnx(res.path, model, input_shape=(3, 8, 8)).max_abs_diff < 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]

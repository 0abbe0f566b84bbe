"""The Kronecker head layout (`--head-layout kron`): parity with the dense references and the PyTorch head,
its blocks, its static checks, its node bound and its multiply-add count."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import scipy.linalg
import torch
from test_onnx_head import _assert_matches_head, _run, make_spec, reference_logits, table_reference, table_spec
from torch import nn

from fyc_convert.errors import ExportError
from fyc_convert.export.onnx_head import DENSE_OPS, HeadSpec, check_head_static, head_model
from fyc_convert.export.onnx_head_kron import KRON_MAX_BLOCK, kron_factors, kron_macs, kron_node_bound
from fyc_convert.head.heads import HadamardHead

# fold (2048 = 16·128), tile into m > N, pad, contiguous rows, and the K·P = 32768 table of 512 x 32000
SPECS = {
    "fold": lambda: make_spec(2048, 100),
    "tile": lambda: make_spec(342, 100),
    "pad": lambda: make_spec(700, 300, embedding="pad"),
    "contiguous": lambda: make_spec(512, 1000, shuffled=False),
    "digits-size": lambda: make_spec(64, 10),
}


@pytest.mark.parametrize(
    ("points", "want"),
    [(1, []), (2, [2]), (32, [32]), (64, [8, 8]), (128, [16, 8]), (256, [16, 16]), (1024, [32, 32]),
     (2048, [16, 16, 8]), (32768, [32, 32, 32])],
)
def test_factors_are_small_powers_of_two_whose_product_is_the_size(points: int, want: list[int]) -> None:
    assert kron_factors(points) == want
    assert all(s <= KRON_MAX_BLOCK for s in want) and int(np.prod(want)) == points


@pytest.mark.parametrize("static_batch", [None, 1, 3, 64])
@pytest.mark.parametrize("kind", list(SPECS))
def test_matches_the_dense_reference(kind: str, static_batch: int | None) -> None:
    """Dynamic and static batches (<= 32: batch-major first block; 64: batch-last throughout) give the logits."""
    spec = SPECS[kind]()
    model = head_model(spec, layout="kron", static_batch=static_batch)
    onnx.checker.check_model(model)
    rng = np.random.default_rng(len(kind))
    for batch in (1, 3, 64) if static_batch is None else (static_batch,):
        x = rng.normal(size=(batch, spec.in_features)).astype(np.float32)
        np.testing.assert_allclose(_run(model, x), reference_logits(spec, x), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("static_batch", [None, 64])
@pytest.mark.parametrize(("n_feat", "c", "k", "p"), [(64, 100, 3, 64), (50, 120, 4, 64), (100, 40, 2, 512)])
def test_table_heads_match_the_dense_reference(n_feat: int, c: int, k: int, p: int, static_batch: int | None) -> None:
    spec = table_spec(n_feat, c, k, p, kind="signs", seed=n_feat + k)
    model = head_model(spec, layout="kron", static_batch=static_batch)
    x = np.random.default_rng(4).normal(size=(static_batch or 17, n_feat)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x), table_reference(spec, x), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(("n_feat", "c"), [(256, 1200), (64, 300)])
def test_frame_heads_match_the_pytorch_head(n_feat: int, c: int) -> None:
    """The glyph sample's sizes (kerdock frame, rows assigned by from_linear) at several batches."""
    gen = torch.Generator().manual_seed(n_feat + c)
    linear = nn.Linear(n_feat, c)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(c, n_feat, generator=gen))
    head = HadamardHead.from_linear(linear)
    model = head_model(HeadSpec.from_module(head), layout="kron")
    _assert_matches_head(model, head, (1, 3, 64), seed=3)


@pytest.mark.parametrize("kind", list(SPECS))
def test_static_checks_node_bound_and_blocks(kind: str) -> None:
    """MatMul is the one dense op; each reads exactly hadamard(s), s <= 32; constants within max(C, n, 1024)."""
    spec = SPECS[kind]()
    model = head_model(spec, layout="kron")
    census = check_head_static(model, num_classes=spec.num_classes, embed_size=spec.embed_size)
    assert {op for op in census if op in DENSE_OPS} == {"MatMul"}
    assert census["MatMul"] == len(kron_factors(spec.hadamard_size))
    assert len(model.graph.node) <= kron_node_bound(spec)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in (n for n in model.graph.node if n.op_type == "MatMul"):
        (block,) = [inits[name] for name in node.input if name in inits]
        np.testing.assert_array_equal(block, scipy.linalg.hadamard(len(block)))
    # the portable checks refuse the same graph: its MatMuls are the kron layout's alone
    with pytest.raises(ExportError, match="MatMul"):
        check_head_static(model, num_classes=spec.num_classes, embed_size=spec.embed_size, layout="portable")


def test_static_check_refuses_a_block_that_is_not_plus_minus_one() -> None:
    spec = make_spec(342, 100)
    model = head_model(spec, layout="kron")
    block = next(i for i in model.graph.initializer if "hadamard" in i.name)
    values = onnx.numpy_helper.to_array(block).copy()
    values[0, 0] = 2.0
    block.CopyFrom(onnx.numpy_helper.from_array(values, block.name))
    with pytest.raises(ExportError, match="±1 block"):
        check_head_static(model, num_classes=spec.num_classes, embed_size=spec.embed_size)


def test_multiply_adds_per_sample() -> None:
    """K·P·Σ s_i: the glyph sizes (10 tiles of 256 = 16·16) cost 81,920 against the Gemm's 307,200."""
    spec = table_spec(256, 1200, 10, 256, kind="signs", seed=0)
    assert kron_macs(spec) == 10 * 256 * 32
    assert kron_macs(make_spec(2048, 100)) == 128 * (16 + 8)  # the fold to m = 128 first


def test_convert_with_kron_verifies_benches_and_reports_multiply_adds(tmp_path) -> None:
    """`convert(head_layout="kron", bench=True)`: model.onnx holds the kron head and passed verification, the
    head-only timing ran on the kron graph, and the report states its multiply-adds per sample."""
    from pathlib import Path

    from fyc_convert import convert
    from fyc_convert.export.onnx_head import LAYOUT_KEY

    root = Path(__file__).resolve().parents[1]
    report = convert(root / "sample_models" / "digits_cnn.pt", arch="sample_models.archs:digits_cnn",
                     data=root / "sample_models" / "digits.npz", epochs=0, output_dir=tmp_path / "out",
                     head_layout="kron", bench=True, device="cpu")
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert {p.key: p.value for p in model.metadata_props}[LAYOUT_KEY] == "kron"
    assert report.onnx.head_ops["MatMul"] == 2 and report.onnx.max_abs_diff <= 1e-4
    # digits: N = 64 -> C = 10 on a kept table of 2 tiles of 64 points (8 x 8 blocks): 2 · 64 · 16
    assert report.onnx.head_macs == 2 * 64 * (8 + 8)
    assert report.latency_ms["head_b1"]["converted"] > 0 and report.latency_ms["model_b32"]["converted"] > 0

"""The ONNX Hadamard head: onnxruntime output vs a dense numpy reference of docs/design.md, and the static
checks (no MatMul/Gemm/Conv, small constants, names under the prefix)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import scipy.linalg
import torch
from torch import nn

from fyc_convert.errors import ExportError
from fyc_convert.export import onnx_head, onnx_head_switched
from fyc_convert.export.onnx_head import (
    DENSE_OPS,
    HeadSpec,
    check_head_static,
    head_model,
    head_op_census,
    largest_head_constant,
)
from fyc_convert.export.ops import Ops, butterflies
from fyc_convert.head.hadamard import fwht_reference
from fyc_convert.head.heads import HadamardHead

SIZES = [(64, 10), (342, 100), (512, 1000), (2048, 1000), (192, 1000)]
# the ops of the portable layout (issue 11): data movement, add/sub, the norm, Mul by constants
PORTABLE_OPS = {"Add", "Sub", "Mul", "Div", "Sqrt", "ReduceSum", "Reshape", "Split", "Slice", "Concat",
                "Transpose", "Gather"}


def _next_pow2(k: int) -> int:
    return 1 << (k - 1).bit_length()


def make_spec(
    n_feat: int, c: int, *, embedding: str = "tile", bias: bool = True, shuffled: bool = True, seed: int = 0
) -> HeadSpec:
    """Default sizing from docs/design.md for "tile"; "pad" always embeds into m = n = nextpow2(max(N, C+1)).

    Rows are C random distinct rows of 1..m-1 when `shuffled` (as assigned by from_linear), else 1..C.
    """
    rng = np.random.default_rng(seed)
    m0 = _next_pow2(c + 1)
    if embedding == "tile" and n_feat % m0 == 0:
        m, n = m0, n_feat
    else:
        m = n = _next_pow2(max(n_feat, c + 1))
    signs = rng.choice([-1.0, 1.0], size=n - n_feat) if embedding == "tile" else np.zeros(n - n_feat)
    return HeadSpec(
        in_features=n_feat,
        num_classes=c,
        hadamard_size=m,
        embed_size=n,
        embedding=embedding,
        eps=1e-8,
        signs=signs,
        rows=(rng.permutation(np.arange(1, m))[:c] if shuffled else np.arange(1, c + 1)).astype(np.int64),
        scale=float(rng.uniform(2.0, 12.0)),
        bias=rng.normal(size=c) if bias else None,
    )


def reference_logits(spec: HeadSpec, x: np.ndarray) -> np.ndarray:
    """docs/design.md, densely in float64: x̂ -> x̃ -> fold -> H_m -> [rows] · scale + bias. x: (B, N)."""
    n_feat, m, n = spec.in_features, spec.hadamard_size, spec.embed_size
    x = x.astype(np.float64)
    xh = x / (np.linalg.norm(x, axis=1, keepdims=True) + spec.eps)  # (B, N)
    xt = np.concatenate([xh, spec.signs * xh[:, np.arange(n_feat, n) % n_feat]], axis=1)  # (B, n)
    y = xt.reshape(len(x), n // m, m).sum(axis=1)  # (B, m)
    z = fwht_reference(y)  # (B, m) = y · H_m
    np.testing.assert_allclose(z, y @ scipy.linalg.hadamard(m).T, rtol=0, atol=1e-9 * m)
    logits = spec.scale * z[:, spec.rows]
    return logits if spec.bias is None else logits + spec.bias


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"features": x.astype(np.float32)})[0]


def _assert_matches_head(model: onnx.ModelProto, head: HadamardHead, batches: tuple[int, ...], seed: int) -> None:
    """onnxruntime's logits equal the PyTorch head's, to 1e-4, on random features at each batch size."""
    x = torch.randn(max(batches), head.input_features, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = head(x).numpy()
    for batch in batches:
        np.testing.assert_allclose(_run(model, x[:batch].numpy()), want[:batch], atol=1e-4, rtol=0)


@pytest.mark.parametrize("shuffled", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("embedding", ["tile", "pad"])
@pytest.mark.parametrize(("n_feat", "c"), SIZES)
def test_matches_reference(n_feat: int, c: int, embedding: str, bias: bool, shuffled: bool) -> None:
    spec = make_spec(n_feat, c, embedding=embedding, bias=bias, shuffled=shuffled, seed=n_feat + c)
    model = head_model(spec)
    onnx.checker.check_model(model)
    rng = np.random.default_rng(1)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    for batch in (1, 3, 64):
        x = rng.normal(size=(batch, n_feat)).astype(np.float32)
        out = sess.run(None, {"features": x})[0]
        assert out.shape == (batch, c)
        np.testing.assert_allclose(out, reference_logits(spec, x), atol=1e-4, rtol=0)


def _hadamard_head(n_feat: int, c: int, variant: str) -> HadamardHead:
    """A HadamardHead with random scale/bias; `variant` = embedding + row order + bias."""
    gen = torch.Generator().manual_seed(n_feat * 7 + c)
    embedding, order, bias = variant.split("-")
    m = (HadamardHead(n_feat, c, bias=False, embedding="tile").hadamard_size if embedding == "tile"
         else _next_pow2(max(n_feat, c + 1)))
    rows = torch.arange(1, c + 1)
    if order == "shuffled":
        rows = (torch.randperm(m - 1, generator=gen)[:c] + 1)
    head = HadamardHead(n_feat, c, bias=bias == "bias", embedding=embedding, rows=rows, hadamard_size=m)
    with torch.no_grad():
        head.scale.fill_(float(torch.rand((), generator=gen)) * 10 + 1)
        if head.bias is not None:
            head.bias.copy_(torch.randn(c, generator=gen))
    return head


VARIANTS = ["tile-contiguous-bias", "tile-shuffled-nobias", "pad-shuffled-bias", "pad-contiguous-nobias"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("n_feat", "c"), SIZES)
def test_matches_hadamard_head(n_feat: int, c: int, variant: str) -> None:
    head = _hadamard_head(n_feat, c, variant)
    spec = HeadSpec.from_module(head)
    assert (spec.hadamard_size, spec.embed_size) == (head.hadamard_size, head.embed_size)
    assert spec.embedding == head.embedding and np.array_equal(spec.rows, head.rows.numpy())
    _assert_matches_head(head_model(spec), head, (1, 3, 64), seed=5)


# (N, C, m): N=512, C=32000 is a 32768-point transform of 64 signed copies of x: a table of 63 blocks of
# 512 points (the block without class rows dropped); N=1000 (not a power of two), C=5000 an 8192-point
# transform of signed copies. The batch-switched layout holds one If (its blocked branch from batch 16).
LARGE = [(512, 32000, 32768), (1000, 5000, 8192)]


@pytest.mark.parametrize("layout", ["portable", "batch-switched"])
@pytest.mark.parametrize("variant", ["tile-contiguous-bias", "tile-shuffled-nobias"])
@pytest.mark.parametrize(("n_feat", "c", "m"), LARGE)
def test_large_transforms_match_hadamard_head(n_feat: int, c: int, m: int, variant: str, layout: str) -> None:
    head = _hadamard_head(n_feat, c, variant)
    assert (head.hadamard_size, head.embed_size) == (m, m)
    model = head_model(HeadSpec.from_module(head), layout=layout)
    assert head_op_census(model).get("If", 0) == (layout == "batch-switched")
    _assert_matches_head(model, head, (3, 16), seed=7)


# (N, C, block points, table Muls): with small block sizes both branches of the If are built at small sizes,
# the single transform below 4 samples and the blocked one from 4 on. N=64, C=1000: 16 whole copies of x
# in a 1024-point transform, chunks of 2 tiles (the table Mul once in the small branch and once per chunk);
# N=342, C=100: a 512-point transform of signed copies (or zero padding), 8 blocks of 64 points.
SWITCHED = [(64, 1000, 128, 1 + 8), (342, 100, 64, 0)]


@pytest.mark.parametrize("shuffled", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("embedding", ["tile", "pad"])
@pytest.mark.parametrize(("n_feat", "c", "block", "table_muls"), SWITCHED)
def test_batch_switched_branches_match_reference(
    monkeypatch: pytest.MonkeyPatch, n_feat: int, c: int, block: int, table_muls: int, embedding: str,
    bias: bool, shuffled: bool,
) -> None:
    monkeypatch.setattr(onnx_head_switched, "_BLOCK_POINTS", block)
    monkeypatch.setattr(onnx_head_switched, "_BLOCK_MIN_POINTS", 2 * block)
    monkeypatch.setattr(onnx_head_switched, "_BLOCK_MIN_BATCH", 4)
    spec = make_spec(n_feat, c, embedding=embedding, bias=bias, shuffled=shuffled, seed=n_feat)
    assert spec.hadamard_size == spec.embed_size
    model = head_model(spec, layout="batch-switched")
    census = head_op_census(model)
    assert census["If"] == 1 and not {"MatMul", "Gemm", "Conv"} & census.keys()
    # x·x and the factor, then the table Muls, or for other N one "tile" sign flip, outside the If
    assert census["Mul"] == 2 + (table_muls or int(embedding == "tile"))
    assert largest_head_constant(model) <= max(c, spec.embed_size)
    rng = np.random.default_rng(4)
    for batch in (1, 3, 4, 5, 64):
        x = rng.normal(size=(batch, n_feat)).astype(np.float32)
        out = _run(model, x)
        assert out.shape == (batch, c)
        np.testing.assert_allclose(out, reference_logits(spec, x), atol=1e-4, rtol=0)
    timed = head_model(spec, time_axis=True, layout="batch-switched")  # the If sees batch x time rows
    for lead in ((1, 2), (2, 5)):
        x = rng.normal(size=(*lead, n_feat)).astype(np.float32)
        want = reference_logits(spec, x.reshape(-1, n_feat)).reshape(*lead, c)
        np.testing.assert_allclose(_run(timed, x), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("n_feat", "c", "variant"),
    [(3000, 4000, "pad-shuffled-bias"), (3000, 5000, "tile-contiguous-nobias")],
)
def test_transforms_around_the_transpose_threshold_match_hadamard_head(n_feat: int, c: int, variant: str) -> None:
    # 4096 points: the last size run in natural order; 8192: the first with the mid Transpose (radix-8)
    head = _hadamard_head(n_feat, c, variant)
    assert head.hadamard_size == (4096 if c < 4096 else 8192)
    _assert_matches_head(head_model(HeadSpec.from_module(head)), head, (1, 3, 64), seed=8)


def test_default_head_sizes_and_time_axis() -> None:
    head = _hadamard_head(2048, 1000, "tile-contiguous-bias")
    assert (head.hadamard_size, head.embed_size) == (1024, 2048)  # the fold: a 1024-point transform
    x = torch.randn(2, 5, 2048, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = head(x).numpy()
    out = _run(head_model(HeadSpec.from_module(head), time_axis=True), x.numpy())
    assert out.shape == (2, 5, 1000)
    np.testing.assert_allclose(out, want, atol=1e-4, rtol=0)


def test_time_axis_input() -> None:
    spec = make_spec(342, 100, seed=3)
    x = np.random.default_rng(2).normal(size=(2, 5, 342)).astype(np.float32)
    out = _run(head_model(spec, time_axis=True), x)
    assert out.shape == (2, 5, 100)
    want = reference_logits(spec, x.reshape(10, 342)).reshape(2, 5, 100)
    np.testing.assert_allclose(out, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("n_feat", "c"), SIZES)
def test_static_checks(n_feat: int, c: int) -> None:
    spec = make_spec(n_feat, c)
    model = head_model(spec, prefix="scope/")
    census = head_op_census(model, prefix="scope/")
    assert not {"MatMul", "Gemm", "Conv"} & census.keys()
    assert census["Gather"] >= 1 and census["Add"] >= 1 and census["Sub"] >= 1
    assert set(census) <= PORTABLE_OPS
    # x·x for the norm, the one multiply by α/(‖x‖+eps), and the embedding's one multiply: the ±1 sign flip,
    # or for whole copies of x (512x1000: two) the integer table that also does the top butterfly levels
    assert census["Mul"] == 2 + (spec.embed_size > n_feat)
    assert 0 < largest_head_constant(model, prefix="scope/") <= max(c, spec.embed_size)
    assert all(node.name.startswith("scope/") for node in model.graph.node)
    assert sum(census.values()) == len(model.graph.node)


def test_census_and_constants_ignore_other_nodes() -> None:
    spec = make_spec(64, 10)
    model = head_model(spec)
    assert head_op_census(model, prefix="other/") == {}
    assert largest_head_constant(model, prefix="other/") == 0


def test_spec_rejects_inconsistent_sizes() -> None:
    spec = make_spec(64, 10)
    with pytest.raises(ExportError, match="power of two"):
        HeadSpec(**{**spec.__dict__, "hadamard_size": 12})
    with pytest.raises(ExportError, match="rows"):
        HeadSpec(**{**spec.__dict__, "rows": np.arange(10) + 10})


# ------------------------------------------------------------------------------------ portable layout
def table_reference(spec: HeadSpec, x: np.ndarray) -> np.ndarray:
    """The block-table contract, densely in float64: z = concat_k H_P(table[k] ⊙ pad(x̂, P)). x: (B, N)."""
    x = x.astype(np.float64)
    xh = x / (np.linalg.norm(x, axis=1, keepdims=True) + spec.eps)
    k, p = spec.table.shape
    padded = np.concatenate([xh, np.zeros((len(x), p - spec.in_features))], axis=1)  # (B, P)
    h = scipy.linalg.hadamard(p)
    z = np.concatenate([(padded * spec.table[t]) @ h.T for t in range(k)], axis=1)  # (B, K·P)
    logits = spec.scale * z[:, spec.rows]
    return logits if spec.bias is None else logits + spec.bias


def table_spec(n_feat: int, c: int, k: int, p: int, *, kind: str, seed: int, bias: bool = True) -> HeadSpec:
    """A hand-made spec with a (K, P) table of random ±1 or small integers and rows over all K·P outputs."""
    rng = np.random.default_rng(seed)
    table = rng.choice([-1.0, 1.0], size=(k, p)) if kind == "signs" else rng.integers(-4, 5, size=(k, p)) * 1.0
    m = 1 << (max(n_feat, 2) - 1).bit_length()
    return HeadSpec(
        in_features=n_feat, num_classes=c, hadamard_size=m, embed_size=m, embedding="tile", eps=1e-8,
        signs=np.ones(m - n_feat), rows=rng.permutation(k * p)[:c].astype(np.int64),
        scale=float(rng.uniform(2.0, 12.0)), bias=rng.normal(size=c) if bias else None, table=table,
    )


# (N, C, K, P): P = N; P > N (zero padding after the features); one block; many blocks
TABLES = [(64, 100, 3, 64), (50, 120, 4, 64), (200, 30, 1, 256), (16, 300, 20, 16), (100, 40, 2, 512),
          (128, 300, 3, 128)]


@pytest.mark.parametrize("kind", ["signs", "integers"])
@pytest.mark.parametrize(("n_feat", "c", "k", "p"), TABLES)
def test_table_path_matches_dense_reference(n_feat: int, c: int, k: int, p: int, kind: str) -> None:
    spec = table_spec(n_feat, c, k, p, kind=kind, seed=n_feat + k)
    model = head_model(spec)
    census = head_op_census(model)
    assert set(census) <= PORTABLE_OPS
    assert len(model.graph.node) <= onnx_head.portable_node_bound(spec)
    rng = np.random.default_rng(3)
    for batch in (1, 3, 17):
        x = rng.normal(size=(batch, n_feat)).astype(np.float32)
        np.testing.assert_allclose(_run(model, x), table_reference(spec, x), atol=1e-4, rtol=1e-5)


def test_table_path_drops_blocks_without_class_rows() -> None:
    spec = table_spec(32, 40, 6, 32, kind="integers", seed=1)
    rows = np.concatenate([np.arange(40, 60), np.arange(130, 150)])  # blocks 1 and 4 only
    spec = HeadSpec(**{**spec.__dict__, "rows": rows})
    model = head_model(spec)
    tables = [i for i in model.graph.initializer if "table" in i.name]
    assert [list(t.dims) for t in tables] == [[2 * 32, 1]]  # two of the six blocks
    x = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x), table_reference(spec, x), atol=1e-4, rtol=1e-5)


class _BlockTableHead:
    """A stand-in for a head with `block_table()` (the class-vector frame's heads)."""

    def __init__(self, table: np.ndarray | None):
        base = HadamardHead(32, 50, embedding="tile")
        self.__dict__.update({k: getattr(base, k) for k in
                              ("in_features", "num_classes", "hadamard_size", "embed_size", "embedding", "eps",
                               "signs", "rows", "scale", "bias")})
        self._table = table

    def block_table(self) -> np.ndarray | None:
        return self._table


def test_from_module_takes_the_block_table_else_the_whole_copy_table() -> None:
    own = np.random.default_rng(0).choice([-1.0, 1.0], size=(2, 32))
    assert np.array_equal(HeadSpec.from_module(_BlockTableHead(own)).table, own)
    base = HadamardHead(32, 50, embedding="tile")  # whole copies: N = 32, m = n = 64, T = 2
    computed = HeadSpec.from_module(_BlockTableHead(None)).table
    signs = np.concatenate([np.ones(32), base.signs.double().numpy()]).reshape(2, 32)
    assert np.array_equal(computed, np.stack([signs[0] + signs[1], signs[0] - signs[1]]))  # H_2 · S
    assert HeadSpec.from_module(HadamardHead(342, 100)).table is None  # N not a power of two


def test_spec_rejects_bad_tables() -> None:
    spec = table_spec(64, 10, 2, 64, kind="signs", seed=0)
    with pytest.raises(ExportError, match="power of two"):
        HeadSpec(**{**spec.__dict__, "table": np.ones((2, 96))})
    with pytest.raises(ExportError, match=">= in_features"):
        HeadSpec(**{**spec.__dict__, "table": np.ones((2, 32))})
    with pytest.raises(ExportError, match=r"rows must be 10 indices in \[0, 128\)"):
        HeadSpec(**{**spec.__dict__, "rows": np.arange(120, 130)})


def _default_spec(n_feat: int, c: int) -> HeadSpec:
    """The default sizing (docs/design.md) without building a HadamardHead (fast for huge C)."""
    m0 = _next_pow2(c + 1)
    if n_feat % m0 == 0:
        m, n = m0, n_feat
    else:
        m = n = _next_pow2(max(n_feat, c + 1))
    rng = np.random.default_rng(0)
    spec = HeadSpec(in_features=n_feat, num_classes=c, hadamard_size=m, embed_size=n, embedding="tile",
                    eps=1e-8, signs=rng.choice([-1.0, 1.0], size=n - n_feat),
                    rows=rng.permutation(np.arange(1, m))[:c].astype(np.int64), scale=3.0, bias=rng.normal(size=c))
    if n == m and n_feat < m and n_feat & (n_feat - 1) == 0:  # whole copies: the table, as from_module does
        signs = np.concatenate([np.ones(n_feat), spec.signs]).reshape(m // n_feat, n_feat)
        spec = HeadSpec(**{**spec.__dict__, "table": scipy.linalg.hadamard(m // n_feat) @ signs})
    return spec


BOUND_SIZES = [(64, 10), (10, 7), (342, 100), (256, 1200), (2048, 1000), (1664, 18000), (1000, 5000),
               (4096, 30), (2048, 18000), (512, 32000)]


@pytest.mark.parametrize(("n_feat", "c"), BOUND_SIZES)
def test_portable_node_count_is_bounded(n_feat: int, c: int) -> None:
    spec = _default_spec(n_feat, c)
    model = head_model(spec)
    nodes = len(model.graph.node)
    p = spec.table.shape[1] if spec.table is not None else spec.hadamard_size
    levels = p.bit_length() - 1
    assert nodes <= onnx_head.portable_node_bound(spec) <= 5.5 * levels + 22.5
    assert head_op_census(model)["Split"] == -(-levels // (1 if levels <= 6 else 2))
    assert largest_head_constant(model) <= max(c, spec.embed_size)


def _reshape_targets(model: onnx.ModelProto) -> list[list[int]]:
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    return [inits[n.input[1]].tolist() for n in model.graph.node if n.op_type == "Reshape"]


@pytest.mark.parametrize(("n_feat", "c"), [(64, 10), (342, 100), (2048, 1000), (256, 1200), (512, 1000)])
def test_portable_forms(n_feat: int, c: int) -> None:
    """No If/Shape, reshapes to constant shapes with at most one -1, every head tensor of rank 2."""
    spec = _default_spec(n_feat, c)
    model = head_model(spec)
    assert set(head_op_census(model)) <= PORTABLE_OPS
    assert all(shape.count(-1) <= 1 for shape in _reshape_targets(model))
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in inferred.graph.value_info}
    assert ranks and set(ranks.values()) <= {2}, ranks
    for node in model.graph.node:
        if node.op_type == "Mul":  # constants broadcast over the batch only: (rows, 1), (1, cols) or scalars
            for name in node.input:
                t = next((i for i in model.graph.initializer if i.name == name), None)
                assert t is None or len(t.dims) <= 2 and (len(t.dims) < 2 or 1 in t.dims)


def test_static_batch_fixes_every_shape() -> None:
    spec = _default_spec(256, 1200)
    model = head_model(spec, static_batch=4)
    assert all(-1 not in shape for shape in _reshape_targets(model))
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [4, 256]
    x = np.random.default_rng(0).normal(size=(4, 256)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x), table_reference(spec, x), atol=1e-4, rtol=1e-5)
    with pytest.raises(ExportError, match="static batch"):
        head_model(spec, static_batch=0)


@pytest.mark.parametrize(("n_feat", "p"), [(256, 256), (150, 256)])
def test_shared_first_level(n_feat: int, p: int) -> None:
    """Assigned rows on a ±1 table above 64 points: one first level for all blocks, then a Gather of rows.

    The K blocks' first butterfly level is computed once on (P, B) (2 Add/Sub nodes, not 2·2^r on K·P·B) and
    placed by a Gather; no Mul by the table; every Split has constant sizes. Features padded to P (150 of 256)
    take the top rows where their pair is padding.
    """
    spec = table_spec(n_feat, 1000, 5, p, kind="signs", seed=7)
    model = head_model(spec)
    census = head_op_census(model)
    names = {i.name for i in model.graph.initializer}
    assert census["Gather"] == 2 and not any(n.startswith(f"{onnx_head.HEAD_PREFIX}table") for n in names)
    # 8 levels: the shared one (Add, Sub), then stages of 2, 2, 2 and 1 levels (8 + 8 + 8 + 2); the eps and bias Adds
    assert census["Add"] + census["Sub"] == 2 + 26 + 2
    assert all(len(n.input) == 2 for n in model.graph.node if n.op_type == "Split")
    x = np.random.default_rng(5).normal(size=(33, n_feat)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x), table_reference(spec, x), atol=2e-4, rtol=0)


@pytest.mark.parametrize("opset", [13, 15, 17, 18, 21])
def test_opset_forms(opset: int) -> None:
    spec = make_spec(342, 100, shuffled=False, seed=1)  # contiguous rows: the natural-order transform
    model = head_model(spec, opset=opset)
    splits = [n for n in model.graph.node if n.op_type == "Split"]
    # equal pieces of a batch-dependent size: `num_outputs` from 18 on, no `split` input (equal pieces by
    # definition) below; constant sizes (the first level of 342x100's transform) as the `split` input
    dynamic = [n for n in splits if len(n.input) == 1]
    assert dynamic and all(any(a.name == "num_outputs" for a in n.attribute) == (opset >= 18) for n in dynamic)
    assert model.ir_version == onnx.helper.find_min_ir_version_for(list(model.opset_import))
    x = np.random.default_rng(1).normal(size=(3, 342)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x), reference_logits(spec, x), atol=1e-4, rtol=0)
    with pytest.raises(ExportError, match="opset 12 is too old"):
        head_model(spec, opset=12)


def test_static_time_axis() -> None:
    spec = make_spec(342, 100, seed=4)
    model = head_model(spec, time_axis=True, time_steps=5)
    assert "Shape" not in head_op_census(model)
    x = np.random.default_rng(2).normal(size=(3, 5, 342)).astype(np.float32)
    want = reference_logits(spec, x.reshape(15, 342)).reshape(3, 5, 100)
    np.testing.assert_allclose(_run(model, x), want, atol=1e-4, rtol=0)


def test_unknown_layout_is_refused() -> None:
    with pytest.raises(ExportError, match="head layout 'fast' is unknown"):
        head_model(make_spec(64, 10), layout="fast")  # type: ignore[arg-type]


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("kind", ["contiguous", "shuffled", "fold", "pad", "table", "tiles"])
def test_static_batch_paths_match_reference(kind: str, batch: int) -> None:
    """Static batches of up to 4 run batch-major, larger ones batch-minor with constant Split sizes."""
    spec, ref = {
        "contiguous": (lambda: make_spec(342, 100, shuffled=False), reference_logits),
        "shuffled": (lambda: make_spec(342, 100), reference_logits),
        "fold": (lambda: make_spec(2048, 1000), reference_logits),
        "pad": (lambda: make_spec(700, 300, embedding="pad"), reference_logits),
        "table": (lambda: table_spec(100, 300, 3, 256, kind="integers", seed=1), table_reference),
        "tiles": (lambda: _default_spec(128, 1000), table_reference),
    }[kind]
    spec = spec()
    model = head_model(spec, static_batch=batch)
    assert all(-1 not in shape for shape in _reshape_targets(model))
    assert all(len(n.input) == 2 for n in model.graph.node if n.op_type == "Split")  # constant sizes (pnnx)
    assert ("Transpose" in head_op_census(model)) == (batch > 4 or spec.hadamard_size <= 64)
    x = np.random.default_rng(batch).normal(size=(batch, spec.in_features)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x), ref(spec, x), atol=1e-4, rtol=1e-5)


# Frame ("kerdock") heads, the default for C > N: (256, 1200) the glyph sample's sizes, (128, 4191) the large
# glyph sample's, (64, 300) a Gold-like frame (log2 P odd); from_linear keeps the tiles its classes took most.
@pytest.mark.parametrize("layout", ["portable", "batch-switched"])
@pytest.mark.parametrize(("n_feat", "c"), [(256, 1200), (128, 4191), (64, 300)])
def test_frame_heads_match_in_both_layouts(n_feat: int, c: int, layout: str) -> None:
    gen = torch.Generator().manual_seed(n_feat + c)
    linear = nn.Linear(n_feat, c)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(c, n_feat, generator=gen))
    head = HadamardHead.from_linear(linear)
    assert head.embedding == "kerdock"
    spec = HeadSpec.from_module(head)
    assert spec.table is not None and spec.table.shape[1] == head.hadamard_size
    model = head_model(spec, layout=layout)
    assert not set(head_op_census(model)) & set(DENSE_OPS)
    _assert_matches_head(model, head, (1, 3, 64, 300), seed=3)


@pytest.mark.parametrize("count", [1, 2, 4, 8, 16])
def test_the_one_butterfly_builder_is_the_reference_wht_over_its_parts(count: int) -> None:
    """`butterflies` on 2^r Split parts = fwht_reference across them, with r·2^r Add/Sub nodes."""
    x = gs.Variable("x", dtype=np.float32, shape=[count, 3])
    graph = gs.Graph(inputs=[x], opset=17)
    ops = Ops(graph, "bf/", np.float32)
    parts = butterflies(ops, ops.split(x, count, 0, sizes=[1] * count))
    graph.outputs = [ops.concat(parts, axis=0)]
    graph.outputs[0].shape = [count, 3]
    model = gs.export_onnx(graph.cleanup().toposort())
    census = head_op_census(model, "bf/")
    levels = count.bit_length() - 1
    assert census.get("Add", 0) == census.get("Sub", 0) == levels * count // 2
    data = np.random.default_rng(count).normal(size=(count, 3)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": data})[0]
    np.testing.assert_allclose(got, fwht_reference(data, axis=0), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------- ncnn layout
NCNN_OPS = (PORTABLE_OPS - {"Gather"}) | {"GridSample"}


@pytest.mark.parametrize("static_batch", [None, 1, 3, 8])
@pytest.mark.parametrize(("n_feat", "c", "k", "p"), TABLES)
def test_ncnn_layout_matches_the_table_reference_without_a_gather(n_feat: int, c: int, k: int, p: int,
                                                                   static_batch: int | None) -> None:
    spec = table_spec(n_feat, c, k, p, kind="signs", seed=n_feat + k)
    model = head_model(spec, layout="ncnn", static_batch=static_batch)
    census = head_op_census(model)
    assert set(census) <= NCNN_OPS and census["GridSample"] == 1
    assert len(model.graph.node) <= onnx_head.portable_node_bound(spec, "ncnn")
    assert check_head_static(model, num_classes=c, embed_size=k * p) == census  # the layout from the metadata
    rng = np.random.default_rng(5)
    for batch in (static_batch,) if static_batch else (1, 3, 17):
        x = rng.normal(size=(batch, n_feat)).astype(np.float32)
        np.testing.assert_allclose(_run(model, x), table_reference(spec, x), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("shuffled", [True, False])
@pytest.mark.parametrize(("n_feat", "c"), SIZES)
def test_ncnn_layout_matches_the_tile_reference(n_feat: int, c: int, shuffled: bool) -> None:
    """Batch-major at every size (pnnx takes axis 0 for the batch): outputs in natural order, so contiguous rows
    stay one Slice, without a GridSample."""
    spec = make_spec(n_feat, c, shuffled=shuffled, seed=n_feat + c)
    model = head_model(spec, layout="ncnn")
    census = head_op_census(model)
    assert census.get("GridSample", 0) == shuffled and "Gather" not in census and "Transpose" not in census
    x = np.random.default_rng(1).normal(size=(5, n_feat)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x), reference_logits(spec, x), atol=1e-4, rtol=1e-5)


def test_ncnn_layout_picks_exactly_at_the_far_end_of_a_wide_transform() -> None:
    """The grid's float32 coordinates land on the right output even for the last of 2^16 outputs."""
    spec = table_spec(64, 300, 1024, 64, kind="signs", seed=2)
    spec = HeadSpec(**{**spec.__dict__, "rows": np.arange(1024 * 64 - 1, 1024 * 64 - 301, -1), "bias": None,
                       "scale": 1.0})
    model = head_model(spec, layout="ncnn")
    x = np.random.default_rng(2).normal(size=(2, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x), table_reference(spec, x), atol=1e-4, rtol=1e-5)


def test_ncnn_layout_needs_opset_16_and_a_grid_sized_constant_bound() -> None:
    spec = table_spec(50, 120, 2, 64, kind="signs", seed=3)
    with pytest.raises(ExportError, match="GridSample, which needs opset 16"):
        head_model(spec, layout="ncnn", opset=15)
    model = head_model(spec, layout="ncnn")
    assert largest_head_constant(model) == 2 * 120  # the grid: two coordinates per class
    assert check_head_static(model, num_classes=120, embed_size=128)["GridSample"] == 1
    with pytest.raises(ExportError, match=r"limit max\(C, n\) = 128"):
        check_head_static(model, num_classes=120, embed_size=128, layout="portable")


@pytest.mark.parametrize("n_in", [64, 40])
@pytest.mark.parametrize("layout", ["portable", "kron", "ncnn", "batch-switched"])
def test_an_adapter_is_a_matmul_beside_the_head_scope(layout: str, n_in: int) -> None:
    """The learned map (64 x 64, or 40 -> 64 before the head) is a MatMul and an Add in its own scope."""
    head = HadamardHead(64, 1100, adapter=True if n_in == 64 else n_in)
    with torch.no_grad():
        head.adapter.weight.add_(0.1 * torch.randn(64, n_in, generator=torch.Generator().manual_seed(0)))
        head.adapter.bias.add_(0.2)
    model = head_model(HeadSpec.from_module(head), layout=layout)
    adapter_ops = sorted(n.op_type for n in model.graph.node if n.name.startswith(onnx_head.adapter_prefix(
        onnx_head.HEAD_PREFIX)))
    assert adapter_ops == ["Add", "MatMul"]
    census = check_head_static(model, num_classes=1100, embed_size=head.embed_size)  # the head itself: add/sub
    assert census.get("MatMul", 0) == (2 if layout == "kron" else 0)
    _assert_matches_head(model, head, (1, 4), seed=3)

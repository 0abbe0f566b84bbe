"""The ONNX Hadamard head: onnxruntime output vs a dense numpy reference of docs/design.md, and the static
checks (no MatMul/Gemm/Conv, small constants, names under the prefix)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import scipy.linalg
import torch

from fyc_convert.errors import ExportError
from fyc_convert.heads import HadamardHead
from fyc_convert import onnx_head
from fyc_convert.onnx_head import HeadSpec, head_model, head_op_census, largest_head_constant

SIZES = [(64, 10), (342, 100), (512, 1000), (2048, 1000), (192, 1000)]


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
    z = y @ scipy.linalg.hadamard(m).T  # (B, m)
    logits = spec.scale * z[:, spec.rows]
    return logits if spec.bias is None else logits + spec.bias


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"features": x.astype(np.float32)})[0]


def _assert_matches_head(model: onnx.ModelProto, head: HadamardHead, batches: tuple[int, ...], seed: int) -> None:
    """onnxruntime's logits equal the PyTorch head's, to 1e-4, on random features at each batch size."""
    x = torch.randn(max(batches), head.in_features, generator=torch.Generator().manual_seed(seed))
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
    m = HadamardHead(n_feat, c, bias=False).hadamard_size if embedding == "tile" else _next_pow2(max(n_feat, c + 1))
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


# (N, C, m): N=512, C=32000 is a 32768-point transform of 64 signed copies of x, so one table Mul does the
# top 6 levels and 63 512-point transforms follow, all at once (batch < 16) or in chunks of 4 (from 16);
# N=1000 (not a power of two), C=5000 is an 8192-point transform whose top 2 levels run across 4 blocks of
# 2048 points from batch 16, each block then transformed on its own.
LARGE = [(512, 32000, 32768), (1000, 5000, 8192)]


@pytest.mark.parametrize("variant", ["tile-contiguous-bias", "tile-shuffled-nobias"])
@pytest.mark.parametrize(("n_feat", "c", "m"), LARGE)
def test_large_transforms_match_hadamard_head(n_feat: int, c: int, m: int, variant: str) -> None:
    head = _hadamard_head(n_feat, c, variant)
    assert (head.hadamard_size, head.embed_size) == (m, m)
    model = head_model(HeadSpec.from_module(head))
    assert head_op_census(model)["If"] == 1
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
    monkeypatch.setattr(onnx_head, "_BLOCK_POINTS", block)
    monkeypatch.setattr(onnx_head, "_BLOCK_MIN_POINTS", 2 * block)
    monkeypatch.setattr(onnx_head, "_BLOCK_MIN_BATCH", 4)
    spec = make_spec(n_feat, c, embedding=embedding, bias=bias, shuffled=shuffled, seed=n_feat)
    assert spec.hadamard_size == spec.embed_size
    model = head_model(spec)
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
    timed = head_model(spec, time_axis=True)  # the If sees batch x time rows: 2 (small branch), 10 (blocked)
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
    assert set(census) <= {
        "Add", "Sub", "Neg", "Mul", "Div", "Sqrt", "ReduceSum", "Reshape", "Split", "Slice", "Concat",
        "Transpose", "Gather", "Pad", "Identity", "Shape",
    }  # fmt: skip
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

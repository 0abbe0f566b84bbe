"""Tests for fyc_convert.head.hadamard: Sylvester matrix, fwht, embed/fold, the fused projection, coherence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fyc_convert.head.hadamard import (
    block_project,
    coherence,
    embed_fold,
    embedding_matrix,
    fwht,
    fwht_matmul,
    fwht_reference,
    hadamard_project,
    next_pow2,
    sylvester,
    whole_copy_table,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_next_pow2():
    assert [next_pow2(k) for k in (0, 1, 2, 3, 4, 5, 1000, 1024, 1025)] == [1, 1, 2, 4, 4, 8, 1024, 1024, 2048]


def test_sylvester_is_orthogonal_symmetric_and_recursive():
    h8 = sylvester(8, dtype=torch.float64)
    assert torch.equal(h8 @ h8.T, 8 * torch.eye(8, dtype=torch.float64))
    assert torch.equal(h8, h8.T)
    h4 = sylvester(4, dtype=torch.float64)
    assert torch.equal(h8, torch.cat([torch.cat([h4, h4], 1), torch.cat([h4, -h4], 1)], 0))
    assert torch.equal(sylvester(1), torch.ones(1, 1))
    # natural order: H[i, j] = (-1)^popcount(i & j)
    assert h8[3, 5].item() == -1.0 and h8[3, 4].item() == 1.0 and h8[7, 7].item() == -1.0
    with pytest.raises(ValueError):
        sylvester(12)


@pytest.mark.parametrize("k", range(13))
def test_fwht_equals_dense_product(k: int):
    n = 1 << k
    x = torch.randn(3, 2, n, dtype=torch.float64, generator=_gen(k))
    out = fwht(x)
    assert out.shape == x.shape
    np.testing.assert_allclose(out.numpy(), fwht_reference(x), rtol=0, atol=1e-9 * max(1.0, math.sqrt(n)))


@pytest.mark.parametrize("k", range(8))
def test_fwht_reference_is_the_sylvester_product_along_any_axis(k: int):
    n = 1 << k
    x = np.random.default_rng(k).normal(size=(n, 3, 2))
    h = sylvester(n, dtype=torch.float64).numpy()
    np.testing.assert_allclose(fwht_reference(np.eye(n)), h, rtol=0, atol=0)
    np.testing.assert_allclose(fwht_reference(x, axis=0), np.einsum("ij,jab->iab", h, x), rtol=0, atol=1e-12 * n)
    assert fwht_reference(x, axis=0).dtype == np.float64 and x.shape == (n, 3, 2)  # the input is untouched
    with pytest.raises(ValueError, match="power-of-two"):
        fwht_reference(np.zeros((2, 12)))


def test_fwht_is_an_involution_up_to_n_for_every_size_to_2_pow_16():
    for k in range(17):
        n = 1 << k
        x = torch.randn(2, n, dtype=torch.float64, generator=_gen(k))
        assert torch.allclose(fwht(fwht(x)), n * x, rtol=0, atol=1e-9 * n), k


def test_fwht_many_rows_spans_cpu_blocks():
    # 300 rows of 4096 floats is several CPU blocks: every block must come out right
    x = torch.randn(300, 4096, generator=_gen(1))
    np.testing.assert_allclose(fwht(x).numpy(), fwht_reference(x), rtol=0, atol=2e-3)


def test_fwht_gradcheck_fp64():
    x = torch.randn(3, 16, dtype=torch.float64, generator=_gen(2), requires_grad=True)
    assert torch.autograd.gradcheck(fwht, (x,))
    assert torch.autograd.gradgradcheck(fwht, (x,))


def test_fwht_backward_is_the_transform_of_the_gradient():
    x = torch.randn(4, 32, generator=_gen(3), requires_grad=True)
    g = torch.randn(4, 32, generator=_gen(4))
    fwht(x).backward(g)
    assert torch.allclose(x.grad, fwht(g), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fwht_low_precision_close_to_fp32(dtype: torch.dtype):
    x = torch.randn(8, 1024, generator=_gen(5))
    ref = fwht(x)
    out = fwht(x.to(dtype))
    assert out.dtype == dtype
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < (2e-3 if dtype == torch.float16 else 2e-2)


def test_fwht_rejects_non_power_of_two_and_keeps_input():
    with pytest.raises(ValueError):
        fwht(torch.zeros(3, 6))
    x = torch.randn(2, 8, generator=_gen(6))
    before = x.clone()
    fwht(x)
    assert torch.equal(x, before)
    assert fwht(torch.zeros(0, 8)).shape == (0, 8)


@pytest.mark.parametrize(
    "big_n, n, m, kind",
    [(5, 8, 8, "tile"), (5, 8, 8, "pad"), (7, 32, 32, "tile"), (12, 12, 4, "tile"), (12, 16, 8, "tile"),
     (10, 16, 4, "pad"), (8, 8, 8, "tile")],
)
def test_embed_fold_matches_embedding_matrix(big_n: int, n: int, m: int, kind: str):
    g = _gen(7)
    signs = torch.randint(0, 2, (n - big_n,), generator=g).double() * 2 - 1
    if kind == "pad":
        signs = torch.zeros(n - big_n, dtype=torch.float64)
    f = embedding_matrix(big_n, signs, n=n, m=m)
    assert f.shape == (m, big_n)
    assert torch.equal(f, f.round())
    x = torch.randn(4, 3, big_n, dtype=torch.float64, generator=g)
    assert torch.allclose(embed_fold(x, signs, n=n, m=m), x @ f.T, atol=1e-12)
    # F is the literal definition: x̃_i = s_i x_{i mod N}, y_k = sum_t x̃_{k + t m}
    s_full = torch.cat([torch.ones(big_n, dtype=torch.float64), signs])
    xt = torch.stack([s_full[i] * x[..., i % big_n] for i in range(n)], dim=-1)
    assert torch.allclose(embed_fold(x, signs, n=n, m=m), xt.unflatten(-1, (n // m, m)).sum(-2), atol=1e-12)


def test_embed_fold_gradcheck_and_bad_sizes():
    signs = torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)
    x = torch.randn(2, 5, dtype=torch.float64, generator=_gen(8), requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: embed_fold(t, signs, n=8, m=4), (x,))
    with pytest.raises(ValueError):
        embed_fold(x, signs, n=8, m=3)
    with pytest.raises(ValueError):
        embed_fold(x, signs[:2], n=8, m=8)


@pytest.mark.parametrize("contiguous", [False, True])
@pytest.mark.parametrize(
    "big_n, n, m", [(5, 8, 8), (12, 12, 4), (12, 16, 8), (16, 16, 16), (3, 64, 64), (4, 16, 16), (256, 512, 512)]
)
def test_hadamard_project_matches_transform_then_gather(big_n: int, n: int, m: int, contiguous: bool):
    g = _gen(9)
    signs = torch.randint(0, 2, (n - big_n,), generator=g).double() * 2 - 1
    rows = torch.arange(1, 1 + m // 2) if contiguous else torch.randperm(m, generator=g)[: max(1, m // 2)]
    x = torch.randn(3, 2, big_n, dtype=torch.float64, generator=g, requires_grad=True)
    out = hadamard_project(x, signs, rows, n=n, m=m)
    dense = sylvester(m, dtype=torch.float64)[rows] @ embedding_matrix(big_n, signs, n=n, m=m)  # (C, N)
    assert out.shape == (3, 2, rows.numel())
    assert torch.allclose(out, x @ dense.T, atol=1e-10)
    assert torch.allclose(out, fwht(embed_fold(x, signs, n=n, m=m))[..., rows], atol=1e-10)
    x1 = x[0, :1].detach().clone().requires_grad_(True)  # (1, N): gradcheck costs one forward per input
    assert torch.autograd.gradcheck(lambda t: hadamard_project(t, signs, rows, n=n, m=m), (x1,))


def test_hadamard_project_many_rows_spans_cpu_blocks():
    signs = torch.ones(32768 - 512) * -1
    rows = torch.arange(1, 32768, 3)
    x = torch.randn(9, 512, generator=_gen(10))
    out = hadamard_project(x, signs, rows, n=32768, m=32768)
    ref = fwht_reference(embed_fold(x.double(), signs.double(), n=32768, m=32768))[:, rows.numpy()]
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=0, atol=1e-3)


@pytest.mark.parametrize("contiguous", [False, True])
@pytest.mark.parametrize("big_n, k, p", [(16, 3, 16), (10, 2, 16), (1, 4, 1), (256, 5, 256), (300, 3, 512), (5, 1, 8)])
def test_block_project_matches_the_dense_block_form(big_n: int, k: int, p: int, contiguous: bool):
    g = _gen(13)
    table = torch.randint(-3, 4, (k, p), generator=g).double()  # any table, not only signs
    rows = torch.arange(1, 1 + (k * p) // 2) if contiguous else torch.randperm(k * p, generator=g)[: max(1, k * p // 2)]
    x = torch.randn(3, 2, big_n, dtype=torch.float64, generator=g, requires_grad=True)
    out = block_project(x, table, rows)
    dense = (table[:, None, :] * sylvester(p, dtype=torch.float64)[None]).reshape(k * p, p)[rows, :big_n]  # (C, N)
    assert out.shape == (3, 2, rows.numel())
    assert torch.allclose(out, x @ dense.T, rtol=0, atol=1e-10)
    xp = torch.nn.functional.pad(x.detach(), (0, p - big_n))  # (.., P): zeros after the N features
    z = fwht(xp.unsqueeze(-2) * table).flatten(-2)  # (.., K·P) = concat_k H_P(table[k] ⊙ pad(x))
    assert torch.allclose(out, z[..., rows], rtol=0, atol=1e-10)
    x1 = x[0, :1].detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: block_project(t, table, rows), (x1,))


def test_block_project_many_samples_spans_cpu_blocks_and_rejects_bad_tables():
    table = torch.randint(0, 2, (9, 2048), generator=_gen(14)).double() * 2 - 1
    rows = torch.randperm(9 * 2048, generator=_gen(15))[:5000]
    x = torch.randn(70, 2000, generator=_gen(16), dtype=torch.float64)  # several CPU blocks of 512 KiB
    dense = (table[rows // 2048] * sylvester(2048, dtype=torch.float64)[rows % 2048])[:, :2000]  # (C, N) rows only
    assert torch.allclose(block_project(x, table, rows), x @ dense.T, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="power of two"):
        block_project(x, table[:, :1000], rows)
    with pytest.raises(ValueError, match=">= N"):
        block_project(torch.zeros(1, 3000, dtype=torch.float64), table, rows)


def test_whole_copy_table_is_the_block_form_of_the_tile_embedding():
    big_n, k = 32, 4
    signs = torch.randint(0, 2, ((k - 1) * big_n,), generator=_gen(17)).double() * 2 - 1
    table = whole_copy_table(signs, big_n, n=k * big_n, m=k * big_n)
    assert table.shape == (k, big_n) and torch.equal(table, table.round())
    rows = torch.randperm(k * big_n, generator=_gen(18))[:50]
    x = torch.randn(6, big_n, dtype=torch.float64, generator=_gen(19))
    assert torch.allclose(block_project(x, table, rows), fwht(embed_fold(x, signs, n=k * big_n, m=k * big_n))[:, rows],
                          rtol=0, atol=1e-10)
    s = np.concatenate([np.ones(big_n), signs.numpy()]).reshape(k, big_n)  # the k copies' signs S
    np.testing.assert_array_equal(table.numpy(), fwht_reference(s, axis=0))  # H_k · S
    assert whole_copy_table(signs[:big_n], big_n, n=2 * big_n, m=big_n) is None  # a fold, not one transform
    assert whole_copy_table(torch.ones(20), 44, n=64, m=64) is None  # N does not divide n


def test_coherence_known_values():
    assert coherence(torch.eye(5)) == 0.0
    assert coherence(torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])) == pytest.approx(0.5)
    assert coherence(torch.tensor([[1.0, 2.0], [-2.0, -4.0], [2.0, -1.0]])) == pytest.approx(1.0)
    assert coherence(torch.ones(1, 3)) == 0.0
    h = sylvester(64)[1:40, :50]  # truncated Sylvester rows: the reference's defect
    assert coherence(h) == pytest.approx(float((h @ h.T / 50).fill_diagonal_(0).abs().max()))
    assert coherence(torch.randn(3000, 8, generator=_gen(11)), chunk=1000) > 0.99
    v = torch.randn(300, 40, generator=_gen(12), dtype=torch.float64)
    assert coherence(v, chunk=64, dots=lambda u: u @ v.T) == pytest.approx(coherence(v), abs=1e-12)  # fast path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fwht_and_project_on_cuda():
    x = torch.randn(64, 2048, generator=_gen(12))
    assert torch.allclose(fwht(x.cuda()).cpu(), fwht(x), atol=1e-3)
    signs = torch.ones(2048 - 1000)
    rows = torch.arange(1, 1001)
    out = hadamard_project(x[:, :1000].cuda(), signs.cuda(), rows.cuda(), n=2048, m=2048)
    assert torch.allclose(out.cpu(), hadamard_project(x[:, :1000], signs, rows, n=2048, m=2048), atol=1e-3)


@pytest.mark.parametrize("k", [0, 1, 3, 5, 6, 9, 11, 12, 15])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-4), (torch.float64, 1e-9)])
def test_fwht_matmul_equals_the_reference(k: int, dtype: torch.dtype, tol: float):
    x = torch.randn(3, 2, 1 << k, generator=_gen(k), dtype=torch.float64)
    ref = torch.from_numpy(fwht_reference(x.numpy()))
    out = fwht_matmul(x.to(dtype))
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.allclose(out.double(), ref, rtol=0, atol=tol * math.sqrt(1 << k))
    with pytest.raises(ValueError, match="power-of-two"):
        fwht_matmul(torch.zeros(2, 3))

"""Tests for fyc_convert.head.frames: the Kerdock / Gold-like sign tables against a dense scalar reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fyc_convert.head.frames import PRIMITIVE, frame_coherence, frame_kind, frame_table, frame_tiles
from fyc_convert.head.hadamard import sylvester


# --------------------------------------------------------------------------- dense reference, scalar arithmetic
def _mul(a: int, b: int, n: int) -> int:
    """a·b in GF(2^n): shift-and-add (carry-less) product reduced by PRIMITIVE[n], one bit at a time."""
    out = 0
    while b:
        if b & 1:
            out ^= a
        b >>= 1
        a <<= 1
        if a >> n:
            a ^= PRIMITIVE[n]
    return out


def _pow(a: int, e: int, n: int) -> int:
    out = 1
    for _ in range(e):
        out = _mul(out, a, n)
    return out


def _tr(y: int, n: int) -> int:
    t, p = 0, y
    for _ in range(n):
        t ^= p
        p = _mul(p, p, n)
    assert t in (0, 1)
    return t


def _reference_bits(size: int, u: int) -> list[int]:
    """f_u(j) straight from the definitions in frames.py's docstring, j = ε·2^n + x."""
    m = size.bit_length() - 1
    if m <= 1:
        return [0] * size
    if m % 2 == 0:  # Kerdock: Q(u·x) + ε·Tr(u·x) on GF(2^n) × GF(2), n = m - 1
        n = m - 1
        out = []
        for eps in (0, 1):
            for x in range(1 << n):
                y = _mul(u, x, n)
                q = 0
                for i in range(1, (n - 1) // 2 + 1):
                    q ^= _tr(_pow(y, (1 << i) + 1, n), n)
                out.append(q ^ (eps & _tr(y, n)))
        return out
    return [_tr(_mul(u, _pow(x, 3, m), m), m) for x in range(size)]  # Gold-like: Tr(u·x³)


def _reference_table(size: int) -> torch.Tensor:
    return torch.tensor([[1 - 2 * b for b in _reference_bits(size, u)] for u in range(frame_tiles(size))],
                        dtype=torch.float64)


def _vectors(table: torch.Tensor) -> torch.Tensor:
    """All K·P frame vectors d_k ⊙ h_r, dense: (K·P, P)."""
    p = table.shape[1]
    return (table[:, None, :] * sylvester(p, dtype=torch.float64)[None]).reshape(-1, p)


def _max_abs_dot(v: torch.Tensor) -> int:
    """Max |⟨v_a, v_b⟩| over distinct rows, exact (integer vectors, float64 sums far below 2^53)."""
    worst = 0
    for s in range(0, v.shape[0], 2048):
        g = (v[s : s + 2048] @ v.T).abs()
        g[torch.arange(g.shape[0]), torch.arange(s, s + g.shape[0])] = 0
        worst = max(worst, int(g.max()))
    return worst


# ---------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("size", [1, 2, 4, 8, 16, 32, 64, 128, 256])
def test_table_equals_the_scalar_reference(size: int):
    table = frame_table(size, range(frame_tiles(size)))
    assert table.dtype == torch.float64 and table.shape == (frame_tiles(size), size)
    assert torch.equal(table, _reference_table(size))
    assert torch.equal(table[0], torch.ones(size, dtype=torch.float64))  # tile 0: the plain Hadamard rows


@pytest.mark.parametrize("size", [4, 16, 64, pytest.param(256, marks=pytest.mark.slow)])
def test_kerdock_coherence_is_exactly_one_over_sqrt_p_and_vectors_distinct(size: int):
    assert frame_kind(size) == "kerdock" and frame_tiles(size) == size // 2
    v = _vectors(frame_table(size, range(size // 2)))  # P²/2 vectors of ±1
    assert torch.equal(v.abs(), torch.ones_like(v))
    assert torch.unique(v, dim=0).shape[0] == v.shape[0]  # distinct, and no vector is the negative of another:
    assert torch.unique(torch.cat([v, -v]), dim=0).shape[0] == 2 * v.shape[0]
    assert _max_abs_dot(v) == math.isqrt(size)  # every cross-tile dot is 0 or ±√P
    assert math.isclose(frame_coherence(size), 1 / math.sqrt(size))


@pytest.mark.parametrize("size", [8, 32, pytest.param(128, marks=pytest.mark.slow)])
def test_gold_coherence_is_sqrt_two_over_p(size: int):
    assert frame_kind(size) == "gold" and frame_tiles(size) == size
    v = _vectors(frame_table(size, range(size)))  # P² vectors
    assert torch.unique(v, dim=0).shape[0] == v.shape[0]
    assert _max_abs_dot(v) == math.isqrt(2 * size)
    assert math.isclose(frame_coherence(size), math.sqrt(2 / size))


def test_within_a_tile_the_vectors_are_orthogonal_and_tiles_are_selectable():
    t = frame_table(64, [5, 0, 17])
    assert torch.equal(t, frame_table(64, range(32))[[5, 0, 17]])
    v = _vectors(t)
    for k in range(3):
        block = v[64 * k : 64 * (k + 1)]
        assert torch.equal(block @ block.T, 64 * torch.eye(64, dtype=torch.float64))


def test_bad_sizes_and_tiles_raise():
    for bad in (0, 3, 12):
        with pytest.raises(ValueError, match="power of two"):
            frame_table(bad, [0])
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        frame_table(16, [8])
    assert frame_table(16, np.array([], dtype=np.int64)).shape == (0, 16)

"""Sign tables whose Hadamard-row products are near-orthogonal class vectors when C > N (the "kerdock" frame).

A frame of size P (a power of two) is a set of T sign patterns d_0 … d_{T-1} in {±1}^P, the *tiles*; tile k
gives the P class vectors ``d_k ⊙ h_r`` (h_r the Sylvester rows, natural order). Vectors of one tile are
orthogonal; between tiles |⟨d_k ⊙ h_r, d_l ⊙ h_s⟩| is a Walsh coefficient of d_k ⊙ d_l, so it is small when
every product d_k ⊙ d_l (k != l) has a flat Walsh spectrum:

- log2 P = m even: a Kerdock set (Calderbank, Cameron, Kantor, Seidel 1997; MacWilliams–Sloane ch. 15).
  With n = m - 1 (odd), positions j = ε·2^n + x for x in GF(2^n), ε in GF(2), and u in GF(2^n):
  ``d_u(x, ε) = (-1)^(Q(u·x) + ε·Tr(u·x))``, ``Q(y) = Σ_{i=1}^{(n-1)/2} Tr(y^(2^i + 1))``. Every difference
  of two such quadratic forms is bent, so the T = P/2 tiles give P²/2 vectors with coherence exactly 1/√P
  (tested for P = 4 … 256), the Welch-bound order.
- log2 P = m odd: the Gold-like family ``d_u(x) = (-1)^Tr(u·x³)`` on GF(2^m), u in GF(2^m): every difference
  Tr(w·x³) has rank m - 1 (the most an alternating form in odd dimension can have), so the T = P tiles give
  P² vectors with coherence √(2/P).

Tile 0 is always all ones (u = 0), so tile 0's vectors are the plain Hadamard rows. Field elements are
integers whose bits are the coefficients over the polynomial basis of the primitive polynomial in
``PRIMITIVE``; the tables are exact and deterministic (nothing seeded). The head (``embedding="kerdock"``)
computes ``z = concat_k H_P(table[k] ⊙ pad(x̂, P))`` with the (K, P) table of the tiles it uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache

import numpy as np
import torch
from torch import Tensor

__all__ = ["PRIMITIVE", "frame_coherence", "frame_kind", "frame_table", "frame_tiles"]

# x^n + … : primitive polynomials over GF(2) (bit i = coefficient of x^i); primitivity is checked on use
PRIMITIVE = {
    1: 0b11, 2: 0b111, 3: 0b1011, 4: 0b10011, 5: 0b100101, 6: 0b1000011, 7: 0b10001001, 8: 0b100011101,
    9: 0b1000010001, 10: 0b10000001001, 11: 0b100000000101, 12: 0b1000001010011, 13: 0b10000000011011,
    14: 0b100010001000011, 15: 0b1000000000000011,
}


def _check_size(size: int) -> int:
    if size < 1 or size & (size - 1) or size.bit_length() - 1 > max(PRIMITIVE) + 1:
        raise ValueError(f"frame size must be a power of two from 1 to 2^{max(PRIMITIVE) + 1}, got {size}")
    return size.bit_length() - 1


def frame_kind(size: int) -> str:
    """"kerdock" (log2 P even) or "gold" (odd); P = 1 and 2 have only the Hadamard basis ("hadamard")."""
    m = _check_size(size)
    return "hadamard" if m <= 1 else ("kerdock" if m % 2 == 0 else "gold")


def frame_tiles(size: int) -> int:
    """Number of tiles T of the frame of size P: P/2 (Kerdock), P (Gold), 1 for P <= 2."""
    kind = frame_kind(size)
    return 1 if kind == "hadamard" else (size // 2 if kind == "kerdock" else size)


def frame_coherence(size: int) -> float:
    """The max |cos| between distinct vectors of the whole frame: 1/√P (Kerdock), √(2/P) (Gold), 0 (P <= 2)."""
    kind = frame_kind(size)
    return 0.0 if kind == "hadamard" else (1 / math.sqrt(size) if kind == "kerdock" else math.sqrt(2 / size))


@cache
def _field(n: int) -> tuple[np.ndarray, np.ndarray]:
    """exp (2·(2^n - 1),) and log (2^n,) tables of GF(2^n) for the generator x (int64; log[0] unused)."""
    q = (1 << n) - 1
    exp = np.zeros(2 * q, dtype=np.int64)
    a = 1
    for i in range(q):
        exp[i] = a
        a <<= 1
        if a >> n:
            a ^= PRIMITIVE[n]
    if a != 1 or len(set(exp[:q].tolist())) != q:
        raise AssertionError(f"PRIMITIVE[{n}] is not primitive")
    exp[q:] = exp[:q]
    log = np.zeros(q + 1, dtype=np.int64)
    log[exp[:q]] = np.arange(q)
    return exp, log


def _power(y: np.ndarray, e: int, n: int) -> np.ndarray:
    """y^e elementwise in GF(2^n) (0^e = 0 for e >= 1)."""
    exp, log = _field(n)
    q = (1 << n) - 1
    return np.where(y == 0, 0, exp[(log[y] * e) % q])


def _times(u: int, y: np.ndarray, n: int) -> np.ndarray:
    """u·y elementwise in GF(2^n)."""
    exp, log = _field(n)
    return np.where((y == 0) | (u == 0), 0, exp[(log[y] + log[u]) % ((1 << n) - 1)])


@cache
def _trace(n: int) -> np.ndarray:
    """Tr(y) = Σ_k y^(2^k) in GF(2) for every y in GF(2^n): (2^n,) int64 of 0/1."""
    y = np.arange(1 << n, dtype=np.int64)
    t = np.zeros_like(y)
    for k in range(n):
        t ^= _power(y, 1 << k, n)
    assert np.all((t == 0) | (t == 1))
    return t


@cache
def _kerdock_q(n: int) -> np.ndarray:
    """Q(y) = Σ_{i=1}^{(n-1)/2} Tr(y^(2^i + 1)) for every y in GF(2^n), n odd: (2^n,) int64 of 0/1."""
    y = np.arange(1 << n, dtype=np.int64)
    tr = _trace(n)
    q = np.zeros_like(y)
    for i in range(1, (n - 1) // 2 + 1):
        q ^= tr[_power(y, (1 << i) + 1, n)]
    return q


def _tile_bits(size: int, u: int) -> np.ndarray:
    """The exponent bits f_u(j) of tile u at every position j in [0, P): (P,) int64 of 0/1."""
    m = _check_size(size)
    kind = frame_kind(size)
    if kind == "hadamard":
        return np.zeros(size, dtype=np.int64)
    if kind == "kerdock":
        n = m - 1
        y = _times(u, np.arange(1 << n, dtype=np.int64), n)  # u·x for x = j mod 2^n
        q, tr = _kerdock_q(n)[y], _trace(n)[y]
        return np.concatenate([q, q ^ tr])  # ε = 0 then ε = 1
    x3 = _power(np.arange(size, dtype=np.int64), 3, m)
    return _trace(m)[_times(u, x3, m)]


def frame_table(size: int, tiles: Sequence[int] | Tensor | np.ndarray) -> Tensor:
    """The (K, P) float64 sign table ``[d_{tiles[0]}; …; d_{tiles[K-1]}]`` of the frame of size P.

    Args:
        size: P, a power of two.
        tiles: K tile indices in [0, frame_tiles(P)).

    Returns:
        (K, P) float64 tensor of ±1 (row k all ones when tiles[k] == 0).
    """
    idx = [int(t) for t in (tiles.tolist() if isinstance(tiles, (Tensor, np.ndarray)) else tiles)]
    total = frame_tiles(size)
    if any(not 0 <= t < total for t in idx):
        raise ValueError(f"tiles must lie in [0, {total}) for a frame of size {size}, got {idx}")
    bits = np.stack([_tile_bits(size, t) for t in idx]) if idx else np.zeros((0, size), dtype=np.int64)
    return torch.from_numpy((1 - 2 * bits).astype(np.float64))

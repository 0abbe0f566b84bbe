"""Pure tensor math for the Hadamard head: Sylvester matrix, fast Walsh–Hadamard transform, embeddings.

Notation follows docs/design.md: N = in_features, m = transform size (a power of two), n = embed size
(a multiple of m with n >= N). The head computes ``z = H_m · F · x̂`` where ``F`` (m×N, integer) is the
embed-then-fold map implemented by :func:`embed_fold` and ``H_m`` is applied by :func:`fwht` with
additions and subtractions only. Every fast function has a dense reference next to it for the tests.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "coherence",
    "embed_fold",
    "embedding_matrix",
    "fwht",
    "fwht_reference",
    "is_pow2",
    "next_pow2",
    "sylvester",
]


def is_pow2(k: int) -> bool:
    """True when ``k`` is a positive power of two (1 included)."""
    return k >= 1 and (k & (k - 1)) == 0


def next_pow2(k: int) -> int:
    """Smallest power of two >= ``k`` (1 for k <= 1)."""
    return 1 if k <= 1 else 1 << (k - 1).bit_length()


def sylvester(n: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """Dense Sylvester Hadamard matrix in natural order (reference only; O(n²) memory).

    ``H_1 = [1]``, ``H_2k = [[H_k, H_k], [H_k, -H_k]]``, i.e. ``H[i, j] = (-1)^popcount(i & j)``.

    Args:
        n: Order, a power of two.
        dtype: Output dtype.
        device: Output device.

    Returns:
        (n, n) symmetric matrix with entries ±1 and ``H @ H.T == n * I``.
    """
    if not is_pow2(n):
        raise ValueError(f"sylvester order must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h


def _butterflies(x: Tensor) -> Tensor:
    """Unnormalized WHT of a contiguous (B, n) tensor: log2(n) radix-2 add/sub stages.

    Each stage views the rows as (B, n/2h, 2, h) and writes ``[a + b, a - b]`` into a second buffer
    (ping-pong), so a stage is exactly two elementwise kernels and no extra copies. The stages are run
    from the largest stride down; the order is irrelevant mathematically (H_n = H_2 ⊗ … ⊗ H_2).
    """
    b, n = x.shape
    src = x
    dst = torch.empty_like(x)
    spare: Tensor | None = None  # second work buffer, allocated lazily so `x` is never overwritten
    h = n // 2
    while h >= 1:
        s = src.view(b, n // (2 * h), 2, h)
        d = dst.view(b, n // (2 * h), 2, h)
        lo, hi = s[:, :, 0], s[:, :, 1]
        torch.add(lo, hi, out=d[:, :, 0])
        torch.sub(lo, hi, out=d[:, :, 1])
        if src is x:
            spare = torch.empty_like(x) if h > 1 else None
            src, dst = dst, spare
        else:
            src, dst = dst, src
        h //= 2
    return src


class _FWHT(torch.autograd.Function):
    """fwht as one autograd node. H is symmetric, so the backward of ``z = H y`` is ``H g``."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        n = x.shape[-1]
        flat = x.reshape(-1, n).contiguous()
        if n == 1:
            return flat.clone().view(x.shape)
        return _butterflies(flat).view(x.shape)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        return _FWHT.apply(grad)


def fwht(x: Tensor) -> Tensor:
    """Unnormalized fast Walsh–Hadamard transform along the last dimension.

    Equals ``x @ sylvester(n).T`` (natural order) using n·log2(n) additions/subtractions. Works for any
    leading dimensions, fp16/bf16/fp32/fp64, CPU and CUDA, and is differentiable (the backward is
    ``fwht(grad)``; double backward works too). Applying it twice multiplies by n.

    Args:
        x: (..., n) tensor, n a power of two.

    Returns:
        (..., n) tensor, same dtype and device.
    """
    n = x.shape[-1]
    if not is_pow2(n):
        raise ValueError(f"fwht needs a power-of-two last dimension, got {n}")
    if x.numel() == 0:
        return x.clone()
    return _FWHT.apply(x)


def fwht_reference(x: Tensor) -> Tensor:
    """Dense reference for :func:`fwht`: ``x @ sylvester(n).T`` (O(n²) per row)."""
    return x @ sylvester(x.shape[-1], dtype=x.dtype, device=x.device).T


def embed_fold(x: Tensor, signs: Tensor, *, n: int, m: int) -> Tensor:
    """Embed x into n positions with a sign pattern, then fold the n/m blocks of length m.

    ``x̃_i = s_i · x_{i mod N}`` for i in [0, n) with ``s_i = 1`` for i < N and ``s_i = signs[i - N]``
    otherwise (±1 for the "tile" embedding, 0 for "pad" = zero padding); then ``y_k = Σ_t x̃_{k + t·m}``.
    The dense equivalent is ``x @ embedding_matrix(N, signs, n=n, m=m).T``.

    Args:
        x: (..., N) tensor.
        signs: (n - N,) tensor of ±1 or 0, same dtype/device as x.
        n: Embed size, a multiple of m with n >= N.
        m: Transform size.

    Returns:
        (..., m) tensor.
    """
    big_n = x.shape[-1]
    if n < big_n or n % m != 0 or signs.shape != (n - big_n,):
        raise ValueError(f"embed_fold: need n >= N, m | n and n - N signs; got N={big_n}, n={n}, m={m}, "
                         f"signs {tuple(signs.shape)}")
    if n > big_n:
        reps = -(-(n - big_n) // big_n)  # copies of x needed to cover the tail
        tail = x.repeat(*([1] * (x.dim() - 1)), reps)[..., : n - big_n] if reps > 1 else x[..., : n - big_n]
        x = torch.cat([x, tail * signs], dim=-1)  # (..., n)
    if n == m:
        return x
    return x.unflatten(-1, (n // m, m)).sum(dim=-2)  # (..., m)


def embedding_matrix(in_features: int, signs: Tensor, *, n: int, m: int) -> Tensor:
    """Dense integer matrix F (m, N) of :func:`embed_fold` (reference / inspection only).

    ``F[k, j] = Σ_{i in [0, n): i mod m = k, i mod N = j} s_i``.
    """
    i = torch.arange(n, device=signs.device)
    s = torch.cat([torch.ones(in_features, dtype=signs.dtype, device=signs.device), signs])
    f = torch.zeros(m * in_features, dtype=signs.dtype, device=signs.device)
    f.index_add_(0, (i % m) * in_features + i % in_features, s)
    return f.view(m, in_features)


def coherence(vectors: Tensor, *, chunk: int = 1024) -> float:
    """Max |cos| between distinct rows of ``vectors`` (C, N), computed in row chunks.

    Zero rows count as cos 0 with everything. Returns 0.0 for fewer than two rows.
    """
    c = vectors.shape[0]
    if c < 2:
        return 0.0
    v = vectors.to(torch.float64)
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
    worst = 0.0
    for start in range(0, c, chunk):
        g = (v[start : start + chunk] @ v.T).abs_()  # (chunk, C)
        idx = torch.arange(g.shape[0], device=g.device)
        g[idx, idx + start] = 0.0
        worst = max(worst, float(g.max()))
    return worst

"""Pure tensor math for the Hadamard head: Sylvester matrix, fast Walsh–Hadamard transform, embeddings.

Notation follows docs/design.md: N = in_features, m = transform size (a power of two), n = embed size
(a multiple of m with n >= N). The head computes ``z = H_m · F · x̂`` where ``F`` (m×N, integer) is the
embed-then-fold map implemented by :func:`embed_fold` and ``H_m`` is applied by :func:`fwht` with
additions and subtractions only; :func:`hadamard_project` fuses them with the row gather. The block form
``z = concat_k H_P(table[k] ⊙ pad(x̂, P))`` (:func:`block_project`) serves the whole-copy tiling and the
frames of :mod:`fyc_convert.head.frames`. :func:`fwht_reference` (numpy) is the one reference WHT the fast
transforms are tested against; the dense matrices (:func:`sylvester`, :func:`embedding_matrix`) check it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor

__all__ = [
    "block_project",
    "coherence",
    "embed_fold",
    "embedding_matrix",
    "fwht",
    "fwht_matmul",
    "fwht_reference",
    "hadamard_project",
    "is_pow2",
    "next_pow2",
    "sylvester",
    "whole_copy_table",
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


_CPU_BLOCK_BYTES = 1 << 19  # rows per block on CPU: a block and its work buffers stay in L2


def _block_rows(rows: int, n: int, x: Tensor) -> int:
    """Rows per block: all at once on accelerators, about 512 KiB of (., n) on CPU."""
    return rows if x.device.type != "cpu" else max(1, min(rows, _CPU_BLOCK_BYTES // (n * x.element_size())))


_LOW = 16  # the lowest log2(_LOW) bits are transformed after a transpose (strided small-h stages are slow)


def _stage_range(src: Tensor, first: Tensor, second: Tensor, h_hi: int, h_lo: int) -> Tensor:
    """Radix-2 add/sub stages of stride h = h_hi, h_hi/2, …, h_lo on a (b, n) block; returns the last buffer.

    Stage k writes ``[lo + hi, lo - hi]`` into ``first`` (k even) or ``second`` (k odd): two elementwise
    kernels per stage, no copies. ``src`` must not alias ``first``.
    """
    b, n = src.shape
    h, dst = h_hi, first
    while h >= h_lo:
        s = src.view(b, n // (2 * h), 2, h)
        d = dst.view(b, n // (2 * h), 2, h)
        torch.add(s[:, :, 0], s[:, :, 1], out=d[:, :, 0])
        torch.sub(s[:, :, 0], s[:, :, 1], out=d[:, :, 1])
        src, dst, h = dst, (second if dst is first else first), h // 2
    return src


def _stages(src: Tensor, first: Tensor, second: Tensor, *, top: int | None = None) -> Tensor:
    """The WHT stages of stride h < top (default all log2(n)) on a (b, n) block; returns the buffer holding it.

    With ``top = T < n`` this applies ``I_{n/T} ⊗ H_T`` (the low log2(T) bits only). The stages on the high
    bits run in place order (contiguous runs of >= _LOW elements); then the block is transposed
    (b, n/_LOW, _LOW) -> (b, _LOW, n/_LOW) so the low bits become high ones, their stages run, and it is
    transposed back. Stage order is irrelevant (H = H_2 ⊗ … ⊗ H_2). Every stage and transpose writes into
    the other buffer, starting with ``first``: for top = n the result is in ``first`` exactly when log2(n)
    is odd. ``src`` must not alias ``first``.
    """
    b, n = src.shape
    top = n if top is None else top
    if top < 16 * _LOW:
        return _stage_range(src, first, second, top // 2, 1)
    res = _stage_range(src, first, second, top // 2, _LOW)  # high bits, h >= _LOW
    other = second if res is first else first
    other.view(b, _LOW, n // _LOW).copy_(res.view(b, n // _LOW, _LOW).transpose(1, 2))
    res = _stage_range(other, res, other, n // 2, n // _LOW)  # the low bits, now on top
    other = second if res is first else first
    other.view(b, n // _LOW, _LOW).copy_(res.view(b, _LOW, n // _LOW).transpose(1, 2))
    return other


def _fwht_2d(x: Tensor) -> Tensor:
    """fwht of a contiguous (B, n) tensor, block by block; the last write lands in the output."""
    rows, n = x.shape
    out = torch.empty_like(x)
    if n == 1:
        return out.copy_(x)
    block = _block_rows(rows, n, x)
    work = torch.empty((block, n), dtype=x.dtype, device=x.device)
    odd = (n.bit_length() - 1) % 2 == 1
    for r0 in range(0, rows, block):
        o, w = out[r0 : r0 + block], work[: min(block, rows - r0)]
        res = _stages(x[r0 : r0 + block], o if odd else w, w if odd else o)
        assert res is o  # the parity rule of _stages
    return out


class _FWHT(torch.autograd.Function):
    """fwht as one autograd node. H is symmetric, so the backward of ``z = H y`` is ``H g``."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        n = x.shape[-1]
        return _fwht_2d(x.reshape(-1, n).contiguous()).view(x.shape)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        return _FWHT.apply(grad)


def _check_pow2_last(x: Tensor, name: str) -> int:
    """The last dimension of `x`, which the transforms need to be a power of two."""
    n = x.shape[-1]
    if not is_pow2(n):
        raise ValueError(f"{name} needs a power-of-two last dimension, got {n}")
    return n


def fwht(x: Tensor) -> Tensor:
    """Unnormalized fast Walsh–Hadamard transform along the last dimension.

    Equals ``x @ sylvester(n).T`` (natural order) using n·log2(n) additions/subtractions in log2(n)
    butterfly stages. Works for any leading dimensions, fp16/bf16/fp32/fp64, CPU and CUDA, and is
    differentiable (the backward is ``fwht(grad)``; double backward works too). fwht(fwht(x)) = n·x.

    Args:
        x: (..., n) tensor, n a power of two.

    Returns:
        (..., n) tensor, same dtype and device.
    """
    _check_pow2_last(x, "fwht")
    if x.numel() == 0:
        return x.clone()
    return _FWHT.apply(x)


def fwht_matmul(x: Tensor) -> Tensor:
    """The same transform as :func:`fwht` (not differentiable), by small dense matmuls: H_P = H_a ⊗ H_b ⊗ ….

    For a large batch of transforms on the CPU (scoring every class against every frame vector, a head's
    outputs without autograd) this is several times faster than the add/sub stages: each factor (at most
    32 × 32) is one matmul over the batch, so P = 2^k costs about 32·ceil(k/5) multiply-adds per output at BLAS
    speed, against log2(P) memory-bound passes. Sums of ±1 times integers stay exact in float32 below 2^24.

    Args:
        x: (..., P) tensor, P a power of two.

    Returns:
        (..., P) tensor, same dtype and device.
    """
    p_size = _check_pow2_last(x, "fwht_matmul")
    bits = p_size.bit_length() - 1
    parts = -(-bits // _MATMUL_FACTOR_BITS) if bits else 0
    sizes = [1 << (bits // parts + (i < bits % parts)) for i in range(parts)]  # balanced factors, product P
    y = x.reshape(-1, p_size)
    post = p_size
    for f in sizes:  # factor f acts on the axis of stride post / f: (B·pre, f, post / f)
        post //= f
        h = _sylvester_cached(f, x.dtype, x.device)
        y = y.reshape(-1, f) @ h if post == 1 else torch.matmul(h, y.reshape(-1, f, post))
    return y.reshape(x.shape)


_MATMUL_FACTOR_BITS = 5  # fwht_matmul's factors are at most 2^5 = 32 wide


@functools.lru_cache(maxsize=16)
def _sylvester_cached(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """sylvester(n) kept for fwht_matmul's repeated calls (at most 32 × 32 entries each)."""
    return sylvester(n, dtype=dtype, device=device)


def fwht_reference(x: ArrayLike, *, axis: int = -1) -> np.ndarray:
    """The reference Walsh–Hadamard transform: float64 numpy, unnormalised, Sylvester (natural) order.

    ``z[k] = Σ_i (-1)^popcount(k & i) · x[i]`` along `axis` (a power-of-two length), by the recursion
    ``H_2h = [[H_h, H_h], [H_h, -H_h]]`` on numpy arrays: the one WHT the fast transforms (:func:`fwht`, the
    kernels behind :func:`hadamard_project` and :func:`block_project`, the ONNX butterflies) are tested
    against, and what builds the ONNX head's small constant tables.

    Args:
        x: Array (or CPU tensor) of any shape.
        axis: The axis to transform.

    Returns:
        A new float64 array of the same shape.
    """
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    a = np.moveaxis(np.array(x, dtype=np.float64), axis, -1)
    n = a.shape[-1]
    if not is_pow2(n):
        raise ValueError(f"fwht_reference needs a power-of-two length, got {n}")
    lead = a.shape[:-1]
    a = a.reshape(-1, n)
    h = 1
    while h < n:
        v = a.reshape(-1, n // (2 * h), 2, h)  # entries i and i + h of each block of 2h side by side
        a = np.concatenate([v[:, :, :1] + v[:, :, 1:], v[:, :, :1] - v[:, :, 1:]], axis=2).reshape(-1, n)
        h *= 2
    return np.moveaxis(a.reshape(*lead, n), -1, axis)


def _check_embed(in_features: int, signs: Tensor, n: int, m: int) -> None:
    if n < in_features or n % m != 0 or not is_pow2(m) or signs.shape != (n - in_features,):
        raise ValueError(f"embed: need n >= N, m a power of two dividing n and n - N signs; got N={in_features}, "
                         f"n={n}, m={m}, signs {tuple(signs.shape)}")


def _embed_into(x: Tensor, signs: Tensor, out: Tensor) -> None:
    """out (b, n) <- x̃ = [x, s ⊙ x, s ⊙ x, …] for x (b, N): one write per element."""
    b, big_n = x.shape
    extra = out.shape[1] - big_n
    out[:, :big_n] = x
    full, rest = divmod(extra, big_n)
    if full:  # whole copies: (b, full, N) = (b, 1, N) * (full, N)
        tail = out[:, big_n : big_n * (full + 1)].view(b, full, big_n)
        torch.mul(x.unsqueeze(1), signs[: full * big_n].view(full, big_n), out=tail)
    if rest:
        torch.mul(x[:, :rest], signs[full * big_n :], out=out[:, big_n * (full + 1) :])


def _embed_fold_2d(x: Tensor, signs: Tensor, n: int, m: int) -> Tensor:
    """(b, N) -> (b, m): embed then fold (returns x itself when n == N == m)."""
    if n > x.shape[1]:
        xe = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
        _embed_into(x, signs, xe)
        x = xe
    return x if n == m else x.view(x.shape[0], n // m, m).sum(dim=1)


def _embed_fold_adjoint_2d(g: Tensor, signs: Tensor, in_features: int, n: int) -> Tensor:
    """(b, m) -> (b, N): the transpose F^T of embed+fold (unfold by tiling, then sum the signed copies)."""
    b, m = g.shape
    if n > m:
        g = g.repeat(1, n // m)  # (b, n): x̃-gradient, position i gets y-gradient i mod m
    if n == in_features:
        return g.contiguous()
    extra = n - in_features
    padded = torch.zeros((b, -(-extra // in_features) * in_features), dtype=g.dtype, device=g.device)
    torch.mul(g[:, in_features:], signs, out=padded[:, :extra])
    return g[:, :in_features] + padded.view(b, -1, in_features).sum(dim=1)


class _EmbedFold(torch.autograd.Function):
    """embed_fold as one autograd node; the backward is the adjoint F^T."""

    @staticmethod
    def forward(ctx, x: Tensor, signs: Tensor, n: int, m: int) -> Tensor:  # noqa: D102
        ctx.save_for_backward(signs)
        ctx.sizes = (x.shape[-1], n)
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        return _embed_fold_2d(flat, signs, n, m).view(*x.shape[:-1], m)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        (signs,) = ctx.saved_tensors
        in_features, n = ctx.sizes
        flat = grad.reshape(-1, grad.shape[-1]).contiguous()
        grad_x = _embed_fold_adjoint_2d(flat, signs, in_features, n).view(*grad.shape[:-1], in_features)
        return grad_x, None, None, None


def embed_fold(x: Tensor, signs: Tensor, *, n: int, m: int) -> Tensor:
    """Embed x into n positions with a sign pattern, then fold the n/m blocks of length m.

    ``x̃_i = s_i · x_{i mod N}`` for i in [0, n) with ``s_i = 1`` for i < N and ``s_i = signs[i - N]``
    otherwise (±1 for the "tile" embedding, 0 for "pad" = zero padding); then ``y_k = Σ_t x̃_{k + t·m}``.
    The dense equivalent is ``x @ embedding_matrix(N, signs, n=n, m=m).T``; differentiable.

    Args:
        x: (..., N) tensor.
        signs: (n - N,) tensor of ±1 or 0 (cast to x's dtype).
        n: Embed size, a multiple of m with n >= N.
        m: Transform size, a power of two.

    Returns:
        (..., m) tensor.
    """
    _check_embed(x.shape[-1], signs, n, m)
    if n == m == x.shape[-1]:
        return x
    return _EmbedFold.apply(x, signs.to(x.dtype), n, m)


def whole_copy_table(signs: Tensor, in_features: int, *, n: int, m: int) -> Tensor | None:
    """The (k, N) table ``E = H_k · S`` when the embedding is k whole copies of x (n == m, N | n), else None.

    S = [1; signs] (k, N). ``H_n x̃ = concat_t H_N(E[t] ⊙ x)`` (H_n = H_k ⊗ H_N), so the stages over the
    k copies never run: the embedding multiplies x by the integers E (|E| <= k) instead of by the ±1 signs
    — the same number of multiplications, log2(k) fewer add/sub stages. This is :func:`block_project`'s
    table for such heads (P = N).
    """
    if n != m or n % in_features != 0:
        return None
    k = n // in_features
    s = torch.cat([torch.ones(1, in_features, dtype=signs.dtype, device=signs.device), signs.view(k - 1, in_features)])
    return _fwht_2d(s.T.contiguous()).T.contiguous()  # (k, N): transform over the copy index


def _as_slice(rows: Tensor) -> slice | None:
    """``rows`` as a slice when it is a contiguous ascending range on the CPU (a copy beats a gather)."""
    if rows.device.type != "cpu" or rows.numel() == 0:
        return None
    lo = int(rows[0])
    if not torch.equal(rows, torch.arange(lo, lo + rows.numel(), dtype=rows.dtype)):
        return None
    return slice(lo, lo + rows.numel())


def _gather_into(res: Tensor, rows: Tensor, span: slice | None, out: Tensor) -> None:
    """out (b, C) <- res (b, n)[:, rows]."""
    if span is not None:
        out.copy_(res[:, span])
    else:
        torch.index_select(res, 1, rows, out=out)


def _scatter_into(grad: Tensor, rows: Tensor, span: slice | None, q: Tensor) -> None:
    """q (b, n) <- zeros with grad (b, C) at the columns ``rows`` (the adjoint of the gather)."""
    q.zero_()
    if span is not None:
        q[:, span] = grad
    else:
        q.index_copy_(1, rows, grad)


class _Project(torch.autograd.Function):
    """``(H_m · F · x)[rows]`` as one autograd node, block by block so each block stays in cache.

    Forward per block: embed into a work buffer, fold, the add/sub stages, gather the C rows; the (B, m)
    transform is never materialized. Backward: scatter the C gradients into m zeros, the same stages
    (H is symmetric), then the adjoint of the embedding. Whole copies go through :class:`_BlockProject`.
    """

    @staticmethod
    def forward(ctx, x: Tensor, signs: Tensor, rows: Tensor, n: int, m: int) -> Tensor:  # noqa: D102
        ctx.save_for_backward(signs, rows)
        ctx.sizes = (x.shape[-1], n, m)
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        total, big_n = flat.shape
        out = torch.empty((total, rows.numel()), dtype=x.dtype, device=x.device)
        block = _block_rows(total, n, flat)
        ping = torch.empty((block, m), dtype=x.dtype, device=x.device)
        pong = torch.empty_like(ping)
        emb = torch.empty((block, n), dtype=x.dtype, device=x.device) if big_n < n and n > m else None
        span = _as_slice(rows)
        for r0 in range(0, total, block):
            xb = flat[r0 : r0 + block]
            b = xb.shape[0]
            p, q = ping[:b], pong[:b]
            if n == m == big_n:
                y = xb
            elif n == m:
                _embed_into(xb, signs, q)  # (b, m)
                y = q
            else:  # fold the n/m blocks of the (embedded) row into q
                src = xb
                if emb is not None:
                    _embed_into(xb, signs, emb[:b])
                    src = emb[:b]
                torch.sum(src.view(b, n // m, m), dim=1, out=q)
                y = q
            res = y if m == 1 else _stages(y, p, q)  # (b, m) = H_m F x
            _gather_into(res, rows, span, out[r0 : r0 + block])
        return out.view(*x.shape[:-1], rows.numel())

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        signs, rows = ctx.saved_tensors
        in_features, n, m = ctx.sizes
        flat = grad.reshape(-1, grad.shape[-1])
        total = flat.shape[0]
        out = torch.empty((total, in_features), dtype=grad.dtype, device=grad.device)
        block = _block_rows(total, n, flat)
        ping = torch.empty((block, m), dtype=grad.dtype, device=grad.device)
        pong = torch.empty_like(ping)
        span = _as_slice(rows)
        for r0 in range(0, total, block):
            gb = flat[r0 : r0 + block]
            p, q = ping[: gb.shape[0]], pong[: gb.shape[0]]
            _scatter_into(gb, rows, span, q)  # (b, m): gradient of every transform output
            res = q if m == 1 else _stages(q, p, q)
            out[r0 : r0 + block] = _embed_fold_adjoint_2d(res, signs, in_features, n)
        return out.view(*grad.shape[:-1], in_features), None, None, None, None


class _BlockProject(torch.autograd.Function):
    """``concat_k H_P(table[k] ⊙ pad(x, P))[rows]`` as one autograd node, block by block.

    Forward per block of samples: one multiply of x by the (K, P) table into a (b, K, P) buffer (zeros after
    the N features), the log2(P) add/sub stages of every P-point transform, gather the C rows. Backward:
    scatter, the same stages (H_P symmetric), then ``Σ_k table[k] ⊙ .`` over the first N positions.
    """

    @staticmethod
    def forward(ctx, x: Tensor, table: Tensor, rows: Tensor) -> Tensor:  # noqa: D102
        ctx.save_for_backward(table, rows)
        ctx.in_features = x.shape[-1]
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        total, big_n = flat.shape
        k, p_size = table.shape
        n = k * p_size
        out = torch.empty((total, rows.numel()), dtype=x.dtype, device=x.device)
        block = _block_rows(total, n, flat)
        ping = torch.empty((block, n), dtype=x.dtype, device=x.device)
        pong = torch.zeros_like(ping)  # the positions >= N stay zero until the stages write them
        span = _as_slice(rows)
        head = table[:, :big_n]  # (K, N): only the feature positions multiply anything
        for r0 in range(0, total, block):
            xb = flat[r0 : r0 + block]
            b = xb.shape[0]
            p, q = ping[:b], pong[:b]
            q3 = q.view(b, k, p_size)
            torch.mul(xb.unsqueeze(1), head, out=q3[:, :, :big_n])  # (b, K, N) = table ⊙ x
            if big_n < p_size and r0 > 0:
                q3[:, :, big_n:].zero_()  # the last block's stages wrote there
            res = q if p_size == 1 else _stages(q, p, q, top=p_size)  # (b, K·P) = K transforms
            _gather_into(res, rows, span, out[r0 : r0 + block])
        return out.view(*x.shape[:-1], rows.numel())

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        table, rows = ctx.saved_tensors
        k, p_size = table.shape
        flat = grad.reshape(-1, grad.shape[-1])
        total = flat.shape[0]
        in_features = ctx.in_features
        out = torch.empty((total, in_features), dtype=grad.dtype, device=grad.device)
        block = _block_rows(total, k * p_size, flat)
        ping = torch.empty((block, k * p_size), dtype=grad.dtype, device=grad.device)
        pong = torch.empty_like(ping)
        span = _as_slice(rows)
        head = table[:, :in_features]
        for r0 in range(0, total, block):
            gb = flat[r0 : r0 + block]
            b = gb.shape[0]
            p, q = ping[:b], pong[:b]
            _scatter_into(gb, rows, span, q)
            res = q if p_size == 1 else _stages(q, p, q, top=p_size)  # (b, K·P)
            torch.sum(res.view(b, k, p_size)[:, :, :in_features] * head, dim=1, out=out[r0 : r0 + block])
        return out.view(*grad.shape[:-1], in_features), None, None


def block_project(x: Tensor, table: Tensor, rows: Tensor) -> Tensor:
    """``concat_k H_P(table[k] ⊙ pad(x, P))[rows]``: K P-point transforms of x times a sign table, gathered.

    The class vectors are ``(table[k] ⊙ h_r)[:N]`` for row ``k·P + r`` (h_r the Sylvester row): a frame
    of :mod:`fyc_convert.head.frames`, or the whole-copy tiling's ``H_T · S`` (see :func:`hadamard_project`).
    ``pad`` appends P - N zeros. Dense equivalent: ``x @ V.T`` with ``V = (table[:, None, :] *
    sylvester(P)[None]).reshape(K·P, P)[rows, :N]``. Differentiable with respect to x.

    Args:
        x: (..., N) tensor.
        table: (K, P) tensor, P a power of two >= N (cast to x's dtype).
        rows: (C,) int64 indices into the K·P outputs, on x's device.

    Returns:
        (..., C) tensor.
    """
    if table.dim() != 2 or not is_pow2(table.shape[1]) or table.shape[1] < x.shape[-1]:
        raise ValueError(f"block_project: need a (K, P) table with P a power of two >= N={x.shape[-1]}, "
                         f"got {tuple(table.shape)}")
    return _BlockProject.apply(x, table.to(x.dtype), rows)


def hadamard_project(x: Tensor, signs: Tensor, rows: Tensor, *, n: int, m: int) -> Tensor:
    """``(H_m · F · x)[rows]``: embed, fold, fwht and gather in one pass; the Hadamard head's core.

    Equals ``fwht(embed_fold(x, signs, n=n, m=m))[..., rows]`` (and ``x @ V.T`` with
    ``V = sylvester(m)[rows] @ embedding_matrix(N, signs, n=n, m=m)``) but works block by block without
    materializing the (..., m) transform. When the embedding is k whole copies of x (n == m, N | n), it runs
    as :func:`block_project` with the table ``H_k · S``: the stages over the copy index are folded into the
    one multiply. Differentiable with respect to x.

    Args:
        x: (..., N) tensor.
        signs: (n - N,) sign buffer (cast to x's dtype).
        rows: (C,) int64 rows of H_m, on x's device.
        n: Embed size.
        m: Transform size.

    Returns:
        (..., C) tensor.
    """
    _check_embed(x.shape[-1], signs, n, m)
    table = whole_copy_table(signs.to(x.dtype), x.shape[-1], n=n, m=m) if x.shape[-1] < n else None
    if table is not None:
        return block_project(x, table, rows)
    return _Project.apply(x, signs.to(x.dtype), rows, n, m)


def embedding_matrix(in_features: int, signs: Tensor, *, n: int, m: int) -> Tensor:
    """Dense integer matrix F (m, N) of :func:`embed_fold` (reference / inspection only).

    ``F[k, j] = Σ_{i in [0, n): i mod m = k, i mod N = j} s_i``.
    """
    i = torch.arange(n, device=signs.device)
    s = torch.cat([torch.ones(in_features, dtype=signs.dtype, device=signs.device), signs])
    f = torch.zeros(m * in_features, dtype=signs.dtype, device=signs.device)
    f.index_add_(0, (i % m) * in_features + i % in_features, s)
    return f.view(m, in_features)


def coherence(vectors: Tensor, *, chunk: int = 1024, dots: Callable[[Tensor], Tensor] | None = None) -> float:
    """Max |cos| between distinct rows of ``vectors`` (C, N), computed in row chunks (float64).

    Zero rows count as cos 0 with everything. Returns 0.0 for fewer than two rows.

    Args:
        vectors: (C, N) rows.
        chunk: rows per block of the (chunk, C) cosine matrix.
        dots: optional fast product: ``dots(u)`` for (chunk, N) rows u returns the (chunk, C) dot products
            ``u @ vectors.T`` (e.g. the head's transform); default the dense matmul.
    """
    c = vectors.shape[0]
    if c < 2:
        return 0.0
    v = vectors.to(torch.float64)
    norms = v.norm(dim=1).clamp_min(1e-300)  # (C,)
    v = v / norms.unsqueeze(1)
    worst = 0.0
    for start in range(0, c, chunk):
        block = v[start : start + chunk]
        g = (block @ v.T if dots is None else dots(block) / norms).abs_()  # (chunk, C)
        idx = torch.arange(g.shape[0], device=g.device)
        g[idx, idx + start] = 0.0
        worst = max(worst, float(g.max()))
    return worst

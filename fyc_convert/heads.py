"""Fixed classifier heads (Hoffer et al., "Fix your classifier", ICLR 2018, sections 2.2-2.3).

``HadamardHead`` computes ``logits = α · V · x̂ + b`` with ``V = H_m[rows] · F`` applied by embed/fold and the
add/sub fast Walsh–Hadamard transform (see docs/design.md for the exact math); no C×N matrix is ever stored.
``OrthogonalHead`` is the paper's fixed random orthonormal projection, rebuilt from a stored seed.
``cosine_loss`` is the paper's cosine-angle loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from fyc_convert.errors import HeadError
from fyc_convert.hadamard import coherence as _coherence
from fyc_convert.hadamard import embed_fold, fwht, hadamard_project, is_pow2, next_pow2

__all__ = ["HadamardHead", "OrthogonalHead", "cosine_loss"]

Embedding = Literal["tile", "pad"]

_MAX_DOUBLINGS = 4  # default sizing may grow m up to 16x its first choice before giving up
_DEFAULT_LOGIT_RANGE = 10.0  # initial α·‖V_c‖: logits start as 10·cos(V_c, x)
_EXACT_COHERENCE_MAX_C = 8192
_LSA_MAX_CELLS = 4_000_000  # C × candidates above this: greedy assignment instead of the Hungarian method
_CHUNK = 512
_SCORE_SAMPLES = 4096  # features used to score rows in from_linear (a seeded subsample)
_WIDEN_MARGIN = 0.01  # from_linear doubles m only when calibrated agreement improves by more than this


# ----------------------------------------------------------------------------------------------- layout
def _make_signs(n_extra: int, embedding: Embedding, seed: int) -> Tensor:
    """The (n - N,) sign buffer (float64, CPU): zeros for "pad"; for "tile" a seeded bent sequence.

    "tile" signs are ``s = (-1)^f(j)`` for a Maiorana–McFarland function on the k = ceil(log2(n - N)) bits
    of j = (y, x) (x the low k//2 bits): ``f = <x, π(y) mod 2^(k//2)> XOR g(y)`` with a random permutation
    π and random bits g from a private generator seeded with ``seed``, truncated to n - N entries. Such f
    is bent (k even) or near-bent (k odd): its Walsh spectrum is flat, which is what keeps the cross
    terms of the class-vector Gram matrix small (max |cos| 0.067 vs 0.14 for iid signs at N=512, C=1000;
    0.032 vs 0.067 at N=1664, C=1000).
    """
    if embedding == "pad" or n_extra == 0:
        return torch.zeros(n_extra, dtype=torch.float64)
    k = max(1, (n_extra - 1).bit_length())
    bits_x, bits_y = k // 2, k - k // 2
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(1 << bits_y, generator=g)
    flip = torch.randint(0, 2, (1 << bits_y,), generator=g)
    j = torch.arange(n_extra)
    x, y = j & ((1 << bits_x) - 1), j >> bits_x
    dot = x & perm[y]  # <x, π(y)> bitwise; bits of π(y) above bits_x are masked by x
    parity = flip[y].clone()
    for b in range(bits_x):
        parity ^= (dot >> b) & 1
    return (1 - 2 * parity).to(torch.float64)


def _embed_size(in_features: int, m: int) -> int:
    """Smallest multiple of m that is >= N."""
    return m * -(-in_features // m)


def _candidate_rows(in_features: int, signs: Tensor, *, n: int, m: int) -> Tensor:
    """Rows 1..m-1 whose class vectors are nonzero and pairwise distinct (first row of each duplicate group).

    Uses exact integer fingerprints ``V @ R`` (R: 4 fixed random integer columns), computed with one
    embed/fold + fwht: distinct fingerprints prove distinct vectors, a nonzero fingerprint proves a nonzero
    vector; a (vanishingly rare) collision only drops a candidate, never admits a bad one.
    """
    g = torch.Generator().manual_seed(0x5EED)
    r = torch.randint(-1024, 1025, (4, in_features), generator=g).to(torch.float64)
    prints = fwht(embed_fold(r, signs, n=n, m=m))[:, 1:]  # (4, m-1) = (V[1:] @ R).T, exact integers
    nonzero = prints.ne(0).any(dim=0)
    _, inverse = torch.unique(prints, dim=1, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), m, dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(m - 1), reduce="amin")
    keep = torch.zeros(m - 1, dtype=torch.bool)
    keep[first] = True
    return torch.nonzero(keep & nonzero).flatten() + 1  # (K,) sorted ascending


def _layout(
    in_features: int,
    num_classes: int,
    *,
    hadamard_size: int | None,
    embedding: Embedding,
    seed: int,
    fold: bool = True,
) -> tuple[int, int, Tensor, Tensor]:
    """Default sizing of docs/design.md. Returns (m, n, signs, candidate rows).

    ``fold=False`` skips the fold shortcut (m = n = nextpow2(max(N, C + 1)) first): more candidate rows,
    which is what :meth:`HadamardHead.from_linear` wants.
    """
    if hadamard_size is not None:
        if not is_pow2(hadamard_size) or hadamard_size < 2:
            raise HeadError(f"hadamard_size must be a power of two >= 2, got {hadamard_size}")
        sizes = [hadamard_size]
    else:
        m0 = next_pow2(num_classes + 1)  # row 0 is never used by default
        use_fold = fold and in_features % m0 == 0
        first = m0 if use_fold else next_pow2(max(in_features, num_classes + 1))
        sizes = [first << k for k in range(_MAX_DOUBLINGS + 1)]
    best = 0
    for m in sizes:
        n = _embed_size(in_features, m)
        signs = _make_signs(n - in_features, embedding, seed)
        cand = _candidate_rows(in_features, signs, n=n, m=m)
        if cand.numel() >= num_classes:
            return m, n, signs, cand
        best = max(best, cand.numel())
    hint = " (try embedding='tile')" if embedding == "pad" else ""
    raise HeadError(
        f"cannot give {num_classes} classes distinct nonzero Hadamard class vectors with in_features="
        f"{in_features} (at most {best} found up to hadamard_size={sizes[-1]}){hint}; use more features, "
        "fewer classes, or pass rows= explicitly"
    )


def _normalize(x: Tensor, eps: float) -> Tensor:
    """x / (‖x‖₂ + eps) along the last dim; the norm is accumulated in fp32 at least (fp16 overflows)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc)
    return x / (norm + eps).to(x.dtype)


def _norms_sq(in_features: int, signs: Tensor, rows: Tensor, *, n: int, m: int) -> Tensor:
    """(len(rows),) float64 ‖V_r‖², from the transformed identity in chunks of features."""
    acc = torch.zeros(rows.numel(), dtype=torch.float64, device=rows.device)
    for s in range(0, in_features, _CHUNK):
        c = min(_CHUNK, in_features - s)
        eye = torch.zeros(c, in_features, dtype=torch.float64, device=rows.device)
        eye[torch.arange(c), torch.arange(s, s + c)] = 1.0  # rows s..s+c of the identity
        acc += hadamard_project(eye, signs, rows, n=n, m=m).square().sum(dim=0)  # (c, len(rows)) = V.T chunk
    return acc


def _rows_coherence(in_features: int, signs: Tensor, rows: Tensor, *, n: int, m: int) -> float:
    """Exact max |cos| among the class vectors of ``rows`` (float64; cost ~ C·(N + m·log m))."""
    if rows.numel() < 2:
        return 0.0
    eye = torch.eye(in_features, dtype=torch.float64, device=rows.device)
    v = hadamard_project(eye, signs, rows, n=n, m=m).T  # (C, N) class vectors
    norms = v.norm(dim=1).clamp_min(1e-300)  # (C,)
    v = v / norms.unsqueeze(1)
    worst = 0.0
    for s in range(0, v.shape[0], _CHUNK):
        # (chunk, C) cosines via the fast transform: V · v̂_c / ‖V_r‖
        g = hadamard_project(v[s : s + _CHUNK], signs, rows, n=n, m=m).abs_() / norms
        idx = torch.arange(g.shape[0], device=g.device)
        g[idx, idx + s] = 0.0
        worst = max(worst, float(g.max()))
    return worst


def _fit_scale_bias(
    raw: Tensor, target: Tensor, *, bias: bool, fixed_scale: float | None
) -> tuple[float, Tensor | None]:
    """Least squares for α (and per-class b) in ``α·raw + b ≈ target``; raw, target (S, C) float64."""
    if fixed_scale is not None:
        alpha = float(fixed_scale)
    elif bias:
        rc = raw - raw.mean(dim=0)
        tc = target - target.mean(dim=0)
        alpha = float((rc * tc).sum() / (rc * rc).sum().clamp_min(1e-30))
    else:
        alpha = float((raw * target).sum() / (raw * raw).sum().clamp_min(1e-30))
    b = (target - alpha * raw).mean(dim=0) if bias else None
    return alpha, b


def _calibrated_agreement(head: nn.Module, x: Tensor, target: Tensor, *, iters: int = 30) -> float:
    """Top-1 agreement with `target` after fitting α and b by softmax cross-entropy (as calibration will)."""
    with torch.no_grad():
        raw = head.raw(x.to(head.scale.dtype)).double()  # (S, C)
    alpha = torch.tensor(float(head.scale.detach()), dtype=torch.float64,
                         requires_grad=isinstance(head.scale, nn.Parameter))  # fixed_scale: a buffer
    b = (head.bias.detach().double().clone() if head.bias is not None else torch.zeros(raw.shape[1],
                                                                                      dtype=torch.float64))
    b.requires_grad_(head.bias is not None)
    params = [p for p in (alpha, b) if p.requires_grad]
    opt = torch.optim.LBFGS(params, max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(alpha * raw + b, target)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((alpha * raw + b).argmax(dim=1) == target).double().mean())


def _assign(score_fn: Callable[[Tensor], Tensor], num_classes: int, num_cand: int) -> Tensor:
    """Give each class a distinct candidate, maximising the summed score. Returns (C,) candidate indices.

    ``score_fn(idx)`` gives the (len(idx), K) float64 score block for the classes ``idx``. Exact Hungarian
    method when C·K is small enough; otherwise greedy over per-class top-k lists (best pairs first),
    repeated for the classes left over with the taken candidates masked out.
    """
    classes = torch.arange(num_classes)
    if num_classes * num_cand <= _LSA_MAX_CELLS:
        cos = torch.cat([score_fn(classes[s : s + _CHUNK]) for s in range(0, num_classes, _CHUNK)])
        cls, cand = linear_sum_assignment(cos.numpy(), maximize=True)
        out = np.empty(num_classes, dtype=np.int64)
        out[cls] = cand
        return torch.from_numpy(out)
    out = np.full(num_classes, -1, dtype=np.int64)
    taken = torch.zeros(num_cand, dtype=torch.bool)
    k = min(16, num_cand)
    while (out < 0).any():
        todo = torch.from_numpy(np.flatnonzero(out < 0))
        vals, cands = [], []
        for s in range(0, todo.numel(), _CHUNK):
            cos = score_fn(todo[s : s + _CHUNK]).masked_fill_(taken, -math.inf)  # (chunk, K)
            v, c = cos.topk(k, dim=1)
            vals.append(v)
            cands.append(c)
        v, c = torch.cat(vals).numpy(), torch.cat(cands).numpy()  # (T, k)
        cls = np.repeat(todo.numpy(), k)
        v, c = v.ravel(), c.ravel()
        free = np.ones(num_cand, dtype=bool)
        free[taken.numpy()] = False
        for j in np.argsort(-v, kind="stable"):
            ci, ri = cls[j], c[j]
            if out[ci] < 0 and free[ri] and v[j] > -math.inf:
                out[ci] = ri
                free[ri] = False
        taken = torch.from_numpy(~free)
    return torch.from_numpy(out)


# ------------------------------------------------------------------------------------------ HadamardHead
class _FixedHead(nn.Module):
    """What both fixed heads share: ``logits = scale · raw(x) + bias`` with a learned (or fixed) α and bias."""

    head_kind: str

    def _init_scale_bias(self, num_classes: int, *, init: float, fixed_scale: float | None, bias: bool) -> None:
        if fixed_scale is None:
            self.scale = nn.Parameter(torch.tensor(init))
        else:
            self.register_buffer("scale", torch.tensor(float(fixed_scale)))
        self.bias = nn.Parameter(torch.zeros(num_classes)) if bias else None

    def raw(self, x: Tensor) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def class_vector_norms(self) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """(..., N) -> (..., C) logits ``scale · V x̂ + bias``."""
        out = self.raw(x) * self.scale.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out

    def cosines(self, x: Tensor) -> Tensor:
        """(..., N) -> (..., C): ``cos(V_c, x) = V_c · x̂ / ‖V_c‖`` (for :func:`cosine_loss`)."""
        return self.raw(x) / self.class_vector_norms().to(x.dtype)


class HadamardHead(_FixedHead):
    """Fixed Hadamard classifier: ``logits = scale · (H_m · embed_fold(x̂))[rows] + bias``.

    The class vectors ``V = H_m[rows] · F`` (C×N, integer) are never stored: the state is the scalar
    ``scale``, ``bias`` (C,), ``rows`` (C,, int64) and ``signs`` (n - N,). See docs/design.md.

    Args:
        in_features: N, the feature size.
        num_classes: C.
        bias: Learn a per-class bias.
        fixed_scale: Use this constant α (a buffer) instead of learning it.
        rows: (C,) Hadamard row per class; default: the first C candidate rows (never row 0).
        hadamard_size: m, the transform size (power of two); default per docs/design.md.
        embedding: "tile" (seeded ±1 copies of x, distinct near-orthogonal class vectors) or
            "pad" (zero padding, the reference semantics).
        seed: Seed of the "tile" sign pattern (private generator; the global RNG is untouched).
        eps: Added to ‖x‖₂ before dividing.
    """

    head_kind = "hadamard"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        bias: bool = True,
        fixed_scale: float | None = None,
        rows: Tensor | list[int] | None = None,
        hadamard_size: int | None = None,
        embedding: Embedding = "tile",
        seed: int = 0,
        eps: float = 1e-8,
    ):
        super().__init__()
        if in_features < 1 or num_classes < 1:
            raise HeadError(f"in_features and num_classes must be >= 1, got {in_features}, {num_classes}")
        if embedding not in ("tile", "pad"):
            raise HeadError(f"embedding must be 'tile' or 'pad', got {embedding!r}")
        self.in_features = in_features
        self.num_classes = num_classes
        self.embedding = embedding
        self.eps = eps
        self.seed = seed
        if rows is None:
            m, n, signs, cand = _layout(
                in_features, num_classes, hadamard_size=hadamard_size, embedding=embedding, seed=seed
            )
            rows_t = cand[:num_classes]
        else:
            m = hadamard_size if hadamard_size is not None else next_pow2(max(in_features, num_classes))
            if not is_pow2(m):
                raise HeadError(f"hadamard_size must be a power of two, got {m}")
            n = _embed_size(in_features, m)
            signs = _make_signs(n - in_features, embedding, seed)
            rows_t = torch.as_tensor(rows, dtype=torch.int64).flatten()
            if rows_t.numel() != num_classes or len(set(rows_t.tolist())) != num_classes:
                raise HeadError(f"rows must hold {num_classes} distinct row indices, got {rows_t.numel()} "
                                f"({len(set(rows_t.tolist()))} distinct)")
            if int(rows_t.min()) < 0 or int(rows_t.max()) >= m:
                raise HeadError(f"rows must lie in [0, {m}) for hadamard_size={m}; pass a larger hadamard_size")
        self.hadamard_size = m
        self.embed_size = n
        self.register_buffer("rows", rows_t.clone())
        self.register_buffer("signs", signs.to(torch.get_default_dtype()))
        self._init_scale_bias(num_classes, init=_DEFAULT_LOGIT_RANGE / math.sqrt(self._mean_sq_norm()),
                              fixed_scale=fixed_scale, bias=bias)
        self._norm_cache: tuple[tuple[int, ...], Tensor] | None = None  # see class_vector_norms

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, hadamard_size="
                f"{self.hadamard_size}, embed_size={self.embed_size}, embedding={self.embedding!r}, "
                f"bias={self.bias is not None}")

    def _mean_sq_norm(self) -> float:
        """Mean ‖V_r‖² over all m rows = ‖F‖_F² (Parseval), from the n embedding entries."""
        i = torch.arange(self.embed_size)
        s = torch.cat([torch.ones(self.in_features, dtype=torch.float64), self.signs.double().cpu()])
        keys = (i % self.hadamard_size) * self.in_features + i % self.in_features
        _, inv = torch.unique(keys, return_inverse=True)
        f = torch.zeros(int(inv.max()) + 1, dtype=torch.float64).index_add_(0, inv, s)  # nonzeros of F
        return max(float((f * f).sum()), 1.0)

    def raw(self, x: Tensor) -> Tensor:
        """``V · x̂`` without scale and bias: (..., N) -> (..., C)."""
        if x.shape[-1] != self.in_features:
            raise HeadError(f"expected inputs with {self.in_features} features, got shape {tuple(x.shape)}")
        xh = _normalize(x, self.eps)
        return hadamard_project(xh, self.signs, self.rows, n=self.embed_size, m=self.hadamard_size)  # (..., C)

    def class_vector_norms(self) -> Tensor:
        """(C,) ‖V_c‖₂ in the head's dtype and device.

        Computed once (cost ~ N·m·log m) and cached against the versions of ``rows`` and ``signs``, so
        loading a state_dict or editing the buffers recomputes it.
        """
        key = (self.rows.data_ptr(), self.rows._version, self.signs.data_ptr(), self.signs._version)
        if self._norm_cache is None or self._norm_cache[0] != key:
            sq = _norms_sq(self.in_features, self.signs.double(), self.rows, n=self.embed_size,
                           m=self.hadamard_size)
            self._norm_cache = (key, sq.sqrt())
        return self._norm_cache[1].to(self.signs.device, self.signs.dtype)

    def class_vectors(self) -> Tensor:
        """The effective (C, N) integer-valued class matrix V (inspection and tests only)."""
        eye = torch.eye(self.in_features, dtype=self.signs.dtype, device=self.signs.device)
        vt = hadamard_project(eye, self.signs, self.rows, n=self.embed_size, m=self.hadamard_size)  # (N, C)
        return vt.T.contiguous()

    def coherence(self) -> float:
        """Max |cos| between distinct class vectors (float64).

        Exact for C <= 8192 (each class vector is pushed through the fast transform, in chunks); above
        that, the max over all pairs among 8192 classes drawn with a fixed seed (a lower bound).
        """
        rows = self.rows
        if rows.numel() > _EXACT_COHERENCE_MAX_C:
            g = torch.Generator().manual_seed(0)
            rows = rows[torch.randperm(rows.numel(), generator=g)[:_EXACT_COHERENCE_MAX_C].to(rows.device)]
        return _rows_coherence(self.in_features, self.signs.double(), rows, n=self.embed_size,
                               m=self.hadamard_size)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        features: Tensor | None = None,
        bias: bool = True,
        fixed_scale: float | None = None,
        embedding: Embedding = "tile",
        seed: int = 0,
        hadamard_size: int | None = None,
    ) -> HadamardHead:
        """Build a head that starts as close as possible to a trained ``linear`` (class order kept).

        Size: by default m = n = nextpow2(max(N, C + 1)) without the fold shortcut, so there are about
        twice as many candidate rows as classes (on the digits CNN, N=128, C=10: 89-92% accuracy right
        after the swap against 61% with the 16-point fold). Rows: each class c gets a distinct candidate
        row r (never row 0) maximising the summed score (Hungarian method; greedy for very large C × m).
        The score is the correlation over ``features`` between the trained logit ``W_c x`` and ``V_r x̂``
        when features are given and C·m is small enough (the Hungarian range), else cos(W_c, V_r).
        Scale and bias: with ``features``, the least-squares fit of ``α·V x̂ + b ≈ W x + b₀``; without,
        α is the least-squares fit of ``α·V_rows ≈ W`` times sqrt(N) (features of unit RMS per entry
        assumed) and b = b₀.

        Args:
            linear: The trained (C, N) classifier.
            features: Optional (S, N) sample of its inputs (recommended).
            bias: Give the head a bias.
            fixed_scale: Keep α fixed at this value (the bias is still fitted when features are given).
            embedding: As in the constructor.
            seed: As in the constructor.
            hadamard_size: Force the transform size m (e.g. the constructor's fold size, for speed).

        Returns:
            A HadamardHead on the linear layer's device and dtype.
        """
        w = linear.weight.detach().to("cpu", torch.float64)  # (C, N)
        c_out, n_in = w.shape
        b0 = linear.bias.detach().to("cpu", torch.float64) if linear.bias is not None else torch.zeros(c_out)
        m, n, signs, cand = _layout(n_in, c_out, hadamard_size=hadamard_size, embedding=embedding, seed=seed,
                                    fold=False)
        x = None if features is None else features.detach().to("cpu", torch.float64).reshape(-1, n_in)
        if x is not None and hadamard_size is None and c_out * 2 * m <= _LSA_MAX_CELLS:
            # Small heads: a doubled transform offers twice the candidate rows, often a much closer start
            # (digits CNN, N=64: 89% -> 97% after calibration). Keep it only when the softmax-calibrated
            # agreement with the trained layer on `features` is clearly better (it costs 2x head compute).
            kw = dict(features=features, bias=bias, fixed_scale=fixed_scale, embedding=embedding, seed=seed)
            base = cls.from_linear(linear, hadamard_size=m, **kw)
            wide = cls.from_linear(linear, hadamard_size=2 * m, **kw)
            target = (x @ w.T + b0).argmax(dim=1)
            scores = [_calibrated_agreement(h, x, target) for h in (base, wide)]
            return wide if scores[1] > scores[0] + _WIDEN_MARGIN else base
        if x is not None and c_out * cand.numel() <= _LSA_MAX_CELLS:
            sample = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:_SCORE_SAMPLES]]
            t = sample @ w.T  # (S, C) trained logits, centred and normalised per class
            t = t - t.mean(dim=0)
            t = t / t.norm(dim=0).clamp_min(1e-30)
            u = hadamard_project(_normalize(sample, 1e-8), signs, cand, n=n, m=m)  # (S, K)
            u = u - u.mean(dim=0)
            u = u / u.norm(dim=0).clamp_min(1e-30)

            def score(idx: Tensor) -> Tensor:  # (len(idx), K) correlation of W_c x with V_r x̂
                return t[:, idx].T @ u

        else:
            cand_norm = _norms_sq(n_in, signs, cand, n=n, m=m).sqrt()  # (K,)
            w_unit = (w / w.norm(dim=1, keepdim=True).clamp_min(1e-30)).float()  # fp32: half the traffic
            signs32 = signs.float()

            def score(idx: Tensor) -> Tensor:  # (len(idx), K) cos(W_c, V_r)
                return hadamard_project(w_unit[idx], signs32, cand, n=n, m=m).double() / cand_norm

        rows = cand[_assign(score, c_out, cand.numel())]
        head = cls(n_in, c_out, bias=bias, fixed_scale=fixed_scale, rows=rows, hadamard_size=m,
                   embedding=embedding, seed=seed).double()
        assert head.embed_size == n and torch.equal(head.signs, signs)
        with torch.no_grad():
            if x is not None:
                alpha, b = _fit_scale_bias(head.raw(x), x @ w.T + b0, bias=bias, fixed_scale=fixed_scale)
            else:
                dots = torch.cat([  # (C,) W_c · V_{rows[c]}
                    hadamard_project(w[s : s + _CHUNK], signs, rows[s : s + _CHUNK], n=n, m=m).diagonal()
                    for s in range(0, c_out, _CHUNK)
                ])
                fit = float(dots.sum() / _norms_sq(n_in, signs, rows, n=n, m=m).sum())
                alpha = float(fixed_scale) if fixed_scale is not None else fit * math.sqrt(n_in)
                b = b0 if bias else None
            head.scale.fill_(alpha)
            if b is not None:
                head.bias.copy_(b)
        return head.to(linear.weight.device, linear.weight.dtype)


# ---------------------------------------------------------------------------------------- OrthogonalHead
def _orthogonal_matrix(in_features: int, num_classes: int, seed: int) -> Tensor:
    """(C, N) float64: orthonormal rows when C <= N, else a tight frame (orthonormal columns · sqrt(C/N))."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(max(in_features, num_classes), min(in_features, num_classes), generator=g,
                    dtype=torch.float64)
    q, r = torch.linalg.qr(a)  # (max, min) with orthonormal columns
    q = q * torch.sign(torch.diagonal(r))  # unique QR: independent of LAPACK sign conventions
    if num_classes <= in_features:
        return q.T.contiguous()  # (C, N), Q Q^T = I
    return q * math.sqrt(num_classes / in_features)  # (C, N), Q^T Q = (C/N) I, mean row norm 1


class OrthogonalHead(_FixedHead):
    """The paper's fixed random orthonormal projection: ``logits = scale · Q x̂ + bias`` (section 2.2).

    ``Q`` (C, N) has orthonormal rows (a tight frame with unit mean row norm when C > N). It is rebuilt
    from ``seed`` with a private generator and kept as a non-persistent buffer, so the state_dict holds
    only ``seed``, ``scale`` and ``bias``; loading a state_dict with another seed rebuilds Q.

    Args:
        in_features: N.
        num_classes: C.
        bias: Learn a per-class bias.
        fixed_scale: Use this constant α (a buffer) instead of learning it.
        seed: Seed of Q (stored as the int64 buffer ``seed``).
        eps: Added to ‖x‖₂ before dividing.
    """

    head_kind = "orthogonal"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        bias: bool = True,
        fixed_scale: float | None = None,
        seed: int = 0,
        eps: float = 1e-8,
    ):
        super().__init__()
        if in_features < 1 or num_classes < 1:
            raise HeadError(f"in_features and num_classes must be >= 1, got {in_features}, {num_classes}")
        self.in_features = in_features
        self.num_classes = num_classes
        self.eps = eps
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.int64))
        self.register_buffer("weight", _orthogonal_matrix(in_features, num_classes, seed).to(
            torch.get_default_dtype()), persistent=False)
        self._init_scale_bias(num_classes, init=_DEFAULT_LOGIT_RANGE, fixed_scale=fixed_scale, bias=bias)
        self.register_load_state_dict_post_hook(_rebuild_after_load)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, seed={int(self.seed)}, "
                f"bias={self.bias is not None}")

    def raw(self, x: Tensor) -> Tensor:
        """``Q · x̂`` without scale and bias: (..., N) -> (..., C)."""
        if x.shape[-1] != self.in_features:
            raise HeadError(f"expected inputs with {self.in_features} features, got shape {tuple(x.shape)}")
        return F.linear(_normalize(x, self.eps), self.weight.to(x.dtype))

    def class_vector_norms(self) -> Tensor:
        """(C,) ‖Q_c‖₂."""
        return self.weight.norm(dim=1)

    def class_vectors(self) -> Tensor:
        """The (C, N) matrix Q."""
        return self.weight.clone()

    def coherence(self) -> float:
        """Max |cos| between distinct rows of Q (exact, chunked)."""
        return _coherence(self.weight)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        features: Tensor | None = None,
        bias: bool = True,
        fixed_scale: float | None = None,
        seed: int = 0,
    ) -> OrthogonalHead:
        """Build an orthogonal head for a trained ``linear``; Q is fixed by ``seed``, α and b are fitted.

        With ``features`` (S, N): least squares ``α·Q x̂ + b ≈ W x + b₀``. Without: α = the least-squares
        fit of ``α·Q ≈ W`` times sqrt(N) and b = b₀ (as :meth:`HadamardHead.from_linear`).
        """
        w = linear.weight.detach().to("cpu", torch.float64)
        c_out, n_in = w.shape
        head = cls(n_in, c_out, bias=bias, fixed_scale=fixed_scale, seed=seed).double()
        b0 = linear.bias.detach().to("cpu", torch.float64) if linear.bias is not None else torch.zeros(c_out)
        with torch.no_grad():
            if features is not None:
                x = features.detach().to("cpu", torch.float64).reshape(-1, n_in)
                alpha, b = _fit_scale_bias(head.raw(x), x @ w.T + b0, bias=bias, fixed_scale=fixed_scale)
            else:
                q = head.weight
                alpha = float(fixed_scale) if fixed_scale is not None else float(
                    (q * w).sum() / (q * q).sum()) * math.sqrt(n_in)
                b = b0 if bias else None
            head.scale.fill_(alpha)
            if b is not None:
                head.bias.copy_(b)
        return head.to(linear.weight.device, linear.weight.dtype)


def _rebuild_after_load(module: OrthogonalHead, incompatible_keys) -> None:
    """Rebuild Q from the (possibly new) seed after load_state_dict, keeping dtype and device."""
    q = _orthogonal_matrix(module.in_features, module.num_classes, int(module.seed))
    module.weight = q.to(module.weight.device, module.weight.dtype)


# ------------------------------------------------------------------------------------------------ loss
def cosine_loss(cosines: Tensor, target: Tensor, *, reduction: Literal["mean", "sum", "none"] = "mean") -> Tensor:
    """The paper's cosine-angle loss (section 2.2), used without softmax or scale.

    Per sample, summed over classes: ``(1 - cos_t) + Σ_{i≠t} (1 + cos_i)``, i.e. the L1 distance of the
    cosines to the targets +1 (true class) / -1 (others); each term is >= 0 since cos ∈ [-1, 1].

    Args:
        cosines: (B, C) cosines, e.g. ``head.cosines(x)``.
        target: (B,) int64 class indices.
        reduction: "mean" over the batch, "sum", or "none" for the (B,) per-sample losses.

    Returns:
        Scalar loss, or (B,) when reduction="none".
    """
    signed = torch.full_like(cosines, -1.0).scatter_(-1, target.unsqueeze(-1), 1.0)  # (B, C): +1 at target
    per_sample = (cosines - signed).abs().sum(dim=-1)
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample

"""Fixed classifier heads (Hoffer et al., "Fix your classifier", ICLR 2018, sections 2.2-2.3).

``HadamardHead`` computes ``logits = α · V · x̂ + b`` with ``V = H_m[rows] · F`` applied by embed/fold and the
add/sub fast Walsh–Hadamard transform, or, for the "kerdock" frame, ``V = rows of d_k ⊙ h_r`` applied as
K P-point transforms of x times a sign table (see docs/design.md for the exact math); no C×N matrix is ever
stored. ``OrthogonalHead`` is the paper's fixed random orthonormal projection, rebuilt from a stored seed.
``cosine_loss`` is the paper's cosine-angle loss. Which row serves which class: :mod:`fyc_convert.head.assign`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fyc_convert.errors import HeadError
from fyc_convert.head import assign
from fyc_convert.head.assign import Scorer, calibrated_agreement, match, scorer
from fyc_convert.head.fit import fit_to_linear
from fyc_convert.head.frames import frame_coherence, frame_table, frame_tiles
from fyc_convert.head.hadamard import (
    block_project,
    coherence,
    embed_fold,
    fwht_matmul,
    hadamard_project,
    is_pow2,
    next_pow2,
    sylvester,
    whole_copy_table,
)

__all__ = ["ADAPTER_RATIO", "ADAPTER_WIDEN", "HadamardHead", "OrthogonalHead", "adapter_width", "cosine_loss"]

Embedding = Literal["tile", "pad", "kerdock"]
EMBEDDINGS = ("tile", "pad", "kerdock")

_MAX_DOUBLINGS = 4  # default sizing may grow m up to 16x its first choice before giving up
_DEFAULT_LOGIT_RANGE = 10.0  # initial α·‖V_c‖: logits start as 10·cos(V_c, x)
_COHERENCE_SAMPLE = 2048  # coherence over all pairs of at most this many classes (a seeded sample above)
_CHUNK = 512
_SCORE_CELLS = 1 << 22  # transform outputs per block of _Transform.score (32 MiB of float64)
_SCORE_MIN_INPUTS = 1 << 16  # raw() uses _Transform.score (no autograd) from this many input entries
_WIDEN_MARGIN = 0.01  # from_linear doubles m only when calibrated agreement improves by more than this
_POOL_CANDIDATES = 1 << 16  # from_linear scores at most about this many frame vectors (whole tiles) ...
_POOL_CELLS = 1 << 29  # ... and at most about this many class × vector scores (never fewer than k + 1 tiles)
_FIT_CELLS = 1 << 23  # from_linear's α/b fit and calibrated agreement on at most this many (sample, class) logits
_FIT_MIN_SAMPLES = 512  # ... but on at least this many samples
ADAPTER_RATIO = 16  # adapter="auto": a learned map before the head from C >= ADAPTER_RATIO * N ...
ADAPTER_WIDEN = 8  # ... to min(ADAPTER_WIDEN * N, C // 4) features, the head's (docs/accuracy.md, "Many classes")


# ----------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class _Transform:
    """The fixed linear map x ↦ z of a Hadamard head, before the row gather (docs/design.md).

    tile/pad: ``z = H_m · F · x`` (m outputs); kerdock: ``z = concat_k H_P(table[k] ⊙ pad(x, P))`` with the
    (K, P) table stored row-major in ``signs`` (K·P outputs).
    """

    in_features: int
    embedding: str
    signs: Tensor  # tile/pad: (n - N,) embedding signs; kerdock: (K·P,) the frame tiles' sign table
    embed_size: int  # n; kerdock: K·P
    hadamard_size: int  # m; kerdock: P

    @property
    def outputs(self) -> int:
        """Length of z: the number of rows to choose from."""
        return self.embed_size if self.embedding == "kerdock" else self.hadamard_size

    def table(self) -> Tensor | None:
        """(K, P) table of the block form ``z = concat_k H_P(table[k] ⊙ pad(x, P))``, when the head has one."""
        if self.embedding == "kerdock":
            return self.signs.view(-1, self.hadamard_size)
        if self.embedding == "tile":
            return whole_copy_table(self.signs, self.in_features, n=self.embed_size, m=self.hadamard_size)
        return None

    def project(self, x: Tensor, rows: Tensor) -> Tensor:
        """(..., N) -> (..., len(rows)): ``z[rows]``, x cast to the signs' dtype."""
        signs = self.signs.to(x.dtype)
        if self.embedding == "kerdock":
            return block_project(x, signs.view(-1, self.hadamard_size), rows)
        return hadamard_project(x, signs, rows, n=self.embed_size, m=self.hadamard_size)

    def score(self, x: Tensor, rows: Tensor) -> Tensor:
        """``project`` without autograd, by :func:`fwht_matmul` (several times faster on a CPU for large
        batches): (B, N) -> (B, len(rows)) in x's dtype, in blocks of at most _SCORE_CELLS transform outputs."""
        table = self.table()
        t = None if table is None else table.to(x.dtype)[:, : self.in_features]  # (K, N) of the (K, P) table
        outputs = self.outputs if table is not None else self.hadamard_size
        step = max(1, _SCORE_CELLS // outputs)
        out = torch.empty((x.shape[0], rows.numel()), dtype=x.dtype, device=x.device)
        for s in range(0, x.shape[0], step):
            xb = x[s : s + step]
            if table is None:  # (b, m): embed and fold, then one m-point transform
                y = embed_fold(xb, self.signs.to(x.dtype), n=self.embed_size, m=self.hadamard_size)
            elif table.shape[1] == self.in_features:  # (b, K, P): table[k] ⊙ x, then K P-point transforms
                y = xb.unsqueeze(1) * t
            else:  # (b, K, P): table[k] ⊙ pad(x, P)
                y = torch.zeros((xb.shape[0], *table.shape), dtype=x.dtype, device=x.device)
                torch.mul(xb.unsqueeze(1), t, out=y[:, :, : self.in_features])
            torch.index_select(fwht_matmul(y).view(xb.shape[0], -1), 1, rows, out=out[s : s + step])
        return out

    def vectors(self, rows: Tensor) -> Tensor:
        """(len(rows), N) float64 class vectors built entry by entry (no transform): O(len(rows)·n)."""
        rows, big_n, m = rows.cpu(), self.in_features, self.hadamard_size
        if self.embedding == "kerdock":
            table = self.signs.double().cpu().view(-1, m)[:, :big_n]
            return table[rows // m] * _sylvester_rows(rows % m, m)[:, :big_n]
        i = torch.arange(self.embed_size)  # x̃_i = s̃_i x_{i mod N} folded onto i mod m
        s = torch.cat([torch.ones(big_n, dtype=torch.float64), self.signs.double().cpu()])
        h = _sylvester_rows(rows, m)  # (len(rows), m)
        if self.embed_size == m == big_n:
            return h
        return torch.zeros((rows.numel(), big_n), dtype=torch.float64).index_add_(1, i % big_n, s * h[:, i % m])

    def double(self) -> _Transform:
        """The same transform with float64 signs (exact integer class vectors for norms and cosines)."""
        return replace(self, signs=self.signs.double())

    def all_ones_rows(self) -> list[int]:
        """Outputs whose class vector is the all-ones vector (never given to a class: ReLU features all
        project positively on it)."""
        if self.embedding != "kerdock":
            return [0]
        table = self.signs.view(-1, self.hadamard_size)[:, : self.in_features]
        return [k * self.hadamard_size for k in torch.nonzero(table.eq(1).all(dim=1)).flatten().tolist()]


def _sylvester_rows(rows: Tensor, size: int) -> Tensor:
    """(len(rows), size) float64 rows of the Sylvester matrix H_size, by its Kronecker split H_a ⊗ H_b."""
    a = 1 << ((size.bit_length() - 1) // 2)
    b = size // a
    h_a, h_b = sylvester(a, dtype=torch.float64), sylvester(b, dtype=torch.float64)
    return (h_a[rows // b].unsqueeze(2) * h_b[rows % b].unsqueeze(1)).view(-1, size)  # H[r, j] = H_a·H_b


def _make_signs(n_extra: int, embedding: Embedding, seed: int) -> Tensor:
    """The (n - N,) sign buffer (float64, CPU): zeros for "pad"; for "tile" a seeded bent sequence.

    "tile" signs are ``s = (-1)^f(j)`` for a Maiorana–McFarland function on the k = ceil(log2(n - N)) bits
    of j = (y, x) (x the low k//2 bits): ``f = <x, π(y) mod 2^(k//2)> XOR g(y)`` with a random permutation
    π and random bits g from a private generator seeded with ``seed``, truncated to n - N entries. Such f
    is bent (k even) or near-bent (k odd): its Walsh spectrum is flat, which is what keeps the cross
    terms of the class-vector Gram matrix small (about half the max |cos| of iid signs; measured: see
    README "How the head works").
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


def _tile_transform(in_features: int, m: int, embedding: Embedding, seed: int) -> _Transform:
    n = _embed_size(in_features, m)
    return _Transform(in_features, embedding, _make_signs(n - in_features, embedding, seed), n, m)


def _frame_transform(in_features: int, size: int, tiles: Sequence[int]) -> _Transform:
    table = frame_table(size, tiles)  # (K, P) float64
    return _Transform(in_features, "kerdock", table.flatten(), table.numel(), size)


def _candidate_rows(tr: _Transform) -> Tensor:
    """Outputs whose class vectors are nonzero, pairwise distinct and not all ones (first of each duplicate group).

    Uses exact integer fingerprints ``V @ R`` (R: 4 fixed random integer columns), computed with one
    transform: distinct fingerprints prove distinct vectors, a nonzero fingerprint proves a nonzero vector;
    a (vanishingly rare) collision only drops a candidate, never admits a bad one.
    """
    g = torch.Generator().manual_seed(0x5EED)
    r = torch.randint(-1024, 1025, (4, tr.in_features), generator=g).to(torch.float64)
    out = tr.outputs
    prints = tr.project(r, torch.arange(out))  # (4, out) = (V @ R).T, exact integers
    keep = prints.ne(0).any(dim=0)
    keep[tr.all_ones_rows()] = False
    _, inverse = torch.unique(prints, dim=1, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), out, dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(out), reduce="amin")
    unique = torch.zeros(out, dtype=torch.bool)
    unique[first] = True
    return torch.nonzero(keep & unique).flatten()  # (K,) sorted ascending


def _layout(
    in_features: int,
    num_classes: int,
    *,
    hadamard_size: int | None,
    embedding: Embedding,
    seed: int,
    fold: bool = True,
) -> tuple[_Transform, Tensor]:
    """Default sizing of docs/design.md. Returns the transform and its candidate rows.

    ``fold=False`` skips the fold shortcut (m = n = nextpow2(max(N, C + 1)) first): more candidate rows,
    which is what :meth:`HadamardHead.from_linear` wants. "kerdock": P = nextpow2(N) and the first
    ceil((C + 1)/P) frame tiles (more, up to twice that, while duplicates leave too few candidates).
    """
    if hadamard_size is not None:
        if not is_pow2(hadamard_size) or hadamard_size < 2:
            raise HeadError(f"hadamard_size must be a power of two >= 2, got {hadamard_size}")
        if embedding == "kerdock" and hadamard_size < in_features:
            raise HeadError(f"the kerdock frame needs hadamard_size >= in_features={in_features}, got "
                            f"{hadamard_size}")
        sizes = [hadamard_size]
    elif embedding == "kerdock":
        sizes = [next_pow2(max(in_features, 2)) << k for k in range(_MAX_DOUBLINGS + 1)]
    else:
        m0 = next_pow2(num_classes + 1)  # row 0 is never used by default
        use_fold = fold and in_features % m0 == 0
        first = m0 if use_fold else next_pow2(max(in_features, num_classes + 1))
        sizes = [first << k for k in range(_MAX_DOUBLINGS + 1)]
    best = 0
    for m in sizes:
        if embedding == "kerdock":
            k_min = -(-(num_classes + 1) // m)
            ks = range(k_min, min(frame_tiles(m), 2 * k_min) + 1)  # more tiles while duplicates leave too few
            trials = (_frame_transform(in_features, m, range(k)) for k in ks)
        else:
            trials = [_tile_transform(in_features, m, embedding, seed)]
        for tr in trials:
            cand = _candidate_rows(tr)
            if cand.numel() >= num_classes:
                return tr, cand
            best = max(best, cand.numel())
    hint = " (try embedding='tile')" if embedding != "tile" else ""
    raise HeadError(
        f"cannot give {num_classes} classes distinct nonzero Hadamard class vectors with in_features="
        f"{in_features} (at most {best} found up to hadamard_size={sizes[-1]}){hint}; use more features, "
        "fewer classes, or pass rows= explicitly"
    )


def frame_is_better(in_features: int, num_classes: int) -> bool:
    """Whether the "kerdock" frame is the better default for N features and C classes (docs/design.md).

    True when there are more classes than features (C > N), the frame has enough vectors (C < T·P for
    P = nextpow2(N), T its tiles), and the zero padding costs at most the frame's own coherence: N a power
    of two, or P - N <= √P (the within-tile cosines of the padded frame are at most (P - N)/N).
    """
    size = next_pow2(in_features)
    if num_classes <= in_features or num_classes >= frame_tiles(size) * size:
        return False
    return (size - in_features) ** 2 <= size


def default_embedding(in_features: int, num_classes: int) -> Embedding:
    """The embedding HadamardHead uses when none is given: "kerdock" where `frame_is_better`, else "tile"."""
    return "kerdock" if frame_is_better(in_features, num_classes) else "tile"


def _resolve_embedding(embedding: Embedding | None, in_features: int, num_classes: int) -> Embedding:
    """The embedding to use: the given one (checked), or the default for these sizes (docs/design.md)."""
    if embedding is None:
        return default_embedding(in_features, num_classes)
    if embedding not in EMBEDDINGS:
        raise HeadError(f"embedding must be one of {', '.join(map(repr, EMBEDDINGS))}, got {embedding!r}")
    return embedding


def _no_autograd(x: Tensor) -> bool:
    """Whether a head output of x needs no graph: no grad mode (or no grad needed) and no trace or export."""
    tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
    return not tracing and not (torch.is_grad_enabled() and x.requires_grad)


def _normalize(x: Tensor, eps: float) -> Tensor:
    """x / (‖x‖₂ + eps) along the last dim; the norm is accumulated in fp32 at least (fp16 overflows)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc)
    return x / (norm + eps).to(x.dtype)


def _identity_blocks(tr: _Transform, rows: Tensor):
    """Yield (s, (c, len(rows)) = V[rows, s:s+c]ᵀ): the transform of identity rows in chunks of features.

    All that norms and overlaps need costs N·outputs transform outputs this way (fwht_matmul), against
    C·n entries for the class vectors themselves (n ≫ N for a tiled head of many classes).
    """
    device = tr.signs.device
    for s in range(0, tr.in_features, _CHUNK):
        c = min(_CHUNK, tr.in_features - s)
        eye = torch.zeros(c, tr.in_features, dtype=torch.float64, device=device)
        eye[torch.arange(c), torch.arange(s, s + c)] = 1.0  # rows s..s+c of the identity
        yield s, tr.score(eye, rows.to(device))


def _norms_sq(tr: _Transform, rows: Tensor) -> Tensor:
    """(len(rows),) float64 ‖V_r‖², from the transformed identity in chunks of features."""
    acc = torch.zeros(rows.numel(), dtype=torch.float64, device=tr.signs.device)
    for _, vt in _identity_blocks(tr, rows):
        acc += vt.square().sum(dim=0)
    return acc.to(rows.device)


def _rows_coherence(tr: _Transform, rows: Tensor) -> float:
    """Exact max |cos| among the class vectors of ``rows`` by the fast transform (float64; cost ~
    C·(N + outputs·log P)): the reference :meth:`HadamardHead.coherence` is tested against."""
    eye = torch.eye(tr.in_features, dtype=torch.float64, device=rows.device)
    v = tr.project(eye, rows).T  # (C, N) class vectors
    return coherence(v, chunk=_CHUNK, dots=lambda u: tr.project(u, rows))  # cosines via the fast transform


def _sampled_coherence(tr: _Transform, rows: Tensor) -> float:
    """Max |cos| over the pairs among at most _COHERENCE_SAMPLE of ``rows`` (a seeded sample when there are
    more; exact otherwise): class vectors built directly, one Gram matrix, O(min(C, 2048)²·N)."""
    if rows.numel() > _COHERENCE_SAMPLE:
        g = torch.Generator().manual_seed(0)
        rows = rows.cpu()[torch.randperm(rows.numel(), generator=g)[:_COHERENCE_SAMPLE]]
    v = tr.vectors(rows)  # (S, N)
    return coherence(v, chunk=_CHUNK)


def _frame_coherence(tr: _Transform, rows: Tensor) -> float | None:
    """The analytic coherence of a frame head with N = P (docs/design.md), or None when there is none: 0 on
    one tile (Hadamard rows), else 1/√P for a Kerdock set (every cross-tile pair has |cos| = 1/√P exactly;
    tested for P = 4 … 256) or √(2/P) for the Gold-like family (its bound, reached by most pairs)."""
    if tr.embedding != "kerdock" or tr.in_features != tr.hadamard_size:
        return None
    tiles = torch.unique(rows.cpu() // tr.hadamard_size).numel()
    return 0.0 if tiles < 2 else frame_coherence(tr.hadamard_size)


def _assign_rows(sc: Scorer, tr: _Transform, cand: Tensor, num_classes: int) -> Tensor:
    """(C,) rows of ``tr``: the candidates matched to the classes by ``sc`` (see fyc_convert.head.assign)."""
    project = tr.score
    norms = _norms_sq(tr, cand).sqrt().clamp_min(1e-30) if sc.metric is None else sc.norms(project, cand)
    return cand[match(sc.block(project, cand, norms), num_classes, cand.numel())]


def _frame_rows(sc: Scorer, in_features: int, num_classes: int, size: int, k: int, pool: list[int],
                order: list[int]) -> tuple[list[int], Tensor]:
    """Rows over the k most chosen pool tiles (``order``; more while their distinct vectors are too few,
    as when N <= P/2), with unused tiles dropped: (tiles, rows)."""
    while True:
        tiles = sorted(pool[i] for i in order[:k])
        tr = _frame_transform(in_features, size, tiles)
        cand = _candidate_rows(tr)
        if cand.numel() >= num_classes or k >= len(pool):
            break
        k += 1
    return _drop_unused(tiles, _assign_rows(sc, tr, cand, num_classes), size)


def _drop_unused(tiles: list[int], rows: Tensor, size: int) -> tuple[list[int], Tensor]:
    """(tiles, rows) over ``tiles`` -> the same vectors over only the tiles that hold a class."""
    used = torch.unique(rows // size)  # (K',) positions of the tiles that hold a class
    remap = torch.full((len(tiles),), -1, dtype=torch.int64)
    remap[used] = torch.arange(used.numel())
    return [tiles[i] for i in used.tolist()], remap[rows // size] * size + rows % size


class _FixedHead(nn.Module):
    """What both fixed heads share: ``logits = scale · raw(x) + bias`` with a learned (or fixed) α and bias."""

    head_kind: str

    def _init_sizes(self, in_features: int, num_classes: int, eps: float) -> None:
        """N, C and ε, checked: every fixed head's first step."""
        if in_features < 1 or num_classes < 1:
            raise HeadError(f"in_features and num_classes must be >= 1, got {in_features}, {num_classes}")
        self.in_features = in_features
        self.num_classes = num_classes
        self.eps = eps

    def _init_scale_bias(self, num_classes: int, *, init: float, fixed_scale: float | None, bias: bool) -> None:
        if fixed_scale is None:
            self.scale = nn.Parameter(torch.tensor(init))
        else:
            self.register_buffer("scale", torch.tensor(float(fixed_scale)))
        self.bias = nn.Parameter(torch.zeros(num_classes)) if bias else None

    def _init_adapter(self, adapter: bool | int) -> None:
        self.adapter: nn.Linear | None = None
        if adapter is not False:
            self.attach_adapter(None if adapter is True else int(adapter))

    def attach_adapter(self, input_features: int | None = None) -> _FixedHead:
        """Give the head a learned map from `input_features` (default: N, the head's own) to its N features, applied
        before it (``raw`` sees ``adapter(x)``); returns the head. It starts as the identity on the first
        min(input_features, N) features (zeros elsewhere), so a head built on zero-padded inputs computes what it
        did; fine-tuning trains it with the backbone."""
        ref, width = self.scale, self.in_features
        n_in = width if input_features is None else int(input_features)
        if n_in < 1:
            raise HeadError(f"the adapter needs at least one input feature, got {n_in}")
        linear = nn.Linear(n_in, width, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.eye(width, n_in, dtype=ref.dtype))
            linear.bias.zero_()
        self.adapter = linear
        return self

    @property
    def input_features(self) -> int:
        """The features the head takes: the adapter's input size when there is one, else N."""
        return self.in_features if self.adapter is None else int(self.adapter.in_features)

    def _adapted(self, x: Tensor) -> Tensor:
        """(..., N): the adapter's output when there is one, else x (checked against `input_features`)."""
        if x.shape[-1] != self.input_features:
            raise HeadError(f"expected inputs with {self.input_features} features, got shape {tuple(x.shape)}")
        return x if self.adapter is None else self.adapter(x)

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
    """Fixed Hadamard classifier: ``logits = scale · z[rows] + bias`` with z a fixed add/sub transform of x̂.

    tile/pad: ``z = H_m · embed_fold(x̂)``; kerdock: ``z = concat_k H_P(table[k] ⊙ pad(x̂, P))``, whose class
    vectors ``(table[k] ⊙ h_r)[:N]`` come from a frame of near-orthogonal ±1 vectors for C > N
    (:mod:`fyc_convert.head.frames`). The class vectors V (C×N, integer) are never stored: the state is the scalar
    ``scale``, ``bias`` (C,), ``rows`` (C,, int64) and ``signs`` (tile/pad: the n - N embedding signs;
    kerdock: the (K, P) sign table of the frame tiles in use, flattened). See docs/design.md.

    Args:
        in_features: N, the feature size.
        num_classes: C.
        bias: Learn a per-class bias.
        fixed_scale: Use this constant α (a buffer) instead of learning it.
        rows: (C,) output of z per class; default: the first C candidate rows (never an all-ones vector).
        hadamard_size: m, the transform size (power of two; kerdock: P >= N); default per docs/design.md.
        embedding: "tile" (seeded ±1 copies of x, distinct near-orthogonal class vectors), "pad" (zero
            padding, the reference semantics) or "kerdock" (the frame; coherence 1/√P for even log2 P,
            √(2/P) for odd, when N = P); None: the default for these sizes (docs/design.md).
        tiles: kerdock only: the frame tiles (``frames.frame_table`` indices) forming the table, in order;
            default the first ``max(rows) // P + 1`` (or as many as the default sizing needs).
        seed: Seed of the "tile" sign pattern (private generator; the global RNG is untouched).
        eps: Added to ‖x‖₂ before dividing.
        adapter: Put a learned map (nn.Linear, the identity to start with) before the head: True for N x N, an
            int n for n inputs -> N (the head then takes n features; `attach_adapter`).
    """

    head_kind = "hadamard"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        bias: bool = True,
        fixed_scale: float | None = None,
        rows: Tensor | Sequence[int] | None = None,
        hadamard_size: int | None = None,
        embedding: Embedding | None = None,
        tiles: Sequence[int] | Tensor | None = None,
        seed: int = 0,
        eps: float = 1e-8,
        adapter: bool | int = False,
    ):
        super().__init__()
        self._init_sizes(in_features, num_classes, eps)
        embedding = _resolve_embedding(embedding, in_features, num_classes)
        if tiles is not None and embedding != "kerdock":
            raise HeadError(f"tiles= applies to embedding='kerdock' only, not {embedding!r}; leave it unset")
        self.embedding = embedding
        self.seed = seed
        if rows is None and tiles is None:
            tr, cand = _layout(in_features, num_classes, hadamard_size=hadamard_size, embedding=embedding, seed=seed)
            rows_t = cand[:num_classes]
        else:
            tr = self._explicit_transform(rows, hadamard_size, tiles, num_classes)
            if rows is None:
                cand = _candidate_rows(tr)
                if cand.numel() < num_classes:
                    raise HeadError(f"{len(tiles)} tiles give {cand.numel()} candidate rows for {num_classes} "
                                    "classes; pass more tiles")
                rows_t = cand[:num_classes]
            else:
                rows_t = torch.as_tensor(rows, dtype=torch.int64).flatten()
            if rows_t.numel() != num_classes or len(set(rows_t.tolist())) != num_classes:
                raise HeadError(f"rows must hold {num_classes} distinct row indices, got {rows_t.numel()} "
                                f"({len(set(rows_t.tolist()))} distinct)")
            if int(rows_t.min()) < 0 or int(rows_t.max()) >= tr.outputs:
                what = "pass a larger hadamard_size" if embedding != "kerdock" else "pass more tiles"
                raise HeadError(f"rows must lie in [0, {tr.outputs}) for hadamard_size={tr.hadamard_size}; {what}")
        self.hadamard_size = tr.hadamard_size
        self.embed_size = tr.embed_size
        self.register_buffer("rows", rows_t.clone())
        self.register_buffer("signs", tr.signs.to(torch.get_default_dtype()))
        self._init_scale_bias(num_classes, init=_DEFAULT_LOGIT_RANGE / math.sqrt(self._mean_sq_norm()),
                              fixed_scale=fixed_scale, bias=bias)
        self._init_adapter(adapter)
        self._norm_cache: tuple[tuple[int, ...], Tensor] | None = None  # see class_vector_norms

    def _explicit_transform(self, rows: Tensor | Sequence[int] | None, hadamard_size: int | None,
                            tiles: Sequence[int] | Tensor | None, num_classes: int) -> _Transform:
        """The transform for explicit rows (and tiles): no search, only checks."""
        big_n = self.in_features
        if self.embedding != "kerdock":
            m = hadamard_size if hadamard_size is not None else next_pow2(max(big_n, num_classes))
            if not is_pow2(m):
                raise HeadError(f"hadamard_size must be a power of two, got {m}")
            return _tile_transform(big_n, m, self.embedding, self.seed)
        size = hadamard_size if hadamard_size is not None else next_pow2(big_n)
        if not is_pow2(size) or size < big_n:
            raise HeadError(f"the kerdock frame needs a power-of-two hadamard_size >= in_features={big_n}, got {size}")
        if tiles is None:
            top = int(torch.as_tensor(rows, dtype=torch.int64).max()) if len(rows) else 0
            tiles = range(top // size + 1)
        tiles = [int(t) for t in (tiles.tolist() if isinstance(tiles, Tensor) else tiles)]
        total = frame_tiles(size)
        if not tiles or len(set(tiles)) != len(tiles) or min(tiles) < 0 or max(tiles) >= total:
            raise HeadError(f"tiles must be distinct frame tiles in [0, {total}) for hadamard_size={size}, "
                            f"got {tiles[:8]}{'…' if len(tiles) > 8 else ''}")
        return _frame_transform(big_n, size, tiles)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, hadamard_size="
                f"{self.hadamard_size}, embed_size={self.embed_size}, embedding={self.embedding!r}, "
                f"bias={self.bias is not None}")

    def _transform(self) -> _Transform:
        return _Transform(self.in_features, self.embedding, self.signs, self.embed_size, self.hadamard_size)

    def _mean_sq_norm(self) -> float:
        """Mean ‖V_r‖² over all outputs: N for the frame (±1 entries); ‖F‖_F² (Parseval) for tile/pad."""
        if self.embedding == "kerdock":
            return float(self.in_features)
        i = torch.arange(self.embed_size)
        s = torch.cat([torch.ones(self.in_features, dtype=torch.float64), self.signs.double().cpu()])
        keys = (i % self.hadamard_size) * self.in_features + i % self.in_features
        _, inv = torch.unique(keys, return_inverse=True)
        f = torch.zeros(int(inv.max()) + 1, dtype=torch.float64).index_add_(0, inv, s)  # nonzeros of F
        return max(float((f * f).sum()), 1.0)

    def raw(self, x: Tensor) -> Tensor:
        """``V · x̂`` without scale and bias: (..., N) -> (..., C)."""
        x = self._adapted(x)
        tr = self._transform()
        if _no_autograd(x) and x.device.type == "cpu" and x.numel() >= _SCORE_MIN_INPUTS:  # large CPU batches
            return tr.score(_normalize(x, self.eps).reshape(-1, self.in_features), self.rows).view(
                *x.shape[:-1], self.num_classes)  # fwht_matmul: several times faster
        return tr.project(_normalize(x, self.eps), self.rows)  # (..., C)

    def block_table(self) -> np.ndarray | None:
        """The (K, P) float64 table of the block form, or None when the head has none.

        When not None: the head's raw output is ``z[rows]`` with ``z = concat_k H_P(table[k] ⊙ pad(x̂, P))``
        (length K·P; pad = zeros after the N features; H_P Sylvester in natural order), and ``rows`` lie
        in [0, K·P). Heads that have one: "kerdock" (the frame tiles' signs, P = hadamard_size) and "tile"
        heads of whole copies (N a power of two, n = m = T·N: ``H_T · S`` with S the (T, N) signs, P = N).
        """
        table = self._transform().table()
        return None if table is None else table.detach().cpu().double().numpy().copy()

    def class_vector_norms(self) -> Tensor:
        """(C,) ‖V_c‖₂ in the head's dtype and device.

        Computed once (cost ~ N·outputs·log P) and cached against the versions of ``rows`` and ``signs``, so
        loading a state_dict or editing the buffers recomputes it.
        """
        key = (self.rows.data_ptr(), self.rows._version, self.signs.data_ptr(), self.signs._version)
        if self._norm_cache is None or self._norm_cache[0] != key:
            sq = _norms_sq(self._transform().double(), self.rows)
            self._norm_cache = (key, sq.sqrt())
        return self._norm_cache[1].to(self.signs.device, self.signs.dtype)

    def class_vectors(self) -> Tensor:
        """The effective (C, N) integer-valued class matrix V (inspection and tests only)."""
        eye = torch.eye(self.in_features, dtype=self.signs.dtype, device=self.signs.device)
        return self._transform().project(eye, self.rows).T.contiguous()  # (C, N)

    def weight_overlap(self, weight: Tensor) -> tuple[float, float]:
        """(Σ_c W_c·V_c, Σ_c ‖V_c‖²) for a (C, N) weight, from the transformed identity in chunks of
        features (O(N·outputs) transform outputs; V is never whole): what `fit.fit_to_linear` needs."""
        w = weight.detach().to(self.signs.device, torch.float64)
        dot = sq = 0.0
        for s, vt in _identity_blocks(self._transform().double(), self.rows):  # (c, C) = V[:, s:s+c]ᵀ
            dot += float((vt * w[:, s : s + vt.shape[0]].T).sum())
            sq += float(vt.square().sum())
        return dot, sq

    def coherence(self) -> float:
        """Max |cos| between distinct class vectors (float64), in bounded time for any C.

        A "kerdock" head with N = P: the frame's analytic value (exactly 1/√P for a Kerdock set on two or
        more tiles, the bound √(2/P) for the Gold-like family, 0 on one tile). Otherwise exact over all pairs
        for C <= 2048 and, above that, the max over the pairs among 2048 classes drawn with a fixed seed (a
        lower bound). Cost O(min(C, 2048)²·N), never a transform of every class.
        """
        tr = self._transform().double()
        known = _frame_coherence(tr, self.rows)
        return known if known is not None else _sampled_coherence(tr, self.rows)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        features: Tensor | None = None,
        bias: bool = True,
        fixed_scale: float | None = None,
        embedding: Embedding | None = None,
        seed: int = 0,
        hadamard_size: int | None = None,
        adapter: bool | int = False,
    ) -> HadamardHead:
        """Build a head that starts as close as possible to a trained ``linear`` (class order kept).

        Size (tile/pad): by default m = n = nextpow2(max(N, C + 1)) without the fold shortcut, so there are
        about twice as many candidate rows as classes; with features and a small head, the doubled transform
        is kept when its calibrated agreement with the trained layer is clearly better (see README).
        Size (kerdock): P = nextpow2(N); rows are first matched over a pool of at least 2k frame tiles
        (k + 1 when scoring C classes against 2k tiles would pass _POOL_CELLS, about 2^29 scores, e.g. 32,768
        classes on 4,096 features), then matched again within the k = ceil((C + 1)/P) tiles most classes took
        (the least head compute; more tiles do not fine-tune better, docs/accuracy.md); a pool of k + 1 tiles
        keeps its own match, unused tiles dropped.
        Time: scoring is O(C·K·log P) for K scored vectors (K <= max(2^16, 2^29 / C), and at least the
        k + 1 tiles the classes need), the greedy match O(C·K) plus a sort of 16·C pairs, everything else
        O(N·K + min(S, 2^23 / C)·C + C·N²) — bounded for any C (issue 26; benchmarks/many_classes.py).
        Rows: each class c gets a distinct candidate row r (never an all-ones vector) maximising the summed
        score (:mod:`fyc_convert.head.assign`: Hungarian method; greedy for very large C × candidates); the score
        is the correlation over ``features`` between the trained logit ``W_c x`` and ``V_r x̂``, or
        cos(W_c, V_r) without features. Scale and bias: with ``features``, the least-squares fit of
        ``α·V x̂ + b ≈ W x + b₀``; without, α is the least-squares fit of ``α·V_rows ≈ W`` times sqrt(N)
        (features of unit RMS per entry assumed) and b = b₀.

        Args:
            linear: The trained (C, N) classifier.
            features: Optional (S, N) sample of its inputs (recommended).
            bias: Give the head a bias.
            fixed_scale: Keep α fixed at this value (the bias is still fitted when features are given).
            embedding: As in the constructor.
            seed: As in the constructor.
            hadamard_size: Force the transform size m (e.g. the constructor's fold size, for speed; kerdock: P).
            adapter: A learned map before the head: True for N x N (the identity), or a width W > N: the head is
                built on W features, from the trained layer and features zero-padded to W, and the map N -> W
                starts as that padding.

        Returns:
            A HadamardHead on the linear layer's device and dtype.
        """
        w = linear.weight.detach().to("cpu", torch.float64)  # (C, N)
        c_out, n_in = w.shape
        b0 = linear.bias.detach().to("cpu", torch.float64) if linear.bias is not None else torch.zeros(c_out)
        x = None if features is None else features.detach().to("cpu", torch.float64).reshape(-1, n_in)
        width = n_in if isinstance(adapter, bool) else int(adapter)
        if width < n_in:
            raise HeadError(f"an adapter width below the {n_in} input features ({width}) is not supported; pass "
                            f"a width >= {n_in} or adapter=True")
        if width > n_in:  # the head's own features: the trained layer and the inputs, zero-padded
            w = torch.cat([w, torch.zeros(c_out, width - n_in, dtype=w.dtype)], dim=1)
            x = None if x is None else torch.cat([x, torch.zeros(len(x), width - n_in, dtype=x.dtype)], dim=1)
            n_in = width
        embedding = _resolve_embedding(embedding, n_in, c_out)
        fit = _LinearFit(w, b0, _bounded_sample(x, c_out), scorer(w, x), bias=bias, fixed_scale=fixed_scale)
        if embedding == "kerdock":
            head = fit.frame_head(cls, hadamard_size=hadamard_size)
        else:
            head = fit.tile_head(cls, embedding=embedding, seed=seed, hadamard_size=hadamard_size)
        if adapter is not False:
            head.attach_adapter(linear.in_features)
        return head.to(linear.weight.device, linear.weight.dtype)


def _bounded_sample(x: Tensor | None, num_classes: int) -> Tensor | None:
    """A seeded subset of the features x (S, N) with S·C <= _FIT_CELLS (at least _FIT_MIN_SAMPLES): the α/b
    fit and the calibrated agreement work on (S, C) logits, so their time and memory stay bounded in C."""
    keep = max(_FIT_MIN_SAMPLES, _FIT_CELLS // num_classes)
    if x is None or x.shape[0] <= keep:
        return x
    return x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:keep]]


@dataclass
class _LinearFit:
    """What from_linear knows about the trained layer: W (C, N), b₀ (C,), features (S, N) | None (a bounded
    subset: `_bounded_sample`), the scorer (built from all of them)."""

    w: Tensor
    b0: Tensor
    x: Tensor | None
    sc: Scorer
    bias: bool
    fixed_scale: float | None

    def fitted(self, head: HadamardHead) -> HadamardHead:
        """Fit α and b of ``head`` (float64) to the trained layer, in place; returns it."""
        return fit_to_linear(head, self.w, self.b0, self.x, fixed_scale=self.fixed_scale)

    def agreement(self, head: HadamardHead) -> float:
        """Calibrated top-1 agreement of ``head`` with the trained layer on the (bounded) features."""
        assert self.x is not None
        return calibrated_agreement(head, self.x, (self.x @ self.w.T + self.b0).argmax(dim=1))

    def tile_head(self, cls: type[HadamardHead], *, embedding: Embedding, seed: int,
                  hadamard_size: int | None) -> HadamardHead:
        """tile/pad: rows matched at from_linear's size; for small heads with features, maybe the doubled size."""
        c_out, n_in = self.w.shape
        tr, cand = _layout(n_in, c_out, hadamard_size=hadamard_size, embedding=embedding, seed=seed, fold=False)
        head = self.fitted(cls(n_in, c_out, bias=self.bias, fixed_scale=self.fixed_scale,
                               rows=_assign_rows(self.sc, tr, cand, c_out), hadamard_size=tr.hadamard_size,
                               embedding=embedding, seed=seed).double())
        assert head.embed_size == tr.embed_size and torch.equal(head.signs, tr.signs)
        m = tr.hadamard_size
        if self.x is None or hadamard_size is not None or c_out * 2 * m > assign.LSA_MAX_CELLS:
            return head
        # Small heads: a doubled transform offers twice the candidate rows, often a much closer start.
        # Keep it only when the softmax-calibrated agreement with the trained layer on the features is
        # clearly better (it costs 2x head compute). Measured: see README "How the head works".
        wide = self.tile_head(cls, embedding=embedding, seed=seed, hadamard_size=2 * m)
        return wide if self.agreement(wide) > self.agreement(head) + _WIDEN_MARGIN else head

    def frame_head(self, cls: type[HadamardHead], *, hadamard_size: int | None) -> HadamardHead:
        """kerdock: match over a pool of frame tiles, keep the most chosen tiles (as few as costs nothing)."""
        c_out, n_in = self.w.shape
        size = hadamard_size if hadamard_size is not None else next_pow2(n_in)
        if not is_pow2(size) or size < n_in:
            raise HeadError(f"the kerdock frame needs a power-of-two hadamard_size >= in_features={n_in}, got {size}")
        total = frame_tiles(size)
        k_min = -(-(c_out + 1) // size)
        if k_min > total:
            raise HeadError(f"the kerdock frame of size {size} has {total * size} vectors, too few for {c_out} "
                            f"classes; pass hadamard_size={2 * size} or embedding='tile'")
        # Whole tiles: up to _POOL_CANDIDATES vectors within _POOL_CELLS scores; 2k tiles, or k + 1 when even
        # those would be over the budget (very many classes: bounded time beats the wider start).
        fits = min(_POOL_CANDIDATES, _POOL_CELLS // c_out) // size
        floor = 2 * k_min if c_out * 2 * k_min * size <= _POOL_CELLS else k_min + 1
        pool = list(range(min(total, max(floor, fits))))
        pool_tr = _frame_transform(n_in, size, pool)
        pool_cand = _candidate_rows(pool_tr)
        if pool_cand.numel() < c_out:
            raise HeadError(f"the kerdock frame of size {size} gives {pool_cand.numel()} distinct vectors on "
                            f"{n_in} features, too few for {c_out} classes; use embedding='tile'")
        first = _assign_rows(self.sc, pool_tr, pool_cand, c_out)  # (C,) rows over the pool
        counts = torch.bincount(first // size, minlength=len(pool))
        order = sorted(range(len(pool)), key=lambda i: (-int(counts[i]), i))  # most chosen tiles first
        # The k tiles most classes took. Twice as many raise the calibrated agreement a little but not the
        # fine-tuned accuracy, at twice the head compute (measured: docs/accuracy.md, "How many frame tiles").
        # A pool of k + 1 tiles (very many classes) keeps its own assignment: a second match would double the
        # swap's time for one tile in k + 1.
        if k_min >= len(pool) or floor < 2 * k_min:  # the pool's own assignment, unused tiles dropped
            tiles, rows = _drop_unused(pool, first, size)
        else:
            tiles, rows = _frame_rows(self.sc, n_in, c_out, size, k_min, pool, order)
        return self.fitted(cls(n_in, c_out, bias=self.bias, fixed_scale=self.fixed_scale, rows=rows,
                               hadamard_size=size, embedding="kerdock", tiles=tiles).double())


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
        adapter: A learned map before the head, as for `HadamardHead` (True: N x N; an int n: n inputs).
    """

    head_kind = "orthogonal"

    def __init__(self, in_features: int, num_classes: int, *, bias: bool = True, fixed_scale: float | None = None,
                 seed: int = 0, eps: float = 1e-8, adapter: bool | int = False):
        super().__init__()
        self._init_sizes(in_features, num_classes, eps)
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.int64))
        self.register_buffer("weight", _orthogonal_matrix(in_features, num_classes, seed).to(
            torch.get_default_dtype()), persistent=False)
        self._init_scale_bias(num_classes, init=_DEFAULT_LOGIT_RANGE, fixed_scale=fixed_scale, bias=bias)
        self._init_adapter(adapter)
        self.register_load_state_dict_post_hook(_rebuild_after_load)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, seed={int(self.seed)}, "
                f"bias={self.bias is not None}")

    def raw(self, x: Tensor) -> Tensor:
        """``Q · x̂`` without scale and bias: (..., N) -> (..., C)."""
        return F.linear(_normalize(self._adapted(x), self.eps), self.weight.to(x.dtype))

    def class_vector_norms(self) -> Tensor:
        """(C,) ‖Q_c‖₂."""
        return self.weight.norm(dim=1)

    def class_vectors(self) -> Tensor:
        """The (C, N) matrix Q."""
        return self.weight.clone()

    def weight_overlap(self, weight: Tensor) -> tuple[float, float]:
        """(Σ_c W_c·Q_c, Σ_c ‖Q_c‖²) for a (C, N) weight in Q's dtype: what `fit.fit_to_linear` needs."""
        q = self.weight
        return float((q * weight).sum()), float((q * q).sum())

    def coherence(self) -> float:
        """Max |cos| between distinct rows of Q (exact, chunked)."""
        return coherence(self.weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, features: Tensor | None = None, bias: bool = True,
                    fixed_scale: float | None = None, seed: int = 0, adapter: bool = False) -> OrthogonalHead:
        """Build an orthogonal head for a trained ``linear``; Q is fixed by ``seed``, α and b are fitted.

        With ``features`` (S, N): least squares ``α·Q x̂ + b ≈ W x + b₀``. Without: α = the least-squares
        fit of ``α·Q ≈ W`` times sqrt(N) and b = b₀ (as :meth:`HadamardHead.from_linear`). ``adapter``: True
        for an N x N learned map before it (the identity); the orthogonal head takes no wider one.
        """
        if not isinstance(adapter, bool):
            raise HeadError("the orthogonal head takes adapter=True (N x N) only; leave the width unset")
        w = linear.weight.detach().to("cpu", torch.float64)
        c_out, n_in = w.shape
        head = cls(n_in, c_out, bias=bias, fixed_scale=fixed_scale, seed=seed).double()
        b0 = linear.bias.detach().to("cpu", torch.float64) if linear.bias is not None else torch.zeros(c_out)
        x = None if features is None else features.detach().to("cpu", torch.float64).reshape(-1, n_in)
        fit_to_linear(head, w, b0, x, fixed_scale=fixed_scale)
        if adapter:
            head.attach_adapter()
        return head.to(linear.weight.device, linear.weight.dtype)


def adapter_width(in_features: int, num_classes: int, *, force: bool = False) -> int | None:
    """The width W of a learned N -> W map before a head on W features: min(ADAPTER_WIDEN · N, C // 4), at least N
    (the map's W·N weights stay within a quarter of the C·N it replaces). Where classes outnumber features
    ADAPTER_RATIO to 1 (fine-tuning recovers far more there; docs/accuracy.md), or always with `force`; else None."""
    if not force and num_classes < ADAPTER_RATIO * in_features:
        return None
    return max(in_features, min(ADAPTER_WIDEN * in_features, num_classes // 4))


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

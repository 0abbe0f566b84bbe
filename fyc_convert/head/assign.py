"""Row assignment for `HadamardHead.from_linear`: which fixed class vector serves which trained class.

Every score here is a cosine between a class direction a_c (N,) and a candidate class vector V_r (N,) in a
metric M (N×N): ``score(c, r) = a_c·V_r / sqrt(V_r M V_r)``, evaluated for a block of classes at once by
pushing the (classes, N) directions through the head's fast transform (no C×K·N work):

- with features x (S, N): a_c = X̂ᵀ t_c and M = X̂ᵀX̂, where X̂ are the centred unit features and t_c the
  centred, unit-norm trained logits W_c·x over the sample: score = the correlation over the sample between
  the trained logit W_c·x and the head's output V_r·x̂ (what calibration can reach with α and b);
- without features: a_c = W_c / ‖W_c‖ and M = I: score = cos(W_c, V_r).

`match` then gives each class a distinct candidate maximising the summed score: the Hungarian method
(scipy) when C × K is small enough, otherwise a greedy pass over per-class top-k lists.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from fyc_convert.head.fit import fit_lbfgs

__all__ = ["Scorer", "calibrated_agreement", "match", "scorer"]

LSA_MAX_CELLS = 4_000_000  # C × candidates above this: greedy assignment instead of the Hungarian method
SCORE_SAMPLES = 4096  # features used to score rows (a seeded subsample)
_CHUNK = 512  # classes per score block: (512, K) float32, fewer when K is large
_BLOCK_CELLS = 1 << 24  # at most this many scores per block (64 MiB of float32)
_TOP_K = 16  # candidates per class considered by the greedy pass

Project = Callable[[Tensor, Tensor], Tensor]  # (B, N) rows, (K,) candidates -> (B, K) = rows @ V[cand].T


@dataclass(frozen=True)
class Scorer:
    """Scores of classes against candidate class vectors; see the module docstring.

    Attributes:
        directions: (C, N) float32 class directions a_c (they only rank candidates: half the memory of float64).
        metric: (R, N) float64 factor of the metric, M = metricᵀ·metric (R = N or fewer), or None for M = I.
    """

    directions: Tensor
    metric: Tensor | None

    def norms(self, project: Project, cand: Tensor) -> Tensor:
        """(K,) sqrt(V_r M V_r) for the candidates (the transform of the metric's rows, column norms)."""
        if self.metric is None:
            eye = torch.eye(self.directions.shape[1], dtype=torch.float64)
            base = eye
        else:
            base = self.metric
        sq = torch.zeros(cand.numel(), dtype=torch.float64)
        for s in range(0, base.shape[0], _CHUNK):
            sq += project(base[s : s + _CHUNK], cand).square().sum(dim=0)  # (chunk, K) -> (K,)
        return sq.sqrt().clamp_min(1e-30)

    def block(self, project: Project, cand: Tensor, norms: Tensor) -> Callable[[Tensor], Tensor]:
        """score_fn(idx) -> (len(idx), K) float32 scores of the classes idx against the candidates.

        The transform and the scores are float32 (half the memory traffic; the scores only rank candidates).
        """
        directions, inv = self.directions.float(), 1 / norms.float()
        return lambda idx: project(directions[idx], cand).mul_(inv)


def scorer(weight: Tensor, features: Tensor | None, *, eps: float = 1e-8) -> Scorer:
    """The scorer for a trained (C, N) weight, by correlation over features (S, N) or by cosine without.

    Args:
        weight: (C, N) trained classifier weight.
        features: (S, N) classifier inputs, or None. At most SCORE_SAMPLES of them are used (seeded subset).
        eps: the head's normalisation epsilon (x̂ = x / (‖x‖ + eps)).
    """
    w = weight.detach().to("cpu", torch.float64)
    if features is None:
        return Scorer((w / w.norm(dim=1, keepdim=True).clamp_min(1e-30)).float(), None)
    x = features.detach().to("cpu", torch.float64).reshape(-1, w.shape[1])
    sample = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:SCORE_SAMPLES]]
    xc = sample - sample.mean(dim=0)  # (S, N): the centred logits are t = xc·Wᵀ
    xh = sample / (sample.norm(dim=1, keepdim=True) + eps)  # (S, N) the head's input
    xh = xh - xh.mean(dim=0)
    r = torch.linalg.qr(xh, mode="r").R  # (min(S, N), N): ‖xh·v‖ = ‖R·v‖ for every v
    return Scorer(_directions(w, xc, xh), r)


def _directions(w: Tensor, xc: Tensor, xh: Tensor) -> Tensor:
    """(C, N) float32 a_c = xhᵀ t_c with t_c = xc·w_c / ‖xc·w_c‖ (unit-norm centred logits over the sample).

    Never forms the (S, C) logits when S >= N: a_c = (xcᵀ xh)ᵀ w_c / ‖R_c w_c‖ (R_c from the QR of xc),
    O(C·N²); otherwise through t, O(S·C·N). The C-sized products run in float32 (the scores only rank).
    """
    w32 = w.float()
    if xc.shape[0] >= xc.shape[1]:
        g = (xc.T @ xh).float()  # (N, N)
        rc = torch.linalg.qr(xc, mode="r").R.float()  # (N, N): ‖xc·v‖ = ‖R_c·v‖
        norms = (w32 @ rc.T).norm(dim=1, keepdim=True).clamp_min(1e-30)  # (C, 1); its (C, N) product freed
        return (w32 @ g).div_(norms)
    t = xc.float() @ w32.T  # (S, C) centred trained logits, normalised per class
    t = t / t.norm(dim=0).clamp_min(1e-30)
    return t.T @ xh.float()  # (C, N): t_cᵀ (xh·V_r) = (xhᵀ t_c)·V_r


def match(score_fn: Callable[[Tensor], Tensor], num_classes: int, num_cand: int, *,
          max_cells: int | None = None) -> Tensor:
    """Give each class a distinct candidate, maximising the summed score. Returns (C,) candidate indices.

    ``score_fn(idx)`` gives the (len(idx), K) float score block for the classes ``idx``. Exact Hungarian
    method when C·K <= max_cells (default LSA_MAX_CELLS); otherwise greedy over per-class top-k lists (best pairs
    first), repeated
    for the classes left over with the taken candidates masked out.
    """
    if num_cand < num_classes:
        raise ValueError(f"match: {num_classes} classes need at least as many candidates, got {num_cand}")
    classes = torch.arange(num_classes)
    chunk = max(1, min(_CHUNK, _BLOCK_CELLS // num_cand))
    if num_classes * num_cand <= (LSA_MAX_CELLS if max_cells is None else max_cells):
        cos = torch.cat([score_fn(classes[s : s + chunk]) for s in range(0, num_classes, chunk)])
        cls, cand = linear_sum_assignment(cos.double().numpy(), maximize=True)
        out = np.empty(num_classes, dtype=np.int64)
        out[cls] = cand
        return torch.from_numpy(out)
    out = np.full(num_classes, -1, dtype=np.int64)
    taken = torch.zeros(num_cand, dtype=torch.bool)
    k = min(_TOP_K, num_cand)
    while (out < 0).any():
        todo = torch.from_numpy(np.flatnonzero(out < 0))
        vals, cands = [], []
        for s in range(0, todo.numel(), chunk):
            cos = score_fn(todo[s : s + chunk]).masked_fill_(taken, -math.inf)  # (chunk, K)
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


def calibrated_agreement(head: torch.nn.Module, x: Tensor, target: Tensor, *, iters: int = 30) -> float:
    """Top-1 agreement of a fixed head with `target` (S,) on features x (S, N) after fitting α and b.

    The fit is softmax cross-entropy by L-BFGS, as calibration will do it, so two candidate layouts can be
    compared by what calibration can reach from them. A fixed α (a buffer) or a missing bias stays as it is.
    """
    with torch.no_grad():
        raw = head.raw(x.to(head.scale.dtype)).double()  # (S, C)
    alpha = torch.tensor(float(head.scale.detach()), dtype=torch.float64,
                         requires_grad=isinstance(head.scale, torch.nn.Parameter))  # fixed_scale: a buffer
    b = (head.bias.detach().double().clone() if head.bias is not None
         else torch.zeros(raw.shape[1], dtype=torch.float64))
    b.requires_grad_(head.bias is not None)
    params = [p for p in (alpha, b) if p.requires_grad]
    fit_lbfgs(params, lambda: torch.nn.functional.cross_entropy(alpha * raw + b, target), max_iter=iters)
    with torch.no_grad():
        return float(((alpha * raw + b).argmax(dim=1) == target).double().mean())

"""The α/bias fits of a fixed head, each in one place.

- `fit_to_linear`: the closed-form start from a trained nn.Linear, used by both heads' `from_linear`
  (least squares of ``α·raw(x̂) + b ≈ W x + b₀`` on features, `least_squares_scale_bias`; without features
  α from the class vectors' overlap with W).
- `fit_lbfgs`: a few parameters, a smooth convex loss over cached head outputs, L-BFGS. Used by
  `finetune.calibrate` (the head's α and bias against the labels or the teacher, sharded over the ranks under
  torch.distributed) and `assign.calibrated_agreement` (what calibration can reach from a candidate layout).
  One closure, so the two agree on what "fitting α and b" means.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

__all__ = ["fit_lbfgs", "fit_to_linear", "least_squares_scale_bias"]


class FixedHead(Protocol):
    """What `fit_to_linear` uses of a HadamardHead / OrthogonalHead."""

    in_features: int
    scale: Tensor
    bias: Tensor | None

    def raw(self, x: Tensor) -> Tensor: ...

    def weight_overlap(self, weight: Tensor) -> tuple[float, float]: ...


Head = TypeVar("Head", bound=FixedHead)


def least_squares_scale_bias(raw: Tensor, target: Tensor, *, bias: bool,
                             fixed_scale: float | None) -> tuple[float, Tensor | None]:
    """Least squares for α (and per-class b) in ``α·raw + b ≈ target``; raw, target (S, C) float64.

    Returns:
        (α, b): α = `fixed_scale` when given; b (C,) or None without `bias`.
    """
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


def fit_to_linear(head: Head, weight: Tensor, bias0: Tensor, features: Tensor | None, *,
                  fixed_scale: float | None) -> Head:
    """Set a fixed head's α and b, in place, to start as close as possible to a trained Linear; returns the head.

    With features x (S, N): ``least_squares_scale_bias(head.raw(x), x Wᵀ + b₀)``. Without: α is the least-squares
    fit of ``α·V ≈ W`` (from ``head.weight_overlap(W)``) times sqrt(N), features of unit RMS per entry assumed,
    and b = b₀. A head without a bias keeps none; `fixed_scale`, when given, is α.

    Args:
        head: a float64 HadamardHead or OrthogonalHead (anything with `raw`, `weight_overlap`, `scale`, `bias`).
        weight: (C, N) float64 trained weight W.
        bias0: (C,) float64 trained bias b₀ (zeros for a Linear without one).
        features: (S, N) float64 sample of the Linear's inputs, or None.
        fixed_scale: the head's constant α, or None to fit it.
    """
    bias = head.bias is not None
    with torch.no_grad():
        if features is not None:
            alpha, b = least_squares_scale_bias(head.raw(features), features @ weight.T + bias0, bias=bias,
                                                fixed_scale=fixed_scale)
        else:
            dots, norms_sq = head.weight_overlap(weight)
            alpha = float(fixed_scale) if fixed_scale is not None else dots / norms_sq * math.sqrt(head.in_features)
            b = bias0 if bias else None
        head.scale.fill_(alpha)
        if b is not None:
            head.bias.copy_(b)
    return head


def fit_lbfgs(params: Sequence[Tensor], objective: Callable[[], Tensor], *, max_iter: int,
              all_reduce: Callable[[Tensor], None] | None = None, **lbfgs: Any) -> tuple[float, float]:
    """Minimise `objective()` over `params` with strong-Wolfe L-BFGS; returns the loss (before, after).

    Args:
        params: the tensors to fit (requires_grad); none: the loss is only evaluated.
        objective: the loss as a 0-d tensor (each rank's share of it under torch.distributed).
        max_iter: L-BFGS iterations.
        all_reduce: sums a flat tensor over the ranks in place; given, every rank's loss and gradients are
            summed before each step, so all ranks take the same steps.
        **lbfgs: further `torch.optim.LBFGS` settings (lr, history_size, tolerance_grad, tolerance_change).
    """
    params = list(params)

    def closure() -> Tensor:
        for p in params:
            p.grad = None
        with torch.enable_grad():  # callers may be inside no_grad (LBFGS.step itself is)
            loss = objective()
            if params:
                loss.backward()
        if all_reduce is None:
            return loss.detach()
        flat = torch.cat([loss.detach().reshape(1)] + [p.grad.reshape(-1) for p in params])
        all_reduce(flat)
        offset = 1
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        return flat[0]

    before = float(closure())
    if params:
        torch.optim.LBFGS(params, max_iter=max_iter, line_search_fn="strong_wolfe", **lbfgs).step(closure)
    after = float(closure())
    for p in params:
        p.grad = None
    return before, after

"""The α/bias fit: a few parameters, a smooth convex loss over cached head outputs, L-BFGS.

Used by `finetune.calibrate` (the head's α and bias against the labels or the teacher, sharded over the
ranks under torch.distributed) and `assign.calibrated_agreement` (what calibration can reach from a candidate
layout). One closure, so the two agree on what "fitting α and b" means.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["fit_lbfgs"]


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

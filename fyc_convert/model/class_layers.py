"""Which Linear layers produce class logits for a model's output in eval mode, judged by gradients.

A layer *produces classes* when its output is C wide and reaches the logits class by class: the gradient of
logit j with respect to the layer's output is non-zero in slot j of the class axis and zero in every other slot.
Reductions over tokens (max, mean), scaling, additions and pass-through layers keep that diagonal structure, so
an auxiliary per-token classifier whose max-reduced logits are added to the main head's is found; a hidden layer
that happens to be C wide is not (what follows it mixes the classes), and neither is a head that does not run in
eval (a training-only auxiliary head: no output, no gradient).

Every candidate's output is replaced, during the one probing pass, by a detached leaf, so a layer is judged by
its own path to the logits, not through another candidate downstream. The reference is the definition above,
checked at three probe classes (the first, the middle, the last).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn


def class_producing(model: nn.Module, x: Tensor, candidates: Sequence[nn.Linear], *, num_classes: int,
                    logits_of: Callable[[Any], Tensor]) -> list[nn.Linear]:
    """The `candidates` whose C-wide output reaches the logits class by class (see the module docstring).

    Args:
        model: The model; run once in whatever mode it is in (the caller puts it in eval mode).
        x: A batch of inputs.
        candidates: The Linear layers to judge.
        num_classes: C.
        logits_of: Picks the (B, C) logits out of the model's output.

    Returns:
        The candidates that produce classes, in the order given; [] when the logits are not C wide.
    """
    leaves: dict[nn.Module, list[Tensor]] = {}

    def hook(module: nn.Module, _args: Any, out: Any) -> Tensor | None:
        if not isinstance(out, Tensor) or not out.is_floating_point() or out.shape[-1] != num_classes:
            return None
        leaf = out.detach().requires_grad_()
        leaves.setdefault(module, []).append(leaf)
        return leaf

    handles = [m.register_forward_hook(hook) for m in candidates if m.out_features == num_classes]
    try:
        with torch.enable_grad():
            logits = logits_of(model(x))
    except Exception:  # noqa: BLE001 - e.g. an in-place op on a leaf; then the exported file's scan decides
        return []
    finally:
        for h in handles:
            h.remove()
    if logits.shape[-1] != num_classes or not logits.requires_grad or not leaves:
        return []
    modules = list(leaves)
    flat = [leaf for m in modules for leaf in leaves[m]]
    on = dict.fromkeys(modules, False)
    off = dict.fromkeys(modules, False)
    for j in sorted({0, num_classes // 2, num_classes - 1}):
        with torch.enable_grad():
            grads = torch.autograd.grad(logits[..., j].sum(), flat, retain_graph=True, allow_unused=True)
        per_leaf = iter(grads)
        for m in modules:
            for _ in leaves[m]:
                g = next(per_leaf)
                if g is None:
                    continue
                slots = g.detach().abs().reshape(-1, num_classes).sum(0)  # (C,) how much each class slot counts
                on[m] |= bool(slots[j] > 0)
                off[m] |= bool(torch.cat([slots[:j], slots[j + 1:]]).sum() > 0)
    return [m for m in candidates if on.get(m, False) and not off.get(m, True)]

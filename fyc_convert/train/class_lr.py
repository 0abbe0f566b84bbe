"""Per-class, per-weight learning rates learned by analytical continuation, as a fine-tuning optimizer.

Method: "Per-weight class-based learning rates via analytical continuation" (sections 3 and 4). Every weight w
of the chosen layers gets a vector μ_w of one learning-rate factor per class; the label of each sample picks the
factor that scales that sample's share of the update. For a mini-batch of B samples with batch loss
L = (1/B) Σ_i ℓ_i (the mean of the per-sample losses), C classes, learning rate lr:

    g_j   = ∂/∂w (1/B) Σ_{i: y_i = j} ℓ_i            per-class gradient; Σ_j g_j = ∂L/∂w
    w    ← w − lr · Σ_j μ_w[j] · g_j                 with the μ of the previous step
    μ_w[j] ← μ_w[j] + eta_mu · lr · g_j²              μ increment "class_grad_sq" (default), or
    μ_w[j] ← μ_w[j] + eta_mu · lr · Σ_{i: y_i = j} (∂ℓ_i/∂w / B)²      "sample_grad_sq"

Every other trainable parameter gets plain SGD, w ← w − lr · ∂L/∂w (same lr, no momentum). μ starts at 1, is
reset to 1 at every half epoch, and from `cutoff_epoch` on all parameters get plain SGD and μ is freed. With
eta_mu = 0 (μ ≡ 1) the update is plain SGD up to float rounding; with cutoff_epoch = 0 it is exactly plain SGD.

Chosen layers are nn.Linear modules (the paper's "fully connected layers"): by default every nn.Linear below the
top one (the last nn.Linear is left out when it outputs num_classes logits), the bottom 16 of them.

Per-class gradients cost one ordinary backward: a Linear layer's weight gradient is δᵀx (δ = ∂L/∂output,
x = input) and classes partition the batch, so g_j = δ_jᵀ x_j over the rows of class j, from a forward hook on
the input and a tensor hook on the output: several times cheaper than one backward per class or per-sample
gradients from torch.func (measured by benchmarks/class_lr.py; numbers in the README). What remains is the μ arithmetic
(two passes over C x weights per step), which no gradient method avoids.

The μ increment: "class_grad_sq" (default) adds g_j², Eq. 5-6 applied to the class-j part of the batch loss;
"sample_grad_sq" adds Σ_{i: y_i = j} (∂ℓ_i/∂w / B)² (Eq. 6 per sample, at the per-sample step lr / B). They agree
when a class has one sample in the batch; otherwise g_j² is between 0 (per-sample gradients cancel) and n_j times
the summed squares (all aligned). On the Optical MLP both forms gave the same test accuracy (benchmarks/class_lr.py;
README), so g_j² is the default: no worse, and cheaper (no extra matmul per class, no (n, O, I) per-sample tensor
for sequence inputs).

μ costs num_classes × (weights of the chosen layers) floats. The constructor refuses, before allocating, when that
exceeds `memory_budget_bytes` (default: half the free memory of the parameters' device) and names the layers to
restrict to.

The training loop needs ONE call per mini-batch; it zeroes the gradients, runs the backward pass, updates every
parameter and counts steps (epoch = steps / steps_per_epoch drives the resets and the cutoff):

    opt = build_class_lr(model, num_classes=C, lr=0.01, eta_mu=1e4, cutoff_epoch=10, layers=None,
                         steps_per_epoch=len(loader))
    for x, y in loader:
        per_sample_loss = F.cross_entropy(model(x), y, reduction="none")   # (B,)
        opt.backward_and_step(per_sample_loss, y)

`state_dict()` / `load_state_dict()` carry μ and the step count, so a resumed run continues the schedule;
learning-rate schedulers may change `param_groups[k]["lr"]` (they see the step: backward_and_step calls step()).
CLI options: --class-lr-eta-mu -> eta_mu, --class-lr-cutoff -> cutoff_epoch, --class-lr-layers (comma-separated
dotted module names) -> layers. The paper uses eta_mu = 1e5 for SELU and tanh, 1e4 for ReLU (÷10 when training
diverges) and a cutoff of 10, 20 or 30 epochs chosen on validation.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fyc_convert.errors import ClassLRError

MuIncrement = Literal["class_grad_sq", "sample_grad_sq"]

MAX_LAYERS = 16  # the paper gives per-class rates to the bottom 16 fully connected layers at most
DEFAULT_MEMORY_FRACTION = 0.5  # default μ budget: this fraction of the device's free memory


def default_class_lr_layers(model: nn.Module, *, num_classes: int, max_layers: int = MAX_LAYERS) -> list[str]:
    """The paper's choice: the trainable nn.Linear layers below the top one, bottom `max_layers` of them.

    Args:
        model: The network.
        num_classes: Number of classes; the last nn.Linear is the top layer when it has this many outputs.
        max_layers: Keep at most this many, from the input side.

    Returns:
        Dotted module names, in module order (empty when there is none).
    """
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears and linears[-1][1].out_features == num_classes:
        linears = linears[:-1]
    return [name for name, m in linears if m.weight.requires_grad][:max_layers]


def mu_nbytes(layers: dict[str, nn.Linear], *, num_classes: int) -> int:
    """Bytes of μ for these layers: num_classes × (weights + biases) × element size."""
    return num_classes * sum(p.numel() * p.element_size() for m in layers.values() for p in _layer_params(m))


def available_bytes(device: torch.device) -> int:
    """Free memory on `device`: CUDA's free memory, else the host's MemAvailable (or free pages)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _layer_params(m: nn.Linear) -> list[Tensor]:
    return [m.weight] if m.bias is None else [m.weight, m.bias]


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


class ClassLR(torch.optim.Optimizer):
    """SGD with per-class, per-weight learning rates on chosen nn.Linear layers (see the module docstring).

    Args:
        model: The network; forward hooks are put on the chosen layers (removed at the cutoff).
        num_classes: Number of classes C (labels must lie in [0, C)).
        lr: Global learning rate, for every parameter.
        eta_mu: Learning rate of μ (the paper: 1e5 for SELU/tanh, 1e4 for ReLU).
        cutoff_epoch: From this epoch (a float) on, plain SGD for all parameters; 0 means plain SGD throughout.
        steps_per_epoch: Mini-batches per epoch; sets the half-epoch resets and the cutoff.
        layers: Dotted names of the nn.Linear modules that get per-class rates; None: `default_class_lr_layers`.
        memory_budget_bytes: Most bytes μ may take; None: half the free memory of the parameters' device.
        mu_increment: "class_grad_sq" (g_j², default) or "sample_grad_sq" (summed per-sample squares).

    Raises:
        ClassLRError: A bad option, an unknown or non-Linear layer, or μ over the memory budget.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_classes: int,
        lr: float,
        eta_mu: float,
        cutoff_epoch: float,
        steps_per_epoch: int,
        layers: list[str] | None = None,
        memory_budget_bytes: int | None = None,
        mu_increment: MuIncrement = "class_grad_sq",
    ):
        if num_classes < 1 or steps_per_epoch < 1:
            raise ClassLRError(f"num_classes ({num_classes}) and steps_per_epoch ({steps_per_epoch}) must be >= 1")
        if not lr > 0 or not eta_mu >= 0 or not cutoff_epoch >= 0:
            raise ClassLRError(f"need lr > 0, eta_mu >= 0, cutoff_epoch >= 0; got {lr}, {eta_mu}, {cutoff_epoch}")
        if mu_increment not in ("class_grad_sq", "sample_grad_sq"):
            raise ClassLRError(f"mu_increment must be 'class_grad_sq' or 'sample_grad_sq', not {mu_increment!r}")
        chosen = _resolve_layers(model, num_classes=num_classes, layers=layers)
        class_params = [p for m in chosen.values() for p in _layer_params(m)]
        ids = {id(p) for p in class_params}
        plain = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        groups: list[dict[str, Any]] = [{"params": class_params, "class_lr": True}]
        if plain:
            groups.append({"params": plain, "class_lr": False})
        super().__init__(groups, {"lr": lr, "eta_mu": eta_mu})

        self.num_classes = num_classes
        self.cutoff_epoch = float(cutoff_epoch)
        self.steps_per_epoch = steps_per_epoch
        self.mu_increment: MuIncrement = mu_increment
        self.steps_done = 0
        self._layers = chosen
        self._captures: dict[str, list[list[Tensor | None]]] = {name: [] for name in chosen}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._in_backward = False
        self._pending_labels: Tensor | None = None
        if self.cutoff_epoch > 0:
            _check_budget(chosen, num_classes=num_classes, budget=memory_budget_bytes)
            for name, m in chosen.items():
                self._hooks.append(m.register_forward_hook(self._capture_hook(name)))
                for p in _layer_params(m):
                    self.state[p]["mu"] = torch.ones((num_classes, *p.shape), dtype=p.dtype, device=p.device)

    @property
    def layer_names(self) -> list[str]:
        """Dotted names of the layers with per-class rates."""
        return list(self._layers)

    @property
    def epoch(self) -> float:
        """Epochs done so far (steps / steps_per_epoch)."""
        return self.steps_done / self.steps_per_epoch

    @property
    def class_lr_active(self) -> bool:
        """Whether the next step uses per-class rates (False from the cutoff on)."""
        return self.epoch < self.cutoff_epoch

    def backward_and_step(self, per_sample_loss: Tensor, labels: Tensor) -> None:
        """Backward pass of the mean loss and one update of every parameter (the only call a loop needs).

        Args:
            per_sample_loss: (B,) losses of the mini-batch, still attached to the graph.
            labels: (B,) integer class labels in [0, num_classes).

        Raises:
            ClassLRError: Shapes or labels do not fit, a chosen layer ran more than once in the forward pass, or
                the run is distributed over several processes (per-class gradients are not all-reduced).
        """
        if per_sample_loss.dim() != 1 or labels.shape != per_sample_loss.shape:
            raise ClassLRError(
                f"backward_and_step needs per-sample losses (B,) and labels (B,); got {tuple(per_sample_loss.shape)}"
                f" and {tuple(labels.shape)} (use reduction='none')"
            )
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise ClassLRError("per-class learning rates run in a single process only; train on one device")
        if self.class_lr_active:
            lo, hi = (int(labels.min()), int(labels.max())) if labels.numel() else (0, 0)
            if lo < 0 or hi >= self.num_classes:
                raise ClassLRError(f"labels must lie in [0, {self.num_classes}); got {lo}..{hi}")
        else:
            self._release()
        self.zero_grad(set_to_none=True)
        self._in_backward = True  # the output hooks record δ only during this backward pass
        try:
            per_sample_loss.mean().backward()
        finally:
            self._in_backward = False
        self._pending_labels = labels
        try:
            self.step()  # through step(), so lr schedulers see the optimizer step
        finally:
            self._pending_labels = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """The update after the backward pass; called by `backward_and_step`, not by the training loop."""
        labels = self._pending_labels
        if labels is None:
            raise ClassLRError("ClassLR needs the labels: call backward_and_step(per_sample_loss, labels), not step()")
        active = self.class_lr_active
        s = self.steps_done
        if active and s > 0 and self._half_epoch(s) != self._half_epoch(s - 1):
            for state in self.state.values():
                state["mu"].fill_(1.0)  # half-epoch reset, before this step's update
        captures = self._take_captures()
        for group in self.param_groups:
            if active and group["class_lr"]:
                self._class_lr_update(captures, labels, lr=group["lr"], eta_mu=group["eta_mu"])
            else:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-group["lr"])
        self.steps_done += 1

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state (μ per parameter, groups) plus the step count."""
        sd = super().state_dict()
        sd["steps_done"] = self.steps_done
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore μ, the groups and the step count saved by `state_dict()`."""
        state_dict = dict(state_dict)
        self.steps_done = int(state_dict.pop("steps_done"))
        super().load_state_dict(state_dict)
        if not self.class_lr_active:
            self._release()

    def _half_epoch(self, step: int) -> int:
        return (2 * step) // self.steps_per_epoch

    def _release(self) -> None:
        """After the cutoff: drop the hooks and free μ."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.state.clear()
        self._captures = {name: [] for name in self._layers}

    def _capture_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if not (torch.is_grad_enabled() and output.requires_grad):
                return
            record: list[Tensor | None] = [inputs[0].detach(), None]  # [x (B, *, I), δ (B, *, O)]
            self._captures[name].append(record)
            output.register_hook(lambda grad: record.__setitem__(1, grad) if self._in_backward else None)

        return hook

    def _take_captures(self) -> dict[str, tuple[Tensor, Tensor]]:
        """(x, δ) per chosen layer from this backward pass; forward passes without a backward are dropped."""
        out = {}
        for name, records in self._captures.items():
            used = [(x, d) for x, d in records if d is not None]
            if len(used) > 1:
                raise ClassLRError(
                    f"layer {name!r} ran {len(used)} times in one forward pass; per-class rates need each chosen layer"
                    " to run once: leave it out of --class-lr-layers"
                )
            if used:
                out[name] = used[0]
        self._captures = {name: [] for name in self._layers}
        return out

    def _class_lr_update(self, captures: dict[str, tuple[Tensor, Tensor]], labels: Tensor, *, lr: float,
                         eta_mu: float) -> None:
        labels = labels.to(next(iter(self._layers.values())).weight.device)
        order = torch.argsort(labels)  # rows grouped by class
        counts = torch.bincount(labels, minlength=self.num_classes).tolist()
        present = [(j, n) for j, n in enumerate(counts) if n > 0]
        per_sample = self.mu_increment == "sample_grad_sq"
        for name, m in self._layers.items():
            if name not in captures:  # layer not in this loss's graph: nothing to update
                continue
            x, d = captures[name]
            xs, ds = x.index_select(0, order), d.index_select(0, order)  # (B, *, I), (B, *, O)
            params = _layer_params(m)
            steps = [torch.zeros_like(p) for p in params]
            start = 0
            for j, n in present:
                xj, dj = xs[start:start + n], ds[start:start + n]
                start += n
                grads = _class_grads(xj, dj, bias=m.bias is not None)
                squares = _sample_grad_squares(xj, dj, bias=m.bias is not None) if per_sample else None
                for k, (p, g) in enumerate(zip(params, grads)):
                    mu = self.state[p]["mu"][j]  # (*p.shape)
                    steps[k].addcmul_(mu, g)
                    if per_sample:
                        mu.add_(squares[k], alpha=eta_mu * lr)
                    else:
                        mu.addcmul_(g, g, value=eta_mu * lr)
            for p, s in zip(params, steps):
                p.sub_(s, alpha=lr)


def _class_grads(x: Tensor, d: Tensor, *, bias: bool) -> list[Tensor]:
    """Gradient of a Linear layer's weight (O, I) [and bias (O,)] from its inputs x (n, *, I), δ (n, *, O)."""
    x2, d2 = x.reshape(-1, x.shape[-1]), d.reshape(-1, d.shape[-1])
    grads = [d2.t() @ x2]
    if bias:
        grads.append(d2.sum(0))
    return grads


def _sample_grad_squares(x: Tensor, d: Tensor, *, bias: bool) -> list[Tensor]:
    """Σ over the n samples of the squared per-sample gradients, weight (O, I) [and bias (O,)]."""
    if x.dim() == 2:  # (δ_i x_iᵀ)² = δ_i² (x_i²)ᵀ: one matmul, no (n, O, I) tensor
        squares = [d.square().t() @ x.square()]
    else:
        x3, d3 = x.reshape(x.shape[0], -1, x.shape[-1]), d.reshape(d.shape[0], -1, d.shape[-1])
        squares = [torch.einsum("nto,nti->noi", d3, x3).square().sum(0)]
    if bias:
        squares.append(d.reshape(d.shape[0], -1, d.shape[-1]).sum(1).square().sum(0))
    return squares


def _resolve_layers(model: nn.Module, *, num_classes: int, layers: list[str] | None) -> dict[str, nn.Linear]:
    modules = dict(model.named_modules())
    linear_names = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    if layers is None:
        names = default_class_lr_layers(model, num_classes=num_classes)
        if not names:
            raise ClassLRError(
                "the model has no trainable nn.Linear layer below the top one for per-class learning rates;"
                " name layers with --class-lr-layers or use plain SGD"
            )
    else:
        names = list(dict.fromkeys(n.strip() for n in layers if n.strip()))
        if not names:
            raise ClassLRError("--class-lr-layers is empty; give comma-separated nn.Linear names or leave it out")
    candidates = ", ".join(linear_names[:20]) + (" …" if len(linear_names) > 20 else "") or "none"
    chosen: dict[str, nn.Linear] = {}
    for name in names:
        m = modules.get(name)
        if not isinstance(m, nn.Linear):
            what = "no module" if m is None else f"a {type(m).__name__}, not an nn.Linear"
            raise ClassLRError(f"class-lr layer {name!r} is {what}; nn.Linear layers: {candidates}")
        if not m.weight.requires_grad:
            raise ClassLRError(f"class-lr layer {name!r} is frozen (requires_grad=False); choose a trainable one")
        chosen[name] = m
    return chosen


def _check_budget(layers: dict[str, nn.Linear], *, num_classes: int, budget: int | None) -> None:
    """Raise before allocating μ when it would exceed the budget; suggest the bottom layers that fit."""
    if budget is None:
        device = next(iter(layers.values())).weight.device
        budget = int(DEFAULT_MEMORY_FRACTION * available_bytes(device))
    need = mu_nbytes(layers, num_classes=num_classes)
    if need <= budget:
        return
    sizes = {n: mu_nbytes({n: m}, num_classes=num_classes) for n, m in layers.items()}
    fit, total = [], 0
    for name, size in sizes.items():
        if total + size > budget:
            break
        fit.append(name)
        total += size
    listed = ", ".join(f"{n} ({_mb(s)})" for n, s in sizes.items())
    advice = (
        f"restrict --class-lr-layers to {','.join(fit)!r} ({_mb(total)})" if fit
        else f"even the smallest layer needs {_mb(min(sizes.values()))}"
    )
    raise ClassLRError(
        f"μ for per-class learning rates needs {_mb(need)} ({num_classes} classes × weights of {listed}),"
        f" over the {_mb(budget)} budget; {advice} or raise the memory budget"
    )


def build_class_lr(
    model: nn.Module,
    *,
    num_classes: int,
    lr: float,
    eta_mu: float,
    cutoff_epoch: float,
    layers: list[str] | None,
    steps_per_epoch: int,
    memory_budget_bytes: int | None = None,
    mu_increment: MuIncrement = "class_grad_sq",
) -> ClassLR:
    """The per-class learning-rate optimizer for `model` (what `--optimizer class-lr` builds).

    Args:
        model: The network to train.
        num_classes: Number of classes.
        lr: Learning rate of every parameter.
        eta_mu: Learning rate of μ (--class-lr-eta-mu).
        cutoff_epoch: Plain SGD from this epoch on (--class-lr-cutoff).
        layers: nn.Linear names with per-class rates (--class-lr-layers split on commas); None: the default.
        steps_per_epoch: Mini-batches per epoch.
        memory_budget_bytes: Most bytes μ may take; None: half the free memory.
        mu_increment: "class_grad_sq" (default) or "sample_grad_sq".

    Returns:
        The optimizer; call `backward_and_step(per_sample_loss, labels)` once per mini-batch.

    Raises:
        ClassLRError: Bad options or layers, or μ over the memory budget (raised before allocating).
    """
    return ClassLR(
        model,
        num_classes=num_classes,
        lr=lr,
        eta_mu=eta_mu,
        cutoff_epoch=cutoff_epoch,
        steps_per_epoch=steps_per_epoch,
        layers=layers,
        memory_budget_bytes=memory_budget_bytes,
        mu_increment=mu_increment,
    )

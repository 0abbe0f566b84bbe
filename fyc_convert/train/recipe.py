"""Training defaults that adapt to the head: what to do when the user gave no training flags.

A fixed head replacing a small classifier (a few classes, a small share of the parameters) starts close to the
trained one: plain SGD recovers it in an epoch or two. Replacing a many-class classifier (C > N, or most of
the parameters) moves every class vector, and the backbone has to follow: AdamW with distillation from the
original model does that several times faster (benchmarks/accuracy.py measures both; numbers in the README).
Every choice is overridable by its flag; `choose` says what it chose and why, and `plan` returns the whole
config the loop runs with. `plan` is the one place a training default is decided: the pipeline, the library's
`finetune()` (given None fields) and benchmarks/accuracy.py all call it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from fyc_convert.data.datasets import DataBundle
from fyc_convert.options import FinetuneConfig

MANY_SHARE = 0.25  # a classifier holding at least this share of the parameters counts as many-class
LARGE_DATA = 10_000  # training samples from which batches of 128 are used
AUTO_MAX_EPOCHS = 10  # the budget of --epochs auto
SLOW_RATIO = 16  # from this many classes per feature the fixed head learns slowly: the budget is SLOW_MAX_EPOCHS
SLOW_MAX_EPOCHS = 30  # (large glyph sample, 33 classes per feature: still rising at 10 epochs; docs/accuracy.md)
AUTO_PATIENCE = 2  # epochs without a better validation accuracy before --epochs auto stops ...
SLOW_PATIENCE = 5  # ... with the slow budget (a 2-epoch dip there stopped a run 12 epochs early; docs/accuracy.md)
FIXED_EPOCHS = 3  # epochs without a validation split (nothing to stop on)
CLASS_LR_LR = 1e-2  # class-lr's base learning rate (its per-class factors scale it)
CLASS_LR_ETA_MU = 1e4  # class-lr: learning rate of the per-class factors μ
CLASS_LR_CUTOFF = 10  # class-lr: epoch from which plain gradients return

Config = TypeVar("Config", bound=FinetuneConfig)


@dataclass(frozen=True)
class Facts:
    """What is known before training starts."""

    in_features: int  # N
    num_classes: int  # C
    head_share: float  # the classifier's parameters / the model's
    labelled: bool  # the data has labels
    train_samples: int
    has_val: bool  # a validation split to evaluate on after each epoch
    has_teacher: bool = True  # the original model is there to distil from (the pipeline always has it)


def facts_of(model: nn.Module, head: nn.Module, data: DataBundle, *, teacher: nn.Module | None) -> Facts:
    """The Facts of a swapped model, for callers of `finetune()` that left fields at None: the classifier's
    share is that of an nn.Linear(N, C) with bias in place of `head` (what the pipeline measures before the swap)."""
    num_classes = int(getattr(head, "num_classes", 0) or getattr(head, "out_features", 0) or data.num_classes)
    in_features = int(getattr(head, "in_features", 0))
    linear = in_features * num_classes + num_classes
    backbone = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in head.parameters())
    return Facts(in_features=in_features, num_classes=num_classes, head_share=linear / max(backbone + linear, 1),
                 labelled=data.labelled, train_samples=len(data.train), has_val=data.val is not None,
                 has_teacher=teacher is not None)


def plan(config: Config, facts: Facts) -> tuple[Config, list[str]]:
    """The config the loop runs with: every training field left at None decided here, and one reason per choice.

    The fields given are kept (unlabelled data distils from the teacher whatever `distill` says: the teacher
    supplies the targets); the class-lr fields go to their defaults unless class-lr trains (they are then
    ignored, and must not make a resumed run differ from the interrupted one). Applying `plan` twice changes
    nothing.
    """
    chosen, reasons = choose(config, facts)
    done = dataclasses.replace(config, **chosen)
    if not facts.labelled and facts.has_teacher and not done.distill:
        done = dataclasses.replace(done, distill=True)
        reasons.append("distillation on: the data has no labels, so the original model supplies the targets")
    if done.max_epochs is None:
        done = dataclasses.replace(done, max_epochs=AUTO_MAX_EPOCHS)
    if done.patience is None:
        done = dataclasses.replace(done, patience=AUTO_PATIENCE)
    if done.lr is None:  # class-lr (sgd and adamw got theirs in choose)
        done = dataclasses.replace(done, lr=CLASS_LR_LR)
    if done.optimizer == "class-lr":
        done = dataclasses.replace(
            done, class_lr_eta_mu=CLASS_LR_ETA_MU if done.class_lr_eta_mu is None else done.class_lr_eta_mu,
            class_lr_cutoff=CLASS_LR_CUTOFF if done.class_lr_cutoff is None else done.class_lr_cutoff)
    else:
        done = dataclasses.replace(done, class_lr_eta_mu=CLASS_LR_ETA_MU, class_lr_cutoff=CLASS_LR_CUTOFF,
                                   class_lr_layers=None)
    return done, reasons


def choose(config: FinetuneConfig, facts: Facts) -> tuple[dict[str, Any], list[str]]:
    """The values for the training options left at None, and one reason per choice.

    Returns:
        ({field: value} for the fields of `config` that were None, [reason, ...]).
    """
    many = facts.num_classes > facts.in_features or facts.head_share >= MANY_SHARE
    why_many = (f"{facts.num_classes} classes on {facts.in_features} features" if facts.num_classes > facts.in_features
                else f"the classifier is {100 * facts.head_share:.0f}% of the parameters")
    chosen: dict[str, Any] = {}
    reasons: list[str] = []
    if config.optimizer is None:
        chosen["optimizer"] = "adamw" if many else "sgd"
        reasons.append(f"optimizer {chosen['optimizer']}: " + (
            f"{why_many}, so every class vector moves and the backbone must follow" if many else
            "a small head close to the trained one after the swap"))
    optimizer = config.optimizer or chosen["optimizer"]
    if config.batch_size is None:
        chosen["batch_size"] = 128 if facts.train_samples >= LARGE_DATA else 64
        reasons.append(f"batch size {chosen['batch_size']}: {facts.train_samples:,} training samples")
    if config.lr is None and optimizer in ("sgd", "adamw"):
        batch = config.batch_size or chosen["batch_size"]
        base, at = (2e-3, 128) if optimizer == "adamw" else (1e-2, 64)
        chosen["lr"] = base * batch / at
        reasons.append(f"lr {chosen['lr']:g}: {base:g} per {at} samples, linear in the batch size")
    if config.distill is None and not facts.has_teacher:
        chosen["distill"] = False
        reasons.append("distillation off: no teacher (the original model) was given")
    elif config.distill is None:
        # on for every head: the original's outputs guide the new head, and with labels too it measured better
        # on every sample (benchmarks/accuracy.py; README), at the cost of one more forward pass per step
        chosen["distill"] = True
        if not facts.labelled:
            reasons.append("distillation on: the data has no labels")
        elif many:
            reasons.append(f"distillation on: {why_many}, the original's outputs guide the new head")
        else:
            reasons.append("distillation on: the original's outputs guide the new head back to its predictions")
    if config.epochs is None:
        chosen["epochs"] = "auto" if facts.has_val else FIXED_EPOCHS
        reasons.append("epochs auto: stop once within the target of the original" if facts.has_val else
                       f"{FIXED_EPOCHS} epochs: no validation split to stop on")
    epochs = config.epochs if config.epochs is not None else chosen["epochs"]
    if epochs == "auto" and config.max_epochs is None:
        chosen["max_epochs"] = epoch_budget(facts)
        if chosen["max_epochs"] > AUTO_MAX_EPOCHS:
            reasons.append(f"budget {chosen['max_epochs']} epochs: {facts.num_classes:,} classes on "
                           f"{facts.in_features} features learn slowly (auto still stops once within the target)")
    if epochs == "auto" and config.patience is None:
        slow = (config.max_epochs or chosen.get("max_epochs") or AUTO_MAX_EPOCHS) > AUTO_MAX_EPOCHS
        chosen["patience"] = SLOW_PATIENCE if slow else AUTO_PATIENCE
        if slow:
            reasons.append(f"patience {SLOW_PATIENCE}: over a long budget a few epochs without progress are noise")
    return chosen, reasons


def epoch_budget(facts: Facts) -> int:
    """The most epochs of --epochs auto: AUTO_MAX_EPOCHS, SLOW_MAX_EPOCHS from SLOW_RATIO classes per feature."""
    slow = facts.in_features > 0 and facts.num_classes >= SLOW_RATIO * facts.in_features
    return SLOW_MAX_EPOCHS if slow else AUTO_MAX_EPOCHS

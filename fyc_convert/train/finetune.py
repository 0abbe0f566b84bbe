"""THE training loop: calibrate the fixed head, fine-tune backbone + α + bias, evaluate — on one machine or DDP.

    config = FinetuneConfig(epochs=3, out_dir=Path("ckpt"))              # None fields: recipe.plan decides
    cal = calibrate(model, head, bundle.train, config)                    # α and bias only, backbone frozen
    result = finetune(model, head, bundle, config)
    metrics = evaluate(model, bundle.val, config, reference_model=original)

Under `torchrun` (the caller runs `dist.init_process_group`, gloo on CPU / nccl on GPU, and on GPUs
`torch.cuda.set_device(local_rank)` first) the same calls shard the data with a DistributedSampler, wrap the
model in DistributedDataParallel, reduce metrics across ranks, and only rank 0 writes checkpoints. The fixed
head has no weight matrix, so the gradient all-reduced per step shrinks by the classifier's C×N weights
(`gradient_bytes`).

Data comes through `fyc_convert.data.loader.make_loader` (the same batches everywhere: workers decode images, batches
are normalised on the device). On CUDA the loop trains in mixed precision by default (bf16 autocast where the GPU
supports it, else fp16 with a GradScaler; `precision="fp32"` turns it off) and conv nets use channels_last.

Determinism: shuffling and each sample's augmentation are functions of (seed, epoch), and dropout draws from the
global RNG reseeded at every epoch from (seed, epoch, rank) inside `torch.random.fork_rng` (the caller's RNG state
is left as it was), so on CPU an interrupted and resumed run ends with the same weights as an uninterrupted one,
with any number of DataLoader workers. Only rank 0 needs `out_dir`: it reads the checkpoint to resume and sends it
to the other ranks, and it alone writes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from fyc_convert.data.datasets import DataBundle
from fyc_convert.data.loader import BatchStream, make_loader, random_subset
from fyc_convert.distributed import world as world_and_rank
from fyc_convert.errors import DataError, TrainingError, first_line
from fyc_convert.head.fit import fit_lbfgs
from fyc_convert.model.surgery import capture_features, logits_of
from fyc_convert.options import FinetuneConfig
from fyc_convert.train.recipe import facts_of, plan
from fyc_convert.train.run_state import CHECKPOINT_NAME, checkpoint_header, load_checkpoint, write_checkpoint

__all__ = [
    "CALIBRATION_FLOATS",
    "CHECKPOINT_NAME",
    "Calibration",
    "EpochStats",
    "FinetuneConfig",
    "FinetuneResult",
    "Metrics",
    "calibrate",
    "calibration_samples",
    "evaluate",
    "finetune",
    "gradient_bytes",
    "resolve_device",
    "resolve_precision",
]

CALIBRATION_FLOATS = 1 << 25  # calibration's S·C cap: 128 MiB per float32 (S, C) matrix it keeps (z, teacher logits)
CALIBRATION_MIN_SAMPLES = 1024  # ... but never fewer samples than this (S·C grows past the cap above 32,768 classes)


@dataclass
class Metrics:
    """What `evaluate` measured; rates are fractions in [0, 1], None when not measurable."""

    loss: float | None  # mean cross-entropy over labelled samples (None for unlabelled data)
    accuracy: float | None  # top-1 accuracy on labelled samples (None for unlabelled data)
    agreement: float | None  # share of samples whose top-1 equals the reference model's (None without one)
    samples: int  # samples evaluated (all ranks together)


@dataclass
class EpochStats:
    """One epoch of `finetune` (numbers over all ranks)."""

    epoch: int  # 1-based
    loss: float  # mean training loss of the epoch
    accuracy: float | None  # training top-1 accuracy measured on the fly (None when unlabelled)
    val: Metrics | None  # evaluation after the epoch (validation split; None without one)
    lr: float  # learning rate at the end of the epoch
    scale: float  # α after the epoch
    seconds: float  # wall time of the training part of the epoch
    samples_per_s: float  # training throughput, all ranks together
    data_share: float = 0.0  # share of the epoch's time spent waiting for batches (decoding, transfer), rank 0


@dataclass
class FinetuneResult:
    """What `finetune` did."""

    history: list[EpochStats]  # one entry per epoch, the resumed ones included
    final: Metrics | None  # the kept epoch's `val` (the last one's unless `kept_epoch`), or None when no epoch
    # ran or there is no validation split
    device: str  # where it trained, e.g. "cpu" or "cuda:0"
    world_size: int  # processes (1 without torchrun)
    resumed_from_epoch: int | None  # epochs already done in the checkpoint it resumed from
    checkpoint: Path | None  # the checkpoint file (written by rank 0), or None without out_dir
    precision: str = "fp32"  # what it trained in: "fp32", "bf16" or "fp16" (autocast; weights stay fp32)
    channels_last: bool = False  # whether the model trained in channels_last memory format
    skipped_images: int = 0  # unreadable images skipped (`skip_bad_images`), all ranks together
    # "epochs" (the count given), or with epochs="auto": "recovered", "plateau", "max_epochs"
    stop_reason: str = "epochs"
    # with a validation split, stopping on "epochs", "plateau" or "max_epochs": the epoch (1-based) whose weights
    # were kept, when an earlier epoch validated better than the last one; None otherwise (the last epoch's weights)
    kept_epoch: int | None = None


@dataclass
class Calibration:
    """What `calibrate` fitted."""

    scale: float  # α after the fit
    loss_before: float  # mean loss on the cached features before the fit
    loss_after: float  # ... and after
    samples: int  # training samples used (all ranks together)
    seconds: float  # wall time, feature extraction included


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> the current CUDA device when available, else CPU; "cuda" without CUDA raises TrainingError."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingError("--device cuda but CUDA is not available; use --device auto or cpu")
        return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device(device)
    if device != "cpu":
        raise TrainingError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device("cpu")


def resolve_precision(precision: str, device: str | torch.device, *, optimizer: str = "sgd") -> str:
    """The precision a run trains in: "auto" -> "bf16" on CUDA where supported, else "fp16" (with a GradScaler);
    "fp32" on CPU and for class-lr (it computes its own gradients). Explicit "bf16"/"fp16" also run on CPU.

    Raises:
        TrainingError: an unknown precision, or mixed precision with class-lr.
    """
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise TrainingError(f"unknown precision {precision!r}; pass --precision auto, fp32, bf16 or fp16")
    device = resolve_device(device)
    if precision == "auto":
        if device.type != "cuda" or optimizer == "class-lr":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision != "fp32" and optimizer == "class-lr":
        raise TrainingError(f"class-lr computes its own per-class gradients in fp32; pass --precision fp32 "
                            f"(not {precision}) or use --optimizer sgd/adamw")
    return precision


def gradient_bytes(model: nn.Module) -> int:
    """Bytes of gradient DDP all-reduces per step: trainable parameters × element size."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Dataset | DataLoader | BatchStream,
    config: FinetuneConfig | None = None,
    *,
    reference_model: nn.Module | None = None,
    workers: int | None = None,
) -> Metrics:
    """Accuracy, cross-entropy and top-1 agreement with a reference model, in eval mode, one batch at a time.

    Under torch.distributed a Dataset is split across ranks and the sums reduced, so every rank must call
    this and every rank gets the same numbers. Training modes are restored afterwards.

    Args:
        model: the model to measure (its output: logits (B, C), or a tuple/dict/object holding them).
        data: (x, y) samples, y = -1 when unlabelled; a DataLoader or BatchStream is used as given (not split
            across ranks).
        config: `device` (the model is moved there) and `eval_batch_size` (when `data` is a Dataset) come from
            it; None: FinetuneConfig()'s.
        reference_model: e.g. the original model; agreement = share of equal top-1 predictions.
        workers: DataLoader workers when `data` is a Dataset (None: `make_loader`'s default for the data).

    Returns:
        Metrics over all samples (and ranks).
    """
    config = config or FinetuneConfig()
    device = resolve_device(config.device)
    batch_size = config.eval_batch_size
    world, _ = world_and_rank()
    given = isinstance(data, (DataLoader, BatchStream))
    loader = data if given else make_loader(data, batch_size=batch_size, device=device, workers=workers,
                                            distributed=True)
    models = [m for m in (model, reference_model) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.to(device).eval()
    # sums: loss, correct, labelled, agree, samples
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = logits_of(model(x))  # (B, C)
            labelled = y >= 0
            if labelled.any():
                sums[0] += F.cross_entropy(logits[labelled].float(), y[labelled], reduction="sum").double()
                sums[1] += (logits[labelled].argmax(1) == y[labelled]).sum()
                sums[2] += labelled.sum()
            if reference_model is not None:
                sums[3] += (logits.argmax(1) == logits_of(reference_model(x)).argmax(1)).sum()
            sums[4] += len(x)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    if world > 1 and not given:
        dist.all_reduce(sums)
    loss, correct, labelled, agree, n = sums.tolist()
    return Metrics(
        loss=loss / labelled if labelled else None,
        accuracy=correct / labelled if labelled else None,
        agreement=agree / n if reference_model is not None and n else None,
        samples=int(n),
    )


# ---------------------------------------------------------------------------------------------- calibration


def calibrate(
    model: nn.Module,
    head: nn.Module,
    train_data: Dataset,
    config: FinetuneConfig | None = None,
    *,
    teacher: nn.Module | None = None,
    max_samples: int = 20_000,
    max_iter: int = 50,
    workers: int | None = None,
) -> Calibration:
    """Fit only α and the bias of the fixed head, backbone frozen, on features computed once.

    The head's input features are captured in one streaming eval-mode pass over at most `max_samples` samples (a
    seeded random subset, `loader.random_subset`), the head's fixed transform z = V·x̂ (S, C) is cached, and the
    convex problem
    min over (α, b) of mean CE(α·z + b, y) is solved with L-BFGS — seconds even for many classes.
    A fixed α (a buffer) or a missing bias is left alone. Under torch.distributed each rank takes a shard of
    the subset and the loss and gradients are summed across ranks, so all ranks end with the same α and b.

    Args:
        model: the model holding `head` (already swapped).
        head: the fixed head (parameter `scale` (0-dim), parameter `bias` (C,) or None).
        train_data: (x, y) training samples; y = -1 everywhere for unlabelled data (then `distill` is needed).
        config: the same options as the loss of `finetune`: `device`, `distill` (fit to the teacher's logits
            softened by `temperature`, mixed with CE by `distill_weight` when labelled), `seed` (of the subset)
            and `eval_batch_size` (of the feature pass); None: FinetuneConfig()'s (no distillation).
        teacher: the original model; its logits are the targets when `config.distill`.
        max_samples: most training samples used (memory: S×N features and S×C cached outputs); fewer for many
            classes: `calibration_samples(C, max_samples)`, so S·C stays within CALIBRATION_FLOATS.
        max_iter: L-BFGS iterations.
        workers: DataLoader workers (None: `make_loader`'s default for the data).

    Returns:
        Calibration with the fitted α and the loss before and after.

    Raises:
        DataError: unlabelled data without `distill` and a teacher.
        TrainingError: `head` is not part of `model`, or the fit produced a NaN/inf loss.
    """
    t0 = time.perf_counter()
    config = config or FinetuneConfig()
    if not any(m is head for m in model.modules()):
        raise TrainingError("the head to calibrate is not a submodule of the model; pass the swapped model's head")
    if config.distill and teacher is None:
        raise TrainingError("distillation needs the original model as teacher; pass teacher=")
    max_samples = calibration_samples(_num_classes_of(head), max_samples)
    z, labels, t_logits, labelled = _calibration_inputs(model, head, train_data, config, teacher=teacher,
                                                        max_samples=max_samples, workers=workers)
    before, after, samples = _fit_scale_bias(head, z, labels, t_logits, config, labelled=labelled, max_iter=max_iter)
    return Calibration(scale=_scale_value(head), loss_before=before, loss_after=after, samples=samples,
                       seconds=time.perf_counter() - t0)


def calibration_samples(num_classes: int, max_samples: int = 20_000) -> int:
    """Most samples calibration uses for C classes: S with S·C <= CALIBRATION_FLOATS, at least
    CALIBRATION_MIN_SAMPLES, at most ``max_samples``.

    Calibration caches z (S, C) and, with distillation, the teacher's logits (S, C), and its loss makes a few
    (S, C) temporaries: bounding S·C bounds its memory (about 128 MiB per float32 (S, C) matrix) whatever C is.
    """
    return min(max_samples, max(CALIBRATION_MIN_SAMPLES, CALIBRATION_FLOATS // max(num_classes, 1)))


def _num_classes_of(head: nn.Module) -> int:
    """C of a fixed head (``num_classes``; else the bias length; else 1: no bound)."""
    c = getattr(head, "num_classes", None)
    if isinstance(c, int):
        return c
    bias = getattr(head, "bias", None)
    return bias.numel() if isinstance(bias, Tensor) else 1


def _calibration_inputs(model: nn.Module, head: nn.Module, train_data: Dataset, config: FinetuneConfig, *,
                        teacher: nn.Module | None, max_samples: int,
                        workers: int | None) -> tuple[Tensor, Tensor, Tensor | None, bool]:
    """This rank's share of the seeded subset: z = V·x̂ (S, C), labels (S,), the teacher's logits (S, C) or None,
    and whether any rank has labels."""
    device = resolve_device(config.device)
    world, rank = world_and_rank()
    idx = random_subset(len(train_data), max_samples, seed=config.seed)[rank::world]
    loader = make_loader(train_data, batch_size=config.eval_batch_size, device=device, workers=workers, indices=idx)
    feats, labels, t_logits = _head_inputs(model, head, loader, teacher if config.distill else None, device)
    labelled = bool((labels >= 0).any())
    if world > 1:
        flag = torch.tensor([float(labelled)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        labelled = bool(flag.item())
    if not labelled and not config.distill:
        raise DataError("the data has no labels; pass --distill so the original model supplies the targets")
    with torch.no_grad():  # z = V·x̂ (S, C): the head's fixed transform, computed once
        z = torch.cat([head.raw(f) for f in feats.split(config.eval_batch_size)])
    return z, labels, t_logits, labelled


def _fit_scale_bias(head: nn.Module, z: Tensor, labels: Tensor, t_logits: Tensor | None, config: FinetuneConfig, *,
                    labelled: bool, max_iter: int) -> tuple[float, float, int]:
    """L-BFGS on α and the bias over the cached z, summed over ranks: (loss before, loss after, samples)."""
    world, _ = world_and_rank()
    params = [p for name, p in head.named_parameters(recurse=False) if name in ("scale", "bias") and p.requires_grad]
    total = torch.tensor([float(len(z))], device=z.device)
    if world > 1:
        dist.all_reduce(total)
    scale_bias = _scale_bias(head)

    def objective() -> Tensor:
        logits = scale_bias.get("scale", 1.0) * z + scale_bias.get("bias", 0.0)
        return _per_sample_loss(logits, labels, t_logits, config, labelled=labelled).sum() / total

    before, after = fit_lbfgs(params, objective, max_iter=max_iter, all_reduce=dist.all_reduce if world > 1 else None,
                              lr=1.0, history_size=20, tolerance_grad=1e-9, tolerance_change=1e-12)
    if not math.isfinite(after):
        raise TrainingError(f"calibration diverged (loss {after}); check the data's normalisation (mean/std)")
    return before, after, int(total.item())


def _scale_bias(head: nn.Module) -> dict[str, Tensor]:
    """The head's α (`scale`, parameter or buffer) and `bias` when present."""
    state = dict(head.named_parameters(recurse=False)) | dict(head.named_buffers(recurse=False))
    return {k: state[k] for k in ("scale", "bias") if state.get(k) is not None}


def _head_inputs(model: nn.Module, head: nn.Module, loader: BatchStream, teacher: nn.Module | None,
                 device: torch.device) -> tuple[Tensor, Tensor, Tensor | None]:
    """One eval-mode pass: the head's inputs (S, N) (surgery.capture_features' hook), labels (S,), and the
    teacher's logits (S, C) on the same batches."""
    labels: list[Tensor] = []
    t_logits: list[Tensor] = []
    models = [m for m in (model, teacher) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.to(device).eval()

    def batches():  # runs inside capture_features' no_grad pass
        for x, y in loader:
            labels.append(y)
            if teacher is not None:
                t_logits.append(logits_of(teacher(x)).float())
            yield x

    try:
        feats = capture_features(model, head, batches())
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64, device=device)
    if len(feats) != len(y):
        raise TrainingError(f"the head sees {len(feats)} feature vectors for {len(y)} samples; calibration needs "
                            "one per sample (a (B, N) input); use --epochs to fine-tune without it")
    t = (torch.cat(t_logits) if t_logits else torch.zeros(0, getattr(head, "num_classes", 0), device=device)
         ) if teacher is not None else None
    return feats, y, t


# ---------------------------------------------------------------------------------------------- fine-tuning


def finetune(
    model: nn.Module,
    head: nn.Module,
    data: DataBundle,
    config: FinetuneConfig,
    *,
    teacher: nn.Module | None = None,
    progress: Any = None,
    reference_accuracy: float | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> FinetuneResult:
    """Fine-tune the backbone, α and the bias (the head's fixed transform has no parameters).

    Trains every parameter of `model` with requires_grad (the head's α and bias included; weight decay on all of
    them), evaluates on `data.val` after each epoch, and writes `config.out_dir / CHECKPOINT_NAME` (model,
    optimizer, scheduler, loss scaler, epoch, history) first for the starting point and then after every epoch.
    With `config.resume` it continues from that checkpoint and stops after `config.epochs` epochs in all.
    With `config.epochs == "auto"` it evaluates after every epoch and stops once the validation accuracy is within
    `target_drop` points of `reference_accuracy` (the original model's), after `patience` epochs without a better
    one, or at `max_epochs` (`stop_reason`); the learning rate decays over `max_epochs`.
    With a validation split, a run that ends without "recovered" (a fixed count included) goes back to the
    best-validating epoch's weights when that was not the last epoch (`kept_epoch`).
    Fields of `config` left at None are decided by `recipe.plan` (from `recipe.facts_of` this model and data).
    Calibrate first (`calibrate`); the model is modified in place and left in eval mode on `device`, in the
    default (contiguous) memory format.

    Args:
        model: the swapped model.
        head: its fixed head (for α in the history).
        data: training and validation data (`load_data`, checked with `check_data`); `data.workers` loader workers.
        config: the options.
        teacher: the original model; needed when `config.distill` (and always for unlabelled data).
        progress: a `rich.progress.Progress` (or anything with its `add_task(description, total=, **fields)` /
            `update(task, advance=, **fields)`): one task per epoch with fields `loss`, `acc` (None when
            unlabelled), `samples_per_s` and `data_share` (share of the time spent waiting for batches);
            only rank 0 reports. None: silent.
        reference_accuracy: the original model's validation accuracy (the target of `epochs="auto"`).
        on_epoch: called on rank 0 with each finished epoch's EpochStats (progress lines).

    Returns:
        FinetuneResult with one EpochStats per epoch.

    Raises:
        TrainingError: NaN/inf loss (the last good checkpoint is kept), a checkpoint that cannot be resumed,
            or options that do not fit (no teacher for distillation, class-lr under torchrun or in fp16/bf16).
        DataError: unlabelled data without distillation; an image that cannot be read (without skip_bad_images).
    """
    config, _ = plan(config, facts_of(model, head, data, teacher=teacher))  # the None fields: the recipe's choice
    trainer = _Trainer(model, head, data, config, teacher)
    target = _target(config, data, reference_accuracy)
    try:
        with torch.random.fork_rng(devices=trainer.cuda_devices):
            if trainer.state is None:
                trainer.save(0)
            for epoch in range(trainer.start_epoch, trainer.budget):
                if trainer.stop_reason is not None:
                    break
                stats = trainer.train_epoch(epoch, progress)
                stats.val = (evaluate(model, data.val, config, reference_model=teacher, workers=data.workers)
                             if data.val is not None else None)
                trainer.history.append(stats)
                trainer.note_best(epoch + 1)
                if config.epochs == "auto":
                    trainer.stop_reason = stop_reason(trainer.history, target=target, patience=config.patience,
                                                      labelled=data.labelled, last=epoch + 1 == trainer.budget)
                elif epoch + 1 == trainer.budget:
                    trainer.stop_reason = "epochs"
                if trainer.stop_reason in ("plateau", "max_epochs", "epochs"):
                    trainer.keep_best()  # a fixed count too: the best-validating epoch, not just the last
                trainer.save(epoch + 1)
                if on_epoch is not None and trainer.rank == 0:
                    on_epoch(stats)
    finally:
        if trainer.channels_last:  # exporters and safetensors want contiguous weights
            for m in (model, teacher):
                if m is not None:
                    m.to(memory_format=torch.contiguous_format)
        model.eval()
    return trainer.result()


def _target(config: FinetuneConfig, data: DataBundle, reference_accuracy: float | None) -> float | None:
    """The validation metric that counts as recovered: the original's accuracy minus target_drop points (labelled),
    or top-1 agreement with the teacher of 1 - target_drop/100 (unlabelled); None: no target."""
    if config.epochs != "auto":
        return None
    if data.labelled:
        return None if reference_accuracy is None else reference_accuracy - config.target_drop / 100
    return 1.0 - config.target_drop / 100


def stop_reason(history: list[EpochStats], *, target: float | None, patience: int, labelled: bool,
                last: bool) -> str | None:
    """Why `epochs="auto"` stops after the last epoch of `history`, or None to go on.

    "recovered": the validation metric (accuracy; agreement with the teacher when unlabelled) reached `target`;
    "plateau": no better value for `patience` epochs; "max_epochs": the budget is spent (`last`).
    """
    values = [_stop_metric(h, labelled) for h in history]
    if values[-1] is None:
        return "max_epochs" if last else None
    if target is not None and values[-1] >= target - 1e-12:
        return "recovered"
    best = max(range(len(values)), key=lambda i: (values[i] if values[i] is not None else -1.0, -i))
    if len(values) - 1 - best >= patience:
        return "plateau"
    return "max_epochs" if last else None


def _stop_metric(stats: EpochStats, labelled: bool) -> float | None:
    """What epochs="auto" watches: validation accuracy, or agreement with the teacher when unlabelled."""
    if stats.val is None:
        return None
    return stats.val.accuracy if labelled else stats.val.agreement


class _Trainer:
    """One fine-tuning run's state (minGPT's Trainer): device, loader, optimizer, schedule, resume, DDP.

    Built once by `finetune`; `train_epoch` is the loop over batches and `step` one optimisation step.
    """

    def __init__(self, model: nn.Module, head: nn.Module, data: DataBundle, config: FinetuneConfig,
                 teacher: nn.Module | None):
        self.model, self.head, self.data, self.config, self.teacher = model, head, data, config, teacher
        self.device = resolve_device(config.device)
        self.world, self.rank = world_and_rank()
        _check_config(config, data, teacher, self.world)
        self.precision = resolve_precision(config.precision, self.device, optimizer=config.optimizer)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.ckpt = Path(config.out_dir) / CHECKPOINT_NAME if config.out_dir is not None else None
        self.budget = config.max_epochs if config.epochs == "auto" else config.epochs  # most epochs of this run
        self.state = _resume_state(self.ckpt, config, self.precision, self.world, self.rank) if config.resume else None
        self.stop_reason: str | None = self.state.get("stop_reason") if self.state is not None else None
        # with a validation split: the best-validating epoch so far and its weights (CPU), in the checkpoint too
        self.best_epoch: int | None = self.state.get("best_epoch") if self.state is not None else None
        self.best_weights: dict[str, Tensor] | None = self.state.get("best_weights") if self.state is not None else None
        self.kept_epoch: int | None = self.state.get("kept_epoch") if self.state is not None else None
        self.cuda_devices = [self.device.index] if self.device.type == "cuda" else []

        self.channels_last = (config.channels_last if config.channels_last is not None else
                              self.device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules()))
        model.to(self.device)
        if teacher is not None:
            teacher.to(self.device).eval()
        if self.channels_last:
            for m in (model, teacher):
                if m is not None:
                    m.to(memory_format=torch.channels_last)
        if self.state is not None:
            try:
                model.load_state_dict(self.state["model"])
            except RuntimeError as e:
                raise TrainingError(f"checkpoint {self.ckpt} does not fit this model ({first_line(e)}); "
                                    "run without --resume") from None

        per_rank = math.ceil(len(data.train) / self.world)
        self.loader = make_loader(data.train, batch_size=config.batch_size, device=self.device, workers=data.workers,
                                  shuffle=True, seed=config.seed, drop_last=per_rank > config.batch_size,
                                  distributed=True, channels_last=self.channels_last)
        steps_per_epoch = len(self.loader)
        self.opt = _build_optimizer(model, config, lr=config.lr, num_classes=_num_classes(head, data),
                                    steps_per_epoch=steps_per_epoch)
        self.sched = (torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=max(1, self.budget * steps_per_epoch))
                      if config.cosine else None)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.history = [EpochStats(**{**h, "val": Metrics(**h["val"]) if h["val"] else None})
                        for h in (self.state["history"] if self.state else [])]
        self.start_epoch = self.state["epoch"] if self.state else 0
        if self.state is not None and self.state["optimizer"] is not None:
            self.opt.load_state_dict(self.state["optimizer"])
            if self.sched is not None:
                self.sched.load_state_dict(self.state["scheduler"])
            if self.state.get("scaler"):
                self.scaler.load_state_dict(self.state["scaler"])
        self.ddp = (nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.world > 1 else model)
        self.class_lr = hasattr(self.opt, "backward_and_step")

    def train_epoch(self, epoch: int, progress: Any) -> EpochStats:
        """One pass over the training data; metrics summed over all ranks."""
        config, device = self.config, self.device
        self.loader.set_epoch(epoch)  # shuffle order and augmentation = f(seed, epoch)
        torch.manual_seed((config.seed * 1_000_003 + epoch) * 1_009 + self.rank)  # dropout = f(seed, epoch, rank)
        self.model.train()
        task = None
        if progress is not None and self.rank == 0:
            total = f"≤{self.budget}" if config.epochs == "auto" else str(self.budget)
            task = progress.add_task(f"epoch {epoch + 1}/{total}", total=len(self.loader),
                                     loss=float("nan"), acc=None, samples_per_s=0.0, data_share=0.0)
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss·B, correct, labelled, samples
        t0 = time.perf_counter()
        for step, (x, y) in enumerate(self.loader):
            loss, logits = self.step(x, y, epoch, step)
            with torch.no_grad():
                sums[0] += loss.double() * len(x)
                if self.data.labelled:
                    sums[1] += (logits.argmax(1) == y).sum()
                    sums[2] += len(y)
                sums[3] += len(x)
            if task is not None:
                loss_sum, correct, labelled_n, seen = sums.tolist()
                elapsed = time.perf_counter() - t0
                progress.update(task, advance=1, loss=loss_sum / seen,
                                acc=correct / labelled_n if labelled_n else None,
                                samples_per_s=seen * self.world / elapsed,
                                data_share=min(1.0, self.loader.data_seconds / elapsed))
            del x, y, loss, logits  # free this batch before the next one is fetched and normalised beside it
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        if self.world > 1:
            dist.all_reduce(sums)
            for b in self.model.buffers():  # BatchNorm statistics: take rank 0's so all ranks evaluate the same
                dist.broadcast(b, 0)
        loss_sum, correct, labelled_n, seen = sums.tolist()
        return EpochStats(
            epoch=epoch + 1, loss=loss_sum / max(seen, 1), accuracy=correct / labelled_n if labelled_n else None,
            val=None, lr=self.opt.param_groups[0]["lr"], scale=_scale_value(self.head), seconds=seconds,
            samples_per_s=seen / seconds if seconds > 0 else 0.0,
            data_share=min(1.0, self.loader.data_seconds / seconds) if seconds > 0 else 0.0)

    def step(self, x: Tensor, y: Tensor, epoch: int, step: int) -> tuple[Tensor, Tensor]:
        """Forward (autocast when mixed precision), loss, backward, optimizer and schedule step: (loss, logits)."""
        config = self.config
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            logits = logits_of(self.ddp(x))  # (B, C)
            t_logits = None
            if config.distill:
                with torch.no_grad():
                    t_logits = logits_of(self.teacher(x)).float()
        per = _per_sample_loss(logits.float(), y, t_logits, config, labelled=self.data.labelled)
        loss = per.mean()
        stepped = True
        if self.class_lr:
            _raise_if_not_finite(loss.detach(), self.world, epoch, step, self.ckpt)
            self.opt.backward_and_step(per, y)
        else:
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            _raise_if_not_finite(loss.detach(), self.world, epoch, step, self.ckpt)
            scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
            self.scaler.step(self.opt)  # = opt.step() unless fp16 (unscales; skips steps with inf gradients)
            self.scaler.update()
            stepped = not self.scaler.is_enabled() or self.scaler.get_scale() >= scale  # the scale drops on a skip
        if self.sched is not None and stepped:
            self.sched.step()
        return loss.detach(), logits.detach()

    def note_best(self, epoch: int) -> None:
        """Remember the weights of `epoch` (1-based, the last in history) when it validated best so far."""
        value = _stop_metric(self.history[-1], self.data.labelled)
        best = _stop_metric(self.history[self.best_epoch - 1], self.data.labelled) if self.best_epoch else None
        if value is not None and (best is None or value >= best):  # a tie: the later, more annealed weights
            self.best_epoch = epoch
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def keep_best(self) -> None:
        """At the end (but on "recovered"): go back to the best-validating epoch's weights if it was not the last."""
        if self.best_epoch is not None and self.best_epoch != len(self.history) and self.best_weights is not None:
            self.model.load_state_dict(self.best_weights)
            self.kept_epoch = self.best_epoch

    def save(self, epoch: int) -> None:
        """Rank 0 writes the model, optimizer, schedule, scaler, epoch, history and the best epoch's weights
        atomically (no collective: ranks may differ in path). Epoch 0 before any step: the starting weights."""
        if self.ckpt is None or self.rank != 0:
            return
        started = epoch > 0 or self.state is not None
        write_checkpoint(self.ckpt, {
            **checkpoint_header(self.config, precision=self.precision, world=self.world),
            "epoch": epoch,
            "stop_reason": self.stop_reason,  # set once training has finished: a resumed run trains no further
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict() if started else None,
            "scheduler": self.sched.state_dict() if started and self.sched is not None else None,
            "scaler": self.scaler.state_dict() if started and self.scaler.is_enabled() else None,
            "history": [asdict(h) for h in self.history],
            "best_epoch": self.best_epoch, "best_weights": self.best_weights, "kept_epoch": self.kept_epoch,
        })

    def result(self) -> FinetuneResult:
        return FinetuneResult(
            history=self.history,
            final=self.history[(self.kept_epoch or len(self.history)) - 1].val if self.history else None,
            device=str(self.device),
            world_size=self.world,
            resumed_from_epoch=self.start_epoch if self.state is not None else None,
            checkpoint=self.ckpt,
            precision=self.precision,
            channels_last=self.channels_last,
            skipped_images=len(_gather_skipped(self.data, self.world)),
            stop_reason=self.stop_reason or "epochs",
            kept_epoch=self.kept_epoch,
        )


def _gather_skipped(data: DataBundle, world: int) -> set[str]:
    """The files skipped on any rank (a file may be skipped on different ranks in different epochs)."""
    mine = set(data.skipped_images())
    if world == 1:
        return mine
    every: list[Any] = [None] * world
    dist.all_gather_object(every, mine)
    return set().union(*every)


def _check_config(config: FinetuneConfig, data: DataBundle, teacher: nn.Module | None, world: int) -> None:
    if (config.epochs != "auto" and config.epochs < 0) or config.batch_size < 1:
        raise TrainingError(f"need epochs >= 0 (or auto) and batch size >= 1, got {config.epochs} and "
                            f"{config.batch_size}")
    if config.epochs == "auto" and data.val is None:
        raise TrainingError("--epochs auto evaluates on a validation split after each epoch, and the data has none; "
                            "pass --val-split (e.g. 0.1) or a number of --epochs")
    if config.optimizer not in ("sgd", "adamw", "class-lr"):
        raise TrainingError(f"unknown optimizer {config.optimizer!r}; use sgd, adamw or class-lr")
    if config.distill and teacher is None:
        raise TrainingError("--distill needs the original model as teacher; pass teacher= (the CLI does)")
    if not data.labelled and not config.distill:
        raise DataError(f"{data.source} has no labels; pass --distill so the original model supplies the targets")
    if config.optimizer == "class-lr" and not data.labelled:
        raise TrainingError("class-lr needs labels (its rates are per class); use --optimizer sgd with --distill")
    if config.optimizer == "class-lr" and world > 1:
        raise TrainingError("class-lr does its own backward passes and does not run under torchrun; use sgd or adamw")
    if len(data.train) == 0:
        raise DataError(f"the training split of {data.source} is empty; add samples or change --val-split")


def _build_optimizer(model: nn.Module, config: FinetuneConfig, *, lr: float, num_classes: int,
                     steps_per_epoch: int) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters; unfreeze the backbone or use --epochs 0")
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    if config.optimizer == "class-lr":
        from fyc_convert.train.class_lr import build_class_lr

        return build_class_lr(model, num_classes=num_classes, lr=lr, eta_mu=config.class_lr_eta_mu,
                              cutoff_epoch=config.class_lr_cutoff, layers=config.class_lr_layers,
                              steps_per_epoch=steps_per_epoch)
    return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _per_sample_loss(logits: Tensor, y: Tensor, t_logits: Tensor | None, config: FinetuneConfig, *,
                     labelled: bool) -> Tensor:
    """(B,) loss: CE with labels; with `config.distill` T²·KL(teacher ‖ student) on logits / T (T =
    `temperature`), mixed with CE by `distill_weight` — the same loss in calibration and fine-tuning."""
    ce = F.cross_entropy(logits, y, reduction="none") if labelled else None
    if not config.distill:
        return ce
    t = config.temperature
    kl = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(t_logits / t, 1), log_target=True,
                  reduction="none").sum(1) * t * t
    return kl if ce is None else (1 - config.distill_weight) * ce + config.distill_weight * kl


def _raise_if_not_finite(loss: Tensor, world: int, epoch: int, step: int, ckpt: Path | None) -> None:
    """Stop every rank together when any rank's loss is NaN/inf (before the optimizer step)."""
    bad = (~torch.isfinite(loss)).float().reshape(1)
    if world > 1:
        dist.all_reduce(bad)
    if bad.item():
        kept = f"the last good checkpoint {ckpt} is kept" if ckpt is not None else "no checkpoint was written"
        raise TrainingError(f"loss became {loss.item()} at epoch {epoch + 1} step {step + 1}; {kept}; "
                            "lower --lr or check the data for extreme values")


def _num_classes(head: nn.Module, data: DataBundle) -> int:
    return int(getattr(head, "num_classes", 0) or getattr(head, "out_features", 0) or data.num_classes)


def _scale_value(head: nn.Module) -> float:
    scale = _scale_bias(head).get("scale")
    return float(scale.detach()) if scale is not None else float("nan")


# ---------------------------------------------------------------------------------------------- checkpoints


def _resume_state(path: Path | None, config: FinetuneConfig, precision: str, world: int, rank: int) -> dict:
    """Rank 0 reads the checkpoint and sends it (or its error) to every rank."""
    payload: list[Any] = [None]
    if rank == 0:
        try:
            payload = [load_checkpoint(path, config, precision=precision, world=world)]
        except TrainingError as e:
            payload = [str(e)]
    if world > 1:
        dist.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], str):
        raise TrainingError(payload[0])
    return payload[0]

"""THE training loop: calibrate the fixed head, fine-tune backbone + α + bias, evaluate — on one machine or DDP.

    cal = calibrate(model, head, bundle.train, device="auto")          # α and bias only, backbone frozen
    result = finetune(model, head, bundle, FinetuneConfig(epochs=3, out_dir=Path("ckpt")))
    metrics = evaluate(model, bundle.val, device="auto", reference_model=original)

Under `torchrun` (the caller runs `dist.init_process_group`, gloo on CPU / nccl on GPU, and on GPUs
`torch.cuda.set_device(local_rank)` first) the same calls shard the data with a DistributedSampler, wrap the
model in DistributedDataParallel, reduce metrics across ranks, and only rank 0 writes checkpoints. The fixed
head has no weight matrix, so the gradient all-reduced per step shrinks by the classifier's C×N weights
(`gradient_bytes`).

Determinism: shuffling is a function of (seed, epoch), and dropout draws from the global RNG reseeded at every
epoch from (seed, epoch, rank) inside `torch.random.fork_rng` (the caller's RNG state is left as it was), so on
CPU an interrupted and resumed run ends with the same weights as an uninterrupted one. Only rank 0 needs
`out_dir`: it reads the checkpoint to resume and sends it to the other ranks, and it alone writes.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Subset

from fyc_convert.data import DataBundle
from fyc_convert.errors import DataError, TrainingError
from fyc_convert.files import atomic_path
from fyc_convert.surgery import logits_of

__all__ = [
    "CHECKPOINT_NAME",
    "Calibration",
    "EpochStats",
    "FinetuneConfig",
    "FinetuneResult",
    "Metrics",
    "calibrate",
    "evaluate",
    "finetune",
    "gradient_bytes",
    "resolve_device",
]

CHECKPOINT_NAME = "finetune.pt"  # the one checkpoint file in `FinetuneConfig.out_dir`, replaced every epoch
_FORMAT = "fyc-finetune/1"
# Config fields that must match between an interrupted run and its resumption.
_RESUME_FIELDS = ("epochs", "lr", "batch_size", "optimizer", "momentum", "weight_decay", "cosine", "distill",
                  "temperature", "distill_weight", "seed", "class_lr_eta_mu", "class_lr_cutoff", "class_lr_layers")


@dataclass
class FinetuneConfig:
    """Options of `finetune` (the CLI flags map onto these)."""

    epochs: int = 3  # passes over the training data; 0 = no training (calibrate only, done by the caller)
    lr: float | None = None  # peak learning rate; None: 0.01 for "sgd"/"class-lr", 1e-3 for "adamw"
    batch_size: int = 64  # samples per step and per process (under torchrun each rank takes this many)
    optimizer: Literal["sgd", "adamw", "class-lr"] = "sgd"  # SGD with momentum, AdamW, or per-class rates
    momentum: float = 0.9  # SGD momentum (adamw and class-lr do not use it)
    weight_decay: float = 5e-4  # on every trained parameter, α included (as in the paper); class-lr: none
    cosine: bool = True  # cosine decay of the learning rate to 0 over all steps; False: constant
    distill: bool = False  # learn from the teacher's softened logits (KL), plus cross-entropy when labelled
    temperature: float = 4.0  # softening temperature T of the distillation KL (the KL is scaled by T²)
    distill_weight: float = 0.5  # weight of the KL term against cross-entropy with labels (unlabelled: KL only)
    seed: int = 0  # seeds shuffling and dropout: same seed, same weights on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"  # "auto": CUDA when available
    out_dir: Path | None = None  # checkpoint folder (CHECKPOINT_NAME written after every epoch); None: none
    resume: bool = False  # continue from out_dir's checkpoint and finish the same number of epochs
    eval_batch_size: int = 256  # batch size of evaluation after every epoch
    num_workers: int = 0  # DataLoader worker processes (data is in memory: 0 is usually fastest)
    class_lr_eta_mu: float = 1e4  # class-lr: learning rate of the per-class factors μ
    class_lr_cutoff: int = 10  # class-lr: epoch from which plain gradients return
    class_lr_layers: list[str] | None = None  # class-lr: nn.Linear names with per-class rates; None: default


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


@dataclass
class FinetuneResult:
    """What `finetune` did."""

    history: list[EpochStats]  # one entry per epoch, the resumed ones included
    final: Metrics | None  # `history[-1].val`, or None when no epoch ran or there is no validation split
    device: str  # where it trained, e.g. "cpu" or "cuda:0"
    world_size: int  # processes (1 without torchrun)
    resumed_from_epoch: int | None  # epochs already done in the checkpoint it resumed from
    checkpoint: Path | None  # the checkpoint file (written by rank 0), or None without out_dir


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


def gradient_bytes(model: nn.Module) -> int:
    """Bytes of gradient DDP all-reduces per step: trainable parameters × element size."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Dataset | DataLoader,
    *,
    device: str | torch.device = "auto",
    reference_model: nn.Module | None = None,
    batch_size: int = 256,
) -> Metrics:
    """Accuracy, cross-entropy and top-1 agreement with a reference model, in eval mode.

    Under torch.distributed a Dataset is split across ranks and the sums reduced, so every rank must call
    this and every rank gets the same numbers. Training modes are restored afterwards.

    Args:
        model: the model to measure (its output: logits (B, C), or a tuple/dict/object holding them).
        data: (x, y) samples, y = -1 when unlabelled; a DataLoader is used as given (not split across ranks).
        device: where to run; the model is moved there.
        reference_model: e.g. the original model; agreement = share of equal top-1 predictions.
        batch_size: batch size when `data` is a Dataset.

    Returns:
        Metrics over all samples (and ranks).
    """
    device = resolve_device(device)
    world, rank = _world()
    if isinstance(data, DataLoader):
        loader = data
    else:
        shard = Subset(data, range(rank, len(data), world)) if world > 1 else data
        loader = DataLoader(shard, batch_size=batch_size, shuffle=False)
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
    if world > 1 and not isinstance(data, DataLoader):
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
    *,
    device: str | torch.device = "auto",
    teacher: nn.Module | None = None,
    distill: bool = False,
    temperature: float = 4.0,
    max_samples: int = 20_000,
    max_iter: int = 50,
    batch_size: int = 256,
    seed: int = 0,
) -> Calibration:
    """Fit only α and the bias of the fixed head, backbone frozen, on features computed once.

    The head's input features are captured in one eval-mode pass (at most `max_samples` samples, a seeded
    random subset), the head's fixed transform z = V·x̂ (S, C) is cached, and the convex problem
    min over (α, b) of mean CE(α·z + b, y) is solved with L-BFGS — seconds even for many classes.
    A fixed α (a buffer) or a missing bias is left alone. Under torch.distributed each rank takes a shard of
    the subset and the loss and gradients are summed across ranks, so all ranks end with the same α and b.

    Args:
        model: the model holding `head` (already swapped).
        head: the fixed head (parameter `scale` (0-dim), parameter `bias` (C,) or None).
        train_data: (x, y) training samples; y = -1 everywhere for unlabelled data (then `distill` is needed).
        device: where to compute.
        teacher: the original model; its logits are the targets when `distill` (KL on softened logits).
        distill: fit to the teacher's softened logits, plus CE when labelled (equal weights).
        temperature: softening temperature of the KL.
        max_samples: most training samples used (memory: S×N features and S×C cached outputs).
        max_iter: L-BFGS iterations.
        batch_size: batch size of the feature pass.
        seed: seed of the subset.

    Returns:
        Calibration with the fitted α and the loss before and after.

    Raises:
        DataError: unlabelled data without `distill` and a teacher.
        TrainingError: `head` is not part of `model`, or the fit produced a NaN/inf loss.
    """
    t0 = time.perf_counter()
    device = resolve_device(device)
    if not any(m is head for m in model.modules()):
        raise TrainingError("the head to calibrate is not a submodule of the model; pass the swapped model's head")
    if distill and teacher is None:
        raise TrainingError("distillation needs the original model as teacher; pass teacher=")
    world, rank = _world()
    n = len(train_data)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_samples].sort().values
    idx = idx[rank::world]
    feats, labels, t_logits = _capture_head_inputs(model, head, Subset(train_data, idx.tolist()), device,
                                                   batch_size=batch_size, teacher=teacher if distill else None)
    labelled = bool((labels >= 0).any())
    if world > 1:
        flag = torch.tensor([float(labelled)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        labelled = bool(flag.item())
    if not labelled and not distill:
        raise DataError("the data has no labels; pass --distill so the original model supplies the targets")

    params = [p for name, p in head.named_parameters(recurse=False) if name in ("scale", "bias") and p.requires_grad]
    with torch.no_grad():  # z = V·x̂ (S, C): the head's fixed transform, computed once
        z = torch.cat([head.raw(f) for f in feats.split(batch_size)])
    total = torch.tensor([float(len(z))], device=device)
    if world > 1:
        dist.all_reduce(total)
    scale_bias = _scale_bias(head)

    def objective() -> Tensor:
        logits = scale_bias.get("scale", 1.0) * z + scale_bias.get("bias", 0.0)
        per = _per_sample_loss(logits, labels, t_logits, labelled=labelled, distill=distill,
                               temperature=temperature, distill_weight=0.5)
        return per.sum() / total

    def closure() -> Tensor:
        for p in params:
            p.grad = None
        loss = objective()
        if params:
            loss.backward()
        if world > 1:  # sum loss and gradients over the shards: every rank takes the same L-BFGS steps
            flat = torch.cat([loss.detach().reshape(1)] + [p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            offset = 1
            for p in params:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
            return flat[0]
        return loss.detach()

    before = float(closure())
    if params:
        torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                          tolerance_grad=1e-9, tolerance_change=1e-12).step(closure)
    after = float(closure())
    for p in params:
        p.grad = None
    if not math.isfinite(after):
        raise TrainingError(f"calibration diverged (loss {after}); check the data's normalisation (mean/std)")
    return Calibration(scale=_scale_value(head), loss_before=before, loss_after=after, samples=int(total.item()),
                       seconds=time.perf_counter() - t0)


def _scale_bias(head: nn.Module) -> dict[str, Tensor]:
    """The head's α (`scale`, parameter or buffer) and `bias` when present."""
    state = dict(head.named_parameters(recurse=False)) | dict(head.named_buffers(recurse=False))
    return {k: state[k] for k in ("scale", "bias") if state.get(k) is not None}


@torch.no_grad()
def _capture_head_inputs(model: nn.Module, head: nn.Module, data: Dataset, device: torch.device, *,
                         batch_size: int, teacher: nn.Module | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Run the model once in eval mode: the head's inputs (S, N), labels (S,), teacher logits (S, C)."""
    feats: list[Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: feats.append(args[0].detach()))
    models = [m for m in (model, teacher) if m is not None]
    modes = [m.training for m in models]
    labels, t_logits = [], []
    try:
        for m in models:
            m.to(device).eval()
        for x, y in DataLoader(data, batch_size=batch_size, shuffle=False):
            x = x.to(device)
            model(x)
            labels.append(y.to(device))
            if teacher is not None:
                t_logits.append(logits_of(teacher(x)).float())
    finally:
        hook.remove()
        for m, mode in zip(models, modes):
            m.train(mode)
    if not feats:
        return (torch.zeros(0, getattr(head, "in_features", 0), device=device),
                torch.zeros(0, dtype=torch.int64, device=device),
                torch.zeros(0, getattr(head, "num_classes", 0), device=device) if teacher is not None else None)
    return torch.cat(feats), torch.cat(labels), torch.cat(t_logits) if teacher is not None else None


# ---------------------------------------------------------------------------------------------- fine-tuning


def finetune(
    model: nn.Module,
    head: nn.Module,
    data: DataBundle,
    config: FinetuneConfig,
    *,
    teacher: nn.Module | None = None,
    progress: Any = None,
) -> FinetuneResult:
    """Fine-tune the backbone, α and the bias (the head's fixed transform has no parameters).

    Trains every parameter of `model` with requires_grad (the head's α and bias included; weight decay on all of
    them), evaluates on `data.val` after each epoch, and writes `config.out_dir / CHECKPOINT_NAME` (model,
    optimizer, scheduler, epoch, RNG state) first for the starting point and then after every epoch. With
    `config.resume` it continues from that checkpoint and stops after `config.epochs` epochs in all.
    Calibrate first (`calibrate`); the model is modified in place and left in eval mode on `device`.

    Args:
        model: the swapped model.
        head: its fixed head (for α in the history).
        data: training and validation data (`load_data`, checked with `check_data`).
        config: the options.
        teacher: the original model; needed when `config.distill` (and always for unlabelled data).
        progress: a `rich.progress.Progress` (or anything with its `add_task(description, total=, **fields)` /
            `update(task, advance=, **fields)`): one task per epoch with fields `loss`, `acc` (None when
            unlabelled) and `samples_per_s`; only rank 0 reports. None: silent.

    Returns:
        FinetuneResult with one EpochStats per epoch.

    Raises:
        TrainingError: NaN/inf loss (the last good checkpoint is kept), a checkpoint that cannot be resumed,
            or options that do not fit (no teacher for distillation, class-lr under torchrun).
        DataError: unlabelled data without distillation.
    """
    device = resolve_device(config.device)
    world, rank = _world()
    _check_config(config, data, teacher, world)
    ckpt = Path(config.out_dir) / CHECKPOINT_NAME if config.out_dir is not None else None
    state = _resume_state(ckpt, config, world, rank) if config.resume else None
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    if state is not None:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise TrainingError(f"checkpoint {ckpt} does not fit this model ({first}); run without --resume") from None

    sampler_gen = torch.Generator()
    if world > 1:
        sampler = DistributedSampler(data.train, num_replicas=world, rank=rank, shuffle=True, seed=config.seed)
    else:
        sampler = RandomSampler(data.train, generator=sampler_gen)
    n_per_rank = len(sampler)
    loader = DataLoader(data.train, batch_size=config.batch_size, sampler=sampler, num_workers=config.num_workers,
                        drop_last=n_per_rank > config.batch_size, pin_memory=device.type == "cuda")
    steps_per_epoch = len(loader)
    lr = config.lr if config.lr is not None else (1e-3 if config.optimizer == "adamw" else 0.01)
    opt = _build_optimizer(model, config, lr=lr, num_classes=_num_classes(head, data),
                           steps_per_epoch=steps_per_epoch)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, config.epochs * steps_per_epoch))
             if config.cosine else None)
    history = [EpochStats(**{**h, "val": Metrics(**h["val"]) if h["val"] else None})
               for h in (state["history"] if state else [])]
    start = state["epoch"] if state else 0
    if state is not None and state["optimizer"] is not None:
        opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
    ddp = (nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
           if world > 1 else model)
    class_lr = hasattr(opt, "backward_and_step")

    cuda_devices = [device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        if state is None:
            _save_checkpoint(ckpt, model, None, None, 0, history, config, world, rank)
        for epoch in range(start, config.epochs):
            sampler_gen.manual_seed(config.seed * 1_000_003 + epoch)  # shuffle order = f(seed, epoch)
            torch.manual_seed((config.seed * 1_000_003 + epoch) * 1_009 + rank)  # dropout = f(seed, epoch, rank)
            if world > 1:
                sampler.set_epoch(epoch)
            model.train()
            task = None
            if progress is not None and rank == 0:
                task = progress.add_task(f"epoch {epoch + 1}/{config.epochs}", total=steps_per_epoch,
                                         loss=float("nan"), acc=None, samples_per_s=0.0)
            sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss·B, correct, labelled, samples
            t0 = time.perf_counter()
            for step, (x, y) in enumerate(loader):
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                logits = logits_of(ddp(x))  # (B, C)
                t_logits = None
                if config.distill:
                    with torch.no_grad():
                        t_logits = logits_of(teacher(x)).float()
                per = _per_sample_loss(logits.float(), y, t_logits, labelled=data.labelled, distill=config.distill,
                                       temperature=config.temperature, distill_weight=config.distill_weight)
                loss = per.mean()
                if class_lr:
                    _raise_if_not_finite(loss.detach(), world, epoch, step, ckpt)
                    opt.backward_and_step(per, y)
                else:
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    _raise_if_not_finite(loss.detach(), world, epoch, step, ckpt)
                    opt.step()
                if sched is not None:
                    sched.step()
                with torch.no_grad():
                    sums[0] += loss.detach().double() * len(x)
                    if data.labelled:
                        sums[1] += (logits.argmax(1) == y).sum()
                        sums[2] += len(y)
                    sums[3] += len(x)
                if task is not None:
                    loss_sum, correct, labelled_n, seen = sums.tolist()
                    progress.update(task, advance=1, loss=loss_sum / seen,
                                    acc=correct / labelled_n if labelled_n else None,
                                    samples_per_s=seen * world / (time.perf_counter() - t0))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            if world > 1:
                dist.all_reduce(sums)
                for b in model.buffers():  # BatchNorm statistics: take rank 0's so all ranks evaluate the same
                    dist.broadcast(b, 0)
            loss_sum, correct, labelled_n, seen = sums.tolist()
            val = (evaluate(model, data.val, device=device, reference_model=teacher,
                            batch_size=config.eval_batch_size) if data.val is not None else None)
            history.append(EpochStats(
                epoch=epoch + 1, loss=loss_sum / max(seen, 1), accuracy=correct / labelled_n if labelled_n else None,
                val=val, lr=opt.param_groups[0]["lr"], scale=_scale_value(head), seconds=seconds,
                samples_per_s=seen / seconds if seconds > 0 else 0.0))
            _save_checkpoint(ckpt, model, opt, sched, epoch + 1, history, config, world, rank)
    model.eval()
    return FinetuneResult(
        history=history,
        final=history[-1].val if history else None,
        device=str(device),
        world_size=world,
        resumed_from_epoch=start if state is not None else None,
        checkpoint=ckpt,
    )


def _check_config(config: FinetuneConfig, data: DataBundle, teacher: nn.Module | None, world: int) -> None:
    if config.epochs < 0 or config.batch_size < 1:
        raise TrainingError(f"need epochs >= 0 and batch size >= 1, got {config.epochs} and {config.batch_size}")
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
        from fyc_convert.class_lr import build_class_lr

        return build_class_lr(model, num_classes=num_classes, lr=lr, eta_mu=config.class_lr_eta_mu,
                              cutoff_epoch=config.class_lr_cutoff, layers=config.class_lr_layers,
                              steps_per_epoch=steps_per_epoch)
    return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _per_sample_loss(logits: Tensor, y: Tensor, t_logits: Tensor | None, *, labelled: bool, distill: bool,
                     temperature: float, distill_weight: float) -> Tensor:
    """(B,) loss: CE with labels; with `distill` T²·KL(teacher ‖ student) on logits / T, mixed with CE."""
    ce = F.cross_entropy(logits, y, reduction="none") if labelled else None
    if not distill:
        return ce
    t = temperature
    kl = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(t_logits / t, 1), log_target=True,
                  reduction="none").sum(1) * t * t
    return kl if ce is None else (1 - distill_weight) * ce + distill_weight * kl


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


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


# ---------------------------------------------------------------------------------------------- checkpoints


def _save_checkpoint(path: Path | None, model: nn.Module, opt, sched, epoch: int, history: list[EpochStats],
                     config: FinetuneConfig, world: int, rank: int) -> None:
    """Rank 0 writes model/optimizer/scheduler/epoch/history atomically (no collective: ranks may differ in path)."""
    if path is None or rank != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": _FORMAT,
        "epoch": epoch,
        "world_size": world,
        "config": {k: getattr(config, k) for k in _RESUME_FIELDS},
        "model": model.state_dict(),
        "optimizer": opt.state_dict() if opt is not None else None,
        "scheduler": sched.state_dict() if sched is not None else None,
        "history": [asdict(h) for h in history],
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _resume_state(path: Path | None, config: FinetuneConfig, world: int, rank: int) -> dict:
    """Rank 0 reads the checkpoint and sends it (or its error) to every rank."""
    payload: list[Any] = [None]
    if rank == 0:
        try:
            payload = [_load_checkpoint(path, config, world)]
        except TrainingError as e:
            payload = [str(e)]
    if world > 1:
        dist.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], str):
        raise TrainingError(payload[0])
    return payload[0]


def _load_checkpoint(path: Path | None, config: FinetuneConfig, world: int) -> dict:
    """Read the checkpoint to resume from and check that it fits this run."""
    if path is None:
        raise TrainingError("--resume needs the output folder of the interrupted run")
    if not path.is_file():
        raise TrainingError(f"no checkpoint to resume at {path}; run without --resume to start over")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainingError(f"cannot read checkpoint {path} ({type(e).__name__}); delete it and run without --resume")
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise TrainingError(f"{path} is not a fyc-convert fine-tuning checkpoint; run without --resume")
    saved = state["config"]
    for k in _RESUME_FIELDS:
        now = getattr(config, k)
        if saved.get(k) != now:
            raise TrainingError(f"checkpoint {path} was written with {k}={saved.get(k)!r} but this run has "
                                f"{k}={now!r}; resume with the same options or run without --resume")
    if state["world_size"] != world:
        raise TrainingError(f"checkpoint {path} was written by {state['world_size']} process(es), this run has "
                            f"{world}; resume with the same --nproc_per_node")
    if state["epoch"] > config.epochs:
        raise TrainingError(f"checkpoint {path} is at epoch {state['epoch']} > epochs {config.epochs}")
    return state


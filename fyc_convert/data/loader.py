"""Batches on the device: one DataLoader builder for training, evaluation, calibration and feature capture.

    stream = make_loader(bundle.train, batch_size=64, device=device, workers=2, shuffle=True, seed=0)
    for epoch in range(3):
        stream.set_epoch(epoch)           # order and augmentation = f(seed, epoch)
        for x, y in stream:               # x: float32 (B, C, H, W) on `device`, normalised; y: int64 (B,)
            ...

Datasets that stream (`data.ImageFolderDataset`, `data.NpyDataset`) decode in the DataLoader's worker
processes and return uint8/raw samples; their `normalize` turns a batch into float32 after it reached the device.
A sample they cannot read comes back as a `BadSample` instead of an exception, so it never crosses the worker
boundary as a traceback: here, in the main process, it becomes a one-line `DataError` naming the file, or (with
`skip_bad_images`) it is dropped from its batch and recorded in the dataset's `skipped` set.

Determinism: the order is a seeded permutation per epoch (DistributedSampler's under torch.distributed), and each
sample's augmentation is drawn from its own RNG seeded with (seed, epoch, index); the loader's own generator is
private, so neither the number of workers nor a resume changes what a step sees, and the global RNG is not drawn.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    Sampler,
    default_collate,
)

from fyc_convert.distributed import world as world_and_rank
from fyc_convert.errors import DataError

__all__ = ["BadSample", "BatchStream", "default_workers", "make_loader", "random_subset", "sample_inputs",
           "sample_seed", "subset_loader"]


@dataclass(frozen=True)
class BadSample:
    """What a streaming dataset returns for a sample it cannot read (instead of raising in a worker)."""

    where: str  # the file (or "file sample i") that failed
    message: str  # one line: what is wrong and what to do
    skippable: bool  # True for unreadable images (`skip_bad_images` may drop them); False for e.g. NaN inputs


def random_subset(n: int, k: int, *, seed: int) -> list[int]:
    """A seeded random subset of min(k, n) indices of range(n), in ascending order (so files are read in order).

    Calibration, the row-assignment features and the verification inputs take their samples from here: data
    sorted by class would bias the *first* k samples.
    """
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max(0, k)]
    return idx.sort().values.tolist()


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation in one epoch (distinct for every (seed, epoch, index))."""
    return ((seed * 1_000_003 + epoch) << 32) + index


def default_workers() -> int:
    """DataLoader workers per process for streaming data: the cores this process may use, shared between the
    processes of this machine under torch.distributed, less one for the training process itself (1 to 8)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    world, _ = world_and_rank()
    local = min(world, torch.cuda.device_count()) if world > 1 and torch.cuda.is_available() else world
    return max(1, min(8, cores // max(1, local) - 1))


class _EpochSampler(Sampler):
    """Indices in a seeded order per epoch — or (index, sample seed) pairs when the dataset augments.

    One process: torch.randperm with a generator seeded from (seed, epoch), like RandomSampler. Under
    torch.distributed: DistributedSampler(seed=seed) with set_epoch, each rank taking its shard.
    """

    def __init__(self, n: int, *, seed: int, shuffle: bool, world: int, rank: int, with_seeds: bool,
                 indices: Sequence[int] | None = None):
        self.seed, self.shuffle, self.with_seeds = seed, shuffle, with_seeds
        self.indices = list(indices) if indices is not None else None  # read these dataset indices (else range(n))
        self.size = len(self.indices) if self.indices is not None else n
        self.epoch = 0
        self.dist = (DistributedSampler(range(self.size), num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
                     if world > 1 else None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.dist is not None:
            self.dist.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dist) if self.dist is not None else self.size

    def __iter__(self) -> Iterator[Any]:
        if self.dist is not None:
            order: Sequence[int] = list(self.dist)
        elif self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)  # shuffle order = f(seed, epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = range(self.size)
        for i in order:
            j = self.indices[i] if self.indices is not None else i
            yield (j, sample_seed(self.seed, self.epoch, j)) if self.with_seeds else j


def _collate(samples: list[Any]) -> tuple[Any, list[BadSample]]:
    """Stack the good samples (torch's default_collate), set the bad ones aside for the main process."""
    good = [s for s in samples if not isinstance(s, BadSample)]
    bad = [s for s in samples if isinstance(s, BadSample)]
    return (default_collate(good) if good else None), bad


class BatchStream:
    """Iterates (x, y) batches on the device; see the module docstring. `len()` is the number of batches.

    Attributes:
        loader: the underlying DataLoader (workers, pinning, prefetching).
        data_seconds: seconds spent waiting for batches (decoding, transfer, normalisation) since `set_epoch`.
        dataset: the dataset it reads.
    """

    def __init__(self, loader: DataLoader, dataset: Dataset, sampler: _EpochSampler, *, device: torch.device,
                 channels_last: bool):
        self.loader, self.dataset, self.sampler = loader, dataset, sampler
        self.device, self.channels_last = device, channels_last
        self.normalize = getattr(dataset, "normalize", None)
        self.skip_bad = bool(getattr(dataset, "skip_bad_images", False))
        self.data_seconds = 0.0

    def set_epoch(self, epoch: int) -> None:
        """Seed the order and the augmentation for `epoch` (call before iterating); resets `data_seconds`."""
        self.sampler.set_epoch(epoch)
        self.data_seconds = 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        non_blocking = self.device.type == "cuda"
        t = time.perf_counter()
        for batch, bad in self._start():
            self._handle_bad(bad)
            if batch is None:  # every sample of the batch was skipped
                continue
            x, y = batch[0], batch[1]
            del batch  # the stacked uint8 batch lives only until normalised
            x = x.to(self.device, non_blocking=non_blocking)
            y = y.to(self.device, non_blocking=non_blocking)
            if self.normalize is not None:
                x = self.normalize(x)
            if self.channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            self.data_seconds += time.perf_counter() - t
            yield x, y
            t = time.perf_counter()

    def _start(self) -> Iterator[Any]:
        """The DataLoader's iterator; its workers are forked here, with the garbage collector's objects frozen.

        A forked worker that runs a collection would otherwise free this process's uncollected garbage, and
        destructors of native objects whose threads did not survive the fork then block forever (an onnxruntime
        session's thread pool does: tests/test_loader.py reproduces it). Frozen objects are never collected in
        the worker (their pages also stay shared); this process unfreezes them as soon as the workers exist.
        """
        if self.loader.num_workers == 0:
            return iter(self.loader)
        gc.freeze()
        try:
            return iter(self.loader)
        finally:
            gc.unfreeze()

    def _handle_bad(self, bad: list[BadSample]) -> None:
        for b in bad:
            if not (b.skippable and self.skip_bad):
                raise DataError(b.message)
            self.dataset.skipped.add(b.where)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    device: torch.device,
    workers: int | None = None,
    indices: Sequence[int] | None = None,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    distributed: bool = False,
    channels_last: bool = False,
) -> BatchStream:
    """The one way batches are made: a DataLoader over `dataset` (or its `indices`) wrapped in a BatchStream.

    Args:
        dataset: (x, y) samples: a TensorDataset, or a streaming dataset of `fyc_convert.data.datasets`.
        batch_size: samples per batch (per process under torch.distributed).
        device: where batches go (pinned memory and persistent workers on CUDA).
        workers: DataLoader worker processes; None: 0 for in-memory data, `default_workers()` for streaming data.
        indices: read only these samples (in this order unless `shuffle`).
        shuffle: a seeded new order every epoch (`BatchStream.set_epoch`), and per-sample augmentation seeds.
        seed: seed of the order and of the augmentation.
        drop_last: drop the last incomplete batch.
        distributed: shard across the ranks of torch.distributed (DistributedSampler when shuffling, else
            every world-th sample of the order).
        channels_last: make 4-D batches channels_last (for conv nets on CUDA).

    Returns:
        A BatchStream yielding (x float32 normalised, y int64) on `device`.
    """
    world, rank = world_and_rank() if distributed else (1, 0)
    n = len(indices) if indices is not None else len(dataset)
    if world > 1 and not shuffle:  # evaluation shards: every world-th sample, no padding (sums are exact)
        indices = list(indices if indices is not None else range(n))[rank::world]
        world, rank, n = 1, 0, len(indices)
    streaming = getattr(dataset, "streaming", False)
    if workers is None:
        workers = default_workers() if streaming else 0
    if workers < 0:
        raise DataError(f"workers must be >= 0, got {workers}; pass --workers 0 to read data in the main process")
    sampler = _EpochSampler(len(dataset), seed=seed, shuffle=shuffle, world=world, rank=rank, indices=indices,
                            with_seeds=shuffle and getattr(dataset, "takes_sample_seeds", False))
    cuda = device.type == "cuda"
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=_collate,
        drop_last=drop_last, pin_memory=cuda, persistent_workers=cuda and workers > 0,
        generator=torch.Generator().manual_seed(seed),  # workers' base seed: not drawn from the global RNG
    )
    return BatchStream(loader, dataset, sampler, device=device, channels_last=channels_last)


def subset_loader(dataset: Dataset, n: int, *, seed: int, batch_size: int = 256, device: torch.device | None = None,
                  workers: int | None = None) -> BatchStream:
    """Batches of a seeded random subset of at most `n` samples (`random_subset`), e.g. the features for the
    head's row assignment: `capture_features(model, layer, subset_loader(bundle.plain_train, 2048, seed=0))`."""
    return make_loader(dataset, batch_size=batch_size, device=device or torch.device("cpu"), workers=workers,
                       indices=random_subset(len(dataset), n, seed=seed))


def sample_inputs(dataset: Dataset, n: int, *, seed: int, workers: int | None = None) -> Tensor:
    """(min(n, S), *sample_shape) float32 model inputs of a seeded random subset, on the CPU (keep n small: they
    are held in memory; e.g. the real inputs of ONNX verification)."""
    xs = [x for x, _ in subset_loader(dataset, n, seed=seed, workers=workers)]
    return torch.cat(xs) if xs else torch.zeros(0)

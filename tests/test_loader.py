"""Tests of fyc_convert.data.loader: seeded subsets and orders, sharding, workers, device batches, bad samples."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset, RandomSampler, TensorDataset

from fyc_convert.data.loader import (
    BadSample,
    _EpochSampler,
    default_workers,
    make_loader,
    random_subset,
    sample_inputs,
    sample_seed,
    subset_loader,
)
from fyc_convert.data.transforms import Normalize
from fyc_convert.errors import DataError

CPU = torch.device("cpu")


def test_random_subset_is_seeded_sorted_and_bounded():
    a = random_subset(1000, 50, seed=3)
    assert a == random_subset(1000, 50, seed=3) != random_subset(1000, 50, seed=4)
    assert a == sorted(a) and len(set(a)) == 50 and all(0 <= i < 1000 for i in a)
    assert max(a) > 500  # not the first 50: data sorted by class is sampled across classes
    assert random_subset(10, 50, seed=0) == list(range(10))
    assert random_subset(0, 5, seed=0) == []


def test_subset_helpers_read_the_seeded_subset_normalised():
    ds = _Raw(skip=True)
    x = sample_inputs(ds, 3, seed=2)
    idx = [i for i in random_subset(6, 3, seed=2) if i != 3]  # sample 3 is unreadable (skipped)
    torch.testing.assert_close(x[:, 0, 0, 0], (torch.tensor(idx, dtype=torch.float32) / 255 - 0.5) / 0.5)
    assert [y for _, ys in subset_loader(ds, 3, seed=2, batch_size=1) for y in ys.tolist()] == idx


def test_sample_seeds_are_distinct():
    seeds = {sample_seed(s, e, i) for s in range(3) for e in range(4) for i in range(500)}
    assert len(seeds) == 3 * 4 * 500


def test_epoch_order_is_randomsampler_with_a_seeded_generator():
    s = _EpochSampler(20, seed=5, shuffle=True, world=1, rank=0, with_seeds=False)
    for epoch in (0, 3):
        s.set_epoch(epoch)
        g = torch.Generator().manual_seed(5 * 1_000_003 + epoch)
        assert list(s) == list(RandomSampler(range(20), generator=g))
    s.set_epoch(3)
    again = list(s)
    s.set_epoch(2)
    assert list(s) != again


def test_distributed_shards_cover_the_data_and_seeds_follow_the_index():
    shards = []
    for rank in range(2):
        s = _EpochSampler(11, seed=0, shuffle=True, world=2, rank=rank, with_seeds=True)
        s.set_epoch(1)
        shards.append(list(s))
    assert len(shards[0]) == len(shards[1]) == 6  # DistributedSampler pads to an equal share
    assert {i for shard in shards for i, _ in shard} == set(range(11))
    assert all(seed == sample_seed(0, 1, i) for shard in shards for i, seed in shard)


def test_make_loader_over_tensors_with_and_without_workers():
    x = torch.arange(40, dtype=torch.float32).reshape(20, 2)
    y = torch.arange(20)
    ds = TensorDataset(x, y)
    plain = list(make_loader(ds, batch_size=6, device=CPU))
    assert [len(b[1]) for b in plain] == [6, 6, 6, 2]
    assert torch.equal(torch.cat([b[0] for b in plain]), x)
    runs = []
    for workers in (0, 2):
        stream = make_loader(ds, batch_size=6, device=CPU, workers=workers, shuffle=True, seed=1, drop_last=True)
        stream.set_epoch(4)
        runs.append(torch.cat([b[1] for b in stream]))
    assert torch.equal(runs[0], runs[1]) and len(runs[0]) == 18 and not torch.equal(runs[0], y[:18])
    sub = torch.cat([b[1] for b in make_loader(ds, batch_size=4, device=CPU, indices=[3, 1, 7])])
    assert sub.tolist() == [3, 1, 7]


def test_make_loader_does_not_draw_from_the_global_rng():
    ds = TensorDataset(torch.zeros(8, 1), torch.zeros(8, dtype=torch.int64))
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    for workers in (0, 1):
        stream = make_loader(ds, batch_size=4, device=CPU, workers=workers, shuffle=True)
        list(stream)
    assert torch.equal(torch.rand(2), expected)


class _Raw(Dataset):
    """uint8 images (1, 2, 2), sample i filled with i; sample 3 unreadable; a `normalize` like the image folders'."""

    streaming = True
    takes_sample_seeds = False

    def __init__(self, skip: bool):
        self.normalize = Normalize(scale=1 / 255, mean=[0.5], std=[0.5], sample_shape=(1, 2, 2))
        self.skip_bad_images, self.skipped = skip, set()

    def __len__(self):
        return 6

    def __getitem__(self, i):
        if i == 3:
            return BadSample("file3.png", "cannot read image file3.png: broken", skippable=True)
        return torch.full((1, 2, 2), i, dtype=torch.uint8), i


def test_batches_are_normalised_channels_last_and_timed():
    stream = make_loader(_Raw(skip=True), batch_size=2, device=CPU, channels_last=True)
    batches = list(stream)
    x = torch.cat([b[0] for b in batches])
    assert x.dtype == torch.float32 and x.shape == (5, 1, 2, 2)
    torch.testing.assert_close(x[:, 0, 0, 0], (torch.tensor([0.0, 1, 2, 4, 5]) / 255 - 0.5) / 0.5)
    assert all(b[0].is_contiguous(memory_format=torch.channels_last) for b in batches)
    assert stream.data_seconds > 0
    stream.set_epoch(1)
    assert stream.data_seconds == 0.0


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_raise_one_line_in_the_main_process_or_are_skipped(workers):
    with pytest.raises(DataError, match=r"^cannot read image file3.png: broken$"):
        list(make_loader(_Raw(skip=False), batch_size=2, device=CPU, workers=workers))
    ds = _Raw(skip=True)
    ys = torch.cat([b[1] for b in make_loader(ds, batch_size=2, device=CPU, workers=workers)])
    assert ys.tolist() == [0, 1, 2, 4, 5] and ds.skipped == {"file3.png"}
    only_bad = list(make_loader(_Raw(skip=True), batch_size=1, device=CPU, indices=[3, 4]))
    assert [b[1].tolist() for b in only_bad] == [[4]]  # a batch with nothing left is dropped


@pytest.mark.slow
def test_workers_do_not_free_the_parents_garbage():
    # a forked worker that collected an onnxruntime session left in a cycle used to block forever
    script = Path(__file__).with_name("_fork_gc_worker.py")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the script and its hung worker
        proc.communicate()
        pytest.fail("a DataLoader worker hung freeing the parent's garbage (onnxruntime session destructor)")
    assert proc.returncode == 0 and out.strip() == "ok 4", err[-2000:]


def test_default_workers_and_bad_workers():
    assert 1 <= default_workers() <= 8
    assert make_loader(_Raw(skip=True), batch_size=2, device=CPU).loader.num_workers == default_workers()
    assert make_loader(TensorDataset(torch.zeros(2, 1)), batch_size=2, device=CPU).loader.num_workers == 0
    with pytest.raises(DataError, match="workers must be >= 0"):
        make_loader(_Raw(skip=True), batch_size=2, device=CPU, workers=-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_are_pinned_and_on_the_device():
    stream = make_loader(_Raw(skip=True), batch_size=2, device=torch.device("cuda"), workers=1)
    assert stream.loader.pin_memory and stream.loader.persistent_workers
    x, y = next(iter(stream))
    assert x.device.type == y.device.type == "cuda" and x.dtype == torch.float32

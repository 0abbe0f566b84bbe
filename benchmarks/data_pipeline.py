"""The streaming data pipeline: memory of a fine-tuning epoch vs data size, loader and training throughput.

Data: generated 320×240 JPEGs (smooth random shapes plus noise, ~15 KB each), 10 classes, in
`root/train/<class>/` folders; the model input is 224×224 (random-resized crop + flip for training, as
`--data DIR` does by default), normalised with ImageNet's mean/std. Model: a small conv net (stride-4 stem,
BatchNorm, two more convs, global pool, a HadamardHead), so that decoding, not the model, is most of the work
on a 2-core CPU; one torch thread in the training process.

1. Peak memory of one fine-tuning epoch (`fyc_convert.train.finetune`, one DataLoader worker) over 1,000 and over
   20,000 images, each in a fresh process: the memory of the process tree (training process + workers)
   sampled every 0.1 s, summed as RSS and as USS (pages unique to the tree: what it would free; unlike PSS it
   does not move when other processes on the machine map the same torch libraries), and the training
   process's own peak (ru_maxrss). Target: the larger within 15% of the smaller (constant memory).
   `--eager-src OLD_TREE` also measures the eager loader of an older checkout (e.g. `git archive 8089556`),
   which decoded every image into one float32 tensor, on the 1,000 images.
2. Throughput of the loader alone (images/s through `make_loader`, augmenting, batch 64) with 1 and 2 workers.
3. Throughput of a training epoch: `finetune` (1 epoch, no validation) beside a plain torch loop over the same
   dataset (torch DataLoader, normalise, forward, cross-entropy, backward, SGD + cosine step), interleaved,
   images/s and the ratio (goal >= 0.95); the same for in-memory tensors (no decoding: the model is the
   bottleneck, so the loop's own overhead shows). Each row alternates which loop runs first. Two rates per row:
   wall-clock images/s of the epoch, and images per CPU-second of the training process (the whole call, setup
   included, workers not counted): on shared cores the second is the steadier measure of the loop's own cost.

4. With `--long N`: one epoch over N synthetic uint8 samples (made in the worker, no decoding), the training
   process's RSS/USS every 150 steps and its peak so far: memory stays flat over a long run.

    python benchmarks/data_pipeline.py [--root /tmp/fyc_bench_images] [--sizes 1000 20000] [--repeats 3]
                                       [--eager-src /tmp/base] [--skip-rss] [--skip-throughput] [--long 96000]

Prints medians and ratios; the numbers quoted in the README's Data section come from this script.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLASSES = 10
SIZE = (320, 240)  # (width, height) of the generated JPEGs
INPUT = 224
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BATCH = 64


# ---------------------------------------------------------------------------------------------- data


def generate(root: Path, n: int) -> Path:
    """root/n<n>/train/<class>/<i>.jpg, written once (a marker file says the set is complete)."""
    from PIL import Image, ImageDraw

    out = root / f"n{n}"
    done = out / ".complete"
    if done.exists():
        return out
    rng = np.random.default_rng(n)
    for i in range(n):
        c = i % CLASSES
        d = out / "train" / f"class_{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        base = np.array([25 * c, 255 - 25 * c, 128], dtype=np.int16)
        img = Image.new("RGB", SIZE, tuple(int(v) for v in base))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = rng.integers(0, SIZE[0]), rng.integers(0, SIZE[1])
            x1, y1 = x0 + rng.integers(20, 160), y0 + rng.integers(20, 120)
            draw.ellipse((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        a = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (SIZE[1], SIZE[0], 3))
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(d / f"{i:06d}.jpg", quality=85)
    done.touch()
    return out


def _model(num_classes: int):
    import torch
    from torch import nn

    from fyc_convert.head.heads import HadamardHead

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 7, stride=4, padding=3, bias=False), nn.BatchNorm2d(16), nn.ReLU(),  # (B, 16, 56, 56)
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),  # (B, 32, 28, 28)
        nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),  # (B, 64, 14, 14)
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (B, 64)
    )
    head = HadamardHead(64, num_classes)
    model.append(head)
    return model, head


def _bundle(folder: Path, workers: int):
    from fyc_convert.data.datasets import DataOptions, load_data

    return load_data(folder, DataOptions(val_split=0, input_shape=(3, INPUT, INPUT), mean=MEAN, std=STD,
                                         workers=workers))


# ---------------------------------------------------------------------------------------------- 1. memory


def child_epoch(folder: Path, eager_src: str | None) -> None:
    """One fine-tuning epoch in this (fresh) process; prints a JSON line with its own peak RSS and the time."""
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if eager_src:  # the older tree's eager loader: load_data decodes everything into one tensor
        sys.path.insert(0, eager_src)
        from fyc_convert.data.datasets import load_data
        from fyc_convert.train.finetune import FinetuneConfig, finetune

        bundle = load_data(folder, val_split=0, input_shape=(3, INPUT, INPUT), mean=MEAN, std=STD)
        config = FinetuneConfig(epochs=1, batch_size=BATCH, device="cpu")
    else:
        from fyc_convert.train.finetune import FinetuneConfig, finetune

        bundle = _bundle(folder, workers=1)
        config = FinetuneConfig(epochs=1, batch_size=BATCH, device="cpu")
    model, head = _model(bundle.num_classes)
    result = finetune(model, head, bundle, config)
    print(json.dumps({"maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "seconds": time.perf_counter() - t0, "images": len(bundle.train),
                      "images_per_s": result.history[0].samples_per_s,
                      "data_share": getattr(result.history[0], "data_share", float("nan"))}), flush=True)


def measure_epoch_memory(folder: Path, eager_src: str | None = None) -> dict:
    """Run `child_epoch` in a fresh process; sample the tree's RSS and USS every 0.1 s."""
    import psutil

    cmd = [sys.executable, __file__, "--child", str(folder)] + (["--eager-src", eager_src] if eager_src else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": eager_src or str(REPO)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peaks = {"rss": 0.0, "uss": 0.0}
    stop = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            rss = uss = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    info = p.memory_full_info()
                    rss, uss = rss + info.rss, uss + info.uss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
            peaks["rss"], peaks["uss"] = max(peaks["rss"], rss / 2**20), max(peaks["uss"], uss / 2**20)
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}): {err.strip().splitlines()[-1] if err.strip() else ''}")
    child = json.loads(out.strip().splitlines()[-1])
    return {"tree_rss_mib": peaks["rss"], "tree_uss_mib": peaks["uss"], **child}


class _Synthetic:
    """A streaming dataset of uint8 (3, 224, 224) samples made in the worker (no files, cheap): a long run's
    memory without the time of decoding."""

    streaming, takes_sample_seeds, skip_bad_images = True, False, False

    def __init__(self, n: int):
        from fyc_convert.data.transforms import Normalize

        self.n, self.labels, self.skipped = n, np.arange(n) % CLASSES, set()
        self.normalize = Normalize(scale=1 / 255, mean=MEAN, std=STD, sample_shape=(3, INPUT, INPUT))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        import torch

        g = torch.Generator().manual_seed(i)
        return torch.randint(0, 256, (3, INPUT, INPUT), generator=g, dtype=torch.uint8), int(self.labels[i])


def long_run(n: int, every: int = 150) -> None:
    """One epoch over n synthetic samples; the training process's RSS / USS every `every` steps and its peak."""
    import psutil
    import torch

    from fyc_convert.data.datasets import DataBundle
    from fyc_convert.train.finetune import FinetuneConfig, finetune

    torch.set_num_threads(1)
    bundle = DataBundle(train=_Synthetic(n), val=None, num_classes=CLASSES, input_shape=(3, INPUT, INPUT),
                        classes=None, labelled=True, source="synthetic", kind="images", workers=1)
    model, head = _model(CLASSES)
    me, t0, rows = psutil.Process(), time.perf_counter(), []

    class Probe:  # the progress interface: called once per step
        steps = 0

        def add_task(self, *a, **k) -> int:
            return 0

        def update(self, *a, **k) -> None:
            Probe.steps += 1
            if Probe.steps % every == 0:
                rows.append((Probe.steps, me.memory_info().rss / 2**20, me.memory_full_info().uss / 2**20,
                             resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter() - t0))

    finetune(model, head, bundle, FinetuneConfig(epochs=1, batch_size=BATCH, device="cpu"), progress=Probe())
    print(f"{'step':>8} {'RSS MiB':>8} {'USS MiB':>8} {'peak so far':>12} {'s':>6}")
    for step, rss, uss, peak, sec in rows:
        print(f"{step:>8,} {rss:>8.0f} {uss:>8.0f} {peak:>12.0f} {sec:>6.0f}")


# ---------------------------------------------------------------------------------------------- 2./3. throughput


def loader_rate(bundle, workers: int) -> float:
    """Images/s of make_loader alone (augmenting train view, batch 64), one pass after the workers start."""
    import torch

    from fyc_convert.data.loader import make_loader

    stream = make_loader(bundle.train, batch_size=BATCH, device=torch.device("cpu"), workers=workers, shuffle=True)
    stream.set_epoch(0)
    n, t0 = 0, time.perf_counter()
    for x, _ in stream:
        n += len(x)
    return n / (time.perf_counter() - t0)


def ours_rate(bundle) -> float:
    from fyc_convert.train.finetune import FinetuneConfig, finetune

    model, head = _model(bundle.num_classes)
    result = finetune(model, head, bundle, FinetuneConfig(epochs=1, batch_size=BATCH, device="cpu"))
    return result.history[0].samples_per_s


def plain_rate(bundle) -> float:
    """A plain torch training loop over the same dataset: what a user would write by hand."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    model, _ = _model(bundle.num_classes)
    loader = DataLoader(bundle.train, batch_size=BATCH, shuffle=True, num_workers=bundle.workers, drop_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=len(loader))
    norm = getattr(bundle.train, "normalize", None)
    model.train()
    n, t0 = 0, time.perf_counter()
    for x, y in loader:
        x = norm(x) if norm is not None else x
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        n += len(x)
    return n / (time.perf_counter() - t0)


def tensor_bundle(n: int):
    """In memory (no decoding): n random normalised (3, 112, 112) tensors, labels i mod 10."""
    import torch
    from torch.utils.data import TensorDataset

    from fyc_convert.data.datasets import DataBundle

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 112, 112, generator=g)
    y = torch.arange(n) % CLASSES
    return DataBundle(train=TensorDataset(x, y), val=None, num_classes=CLASSES, input_shape=(3, 112, 112),
                      classes=None, labelled=True, source="tensors", workers=0)


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", type=Path, default=Path("/tmp/fyc_bench_images"))
    p.add_argument("--sizes", type=int, nargs=2, default=[1000, 20000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eager-src", default=None)
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--long", type=int, default=0, help="also one epoch over this many synthetic samples, memory "
                                                        "every 150 steps (e.g. 96000: 1,500 steps)")
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--long-child", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        child_epoch(args.child, args.eager_src)
        return
    if args.long_child:
        long_run(args.long_child)
        return
    sys.path.insert(0, str(REPO))
    print(f"load average at start: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}"
          f" ({os.cpu_count()} cores)")
    t0 = time.perf_counter()
    small, large = (generate(args.root, n) for n in args.sizes)
    print(f"data: {args.sizes[0]:,} and {args.sizes[1]:,} JPEGs of {SIZE[0]}x{SIZE[1]} under {args.root} "
          f"({time.perf_counter() - t0:.0f} s incl. generation); model input 3x{INPUT}x{INPUT}, batch {BATCH}")

    if not args.skip_rss:
        print("\n1. peak memory of one fine-tuning epoch (fresh process each, 1 DataLoader worker)")
        print(f"{'images':>8} {'tree RSS MiB':>13} {'tree USS MiB':>13} {'main RSS MiB':>13} {'epoch s':>8} "
              f"{'img/s':>7} {'data share':>10}")
        rows = {}
        for n, folder in zip(args.sizes, (small, large)):
            r = rows[n] = measure_epoch_memory(folder)
            print(f"{n:>8,} {r['tree_rss_mib']:>13.0f} {r['tree_uss_mib']:>13.0f} {r['maxrss_mib']:>13.0f} "
                  f"{r['seconds']:>8.1f} {r['images_per_s']:>7.0f} {r['data_share']:>10.2f}")
        a, b = rows[args.sizes[0]], rows[args.sizes[1]]
        for key, name in (("tree_rss_mib", "tree RSS"), ("tree_uss_mib", "tree USS"), ("maxrss_mib", "main RSS")):
            ratio = b[key] / a[key]
            print(f"{name}: {args.sizes[1]:,} / {args.sizes[0]:,} = {ratio:.3f}  (target <= 1.15: "
                  f"{'met' if ratio <= 1.15 else 'NOT met'})")
        if args.eager_src:
            e = measure_epoch_memory(small, args.eager_src)
            print(f"eager loader of {args.eager_src} on {args.sizes[0]:,} images: "
                  f"tree RSS {e['tree_rss_mib']:.0f} MiB, "
                  f"USS {e['tree_uss_mib']:.0f} MiB, main RSS {e['maxrss_mib']:.0f} MiB, {e['seconds']:.1f} s")

    if not args.skip_throughput:
        import torch

        torch.set_num_threads(1)
        bundles = {w: _bundle(small, workers=w) for w in (1, 2)}
        print(f"\n2. loader alone on {args.sizes[0]:,} images (augmenting; median of {args.repeats}, interleaved)")
        rates: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(args.repeats):
            for w in (1, 2):
                rates[w].append(loader_rate(bundles[w], w))
        for w in (1, 2):
            print(f"  {w} worker{'s' if w > 1 else ' '}: {_median(rates[w]):7.0f} images/s  "
                  f"(runs: {', '.join(f'{r:.0f}' for r in rates[w])})")

        print(f"\n3. a training epoch, ours (finetune) beside a plain torch loop "
              f"(median of {args.repeats}, interleaved)")
        cases = {f"{args.sizes[0]:,} JPEGs, 1 worker": bundles[1],
                 "4,000 in-memory tensors 3x112x112": tensor_bundle(4000)}
        for name, bundle in cases.items():
            wall: dict[str, list[float]] = {"plain": [], "ours": []}
            cpu: dict[str, list[float]] = {"plain": [], "ours": []}
            runs = {"plain": plain_rate, "ours": ours_rate}
            for i in range(args.repeats):  # alternate which runs first, so drift in the load does not favour one
                for key in (("plain", "ours") if i % 2 == 0 else ("ours", "plain")):
                    c0 = time.process_time()
                    wall[key].append(runs[key](bundle))
                    cpu[key].append(len(bundle.train) / (time.process_time() - c0))
            for label, rates in (("wall", wall), ("cpu", cpu)):
                ratio = _median(rates["ours"]) / _median(rates["plain"])
                print(f"  {name if label == 'wall' else '':<36} {label:>4}: "
                      f"plain {_median(rates['plain']):6.0f} img/s, "
                      f"ours {_median(rates['ours']):6.0f} img/s, ratio {ratio:.3f} (goal >= 0.95: "
                      f"{'met' if ratio >= 0.95 else 'NOT met'}); runs plain "
                      f"{', '.join(f'{r:.0f}' for r in rates['plain'])}, "
                      f"ours {', '.join(f'{r:.0f}' for r in rates['ours'])}")
    if args.long:
        print(f"\n4. a long epoch: {args.long:,} synthetic uint8 samples made in 1 worker, training process memory "
              "(a fresh process)", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        subprocess.run([sys.executable, __file__, "--long-child", str(args.long)], env=env, check=True)
    print(f"\nload average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

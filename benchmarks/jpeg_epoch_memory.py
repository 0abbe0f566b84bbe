"""Peak memory of one fine-tuning epoch over a train/val JPEG folder vs the number of images (issue 26).

Generated 80×80 JPEGs (noise), 10 classes, a fifth in val/; 64×64 input, a small CNN with a Hadamard head,
batch 64, one torch thread; each size in a fresh process, its own peak RSS (ru_maxrss) and its DataLoader
workers' (RUSAGE_CHILDREN). Target: 8,000 images within 15% of 1,000.

    python benchmarks/jpeg_epoch_memory.py [--root /tmp/fyc_jpeg_epoch] [--workers 1]
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np


def gen(root: Path, n: int) -> Path:
    from PIL import Image

    out = root / f"n{n}"
    if (out / ".done").exists():
        return out
    rng = np.random.default_rng(n)
    for i in range(n):
        split = "val" if (i // 10) % 5 == 0 else "train"
        d = out / split / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        a = rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)
        Image.fromarray(a).save(d / f"{i:06d}.jpg", quality=85)
    (out / ".done").touch()
    return out


def child(folder: str, workers: int) -> None:
    import torch
    from torch import nn
    torch.set_num_threads(1)
    from fyc_convert.data.datasets import DataOptions, load_data
    from fyc_convert.head.heads import HadamardHead
    from fyc_convert.train.finetune import FinetuneConfig, finetune
    bundle = load_data(Path(folder), DataOptions(input_shape=(3, 64, 64), workers=workers))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),  # (B, 16, 32, 32)
                          nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),  # (B, 32, 16, 16)
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (B, 32)
    head = HadamardHead(32, bundle.num_classes)
    model.append(head)
    t = time.perf_counter()
    finetune(model, head, bundle, FinetuneConfig(epochs=1, batch_size=64, device="cpu"))
    print(json.dumps({"n": len(bundle.train), "val": len(bundle.val) if bundle.val is not None else 0,
                      "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                      "s": time.perf_counter() - t}))

def main() -> None:
    import argparse
    import subprocess

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/fyc_jpeg_epoch")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # internal: FOLDER WORKERS, one epoch here
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    rows = []
    for n in (1000, 8000):
        folder = gen(Path(args.root), n)
        out = subprocess.run([sys.executable, __file__, "--child", str(folder), str(args.workers)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{n} images ({r['n']} train, {r['val']} val): training process {r['maxrss']:.0f} MiB, "
              f"workers {r['children']:.0f} MiB, {r['s']:.1f} s", flush=True)
    print(f"ratio 8,000 / 1,000: training process x{rows[1]['maxrss'] / rows[0]['maxrss']:.2f}")


if __name__ == "__main__":
    main()

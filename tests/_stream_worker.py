"""Worker for the kill-and-resume test of fine-tuning on a streaming image folder (a script, not a test module).

    python tests/_stream_worker.py --data IMAGES --out CKPT_DIR --result RESULT --workers 2 --kill-at-step 7  # dies
    python tests/_stream_worker.py --data IMAGES --out CKPT_DIR --result RESULT --workers 2 --resume

Reads the folder with augmentation and `--workers` DataLoader workers, builds the seeded conv net of
`build_image_run`, calibrates, fine-tunes, and saves the final state_dict and history to RESULT.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when run as a plain script

# _KillAt SIGKILLs this process; its DataLoader workers notice that their parent is gone and exit by themselves
from _ddp_worker import _KillAt

from fyc_convert.data.datasets import DataBundle, load_data
from fyc_convert.head.heads import HadamardHead
from fyc_convert.train.finetune import FinetuneConfig, calibrate, finetune

INPUT_SHAPE = (3, 16, 16)


def build_image_run(data: Path, *, workers: int, seed: int = 0) -> tuple[nn.Module, HadamardHead, DataBundle]:
    """A tiny conv net (BatchNorm, dropout) whose classifier is a HadamardHead, and the folder's data."""
    bundle = load_data(data, val_split=0.25, seed=seed, input_shape=INPUT_SHAPE, mean=(0.5,), std=(0.25,),
                       workers=workers)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.1), nn.Linear(32, 16), nn.ReLU())
    head = HadamardHead(16, bundle.num_classes)
    model.append(head)
    return model, head, bundle


def image_config(**kw) -> FinetuneConfig:
    return FinetuneConfig(**{"epochs": 3, "batch_size": 4, "lr": 0.05, "device": "cpu", **kw})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--kill-at-step", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()

    model, head, bundle = build_image_run(args.data, workers=args.workers)
    if not args.resume:
        calibrate(model, head, bundle.plain_train, FinetuneConfig(device="cpu"), workers=args.workers)
    progress = _KillAt(args.kill_at_step) if args.kill_at_step else None
    result = finetune(model, head, bundle, image_config(out_dir=args.out, resume=args.resume), progress=progress)
    torch.save({"state_dict": model.state_dict(), "history": [dataclasses.asdict(h) for h in result.history],
                "resumed_from_epoch": result.resumed_from_epoch}, args.result)


if __name__ == "__main__":
    main()

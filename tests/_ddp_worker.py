"""Worker for the torchrun and kill-and-resume tests of fyc_convert.train.finetune (a script, not a test module).

    torchrun --nproc_per_node 2 tests/_ddp_worker.py --out CKPT_DIR --result RESULT_DIR --epochs 2
    python tests/_ddp_worker.py --out CKPT_DIR --result RESULT_DIR --epochs 3 --kill-at-step 7   # dies (SIGKILL)
    python tests/_ddp_worker.py --out CKPT_DIR --result RESULT_DIR --epochs 3 --resume

Builds the tiny seeded task of `build()`, calibrates, fine-tunes, and saves `rank{R}.pt` into RESULT_DIR with
the final state_dict, the history and the calibration (every rank writes its own, for the test to compare).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when run as a plain script

from fyc_convert.data.datasets import DataBundle  # noqa: E402
from fyc_convert.head.heads import HadamardHead  # noqa: E402
from fyc_convert.train.finetune import FinetuneConfig, calibrate, finetune  # noqa: E402

NUM_CLASSES = 4
IN_DIM = 12


def build(seed: int = 0) -> tuple[nn.Module, HadamardHead, DataBundle]:
    """A small MLP whose classifier is already a HadamardHead, and separable blobs (90 train, 30 val)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(NUM_CLASSES, IN_DIM, generator=g)
    y = torch.arange(120) % NUM_CLASSES
    x = centers[y] + torch.randn(120, IN_DIM, generator=g)
    bundle = DataBundle(train=TensorDataset(x[:90], y[:90]), val=TensorDataset(x[90:], y[90:]),
                        num_classes=NUM_CLASSES, input_shape=(IN_DIM,), classes=None, labelled=True, source="blobs")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(IN_DIM, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 16), nn.ReLU())
    head = HadamardHead(16, NUM_CLASSES)
    model.append(head)
    return model, head, bundle


class _KillAt:
    """A stand-in for rich's Progress that SIGKILLs this process after `step` training steps."""

    def __init__(self, step: int):
        self.step, self.seen = step, 0

    def add_task(self, description: str, **fields) -> int:
        return 0

    def update(self, task: int, **fields) -> None:
        self.seen += 1
        if self.seen == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--kill-at-step", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()

    if "WORLD_SIZE" in os.environ:  # under torchrun
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    model, head, bundle = build()
    cal = None
    if not args.resume:
        cal = calibrate(model, head, bundle.train, FinetuneConfig(device="cpu"))
    # like the CLI, only rank 0 is given the checkpoint folder
    config = FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, lr=0.05, device="cpu",
                            out_dir=args.out if rank == 0 else None, resume=args.resume)
    progress = _KillAt(args.kill_at_step) if args.kill_at_step else None
    result = finetune(model, head, bundle, config, progress=progress)
    args.result.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(),
                "history": [dataclasses.asdict(h) for h in result.history],
                "final": dataclasses.asdict(result.final) if result.final else None,
                "world_size": result.world_size,
                "resumed_from_epoch": result.resumed_from_epoch,
                "calibration": dataclasses.asdict(cal) if cal else None},
               args.result / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.barrier()  # both ranks done with every collective before gloo tears its threads down
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Fixed `--epochs N` on small image folders: does a run end below its own calibration, and is it said?

For each seed: generate a small train/val JPEG folder (4 classes, noisy constant-colour images), train the tests'
tiny timm-style conv net on it (tests/image_folders.py; the "original"), then convert it with `--epochs N` and the
default image augmentation (what a user gets with no other flag). Printed per seed: the original's, the
calibrated, the last epoch's and the kept epoch's validation accuracy, and whether the report has a note. "last
epoch" is what a fixed epoch count saved before fixed counts kept the best epoch; "kept" is what it saves now.

    python benchmarks/fixed_epochs.py --seeds 0 1 2 --epochs 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from image_folders import TINY_TIMM_ARCH as ARCH  # noqa: E402
from image_folders import write_class_folders  # noqa: E402

from fyc_convert import convert  # noqa: E402


def _train_original(module, folder: Path, seed: int) -> torch.nn.Module:
    """A few epochs of plain training on the train split's centre crops: the model a user would bring."""
    from PIL import Image

    torch.manual_seed(seed)
    model = module.build()
    xs, ys = [], []
    classes = sorted(p.name for p in (folder / "train").iterdir())
    for c, name in enumerate(classes):
        for f in sorted((folder / "train" / name).iterdir()):
            img = Image.open(f).convert("RGB").resize((24, 24))
            xs.append(torch.from_numpy(np.asarray(img, np.float32)).permute(2, 0, 1) / 255)
            ys.append(c)
    x, y = (torch.stack(xs) - 0.5) / 0.25, torch.tensor(ys)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| seed | original % | calibrated % | last epoch % | kept epoch % (epoch) | below calibration | note |")
    print("|---|---|---|---|---|---|---|")
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            (tmp / "tiny.py").write_text(ARCH)
            sys.path.insert(0, str(tmp))
            import importlib

            module = importlib.import_module("tiny")
            data = tmp / "images"
            names = ["w", "x", "y", "z"]
            write_class_folders(data / "train", names, 20, size=(40, 30), ext=".jpg", noise=40 + 10 * seed)
            write_class_folders(data / "val", names, 10, size=(40, 30), ext=".jpg", noise=40 + 10 * seed, start=30)
            torch.save(_train_original(module, data, seed).state_dict(), tmp / "tiny.pt")
            rep = convert(tmp / "tiny.pt", arch=f"{tmp / 'tiny.py'}:build", data=data, epochs=args.epochs,
                          batch_size=8, seed=seed, output_dir=tmp / "out", device="cpu")
            sys.path.remove(str(tmp))
            sys.modules.pop("tiny", None)
        a, tr = rep.accuracy, rep.training
        last = tr["history"][-1]["val"]["accuracy"]
        kept = tr["kept_epoch"] or len(tr["history"])
        note = any("below the calibrated" in n for n in rep.notes)
        below = a.finetuned < a.calibrated
        print(f"| {seed} | {100 * a.original:.2f} | {100 * a.calibrated:.2f} | {100 * last:.2f} | "
              f"{100 * a.finetuned:.2f} ({kept}) | {'yes' if below else 'no'} | {'yes' if note else 'no'} |")


if __name__ == "__main__":
    main()

"""int8 of a many-class model that was fitted to a task: `--quantize int8` on a 2048 → 18,000 classifier, with data.

benchmarks/int8_heads.py measures the quantizer on the interop zoo's synthetic heads: random backbones and a fresh,
unfitted head on random inputs, whose top-1 margins among 18,000 logits are below any int8 rounding (there, even the
quantized original keeps only 94-96% of its top-1). A deployed many-class model is confident on its inputs. This
benchmark builds such a model and converts it as a user would:

- a task of C classes: inputs x = μ_c + σ·ε in R^D (μ_c seeded random unit vectors), `--per-class` training rows and
  one validation row per class;
- the original model: a small backbone D → `--hidden` (Linear + ReLU) → N (Linear + Tanh, seeded) and the
  classifier fitted in closed form to the training rows (the centred class means of the features, unit norm,
  ×`--logit-scale`: a nearest-class-mean classifier);
- `fyc_convert.convert` with `--quantize int8` and `--epochs`, everything else on the defaults: the swap,
  calibration, fine-tuning, the float32 export and verification, then model.int8.onnx and original.int8.onnx
  calibrated on the training split, and their top-1 agreement with the float32 files on the validation split.

The fixed head asks the backbone to send each class to its own fixed direction, which a single Linear + Tanh
from D = 64 inputs cannot do for 18,000 classes (`--hidden 0 --epochs 1`: 34.6% after the epoch); the hidden
layer gives it the room a real backbone has. Results: docs/deploy.md (int8).

    PYTHONPATH=. python benchmarks/int8_task.py [--features 2048] [--classes 18000] [--hidden 2048]
                                                [--epochs 8] [--folder out/int8-task]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IN_DIM = 64  # D: the task's input size


class TaskModel(nn.Module):
    """(B, D) -> (B, C): [Linear + ReLU to `hidden`], Linear + Tanh to N features, then `fc` (N → C)."""

    def __init__(self, *, in_dim: int = IN_DIM, hidden: int = 0, features: int = 2048, classes: int = 18000):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.ReLU()] if hidden else []
        self.features = nn.Sequential(*layers, nn.Linear(hidden or in_dim, features), nn.Tanh())
        self.fc = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def task_model(**kwargs: int) -> TaskModel:
    """The --arch callable of the checkpoint this benchmark writes."""
    return TaskModel(**kwargs)


def make_task(classes: int, per_class: int, sigma: float, seed: int) -> dict[str, np.ndarray]:
    """Training and validation rows of the task (float32 inputs, int64 labels)."""
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((classes, IN_DIM))
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)

    def rows(count: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(classes), count)
        x = mu[y] + sigma * rng.standard_normal((len(y), IN_DIM))
        return x.astype(np.float32), y.astype(np.int64)

    x_train, y_train = rows(per_class)
    x_val, y_val = rows(1)
    return {"x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": y_val}


def fit_original(model: TaskModel, data: dict[str, np.ndarray], logit_scale: float) -> float:
    """Set `fc` to the nearest-class-mean classifier of the training features; returns its validation accuracy."""
    classes = model.fc.out_features
    with torch.no_grad():
        feats = model.features(torch.from_numpy(data["x_train"]))
        means = torch.zeros(classes, feats.shape[1]).index_add_(0, torch.from_numpy(data["y_train"]), feats)
        means -= means.mean(dim=0)
        means /= means.norm(dim=1, keepdim=True)
        model.fc.weight.copy_(logit_scale * means)
        model.fc.bias.zero_()
        pred = model(torch.from_numpy(data["x_val"])).argmax(dim=1).numpy()
    return float((pred == data["y_val"]).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=int, default=2048)
    ap.add_argument("--classes", type=int, default=18000)
    ap.add_argument("--hidden", type=int, default=2048, help="a ReLU layer of this width first (0: none)")
    ap.add_argument("--per-class", type=int, default=3, help="training rows per class")
    ap.add_argument("--sigma", type=float, default=0.05, help="input noise per dimension")
    ap.add_argument("--logit-scale", type=float, default=20.0)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--folder", type=Path, default=ROOT / "out" / "int8-task")
    args = ap.parse_args()
    from fyc_convert import convert

    args.folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    kwargs = {"in_dim": IN_DIM, "hidden": args.hidden, "features": args.features, "classes": args.classes}
    model = TaskModel(**kwargs).eval()
    data = make_task(args.classes, args.per_class, args.sigma, args.seed)
    acc = fit_original(model, data, args.logit_scale)
    data_path, ckpt = args.folder / "task.npz", args.folder / "task_model.pt"
    np.savez(data_path, **data)
    torch.save({"state_dict": model.state_dict(), "meta": {"arch_kwargs": kwargs, "input_shape": [IN_DIM]}}, ckpt)
    print(f"task: {args.classes} classes on {args.features} features, {len(data['y_train'])} training rows, "
          f"original val accuracy {acc:.2%} (PyTorch)")
    t0 = time.perf_counter()
    report = convert(ckpt, arch=f"{Path(__file__).resolve()}:task_model", arch_kwargs=json.dumps(kwargs),
                     data=data_path, quantize="int8",
                     epochs=args.epochs, output_dir=args.folder / "converted", force=True, seed=args.seed,
                     progress=lambda msg: print("·", msg, flush=True))
    doc = report.to_dict() if hasattr(report, "to_dict") else json.loads(
        (args.folder / "converted" / "report.json").read_text())
    print(f"converted in {time.perf_counter() - t0:.0f} s")
    print(json.dumps({"accuracy": doc.get("accuracy"), "int8": doc.get("int8")}, indent=1))


if __name__ == "__main__":
    main()

"""Per-class learning rates (fyc_convert.train.class_lr) vs plain SGD on the paper's protocol, plus step timings.

Protocol (per-class-learning-rates.md, section 4, "Optical" row of Tables 1-2):
- data: the UCI handwritten digits as scikit-learn ships them (load_digits: 1797 8x8 images, the UCI test part;
  the paper's Optical has 3823 more training images, so accuracies here are lower). Per seed: a stratified 50/50
  train/test split, then 15% of the training split held out for validation; features standardised with the
  training statistics.
- model: 8 hidden layers of 256 units (rectangular) + the top Linear, LeCun-normal init; SELU with AlphaDropout
  0.05, or ReLU/tanh with Dropout 0.05 (the paper's only change for them; PyTorch's default init leaves the
  8-layer ReLU/tanh nets at chance level after 100 epochs at lr 0.01).
- training: plain SGD, lr 0.01, 100 epochs, batch size 32 (the paper does not state it), no early stopping:
  the model after the last epoch is tested. Per-class rates on the 8 hidden layers (all but the top one),
  eta_mu 1e5 for SELU/tanh, 1e4 for ReLU, divided by 10 while training diverges; the cutoff (10, 20 or 30) is
  picked by validation accuracy, as in the paper.
- comparison: the same seeds (split, init, batch order, dropout) for both; test accuracy mean ± std over seeds;
  McNemar's exact test on the test samples' correct/incorrect, per seed and pooled over seeds.
Also: the sample tabular MLP (sample_models.archs:tabular_mlp on sample_models/tabular.npz: its val split is the
test set here), the μ-increment forms (g_j² vs summed per-sample squares, SELU) and the cost of one step with
per-class gradients computed three ways.

    python benchmarks/class_lr.py [--seeds 5] [--jobs 2] [--epochs 100] [--skip-increment] [--skip-timing]

Measured (5 seeds, 899 test samples each, so one sample is 0.11 point; busy shared 2-core machine, 1 thread per
process: ~34 min wall there, ~20 min of CPU in all, so ~10 min with --jobs 2 on a quiet 2-core machine (not verified)):

    model                        baseline %     class-lr %     delta  McNemar p (c:b)  seeds +/-  paper Optical
    Optical SELU                 96.73 ± 0.47   96.75 ± 0.46   +0.02  1.000 (2:1)      1/0        96.86 -> 96.91
    Optical ReLU                 95.97 ± 0.66   96.00 ± 0.62   +0.02  1.000 (1:0)      1/0        97.12 -> 97.17
    Optical tanh                 96.40 ± 0.61   96.42 ± 0.60   +0.02  1.000 (1:0)      1/0        96.91 -> 96.96
    Optical SELU, Σ per-sample²  96.73 ± 0.47   96.75 ± 0.46   +0.02  1.000 (2:1)      1/0        -
    sample tabular MLP (ReLU)    96.49 ± 0.62   96.49 ± 0.62   +0.00  1.000 (0:0)      0/0        -

Validation picked cutoff 10 on every seed. Per-class rates move the weights a lot (μ reaches 2-5 on some SELU
weights; after 10 epochs the two runs' weights differ by up to 0.58 of a layer's largest weight) but the final
predictions differ on at most 3 test samples per row over all seeds: a consistent +1 sample, nowhere near
significance. The paper's Optical gains are one test sample out of 1797, the same size. (Early on it does speed
training up: after 1 epoch, one seed, SELU 76.64 -> 77.42 %, McNemar p 0.04; that gap is gone by epoch 100.)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import binomtest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # sample_models/ is imported from the repository root, also in worker processes

from fyc_convert.train.class_lr import build_class_lr  # noqa: E402

PAPER_OPTICAL = {"selu": (96.86, 96.91), "relu": (97.12, 97.17), "tanh": (96.91, 96.96)}
ETA_MU = {"selu": 1e5, "relu": 1e4, "tanh": 1e5}
CUTOFFS = (10, 20, 30)  # picked by validation accuracy; a tie goes to the earlier cutoff
ACT_NAMES = {"selu": "SELU", "relu": "ReLU", "tanh": "tanh"}
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Split:
    x_train: Tensor  # (N, D) float32, standardised
    y_train: Tensor  # (N,) int64
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int


def _standardise(x_train: np.ndarray, *others: np.ndarray) -> list[Tensor]:
    mean, std = x_train.mean(0), x_train.std(0)
    std[std == 0] = 1.0
    return [torch.from_numpy(((a - mean) / std).astype(np.float32)) for a in (x_train, *others)]


def optical_split(seed: int) -> Split:
    """load_digits: stratified 50/50 train/test, 15% of train for validation, standardised on train."""
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.5, stratify=y, random_state=seed)
    x_tr, x_va, y_tr, y_va = train_test_split(x_tr, y_tr, test_size=0.15, stratify=y_tr, random_state=seed)
    xs = _standardise(x_tr, x_va, x_te)
    ys = [torch.from_numpy(a.astype(np.int64)) for a in (y_tr, y_va, y_te)]
    return Split(xs[0], ys[0], xs[1], ys[1], xs[2], ys[2], num_classes=10)


def tabular_split(seed: int) -> Split | None:
    """sample_models/tabular.npz: its val split is the test set, 15% of its train split for validation."""
    path = ROOT / "sample_models" / "tabular.npz"
    if not path.exists():
        return None
    d = np.load(path)
    x_tr, x_va, y_tr, y_va = train_test_split(d["x_train"], d["y_train"], test_size=0.15, stratify=d["y_train"],
                                              random_state=seed)
    xs = _standardise(x_tr, x_va, d["x_val"])
    ys = [torch.from_numpy(a.astype(np.int64)) for a in (y_tr, y_va, d["y_val"])]
    return Split(xs[0], ys[0], xs[1], ys[1], xs[2], ys[2], num_classes=int(d["y_train"].max()) + 1)


def optical_mlp(act: str, *, in_features: int, num_classes: int, layers: int = 8, width: int = 256,
                dropout: float = 0.05) -> nn.Sequential:
    """Table 1's Optical network: `layers` hidden Linear(width) + activation + dropout, then the top Linear."""
    mods: list[nn.Module] = []
    d = in_features
    for _ in range(layers):
        lin = nn.Linear(d, width)
        nn.init.normal_(lin.weight, std=1 / math.sqrt(d))  # LeCun normal (self-normalising nets), for every act.
        nn.init.zeros_(lin.bias)
        activation = {"selu": nn.SELU(), "relu": nn.ReLU(), "tanh": nn.Tanh()}[act]
        drop = nn.AlphaDropout(dropout) if act == "selu" else nn.Dropout(dropout)
        mods += [lin, activation, drop]
        d = width
    mods.append(nn.Linear(d, num_classes))
    return nn.Sequential(*mods)


def tabular_model(split: Split) -> nn.Module:
    from sample_models.archs import tabular_mlp

    return tabular_mlp(in_features=split.x_train.shape[1], num_classes=split.num_classes)


def train(model: nn.Module, split: Split, *, seed: int, epochs: int, lr: float, batch_size: int,
          eta_mu: float | None, cutoff: int = 0, mu_increment: str = "class_grad_sq") -> bool:
    """Plain SGD (eta_mu None) or per-class rates; False when the loss became non-finite."""
    n = len(split.y_train)
    steps_per_epoch = math.ceil(n / batch_size)
    if eta_mu is None:
        opt = torch.optim.SGD(model.parameters(), lr=lr)
    else:
        opt = build_class_lr(model, num_classes=split.num_classes, lr=lr, eta_mu=eta_mu, cutoff_epoch=cutoff,
                             layers=None, steps_per_epoch=steps_per_epoch, mu_increment=mu_increment)
    order_gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout masks: the same stream for both methods
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=order_gen)
        for k in range(steps_per_epoch):
            idx = perm[k * batch_size:(k + 1) * batch_size]
            x, y = split.x_train[idx], split.y_train[idx]
            per = F.cross_entropy(model(x), y, reduction="none")  # (B,)
            if not torch.isfinite(per).all():
                return False
            if eta_mu is None:
                opt.zero_grad(set_to_none=True)
                per.mean().backward()
                opt.step()
            else:
                opt.backward_and_step(per, y)
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@torch.no_grad()
def correct(model: nn.Module, x: Tensor, y: Tensor) -> np.ndarray:
    model.eval()
    return (model(x).argmax(1) == y).numpy()


def mcnemar(base: np.ndarray, new: np.ndarray) -> tuple[int, int, float]:
    """Exact McNemar: b = base right & new wrong, c = base wrong & new right; two-sided binomial p."""
    b = int((base & ~new).sum())
    c = int((~base & new).sum())
    p = 1.0 if b + c == 0 else binomtest(min(b, c), b + c, 0.5).pvalue
    return b, c, p


@dataclass
class SeedResult:
    base: np.ndarray  # (T,) bool, test samples classified correctly by the baseline
    new: np.ndarray  # (T,) bool, by per-class rates
    cutoff: int  # picked by validation
    eta_mu: float  # after any ÷10 for divergence


def run_seed(make_model: Callable[[], nn.Module], split: Split, *, seed: int, epochs: int, batch_size: int,
             eta_mu: float, mu_increment: str = "class_grad_sq") -> SeedResult:
    """Baseline and per-class rates (cutoff picked on validation), the same seed for all runs."""
    torch.manual_seed(seed)
    init = make_model().state_dict()

    def fresh() -> nn.Module:
        m = make_model()
        m.load_state_dict(init)
        return m

    base = fresh()
    if not train(base, split, seed=seed, epochs=epochs, lr=0.01, batch_size=batch_size, eta_mu=None):
        raise RuntimeError(f"the baseline diverged (seed {seed})")
    best: tuple[float, int, nn.Module] | None = None
    eta = eta_mu
    for cutoff in [c for c in CUTOFFS if c < epochs] or [epochs]:
        while True:
            model = fresh()
            if train(model, split, seed=seed, epochs=epochs, lr=0.01, batch_size=batch_size, eta_mu=eta,
                     cutoff=cutoff, mu_increment=mu_increment):
                break
            eta /= 10  # the paper's rule when training diverges
        val = float(correct(model, split.x_val, split.y_val).mean())
        if best is None or val > best[0]:
            best = (val, cutoff, model)
    assert best is not None
    return SeedResult(correct(base, split.x_test, split.y_test), correct(best[2], split.x_test, split.y_test),
                      best[1], eta)


def summarize(name: str, results: list[SeedResult], paper: tuple[float, float] | None) -> list[str]:
    base = [100 * r.base.mean() for r in results]
    new = [100 * r.new.mean() for r in results]
    tests = [mcnemar(r.base, r.new) for r in results]
    b, c = sum(t[0] for t in tests), sum(t[1] for t in tests)
    pooled = 1.0 if b + c == 0 else binomtest(min(b, c), b + c, 0.5).pvalue
    wins = sum(n > o for n, o in zip(new, base))
    losses = sum(n < o for n, o in zip(new, base))
    sig = f"{sum(t[2] < 0.05 and t[1] > t[0] for t in tests)}/{sum(t[2] < 0.05 and t[0] > t[1] for t in tests)}"

    def std(v: list[float]) -> float:
        return statistics.stdev(v) if len(v) > 1 else 0.0

    ref = f"{paper[0]:.2f} -> {paper[1]:.2f}" if paper else "-"
    cutoffs = ",".join(str(r.cutoff) for r in results)
    etas = ",".join(f"{r.eta_mu:.0e}" for r in results)
    return [name, f"{statistics.mean(base):.2f} ± {std(base):.2f}", f"{statistics.mean(new):.2f} ± {std(new):.2f}",
            f"{statistics.mean(new) - statistics.mean(base):+.2f}", f"{pooled:.3f} ({c}:{b})",
            f"{wins}/{losses}", sig, cutoffs, etas, ref]


def per_seed(results: list[SeedResult]) -> str:
    """Per seed: baseline -> class-lr test accuracy (%), McNemar p."""
    return "; ".join(f"seed {k}: {100 * r.base.mean():.2f} -> {100 * r.new.mean():.2f}"
                     f" (p {mcnemar(r.base, r.new)[2]:.2f})" for k, r in enumerate(results))


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print(" | ".join(cell.ljust(w) for cell, w in zip(r, widths)))


def timing(*, batch_size: int, repeats: int) -> None:
    """Median ms per training step of the Optical SELU MLP, per-class gradients computed three ways."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    split = optical_split(0)
    c = split.num_classes
    x, y = split.x_train[:batch_size], split.y_train[:batch_size]
    model = optical_mlp("selu", in_features=x.shape[1], num_classes=c).eval()  # no dropout: vmap-friendly
    chosen = [m for m in model if isinstance(m, nn.Linear)][:-1]
    params = [p for m in chosen for p in (m.weight, m.bias)]
    mus = [torch.ones(c, *p.shape) for p in params]

    def apply(class_grads: list[Tensor]) -> None:  # class_grads[k]: (C, *p.shape); the same update for all
        with torch.no_grad():
            for p, mu, g in zip(params, mus, class_grads):
                p.sub_((mu * g).sum(0), alpha=1e-9)
                mu.addcmul_(g, g, value=1e-9)

    def plain() -> None:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()

    opt = build_class_lr(model, num_classes=c, lr=1e-9, eta_mu=1.0, cutoff_epoch=1e9, layers=None,
                         steps_per_epoch=10**9)

    def hooks() -> None:
        opt.backward_and_step(F.cross_entropy(model(x), y, reduction="none"), y)

    def per_class_backward() -> None:
        losses = F.cross_entropy(model(x), y, reduction="none")
        grads = [torch.zeros(c, *p.shape) for p in params]
        present = torch.unique(y).tolist()
        for j in present:
            gj = torch.autograd.grad(losses[y == j].sum() / len(y), params, retain_graph=j != present[-1])
            for k, g in enumerate(gj):
                grads[k][j] = g
        apply(grads)

    names = [n for n, _ in model.named_parameters()]
    chosen_names = [n for n, p in model.named_parameters() if any(p is q for q in params)]

    def sample_loss(ps: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, ps, (xi[None],)), yi[None])

    per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0, 0))

    def func_vmap() -> None:
        ps = {n: p.detach() for n, p in model.named_parameters()}
        g = per_sample_grad(ps, x, y)  # each (B, *p.shape)
        apply([torch.zeros(c, *g[n].shape[1:]).index_add_(0, y, g[n] / len(y)) for n in chosen_names])

    assert names
    candidates = {"plain SGD backward (reference)": plain, "class-lr: δᵀx per class (library)": hooks,
                  "class-lr: one backward per class present": per_class_backward,
                  "class-lr: per-sample grads, torch.func vmap": func_vmap}
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for fn in candidates.values():
        fn()  # warm-up
    for _ in range(repeats):  # interleaved, so noise from other processes hits all alike
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ref = times["plain SGD backward (reference)"]
    print(f"\nOne training step, Optical SELU MLP (8 x 256, {sum(p.numel() for p in params):,} weights with per-class"
          f" rates, {c} classes), batch {batch_size}, {repeats} interleaved repeats:")
    rows = [[k, f"{1e3 * statistics.median(v):.2f}", f"{1e3 * min(v):.2f}",
             f"{statistics.median(v) / statistics.median(ref):.1f}x", f"{min(v) / min(ref):.1f}x"]
            for k, v in times.items()]
    print_table(rows, ["method", "median ms", "min ms", "median vs plain", "min vs plain"])


def job(kind: str, act: str, seed: int, epochs: int, batch_size: int, mu_increment: str) -> SeedResult:
    """One seed of one table row, in a worker process."""
    torch.set_num_threads(1)
    if kind == "tabular":
        split = tabular_split(seed)
        assert split is not None
        return run_seed(lambda: tabular_model(split), split, seed=seed, epochs=epochs, batch_size=batch_size,
                        eta_mu=ETA_MU["relu"], mu_increment=mu_increment)
    split = optical_split(seed)
    return run_seed(lambda: optical_mlp(act, in_features=64, num_classes=10), split, seed=seed, epochs=epochs,
                    batch_size=batch_size, eta_mu=ETA_MU[act], mu_increment=mu_increment)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (1 thread each), one per core")
    ap.add_argument("--activations", default="selu,relu,tanh")
    ap.add_argument("--skip-increment", action="store_true", help="skip the μ-increment comparison")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-tabular", action="store_true")
    ap.add_argument("--repeats", type=int, default=20, help="timing repeats")
    args = ap.parse_args()
    torch.set_num_threads(1)  # two threads per process on a busy 2-core machine is far slower
    t_start = time.perf_counter()
    if not args.skip_timing:
        for bs in (32, 128):
            timing(batch_size=bs, repeats=args.repeats)

    header = ["model", "baseline %", "class-lr %", "delta", "McNemar p (c:b)", "wins/losses", "sig +/-",
              "cutoffs", "eta_mu", "paper (Optical)"]
    groups = [(f"Optical {ACT_NAMES[act]}", "optical", act, "class_grad_sq")
              for act in args.activations.split(",")]
    if "selu" in args.activations.split(",") and not args.skip_increment:
        groups.append(("Optical SELU, Σ per-sample²", "optical", "selu", "sample_grad_sq"))
    if not args.skip_tabular and tabular_split(0) is not None:
        groups.append(("sample tabular MLP (ReLU)", "tabular", "relu", "class_grad_sq"))
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {(g, seed): pool.submit(job, kind, act, seed, args.epochs, args.batch_size, inc)
                   for g, kind, act, inc in groups for seed in range(args.seeds)}
        results = {g: [futures[g, seed].result() for seed in range(args.seeds)] for g, *_ in groups}
    rows = [summarize(g, results[g], PAPER_OPTICAL[act] if kind == "optical" and inc == "class_grad_sq" else None)
            for g, kind, act, inc in groups]
    for g, *_ in groups:
        print(f"{g}: {per_seed(results[g])}")
    print(f"\nTest accuracy over {args.seeds} seeds (mean ± std), {args.epochs} epochs, lr 0.01, batch"
          f" {args.batch_size}; McNemar pooled over seeds (c = only class-lr right, b = only baseline right);"
          " wins/losses = seeds; sig +/- = seeds with p < 0.05 for/against class-lr:")
    print_table(rows, header)
    print("(the 'Σ per-sample²' row is the μ-increment comparison: the same SELU runs with mu_increment="
          "'sample_grad_sq'; the SELU row uses the default g_j²)")
    print(f"\nwall time {time.perf_counter() - t_start:.0f} s, {args.jobs} worker processes of 1 thread")


if __name__ == "__main__":
    main()

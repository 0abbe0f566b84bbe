"""HadamardHead vs nn.Linear in PyTorch: median latency of forward and forward+backward.

Both modules run interleaved in one loop (linear, head, linear, head, …) so that noise on a shared machine
hits both alike; the table gives medians in milliseconds and the ratio linear / head (> 1: head faster).
Forward runs under ``torch.no_grad()``; forward+backward takes the gradient of the input and of every
parameter (``out.backward(g)`` with a fixed random g).

    python benchmarks/head_torch.py [--repeats 30] [--threads 1] [--device cpu|cuda|all] [--case 2048x1000]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fyc_convert.export.bench import interleaved_medians
from fyc_convert.head.heads import HadamardHead

CASES = [(512, 10), (2048, 1000), (2048, 18000), (512, 32000)]
BATCHES = [1, 64]


def _interleaved_medians(fns: list[Callable[[], None]], *, repeats: int, device: torch.device) -> list[float]:
    """Median seconds per call of each fn, round-robin after two warm-up rounds (`bench`'s one timer)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    return interleaved_medians(fns, repeats=repeats, warmup=2, sync=sync)


def _forward(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            module(x)

    return run


def _forward_backward(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    x = x.clone().requires_grad_(True)

    def run() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(grad)

    return run


def bench_case(n_feat: int, c: int, batch: int, *, device: torch.device, repeats: int) -> dict[str, float]:
    """Medians (ms) for one (N, C, batch): linear/head forward and forward+backward."""
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(n_feat, c).to(device)
    head = HadamardHead(n_feat, c).to(device)
    x = torch.randn(batch, n_feat, generator=gen).to(device)
    grad = torch.randn(batch, c, generator=gen).to(device)
    fwd = _interleaved_medians([_forward(linear, x), _forward(head, x)], repeats=repeats, device=device)
    both = _interleaved_medians(
        [_forward_backward(linear, x, grad), _forward_backward(head, x, grad)], repeats=repeats, device=device
    )
    return {"lin_f": fwd[0] * 1e3, "head_f": fwd[1] * 1e3, "lin_fb": both[0] * 1e3, "head_fb": both[1] * 1e3,
            "m": head.hadamard_size, "n": head.embed_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="interleaved timed runs per module")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: unchanged)")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--case", action="append", help="NxC to run (default: all four)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cases = [tuple(int(v) for v in s.split("x")) for s in args.case] if args.case else CASES
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of {args.repeats}, times in ms")
    header = (f"{'device':6} {'N':>5} {'C':>6} {'m':>6} {'n':>6} {'B':>3} | {'linear fwd':>10} {'head fwd':>9} "
              f"{'ratio':>6} | {'linear f+b':>10} {'head f+b':>9} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    for dev in devices:
        device = torch.device(dev)
        for n_feat, c in cases:
            for batch in BATCHES:
                r = bench_case(n_feat, c, batch, device=device, repeats=args.repeats)
                print(f"{dev:6} {n_feat:5d} {c:6d} {r['m']:6d} {r['n']:6d} {batch:3d} | {r['lin_f']:10.3f} "
                      f"{r['head_f']:9.3f} {r['lin_f'] / r['head_f']:6.2f} | {r['lin_fb']:10.3f} "
                      f"{r['head_fb']:9.3f} {r['lin_fb'] / r['head_fb']:6.2f}", flush=True)


if __name__ == "__main__":
    main()

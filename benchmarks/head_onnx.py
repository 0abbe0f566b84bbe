"""Hadamard head subgraph vs the learned Gemm head in onnxruntime (CPU, 1 thread, medians).

Both heads take the features and return the logits. The two sessions run interleaved call by call, so that
noise on a shared machine hits both alike; each head call then runs right after a Gemm call that streamed
its C×N weight through the caches ("head us", cold: the stricter number, and the one "met" checks).
"warm gemm" and "warm us" are each head run back to back on its own, caches warm (as after a small
backbone); "warm met" checks the same targets on those two. After the 65-147 MB Gemms of the large heads any onnxruntime
call pays a fixed cold start (an Identity graph: ~35 us after 512x32000, ~85 us after 2048x18000), which
is most of the difference at batch 1. One row per (N, C, batch).

    python benchmarks/head_onnx.py [--repeats 200] [--case 2048x1000]
"""

from __future__ import annotations

import argparse

import numpy as np

from fyc_convert.bench import compare_latency, gemm_head_model, session
from fyc_convert.heads import HadamardHead
from fyc_convert.onnx_head import HeadSpec, head_model

# (N, C, batch) -> ("ratio", minimum gemm/head) or ("delta_us", maximum head - gemm)
TARGETS: dict[tuple[int, int, int], tuple[str, float]] = {
    (2048, 1000, 1): ("ratio", 3.5),
    (2048, 1000, 64): ("ratio", 6.0),
    (2048, 18000, 1): ("ratio", 30.0),
    (2048, 18000, 64): ("ratio", 3.0),
    (512, 32000, 1): ("ratio", 15.0),
    (512, 32000, 64): ("ratio", 2.0),
    (512, 10, 1): ("delta_us", 15.0),
}


def hadamard_spec(n_feat: int, c: int) -> HeadSpec:
    """The default HadamardHead for (N, C) (docs/design.md sizing), as a spec."""
    return HeadSpec.from_module(HadamardHead(n_feat, c))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200, help="interleaved runs per session and batch")
    parser.add_argument("--case", action="append", help="NxC to run (default: all targets)")
    args = parser.parse_args()
    cases = sorted({(n, c) for n, c, _ in TARGETS}, key=lambda nc: (-nc[0], nc[1]))
    if args.case:
        cases = [tuple(int(v) for v in case.split("x")) for case in args.case]

    print(
        f"{'N':>5} {'C':>6} {'batch':>5} {'gemm us':>9} {'head us':>9} {'ratio':>7} {'target':>9} {'met':>4} "
        f"{'warm gemm':>9} {'warm us':>9} {'ratio':>7} {'warm met':>8}"
    )
    for n_feat, c in cases:
        spec = hadamard_spec(n_feat, c)
        rng = np.random.default_rng(0)
        weight = (rng.standard_normal((c, n_feat)) / np.sqrt(n_feat)).astype(np.float32)  # the learned head
        gemm = session(gemm_head_model(weight, np.zeros(c, np.float32)))
        head = session(head_model(spec))
        for batch in (1, 64):
            x = np.random.default_rng(batch).standard_normal((batch, n_feat)).astype(np.float32)
            gemm_ms, head_ms = compare_latency([gemm, head], x, repeats=args.repeats, warmup=10)
            (warm_gemm_ms,) = compare_latency([gemm], x, repeats=args.repeats, warmup=10)
            (warm_ms,) = compare_latency([head], x, repeats=args.repeats, warmup=10)
            gemm_us, head_us = 1000 * gemm_ms, 1000 * head_ms
            warm_gemm_us, warm_us = 1000 * warm_gemm_ms, 1000 * warm_ms
            kind, bound = TARGETS.get((n_feat, c, batch), ("", 0.0))
            target = {"ratio": f">= {bound:g}x", "delta_us": f"+{bound:g} us"}.get(kind, "-")
            print(
                f"{n_feat:>5} {c:>6} {batch:>5} {gemm_us:>9.1f} {head_us:>9.1f} {gemm_us / head_us:>6.2f}x "
                f"{target:>9} {_met(kind, bound, gemm_us, head_us):>4} {warm_gemm_us:>9.1f} {warm_us:>9.1f} "
                f"{warm_gemm_us / warm_us:>6.2f}x {_met(kind, bound, warm_gemm_us, warm_us):>8}",
                flush=True,
            )


def _met(kind: str, bound: float, gemm_us: float, head_us: float) -> str:
    """"yes"/"NO" for a target (see TARGETS), "-" for a row without one."""
    if kind == "ratio":
        return "yes" if gemm_us / head_us >= bound else "NO"
    if kind == "delta_us":
        return "yes" if head_us - gemm_us <= bound else "NO"
    return "-"


if __name__ == "__main__":
    main()

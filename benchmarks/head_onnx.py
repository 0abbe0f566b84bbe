"""Hadamard head subgraph vs the learned Gemm head in onnxruntime (CPU, 1 thread, medians).

Both heads take the features and return the logits. The two sessions run interleaved call by call, so that
noise on a shared machine hits both alike; each head call then runs right after a Gemm call that streamed
its C×N weight through the caches, as in a model where the head follows the backbone ("head us", the
number the targets of issue 5 are checked on). "warm us" is the head run back to back on its own, caches
warm, for reference. One row per (N, C, batch).

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
        f"{'warm us':>9} {'ratio':>7}"
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
            (warm_ms,) = compare_latency([head], x, repeats=args.repeats, warmup=10)
            gemm_us, head_us, warm_us = 1000 * gemm_ms, 1000 * head_ms, 1000 * warm_ms
            kind, bound = TARGETS.get((n_feat, c, batch), ("", 0.0))
            if kind == "ratio":
                target, met = f">= {bound:g}x", gemm_us / head_us >= bound
            elif kind == "delta_us":
                target, met = f"+{bound:g} us", head_us - gemm_us <= bound
            else:
                target, met = "-", None
            flag = "-" if met is None else ("yes" if met else "NO")
            print(
                f"{n_feat:>5} {c:>6} {batch:>5} {gemm_us:>9.1f} {head_us:>9.1f} {gemm_us / head_us:>6.2f}x "
                f"{target:>9} {flag:>4} {warm_us:>9.1f} {gemm_us / warm_us:>6.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()

"""ONNX files timed against the first (the baseline), interleaved call by call: one graph before and after a change.

The before/after rows of docs/benchmarks.md ("Third round") come from this script: the files written by
`benchmarks/model_onnx.py --save DIR` (and `head_onnx.py --save DIR`) at two commits (e.g. the older one in a
`git worktree`), timed in one run beside the baseline, so that the machine's drift hits all of them alike:

    git worktree add /tmp/before <rev> && (cd /tmp/before && python benchmarks/model_onnx.py --save /tmp/b)
    python benchmarks/model_onnx.py --save /tmp/a
    python benchmarks/compare_onnx.py /tmp/b/glyph_original.onnx /tmp/b/glyph_portable.onnx \\
        /tmp/a/glyph_portable.onnx --rows /tmp/a/glyph_rows.npy

onnxruntime or OpenVINO (f32 hint, compiled per batch shape) on the CPU, 1 thread; medians; ratio = baseline /
file (> 1: the file is faster); max |Δ| of each file's outputs against the second file's (the same function?).

    python benchmarks/compare_onnx.py BASE.onnx FILE.onnx [FILE.onnx ...] [--rows ROWS.npy] [--runtime ort|ov]
                                      [--batch 1 --batch 32] [--repeats 300]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fyc_convert.export.bench import compare_latency, openvino_runner, session  # noqa: E402


def _inputs(sess: ort.InferenceSession, rows: Path | None, batch: int) -> np.ndarray:
    """The first `batch` rows of --rows, else seeded normal values of the model's input shape (batch axis first)."""
    if rows is not None:
        return np.ascontiguousarray(np.load(rows)[:batch]).astype(np.float32)
    shape = [d if isinstance(d, int) else batch for d in sess.get_inputs()[0].shape[1:]]
    return np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="the baseline first, then the files to time against it")
    parser.add_argument("--rows", type=Path, help=".npy of real inputs (default: seeded random)")
    parser.add_argument("--runtime", action="append", choices=["ort", "ov"], help="default: both")
    parser.add_argument("--batch", action="append", type=int, help="default: 1, 32, 64")
    parser.add_argument("--repeats", type=int, default=300, help="interleaved rounds per batch size")
    args = parser.parse_args()
    if len(args.files) < 2:
        parser.error("give the baseline and at least one file to time against it")
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; medians of {args.repeats}; µs; "
          "ratio = baseline / file (> 1: the file is faster); 1 thread")
    for i, f in enumerate(args.files):
        print(f"  [{i}] {f}")
    sessions = [session(f) for f in args.files]
    for runtime in args.runtime or ["ort", "ov"]:
        for batch in args.batch or [1, 32, 64]:
            x = _inputs(sessions[0], args.rows, batch)
            outs = [s.run(None, {s.get_inputs()[0].name: x})[0] for s in sessions]
            runners = sessions if runtime == "ort" else [openvino_runner(f, input_shape=x.shape) for f in args.files]
            times = compare_latency(runners, x, repeats=args.repeats, warmup=10)
            cells = "  ".join(f"[{i}] {1000 * t:9.1f} {times[0] / t:5.2f}x" for i, t in enumerate(times))
            diffs = [float(np.abs(o - outs[1]).max()) for o in outs[1:] if o.shape == outs[1].shape]
            print(f"{runtime:>3} batch {batch:>3}  {cells}  max|Δ| vs [1] {max(diffs):.1e}", flush=True)
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()

"""int8 top-1 agreement with float32 on the large synthetic heads: the fixed head kept exact vs re-quantized.

For each case of the interop zoo (a tiny 16 → N backbone and an N → C classifier; tests/interop/zoo.py builds
original.onnx and model.onnx, the converted one with a fresh `HadamardHead(N, C)`), the float32 files are quantized
with `fyc_convert.export.quantize.quantize_int8` as `--quantize int8` does (static QDQ, per-channel int8 weights,
MinMax calibration on `--calibration` random inputs, seeded), once with the `fyc_head/` nodes excluded (the default)
and once without (the quantizer left to itself), and run with onnxruntime on `--rows` other random inputs:
top-1 agreement of each int8 model with its float32 file, the files' sizes, the head's exactness
(`head_exactness`: the int8 head against the float32 head on the same features), and the agreement per quartile
of the float32 top-1 margin beside the int8 logit error (`margins`: which rows flip, and why).

    PYTHONPATH=. python benchmarks/int8_heads.py [--cases wide2048x18000 wide512x32000] [--rows 2000]
                                                 [--calibration 512] [--folder out/int8-heads]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "interop"))

import zoo  # noqa: E402  (tests/interop/zoo.py)

from fyc_convert.export.quantize import Int8Model, compare_top1, head_exactness, quantize_int8  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["wide2048x18000"])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--calibration", type=int, default=512)
    ap.add_argument("--folder", type=Path, default=ROOT / "out" / "int8-heads")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    for name in args.cases:
        t0 = time.perf_counter()
        case = zoo.build_case(name, args.folder)
        shape = case.input_shape
        calib = rng.standard_normal((args.calibration, *shape)).astype(np.float32)
        x = rng.standard_normal((args.rows, *shape)).astype(np.float32)
        batches = lambda a: (a[i : i + 64] for i in range(0, len(a), 64))  # noqa: E731
        runs = [("original", "original", True), ("model", "model", True), ("model", "model.qhead", False)]
        pairs, models = [], []
        for src, dst, float_head in runs:
            out = case.folder / f"{dst}.int8.onnx"
            if not out.exists():
                quantize_int8(case.path(src), out, batches(calib), float_head=float_head)
            pairs.append((case.path(src), out))
            models.append(Int8Model(file=out.name, bytes=out.stat().st_size, float_bytes=case.path(src).stat().st_size))
        compare_top1(pairs, ((b, None) for b in batches(x)), models)
        print(f"{name}: {args.rows} random rows, calibrated on {args.calibration} ({time.perf_counter() - t0:.0f} s)")
        for (src, _dst, float_head), m in zip(runs, models, strict=True):
            exact = head_exactness(case.folder / m.file, case.path("model"), x[:64]) if src == "model" else None
            what = "original (Gemm quantized)" if src == "original" else \
                "converted, head float inside" if float_head else "converted, head re-quantized"
            extra = "" if exact is None else f", head max |Δ| vs float32 head {exact:.2g}"
            print(f"  {what:<30} top-1 agreement {100 * m.agreement:6.2f}%, {m.bytes / 1e6:7.2f} MB "
                  f"({100 * m.bytes / m.float_bytes:.0f}% of float32){extra}")
            if float_head:
                print(margins(case.path(src), case.folder / m.file, x))


def margins(float_path: Path, int8_path: Path, x: np.ndarray) -> str:
    """Why rows flip: top-1 agreement per quartile of the float32 model's top-1 margin (largest minus second logit),
    beside the int8 model's per-row logit error (max |int8 - float32| over the classes)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    runs = []
    for path in (float_path, int8_path):
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        runs.append(np.concatenate([sess.run(None, {name: x[i : i + 64]})[0] for i in range(0, len(x), 64)]))
    f, q = runs
    top2 = np.sort(f, axis=1)[:, -2:]
    margin, err = top2[:, 1] - top2[:, 0], np.abs(q - f).max(axis=1)
    agree = f.argmax(axis=1) == q.argmax(axis=1)
    edges = np.quantile(margin, [0.0, 0.25, 0.5, 0.75, 1.0])
    cells = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (margin >= lo) & (margin <= hi)
        cells.append(f"margin {lo:.3f}-{hi:.3f}: {100 * agree[inside].mean():.1f}%")
    return (f"    per margin quartile: {'; '.join(cells)}\n    int8 logit error per row: median {np.median(err):.3f}, "
            f"90th percentile {np.quantile(err, 0.9):.3f}; float32 logits span {np.median(np.ptp(f, axis=1)):.2f} "
            "(median row)")


if __name__ == "__main__":
    main()

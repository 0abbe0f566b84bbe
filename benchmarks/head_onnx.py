"""The fixed head against the Gemm it replaces, in onnxruntime and OpenVINO (CPU, 1 thread), every layout.

Heads (features -> logits): the learned classifier as one Gemm (C×N weights) beside the Hadamard head in
the default add/sub layout ("portable") and the Kronecker one ("kron", MatMuls by ±1 blocks <= 32 x 32,
`--head-layout kron`), and "ncnn" (the portable transform batch-major, its rows picked by GridSample,
`--head-layout ncnn`). Sizes: the sample models' heads as the CLI builds them (`HadamardHead.from_linear`
on the trained layer and its features: rows assigned, widest transform) and `HadamardHead(N, C)` for the
large targets. Whole models: benchmarks/model_onnx.py.

All sessions of a row run interleaved call by call (noise on a shared machine hits all alike); medians; the
load average is printed before and after. OpenVINO gets each model compiled for the row's fixed input shape
(its CPU plugin runs dynamic shapes through per-call shape inference) with the f32 precision hint (its
default is bf16 on CPUs with AMX or AVX-512 bf16, which is not the float32 model). Targets (issue 23),
checked per row and layout ("p" portable, "k" kron):
  digits head (64 x 10), portable, batch 1: within 10 us of the Gemm;
  glyph head (256 x 1,200): portable, onnxruntime, batch 64 >= 1x; kron, both runtimes, batch 1 and 64 >= 1x;
  512 x 32,000, portable, onnxruntime, batch 64 >= 1x; 2048 x 18,000, portable, onnxruntime, batch 1 >= 10x.

    python benchmarks/head_onnx.py [--repeats 100] [--case 2048x18000] [--no-samples] [--no-fresh]
                                   [--runtime ort|ov] [--batch 1 --batch 64] [--save DIR]

--save DIR writes each head's files instead of timing them (DIR/{label}_{gemm,portable,kron,ncnn}.onnx, label
"256x1200_glyph" or "512x32000_fresh"), for `benchmarks/compare_onnx.py` to time two commits' graphs in one run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fyc_convert.export.bench import compare_latency, gemm_head_model, openvino_runner, session  # noqa: E402
from fyc_convert.export.onnx_head import HeadSpec, head_model  # noqa: E402
from fyc_convert.head.heads import HadamardHead  # noqa: E402

LAYOUTS = ("portable", "kron", "ncnn")
BATCHES = (1, 32, 64)
FRESH = [(512, 32000), (2048, 18000), (2048, 1000)]  # HadamardHead(N, C)


def sample(name: str) -> tuple[torch.nn.Module, torch.Tensor, tuple[int, ...]]:
    """A shipped sample model, 1024 of its (normalised) inputs and its input shape."""
    sys.path.insert(0, str(ROOT / "tests" / "interop"))
    import zoo

    model, x = zoo.sample(name, rows=1024)  # the interop suite's loader of the shipped samples
    return model, x, tuple(x.shape[1:])


def cli_head(model: torch.nn.Module, x: torch.Tensor) -> HadamardHead:
    """The head the CLI builds for this model: from_linear on its trained `fc` and its features."""
    from fyc_convert.model.surgery import capture_features

    feats = capture_features(model, "fc", x)
    return HadamardHead.from_linear(model.fc, features=feats)


def runners(models: dict[str, object], runtime: str, shape: tuple[int, ...]) -> dict[str, object]:
    if runtime == "ort":
        return {k: session(m) for k, m in models.items()}
    return {k: openvino_runner(m, input_shape=shape) for k, m in models.items()}


def _target(label: str, layout: str, batch: int, runtime: str, base_us: float, ours_us: float) -> str:
    """'yes'/'NO' where issue 23 sets a target for this row and layout, else '-'."""
    faster = ours_us <= base_us
    rules = [
        (label.startswith("64x10") and layout == "portable" and batch == 1, ours_us - base_us <= 10.0),
        (label.startswith("256x1200") and layout == "portable" and runtime == "ort" and batch == 64, faster),
        (label.startswith("256x1200") and layout == "kron" and batch in (1, 64), faster),
        (label.startswith("512x32000") and layout == "portable" and runtime == "ort" and batch == 64, faster),
        (label.startswith("2048x18000") and layout == "portable" and runtime == "ort" and batch == 1,
         base_us / ours_us >= 10.0),
    ]
    met = next((ok for applies, ok in rules if applies), None)
    return "-" if met is None else ("yes" if met else "NO")


def print_header(what: str, baseline: str, repeats: int) -> None:
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; medians of {repeats}; us; "
          f"ratio = {baseline} / ours (> 1: ours faster); 1 thread")
    cols = " ".join(f"{k + ' us':>12} {'ratio':>7}" for k in LAYOUTS)
    print(f"{what:<26} {'rt':>3} {'batch':>5} {baseline + ' us':>12} {cols} {'targets':>9}")


def time_row(label: str, runtime: str, models: dict[str, object], inputs: dict[int, np.ndarray], repeats: int,
             targets: bool = True) -> None:
    """One line per batch: models[first] is the baseline, then LAYOUTS, all interleaved call by call."""
    for batch, x in inputs.items():
        run = runners(models, runtime, x.shape)
        times = [1000 * t for t in compare_latency(list(run.values()), x, repeats=repeats, warmup=5)]
        base, ours = times[0], times[1:]
        cells = " ".join(f"{t:>12.1f} {base / t:>6.2f}x" for t in ours)
        met = ",".join(f"{k[0]}:{_target(label, k, batch, runtime, base, t)}" for k, t in zip(LAYOUTS, ours))
        print(f"{label:<26} {runtime:>3} {batch:>5} {base:>12.1f} {cells} {met if targets else '':>9}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=100, help="interleaved runs per session and batch")
    parser.add_argument("--case", action="append", help="NxC of a fresh HadamardHead(N, C) (default: the targets)")
    parser.add_argument("--no-samples", action="store_true", help="skip the sample models' heads")
    parser.add_argument("--no-fresh", action="store_true", help="skip the fresh HadamardHead(N, C) rows")
    parser.add_argument("--runtime", action="append", choices=["ort", "ov"], help="default: both")
    parser.add_argument("--batch", action="append", type=int, help=f"default: {', '.join(map(str, BATCHES))}")
    parser.add_argument("--save", type=Path, help="write the heads' ONNX files to this folder, time nothing")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rts, batches = args.runtime or ["ort", "ov"], args.batch or list(BATCHES)
    fresh = [] if args.no_fresh else [tuple(int(v) for v in c.split("x")) for c in args.case] if args.case else FRESH
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
    else:
        print_header("head", "Gemm", args.repeats)
    rng = np.random.default_rng(0)
    heads: list[tuple[str, HadamardHead, np.ndarray, np.ndarray]] = []
    if not args.no_samples:
        for name in ("digits", "glyph"):
            model, x, _ = sample(name)
            head = cli_head(model, x)
            heads.append((f"{head.in_features}x{head.num_classes} {name} (cli)", head,
                          model.fc.weight.detach().numpy(), model.fc.bias.detach().numpy()))
    for n_feat, c in fresh:
        weight = (rng.standard_normal((c, n_feat)) / np.sqrt(n_feat)).astype(np.float32)
        heads.append((f"{n_feat}x{c} (fresh)", HadamardHead(n_feat, c), weight, np.zeros(c, np.float32)))
    for label, head, weight, bias in heads:
        spec = HeadSpec.from_module(head)
        models = {"gemm": gemm_head_model(weight, bias), **{k: head_model(spec, layout=k) for k in LAYOUTS}}
        if args.save:
            stem = label.split(" (")[0].replace(" ", "_") + ("_fresh" if "(fresh)" in label else "")
            for k, m in models.items():
                onnx.save(m, args.save / f"{stem}_{k}.onnx")
            continue
        inputs = {b: rng.standard_normal((b, spec.in_features)).astype(np.float32) for b in batches}
        repeats = args.repeats if weight.size < 5_000_000 else max(20, args.repeats // 5)
        for runtime in rts:
            time_row(label, runtime, models, inputs, repeats)
    if not args.save:
        print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()

"""The fixed head against the Gemm it replaces, and whole sample models, in onnxruntime and OpenVINO (CPU, 1 thread).

Heads (features -> logits): the learned classifier as one Gemm (C×N weights) beside the Hadamard head in
both layouts, "portable" (the default export) and "batch-switched" (today's onnxruntime-server layout,
the "before" of issue 11). Sizes: the sample models' heads as the CLI builds them
(`HadamardHead.from_linear` on the trained layer and its features: rows assigned, widest transform) and
`HadamardHead(N, C)` for the large targets. Whole models: `original.onnx` against `model.onnx` exported
both ways (sample weights, the CLI's head without fine-tuning: speed does not depend on the values).

All sessions of a row run interleaved call by call (noise on a shared machine hits all alike); medians.
OpenVINO gets each model compiled for the row's fixed input shape (its CPU plugin runs dynamic shapes
through per-call shape inference) with the f32 precision hint (its default is bf16 on CPUs with AMX or
AVX-512 bf16, which is not the float32 model). Targets (issue 11) are checked per row:
  N·C >= 250,000: head not slower than the Gemm; whole models not slower than the original;
  digits (64 x 10): head within 15 us of the Gemm at batch 1; 2048 x 18000: >= 10x the Gemm at batch 1
  in onnxruntime.

    python benchmarks/head_onnx.py [--repeats 100] [--case 2048x18000] [--no-models] [--no-fresh] [--runtime ort|ov]
                                   [--static]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fyc_convert.export.bench import compare_latency, gemm_head_model, openvino_runner, session  # noqa: E402
from fyc_convert.export.onnx_head import HeadSpec, head_model  # noqa: E402
from fyc_convert.head.heads import HadamardHead  # noqa: E402

LAYOUTS = ("portable", "batch-switched")
BATCHES = (1, 64)
FRESH = [(2048, 1000), (2048, 18000), (512, 32000), (512, 10)]  # HadamardHead(N, C)


def _sample(name: str) -> tuple[torch.nn.Module, torch.Tensor, tuple[int, ...]]:
    """A shipped sample model, 1024 of its (normalised) inputs and its input shape."""
    sys.path.insert(0, str(ROOT / "tests" / "interop"))
    import zoo

    model, x = zoo.sample(name, rows=1024)  # the interop suite's loader of the shipped samples
    return model, x, tuple(x.shape[1:])


def _cli_head(model: torch.nn.Module, x: torch.Tensor) -> HadamardHead:
    """The head the CLI builds for this model: from_linear on its trained `fc` and its features."""
    from fyc_convert.model.surgery import capture_features

    feats = capture_features(model, "fc", x)
    return HadamardHead.from_linear(model.fc, features=feats)


def _runners(models: dict[str, object], runtime: str, shape: tuple[int, ...]) -> dict[str, object]:
    if runtime == "ort":
        return {k: session(m) for k, m in models.items()}
    return {k: openvino_runner(m, input_shape=shape) for k, m in models.items()}


def _verdict(name: str, n_c: int, batch: int, runtime: str, base_us: float, ours_us: float) -> str:
    if name.startswith("64x10") and batch == 1:
        return "yes" if ours_us - base_us <= 15.0 else "NO"
    if name.startswith("2048x18000") and batch == 1 and runtime == "ort":
        return "yes" if base_us / ours_us >= 10.0 else "NO"
    if n_c >= 250_000:
        return "yes" if ours_us <= base_us else "NO"
    return "-"


def _row(label: str, n_c: int, runtime: str, models: dict[str, object], inputs: dict[int, np.ndarray],
         repeats: int, static: dict[int, object] | None = None) -> None:
    """One line per batch; `static` (batch -> model) replaces the portable model by its static-batch export."""
    for batch in BATCHES:
        x = inputs[batch]
        row = dict(models)
        if static is not None:
            row["portable"] = static[batch]
        runners = _runners(row, runtime, x.shape)
        times = compare_latency(list(runners.values()), x, repeats=repeats, warmup=5)
        base, ours, before = (1000 * t for t in times)
        print(f"{label:<26} {runtime:>3} {batch:>5} {base:>11.1f} {ours:>11.1f} {base / ours:>6.2f}x "
              f"{before:>11.1f} {base / before:>6.2f}x {_verdict(label, n_c, batch, runtime, base, ours):>4}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=100, help="interleaved runs per session and batch")
    parser.add_argument("--case", action="append", help="NxC of a fresh HadamardHead(N, C) (default: the targets)")
    parser.add_argument("--no-models", action="store_true", help="skip the sample heads and whole models")
    parser.add_argument("--no-fresh", action="store_true", help="skip the fresh HadamardHead(N, C) rows")
    parser.add_argument("--runtime", action="append", choices=["ort", "ov"], help="default: both")
    parser.add_argument("--static", action="store_true",
                        help="time the portable head as exported with --static-batch (each row's batch)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runtimes = args.runtime or ["ort", "ov"]
    fresh = [tuple(int(v) for v in c.split("x")) for c in args.case] if args.case else FRESH
    fresh = [] if args.no_fresh else fresh
    print(f"load average {os.getloadavg()[0]:.2f}; medians of {args.repeats}; us; ratio = baseline / ours "
          "(> 1: ours faster); 'before' = the batch-switched layout"
          + ("; portable = the static-batch export" if args.static else ""))
    print(f"{'head or model':<26} {'rt':>3} {'batch':>5} {'baseline us':>11} {'portable us':>11} {'ratio':>7} "
          f"{'before us':>11} {'ratio':>7} {'met':>4}")
    rng = np.random.default_rng(0)
    if not args.no_models:
        for name in ("digits", "glyph"):
            model, x, shape = _sample(name)
            head = _cli_head(model, x)
            n_feat, c = head.in_features, head.num_classes
            lin = model.fc
            spec = HeadSpec.from_module(head)
            heads = {"gemm": gemm_head_model(lin.weight.detach().numpy(), lin.bias.detach().numpy()),
                     **{k: head_model(spec, layout=k) for k in LAYOUTS}}
            feats = {b: rng.standard_normal((b, n_feat)).astype(np.float32) for b in BATCHES}
            static = {b: head_model(spec, static_batch=b) for b in BATCHES} if args.static else None
            for runtime in runtimes:
                _row(f"{n_feat}x{c} {name} head (cli)", n_feat * c, runtime, heads, feats, args.repeats, static)
            converted = copy.deepcopy(model)
            converted.fc = head
            with tempfile.TemporaryDirectory() as tmp:
                from fyc_convert.export.onnx_export import export_onnx

                paths = {"original": Path(tmp) / "original.onnx"}
                export_onnx(model, paths["original"], input_shape=shape)
                for k in LAYOUTS:
                    paths[k] = Path(tmp) / f"{k}.onnx"
                    export_onnx(converted, paths[k], input_shape=shape, head_layer="fc", head_layout=k)
                inputs = {b: np.ascontiguousarray(x[:b].numpy()) for b in BATCHES}
                for runtime in runtimes:
                    _row(f"{name} whole model", n_feat * c, runtime, {k: str(p) for k, p in paths.items()}, inputs,
                         args.repeats)
    for n_feat, c in fresh:
        head = HadamardHead(n_feat, c)
        spec = HeadSpec.from_module(head)
        weight = (rng.standard_normal((c, n_feat)) / np.sqrt(n_feat)).astype(np.float32)
        heads = {"gemm": gemm_head_model(weight, np.zeros(c, np.float32)),
                 **{k: head_model(spec, layout=k) for k in LAYOUTS}}
        feats = {b: rng.standard_normal((b, n_feat)).astype(np.float32) for b in BATCHES}
        repeats = args.repeats if n_feat * c < 5_000_000 else max(20, args.repeats // 4)
        static = {b: head_model(spec, static_batch=b) for b in BATCHES} if args.static else None
        for runtime in runtimes:
            _row(f"{n_feat}x{c} head (fresh)", n_feat * c, runtime, heads, feats, repeats, static)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

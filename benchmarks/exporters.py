"""TorchScript vs dynamo exporter on the stand-ins (and optionally timm models): which one `exporter="auto"`
should try first.

    python benchmarks/exporters.py [--repeats 3] [--timm NAME ...] [--json out.json]

For each stand-in in tests/models.py (LAYOUTS and HEAD_LAYOUTS), the classifier is swapped for a fixed head and
the converted model exported with `export_onnx(exporter="torchscript")` and `exporter="dynamo"`, interleaved
(ts, dynamo, ts, dynamo, ...) so that load changes hit both alike; then verified with `verify_onnx`. Reported per
model and exporter: ok / the one-line error, median export seconds, node count of the whole graph, max |diff|
against PyTorch; and the totals. `--timm` adds timm models (random init, their own input size; needs timm, e.g.
the torch 2.14 venv with PYTHONPATH=<worktree>). One thread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EXPORTERS = ("torchscript", "dynamo")


def stand_ins() -> dict[str, Callable[[], tuple[torch.nn.Module, tuple[int, ...]]]]:
    sys.path.insert(0, str(ROOT / "tests"))
    from models import HEAD_LAYOUTS, LAYOUTS

    def make(build):
        def one():
            layout = build()
            return layout.model, tuple(layout.input_shape)
        return one

    return {name: make(build) for name, build in {**LAYOUTS, **HEAD_LAYOUTS}.items()}


def timm_models(names: list[str]) -> dict[str, Callable[[], tuple[torch.nn.Module, tuple[int, ...]]]]:
    def make(name: str):
        def one():
            import timm

            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False).eval()
            return model, tuple(model.pretrained_cfg["input_size"])
        return one

    return {f"timm:{n}": make(n) for n in names}


def measure(name: str, build, repeats: int, work: Path) -> dict:
    from fyc_convert.errors import describe
    from fyc_convert.export.onnx_export import export_onnx
    from fyc_convert.export.verify import VerifyConfig, measure_onnx
    from fyc_convert.model.surgery import swap_classifier

    model, shape = build()
    model.eval()
    gen = torch.Generator().manual_seed(0)
    swap = swap_classifier(model, input_shape=shape, inputs=torch.randn(4, *shape, generator=gen))
    out: dict = {"name": name, "input_shape": list(shape), "layers": list(swap.layers)}
    seconds: dict[str, list[float]] = {e: [] for e in EXPORTERS}
    results: dict = {}
    for _ in range(repeats):
        for exporter in EXPORTERS:
            if exporter in results and not results[exporter]["ok"]:
                continue  # a failure is not timed again
            t = time.perf_counter()
            try:
                res = export_onnx(model, work / f"{exporter}.onnx", input_shape=shape, head_layer=swap.layers,
                                  exporter=exporter)
            except Exception as e:  # noqa: BLE001 - each exporter's failure is one line of the table
                results[exporter] = {"ok": False, "error": describe(e)[:160]}
                continue
            seconds[exporter].append(time.perf_counter() - t)
            if exporter not in results:
                ver = measure_onnx(res.path, model, VerifyConfig(shape))
                results[exporter] = {"ok": True, "nodes": res.node_count, "max_abs_diff": ver.max_abs_diff,
                                     "passed": ver.passed}
    for exporter, r in results.items():
        if r["ok"]:
            r["seconds"] = statistics.median(seconds[exporter])
    out["exporters"] = results
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="exports per model and exporter (median seconds)")
    parser.add_argument("--timm", nargs="*", default=[], help="timm model names to add")
    parser.add_argument("--no-stand-ins", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    models = {} if args.no_stand_ins else stand_ins()
    models |= timm_models(args.timm)
    print(f"torch {torch.__version__}; {len(models)} models; load average {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fyc-exporters-") as tmp:
        for name, build in models.items():
            row = measure(name, build, args.repeats, Path(tmp))
            rows.append(row)
            cells = []
            for e in EXPORTERS:
                r = row["exporters"][e]
                cells.append(f"{e}: {r['seconds']:.2f} s, {r['nodes']} nodes, |d| {r['max_abs_diff']:.1e}"
                             if r["ok"] else f"{e}: FAIL {r['error']}")
            print(f"{name:<30} " + " | ".join(cells), flush=True)
    print()
    for e in EXPORTERS:
        ok = [r["exporters"][e] for r in rows if r["exporters"][e]["ok"]]
        passed = sum(r["passed"] for r in ok)
        both = [r for r in rows if all(r["exporters"][x]["ok"] for x in EXPORTERS)]
        secs = sum(r["exporters"][e]["seconds"] for r in both)
        nodes = sum(r["exporters"][e]["nodes"] for r in both)
        print(f"{e:<12} exported {len(ok)} / {len(rows)}, verified {passed}; on the {len(both)} both export: "
              f"{secs:.1f} s in all (medians), {nodes} nodes in all")
    print(f"load average {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Whole sample models: original.onnx against model.onnx in both head layouts, onnxruntime and OpenVINO, 1 thread.

The shipped digits and glyph samples with the CLI's head (`from_linear` on the trained layer and its features,
not fine-tuned: speed does not depend on the values), exported by `export_onnx` as the CLI does: the original,
the default add/sub layout ("portable") and `--head-layout kron`. All three run interleaved call by call on
the same real rows, medians, the load average printed before and after. Targets (issue 23): the glyph model
in the default layout not slower than the original at batch 32 and 64 (both runtimes), >= 0.95x at batch 1.

    python benchmarks/model_onnx.py [--repeats 100] [--runtime ort|ov] [--batch 1 --batch 32] [--save DIR]

--save DIR writes the files instead of timing them (DIR/{digits,glyph}_{original,portable,kron,ncnn}.onnx and
DIR/{digits,glyph}_rows.npy, 64 real rows), for `benchmarks/compare_onnx.py` to time two commits' graphs in one run.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from head_onnx import BATCHES, LAYOUTS, cli_head, print_header, sample, time_row  # noqa: E402

from fyc_convert.export.onnx_export import export_onnx  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=100, help="interleaved runs per model and batch")
    parser.add_argument("--runtime", action="append", choices=["ort", "ov"], help="default: both")
    parser.add_argument("--batch", action="append", type=int, help=f"default: {', '.join(map(str, BATCHES))}")
    parser.add_argument("--save", type=Path, help="write the ONNX files and rows to this folder, time nothing")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
    else:
        print_header("model", "original", args.repeats)
    for name in ("digits", "glyph"):
        model, x, shape = sample(name)
        converted = copy.deepcopy(model)
        converted.fc = cli_head(model, x)
        with tempfile.TemporaryDirectory() as tmp:
            folder, stem = (args.save, f"{name}_") if args.save else (Path(tmp), "")
            paths = {"original": folder / f"{stem}original.onnx"}
            export_onnx(model, paths["original"], input_shape=shape)
            for layout in LAYOUTS:
                paths[layout] = folder / f"{stem}{layout}.onnx"
                export_onnx(converted, paths[layout], input_shape=shape, head_layer="fc", head_layout=layout)
            if args.save:
                np.save(folder / f"{name}_rows.npy", x[:64].numpy())
                continue
            inputs = {b: np.ascontiguousarray(x[:b].numpy()) for b in args.batch or BATCHES}
            for runtime in args.runtime or ["ort", "ov"]:
                time_row(f"{name} whole model", runtime, {k: str(p) for k, p in paths.items()}, inputs,
                         args.repeats, targets=False)
    if not args.save:
        print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()

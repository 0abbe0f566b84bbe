"""Worker (runs in the onnx2tf + LiteRT venv): ONNX -> onnx2tf -> .tflite -> LiteRT interpreter (XNNPack).

    python tflite.py MODEL.onnx ROWS.npz OUT.npz BATCH [BATCH ...]

Converts a copy of MODEL.onnx (onnx2tf rewrites its input file), keeps the NCHW input layout, then runs
rows.npz's `x` through the interpreter in chunks of each BATCH (resizing the input), and writes
`out_<batch>` (S, C) to OUT.npz. Any failure: a one-line message on stderr and exit code 1.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np


def main() -> int:
    model, rows, out, *batches = sys.argv[1:]
    x = np.load(rows)["x"].astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model.onnx"
        shutil.copy(model, src)
        import onnx2tf

        onnx2tf.convert(
            input_onnx_file_path=str(src),
            output_folder_path=str(Path(tmp) / "tf"),
            keep_ncw_or_nchw_or_ncdhw_input_names=["input"] if x.ndim >= 3 else None,
            non_verbose=True,
        )
        tflite = Path(tmp) / "tf" / "model_float32.tflite"
        from ai_edge_litert.interpreter import Interpreter

        results = {}
        for batch in (int(b) for b in batches):
            interp = Interpreter(model_path=str(tflite))
            inp = interp.get_input_details()[0]
            interp.resize_tensor_input(inp["index"], [batch, *x.shape[1:]])
            interp.allocate_tensors()
            outs = []
            for s in range(0, len(x) - len(x) % batch, batch):
                interp.set_tensor(inp["index"], x[s : s + batch])
                interp.invoke()
                y = interp.get_tensor(interp.get_output_details()[0]["index"])
                if y.shape[0] != batch:
                    raise RuntimeError(f"output shape {y.shape} for a batch of {batch}")
                outs.append(y)
            results[f"out_{batch}"] = np.concatenate(outs)
        np.savez(out, **results)
    return 0


if __name__ == "__main__":
    from _worker import run  # beside this script, on sys.path[0]

    run(main)

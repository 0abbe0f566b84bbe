"""Worker (runs in a venv with torch + torchvision + onnx2torch): ONNX -> onnx2torch -> a torch module.

    python onnx2torch_run.py MODEL.onnx ROWS.npz OUT.npz BATCH [BATCH ...]

Runs rows.npz's `x` through the converted module in chunks of each BATCH and writes `out_<batch>` (S, C)
to OUT.npz. Any failure: a one-line message on stderr and exit code 1.
"""

from __future__ import annotations

import sys

import numpy as np


def main() -> int:
    model, rows, out, *batches = sys.argv[1:]
    import torch
    from onnx2torch import convert

    torch.set_num_threads(1)
    x = torch.from_numpy(np.load(rows)["x"].astype(np.float32))
    net = convert(model).eval()
    results = {}
    for batch in (int(b) for b in batches):
        outs = []
        with torch.no_grad():
            for s in range(0, len(x) - len(x) % batch, batch):
                y = net(x[s : s + batch])
                if y.shape[0] != batch:
                    raise RuntimeError(f"output shape {tuple(y.shape)} for a batch of {batch}")
                outs.append(y.numpy())
        results[f"out_{batch}"] = np.concatenate(outs)
    np.savez(out, **results)
    return 0


if __name__ == "__main__":
    from _worker import run  # beside this script, on sys.path[0]

    run(main)

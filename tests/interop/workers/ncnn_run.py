"""Worker (runs in the main venv, in its own process: ncnn can crash on a model it misreads): ncnn param/bin.

    python ncnn_run.py MODEL.ncnn.param ROWS.npz OUT.npz BATCH [BATCH ...]

Runs rows.npz's `x` sample by sample (ncnn has no batch axis) in fp32 and writes `out_<batch>` (S, C).
Any failure: a one-line message on stderr and exit code 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def main() -> int:
    param, rows, out, *batches = sys.argv[1:]
    import ncnn

    x = np.load(rows)["x"].astype(np.float32)
    net = ncnn.Net()
    for opt in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic", "use_bf16_storage"):
        setattr(net.opt, opt, False)
    net.opt.num_threads = 1
    if net.load_param(param) or net.load_model(str(Path(param).with_suffix(".bin"))):
        raise RuntimeError("ncnn cannot load the param/bin pnnx wrote")
    outs = []
    for sample in x:
        ex = net.create_extractor()
        ex.input("in0", ncnn.Mat(np.ascontiguousarray(sample)).clone())
        ret, y = ex.extract("out0")
        if ret != 0:
            raise RuntimeError(f"ncnn extract returned {ret}")
        outs.append(np.array(y).reshape(-1))
    y = np.stack(outs)
    np.savez(out, **{f"out_{b}": y[: len(y) - len(y) % int(b)] for b in batches})
    return 0


if __name__ == "__main__":
    from _worker import run  # beside this script, on sys.path[0]

    run(main)

"""Script for tests/test_loader.py: DataLoader workers must not free this process's uncollected garbage.

An onnxruntime session (whose thread pool does not survive a fork) is left in a reference cycle, uncollected;
a loader with a worker that runs gc.collect() then reads the data. Before the fix the worker blocked forever in
the session's destructor. Prints "ok <samples>" when it finishes.
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when run as a plain script

from fyc_convert.data.loader import make_loader


class _Collecting(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        gc.collect()  # what an allocation-heavy worker does sooner or later
        return torch.zeros(2), i


def main() -> None:
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2  # a thread pool whose threads are parked when the worker is forked
    gc.disable()
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for _ in range(20):
        session.run(None, {"x": np.zeros(1, np.float32)})
    time.sleep(1.0)
    cycle: list = [session]
    cycle.append(cycle)
    del session, cycle  # garbage now, collected only by the cycle collector
    gc.enable()
    n = sum(len(y) for _, y in make_loader(_Collecting(), batch_size=2, device=torch.device("cpu"), workers=1))
    print(f"ok {n}")


if __name__ == "__main__":
    main()

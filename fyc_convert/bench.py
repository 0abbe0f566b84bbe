"""onnxruntime latency: medians of repeated runs, baseline and candidate interleaved in one loop.

Used by `--bench` (the report's `latency_ms`) and by the scripts in benchmarks/.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


def session(model: str | Path | onnx.ModelProto, *, threads: int = 1) -> ort.InferenceSession:
    """A CPU onnxruntime session with `threads` intra-op threads (1 = the edge-device-like setting)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def compare_latency(
    sessions: Sequence[ort.InferenceSession],
    feed: np.ndarray,
    *,
    repeats: int = 50,
    warmup: int = 5,
    min_seconds: float = 0.0,
) -> list[float]:
    """Median milliseconds per run for each session on the same input.

    The sessions are run round-robin (A, B, A, B, ...) so that noise from other processes on a shared
    machine hits all of them alike; the median discards the outliers.
    """
    names = [s.get_inputs()[0].name for s in sessions]
    for s, name in zip(sessions, names):
        for _ in range(warmup):
            s.run(None, {name: feed})
    times: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    i = 0
    while i < repeats or time.perf_counter() - start < min_seconds:
        for k, (s, name) in enumerate(zip(sessions, names)):
            t0 = time.perf_counter()
            s.run(None, {name: feed})
            times[k].append(time.perf_counter() - t0)
        i += 1
    return [1000.0 * statistics.median(ts) for ts in times]


def gemm_head_model(weight: np.ndarray, bias: np.ndarray | None, *, opset: int = 18,
                    ir_version: int = 10) -> onnx.ModelProto:
    """The learned classifier as exported: ``features (batch_size, N) -> Gemm(W (C, N), b) -> logits``.

    The baseline beside which the fixed head is timed.
    """
    from onnx import TensorProto, helper, numpy_helper

    c, n = weight.shape
    inits = [numpy_helper.from_array(weight.astype(np.float32), "W")]
    inputs = ["features", "W"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.astype(np.float32), "b"))
        inputs.append("b")
    node = helper.make_node("Gemm", inputs, ["logits"], transB=1, name="gemm_head")
    graph = helper.make_graph(
        [node], "gemm_head",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch_size", n])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", c])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model

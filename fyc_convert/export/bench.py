"""Latency: medians of repeated runs, baseline and candidate interleaved in one loop (the one timer).

Used by `--bench` (the report's `latency_ms`) and by the scripts in benchmarks/ (onnxruntime, OpenVINO and
PyTorch alike: each is timed as a callable by `interleaved_medians`).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

Runner = Callable[[np.ndarray], Any]  # runs one inference on a batch

# The report's whole-model timings (`--bench`): at least this many interleaved rounds and this many seconds per
# batch size. 30 rounds left the batch-32 ratio of two models at parity moving about 2% from run to run.
REPORT_REPEATS = 100
REPORT_MIN_SECONDS = 1.0


def session(model: str | Path | onnx.ModelProto, *, threads: int = 1) -> ort.InferenceSession:
    """A CPU onnxruntime session with `threads` intra-op threads (1 = the edge-device-like setting)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def openvino_runner(model: str | Path | onnx.ModelProto, *, threads: int = 1, precision: str | None = "f32",
                    input_shape: Sequence[int] | None = None) -> Runner:
    """An OpenVINO CPU model compiled for `threads` inference threads, as a runner ``x -> outputs``.

    Args:
        model: The ONNX model or its path (external data next to it is found by OpenVINO).
        threads: INFERENCE_NUM_THREADS.
        precision: INFERENCE_PRECISION_HINT ("f32", "bf16"); None keeps the plugin's default, which is
            bf16 on CPUs with AMX/AVX-512 bf16.
        input_shape: Compile for this fixed input shape (OpenVINO's usual deployment; its CPU plugin runs
            dynamic shapes through per-call shape inference); None keeps the model's dynamic axes.

    Returns:
        A callable running one inference request on its input.
    """
    import openvino as ov  # optional: only the benchmarks and the interop suite use OpenVINO

    core = ov.Core()
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    if isinstance(model, onnx.ModelProto):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            onnx.save_model(model, path)
            ov_model = core.read_model(str(path))
    else:
        ov_model = core.read_model(str(model))
    if input_shape is not None:
        ov_model.reshape({0: list(input_shape)})
    compiled = core.compile_model(ov_model, "CPU", config)
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> Any:
        # shared input memory and no result dict: `request.infer([x])` copies both on every call
        request.set_input_tensor(ov.Tensor(np.ascontiguousarray(x), shared_memory=True))
        request.infer()
        return request.get_output_tensor().data

    return run


def _ort_runner(sess: ort.InferenceSession) -> Runner:
    name = sess.get_inputs()[0].name

    def run(x: np.ndarray) -> Any:
        return sess.run(None, {name: x})

    return run


def interleaved_medians(
    fns: Sequence[Callable[[], Any]],
    *,
    repeats: int = 50,
    warmup: int = 5,
    min_seconds: float = 0.0,
    sync: Callable[[], None] | None = None,
) -> list[float]:
    """Median seconds per call of each fn, called round-robin (A, B, A, B, ...) after `warmup` rounds.

    Round-robin makes noise from other processes on a shared machine hit all of them alike; the median
    discards the outliers. `sync` (e.g. ``torch.cuda.synchronize``) runs before and after each timed call.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    i = 0
    while i < repeats or time.perf_counter() - start < min_seconds:
        for k, fn in enumerate(fns):
            if sync is not None:
                sync()
            t0 = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            times[k].append(time.perf_counter() - t0)
        i += 1
    return [statistics.median(ts) for ts in times]


def compare_latency(
    sessions: Sequence[ort.InferenceSession | Runner],
    feed: np.ndarray,
    *,
    repeats: int = 50,
    warmup: int = 5,
    min_seconds: float = 0.0,
) -> list[float]:
    """Median milliseconds per run for each session (onnxruntime) or runner on the same input, interleaved."""
    runners = [_ort_runner(s) if isinstance(s, ort.InferenceSession) else s for s in sessions]
    fns = [(lambda r=r: r(feed)) for r in runners]
    return [1000.0 * t for t in interleaved_medians(fns, repeats=repeats, warmup=warmup, min_seconds=min_seconds)]


def gemm_head_model(weight: np.ndarray, bias: np.ndarray | None, *, opset: int = 17,
                    ir_version: int | None = None) -> onnx.ModelProto:
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
    model.ir_version = ir_version if ir_version is not None else onnx.helper.find_min_ir_version_for(
        model.opset_import)
    return model

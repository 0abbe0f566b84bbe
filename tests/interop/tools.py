"""One adapter per deployment tool: take an exported .onnx, run it the way the tool deploys it, return logits.

Every adapter is ``run(model, x, batches, work) -> ToolRun``: `x` (S, *input_shape) real rows, run in
chunks of each batch size (the outputs' leading axis is checked per chunk); `work` a folder of its own.
A tool that cannot convert or run the model raises ToolFailed with its one-line reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from fyc_convert.errors import first_line

ROOT = Path(__file__).resolve().parents[2]
WORKERS = Path(__file__).parent / "workers"


class ToolFailed(Exception):
    """The tool could not convert or run the model (the message is its first line)."""


@dataclass
class ToolRun:
    outputs: dict[int, np.ndarray]  # batch size -> (S', C) logits of the first S' rows
    onnx: Path | None = None  # the tool's output model, when it writes ONNX
    notes: list[str] = field(default_factory=list)


def _chunks(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batches: list[int]) -> dict[int, np.ndarray]:
    out = {}
    for batch in batches:
        parts = []
        for s in range(0, len(x) - len(x) % batch, batch):
            y = np.asarray(fn(np.ascontiguousarray(x[s : s + batch])))
            if y.ndim != 2 or y.shape[0] != batch:
                raise ToolFailed(f"output shape {y.shape} for a batch of {batch}")
            parts.append(y)
        out[batch] = np.concatenate(parts)
    return out


def _ort(model: Path | str, x: np.ndarray, batches: list[int]) -> dict[int, np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    try:
        sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return _chunks(lambda b: sess.run(None, {name: b})[0], x, batches)
    except ToolFailed:
        raise
    except Exception as e:
        raise ToolFailed(f"onnxruntime: {first_line(e)}") from e


def onnxruntime_tool(model: Path, x: np.ndarray, batches: list[int], work: Path) -> ToolRun:
    return ToolRun(_ort(model, x, batches))


def openvino_tool(model: Path, x: np.ndarray, batches: list[int], work: Path) -> ToolRun:
    """OpenVINO CPU, fp32 precision hint (its default is bf16 on AMX/AVX-512-bf16 CPUs), 1 thread."""
    import openvino as ov

    core = ov.Core()
    try:
        compiled = core.compile_model(core.read_model(str(model)), "CPU",
                                      {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1})
        request = compiled.create_infer_request()

        def run(b: np.ndarray) -> np.ndarray:
            request.infer([b])
            return request.get_output_tensor().data.copy()

        return ToolRun(_chunks(run, x, batches))
    except ToolFailed:
        raise
    except Exception as e:
        raise ToolFailed(f"openvino: {first_line(e)}") from e


def onnxslim_tool(model: Path, x: np.ndarray, batches: list[int], work: Path) -> ToolRun:
    import onnxslim

    out = work / "slim.onnx"
    try:
        onnxslim.slim(str(model), str(out))
    except Exception as e:
        raise ToolFailed(f"onnxslim: {first_line(e)}") from e
    return ToolRun(_ort(out, x, batches), onnx=out)


def onnxsim_tool(model: Path, x: np.ndarray, batches: list[int], work: Path) -> ToolRun:
    from onnxsim import simplify

    out = work / "sim.onnx"
    try:
        simplified, ok = simplify(onnx.load(str(model)))
        if not ok:
            raise ToolFailed("onnxsim: its own check of the simplified model failed")
        onnx.save(simplified, str(out))
    except ToolFailed:
        raise
    except Exception as e:
        raise ToolFailed(f"onnxsim: {first_line(e)}") from e
    return ToolRun(_ort(out, x, batches), onnx=out)


class _Rows:
    """onnxruntime's CalibrationDataReader over the real rows, one at a time."""

    def __init__(self, name: str, x: np.ndarray):
        self.items = iter([{name: x[i : i + 1]} for i in range(len(x))])

    def get_next(self) -> dict | None:
        return next(self.items, None)


def quant_dynamic_tool(model: Path, x: np.ndarray, batches: list[int], work: Path) -> ToolRun:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = work / "int8_dynamic.onnx"
    try:
        quantize_dynamic(str(model), str(out), weight_type=QuantType.QInt8)
    except Exception as e:
        raise ToolFailed(f"quantize_dynamic: {first_line(e)}") from e
    return ToolRun(_ort(out, x, batches), onnx=out)


def quant_static_tool(model: Path, x: np.ndarray, batches: list[int], work: Path, *,
                      float_head: bool = False) -> ToolRun:
    """Static int8 QDQ with the real rows as calibration data; `float_head` excludes the fyc_head/ nodes
    (they hold no weights, so int8 there only adds rounding at every butterfly level)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre, out = work / "pre.onnx", work / "int8_qdq.onnx"
    try:
        quant_pre_process(str(model), str(pre), skip_symbolic_shape=True)
        graph = onnx.load(str(pre), load_external_data=False).graph
        exclude = [n.name for n in graph.node if n.name.startswith("fyc_head/")] if float_head else []
        quantize_static(str(pre), str(out), _Rows(graph.input[0].name, x), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude)
    except Exception as e:
        raise ToolFailed(f"quantize_static: {first_line(e)}") from e
    return ToolRun(_ort(out, x, batches), onnx=out)


def pnnx_ncnn_tool(model: Path, x: np.ndarray, batches: list[int], work: Path) -> ToolRun:
    """pnnx (ONNX -> ncnn param/bin, fp32 weights), then ncnn in fp32 one sample at a time (workers/ncnn_run.py,
    its own process: ncnn may crash on a graph it misreads). ncnn has no batch axis: every batch size runs
    as that many single-sample extractions.
    """
    src = work / "model.onnx"
    src.write_bytes(model.read_bytes())
    shape = ",".join(str(d) for d in (1, *x.shape[1:]))
    pnnx = Path(sys.executable).with_name("pnnx")
    proc = subprocess.run([str(pnnx), str(src), f"inputshape=[{shape}]", "fp16=0"], cwd=work,
                          capture_output=True, text=True, timeout=900, check=False)
    param = work / "model.ncnn.param"
    if proc.returncode != 0 or not param.exists():
        lines = [s for s in (proc.stderr + proc.stdout).splitlines() if s.strip()]
        raise ToolFailed(f"pnnx exit {proc.returncode}: {lines[-1][:300] if lines else ''}")
    run = _run_worker(sys.executable, "ncnn_run.py", param, x, batches, work)
    run.notes.append("ncnn has no batch axis: batches run sample by sample")
    return run


def _run_worker(python: str, script: str, model: Path, x: np.ndarray, batches: list[int], work: Path) -> ToolRun:
    rows, out = work / "rows.npz", work / "out.npz"
    np.savez(rows, x=x)
    proc = subprocess.run([python, str(WORKERS / script), str(model), str(rows), str(out),
                           *(str(b) for b in batches)], capture_output=True, text=True, timeout=1200,
                          check=False)
    if proc.returncode != 0:
        lines = [s for s in proc.stderr.splitlines() if s.strip()]
        raise ToolFailed(lines[-1][:300] if lines else f"{script} exit {proc.returncode} (signal {-proc.returncode})"
                         if proc.returncode < 0 else f"{script} exit {proc.returncode}")
    with np.load(out) as data:
        return ToolRun({b: data[f"out_{b}"] for b in batches})


def _worker(python_env: str, default: Path, script: str) -> Callable[[Path, np.ndarray, list[int], Path], ToolRun]:
    """An adapter that runs workers/<script> in another virtual environment."""

    def run(model: Path, x: np.ndarray, batches: list[int], work: Path) -> ToolRun:
        python = os.environ.get(python_env) or str(default)
        if not Path(python).exists():
            raise FileNotFoundError(f"{python_env}: no python at {python}; run .ci/interop.sh to create it")
        return _run_worker(python, script, model, x, batches, work)

    return run


onnx2tf_litert_tool = _worker("FYC_INTEROP_TFLITE", ROOT / ".venv-interop/tflite/bin/python", "tflite.py")
onnx2torch_tool = _worker("FYC_INTEROP_TORCH", ROOT / ".venv-interop/torch/bin/python", "onnx2torch_run.py")

TOOLS: dict[str, Callable[[Path, np.ndarray, list[int], Path], ToolRun]] = {
    "onnxruntime": onnxruntime_tool,
    "openvino": openvino_tool,
    "onnxslim": onnxslim_tool,
    "onnxsim": onnxsim_tool,
    "ort-int8-dynamic": quant_dynamic_tool,
    "ort-int8-qdq": quant_static_tool,
    "ort-int8-qdq-float-head": lambda model, x, batches, work: quant_static_tool(model, x, batches, work,
                                                                                float_head=True),
    "onnx2tf-litert": onnx2tf_litert_tool,
    "pnnx-ncnn": pnnx_ncnn_tool,
    "onnx2torch": onnx2torch_tool,
}
QUANTIZERS = ("ort-int8-dynamic", "ort-int8-qdq", "ort-int8-qdq-float-head")

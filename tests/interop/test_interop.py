"""Original and converted models through every deployment tool: parity with PyTorch, shapes, the head's checks.

For each (tool, case): the converted model (`model.onnx`, dynamic batch) runs at batch 1 and 4 on real
rows and must match PyTorch (|Δ| <= 1e-4 + 1e-4·|ref|, the export's own tolerance, and the same top-1);
the static-batch export (`model_b1.onnx`) runs at batch 1; where the tool writes ONNX, its output keeps
the head slim (no new MatMul/Gemm/Conv, no constant beyond the input's largest or max(C, n)). The original
runs through the same tool for the record; where it fails too, ours is skipped, not failed. int8
quantizers cannot match float32 to 1e-4: there ours must agree with PyTorch on top-1 about as often as
the quantized original does (within two rows of 16) and keep the head slim. `--quantize int8`'s own files
(`model.int8.onnx`, `original.int8.onnx`, zoo.build_int8) run in onnxruntime, OpenVINO and LiteRT (where the
quantized original passes): top-1 agreement with the float32 files on 256 rows, the head quantized only at its
input.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import tools
import zoo
from conftest import RESULTS
from tools import QUANTIZERS, TOOLS, ToolFailed, ToolRun

from fyc_convert.export.onnx_export import head_entries
from fyc_convert.export.onnx_head import DENSE_OPS, HEAD_PREFIX, check_head_static
from fyc_convert.export.quantize import check_head_boundary, head_exactness

CASES = [c for c in os.environ.get("FYC_INTEROP_CASES", ",".join(zoo.CASES)).split(",") if c]
ATOL = RTOL = 1e-4
# Originals not run, with why: onnx2tf needs minutes for a 66-148 MB Gemm (512 x 32000 took 387 s on
# this project's 2-core machine, 2048 x 18000 more than 13 minutes) — beyond the suite's budget.
SLOW_ORIGINALS = {
    ("onnx2tf-litert", "wide512x32000"): "onnx2tf takes 387 s for the 66 MB Gemm",
    ("onnx2tf-litert", "wide2048x18000"): "onnx2tf takes > 13 min for the 148 MB Gemm",
}
# ncnn has no gather layer, and pnnx turns an ONNX Gather of an index list into a Crop of its first index
# (pass_ncnn/convert_Tensor_select takes a scalar index): class rows that are not one contiguous run
# (from_linear's assignment, i.e. the CLI's heads) cannot be picked in ncnn. Contiguous rows are a Slice.
NCNN_GATHER = "ncnn has no gather layer; pnnx keeps one index of the class-row Gather"
# Default static QDQ puts every butterfly level's Add/Sub output through int8 (a per-tensor scale): on the
# synthetic 18,000- and 32,000-class heads, whose top-1 margins are below that rounding, top-1 flips.
# The head holds no weights, so excluding its nodes costs nothing: "ort-int8-qdq-float-head" does that.
PNNX_DYNAMIC = ("pnnx drops Split sizes that depend on the batch (ncnn then crashes): convert the "
                "static-batch export")
# The ncnn layout picks rows with GridSample, which onnx2torch 1.5.15 has no converter for: it is made for ncnn
# (and runs in onnxruntime, OpenVINO, the simplifiers and LiteRT); onnx2torch takes the default layout.
ONNX2TORCH_GRID = "onnx2torch has no GridSample converter; export the default layout for onnx2torch"
QDQ_HEAD = "int8 QDQ rounds each of the head's 9-11 butterfly levels; exclude fyc_head/ nodes"
# what int8 quantizers put around or in place of a MatMul
QUANTIZED_OPS = {"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul"}
_BUILT: dict[str, zoo.Case] = {}


def _picks_by_gather(case: zoo.Case) -> bool:
    model = onnx.load(str(case.path("model")), load_external_data=False)
    return any(n.op_type == "Gather" and n.name.startswith(HEAD_PREFIX) for n in model.graph.node)


def _case(name: str, folder: Path) -> zoo.Case:
    if name not in _BUILT:
        _BUILT[name] = zoo.build_case(name, folder)
    return _BUILT[name]


def _attempt(tool: str, model: Path, x: np.ndarray, batches: list[int], work: Path) -> ToolRun | ToolFailed:
    work.mkdir(parents=True, exist_ok=True)
    try:
        return TOOLS[tool](model, x, batches, work)
    except ToolFailed as e:
        return e


def _family(op: str) -> str:
    """MatMulInteger/QLinearMatMul count as MatMul, ConvInteger/QLinearConv as Conv (quantizers rename)."""
    return {"MatMulInteger": "MatMul", "QLinearMatMul": "MatMul", "ConvInteger": "Conv", "QLinearConv": "Conv",
            "Gemm": "MatMul"}.get(op, op)


def _dense_count(model: onnx.ModelProto) -> int:
    return sum(1 for n in model.graph.node if n.op_type in DENSE_OPS)


def _largest_initializer(model: onnx.ModelProto) -> int:
    return max((int(np.prod(t.dims)) for t in model.graph.initializer), default=0)


def _check_slim(tool_onnx: Path, source: Path, case: zoo.Case) -> None:
    """The tool's output has no dense op the input lacked and no constant beyond the input's or max(C, n)."""
    out, src = onnx.load(str(tool_onnx)), onnx.load(str(source))
    assert _dense_count(out) <= _dense_count(src), "the tool added a MatMul/Gemm/Conv"
    limit = max(_largest_initializer(src), case.num_classes, case.embed_size)
    assert _largest_initializer(out) <= limit, "the tool re-inflated a constant"
    quantized = {n.op_type for n in out.graph.node if n.name.startswith(HEAD_PREFIX)} & QUANTIZED_OPS
    if case.layout == "kron" and quantized:
        return  # int8 ±1 blocks (exact in int8): no float block left to check; the bounds above hold
    if any(n.name.startswith(HEAD_PREFIX) for n in out.graph.node):  # names kept: the head's own checks
        # tools may drop the metadata that names the layout: the case says it
        census = check_head_static(out, num_classes=case.num_classes, embed_size=case.embed_size, layout=case.layout)
        dense = {"Conv"} if case.layout == "kron" else {"MatMul", "Conv"}  # kron: MatMul by its ±1 blocks
        assert not {_family(op) for op in census} & dense


def _record(tool: str, case: str, variant: str, run: ToolRun | ToolFailed | None, ref: np.ndarray | None,
            note: str = "") -> None:
    entry = {"tool": tool, "case": case, "variant": variant}
    if run is None:
        entry |= {"status": "not run", "note": note}
    elif isinstance(run, ToolFailed):
        entry |= {"status": "fails", "note": str(run)}
    else:
        diffs = [float(np.abs(y - ref[: len(y)]).max()) for y in run.outputs.values()]
        top1 = min(float((y.argmax(1) == ref[: len(y)].argmax(1)).mean()) for y in run.outputs.values())
        entry |= {"status": "runs", "max_abs_diff": max(diffs), "top1_agreement": top1,
                  "max_abs_ref": float(np.abs(ref).max()),
                  "note": "; ".join([note, *run.notes]).strip("; ")}
    RESULTS.append(entry)


def _assert_parity(run: ToolRun, ref: np.ndarray, batches: list[int]) -> None:
    assert sorted(run.outputs) == sorted(batches)
    for batch, y in run.outputs.items():
        want = ref[: len(y)]
        assert y.shape == want.shape, f"batch {batch}: shape {y.shape} != {want.shape}"
        excess = np.abs(y - want) - (ATOL + RTOL * np.abs(want))
        worst = np.abs(y - want).max()
        assert excess.max() <= 0, f"batch {batch}: max |Δ| {worst:.3g} beyond {ATOL:g} + {RTOL:g}·|ref|"
        assert np.array_equal(y.argmax(1), want.argmax(1)), f"batch {batch}: top-1 differs"


def _agreement(run: ToolRun, ref: np.ndarray) -> float:
    return min(float((y.argmax(1) == ref[: len(y)].argmax(1)).mean()) for y in run.outputs.values())


@pytest.mark.interop
@pytest.mark.parametrize("case_name", CASES)
@pytest.mark.parametrize("tool", list(TOOLS))
def test_tool_keeps_the_converted_model_exact(tool: str, case_name: str, zoo_dir: Path, tmp_path: Path) -> None:
    case = _case(case_name, zoo_dir)
    rows = case.rows()
    x, ref_model, ref_original = rows["x"], rows["ref_model"], rows["ref_original"]
    batches = [1, 4]
    variant = "model"
    if tool == "pnnx-ncnn":  # pnnx converts at one input shape: the static-batch export is what it takes
        dynamic = _attempt(tool, case.path("model"), x, [1], tmp_path / "dynamic")
        _record(tool, case_name, "converted, dynamic batch", dynamic, ref_model, PNNX_DYNAMIC)
        batches, variant = [1], "model_b1"
    ours = _attempt(tool, case.path(variant), x, batches, tmp_path / "model")
    slow = SLOW_ORIGINALS.get((tool, case_name))
    original = None if slow else _attempt(tool, case.path("original"), x, batches, tmp_path / "original")
    _record(tool, case_name, "original", original, ref_original, slow or "")
    _record(tool, case_name, "converted" if variant == "model" else "static b1", ours, ref_model)
    if isinstance(ours, ToolFailed):
        if isinstance(original, ToolFailed):
            pytest.skip(f"{tool} fails on the original too: {original}")
        if tool == "onnx2torch" and case.layout == "ncnn" and "GridSample" in str(ours):
            pytest.xfail(f"{ONNX2TORCH_GRID} ({ours})")
        if tool == "pnnx-ncnn" and case.layout == "kron" and _picks_by_gather(case):
            pytest.xfail(f"{NCNN_GATHER}; on the kron head pnnx also leaves a Reshape ncnn cannot load ({ours})")
        pytest.fail(f"{tool} fails only on the converted model: {ours}")
    if tool == "pnnx-ncnn" and _picks_by_gather(case):
        try:
            _assert_parity(ours, ref_model, batches)
        except AssertionError as e:
            pytest.xfail(f"{NCNN_GATHER} ({str(e).splitlines()[0]})")

    if tool in QUANTIZERS:
        # the zoo's converted models are swapped, most not fine-tuned: smaller top-1 margins than the originals,
        # so int8 rounding may flip a row more; two rows of 16 are allowed
        want = _agreement(original, ref_original) - 2 / len(x) if isinstance(original, ToolRun) else 0.85
        got = _agreement(ours, ref_model)
        if got < want and tool == "ort-int8-qdq" and case_name.startswith("wide"):
            pytest.xfail(f"{QDQ_HEAD} (top-1 {got:.0%} against {want + 2 / len(x):.0%} for the original)")
        assert got >= want, f"top-1 agreement {got:.0%} below the quantized original's {want:.0%} (less one row)"
    else:
        _assert_parity(ours, ref_model, batches)
    if ours.onnx is not None:
        _check_slim(ours.onnx, case.path("model"), case)
    if variant != "model":
        return

    static = _attempt(tool, case.path("model_b1"), x, [1], tmp_path / "model_b1")
    _record(tool, case_name, "static b1", static, ref_model)
    if isinstance(static, ToolFailed):
        original_b1 = None if slow else _attempt(tool, case.path("original_b1"), x, [1], tmp_path / "original_b1")
        if isinstance(original_b1, ToolFailed):
            pytest.skip(f"{tool} fails on the static-batch original too: {original_b1}")
        pytest.fail(f"{tool} fails on the static-batch converted model: {static}")
    if tool in QUANTIZERS:
        assert _agreement(static, ref_model) >= _agreement(ours, ref_model) - 2 / len(x)
    else:
        _assert_parity(static, ref_model, [1])


# --quantize int8's model.int8.onnx (the head float32 inside) in the runtimes that run QDQ models as they are, and
# through onnx2tf into LiteRT only where the quantized original passes there (onnx2tf 1.29 misconverts onnxruntime's
# QDQ models: the quantized digits original keeps 20% top-1, the glyph's 0%; the large originals take minutes)
INT8_TOOLS = ("onnxruntime", "openvino", "onnx2tf-litert")
INT8_ORIGINAL_FIRST = ("onnx2tf-litert",)
INT8_AGREEMENT = 0.99  # top-1 agreement with the float32 model.onnx (issue 24's bound for the large heads)
HEAD_EXACT = 1e-4  # max |Δ| of the int8 model's head against the float32 head on the same features


@pytest.mark.interop
@pytest.mark.parametrize("case_name", CASES)
@pytest.mark.parametrize("tool", INT8_TOOLS)
def test_int8_model_keeps_the_float32_top1(tool: str, case_name: str, zoo_dir: Path, tmp_path: Path) -> None:
    """model.int8.onnx as `--quantize int8` writes it: the head quantized only at its input (static check), and in
    the tool top-1 agreement with float32 model.onnx of at least 99%, or the quantized original's less two rows."""
    case = zoo.build_int8(_case(case_name, zoo_dir))
    rows = case.rows("int8_rows")
    x = rows["x"]
    heads = head_entries(onnx.load(str(case.path("model")), load_external_data=False))
    assert check_head_boundary(case.path("model.int8"), heads) <= 1  # at most one Q/DQ pair: on the head's input
    original = _int8_original(tool, case_name, case, rows, tmp_path)
    ours = _attempt(tool, case.path("model.int8"), x, [1, 8], tmp_path / "model")
    _record(f"{tool} int8", case_name, "converted", ours, rows["ref_model"])
    if isinstance(ours, ToolFailed):
        if isinstance(original, ToolFailed):
            pytest.skip(f"{tool} fails on the int8 original too: {original}")
        pytest.fail(f"{tool} fails only on the converted int8 model: {ours}")
    got = _agreement(ours, rows["ref_model"])
    want = INT8_AGREEMENT
    if isinstance(original, ToolRun):
        # the head adds no int8 error: relative to its logits, ours is no further from float32 than the original.
        # Only where the converted model kept the original's backbone (the glyph case's was fine-tuned, so its
        # backbone's int8 error is its own), and not for kron and ncnn: their batch-major heads take the features
        # through the one Q/DQ pair at the head's boundary (kron: its first MatMul; ncnn: the Flatten before it),
        # one rounding the original's Gemm head does not have (digits: 0.036 against 0.029 for both).
        if not case_name.endswith(("-kron", "-ncnn")) and zoo.split_name(case_name)[0] not in zoo.FINE_TUNED:
            assert _relative_error(ours, rows["ref_model"]) <= _relative_error(original, rows["ref_original"])
        want = min(want, _agreement(original, rows["ref_original"]) - 2 / len(x))
    assert got >= want, f"int8 top-1 agreement with float32 {got:.1%} below {want:.1%}"


@pytest.mark.interop
@pytest.mark.parametrize("case_name", CASES)
def test_int8_head_is_exact(case_name: str, zoo_dir: Path) -> None:
    """model.int8.onnx's head against model.onnx's head fed the same dequantized features: exact inside, every
    layout (once per case: it does not depend on the tool that runs the model)."""
    case = zoo.build_int8(_case(case_name, zoo_dir))
    x = case.rows("int8_rows")["x"]
    assert head_exactness(case.path("model.int8"), case.path("model"), x[:32]) <= HEAD_EXACT


def _int8_original(tool: str, case_name: str, case: zoo.Case, rows: dict[str, np.ndarray],
                   tmp_path: Path) -> ToolRun | ToolFailed:
    """original.int8.onnx in the tool (recorded); for INT8_ORIGINAL_FIRST tools a skip unless it passes there."""
    slow = SLOW_ORIGINALS.get((tool, case_name))
    if slow and tool in INT8_ORIGINAL_FIRST:
        _record(f"{tool} int8", case_name, "original", None, None, slow)
        pytest.skip(f"{tool}: the quantized original is not run ({slow})")
    original = _attempt(tool, case.path("original.int8"), rows["x"], [8], tmp_path / "original")
    _record(f"{tool} int8", case_name, "original", original, rows["ref_original"])
    if tool in INT8_ORIGINAL_FIRST:
        if isinstance(original, ToolFailed):
            pytest.skip(f"{tool} fails on the quantized original: {original}")
        if (agreement := _agreement(original, rows["ref_original"])) < INT8_AGREEMENT:
            pytest.skip(f"{tool} misconverts the quantized original too (top-1 {agreement:.0%})")
    return original


def _relative_error(run: ToolRun, ref: np.ndarray) -> float:
    """Largest |int8 − float32| logit difference over the largest |float32| logit."""
    return max(float(np.abs(y - ref[: len(y)]).max()) for y in run.outputs.values()) / float(np.abs(ref).max())


@pytest.mark.interop
def test_adapters_catch_a_wrong_model(zoo_dir: Path, tmp_path: Path) -> None:
    """The parity check fails on a model whose head was tampered with (the suite can fail)."""
    case = _case(CASES[0], zoo_dir)
    model = onnx.load(str(case.path("model")))
    (bias,) = [t for t in model.graph.initializer if t.name.startswith(f"{HEAD_PREFIX}bias")]
    values = onnx.numpy_helper.to_array(bias).copy()
    values[0] += 1.0
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    rows = case.rows()
    run = tools.onnxruntime_tool(bad, rows["x"], [1, 4], tmp_path)
    with pytest.raises(AssertionError, match="max"):
        _assert_parity(run, rows["ref_model"], [1, 4])

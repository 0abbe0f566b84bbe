"""The rich report table: the classifier-ops cell, with and without the If on the batch size."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from fyc_convert.report import OnnxReport, ParamsReport, Report, render


def _report(head_ops: dict[str, int]) -> Report:
    params = ParamsReport(original=1_000_000, converted=40_000, removed=960_000, removed_pct=96.0,
                          head_before=961_000, head_after=1_001, trainable=40_000)
    onnx = OnnxReport(original_bytes=4_000_000, converted_bytes=200_000, size_reduction_pct=95.0,
                      head_ops=head_ops)
    return Report(status="ok", checkpoint="m.pt", head="hadamard", layer="fc", in_features=512,
                  num_classes=1000, hadamard_size=1024, embed_size=1024, embedding="tile", coherence=0.06,
                  params=params, onnx=onnx)


@pytest.mark.parametrize(("head_ops", "cell"), [
    ({"Add": 20, "Sub": 18, "Split": 5, "Concat": 5, "Mul": 3}, "51 (38 add/sub)"),
    ({"Add": 700, "Sub": 650, "If": 1, "Split": 60, "Mul": 12}, "1,423 (1,350 add/sub, 2 paths)"),
])
def test_classifier_ops_cell(head_ops: dict[str, int], cell: str) -> None:
    out = io.StringIO()
    render(_report(head_ops), Console(file=out, width=80, color_system=None))
    text = out.getvalue()
    row = next(line for line in text.splitlines() if "classifier ops" in line)
    assert cell in row and "0 MatMul" in row
    assert max(len(line) for line in text.splitlines()) <= 80

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


def test_kron_multiply_adds_row() -> None:
    """--head-layout kron states its MatMuls' multiply-adds per sample; the add/sub layouts have no such row."""
    report = _report({"MatMul": 2, "Mul": 3, "Reshape": 4, "Gather": 1})
    report.onnx.head_macs = 81_920
    out = io.StringIO()
    render(report, Console(file=out, width=80, color_system=None))
    row = next(line for line in out.getvalue().splitlines() if "multiply-adds" in line)
    assert "81,920" in row and "per sample" in row
    plain = io.StringIO()
    render(_report({"Add": 20}), Console(file=plain, width=80, color_system=None))
    assert "multiply-adds" not in plain.getvalue()


def _report_with(removed_pct: float, size_pct: float | None, b1: tuple[float, float] | None = None):
    from fyc_convert.report import OnnxReport, ParamsReport, Report

    params = ParamsReport(original=1000, converted=int(1000 * (1 - removed_pct / 100)), removed=0,
                          removed_pct=removed_pct, head_before=650, head_after=11, trainable=900)
    onnx = OnnxReport(size_reduction_pct=size_pct) if size_pct is not None else None
    latency = {"model_b1": {"original": b1[0], "converted": b1[1]}} if b1 else None
    return Report(status="ok", checkpoint="m.pt", head="hadamard", layer="fc", in_features=64, num_classes=10,
                  hadamard_size=128, embed_size=128, embedding="tile", coherence=0.1, params=params, onnx=onnx,
                  latency_ms=latency)


def test_verdict_says_when_the_swap_does_not_pay_off():
    from fyc_convert.report import swap_verdict as verdict

    small = verdict(_report_with(2.7, -2.2, b1=(0.02, 0.034)))
    assert small is not None
    assert "2.7% of the parameters" in small and "ONNX file +2.2%" in small and "1.70× slower at batch 1" in small
    assert verdict(_report_with(57.2, 55.9)) is None  # the glyph sample: it pays off
    assert verdict(_report_with(5.0, 30.0)) is None  # a much smaller file is worth it on its own
    assert verdict(_report_with(5.0, None)) is not None  # a dry run: parameters alone decide

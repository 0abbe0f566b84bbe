"""The "## Use the output" snippets run exactly as the README shows them, on a digits conversion.

The blocks come from README.md's section "## Use the output". Only the paths in each block's first line
("digits_fyc", "digit.png") are replaced by the temporary conversion's; the PyTorch block's `load_converted`
model and the onnxruntime block's logits must then agree within 1e-4, both ways.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from fyc_convert import convert

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Use the output"
PATHS = ("digits_fyc", "digit.png")  # the names the snippets' first lines use


def _section() -> tuple[Path, str]:
    for doc in (ROOT / "README.md",):
        text = doc.read_text(encoding="utf-8") if doc.is_file() else ""
        lines = text.splitlines()
        if HEADING in lines:
            start = lines.index(HEADING) + 1
            end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
            return doc, "\n".join(lines[start:end])
    raise AssertionError(f"README.md has no {HEADING!r} section")


def _blocks() -> list[str]:
    doc, section = _section()
    blocks = re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)
    assert len(blocks) == 2, f"{doc}: expected the load_converted and the onnxruntime block, found {len(blocks)}"
    return blocks


def _run(block: str, paths: dict[str, str]) -> tuple[dict, str]:
    """Run `block` with the quoted paths of its first line replaced; returns its namespace and its stdout."""
    first, rest = block.split("\n", 1)
    for name, path in paths.items():
        first = first.replace(f'"{name}"', repr(path))
    assert not any(f'"{name}"' in rest for name in paths), "the paths must be set in the first line only"
    namespace: dict = {"__name__": "__snippet__"}
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)  # the snippets read sample_models/ relative to the repository, as a user in a clone would
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(first + "\n" + rest, "<snippet>", "exec"), namespace)  # noqa: S102 - our own docs
    finally:
        os.chdir(cwd)
    return namespace, out.getvalue()


@pytest.fixture(scope="module")
def conversion(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    tmp = tmp_path_factory.mktemp("snippets")
    out = tmp / "digits_fyc"
    report = convert(ROOT / "sample_models" / "digits_cnn.pt", arch="sample_models.archs:digits_cnn",
                     data=ROOT / "sample_models" / "digits.npz", epochs=0, output_dir=out, device="cpu")
    assert report.status == "ok"
    pixels = np.load(ROOT / "sample_models" / "digits.npz")["x_val"][3, 0]  # (8, 8) in [0, 1]
    Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="L").save(tmp / "digit.png")
    return str(out), str(tmp / "digit.png")


def test_snippets_run_as_written_and_agree(conversion: tuple[str, str]) -> None:
    out, image = conversion
    paths = {"digits_fyc": out, "digit.png": image}
    torch_block, onnx_block = _blocks()
    ns_t, printed_t = _run(torch_block, paths)
    ns_o, printed_o = _run(onnx_block, paths)
    digits = [str(d) for d in range(10)]

    # the PyTorch block printed a class name per image; the onnxruntime block five "name: probability" lines
    assert printed_t.strip().startswith("[") and len(eval(printed_t)) == 8  # noqa: S307 - a printed list
    assert set(eval(printed_t)) <= set(digits)  # noqa: S307
    top5 = printed_o.strip().splitlines()
    assert len(top5) == 5 and all(line.split(": ")[0] in digits for line in top5)
    probs = [float(line.split(": ")[1]) for line in top5]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.001

    model, x_o, logits_o = ns_t["model"], ns_o["x"], ns_o["logits"]
    with torch.no_grad():  # the PyTorch model on the onnxruntime block's input
        want = model(torch.from_numpy(np.asarray(x_o, np.float32))).numpy()[0]
    np.testing.assert_allclose(logits_o, want, atol=1e-4, rtol=0)
    sess = ort.InferenceSession(f"{out}/model.onnx", providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": ns_t["x"].numpy()})[0]  # the ONNX model on the PyTorch block's input
    np.testing.assert_allclose(got, ns_t["logits"].numpy(), atol=1e-4, rtol=0)
    # the image is digits_val[3] as 8-bit pixels: the onnxruntime block read it back to the same input
    pixels = np.load(ROOT / "sample_models" / "digits.npz")["x_val"][3]
    mean, std = ns_t["mean"], ns_t["std"]
    np.testing.assert_allclose(x_o[0], (np.round(pixels * 255) / 255 - mean) / std, atol=1e-5)

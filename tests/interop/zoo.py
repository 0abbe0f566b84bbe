"""The interop suite's models: each an original and a converted ONNX file, with real rows and PyTorch outputs.

`build_case(name, folder)` exports, into `folder/<name>/`:
  original.onnx, model.onnx            dynamic batch (the default export: portable head, opset 17)
  original_b1.onnx, model_b1.onnx      the same models exported with a static batch of 1
A name ending in "-kron" (e.g. "glyph-kron") is the same case with model*.onnx exported with
`head_layout="kron"` (the Kronecker head: MatMuls by ±1 blocks), checked as such; "-ncnn" likewise with
`head_layout="ncnn"` (the class rows picked by GridSample: what ncnn runs).
  rows.npz                             x (S, *input_shape) real rows (random ones for the large heads),
                                       ref_original, ref_model (S, C): the PyTorch logits
`build_int8(case)` adds what `--quantize int8` writes, calibrated on other rows (training rows of the samples):
  original.int8.onnx, model.int8.onnx  fyc_convert.export.quantize.quantize_int8 of the dynamic-batch files
  int8_rows.npz                        x (INT8_ROWS, *input_shape), ref_original, ref_model: the float32 files'
                                       onnxruntime logits (the reference of the int8 models' top-1)
The tools run in other virtual environments only read these files.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fyc_convert.export.onnx_export import export_onnx
from fyc_convert.head.heads import HadamardHead
from fyc_convert.model.surgery import capture_features, swap_classifier

ROOT = Path(__file__).resolve().parents[2]
ROWS = 16  # real rows per case: batches of 4, and the first 4 one by one
CASES = ("digits", "glyph", "wide2048x18000", "wide512x32000", "digits-kron", "glyph-kron", "digits-ncnn",
         "glyph-ncnn")
LAYOUT_SUFFIXES = {"-kron": "kron", "-ncnn": "ncnn"}  # case name suffix -> the converted model's head layout


def split_name(name: str) -> tuple[str, str]:
    """(model name, head layout) of a case name, e.g. "glyph-kron" -> ("glyph", "kron")."""
    for suffix, layout in LAYOUT_SUFFIXES.items():
        if name.endswith(suffix):
            return name.removesuffix(suffix), layout
    return name, "portable"


@dataclass
class Case:
    name: str
    folder: Path
    input_shape: tuple[int, ...]
    in_features: int
    num_classes: int
    embed_size: int
    layout: str = "portable"  # the converted model's head layout

    def path(self, variant: str) -> Path:
        """variant: original, model, original_b1, model_b1, or (after `build_int8`) original.int8, model.int8."""
        return self.folder / f"{variant}.onnx"

    def rows(self, name: str = "rows") -> dict[str, np.ndarray]:
        """rows.npz, or int8_rows.npz (after `build_int8`)."""
        with np.load(self.folder / f"{name}.npz") as data:
            return {k: data[k] for k in data.files}


def sample(name: str, rows: int = ROWS, *, train: bool = False) -> tuple[nn.Module, torch.Tensor]:
    """A shipped sample model ("digits" or "glyph") and `rows` real (normalised) inputs of it: validation rows
    first (the digits' training rows after them), or with `train` training rows only (int8 calibration)."""
    from fyc_convert.model.loading import load_model
    from sample_models.build import normalise

    loaded = load_model(ROOT / "sample_models" / f"{name}_cnn.pt", arch=f"sample_models.archs:{name}_cnn")
    if name == "digits":
        with np.load(ROOT / "sample_models" / "digits.npz") as data:
            pool = data["x_train"] if train else np.concatenate([data["x_val"], data["x_train"]])
            x = pool[:: max(1, len(pool) // rows)][:rows]
    else:
        from sample_models.glyphs import TRAIN_FACES, VAL_FACE, load_glyph_classes, render_glyphs

        chars = load_glyph_classes()
        x, _ = render_glyphs(chars[:: max(1, len(chars) // rows)][:rows], (TRAIN_FACES[0] if train else VAL_FACE,),
                             copies=1 + rows // len(chars), clean_first=True, seed=0)
        x = x[:rows]
    return loaded.model.eval(), normalise(x, loaded.meta)


class _Wide(nn.Module):
    """A tiny backbone (B, 16) -> (B, N) and a large classifier N -> C (most of the model)."""

    def __init__(self, n_feat: int, c: int):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(16, n_feat), nn.Tanh())
        self.fc = nn.Linear(n_feat, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@functools.cache
def _models(name: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(original, converted, rows): the converted model's head as the CLI builds it for the samples.

    Cached: the layouts' cases of one sample ("glyph", "glyph-kron", ...) export the same models.
    """
    import copy

    with torch.random.fork_rng():
        torch.manual_seed(0)
        if name in ("digits", "glyph"):
            original, x = sample(name)
            converted = copy.deepcopy(original)
            feats = capture_features(converted, "fc", x)
            swap_classifier(converted, layer="fc", features=feats)
            if name in FINE_TUNED:
                _fine_tune_glyph(converted)
        else:
            n_feat, c = (int(v) for v in name.removeprefix("wide").split("x"))
            original = _Wide(n_feat, c).eval()
            x = torch.randn(ROWS, 16)
            converted = copy.deepcopy(original)
            head = HadamardHead(n_feat, c)  # the fresh default head (from_linear is slow at this size)
            with torch.no_grad():
                head.bias.copy_(original.fc.bias)
            converted.fc = head
    return original.eval(), converted.eval(), x


GLYPH_EPOCHS = 5
FINE_TUNED = ("glyph",)  # samples whose converted model is fine-tuned here (its backbone differs from the original's)


def _fine_tune_glyph(model: nn.Module) -> None:
    """A few epochs of the swapped glyph model on its training faces (cross-entropy, AdamW 2e-3, batch 128).

    A user deploys the model after fine-tuning; right after the swap its 1,200 top-1 margins are below the
    backbone's int8 rounding, which is not what the int8 cases should judge. About 25 s on one core.
    """
    from fyc_convert.model.loading import load_model
    from sample_models.build import normalise
    from sample_models.glyphs import TRAIN_FACES, load_glyph_classes, render_glyphs

    meta = load_model(ROOT / "sample_models" / "glyph_cnn.pt", arch="sample_models.archs:glyph_cnn").meta
    x, y = render_glyphs(load_glyph_classes(), TRAIN_FACES, copies=1, clean_first=True, seed=0)
    x, y = normalise(x, meta), torch.as_tensor(y)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(GLYPH_EPOCHS):
        for idx in torch.randperm(len(x)).split(128):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def build_case(name: str, folder: Path) -> Case:
    """Export the case's four files and rows into folder/name (reused when already there)."""
    out = folder / name
    meta = out / "case.json"
    if meta.exists():
        return Case(**{**json.loads(meta.read_text()), "folder": out})
    out.mkdir(parents=True, exist_ok=True)
    model_name, layout = split_name(name)
    original, converted, x = _models(model_name)
    shape = tuple(x.shape[1:])
    for variant, model, layer in (("original", original, None), ("model", converted, "fc")):
        for suffix, batch in (("", None), ("_b1", 1)):
            export_onnx(model, out / f"{variant}{suffix}.onnx", input_shape=shape, head_layer=layer,
                        head_layout=layout, static_batch=batch)
    with torch.no_grad():
        np.savez(out / "rows.npz", x=x.numpy(), ref_original=original(x).numpy(), ref_model=converted(x).numpy())
    head = converted.fc
    case = Case(name=name, folder=out, input_shape=shape, in_features=head.in_features,
                num_classes=head.num_classes, embed_size=head.embed_size, layout=layout)
    meta.write_text(json.dumps({k: v for k, v in asdict(case).items() if k != "folder"}))
    return case


INT8_ROWS = 256  # rows the int8 models are judged on: top-1 agreement in steps of 0.4%
CALIBRATION_ROWS = 256


def _int8_inputs(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, evaluation) inputs: the samples' training and validation rows; seeded random ones for the
    large heads (their backbone is random too)."""
    name = split_name(case.name)[0]  # "glyph-kron" runs the glyph sample's rows too
    if name in ("digits", "glyph"):
        return (sample(name, CALIBRATION_ROWS, train=True)[1].numpy(), sample(name, INT8_ROWS)[1].numpy())
    rng = np.random.default_rng(1)
    return tuple(rng.standard_normal((n, *case.input_shape)).astype(np.float32)  # type: ignore[return-value]
                 for n in (CALIBRATION_ROWS, INT8_ROWS))


def build_int8(case: Case) -> Case:
    """original.int8.onnx, model.int8.onnx and int8_rows.npz beside the case's files (reused when there)."""
    import onnxruntime as ort

    from fyc_convert.export.quantize import quantize_int8

    rows = case.folder / "int8_rows.npz"
    if rows.exists():
        return case
    calib, x = _int8_inputs(case)
    refs = {}
    for variant in ("original", "model"):
        batches = (calib[i : i + 32] for i in range(0, len(calib), 32))
        quantize_int8(case.path(variant), case.path(f"{variant}.int8"), batches)
        sess = ort.InferenceSession(str(case.path(variant)), providers=["CPUExecutionProvider"])
        refs[f"ref_{variant}"] = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    np.savez(rows, x=x, **refs)
    return case

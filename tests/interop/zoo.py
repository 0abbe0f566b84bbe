"""The interop suite's models: each an original and a converted ONNX file, with real rows and PyTorch outputs.

`build_case(name, folder)` exports, into `folder/<name>/`:
  original.onnx, model.onnx            dynamic batch (the default export: portable head, opset 17)
  original_b1.onnx, model_b1.onnx      the same models exported with a static batch of 1
A name ending in "-kron" (e.g. "glyph-kron") is the same case with model*.onnx exported with
`head_layout="kron"` (the Kronecker head: MatMuls by ±1 blocks), checked as such.
  rows.npz                             x (S, *input_shape) real rows (random ones for the large heads),
                                       ref_original, ref_model (S, C): the PyTorch logits
The tools run in other virtual environments only read these files.
"""

from __future__ import annotations

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
CASES = ("digits", "glyph", "wide2048x18000", "wide512x32000", "digits-kron", "glyph-kron")
KRON = "-kron"


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
        """variant: original, model, original_b1 or model_b1."""
        return self.folder / f"{variant}.onnx"

    def rows(self) -> dict[str, np.ndarray]:
        with np.load(self.folder / "rows.npz") as data:
            return {k: data[k] for k in data.files}


def sample(name: str, rows: int = ROWS) -> tuple[nn.Module, torch.Tensor]:
    """A shipped sample model ("digits" or "glyph") and `rows` real (normalised) inputs of it."""
    from fyc_convert.model.loading import load_model
    from sample_models.build import normalise

    loaded = load_model(ROOT / "sample_models" / f"{name}_cnn.pt", arch=f"sample_models.archs:{name}_cnn")
    if name == "digits":
        with np.load(ROOT / "sample_models" / "digits.npz") as data:
            pool = np.concatenate([data["x_val"], data["x_train"]])
            x = pool[:: max(1, len(pool) // rows)][:rows]
    else:
        from sample_models.glyphs import VAL_FACE, load_glyph_classes, render_glyphs

        chars = load_glyph_classes()
        x, _ = render_glyphs(chars[:: max(1, len(chars) // rows)][:rows], (VAL_FACE,), copies=1 + rows // len(chars),
                             clean_first=True, seed=0)
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


def _models(name: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(original, converted, rows): the converted model's head as the CLI builds it for the samples."""
    import copy

    with torch.random.fork_rng():
        torch.manual_seed(0)
        if name in ("digits", "glyph"):
            original, x = sample(name)
            converted = copy.deepcopy(original)
            feats = capture_features(converted, "fc", x)
            swap_classifier(converted, layer="fc", features=feats)
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


def build_case(name: str, folder: Path) -> Case:
    """Export the case's four files and rows into folder/name (reused when already there)."""
    out = folder / name
    meta = out / "case.json"
    if meta.exists():
        return Case(**{**json.loads(meta.read_text()), "folder": out})
    out.mkdir(parents=True, exist_ok=True)
    layout = "kron" if name.endswith(KRON) else "portable"
    original, converted, x = _models(name.removesuffix(KRON))
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

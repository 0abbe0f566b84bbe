"""The converted model's weights file (`model.safetensors`): save it, and load it back into the architecture.

The header metadata describes the fixed head (kind, layer, N, C, transform size m, embedded length n,
embedding), so `load_converted` can rebuild the head before loading the state_dict:

    model = build_my_model()                                   # the original architecture
    model = load_converted(model, "out/model.safetensors")     # classifier swapped, weights loaded
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from fyc_convert.errors import CheckpointError, FycError, OutputError, describe
from fyc_convert.files import atomic_path
from fyc_convert.heads import HadamardHead, OrthogonalHead

_KEY = "fyc_convert."


def save_converted(model: nn.Module, path: str | Path, *, layer: str, head: nn.Module) -> Path:
    """Write `model`'s state_dict to `path` (atomically), describing `head` (at `layer`) in the header."""
    path = Path(path)
    meta = {"head": head.head_kind, "layer": layer, "in_features": str(head.in_features),
            "num_classes": str(head.num_classes), "bias": str(head.bias is not None).lower(),
            "fixed_scale": str(not isinstance(head.scale, nn.Parameter)).lower()}
    if isinstance(head, HadamardHead):
        meta.update(hadamard_size=str(head.hadamard_size), embed_size=str(head.embed_size), embedding=head.embedding)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={_KEY + k: v for k, v in meta.items()})
    except (SafetensorError, ValueError, TypeError) as e:  # e.g. a tensor type safetensors cannot store
        raise OutputError(f"cannot write {path.name} ({describe(e)}); the model's state_dict holds something "
                          "safetensors cannot store") from e
    except OSError as e:
        raise OutputError(f"cannot write {path} ({e.strerror}); check the folder and free space") from e
    return path


def load_converted(model: nn.Module, path: str | Path) -> nn.Module:
    """Swap the fixed head described in `path`'s header into `model` (the original architecture) and load it.

    Raises:
        CheckpointError: the file is not a fyc-convert weights file, or does not fit `model`.
    """
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = {k[len(_KEY):]: v for k, v in (f.metadata() or {}).items() if k.startswith(_KEY)}
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read {path}: {e}; pass the model.safetensors that fyc-convert wrote") from e
    if "head" not in meta or "layer" not in meta:
        raise CheckpointError(f"{path} has no fyc-convert header; it was not written by fyc-convert")
    needed = ["in_features", "num_classes"] + (["hadamard_size", "embedding"] if meta["head"] == "hadamard" else [])
    missing = [k for k in needed if k not in meta]
    if meta["head"] not in ("hadamard", "orthogonal") or missing:
        what = f"lacks {', '.join(_KEY + k for k in missing)}" if missing else f"names an unknown head {meta['head']!r}"
        raise CheckpointError(f"{path}'s fyc-convert header {what}; save the converted model again")
    layer = meta["layer"]
    try:
        old = model.get_submodule(layer)
    except AttributeError as e:
        raise CheckpointError(f"{path} converts layer {layer!r}, which this model does not have; "
                              f"build the architecture the file was converted from") from e
    bias = meta.get("bias", "true") == "true"
    try:
        n_in, n_cls = int(meta["in_features"]), int(meta["num_classes"])
        fixed = float(tensors[f"{layer}.scale"]) if meta.get("fixed_scale") == "true" else None
        if meta["head"] == "hadamard":
            head: nn.Module = HadamardHead(n_in, n_cls, bias=bias, fixed_scale=fixed, rows=tensors[f"{layer}.rows"],
                                           hadamard_size=int(meta["hadamard_size"]), embedding=meta["embedding"])
        else:
            head = OrthogonalHead(n_in, n_cls, bias=bias, fixed_scale=fixed, seed=int(tensors[f"{layer}.seed"]))
    except (KeyError, ValueError, FycError) as e:
        raise CheckpointError(f"{path} does not describe a head that can be rebuilt ({describe(e)}); save the "
                              "converted model again") from e
    parent_name, _, attr = layer.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, head.to(next(old.parameters(), torch.empty(0)).device))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{path} does not fit this model ({first}); build the architecture it was "
                              f"converted from") from e
    return model

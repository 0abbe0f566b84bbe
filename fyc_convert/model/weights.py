"""The converted model's weights file (`model.safetensors`): save it, and load it back into the architecture.

The header metadata describes each fixed head with the one head record and codec of
`fyc_convert.head.record` (kind, layer, N, C, transform size m, embedded length n, embedding, rows, and whether it
stands in a conv classifier's `ConvHead` wrapper; the same keys as the ONNX model's metadata), so
`load_converted` can rebuild the heads before loading the state_dict:

    model = build_my_model()                                   # the original architecture
    model = load_converted(model, "out/model.safetensors")     # classifier swapped, weights loaded
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from fyc_convert.errors import CheckpointError, FycError, HeadError, OutputError, describe
from fyc_convert.files import atomic_path
from fyc_convert.head.heads import HadamardHead, OrthogonalHead
from fyc_convert.head.layouts import ConvHead, is_pointwise_conv
from fyc_convert.head.record import KIND_KEY, HeadRecord, decode_heads, encode_heads


def save_converted(model: nn.Module, path: str | Path, *, layer: str | None = None,
                   head: nn.Module | None = None) -> Path:
    """Write `model`'s state_dict to `path` (atomically), describing every fixed head it holds in the header.

    The heads are found in the model (HadamardHead / OrthogonalHead modules, a conv classifier's `ConvHead`
    wrapper included); `layer` / `head`, when given, must be one of them and is described first.

    Raises:
        OutputError: the model holds no fixed head (or not `head` at `layer`), or the file cannot be written.
    """
    path = Path(path)
    heads = [(n, m) for n, m in model.named_modules() if isinstance(m, (HadamardHead, OrthogonalHead))]
    if layer is not None or head is not None:
        chosen = [(n, m) for n, m in heads if (layer is None or n == layer) and (head is None or m is head)]
        if not chosen:
            raise OutputError(f"the model holds no fixed head at {layer!r}; save the model that swap_classifier "
                              "returned")
        heads = chosen + [h for h in heads if h not in chosen]
    if not heads:
        raise OutputError("the model holds no fixed head; save the model that swap_classifier returned")
    meta = encode_heads([HeadRecord.of(model, n) for n, _ in heads])
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
    except (SafetensorError, ValueError, TypeError) as e:  # e.g. a tensor type safetensors cannot store
        raise OutputError(f"cannot write {path.name} ({describe(e)}); the model's state_dict holds something "
                          "safetensors cannot store") from e
    except OSError as e:
        raise OutputError(f"cannot write {path} ({e.strerror}); check the folder and free space") from e
    return path


def load_converted(model: nn.Module, path: str | Path) -> nn.Module:
    """Swap the fixed heads described in `path`'s header into `model` (the original architecture) and load it.

    Returns the model (the new head itself when the model was the classifier).

    Raises:
        CheckpointError: the file is not a fyc-convert weights file, or does not fit `model`.
    """
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read {path}: {e}; pass the model.safetensors that fyc-convert wrote") from e
    if KIND_KEY not in meta:
        raise CheckpointError(f"{path} has no fyc-convert header; it was not written by fyc-convert")
    try:
        records = decode_heads(meta)
    except HeadError as e:
        raise CheckpointError(f"{path}: {e}") from e
    if not records:
        raise CheckpointError(f"{path}'s fyc-convert header lists no heads; save the converted model again")
    for record in records:
        model = _install(model, record, tensors, path)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{path} does not fit this model ({first}); build the architecture it was "
                              f"converted from") from e
    return model


def _install(model: nn.Module, record: HeadRecord, tensors: dict[str, torch.Tensor], path: Path) -> nn.Module:
    """Build the head one header record describes and put it where the original classifier is."""
    layer = record.layer
    wrapped = record.wrapper == "conv1x1"
    original = layer.rpartition(".")[0] if wrapped else layer  # where the classifier sits in the original model
    try:
        old = model.get_submodule(original)
    except AttributeError as e:
        raise CheckpointError(f"{path} converts layer {original!r}, which this model does not have; "
                              f"build the architecture the file was converted from") from e
    try:
        fixed = float(tensors[f"{layer}.scale"]) if record.fixed_scale else None
        if record.kind == "hadamard":
            head: nn.Module = HadamardHead(record.in_features, record.num_classes, bias=record.bias,
                                           fixed_scale=fixed, rows=tensors[f"{layer}.rows"],
                                           hadamard_size=record.hadamard_size, embedding=record.embedding,
                                           adapter=record.adapter or False)
        else:
            head = OrthogonalHead(record.in_features, record.num_classes, bias=record.bias, fixed_scale=fixed,
                                  seed=int(tensors[f"{layer}.seed"]), adapter=record.adapter or False)
    except (KeyError, ValueError, FycError) as e:
        raise CheckpointError(f"{path} does not describe a head that can be rebuilt ({describe(e)}); save the "
                              "converted model again") from e
    if wrapped and not is_pointwise_conv(old):
        raise CheckpointError(f"{path} converts the 1x1 Conv2d {original!r}, but this model has a "
                              f"{type(old).__name__} there; build the architecture it was converted from")
    new = ConvHead(head) if wrapped else head
    new = new.to(next(old.parameters(), torch.empty(0)).device)
    if not original:
        return new
    parent_name, _, attr = original.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
    return model

"""Verification of an exported model: onnxruntime against PyTorch, and a static check of the head subgraph.

Both raise instead of printing: `VerificationError` (with the numbers) when outputs differ,
`ExportError` when the head subgraph is not the slim add/sub graph it must be.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from fyc_convert.errors import ExportError, VerificationError, describe
from fyc_convert.export import HEAD_PREFIX
from fyc_convert.surgery import eval_mode, logits_of

_DENSE_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "MatMulInteger", "QLinearMatMul")
_CHUNK = 64  # real inputs are run in batches of this size



@dataclass
class VerifyResult:
    """Agreement between onnxruntime and PyTorch on the logits.

    Attributes:
        max_abs_diff: largest |onnx - torch| over all samples and classes.
        mean_abs_diff: mean |onnx - torch|.
        n_samples: samples compared (real plus random).
        batch_sizes: the distinct batch sizes run through the dynamic batch axis.
        atol: absolute tolerance used.
        rtol: relative tolerance used (a sample passes when |diff| <= atol + rtol * |torch|).
    """

    max_abs_diff: float
    mean_abs_diff: float
    n_samples: int
    batch_sizes: list[int]
    atol: float
    rtol: float


def _batches(inputs: torch.Tensor | None, input_shape: tuple[int, ...], n_random: int, seed: int) -> list[torch.Tensor]:
    """Real inputs in chunks, then random ones at batch n_random (>= 2), 1 and 3 (the dynamic axis)."""
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    if inputs is not None:
        real = inputs.detach().to("cpu", torch.float32)
        if tuple(real.shape[1:]) != tuple(input_shape):
            raise VerificationError(
                f"real inputs have sample shape {tuple(real.shape[1:])}, the model takes {tuple(input_shape)}; "
                "pass inputs shaped (B, *input_shape)"
            )
        out += list(real.split(_CHUNK))
    for b in (max(n_random, 2), 1, 3):
        out.append(torch.randn(b, *input_shape, generator=gen))
    return out


def verify_onnx(
    path: str | Path,
    model: nn.Module,
    *,
    inputs: torch.Tensor | None = None,
    input_shape: tuple[int, ...],
    atol: float = 1e-4,
    rtol: float = 1e-4,
    n_random: int = 8,
    seed: int = 0,
) -> VerifyResult:
    """Compare onnxruntime's logits with the PyTorch model's, on real and random inputs.

    Args:
        path: the exported .onnx file (external data next to it is found by onnxruntime).
        model: the PyTorch model that was exported (run in eval mode on the CPU, in its own dtype;
            its mode is restored afterwards).
        inputs: real samples (B, *input_shape), e.g. from the user's validation data; None for random only.
        input_shape: shape of one sample.
        atol: absolute tolerance on the logits.
        rtol: relative tolerance on the logits.
        n_random: random samples in the main random batch (at least 2); batches of 1 and 3 are run as well.
        seed: seed of the random inputs (a private generator; the global RNG is untouched).

    Returns:
        VerifyResult with the differences.

    Raises:
        VerificationError: some logit differs by more than atol + rtol * |torch logit|, the shapes differ,
            or onnxruntime cannot run the file.
    """
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise VerificationError(f"onnxruntime cannot load {path}: {describe(e)}; re-export the model") from e
    in_name = sess.get_inputs()[0].name
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    diffs: list[np.ndarray] = []
    batch_sizes: set[int] = set()
    n_samples = 0
    worst_excess, worst = -np.inf, (0.0, 0.0)
    with eval_mode(model):
        for x in _batches(inputs, input_shape, n_random, seed):
            with torch.no_grad():
                ref = logits_of(model(x.to(device, dtype))).float().cpu().numpy()
            try:
                got = sess.run(None, {in_name: x.numpy()})[0]
            except Exception as e:
                raise VerificationError(
                    f"onnxruntime failed at batch {len(x)}: {describe(e)}; re-export the model"
                ) from e
            if got.shape != ref.shape:
                raise VerificationError(
                    f"onnxruntime output shape {got.shape} != PyTorch {ref.shape} at batch {len(x)}; "
                    "the dynamic batch axis is broken, re-export the model"
                )
            diff = np.abs(got.astype(np.float64) - ref)
            excess = diff - (atol + rtol * np.abs(ref))
            if excess.size and excess.max() > worst_excess:
                i = int(excess.argmax())
                worst_excess, worst = float(excess.flat[i]), (float(diff.flat[i]), float(abs(ref.flat[i])))
            diffs.append(diff.ravel())
            batch_sizes.add(len(x))
            n_samples += len(x)
    all_diff = np.concatenate(diffs)
    max_diff = float(all_diff.max()) if all_diff.size else 0.0
    mean_diff = float(all_diff.mean()) if all_diff.size else 0.0
    result = VerifyResult(
        max_abs_diff=max_diff, mean_abs_diff=mean_diff, n_samples=n_samples,
        batch_sizes=sorted(batch_sizes), atol=atol, rtol=rtol,
    )
    if not np.isfinite(all_diff).all() or worst_excess > 0:
        raise VerificationError(
            f"onnxruntime differs from PyTorch: max |diff| {max_diff:.3g} (mean {mean_diff:.3g}) exceeds "
            f"atol {atol:g} + rtol {rtol:g}*|ref| (worst: |diff| {worst[0]:.3g} at |ref| {worst[1]:.3g}); "
            "the export is wrong, do not ship it",
            max_abs_diff=max_diff, mean_abs_diff=mean_diff,
        )
    return result


def mark_failed(path: str | Path) -> Path:
    """Rename a model that failed verification to `<stem>.failed.onnx`; returns the new path.

    Its external data file, if any, becomes `<stem>.failed.onnx.data` and the model is rewritten to point
    at it, so a later export to the original name cannot overwrite the failed model's weights.
    """
    path = Path(path)
    failed = path.with_name(f"{path.stem}.failed{path.suffix}")
    data = path.with_name(f"{path.name}.data")
    if not data.exists():
        os.replace(path, failed)
        return failed
    failed_data = failed.with_name(f"{failed.name}.data")
    proto = onnx.load(str(path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == data.name:
                entry.value = failed_data.name
    onnx.save(proto, str(failed))
    os.replace(data, failed_data)
    path.unlink()
    return failed


def check_head_static(
    model_or_path: onnx.ModelProto | str | Path,
    *,
    num_classes: int,
    embed_size: int,
    prefix: str = HEAD_PREFIX,
) -> dict[str, int]:
    """Check that the head subgraph is slim: add/sub and data movement, no dense matrix.

    Args:
        model_or_path: the exported model, or its path.
        num_classes: C.
        embed_size: n, the embedded length (the head's `embed_size`).
        prefix: the head's name scope.

    Returns:
        Op census of the head subgraph, {op_type: count}.

    Raises:
        ExportError: no node is under `prefix`, a MatMul/Gemm/Conv is in the head, or a head constant has
            more than max(num_classes, embed_size) elements.
    """
    from fyc_convert.onnx_head import head_op_census, largest_head_constant

    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else onnx.load(str(model_or_path))
    census = head_op_census(model, prefix)
    if not census:
        raise ExportError(f"no {prefix} nodes in the exported graph; export with head_layer set to the swapped head")
    dense = sorted(op for op in census if op in _DENSE_OPS)
    if dense:
        raise ExportError(
            f"the head subgraph contains {', '.join(dense)}; it must be add/sub only, re-export without a simplifier"
        )
    limit = max(num_classes, embed_size)
    largest = largest_head_constant(model, prefix)
    if largest > limit:
        raise ExportError(
            f"the head reads a constant of {largest} elements (limit max(C, n) = {limit}); "
            "a pass re-inflated the head, re-export without constant folding"
        )
    return census

"""Verification of an exported model: onnxruntime against PyTorch, and a static check of the head subgraph.

Both raise instead of printing: `VerificationError` (with the numbers) when outputs differ,
`ExportError` when the head subgraph is not the slim add/sub graph it must be (`check_head_static`, which
lives with the head graph in `fyc_convert.onnx_head` and is re-exported here).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from fyc_convert.errors import VerificationError, describe
from fyc_convert.files import atomic_path
from fyc_convert.onnx_head import check_head_static  # noqa: F401  (its old home; the pipeline imports it here)
from fyc_convert.surgery import eval_mode, logits_of

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


def _batches(inputs: torch.Tensor | None, input_shape: tuple[int, ...], n_random: int, seed: int,
             static_batch: int | None = None) -> list[torch.Tensor]:
    """Real inputs in chunks, then random ones at batch n_random (>= 2), 1 and 3 (the dynamic axis).

    With a static batch every chunk has exactly that many samples (real ones first, the last chunk topped
    up with random samples) and two random chunks follow.
    """
    gen = torch.Generator().manual_seed(seed)
    if static_batch is not None:
        pool = [] if inputs is None else [inputs.detach().to("cpu", torch.float32)]
        if pool and tuple(pool[0].shape[1:]) != tuple(input_shape):
            raise VerificationError(
                f"real inputs have sample shape {tuple(pool[0].shape[1:])}, the model takes {tuple(input_shape)}; "
                "pass inputs shaped (B, *input_shape)"
            )
        real = sum(len(p) for p in pool)
        fill = -real % static_batch + 2 * static_batch
        pool.append(torch.randn(fill, *input_shape, generator=gen))
        return list(torch.cat(pool).split(static_batch))
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
    static_batch: int | None = None,
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
        static_batch: the batch size the model was exported with (`export_onnx(static_batch=...)`); every
            run then has exactly that batch. None: the dynamic axis is exercised at several sizes.

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
        for x in _batches(inputs, input_shape, n_random, seed, static_batch):
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

    Its external data, if any, becomes `<stem>.failed.onnx.data` (a hard link, or a copy where links are
    not possible, made before the model that points at it), so a later export to the original name cannot
    touch the failed model's weights. Each file appears complete under its final name or not at all: the
    failed model is written to a temporary name and renamed, and the originals are removed only after.
    """
    from fyc_convert.export import external_data_files

    path = Path(path)
    failed = path.with_name(f"{path.stem}.failed{path.suffix}")
    locations = external_data_files(path)
    if not locations:
        os.replace(path, failed)  # one file: one atomic rename
        return failed
    failed_data = failed.with_name(f"{failed.name}.data")
    (old_name,) = locations  # export writes all tensors to one file
    with atomic_path(failed_data) as tmp:
        tmp.unlink()
        try:
            os.link(path.with_name(old_name), tmp)
        except OSError:
            shutil.copyfile(path.with_name(old_name), tmp)
    proto = onnx.load(str(path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = failed_data.name
    with atomic_path(failed) as tmp:
        onnx.save(proto, str(tmp))
    path.unlink()
    path.with_name(old_name).unlink(missing_ok=True)
    return failed

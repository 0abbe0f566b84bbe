"""Verification of an exported model: onnxruntime against PyTorch, and a static check of the head subgraph.

`verify_converted` judges a converted model against the floor of its original: original.onnx is run against
the original PyTorch model on the same inputs, and when the converted model misses the tolerance each fixed head
is run alone on onnxruntime's own features (`measure_heads`), so that a backbone's float error is reported as
such and only a head that adds error of its own fails (see `Verdict.blame`).

Both raise instead of printing: `VerificationError` (with the numbers) when outputs differ,
`ExportError` when the head subgraph is not the slim add/sub graph it must be (`check_head_static`, which
lives with the head graph in `fyc_convert.export.onnx_head` and is re-exported here).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from fyc_convert.errors import VerificationError, describe
from fyc_convert.export.onnx_head import check_head_static  # noqa: F401  (its old home; the pipeline imports it here)
from fyc_convert.files import atomic_path
from fyc_convert.model.surgery import eval_mode, logits_of

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
        passed: every difference is finite and within the tolerance.
        worst_diff, worst_ref: |diff| and |torch logit| where the excess over the tolerance is largest.
    """

    max_abs_diff: float
    mean_abs_diff: float
    n_samples: int
    batch_sizes: list[int]
    atol: float
    rtol: float
    passed: bool = True
    worst_diff: float = 0.0
    worst_ref: float = 0.0


@dataclass(frozen=True)
class VerifyConfig:
    """What a verification runs and how strictly it judges: one object for every check in this module.

    Attributes:
        input_shape: shape of one sample.
        inputs: real samples (B, *input_shape), e.g. from the user's validation data; None for random only.
        atol: absolute tolerance on the logits.
        rtol: relative tolerance on the logits (a sample passes when |diff| <= atol + rtol * |torch|).
        n_random: random samples in the main random batch (at least 2); batches of 1 and 3 are run as well.
        seed: seed of the random inputs (a private generator; the global RNG is untouched).
        static_batch: the batch size the model was exported with (`export_onnx(static_batch=...)`); every
            run then has exactly that batch. None: the dynamic axis is exercised at several sizes.
    """

    input_shape: tuple[int, ...]
    inputs: torch.Tensor | None = None
    atol: float = 1e-4
    rtol: float = 1e-4
    n_random: int = 8
    seed: int = 0
    static_batch: int | None = None

    def batches(self) -> list[torch.Tensor]:
        """The batches every check runs, real ones first (the same for every model given this config)."""
        return _batches(self.inputs, self.input_shape, self.n_random, self.seed, self.static_batch)


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


def _session(path: str | Path) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise VerificationError(f"onnxruntime cannot load {path}: {describe(e)}; re-export the model") from e


def _run(sess: ort.InferenceSession, x: torch.Tensor) -> list[np.ndarray]:
    try:
        return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    except Exception as e:
        raise VerificationError(f"onnxruntime failed at batch {len(x)}: {describe(e)}; re-export the model") from e


class _Tally:
    """Running max/mean |got - ref| and the worst excess over atol + rtol * |ref| of several comparisons."""

    def __init__(self, atol: float, rtol: float):
        self.atol, self.rtol = atol, rtol
        self.diffs: list[np.ndarray] = []
        self.worst_excess, self.worst = -np.inf, (0.0, 0.0)
        self.batch_sizes: set[int] = set()
        self.n_samples = 0

    def add(self, got: np.ndarray, ref: np.ndarray, batch: int) -> None:
        diff = np.abs(got.astype(np.float64) - ref)
        excess = diff - (self.atol + self.rtol * np.abs(ref))
        if excess.size and excess.max() > self.worst_excess:
            i = int(excess.argmax())
            self.worst_excess, self.worst = float(excess.flat[i]), (float(diff.flat[i]), float(abs(ref.flat[i])))
        self.diffs.append(diff.ravel())
        self.batch_sizes.add(batch)
        self.n_samples += batch

    def result(self) -> VerifyResult:
        all_diff = np.concatenate(self.diffs) if self.diffs else np.zeros(0)
        finite = bool(np.isfinite(all_diff).all())
        return VerifyResult(
            max_abs_diff=float(all_diff.max()) if all_diff.size else 0.0,
            mean_abs_diff=float(all_diff.mean()) if all_diff.size else 0.0,
            n_samples=self.n_samples, batch_sizes=sorted(self.batch_sizes), atol=self.atol, rtol=self.rtol,
            passed=finite and not self.worst_excess > 0, worst_diff=self.worst[0], worst_ref=self.worst[1],
        )


def _dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    param = next(iter(module.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return dtype, param.device if param is not None else torch.device("cpu")


def measure_onnx(path: str | Path, model: nn.Module, config: VerifyConfig) -> VerifyResult:
    """`verify_onnx` without the verdict: the differences, with `passed` False beyond tolerance (no raise).

    Raises:
        VerificationError: the shapes differ or onnxruntime cannot load or run the file.
    """
    sess = _session(path)
    dtype, device = _dtype_device(model)
    tally = _Tally(config.atol, config.rtol)
    with eval_mode(model):
        for x in config.batches():
            with torch.no_grad():
                ref = logits_of(model(x.to(device, dtype))).float().cpu().numpy()
            got = _run(sess, x)[0]
            if got.shape != ref.shape:
                raise VerificationError(
                    f"onnxruntime output shape {got.shape} != PyTorch {ref.shape} at batch {len(x)}; "
                    "the dynamic batch axis is broken, re-export the model"
                )
            tally.add(got, ref, len(x))
    return tally.result()


def _beyond(result: VerifyResult, what: str) -> str:
    return (f"{what}: max |diff| {result.max_abs_diff:.3g} (mean {result.mean_abs_diff:.3g}) exceeds "
            f"atol {result.atol:g} + rtol {result.rtol:g}*|ref| (worst: |diff| {result.worst_diff:.3g} at |ref| "
            f"{result.worst_ref:.3g})")


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
        inputs, input_shape, atol, rtol, n_random, seed, static_batch: the fields of `VerifyConfig` (this
            convenience entry builds one; `measure_onnx`, `measure_heads` and `verify_converted` take it).

    Returns:
        VerifyResult with the differences.

    Raises:
        VerificationError: some logit differs by more than atol + rtol * |torch logit|, the shapes differ,
            or onnxruntime cannot run the file.
    """
    result = measure_onnx(path, model, VerifyConfig(input_shape, inputs, atol, rtol, n_random, seed, static_batch))
    if not result.passed:
        raise VerificationError(
            _beyond(result, "onnxruntime differs from PyTorch") + "; the export is wrong, do not ship it",
            max_abs_diff=result.max_abs_diff, mean_abs_diff=result.mean_abs_diff,
        )
    return result


def measure_heads(path: str | Path, model: nn.Module, config: VerifyConfig) -> dict[str, VerifyResult]:
    """Each fixed head on its own: the ONNX head on the ONNX graph's own features vs the PyTorch head on them.

    The backbone's float error is left out: both heads read the same (onnxruntime's) features, so what
    remains is the error the head subgraph adds. The heads are found from the file's `fyc_convert.heads`
    manifest (input and output tensor names); the model is run with those tensors as extra outputs, from a
    temporary copy of the graph next to `path` (external data is shared, not copied).

    Returns:
        {layer: VerifyResult} for every head in the manifest; {} when the file has none.

    Raises:
        VerificationError: a head tensor or layer is missing, or onnxruntime cannot run the file.
    """
    from fyc_convert.export.onnx_export import head_entries

    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    entries = head_entries(proto)
    if not entries:
        return {}
    names = {v.name for v in proto.graph.output}
    for e in entries:
        for key in ("input", "output"):
            if e.get(key) and e[key] not in names:
                kind = onnx.TensorProto.FLOAT16 if key == "input" and e.get("input_dtype") == "float16" \
                    else onnx.TensorProto.FLOAT
                proto.graph.output.append(onnx.helper.make_tensor_value_info(e[key], kind, None))
                names.add(e[key])
    heads = []
    for e in entries:
        try:
            heads.append(model.get_submodule(e["layer"]))
        except (AttributeError, KeyError) as err:
            raise VerificationError(f"head {e.get('layer')!r} of {path.name} is not in the model; verify the model "
                                    "that was exported") from err
    outputs = [v.name for v in proto.graph.output]
    # beside `path`, so that its external data location resolves the same; a temp name stale-run cleanup knows
    fd, tmp_name = tempfile.mkstemp(prefix=f".fyc-{os.getpid()}-{path.stem}-heads.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        onnx.save(proto, tmp_name)
        del proto
        sess = _session(tmp_name)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    tallies = [_Tally(config.atol, config.rtol) for _ in entries]
    with eval_mode(model):
        for x in config.batches():
            got = dict(zip(outputs, _run(sess, x), strict=True))
            for e, head, tally in zip(entries, heads, tallies, strict=True):
                dtype, device = _dtype_device(head)
                feats = torch.from_numpy(got[e["input"]].astype(np.float32)).to(device, dtype)
                with torch.no_grad():
                    ref = head(feats).float().cpu().numpy()
                out = got[e["output"]]
                if out.shape != ref.shape:
                    raise VerificationError(f"head {e['layer']!r}: onnxruntime gives {out.shape}, PyTorch "
                                            f"{ref.shape}; re-export the model")
                tally.add(out, ref, len(x))
    return {e["layer"]: t.result() for e, t in zip(entries, tallies, strict=True)}


Blame = Literal["backbone", "head", "model"]


@dataclass
class Verdict:
    """Whom to blame for a converted model's difference from PyTorch.

    Attributes:
        converted: model.onnx vs the converted PyTorch model.
        floor: original.onnx vs the original PyTorch model on the same inputs (the backbone's own export
            error, as far as the original shows it); None when no original was given.
        heads: each fixed head alone (`measure_heads`), measured when the converted model is beyond tolerance.
        blame: None (within tolerance); "backbone" (beyond tolerance, but original.onnx is too and each head
            alone is within it: accepted); "head" (a head adds error of its own); "model" (beyond tolerance
            although original.onnx and each head are within it: something else in the converted graph).
    """

    converted: VerifyResult
    floor: VerifyResult | None
    heads: dict[str, VerifyResult]
    blame: Blame | None

    @property
    def head_max_abs_diff(self) -> float | None:
        return max((r.max_abs_diff for r in self.heads.values()), default=None)


def verify_converted(
    path: str | Path,
    model: nn.Module,
    config: VerifyConfig,
    *,
    original_path: str | Path | None = None,
    original: nn.Module | None = None,
) -> Verdict:
    """Verify a converted model, judged against the floor its original's export already has.

    The converted model passes when it is within tolerance of PyTorch; or, when it is not, when the
    original model exported the same way is not either (the backbone's float error, e.g. random-init
    logits in the hundreds) and every fixed head, fed the ONNX graph's own features, is within tolerance
    of the PyTorch head (the head adds no error of its own).

    Args:
        path, model: the converted model's .onnx file and the PyTorch model it was exported from.
        original_path, original: original.onnx and the original PyTorch model, run on the same inputs
            (same real inputs, same seed); both or neither.
        config: the inputs and tolerances, the same for both models.

    Returns:
        The Verdict (blame None or "backbone").

    Raises:
        VerificationError: blame "head" or "model"; it carries the Verdict as `.verdict` and the converted
            model's numbers.
    """
    if (original_path is None) != (original is None):
        raise VerificationError("pass both original_path and original, or neither")
    conv = measure_onnx(path, model, config)
    floor = measure_onnx(original_path, original, config) if original is not None else None
    if conv.passed:
        return Verdict(conv, floor, {}, None)
    heads = measure_heads(path, model, config)
    bad = [layer for layer, r in heads.items() if not r.passed]
    if bad:
        verdict = Verdict(conv, floor, heads, "head")
        worst = max(bad, key=lambda layer: heads[layer].max_abs_diff)
        message = _beyond(heads[worst], f"the fixed head {worst!r} adds error of its own (fed onnxruntime's "
                                        "features)") + "; the head export is wrong, do not ship it"
    elif floor is not None and not floor.passed and heads:
        return Verdict(conv, floor, heads, "backbone")
    else:
        verdict = Verdict(conv, floor, heads, "model")
        also = "" if floor is None else f", although original.onnx is within it (max |diff| {floor.max_abs_diff:.3g})"
        message = _beyond(conv, "onnxruntime differs from PyTorch") + also + "; the export is wrong, do not ship it"
    raise VerificationError(message, max_abs_diff=conv.max_abs_diff, mean_abs_diff=conv.mean_abs_diff,
                            verdict=verdict)


def mark_failed(path: str | Path) -> Path:
    """Rename a model that failed verification to `<stem>.failed.onnx`; returns the new path.

    Its external data, if any, becomes `<stem>.failed.onnx.data` (a hard link, or a copy where links are
    not possible, made before the model that points at it), so a later export to the original name cannot
    touch the failed model's weights. Each file appears complete under its final name or not at all: the
    failed model is written to a temporary name and renamed, and the originals are removed only after.
    """
    from fyc_convert.export.onnx_export import external_data_files

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

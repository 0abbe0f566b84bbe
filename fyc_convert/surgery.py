"""Find a model's classifier (an nn.Linear), replace it with a fixed head, and count the parameters.

The classifier is found, in order, from `--layer`, from the timm convention (`model.get_classifier()`), or by
one forward pass with hooks: the nn.Linear whose output *is* the model output (a tensor, the first-level
tensors of a tuple/list/dict, or `.logits` / `["logits"]`). It is replaced by module identity wherever the
model holds it, never by position.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fyc_convert.errors import ClassifierNotFoundError, HeadError, describe

HeadKind = Literal["hadamard", "orthogonal"]


@dataclass(frozen=True)
class ParamCount:
    """Exact parameter accounting of a swap (unique parameters, buffers not counted).

    `removed_pct` is Table 1's "% fixed params" of Hoffer et al. (2018): 100 · removed / original, where
    removed = original − converted. With the default head (learned scale α, bias kept) a C×N classifier
    loses its C·N weights and gains the one scalar α, so removed = C·N − 1 and the share is the paper's
    C·N / total to well within its two decimals: ResNet-50 (25,557,032 params, 2048→1000) 8.01%,
    DenseNet-169 (14,149,480, 1664→1000) 11.76%, ShuffleNet (1,826,555, 960→1000) 52.56%.

    Attributes:
        original: Parameters of the model before the swap.
        converted: Parameters after the swap.
        head_before: Parameters of the replaced nn.Linear (weight and bias).
        head_after: Parameters of the new head (α unless fixed, bias if kept).
        removed: original − converted.
        removed_pct: 100 · removed / original.
        trainable: Parameters with requires_grad after the swap.
    """

    original: int
    converted: int
    head_before: int
    head_after: int
    removed: int
    removed_pct: float
    trainable: int


@dataclass
class SwapResult:
    """What `swap_classifier` did.

    Attributes:
        model: The model with the head in place (the same object that was passed in).
        layer: Dotted name of the replaced classifier.
        head: The new fixed head (HadamardHead or OrthogonalHead).
        original_head: The nn.Linear that was replaced.
        in_features: N, the classifier's input size.
        num_classes: C, the classifier's output size.
        params: Parameter accounting.
    """

    model: nn.Module
    layer: str
    head: nn.Module
    original_head: nn.Linear
    in_features: int
    num_classes: int
    params: ParamCount


def find_classifier(
    model: nn.Module,
    *,
    layer: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    example: Tensor | None = None,
) -> tuple[str, nn.Linear]:
    """Find the nn.Linear classifier: `layer` if given, else `get_classifier()`, else one hooked forward pass.

    Args:
        model: The model.
        layer: Dotted name of the classifier (`classifier.1` or `classifier[1]`).
        input_shape: Shape of one input sample (no batch dim), for the forward pass.
        example: A batch of real inputs for the forward pass (takes precedence over `input_shape`).

    Returns:
        (dotted name, the nn.Linear).

    Raises:
        ClassifierNotFoundError: `layer` is missing or not an nn.Linear, no or several nn.Linear layers make the
            output, the forward pass fails, or no input shape is known for it.
    """
    if layer is not None:
        return _named_linear(model, layer)
    found = _from_get_classifier(model)
    if found is not None:
        return found
    return _from_forward(model, _example_input(model, input_shape, example))


def capture_features(model: nn.Module, layer: str | nn.Module, inputs: Tensor | Iterable[Any], *,
                     batch_size: int = 256) -> Tensor:
    """The inputs the layer sees when the model runs on `inputs` (eval mode, no grad): the one capture hook.

    Args:
        model: The model.
        layer: Dotted name of the layer (usually the classifier), or the module itself.
        inputs: (S, *sample_shape) model inputs, run in batches of `batch_size`; or an iterable of batches
            (tensors, or (x, ...) tuples as `fyc_convert.loader.make_loader` yields them), read once, so only
            the features are kept (a stream of images never sits in memory).
        batch_size: Samples per forward pass when `inputs` is a tensor.

    Returns:
        (S', N) features on the model's device, S' = S times the positions per sample (e.g. T tokens when the
        layer sees (B, T, N)); (0, N) when there were no inputs.
    """
    module = layer if isinstance(layer, nn.Module) else model.get_submodule(_dotted(layer))
    device = _device_of(model)
    batches = inputs.split(batch_size) if isinstance(inputs, Tensor) else inputs
    chunks: list[Tensor] = []

    def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        chunks.append(x.reshape(-1, x.shape[-1]))  # (B·…, N)

    handle = module.register_forward_pre_hook(hook)
    try:
        with eval_mode(model), torch.no_grad():
            for batch in batches:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x.to(device))
    finally:
        handle.remove()
    if not chunks:
        return torch.zeros(0, getattr(module, "in_features", 0), device=device)
    return torch.cat(chunks)


def swap_classifier(
    model: nn.Module,
    *,
    head: HeadKind = "hadamard",
    layer: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    example: Tensor | None = None,
    features: Tensor | None = None,
    bias: bool = True,
    fixed_scale: float | None = None,
    seed: int = 0,
    hadamard_size: int | None = None,
) -> SwapResult:
    """Replace the classifier in place with a fixed head built from it (class order kept).

    Args:
        model: The model; modified in place.
        head: "hadamard" (add/sub transform) or "orthogonal" (dense fixed matrix, for comparison).
        layer: Dotted name of the classifier; found automatically when None (see `find_classifier`).
        input_shape: Shape of one input sample, for finding the classifier by a forward pass.
        example: A batch of real inputs, for finding the classifier by a forward pass.
        features: (S, N) inputs of the classifier (see `capture_features`) to fit α and b; recommended.
        bias: Give the head a per-class bias.
        fixed_scale: Keep α fixed at this value instead of learning it.
        seed: Seed of the head's embedding signs.
        hadamard_size: Transform size m of the hadamard head (default: `HadamardHead.from_linear`'s choice,
            the widest row choice); e.g. the fold size N / 2^k >= C + 1 gives a faster exported head.

    Returns:
        The swap's result, with exact parameter accounting.

    Raises:
        ClassifierNotFoundError: See `find_classifier`.
        HeadError: Unknown head kind, a hadamard_size for the orthogonal head, or the head cannot be built
            for these sizes.
    """
    from fyc_convert.heads import HadamardHead, OrthogonalHead

    kinds = {"hadamard": HadamardHead, "orthogonal": OrthogonalHead}
    if head not in kinds:
        raise HeadError(f"unknown head {head!r}; use one of: {', '.join(kinds)}")
    sizing = {}
    if hadamard_size is not None:
        if head != "hadamard":
            raise HeadError(f"a transform size applies to the hadamard head only; leave it unset for the {head} head")
        sizing["hadamard_size"] = hadamard_size
    name, linear = find_classifier(model, layer=layer, input_shape=input_shape, example=example)
    original = count_params(model)
    new = kinds[head].from_linear(linear, features=features, bias=bias, fixed_scale=fixed_scale, seed=seed, **sizing)
    new.train(linear.training)
    if model is linear:
        model = new
    else:
        _replace(model, linear, new)
    converted = count_params(model)
    params = ParamCount(
        original=original,
        converted=converted,
        head_before=count_params(linear),
        head_after=count_params(new),
        removed=original - converted,
        removed_pct=100.0 * (original - converted) / original if original else 0.0,
        trainable=count_params(model, trainable_only=True),
    )
    return SwapResult(model, name, new, linear, linear.in_features, linear.out_features, params)


def count_params(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of unique parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# ---------------------------------------------------------------------------------------------- finding


def _named_linear(model: nn.Module, layer: str) -> tuple[str, nn.Linear]:
    name = _dotted(layer)
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ClassifierNotFoundError(f"--layer {layer!r} does not exist in the model; "
                                      f"{_linear_choices(model)}") from None
    if not isinstance(module, nn.Linear):
        raise ClassifierNotFoundError(f"--layer {layer!r} is a {type(module).__name__}, not an nn.Linear (only a "
                                      f"Linear classifier can be swapped); {_linear_choices(model)}")
    return name, module


def _from_get_classifier(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """timm's convention; None when the model has no get_classifier() or it is not a Linear of the model."""
    getter = getattr(model, "get_classifier", None)
    if not callable(getter):
        return None
    try:
        found = getter()
    except Exception:  # noqa: BLE001 - a broken getter just means we fall back to the forward pass
        return None
    if not isinstance(found, nn.Linear):
        return None
    return next(((n, m) for n, m in model.named_modules() if m is found), None)


def _from_forward(model: nn.Module, x: Tensor) -> tuple[str, nn.Linear]:
    linears = {m: n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    produced: dict[nn.Module, tuple[Tensor, Tensor]] = {}  # Linear -> (its output, a copy of its values)
    called: list[nn.Module] = []  # hooked modules in call order

    def hook(module: nn.Module, _args: Any, out: Any) -> None:
        called.append(module)
        if module in linears and isinstance(out, Tensor):
            produced[module] = (out, out.detach().clone())

    hooked = [m for m in model.modules() if m in linears or next(m.children(), None) is None]  # Linears, leaves
    handles = [m.register_forward_hook(hook) for m in hooked]
    try:
        with eval_mode(model), torch.no_grad():
            output = model(x)
    except Exception as e:  # noqa: BLE001 - the model's own forward can raise anything
        raise ClassifierNotFoundError(
            f"running the model on an input of shape {tuple(x.shape)} to find the classifier failed "
            f"({describe(e)}); pass the right --input-shape (one sample, no batch dim) "
            "or --layer NAME"
        ) from e
    finally:
        for h in handles:
            h.remove()
    outputs = _output_tensors(output)
    found = [m for m, (out, values) in produced.items() if any(_is_same(out, values, o) for o in outputs)]
    if len(found) == 1:
        return linears[found[0]], found[0]
    if found:
        names = sorted(linears[m] for m in found)
        raise ClassifierNotFoundError(f"{len(found)} nn.Linear layers make the model's outputs: {', '.join(names)}; "
                                      "pass --layer NAME to choose the classifier")
    if not linears:
        raise ClassifierNotFoundError("the model has no nn.Linear layer to swap (e.g. a 1x1-conv classifier); "
                                      "only nn.Linear classifiers are supported")
    last = ""
    if called:
        last = f"; the last layer run is {_module_name(model, called[-1])} ({type(called[-1]).__name__})"
        if called[-1] in linears:
            last += ", whose output is changed afterwards"
    raise ClassifierNotFoundError(f"no nn.Linear makes the model's output{last}; {_linear_choices(model)}")


def _example_input(model: nn.Module, input_shape: tuple[int, ...] | None, example: Tensor | None) -> Tensor:
    if example is not None:
        return example.to(_device_of(model))
    if input_shape is None:
        raise ClassifierNotFoundError("finding the classifier needs one forward pass but the input shape is "
                                      "unknown; pass --input-shape (one sample, e.g. 3,224,224) or --layer NAME")
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = p.dtype if p is not None else torch.float32
    g = torch.Generator().manual_seed(0)
    return torch.randn((2, *input_shape), generator=g).to(_device_of(model), dtype)  # (2, *input_shape)


def logits_of(output: Any) -> Tensor:
    """The logits in a model's output: a tensor, `.logits`, a dict's "logits", or a tuple's first element."""
    if isinstance(output, Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ClassifierNotFoundError(
        f"cannot find logits in the model's output ({type(output).__name__}); make it return a (B, C) tensor, "
        f"a tuple starting with the logits, a dict with 'logits', or an object with .logits")


def _output_tensors(output: Any) -> list[Tensor]:
    """The tensors that count as the model's output: `.logits` / ["logits"] if present, else all first-level ones."""
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return [logits]
    if isinstance(output, Tensor):
        return [output]
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else []
    return [v for v in values if isinstance(v, Tensor)]


def _is_same(out: Tensor, values: Tensor, final: Tensor) -> bool:
    """The Linear's output is `final`: the same tensor (or an identical view of its memory), not modified since."""
    same_memory = out is final or (
        out.data_ptr() == final.data_ptr() and out.shape == final.shape and out.stride() == final.stride()
    )
    return same_memory and torch.equal(values, final)


def _linear_choices(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
    if not names:
        return "the model has no nn.Linear layer"
    shown = ", ".join(names[-8:])
    more = f" (and {len(names) - 8} earlier)" if len(names) > 8 else ""
    return f"nn.Linear layers: {shown}{more}; pass the classifier with --layer NAME"


# ---------------------------------------------------------------------------------------------- helpers


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put `new` wherever `old` is held (found by identity)."""
    for parent in list(model.modules()):
        for key, child in list(parent.named_children()):
            if child is old:
                setattr(parent, key, new)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration, then every module's own previous mode back (mixed modes survive)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _dotted(layer: str) -> str:
    """`classifier[1]` -> `classifier.1`."""
    return layer.replace("[", ".").replace("]", "").strip(".")


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next((repr(n) for n, m in model.named_modules() if m is module), "?")


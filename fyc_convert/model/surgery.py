"""Find a model's classifier, replace it with a fixed head, and count the parameters.

A classifier is an nn.Linear, or a 1×1 `Conv2d` (groups 1) applied to globally pooled (B, N, 1, 1) features.
It is found, in order, from `--layer` (one name, or several separated by commas), from the timm convention
(`model.get_classifier()`: a Linear, or a head module ending in one), or by one forward pass with hooks:

- the layer whose output *is* the model output (a tensor, the first-level tensors of a tuple/list/dict, or
  `.logits` / `["logits"]`; a flattened view of a pooled conv's output counts);
- else several layers whose outputs, averaged or summed, are the logits (timm's distilled `head` + `head_dist`,
  multi-branch models averaging a list of heads): each is swapped for its own fixed head;
- else a clear error (outputs concatenated, a conv before the pooling, a feature extractor, …) that names the
  candidates and the `--layer` to pass.

Then every other Linear whose C-wide output reaches the logits class by class in eval (an auxiliary per-token
classifier max-reduced and added, a second head inside what `get_classifier()` returns; see
`fyc_convert.model.class_layers`) is swapped too; with `--layer`, such layers left out are reported as kept.

Layers are replaced by module identity wherever the model holds them, never by position. A conv classifier
becomes `layouts.ConvHead(fixed head)` at the conv's place, so the fixed head itself sees (..., N) features.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fyc_convert.errors import ClassifierNotFoundError, HeadError, describe
from fyc_convert.head.layouts import WRAPPED_HEAD, ConvHead, conv_as_linear, is_pointwise_conv
from fyc_convert.model.class_layers import class_producing

HeadKind = Literal["hadamard", "orthogonal"]
LayerKind = Literal["linear", "conv1x1"]
Combine = Literal["single", "mean", "sum", "named", "added"]

_MAX_COMBINED = 8  # candidate heads whose subsets are tried as averaged/summed combinations (2^8 subsets)
_PASSTHROUGH = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity, nn.Flatten)  # eval: x -> x
GUESS_SIZE = 224  # H = W of the input-shape fallback for conv nets with global pooling (the ImageNet size)


@dataclass(frozen=True)
class ParamCount:
    """Exact parameter accounting of a swap (unique parameters, buffers not counted).

    `removed_pct` is Table 1's "% fixed params" of Hoffer et al. (2018): 100 · removed / original, where
    removed = original − converted. With the default head (learned scale α, bias kept) a C×N classifier
    loses its C·N weights and gains the one scalar α, so removed = C·N − 1 and the share is the paper's
    C·N / total to well within its two decimals (the paper's ResNet-50, DenseNet-169 and ShuffleNet rows are
    reproduced exactly by tests/test_surgery.py::test_removed_share_reproduces_table_1).

    Attributes:
        original: Parameters of the model before the swap.
        converted: Parameters after the swap.
        head_before: Parameters of the replaced classifier layers (weights and biases).
        head_after: Parameters of the new heads (α unless fixed, bias if kept).
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


@dataclass(frozen=True)
class Classifier:
    """One classifier layer of a model.

    Attributes:
        name: Dotted name of the layer ("" when the model is the layer).
        module: The nn.Linear, or the pointwise nn.Conv2d.
        kind: "linear", or "conv1x1" (a 1×1 Conv2d on pooled (B, N, 1, 1) features).
        in_features: N.
        num_classes: C.
    """

    name: str
    module: nn.Module
    kind: LayerKind
    in_features: int
    num_classes: int


@dataclass(frozen=True)
class Classifiers:
    """What `find_classifiers` found: the layer(s) that make the logits and how they are combined.

    Attributes:
        heads: The classifier layers, in call order.
        combine: "single" (one layer), "mean" / "sum" (the logits are the layers' outputs averaged / summed,
            checked numerically by a forward pass), "named" (several layers given by `--layer`), or "added"
            (further layers whose outputs reach the logits class by class, e.g. max-reduced over tokens and added).
        found_by: How they were found: "--layer", "get_classifier()" or "forward pass".
        kept: Learned layers that also produce the logits' classes but were left out by `--layer` (they stay
            learned in the converted model).
    """

    heads: tuple[Classifier, ...]
    combine: Combine
    found_by: str
    kept: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.heads)

    @property
    def num_classes(self) -> int:
        return self.heads[0].num_classes

    def describe(self) -> str:
        """One line for a report, e.g. "head, head_dist (2 nn.Linear, averaged; found by forward pass)"."""
        kinds = sorted({"1x1 Conv2d" if h.kind == "conv1x1" else "nn.Linear" for h in self.heads})
        what = {"single": "", "mean": ", averaged", "sum": ", summed", "named": ", chosen by --layer",
                "added": ", their class logits reduced and added"}[self.combine]
        count = f"{len(self.heads)} " if len(self.heads) > 1 else ""
        kept = f"; {self.kept_note()}" if self.kept else ""
        return f"{', '.join(self.names)} ({count}{' + '.join(kinds)}{what}; found by {self.found_by}{kept})"

    def kept_note(self) -> str | None:
        """The report's note on learned classifiers left in place, e.g. "learned classifier kept: aux (not in
        --layer)"; None when every class-producing layer is swapped."""
        if not self.kept:
            return None
        return f"learned classifier kept: {', '.join(self.kept)} (not in --layer)"


@dataclass(frozen=True)
class SwappedHead:
    """One classifier layer that `swap_classifier` replaced.

    Attributes:
        layer: Dotted name of the new fixed head; for a conv classifier the head inside the ConvHead wrapper
            (`<original_layer>.head`), which sees (B, 1, 1, N) features.
        head: The fixed head (HadamardHead or OrthogonalHead).
        original_layer: Dotted name of the replaced layer.
        original: The replaced nn.Linear or nn.Conv2d.
        original_linear: The replaced layer as an nn.Linear ((C, N) weights; the conv's weights for a conv).
        kind: "linear" or "conv1x1".
        in_features: N.
        num_classes: C.
    """

    layer: str
    head: nn.Module
    original_layer: str
    original: nn.Module
    original_linear: nn.Linear
    kind: LayerKind
    in_features: int
    num_classes: int


@dataclass
class SwapResult:
    """What `swap_classifier` did. The single-head attributes describe the first head (the only one, usually).

    Attributes:
        model: The model with the heads in place (the same object that was passed in).
        heads: Every swapped layer, in call order.
        combine: How the heads make the logits ("single", "mean", "sum", "named", "added"; see `Classifiers`).
        params: Parameter accounting over all heads.
        kept: Learned layers that also produce the classes but were left out by `--layer` (`Classifiers.kept`).
    """

    model: nn.Module
    heads: tuple[SwappedHead, ...]
    combine: Combine
    params: ParamCount
    kept: tuple[str, ...] = ()

    @property
    def layer(self) -> str:
        """Dotted name of the (first) new fixed head."""
        return self.heads[0].layer

    @property
    def layers(self) -> tuple[str, ...]:
        """Dotted names of every new fixed head (what an exporter marks)."""
        return tuple(h.layer for h in self.heads)

    @property
    def head(self) -> nn.Module:
        return self.heads[0].head

    @property
    def original_head(self) -> nn.Linear:
        """The (first) replaced classifier as an nn.Linear (a conv's weights viewed as (C, N))."""
        return self.heads[0].original_linear

    @property
    def in_features(self) -> int:
        return self.heads[0].in_features

    @property
    def num_classes(self) -> int:
        return self.heads[0].num_classes


def find_classifiers(
    model: nn.Module,
    *,
    layer: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    example: Tensor | None = None,
) -> Classifiers:
    """Find the classifier layer(s): `layer` if given, else `get_classifier()`, else one hooked forward pass.

    Args:
        model: The model.
        layer: Dotted name of the classifier (`classifier.1` or `classifier[1]`), or several separated by commas
            (each is swapped; they must have the same number of classes).
        input_shape: Shape of one input sample (no batch dim), for the forward pass.
        example: A batch of real inputs for the forward pass (takes precedence over `input_shape`).

    Returns:
        The layers and how they make the logits.

    Raises:
        ClassifierNotFoundError: `layer` is missing or not a classifier layer; no layer, or several that are not
            averaged or summed, make the output; the model is a feature extractor; the forward pass fails; or no
            input shape is known for it.
    """
    if layer is not None:
        found = _named(model, layer)
    else:
        reason = _from_get_classifier(model)
        if isinstance(reason, Classifiers):
            found = reason
        else:
            found = _from_forward(model, _example_input(model, input_shape, example, why=reason))
    return _every_class_layer(model, found, input_shape, example)


def _every_class_layer(model: nn.Module, found: Classifiers, input_shape: tuple[int, ...] | None,
                       example: Tensor | None) -> Classifiers:
    """`found` with every other Linear that produces the logits' classes in eval: added to the heads, or, when
    `--layer` chose them, listed as kept. Unchanged when no input can be made or the probe cannot run (the
    exported file is scanned for learned class weights anyway)."""
    try:
        x = _example_input(model, input_shape, example)
    except ClassifierNotFoundError:
        return found
    names = {m: n for n, m in model.named_modules()}
    chosen = {h.module for h in found.heads}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == found.num_classes]
    if all(m in chosen for m in linears):
        return found
    with eval_mode(model), torch.no_grad():
        producing = class_producing(model, x, linears, num_classes=found.num_classes, logits_of=logits_of)
    extra = [m for m in producing if m not in chosen and m in names]
    if not extra:
        return found
    if found.found_by == "--layer":
        return dataclasses.replace(found, kept=tuple(names[m] for m in extra))
    heads = found.heads + tuple(_classifier(names[m], m) for m in extra)
    return Classifiers(heads, "added", found.found_by)


def find_classifier(
    model: nn.Module,
    *,
    layer: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    example: Tensor | None = None,
) -> tuple[str, nn.Linear]:
    """The single nn.Linear classifier as (dotted name, layer); see `find_classifiers` for every layout.

    Raises:
        ClassifierNotFoundError: as `find_classifiers`, and when the classifier is several layers or a conv.
    """
    found = find_classifiers(model, layer=layer, input_shape=input_shape, example=example)
    if len(found.heads) != 1 or found.heads[0].kind != "linear":
        raise ClassifierNotFoundError(f"the classifier is {found.describe()}, not one nn.Linear; swap it with "
                                      "swap_classifier, or pass --layer NAME to choose one nn.Linear")
    return found.heads[0].name, found.heads[0].module


def capture_features(model: nn.Module, layer: str | nn.Module, inputs: Tensor | Iterable[Any], *,
                     batch_size: int = 256) -> Tensor:
    """The inputs the layer sees when the model runs on `inputs` (eval mode, no grad): the one capture hook.

    Args:
        model: The model.
        layer: Dotted name of the layer (usually the classifier), or the module itself.
        inputs: (S, *sample_shape) model inputs, run in batches of `batch_size`; or an iterable of batches
            (tensors, or (x, ...) tuples as `fyc_convert.data.loader.make_loader` yields them), read once, so only
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
    classifiers: Classifiers | None = None,
    features: Tensor | Mapping[str, Tensor] | None = None,
    inputs: Tensor | Iterable[Any] | None = None,
    bias: bool = True,
    fixed_scale: float | None = None,
    seed: int = 0,
    hadamard_size: int | None = None,
    adapter: bool | int | None = False,
) -> SwapResult:
    """Replace the classifier layer(s) in place with fixed heads built from them (class order kept).

    Each layer gets its own head, its rows chosen from its own features. A 1×1 conv classifier becomes a
    `ConvHead` wrapper around its head.

    Args:
        model: The model; modified in place.
        head: "hadamard" (add/sub transform) or "orthogonal" (dense fixed matrix, for comparison).
        layer: Dotted name(s) of the classifier; found automatically when None (see `find_classifiers`).
        input_shape: Shape of one input sample, for finding the classifier by a forward pass.
        example: A batch of real inputs, for finding the classifier by a forward pass.
        classifiers: What `find_classifiers` returned (then nothing is searched again).
        features: Inputs of the classifier to fit α and b (recommended): (S, N) for one layer (see
            `capture_features`), or a mapping from each layer's name to its (S, N) features.
        inputs: Model inputs from which each layer's features are captured when `features` is None: a
            (S, *sample_shape) tensor, or an iterable of batches that can be read once per layer (a DataLoader).
            Needed for conv classifiers and several heads unless `features` maps every layer.
        bias: Give the heads a per-class bias.
        fixed_scale: Keep α fixed at this value instead of learning it.
        seed: Seed of the heads' embedding signs (the same for every head).
        hadamard_size: Transform size m of the hadamard heads (default: `HadamardHead.from_linear`'s choice,
            the widest row choice); e.g. the fold size N / 2^k >= C + 1 gives a faster exported head.
        adapter: Give each head a learned map before it (`HadamardHead.from_linear`): an int W for N -> W with
            the head on W features; True for the width `heads.adapter_width` chooses (the orthogonal head: N x N);
            None: that width only where classes outnumber features ADAPTER_RATIO to 1; False: none.

    Returns:
        The swap's result, with exact parameter accounting.

    Raises:
        ClassifierNotFoundError: See `find_classifiers`.
        HeadError: Unknown head kind, a hadamard_size for the orthogonal head, features that do not fit a
            layer, or the head cannot be built for these sizes. The model is left as it was.
    """
    head_cls, sizing = _head_class(head, hadamard_size)
    found = classifiers or find_classifiers(model, layer=layer, input_shape=input_shape, example=example)
    original = count_params(model)
    head_before = sum(p.numel() for p in _unique_params(c.module for c in found.heads))
    model, targets, undo = _as_linears(model, found)
    try:
        feats = _features(model, targets, features, inputs)
        built = []
        for (c, name, linear), f in zip(targets, feats, strict=True):
            use = _adapter_for(adapter, linear, head_cls)
            new = head_cls.from_linear(linear, features=f, bias=bias, fixed_scale=fixed_scale, seed=seed,
                                       adapter=use, **sizing)
            built.append((c, name, linear, new.train(linear.training)))
    except BaseException:
        for placed, old in undo:
            model = _put(model, placed, old)
        raise
    swapped = []
    for c, name, linear, new in built:
        model = _put(model, linear, new)
        swapped.append(SwappedHead(layer=name, head=new, original_layer=c.name, original=c.module,
                                   original_linear=linear, kind=c.kind, in_features=c.in_features,
                                   num_classes=c.num_classes))
    params = _param_count(model, original, head_before, swapped)
    return SwapResult(model, tuple(swapped), found.combine, params, found.kept)


def _adapter_for(adapter: bool | int | None, linear: nn.Linear, head_cls: type[nn.Module]) -> bool | int:
    """What from_linear gets for one layer: see swap_classifier's `adapter`."""
    from fyc_convert.head.heads import HadamardHead, adapter_width

    if adapter is None or (adapter is True and head_cls is HadamardHead):
        width = adapter_width(linear.in_features, linear.out_features, force=adapter is True)
        return False if width is None else width
    return adapter


def _head_class(head: str, hadamard_size: int | None) -> tuple[type[nn.Module], dict[str, int]]:
    """The fixed head class for `head` and its sizing keywords. Raises HeadError for a bad pair."""
    from fyc_convert.head.heads import HadamardHead, OrthogonalHead

    kinds = {"hadamard": HadamardHead, "orthogonal": OrthogonalHead}
    if head not in kinds:
        raise HeadError(f"unknown head {head!r}; use one of: {', '.join(kinds)}")
    if hadamard_size is None:
        return kinds[head], {}
    if head != "hadamard":
        raise HeadError(f"a transform size applies to the hadamard head only; leave it unset for the {head} head")
    return kinds[head], {"hadamard_size": hadamard_size}


def _as_linears(model: nn.Module, found: Classifiers) -> tuple[nn.Module, list[tuple[Classifier, str, nn.Linear]],
                                                                  list[tuple[nn.Module, nn.Module]]]:
    """Every classifier as an nn.Linear seeing (..., N): a conv is wrapped, ConvHead(Linear) computes what it did.

    Returns (model, targets as (classifier, dotted name of its Linear, the Linear), undo as (placed, original)
    to put back on failure).
    """
    undo: list[tuple[nn.Module, nn.Module]] = []
    targets: list[tuple[Classifier, str, nn.Linear]] = []
    for c in found.heads:
        if c.kind == "conv1x1":
            linear = conv_as_linear(c.module)
            wrapper = ConvHead(linear).train(c.module.training)
            model = _put(model, c.module, wrapper)
            undo.append((wrapper, c.module))
            targets.append((c, f"{c.name}.{WRAPPED_HEAD}" if c.name else WRAPPED_HEAD, linear))
        else:
            targets.append((c, c.name, c.module))
    return model, targets, undo


def _param_count(model: nn.Module, original: int, head_before: int, swapped: list[SwappedHead]) -> ParamCount:
    converted = count_params(model)
    return ParamCount(
        original=original,
        converted=converted,
        head_before=head_before,
        head_after=sum(p.numel() for p in _unique_params(s.head for s in swapped)),
        removed=original - converted,
        removed_pct=100.0 * (original - converted) / original if original else 0.0,
        trainable=count_params(model, trainable_only=True),
    )


def count_params(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of unique parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _unique_params(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for m in modules:
        for p in m.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def _put(model: nn.Module, old: nn.Module, new: nn.Module) -> nn.Module:
    """`new` wherever `old` is held; returns the model (`new` itself when the model was `old`)."""
    if model is old:
        return new
    _replace(model, old, new)
    return model


def _features(model: nn.Module, targets: list[tuple[Classifier, str, nn.Linear]],
              features: Tensor | Mapping[str, Tensor] | None, inputs: Tensor | Iterable[Any] | None,
              ) -> list[Tensor | None]:
    """The (S, N) features of each target Linear: given, captured from `inputs`, or None (fit from weights)."""
    if isinstance(features, Tensor):
        if len(targets) != 1:
            names = ", ".join(c.name for c, _, _ in targets)
            raise HeadError(f"one feature tensor for {len(targets)} classifier layers ({names}); pass a mapping "
                            "from each layer's name to its features, or the model inputs")
        features = {targets[0][0].name: features}
    if inputs is not None and not isinstance(inputs, Tensor) and iter(inputs) is inputs:
        inputs = list(inputs)  # a one-shot iterator: kept, so every layer sees the same batches
    out: list[Tensor | None] = []
    for c, name, _ in targets:
        f = (features.get(c.name, features.get(name)) if features is not None else None)
        if f is None and isinstance(inputs, Tensor):
            f = capture_features(model, name, inputs)
        elif f is None and inputs is not None:  # batches (x or (x, y, ...)), streamed one at a time
            f = torch.cat([capture_features(model, name, b[0] if isinstance(b, (tuple, list)) else b)
                           for b in inputs])
        if f is not None and (f.dim() != 2 or f.shape[1] != c.in_features):
            raise HeadError(f"the features for {c.name or 'the model'!r} have shape {tuple(f.shape)}, its classifier "
                            f"takes (S, {c.in_features}); capture them with capture_features at "
                            f"{name!r}, or pass the model inputs instead")
        out.append(f)
    return out


# ---------------------------------------------------------------------------------------------- finding


@dataclass
class _Call:
    """One call of a candidate layer during the forward pass."""

    out: Tensor  # the layer's output, as the model got it
    values: Tensor  # a copy of its values at the time
    order: int  # position among the hooked calls
    spatial: tuple[int, ...]  # a conv's input spatial size; () for a Linear

    def logits(self) -> Tensor:
        """(B, C) for a pooled conv's (B, C, 1, 1), else the output's shape."""
        return self.values.flatten(1) if self.spatial else self.values


def _classifier(name: str, module: nn.Module) -> Classifier | None:
    if isinstance(module, nn.Linear):
        return Classifier(name, module, "linear", module.in_features, module.out_features)
    if is_pointwise_conv(module):
        return Classifier(name, module, "conv1x1", module.in_channels, module.out_channels)
    return None


def _named(model: nn.Module, layer: str) -> Classifiers:
    heads = []
    for part in (p.strip() for p in layer.split(",")):
        name = _dotted(part)
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ClassifierNotFoundError(f"--layer {part!r} does not exist in the model; "
                                          f"{_linear_choices(model)}") from None
        found = _classifier(name, module)
        if found is None:
            raise ClassifierNotFoundError(f"--layer {part!r} is a {type(module).__name__}, not an nn.Linear (only a "
                                          "Linear classifier, or a 1x1 Conv2d on pooled features, can be swapped); "
                                          f"{_linear_choices(model)}")
        if any(h.module is module for h in heads):
            raise ClassifierNotFoundError(f"--layer names {part!r} twice; name each classifier layer once")
        heads.append(found)
    if len({h.num_classes for h in heads}) > 1:
        sizes = ", ".join(f"{h.name} ({h.num_classes})" for h in heads)
        raise ClassifierNotFoundError(f"--layer names classifiers of different class counts: {sizes}; swap layers "
                                      "of the same classes together, or pass one")
    return Classifiers(tuple(heads), "single" if len(heads) == 1 else "named", "--layer")


def _from_get_classifier(model: nn.Module) -> Classifiers | str | None:
    """timm's convention. Classifiers when it names one Linear (itself, or the last in a head module); a reason
    to run the forward pass when it names layers whose combination must be checked; None when it says nothing.

    Raises:
        ClassifierNotFoundError: it returns an Identity (a feature extractor, e.g. timm's num_classes=0).
    """
    getter = getattr(model, "get_classifier", None)
    if not callable(getter):
        return None
    try:
        found = getter()
    except Exception:  # noqa: BLE001 - a broken getter just means we fall back to the forward pass
        return None
    names = {m: n for n, m in model.named_modules()}
    if isinstance(found, nn.Identity) and found in names:  # the model's own head slot is empty
        raise ClassifierNotFoundError(
            "the model has no classifier: get_classifier() returns an Identity, so it is a feature extractor; build "
            "it with its classes (e.g. num_classes > 0) or pass --layer NAME")
    if isinstance(found, (nn.ModuleList, nn.ModuleDict)):  # parallel branch heads (crossvit), not one MLP head
        found = list(found.values() if isinstance(found, nn.ModuleDict) else found)
        if len(found) == 1:
            found = found[0]
    if isinstance(found, (tuple, list)) and found and all(isinstance(m, nn.Module) for m in found):
        shown = ", ".join(names.get(m, "?") for m in found)
        return f"get_classifier() returns {len(found)} layers ({shown}), and how they combine is checked by it"
    if isinstance(found, nn.Module) and not isinstance(found, nn.Linear) and not is_pointwise_conv(found):
        container, found = found, _last_linear(found)
        if found is not None:
            same = [m for m in container.modules() if isinstance(m, nn.Linear) and m.out_features == found.out_features]
            if len(same) > 1:  # e.g. two BatchNorm + Linear heads averaged in eval: which ones, the forward pass says
                shown = ", ".join(names.get(m, "?") for m in same)
                return (f"get_classifier() returns a module with {len(same)} classifier layers ({shown}), and how "
                        "they combine is checked by it")
    if isinstance(found, nn.Linear) and found in names:
        return Classifiers((_classifier(names[found], found),), "single", "get_classifier()")
    return None


def _last_linear(head: nn.Module) -> nn.Linear | None:
    """The Linear a head module ends in (an MLP head: Sequential / ModuleDict / Module): the last Linear registered,
    when every leaf registered after it passes values through unchanged in eval mode (Dropout, Identity, Flatten)."""
    leaves = [m for m in head.modules() if next(m.children(), None) is None]
    for i in range(len(leaves) - 1, -1, -1):
        if isinstance(leaves[i], nn.Linear):
            rest = leaves[i + 1:]
            return leaves[i] if all(isinstance(m, _PASSTHROUGH) for m in rest) else None
    return None


def _from_forward(model: nn.Module, x: Tensor) -> Classifiers:
    names = {m: n for n, m in model.named_modules()}
    candidates = {m for m in model.modules() if _classifier("", m) is not None}
    calls: dict[nn.Module, _Call] = {}  # candidate -> its last call
    called: list[nn.Module] = []  # hooked modules in call order

    def hook(module: nn.Module, args: Any, out: Any) -> None:
        called.append(module)
        if module in candidates and isinstance(out, Tensor):
            spatial = ()
            if isinstance(module, nn.Conv2d):
                spatial = tuple(args[0].shape[2:]) if args and isinstance(args[0], Tensor) else (0,)
            calls[module] = _Call(out, out.detach().clone(), len(called), spatial)

    hooked = [m for m in model.modules() if m in candidates or next(m.children(), None) is None]  # candidates, leaves
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
    pooled = {m: c for m, c in calls.items() if all(s == 1 for s in c.spatial)}  # Linears, convs on (B, N, 1, 1)

    def found(modules: list[nn.Module], combine: Combine) -> Classifiers:
        modules = sorted(modules, key=lambda m: pooled[m].order)
        return Classifiers(tuple(_classifier(names[m], m) for m in modules), combine, "forward pass")

    outputs = _output_tensors(output)
    same = [m for m, c in pooled.items() if any(_is_same(c.out, c.values, o) for o in outputs)]
    if len(same) == 1:
        return found(same, "single")
    if same:
        shown = ", ".join(sorted(names[m] for m in same))
        layers = "nn.Linear layers" if all(isinstance(m, nn.Linear) for m in same) else "classifier layers"
        raise ClassifierNotFoundError(f"{len(same)} {layers} make the model's outputs: {shown}; pass --layer NAME "
                                      "to choose the classifier")
    logits = _logits_or_none(output)
    if logits is not None:
        combined = _combination(pooled, logits, names)
        if combined is not None:
            return found(*combined)
        _refuse_concatenation(pooled, logits, names)
    _refuse(model, names, called, calls)
    raise AssertionError("unreachable")  # _refuse always raises


def _combination(pooled: dict[nn.Module, _Call], logits: Tensor,
                 names: dict[nn.Module, str]) -> tuple[list[nn.Module], Combine] | None:
    """The smallest set of candidate layers whose outputs averaged (or summed) are the logits, if one set is."""
    same_shape = sorted((m for m, c in pooled.items() if c.logits().shape == logits.shape),
                        key=lambda m: pooled[m].order)[-_MAX_COMBINED:]
    for size in range(2, len(same_shape) + 1):
        matches: list[tuple[list[nn.Module], Combine]] = []
        for subset in itertools.combinations(same_shape, size):
            stacked = torch.stack([pooled[m].logits() for m in subset])  # (k, B, C)
            for combine, value in (("mean", stacked.mean(0)), ("sum", stacked.sum(0))):
                if _close(value, logits):
                    matches.append((list(subset), combine))
                    break  # all-zero outputs match both: the mean is the same swap
        if len(matches) == 1:
            return matches[0]
        if matches:
            sets = "; ".join(", ".join(names[m] for m in s) for s, _ in matches[:3])
            raise ClassifierNotFoundError(f"several sets of layers combine into the model's output ({sets}); pass "
                                          "--layer NAME[,NAME] to choose the classifier")
    return None


def _refuse_concatenation(pooled: dict[nn.Module, _Call], logits: Tensor, names: dict[nn.Module, str]) -> None:
    """A clear error when the logits are several layers' outputs concatenated (in call order)."""
    parts = sorted((m for m, c in pooled.items() if c.logits().shape[:-1] == logits.shape[:-1]),
                   key=lambda m: pooled[m].order)
    for i in range(len(parts)):
        for j in range(i + 2, len(parts) + 1):
            run = [pooled[m].logits() for m in parts[i:j]]
            if sum(r.shape[-1] for r in run) == logits.shape[-1] and _close(torch.cat(run, -1), logits):
                shown = ", ".join(names[m] for m in parts[i:j])
                raise ClassifierNotFoundError(
                    f"the model's output concatenates the outputs of {shown}; fyc-convert swaps a classifier whose "
                    "output is the logits, or several whose outputs are averaged; pass --layer NAME to swap one")


def _refuse(model: nn.Module, names: dict[nn.Module, str], called: list[nn.Module],
            calls: dict[nn.Module, _Call]) -> None:
    """The error when no classifier makes the output, saying what the model ends in."""
    on_pooled = any(all(s == 1 for s in c.spatial) for c in calls.values())
    if not any(isinstance(m, nn.Linear) for m in model.modules()) and not on_pooled:
        raise ClassifierNotFoundError("the model has no nn.Linear layer to swap, and no 1x1 Conv2d on pooled "
                                      "features; only such classifiers are supported")
    last = ""
    if called:
        module = called[-1]
        last = f"; the last layer run is {_module_name(model, module)} ({type(module).__name__})"
        if isinstance(module, nn.Identity):
            raise ClassifierNotFoundError(f"the model has no classifier{last}, so it is a feature extractor; build "
                                          "it with its classes (e.g. num_classes > 0) or pass --layer NAME")
        call = calls.get(module)
        if call is not None and call.spatial and any(s != 1 for s in call.spatial):
            size = "x".join(map(str, call.spatial))
            last += (f", a 1x1 conv applied to {size} maps before the pooling (only a 1x1 Conv2d on pooled "
                     "(B, N, 1, 1) features can be swapped)")
        elif module in calls:
            last += ", whose output is changed afterwards"
    raise ClassifierNotFoundError(f"no nn.Linear makes the model's output{last}; {_linear_choices(model)}")


def _example_input(model: nn.Module, input_shape: tuple[int, ...] | None, example: Tensor | None, *,
                   why: str | None = None) -> Tensor:
    if example is not None:
        return example.to(_device_of(model))
    if input_shape is None:
        reason = f" ({why})" if why else ""
        raise ClassifierNotFoundError(f"finding the classifier needs one forward pass{reason} but the input shape is "
                                      "unknown; pass --input-shape (one sample, e.g. 3,224,224) or --layer NAME")
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = p.dtype if p is not None else torch.float32
    g = torch.Generator().manual_seed(0)
    return torch.randn((2, *input_shape), generator=g).to(_device_of(model), dtype)  # (2, *input_shape)


def guess_input_shape(model: nn.Module) -> tuple[tuple[int, ...], str] | None:
    """A last-resort input shape when neither the options, the checkpoint, the model's config nor the data give one.

    Tried in order, each checked by a forward pass of two samples (the first that runs wins):
    1. a patch embedding's own image size (an `img_size` / `image_size` attribute of a module, as timm's
       PatchEmbed has) with the input channels of the first Conv2d;
    2. a conv net with global pooling: the first Conv2d's input channels and 224×224 (the ImageNet size), when
       the model has an adaptive pooling layer to 1×1 or a `*AdaptivePool*` / `*GlobalPool*` module (timm's
       SelectAdaptivePool2d), or else when it runs at both 224×224 and 192×192 (pooling written as a function);
    3. a model whose first layer is an nn.Linear: (in_features,).

    Returns:
        (shape of one sample, how it was found), or None when nothing fits.
    """
    modules = list(model.named_modules())
    conv = next(((n, m) for n, m in modules if isinstance(m, nn.Conv2d)), None)
    guesses: list[tuple[tuple[int, ...], str, tuple[int, ...] | None]] = []  # (shape, how, a second shape to run)
    if conv is not None:
        name, first = conv
        c = first.in_channels
        channels = f"{c} channels from the first conv {name!r}"
        size = next((s for _, m in modules for s in [_image_size(m)] if s is not None), None)
        if size is not None:
            guesses.append(((c, *size), f"guessed: {channels}, {size[0]}x{size[1]} from the patch embedding's "
                                        "image size", None))
        pool = next((n for n, m in modules if _is_global_pool(m)), None)
        square = (c, GUESS_SIZE, GUESS_SIZE)
        if pool is not None:
            guesses.append((square, f"guessed: {channels}, {GUESS_SIZE}x{GUESS_SIZE} for a conv net with global "
                                    f"pooling ({pool!r})", None))
        else:
            other = GUESS_SIZE * 6 // 7  # 192: a second size that only global pooling makes fit too
            guesses.append((square, f"guessed: {channels}, {GUESS_SIZE}x{GUESS_SIZE} for a conv net with global "
                                    f"pooling (it runs at {GUESS_SIZE} and {other})", (c, other, other)))
    leaf = next(((n, m) for n, m in modules if next(m.children(), None) is None and any(True for _ in m.parameters())),
                None)
    if leaf is not None and isinstance(leaf[1], nn.Linear):
        guesses.append(((leaf[1].in_features,), f"guessed: {leaf[1].in_features} features from the first layer "
                                                f"{leaf[0]!r} (nn.Linear)", None))
    for shape, how, also in guesses:
        if _runs(model, shape) and (also is None or _runs(model, also)):
            return shape, how + " (pass --input-shape to override)"
    return None


def _image_size(module: nn.Module) -> tuple[int, int] | None:
    for attr in ("img_size", "image_size"):
        size = getattr(module, attr, None)
        if isinstance(size, int) and size > 0:
            return size, size
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size):
            return int(size[0]), int(size[1])
    return None


def _is_global_pool(module: nn.Module) -> bool:
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        size = module.output_size
        return size == 1 or tuple(size if isinstance(size, (tuple, list)) else (size,)) in ((1,), (1, 1))
    name = type(module).__name__
    return "AdaptivePool" in name or "GlobalPool" in name


def _runs(model: nn.Module, shape: tuple[int, ...]) -> bool:
    try:
        with eval_mode(model), torch.no_grad():
            model(_example_input(model, shape, None))
    except Exception:  # noqa: BLE001 - a wrong guess can fail anywhere in the user's forward
        return False
    return True


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


def _logits_or_none(output: Any) -> Tensor | None:
    try:
        return logits_of(output)
    except ClassifierNotFoundError:
        return None


def _is_same(out: Tensor, values: Tensor, final: Tensor) -> bool:
    """`final` is the layer's output (or a view of all of its memory, e.g. flattened) and was not changed since."""
    same_memory = out is final or (out.data_ptr() == final.data_ptr() and out.numel() == final.numel())
    return same_memory and torch.equal(values, out)


def _close(a: Tensor, b: Tensor) -> bool:
    """Equal up to float32 rounding of a few additions (relative to the logits' scale)."""
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a.to(b.dtype), b, rtol=1e-4, atol=1e-5 * (1.0 + scale)))


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


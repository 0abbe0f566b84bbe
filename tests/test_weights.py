"""model.safetensors: what save_converted writes, load_converted rebuilds into the original architecture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from models import HEAD_LAYOUTS, LAYOUTS
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fyc_convert.errors import CheckpointError, OutputError
from fyc_convert.head.heads import HadamardHead, OrthogonalHead
from fyc_convert.head.layouts import ConvHead
from fyc_convert.model.surgery import logits_of, swap_classifier
from fyc_convert.model.weights import load_converted, save_converted


@pytest.mark.parametrize(
    ("layout", "head", "bias", "fixed_scale"),
    [("resnet_fc", "hadamard", True, None), ("mobilenet_classifier1", "hadamard", False, 7.5),
     ("vit_heads_head", "orthogonal", True, None)],
)
def test_round_trip_rebuilds_the_same_model(tmp_path: Path, layout: str, head: str, bias: bool,
                                            fixed_scale: float | None) -> None:
    lay = LAYOUTS[layout]()
    swap = swap_classifier(lay.model, head=head, layer=lay.layer, input_shape=lay.input_shape, bias=bias,
                           fixed_scale=fixed_scale)
    with torch.no_grad():  # make the trained parts differ from any freshly built head
        if fixed_scale is None:
            swap.head.scale.mul_(1.25)
        if swap.head.bias is not None:
            swap.head.bias.add_(torch.linspace(-1, 1, swap.num_classes))
    path = save_converted(swap.model, tmp_path / "model.safetensors", layer=swap.layer, head=swap.head)

    fresh = LAYOUTS[layout]().model  # the original architecture, original classifier
    loaded = load_converted(fresh, path)
    new_head = loaded.get_submodule(swap.layer)
    assert type(new_head) is (HadamardHead if head == "hadamard" else OrthogonalHead)
    assert (new_head.bias is None) == (not bias)
    assert isinstance(new_head.scale, torch.nn.Parameter) == (fixed_scale is None)
    x = torch.randn(3, *lay.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(logits_of(loaded.eval()(x)), logits_of(swap.model.eval()(x)))


def test_file_without_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="no fyc-convert header"):
        load_converted(LAYOUTS["resnet_fc"]().model, path)


def test_other_architecture_is_refused(tmp_path: Path) -> None:
    lay = LAYOUTS["resnet_fc"]()
    swap = swap_classifier(lay.model, layer=lay.layer, input_shape=lay.input_shape)
    path = save_converted(swap.model, tmp_path / "m.safetensors", layer=swap.layer, head=swap.head)
    with pytest.raises(CheckpointError, match="does not have|does not fit"):
        load_converted(LAYOUTS["densenet_classifier"]().model, path)


def test_unreadable_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x00\x01 not safetensors")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_converted(LAYOUTS["resnet_fc"]().model, path)


# ---------------------------------------------------------------------------------------------- several heads, convs


@pytest.mark.parametrize("layout", ["distilled_vit", "averaged_branch_heads", "pooled_conv_head",
                                    "squeezed_conv_head", "pooled_conv_head_no_bias"])
@pytest.mark.parametrize("head", ["hadamard", "orthogonal"])
def test_round_trip_of_several_heads_and_conv_wrappers(tmp_path: Path, layout: str, head: str) -> None:
    lay = HEAD_LAYOUTS[layout]()
    x = torch.randn(3, *lay.input_shape, generator=torch.Generator().manual_seed(0))
    swap = swap_classifier(lay.model, head=head, input_shape=lay.input_shape, inputs=x)
    with torch.no_grad():
        for i, s in enumerate(swap.heads):  # each head trained differently
            s.head.scale.mul_(1.25 + i)
            if s.head.bias is not None:
                s.head.bias.add_(torch.linspace(-1, 1, s.num_classes) * (i + 1))
    path = save_converted(swap.model, tmp_path / "model.safetensors")
    with safe_open(str(path), "pt") as f:
        entries = json.loads(f.metadata()["fyc_convert.heads"])
    assert [e["layer"] for e in entries] == list(swap.layers)
    assert [e.get("wrapper") for e in entries] == [("conv1x1" if s.kind == "conv1x1" else None) for s in swap.heads]

    loaded = load_converted(HEAD_LAYOUTS[layout]().model, path)
    for s in swap.heads:
        assert type(loaded.get_submodule(s.layer)) is type(s.head)
        if s.kind == "conv1x1":
            assert isinstance(loaded.get_submodule(s.original_layer), ConvHead)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(loaded.eval()(x)), logits_of(swap.model.eval()(x)))


def test_header_is_the_head_list_only_and_a_file_without_it_is_refused(tmp_path: Path) -> None:
    lay = LAYOUTS["resnet_fc"]()
    swap = swap_classifier(lay.model, layer="fc")
    path = save_converted(swap.model, tmp_path / "model.safetensors", layer="fc", head=swap.head)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert set(meta) == {"fyc_convert.head", "fyc_convert.heads"}  # no flat keys of the first head
    (entry,) = json.loads(meta["fyc_convert.heads"])
    assert entry["kind"] == "hadamard" and entry["layer"] == "fc" and entry["num_classes"] == swap.head.num_classes
    assert entry["hadamard_size"] == swap.head.hadamard_size and entry["bias"] is True
    flat = {"fyc_convert.head": "hadamard", "fyc_convert.layer": "fc", "fyc_convert.in_features": "64"}
    save_file(load_file(str(path)), str(path), metadata=flat)  # the unreleased flat format
    with pytest.raises(CheckpointError, match=r"no fyc-convert head list \(fyc_convert.heads\); save or export"):
        load_converted(LAYOUTS["resnet_fc"]().model, path)


def test_saving_a_model_without_a_fixed_head_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="the model holds no fixed head; save the model that swap_classifier"):
        save_converted(LAYOUTS["resnet_fc"]().model, tmp_path / "m.safetensors")
    swap = swap_classifier(LAYOUTS["resnet_fc"]().model, layer="fc")
    with pytest.raises(OutputError, match="the model holds no fixed head at 'head'"):
        save_converted(swap.model, tmp_path / "m.safetensors", layer="head")
    assert not (tmp_path / "m.safetensors").exists()


def test_conv_file_into_a_model_with_a_linear_there_is_refused(tmp_path: Path) -> None:
    lay = HEAD_LAYOUTS["pooled_conv_head"]()
    swap = swap_classifier(lay.model, input_shape=lay.input_shape)
    path = save_converted(swap.model, tmp_path / "model.safetensors")
    other = LAYOUTS["resnet_fc"]().model  # .fc is an nn.Linear
    with pytest.raises(CheckpointError, match="converts the 1x1 Conv2d 'fc', but this model has a Linear there"):
        load_converted(other, path)


@pytest.mark.parametrize(("head", "adapter"), [("hadamard", True), ("hadamard", "4N"), ("orthogonal", True)])
def test_round_trip_keeps_a_trained_adapter(tmp_path: Path, head: str, adapter: bool | str) -> None:
    """A head with a learned map before it (the default width, N -> 4N, or the orthogonal head's N x N): the
    header names its input size, the map's trained weights come back."""
    from fyc_convert.head.heads import adapter_width

    lay = LAYOUTS["resnet_fc"]()
    n_feat = lay.model.get_submodule(lay.layer).in_features
    width = 4 * n_feat if adapter == "4N" else adapter
    swap = swap_classifier(lay.model, head=head, layer=lay.layer, input_shape=lay.input_shape, adapter=width)
    n_in, c = swap.head.input_features, swap.head.num_classes
    assert n_in == n_feat
    assert swap.head.in_features == {"4N": 4 * n_in, True: adapter_width(n_in, c, force=True) if head == "hadamard"
                                     else n_in}[adapter]
    with torch.no_grad():
        swap.head.adapter.weight.add_(0.1 * torch.randn(swap.head.in_features, n_in,
                                                          generator=torch.Generator().manual_seed(1)))
        swap.head.adapter.bias.add_(0.5)
    path = save_converted(swap.model, tmp_path / "model.safetensors", layer=swap.layer, head=swap.head)
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["fyc_convert.heads"])[0]["adapter"] == n_in
    loaded = load_converted(LAYOUTS["resnet_fc"]().model, path)
    assert loaded.get_submodule(swap.layer).adapter is not None
    x = torch.randn(3, *lay.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(logits_of(loaded.eval()(x)), logits_of(swap.model.eval()(x)))

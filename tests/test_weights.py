"""model.safetensors: what save_converted writes, load_converted rebuilds into the original architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fyc_convert.errors import CheckpointError
from fyc_convert.heads import HadamardHead, OrthogonalHead
from fyc_convert.surgery import logits_of, swap_classifier
from fyc_convert.weights import load_converted, save_converted
from models import LAYOUTS


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

"""Head layouts beyond one nn.Linear at the output: several combined heads, pooled 1x1 conv classifiers, MLP head
modules, training-only heads, and the models that must get a clear error (tests/models.py's stand-ins)."""

from __future__ import annotations

import copy

import pytest
import torch
from models import (
    BAD_LAYOUTS,
    HEAD_LAYOUTS,
    LAYOUTS,
    NO_CLASSIFIER,
    FlattenedMapClassifier,
    VitHead,
    head_math,
    hooked_inputs,
    logits_of,
    not_found_message,
)
from torch import Tensor, nn

from fyc_convert.errors import HeadError
from fyc_convert.head.heads import HadamardHead
from fyc_convert.head.layouts import ConvHead, conv_as_linear
from fyc_convert.model.surgery import (
    capture_features,
    find_classifier,
    find_classifiers,
    guess_input_shape,
    swap_classifier,
)


def _inputs(shape: tuple[int, ...], batch: int = 6) -> Tensor:
    return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", HEAD_LAYOUTS)
def test_find_classifiers(name):
    layout = HEAD_LAYOUTS[name]()
    found = find_classifiers(layout.model, input_shape=layout.input_shape)
    assert ",".join(found.names) == layout.layer
    assert found.combine == layout.combine
    assert found.num_classes == layout.num_classes
    for h in found.heads:
        assert h.module is layout.model.get_submodule(h.name)
    assert found.heads[0].in_features == layout.in_features


@pytest.mark.parametrize("name", HEAD_LAYOUTS)
def test_swap_matches_the_combinedhead_math(name):
    layout = HEAD_LAYOUTS[name]()
    model = layout.model
    original = copy.deepcopy(model)
    x = _inputs(layout.input_shape)
    names = layout.layer.split(",")
    feats = {n: hooked_inputs(original, n, x) for n in names}  # (S, N_i) per layer, before the swap

    result = swap_classifier(model, input_shape=layout.input_shape, inputs=x)

    assert result.combine == layout.combine and len(result.heads) == len(names)
    parts = []
    for swapped, n in zip(result.heads, names, strict=True):
        assert swapped.original_layer == n and isinstance(swapped.head, HadamardHead)
        assert model.get_submodule(swapped.layer) is swapped.head
        # rows chosen per head from its own features: what from_linear does with exactly those features
        alone = HadamardHead.from_linear(swapped.original_linear, features=feats[n])
        assert torch.equal(swapped.head.rows, alone.rows)
        torch.testing.assert_close(swapped.head.scale, alone.scale)
        parts.append(head_math(swapped.head, feats[n]))
    stacked = torch.stack(parts)
    want = stacked.sum(0) if layout.combine == "sum" else stacked.mean(0)
    with torch.no_grad():
        out = logits_of(model(x)).double()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert result.layer == result.heads[0].layer and result.head is result.heads[0].head  # single-head view


@pytest.mark.parametrize("name", ["pooled_conv_head", "pooled_conv_head_no_bias", "squeezed_conv_head"])
def test_conv_classifier_is_wrapped_channels_last(name):
    layout = HEAD_LAYOUTS[name]()
    conv = layout.model.get_submodule(layout.layer)
    result = swap_classifier(layout.model, input_shape=layout.input_shape, inputs=_inputs(layout.input_shape))
    wrapper = layout.model.get_submodule(layout.layer)
    assert isinstance(wrapper, ConvHead) and wrapper.head is result.head
    assert result.layer == f"{layout.layer}.head" and result.heads[0].kind == "conv1x1"
    assert result.heads[0].original is conv
    lin = result.original_head  # the conv as a Linear: what a Gemm baseline of the head uses
    assert isinstance(lin, nn.Linear) and lin.weight.shape == (layout.num_classes, layout.in_features)
    assert torch.equal(lin.weight, conv.weight.flatten(1))
    assert (lin.bias is None) == (conv.bias is None)
    # the inner head sees (B, 1, 1, N) features: capture_features flattens them to (S, N)
    feats = capture_features(layout.model, result.layer, _inputs(layout.input_shape))
    assert feats.shape == (6, layout.in_features)


def test_conv_as_linear_is_the_same_function():
    conv = nn.Conv2d(8, 5, 1)
    x = torch.randn(3, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    wrapped = ConvHead(conv_as_linear(conv))
    torch.testing.assert_close(wrapped(x), conv(x), rtol=1e-6, atol=1e-6)


def test_param_counts_over_several_heads():
    layout = HEAD_LAYOUTS["averaged_branch_heads"]()
    total = sum(p.numel() for p in layout.model.parameters())
    p = swap_classifier(layout.model, input_shape=layout.input_shape).params
    before = sum(w * 6 + 6 for w in (12, 16, 12))
    after = 3 * (1 + 6)  # α + bias per head
    assert (p.head_before, p.head_after) == (before, after)
    assert p.original == total and p.converted == total - before + after and p.removed == before - after
    assert p.trainable == p.converted


def test_param_counts_of_a_conv_head_without_bias():
    layout = HEAD_LAYOUTS["pooled_conv_head_no_bias"]()
    total = sum(p.numel() for p in layout.model.parameters())
    p = swap_classifier(layout.model, input_shape=layout.input_shape).params
    assert (p.head_before, p.head_after) == (16 * 12, 1 + 12)
    assert p.converted == total - 16 * 12 + 13


def test_features_given_per_layer():
    layout = HEAD_LAYOUTS["distilled_vit"]()
    x = _inputs(layout.input_shape)
    feats = {n: hooked_inputs(layout.model, n, x) for n in ("head", "head_dist")}
    by_features = swap_classifier(copy.deepcopy(layout.model), input_shape=layout.input_shape, features=feats)
    batches = iter([(b, torch.zeros(len(b))) for b in x.split(2)])  # one-shot (x, y) batches, as a loader yields
    by_inputs = swap_classifier(layout.model, input_shape=layout.input_shape, inputs=batches)
    for a, b in zip(by_features.heads, by_inputs.heads, strict=True):
        assert torch.equal(a.head.rows, b.head.rows)
        torch.testing.assert_close(a.head.bias, b.head.bias)


def test_distilled_pair_in_distilled_training_mode():
    layout = HEAD_LAYOUTS["distilled_vit"]()
    layout.model.distilled_training = True
    layout.model.train()  # returns both logits in training; found in eval mode, where they are averaged
    found = find_classifiers(layout.model, input_shape=layout.input_shape)
    assert found.names == ("head", "head_dist") and found.combine == "mean"
    assert layout.model.training


def test_layer_option_chooses_one_or_several():
    layout = HEAD_LAYOUTS["distilled_vit"]()
    result = swap_classifier(layout.model, layer="head")
    assert result.combine == "single" and isinstance(layout.model.head, HadamardHead)
    assert isinstance(layout.model.head_dist, nn.Linear)
    layout = HEAD_LAYOUTS["distilled_vit"]()
    result = swap_classifier(layout.model, layer="head, head_dist")
    assert result.combine == "named" and result.layers == ("head", "head_dist")
    assert find_classifiers(HEAD_LAYOUTS["pooled_conv_head"]().model, layer="fc").heads[0].kind == "conv1x1"


def test_training_only_aux_head_is_left_alone():
    layout = HEAD_LAYOUTS["aux_training_head"]()
    aux = layout.model.aux[2]
    swap_classifier(layout.model, input_shape=layout.input_shape)
    assert layout.model.aux[2] is aux and isinstance(layout.model.fc, HadamardHead)


def test_failed_swap_leaves_the_model_as_it_was():
    layout = HEAD_LAYOUTS["pooled_conv_head"]()
    conv = layout.model.fc
    with pytest.raises(HeadError, match="power of two"):
        swap_classifier(layout.model, input_shape=layout.input_shape, hadamard_size=1000)
    assert layout.model.fc is conv
    with pytest.raises(HeadError) as info:  # features of the wrong width: e.g. captured at the conv itself
        swap_classifier(layout.model, input_shape=layout.input_shape, features=torch.randn(6, 1))
    assert str(info.value) == ("the features for 'fc' have shape (6, 1), its classifier takes (S, 16); capture them "
                               "with capture_features at 'fc.head', or pass the model inputs instead")
    assert layout.model.fc is conv


def test_one_feature_tensor_for_several_heads_is_refused():
    layout = HEAD_LAYOUTS["distilled_vit"]()
    with pytest.raises(HeadError, match=r"one feature tensor for 2 classifier layers \(head, head_dist\)"):
        swap_classifier(layout.model, input_shape=layout.input_shape, features=torch.randn(4, 16))
    assert isinstance(layout.model.head, nn.Linear)


def test_describe():
    layout = HEAD_LAYOUTS["distilled_vit"]()
    found = find_classifiers(layout.model, input_shape=layout.input_shape)
    assert found.describe() == "head, head_dist (2 nn.Linear, averaged; found by forward pass)"
    found = find_classifiers(HEAD_LAYOUTS["pooled_conv_head"]().model, input_shape=(3, 8, 8))
    assert found.describe() == "fc (1x1 Conv2d; found by forward pass)"


# ---------------------------------------------------------------------------------------------- errors


def test_single_linear_api_refuses_other_layouts():
    layout = HEAD_LAYOUTS["distilled_vit"]()
    message = not_found_message(find_classifier, layout.model, input_shape=layout.input_shape)
    assert message == ("the classifier is head, head_dist (2 nn.Linear, averaged; found by forward pass), not one "
                       "nn.Linear; swap it with swap_classifier, or pass --layer NAME to choose one nn.Linear")
    assert find_classifier(layout.model, layer="head_dist")[0] == "head_dist"


def test_error_feature_extractor():
    model = NO_CLASSIFIER["feature_extractor"]().model
    assert not_found_message(find_classifiers, model) == (
        "the model has no classifier: get_classifier() returns an Identity, so it is a feature extractor; build it "
        "with its classes (e.g. num_classes > 0) or pass --layer NAME")
    model = NO_CLASSIFIER["identity_classifier"]().model
    assert not_found_message(find_classifiers, model, input_shape=(3, 8, 8)) == (
        "the model has no classifier; the last layer run is 'classifier' (Identity), so it is a feature extractor; "
        "build it with its classes (e.g. num_classes > 0) or pass --layer NAME")


def test_error_concatenated_heads():
    model = NO_CLASSIFIER["concat_heads"]().model
    assert not_found_message(swap_classifier, model, input_shape=(3, 8, 8)) == (
        "the model's output concatenates the outputs of coarse, fine; fyc-convert swaps a classifier whose output "
        "is the logits, or several whose outputs are averaged; pass --layer NAME to swap one")
    assert isinstance(model.coarse, nn.Linear)


def test_error_tuple_of_heads_is_still_a_choice():
    layout = BAD_LAYOUTS["two_heads"]()
    assert not_found_message(find_classifiers, layout.model, input_shape=layout.input_shape).startswith(
        "2 nn.Linear layers make the model's outputs: head_a, head_b")


def test_error_get_classifier_pair_without_input_shape():
    assert not_found_message(find_classifiers, HEAD_LAYOUTS["distilled_vit"]().model) == (
        "finding the classifier needs one forward pass (get_classifier() returns 2 layers (head, head_dist), and "
        "how they combine is checked by it) but the input shape is unknown; pass --input-shape (one sample, e.g. "
        "3,224,224) or --layer NAME")


def test_error_layer_of_different_class_counts():
    assert not_found_message(find_classifiers, BAD_LAYOUTS["two_heads"]().model, layer="head_a,head_b") == (
        "--layer names classifiers of different class counts: head_a (10), head_b (3); swap layers of the same "
        "classes together, or pass one")
    assert not_found_message(find_classifiers, BAD_LAYOUTS["two_heads"]().model, layer="head_a,head_a").startswith(
        "--layer names 'head_a' twice")


def test_error_strided_conv_is_not_a_classifier():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    message = not_found_message(find_classifiers, model, layer="0")
    assert message.startswith("--layer '0' is a Conv2d, not an nn.Linear (only a Linear classifier, or a 1x1 Conv2d "
                              "on pooled")


# ---------------------------------------------------------------------------------------------- input shape


def test_guess_input_shape_for_a_pooled_conv_net():
    shape, how = guess_input_shape(LAYOUTS["resnet_fc"]().model)
    assert shape == (3, 224, 224)
    assert how == ("guessed: 3 channels from the first conv 'stem.0', 224x224 for a conv net with global pooling "
                   "('avgpool') (pass --input-shape to override)")
    assert guess_input_shape(HEAD_LAYOUTS["pooled_conv_head"]().model)[0] == (3, 224, 224)


def test_guess_input_shape_from_a_patch_embedding():
    model = VitHead(10, 16)  # its position-free tokens run at any size; the embedding's image size wins
    model.blocks.patch_embed.img_size = (16, 16)
    shape, how = guess_input_shape(model)
    assert shape == (3, 16, 16) and "16x16 from the patch embedding's image size" in how


def test_guess_input_shape_for_an_mlp():
    model = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))
    assert guess_input_shape(model) == ((7,), "guessed: 7 features from the first layer '0' (nn.Linear) (pass "
                                               "--input-shape to override)")


def test_guess_input_shape_gives_up():
    assert guess_input_shape(FlattenedMapClassifier()) is None  # no global pooling: 224x224 does not fit its Linear
    assert guess_input_shape(nn.Sequential(nn.Conv1d(2, 3, 1))) is None


def test_guess_input_shape_for_functional_pooling():
    layout = LAYOUTS["shufflenet_fc"]()  # x.mean([2, 3]): no pooling module, but it runs at any size
    shape, how = guess_input_shape(layout.model)
    assert shape == (3, 224, 224) and "global pooling (it runs at 224 and 192)" in how


@pytest.mark.parametrize("name", ["pooled_conv_head", "squeezed_conv_head"])
def test_conv_wrapper_exports_with_the_marker_on_its_inner_head(tmp_path, name):
    from fyc_convert.export.onnx_export import export_onnx
    from fyc_convert.export.verify import verify_onnx

    layout = HEAD_LAYOUTS[name]()
    swap = swap_classifier(layout.model, input_shape=layout.input_shape, inputs=_inputs(layout.input_shape))
    res = export_onnx(layout.model, tmp_path / "m.onnx", input_shape=layout.input_shape, head_layer=swap.layer)
    assert res.head_kind == "hadamard" and "MatMul" not in res.head_ops and "Gemm" not in res.head_ops
    ver = verify_onnx(res.path, layout.model, input_shape=layout.input_shape)  # raises beyond tolerance
    assert ver.max_abs_diff < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_swap_of_a_conv_head_and_a_distilled_pair_on_cuda():
    for name in ("pooled_conv_head", "distilled_vit"):
        layout = HEAD_LAYOUTS[name]()
        model = layout.model.cuda()
        x = _inputs(layout.input_shape)
        result = swap_classifier(model, input_shape=layout.input_shape, inputs=x)  # CPU inputs follow the model
        assert all(t.device.type == "cuda" for s in result.heads for t in s.head.state_dict().values())
        with torch.no_grad():
            assert logits_of(model(x.cuda())).shape == (6, layout.num_classes)


def test_get_classifier_returning_a_module_list_of_branch_heads():
    # crossvit: get_classifier() returns the ModuleList of its branch heads, which are averaged; every one of
    # them is a classifier (not one MLP head whose last Linear alone would be swapped)
    from models import AveragedBranchHeads

    class BranchHeadsWithGetter(AveragedBranchHeads):
        def get_classifier(self) -> nn.Module:
            return self.heads

    torch.manual_seed(0)
    model = BranchHeadsWithGetter(6, (12, 16, 12)).eval()
    found = find_classifiers(model, input_shape=(3, 16, 16))
    assert found.names == ("heads.0", "heads.1", "heads.2")
    assert found.combine == HEAD_LAYOUTS["averaged_branch_heads"]().combine
    swapped = swap_classifier(copy.deepcopy(model), input_shape=(3, 16, 16), inputs=_inputs((3, 16, 16)))
    assert len(swapped.heads) == 3 and all(isinstance(h.head, HadamardHead) for h in swapped.heads)

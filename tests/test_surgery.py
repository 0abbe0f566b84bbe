import copy

import pytest
import torch
from models import BAD_LAYOUTS, LAYOUTS, ResNetFc, head_math, hooked_inputs, logits_of, not_found_message
from torch import Tensor, nn

from fyc_convert.errors import HeadError
from fyc_convert.head.heads import HadamardHead, OrthogonalHead
from fyc_convert.model.surgery import capture_features, count_params, find_classifier, swap_classifier


def _inputs(shape: tuple[int, ...], batch: int = 5) -> Tensor:
    return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", LAYOUTS)
def test_find_classifier_by_forward_pass(name):
    layout = LAYOUTS[name]()
    layer, linear = find_classifier(layout.model, input_shape=layout.input_shape)
    assert layer == layout.layer
    assert linear is layout.model.get_submodule(layout.layer)
    assert (linear.in_features, linear.out_features) == (layout.in_features, layout.num_classes)


@pytest.mark.parametrize("name", LAYOUTS)
def test_swap_matches_head_math_on_original_features(name):
    layout = LAYOUTS[name]()
    model = layout.model
    original = copy.deepcopy(model)
    linear = model.get_submodule(layout.layer)
    x = _inputs(layout.input_shape)
    feats = hooked_inputs(original, layout.layer, x)

    result = swap_classifier(model, input_shape=layout.input_shape, features=feats)

    assert result.model is model
    assert result.layer == layout.layer
    assert model.get_submodule(layout.layer) is result.head
    assert isinstance(result.head, HadamardHead)
    assert result.original_head is linear
    assert (result.in_features, result.num_classes) == (layout.in_features, layout.num_classes)
    with torch.no_grad():
        out = logits_of(model(x)).double().reshape(-1, layout.num_classes)  # (S, C)
    torch.testing.assert_close(out, head_math(result.head, feats), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", LAYOUTS)
def test_param_counts_are_exact(name):
    layout = LAYOUTS[name]()
    n, c = layout.in_features, layout.num_classes
    has_bias = layout.model.get_submodule(layout.layer).bias is not None
    total = sum(p.numel() for p in layout.model.parameters())

    p = swap_classifier(layout.model, layer=layout.layer).params

    head_before = n * c + (c if has_bias else 0)
    head_after = 1 + c  # learned alpha + bias
    assert p.original == total
    assert p.head_before == head_before
    assert p.head_after == head_after
    assert p.converted == total - head_before + head_after
    assert p.removed == head_before - head_after
    assert p.removed_pct == pytest.approx(100 * (head_before - head_after) / total)
    assert p.trainable == p.converted


def test_param_counts_without_bias_and_with_fixed_scale():
    layout = LAYOUTS["resnet_fc"]()
    total = sum(p.numel() for p in layout.model.parameters())
    p = swap_classifier(layout.model, layer="fc", bias=False, fixed_scale=4.0).params
    assert (p.head_before, p.head_after) == (16 * 10 + 10, 0)
    assert p.removed == 170
    assert p.converted == p.trainable == total - 170


def test_frozen_backbone_counts_only_trainable_params():
    layout = LAYOUTS["resnet_fc"]()
    for p in layout.model.stem.parameters():
        p.requires_grad_(False)
    frozen = sum(p.numel() for p in layout.model.stem.parameters())
    p = swap_classifier(layout.model, layer="fc").params
    assert p.trainable == p.converted - frozen


class _StandIn(nn.Module):
    """A model of exactly `total` parameters whose classifier is an n -> c Linear (backbone on the meta device)."""

    def __init__(self, total: int, n: int, c: int):
        super().__init__()
        self.backbone = nn.Parameter(torch.empty(total - n * c - c, device="meta"))
        self.fc = nn.Linear(n, c)


@pytest.mark.parametrize(
    ("total", "n", "c", "pct"),
    [
        (25_557_032, 2048, 1000, 8.01),  # ResNet-50
        (14_149_480, 1664, 1000, 11.76),  # DenseNet-169
        (1_826_555, 960, 1000, 52.56),  # ShuffleNet
    ],
)
def test_removed_share_reproduces_table_1(total, n, c, pct):
    torch.manual_seed(0)
    p = swap_classifier(_StandIn(total, n, c), layer="fc").params
    assert p.original == total
    assert p.removed == n * c - 1  # weights fixed, one learned scale added, bias kept
    assert round(p.removed_pct, 2) == pct


def test_orthogonal_head_matcheshead_math():
    layout = LAYOUTS["vit_head"]()
    x = _inputs(layout.input_shape)
    feats = hooked_inputs(copy.deepcopy(layout.model), "head", x)
    result = swap_classifier(layout.model, head="orthogonal", input_shape=layout.input_shape, features=feats)
    assert isinstance(result.head, OrthogonalHead)
    assert result.params.head_after == 1 + layout.num_classes
    with torch.no_grad():
        out = layout.model(x).double()
    torch.testing.assert_close(out, head_math(result.head, feats), rtol=1e-5, atol=1e-5)


def test_unknown_head_kind():
    with pytest.raises(HeadError, match="unknown head 'dense'; use one of: hadamard, orthogonal"):
        swap_classifier(LAYOUTS["resnet_fc"]().model, head="dense", layer="fc")


def _mlp() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 10))


def test_swap_with_a_chosen_transform_size():
    # 64 features, 10 classes: from_linear's default is a 64-point transform; 16 folds the features 4 to 1
    assert swap_classifier(_mlp(), layer="2").head.hadamard_size == 64
    model = _mlp()
    head = swap_classifier(model, layer="2", hadamard_size=16).head
    assert model[2] is head and (head.hadamard_size, head.embed_size) == (16, 64)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    want = head.scale * nn.functional.normalize(x, dim=1, eps=0.0) @ head.class_vectors().T + head.bias
    assert torch.allclose(head(x), want, atol=1e-5)
    with pytest.raises(HeadError, match="power of two"):
        swap_classifier(_mlp(), layer="2", hadamard_size=1000)
    with pytest.raises(HeadError, match="hadamard head only"):
        swap_classifier(_mlp(), head="orthogonal", layer="2", hadamard_size=16)


def test_swap_keeps_class_order():
    # a classifier whose rows are (permuted) Hadamard class vectors must get exactly those rows, class by class
    layout = LAYOUTS["densenet_classifier"]()
    linear = layout.model.classifier
    vectors = HadamardHead.from_linear(linear).class_vectors()  # (C, N), distinct
    perm = torch.randperm(layout.num_classes, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        linear.weight.copy_(0.25 * vectors[perm])
    result = swap_classifier(layout.model, layer="classifier")
    assert torch.equal(result.head.class_vectors(), vectors[perm])


def test_swap_replaces_by_identity_and_leaves_other_linears():
    layout = LAYOUTS["vgg_classifier6"]()
    modules_before = dict(layout.model.named_modules())
    result = swap_classifier(layout.model, input_shape=layout.input_shape)
    assert result.layer == "classifier.6"
    for name, module in layout.model.named_modules():
        if name == "classifier.6":
            assert module is result.head
        elif name in modules_before:
            assert module is modules_before[name]
    assert isinstance(layout.model.classifier[0], nn.Linear) and isinstance(layout.model.classifier[3], nn.Linear)


def test_shared_classifier_is_replaced_everywhere():
    model = ResNetFc()
    model.aux = nn.ModuleList([model.fc])  # the same Linear held twice
    result = swap_classifier(model, layer="fc")
    assert model.fc is result.head and model.aux[0] is result.head


def test_head_keeps_training_mode_and_find_restores_modes():
    layout = LAYOUTS["resnet_fc"]()
    layout.model.train()
    layout.model.stem[1].eval()  # a frozen BatchNorm stays frozen
    find_classifier(layout.model, input_shape=layout.input_shape)
    assert layout.model.training and layout.model.fc.training and not layout.model.stem[1].training
    result = swap_classifier(layout.model, layer="fc")
    assert result.head.training


def test_get_classifier_needs_no_forward_pass():
    layout = LAYOUTS["timm_style"]()
    assert find_classifier(layout.model) == ("head.fc", layout.model.head.fc)


def test_get_classifier_returning_non_linear_falls_back_to_forward_pass():
    layout = LAYOUTS["resnet_fc"]()
    layout.model.get_classifier = lambda: nn.Identity()
    assert find_classifier(layout.model, input_shape=layout.input_shape)[0] == "fc"


def test_layer_option_wins_and_accepts_brackets():
    layout = LAYOUTS["mobilenet_classifier1"]()
    name, linear = find_classifier(layout.model, layer="classifier[1]")
    assert name == "classifier.1" and linear is layout.model.classifier[1]


def test_layer_option_resolves_two_heads():
    layout = BAD_LAYOUTS["two_heads"]()
    result = swap_classifier(layout.model, layer=layout.layer)
    assert result.layer == "head_a" and layout.model.head_a is result.head
    assert isinstance(layout.model.head_b, nn.Linear)


def test_example_input_instead_of_shape():
    layout = LAYOUTS["seq_linear"]()
    assert find_classifier(layout.model, example=_inputs((3, 6)))[0] == "lm_head"


def test_capture_features_matches_hook_and_flattens_tokens():
    layout = LAYOUTS["seq_linear"]()
    layout.model.train()
    x = _inputs(layout.input_shape, batch=9)
    feats = capture_features(layout.model, "lm_head", x, batch_size=4)
    assert feats.shape == (9 * 7, 16)
    assert layout.model.training
    layout.model.eval()
    torch.testing.assert_close(feats, hooked_inputs(layout.model, "lm_head", x))


def test_count_params_counts_shared_once():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[1].weight = model[0].weight
    assert count_params(model) == 9 + 3 + 3


# ---------------------------------------------------------------------------------------------- errors


def test_error_layer_does_not_exist():
    message = not_found_message(find_classifier, LAYOUTS["vgg_classifier6"]().model, layer="classifier.9")
    assert message == ("--layer 'classifier.9' does not exist in the model; nn.Linear layers: classifier.0, "
                       "classifier.3, classifier.6; pass the classifier with --layer NAME")


def test_error_layer_is_not_linear():
    message = not_found_message(find_classifier, LAYOUTS["mobilenet_classifier1"]().model, layer="classifier")
    assert message.startswith("--layer 'classifier' is a Sequential, not an nn.Linear")
    assert message.endswith("nn.Linear layers: classifier.1; pass the classifier with --layer NAME")


def test_error_conv_classifier_names_candidates():
    layout = BAD_LAYOUTS["conv1x1_classifier"]()
    message = not_found_message(find_classifier, layout.model, input_shape=layout.input_shape)
    assert message == ("no nn.Linear makes the model's output; the last layer run is 'classifier' (Conv2d), a 1x1 "
                       "conv applied to 4x4 maps before the pooling (only a 1x1 Conv2d on pooled (B, N, 1, 1) "
                       "features can be swapped); nn.Linear layers: se.fc1, se.fc2; pass the classifier with --layer "
                       "NAME")


def test_error_two_heads():
    layout = BAD_LAYOUTS["two_heads"]()
    message = not_found_message(find_classifier, layout.model, input_shape=layout.input_shape)
    assert message == "2 nn.Linear layers make the model's outputs: head_a, head_b; pass --layer NAME to choose " \
                      "the classifier"


def test_error_no_linear_at_the_output():
    layout = BAD_LAYOUTS["no_linear_output"]()
    message = not_found_message(swap_classifier, layout.model, input_shape=layout.input_shape)
    assert "the last layer run is 'proj' (Linear), whose output is changed afterwards" in message
    assert message.endswith("nn.Linear layers: proj; pass the classifier with --layer NAME")
    assert isinstance(layout.model.proj, nn.Linear)  # nothing swapped


def test_error_no_linear_at_all():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    message = not_found_message(find_classifier, model, input_shape=(3, 4, 4))
    assert message.startswith("the model has no nn.Linear layer to swap")


def test_error_missing_input_shape():
    message = not_found_message(find_classifier, LAYOUTS["resnet_fc"]().model)
    assert "pass --input-shape" in message


def test_error_wrong_input_shape():
    message = not_found_message(find_classifier, LAYOUTS["resnet_fc"]().model, input_shape=(1, 8, 8))
    assert message.startswith("running the model on an input of shape (2, 1, 8, 8) to find the classifier failed")
    assert "pass the right --input-shape" in message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_swap_on_cuda_model():
    layout = LAYOUTS["convnext_head_fc"]()
    model = layout.model.cuda()
    x = _inputs(layout.input_shape)
    feats = capture_features(model, "head.fc", x)  # CPU inputs follow the model to the GPU
    assert feats.device.type == "cuda"
    result = swap_classifier(model, input_shape=layout.input_shape, features=feats)
    assert result.layer == "head.fc"
    assert all(t.device.type == "cuda" for t in result.head.state_dict().values())
    with torch.no_grad():
        out = model(x.cuda()).double()
    torch.testing.assert_close(out, head_math(result.head, feats), rtol=1e-4, atol=1e-4)

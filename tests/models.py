"""A zoo of tiny seeded classifiers, one per real-world classifier layout (our own code, no torchvision/timm).

`LAYOUTS[name]()` builds a `Layout`: the model (eval mode), the dotted name of its classifier, the shape of
one input sample and the classifier's sizes. `BAD_LAYOUTS` are models whose classifier cannot be found
automatically (their `layer` is the `--layer` that makes them work, or "" when none does).

Import under pytest with `from models import LAYOUTS` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fyc_convert.errors import ClassifierNotFoundError
from fyc_convert.model.surgery import logits_of  # noqa: F401  (re-exported for the tests)


def head_math(head: nn.Module, feats: Tensor) -> Tensor:
    """The reference of a swapped head: alpha * V x_hat + b from docs/design.md, in float64, (S, N) -> (S, C)."""
    x = feats.double()
    x_hat = x / (x.norm(dim=-1, keepdim=True) + 1e-8)
    logits = head.scale.detach().double() * x_hat @ head.class_vectors().double().T  # (S, C)
    return logits + head.bias.detach().double() if head.bias is not None else logits


def hooked_inputs(model: nn.Module, layer: str, x: Tensor) -> Tensor:
    """What `layer` sees on x, as (S, N) rows, captured with our own hook (independent of capture_features):
    a pooled conv's (B, N, 1, 1) input flattened, any other input's last axis as the features."""
    seen = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    f = seen[0]
    return f.flatten(1) if f.dim() == 4 else f.reshape(-1, f.shape[-1])


def not_found_message(call: Callable, *args, **kwargs) -> str:
    """The one-line message of the ClassifierNotFoundError that call(*args, **kwargs) raises."""
    import pytest

    with pytest.raises(ClassifierNotFoundError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@dataclass
class Layout:
    model: nn.Module  # seeded, eval mode
    layer: str  # dotted name of the classifier ("" in BAD_LAYOUTS when no --layer fixes it); HEAD_LAYOUTS: name[,name]
    input_shape: tuple[int, ...]  # one sample, no batch dim
    in_features: int
    num_classes: int
    combine: str = "single"  # HEAD_LAYOUTS: how the classifier layers make the logits ("single", "mean", "sum")


@dataclass
class ClassifierOutput:
    """What HuggingFace-style models return: an object with `.logits`."""

    logits: Tensor
    features: Tensor


def _stem(in_ch: int, width: int) -> nn.Sequential:
    # (B, in_ch, H, W) -> (B, width, H/2, W/2)
    return nn.Sequential(
        nn.Conv2d(in_ch, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
    )


def _seeded(build: Callable[[], Layout]) -> Callable[[], Layout]:
    def wrapper() -> Layout:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            layout = build()
            # non-trivial BatchNorm statistics so eval mode is not an identity
            for m in layout.model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 1.5)
        layout.model.eval()
        return layout

    return wrapper


# ---------------------------------------------------------------- CNNs with a global pool and one Linear


class ResNetFc(nn.Module):
    """torchvision ResNet: ... -> avgpool -> flatten -> .fc"""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = _stem(3, width)
        self.layer1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = F.relu(x + self.layer1(x))  # residual
        return self.fc(torch.flatten(self.avgpool(x), 1))  # (B, C)


class ShuffleNetFc(nn.Module):
    """torchvision ShuffleNetV2: ... -> conv5 -> x.mean([2, 3]) -> .fc"""

    def __init__(self, num_classes: int = 12, width: int = 24):
        super().__init__()
        self.conv1 = _stem(3, 8)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv5 = nn.Sequential(nn.Conv2d(8, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv5(self.maxpool(self.conv1(x)))
        return self.fc(x.mean([2, 3]))


class DenseNetClassifier(nn.Module):
    """torchvision DenseNet: features -> relu -> pool -> flatten -> .classifier"""

    def __init__(self, num_classes: int = 7, width: int = 20):
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(conv0=nn.Conv2d(3, width, 3, padding=1), norm5=nn.BatchNorm2d(width))
        )
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.features(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)
        return self.classifier(x)


class MobileNetClassifier1(nn.Module):
    """torchvision MobileNetV2: .classifier = Sequential(Dropout, Linear)"""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(_stem(3, 8), nn.Conv2d(8, width, 1), nn.ReLU6())
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(width, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


class EfficientNetClassifier1(nn.Module):
    """torchvision EfficientNet: avgpool -> flatten -> .classifier = Sequential(Dropout(inplace), Linear)"""

    def __init__(self, num_classes: int = 9, width: int = 40):
        super().__init__()
        self.features = nn.Sequential(_stem(3, 16), nn.Conv2d(16, width, 1), nn.BatchNorm2d(width), nn.SiLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=0.3, inplace=True), nn.Linear(width, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class VggClassifier6(nn.Module):
    """torchvision VGG: .classifier = Sequential(Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear)"""

    def __init__(self, num_classes: int = 10, hidden: int = 24):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Linear(4 * 2 * 2, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, num_classes),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ---------------------------------------------------------------- token models: Linear layers see (B, T, N)


class _TokenBackbone(nn.Module):
    """Patch embedding + one pre-norm MLP block: (B, 3, H, W) -> tokens (B, T, dim)."""

    def __init__(self, dim: int, patch: int = 4):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, T, dim)
        return x + self.mlp(self.norm1(x))


class VitHead(nn.Module):
    """timm ViT: cls token, blocks, norm, pool (token 0) -> .head"""

    def __init__(self, num_classes: int = 10, dim: int = 16):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.blocks = _TokenBackbone(dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(x)  # (B, T, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.head(self.norm(x)[:, 0])  # (B, C)


class VitHeadsHead(nn.Module):
    """torchvision ViT: encoder -> x[:, 0] -> .heads = Sequential(OrderedDict(head=Linear))"""

    def __init__(self, num_classes: int = 6, dim: int = 16):
        super().__init__()
        self.encoder = _TokenBackbone(dim)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(dim, num_classes)))

    def forward(self, x: Tensor) -> Tensor:
        return self.heads(self.encoder(x)[:, 0])


class _NormMlpHead(nn.Module):
    """timm ConvNeXt head: global pool -> LayerNorm -> flatten -> drop -> .fc"""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.norm = nn.LayerNorm(dim)
        self.flatten = nn.Flatten(1)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.global_pool(x).permute(0, 2, 3, 1)  # (B, 1, 1, dim)
        x = self.flatten(self.norm(x))
        return self.fc(self.drop(x))


class ConvNextHeadFc(nn.Module):
    """timm ConvNeXt: stem, stages -> .head.fc"""

    def __init__(self, num_classes: int = 10, dim: int = 24):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.stages = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, groups=dim), nn.GELU())
        self.head = _NormMlpHead(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)))


class SwinHead(nn.Module):
    """torchvision Swin: features (B, H, W, dim) -> norm -> permute -> avgpool -> flatten -> .head"""

    def __init__(self, num_classes: int = 8, dim: int = 12):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, dim, 4, stride=4))
        self.norm = nn.LayerNorm(dim)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.features(x).permute(0, 2, 3, 1))  # (B, H, W, dim)
        x = torch.flatten(self.avgpool(x.permute(0, 3, 1, 2)), 1)
        return self.head(x)


class SeqLinear(nn.Module):
    """A per-token classifier: the Linear sees (B, T, N) and its (B, T, C) output is the model output."""

    def __init__(self, num_classes: int = 5, feat: int = 6, dim: int = 16):
        super().__init__()
        self.embed = nn.Linear(feat, dim)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.lm_head(self.norm(F.gelu(self.embed(x))))  # (B, T, C)


# ---------------------------------------------------------------- other output conventions


class NoBiasHead(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(_stem(3, width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(width, num_classes, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x))


class TupleOutput(nn.Module):
    """Returns (logits, features)."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(_stem(3, width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.body(x)
        return self.classifier(feats), feats


class DictOutput(nn.Module):
    """Returns {"features": ..., "logits": ...}."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(_stem(3, width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = self.body(x)
        return {"features": feats, "logits": self.out(feats)}


class LogitsObjectOutput(nn.Module):
    """Returns an object with `.logits` (HuggingFace style)."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(_stem(3, width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.score = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> ClassifierOutput:
        feats = self.body(x)
        return ClassifierOutput(logits=self.score(feats), features=feats)


class TimmStyle(nn.Module):
    """timm convention: `get_classifier()` names the classifier (found without a forward pass)."""

    def __init__(self, num_classes: int = 10, dim: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.head = _NormMlpHead(dim, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def forward_features(self, x: Tensor) -> Tensor:
        return F.gelu(self.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


# ---------------------------------------------------------------- layouts without an automatic answer


class _SqueezeExcite(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.fc1 = nn.Linear(ch, ch // 2)
        self.fc2 = nn.Linear(ch // 2, ch)

    def forward(self, x: Tensor) -> Tensor:
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean([2, 3])))))  # (B, ch)
        return x * w[:, :, None, None]


class Conv1x1Classifier(nn.Module):
    """SqueezeNet style: a 1x1 conv makes the class maps, then a global pool. Linear layers exist (in SE)."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = _stem(3, width)
        self.se = _SqueezeExcite(width)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.classifier(self.se(self.stem(x)))  # (B, C, h, w)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class TwoHeads(nn.Module):
    """Two Linear heads whose outputs are both returned."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(_stem(3, width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head_a = nn.Linear(width, num_classes)
        self.head_b = nn.Linear(width, 3)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.body(x)
        return self.head_a(feats), self.head_b(feats)


class NoLinearOutput(nn.Module):
    """An embedding model: the last Linear is followed by L2 normalisation, so no Linear makes the output."""

    def __init__(self, dim: int = 8, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(_stem(3, width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.proj = nn.Linear(width, dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.proj(self.body(x)), dim=-1)


# ---------------------------------------------------------------- more head layouts (HEAD_LAYOUTS)


class DistilledVit(nn.Module):
    """timm VisionTransformerDistilled (DeiT): class and distillation tokens, `.head` and `.head_dist` averaged in
    eval mode (both returned in distilled training); get_classifier() returns the pair."""

    def __init__(self, num_classes: int = 10, dim: int = 16):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.dist_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.blocks = _TokenBackbone(dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.head_dist = nn.Linear(dim, num_classes)
        self.distilled_training = False

    def get_classifier(self) -> tuple[nn.Module, nn.Module]:
        return self.head, self.head_dist

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        x = self.blocks(x)  # (B, T, dim)
        b = x.shape[0]
        x = self.norm(torch.cat([self.cls_token.expand(b, -1, -1), self.dist_token.expand(b, -1, -1), x], dim=1))
        logits, dist = self.head(x[:, 0]), self.head_dist(x[:, 1])  # (B, C) each
        if self.distilled_training and self.training:
            return logits, dist
        return (logits + dist) / 2


class AveragedBranchHeads(nn.Module):
    """A multi-branch model: each branch pools its own features, `.heads` (a ModuleList) are averaged."""

    def __init__(self, num_classes: int = 6, widths: tuple[int, ...] = (12, 16, 12)):
        super().__init__()
        self.branches = nn.ModuleList(nn.Sequential(_stem(3, w), nn.AdaptiveAvgPool2d(1), nn.Flatten()) for w in widths)
        self.heads = nn.ModuleList(nn.Linear(w, num_classes) for w in widths)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([h(b(x)) for b, h in zip(self.branches, self.heads, strict=True)]).mean(0)  # (B, C)


class SummedHeads(nn.Module):
    """Two heads on different features whose logits are added (a global and a local classifier)."""

    def __init__(self, num_classes: int = 5, width: int = 16):
        super().__init__()
        self.stem = _stem(3, width)
        self.global_fc = nn.Linear(width, num_classes)
        self.local_fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        return self.global_fc(x.mean([2, 3])) + self.local_fc(x.amax([2, 3]))


class PooledConvHead(nn.Module):
    """timm ClassifierHead(use_conv=True) (DLA, DPN, ...): global pool keeping (B, N, 1, 1) -> 1x1 conv -> flatten."""

    def __init__(self, num_classes: int = 10, width: int = 16, bias: bool = True):
        super().__init__()
        self.stem = _stem(3, width)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(width, num_classes, 1, bias=bias)
        self.flatten = nn.Flatten(1)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: Tensor) -> Tensor:
        return self.flatten(self.fc(self.global_pool(self.stem(x))))  # (B, C)


class SqueezedConvHead(nn.Module):
    """A pooled 1x1 conv classifier inside a head module, squeezed with .squeeze(-1).squeeze(-1)."""

    def __init__(self, num_classes: int = 7, width: int = 12):
        super().__init__()
        self.features = nn.Sequential(_stem(3, width), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d((1, 1)), nn.Dropout(0.2), nn.Conv2d(width, num_classes, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x)).squeeze(-1).squeeze(-1)


class MlpHeadModule(nn.Module):
    """get_classifier() returns the whole MLP head, a Sequential ending in Linear (then Dropout)."""

    def __init__(self, num_classes: int = 9, width: int = 16, hidden: int = 24):
        super().__init__()
        self.body = nn.Sequential(_stem(3, width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, num_classes),
                                  nn.Dropout(0.0))

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class ModuleDictHead(nn.Module):
    """get_classifier() returns a ModuleDict head: pre_logits Linear, activation, then the classifier `fc`."""

    def __init__(self, num_classes: int = 8, width: int = 16, hidden: int = 20):
        super().__init__()
        self.body = nn.Sequential(_stem(3, width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.ModuleDict({"pre_logits": nn.Linear(width, hidden), "act": nn.Tanh(),
                                   "fc": nn.Linear(hidden, num_classes)})

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: Tensor) -> Tensor:
        h = self.head
        return h["fc"](h["act"](h["pre_logits"](self.body(x))))


class AuxTrainingHead(nn.Module):
    """Inception style: an auxiliary classifier used in training only; in eval the output is `.fc`'s alone."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = _stem(3, width)
        self.aux = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        x = self.stem(x)
        logits = self.fc(x.mean([2, 3]))
        return (logits, self.aux(x)) if self.training else logits


class FeatureExtractor(nn.Module):
    """timm with num_classes=0: `.head` is an Identity and get_classifier() returns it."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(_stem(3, width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class IdentityClassifier(nn.Module):
    """A Hugging Face model built with num_labels=0: `.classifier` is an Identity (no get_classifier())."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(_stem(3, width), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, width))
        self.norm = nn.LayerNorm(width)
        self.classifier = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.norm(self.body(x)))


class ConcatHeads(nn.Module):
    """Two heads whose outputs are concatenated into the logits: not a combination that can be swapped as one."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(_stem(3, width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.coarse = nn.Linear(width, 4)
        self.fine = nn.Linear(width, 6)

    def forward(self, x: Tensor) -> Tensor:
        f = self.body(x)
        return torch.cat([self.coarse(f), self.fine(f)], dim=1)


class FlattenedMapClassifier(nn.Module):
    """A conv net without global pooling: its Linear needs exactly 8x8 inputs (no input size can be guessed)."""

    def __init__(self, num_classes: int = 10, width: int = 4):
        super().__init__()
        self.stem = _stem(3, width)
        self.fc = nn.Linear(width * 4 * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.stem(x), 1))


def _image(model: nn.Module, layer: str, in_features: int, num_classes: int) -> Layout:
    return Layout(model, layer, (3, 8, 8), in_features, num_classes)


LAYOUTS: dict[str, Callable[[], Layout]] = {
    "resnet_fc": _seeded(lambda: _image(ResNetFc(10, 16), "fc", 16, 10)),
    "shufflenet_fc": _seeded(lambda: _image(ShuffleNetFc(12, 24), "fc", 24, 12)),
    "densenet_classifier": _seeded(lambda: _image(DenseNetClassifier(7, 20), "classifier", 20, 7)),
    "mobilenet_classifier1": _seeded(lambda: _image(MobileNetClassifier1(10, 32), "classifier.1", 32, 10)),
    "efficientnet_classifier1": _seeded(lambda: _image(EfficientNetClassifier1(9, 40), "classifier.1", 40, 9)),
    "vgg_classifier6": _seeded(lambda: _image(VggClassifier6(10, 24), "classifier.6", 24, 10)),
    "vit_head": _seeded(lambda: _image(VitHead(10, 16), "head", 16, 10)),
    "vit_heads_head": _seeded(lambda: _image(VitHeadsHead(6, 16), "heads.head", 16, 6)),
    "convnext_head_fc": _seeded(lambda: _image(ConvNextHeadFc(10, 24), "head.fc", 24, 10)),
    "swin_head": _seeded(lambda: _image(SwinHead(8, 12), "head", 12, 8)),
    "no_bias_head": _seeded(lambda: _image(NoBiasHead(10, 16), "fc", 16, 10)),
    "seq_linear": _seeded(lambda: Layout(SeqLinear(5, 6, 16), "lm_head", (7, 6), 16, 5)),
    "tuple_output": _seeded(lambda: _image(TupleOutput(10, 16), "classifier", 16, 10)),
    "dict_output": _seeded(lambda: _image(DictOutput(10, 16), "out", 16, 10)),
    "logits_object_output": _seeded(lambda: _image(LogitsObjectOutput(10, 16), "score", 16, 10)),
    "timm_style": _seeded(lambda: _image(TimmStyle(10, 16), "head.fc", 16, 10)),
}

BAD_LAYOUTS: dict[str, Callable[[], Layout]] = {
    "conv1x1_classifier": _seeded(lambda: _image(Conv1x1Classifier(10, 16), "", 16, 10)),
    "two_heads": _seeded(lambda: _image(TwoHeads(10, 16), "head_a", 16, 10)),
    "no_linear_output": _seeded(lambda: _image(NoLinearOutput(8, 16), "proj", 16, 8)),
}

# Layouts beyond one Linear at the output: several heads (layer "a,b", combine "mean"/"sum"), pooled 1x1 conv
# classifiers, MLP head modules named by get_classifier(), training-only auxiliary heads.
HEAD_LAYOUTS: dict[str, Callable[[], Layout]] = {
    "distilled_vit": _seeded(lambda: Layout(DistilledVit(10, 16), "head,head_dist", (3, 8, 8), 16, 10, "mean")),
    "averaged_branch_heads": _seeded(lambda: Layout(AveragedBranchHeads(6, (12, 16, 12)), "heads.0,heads.1,heads.2",
                                                    (3, 8, 8), 12, 6, "mean")),
    "summed_heads": _seeded(lambda: Layout(SummedHeads(5, 16), "global_fc,local_fc", (3, 8, 8), 16, 5, "sum")),
    "pooled_conv_head": _seeded(lambda: _image(PooledConvHead(10, 16), "fc", 16, 10)),
    "pooled_conv_head_no_bias": _seeded(lambda: _image(PooledConvHead(12, 16, bias=False), "fc", 16, 12)),
    "squeezed_conv_head": _seeded(lambda: _image(SqueezedConvHead(7, 12), "head.2", 12, 7)),
    "mlp_head_module": _seeded(lambda: _image(MlpHeadModule(9, 16, 24), "head.3", 24, 9)),
    "module_dict_head": _seeded(lambda: _image(ModuleDictHead(8, 16, 20), "head.fc", 20, 8)),
    "aux_training_head": _seeded(lambda: _image(AuxTrainingHead(10, 16), "fc", 16, 10)),
}

# ---------------------------------------------------------------- learned heads beside "the" classifier (issue 25)


class DistillationClassifier(nn.Module):
    """A distillation classifier: two BatchNorm + Linear pairs (`.head`, `.head_dist`) averaged in eval."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.head = nn.Sequential(nn.BatchNorm1d(dim), nn.Linear(dim, num_classes))
        self.head_dist = nn.Sequential(nn.BatchNorm1d(dim), nn.Linear(dim, num_classes))

    def forward(self, x: Tensor) -> Tensor:  # (B, dim) -> (B, C)
        return (self.head(x) + self.head_dist(x)) / 2


class AveragedPairClassifier(nn.Module):
    """timm LeViT / EfficientFormer style: get_classifier() returns the whole DistillationClassifier."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(_stem(3, width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = DistillationClassifier(width, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.body(x))


class TokenAuxClassifier(VitHead):
    """Token labelling (LV-ViT style): the ViT's `.head` on the class token, `.aux_head` on every patch token, its
    logits max-reduced over the tokens, scaled by 0.5 and added in eval; get_classifier() returns `.head` only."""

    def __init__(self, num_classes: int = 10, dim: int = 16):
        super().__init__(num_classes, dim)  # the same parameters, created in the same order
        self.aux_head = nn.Linear(dim, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(x)  # (B, T, dim)
        x = self.norm(torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1))
        aux = self.aux_head(x[:, 1:])  # (B, T, C)
        return self.head(x[:, 0]) + 0.5 * aux.max(1)[0]  # (B, C)


def _seeded_bn1d(build: Callable[[], Layout]) -> Callable[[], Layout]:
    def wrapper() -> Layout:
        layout = _seeded(build)()
        with torch.random.fork_rng():
            torch.manual_seed(1)
            for m in layout.model.modules():
                if isinstance(m, nn.BatchNorm1d):  # eval-mode statistics that are not an identity
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 1.5)
        return layout

    return wrapper


# Learned heads that get_classifier() does not name on their own (layer: every class-producing Linear).
HIDDEN_HEAD_LAYOUTS: dict[str, Callable[[], Layout]] = {
    "averaged_pair_classifier": _seeded_bn1d(lambda: Layout(AveragedPairClassifier(10, 16),
                                                            "classifier.head.1,classifier.head_dist.1", (3, 8, 8),
                                                            16, 10, "mean")),
    "token_aux_classifier": _seeded(lambda: Layout(TokenAuxClassifier(10, 16), "head,aux_head", (3, 8, 8), 16, 10,
                                                   "added")),
}

# Models without a classifier that can be swapped automatically, beyond BAD_LAYOUTS.
NO_CLASSIFIER: dict[str, Callable[[], Layout]] = {
    "feature_extractor": _seeded(lambda: _image(FeatureExtractor(16), "", 16, 16)),
    "identity_classifier": _seeded(lambda: _image(IdentityClassifier(16), "", 16, 16)),
    "concat_heads": _seeded(lambda: _image(ConcatHeads(16), "coarse", 16, 4)),
}

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

from fyc_convert.surgery import logits_of  # noqa: F401  (re-exported for the tests)


@dataclass
class Layout:
    model: nn.Module  # seeded, eval mode
    layer: str  # dotted name of the classifier ("" in BAD_LAYOUTS when no --layer fixes it)
    input_shape: tuple[int, ...]  # one sample, no batch dim
    in_features: int
    num_classes: int


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

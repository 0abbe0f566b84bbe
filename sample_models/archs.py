"""Architectures of the shipped sample models: plain PyTorch, each ending in an nn.Linear named `fc`.

The keyword defaults build the shipped checkpoints' architectures, so
`fyc-convert sample_models/digits_cnn.pt --arch sample_models.archs:digits_cnn` needs no `--arch-kwargs`
(the checkpoints also carry theirs in meta["arch_kwargs"]).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class DigitsCNN(nn.Module):
    """Small CNN for 8x8 digit images: (B, 1, 8, 8) -> (B, num_classes).

    Three 3x3 conv blocks (8x8 -> max-pool -> 4x4), global average pool, then `fc` on `4 * width`
    features (after a ReLU and the pool).
    """

    def __init__(self, *, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(1, width),
            *_conv_bn_relu(width, 2 * width),
            nn.MaxPool2d(2),  # (B, 2w, 4, 4)
            *_conv_bn_relu(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # (B, 4w)
        )
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class GlyphCNN(nn.Module):
    """Glyph recogniser: (B, 1, 32, 32) -> (B, num_classes), most parameters in the classifier.

    A stride-2 3x3 conv stem (32 -> 16), three conv blocks with 2x2 max-pools (16 -> 2), a Linear to
    `embed` features with ReLU, then `fc` (embed x num_classes).
    """

    def __init__(self, *, num_classes: int = 1200, width: int = 16, embed: int = 256, image_size: int = 32):
        super().__init__()
        blocks: list[nn.Module] = [
            nn.Conv2d(1, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]  # (B, w, 16, 16)
        c_in = width
        for c_out in (2 * width, 4 * width, 8 * width):
            blocks += [*_conv_bn_relu(c_in, c_out), nn.MaxPool2d(2)]
            c_in = c_out
        side = image_size // 16
        self.features = nn.Sequential(
            *blocks,  # (B, 8w, side, side)
            nn.Flatten(),
            nn.Linear(8 * width * side * side, embed),
            nn.ReLU(inplace=True),  # (B, embed)
        )
        self.fc = nn.Linear(embed, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class TabularMLP(nn.Module):
    """MLP for standardised tabular features: (B, in_features) -> (B, num_classes).

    Hidden Linear+ReLU layers of the given widths, then `fc`.
    """

    def __init__(self, *, in_features: int = 30, num_classes: int = 2, hidden: Sequence[int] = (64, 64)):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        self.features = nn.Sequential(*layers)  # (B, hidden[-1])
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def digits_cnn(*, num_classes: int = 10, width: int = 16) -> DigitsCNN:
    """The digits sample's architecture (see DigitsCNN)."""
    return DigitsCNN(num_classes=num_classes, width=width)


def glyph_cnn(*, num_classes: int = 1200, width: int = 16, embed: int = 256, image_size: int = 32) -> GlyphCNN:
    """The glyph sample's architecture (see GlyphCNN)."""
    return GlyphCNN(num_classes=num_classes, width=width, embed=embed, image_size=image_size)


def glyph_large_cnn(*, num_classes: int = 4191, width: int = 16, embed: int = 128,
                    image_size: int = 32) -> GlyphCNN:
    """The large glyph sample's architecture: GlyphCNN with 4,191 classes on 128 features."""
    return GlyphCNN(num_classes=num_classes, width=width, embed=embed, image_size=image_size)


def tabular_mlp(*, in_features: int = 30, num_classes: int = 2, hidden: Sequence[int] = (64, 64)) -> TabularMLP:
    """The tabular sample's architecture (see TabularMLP)."""
    return TabularMLP(in_features=in_features, num_classes=num_classes, hidden=hidden)

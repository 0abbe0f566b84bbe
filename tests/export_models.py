"""Stand-ins for export tests through the CLI: a backbone whose ONNX export differs from PyTorch on purpose."""

from __future__ import annotations

import torch
from torch import Tensor, nn

DRIFT = 0.05  # the relative size of the exported graph's error on the features


class _Drift(torch.autograd.Function):
    """x + DRIFT·sin(x) in PyTorch, Identity in the exported graph (its TorchScript `symbolic`).

    Not a uniform scale (which a normalising head would cancel): the features themselves change direction.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # (B, N) -> (B, N)
        return x + DRIFT * torch.sin(x)

    @staticmethod
    def symbolic(g, x):
        return g.op("Identity", x)


class DriftingBackbone(nn.Module):
    """Conv stem -> global pool -> a drifting op -> Linear classifier; input (3, 8, 8)."""

    def __init__(self, num_classes: int = 6, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.scale = 4.0  # features of order a few units: the drift is far beyond atol
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(_Drift.apply(self.stem(x) * self.scale))  # (B, C)


class FoldBackbone(nn.Module):
    """nn.Fold (col2im) in the backbone: ONNX has Col2Im only from opset 18, so neither exporter writes opset 17."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fold = nn.Fold((8, 8), kernel_size=2, stride=2)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        patches = self.conv(x)[:, :, ::2, ::2].flatten(2)  # (B, 16, 16): 4 channels x 2x2 kernel, 16 positions
        return self.fc(self.fold(patches).mean((2, 3)))  # (B, 4, 8, 8) -> (B, C)

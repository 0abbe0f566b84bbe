"""Small generated image folders for the data, loader and fine-tuning tests (a helper module, not a test module).

Every image of class c is a constant colour (grey level `level(c, i)`), so a label can be read back from the pixels
after any resize or crop; classes are also separable for a tiny conv net.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image


def level(c: int, i: int) -> int:
    """The grey level of image i of class c: classes 60 levels apart, images within a class 1 apart."""
    return 20 + 60 * c + i


def write_class_folders(root: Path, classes: list[str], per_class: int, *, size: tuple[int, int] = (12, 10),
                        ext: str = ".png", mode: str = "RGB", start: int = 0, noise: int = 0) -> list[str]:
    """root/<class>/img_<i><ext> for each class (in the given order, labels by sorted name); returns the written
    paths relative to root in torchvision's order (classes sorted, files sorted). `noise` > 0 adds seeded
    uniform noise of that many grey levels (so crops and flips change the pixels)."""
    order = sorted(classes)
    written = []
    for name in classes:  # written in the given (unsorted) order on purpose
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        c = order.index(name)
        for i in range(start, start + per_class):
            shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
            rng = np.random.default_rng(1000 * c + i)
            pixels = level(c, i) + (rng.integers(-noise, noise + 1, shape) if noise else np.zeros(shape, int))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8), mode).save(d / f"img_{i:03d}{ext}")
            written.append(f"{name}/img_{i:03d}{ext}")
    return sorted(written, key=lambda p: (order.index(p.split("/")[0]), p))


# A stand-in of a timm classifier's layout (conv stem, global pool, `fc`, get_classifier(), pretrained_cfg), as
# module source: the image-workflow test and benchmarks/fixed_epochs.py write it to a file and pass it to --arch.
TINY_TIMM_ARCH = textwrap.dedent('''
    import torch
    from torch import nn

    class TinyTimmNet(nn.Module):
        """A stand-in of a timm classifier: conv stem, global pool, `fc`, get_classifier(), pretrained_cfg."""

        def __init__(self, num_classes=4):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                          nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.fc = nn.Linear(16, num_classes)
            self.pretrained_cfg = {"input_size": (3, 24, 24), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                                   "crop_pct": 0.875, "interpolation": "bicubic", "num_classes": num_classes}

        def get_classifier(self):
            return self.fc

        def forward(self, x):
            return self.fc(self.features(x))

    def build(num_classes=4):
        return TinyTimmNet(num_classes)
''')

"""Small generated image folders for the data, loader and fine-tuning tests (a helper module, not a test module).

Every image of class c is a constant colour (grey level `level(c, i)`), so a label can be read back from the pixels
after any resize or crop; classes are also separable for a tiny conv net.
"""

from __future__ import annotations

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

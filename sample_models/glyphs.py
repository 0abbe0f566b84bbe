"""Glyph data set: Unicode characters rendered from the DejaVu Sans faces with Pillow.

Every sample is one character drawn in one face, centred horizontally on its ink, with the baseline
at a fixed height (so "o"/"O" or ","/"'" keep their size and position), then augmented by a small
seeded rotation, scale and shift, and area-downsampled to 32x32 grey levels in [0, 1] (ink = 1).
The classes are the committed list in `glyph_classes.txt`: characters present in all eight Sans faces
whose renderings differ from every other kept character (`select_glyph_classes` made the list;
Latin A, Greek Alpha and Cyrillic A render identically, so only one of them is a class).

Train: seven faces, `train_copies` augmented renderings each. Validation: the held-out face
DejaVuSansCondensed-Oblique, one clean rendering and `val_copies - 1` augmented ones.

The large sample (`--large`): the characters mapped by all four upright Sans faces (so by at least four
Sans faces; `glyph_large_classes.txt`, made with `select_glyph_classes(num_classes=None, ...)`), validated on the held-out
upright face DejaVuSansCondensed, trained on the other Sans faces that map each character (three upright,
and the four obliques for most characters).

    python -m sample_models.glyphs --out sample_models/data/glyphs.npz [--select]
    python -m sample_models.glyphs --large --out sample_models/data/glyphs_large.npz [--select]
"""

from __future__ import annotations

import argparse
import struct
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
TRAIN_FACES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansCondensed.ttf",
    "DejaVuSansCondensed-Bold.ttf",
    "DejaVuSansCondensed-BoldOblique.ttf",
)
VAL_FACE = "DejaVuSansCondensed-Oblique.ttf"
CLASSES_FILE = Path(__file__).with_name("glyph_classes.txt")
DEFAULT_OUT = Path(__file__).with_name("data") / "glyphs.npz"

IMAGE_SIZE = 32  # output side, pixels
_SUPER = 2  # glyphs are drawn and transformed at 2x, then area-downsampled
_CANVAS = IMAGE_SIZE * _SUPER  # 64
_FONT_PX = 42  # ascent ~39 px + descent ~10 px fits the 64 px canvas with a margin
_BASELINE = 49  # canvas row of the baseline
_MARGIN = 3  # glyphs larger than the canvas minus this margin are drawn smaller
_KEEP_CATEGORIES = ("L", "N", "P", "S")  # letters, numbers, punctuation, symbols (no marks, spaces, controls)
NUM_CLASSES = 1200  # the committed class list: select_glyph_classes(num_classes=NUM_CLASSES,
MIN_DISTANCE = 0.06  # min_distance=MIN_DISTANCE), remade by `python -m sample_models.glyphs --select`

# The large sample: every character of the four upright Sans faces that looks different from the others.
LARGE_SELECT_FACES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSansCondensed.ttf",
    "DejaVuSansCondensed-Bold.ttf",
)
LARGE_VAL_FACE = "DejaVuSansCondensed.ttf"
LARGE_TRAIN_FACES = tuple(f for f in (*TRAIN_FACES, VAL_FACE) if f != LARGE_VAL_FACE)  # the other seven
LARGE_CLASSES_FILE = Path(__file__).with_name("glyph_large_classes.txt")
LARGE_DEFAULT_OUT = Path(__file__).with_name("data") / "glyphs_large.npz"
LARGE_MIN_DISTANCE = 0.04  # below the 1,200-class list's 0.06: more classes, some of them close
LARGE_TRAIN_COPIES = 2  # augmented renderings per (train face, character) of the large sample


def font_codepoints(path: str | Path) -> set[int]:
    """Code points of the Basic Multilingual Plane that a TrueType font maps to a glyph.

    Reads the font's Windows Unicode BMP (3, 1) cmap subtable, format 4.

    Args:
        path: a .ttf file.

    Returns:
        The set of mapped code points (glyph id != 0).
    """
    data = Path(path).read_bytes()
    num_tables = struct.unpack(">H", data[4:6])[0]
    offsets = {}
    for i in range(num_tables):
        tag, _checksum, offset, _length = struct.unpack(">4sIII", data[12 + 16 * i : 28 + 16 * i])
        offsets[tag] = offset
    cmap = offsets[b"cmap"]
    num_subtables = struct.unpack(">H", data[cmap + 2 : cmap + 4])[0]
    for i in range(num_subtables):
        platform, encoding, offset = struct.unpack(">HHI", data[cmap + 4 + 8 * i : cmap + 12 + 8 * i])
        table = cmap + offset
        if (platform, encoding) == (3, 1) and struct.unpack(">H", data[table : table + 2])[0] == 4:
            break
    else:
        raise ValueError(f"{path} has no (3, 1) format-4 cmap subtable")
    seg_x2 = struct.unpack(">H", data[table + 6 : table + 8])[0]
    segs = seg_x2 // 2
    ends = struct.unpack(f">{segs}H", data[table + 14 : table + 14 + seg_x2])
    starts = struct.unpack(f">{segs}H", data[table + 16 + seg_x2 : table + 16 + 2 * seg_x2])
    deltas = struct.unpack(f">{segs}h", data[table + 16 + 2 * seg_x2 : table + 16 + 3 * seg_x2])
    range_base = table + 16 + 3 * seg_x2
    range_offsets = struct.unpack(f">{segs}H", data[range_base : range_base + seg_x2])
    codepoints = set()
    for k in range(segs):
        for cp in range(starts[k], min(ends[k], 0xFFFE) + 1):
            if range_offsets[k] == 0:
                glyph = (cp + deltas[k]) & 0xFFFF
            else:
                at = range_base + 2 * k + range_offsets[k] + 2 * (cp - starts[k])
                glyph = struct.unpack(">H", data[at : at + 2])[0]
                glyph = (glyph + deltas[k]) & 0xFFFF if glyph else 0
            if glyph:
                codepoints.add(cp)
    return codepoints


def _load_font(face: str, px: int = _FONT_PX) -> ImageFont.FreeTypeFont:
    # BASIC layout: one glyph per character, same result with or without libraqm
    return ImageFont.truetype(str(FONT_DIR / face), px, layout_engine=ImageFont.Layout.BASIC)


def _draw_canvas(face: str, char: str, fonts: dict[tuple[str, int], ImageFont.FreeTypeFont]) -> np.ndarray:
    """One character on the 64x64 canvas: baseline at a fixed row, ink centred horizontally. (64, 64) uint8."""
    px = _FONT_PX
    while True:
        if (face, px) not in fonts:
            fonts[face, px] = _load_font(face, px)
        font = fonts[face, px]
        big = Image.new("L", (4 * _CANVAS, 4 * _CANVAS), 0)
        origin = (_CANVAS, 2 * _CANVAS)  # anchor "ls": left end of the baseline
        ImageDraw.Draw(big).text(origin, char, fill=255, font=font, anchor="ls")
        ink = np.asarray(big)
        cols = np.flatnonzero(ink.any(axis=0))
        rows = np.flatnonzero(ink.any(axis=1))
        if cols.size == 0:
            raise ValueError(f"{char!r} (U+{ord(char):04X}) renders no ink in {face}")
        top = rows[0] - origin[1] + _BASELINE
        bottom = rows[-1] - origin[1] + _BASELINE
        width = cols[-1] - cols[0] + 1
        if (top >= _MARGIN and bottom < _CANVAS - _MARGIN and width <= _CANVAS - 2 * _MARGIN) or px <= 8:
            break
        # too tall or too wide for the canvas: draw smaller, keep the baseline
        fit = min(
            (_BASELINE - _MARGIN) / max(origin[1] - rows[0], 1),
            (_CANVAS - _MARGIN - _BASELINE) / max(rows[-1] - origin[1], 1),
            (_CANVAS - 2 * _MARGIN) / width,
        )
        px = max(8, min(px - 1, int(px * fit)))
    canvas = np.zeros((_CANVAS, _CANVAS), dtype=np.uint8)
    left = (_CANVAS - width) // 2
    src = ink[:, cols[0] : cols[-1] + 1]
    dst_rows = np.arange(4 * _CANVAS) - origin[1] + _BASELINE
    ok = (dst_rows >= 0) & (dst_rows < _CANVAS)
    canvas[dst_rows[ok], left : left + width] = src[ok]
    return canvas


def _augment(canvas: np.ndarray, *, angle: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    """Rotate/scale about the canvas centre, shift, and area-downsample. (64, 64) uint8 -> (32, 32) uint8."""
    image = Image.fromarray(canvas)
    if angle != 0.0 or scale != 1.0 or shift != (0.0, 0.0):
        theta = np.deg2rad(angle)
        cos, sin = np.cos(theta) / scale, np.sin(theta) / scale
        c = _CANVAS / 2
        dx, dy = shift[0] * _SUPER, shift[1] * _SUPER
        # inverse map: output pixel (x, y) samples input at A @ (x - c - dx, y - c - dy) + c
        a, b, d, e = cos, sin, -sin, cos
        matrix = (a, b, c - a * (c + dx) - b * (c + dy), d, e, c - d * (c + dx) - e * (c + dy))
        image = image.transform(image.size, Image.Transform.AFFINE, matrix, resample=Image.Resampling.BILINEAR)
    return np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX))


def _augment_params(rng: np.random.Generator) -> dict:
    return {
        "angle": float(rng.uniform(-5.0, 5.0)),  # degrees
        "scale": float(rng.uniform(0.92, 1.08)),
        "shift": (float(rng.uniform(-1.0, 1.0)), float(rng.uniform(-1.0, 1.0))),  # output pixels
    }


def render_glyphs(
    chars: Sequence[str], faces: Sequence[str], *, copies: int, clean_first: bool, seed: int,
    skip_missing: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Render every character in every face, `copies` times.

    Args:
        chars: the class characters; label i is chars[i].
        faces: font file names in FONT_DIR.
        copies: renderings per (face, character).
        clean_first: make the first copy un-augmented.
        seed: seeds the augmentation; the same arguments give the same bytes.
        skip_missing: leave out the characters a face does not map (instead of refusing them).

    Returns:
        x (S, 1, 32, 32) float32 in [0, 1] and y (S,) int64, ordered face, character, copy.

    Raises:
        ValueError: a face lacks one of the characters (it would draw its "missing glyph" box), unless
            `skip_missing`.
    """
    todo: list[list[int]] = []  # per face, the labels it renders
    for face in faces:
        mapped = font_codepoints(FONT_DIR / face)
        missing = [f"U+{ord(c):04X}" for c in chars if ord(c) not in mapped]
        if missing and not skip_missing:
            raise ValueError(f"{face} has no glyph for {', '.join(missing[:5])}; install fonts-dejavu 2.37")
        todo.append([label for label, c in enumerate(chars) if ord(c) in mapped])
    rng = np.random.default_rng(seed)
    fonts: dict[tuple[str, int], ImageFont.FreeTypeFont] = {}
    x = np.empty((sum(map(len, todo)) * copies, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    y = np.empty(len(x), dtype=np.int64)
    i = 0
    for face, labels in zip(faces, todo):
        for label in labels:
            char = chars[label]
            canvas = _draw_canvas(face, char, fonts)
            for copy in range(copies):
                params = {"angle": 0.0, "scale": 1.0, "shift": (0.0, 0.0)}
                if not (clean_first and copy == 0):
                    params = _augment_params(rng)
                x[i, 0] = _augment(canvas, **params)
                y[i] = label
                i += 1
    return (x.astype(np.float32) / 255.0), y


def load_glyph_classes(path: Path = CLASSES_FILE) -> list[str]:
    """A committed class list (default the 1,200-class one): one character per class, in label order."""
    lines = path.read_text(encoding="ascii").split()
    return [chr(int(line, 16)) for line in lines]


def select_glyph_classes(
    *, num_classes: int | None, min_distance: float, faces: Sequence[str] = (*TRAIN_FACES, VAL_FACE)
) -> list[str]:
    """Choose classes that are in every face and look different from each other.

    Candidates are the letters, numbers, punctuation and symbols mapped by every face, in code point
    order. A candidate is kept when the RMS difference (grey levels in [0, 1], over all faces) between
    its clean renderings, area-averaged to 16x16, and those of every character kept before it is at
    least `min_distance`. The classes are the first `num_classes` kept characters (all of them for None).

    Args:
        num_classes: how many classes to return; None: every kept character.
        min_distance: the smallest allowed RMS difference between two classes.
        faces: font file names in FONT_DIR.

    Returns:
        The class characters, in code point order.
    """
    common = set.intersection(*(font_codepoints(FONT_DIR / face) for face in faces))
    candidates = [chr(cp) for cp in sorted(common) if unicodedata.category(chr(cp))[0] in _KEEP_CATEGORIES]
    fonts: dict[tuple[str, int], ImageFont.FreeTypeFont] = {}
    inked, small = [], []
    for char in candidates:
        try:
            canvases = [_draw_canvas(face, char, fonts) for face in faces]
        except ValueError:  # blank glyph (e.g. the empty Braille pattern)
            continue
        inked.append(char)
        # clean 32x32 rendering -> 16x16 area average, per face: (faces, 16, 16)
        clean = [_augment(c, angle=0.0, scale=1.0, shift=(0.0, 0.0)) for c in canvases]
        small.append(np.stack(clean).reshape(len(faces), 16, 2, 16, 2).mean(axis=(2, 4)) / 255.0)
    flat = np.stack(small).reshape(len(inked), -1)  # (K, faces*256)
    sq = (flat**2).sum(axis=1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T, 0.0) / flat.shape[1])  # (K, K)
    kept: list[int] = []
    for j in range(len(inked)):
        if not kept or dist[j, kept].min() >= min_distance:
            kept.append(j)
    if num_classes is None:
        return [inked[j] for j in kept]
    if len(kept) < num_classes:
        raise ValueError(f"only {len(kept)} distinct characters at min_distance={min_distance}; lower it")
    return [inked[j] for j in kept[:num_classes]]


def render_glyph_dataset(
    out_path: str | Path,
    *,
    classes: Sequence[str] | None = None,
    train_copies: int | None = None,
    val_copies: int = 2,
    seed: int = 0,
    large: bool = False,
) -> Path:
    """Render the glyph data set to an .npz (x_train, y_train, x_val, y_val, classes).

    Args:
        out_path: where to write the .npz (its folder is created).
        classes: characters to render; default: the committed class list (of the large sample with `large`).
        train_copies: augmented renderings per (train face, character); default 3 (large: LARGE_TRAIN_COPIES).
        val_copies: renderings per character in the held-out face (the first one clean).
        seed: augmentation seed.
        large: the large sample: its faces (train faces that lack a character skip it) and class list.

    Returns:
        The written path. Same arguments, same bytes.
    """
    default_classes = LARGE_CLASSES_FILE if large else CLASSES_FILE
    chars = list(classes) if classes is not None else load_glyph_classes(default_classes)
    train_faces, val_face = (LARGE_TRAIN_FACES, LARGE_VAL_FACE) if large else (TRAIN_FACES, VAL_FACE)
    if train_copies is None:
        train_copies = LARGE_TRAIN_COPIES if large else 3
    x_train, y_train = render_glyphs(chars, train_faces, copies=train_copies, clean_first=False, seed=seed,
                                     skip_missing=large)
    x_val, y_val = render_glyphs(chars, (val_face,), copies=val_copies, clean_first=True, seed=seed + 1)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(
        tmp, x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val, classes=np.array(chars, dtype="<U1")
    )
    tmp.replace(out)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help=f"output .npz (default {DEFAULT_OUT}, with --large "
                        f"{LARGE_DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--large", action="store_true", help="the large sample (several thousand classes)")
    parser.add_argument("--select", action="store_true", help=f"first remake {CLASSES_FILE.name} (with --large "
                        f"{LARGE_CLASSES_FILE.name}) from the fonts")
    args = parser.parse_args(argv)
    if args.select:
        if args.large:
            chars = select_glyph_classes(num_classes=None, min_distance=LARGE_MIN_DISTANCE,
                                         faces=LARGE_SELECT_FACES)
        else:
            chars = select_glyph_classes(num_classes=NUM_CLASSES, min_distance=MIN_DISTANCE)
        path = LARGE_CLASSES_FILE if args.large else CLASSES_FILE
        path.write_text("".join(f"{ord(c):04X}\n" for c in chars), encoding="ascii")
    out = args.out if args.out is not None else (LARGE_DEFAULT_OUT if args.large else DEFAULT_OUT)
    print(render_glyph_dataset(out, seed=args.seed, large=args.large))


if __name__ == "__main__":
    main()

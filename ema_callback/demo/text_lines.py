"""Synthetic text-line images rendered with Pillow, from a seed (no downloads).

Used by the demo, and by the PaddleOCR example and tests (``write_rec_dataset`` writes PaddleOCR
``SimpleDataSet`` label files: ``relative/path.png<TAB>label``). The detection datasets the tests need are in
``tests/datasets.py``.
"""
from __future__ import annotations

import glob
import os
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

DIGITS = "0123456789"
ALPHANUMERIC = DIGITS + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_FONT_GLOBS = ("/usr/share/fonts/**/*.ttf", "/usr/local/share/fonts/**/*.ttf", "/Library/Fonts/*.ttf",
               "C:/Windows/Fonts/*.ttf")


def available_fonts(limit: int = 6) -> List[str]:
    """Up to ``limit`` TrueType fonts found on this machine (sorted, so a seed gives the same images)."""
    found: List[str] = []
    for pattern in _FONT_GLOBS:
        found.extend(sorted(glob.glob(pattern, recursive=True)))
    plain = [f for f in found if not any(s in os.path.basename(f) for s in ("Oblique", "Italic", "ExtraLight"))]
    return plain[:limit]


def _load_font(path: str, size: int):
    if path == "<builtin>":
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(path, size=size)


def render_line(text: str, rng: np.random.Generator, fonts: Sequence[str], height: int = 32,
                width: int = 128, noise: float = 12.0, max_rotation: float = 0.0) -> np.ndarray:
    """A ``height x width`` uint8 grayscale image of ``text``: random font, size, offset, noise (std, in grey
    levels), blur and rotation (degrees)."""
    font = _load_font(fonts[int(rng.integers(len(fonts)))], int(rng.integers(height - 12, height - 4)))
    background = int(rng.integers(170, 256))
    ink = int(rng.integers(0, 90))
    canvas = Image.new("L", (width, height), color=background)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = int(rng.integers(0, max(1, width - (right - left) - 1))) - left
    y = (height - (bottom - top)) // 2 - top + int(rng.integers(-2, 3))
    draw.text((x, y), text, fill=ink, font=font)
    if max_rotation:
        canvas = canvas.rotate(float(rng.uniform(-max_rotation, max_rotation)), resample=Image.BILINEAR,
                               fillcolor=background)
    if rng.random() < 0.5:
        canvas = canvas.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
    pixels = np.asarray(canvas, dtype=np.float32) + rng.normal(0, noise, size=(height, width))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def make_text_lines(count: int, seed: int, alphabet: str = DIGITS, min_len: int = 3, max_len: int = 6,
                    height: int = 32, width: int = 128, noise: float = 12.0,
                    max_rotation: float = 0.0) -> Tuple[np.ndarray, List[str]]:
    """``count`` images ``(count, height, width)`` uint8 and their labels, fully determined by ``seed``."""
    rng = np.random.default_rng(seed)
    fonts = available_fonts() or ["<builtin>"]
    labels = ["".join(rng.choice(list(alphabet), size=int(rng.integers(min_len, max_len + 1))))
              for _ in range(count)]
    images = np.stack([render_line(t, rng, fonts, height, width, noise, max_rotation) for t in labels])
    return images, labels


def write_rec_dataset(folder: str, count: int, seed: int, **kwargs) -> str:
    """PNG images plus a PaddleOCR ``SimpleDataSet`` label file; returns the label file's path."""
    images, labels = make_text_lines(count, seed, **kwargs)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    lines = []
    for i, (image, label) in enumerate(zip(images, labels)):
        name = f"images/{i:05d}.png"
        Image.fromarray(image).convert("RGB").save(os.path.join(folder, name))
        lines.append(f"{name}\t{label}")
    label_file = os.path.join(folder, "labels.txt")
    with open(label_file, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return label_file

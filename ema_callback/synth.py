"""Synthetic text-line images rendered with Pillow, from a seed (no downloads).

Used by the demo and by the PaddleOCR tests (``write_rec_dataset`` writes PaddleOCR ``SimpleDataSet``
label files: ``relative/path.png<TAB>label``).
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


def write_det_dataset(folder: str, count: int, seed: int, size: int = 160, boxes_per_image: Tuple[int, int] = (1, 3),
                      alphabet: str = DIGITS) -> str:
    """Images with 1-3 dark text lines on a light background and a PaddleOCR detection label file
    (``path<TAB>[{"transcription": ..., "points": [[x, y] x 4]}]``); returns the label file's path."""
    import json

    rng = np.random.default_rng(seed)
    fonts = available_fonts() or ["<builtin>"]
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    lines = []
    for i in range(count):
        canvas = Image.new("RGB", (size, size), color=tuple(int(v) for v in rng.integers(180, 256, size=3)))
        draw = ImageDraw.Draw(canvas)
        annotations, top = [], int(rng.integers(4, 20))
        for _ in range(int(rng.integers(boxes_per_image[0], boxes_per_image[1] + 1))):
            text = "".join(rng.choice(list(alphabet), size=int(rng.integers(3, 7))))
            font = _load_font(fonts[int(rng.integers(len(fonts)))], int(rng.integers(18, 28)))
            x0 = int(rng.integers(2, size // 3))
            left, t, right, bottom = draw.textbbox((x0, top), text, font=font)
            if bottom >= size - 2 or right >= size - 2:
                break
            draw.text((x0, top), text, fill=tuple(int(v) for v in rng.integers(0, 80, size=3)), font=font)
            points = [[left - 1, t - 1], [right + 1, t - 1], [right + 1, bottom + 1], [left - 1, bottom + 1]]
            annotations.append({"transcription": text, "points": points})
            top = bottom + int(rng.integers(8, 24))
        name = f"images/{i:05d}.png"
        canvas.save(os.path.join(folder, name))
        lines.append(f"{name}\t{json.dumps(annotations)}")
    label_file = os.path.join(folder, "labels.txt")
    with open(label_file, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return label_file


def write_coco_dataset(folder: str, count: int, seed: int, size: int = 64, split: str = "train") -> str:
    """``count`` ``size x size`` images with 1-2 filled rectangles (one class, "box") and a COCO
    annotation file ``{split}.json`` (bbox as x, y, w, h); returns the annotation file's path."""
    import json

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        canvas = Image.new("RGB", (size, size), color=tuple(int(v) for v in rng.integers(0, 90, size=3)))
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(1, 3))):
            w, h = (int(v) for v in rng.integers(size // 5, size // 2, size=2))
            x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            draw.rectangle([x, y, x + w - 1, y + h - 1], fill=tuple(int(v) for v in rng.integers(160, 256, size=3)))
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        name = f"{split}_{i:05d}.png"
        canvas.save(os.path.join(folder, "images", name))
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
    path = os.path.join(folder, f"{split}.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"images": images, "annotations": annotations,
                   "categories": [{"id": 1, "name": "box", "supercategory": "box"}]}, handle)
    return path

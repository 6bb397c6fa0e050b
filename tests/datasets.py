"""Synthetic detection datasets for the tests (Pillow, from a seed, no downloads): PaddleOCR DB and COCO."""
from __future__ import annotations

import os
from typing import Tuple

import numpy as np
from PIL import Image, ImageDraw

from ema_callback.demo.text_lines import DIGITS, _load_font, available_fonts


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

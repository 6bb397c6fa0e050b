"""Checking the suite checkout a launcher was pointed at (PaddleOCR, PaddleDetection)."""
from __future__ import annotations

import os
from typing import Sequence

from .config import EMAConfigError


def check_checkout(root: str, option: str, suite: str, required: Sequence[str]) -> str:
    """``root`` as an absolute path, after checking it is a folder holding every ``required`` file.

    Errors are one line naming the option: ``--paddleocr-root /x: not a PaddleOCR checkout (missing ...)``.
    """
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise EMAConfigError(f"{option} {root}: no such folder")
    missing = [p for p in required if not os.path.exists(os.path.join(root, p))]
    if missing:
        raise EMAConfigError(f"{option} {root}: not a {suite} checkout (missing {', '.join(missing)})")
    return root

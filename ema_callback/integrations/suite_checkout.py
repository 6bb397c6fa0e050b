"""The suite checkout a launcher runs: checking it, and naming errors raised inside its code."""
from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import Iterator, Sequence

from ema_callback.errors import CheckoutError, EMAError


def check_checkout(root: str, option: str, suite: str, required: Sequence[str]) -> str:
    """``root`` as an absolute path, after checking it is a folder holding every ``required`` file.

    Errors are one line naming the option: ``--paddleocr-root /x: not a PaddleOCR checkout (missing ...)``.
    """
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise CheckoutError(f"{option} {root}: no such folder")
    missing = [p for p in required if not os.path.exists(os.path.join(root, p))]
    if missing:
        raise CheckoutError(f"{option} {root}: not a {suite} checkout (missing {', '.join(missing)})")
    return root


@contextlib.contextmanager
def suite_errors_named(root: str, suite: str) -> Iterator[None]:
    """An exception raised inside the checkout at ``root`` gets one line before its traceback, naming the file.

    The traceback starts with the launcher's frames (runpy, our wrappers); the line says the error was raised
    in the suite's code, e.g. ``ema-callback: error inside PaddleDetection's ppdet/engine/trainer.py (line 312),
    not in ema-callback; its traceback follows``. Our own errors (``EMAError``) and exits pass untouched.
    """
    try:
        yield
    except (EMAError, SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        frame = _deepest_owned_frame(exc, os.path.realpath(root))
        if frame is not None:
            where = os.path.relpath(os.path.realpath(frame.filename), os.path.realpath(root))
            print(f"ema-callback: error inside {suite}'s {where} (line {frame.lineno}), not in ema-callback; "
                  f"its traceback follows: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}",
                  file=sys.stderr, flush=True)
        raise


def _deepest_owned_frame(exc: BaseException, root: str):
    """The deepest frame in the suite's checkout, unless a deeper one is ema-callback's own (then None)."""
    package = os.path.dirname(os.path.dirname(os.path.realpath(__file__))) + os.sep
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        path = os.path.realpath(frame.filename)
        if path.startswith(package):
            return None
        if path.startswith(root + os.sep):
            return frame
    return None

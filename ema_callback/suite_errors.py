"""Saying which code failed when a suite's own training code raises under our launcher."""
from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import Iterator

from .errors import EMAConfigError


@contextlib.contextmanager
def suite_errors_named(root: str, suite: str) -> Iterator[None]:
    """An exception raised inside the checkout at ``root`` gets one line before its traceback, naming the file.

    The traceback starts with the launcher's frames (runpy, our wrappers); the line says the error was raised
    in the suite's code, e.g. ``ema-callback: error inside PaddleDetection's ppdet/engine/trainer.py (line 312),
    not in ema-callback; its traceback follows``. Our own errors (``EMAConfigError``) and exits pass untouched.
    """
    try:
        yield
    except (EMAConfigError, SystemExit, KeyboardInterrupt):
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
    package = os.path.dirname(os.path.realpath(__file__)) + os.sep
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        path = os.path.realpath(frame.filename)
        if path.startswith(package):
            return None
        if path.startswith(root + os.sep):
            return frame
    return None

"""The package's exceptions, one hierarchy; paddle-free, so the command line can catch them before Paddle loads.

``EMAError`` is the base of every error the package raises for bad input: each message is one line naming the
key, file or option and what was expected, and the command line prints it as ``ema-callback: error: ...``.
"""
from __future__ import annotations


class EMAError(ValueError):
    """Bad input to ema-callback; the message is one line naming the key, file or option."""


class EMAConfigError(EMAError):
    """A bad ``EMA:`` block, override or option."""


class EMAFileError(EMAError):
    """An EMA file that cannot be written or read, or does not match the model."""


class CheckoutError(EMAError):
    """A PaddleOCR / PaddleDetection checkout that is missing or not the one imported."""


class UnsupportedPaddleError(ImportError):
    """The installed Paddle (or numpy beside it) is outside the supported range; one line saying what to install."""


def short_list(items, limit: int = 6) -> str:
    """``a, b, c (+4 more)``: a list for a one-line message."""
    items = list(items)
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")

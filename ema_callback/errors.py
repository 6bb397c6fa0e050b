"""The package's exceptions, one hierarchy; paddle-free, so the command line can catch them before Paddle loads.

``EMAError`` is the base of every error the package raises for bad input: each message is one line naming the
key, file or option and what was expected, and the command line prints it as ``ema-callback: error: ...``.
"""
from __future__ import annotations

MESSAGE_LIMIT = 600  # characters of an error message; what a hostile value would make longer is cut


def one_line(text: object, limit: int = MESSAGE_LIMIT) -> str:
    """``text`` with its white space folded to single spaces and cut to ``limit`` characters (``...`` marks a cut)."""
    folded = " ".join(str(text).split())
    return folded if len(folded) <= limit else folded[:limit - 3] + "..."


class EMAError(ValueError):
    """Bad input to ema-callback; the message is one line naming the key, file or option (folded to one line and
    cut to ``MESSAGE_LIMIT`` characters here, whatever a file or value put into it)."""

    def __init__(self, message: object = "", *args: object):
        super().__init__(one_line(message), *args)


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

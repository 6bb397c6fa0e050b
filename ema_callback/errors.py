"""The package's exceptions; paddle-free, so the command line can catch them before Paddle is imported."""
from __future__ import annotations


class EMAConfigError(ValueError):
    """A bad ``EMA:`` block, override or EMA file; the message is one line naming the key or file."""


class UnsupportedPaddleError(ImportError):
    """The installed Paddle (or numpy beside it) is outside the supported range; one line saying what to install."""

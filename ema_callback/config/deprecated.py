"""Old spellings that keep working: one ``EMA: ...`` warning line each, once per process.

An old spelling is read as the new one (``schema.EMAConfig.from_block``, ``EMACallback``, the engine) and
``warn_once`` says, in one line, which key was read as which; the same line is not repeated however often a block is
validated (a block is read by several layers: a ready block, the suite's section, ``-o`` overrides).
"""
from __future__ import annotations

import logging
from typing import Set

logger = logging.getLogger("ema_callback")

_said: Set[str] = set()


def warn_once(message: str) -> None:
    """Log ``EMA: deprecated: <message>`` at WARNING level, the first time only (``message`` is one line, naming the
    old spelling and what it is read as)."""
    if message in _said:
        return
    _said.add(message)
    logger.warning("EMA: deprecated: %s", message)


def forget() -> None:
    """Say every warning again (tests)."""
    _said.clear()

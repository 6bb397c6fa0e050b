"""The ways in that run a suite's own training script: one line each, read by the command line (its commands and
``script-path``), ``posthoc sweep`` and the checked evaluation of ``tools/eval.py``.

A way in is its adapter module (``integrations/<suite>.py``), which provides (``suite_adapter.SuiteAdapter``):

* ``main(argv) -> int``: the ``ema-callback <command>``;
* ``ADAPTER``: a ``SuiteAdapter`` saying how its checkout is found and how its ``tools/eval.py`` is driven.

``Model.fit``'s way in is a callback (``EMACallback``) and needs no line here; nor would a suite that is installed
as a wheel and trained through the user's own script.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Dict, Tuple


@dataclass(frozen=True)
class WayIn:
    """``command``: the ``ema-callback`` command; ``short``: its ``script-path`` name (the script form
    ``integrations/launch_<short>.py`` for ``python -m paddle.distributed.launch``); ``module``: the adapter;
    ``usage``: its arguments, for ``ema-callback --help``."""

    command: str
    short: str
    module: str
    usage: str

    @property
    def name(self) -> str:
        """The adapter module's own name (``paddleocr``): ``checked_suite_eval --suite`` takes it."""
        return self.module.rsplit(".", 1)[1]

    def adapter(self):
        """The module's ``ADAPTER`` (imports the adapter, not the suite)."""
        return importlib.import_module(self.module).ADAPTER

    def main(self, argv) -> int:
        return importlib.import_module(self.module).main(argv)


WAYS_IN: Tuple[WayIn, ...] = (
    WayIn("ocr-train", "ocr", "ema_callback.integrations.paddleocr",
          "-c cfg.yml [-o Key=val ...] [--paddleocr-root DIR] [--ema-config BLOCK]"),
    WayIn("det-train", "det", "ema_callback.integrations.paddledet",
          "-c cfg.yml [-o key=val ...] [--eval] [-r ckpt] [--paddledet-root DIR] [--ema-config BLOCK]"),
    WayIn("cls-train", "cls", "ema_callback.integrations.paddleclas",
          "-c cfg.yaml [-o Key=val ...] [--paddleclas-root DIR] [--ema-config BLOCK]"),
)


def by_module_name() -> Dict[str, WayIn]:
    """By the adapter module's own name (``WayIn.name``): ``checked_suite_eval --suite``."""
    return {w.name: w for w in WAYS_IN}

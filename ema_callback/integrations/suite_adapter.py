"""The seam between the shared layer and a suite that trains through its own ``tools/train.py``.

A way in of this kind (PaddleOCR, PaddleDetection) is one module with a ``main(argv)`` (its ``ema-callback`` command)
and an ``ADAPTER``, a ``SuiteAdapter`` that answers what differs between suites; everything else is shared:

* finding the checkout (``suite_checkout.find_checkout`` by the adapter's ``suite``: flag, environment variable,
  working directory, installed package) and importing the suite's code from it, checked (``import_from_checkout``);
* running the suite's own script as ``python tools/train.py`` would, with its seams wrapped for the run and put
  back after (``run_suite_script``);
* the engine, its checkpoints and the candidates (``checkpoints``, ``candidates``, ``candidate_eval``,
  ``auto_length``), which the module's hooks call at the suite's events;
* evaluating saved weights through the suite's own ``tools/eval.py`` (``posthoc sweep``,
  ``checked_suite_eval``): the adapter says how that script is told the weights (``eval_weights_option``), how its
  weight loading is wrapped for the shape check (``install_eval_check``) and how its metric is read from its output
  (``eval_metric``).

Adding such a suite is its module, its docs and tests, and one line in ``registry.WAYS_IN``.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import runpy
import sys
from types import ModuleType
from typing import Callable, ContextManager, List, Optional, Sequence, Tuple

from ema_callback.errors import EMAConfigError
from ema_callback.integrations.suite_checkout import Suite, find_checkout, suite_errors_named


class SuiteAdapter:
    """What differs between the suites run through their own scripts (see the module docstring)."""

    suite: Suite

    def find_root(self, explicit: Optional[str]) -> str:
        """The suite's checkout (``suite_checkout.find_checkout``)."""
        return find_checkout(self.suite, explicit)

    def eval_weights_option(self, prefix: str) -> str:
        """The ``-o`` option of the suite's ``tools/eval.py`` that names the weights ``prefix.pdparams``."""
        raise NotImplementedError

    def install_eval_check(self, check: Callable[[object], None]) -> None:
        """Wrap the suite's weight loading so that ``check(model)`` runs on the model its config built, before any
        weight is loaded (in the process that then runs ``tools/eval.py``)."""
        raise NotImplementedError

    def eval_metric(self, log: str, wanted: Optional[str]) -> Tuple[float, str]:
        """(value, name) of the metric ``tools/eval.py`` printed in ``log`` (``wanted``: a name the user gave)."""
        raise NotImplementedError


def import_from_checkout(root: str, module: str, path_in_root: str, option: str) -> ModuleType:
    """``module`` imported with ``root`` first on ``sys.path``, checked to be the checkout's ``path_in_root`` (a
    package of the same name elsewhere on the path would otherwise train with other code than the checkout's)."""
    if root not in sys.path:
        sys.path.insert(0, root)
    imported = importlib.import_module(module)
    expected, found = os.path.join(root, path_in_root), os.path.abspath(imported.__file__ or "")
    if os.path.realpath(found) != os.path.realpath(expected):
        raise EMAConfigError(f"{option} {root}: imported {module} from {found}, expected {expected} (another "
                             f"{module.split('.')[0]!r} package shadows the checkout; run from elsewhere or fix "
                             "PYTHONPATH)")
    return imported


def run_suite_script(root: str, script: str, argv: Sequence[str], during: Sequence[ContextManager],
                     suite_name: str) -> None:
    """Run ``root/script`` as ``python script argv...`` would (``runpy``, ``sys.argv`` and ``sys.path`` as the
    script expects, put back after) inside the context managers ``during`` (the way in's wrapped seams); an error
    raised in the suite's code is named as the suite's (``suite_errors_named``)."""
    path = os.path.join(root, script)
    saved_argv = sys.argv
    sys.argv = [path] + list(argv)
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        with contextlib.ExitStack() as stack:
            for context in during:
                stack.enter_context(context)
            stack.enter_context(suite_errors_named(root, suite_name))
            runpy.run_path(path, run_name="__main__")
    finally:
        sys.argv = saved_argv


def release_all(locks: List) -> None:
    for lock in locks:
        lock.release()

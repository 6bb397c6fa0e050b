"""The seam between the shared layer and a suite that trains through its own ``tools/train.py``.

A way in of this kind (PaddleOCR, PaddleDetection, PaddleClas) is one module with a ``main(argv)`` (its
``ema-callback`` command) and an ``ADAPTER``, a ``SuiteAdapter`` that answers what differs between suites; everything
else is shared:

* finding the checkout (``suite_checkout.find_checkout`` by the adapter's ``suite``: flag, environment variable,
  working directory, installed package) and importing the suite's code from it, checked (``import_from_checkout``);
* reading its YAML and the run's ``EMA:`` block the same way (``read_run_config``, ``suite_value``);
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

import argparse
import contextlib
import importlib
import logging
import os
import runpy
import sys
from types import ModuleType
from typing import Any, Callable, ContextManager, List, Mapping, Optional, Sequence, Tuple

from ema_callback.config.files import (
    check_section_name,
    has_ema_request,
    load_suite_yaml,
    read_yaml,
    split_overrides,
    why_disabled,
)
from ema_callback.config.schema import EMAConfig
from ema_callback.errors import EMAConfigError
from ema_callback.integrations.suite_checkout import Suite, suite_errors_named

logger = logging.getLogger("ema_callback")


class SuiteAdapter:
    """What differs between the suites run through their own scripts (see the module docstring)."""

    suite: Suite

    def eval_weights_option(self, prefix: str) -> str:
        """The ``-o`` option of the suite's ``tools/eval.py`` that names the weights ``prefix.pdparams``."""
        raise NotImplementedError

    def eval_options(self, options: Sequence[str]) -> List[str]:
        """``options`` (``Key=value``) as the suite's ``tools/eval.py`` takes them: one ``-o`` followed by all."""
        return ["-o", *options]

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
    expected = os.path.join(root, path_in_root)
    found = os.path.abspath(imported.__file__) if imported.__file__ else "a namespace package (no __init__.py)"
    if not imported.__file__ or os.path.realpath(found) != os.path.realpath(expected):
        raise EMAConfigError(f"{option} {root}: imported {module} from {found}, expected {expected} (another "
                             f"{module.split('.')[0]!r} package shadows the checkout; run from elsewhere or fix "
                             "PYTHONPATH)")
    return imported


def suite_parser(command: str, suite: Suite, overrides: str = "opt") -> argparse.ArgumentParser:
    """The command line of a suite command: the suite's own ``-c``, ``-o`` (long name ``--<overrides>``, as the
    suite's ``tools/train.py`` names it) and ``-p``, then the checkout flag and ``--ema-config``."""
    p = argparse.ArgumentParser(prog=f"ema-callback {command}",
                                description=f"{suite.name}'s tools/train.py with EMA from the YAML's EMA: section.")
    p.add_argument("-c", "--config", required=True, help=f"{suite.name} YAML config")
    p.add_argument("-o", f"--{overrides}", nargs="+", action="extend", default=[], metavar="Key.sub=value",
                   help="overrides, as tools/train.py takes them; EMA.* keys work without an EMA: section")
    p.add_argument("-p", "--profiler_options", default=None)
    p.add_argument(suite.option, default=None, help=f"{suite.name} checkout (default: ${suite.env}, else the "
                                                    "working directory when it is one)")
    p.add_argument("--ema-config", default=None, help="a ready EMA: block merged under the YAML's own section")
    return p


def read_run_config(config_path: str, block_file: Optional[str], opts: Sequence[str], suite_name: str,
                    resolve: Callable[[dict, Optional[str], list], EMAConfig]
                    ) -> Tuple[dict, EMAConfig, bool, List[str]]:
    """The start of a suite command: the suite's YAML (a mapping, its ``EMA:`` section where it belongs), the
    ``-o`` options split into ``EMA.*`` and the suite's, and the run's ``EMAConfig`` (``resolve(suite, block_file,
    ema_overrides)`` when the YAML, ``--ema-config`` or ``-o EMA.*`` asks for an EMA, else off, said in one line).
    Returns (suite, config, whether an EMA was asked for, the suite's own ``-o`` options)."""
    suite = read_yaml(config_path)
    if not isinstance(suite, dict):
        raise EMAConfigError(f"{config_path}: expected a {suite_name} YAML mapping")
    check_section_name(suite, config_path)
    ema_overrides, suite_overrides = split_overrides(opts)
    wanted = has_ema_request(suite, block_file, ema_overrides)
    config = resolve(suite, block_file, ema_overrides) if wanted else EMAConfig(enable=False)
    if not config.enable:
        logger.info("EMA: off for this run (%s)", why_disabled(suite, block_file, ema_overrides, config_path))
    return suite, config, wanted, suite_overrides


def suite_value(suite: Mapping[str, Any], overrides: Sequence[str], *keys: str) -> Any:
    """``suite[keys[0]][keys[1]]...`` after the suite's ``-o Key.sub=value`` options, read as the suite reads them."""
    node: Any = suite
    for key in keys:
        node = node.get(key) if isinstance(node, Mapping) else None
    for text in overrides:
        name, _, raw = text.partition("=")
        if name.strip() == ".".join(keys):
            node = load_suite_yaml(raw) if raw.strip() else None
    return node


def run_suite_script(root: str, script: str, argv: Sequence[str], during: Sequence[ContextManager],
                     suite_name: str) -> None:
    """Run ``root/script`` as ``python script argv...`` would (``runpy``; ``sys.argv`` as the script expects, put back
    after; ``root`` first on ``sys.path``, where it stays, as the suite's own imports need it) inside the context
    managers ``during`` (the way in's wrapped seams); an error raised in the suite's code is named as the suite's
    (``suite_errors_named``)."""
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


class FinalPathLogger:
    """A suite's logger, with the staging folder of a checkpoint set (``files.checkpoint_set.StagedWrite``) replaced
    by the folder the set is published into in its messages (``save model in <output_dir>/latest``)."""

    def __init__(self, log, staging: str, final: str):
        self._log, self._staging, self._final = log, staging, final

    def __getattr__(self, name):
        method = getattr(self._log, name)
        if name not in ("debug", "info", "warning", "error"):
            return method

        def rewritten(message, *args, **kwargs):
            if isinstance(message, str):
                message = message.replace(self._staging, self._final)
            return method(message, *args, **kwargs)

        return rewritten


def release_all(locks: List) -> None:
    for lock in locks:
        lock.release()

"""The suite checkout a command runs: finding it (one rule for ``ocr-train``, ``det-train`` and ``posthoc sweep``),
checking it, and naming errors raised inside its code."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple

from ema_callback.errors import CheckoutError, EMAError


@dataclass(frozen=True)
class Suite:
    """How a suite's checkout is found: its flag, its environment variable, the files every checkout has, and
    (ppdet) an installed package whose parent folder may be the checkout (``pip install -e``)."""

    name: str
    option: str
    env: str
    required: Tuple[str, ...]
    package: Optional[str] = None


PADDLEOCR = Suite("PaddleOCR", "--paddleocr-root", "PADDLEOCR_ROOT", ("tools/train.py", "tools/program.py",
                                                                    "ppocr/__init__.py"))
PADDLEDET = Suite("PaddleDetection", "--paddledet-root", "PADDLEDET_ROOT",
                  ("tools/train.py", "ppdet/engine/trainer.py"), package="ppdet")
PADDLECLAS = Suite("PaddleClas", "--paddleclas-root", "PADDLECLAS_ROOT", ("tools/train.py", "ppcls/engine/engine.py"))
SUITES = (PADDLEOCR, PADDLEDET)  # checkout_for_one_of's default pool; posthoc sweep passes every registered suite's


def is_checkout(folder: str, suite: Suite) -> bool:
    return all(os.path.exists(os.path.join(folder, p)) for p in suite.required)


def find_checkout(suite: Suite, explicit: Optional[str]) -> str:
    """The checkout to run, by one rule for every command: the flag (``--paddleocr-root DIR``), else the environment
    variable (``$PADDLEOCR_ROOT``), else the working directory when it is a checkout, else the folder above an
    installed package that is one (ppdet). Checked (``check_checkout``); an error names where the folder came from,
    or every way to give one."""
    if explicit:
        return check_checkout(explicit, suite.option, suite.name, suite.required)
    if os.environ.get(suite.env):
        return check_checkout(os.environ[suite.env], f"${suite.env}", suite.name, suite.required)
    here = os.getcwd()
    if is_checkout(here, suite):
        return here
    spec = importlib.util.find_spec(suite.package) if suite.package else None
    if spec is not None and spec.origin:
        above = os.path.dirname(os.path.dirname(os.path.abspath(spec.origin)))
        if is_checkout(above, suite):
            return above
    installed = f", nor is the folder above the installed {suite.package}" if spec is not None else ""
    raise CheckoutError(f"{suite.option} / ${suite.env}: not set, and the working directory {here} is not a "
                        f"{suite.name} checkout{installed}; give the checkout's folder, or run from it"
                        + (" (the pip wheel lacks the training code)" if suite is PADDLEOCR else ""))


def checkout_for_one_of(explicit: Sequence[Optional[str]], command: str,
                        suites: Sequence[Suite] = ()) -> Tuple[Suite, str]:
    """For a command that works with any of ``suites`` (default ``SUITES``; ``posthoc sweep`` passes the registered
    ways in's): ``explicit`` is each suite's flag value, in that order. The suite is the one whose flag is given,
    else whose environment variable is set, else the one the working directory is a checkout of; then
    ``find_checkout``. Two given (or set) is an error."""
    pool = tuple(suites) or SUITES
    given = [s for s, value in zip(pool, explicit) if value]
    if len(given) > 1:
        raise CheckoutError(f"{command}: {' and '.join(s.option for s in given)} both given; give one: the suite "
                            "whose tools/eval.py evaluates")
    if not given:
        given = [s for s in pool if os.environ.get(s.env)]
        if len(given) > 1:
            raise CheckoutError(f"{command}: {' and '.join('$' + s.env for s in given)} are both set; give "
                                f"{' or '.join(s.option for s in pool)} to say whose tools/eval.py evaluates")
    if not given:
        given = [s for s in pool if is_checkout(os.getcwd(), s)]
    if not given:
        raise CheckoutError(f"{command}: which suite evaluates? give {' or '.join(s.option for s in pool)} (or set "
                            f"{' or '.join('$' + s.env for s in pool)}, or run from a checkout)")
    suite = given[0]
    return suite, find_checkout(suite, dict(zip(pool, explicit)).get(suite))


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

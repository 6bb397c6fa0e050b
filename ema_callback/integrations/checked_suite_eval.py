"""A suite's own ``tools/eval.py``, refusing weights that do not fit the model its config builds.

    python -m ema_callback.integrations.checked_suite_eval --expect NAMES.json --suite paddleocr|paddledet|... \
        ROOT/tools/eval.py -c cfg.yml -o ...

runs the script as ``python tools/eval.py`` would, with the suite's weight loading wrapped by its adapter
(``SuiteAdapter.install_eval_check``: PaddleOCR's ``ppocr.utils.save_load.load_model``, ppdet's
``Trainer.load_weights``): before any weight is loaded, the names and
shapes of the model's state dict are compared with ``NAMES.json`` (``{name: shape}`` of the weights about to be
evaluated). On a mismatch it prints one line and exits 3, before evaluating: both suites only warn about a
missing or misshapen tensor and would evaluate random weights (``posthoc sweep`` uses it on every reconstruction).
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
from typing import Dict, List, Mapping

from ema_callback.errors import short_list

MISMATCH_EXIT = 3
PREFIX = "ema-callback: weights do not fit the model the config builds: "


def mismatch(model_shapes: Mapping[str, List[int]], expected: Mapping[str, List[int]]) -> str:
    """What differs between the model's ``{name: shape}`` and the weights' (empty: they fit)."""
    missing = sorted(set(model_shapes) - set(expected))
    extra = sorted(set(expected) - set(model_shapes))
    shapes = sorted(k for k in set(model_shapes) & set(expected) if list(model_shapes[k]) != list(expected[k]))

    def short(items):
        return short_list(items, 4)

    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's tensors are not in the weights ({short(missing)})")
    if extra:
        parts.append(f"{len(extra)} tensors of the weights are not in the model ({short(extra)})")
    if shapes:
        parts.append("shape mismatch " + short([f"{k} model {list(model_shapes[k])} != weights {list(expected[k])}"
                                                for k in shapes]))
    return "; ".join(parts)


def _check(model, expected: Dict[str, List[int]]) -> None:
    found = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    problem = mismatch(found, expected)
    if problem:
        print(PREFIX + problem, file=sys.stderr, flush=True)
        sys.exit(MISMATCH_EXIT)


def _install(suite: str, expected: Dict[str, List[int]]) -> None:
    """The suite's adapter wraps its weight loading with the check (``SuiteAdapter.install_eval_check``)."""
    from ema_callback.integrations.registry import by_module_name

    by_module_name()[suite].adapter().install_eval_check(lambda model: _check(model, expected))


def main(argv=None) -> None:
    import zlib  # noqa: F401  (before paddle: Paddle#70538 under 2.6)

    p = argparse.ArgumentParser(prog="python -m ema_callback.integrations.checked_suite_eval")
    p.add_argument("--expect", required=True)
    from ema_callback.integrations.registry import by_module_name

    p.add_argument("--suite", required=True, choices=tuple(by_module_name()))
    p.add_argument("script")
    args, rest = p.parse_known_args(argv)
    with open(args.expect, encoding="utf-8") as handle:
        expected = json.load(handle)
    root = os.path.dirname(os.path.dirname(os.path.abspath(args.script)))
    sys.path.insert(0, root)
    _install(args.suite, expected)
    sys.argv = [args.script] + rest
    runpy.run_path(args.script, run_name="__main__")


if __name__ == "__main__":
    main()

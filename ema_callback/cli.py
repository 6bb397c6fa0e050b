"""The ``ema-callback`` command: a thin entry point over the package's modules.

    ema-callback demo [--steps N --decay D --out DIR --seed S]
    ema-callback merge-config SUITE.yml BLOCK.yml -o OUT.yml [--set EMA.key=value ...]
    ema-callback ocr-train -c cfg.yml [-o Key=val ...] [--paddleocr-root DIR] [--ema-config BLOCK.yml]
    ema-callback det-train -c cfg.yml [-o key=val ...] [--eval] [-r ckpt] [--paddledet-root DIR]
    ema-callback script-path ocr|det     (the script form for python -m paddle.distributed.launch)
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .config import EMAConfigError, split_overrides
from .errors import UnsupportedPaddleError


def _script_path(argv: List[str]) -> int:
    """``ema-callback script-path ocr|det``: the script to give ``python -m paddle.distributed.launch``."""
    import os
    names = {"ocr": "launch_ocr.py", "det": "launch_det.py"}
    if len(argv) != 1 or argv[0] not in names:
        raise EMAConfigError("script-path: expected 'ocr' or 'det'")
    print(os.path.join(os.path.dirname(os.path.abspath(__file__)), names[argv[0]]))
    return 0


def _merge_config(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="ema-callback merge-config",
                                     description="Write SUITE.yml with BLOCK.yml merged as its EMA: section "
                                                 "(the suite's own EMA: keys win; --set wins over both).")
    parser.add_argument("suite")
    parser.add_argument("block")
    parser.add_argument("-o", "--out", required=True, help="the merged YAML to write")
    parser.add_argument("--set", nargs="+", default=[], metavar="EMA.key=value")
    args = parser.parse_args(argv)
    overrides, rest = split_overrides(args.set)
    if rest:
        raise EMAConfigError(f"--set {rest[0]!r}: only EMA.* keys can be set here")
    from .merge import merge_config_files
    merge_config_files(args.suite, args.block, args.out, overrides)
    print(f"wrote {args.out}")
    return 0


def setup_logging() -> None:
    """EMA messages on stderr (INFO and up), once, whatever the suite does with the root logger."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message="No ccache found")
    warnings.filterwarnings("ignore", message="When training, we now always track global mean and variance")
    log = logging.getLogger("ema_callback")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s] ema_callback %(levelname)s: %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def script_main(command: str, argv: Optional[List[str]] = None) -> int:
    """Entry of the script forms (``launch_ocr.py``/``launch_det.py``) used with paddle.distributed.launch."""
    return main([command] + list(sys.argv[1:] if argv is None else argv))


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    commands = {
        "demo": lambda rest: __import__("ema_callback.demo", fromlist=["main"]).main(rest),
        "merge-config": _merge_config,
        "ocr-train": lambda rest: __import__("ema_callback.ocr", fromlist=["main"]).main(rest),
        "det-train": lambda rest: __import__("ema_callback.det", fromlist=["main"]).main(rest),
        "script-path": _script_path,
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__.strip())
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    try:
        return int(commands[argv[0]](argv[1:]) or 0)
    except EMAConfigError as exc:
        print(f"ema-callback: error: {exc}", file=sys.stderr)
        return 2
    except UnsupportedPaddleError as exc:
        print(str(exc), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

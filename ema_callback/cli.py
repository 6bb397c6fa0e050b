"""ema-callback: exponential moving average of model weights for PaddlePaddle training.

commands:
    ema-callback demo [--steps N --decay D --out DIR --seed S]
    ema-callback merge-config SUITE.yml BLOCK -o OUT.yml [--set EMA.key=value ...]
    ema-callback presets                 (the ready EMA: blocks; BLOCK is a file or a preset's name)
    ema-callback posthoc reconstruct|sweep --snapshots DIR --sigma-rel ...   (post-hoc EMA, after training)
    ema-callback script-path NAME        (the script form of a suite command, for python -m paddle.distributed.launch)
    ema-callback --version

Run ema-callback COMMAND --help for the options of each command.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ema_callback.config.files import split_overrides
from ema_callback.errors import EMAError, UnsupportedPaddleError
from ema_callback.integrations.registry import WAYS_IN


def _script_path(argv: List[str]) -> int:
    """``ema-callback script-path ocr|det|...``: the script to give ``python -m paddle.distributed.launch``."""
    import os

    parser = argparse.ArgumentParser(prog="ema-callback script-path",
                                     description="Print the path of the script form of a suite command ("
                                                 + ", ".join(w.command for w in WAYS_IN)
                                                 + "), for python -m paddle.distributed.launch (which takes a "
                                                 "script path).")
    parser.add_argument("command", choices=tuple(w.short for w in WAYS_IN),
                        help=" or ".join(f"{w.short} ({w.command})" for w in WAYS_IN))
    args = parser.parse_args(argv)
    print(os.path.join(os.path.dirname(os.path.abspath(__file__)), "integrations", f"launch_{args.command}.py"))
    return 0


def _merge_config(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="ema-callback merge-config",
                                     description="Write SUITE.yml with BLOCK.yml merged as its EMA: section "
                                                 "(the suite's own EMA: keys win; --set wins over both).")
    parser.add_argument("suite", help="the suite's YAML (PaddleOCR or PaddleDetection); it is only read")
    parser.add_argument("block", help="a ready EMA: block: a file, or a preset's name (ema-callback presets)")
    parser.add_argument("-o", "--out", required=True, help="the merged YAML to write")
    parser.add_argument("--set", nargs="+", default=[], metavar="EMA.key=value",
                        help="EMA keys to set in the merged section (win over the block and the suite's section)")
    args = parser.parse_args(argv)
    overrides, rest = split_overrides(args.set)
    if rest:
        raise EMAError(f"--set {rest[0]!r}: only EMA.* keys can be set here")
    from ema_callback.config.merge import merge_config_files
    from ema_callback.integrations.paddledet import load_ppdet_yaml  # ppdet's _BASE_ (use_ema), no paddle import

    for note in merge_config_files(args.suite, args.block, args.out, overrides, read_inherited=load_ppdet_yaml):
        print(f"merge-config: {note}")
    print(f"wrote {args.out}")
    return 0


def _presets(argv: List[str]) -> int:
    argparse.ArgumentParser(prog="ema-callback presets", description="List the ready EMA: blocks shipped with the "
                            "package; --ema-config, merge-config and EMACallback.from_config take their "
                            "names.").parse_args(argv)
    from ema_callback.config.presets import listing, presets_folder

    for line in listing():
        print(line)
    print(f"(files in {presets_folder()})")
    return 0


def _usage() -> str:
    """The module docstring with one line per registered suite command (``registry.WAYS_IN``) after merge-config."""
    lines = __doc__.strip().splitlines()
    at = next(i for i, line in enumerate(lines) if "ema-callback merge-config" in line) + 1
    return "\n".join(lines[:at] + [f"    ema-callback {w.command} {w.usage}" for w in WAYS_IN] + lines[at:])


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
        "demo": lambda rest: __import__("ema_callback.demo.run", fromlist=["main"]).main(rest),
        "merge-config": _merge_config,
        **{w.command: w.main for w in WAYS_IN},
        "posthoc": lambda rest: __import__("ema_callback.posthoc.cli", fromlist=["main"]).main(rest),
        "script-path": _script_path,
        "presets": _presets,
    }
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from ema_callback import __version__
        print(f"ema-callback {__version__}")
        return 0
    if argv[0] not in commands:
        print(f"ema-callback: error: unknown command {argv[0]!r}; expected one of {', '.join(commands)} "
              "(ema-callback --help)", file=sys.stderr)
        return 2
    try:
        return int(commands[argv[0]](argv[1:]) or 0)
    except EMAError as exc:
        print(f"ema-callback: error: {exc}", file=sys.stderr)
        return 2
    except UnsupportedPaddleError as exc:
        print(str(exc), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

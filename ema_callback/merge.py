"""Merge a ready ``EMA:`` block into a suite YAML without editing the suite file.

Precedence, lowest first: the ready block < the suite's own ``EMA:`` section < ``-o EMA.*`` overrides.
``merge_yaml_text`` keeps the suite text (its keys, order and comments) verbatim and only appends or
rewrites the top-level ``EMA:`` section.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import yaml

from .config import SECTION, EMAConfig, EMAConfigError, apply_overrides, load_suite_yaml, read_block_file

_TOP_LEVEL_KEY = re.compile(r"^[^\s#-][^:]*:")


def _section_span(lines: List[str]) -> Optional[Tuple[int, int]]:
    """Line range [start, end) of the top-level ``EMA:`` section, or None."""
    start = None
    for i, line in enumerate(lines):
        if start is None and re.match(rf"^{SECTION}\s*:", line):
            start = i
        elif start is not None and _TOP_LEVEL_KEY.match(line):
            return start, i
    return (start, len(lines)) if start is not None else None


def _dump_section(block: Mapping[str, Any]) -> str:
    return yaml.safe_dump({SECTION: dict(block)}, default_flow_style=None, sort_keys=False)


def merge_yaml_text(suite_text: str, block: Mapping[str, Any], block_text: Optional[str] = None,
                    overrides: Iterable[Tuple[List[str], Any]] = ()) -> str:
    """Suite YAML text with the merged ``EMA:`` section (validated)."""
    suite = load_suite_yaml(suite_text) or {}
    if not isinstance(suite, Mapping):
        raise EMAConfigError("suite config: expected a YAML mapping at the top level")
    own = suite.get(SECTION) or {}
    if not isinstance(own, Mapping):
        raise EMAConfigError(f"{SECTION}: expected a mapping of keys to values, got {own!r}")
    merged: Dict[str, Any] = dict(block)
    merged.update(own)
    merged = apply_overrides(merged, overrides)
    EMAConfig.from_block(merged)
    lines = suite_text.splitlines(keepends=True)
    span = _section_span(lines)
    if span is None and not list(overrides) and block_text is not None:
        body = block_text  # no section of its own: append the ready block with its comments
    else:
        body = _dump_section(merged)
    if span is None:
        head = suite_text if suite_text.endswith("\n") or not suite_text else suite_text + "\n"
        return head + "\n" + body
    start, end = span
    return "".join(lines[:start]) + body + "".join(lines[end:])


def merge_config_files(suite_path: str, block_path: str, out_path: str,
                       overrides: Iterable[Tuple[List[str], Any]] = ()) -> None:
    """``ema-callback merge-config SUITE.yml BLOCK.yml -o OUT.yml``."""
    block = read_block_file(block_path)
    with open(block_path, "r", encoding="utf-8") as handle:
        block_text = handle.read()
    try:
        with open(suite_path, "r", encoding="utf-8") as handle:
            suite_text = handle.read()
    except OSError as exc:
        raise EMAConfigError(f"{suite_path}: cannot be read ({exc.strerror})") from None
    try:
        merged = merge_yaml_text(suite_text, block, block_text, list(overrides))
    except yaml.YAMLError as exc:
        raise EMAConfigError(f"{suite_path}: not valid YAML ({' '.join(str(exc).split())})") from None
    from .files import atomic_write_text
    atomic_write_text(merged, out_path)

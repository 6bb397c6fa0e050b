"""Merge a ready ``EMA:`` block into a suite YAML without editing the suite file.

Precedence, lowest first: the ready block < the suite's own ``EMA:`` section < ``-o EMA.*`` overrides.
``merge_yaml_text`` keeps the suite text (its keys, order and comments) verbatim and edits only the top-level
``EMA:`` section, line by line: the section keeps block style and its comments (the ready block's, when the suite
has none), a key set with ``--set`` replaces its value in place (keeping a trailing comment) or is appended, a key
that another form of the EMA length replaces (``--set EMA.half_life_epochs=2`` over ``decay:``) is removed, and
block keys the suite's section lacks are appended. The result is parsed back and checked against the merged
values. On a ppdet config whose own ``use_ema: true`` (or its ``_BASE_``'s) turns ppdet's EMA on, the ``EMA:``
section replaces it (as ``det-train`` does with such a config): the merged file gets ``use_ema: false`` so that it
says so, and the command prints one line. A relative ``_BASE_`` (relative to the file that names it, in ppdet) is
rewritten relative to the merged file's folder, so the file works where it is written, and one line says so.
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Iterable, List, Mapping, Optional, Tuple

import yaml

from ema_callback.config.files import check_section_name, load_suite_yaml, merged_block, read_block_file, read_yaml
from ema_callback.config.schema import SECTION, EMAConfig, EMAConfigError

_TOP_LEVEL_KEY = re.compile(r"^[^\s#-][^:]*:")


def _section_span(lines: List[str], name: str = SECTION) -> Optional[Tuple[int, int]]:
    """Line range [start, end) of the top-level ``name:`` section, or None (trailing comments stay outside)."""
    start = None
    for i, line in enumerate(lines):
        if start is None and re.match(rf"^{re.escape(name)}\s*:", line):
            start = i
        elif start is not None and _TOP_LEVEL_KEY.match(line):
            end = i
            while end - 1 > start and lines[end - 1].lstrip().startswith("#"):
                end -= 1  # a comment right above the next key belongs to that key
            return start, end
    return (start, len(lines)) if start is not None else None


def _flow(value: Any) -> str:
    """A value as one YAML flow token (``0.999``, ``[a, b]``, ``'x: y'``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10 ** 6)
    if text.endswith("\n...\n"):  # a plain scalar document
        text = text[: -len("...\n")]
    return text.strip()


def _child_indent(section: List[str]) -> int:
    for line in section[1:]:
        if line.strip() and not line.lstrip().startswith("#"):
            return len(line) - len(line.lstrip())
    return 2


def _set_key(section: List[str], key: str, value: Any) -> List[str]:
    """The section's lines with ``key`` set to ``value``: replaced in place (trailing comment kept) or appended."""
    indent = _child_indent(section)
    pattern = re.compile(rf"^( {{{indent}}}){re.escape(key)}\s*:(?P<value>[^#\n]*?)(?P<comment>\s+#.*)?$")
    out = list(section)
    for i in range(1, len(out)):
        match = pattern.match(out[i].rstrip("\n"))
        if not match:
            continue
        end = i + 1  # a multi-line value (a block list) continues on more-indented lines
        while end < len(out) and (not out[end].strip() or len(out[end]) - len(out[end].lstrip()) > indent) \
                and not out[end].lstrip().startswith("#"):
            end += 1
        out[i:end] = [f"{' ' * indent}{key}: {_flow(value)}{match.group('comment') or ''}\n"]
        return out
    last = len(out)
    while last > 1 and not out[last - 1].strip():
        last -= 1
    if not out[last - 1].endswith("\n"):
        out[last - 1] += "\n"
    out.insert(last, f"{' ' * indent}{key}: {_flow(value)}\n")
    return out


def _drop_key(section: List[str], key: str) -> List[str]:
    """The section's lines without ``key`` (and its more-indented continuation lines); comment lines stay."""
    indent = _child_indent(section)
    pattern = re.compile(rf"^ {{{indent}}}{re.escape(key)}\s*:")
    out = list(section)
    for i in range(1, len(out)):
        if pattern.match(out[i]):
            end = i + 1
            while end < len(out) and out[end].strip() and len(out[end]) - len(out[end].lstrip()) > indent \
                    and not out[end].lstrip().startswith("#"):
                end += 1
            del out[i:end]
            return out
    return out


def _section_lines(text: str) -> List[str]:
    lines = text.splitlines(keepends=True)
    span = _section_span(lines)
    return lines[span[0]:span[1]] if span else [f"{SECTION}:\n"]


def merge_yaml_text(suite_text: str, block: Mapping[str, Any], block_text: Optional[str] = None,
                    overrides: Iterable[Tuple[List[str], Any]] = (), source: str = "suite config") -> str:
    """Suite YAML text (read from ``source``) with the merged ``EMA:`` section (validated)."""
    overrides = list(overrides)
    suite = load_suite_yaml(suite_text) or {}
    if not isinstance(suite, Mapping):
        raise EMAConfigError(f"{source}: expected a YAML mapping at the top level")
    check_section_name(suite, source)
    merged = merged_block(block, suite.get(SECTION), overrides)
    EMAConfig.from_block(merged)
    own = suite.get(SECTION) or {}
    lines = suite_text.splitlines(keepends=True)
    span = _section_span(lines)
    if span is None:  # the ready block's own section (with its comments), or a fresh one
        section = _section_lines(block_text) if block_text is not None else [f"{SECTION}:\n"]
        keys_present = dict(load_suite_yaml("".join(section)).get(SECTION) or {})
    else:
        section, keys_present = lines[span[0]:span[1]], dict(own)
    for key in keys_present:
        if key not in merged:  # replaced by another form of the EMA length (config.layered)
            section = _drop_key(section, key)
    for key, value in merged.items():
        if key not in keys_present or keys_present[key] != value:
            section = _set_key(section, key, value)
    body = "".join(section)
    if span is None:
        head = suite_text if suite_text.endswith("\n") or not suite_text else suite_text + "\n"
        comments = block_text[: block_text.find(SECTION + ":")] if block_text and SECTION + ":" in block_text else ""
        result = head + "\n" + comments + body
    else:
        result = "".join(lines[:span[0]]) + body + "".join(lines[span[1]:])
    if dict(load_suite_yaml(result).get(SECTION) or {}) != merged:  # the line edit must mean what was asked
        raise EMAConfigError(f"{SECTION}: could not rewrite the section in place; merged values {merged}")
    return result


def _ppdet_uses_its_own_ema(suite_path: str, suite: Mapping[str, Any],
                            read_inherited: Callable[[str], Mapping[str, Any]]) -> bool:
    if suite.get("use_ema") is True:
        return True
    if not suite.get("_BASE_"):
        return False
    return read_inherited(suite_path).get("use_ema") is True


def _set_top_level(text: str, key: str, value: Any) -> str:
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        match = re.match(rf"^{re.escape(key)}\s*:[^#\n]*?(?P<comment>\s+#.*)?$", line.rstrip("\n"))
        if match:
            lines[i] = f"{key}: {_flow(value)}{match.group('comment') or ''}\n"
            return "".join(lines)
    span = _section_span(lines)
    at = span[0] if span else len(lines)
    lines.insert(at, f"{key}: {_flow(value)}  # set by ema-callback merge-config: the {SECTION}: section replaces "
                     "ppdet's own EMA\n")
    return "".join(lines)


def _rebased(text: str, suite_path: str, out_path: str) -> Tuple[str, Optional[str]]:
    """``text`` with each relative ``_BASE_`` entry (ppdet resolves them from the folder of the file that names
    them) rewritten relative to ``out_path``'s folder, and the line saying so (None: nothing to rewrite)."""
    suite = load_suite_yaml(text)
    bases = suite.get("_BASE_") if isinstance(suite, Mapping) else None
    source, target = (os.path.dirname(os.path.abspath(p)) for p in (suite_path, out_path))
    if not isinstance(bases, list) or os.path.realpath(source) == os.path.realpath(target):
        return text, None
    moved = [b if not isinstance(b, str) or os.path.isabs(b) else os.path.relpath(os.path.join(source, b), target)
             for b in bases]
    if moved == bases:
        return text, None
    lines = text.splitlines(keepends=True)
    start, end = _section_span(lines, "_BASE_")
    blank = end
    while blank > start + 1 and not lines[blank - 1].strip():
        blank -= 1  # the blank lines after the list stay
    entries = "".join(f"  '{b.replace(chr(39), chr(39) * 2)}',\n" if isinstance(b, str) else f"  {_flow(b)},\n"
                      for b in moved)  # single-quoted, as ppdet writes them
    result = "".join(lines[:start]) + f"_BASE_: [\n{entries}]\n" + "".join(lines[blank:])
    if load_suite_yaml(result).get("_BASE_") != moved:
        raise EMAConfigError(f"{suite_path}: could not rewrite _BASE_ for {out_path}; write the merged file beside it")
    first = next(i for i, (a, b) in enumerate(zip(bases, moved)) if a != b)
    more = sum(a != b for a, b in zip(bases, moved)) - 1
    return result, (f"rewrote _BASE_ relative to {target} (ppdet reads it from the folder of the file that names "
                    f"it): {bases[first]} -> {moved[first]}" + (f" and {more} more" if more else ""))


def merge_config_files(suite_path: str, block_path: str, out_path: str,
                       overrides: Iterable[Tuple[List[str], Any]] = (),
                       read_inherited: Callable[[str], Mapping[str, Any]] = read_yaml) -> List[str]:
    """``ema-callback merge-config SUITE.yml BLOCK.yml -o OUT.yml``; returns notes to print. ``read_inherited``: the
    suite's own reader of a file with the files it inherits (ppdet's ``_BASE_``: ``paddledet.load_ppdet_yaml``,
    which the suite's adapter owns; the command line passes it)."""
    from ema_callback.config.presets import block_path as resolve

    block_path = resolve(block_path)
    block = read_block_file(block_path)
    read_yaml(suite_path)  # checked and bounded first (an alias bomb is refused here, naming the file)
    with open(block_path, "r", encoding="utf-8") as handle:
        block_text = handle.read()
    try:
        with open(suite_path, "r", encoding="utf-8") as handle:
            suite_text = handle.read()
    except OSError as exc:
        raise EMAConfigError(f"{suite_path}: cannot be read ({exc.strerror})") from None
    notes = []
    try:
        merged = merge_yaml_text(suite_text, block, block_text, list(overrides), source=suite_path)
        suite = load_suite_yaml(suite_text) or {}
    except yaml.YAMLError as exc:
        raise EMAConfigError(f"{suite_path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if isinstance(suite, Mapping) and _ppdet_uses_its_own_ema(os.path.abspath(suite_path), suite, read_inherited):
        merged = _set_top_level(merged, "use_ema", False)
        notes.append(f"set use_ema: false in {out_path} (use_ema: true in {suite_path} or its _BASE_): the "
                     f"{SECTION}: section replaces ppdet's own EMA, as det-train does with such a config; the file "
                     "now says so (ppdet's own tools/train.py runs it with no EMA)")
    merged, note = _rebased(merged, suite_path, out_path)
    notes += [note] if note else []
    from ema_callback.files.checkpoint_io import atomic_write_text
    atomic_write_text(merged, out_path)
    return notes

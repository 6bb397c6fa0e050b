"""Reading ``EMA:`` blocks from files and ``-o`` overrides, and their precedence (one function for every way in).

Precedence, lowest first: a ready block file (``--ema-config``) < the suite YAML's own ``EMA:`` section <
``-o EMA.*`` overrides (``merged_block``; ``resolve_block`` validates the result); a length stated in a higher
layer replaces the lower one's, with its warm-up (``schema.layered``). ``-o EMA.decay=0.999`` works when the YAML
has no ``EMA:`` section. Suite YAMLs are read with a safe loader that keeps suite tags
(PaddleDetection's ``!CosineDecay``) as plain data.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import yaml

from ema_callback.config.schema import LENGTH_KEYS, SECTION, EMAConfig, layered
from ema_callback.errors import EMAConfigError


def parse_override(text: str) -> Tuple[List[str], Any]:
    """``'EMA.decay=0.999'`` -> ``(['EMA', 'decay'], 0.999)``; the value is read as YAML (PaddleOCR's rule)."""
    if not isinstance(text, str) or "=" not in text:
        raise EMAConfigError(f"-o {text!r}: expected KEY=VALUE, e.g. EMA.decay=0.9999")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")) or not key.isprintable():
        raise EMAConfigError(f"-o {text!r}: expected KEY=VALUE with a dotted key, e.g. EMA.decay=0.9999")
    try:
        if raw.strip():
            _check_nesting(raw)
        value = yaml.load(raw, Loader=BoundedLoader) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise EMAConfigError(f"-o {key!r}: value {raw!r} is not valid YAML ({str(exc).splitlines()[0]})") from None
    except EMAConfigError as exc:
        raise EMAConfigError(f"-o {key!r}: {exc}") from None
    except (ValueError, OverflowError, TypeError) as exc:  # e.g. an impossible date: 2024-13-45
        raise EMAConfigError(f"-o {key!r}: value {raw!r} cannot be read ({exc})") from None
    return key.split("."), value


def split_overrides(opts: Optional[Sequence[str]]) -> Tuple[List[Tuple[List[str], Any]], List[str]]:
    """Separate ``EMA.*`` overrides (parsed) from the suite's own (kept as strings, untouched); an ``EMA`` key
    anywhere else (``Global.EMA.decay``, ``ema.decay``) would be set in the suite config and read by no one: an
    error."""
    ema, rest = [], []
    for text in opts or []:
        head = text.split("=", 1)[0].strip()
        if head == SECTION or head.startswith(SECTION + "."):
            ema.append(parse_override(text))
            continue
        parts = head.split(".")
        for i, part in enumerate(parts):
            if part.upper() == SECTION:  # the suite would set a key nobody reads
                raise EMAConfigError(f"-o {text!r}: {'.'.join(parts[:i + 1])} is not read; set EMA keys as "
                                     f"-o {SECTION}.key=value (the {SECTION}: section is top-level, upper case)")
        rest.append(text)
    return ema, rest


def apply_overrides(block: Optional[Mapping[str, Any]], overrides: Iterable[Tuple[List[str], Any]]) -> Dict[str, Any]:
    """Apply parsed ``EMA.*`` overrides to a block (a copy); works when the YAML had no ``EMA:`` section.

    The ``-o`` list is one layer: a key given twice keeps its last value, two forms of the EMA length in the list
    are an error (as in one YAML block), and a length form in it replaces the block's (``config.layered``).
    ``EMA.posthoc.KEY=VALUE`` sets one key of the ``posthoc`` sub-block."""
    merged: Dict[str, Any] = dict(block or {})
    layer: Dict[str, Any] = {}
    where: Dict[str, str] = {}
    for parts, value in overrides:
        text = ".".join(parts)
        if parts[0] != SECTION:
            raise EMAConfigError(f"-o {text!r}: not an {SECTION}.* key")
        if parts == [SECTION]:
            if not isinstance(value, Mapping):
                raise EMAConfigError(f"-o {SECTION}: expected a mapping, got {value!r}")
            layer.update(value)
            where.update({str(k): f"{SECTION}={{{k}: ...}}" for k in value})
        elif len(parts) == 2:
            layer[parts[1]] = value
            where[parts[1]] = f"{text}=..."
        elif len(parts) == 3 and parts[1] == "posthoc":
            current = layer.get("posthoc", merged.get("posthoc"))
            layer["posthoc"] = dict(current if isinstance(current, Mapping) else {}, **{parts[2]: value})
        else:
            raise EMAConfigError(f"-o {text!r}: EMA keys are one level deep (EMA.decay=0.999), except the posthoc "
                                 f"sub-block's (EMA.posthoc.snapshot_every=5, or -o \"EMA.posthoc={{snapshot_every: "
                                 f"5}}\")")
    forms = [k for k in LENGTH_KEYS if layer.get(k) is not None]
    if len(forms) > 1:
        raise EMAConfigError(f"-o {where[forms[0]]} and -o {where[forms[1]]}: give the EMA length one way in one list "
                             "of overrides (decay, decays, half_life_images, half_life_epochs or length); an override "
                             "replaces the form of the YAML's EMA: section or --ema-config block")
    return layered(merged, layer)


MAX_EXPANDED_NODES = 100_000  # a suite config has a few thousand values; aliases nested 25 deep stand for 33 million


_BASE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser where PyYAML has it (10x faster)


class BoundedLoader(_BASE_LOADER):
    """PyYAML's safe loader, refusing a document whose aliases expand beyond ``MAX_EXPANDED_NODES`` nodes or refer to
    themselves (an alias bomb: a few hundred bytes that every later merge, copy or message would walk
    exponentially)."""

    def construct_document(self, node):
        _check_expansion(node)
        return super().construct_document(node)


def _check_expansion(root: yaml.Node) -> None:
    """Count the nodes of ``root`` as they expand (every alias counted again), each node's count computed once;
    stop as soon as more than ``MAX_EXPANDED_NODES`` nodes were seen (a long flat list as well as an alias bomb)."""
    sizes: Dict[int, int] = {}
    in_progress = set()
    stack = [(root, False)]
    seen = 0
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        value = node.value
        if isinstance(node, yaml.MappingNode):
            children = [item for pair in value for item in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = value
        else:
            sizes[key] = 1
            continue
        if not children_done:
            if key in in_progress:
                raise EMAConfigError(f"line {node.start_mark.line + 1}: an alias that contains itself (a recursive "
                                     "YAML structure); suite configs never need one")
            seen += len(children)
            if seen > MAX_EXPANDED_NODES:
                raise EMAConfigError(f"line {node.start_mark.line + 1}: more than {MAX_EXPANDED_NODES:,} values; "
                                     "suite configs hold a few thousand")
            in_progress.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)
            continue
        in_progress.discard(key)
        sizes[key] = 1 + sum(sizes.get(id(child), 0) for child in children)
        if sizes[key] > MAX_EXPANDED_NODES:
            raise EMAConfigError(f"line {node.start_mark.line + 1}: aliases that expand to more than "
                                 f"{MAX_EXPANDED_NODES:,} values (an alias bomb); suite configs hold a few thousand")


class SuiteLoader(BoundedLoader):
    """``BoundedLoader`` that also reads suite-specific tags (PaddleDetection's ``!CosineDecay``...) as plain data."""


def _construct_tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


SuiteLoader.add_multi_constructor("!", _construct_tagged)


MAX_NESTING = 100  # brackets open at once, or columns of indentation / 2: a suite config nests about 6 deep


def _check_nesting(text: str) -> None:
    """Refuse text nested deeper than ``MAX_NESTING`` before PyYAML reads it (its scanner and composer slow down with
    the square of the depth: 100,000 nested brackets would take hours)."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(depth - 1, 0)
    indent = max((len(line) - len(line.lstrip(" ")) for line in text.splitlines()), default=0)
    if deepest > MAX_NESTING or indent > 2 * MAX_NESTING:
        where = f"{deepest} brackets open at once" if deepest > MAX_NESTING else f"lines indented {indent} columns"
        raise EMAConfigError(f"nested deeper than a config can be ({where}; at most {MAX_NESTING} levels are read)")


def load_suite_yaml(text: str) -> Any:
    """Parse a suite YAML (custom tags become plain data; nesting and aliases bounded)."""
    _check_nesting(text)
    return yaml.load(text, Loader=SuiteLoader)


MAX_YAML_BYTES = 256 << 10  # a suite config is a few kilobytes (PyYAML composes about 0.3 MB a second)


def read_yaml(path: str) -> Any:
    """Load a YAML file, with one-line errors naming the file (aliases bounded: ``SuiteLoader``)."""
    if not os.path.isfile(path):
        raise EMAConfigError(f"{path}: no such file")
    try:
        if os.path.getsize(path) > MAX_YAML_BYTES:
            raise EMAConfigError(f"{path}: {os.path.getsize(path):,} bytes, larger than a config can be "
                                 f"({MAX_YAML_BYTES:,})")
        with open(path, "r", encoding="utf-8") as handle:
            return load_suite_yaml(handle.read())
    except EMAConfigError as exc:
        message = str(exc)
        raise EMAConfigError(message if message.startswith(path) else f"{path}: {message}") from None
    except yaml.YAMLError as exc:
        raise EMAConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    except (OSError, UnicodeDecodeError, RecursionError, ValueError, OverflowError) as exc:
        raise EMAConfigError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None


def read_block_file(path: str) -> Dict[str, Any]:
    """A ready block (a file, or a preset's name: ``config.presets``): a YAML mapping with one top-level ``EMA:``
    key."""
    from ema_callback.config.presets import block_path

    path = block_path(path)
    data = read_yaml(path)
    check_section_name(data, path)
    if not isinstance(data, Mapping) or SECTION not in data:
        raise EMAConfigError(f"{path}: expected a YAML file with a top-level '{SECTION}:' section")
    extra = [k for k in data if k != SECTION]
    if extra:
        raise EMAConfigError(f"{path}: a block file holds only '{SECTION}:', found also {', '.join(map(str, extra))}")
    block = data[SECTION] or {}
    EMAConfig.from_block(block)  # validate early, naming the key
    return dict(block)


def merged_block(block: Optional[Mapping[str, Any]], suite_section: Any,
                 overrides: Iterable[Tuple[List[str], Any]] = ()) -> Dict[str, Any]:
    """The one precedence rule: ready block < the suite's own ``EMA:`` section < ``-o EMA.*`` overrides."""
    if suite_section is not None and not isinstance(suite_section, Mapping):
        raise EMAConfigError(f"{SECTION}: expected a mapping of keys to values, got {suite_section!r}")
    merged = layered(dict(block or {}), suite_section or {})
    return apply_overrides(merged, overrides)


def resolve_block(suite_config: Mapping[str, Any], block_file: Optional[str] = None,
                  overrides: Iterable[Tuple[List[str], Any]] = ()) -> EMAConfig:
    """``merged_block`` of a block file, a suite config's section and overrides, validated; a merged block that
    states no length is ``length: auto`` (``integrations.auto_length``)."""
    block = read_block_file(block_file) if block_file else {}
    own = suite_config.get(SECTION) if isinstance(suite_config, Mapping) else None
    merged = merged_block(block, own, overrides)
    if not any(merged.get(k) is not None for k in LENGTH_KEYS):
        merged["length"] = "auto"
    return EMAConfig.from_block(merged)


def has_ema_request(suite_config: Mapping[str, Any], block_file: Optional[str], overrides: Sequence) -> bool:
    """Whether the user asked for EMA at all (a section, a block file or an ``EMA.*`` override)."""
    return bool(block_file) or bool(overrides) or (isinstance(suite_config, Mapping) and SECTION in suite_config)


def check_section_name(suite_config: Mapping[str, Any], source: str) -> None:
    """A top-level ``ema:``/``Ema:`` is not read: one line pointing at ``EMA:`` instead of silently ignoring it; a
    section anywhere below the top level neither (``check_section_place``)."""
    if not isinstance(suite_config, Mapping):
        return
    for key in suite_config:
        if isinstance(key, str) and key != SECTION and key.upper() == SECTION:
            raise EMAConfigError(f"{source}: top-level '{key}:' is not read; the section is '{SECTION}:' (upper case)")
    check_section_place(suite_config, source)


def check_section_place(suite_config: Any, source: str) -> None:
    """An ``EMA:`` key (any case) nested in the suite config (``TrainReader.EMA``, ``Global.EMA``, in a list item)
    is not read by anyone: one line naming where it is and where it belongs."""
    def walk(node: Any, path: str) -> None:
        items = node.items() if isinstance(node, Mapping) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            where = f"{path}[{key}]" if isinstance(node, list) else f"{path}.{key}" if path else str(key)
            if path and isinstance(key, str) and key.upper() == SECTION:
                raise EMAConfigError(f"{source}: {where}: not read; the {SECTION}: section belongs at the top level "
                                     f"of the file, not under {path}")
            walk(value, where)

    walk(suite_config, "")


def why_disabled(suite_config: Mapping[str, Any], block_file: Optional[str], overrides: Sequence,
                 source: str) -> str:
    """Where an ``EMA.enable: false`` (or the absence of any EMA request) came from, for the one 'off' line."""
    for parts, value in reversed(list(overrides)):
        if parts == [SECTION, "enable"] or (parts == [SECTION] and isinstance(value, Mapping) and "enable" in value):
            return "-o EMA.enable=false"
    own = suite_config.get(SECTION) if isinstance(suite_config, Mapping) else None
    if isinstance(own, Mapping) and own.get("enable") is False:
        return f"EMA.enable: false in {source}"
    if block_file:
        return f"EMA.enable: false in {block_file}"
    return f"no {SECTION}: section in {source}, no --ema-config and no -o {SECTION}.* option"

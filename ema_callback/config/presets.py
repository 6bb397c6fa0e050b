"""The ready ``EMA:`` blocks shipped with the package (the repository's ``configs/``, installed as the package data
``ema_callback.configs``), by name.

A preset's name is its file name without ``.yml`` and without an ``ema_`` prefix: ``configs/ema/short_run.yml`` is
``short_run``, ``configs/paddleocr/ema_ppocrv4_rec.yml`` is ``ppocrv4_rec``. Only block files count (one top-level
``EMA:`` section); the example suite configs beside them (``tiny_rec_ctc.yml``) are not presets. Its description is
the first sentence of its leading comment. ``--ema-config`` and ``EMACallback.from_config`` take a path or a name
(``block_path``); ``ema-callback presets`` lists them.
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

from ema_callback.config.schema import SECTION
from ema_callback.errors import EMAConfigError


def presets_folder() -> str:
    """``ema_callback/configs``: the installed package data, or in a checkout the link to ``configs/``."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _is_block(path: str) -> bool:
    from ema_callback.config.files import load_suite_yaml

    with open(path, encoding="utf-8") as handle:
        data = load_suite_yaml(handle.read())
    return isinstance(data, dict) and list(data) == [SECTION]


def presets() -> Dict[str, Tuple[str, str]]:
    """``{name: (path, description)}`` of every shipped block."""
    out: Dict[str, Tuple[str, str]] = {}
    root = presets_folder()
    for folder in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        sub = os.path.join(root, folder)
        if not os.path.isdir(sub):
            continue
        for name in sorted(os.listdir(sub)):
            path = os.path.join(sub, name)
            if name.endswith(".yml") and _is_block(path):
                key = name[:-len(".yml")]
                key = key[len("ema_"):] if key.startswith("ema_") else key
                out[key] = (path, _description(path))
    return out


def _description(path: str) -> str:
    """The first sentence of the file's leading comment."""
    words = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.startswith("#"):
                break
            words += line.lstrip("#").split()
    text = " ".join(words)
    end = text.find(". ")
    return text[:end + 1] if end >= 0 else text


def block_path(value: str, given_as: str = "--ema-config {}") -> str:
    """``--ema-config`` / ``from_config``: an existing file as it is, else a preset's file by name. ``given_as``
    names the argument in the error (``{}``: the value), e.g. ``"EMACallback.from_config({!r})"``."""
    if os.path.isfile(value):
        return value
    known = presets()
    if value in known:
        return known[value][0]
    name = os.path.basename(value)[:-len(".yml")] if value.endswith(".yml") else None
    name = name[len("ema_"):] if name and name.startswith("ema_") else name
    hint = f"; that is the preset {name!r}: give its name, which works from any folder" if name in known else ""
    raise EMAConfigError(f"{given_as.format(value)}: no such file and no preset of that name{hint} (presets: "
                         f"{', '.join(known) or 'none found'}; `ema-callback presets` lists them)")


def listing() -> List[str]:
    """The lines ``ema-callback presets`` prints."""
    known = presets()
    width = max((len(k) for k in known), default=0)
    return [f"{name:<{width}}  {description}" for name, (_, description) in known.items()]

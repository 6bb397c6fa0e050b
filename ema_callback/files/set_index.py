"""Which checkpoint sets of a folder hold EMA weights: ``<folder>/.ema-sets.json``, published with each set.

A ``.pdema`` says what its set's ``.pdparams`` hold; when a resume finds the ``.pdema`` missing (deleted, not
copied along), nothing else would: a ``.pdparams`` of EMA weights looks like any other. Every save of ours records
``{set name: {"hold": what the .pdparams hold ("raw" or an EMA's label), "sha1": their fingerprint}}`` here, in
the same journal as the set itself (``checkpoint_set``), so a resume can tell EMA weights from raw ones and refuse
to train on EMA weights as raw (``integrations.checkpoints.check_missing_state``). A save with the EMA off over an
EMA run's set records ``raw``. The file is read bounded (1 MiB of JSON, names and values checked); a damaged one
is read as empty, with a warning: it only adds knowledge.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Dict, Mapping, Optional

logger = logging.getLogger("ema_callback")

NAME = ".ema-sets.json"
MAX_BYTES = 1 << 20
_SET_NAME = re.compile(r"^[\w.+-]+(/[\w.+-]+)*$")


def read_index(folder: str) -> Dict[str, Dict[str, Optional[str]]]:
    """The index of ``folder`` (empty when there is none or it is damaged)."""
    path = os.path.join(folder, NAME)
    if not os.path.isfile(path) or os.path.islink(path):
        return {}
    try:
        if os.path.getsize(path) > MAX_BYTES:
            raise ValueError(f"larger than {MAX_BYTES:,} bytes")
        with open(path, "r", encoding="utf-8") as handle:
            data = json.load(handle)
        if not isinstance(data, dict):
            raise ValueError("not a mapping")
        out = {}
        for name, entry in data.items():
            if not (isinstance(name, str) and _SET_NAME.match(name) and ".." not in name.split("/")
                    and isinstance(entry, dict) and isinstance(entry.get("hold"), str)
                    and (entry.get("sha1") is None or isinstance(entry.get("sha1"), str))):
                raise ValueError(f"entry {name!r:.60} is not a set name with what it holds")
            out[name] = {"hold": entry["hold"][:64], "sha1": entry.get("sha1")}
        return out
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        logger.warning("EMA: %s: unreadable (%s); read as empty", path, str(exc)[:120])
        return {}


def write_updated(folder: str, target: str, entries: Mapping[str, Mapping[str, Optional[str]]]) -> None:
    """Write to ``target`` (a staging path) the index of ``folder`` with ``entries`` set."""
    index = read_index(folder)
    index.update({name: dict(entry) for name, entry in entries.items()})
    with open(target, "w", encoding="utf-8") as handle:
        json.dump(dict(sorted(index.items())), handle, indent=0)


def entry_of(folder: str, name: str) -> Optional[Dict[str, Optional[str]]]:
    return read_index(folder).get(name)

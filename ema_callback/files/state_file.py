"""The ``.pdema`` file: the EMA state beside a suite's checkpoint, each tensor stored once per checkpoint set.

A ``.pdema`` holds the engine's ``state_dict()`` (counters, settings, the uncorrected shadow, copied tensors) and,
where a way in needs them, the raw weights. Its *companions* are the files of the same prefix that the suite (or
``save_as: raw``) writes beside it: ``<prefix>.pdparams`` and ``<prefix>.ema.pdparams``. Every tensor a companion
already holds bit for bit (same name, dtype, shape and bytes) is stored as a reference to it, not again:

* default settings (``save_as: ema``, float32 weights, no bias correction): the ``.pdparams`` hold the shadow
  exactly, so the ``.pdema`` keeps only the raw weights and counters (one copy of the averaged weights added);
* ``save_as: raw``: the ``.pdparams`` hold the raw weights and the ``.ema.pdparams`` the shadow, so the
  ``.pdema`` keeps only counters;
* what cannot be referenced stays in the file: with ``bias_correction`` the ``.pdparams`` hold
  ``shadow / (1 - prod d)``, not the shadow; AMP O2 float16 weights hold a rounded shadow; before
  ``eval_start_step`` the suite's files hold raw weights, so the shadow is stored.

Each companion's fingerprint (sha1 of its names, dtypes, shapes and bytes) is recorded, so a ``.pdema`` whose
``.pdparams`` were overwritten later (a run without EMA in the same folder) is refused with one line instead of
putting stale weights into a model. Reading goes through the restricted unpickler (``files.checked_load``).
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, Mapping, Optional

import numpy as np

from ema_callback.files.checkpoint_io import EMAFileError, checked_load

FORMAT = "ema-callback/2"
READABLE_FORMATS = ("ema-callback/1", FORMAT)  # /1 stored every tensor itself (no companions)
SECTIONS = ("shadow", "copies", "raw_weights")
COMPANIONS = "companions"


def fingerprint(arrays: Mapping[str, Any]) -> str:
    """sha1 over the sorted names, dtypes, shapes and bytes of a state dict of numpy arrays."""
    digest = hashlib.sha1()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(memoryview(value).cast("B"))
    return digest.hexdigest()


def _same_bits(a: Any, b: Any) -> bool:
    if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
        return False
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))


def store_once(state: Mapping[str, Any], companions: Mapping[str, Mapping[str, np.ndarray]]) -> Dict[str, Any]:
    """``state`` with every section entry a companion holds bit for bit replaced by a reference to it.

    ``companions`` maps a suffix (``".pdparams"``) to the arrays that ``<prefix><suffix>`` holds.
    """
    out = dict(state)
    references = []
    for suffix, arrays in companions.items():
        taken: Dict[str, list] = {}
        for section in SECTIONS:
            values = out.get(section)
            if not values:
                continue
            names = [name for name, value in values.items() if _same_bits(value, arrays.get(name))]
            if names:
                taken[section] = names
                kept = set(values) - set(names)
                out[section] = {name: value for name, value in values.items() if name in kept}
        references.append({"suffix": suffix, "sha1": fingerprint(arrays), "sections": taken})
    out[COMPANIONS] = references
    return out


def resolve(state: Dict[str, Any], path: str) -> Dict[str, Any]:
    """Fill the references of ``state`` (read from ``path``) from its companions; refuse changed companions."""
    prefix = path[: -len(".pdema")] if path.endswith(".pdema") else path
    for reference in state.pop(COMPANIONS, None) or []:
        companion = prefix + reference["suffix"]
        arrays = checked_load(companion)
        if not isinstance(arrays, dict) or fingerprint(arrays) != reference["sha1"]:
            raise EMAFileError(f"{path}: its companion {companion} was written after this EMA state (overwritten "
                               "by a later run in the same folder, or a save killed midway), so they are not one "
                               "checkpoint set; resume from another checkpoint, or delete the .pdema to use "
                               f"{os.path.basename(companion)} alone")
        for section, names in reference["sections"].items():
            state.setdefault(section, {}).update({name: arrays[name] for name in names})
    return state


def read_state(path: str, key: Optional[str] = None) -> Dict[str, Any]:
    """The complete EMA state in ``path`` (or in its entry ``key``), companions resolved.

    Returns the whole file's dict (other entries such as ``raw_weights`` included); without ``key`` the file must
    be an ema-callback state.
    """
    data = checked_load(path)
    if not isinstance(data, dict):
        raise EMAFileError(f"{path}: not an ema-callback state (a {type(data).__name__})")
    state = data.get(key) if key is not None else data
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise EMAFileError(f"{path}: not an ema-callback state (format {found!r}, expected {FORMAT!r})")
    resolve(state, path)
    return data

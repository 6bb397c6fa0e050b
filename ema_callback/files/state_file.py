"""The ``.pdema`` file: the EMA state beside a suite's checkpoint, each tensor stored once per checkpoint set,
with a digest of its payload, and checked whole before anything uses it.

A ``.pdema`` holds the engine's ``state_dict()`` (counters, settings, the uncorrected shadow, copied tensors) and,
where a way in needs them, the raw weights. Its *companions* are the files of the same prefix that the suite (or
``save_as: raw``) writes beside it: ``<prefix>.pdparams``, ``<prefix>.ema.pdparams``, ``<prefix>.pdopt`` and
PaddleOCR's ``<prefix>.states``. Every tensor a ``.pdparams`` companion already holds bit for bit (same name,
dtype, shape and bytes) is stored as a reference to it, not again:

* default settings (``save_as: ema``, float32 weights, no bias correction): the ``.pdparams`` hold the shadow
  exactly, so the ``.pdema`` keeps only the raw weights and counters (one copy of the averaged weights added);
* ``save_as: raw``: the ``.pdparams`` hold the raw weights and the ``.ema.pdparams`` the shadow, so the
  ``.pdema`` keeps only counters;
* what cannot be referenced stays in the file: with ``bias_correction`` the ``.pdparams`` hold
  ``shadow / (1 - prod d)``, not the shadow; AMP O2 float16 weights hold a rounded shadow; before
  ``eval_start_step`` the suite's files hold raw weights, so the shadow is stored.

Trust, in the order a read checks it (``read_state``; nothing is changed anywhere until all of it passed):

1. the file is read by the bounded, code-free reader (``checkpoint_io.checked_load``);
2. ``digest`` (format ``ema-callback/3``): sha256 of a canonical encoding of every other entry
   (``payload_digest``), so a flipped bit anywhere in the payload is refused at load time;
3. every field has the type and range the engine writes (``check_fields``: counters are non-negative integers
   with ``num_updates <= num_steps``, decay products lie in [0, 1], a run id is 12 hex digits, tensors are
   finite float arrays, ...), each failure one ``EMAFileError`` naming the file and the field;
4. each companion is named by a suffix from a fixed list (never a path taken from the file) and fingerprinted:
   sha1 of the names, dtypes, shapes and bytes of a ``.pdparams`` (``fingerprint``), sha256 of the bytes of a
   ``.pdopt``/``.states``; a companion written after this state (a later run in the same folder, a suite's own
   writer, a save killed midway) is refused with one line instead of mixing two checkpoints.

The engine then checks the state against the model (``engine_state.check_state``) before it takes any of it.
Files of the formats ``ema-callback/1`` and ``/2`` (earlier versions, no digest) are still read.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from typing import Any, Dict, Mapping, Optional

import numpy as np

from ema_callback.errors import EMAFileError, one_line
from ema_callback.files.checkpoint_io import checked_load

FORMAT = "ema-callback/3"
UNSIGNED_FORMATS = ("ema-callback/1", "ema-callback/2")  # /1 stored every tensor itself; neither has a digest
READABLE_FORMATS = UNSIGNED_FORMATS + (FORMAT,)
SECTIONS = ("shadow", "copies", "raw_weights")
COMPANIONS = "companions"
DIGEST = "digest"
ARRAY_COMPANIONS = (".pdparams", ".ema.pdparams")  # referenced tensor by tensor
FILE_COMPANIONS = (".pdopt", ".states")  # fingerprinted as files: a mix of sets is refused
RUN_ID = re.compile(r"^(?:[0-9a-f]{12}|legacy)$")


# ------------------------------------------------------------------------------------------------- fingerprints
def fingerprint(arrays: Mapping[str, Any]) -> str:
    """sha1 over the sorted names, dtypes, shapes and bytes of a state dict of numpy arrays."""
    digest = hashlib.sha1()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(memoryview(value).cast("B"))
    return digest.hexdigest()


def arrays_fingerprint(loaded: Mapping[str, Any]) -> str:
    """``fingerprint`` of the arrays of a loaded ``.pdparams`` (other entries left out)."""
    return fingerprint({k: v for k, v in loaded.items() if isinstance(v, np.ndarray)})


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _feed(digest, value: Any) -> None:
    """A canonical, typed encoding of plain data (what ``checked_load`` returns) into ``digest``."""
    if value is None:
        digest.update(b"N;")
    elif isinstance(value, (bool, np.bool_)):
        digest.update(b"B1;" if value else b"B0;")
    elif isinstance(value, np.ndarray) or isinstance(value, np.generic):
        array = np.ascontiguousarray(value)
        digest.update(f"A{array.dtype.str}{array.shape};".encode())
        digest.update(memoryview(array).cast("B") if array.size else b"")
    elif isinstance(value, int):
        digest.update(f"I{value:x};".encode())  # hexadecimal: no digit limit (decimal stops at 4,300 digits)
    elif isinstance(value, float):
        digest.update(f"F{value.hex()};".encode())
    elif isinstance(value, str):
        encoded = value.encode("utf-8", "surrogatepass")
        digest.update(f"S{len(encoded)};".encode() + encoded)
    elif isinstance(value, (bytes, bytearray)):
        digest.update(f"Y{len(value)};".encode() + bytes(value))
    elif isinstance(value, Mapping):
        digest.update(f"D{len(value)};".encode())
        for key in sorted(value, key=lambda k: (type(k).__name__, str(k))):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"{'L' if isinstance(value, list) else 'T'}{len(value)};".encode())
        for item in value:
            _feed(digest, item)
    else:
        raise TypeError(f"a {type(value).__name__} cannot be digested")


def payload_digest(state: Mapping[str, Any]) -> str:
    """sha256 (hex) of the canonical encoding of every entry of ``state`` but ``digest``."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in state.items() if k != DIGEST})
    return digest.hexdigest()


def with_digest(state: Mapping[str, Any]) -> Dict[str, Any]:
    """``state`` with its ``digest`` (a checksum anyone can recompute: it detects damage, not intent)."""
    out = dict(state)
    out[DIGEST] = payload_digest(out)
    return out


# -------------------------------------------------------------------------------------------------- each tensor once
def _same_bits(a: Any, b: Any) -> bool:
    if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
        return False
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))


def store_once(state: Mapping[str, Any], companions: Mapping[str, Mapping[str, np.ndarray]],
               files: Optional[Mapping[str, str]] = None,
               fingerprints: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """``state`` with every section entry a companion holds bit for bit replaced by a reference to it, the file
    companions fingerprinted, and its digest added.

    ``companions`` maps a suffix (``".pdparams"``) to the arrays that ``<prefix><suffix>`` holds; ``files`` maps a
    suffix of ``FILE_COMPANIONS`` to the path of the file written for this set (its bytes are fingerprinted);
    ``fingerprints``: the companions' ``fingerprint`` where the caller has it already (one set saved under several
    names).
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
        sha1 = (fingerprints or {}).get(suffix) or fingerprint(arrays)
        references.append({"suffix": suffix, "sha1": sha1, "sections": taken})
    out[COMPANIONS] = references
    for suffix, path in (files or {}).items():
        out = add_file_companion(out, suffix, path)
    return with_digest(out)


def add_file_companion(state: Mapping[str, Any], suffix: str, path: str) -> Dict[str, Any]:
    """``state`` that also fingerprints the file ``path`` (a ``FILE_COMPANIONS`` suffix of its set), digest
    renewed: a ``.pdopt`` or ``.states`` written after the state (ppdet writes its ``.pdopt`` last)."""
    out = dict(state)
    out[COMPANIONS] = list(out.get(COMPANIONS) or []) + [{"suffix": suffix, "sha256": file_sha256(path),
                                                          "sections": {}}]
    return with_digest(out)


def _check_references(references: Any, path: str) -> list:
    """The companion references of a state: a list of ``{suffix, sha1|sha256, sections}`` with a known suffix."""
    if not isinstance(references, list):
        raise EMAFileError(f"{path}: field {COMPANIONS}: expected a list, found a {type(references).__name__}")
    for reference in references:
        if not isinstance(reference, Mapping):
            raise EMAFileError(f"{path}: field {COMPANIONS}: an entry that is not a mapping")
        suffix = reference.get("suffix")
        if suffix not in ARRAY_COMPANIONS + FILE_COMPANIONS:
            raise EMAFileError(f"{path}: field {COMPANIONS}: suffix {one_line(repr(suffix), 80)} is not one of "
                               f"{', '.join(ARRAY_COMPANIONS + FILE_COMPANIONS)}")
        key, length = ("sha1", 40) if suffix in ARRAY_COMPANIONS else ("sha256", 64)
        value = reference.get(key)
        if not (isinstance(value, str) and len(value) == length and all(c in "0123456789abcdef" for c in value)):
            raise EMAFileError(f"{path}: field {COMPANIONS}: {suffix} has no valid {key}")
        sections = reference.get("sections")
        if not isinstance(sections, Mapping) or any(
                s not in SECTIONS or not isinstance(names, list) or not all(isinstance(n, str) for n in names)
                for s, names in sections.items()) or (sections and suffix in FILE_COMPANIONS):
            raise EMAFileError(f"{path}: field {COMPANIONS}: {suffix} has malformed sections")
    return references


def resolve(state: Dict[str, Any], path: str) -> Dict[str, Any]:
    """Fill the references of ``state`` (read from ``path``) from its companions; refuse changed or missing
    companions. The companions are ``<prefix><suffix>`` with a suffix from a fixed list, never a path from the file."""
    prefix = path[: -len(".pdema")] if path.endswith(".pdema") else path
    references = _check_references(state.pop(COMPANIONS, None) or [], path)
    filled: Dict[str, Dict[str, Any]] = {}
    for reference in references:
        suffix = reference["suffix"]
        companion = prefix + suffix
        if suffix in FILE_COMPANIONS:  # a missing one was left out on purpose (model.load(reset_optimizer=True))
            if os.path.isfile(companion) and file_sha256(companion) != reference["sha256"]:
                raise _stale(path, companion)
            continue
        if not os.path.isfile(companion):
            raise EMAFileError(f"{path}: its companion {companion} is missing, so the checkpoint set is incomplete; "
                               "restore it, or resume from another checkpoint")
        arrays = checked_load(companion)
        if not isinstance(arrays, dict) or arrays_fingerprint(arrays) != reference["sha1"]:
            raise _stale(path, companion)
        for section, names in reference["sections"].items():
            missing = [n for n in names if n not in arrays]
            if missing:
                raise _stale(path, companion)
            filled.setdefault(section, {}).update({name: arrays[name] for name in names})
    for section, values in filled.items():
        current = state.get(section)
        state[section] = dict(current if isinstance(current, Mapping) else {}, **values)
    return state


def _stale(path: str, companion: str) -> EMAFileError:
    return EMAFileError(f"{path}: its companion {companion} was written after this EMA state (overwritten by a later "
                        "run in the same folder, or a save killed midway), so they are not one checkpoint set; resume "
                        f"from another checkpoint, or delete the .pdema to use {os.path.basename(companion)} alone")


# ------------------------------------------------------------------------------------------------------- fields
def _field(path: str, name: str, expected: str, value: Any) -> EMAFileError:
    shown = type(value).__name__ if isinstance(value, (dict, list, tuple, np.ndarray)) else one_line(repr(value), 60)
    return EMAFileError(f"{path}: field {name}: expected {expected}, found {shown}")


def _count(state: Mapping[str, Any], name: str, path: str, required: bool = True) -> int:
    if name not in state and not required:
        return 0
    value = state.get(name)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2 ** 62:
        raise _field(path, name, "a whole number >= 0", value)
    return int(value)


def _fraction(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.floating, np.integer)):
        return False
    try:
        number = float(value)
    except OverflowError:
        return False
    return math.isfinite(number) and 0.0 <= number <= 1.0


def _tensors(state: Mapping[str, Any], name: str, path: str, finite: bool, kinds: str = "biufc") -> None:
    values = state.get(name)
    if values is None and name != "shadow":
        return
    if not isinstance(values, Mapping):
        raise _field(path, name, "a mapping of tensor names to arrays", values)
    for key, value in values.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray) or value.dtype.kind not in kinds:
            expected = "a floating-point array" if kinds == "f" else "a numeric array"
            raise _field(path, f"{name}[{one_line(repr(key), 60)}]", expected,
                         value.dtype if isinstance(value, np.ndarray) else value)
        if finite and value.dtype.kind == "f" and not np.isfinite(value).all():
            raise EMAFileError(f"{path}: field {name}[{one_line(repr(key), 60)}]: holds NaN or Inf, which the engine "
                               "never averages (nan_guard)")


def check_fields(state: Mapping[str, Any], path: str) -> None:
    """Every field of a resolved state has the type and range the engine writes (see the module docstring); the
    ``config`` entry's keys are checked against the schema by the engine (``core.engine_state``)."""
    steps = _count(state, "num_steps", path)
    updates = _count(state, "num_updates", path)
    skipped = _count(state, "num_skipped", path, required=False)
    if updates > steps or skipped > steps:
        raise EMAFileError(f"{path}: field num_updates/num_skipped: {updates} updates and {skipped} skipped after "
                           f"{steps} optimizer steps (each is at most the steps)")
    for name in ("num_switches", "recompute_bn_batches"):
        _count(state, name, path, required=False)
    config = state.get("config")
    if not isinstance(config, Mapping):
        raise _field(path, "config", "a mapping of EMA: keys", config)
    nan_guard = config.get("nan_guard", True) is not False
    labels = state.get("labels", ["ema"])
    if not isinstance(labels, list) or not labels or not all(isinstance(label, str) and len(label) <= 64
                                                             for label in labels):
        raise _field(path, "labels", "a list of names", labels)
    others = state.get("shadows") or []
    if not isinstance(others, list):
        raise _field(path, "shadows", "a list of shadows", others)
    if len(others) + 1 != len(labels):
        raise EMAFileError(f"{path}: fields labels/shadows: {len(labels)} label(s) for {len(others) + 1} shadow(s) "
                           "(one label per shadow)")
    if not _fraction(state.get("decay_product")):
        raise _field(path, "decay_product", "a number in [0, 1]", state.get("decay_product"))
    if state.get("last_decay") is not None and not _fraction(state.get("last_decay")):
        raise _field(path, "last_decay", "a number in [0, 1] or None", state.get("last_decay"))
    for name in ("decay_products", "last_decays", "decays"):
        values = state.get(name)
        if values is None:
            continue
        allowed_none = name == "last_decays"
        if not isinstance(values, list) or (name != "decays" and len(values) != len(labels)) or not all(
                (allowed_none and v is None) or _fraction(v) for v in values):
            raise _field(path, name, f"a list of {len(labels)} numbers in [0, 1]", values)
    _tensors(state, "shadow", path, finite=nan_guard, kinds="f")
    for name in ("copies", "raw_weights"):
        _tensors(state, name, path, finite=False)
    shadow = state.get("shadow") or {}
    for j, values in enumerate(others, start=1):
        _tensors({"shadows": values}, "shadows", path, finite=nan_guard, kinds="f")
        if set(values) != set(shadow) or any(np.shape(values[k]) != np.shape(shadow[k]) for k in shadow):
            raise EMAFileError(f"{path}: field shadows[{j}]: other tensor names or shapes than the primary shadow")
    run_id = state.get("run_id")
    if run_id is not None and not (isinstance(run_id, str) and RUN_ID.match(run_id)):
        raise _field(path, "run_id", "12 hexadecimal digits", run_id)
    batch = state.get("batch")
    if batch is not None and not isinstance(batch, Mapping):
        raise _field(path, "batch", "a mapping or None", batch)
    for name in ("pdparams_hold", "ema_pdparams_hold"):
        if name in state and not (isinstance(state[name], str) and len(state[name]) <= 64):
            raise _field(path, name, "a candidate's name", state[name])


def verify(state: Any, path: str) -> Dict[str, Any]:
    """The format and the digest of a state as stored (before its companions are resolved)."""
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise EMAFileError(f"{path}: not an ema-callback state (format {one_line(repr(found), 60)}, expected "
                           f"{FORMAT!r})")
    if state["format"] == FORMAT:
        stored = state.get(DIGEST)
        try:
            actual = payload_digest(state)
        except (TypeError, ValueError, OverflowError) as exc:
            raise EMAFileError(f"{path}: field {DIGEST}: the payload cannot be digested ({one_line(exc, 80)})") \
                from None
        if stored != actual:
            raise EMAFileError(f"{path}: the digest does not match the payload (the file was changed or damaged "
                               "after it was written); nothing of it was used")
    return state


def read_state(path: str, key: Optional[str] = None, data: Any = None) -> Dict[str, Any]:
    """The complete EMA state in ``path`` (or in its entry ``key``), verified, companions resolved, fields checked.

    Returns the whole file's dict (other entries such as ``raw_weights`` included); without ``key`` the file must
    be an ema-callback state. ``data``: the file as ``checked_load`` read it, where the caller has it. Nothing
    outside the file is changed.
    """
    data = checked_load(path) if data is None else data
    if not isinstance(data, dict):
        raise EMAFileError(f"{path}: not an ema-callback state (a {type(data).__name__})")
    state = verify(data.get(key) if key is not None else data, path)
    resolve(state, path)
    check_fields(state, path)
    if key is not None:
        _check_entries_digest(data, key, state, path)
    return data


RAW_DIGEST = "file_entries_digest"  # in a state kept inside another file (ppdet's .pdema): that file's other entries


def entries_digest(data: Mapping[str, Any], key: str) -> str:
    return payload_digest({k: v for k, v in data.items() if k != key})


def _check_entries_digest(data: Mapping[str, Any], key: str, state: Mapping[str, Any], path: str) -> None:
    stored = state.get(RAW_DIGEST)
    if stored is None and state.get("format") in UNSIGNED_FORMATS:
        return
    if stored != entries_digest(data, key):
        raise EMAFileError(f"{path}: the digest of its weights does not match (the file was changed or damaged after "
                           "it was written); nothing of it was used")

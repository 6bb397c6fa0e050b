"""What the ways in do with a suite's checkpoint set, written once: resume, save, and weights of EMA runs.

A checkpoint set is the files of one prefix: the suite's ``<prefix>.pdparams`` (+ ``.pdopt`` ...), our
``<prefix>.pdema`` and, with ``save_as: raw``, ``<prefix>.ema.pdparams``. What the ``.pdparams`` hold depends on
the run that wrote them: EMA weights (``save_as: ema``, ppdet's convention) or raw weights.

* ``resume_ema``: this run has EMA on and continues a checkpoint: the engine takes the ``.pdema`` state and
  the network gets the raw weights back (the suite just loaded the ``.pdparams``, which may be EMA weights).
* ``restore_raw_weights``: this run has EMA off but the checkpoint it resumes was saved with EMA: the
  ``.pdparams`` may hold EMA weights, and training on from them as if they were raw would silently replace the
  run's weights. The raw weights are taken from the ``.pdema`` and one line says so (the chosen behaviour for
  every way in; the alternative, refusing, would make a user who dropped EMA on purpose edit files by hand).
* ``describe_start_weights``: a *new* run starting from such weights (PaddleOCR ``Global.pretrained_model``,
  ppdet ``pretrain_weights``): that is legitimate and usually wants the EMA weights; one line says which.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import numpy as np

from ema_callback.errors import EMAFileError
from ema_callback.files.checkpoint_io import checked_load
from ema_callback.files.state_file import read_state

logger = logging.getLogger("ema_callback")

STATE_KEY = "ema_callback_state"  # our state inside a ppdet-convention .pdema (whose entries are raw weights)


def place_features(ema, save_dir: Optional[str], only_rank0_evaluates: bool) -> None:
    """What a way in decides for the engine's features: post-hoc snapshots go to ``<save_dir>/posthoc`` unless
    ``EMA.posthoc.dir`` says where; recomputed BatchNorm statistics are averaged over ranks unless only rank 0
    evaluates and saves (PaddleOCR, ppdet: rank 0's batches are used there)."""
    posthoc, bn = ema.features.get("posthoc"), ema.features.get("recompute_bn")
    if posthoc is not None and posthoc.folder is None and save_dir:
        posthoc.folder = os.path.join(save_dir, "posthoc")
    if bn is not None:
        bn.collective = not only_rank0_evaluates


def is_rank0() -> bool:
    """Only rank 0 of a data-parallel run writes files."""
    from ema_callback.paddle_compat import paddle

    return paddle.distributed.get_rank() == 0


def checkpoint_prefix(path: str) -> str:
    """``dir/latest.pdparams`` (or ``.pdema``/``.pdopt``/``.states``) -> ``dir/latest``."""
    return re.sub(r"\.(pdparams|pdema|pdopt|states)$", "", path.rstrip("/\\"))


def ema_file(checkpoint: str) -> str:
    return checkpoint_prefix(checkpoint) + ".pdema"


def raw_weights_in(path: str) -> Dict[str, np.ndarray]:
    """The raw weights a ``.pdema`` holds: ours (``raw_weights``) or ppdet's convention (the file's tensors)."""
    data = checked_load(path)
    if isinstance(data, dict) and "format" in data:
        return dict(read_state(path, data=data).get("raw_weights") or {})
    if isinstance(data, dict) and STATE_KEY in data:  # det-train's file: ppdet's raw weights + our state
        data = read_state(path, key=STATE_KEY, data=data)  # refuses a damaged or stale state
    if not isinstance(data, dict):
        raise EMAFileError(f"{path}: expected a state dict of weights, found a {type(data).__name__}")
    return {k: v for k, v in data.items() if isinstance(v, np.ndarray)}


def _differs(model_state: Mapping[str, Any], weights: Mapping[str, np.ndarray]) -> bool:
    return any(name in model_state and not np.array_equal(model_state[name].numpy(), weights[name])
               for name in weights)


def _holds_ema_weights(checkpoint: str) -> Optional[str]:
    """What the folder's set index (``files.set_index``) says ``<checkpoint>.pdparams`` hold, when that is an EMA
    (its label) and their fingerprint still matches; else None."""
    from ema_callback.files.set_index import entry_of
    from ema_callback.files.state_file import arrays_fingerprint

    prefix = checkpoint_prefix(checkpoint)
    folder, name = os.path.split(os.path.abspath(prefix))
    entry = entry_of(folder, name) or entry_of(os.path.dirname(folder), os.path.basename(folder) + "/" + name)
    if entry is None or entry["hold"] == "raw" or not os.path.isfile(prefix + ".pdparams"):
        return None
    if entry["sha1"] is not None:
        arrays = checked_load(prefix + ".pdparams")
        if not isinstance(arrays, dict) or arrays_fingerprint(arrays) != entry["sha1"]:
            return None
    return entry["hold"]


def check_missing_state(checkpoint: str, config, log=logger) -> bool:
    """A resumed checkpoint without its ``.pdema``: one line, and the EMA starts anew from the loaded weights; refused
    when the folder's set index says these ``.pdparams`` hold EMA weights (a resume would train on them as raw),
    unless ``EMA.restart`` says to start anew from them."""
    path = ema_file(checkpoint)
    prefix = checkpoint_prefix(checkpoint)
    held = _holds_ema_weights(checkpoint)
    if held and not config.restart:
        raise EMAFileError(f"{prefix}.pdparams: hold the EMA weights ({held}) of the run that saved them, and their "
                           f"{os.path.basename(path)} (the raw weights) is missing, so a resume would train on EMA "
                           f"weights as raw; restore {os.path.basename(path)}, or set EMA.restart: true "
                           "(-o EMA.restart=true, EMACallback(restart=True)) to start a new EMA from them as raw")
    log.warning("EMA: %s has no EMA state beside it (%s): the EMA starts from the loaded weights at update 0%s",
                prefix + ".pdparams", os.path.basename(path),
                " (EMA.restart: they are the EMA weights of the run that saved them)" if held else "")
    return True


def resume_ema(ema, checkpoint: str, network, log=logger) -> bool:
    """Continue the EMA from ``<checkpoint>.pdema`` and put its raw weights into ``network``; False if absent (then
    ``check_missing_state`` decides whether the EMA may start anew)."""
    path = ema_file(checkpoint)
    if not os.path.exists(path):
        check_missing_state(checkpoint, ema.config, log)
        return False
    state = ema.load(path)
    raw = state.get("raw_weights")
    if raw:
        network.set_state_dict(raw)
    claim = getattr(ema.features.get("posthoc"), "claim_folder", None)
    if claim is not None:  # now that the load succeeded: snapshots later than its step move aside
        claim()
    log.info("EMA: resumed from %s at optimizer step %d (%d updates); raw weights %s", path, ema.num_steps,
             ema.num_updates, "restored from it" if raw else "from the checkpoint")
    return True


def restore_raw_weights(checkpoint: str, network, how_to_keep: str, config=None, log=logger) -> bool:
    """EMA is off, the resumed checkpoint has a ``.pdema``: train on from its raw weights, in one line. Without its
    ``.pdema``, ``.pdparams`` the folder's set index says hold EMA weights are refused (unless ``EMA.restart``)."""
    path = ema_file(checkpoint)
    if not os.path.exists(path):
        if _holds_ema_weights(checkpoint) and not getattr(config, "restart", False):
            raise EMAFileError(f"{checkpoint_prefix(checkpoint)}.pdparams: hold the EMA weights of the run that saved "
                               f"them, and their {os.path.basename(path)} (the raw weights) is missing, so this run "
                               f"would train on EMA weights as raw; restore {os.path.basename(path)}, or set "
                               "EMA.restart: true (-o EMA.restart=true, EMACallback(restart=True)) to train on from "
                               "them as raw")
        return False
    raw = raw_weights_in(path)
    if not raw:
        return False
    current = network.state_dict()
    if not _differs(current, raw):
        log.info("EMA: off for this run; %s holds the raw weights already", checkpoint_prefix(checkpoint) + ".pdparams")
        return False
    network.set_state_dict(raw)
    log.warning("EMA: off for this run, but %s was saved with EMA (its .pdparams hold the EMA weights): training "
                "continues from the raw weights in %s, not from the EMA weights; %s", checkpoint_prefix(checkpoint),
                path, how_to_keep)
    return True


def describe_start_weights(weights: str, option: str, log=logger) -> Optional[str]:
    """One line for a new run that starts from a checkpoint of an EMA run: which weights it starts from."""
    prefix = checkpoint_prefix(weights)
    path = prefix + ".pdema"
    if not os.path.exists(path):
        return None
    try:
        data = checked_load(path)
    except EMAFileError:
        return None
    saved_as = ((data.get("config") or {}).get("save_as", "ema") if isinstance(data, dict) and "format" in data
                else "ema")  # ppdet's convention: .pdparams = EMA weights
    which = "EMA" if saved_as == "ema" else "raw"
    other = "raw weights are in " + os.path.basename(path) if which == "EMA" else \
        "EMA weights are in " + os.path.basename(prefix) + ".ema.pdparams"
    line = (f"EMA: {option}={weights}: this run starts from the {which} weights of that run "
            f"({os.path.basename(prefix)}.pdparams; its {other})")
    log.info(line)
    return which


def save_ema_state(ema, prefixes: Sequence[str], network, raw: Optional[Mapping[str, np.ndarray]],
                   held: Mapping[str, np.ndarray], save_as: str = "ema", candidate: Optional[str] = None,
                   ema_weights: Optional[Mapping[str, np.ndarray]] = None) -> str:
    """Write ``<prefix>.pdema`` (and with ``save_as: raw`` ``<prefix>.ema.pdparams``) for each of ``prefixes``,
    each tensor once per set. One checkpoint saved under several names (PaddleOCR's ``best_accuracy`` and
    ``best_model/model``) is built and fingerprinted once; each ``.pdema`` also fingerprints the ``.pdopt`` and
    ``.states`` the suite wrote beside it (``state_file.FILE_COMPANIONS``), so a set mixed later is refused.

    ``held``: the arrays the suite's ``<prefix>.pdparams`` hold (what the network held when the suite saved);
    ``raw``: the raw weights (None where the suite keeps them itself, as ppdet's ``.pdema`` does);
    ``candidate``: which candidate the suite selected (with several EMAs or ``select: best``): recorded as what the
    ``.pdparams`` hold, or under ``save_as: raw`` (whose ``.pdparams`` hold the raw weights) as what
    ``.ema.pdparams`` holds (the selected EMA, or the primary when raw won); ``ema_weights``: under ``save_as: raw``,
    the arrays ``.ema.pdparams`` hold when they are not a shadow's own (``Model.fit``'s length auto pick, which
    ``candidate`` then names). Returns the ``.pdparams``' fingerprint (``state_file.fingerprint`` of ``held``).
    """
    from ema_callback.files.checkpoint_io import atomic_write_bytes, saved_bytes
    from ema_callback.files.state_file import FILE_COMPANIONS, fingerprint, store_once

    companions: Dict[str, Mapping[str, np.ndarray]] = {".pdparams": held}
    files: Dict[str, bytes] = {}
    state = ema.state_dict()
    if raw is not None:
        state["raw_weights"] = dict(raw)
    if save_as == "raw":  # the suite's files keep the raw weights; the selected EMA (else the primary) goes beside
        label = candidate if candidate is not None and (candidate in ema.labels or ema_weights is not None) \
            else ema.labels[0]
        companions[".ema.pdparams"] = dict(ema_weights) if ema_weights is not None else \
            ema.ema_state_dict(network, label)
        files[".ema.pdparams"] = saved_bytes(companions[".ema.pdparams"])
        if candidate is not None:
            state["pdparams_hold"], state["ema_pdparams_hold"] = "raw", label
    elif candidate is not None:
        state["pdparams_hold"] = candidate
    sha1s = {suffix: fingerprint(arrays) for suffix, arrays in companions.items()}
    for prefix in prefixes:
        beside = {suffix: prefix + suffix for suffix in FILE_COMPANIONS if os.path.isfile(prefix + suffix)}
        pdema = saved_bytes(store_once(state, companions, beside, sha1s))
        for suffix, data in dict(files, **{".pdema": pdema}).items():
            atomic_write_bytes(data, prefix + suffix)
    return sha1s[".pdparams"]


STALE_SUFFIXES = (".pdema", ".ema.pdparams")  # what a set saved again with the EMA off must not keep


def stale_state_files(names: Sequence[str]) -> list:
    """The files of ours beside the checkpoint names ``names`` (relative) that a save with the EMA off makes stale."""
    return [name + suffix for name in names for suffix in STALE_SUFFIXES]


def save_without_stale_state(folder: str, names: Sequence[str], stale: Sequence[str],
                             save: Callable[[Any], Any]) -> Any:
    """A save with the EMA off over the set of an earlier EMA run: the suite's own save (``save(stage)``, writing into
    ``stage.tmp``) staged and published as one set (``files.checkpoint_set.StagedWrite``) that holds the raw weights,
    with the files of ours that described the set it replaces (``stale``, relative to ``folder``) removed with it;
    one line says so. Returns what ``save`` returned."""
    from ema_callback.files.checkpoint_set import StagedWrite

    with StagedWrite(folder) as stage:
        result = save(stage)
        stage.record_sets({name: {"hold": "raw", "sha1": None} for name in names})
        stage.publish(remove=list(stale))
    logger.info("EMA: off; removed %s, which described the set this save replaced", ", ".join(stale))
    return result


def check_checkpoint_files(prefix: str, suffixes: Sequence[str], option: str, verify_state: bool = True) -> None:
    """Before a suite's own code unpickles the files of a checkpoint set: finish or undo a save killed in that folder
    (``checkpoint_set.recover``), then read every file of ``prefix`` + ``suffixes`` that exists with the bounded,
    code-free reader (with ``verify_state``, an ema-callback ``.pdema`` is also verified whole: digest, fields,
    companions); one line naming ``option`` and the file refuses it."""
    from ema_callback.files.checkpoint_set import recover
    from ema_callback.files.state_file import read_state

    recover(os.path.dirname(os.path.abspath(prefix)) or ".")
    present = [prefix + suffix for suffix in suffixes if os.path.exists(prefix + suffix)]
    ours = {}
    try:
        for path in present:  # every file read safely first (one at a time: nothing kept)
            data = checked_load(path)
            if verify_state and path.endswith(".pdema") and isinstance(data, dict) and (
                    "format" in data or STATE_KEY in data):
                ours[path] = None if "format" in data else STATE_KEY
            del data
        for path, key in ours.items():  # then our .pdema verified whole (digest, fields, companions)
            read_state(path, key=key)
    except EMAFileError as exc:
        raise EMAFileError(f"{option}: {exc}") from None


def lock_run(*folders: Optional[str]) -> list:
    """One run per output folder (``files.run_lock``): a lock on each distinct folder given, on rank 0 only; the
    locks are returned (release each when the run ends). A folder a live run is writing is refused in one line."""
    from ema_callback.files.run_lock import RunLock

    if not is_rank0():
        return []
    locks, seen = [], set()
    try:
        for folder in folders:
            if folder and os.path.realpath(folder) not in seen:
                seen.add(os.path.realpath(folder))
                locks.append(RunLock(folder).acquire())
    except EMAFileError:
        for lock in locks:
            lock.release()
        raise
    return locks


def ppdet_state(ema, weight: Mapping[str, Any], held: Mapping[str, np.ndarray], **extra: Any) -> Dict[str, Any]:
    """Our state for ppdet's ``.pdema`` (``weight``: the raw weights ppdet saves there, beside which the state rides
    under ``STATE_KEY``): the shadow refers to ``held`` (what the ``.pdparams`` hold), and the digest of ppdet's own
    entries is signed with it, so a changed raw weight is refused like a changed state."""
    from ema_callback.files.state_file import RAW_DIGEST, entries_digest, store_once

    state = ema.state_dict()
    state.update(extra)
    raw = {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in weight.items() if k != STATE_KEY}
    state[RAW_DIGEST] = entries_digest(raw, STATE_KEY)
    return store_once(state, {".pdparams": held})


def numpy_state(network) -> Dict[str, np.ndarray]:
    """``network.state_dict()`` as numpy copies (what ``paddle.save`` of it writes)."""
    return {name: tensor.numpy() for name, tensor in network.state_dict().items()}

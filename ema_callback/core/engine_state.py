"""The engine's state as a dict (``state_of``, what a ``.pdema`` holds) and back (``load_state``).

``state_of``: counters, the config, the raw (uncorrected) shadows: ``shadow`` is the primary, ``shadows`` the
others, with ``decay_products``/``last_decays``/``labels`` one entry per shadow; ``decays`` (the effective decays
per optimizer step) and ``batch`` (the measured global batch) make a saved file's numbers explain themselves; each
feature adds its own entries (``num_switches``, ``run_id``, ``recompute_bn_batches``).

``check_state(ema, state, source)`` runs before anything is loaded (nothing changes on an error):

* the format is one this version reads and every field has its type and range (``state_file.check_fields``);
* the averaged tensors, the copied tensors and the raw weights (where the state holds them) match the model:
  names, shapes and dtypes (``EMAFileError`` listing what is missing, unexpected or of another shape);
* the number of shadows matches: the EMAs and the post-hoc profiles, named apart (``EMAConfigError``).

Then it logs what differs and continues: the settings (decay, schedule, update_every, start_step, bias_correction),
the global batch (another world size) or the decays.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any, Dict, Mapping

import numpy as np

from ema_callback.config.schema import EMAConfig
from ema_callback.errors import EMAConfigError, EMAFileError, one_line, short_list
from ema_callback.files.state_file import FORMAT, READABLE_FORMATS, check_fields


def state_of(ema) -> Dict[str, Any]:
    """The engine's ``state_dict()`` (see the module docstring)."""
    products, lasts = ema.decay_products, ema.last_decays
    names = [e.name for e in ema.averaged_entries]
    state = {"format": FORMAT, "num_steps": ema.num_steps, "num_updates": ema.num_updates,
             "num_skipped": ema.num_skipped, "decay_product": products[0], "last_decay": lasts[0],
             "config": ema.config.to_block(), "shadow": dict(zip(names, ema.store.numpy_values())),
             "copies": ema.tensors.copies_numpy(), "labels": list(ema.labels), "decays": list(ema.decays),
             "batch": ema.batch.to_dict() if ema.batch is not None else None}
    for feature in ema.features.values():
        state.update(feature.state())
    if ema.num_shadows > 1:
        state["shadows"] = [dict(zip(names, ema.store.numpy_values(j))) for j in range(1, ema.num_shadows)]
        state["decay_products"], state["last_decays"] = products, lasts
    return state


def fingerprint_of(ema) -> str:
    """sha1 of every shadow's tensors and of the copied tensors, by name."""
    digest = hashlib.sha1()
    for j in range(ema.num_shadows):
        for e, value in zip(ema.averaged_entries, ema.store.numpy_values(j)):
            digest.update(e.name.encode())
            digest.update(np.ascontiguousarray(value).tobytes())
    copies = ema.tensors.copies_numpy()
    for name in sorted(copies):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(copies[name]).tobytes())
    return digest.hexdigest()


def load_state(ema, state: Mapping[str, Any], source: str) -> None:
    """``check_state``, then the engine takes the state."""
    check_state(ema, state, source)
    names = [e.name for e in ema.averaged_entries]
    shadow = state.get("shadow") or {}
    ema.store.set_numpy_values([shadow[n] for n in names])
    for j, values in enumerate(state.get("shadows") or [], start=1):
        ema.store.set_numpy_values([np.asarray(values[n]) for n in names], j)
    ema.tensors.load_copies(state.get("copies") or {}, ema.store.flat.place if ema.deferred else None)
    ema.num_steps = int(state["num_steps"])
    for feature in ema.features.values():
        feature.load_state(state)
    ema.num_updates = int(state["num_updates"])
    ema.num_skipped = int(state.get("num_skipped", 0))
    ema.decay_products = [float(v) for v in state.get("decay_products") or [state["decay_product"]]]
    ema.last_decays = list(state.get("last_decays") or [state.get("last_decay")])

logger = logging.getLogger("ema_callback")


def _compare(source: str, what: str, values: Mapping[str, Any], expected: Mapping[str, Any],
             dtypes: Mapping[str, Any] = None) -> None:
    """One line listing the tensors of ``values`` that are missing, unexpected or of another shape (or dtype)."""
    missing, extra = sorted(set(expected) - set(values)), sorted(set(values) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(values) if list(np.shape(values[k])) != list(expected[k]))
    retyped = sorted(k for k in set(dtypes or {}) & set(values) if k not in reshaped and
                     np.asarray(values[k]).dtype != dtypes[k])
    parts = ([f"missing {short_list(missing)}"] if missing else []) + \
        ([f"unexpected {short_list(extra)}"] if extra else []) + \
        (["shape mismatch " + short_list([f"{k} {list(np.shape(values[k]))}!={list(expected[k])}" for k in reshaped])]
         if reshaped else []) + \
        (["dtype mismatch " + short_list([f"{k} {np.asarray(values[k]).dtype}!={dtypes[k]}" for k in retyped])]
         if retyped else [])
    if parts:
        raise EMAFileError(f"{source}: {what} does not match the model: {'; '.join(parts)}")


def check_state(ema, state: Mapping[str, Any], source: str) -> None:
    if not isinstance(state, Mapping) or state.get("format") not in READABLE_FORMATS:
        found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
        raise EMAFileError(f"{source}: not an ema-callback state (format {found!r}, expected {FORMAT!r})")
    check_fields(state, source)
    try:
        EMAConfig.from_saved(state["config"])  # the saved settings are keys of this version's schema
    except (EMAConfigError, OverflowError, ValueError, TypeError) as exc:
        raise EMAFileError(f"{source}: field config: {one_line(exc, 300)}") from None
    _compare(source, "field shadow", state.get("shadow") or {},
             {e.name: list(e.tensor.shape) for e in ema.averaged_entries})
    copies = ema.tensors.copies_numpy()
    if state.get("copies") is not None:
        _compare(source, "field copies", state["copies"], {k: v.shape for k, v in copies.items()},
                 {k: v.dtype for k, v in copies.items()})
    if state.get("raw_weights") is not None:
        live = {k: (list(t.shape), t.numpy().dtype) for k, t in ema.model.state_dict().items()}
        _compare(source, "field raw_weights", state["raw_weights"], {k: s for k, (s, _) in live.items()},
                 {k: d for k, (_, d) in live.items()})
    if len(state.get("shadows") or []) + 1 != ema.num_shadows:
        saved = list(state.get("labels") or ["ema"])
        emas, profiles = ([label for label in saved if not label.startswith("phema")],
                          [label for label in saved if label.startswith("phema")])
        ours = ema.labels[ema.num_candidates:]

        def listed(labels):
            return f" ({', '.join(labels)})" if labels else ""

        raise EMAConfigError(
            f"EMA.{ema.config.length_key}: {source} holds {len(emas)} EMA(s){listed(emas)} and {len(profiles)} "
            f"post-hoc profile(s){listed(profiles)}; this run asks for {ema.num_candidates} "
            f"EMA(s){listed(ema.candidate_labels)} and {len(ours)} post-hoc profile(s){listed(ours)}; resume with "
            "the same EMAs and EMA.posthoc.sigma_rels")
    _log_changes(ema, state, source)


def _log_changes(ema, state: Mapping[str, Any], source: str) -> None:
    saved_config = state.get("config") or {}
    for key in ("decay", "schedule", "update_every", "start_step", "bias_correction"):
        now = getattr(ema.config, key)
        if key == "bias_correction" and not saved_config.get(key) and not now:
            continue  # false (files written before it could be left unset) and unset: neither asks for it
        if key in saved_config and saved_config[key] != now:
            logger.info("EMA: %s was %r in %s, now %r", key, saved_config[key], source, getattr(ema.config, key))
    saved_batch, saved_decays, batch = state.get("batch") or {}, state.get("decays"), ema.batch
    decays = ", ".join(f"{d:.8g}" for d in ema.decays)
    if saved_batch.get("global_batch") and batch is not None and saved_batch["global_batch"] != batch.global_batch:
        logger.info("EMA: global batch was %s in %s (%s x %s ranks x %s), now %s: the decays continue as %s",
                    saved_batch["global_batch"], source, saved_batch.get("per_device"), saved_batch.get("world"),
                    saved_batch.get("accumulate"), batch.describe(), decays)
    elif saved_decays and [round(d, 12) for d in saved_decays] != [round(d, 12) for d in ema.decays]:
        logger.info("EMA: decays were %s in %s, now %s", ", ".join(f"{d:.8g}" for d in saved_decays), source, decays)

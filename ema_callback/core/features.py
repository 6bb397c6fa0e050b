"""What plugs into the engine beside the average: Switch EMA (``switch_ema``), post-hoc profiles
(``posthoc.tracking``), BatchNorm recomputation (``bn_recompute``). Each is a small object that owns its state, its
entries of the ``.pdema`` and its log lines. Features are registered from above the engine (``register``, called by
``ema_callback/__init__.py``, which runs before any ``ema_callback.*`` module: a new feature is its own file plus one
line there), so the engine imports none of them; it builds the registered ones and calls each at these named points:

* ``labels`` and ``decays(updates)`` / ``device_decays(updates)``: extra shadows it keeps in the engine's store and
  their decay at the next update (a host number / a device tensor: the device path reads nothing back);
* ``after_update(ema)``: after each real update (decided on the host, so the device path stays sync-free);
* ``backup_ids()``: ids of tensors besides the averaged ones that ``apply_to`` backs up and ``restore`` puts back;
* ``after_apply(ema, label)``: the EMA values of shadow ``label`` are in the model;
* ``state()`` / ``load_state(state)``: its entries of the ``.pdema``;
* ``close()``: undo what it installed on the model (training has ended: every way in calls ``engine.close()``
  then); ``reopen()``: install it again (``Model.fit`` called again on the same engine).
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, List, Mapping, Set, Tuple

from ema_callback.errors import EMAConfigError


class Feature:
    """The named points, each a no-op unless the feature needs it (see the module docstring)."""

    name = ""
    labels: Tuple[str, ...] = ()

    def decays(self, updates: int) -> List[float]:
        return []

    def device_decays(self, updates):
        return None

    def after_update(self, ema) -> None:
        return None

    def backup_ids(self) -> Set[int]:
        return set()

    def after_apply(self, ema, label: str) -> None:
        return None

    def state(self) -> Dict[str, Any]:
        return {}

    def load_state(self, state: Mapping[str, Any]) -> None:
        return None

    def close(self) -> None:
        return None

    def reopen(self) -> None:
        return None


def due(step: int, start_step: int, period: int) -> bool:
    """Whether optimizer step ``step`` is a periodic action's (every ``period`` steps, after ``start_step``)."""
    return bool(period) and step > start_step and step % period == 0


_REGISTERED: List[str] = []  # "module:Class" of each feature, in the order of their shadows and calls


def register(path: str) -> None:
    """Register a feature by its class's import path (``"ema_callback.posthoc.tracking:PosthocProfiles"``); the class
    has ``build(config, batch, model) -> Feature or None``. Imported when an engine is first built."""
    if path not in _REGISTERED:
        _REGISTERED.append(path)


def builders() -> List[Callable[..., Any]]:
    """The registered features' ``build`` functions, in registration order."""
    out = []
    for path in _REGISTERED:
        module, _, name = path.partition(":")
        out.append(getattr(importlib.import_module(module), name).build)
    return out


def check_period(key: str, period: int, config) -> int:
    """``period`` (optimizer steps) of a periodic action that runs after an EMA update (Switch EMA, a post-hoc
    snapshot), checked against when the updates happen: at optimizer steps ``start_step + j * update_every``. A
    period that is not a multiple of ``update_every`` (or a ``start_step`` that is not) would run the action only at
    the steps both share, or never: one line naming ``key`` instead."""
    k, start = int(config.update_every), int(config.start_step)
    if k > 1 and (period % k or start % k):
        fix = f"a multiple of update_every ({k})" + (f", and a start_step that is one (now {start})" if start % k
                                                     else "")
        raise EMAConfigError(f"{key}: every {period:,} optimizer steps, but the EMA updates only at steps "
                             f"{start + k:,}, {start + 2 * k:,}, ... (start_step {start}, update_every {k}), so it "
                             f"would run only where both meet; give {fix}")
    return period

"""Post-hoc EMA during training (``EMA.posthoc``), as an engine feature: the tracked power-function profiles and
their snapshots (reading them back and reconstructing is ``posthoc``).

Each tracked ``sigma_rel`` is one extra shadow of the engine's store, updated in the same pass as the EMAs, every
``k = posthoc.update_every`` EMA updates (EDM2, Karras et al. 2024, Algorithm 1, with time counted in EMA updates:
the profile's v-th update is the engine's update ``v k`` and happens at time ``t_v = v k + 1``, with
``beta_v = (t_(v-1) / t_v)^(gamma + 1)``, ``t_(-1) = 0``: the power-function average of the weights it saw, exact
for any ``k``; ``k = 1`` gives ``beta = (u / (u + 1))^(gamma + 1)`` after ``u`` updates; ``power_math.gamma_of``
maps sigma_rel to gamma). Between its updates a profile's decay is 1 and the host store does not touch it, so
``k = 4`` costs a quarter of a shadow per step. Every ``snapshot_every`` optimizer steps rank 0 writes
``<dir>/phema-<step>.safetensors`` (see ``snapshots`` for the format), under a temporary name then renamed.

A series belongs to one run: ``run_id`` (new for a fresh run, carried by the ``.pdema`` into a resume) is in every
header. Before its first snapshot a fresh run moves any other run's snapshots out of the folder into
``<dir>-run-<their id>`` beside it, and a resumed run (as soon as its folder is known) also moves its own snapshots
later than the step it resumed from into ``<dir>-run-<id>-after-<step>``: those belong to the abandoned part of the
run, and a resumed run does not retrace it bit for bit. One warning says what moved; nothing is deleted. Only
regular files named as snapshots are moved, and only into folders named from ids checked to be 12 hex digits.
"""
from __future__ import annotations

import logging
import os
import uuid
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from ema_callback.core.features import Feature, check_period, due
from ema_callback.core.horizon import snapshot_period
from ema_callback.errors import EMAConfigError, EMAFileError
from ema_callback.files.checkpoint_io import atomic_write_bytes
from ema_callback.posthoc.power_math import gamma_of
from ema_callback.posthoc.snapshots import (
    LEGACY_RUN,
    NAME,
    list_snapshots,
    names_fingerprint,
    run_of,
    snapshot_bytes,
    snapshot_name,
)

logger = logging.getLogger("ema_callback")


class PosthocProfiles(Feature):
    """The tracked profiles (``labels`` ``phema<sigma_rel>``), their snapshot period and folder, and the run id."""

    name = "posthoc"

    def __init__(self, block: Mapping[str, Any], batch=None, update_every: int = 1):
        self.sigma_rels: List[float] = list(block.get("sigma_rels") or [])
        self.gammas: List[float] = [float(gamma_of(s)) for s in self.sigma_rels]
        self.labels = tuple(f"phema{s:g}" for s in self.sigma_rels)
        self.every = int(block.get("update_every", 1) or 1)  # EMA updates between profile updates
        self.period = snapshot_period(block, batch, update_every)
        self.dtype = np.float16 if block.get("snapshot_dtype", "float16") == "float16" else np.float32
        self.folder: Optional[str] = block.get("dir")  # None: the way in sets posthoc/ beside its checkpoints
        self.run_id = uuid.uuid4().hex[:12]
        self.resumed_at: Optional[int] = None  # the optimizer step a resume continued from
        self._claimed: Optional[str] = None  # the folder whose other runs (and abandoned steps) were moved aside
        self._exponents = None

    @classmethod
    def build(cls, config, batch, model) -> Optional["PosthocProfiles"]:
        if not config.posthoc:
            return None
        profiles = cls(config.posthoc, batch, config.update_every)
        check_period("EMA.posthoc.snapshot_every", profiles.period, config)
        return profiles

    def decays(self, updates: int) -> List[float]:
        """The profiles' decays for the engine's next update (``updates`` done before it): 1 between their own
        updates, ``(t_(v-1) / t_v)^(gamma + 1)`` at their v-th (see the module docstring)."""
        k, u = self.every, int(updates)
        if u % k:
            return [1.0] * len(self.gammas)
        v = u // k
        ratio = ((v - 1) * k + 1.0) / (v * k + 1.0) if v > 0 else 0.0
        return [ratio ** (g + 1.0) for g in self.gammas]

    def device_decays(self, updates):
        """The same on the device: ``updates`` a 0-d float64 device tensor (no host read)."""
        import paddle

        from ema_callback.paddle_compat import move_to

        if self._exponents is None:  # gamma + 1, moved to the device once
            self._exponents = move_to(paddle.to_tensor([g + 1.0 for g in self.gammas], dtype="float64"),
                                      updates.place)
        k = float(self.every)
        if k == 1.0:
            return paddle.pow(updates / (updates + 1.0), self._exponents)
        v = paddle.floor(updates / k)
        ratio = paddle.clip((v - 1.0) * k + 1.0, min=0.0) / (v * k + 1.0)
        due = (updates - v * k) == 0.0
        return paddle.where(due, paddle.pow(ratio, self._exponents), paddle.ones_like(self._exponents))

    def profile_time(self, updates: int, update_every: int) -> int:
        """The time (optimizer steps) the profiles stand at after ``updates`` EMA updates: their last update's."""
        if updates <= 0:
            return 0
        return (((updates - 1) // self.every) * self.every + 1) * update_every

    def after_update(self, ema) -> None:
        if due(ema.num_steps, ema.config.start_step, self.period):
            self.write_snapshot(ema)

    def state(self) -> Dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.run_id = str(state.get("run_id") or LEGACY_RUN)  # the resumed run's series continues
        self.resumed_at = int(state["num_steps"])
        self._claimed = None  # claim_folder runs once the whole load succeeded (the way in calls it) or at the
        # first snapshot

    def claim_folder(self) -> None:
        """On rank 0, once the folder is known: other runs' snapshots, and this run's later than the step it resumed
        from, move aside (see the module docstring)."""
        import paddle

        if not self.folder or self._claimed == self.folder or paddle.distributed.get_rank() != 0:
            return
        if os.path.isdir(self.folder):
            move_aside(self.folder, self.run_id, self.resumed_at)
        self._claimed = self.folder

    def write_snapshot(self, ema) -> Optional[str]:
        """The profiles at this step as ``<folder>/phema-<step>.npz`` (rank 0 only); returns the path."""
        import paddle

        if paddle.distributed.get_rank() != 0:
            return None
        if not self.folder:
            raise EMAConfigError("EMA.posthoc.dir: no folder for the snapshots; set EMA.posthoc.dir (or train through "
                                 "a way in that has a save folder)")
        self.claim_folder()
        os.makedirs(self.folder, exist_ok=True)
        entries = ema.averaged_entries
        names, shapes = [e.name for e in entries], [list(e.tensor.shape) for e in entries]
        arrays: Dict[str, np.ndarray] = {}
        for j, label in enumerate(self.labels):
            values = ema.store.numpy_values(ema.shadow_index(label))
            arrays[f"profile{j}"] = np.concatenate([v.reshape(-1) for v in values]).astype(self.dtype) if values \
                else np.zeros(0, self.dtype)
        averaged = set(names)
        for name, tensor in ema.model.state_dict().items():
            if name not in averaged:
                arrays[f"other:{name}"] = np.asarray(tensor.numpy())
        header = {"step": ema.num_steps, "time": self.profile_time(ema.num_updates, ema.config.update_every),
                  "updates": ema.num_updates, "sigma_rels": self.sigma_rels, "gammas": self.gammas, "names": names,
                  "shapes": shapes, "fingerprint": names_fingerprint(names, shapes), "dtype": np.dtype(self.dtype).name,
                  "run": self.run_id}
        path = os.path.join(self.folder, snapshot_name(ema.num_steps))
        atomic_write_bytes(snapshot_bytes(header, arrays), path)
        logger.info("EMA: post-hoc snapshot at optimizer step %d: %s (%s bytes)", ema.num_steps, path,
                    f"{os.path.getsize(path):,}")
        return path


def move_aside(folder: str, run_id: str, resumed_at: Optional[int] = None) -> List[str]:
    """Move every snapshot of ``folder`` written by another run than ``run_id`` into ``<folder>-run-<its id>``, and
    with ``resumed_at`` this run's snapshots later than that step into ``<folder>-run-<run_id>-after-<step>``;
    returns the new folders. An unreadable snapshot counts as another run's (``unreadable``)."""
    paths, _ = list_snapshots(folder)
    moved: Dict[str, List[str]] = {}
    for path in paths:
        try:
            other = run_of(path)
        except EMAFileError:
            other = "unreadable"
        if other != run_id:
            moved.setdefault(f"run-{other}", []).append(path)
        elif resumed_at is not None and int(NAME.match(os.path.basename(path)).group(1)) > resumed_at:
            moved.setdefault(f"run-{run_id}-after-{resumed_at}", []).append(path)
    out = []
    for suffix, group in moved.items():
        target, n = f"{folder.rstrip(os.sep)}-{suffix}", 1
        while os.path.lexists(target):  # moved aside before (a second resume from the same step): keep both
            n += 1
            target = f"{folder.rstrip(os.sep)}-{suffix}-{n}"
        try:
            os.makedirs(target)
            for path in group:
                os.replace(path, os.path.join(target, os.path.basename(path)))
        except OSError as exc:
            raise EMAFileError(f"EMA.posthoc: {folder}: snapshots of {suffix[4:]} could not be moved aside into "
                               f"{target} ({exc.strerror or exc}); move them by hand or give EMA.posthoc.dir another "
                               "folder") from None
        steps = [int(NAME.match(os.path.basename(p)).group(1)) for p in group]
        if "-after-" in suffix:
            logger.warning("EMA.posthoc: %s held %d snapshot(s) of this run (%s) later than the step it resumed from "
                           "(steps %d..%d, resumed at %d): moved to %s; the resumed run writes its own",
                           folder, len(group), run_id, min(steps), max(steps), resumed_at, target)
        else:
            logger.warning("EMA.posthoc: %s held %d snapshot(s) of another run (run %s, steps %d..%d): moved to %s; "
                           "this run (%s) starts its own series", folder, len(group), suffix[4:], min(steps),
                           max(steps), target, run_id)
        out.append(target)
    return out

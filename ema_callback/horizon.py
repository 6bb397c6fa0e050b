"""The EMA length in the user's units: per-update decays from ``decay``/``decays``, ``decay_batch_size`` and
half-lives in images or epochs, with the run's measured global batch.

With ``B`` the global batch (images per optimizer update = per-device batch x data-parallel ranks x gradient
accumulation steps), the decay ``d`` applied per optimizer step (the engine raises it to ``update_every`` for an
update every k steps) is:

* ``decay: d`` / ``decays: [...]``: ``d`` as stated;
* with ``decay_batch_size: N``: ``d ** kappa``, ``kappa = B / N``: the EMA scaling rule (Busbridge et al. 2023,
  "How to Scale Your EMA", arXiv 2307.13813, Definition 1.2): kappa times the batch, kappa times fewer updates,
  the same horizon in images;
* ``half_life_images: H``: ``0.5 ** (B / H)``, so an impulse keeps weight ``d ** (H / B) = 0.5`` after ``H``
  images (``H / B`` optimizer steps);
* ``half_life_epochs: x``: ``half_life_images = x * dataset size`` (images per epoch).

A decay's half-life in optimizer steps is ``ln 0.5 / ln d``. Warm-up schedules (``threshold``, ``exponential``,
``power``) keep counting optimizer updates; the scaling applies to their target ``d``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from .config import EMAConfig
from .errors import EMAConfigError


@dataclass(frozen=True)
class BatchInfo:
    """How many images one optimizer update sees, as measured by the integration (and the training set's size)."""

    per_device: int
    world: int = 1
    accumulate: int = 1
    dataset_size: Optional[int] = None  # images per epoch (None: unknown, e.g. an iterable dataset)
    steps_per_epoch: Optional[int] = None  # optimizer steps per epoch (None: unknown)

    @property
    def global_batch(self) -> int:
        return int(self.per_device) * int(self.world) * int(self.accumulate)

    def to_dict(self) -> Dict[str, Any]:
        return {"per_device": self.per_device, "world": self.world, "accumulate": self.accumulate,
                "dataset_size": self.dataset_size, "steps_per_epoch": self.steps_per_epoch,
                "global_batch": self.global_batch}


@dataclass(frozen=True)
class Candidate:
    """One shadow: its label (metric suffix) and its target decay per optimizer step."""

    label: str
    decay: float


def needs_batch(config: EMAConfig) -> bool:
    """Whether the decays depend on the global batch (``decay_batch_size`` or a half-life)."""
    return config.decay_batch_size is not None or config.length_key.startswith("half_life")


def _as_list(value: Any) -> List[float]:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]


def _number(x: float) -> str:
    return format(x, ".10g")


def half_life_steps(decay: float) -> float:
    """Optimizer steps after which an impulse's weight is halved: ``ln 0.5 / ln d``."""
    return math.log(0.5) / math.log(decay)


def switch_period(config: EMAConfig, batch: Optional[BatchInfo] = None) -> int:
    """Optimizer steps between Switch EMA switches (0: off): ``switch_every``, or ``switch_every_epochs`` x the
    optimizer steps per epoch, rounded (at least 1)."""
    if config.switch_every:
        return int(config.switch_every)
    if not config.switch_every_epochs:
        return 0
    if batch is None or not batch.steps_per_epoch:
        raise EMAConfigError("EMA.switch_every_epochs: the number of optimizer steps per epoch is unknown here (an "
                             "iterable dataset or a loader without a length); use EMA.switch_every (steps) instead")
    return max(1, int(round(config.switch_every_epochs * batch.steps_per_epoch)))


def snapshot_period(posthoc: dict, batch: Optional[BatchInfo] = None) -> int:
    """Optimizer steps between post-hoc snapshots: ``snapshot_every``, or ``snapshot_every_epochs`` x steps per
    epoch, rounded (at least 1)."""
    if posthoc.get("snapshot_every"):
        return int(posthoc["snapshot_every"])
    if batch is None or not batch.steps_per_epoch:
        raise EMAConfigError("EMA.posthoc.snapshot_every_epochs: the number of optimizer steps per epoch is unknown "
                             "here; use EMA.posthoc.snapshot_every (steps) instead")
    return max(1, int(round(posthoc["snapshot_every_epochs"] * batch.steps_per_epoch)))


def candidates(config: EMAConfig, batch: Optional[BatchInfo] = None) -> List[Candidate]:
    """The shadows the config asks for, first = primary. Raises ``EMAConfigError`` naming the key when the batch
    (or the dataset size) it needs is unknown."""
    key = config.length_key
    if needs_batch(config):
        why = "decay_batch_size" if config.decay_batch_size is not None else key
        if batch is None or batch.global_batch <= 0:
            raise EMAConfigError(f"EMA.{why}: needs the run's global batch, which this way in does not know; "
                                 "pass it (batch=BatchInfo(...)) or state the length with EMA.decay")
    if key in ("decay", "decays"):
        values = [config.decay] if key == "decay" else list(config.decays)
        labels = [f"ema{_number(d)}" for d in values]
        if config.decay_batch_size is not None:
            kappa = batch.global_batch / config.decay_batch_size
            values = [d ** kappa for d in values]
    else:
        halves = _as_list(getattr(config, key))
        if key == "half_life_epochs":
            if not batch.dataset_size:
                raise EMAConfigError("EMA.half_life_epochs: the training set's size is unknown here (an iterable "
                                     "dataset or a sampler without a length); use EMA.half_life_images instead")
            halves = [x * batch.dataset_size for x in halves]
        values = [0.5 ** (batch.global_batch / h) for h in halves]
        labels = [f"ema_hl{_number(v)}{'ep' if key == 'half_life_epochs' else 'img'}" for v in _as_list(
            getattr(config, key))]
    return [Candidate(label if len(values) > 1 else "ema", d) for label, d in zip(labels, values)]


def describe(config: EMAConfig, batch: Optional[BatchInfo], chosen: List[Candidate]) -> str:
    """The one line a user checks at start, e.g. ``global batch 32 (32 x 1 rank x 1), decay 0.9999 tuned for 256 ->
    0.9999^0.125 = 0.9999875 (half-life 55,452 updates = 1,774,464 images)``."""
    parts = []
    if batch is not None:
        ranks = "rank" if batch.world == 1 else "ranks"
        parts.append(f"global batch {batch.global_batch} ({batch.per_device} x {batch.world} {ranks} x "
                     f"{batch.accumulate})")
    key = config.length_key
    stated = _as_list(config.decays if key == "decays" else config.decay) if key in ("decay", "decays") \
        else _as_list(getattr(config, key))
    for given, cand in zip(stated, chosen):
        steps = half_life_steps(cand.decay)
        images = f" = {steps * batch.global_batch:,.0f} images" if batch is not None else ""
        if key in ("decay", "decays") and config.decay_batch_size is not None:
            kappa = batch.global_batch / config.decay_batch_size
            what = f"decay {_number(given)} tuned for {config.decay_batch_size} -> {_number(given)}^{kappa:.4g} = "
        elif key in ("decay", "decays"):
            what = "decay "
        else:
            unit = "images" if key == "half_life_images" else "epochs"
            size = (f" x {batch.dataset_size:,} images" if key == "half_life_epochs" else "")
            what = f"half-life {_number(given)} {unit}{size} -> decay "
        label = f"{cand.label}: " if len(chosen) > 1 else ""
        parts.append(f"{label}{what}{cand.decay:.8g} per optimizer step (half-life {steps:,.0f} steps{images})")
    return ", ".join(parts)

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

What the run realizes (``schedule_note`` at the start, ``realized`` at the end). Update ``u`` (0-based) applies
``d_u = decay_at(u k) ** k`` (``k = update_every``); after ``n`` updates the weights it covered have weights
``(1 - d_u) prod_{v>u} d_v`` and the weights it started from ``prod_u d_u`` (with bias correction, each is
divided by ``1 - prod_u d_u`` and the start has none). Under ``threshold`` (``(1+t)/(10+t)``) that profile is
about ``(u/n)^8``: half the weight on the last ``1 - 0.5^(1/9) = 7.4%`` of the updates, until the target is reached
after ``(10 d - 1)/(1 - d)`` steps (from optimizer step 89,991 for 0.9999).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ema_callback.config.period import Period
from ema_callback.config.schema import EMAConfig
from ema_callback.core.schedules import decay_array, decay_at
from ema_callback.errors import EMAConfigError


@dataclass(frozen=True)
class BatchInfo:
    """How many images one optimizer update sees, as measured by the way in (or given by a caller, e.g.
    ``EMACallback(batch=BatchInfo(32, world=2))``): what ``decay_batch_size`` and the half-lives need.

    Fields: ``per_device`` images per optimizer step on one device (a mean where the sampler varies it);
    ``world`` data-parallel ranks; ``accumulate`` batches per optimizer step (gradient accumulation);
    ``dataset_size`` images per epoch (``half_life_epochs``; None: unknown); ``steps_per_epoch`` optimizer
    steps per epoch (a ``switch_every`` or ``posthoc.snapshot_every`` in epochs); ``total_steps`` optimizer steps of the
    whole run (the start line's too-long warnings); ``measured`` how ``per_device`` was counted (shown in the start
    line). ``global_batch = per_device x world x accumulate``."""

    per_device: float  # images per optimizer step on one device (a mean where the sampler varies the batch)
    world: int = 1
    accumulate: int = 1
    dataset_size: Optional[int] = None  # images per epoch (None: unknown, e.g. an iterable dataset)
    steps_per_epoch: Optional[int] = None  # optimizer steps per epoch (None: unknown)
    total_steps: Optional[int] = None  # optimizer steps the run is set to take (None: unknown)
    measured: str = ""  # how per_device was measured, shown in the start line (e.g. "mean of the sampler's batches")

    @property
    def global_batch(self) -> float:
        """Images per optimizer update: per device x ranks x accumulation (an int when the per-device batch is)."""
        value = float(self.per_device) * int(self.world) * int(self.accumulate)
        return int(value) if value.is_integer() else value

    def describe(self) -> str:
        """``global batch 32 (32 x 1 rank x 1)``, with how the per-device batch was measured where it was."""
        ranks = "rank" if self.world == 1 else "ranks"
        how = f", {self.measured}" if self.measured else ""
        return (f"global batch {_number(self.global_batch, 6)} ({_number(self.per_device, 6)} x {self.world} {ranks} "
                f"x {self.accumulate}{how})")

    def to_dict(self) -> Dict[str, Any]:
        return {"per_device": self.per_device, "world": self.world, "accumulate": self.accumulate,
                "dataset_size": self.dataset_size, "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps, "global_batch": self.global_batch}


@dataclass(frozen=True)
class Candidate:
    """One shadow: its label (metric suffix) and its target decay per optimizer step."""

    label: str
    decay: float


def _as_list(value: Any) -> List[float]:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]


def _number(x: float, digits: int = 10) -> str:
    return format(x, f".{digits}g")


def half_life_steps(decay: float) -> float:
    """Optimizer steps after which an impulse's weight is halved: ``ln 0.5 / ln d``."""
    return math.log(0.5) / math.log(decay)


def switch_period(config: EMAConfig, batch: Optional[BatchInfo] = None) -> int:
    """Optimizer steps between Switch EMA switches (0: off): ``switch_every``, a period in optimizer steps or epochs
    (``config.period``: epochs x the optimizer steps per epoch, rounded to a multiple of ``update_every``)."""
    period = Period.of(config.switch_every)
    return period.steps(batch.steps_per_epoch if batch else None, "EMA.switch_every", config.update_every) \
        if period else 0


def snapshot_period(posthoc: dict, batch: Optional[BatchInfo] = None, update_every: int = 1) -> int:
    """Optimizer steps between post-hoc snapshots: ``snapshot_every``, a period in optimizer steps or epochs (as
    ``switch_period``; epochs rounded to a multiple of ``update_every``)."""
    period = Period.of(posthoc.get("snapshot_every"))
    if period is None:
        raise EMAConfigError("EMA.posthoc.snapshot_every: give how often snapshots are taken: a number of optimizer "
                             "steps (2000) or of epochs ('1 epochs')")
    return period.steps(batch.steps_per_epoch if batch else None, "EMA.posthoc.snapshot_every", update_every)


def candidates(config: EMAConfig, batch: Optional[BatchInfo] = None) -> List[Candidate]:
    """The shadows the config asks for, first = primary. Raises ``EMAConfigError`` naming the key when the batch
    (or the dataset size) it needs is unknown."""
    key = config.length_key
    if config.in_user_units:  # the decays depend on the global batch
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
    parts = [batch.describe()] if batch is not None else []
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
    notes = list(dict.fromkeys(schedule_note(config, c.decay) for c in chosen))
    return ", ".join(parts) + "; " + "; ".join(notes)


def length_warnings(config: EMAConfig, batch: Optional[BatchInfo], chosen: List[Candidate],
                    switch_steps: int = 0, snapshot_steps: int = 0) -> List[str]:
    """At the start, where the run's length is known (``batch.total_steps``): an EMA whose realized profile over the
    run (``realized``, the schedule that runs, warm-up included) is too long for it (``too_long``), a Switch EMA
    period or a post-hoc snapshot period longer than the run."""
    total = batch.total_steps if batch is not None else None
    if not total:
        return []
    out = []
    updates = max(0, (total - config.start_step) // config.update_every)
    for c in chosen:
        r = realized(config, c.decay, updates, batch)
        kind = too_long(config, r) if updates else None
        if kind == "start":
            out.append(f"EMA: {c.label}: at the end of this run ({total:,} steps) {100 * r['weight_on_start']:.0f}% of "
                       "its weight will still be on the weights it started from: its evaluations will measure mostly "
                       "those weights; shorten the length or train longer")
        elif kind == "whole":
            out.append(f"EMA: {c.label}: its horizon is longer than this run ({total:,} steps): by its end half the "
                       f"weight will be on the last {half_weight_span(r)}, the EMA will average the whole run, its "
                       "early weights included; shorten the length or train longer")
    if switch_steps and switch_steps > total:
        out.append(f"EMA.switch_every: {switch_steps:,} optimizer steps is longer than this run ({total:,} steps): "
                   "no switch will happen")
    if snapshot_steps and snapshot_steps > total:
        out.append(f"EMA.posthoc: a snapshot every {snapshot_steps:,} optimizer steps is longer than this run "
                   f"({total:,} steps): no snapshot will be written")
    return out


# ---------------------------------------------------------------------------- what the run realizes
EXPONENTIAL_WITHIN = 0.1  # exponential never reaches d: it "holds" once 1 - d_t <= 1.1 (1 - d)
_SIMULATED_UPDATES = 2_000_000  # profiles longer than this are measured at this many updates (they are scale-free)
_REALIZED_UPDATES = 5 * _SIMULATED_UPDATES  # the realized horizon of a longer run is measured over this many updates
ON_START_LIMIT = 0.1  # more weight than this still on the starting weights is warned about
# A constant decay whose half-life equals the run, bias-corrected, puts half its weight on the last
# log(3/4)/log(1/2) = 41.5% of the run: a realized profile whose last half of the weight spans that much or more
# averages about the whole run.
WHOLE_RUN = math.log(0.75) / math.log(0.5)


def update_decays(config: EMAConfig, decay: float, count: int) -> np.ndarray:
    """``d_u = decay_at(u k) ** k`` of updates ``u = 0 .. count-1`` (``k = update_every``), float64."""
    k = config.update_every
    t = np.arange(int(count), dtype=np.float64) * k
    return decay_array(t, config.effective_schedule, decay, config.tau, config.inv_gamma, config.power,
                       config.min_decay) ** k


def holds_from(config: EMAConfig, decay: float) -> int:
    """The optimizer step from which the stated decay per step is in effect (within 10% of ``1 - d`` for
    ``exponential``, which only approaches it): the first update ``u`` with ``decay_at(u k)`` there, at step
    ``start_step + (u + 1) k``."""
    schedule, k = config.effective_schedule, config.update_every
    target = decay if schedule != "exponential" else 1.0 - (1.0 + EXPONENTIAL_WITHIN) * (1.0 - decay)

    def there(t: int) -> bool:
        return decay_at(t, schedule, decay, config.tau, config.inv_gamma, config.power, config.min_decay) >= \
            target * (1 - 1e-15)

    low, high = 0, 1
    while not there(high):
        high *= 2
        if high > 2 ** 62:
            break
    while low < high:  # the schedules are non-decreasing in t
        mid = (low + high) // 2
        low, high = (low, mid) if there(mid) else (mid + 1, high)
    updates = -(-low // k)
    return config.start_step + (updates + 1) * k


def update_weights(decays: np.ndarray, bias_correction: bool) -> Tuple[np.ndarray, float]:
    """(weight of each update's weights, weight left on the starting weights) after the updates ``decays``."""
    with np.errstate(divide="ignore"):
        logs = np.log(decays)
    after = np.concatenate([np.cumsum(logs[::-1])[::-1][1:], [0.0]])  # sum of log d_v over v > u
    weights = (1.0 - decays) * np.exp(after)
    start = float(np.exp(logs.sum())) if len(decays) else 1.0
    if bias_correction and start < 1.0:
        return weights / (1.0 - start), 0.0
    return weights, start


def half_weight_updates(weights: np.ndarray) -> Optional[int]:
    """The fewest last updates holding half of all the weight (None: the starting weights hold more than half)."""
    tail = np.cumsum(weights[::-1])
    reached = np.nonzero(tail >= 0.5)[0]
    return int(reached[0]) + 1 if len(reached) else None


def schedule_note(config: EMAConfig, decay: float) -> str:
    """For the start line: the schedule, the optimizer step from which ``decay`` holds, and what the EMA averages
    until then (e.g. ``threshold warm-up: 0.9999 from optimizer step 89,991; until then half the weight is on
    about the last 7% of the steps``)."""
    schedule = config.effective_schedule
    if schedule == "constant":
        if config.effective_bias_correction:
            auto = "schedule auto -> " if config.schedule == "auto" else ""
            return f"{auto}constant with bias correction: this length holds from the first update"
        return "constant from the first update, no bias correction: the starting weights keep weight d^n after n steps"
    step = holds_from(config, decay)
    within = " (within 10% of 1-d)" if schedule == "exponential" else ""
    auto = "schedule auto -> " if config.schedule == "auto" else ""
    updates = min(max(1, (step - config.start_step) // config.update_every), _SIMULATED_UPDATES)
    weights, start = update_weights(update_decays(config, decay, updates), config.effective_bias_correction)
    m = half_weight_updates(weights)
    share = "the starting weights hold more than half the weight" if m is None else \
        f"half the weight is on about the last {m / updates:.0%} of the steps"
    return f"{auto}{schedule} warm-up: {_number(decay)} from optimizer step {step:,}{within}; until then {share}"


def realized(config: EMAConfig, decay: float, num_updates: int, batch: Optional[BatchInfo]) -> Dict[str, Any]:
    """What the EMA averaged over, after ``num_updates`` updates: ``half_weight_steps`` (the last optimizer steps
    holding half the weight; None when the starting weights hold more), ``half_weight_images`` (that x the
    global batch), ``weight_on_start`` (the weight still on the weights the EMA started from)."""
    n = int(num_updates)
    if n <= 0:
        return {"updates": 0, "half_weight_steps": None, "half_weight_images": None, "weight_on_start": 1.0}
    weights, start = update_weights(update_decays(config, decay, min(n, _REALIZED_UPDATES)),
                                    config.effective_bias_correction)
    m = half_weight_updates(weights)
    steps = m * config.update_every if m is not None else None
    images = steps * batch.global_batch if steps is not None and batch is not None else None
    return {"updates": n, "half_weight_steps": steps, "half_weight_images": images, "weight_on_start": start}


def too_long(config: EMAConfig, r: Dict[str, Any]) -> Optional[str]:
    """Whether the profile ``r`` (``realized``) is too long for the run it covers: ``"start"`` when more than
    ``ON_START_LIMIT`` of the weight is still on the weights the EMA started from, ``"whole"`` when the last half of
    the weight spans ``WHOLE_RUN`` of the run's steps or more (the EMA averages about the whole run), else None.
    A warm-up schedule that keeps the average on the last steps is not too long, whatever its target decay."""
    if r["weight_on_start"] > ON_START_LIMIT:
        return "start"
    covered = min(r["updates"], _REALIZED_UPDATES) * config.update_every
    m = r["half_weight_steps"]
    return "whole" if covered and m is not None and m >= WHOLE_RUN * covered else None


def half_weight_span(r: Dict[str, Any]) -> str:
    """``256 images`` (or ``8 optimizer steps`` where the batch is unknown): the last stretch holding half the weight
    of the profile ``r``."""
    if r["half_weight_images"] is not None:
        return f"{r['half_weight_images']:,.0f} images"
    return f"{r['half_weight_steps']:,.0f} optimizer steps"

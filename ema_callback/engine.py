"""The EMA engine: shadow weights of any ``paddle.nn.Layer``, independent of any training loop.

After every optimizer step call ``ema.step()``. On the k-th step counted from ``start_step``
(every ``update_every`` steps) the shadow is updated in place, without autograd history::

    d   = decay_at(t) ** update_every          t = optimizer steps covered by earlier updates
    ema = d * ema + (1 - d) * w                 (float32; w from the optimizer's fp32 master weight if any)

Until ``start_step`` the shadow copies the weights. With ``bias_correction`` the average starts from 0
and is read as ``ema / (1 - prod(d_i))`` (TensorFlow's ``zero_debias``). A step whose weights hold a
NaN/Inf changes nothing and is counted in ``num_skipped``.

Several EMAs of different lengths (``decays``, or a list of half-lives) are shadows of one store, updated in
one pass (``storage``); shadow 0 is the primary, and every reading method takes ``shadow=`` (default 0). The
decays come from the config and the run's global batch (``horizon``: ``decay_batch_size``, half-lives).

With ``recompute_bn: N`` every ``apply_to`` also recomputes the BatchNorm statistics for the EMA weights over the
last N training batches (``bn_recompute``); ``restore`` puts the raw statistics back bit for bit. With
``switch_every`` (Switch EMA, Li et al. 2024, arXiv 2402.09240) ``step`` copies the primary EMA into the weights
(and the AMP O2 fp32 master weights) every N optimizer steps; training continues from them, optimizer state kept.

``apply_to(model)`` swaps the averaged values into the model (raw values kept aside), ``restore(model)``
puts the raw values back bit for bit; ``with ema.swapped(model):`` does both. ``save``/``load`` write and
read a ``.pdema`` file atomically; ``export`` writes the averaged weights as a plain ``.pdparams``.

Create it after the model is on its device and wrapped for AMP, before or after ``paddle.DataParallel``
(it unwraps ``_layers``); pass the optimizer under AMP O2 so that fp32 master weights are averaged.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import uuid
from typing import Any, Dict, Iterator, List, Mapping, Optional

import numpy as np

from .config import EMAConfig
from .device_counters import DeviceCounters
from .checkpoint_io import atomic_save
from .errors import EMAConfigError, EMAError, EMAFileError
from .horizon import (BatchInfo, Candidate, candidates, describe, half_life_steps, length_warnings, realized,
                      snapshot_period, switch_period)
from .posthoc_math import gamma_of
from . import bn_recompute
from .paddle_compat import cast_rounded, data_pointer, host_view, move_to, paddle
from .schedules import decay_at
from .selection import AVERAGE, COPY, FOLLOW, Entry, classify, unwrap
from .state_file import FORMAT, READABLE_FORMATS, read_state, store_once
from .storage import NumpyStore, ShadowStore, make_store

logger = logging.getLogger("ema_callback")


class _Counter:
    """An update counter: a Python value on the host path, read from ``DeviceCounters`` on the device path (a host
    synchronisation, so only when the run logs, evaluates, saves or a caller asks)."""

    def __init__(self, device_name: str):
        self.device_name = device_name

    def __set_name__(self, owner, name: str) -> None:
        self.host_name = "_" + name

    def __get__(self, engine, owner=None):
        if engine is None:
            return self
        return getattr(engine._device, self.device_name) if engine._device else getattr(engine, self.host_name)

    def __set__(self, engine, value) -> None:
        setattr(engine._device, self.device_name, value) if engine._device else setattr(engine, self.host_name, value)


class ExponentialMovingAverage:
    """Exponential moving average of a model's weights (see the module docstring for the formula).

    Args:
        model: the layer to average (``paddle.DataParallel`` is unwrapped).
        config: an ``EMAConfig``; keyword arguments (``decay=0.999``, ...) override its fields.
        optimizer: under AMP O2, the optimizer whose ``_master_weights`` hold the fp32 copies.
        backend: the store that runs the update: ``auto`` (fastest for the case), ``numpy`` (host, float32),
            ``paddle`` (flat device tensor; forced here to run the device path on a CPU) or ``reference``
            (the textbook loop, for tests). ``update_path`` is its former name, still accepted.
    """

    num_updates = _Counter("updates")  # EMA updates applied
    num_skipped = _Counter("skipped")  # updates skipped for NaN/Inf weights (or a GradScaler-skipped step)
    decay_products = _Counter("products")  # prod(d_i) of each shadow, for bias correction
    last_decays = _Counter("lasts")  # the decay of each shadow's last update (None before the first)

    def __init__(self, model: paddle.nn.Layer, config: Optional[EMAConfig] = None,
                 optimizer: Optional[paddle.optimizer.Optimizer] = None, backend: str = "auto",
                 update_path: Optional[str] = None, batch: Optional[BatchInfo] = None,
                 **overrides: Any):
        if not paddle.in_dynamic_mode():
            raise RuntimeError("ExponentialMovingAverage needs dynamic-graph mode; call paddle.disable_static() "
                               "(a static-graph program can use paddle.static.ExponentialMovingAverage)")
        config = config or EMAConfig()
        self.config = config.replace(**overrides) if overrides else config
        self.optimizer = optimizer
        self.backend = update_path or backend
        self.batch = batch  # the measured global batch (needed by decay_batch_size and half-lives)
        self.candidates: List[Candidate] = candidates(self.config, batch)
        self.decays = [c.decay for c in self.candidates]  # target decay per optimizer step, one per shadow
        self.labels = [c.label for c in self.candidates]
        self.switch_period = switch_period(self.config, batch)  # Switch EMA: optimizer steps between switches
        self.num_switches = 0
        self.run_id = uuid.uuid4().hex[:12]  # a fresh run's id (a resume takes the saved one): post-hoc series
        self.num_candidates = len(self.decays)  # the EMAs; post-hoc profile shadows follow them
        posthoc = self.config.posthoc or {}
        self.profile_sigma_rels: List[float] = list(posthoc.get("sigma_rels") or [])
        self.profile_gammas: List[float] = [float(gamma_of(s)) for s in self.profile_sigma_rels]
        self.labels += [f"phema{s:g}" for s in self.profile_sigma_rels]
        self.posthoc_dir: Optional[str] = posthoc.get("dir")  # where snapshots go (integrations fill it in)
        self.snapshot_period = snapshot_period(posthoc, batch) if posthoc else 0
        self.model = unwrap(model)
        self.entries: List[Entry] = classify(model, self.config.include, self.config.exclude, self.config.buffers)
        self._averaged = [e for e in self.entries if e.role == AVERAGE]
        self._copied = [e for e in self.entries if e.role == COPY]
        self._buffer_indices = [i for i, e in enumerate(self._averaged) if e.is_buffer]
        self.num_steps = 0  # optimizer steps seen by step()
        self._num_updates, self._num_skipped = 0, 0  # the host path's counters (see the _Counter attributes)
        self._decay_products, self._last_decays = [1.0] * len(self.labels), [None] * len(self.labels)
        self._backup: Optional[Dict[str, paddle.Tensor]] = None
        self._applied_label: Optional[str] = None
        self._warned_nonfinite = False
        on_host = self.config.device == "cpu" or all(e.tensor.place.is_cpu_place() for e in self._averaged)
        place = self._averaged[0].tensor.place if self._averaged else None
        self.store: ShadowStore = make_store([e.tensor.shape for e in self._averaged], self.config.storage_dtype,
                                             on_host=on_host, backend=self.backend, place=place,
                                             count=len(self.labels))
        self.store.check_finite = self.config.nan_guard
        self.deferred = bool(getattr(self.store, "deferred", False))  # the device path: no host read in step()
        self._device = DeviceCounters(self.store.flat.place, self.decays, self.profile_gammas) if self.deferred \
            else None
        self._copies: Dict[str, Any] = {}  # numpy arrays (host path) or device tensors (device path)
        self._host_views: Dict[str, Any] = {}
        with paddle.no_grad():
            self.store.copy_(self._sources())
            self._snapshot_copies()
        self.recorder: Optional[bn_recompute.BatchRecorder] = None
        self.bn_collective = True  # average recomputed statistics over ranks (False where only rank 0 evaluates)
        self.bn_recomputed_from = 0  # batches used by the last recomputation
        if self.config.recompute_bn:
            self._bn_stats = {id(t) for layer in bn_recompute.batchnorm_layers(self.model)
                              for t in (layer._mean, layer._variance)}
            if self._bn_stats:
                self.recorder = bn_recompute.BatchRecorder(self.model, self.config.recompute_bn)
            else:
                logger.info("EMA: recompute_bn: %s has no BatchNorm layer; the option does nothing",
                            type(self.model).__name__)

    # ------------------------------------------------------------------ update
    def _sources(self) -> List[paddle.Tensor]:
        """The tensors averaged this step: fp32 master weights under AMP O2 where they exist."""
        masters = getattr(self.optimizer, "_master_weights", None)
        if not masters:
            return [e.tensor for e in self._averaged]
        return [masters.get(e.tensor.name, e.tensor) for e in self._averaged]

    def _host_view(self, e: Entry) -> Optional[np.ndarray]:
        """Writable host view of a CPU float32 tensor, cached while its allocation stays the same."""
        ptr = data_pointer(e.tensor)
        cached = self._host_views.get(e.name)
        if cached is not None and cached[0] == ptr:
            return cached[1]
        view = host_view(e.tensor)
        self._host_views[e.name] = (ptr, view)
        return view

    def _snapshot_copies(self, ok=None) -> None:
        """Copied tensors take the live values (on the device path where ``ok``, with no host read)."""
        for e in self._copied:
            if not self.deferred:
                self._copies[e.name] = e.tensor.numpy().copy()
            elif ok is None or e.name not in self._copies:
                self._copies[e.name] = e.tensor.detach().clone()
            else:
                self._copies[e.name] = paddle.where(ok, e.tensor.detach(), self._copies[e.name])

    def _copies_numpy(self) -> Dict[str, np.ndarray]:
        return {k: (v.numpy() if isinstance(v, paddle.Tensor) else v).copy() for k, v in self._copies.items()}

    @property
    def decay_product(self) -> float:
        """prod(d_i) of the primary shadow."""
        return self.decay_products[0]

    @decay_product.setter
    def decay_product(self, value: float) -> None:
        self.decay_products = [float(value)] * self.num_shadows

    @property
    def last_decay(self) -> Optional[float]:
        return self.last_decays[0]

    @property
    def num_shadows(self) -> int:
        return len(self.labels)

    @property
    def candidate_labels(self) -> List[str]:
        """The EMAs that are evaluated and selected (post-hoc profile shadows are not)."""
        return self.labels[:self.num_candidates]

    def describe_length(self) -> str:
        """The start line: global batch, each EMA's decay per optimizer step and its half-life, the schedule and the
        step from which the stated decay holds (``horizon``)."""
        return describe(self.config, self.batch, self.candidates)

    def log_start(self, log=logger) -> None:
        """The start line, then a warning for each length or period longer than the run (where it is known)."""
        log.info("EMA: %s", self.describe_length())
        for line in length_warnings(self.config, self.batch, self.candidates, self.switch_period,
                                    self.snapshot_period):
            log.warning(line)

    def realized(self, shadow=0) -> Dict[str, Any]:
        """What EMA ``shadow`` averaged over so far (``horizon.realized``): the last images holding half its
        weight, and the weight still on the starting weights (a host read of the update count)."""
        j = self.shadow_index(shadow)
        return realized(self.config, self.decays[j], self.num_updates, self.batch)

    def log_realized(self, log=logger) -> None:
        """At the end of training: each EMA's realized horizon; a warning where more than 10% of its weight is
        still on the starting weights, or its half-life is longer than the run."""
        steps = self.num_updates * self.config.update_every
        for j, label in enumerate(self.candidate_labels):
            r = self.realized(j)
            unit = "images" if r["half_weight_images"] is not None else "optimizer steps"
            span = r["half_weight_images"] if r["half_weight_images"] is not None else r["half_weight_steps"]
            half = f"half its weight on the last {span:,.0f} {unit}" if span is not None else \
                "the starting weights hold more than half its weight"
            log.info("EMA: %s realized over %d optimizer steps: %s, %.1f%% on the weights it started from (stated "
                     "half-life %s optimizer steps)", label, steps, half, 100 * r["weight_on_start"],
                     f"{half_life_steps(self.decays[j]):,.0f}")
            if r["weight_on_start"] > 0.1:
                log.warning("EMA: %s: %.0f%% of its weight is still on the weights it started from after %d optimizer "
                            "steps: its evaluations measure mostly those weights; shorten the length or train longer",
                            label, 100 * r["weight_on_start"], steps)
            elif steps and half_life_steps(self.decays[j]) > steps:
                log.warning("EMA: %s: its half-life (%s optimizer steps) is longer than the run (%d steps): it "
                            "averaged the whole run, the early weights included", label,
                            f"{half_life_steps(self.decays[j]):,.0f}", steps)

    def decays_for_next_update(self) -> List[float]:
        """``decay_at(t) ** update_every`` of each shadow for the next update (t = ``num_updates * update_every``)."""
        c = self.config
        t = self.num_updates * c.update_every
        ema = [decay_at(t, c.effective_schedule, target, c.tau, c.inv_gamma, c.power, c.min_decay) ** c.update_every
               for target in self.decays]
        # power-function profiles (EDM2): beta = (1 - dt/t)^(gamma+1), t = (u+1)k after this update, dt = k
        u = self.num_updates
        return ema + [(u / (u + 1.0)) ** (g + 1.0) for g in self.profile_gammas]

    def decay_for_next_update(self) -> float:
        """The primary shadow's ``decays_for_next_update``."""
        return self.decays_for_next_update()[0]

    def will_update_at(self, step: int) -> bool:
        """Whether the ``step``-th optimizer step (1-based) is an EMA update."""
        c = self.config
        return step > c.start_step and (step - c.start_step) % c.update_every == 0

    def step(self, found_inf=None) -> Optional[bool]:
        """Account for one optimizer step; returns True when the shadow was averaged this step, False when not.

        ``found_inf``: the AMP GradScaler's flag for this step (None without AMP); a skipped step is not an
        update. On the device path (``deferred``) nothing is read back: the decision stays on the device, the
        call returns None and the counters say what happened when read.
        """
        if self._backup is not None:
            raise RuntimeError("EMA.step() while EMA weights are applied; call restore(model) first")
        if self.deferred:
            return self._step_on_device(found_inf)
        if found_inf is not None and bool(found_inf):  # not an optimizer update (host path: reading it is free)
            return False
        self.num_steps += 1
        with paddle.no_grad():
            if self.num_steps <= self.config.start_step:
                if self.store.copy_(self._sources()):
                    self._snapshot_copies()
                else:
                    self._note_nonfinite()
                return False
            if not self.will_update_at(self.num_steps):
                return False
            ds = self.decays_for_next_update()
            reset = self.config.effective_bias_correction and self.num_updates == 0
            weights = 1.0 - ds[0] if len(ds) == 1 else [1.0 - d for d in ds]
            if not self.store.lerp_(self._sources(), weights, reset=reset):
                self._note_nonfinite()
                return False
            self._snapshot_copies()
            self._sync_buffers_across_ranks()
        self._num_updates += 1
        self._decay_products = [p * d for p, d in zip(self._decay_products, ds)]
        self._last_decays = list(ds)
        self._periodic()
        return True

    def _periodic(self) -> None:
        """After an update: Switch EMA and post-hoc snapshots, each every its period in optimizer steps (counted on
        the host, so the device path decides with no host read; each action itself reads the device once)."""
        def due(period: int) -> bool:
            return bool(period) and self.num_steps > self.config.start_step and self.num_steps % period == 0

        if due(self.switch_period):
            self.switch()
        if due(self.snapshot_period):
            from .posthoc import write_snapshot  # (numpy only; imported when first needed)

            write_snapshot(self)

    def switch(self) -> float:
        """Switch EMA: the model's weights (and AMP O2 fp32 master weights) take the primary EMA's values; the EMA
        continues from them, the optimizer state is kept. Returns the relative drift before the switch.

        Li et al. 2024 ("Switch EMA", arXiv 2402.09240), Keras ``ema_overwrite_frequency``, ema-pytorch
        ``update_model_with_ema_every``. The drift read is a host synchronisation (once per switch)."""
        if self._backup is not None:
            raise RuntimeError("EMA.switch() while EMA weights are applied; call restore(model) first")
        averaged = self.averaged_numpy(0)
        drift = self._drift_from(averaged)
        masters = getattr(self.optimizer, "_master_weights", None) or {}
        with paddle.no_grad():
            for e in self.entries:
                if e.role == FOLLOW or e.name not in averaged:
                    continue
                value = averaged[e.name]
                master = masters.get(e.tensor.name)
                if master is not None:  # the fp32 copy the next step starts from (else it overwrites the switch)
                    _copy_into(master, value.astype(np.float32))
                _copy_into(e.tensor, value)
        self._host_views.clear()
        self.num_switches += 1
        logger.info("EMA: switch %d at optimizer step %d: the weights take the EMA weights (relative drift before "
                    "||ema-w||/||w|| = %.4g); optimizer state kept", self.num_switches, self.num_steps, drift)
        return drift

    def _step_on_device(self, found_inf) -> None:
        """``step`` on the device path: the same rules, every decision a device op, no host synchronisation.

        ``num_steps`` counts calls (a GradScaler-skipped call included: its update is skipped on the device), the
        schedule counts real updates on the device (``DeviceCounters``)."""
        self.num_steps += 1
        with paddle.no_grad():
            if self.num_steps <= self.config.start_step:
                ok = self.store.copy_(self._sources(), skip=found_inf)
                self._device.record(ok)
                self._snapshot_copies(ok)
                return None
            if not self.will_update_at(self.num_steps):
                return None
            d = self._device.decay(self.config)
            reset = self._device.first_update() if self.config.effective_bias_correction else False
            ok = self.store.lerp_(self._sources(), 1.0 - d, reset=reset, skip=found_inf)
            self._device.record(ok, d)
            self._snapshot_copies(ok)
            self._sync_buffers_across_ranks()
        self._periodic()
        return None

    def _sync_buffers_across_ranks(self) -> None:
        """Average the buffer part of the shadow (BatchNorm statistics) over data-parallel ranks.

        Paddle's DataParallel all-reduces gradients, so parameters agree on every rank, but each rank keeps
        its own running statistics. The EMA is linear, so the mean of per-rank EMAs equals the EMA of the
        per-rank mean (timm's ``distribute_bn``); doing it after each update keeps every rank's shadow identical.
        """
        world = paddle.distributed.get_world_size()
        copied = [e.name for e in self._copied if e.is_buffer]
        if world <= 1 or not (self._buffer_indices or copied):
            return
        if self.deferred:
            self._sync_buffers_on_device(world, copied)
            return
        shadows = [self.store.read_segments(self._buffer_indices, j) for j in range(self.num_shadows)]
        pieces = shadows + [self._copies[name].astype(np.float32).reshape(-1) for name in copied]
        flat = paddle.to_tensor(np.concatenate(pieces))
        paddle.distributed.all_reduce(flat)
        mean = (flat.numpy() / world).astype(np.float32)
        start = 0
        for j, shadow in enumerate(shadows):
            self.store.write_segments(self._buffer_indices, mean[start:start + shadow.size], j)
            start += shadow.size
        for name in copied:
            size = self._copies[name].size
            self._copies[name] = mean[start:start + size].reshape(self._copies[name].shape).astype(
                self._copies[name].dtype)
            start += size

    def _sync_buffers_on_device(self, world: int, copied: List[str]) -> None:
        """The same mean over ranks with device ops only (one all-reduce of the small buffer part)."""
        offsets = self.store.offsets
        spans = [(int(offsets[i]), int(offsets[i + 1])) for i in self._buffer_indices]
        pieces = [flat[a:b].astype("float32") for flat in self.store.flats for a, b in spans]
        pieces += [self._copies[name].astype("float32").reshape([-1]) for name in copied]
        joined = paddle.concat(pieces)
        paddle.distributed.all_reduce(joined)
        joined.scale_(1.0 / world)
        start = 0
        for flat in self.store.flats:
            for a, b in spans:
                flat[a:b] = joined[start:start + b - a].astype(flat.dtype)
                start += b - a
        for name in copied:
            old = self._copies[name]
            size = int(np.prod(old.shape)) if old.shape else 1
            self._copies[name] = joined[start:start + size].reshape(old.shape).astype(old.dtype)
            start += size

    update = step

    def reset(self) -> None:
        """Start over from the current weights: shadow = w, counters at 0 (ppdet's ``cycle_epoch``)."""
        with paddle.no_grad():
            self.store.copy_(self._sources())
            self._snapshot_copies()
        self.num_steps = self.num_updates = 0
        self.decay_products = [1.0] * self.num_shadows
        self.last_decays = [None] * self.num_shadows

    def load_average(self, values: Mapping[str, np.ndarray], num_steps: int) -> None:
        """Take ``values`` (an already bias-corrected average, e.g. another EMA's weights) as the shadow."""
        missing = [e.name for e in self._averaged if e.name not in values]
        if missing:
            raise EMAFileError(f"EMA weights: missing {_short(missing)}")
        for j in range(self.num_shadows):
            self.store.set_numpy_values([np.asarray(values[e.name], dtype=np.float32) for e in self._averaged], j)
        self.num_steps = self.num_updates = int(num_steps)
        self.decay_product = 0.0  # the values are final: bias correction, if on, divides by 1

    def _note_nonfinite(self) -> None:
        self.num_skipped += 1
        if not self._warned_nonfinite:
            logger.warning("EMA: weights hold NaN/Inf at optimizer step %d; that update is skipped "
                           "(the shadow keeps its last finite value; further skips are only counted)", self.num_steps)
            self._warned_nonfinite = True

    # ------------------------------------------------------------------ reading
    def _correction(self, shadow: int = 0) -> float:
        if self.config.effective_bias_correction and self.num_updates > 0:
            return 1.0 / (1.0 - self.decay_products[shadow])
        return 1.0

    def shadow_index(self, shadow) -> int:
        """A shadow given by index or label (``'ema0.999'``), as an index."""
        if isinstance(shadow, str):
            if shadow not in self.labels:
                raise EMAError(f"{shadow!r}: no such EMA; this engine has {', '.join(self.labels)}")
            return self.labels.index(shadow)
        if not 0 <= int(shadow) < self.num_shadows:
            raise EMAError(f"shadow {shadow}: this engine has {self.num_shadows} EMA(s)")
        return int(shadow)

    def averaged_numpy(self, shadow=0) -> Dict[str, np.ndarray]:
        """The averaged tensors (float32, bias-corrected) and copied tensors, by state-dict name."""
        j = self.shadow_index(shadow)
        scale = np.float32(self._correction(j))
        out = {e.name: (v * scale if scale != 1 else v)
               for e, v in zip(self._averaged, self.store.numpy_values(j))}
        out.update(self._copies_numpy())
        return out

    def ema_state_dict(self, model: paddle.nn.Layer, shadow=0) -> Dict[str, np.ndarray]:
        """A complete ``state_dict`` of ``model`` with EMA values (``follow`` tensors as they are live)."""
        averaged = self.averaged_numpy(shadow)
        by_id = {id(e.tensor): e.name for e in self.entries}
        out = {}
        for name, tensor in unwrap(model).state_dict().items():
            key = by_id.get(id(tensor), name)
            value = averaged.get(key)
            out[name] = (value.astype(_numpy_dtype(tensor)) if value is not None else tensor.numpy())
        return out

    def fingerprint(self) -> str:
        """sha1 of the shadow and copied tensors (equal on every rank of a data-parallel run)."""
        digest = hashlib.sha1()
        for j in range(self.num_shadows):
            for e, value in zip(self._averaged, self.store.numpy_values(j)):
                digest.update(e.name.encode())
                digest.update(np.ascontiguousarray(value).tobytes())
        copies = self._copies_numpy()
        for name in sorted(copies):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(copies[name]).tobytes())
        return digest.hexdigest()

    def summary(self) -> str:
        return (f"optimizer step {self.num_steps}, {self.num_updates} updates, {self.num_skipped} skipped for "
                f"NaN/Inf, shadow sha1 {self.fingerprint()[:16]} (rank {paddle.distributed.get_rank()})")

    def log_before_eval(self) -> float:
        """Log what a user needs before trusting an EMA evaluation; returns the relative drift.

        Warns when the EMA was never updated, when the drift is NaN, and when the shadow still equals the
        weights after 100+ updates with decay < 1 (an EMA that is not averaging anything).
        """
        drift = self.drift()
        if self.num_updates == 0:
            logger.warning("EMA: evaluating before the first EMA update (optimizer step %d, start_step %d): "
                           "the EMA still equals a copy of the weights", self.num_steps, self.config.start_step)
        elif drift != drift:
            logger.warning("EMA: the drift between EMA and raw weights is NaN (optimizer step %d)", self.num_steps)
        elif drift == 0.0 and self.num_updates >= 100:
            logger.warning("EMA: after %d updates the EMA equals the raw weights: nothing is being averaged "
                           "(check include/exclude and that the weights change)", self.num_updates)
        logger.info("EMA: evaluating EMA weights at optimizer step %d (%d updates, %d skipped for NaN/Inf), "
                    "relative drift ||ema-w||/||w|| = %.4g", self.num_steps, self.num_updates, self.num_skipped, drift)
        return drift

    def _check_model(self, model: Optional[paddle.nn.Layer]) -> None:
        """``model`` (optional everywhere) must be the layer this EMA averages (``DataParallel`` unwrapped)."""
        if model is not None and unwrap(model) is not self.model:
            raise EMAError(f"{type(model).__name__}: not the model this EMA was built for "
                           f"({type(self.model).__name__}); build an ExponentialMovingAverage for it")

    def drift(self, model: Optional[paddle.nn.Layer] = None, shadow=0) -> float:
        """Relative drift ``||ema - w|| / ||w||`` over the averaged tensors (NaN if either is not finite)."""
        self._check_model(model)
        return self._drift_from(self.averaged_numpy(shadow))

    def _drift_from(self, averaged: Mapping[str, np.ndarray]) -> float:
        num = den = 0.0
        for e in self._averaged:
            w = e.tensor.astype("float32").numpy().astype(np.float64)
            num += float(np.sum((averaged[e.name].astype(np.float64) - w) ** 2))
            den += float(np.sum(w ** 2))
        return float(np.sqrt(num) / np.sqrt(den)) if den > 0 else float("nan") if num != num else 0.0

    # ------------------------------------------------------------------ swapping
    @property
    def applied(self) -> bool:
        return self._backup is not None

    @property
    def applied_label(self) -> Optional[str]:
        """The label of the shadow whose values are in the model (None when the raw weights are)."""
        return self._applied_label if self._backup is not None else None

    def apply_to(self, model: Optional[paddle.nn.Layer] = None, shadow=0) -> None:
        """Put EMA values (of ``shadow``, an index or label) into the model's tensors in place; the raw values are
        kept for ``restore``.

        CPU float32 tensors are swapped with plain memory copies through host views; others with
        ``paddle.assign`` (casting to the tensor's dtype, e.g. float16 under AMP O2).
        """
        self._check_model(model)
        if self._backup is not None:
            raise RuntimeError("EMA weights are already applied; call restore(model) first")
        j = self.shadow_index(shadow)
        recompute = self.recorder is not None and len(self.recorder.batches) > 0
        targets = [e for e in self.entries if e.role != FOLLOW or (recompute and id(e.tensor) in self._bn_stats)]
        scale = self._correction(j)
        fast_store = isinstance(self.store, NumpyStore)
        backup: Dict[str, Any] = {}
        with paddle.no_grad():
            for e in targets:
                view = self._host_view(e)
                backup[e.name] = view.copy() if view is not None else (
                    e.tensor.cpu() if self.config.device == "cpu" else e.tensor.clone())
            slow = []
            for index, e in enumerate(self._averaged):
                view = self._host_view(e) if fast_store else None
                if view is None:
                    slow.append((index, e))
                elif scale != 1.0:
                    np.multiply(self.store.view(index, j).reshape(view.shape), np.float32(scale), out=view)
                else:
                    np.copyto(view, self.store.view(index, j).reshape(view.shape))
            if slow:
                values = self.store.tensor_values([index for index, _ in slow], j)
                for (_, e), value in zip(slow, values):
                    _copy_into(e.tensor, value * scale if scale != 1.0 else value)
            for e in self._copied:
                _copy_into(e.tensor, self._copies[e.name])
        self._backup = backup
        self._applied_label = self.labels[j]
        if recompute:
            self.bn_recomputed_from = bn_recompute.recompute(self.model, self.recorder.batches,
                                                             collective=self.bn_collective)
            self._host_views.clear()
            logger.info("EMA: BatchNorm statistics of %s recomputed for its weights: %d layers over the last %d "
                        "training batches%s", self.labels[j], len(bn_recompute.batchnorm_layers(self.model)),
                        self.bn_recomputed_from, " (averaged over ranks)" if self.bn_collective and
                        paddle.distributed.get_world_size() > 1 else "")

    def restore(self, model: Optional[paddle.nn.Layer] = None) -> None:
        """Put the raw values back, bit for bit."""
        self._check_model(model)
        if self._backup is None:
            raise RuntimeError("restore() without apply_to(); the model already holds its raw weights")
        with paddle.no_grad():
            for e in self.entries:
                saved = self._backup.get(e.name)
                if saved is None:
                    continue
                view = self._host_view(e) if isinstance(saved, np.ndarray) else None
                if view is not None:
                    np.copyto(view, saved.reshape(view.shape))
                else:
                    _copy_into(e.tensor, saved if not isinstance(saved, np.ndarray) else saved.reshape(e.tensor.shape))
        self._backup = None

    def backup_numpy(self) -> Dict[str, np.ndarray]:
        """The raw values kept aside while EMA weights are applied (empty when not applied)."""
        out = {}
        for e in self.entries:
            saved = (self._backup or {}).get(e.name)
            if saved is not None:
                out[e.name] = saved.reshape(e.tensor.shape).copy() if isinstance(saved, np.ndarray) else saved.numpy()
        return out

    @contextlib.contextmanager
    def swapped(self, model: Optional[paddle.nn.Layer] = None, shadow=0) -> Iterator["ExponentialMovingAverage"]:
        """``with ema.swapped(model): evaluate(model)``: EMA weights inside, raw weights after."""
        self.apply_to(model, shadow)
        try:
            yield self
        finally:
            self.restore(model)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue exactly: counters, config and the raw (uncorrected) shadow(s).

        ``shadow`` is the primary; with several EMAs, ``shadows`` holds the others and ``decay_products``,
        ``last_decays``, ``labels`` one entry per EMA. ``decays`` (the effective decays per optimizer step) and
        ``batch`` (the measured global batch) make the numbers of a saved file explain themselves."""
        products, lasts = self.decay_products, self.last_decays
        state = {
            "format": FORMAT,
            "num_steps": self.num_steps,
            "num_updates": self.num_updates,
            "num_skipped": self.num_skipped,
            "decay_product": products[0],
            "last_decay": lasts[0],
            "config": self.config.to_block(),
            "shadow": {e.name: v for e, v in zip(self._averaged, self.store.numpy_values())},
            "copies": self._copies_numpy(),
            "labels": list(self.labels),
            "decays": list(self.decays),
            "batch": self.batch.to_dict() if self.batch is not None else None,
            "num_switches": self.num_switches,
            "run_id": self.run_id,
            "recompute_bn_batches": self.bn_recomputed_from,
        }
        if self.num_shadows > 1:
            state["shadows"] = [{e.name: v for e, v in zip(self._averaged, self.store.numpy_values(j))}
                                for j in range(1, self.num_shadows)]
            state["decay_products"], state["last_decays"] = products, lasts
        return state

    def set_state_dict(self, state: Mapping[str, Any], source: str = "state dict") -> None:
        """Load a ``state_dict()``; a mismatch with the model raises ``EMAFileError`` listing the keys."""
        if not isinstance(state, Mapping) or state.get("format") not in READABLE_FORMATS:
            found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
            raise EMAFileError(f"{source}: not an ema-callback state (format {found!r}, expected {FORMAT!r})")
        shadow = state.get("shadow") or {}
        expected = {e.name: list(e.tensor.shape) for e in self._averaged}
        missing = sorted(set(expected) - set(shadow))
        extra = sorted(set(shadow) - set(expected))
        reshaped = sorted(k for k in set(expected) & set(shadow)
                          if list(np.shape(shadow[k])) != expected[k])
        if missing or extra or reshaped:
            parts = []
            if missing:
                parts.append(f"missing {_short(missing)}")
            if extra:
                parts.append(f"unexpected {_short(extra)}")
            if reshaped:
                parts.append("shape mismatch " + _short([f"{k} {list(np.shape(shadow[k]))}!={expected[k]}"
                                                         for k in reshaped]))
            raise EMAFileError(f"{source}: does not match the model: {'; '.join(parts)}")
        others = list(state.get("shadows") or [])
        if len(others) + 1 != self.num_shadows:
            saved = list(state.get("labels") or ["ema"])
            saved_emas = [l for l in saved if not l.startswith("phema")]
            saved_profiles = [l for l in saved if l.startswith("phema")]
            ours = self.labels[self.num_candidates:]

            def listed(labels):
                return f" ({', '.join(labels)})" if labels else ""

            raise EMAConfigError(
                f"EMA.{self.config.length_key}: {source} holds {len(saved_emas)} EMA(s){listed(saved_emas)} and "
                f"{len(saved_profiles)} post-hoc profile(s){listed(saved_profiles)}; this run asks for "
                f"{self.num_candidates} EMA(s){listed(self.candidate_labels)} and {len(ours)} post-hoc "
                f"profile(s){listed(ours)}; resume with the same EMAs and EMA.posthoc.sigma_rels")
        saved_config = state.get("config") or {}
        for key in ("decay", "schedule", "update_every", "start_step", "bias_correction"):
            if key in saved_config and saved_config[key] != getattr(self.config, key):
                logger.info("EMA: %s was %r in %s, now %r", key, saved_config[key], source, getattr(self.config, key))
        saved_batch, saved_decays = state.get("batch") or {}, state.get("decays")
        if saved_batch.get("global_batch") and self.batch is not None and \
                saved_batch["global_batch"] != self.batch.global_batch:
            logger.info("EMA: global batch was %s in %s (%s x %s ranks x %s), now %d (%d x %d ranks x %d): the "
                        "decays continue as %s", saved_batch["global_batch"], source, saved_batch.get("per_device"),
                        saved_batch.get("world"), saved_batch.get("accumulate"), self.batch.global_batch,
                        self.batch.per_device, self.batch.world, self.batch.accumulate,
                        ", ".join(f"{d:.8g}" for d in self.decays))
        elif saved_decays and [round(d, 12) for d in saved_decays] != [round(d, 12) for d in self.decays]:
            logger.info("EMA: decays were %s in %s, now %s", ", ".join(f"{d:.8g}" for d in saved_decays), source,
                        ", ".join(f"{d:.8g}" for d in self.decays))
        self.store.set_numpy_values([shadow[e.name] for e in self._averaged])
        for j, values in enumerate(others, start=1):
            self.store.set_numpy_values([np.asarray(values[e.name]) for e in self._averaged], j)
        copies = state.get("copies") or {}
        for name, value in copies.items():
            if name in self._copies:
                self._copies[name] = (move_to(paddle.to_tensor(np.asarray(value)), self.store.flat.place)
                                      if self.deferred else np.asarray(value))
        self.num_steps = int(state["num_steps"])
        self.num_switches = int(state.get("num_switches", 0))
        self.run_id = str(state.get("run_id") or "legacy")  # its post-hoc series continues (posthoc.LEGACY_RUN)
        self.num_updates = int(state["num_updates"])
        self.num_skipped = int(state.get("num_skipped", 0))
        self.decay_products = [float(v) for v in state.get("decay_products") or [state["decay_product"]]]
        self.last_decays = list(state.get("last_decays") or [state.get("last_decay")])

    def save(self, path: str, extra: Optional[Mapping[str, Any]] = None,
             companions: Optional[Mapping[str, Mapping[str, np.ndarray]]] = None) -> None:
        """Write ``state_dict()`` (plus ``extra`` entries, e.g. raw weights) to ``path`` atomically.

        ``companions`` (suffix -> arrays, e.g. ``{".pdparams": what the suite saved}``): tensors those files hold
        bit for bit are stored as references to them (``state_file.store_once``).
        """
        atomic_save(self.saved_state(extra, companions), path)

    def saved_state(self, extra: Optional[Mapping[str, Any]] = None,
                    companions: Optional[Mapping[str, Mapping[str, np.ndarray]]] = None) -> Dict[str, Any]:
        """The dict ``save`` writes: ``state_dict()`` plus ``extra``, companion tensors as references."""
        state = self.state_dict()
        if extra:
            state.update(extra)
        return store_once(state, companions) if companions else state

    def load(self, path: str) -> Dict[str, Any]:
        """Read a ``.pdema`` file into this engine; returns the whole file's dict (for ``extra`` entries).

        Nothing is changed when the file is unreadable or does not match the model.
        """
        state = read_state(path)
        self.set_state_dict(state, source=path)
        return state

    def export(self, path: str, model: paddle.nn.Layer, shadow=0) -> None:
        """Write the EMA weights as a plain ``.pdparams`` (``layer.set_state_dict(paddle.load(path))``)."""
        atomic_save(self.ema_state_dict(model, shadow), path)


def _numpy_dtype(tensor: paddle.Tensor):
    if tensor.dtype == paddle.bfloat16:
        return np.float32  # numpy has no bfloat16; set_state_dict casts on load
    return {paddle.float16: np.float16, paddle.float32: np.float32, paddle.float64: np.float64}.get(
        tensor.dtype, tensor.numpy().dtype)


_DTYPE_NAMES = {paddle.float16: "float16", paddle.bfloat16: "bfloat16"}


def _copy_into(target: paddle.Tensor, value) -> None:
    """In-place copy into ``target`` (same allocation, same ``stop_gradient``), casting and moving as needed."""
    if isinstance(value, np.ndarray):
        value = paddle.to_tensor(value)
    if value.dtype != target.dtype:
        value = cast_rounded(value, _DTYPE_NAMES.get(target.dtype, target.dtype))
    value = move_to(value, target.place)
    paddle.assign(value.reshape(target.shape), output=target)


def _short(items: List[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")

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

What plugs in beside the average is a feature (``core.features``), registered from above the engine, built from the
config and called at named points: Switch EMA (``core.switch_ema``), post-hoc profiles and their snapshots
(``posthoc.tracking``), BatchNorm statistics recomputed for the EMA weights (``core.bn_recompute``).
``ema.features[name]`` holds the ones in use.

``apply_to(model)`` swaps the averaged values into the model (raw values kept aside), ``restore(model)``
puts the raw values back bit for bit; ``with ema.swapped(model):`` does both. ``save``/``load`` write and
read a ``.pdema`` file atomically; ``export`` writes the averaged weights as a plain ``.pdparams``.

Create it after the model is on its device and wrapped for AMP, before or after ``paddle.DataParallel``
(it unwraps ``_layers``); pass the optimizer under AMP O2 so that fp32 master weights are averaged.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

import numpy as np

from ema_callback.config.schema import EMAConfig
from ema_callback.core.device_counters import DeviceCounters, EngineCounter
from ema_callback.core.engine_state import fingerprint_of, load_state, state_of
from ema_callback.core.features import Feature, builders
from ema_callback.core.horizon import BatchInfo, Candidate, candidates
from ema_callback.core.model_tensors import ModelTensors
from ema_callback.core.rank_sync import average_buffers
from ema_callback.core.schedules import decay_at
from ema_callback.core.selection import FOLLOW, Entry, classify, unwrap
from ema_callback.core.storage import ShadowStore, choose_backend, make_store
from ema_callback.errors import EMAError, EMAFileError, short_list
from ema_callback.files.checkpoint_io import atomic_save
from ema_callback.files.state_file import read_state, store_once
from ema_callback.paddle_compat import numpy_dtype, paddle

logger = logging.getLogger("ema_callback")


class ExponentialMovingAverage:
    """Exponential moving average of a model's weights (see the module docstring for the formula).

    Args:
        model: the layer to average (``paddle.DataParallel`` is unwrapped).
        config: an ``EMAConfig``; keyword arguments (``decay=0.999``, ...) override its fields.
        optimizer: under AMP O2, the optimizer whose ``_master_weights`` hold the fp32 copies.
        backend: the store that runs the update: ``auto`` (fastest for the case), ``numpy`` (host, float32),
            ``paddle`` (flat device tensor; forced here to run the device path on a CPU) or ``reference``
            (the textbook loop, for tests). ``update_path`` is its former name, still read with a deprecation line
            (both given: an error).
    """

    num_updates = EngineCounter("updates")  # EMA updates applied
    num_skipped = EngineCounter("skipped")  # updates skipped for NaN/Inf weights (or a GradScaler-skipped step)
    decay_products = EngineCounter("products")  # prod(d_i) of each shadow, for bias correction
    last_decays = EngineCounter("lasts")  # the decay of each shadow's last update (None before the first)

    def __init__(self, model: paddle.nn.Layer, config: Optional[EMAConfig] = None,
                 optimizer: Optional[paddle.optimizer.Optimizer] = None, backend: Optional[str] = None,
                 update_path: Optional[str] = None, batch: Optional[BatchInfo] = None,
                 **overrides: Any):
        if not paddle.in_dynamic_mode():
            raise RuntimeError("ExponentialMovingAverage needs dynamic-graph mode; call paddle.disable_static() "
                               "(a static-graph program can use paddle.static.ExponentialMovingAverage)")
        config = config or EMAConfig()
        self.config = config.replace(**overrides) if overrides else config
        self.optimizer = optimizer
        self.backend = choose_backend(backend, update_path, "ExponentialMovingAverage")
        self.batch = batch  # the measured global batch (needed by decay_batch_size and half-lives)
        self.candidates: List[Candidate] = candidates(self.config, batch)
        self.decays = [c.decay for c in self.candidates]  # target decay per optimizer step, one per shadow
        self.num_candidates = len(self.decays)  # the EMAs; the features' shadows (post-hoc profiles) follow them
        self.model = unwrap(model)
        built = [build(self.config, batch, self.model) for build in builders()]
        self.features: Dict[str, Feature] = {f.name: f for f in built if f is not None}
        self.labels = [c.label for c in self.candidates] + [label for f in self.features.values() for label in f.labels]
        self.entries: List[Entry] = classify(model, self.config.include, self.config.exclude, self.config.buffers)
        self.tensors = ModelTensors(self.entries, optimizer, to_host=self.config.device == "cpu")
        self._averaged = self.tensors.averaged
        self.num_steps = 0  # optimizer steps seen by step()
        self._num_updates, self._num_skipped = 0, 0  # the host path's counters (see the EngineCounter attributes)
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
        self.store.pausable = frozenset(
            self.labels.index(label) for f in self.features.values() if getattr(f, "every", 1) > 1
            for label in f.labels)
        self.deferred = bool(getattr(self.store, "deferred", False))  # the device path: no host read in step()
        self._device = DeviceCounters(self.store.flat.place, self.decays, len(self.labels) - self.num_candidates,
                                      self._feature_decays_on_device) if self.deferred else None
        self.tensors.deferred = self.deferred
        with paddle.no_grad():
            self.store.copy_(self.tensors.sources())
            self.tensors.snapshot_copies()

    # ------------------------------------------------------------------ update
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

    @property
    def averaged_entries(self) -> List[Entry]:
        """The averaged tensors, in the store's order (name, tensor, role)."""
        return list(self._averaged)

    def decays_for_next_update(self) -> List[float]:
        """``decay_at(t) ** update_every`` of each shadow for the next update (t = ``num_updates * update_every``)."""
        c = self.config
        t = self.num_updates * c.update_every
        ema = [decay_at(t, c.effective_schedule, target, c.tau, c.inv_gamma, c.power, c.min_decay) ** c.update_every
               for target in self.decays]
        return ema + [d for f in self.features.values() for d in f.decays(self.num_updates)]

    def _feature_decays_on_device(self, updates):
        """The features' shadows' decays for the next update as one device tensor (None without such shadows)."""
        parts = [d for d in (f.device_decays(updates) for f in self.features.values()) if d is not None]
        return paddle.concat(parts) if parts else None

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
                if self.store.copy_(self.tensors.sources()):
                    self.tensors.snapshot_copies()
                else:
                    self._note_nonfinite()
                return False
            if not self.will_update_at(self.num_steps):
                return False
            ds = self.decays_for_next_update()
            reset = self.config.effective_bias_correction and self.num_updates == 0
            weights = 1.0 - ds[0] if len(ds) == 1 else [1.0 - d for d in ds]
            if not self.store.lerp_(self.tensors.sources(), weights, reset=reset):
                self._note_nonfinite()
                return False
            self.tensors.snapshot_copies()
            self._sync_buffers()
        self._num_updates += 1
        self._decay_products = [p * d for p, d in zip(self._decay_products, ds)]
        self._last_decays = list(ds)
        self._after_update()
        return True

    def _after_update(self) -> None:
        """Each feature's periodic work (counted on the host: the device path decides with no host read)."""
        for feature in self.features.values():
            feature.after_update(self)

    def take_weights(self, values: Mapping[str, np.ndarray]) -> None:
        """The model's weights (and AMP O2 fp32 master weights) take ``values`` in place (Switch EMA)."""
        if self._backup is not None:
            raise RuntimeError("EMA weights are applied; call restore(model) first")
        with paddle.no_grad():
            self.tensors.take(values)

    def _step_on_device(self, found_inf) -> None:
        """``step`` on the device path: the same rules, every decision a device op, no host synchronisation.

        ``num_steps`` counts calls (a GradScaler-skipped call included: its update is skipped on the device), the
        schedule counts real updates on the device (``DeviceCounters``)."""
        self.num_steps += 1
        with paddle.no_grad():
            if self.num_steps <= self.config.start_step:
                ok = self.store.copy_(self.tensors.sources(), skip=found_inf)
                self._device.record(ok)
                self.tensors.snapshot_copies(ok)
                return None
            if not self.will_update_at(self.num_steps):
                return None
            d = self._device.decay(self.config)
            reset = self._device.first_update() if self.config.effective_bias_correction else False
            ok = self.store.lerp_(self.tensors.sources(), 1.0 - d, reset=reset, skip=found_inf)
            self._device.record(ok, d)
            self.tensors.snapshot_copies(ok)
            self._sync_buffers()
        self._after_update()
        return None

    def _sync_buffers(self) -> None:
        """The buffer part of every shadow (BatchNorm statistics) averaged over data-parallel ranks (``rank_sync``)."""
        t = self.tensors
        average_buffers(self.store, t.buffer_indices, t.copies, [e.name for e in t.copied if e.is_buffer],
                        self.deferred)

    update = step

    def reset(self) -> None:
        """Start over from the current weights: shadow = w, counters at 0 (ppdet's ``cycle_epoch``)."""
        with paddle.no_grad():
            self.store.copy_(self.tensors.sources())
            self.tensors.snapshot_copies()
        self.num_steps = self.num_updates = 0
        self.decay_products = [1.0] * self.num_shadows
        self.last_decays = [None] * self.num_shadows

    def load_average(self, values: Mapping[str, np.ndarray], num_steps: int) -> None:
        """Take ``values`` (an already bias-corrected average, e.g. another EMA's weights) as the shadow."""
        missing = [e.name for e in self._averaged if e.name not in values]
        if missing:
            raise EMAFileError(f"EMA weights: missing {short_list(missing)}")
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
        out.update(self.tensors.copies_numpy())
        return out

    def ema_state_dict(self, model: paddle.nn.Layer, shadow=0) -> Dict[str, np.ndarray]:
        """A complete ``state_dict`` of ``model`` with EMA values (``follow`` tensors as they are live)."""
        averaged = self.averaged_numpy(shadow)
        by_id = {id(e.tensor): e.name for e in self.entries}
        out = {}
        for name, tensor in unwrap(model).state_dict().items():
            key = by_id.get(id(tensor), name)
            value = averaged.get(key)
            out[name] = (value.astype(numpy_dtype(tensor)) if value is not None else tensor.numpy())
        return out

    def fingerprint(self) -> str:
        """sha1 of the shadows and copied tensors (equal on every rank of a data-parallel run)."""
        return fingerprint_of(self)

    def close(self) -> None:
        """Training has ended: every feature undoes what it installed on the model (``Feature.close``: the BatchNorm
        recorder's hook). The shadows, counters and ``apply_to``/``save`` stay usable (with ``recompute_bn``, on the
        last batches training recorded)."""
        for feature in self.features.values():
            feature.close()

    def reopen(self) -> None:
        """Training starts again on this engine (``Model.fit`` called again): the features install themselves
        again."""
        for feature in self.features.values():
            feature.reopen()

    def summary(self) -> str:
        return (f"optimizer step {self.num_steps}, {self.num_updates} updates, {self.num_skipped} skipped for "
                f"NaN/Inf, shadow sha1 {self.fingerprint()[:16]} (rank {paddle.distributed.get_rank()})")

    def _check_model(self, model: Optional[paddle.nn.Layer]) -> None:
        """``model`` (optional everywhere) must be the layer this EMA averages (``DataParallel`` unwrapped)."""
        if model is not None and unwrap(model) is not self.model:
            raise EMAError(f"{type(model).__name__}: not the model this EMA was built for "
                           f"({type(self.model).__name__}); build an ExponentialMovingAverage for it")

    def drift(self, model: Optional[paddle.nn.Layer] = None, shadow=0) -> float:
        """Relative drift ``||ema - w|| / ||w||`` over the averaged tensors (NaN if either is not finite)."""
        self._check_model(model)
        return self.drift_from(self.averaged_numpy(shadow))

    def drift_from(self, averaged: Mapping[str, np.ndarray]) -> float:
        """``||averaged - w|| / ||w||`` over the averaged tensors (a host read of the weights)."""
        return self.tensors.drift_from(averaged)

    # ------------------------------------------------------------------ swapping
    @property
    def applied(self) -> bool:
        return self._backup is not None

    @property
    def applied_label(self) -> Optional[str]:
        """The label of the shadow whose values are in the model (None when the raw weights are)."""
        return self._applied_label if self._backup is not None else None

    def apply_to(self, model: Optional[paddle.nn.Layer] = None, shadow=0) -> None:
        """Put EMA values (of ``shadow``, an index or label) into the model's tensors in place (``model_tensors``);
        the raw values are kept for ``restore``; then each feature's ``after_apply`` (BatchNorm recomputation)."""
        self._check_can_apply(model)
        j = self.shadow_index(shadow)
        self._apply(self.labels[j], lambda: self.tensors.write_averaged(self.store, j, self._correction(j)))

    def apply_values(self, model: Optional[paddle.nn.Layer], values: Mapping[str, np.ndarray], label: str) -> None:
        """Put ``values`` (EMA weights from elsewhere, by state-dict name: a post-hoc reconstruction) into the model
        as ``apply_to`` puts a shadow: the raw values kept for ``restore``, ``applied_label`` is ``label``, each
        feature's ``after_apply`` runs."""
        self._check_can_apply(model)
        self._apply(label, lambda: self.tensors.write_values(values))

    def _check_can_apply(self, model: Optional[paddle.nn.Layer]) -> None:
        self._check_model(model)
        if self._backup is not None:
            raise RuntimeError("EMA weights are already applied; call restore(model) first")

    def _apply(self, label: str, write: Callable[[], None]) -> None:
        """Back up what ``restore`` puts back (the averaged and copied tensors, and what features name, e.g.
        BatchNorm statistics), ``write`` the EMA values in, then each feature's ``after_apply``."""
        extra = set().union(*(f.backup_ids() for f in self.features.values()))
        with paddle.no_grad():
            backup = self.tensors.backup(e for e in self.entries if e.role != FOLLOW or id(e.tensor) in extra)
            write()
        self._backup, self._applied_label = backup, label
        for feature in self.features.values():
            feature.after_apply(self, label)
        if extra:
            self.tensors.clear_views()

    def restore(self, model: Optional[paddle.nn.Layer] = None) -> None:
        """Put the raw values back, bit for bit."""
        self._check_model(model)
        if self._backup is None:
            raise RuntimeError("restore() without apply_to(); the model already holds its raw weights")
        with paddle.no_grad():
            self.tensors.restore(self._backup)
        self._backup = None

    def backup_numpy(self) -> Dict[str, np.ndarray]:
        """The raw values kept aside while EMA weights are applied (empty when not applied)."""
        return self.tensors.backup_numpy(self._backup or {})

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
        """Everything needed to continue exactly (``engine_state.state_of``: counters, config, the raw shadows)."""
        return state_of(self)

    def set_state_dict(self, state: Mapping[str, Any], source: str = "state dict") -> None:
        """Load a ``state_dict()``; on a mismatch with the model one line says what, and nothing changes."""
        load_state(self, state, source)

    def save(self, path: str, extra: Optional[Mapping[str, Any]] = None,
             companions: Optional[Mapping[str, Mapping[str, np.ndarray]]] = None) -> None:
        """Write ``saved_state(extra, companions)`` to ``path`` atomically."""
        atomic_save(self.saved_state(extra, companions), path)

    def saved_state(self, extra: Optional[Mapping[str, Any]] = None,
                    companions: Optional[Mapping[str, Mapping[str, np.ndarray]]] = None,
                    files: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
        """``state_dict()`` plus ``extra`` (e.g. raw weights), signed; tensors that ``companions`` (suffix -> arrays,
        e.g. ``{".pdparams": what the suite saved}``) hold bit for bit become references, and ``files`` (suffix ->
        path of a ``.pdopt``/``.states`` of the same set) are fingerprinted (``state_file.store_once``)."""
        state = self.state_dict()
        if extra:
            state.update(extra)
        return store_once(state, companions or {}, files)

    def load(self, path: str) -> Dict[str, Any]:
        """Read a ``.pdema`` into this engine: the file is verified and checked whole, against the model too (its
        raw weights included), before anything changes; returns the file's dict (for ``extra`` entries)."""
        state = read_state(path)
        self.set_state_dict(state, source=path)
        return state

    def export(self, path: str, model: paddle.nn.Layer, shadow=0) -> None:
        """Write the EMA weights as a plain ``.pdparams`` (``layer.set_state_dict(paddle.load(path))``)."""
        atomic_save(self.ema_state_dict(model, shadow), path)

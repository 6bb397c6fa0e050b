"""The device path's update counters: 0-d device tensors, updated by device ops, read on the host only when asked.

The decay schedule needs the number of *real* updates so far (an update skipped for NaN/Inf, or a step the AMP
GradScaler skipped, is not one), and that decision is taken on the device (``PaddleStore.lerp_`` returns a
device bool). Reading it back every step would stall the device queue, so the count stays on the device and the
schedule is evaluated there (``schedules.decay_tensor``, the same formulas as ``decay_at`` in float64): exact,
with no host read. The engine reads the counters (``.item()``) only when it logs, evaluates, saves or is asked.
"""
from __future__ import annotations

import logging
from typing import Callable, List, Optional, Sequence

from ema_callback.config.schema import EMAConfig
from ema_callback.core.schedules import decay_tensor
from ema_callback.paddle_compat import move_to, paddle

logger = logging.getLogger("ema_callback")


class DeviceCounters:
    """``updates``, ``skipped``, and per shadow ``products`` (prod of the decays, for bias correction) and ``lasts``
    (the last decay) on ``place``; ``decays`` are the EMAs' target decays; ``extra`` more shadows (the engine
    features', e.g. post-hoc profiles) get their decays from ``extra_decays(updates)`` (a float64 device tensor of
    the update count -> a [extra] device tensor)."""

    def __init__(self, place, decays: Sequence[float] = (0.9999,), extra: int = 0,
                 extra_decays: Optional[Callable] = None):
        count = len(decays) + extra
        with paddle.no_grad():
            self._updates = move_to(paddle.zeros([], dtype="int64"), place)
            self._skipped = move_to(paddle.zeros([], dtype="int64"), place)
            self._product = move_to(paddle.ones([count], dtype="float64"), place)
            self._last = move_to(paddle.zeros([count], dtype="float64"), place)
            self._has_last = move_to(paddle.zeros([], dtype="bool"), place)
            self._targets = move_to(paddle.to_tensor(list(map(float, decays)), dtype="float64"), place)
        self._extra_decays = extra_decays if extra else None
        self._warned = False

    # ---------------------------------------------------------------- device side (no host read)
    def decay(self, config: EMAConfig) -> "paddle.Tensor":
        """``decay_at(updates * update_every) ** update_every`` per shadow, a [count] float64 device tensor."""
        t = self._updates.astype("float64") * float(config.update_every)
        d = decay_tensor(t, config.effective_schedule, self._targets, config.tau, config.inv_gamma, config.power,
                         config.min_decay)
        d = d if config.update_every == 1 else paddle.pow(d, float(config.update_every))
        if self._extra_decays is None:
            return d
        return paddle.concat([d, self._extra_decays(self._updates.astype("float64"))])

    def first_update(self) -> "paddle.Tensor":
        return self._updates == 0

    def record(self, ok: Optional["paddle.Tensor"], decay: Optional["paddle.Tensor"] = None) -> None:
        """One attempted update: done where ``ok`` (None: always), skipped elsewhere (``decay`` None: a copy)."""
        with paddle.no_grad():
            if ok is None:  # nothing could skip it (no NaN/Inf guard, no GradScaler flag): done
                ok = paddle.full_like(self._has_last, True)
            done = ok.astype("int64")
            if decay is not None:
                self._updates.add_(done)
                self._product = paddle.where(ok, self._product * decay, self._product)
                self._last = paddle.where(ok, decay, self._last)
                self._has_last = paddle.logical_or(self._has_last, ok)
            self._skipped.add_(1 - done)

    # ---------------------------------------------------------------- host side (reads: log, evaluate, save)
    updates = property(lambda self: int(self._updates.item()), lambda self, value: self._updates.fill_(int(value)),
                       doc="real updates so far (a host read)")

    @property
    def products(self) -> List[float]:
        """prod of the decays of each shadow (a host read)."""
        return [float(v) for v in self._product.numpy().reshape(-1)]

    @products.setter
    def products(self, values: Sequence[float]) -> None:
        with paddle.no_grad():
            paddle.assign(move_to(paddle.to_tensor([float(v) for v in values], dtype="float64"), self._product.place),
                          output=self._product)

    @property
    def skipped(self) -> int:
        value = int(self._skipped.item())
        if value and not self._warned:
            logger.warning("EMA: %d update(s) skipped so far because the weights held NaN/Inf (or the AMP GradScaler "
                           "skipped the step); the shadow kept its last finite value", value)
            self._warned = True
        return value

    @skipped.setter
    def skipped(self, value: int) -> None:
        self._skipped.fill_(int(value))

    @property
    def lasts(self) -> List[Optional[float]]:
        if not bool(self._has_last.item()):
            return [None] * int(self._last.shape[0])
        return [float(v) for v in self._last.numpy().reshape(-1)]

    @lasts.setter
    def lasts(self, values: Sequence[Optional[float]]) -> None:
        known = [v for v in values if v is not None]
        self._has_last.fill_(bool(known))
        with paddle.no_grad():
            paddle.assign(move_to(paddle.to_tensor([float(v) if v is not None else 0.0 for v in values],
                                                   dtype="float64"), self._last.place), output=self._last)


class EngineCounter:
    """An update counter: a Python value on the host path, read from ``DeviceCounters`` on the device path
    (``engine._device``) (a host synchronisation, so only when the run logs, evaluates, saves or a caller asks)."""

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

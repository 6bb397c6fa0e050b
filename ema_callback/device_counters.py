"""The device path's update counters: 0-d device tensors, updated by device ops, read on the host only when asked.

The decay schedule needs the number of *real* updates so far (an update skipped for NaN/Inf, or a step the AMP
GradScaler skipped, is not one), and that decision is taken on the device (``PaddleStore.lerp_`` returns a
device bool). Reading it back every step would stall the device queue, so the count stays on the device and the
schedule is evaluated there (``schedules.decay_tensor``, the same formulas as ``decay_at`` in float64): exact,
with no host read. The engine reads the counters (``.item()``) only when it logs, evaluates, saves or is asked.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence

from .config import EMAConfig
from .paddle_compat import move_to, paddle
from .schedules import decay_tensor

logger = logging.getLogger("ema_callback")


class DeviceCounters:
    """``updates``, ``skipped``, and per shadow ``products`` (prod of the decays, for bias correction) and ``lasts``
    (the last decay) on ``place``; ``decays`` are the shadows' target decays (one per EMA)."""

    def __init__(self, place, decays: Sequence[float] = (0.9999,), gammas: Sequence[float] = ()):
        count = len(decays) + len(gammas)
        with paddle.no_grad():
            self._updates = move_to(paddle.zeros([], dtype="int64"), place)
            self._skipped = move_to(paddle.zeros([], dtype="int64"), place)
            self._product = move_to(paddle.ones([count], dtype="float64"), place)
            self._last = move_to(paddle.zeros([count], dtype="float64"), place)
            self._has_last = move_to(paddle.zeros([], dtype="bool"), place)
            self._targets = move_to(paddle.to_tensor(list(map(float, decays)), dtype="float64"), place)
            self._gammas = move_to(paddle.to_tensor([float(g) for g in gammas], dtype="float64"), place) \
                if gammas else None
        self._warned = False

    # ---------------------------------------------------------------- device side (no host read)
    def decay(self, config: EMAConfig) -> "paddle.Tensor":
        """``decay_at(updates * update_every) ** update_every`` per shadow, a [count] float64 device tensor."""
        t = self._updates.astype("float64") * float(config.update_every)
        d = decay_tensor(t, config.effective_schedule, self._targets, config.tau, config.inv_gamma, config.power,
                         config.min_decay)
        d = d if config.update_every == 1 else paddle.pow(d, float(config.update_every))
        if self._gammas is None:
            return d
        u = self._updates.astype("float64")  # power-function profiles: beta = (u / (u + 1))^(gamma + 1)
        return paddle.concat([d, paddle.pow(u / (u + 1.0), self._gammas + 1.0)])

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

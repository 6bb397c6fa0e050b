"""Decay schedules: pure functions of the update count.

Every schedule answers one question, ``decay_at(t)``: the decay ``d_t`` used by the
update ``ema = d_t * ema + (1 - d_t) * w``, where ``t`` is the number of optimizer steps
covered by the updates done before this one (``update_index * update_every``; with
``update_every == 1`` simply the number of earlier updates, TensorFlow's ``num_updates``).

The conventions and their sources:

* ``constant``:    ``d``
* ``threshold``:   ``min(d, (1 + t) / (10 + t))``                (TF ``num_updates``, PaddleDetection)
* ``exponential``: ``d * (1 - exp(-(t + 1) / tau))``, tau=2000  (YOLOv5, PaddleDetection: the count is 1-based)
* ``power``:       ``clamp(1 - (1 + t / inv_gamma) ** -power, min_decay, d)``  (timm, diffusers)
"""
from __future__ import annotations

import math

from ema_callback.config.schema import SCHEDULES  # the names an EMA: block takes; each is implemented here


def constant_decay(t: int, decay: float) -> float:
    """``d``, whatever the step."""
    return float(decay)


def threshold_decay(t: int, decay: float) -> float:
    """``min(d, (1 + t) / (10 + t))``: 0.1 at t=0, reaches ``d`` after ~``9 d / (1 - d)`` steps."""
    return min(float(decay), (1.0 + t) / (10.0 + t))


def exponential_decay(t: int, decay: float, tau: float = 2000.0) -> float:
    """``d * (1 - exp(-(t + 1) / tau))``: reaches 63% of ``d`` after ``tau`` steps."""
    return float(decay) * (1.0 - math.exp(-(t + 1.0) / float(tau)))


def power_decay(t: int, decay: float, inv_gamma: float = 1.0, power: float = 2.0 / 3.0,
                min_decay: float = 0.0) -> float:
    """``1 - (1 + t / inv_gamma) ** -power`` clamped to ``[min_decay, d]``.

    timm/diffusers advice: ``power=2/3`` for runs of ~100k steps, ``3/4`` for ~1M steps.
    """
    value = 1.0 - (1.0 + t / float(inv_gamma)) ** (-float(power))
    return max(float(min_decay), min(float(decay), value))


def decay_at(t: int, schedule: str = "constant", decay: float = 0.9999, tau: float = 2000.0,
             inv_gamma: float = 1.0, power: float = 2.0 / 3.0, min_decay: float = 0.0) -> float:
    """Decay of the named ``schedule`` after ``t`` steps (see the module docstring)."""
    if t < 0:
        raise ValueError(f"decay_at: t must be >= 0, got {t}")
    if schedule == "constant":
        return constant_decay(t, decay)
    if schedule == "threshold":
        return threshold_decay(t, decay)
    if schedule == "exponential":
        return exponential_decay(t, decay, tau)
    if schedule == "power":
        return power_decay(t, decay, inv_gamma, power, min_decay)
    raise ValueError(f"schedule: unknown schedule {schedule!r}, expected one of {', '.join(SCHEDULES)}")


def decay_array(t, schedule: str = "constant", decay: float = 0.9999, tau: float = 2000.0, inv_gamma: float = 1.0,
                power: float = 2.0 / 3.0, min_decay: float = 0.0):
    """``decay_at`` for a numpy array of ``t`` (float64): the same formulas, vectorised (for the start line's and
    the end report's horizon arithmetic over a whole run)."""
    import numpy as np

    t = np.asarray(t, dtype=np.float64)
    d = float(decay)
    if schedule == "constant":
        return np.full_like(t, d)
    if schedule == "threshold":
        return np.minimum(d, (1.0 + t) / (10.0 + t))
    if schedule == "exponential":
        return d * (1.0 - np.exp(-(t + 1.0) / float(tau)))
    if schedule == "power":
        return np.clip(1.0 - (1.0 + t / float(inv_gamma)) ** (-float(power)), float(min_decay), d)
    raise ValueError(f"schedule: unknown schedule {schedule!r}, expected one of {', '.join(SCHEDULES)}")


def decay_tensor(t, schedule: str = "constant", decay: float = 0.9999, tau: float = 2000.0, inv_gamma: float = 1.0,
                 power: float = 2.0 / 3.0, min_decay: float = 0.0):
    """``decay_at`` for a 0-d float64 Paddle tensor ``t``: the same formulas as device ops, for the device path,
    whose update count lives on the device (reading it would stall the device queue every step). ``decay`` is a
    number or a float64 tensor of target decays (one per shadow: the result has its shape)."""
    import paddle

    target = decay if isinstance(decay, paddle.Tensor) else paddle.full_like(t, float(decay))
    if schedule == "constant":
        return target * 1.0
    if schedule == "threshold":
        return paddle.minimum(target, (1.0 + t) / (10.0 + t))
    if schedule == "exponential":
        return target * (1.0 - paddle.exp(-(t + 1.0) / float(tau)))
    if schedule == "power":
        value = 1.0 - paddle.pow(1.0 + t / float(inv_gamma), -float(power))
        return paddle.maximum(paddle.full_like(target, float(min_decay)), paddle.minimum(target, value))
    raise ValueError(f"schedule: unknown schedule {schedule!r}, expected one of {', '.join(SCHEDULES)}")

"""Counting real optimizer updates, whatever loop drives the optimizer.

Training loops step an optimizer in different ways: ``optimizer.step()`` (PaddleOCR without AMP),
``optimizer.minimize(loss)`` (``paddle.Model.fit``), ``scaler.minimize(optimizer, loss)`` and
``scaler.step(optimizer)`` (AMP; both end in the optimizer's ``minimize``/``step``). Under AMP the
GradScaler passes ``found_inf`` to the optimizer, whose kernels then skip the update: that call is
not an update. ``OptimizerStepCounter`` wraps the optimizer *instance's* ``step`` and ``minimize``
(nested calls count once) and counts the calls that really updated the weights.

Reading ``found_inf`` is a host synchronisation. With ``read_found_inf=False`` (the engine's device path) the
counter never reads it: every call is counted and its flag is handed on (``on_update(flag)``, ``pop_flags()``),
so the EMA skips that update on the device.
"""
from __future__ import annotations

from typing import Callable, Optional

from ema_callback.paddle_compat import paddle


def _found_inf_flag(optimizer):
    """The GradScaler's ``found_inf`` for the last call (a tensor, a bool, or None without AMP)."""
    getter = getattr(optimizer, "_get_auxiliary_var", None)
    return getter("found_inf") if getter else None


def _found_inf(optimizer) -> bool:
    flag = _found_inf_flag(optimizer)
    if flag is None:
        return False
    return bool(flag.item() if isinstance(flag, paddle.Tensor) else flag)


class OptimizerStepCounter:
    """Wraps ``optimizer.step`` / ``optimizer.minimize`` on the instance until ``close()``.

    ``on_update`` (optional) is called after each real update (with the call's ``found_inf`` flag when
    ``read_found_inf`` is False); ``pop()`` returns the number of updates since the previous ``pop()`` and
    ``pop_flags()`` their flags (None where read on the host); ``skipped`` counts calls the GradScaler skipped
    for inf/nan (host reading only).
    """

    def __init__(self, optimizer, on_update: Optional[Callable[..., None]] = None, read_found_inf: bool = True):
        self.optimizer = optimizer
        self.on_update = on_update
        self.read_found_inf = read_found_inf
        self._flags: list = []
        self.pending = 0
        self.total = 0
        self.skipped = 0
        self._depth = 0
        self._originals = {}
        for name in ("step", "minimize"):
            original = getattr(optimizer, name)
            self._originals[name] = (name in vars(optimizer), original)
            setattr(optimizer, name, self._wrap(original))

    def _wrap(self, original):
        def wrapped(*args, **kwargs):
            self._depth += 1
            try:
                result = original(*args, **kwargs)
            finally:
                self._depth -= 1
            if self._depth == 0:
                flag = _found_inf_flag(self.optimizer)
                if not self.read_found_inf and isinstance(flag, paddle.Tensor):
                    self._count(flag)  # decided on the device by the EMA, never read here
                elif _found_inf(self.optimizer):
                    self.skipped += 1
                else:
                    self._count(None)
            return result

        wrapped.__wrapped__ = original
        return wrapped

    def _count(self, flag) -> None:
        flag = flag if isinstance(flag, paddle.Tensor) else None
        self.pending += 1
        self.total += 1
        self._flags.append(flag)
        if self.on_update is not None:
            self.on_update() if self.read_found_inf else self.on_update(flag)

    def pop(self) -> int:
        count, self.pending, self._flags = self.pending, 0, []
        return count

    def pop_flags(self) -> list:
        """The ``found_inf`` flags (device tensors, or None) of the updates since the last ``pop``/``pop_flags``."""
        flags, self._flags = self._flags, []
        self.pending = 0
        return flags

    def close(self) -> None:
        """Put the optimizer's own methods back."""
        for name, (was_instance_attr, original) in self._originals.items():
            if was_instance_attr:
                setattr(self.optimizer, name, original)
            else:
                try:
                    delattr(self.optimizer, name)
                except AttributeError:
                    pass
        self._originals = {}

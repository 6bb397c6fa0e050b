"""Counting real optimizer updates, whatever loop drives the optimizer.

Training loops step an optimizer in different ways: ``optimizer.step()`` (PaddleOCR without AMP),
``optimizer.minimize(loss)`` (``paddle.Model.fit``), ``scaler.minimize(optimizer, loss)`` and
``scaler.step(optimizer)`` (AMP; both end in the optimizer's ``minimize``/``step``). Under AMP the
GradScaler passes ``found_inf`` to the optimizer, whose kernels then skip the update: that call is
not an update. ``OptimizerStepCounter`` wraps the optimizer *instance's* ``step`` and ``minimize``
(nested calls count once) and counts the calls that really updated the weights.
"""
from __future__ import annotations

from typing import Callable, Optional

from .paddle_compat import paddle


def _found_inf(optimizer) -> bool:
    getter = getattr(optimizer, "_get_auxiliary_var", None)
    flag = getter("found_inf") if getter else None
    if flag is None:
        return False
    return bool(flag.item() if isinstance(flag, paddle.Tensor) else flag)


class OptimizerStepCounter:
    """Wraps ``optimizer.step`` / ``optimizer.minimize`` on the instance until ``close()``.

    ``on_update`` (optional) is called after each real update; ``pop()`` returns the number of real
    updates since the previous ``pop()``; ``skipped`` counts calls the GradScaler skipped for inf/nan.
    """

    def __init__(self, optimizer, on_update: Optional[Callable[[], None]] = None):
        self.optimizer = optimizer
        self.on_update = on_update
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
                if _found_inf(self.optimizer):
                    self.skipped += 1
                else:
                    self.pending += 1
                    self.total += 1
                    if self.on_update is not None:
                        self.on_update()
            return result

        wrapped.__wrapped__ = original
        return wrapped

    def pop(self) -> int:
        count, self.pending = self.pending, 0
        return count

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

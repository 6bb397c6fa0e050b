"""The model's side of the EMA: which tensors are averaged, copied or left to follow the live weights
(``selection.classify``), the copied ones' values at the last update, and writing values into the model in place
(apply, restore, Switch EMA): same allocations, ``stop_gradient`` untouched, raw values back bit for bit.

CPU float32 tensors are written through cached host views (plain memory copies, the fast path of ``apply_to``);
others with ``paddle.assign`` (``paddle_compat.copy_into``: casting with rounding, e.g. float16 under AMP O2). Under
AMP O2 the averaged values come from the optimizer's fp32 master weights, and Switch EMA writes those too.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional

import numpy as np

from ema_callback.core.selection import AVERAGE, COPY, FOLLOW, Entry
from ema_callback.core.storage import NumpyStore
from ema_callback.paddle_compat import copy_into, data_pointer, host_view, paddle


class ModelTensors:
    """``entries`` of one model; ``deferred`` (set by the engine): the device path, where nothing is read back."""

    def __init__(self, entries: List[Entry], optimizer=None, to_host: bool = False):
        self.entries = entries
        self.averaged = [e for e in entries if e.role == AVERAGE]
        self.copied = [e for e in entries if e.role == COPY]
        self.buffer_indices = [i for i, e in enumerate(self.averaged) if e.is_buffer]
        self.optimizer = optimizer
        self.to_host = to_host  # EMA.device: cpu (back-ups in host memory too)
        self.deferred = False
        self.copies: Dict[str, Any] = {}  # numpy arrays (host path) or device tensors (device path)
        self._views: Dict[str, Any] = {}

    def _masters(self) -> Mapping[str, Any]:
        return getattr(self.optimizer, "_master_weights", None) or {}

    def sources(self) -> List[paddle.Tensor]:
        """The tensors averaged this step: fp32 master weights under AMP O2 where they exist."""
        masters = self._masters()
        return [masters.get(e.tensor.name, e.tensor) for e in self.averaged] if masters else \
            [e.tensor for e in self.averaged]

    def view(self, e: Entry) -> Optional[np.ndarray]:
        """Writable host view of a CPU float32 tensor, cached while its allocation stays the same."""
        ptr = data_pointer(e.tensor)
        cached = self._views.get(e.name)
        if cached is not None and cached[0] == ptr:
            return cached[1]
        view = host_view(e.tensor)
        self._views[e.name] = (ptr, view)
        return view

    def clear_views(self) -> None:
        self._views.clear()

    def snapshot_copies(self, ok=None) -> None:
        """Copied tensors take the live values (on the device path where ``ok``, with no host read)."""
        for e in self.copied:
            if not self.deferred:
                self.copies[e.name] = e.tensor.numpy().copy()
            elif ok is None or e.name not in self.copies:
                self.copies[e.name] = e.tensor.detach().clone()
            else:
                self.copies[e.name] = paddle.where(ok, e.tensor.detach(), self.copies[e.name])

    def copies_numpy(self) -> Dict[str, np.ndarray]:
        return {k: (v.numpy() if isinstance(v, paddle.Tensor) else v).copy() for k, v in self.copies.items()}

    def load_copies(self, values: Mapping[str, Any], place) -> None:
        from ema_callback.paddle_compat import move_to

        for name, value in values.items():
            if name in self.copies:
                self.copies[name] = move_to(paddle.to_tensor(np.asarray(value)), place) if self.deferred \
                    else np.asarray(value)

    # ---------------------------------------------------------------- writing into the model
    def backup(self, targets: Iterable[Entry]) -> Dict[str, Any]:
        """The current values of ``targets`` (host copies through views where possible)."""
        out = {}
        for e in targets:
            view = self.view(e)
            out[e.name] = view.copy() if view is not None else (e.tensor.cpu() if self.to_host else e.tensor.clone())
        return out

    def write_averaged(self, store, shadow: int, scale: float) -> None:
        """The averaged tensors take shadow ``shadow`` of ``store`` times ``scale`` (bias correction)."""
        fast = isinstance(store, NumpyStore)
        slow = []
        for index, e in enumerate(self.averaged):
            view = self.view(e) if fast else None
            if view is None:
                slow.append((index, e))
            elif scale != 1.0:
                np.multiply(store.view(index, shadow).reshape(view.shape), np.float32(scale), out=view)
            else:
                np.copyto(view, store.view(index, shadow).reshape(view.shape))
        if slow:
            values = store.tensor_values([index for index, _ in slow], shadow)
            for (_, e), value in zip(slow, values):
                copy_into(e.tensor, value * scale if scale != 1.0 else value)
        for e in self.copied:
            copy_into(e.tensor, self.copies[e.name])

    def write_values(self, values: Mapping[str, np.ndarray]) -> None:
        """The averaged and copied tensors take ``values`` (by state-dict name; others as they are): weights from
        elsewhere, such as a post-hoc reconstruction, put in for an evaluation."""
        for e in list(self.averaged) + list(self.copied):
            if e.name in values:
                copy_into(e.tensor, np.asarray(values[e.name]).reshape(e.tensor.shape))

    def restore(self, saved: Mapping[str, Any]) -> None:
        """Put ``backup``'s values back, bit for bit."""
        for e in self.entries:
            value = saved.get(e.name)
            if value is None:
                continue
            view = self.view(e) if isinstance(value, np.ndarray) else None
            if view is not None:
                np.copyto(view, value.reshape(view.shape))
            else:
                copy_into(e.tensor, value if not isinstance(value, np.ndarray) else value.reshape(e.tensor.shape))

    def backup_numpy(self, saved: Mapping[str, Any]) -> Dict[str, np.ndarray]:
        out = {}
        for e in self.entries:
            value = saved.get(e.name)
            if value is not None:
                out[e.name] = value.reshape(e.tensor.shape).copy() if isinstance(value, np.ndarray) else value.numpy()
        return out

    def take(self, values: Mapping[str, np.ndarray]) -> None:
        """The averaged and copied tensors (and AMP O2 fp32 master weights) take ``values`` (Switch EMA)."""
        masters = self._masters()
        for e in self.entries:
            if e.role == FOLLOW or e.name not in values:
                continue
            master = masters.get(e.tensor.name)
            if master is not None:  # the fp32 copy the next step starts from (else it overwrites this)
                copy_into(master, values[e.name].astype(np.float32))
            copy_into(e.tensor, values[e.name])
        self.clear_views()

    def drift_from(self, averaged: Mapping[str, np.ndarray]) -> float:
        """``||averaged - w|| / ||w||`` over the averaged tensors (NaN if either is not finite; a host read)."""
        num = den = 0.0
        for e in self.averaged:
            w = e.tensor.astype("float32").numpy().astype(np.float64)
            num += float(np.sum((averaged[e.name].astype(np.float64) - w) ** 2))
            den += float(np.sum(w ** 2))
        return float(np.sqrt(num) / np.sqrt(den)) if den > 0 else float("nan") if num != num else 0.0

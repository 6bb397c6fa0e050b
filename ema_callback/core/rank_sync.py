"""The buffer part of every shadow (BatchNorm statistics) averaged over data-parallel ranks after each update.

Paddle's DataParallel all-reduces gradients, so parameters agree on every rank, but each rank keeps its own running
statistics. The EMA is linear, so the mean of the per-rank EMAs equals the EMA of the per-rank mean (timm's
``distribute_bn``); doing it after each update keeps every rank's shadow identical. One all-reduce of the small
buffer part per update; on the device path with device ops only (no host read).
"""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from ema_callback.paddle_compat import paddle


def average_buffers(store, buffer_indices: List[int], copies: Dict[str, Any], copied: List[str],
                    deferred: bool) -> None:
    """Average the shadows' segments ``buffer_indices`` and the copied buffers ``copies[copied]`` over the ranks,
    in place (``copies`` gets the averaged arrays/tensors). Nothing to do on one rank."""
    world = paddle.distributed.get_world_size()
    if world <= 1 or not (buffer_indices or copied):
        return
    if deferred:
        _on_device(store, buffer_indices, copies, copied, world)
        return
    shadows = [store.read_segments(buffer_indices, j) for j in range(store.count)]
    pieces = shadows + [copies[name].astype(np.float32).reshape(-1) for name in copied]
    flat = paddle.to_tensor(np.concatenate(pieces))
    paddle.distributed.all_reduce(flat)
    mean = (flat.numpy() / world).astype(np.float32)
    start = 0
    for j, shadow in enumerate(shadows):
        store.write_segments(buffer_indices, mean[start:start + shadow.size], j)
        start += shadow.size
    for name in copied:
        size = copies[name].size
        copies[name] = mean[start:start + size].reshape(copies[name].shape).astype(copies[name].dtype)
        start += size


def _on_device(store, buffer_indices: List[int], copies: Dict[str, Any], copied: List[str], world: int) -> None:
    offsets = store.offsets
    spans = [(int(offsets[i]), int(offsets[i + 1])) for i in buffer_indices]
    pieces = [flat[a:b].astype("float32") for flat in store.flats for a, b in spans]
    pieces += [copies[name].astype("float32").reshape([-1]) for name in copied]
    joined = paddle.concat(pieces)
    paddle.distributed.all_reduce(joined)
    joined.scale_(1.0 / world)
    start = 0
    for flat in store.flats:
        for a, b in spans:
            flat[a:b] = joined[start:start + b - a].astype(flat.dtype)
            start += b - a
    for name in copied:
        old = copies[name]
        size = int(np.prod(old.shape)) if old.shape else 1
        copies[name] = joined[start:start + size].reshape(old.shape).astype(old.dtype)
        start += size

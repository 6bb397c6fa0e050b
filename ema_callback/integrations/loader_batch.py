"""Images per optimizer step on one device, counted from what the training loader's batch sampler yields.

A configured batch size is not always what a step sees: PaddleOCR's ``MultiScaleSampler`` (the PP-OCRv4/v5
recognizers' default) yields ``base_elements / (h * w)`` images per batch at each scale, fewer than
``batch_size_per_card`` at the larger ones, and a sampler without ``drop_last`` ends each epoch on a short batch.
The per-device batch is therefore the mean over one epoch of the sampler's own batches, read from its precomputed
batch list where it keeps one, else ``samples per replica / batches``; the sampler is never iterated (iterating
reseeds Python's ``random`` in PaddleOCR's samplers and would change the run's data order).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

from ema_callback.core.horizon import BatchInfo


def _length(obj: Any) -> Optional[int]:
    try:
        return len(obj)
    except (TypeError, AttributeError, NotImplementedError):
        return None


def sampler_batch_mean(batch_sampler: Any) -> Optional[Tuple[float, str]]:
    """(mean images per batch over one epoch of ``batch_sampler`` on this rank, how it was counted), or None."""
    name = type(batch_sampler).__name__
    batches = getattr(batch_sampler, "batchs_in_one_epoch", None)  # PaddleOCR's MultiScaleSampler (its spelling)
    if isinstance(batches, list) and batches:
        return sum(len(b) for b in batches) / len(batches), f"mean of {name}'s {len(batches)} batches"
    listed = getattr(batch_sampler, "batch_list", None)  # [width, height, size] per batch
    if isinstance(listed, list) and listed and all(isinstance(b, (list, tuple)) and len(b) == 3 for b in listed):
        return sum(b[2] for b in listed) / len(listed), f"mean of {name}'s {len(listed)} batches"
    size = getattr(batch_sampler, "batch_size", None)
    count = _length(batch_sampler)
    if not isinstance(size, int) or not count:
        return None
    if getattr(batch_sampler, "drop_last", False):
        return float(size), ""
    samples = getattr(batch_sampler, "num_samples", None)  # DistributedBatchSampler: this replica's share
    if not isinstance(samples, int):
        samples = _length(getattr(batch_sampler, "sampler", None)) or _length(getattr(batch_sampler, "dataset", None))
    if not samples:
        return None
    mean = samples / count
    return (float(size), "") if mean == size else (mean, f"mean of {name}'s {count} batches")


def per_device_batch(loader: Any, configured: Optional[int]) -> Tuple[float, str]:
    """Images per optimizer step on one device: the loader's batch sampler's mean where it can be counted, else
    ``configured``; and how it was measured (empty when it equals the configured batch)."""
    found = sampler_batch_mean(getattr(loader, "batch_sampler", None))
    if found is None:
        return float(configured or 0), ""
    mean, how = found
    if how and configured and mean != configured:
        how += f"; configured {configured}"
    return mean, how


def suite_batch_info(loader: Any, dataset: Any, configured: Optional[int], epochs: Any) -> BatchInfo:
    """The ``BatchInfo`` of a suite's training loader (PaddleOCR, ppdet: no gradient accumulation): the per-device
    batch as ``per_device_batch`` counts it, x ranks; an epoch is ``len(loader)`` steps, and where the sampler's
    batches were counted it holds what they yield (``MultiScaleSampler`` pads its last batches), else
    ``len(dataset)`` images; the run is ``epochs`` of them."""
    import paddle

    per_card, how = per_device_batch(loader, configured)
    world = paddle.distributed.get_world_size()
    size, steps = _length(dataset), _length(loader)
    if how and steps:
        size = int(round(per_card * steps * world))
    total = steps * epochs if steps and isinstance(epochs, int) else None
    return BatchInfo(per_card, world, 1, size or None, steps or None, total, how)

"""BatchNorm statistics recomputed for the EMA weights (``EMA.recompute_bn: N``).

Averaging BatchNorm running statistics (``buffers: average``) approximates the statistics of the averaged weights;
the exact ones come from running data through them. As PyTorch's ``torch.optim.swa_utils.update_bn`` does for
SWA: with the EMA weights in the network, every BatchNorm layer's running mean/variance is recomputed over ``N``
training batches in train mode without gradients, as a **cumulative** average (batch ``i`` of ``N`` gets weight
``1/i``: the layer's momentum is set to ``(i-1)/i`` for it, so the result is the plain mean of the ``N`` batch
statistics; Paddle's running variance is the biased batch variance). Across data-parallel ranks the results are
averaged (timm's ``distribute_bn``), so every rank holds the same statistics.

The batches are the last ``N`` the run already drew: ``BatchRecorder`` (a forward pre-hook on the averaged layer;
its ``forward`` is untouched) keeps references to the inputs of its last ``N`` training calls (train mode,
gradients on). No
copy and no host read is made; the cost is keeping ``N`` batches alive on their device (for a 32x3x48x320 float32
batch, 5.6 MiB each). The data order, the optimizer and the raw weights are untouched.
"""
from __future__ import annotations

import collections
import logging
from typing import Any, Deque, Dict, List, Optional, Set, Tuple

from ema_callback.core.features import Feature
from ema_callback.errors import EMAConfigError
from ema_callback.paddle_compat import paddle

logger = logging.getLogger("ema_callback")


def batchnorm_layers(model) -> List[Any]:
    """Every BatchNorm layer of ``model`` (``nn.BatchNorm1D/2D/3D``, ``SyncBatchNorm`` and the older
    ``nn.BatchNorm``) that keeps running statistics."""
    base = paddle.nn.layer.norm._BatchNormBase
    return [layer for layer in model.sublayers(include_self=True)
            if isinstance(layer, (base, paddle.nn.BatchNorm)) and getattr(layer, "_mean", None) is not None]


def _detached(value):
    if isinstance(value, paddle.Tensor):
        return value.detach()
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


class BatchRecorder:
    """The inputs of the last ``size`` training forwards of ``model`` (references, no copies).

    Recorded by a forward pre-hook (``register_forward_pre_hook``, with keyword inputs where Paddle passes them to
    hooks: ``with_kwargs``, Paddle 3.x): ``model.forward`` is left as it is, so what introspects it
    (``paddle.Model`` reads the input names with ``inspect.getfullargspec(network.forward)``) sees the model's own
    signature. Paddle 2.6 gives pre-hooks the positional inputs only: a keyword input there is recorded as an empty
    call and the batch is not used (one warning says so)."""

    def __init__(self, model, size: int):
        self.model = model
        self.batches: Deque[Tuple[tuple, dict]] = collections.deque(maxlen=int(size))
        self.paused = False
        self._warned = False
        self._handle = None
        self._install()

    def _install(self) -> None:
        if _hooks_take_kwargs(self.model):
            self._handle = self.model.register_forward_pre_hook(self._record, with_kwargs=True)
        else:
            self._handle = self.model.register_forward_pre_hook(lambda layer, args: self._record(layer, args, None))

    def _record(self, layer, args, kwargs):
        if self.paused or not layer.training or not paddle.is_grad_enabled():
            return None
        if kwargs is None and not args:
            if not self._warned:
                logger.warning("EMA: recompute_bn: %s is called with keyword inputs only, which this Paddle's "
                               "forward pre-hooks do not see; those batches are not recorded",
                               type(layer).__name__)
                self._warned = True
            return None
        self.batches.append((_detached(tuple(args)), _detached(dict(kwargs or {}))))
        return None

    def close(self) -> None:
        """The hook off the model (the batches recorded so far are kept)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def reopen(self) -> None:
        """The hook on the model again (after ``close``), recording into the same queue."""
        if self._handle is None:
            self._install()


def _hooks_take_kwargs(model) -> bool:
    """Whether this Paddle passes keyword inputs to forward pre-hooks (``with_kwargs``, Paddle 3.x)."""
    import inspect

    return "with_kwargs" in inspect.signature(model.register_forward_pre_hook).parameters


def recompute(model, batches, collective: bool = False) -> int:
    """Recompute ``model``'s BatchNorm running statistics over ``batches`` with its current weights; returns the
    number of batches used. ``collective``: average the results over data-parallel ranks (every rank must call)."""
    layers = batchnorm_layers(model)
    batches = list(batches)
    if not layers or not batches:
        return 0
    momenta = [layer._momentum for layer in layers]
    was_training = model.training
    model.train()
    try:
        with paddle.no_grad():
            for layer in layers:
                layer._mean.zero_()
                layer._variance.fill_(1.0)
            for i, (args, kwargs) in enumerate(batches, start=1):
                for layer in layers:
                    layer._momentum = (i - 1) / i  # running = (i-1)/i * running + 1/i * batch: the plain mean
                model(*args, **kwargs)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer._momentum = momentum
        if not was_training:
            model.eval()
    world = paddle.distributed.get_world_size()
    if collective and world > 1:
        with paddle.no_grad():
            flat = paddle.concat([t.astype("float32").reshape([-1]) for layer in layers
                                  for t in (layer._mean, layer._variance)])
            paddle.distributed.all_reduce(flat)
            flat.scale_(1.0 / world)
            start = 0
            for layer in layers:
                for t in (layer._mean, layer._variance):
                    size = int(t.numel())
                    paddle.assign(flat[start:start + size].reshape(t.shape).astype(t.dtype), output=t)
                    start += size
    return len(batches)


class BatchNormRecompute(Feature):
    """``recompute_bn: N`` as an engine feature: records the last N training batches; after the EMA values are put
    into the model, recomputes every BatchNorm layer's statistics for them (``restore`` puts the raw ones back, since
    their ids are in ``backup_ids``). ``collective``: average over data-parallel ranks (False where only rank 0
    evaluates and saves: PaddleOCR, ppdet)."""

    name = "recompute_bn"

    def __init__(self, model, size: int):
        self.model = model
        self.stats = {id(t) for layer in batchnorm_layers(model) for t in (layer._mean, layer._variance)}
        self.recorder = BatchRecorder(model, size)
        self.collective = True
        self.used = 0  # batches used by the last recomputation

    @classmethod
    def build(cls, config, batch, model) -> Optional["BatchNormRecompute"]:
        if not config.recompute_bn:
            return None
        if not batchnorm_layers(model):
            raise EMAConfigError(f"EMA.recompute_bn: {type(model).__name__} has no BatchNorm layer, so there are no "
                                 "statistics to recompute; remove recompute_bn")
        return cls(model, config.recompute_bn)

    def backup_ids(self) -> Set[int]:
        return self.stats if self.recorder.batches else set()

    def after_apply(self, ema, label: str) -> None:
        if not self.recorder.batches:
            return
        self.used = recompute(self.model, self.recorder.batches, collective=self.collective)
        logger.info("EMA: BatchNorm statistics of %s recomputed for its weights: %d layers over the last %d training "
                    "batches%s", label, len(batchnorm_layers(self.model)), self.used,
                    " (averaged over ranks)" if self.collective and paddle.distributed.get_world_size() > 1 else "")

    def state(self) -> Dict[str, Any]:
        return {"recompute_bn_batches": self.used}

    def close(self) -> None:
        """The forward pre-hook removed: the model is as it was found. The last batches it recorded stay with the
        engine (references, freed with it), so an ``apply_to`` after training still recomputes the statistics."""
        self.recorder.close()

    def reopen(self) -> None:
        self.recorder.reopen()

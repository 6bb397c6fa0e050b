"""Which tensors of a model are averaged, copied or left to follow the live weights."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Sequence

from ema_callback.errors import EMAConfigError
from ema_callback.paddle_compat import paddle

AVERAGE = "average"  # shadow = d*shadow + (1-d)*w
COPY = "copy"  # shadow = w at each update (integer tensors; `buffers: copy`)
FOLLOW = "follow"  # not stored: the live tensor is used as it is (excluded; `buffers: skip`)


@dataclass
class Entry:
    """One state-dict tensor of the model and what the EMA does with it."""

    name: str
    tensor: paddle.Tensor
    role: str
    is_buffer: bool  # non-trainable float tensor (BatchNorm mean/variance, register_buffer)


def unwrap(model: paddle.nn.Layer) -> paddle.nn.Layer:
    """The user's layer inside ``paddle.DataParallel`` (``_layers``) or similar wrappers."""
    while isinstance(model, paddle.DataParallel) or (
            type(model).__name__ in ("DataParallel", "ShardingParallel", "GroupShardedStage3")
            and hasattr(model, "_layers")):
        model = model._layers
    return model


def _is_floating(tensor: paddle.Tensor) -> bool:
    return tensor.dtype in (paddle.float16, paddle.bfloat16, paddle.float32, paddle.float64)


def _is_buffer(tensor: paddle.Tensor) -> bool:
    # BatchNorm running statistics are Parameters with trainable=False (stop_gradient=True) in Paddle;
    # register_buffer tensors are plain Tensors.
    if isinstance(tensor, paddle.base.framework.EagerParamBase):
        return not tensor.trainable
    return True


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def classify(model: paddle.nn.Layer, include: Sequence[str] = (), exclude: Sequence[str] = (),
             buffers: str = "average") -> List[Entry]:
    """Entries for every tensor of ``model.state_dict()`` (names as in the saved ``.pdparams``)."""
    entries: List[Entry] = []
    seen: Dict[int, str] = {}
    for name, tensor in unwrap(model).state_dict().items():
        if id(tensor) in seen:  # tied weights: averaged once, under the first name
            continue
        seen[id(tensor)] = name
        is_buffer = _is_floating(tensor) and _is_buffer(tensor)
        if not _is_floating(tensor):
            role = COPY
        elif (include and not _matches(name, include)) or _matches(name, exclude):
            role = FOLLOW
        elif is_buffer:
            role = {"average": AVERAGE, "copy": COPY, "skip": FOLLOW}[buffers]
        else:
            role = AVERAGE
        entries.append(Entry(name, tensor, role, is_buffer))
    _check_patterns([e.name for e in entries], include=include, exclude=exclude)
    return entries


def _check_patterns(names: Sequence[str], **patterns: Sequence[str]) -> None:
    """A regex of ``include``/``exclude`` that matches no tensor name would silently do nothing (a typo, another
    model's names): one line naming the key, the pattern and what names look like."""
    for key, given in patterns.items():
        for pattern in given or ():
            if not any(re.search(pattern, name) for name in names):
                example = f" (names like {names[0]!r})" if names else ""
                raise EMAConfigError(f"EMA.{key}: {pattern!r} matches no tensor of the model{example}; "
                                     f"fix or remove it")

"""What a user writes with the public API (README, docs/model-fit.md), type-checked by ``make lint``:

    mypy --follow-imports=silent --disallow-untyped-calls tests/typecheck/public_api_usage.py

mypy checks this file against the annotations of ``ema_callback``'s public names (their bodies are not checked
here): a public call whose signature lost its annotations, or whose types no longer fit the documented use, fails.
It is never run.
"""
from typing import Dict, List, Optional

import numpy as np
import paddle

from ema_callback import BatchInfo, EMACallback, EMAConfig, ExponentialMovingAverage, PostHocEMA, decay_at


def model_fit(model: paddle.Model, train: paddle.io.Dataset, evald: paddle.io.Dataset) -> Optional[float]:
    callback = EMACallback(decay=0.999, eval_raw=True)
    also = EMACallback.from_config({"half_life_epochs": 0.5, "select": "best"}, resume="auto")
    model.fit(train, evald, epochs=2, callbacks=[callback, also])
    ema: Optional[ExponentialMovingAverage] = callback.ema
    return ema.decay_for_next_update() if ema is not None else None


def engine_by_hand(net: paddle.nn.Layer, optimizer: paddle.optimizer.Optimizer) -> Dict[str, np.ndarray]:
    config = EMAConfig.from_block({"decay": 0.9998, "schedule": "threshold"})
    ema = ExponentialMovingAverage(net, config, optimizer=optimizer, batch=BatchInfo(32, world=2))
    updated: Optional[bool] = ema.step()
    with ema.swapped(net):
        pass
    ema.apply_to(net)
    ema.restore(net)
    ema.save("out/ema.pdema")
    ema.load("out/ema.pdema")
    ema.export("out/ema.pdparams", net)
    labels: List[str] = ema.candidate_labels
    first: float = decay_at(0, "threshold", 0.9999)
    assert updated is None or isinstance(updated, bool) and labels and first
    return ema.ema_state_dict(net)


def posthoc(folder: str) -> Dict[str, np.ndarray]:
    post = PostHocEMA(folder)
    post.export(0.1, "out/sigma_0.1.pdparams")
    return post.reconstruct(0.1, at_step=None)

"""ema-callback: an exponential moving average of model weights for PaddlePaddle training.

The engine (``ExponentialMovingAverage``) knows nothing of any training loop; ``EMACallback`` plugs it
into ``paddle.Model.fit``, and ``ema_callback.integrations.paddleocr`` / ``.paddledet`` into PaddleOCR and
PaddleDetection.
"""
from typing import TYPE_CHECKING

from ema_callback.config.schema import EMAConfig, EMAConfigError
from ema_callback.core.features import register as _register_feature
from ema_callback.core.horizon import BatchInfo
from ema_callback.core.schedules import decay_at

__version__ = "0.1.0"

# What plugs into the engine, in the order of their shadows and calls (core.features): registered here, above the
# engine, which imports none of them (each is imported when an engine is first built).
for _feature in ("ema_callback.posthoc.tracking:PosthocProfiles", "ema_callback.core.switch_ema:SwitchEMA",
                 "ema_callback.core.bn_recompute:BatchNormRecompute"):
    _register_feature(_feature)

__all__ = ["BatchInfo", "EMAConfig", "EMAConfigError", "ExponentialMovingAverage", "EMACallback", "PostHocEMA",
           "decay_at", "__version__"]


if TYPE_CHECKING:  # what the lazy names below are, for type checkers (make lint)
    from ema_callback.core.engine import ExponentialMovingAverage
    from ema_callback.integrations.model_fit import EMACallback
    from ema_callback.posthoc.snapshots import PostHocEMA


def __getattr__(name):  # keep `import ema_callback` free of paddle until the engine is needed
    if name == "ExponentialMovingAverage":
        from ema_callback.core.engine import ExponentialMovingAverage
        return ExponentialMovingAverage
    if name == "EMACallback":
        from ema_callback.integrations.model_fit import EMACallback
        return EMACallback
    if name == "PostHocEMA":
        from ema_callback.posthoc.snapshots import PostHocEMA
        return PostHocEMA
    raise AttributeError(name)

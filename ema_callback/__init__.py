"""ema-callback: an exponential moving average of model weights for PaddlePaddle training.

The engine (``ExponentialMovingAverage``) knows nothing of any training loop; ``EMACallback`` plugs it
into ``paddle.Model.fit``, and ``ema_callback.integrations.paddleocr`` / ``.paddledet`` into PaddleOCR and
PaddleDetection.
"""
from ema_callback.config.schema import EMAConfig, EMAConfigError
from ema_callback.core.horizon import BatchInfo
from ema_callback.core.schedules import decay_at

__version__ = "0.1.0"

__all__ = ["BatchInfo", "EMAConfig", "EMAConfigError", "ExponentialMovingAverage", "EMACallback", "PostHocEMA",
           "decay_at", "__version__"]


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

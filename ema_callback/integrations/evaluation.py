"""Which weights an evaluation uses, and the metric names every way in logs (one set of rules and constants).

* Before ``eval_start_step`` optimizer steps, evaluations (and best-model selection) use the raw weights, said
  once; from then on the EMA weights (``EvaluationPolicy.raw_weights_now``).
* With ``eval_raw`` the raw weights' metrics are logged beside the EMA's as ``<name>_raw`` (``raw_suffixed``),
  and every EMA evaluation logs the relative drift ``||ema - w|| / ||w||`` as ``ema_drift``.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, Mapping

from ema_callback.config.schema import EMAConfig

logger = logging.getLogger("ema_callback")

RAW_SUFFIX = "_raw"
DRIFT = "ema_drift"
NOT_METRICS = ("step", "batch_size", DRIFT)  # entries of Model.fit's logs that are not metrics


def before_eval_start(ema, config: EMAConfig) -> bool:
    """Whether the run is still before ``eval_start_step`` (raw weights are evaluated and saved as best)."""
    return ema.num_steps < config.eval_start_step


def raw_suffixed(metrics: Mapping[str, Any], skip: Iterable[str] = NOT_METRICS) -> Dict[str, Any]:
    """``{name + '_raw': value}`` for every metric (already-suffixed names and ``skip`` left out)."""
    skip = set(skip)
    return {k + RAW_SUFFIX: v for k, v in metrics.items() if k not in skip and not k.endswith(RAW_SUFFIX)}


class EvaluationPolicy:
    """Raw weights until ``eval_start_step`` (one log line the first time), EMA weights after."""

    def __init__(self, config: EMAConfig):
        self.config = config
        self._told = False

    def raw_weights_now(self, ema) -> bool:
        if not before_eval_start(ema, self.config):
            return False
        if not self._told:
            logger.info("EMA: evaluating raw weights until optimizer step %d (eval_start_step)",
                        self.config.eval_start_step)
            self._told = True
        return True

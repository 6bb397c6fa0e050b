"""Switch EMA (``switch_every`` / ``switch_every_epochs``): every N optimizer steps the model's weights take the
primary EMA's values and training continues from them, optimizer state kept.

Li et al. 2024, "Switch EMA" (arXiv 2402.09240); Keras ``ema_overwrite_frequency``; ema-pytorch
``update_model_with_ema_every``. It runs after a real update only (so gradient accumulation and AMP-skipped steps
are respected), at the same step on every rank; under AMP O2 the fp32 master weights take the values too (else the
next step would overwrite the switch). The drift read before the switch is one host synchronisation per switch.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional

from ema_callback.core.features import Feature, check_period, due
from ema_callback.core.horizon import switch_period

logger = logging.getLogger("ema_callback")


class SwitchEMA(Feature):
    """Every ``period`` optimizer steps: weights := primary EMA (``count`` switches so far, in the ``.pdema``)."""

    name = "switch"

    def __init__(self, period: int):
        self.period = int(period)
        self.count = 0

    @classmethod
    def build(cls, config, batch, model) -> Optional["SwitchEMA"]:
        period = switch_period(config, batch)
        return cls(check_period("EMA.switch_every", period, config)) if period else None

    def after_update(self, ema) -> None:
        if due(ema.num_steps, ema.config.start_step, self.period):
            self.switch(ema)

    def switch(self, ema) -> float:
        """Copy the primary EMA into the weights now; returns the relative drift ``||ema-w||/||w||`` before it."""
        averaged = ema.averaged_numpy(0)
        drift = ema.drift_from(averaged)
        ema.take_weights(averaged)
        self.count += 1
        logger.info("EMA: switch %d at optimizer step %d: the weights take the EMA weights (relative drift before "
                    "||ema-w||/||w|| = %.4g); optimizer state kept", self.count, ema.num_steps, drift)
        return drift

    def state(self) -> Dict[str, Any]:
        return {"num_switches": self.count}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.count = int(state.get("num_switches", 0))

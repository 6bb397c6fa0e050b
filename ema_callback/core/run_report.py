"""What a run is told about its EMA, for every way in: the start line (``log_start``), the check before each EMA
evaluation (``log_before_eval``) and the realized horizon at the end (``realized``, ``log_realized``).

The arithmetic is ``horizon``'s (``describe``, ``length_warnings``, ``realized``); this module reads an engine's
public state (config, batch, candidates, counters, features) and logs.
"""
from __future__ import annotations

import logging
from typing import Any, Dict

from ema_callback.core.horizon import describe, half_life_steps, half_weight_span, length_warnings, too_long
from ema_callback.core.horizon import realized as horizon_realized

logger = logging.getLogger("ema_callback")


def describe_length(ema) -> str:
    """The start line: global batch, each EMA's decay per optimizer step and half-life, the schedule and the step
    from which the stated decay holds."""
    return describe(ema.config, ema.batch, ema.candidates)


def log_start(ema, log=logger) -> None:
    """The start line, then a warning for each length or period longer than the run (where its length is known)."""
    log.info("EMA: %s", describe_length(ema))
    switch, posthoc = ema.features.get("switch"), ema.features.get("posthoc")
    for line in length_warnings(ema.config, ema.batch, ema.candidates, switch.period if switch else 0,
                                posthoc.period if posthoc else 0):
        log.warning(line)


def realized(ema, shadow=0) -> Dict[str, Any]:
    """What EMA ``shadow`` averaged over so far (``horizon.realized``; a host read of the update count)."""
    j = ema.shadow_index(shadow)
    return horizon_realized(ema.config, ema.decays[j], ema.num_updates, ema.batch)


def log_realized(ema, log=logger) -> None:
    """At the end of training: each EMA's realized horizon; a warning where it was too long for the run
    (``horizon.too_long``: more than 10% of its weight still on the starting weights, or about the whole run
    averaged), judged on the profile the schedule realized."""
    steps = ema.num_updates * ema.config.update_every
    for j, label in enumerate(ema.candidate_labels):
        r = realized(ema, j)
        stated = half_life_steps(ema.decays[j])
        half = f"half its weight on the last {half_weight_span(r)}" if r["half_weight_steps"] is not None else \
            "the starting weights hold more than half its weight"
        log.info("EMA: %s realized over %d optimizer steps: %s, %.1f%% on the weights it started from (stated "
                 "half-life %s optimizer steps)", label, steps, half, 100 * r["weight_on_start"], f"{stated:,.0f}")
        kind = too_long(ema.config, r) if steps else None
        if kind == "start":
            log.warning("EMA: %s: %.0f%% of its weight is still on the weights it started from after %d optimizer "
                        "steps: its evaluations measure mostly those weights; shorten the length or train longer",
                        label, 100 * r["weight_on_start"], steps)
        elif kind == "whole":
            log.warning("EMA: %s: its horizon is longer than the run (%d steps): half its weight is on the last %s, "
                        "it averaged the whole run, the early weights included", label, steps, half_weight_span(r))


def log_before_eval(ema, log=logger) -> float:
    """Log what a user needs before trusting an EMA evaluation; returns the relative drift.

    Warns when the EMA was never updated, when the drift is NaN, and when the shadow still equals the weights after
    100+ updates (an EMA that is not averaging anything)."""
    drift = ema.drift()
    if ema.num_updates == 0:
        log.warning("EMA: evaluating before the first EMA update (optimizer step %d, start_step %d): the EMA still "
                    "equals a copy of the weights", ema.num_steps, ema.config.start_step)
    elif drift != drift:
        log.warning("EMA: the drift between EMA and raw weights is NaN (optimizer step %d)", ema.num_steps)
    elif drift == 0.0 and ema.num_updates >= 100:
        log.warning("EMA: after %d updates the EMA equals the raw weights: nothing is being averaged (check "
                    "include/exclude and that the weights change)", ema.num_updates)
    log.info("EMA: evaluating EMA weights at optimizer step %d (%d updates, %d skipped for NaN/Inf), relative drift "
             "||ema-w||/||w|| = %.4g", ema.num_steps, ema.num_updates, ema.num_skipped, drift)
    return drift

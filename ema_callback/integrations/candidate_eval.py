"""Evaluating candidate weights through a way in's own evaluation: the one loop every way in uses.

A *candidate* is a set of weights the run can end on or select: the raw weights, each EMA of ``EMA.decays``, and
with ``length: auto`` the lengths reconstructed from the post-hoc snapshots. Every way in evaluates them the same
way, whether during training (``CandidateBoard``: ``eval_raw``, several EMAs, ``select: best``) or at the end
(``AutoPick``: ``length: auto``)::

    for label in labels:                  # in the order given (the way in's own evaluation runs last)
        with weights(label):              # the candidate in the model; what was there is back after
            metrics[label], units[label] = measure()

``measure()`` is the way in's evaluation of the model as it is (PaddleOCR's ``program.eval``, ppdet's
``_eval_with_loader``, ``Model.evaluate``, PaddleNLP's ``Trainer.evaluate``): its metrics, and where the metric is
a ratio of sums over units of the evaluation set (accuracy: correct over count, per sample or batch) those units as
an ``(n, 2)`` array of (numerator, denominator), else None. The units make the comparison paired
(``honest_pick``).
"""
from __future__ import annotations

from typing import Any, Callable, ContextManager, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

Measured = Tuple[Mapping[str, Any], Optional[np.ndarray]]
"""What one evaluation gives: its metrics by name, and its per-unit (numerator, denominator) sums or None."""


def evaluate_candidates(labels: Sequence[str], weights: Callable[[str], ContextManager[Any]],
                        measure: Callable[[], Measured], before: Optional[Callable[[str], None]] = None
                        ) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Optional[np.ndarray]]]:
    """Each candidate of ``labels`` in the model in turn (``weights(label)``), evaluated by ``measure()``.

    ``before(label)``: called before the candidate's weights go in (the drift line before the primary EMA's).
    Returns (metrics by label, units by label)."""
    metrics: Dict[str, Dict[str, Any]] = {}
    units: Dict[str, Optional[np.ndarray]] = {}
    for label in labels:
        if before is not None:
            before(label)
        with weights(label):
            values, per_unit = measure()
        metrics[label], units[label] = dict(values), per_unit
    return metrics, units


def metric_value(value: Any) -> Optional[float]:
    """A metric as a float (``Model.evaluate`` gives ``loss`` as a one-element list); None if not a number."""
    while isinstance(value, (list, tuple)) and value:
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None

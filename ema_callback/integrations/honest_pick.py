"""One rule to choose among candidate weights evaluated on the same data, that does not follow noise.

The default candidate is kept unless the best one beats it by more than the uncertainty of that difference::

    best = argmax metric;  pick best  if  gain(best, default) > Z x se(gain),  else the default      (Z = 2)

``se`` comes from, in this order:

1. **paired per-unit results**: each candidate's metric is a ratio of sums over units of the evaluation set
   (samples or batches: accuracy is the sum of correct over the sum of counts), the same units for every
   candidate; a paired bootstrap (2,000 resamples of the units, seeded) of the difference of the two ratios, with
   at least 10 units (PaddleOCR's ``RecMetric``: one per image; ``Model.fit``: one per evaluation batch);
2. without them, the larger of two estimates: **the validation noise over the last quarter of training**
   (residuals around a line, ``candidates.trend_noise``) of the two candidates, ``se = sqrt(n_a^2 + n_b^2)``
   (``sqrt(2) x`` the one known where only one has a series, the default's or the best's), and **the smoothness of
   the metric over nearby lengths** (``sqrt(2) x`` the residual standard deviation around a quadratic in log
   length, when at least 5 lengths were evaluated). Nearby lengths share most
   of their weights, so their residuals can be near 0 while two distant candidates differ by real noise: the
   smoothness alone never judges the raw weights, which have no length;
3. none of these, or an uncertainty of 0: the default is kept, and the decision says why.

Candidates whose metric is not a number are left out; a default that is not a number is kept, and said.

With ``Z = 2`` (one-sided, about 97.7%) the maximum of up to 10 candidates' noise alone rarely clears the bar, so a
winner is a real gain. The decision reports the pick, its value, its gain over the default and over the raw weights
with their standard errors, and how they were measured.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Union

import numpy as np

Z = 2.0
MIN_UNITS = 10  # fewer units (an evaluation of 4 large batches) give no usable bootstrap: the next source is used
RESAMPLES = 2000
SEED = 0


@dataclass
class Evaluated:
    """One candidate's evaluation: ``value`` the metric; ``units`` (n, 2) per-unit (numerator, denominator) sums
    whose ratio of totals is the metric (None where the metric is not such a ratio); ``length`` its position among
    lengths (log sigma_rel, for the smoothness estimate; None for raw weights and the default)."""

    label: str
    value: float
    units: Optional[np.ndarray] = None
    length: Optional[float] = None


@dataclass
class Decision:
    label: str
    value: float
    default: str
    default_value: float
    gain: float  # over the default, in the metric's direction (positive = better)
    se: Optional[float]  # standard error of ``gain``
    method: str  # how se was measured
    reason: str
    gain_over_raw: Optional[float] = None
    se_over_raw: Optional[float] = None
    rows: List[Dict[str, object]] = field(default_factory=list)

    def as_dict(self) -> Dict[str, object]:
        return {k: getattr(self, k) for k in ("label", "value", "default", "default_value", "gain", "se", "method",
                                              "reason", "gain_over_raw", "se_over_raw", "rows")}


def _ratio(units: np.ndarray) -> float:
    return float(units[:, 0].sum() / units[:, 1].sum())


def paired_se(a: np.ndarray, b: np.ndarray, seed: int = SEED) -> Optional[float]:
    """Bootstrap standard error of ``ratio(a) - ratio(b)`` over the same units (rows) resampled together."""
    if a is None or b is None or len(a) != len(b) or len(a) < MIN_UNITS:
        return None
    rng = np.random.default_rng(seed)
    n, diffs = len(a), []
    for start in range(0, RESAMPLES, 200):  # 200 resamples at a time: memory n x 200
        index = rng.integers(0, n, size=(min(200, RESAMPLES - start), n))
        num_a, den_a = a[index, 0].sum(axis=1), a[index, 1].sum(axis=1)
        num_b, den_b = b[index, 0].sum(axis=1), b[index, 1].sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            diffs.append(num_a / den_a - num_b / den_b)
    diffs = np.concatenate(diffs)
    diffs = diffs[np.isfinite(diffs)]
    return float(diffs.std(ddof=1)) if len(diffs) > 1 else None


def smoothness_noise(evaluated: List[Evaluated]) -> Optional[float]:
    """The residual standard deviation of the metric around a quadratic in log length (ddof 3), from the candidates
    that have a length; None with fewer than 5."""
    points = [(e.length, e.value) for e in evaluated if e.length is not None]
    if len(points) < 5:
        return None
    x = np.array([p[0] for p in points], dtype=np.float64)
    y = np.array([p[1] for p in points], dtype=np.float64)
    coefficients = np.polyfit(x, y, 2)
    residuals = y - np.polyval(coefficients, x)
    return float(np.sqrt(np.sum(residuals ** 2) / (len(points) - 3)))


def decide(evaluated: Mapping[str, Evaluated], default: str, higher_is_better: bool = True,
           raw: Optional[str] = "raw",
           trend_noise: Union[None, float, Mapping[str, Optional[float]]] = None) -> Decision:
    """The module docstring's rule over ``evaluated`` (by label; ``default`` among them). ``trend_noise``: the
    validation noise of the default (a number), or of each candidate that has one (by label)."""
    def noise(label: str) -> Optional[float]:
        value = trend_noise.get(label) if isinstance(trend_noise, Mapping) else \
            (trend_noise if label == default else None)
        return float(value) if value is not None and np.isfinite(value) else None

    sign = 1.0 if higher_is_better else -1.0
    base = evaluated[default]
    finite = [e for e in evaluated.values() if np.isfinite(e.value)] or [base]
    best = max(finite, key=lambda e: (sign * e.value, e.label == default))
    smooth = smoothness_noise(finite)

    def uncertainty(a: Evaluated, b: Evaluated):
        se = paired_se(a.units, b.units)
        if se is not None:
            return se, f"paired bootstrap over {len(a.units)} evaluation units"
        sources = []
        known = [n for n in (noise(a.label), noise(b.label)) if n is not None]
        if len(known) == 2:
            sources.append((float(np.hypot(*known)), "the two candidates' validation noise in the last quarter, "
                            "combined"))
        elif known:
            sources.append((float(np.sqrt(2.0) * known[0]), "sqrt(2) x the validation noise in the last quarter"))
        if smooth is not None and raw not in (a.label, b.label):
            sources.append((float(np.sqrt(2.0) * smooth), "sqrt(2) x the noise of the metric around a smooth curve "
                            "over lengths"))
        sources = [(se, how) for se, how in sources if se > 0]
        if not sources:
            return None, "no measure of the noise"
        return max(sources)

    rows = [{"candidate": e.label, "value": e.value, "length": e.length} for e in evaluated.values()]
    gain = sign * (best.value - base.value)
    se, method = uncertainty(best, base)
    if not np.isfinite(base.value):
        label, reason = default, "the default's metric is not a number: it is kept"
    elif best.label == default:
        ties = [e.label for e in evaluated.values() if e.label != default and e.value == base.value]
        label, reason = default, ("no candidate is better than the default" + (f" ({len(ties)} equal to it)"
                                                                             if ties else ""))
    elif se is None:
        label, reason = default, f"{best.label} is {gain:+.4g} better, but with {method} the default is kept"
    elif gain > Z * se:
        label, reason = best.label, f"{best.label} beats the default by {gain:+.4g} > {Z:g} x {se:.2g} ({method})"
    else:
        label, reason = default, (f"{best.label} is {gain:+.4g} better, within {Z:g} x {se:.2g} ({method}): the "
                                  "default is kept")
    chosen = evaluated[label]
    decision = Decision(label, chosen.value, default, base.value, sign * (chosen.value - base.value),
                        se if label != default else uncertainty(best, base)[0], method, reason, rows=rows)
    if raw is not None and raw in evaluated and label != raw:
        decision.gain_over_raw = sign * (chosen.value - evaluated[raw].value)
        decision.se_over_raw = uncertainty(chosen, evaluated[raw])[0]
    return decision

"""The one rule that picks among candidates (issue 26.4): the default unless another beats it by 2 standard errors,
the standard error from paired units, from the metric's smoothness over lengths, or from the validation noise."""
import math

import numpy as np

from ema_callback.integrations.honest_pick import Evaluated, decide, paired_se, smoothness_noise


def correct_units(correct):
    return np.stack([np.asarray(correct, dtype=np.float64), np.ones(len(correct))], axis=1)


def test_the_paired_standard_error_is_the_closed_form_of_a_paired_difference():
    """Per-sample correctness of two candidates on the same 4,000 samples: the bootstrap SE of the accuracy
    difference equals sqrt(var(a_i - b_i) / n), the paired closed form, within the bootstrap's own error."""
    rng = np.random.default_rng(3)
    a = rng.random(4000) < 0.8
    b = a.copy()
    flip = rng.random(4000) < 0.07
    b[flip] = ~b[flip]
    d = a.astype(float) - b.astype(float)
    closed = math.sqrt(d.var(ddof=1) / len(d))
    got = paired_se(correct_units(a), correct_units(b))
    assert abs(got - closed) / closed < 0.06, (got, closed)


def test_the_smoothness_noise_is_the_residual_std_around_a_quadratic_in_log_length():
    x = np.log([0.02, 0.04, 0.06, 0.09, 0.13, 0.2])
    y = 0.8 - 0.05 * (x + 2.5) ** 2 + np.array([0.01, -0.02, 0.015, 0.0, -0.01, 0.005])
    fit = np.polyval(np.polyfit(x, y, 2), x)
    expected = math.sqrt(np.sum((y - fit) ** 2) / (len(x) - 3))
    got = smoothness_noise([Evaluated(f"s{i}", v, length=length) for i, (length, v) in enumerate(zip(x, y))])
    assert math.isclose(got, expected, rel_tol=1e-12)


def test_equal_candidates_keep_the_default_and_say_why():
    """A model that converged to a point: every length gives the same weights, so the same predictions."""
    units = correct_units(np.random.default_rng(0).random(500) < 0.7)
    evaluated = {label: Evaluated(label, float(units[:, 0].mean()), units.copy(), length)
                 for label, length in (("raw", None), ("ema", None), ("sigma0.03", math.log(0.03)),
                                       ("sigma0.06", math.log(0.06)), ("sigma0.12", math.log(0.12)))}
    decision = decide(evaluated, "ema")
    assert decision.label == "ema" and decision.gain == 0.0
    assert decision.reason == "no candidate is better than the default (4 equal to it)"
    assert decision.gain_over_raw == 0.0


def test_a_gain_within_the_noise_keeps_the_default_and_a_real_one_is_picked():
    rng = np.random.default_rng(1)
    truth = rng.random(2000) < 0.7
    default = truth.copy()
    small = default.copy()
    small[np.flatnonzero(~default)[:3]] = True  # 3 more correct out of 2,000: within the noise
    big = default.copy()
    big[np.flatnonzero(~default)[:120]] = True  # 120 more: a real gain
    base = {"ema": Evaluated("ema", default.mean(), correct_units(default)),
            "raw": Evaluated("raw", default.mean() - 0.01, correct_units(default))}
    kept = decide(dict(base, s=Evaluated("s", small.mean(), correct_units(small))), "ema")
    assert kept.label == "ema" and "within 2 x" in kept.reason and "paired bootstrap over 2000" in kept.reason
    picked = decide(dict(base, s=Evaluated("s", big.mean(), correct_units(big))), "ema")
    assert picked.label == "s" and math.isclose(picked.gain, 120 / 2000) and picked.gain > 2 * picked.se


def test_without_any_measure_of_noise_the_default_is_kept():
    evaluated = {"ema": Evaluated("ema", 0.5), "raw": Evaluated("raw", 0.4), "s": Evaluated("s", 0.6, length=-2.0)}
    decision = decide(evaluated, "ema")
    assert decision.label == "ema" and decision.reason.endswith("with no measure of the noise the default is kept")
    with_noise = decide(evaluated, "ema", trend_noise=0.01)  # 0.1 > 2 x sqrt(2) x 0.01
    assert with_noise.label == "s" and "validation noise" in with_noise.method


def test_a_lower_is_better_metric_picks_the_lowest():
    evaluated = {"ema": Evaluated("ema", 1.0), "raw": Evaluated("raw", 1.2), "s": Evaluated("s", 0.5, length=0.0)}
    decision = decide(evaluated, "ema", higher_is_better=False, trend_noise=0.01)
    assert decision.label == "s" and math.isclose(decision.gain, 0.5) and math.isclose(decision.gain_over_raw, 0.7)


def test_too_few_units_for_a_bootstrap_fall_back_to_the_next_measure():
    """Four evaluation batches (Model.fit with a large eval batch) are no sample for a bootstrap: the validation
    noise decides instead, and the decision says so."""
    four = np.array([[30.0, 32.0], [29.0, 32.0], [31.0, 32.0], [28.0, 32.0]])
    better = four + np.array([[1.0, 0.0]] * 4)
    assert paired_se(better, four) is None and paired_se(np.repeat(better, 3, 0), np.repeat(four, 3, 0)) is not None
    evaluated = {"ema": Evaluated("ema", 118 / 128, four), "s": Evaluated("s", 122 / 128, better, length=-2.0)}
    decision = decide(evaluated, "ema", trend_noise=0.005)
    assert "validation noise" in decision.method and decision.label == "s"


def test_lengths_on_a_smooth_curve_never_make_raw_win_by_a_hair():
    """Without per-unit results, lengths lying exactly on a curve have a smoothness noise of ~0; the raw weights
    (which have no length) ahead of the default by 1e-4 must not win on that, and with the validation noise known
    the larger of the two estimates judges a length."""
    sigmas = [0.03, 0.06, 0.12, 0.2, 0.085, 0.155]
    evaluated = {f"sigma{s:g}": Evaluated(f"sigma{s:g}", 0.8 - 0.01 * math.log(s / 0.1) ** 2, length=math.log(s))
                 for s in sigmas}
    evaluated["ema"] = Evaluated("ema", 0.8)
    evaluated["raw"] = Evaluated("raw", 0.8001)
    d = decide(evaluated, "ema")
    assert d.label == "ema" and "no measure of the noise" in d.reason, d.reason
    evaluated["sigma0.085"] = Evaluated("sigma0.085", 0.8 + 0.003, length=math.log(0.085))  # off the curve
    with_trend = decide(evaluated, "ema", trend_noise=0.01)  # sqrt(2) x 0.01 > the smoothness estimate
    assert with_trend.label == "ema" and "validation noise" in with_trend.method, with_trend
    assert "smooth curve" in decide(evaluated, "ema", trend_noise=0.0005).method  # now the larger estimate


def test_a_candidate_whose_metric_is_not_a_number_hides_no_winner():
    units = correct_units(np.random.default_rng(1).random(400) < 0.6)
    better = units.copy()
    better[: 120, 0] = 1  # far beyond 2 standard errors
    evaluated = {"nan": Evaluated("nan", float("nan"), units), "ema": Evaluated("ema", _acc(units), units),
                 "ema2": Evaluated("ema2", _acc(better), better)}
    assert decide(evaluated, "ema").label == "ema2"
    evaluated["ema"] = Evaluated("ema", float("nan"), units)
    d = decide(evaluated, "ema")
    assert d.label == "ema" and "not a number" in d.reason


def _acc(units):
    return float(units[:, 0].sum() / units[:, 1].sum())

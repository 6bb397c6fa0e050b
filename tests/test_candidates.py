"""The candidates' noise measure and the one recommendation rule, against hand computations."""

from ema_callback.integrations.candidates import last_quarter, recommend, trend_noise


def test_trend_noise_is_the_residual_std_around_the_least_squares_line():
    steps = [10, 20, 30, 40, 50]
    values = [0.50, 0.58, 0.57, 0.70, 0.71]
    # closed-form simple regression, independent of numpy.polyfit
    n, sx, sy = len(steps), sum(steps), sum(values)
    sxx, sxy = sum(x * x for x in steps), sum(x * y for x, y in zip(steps, values))
    slope = (n * sxy - sx * sy) / (n * sxx - sx * sx)
    intercept = (sy - slope * sx) / n
    rss = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(steps, values))
    assert abs(trend_noise(list(zip(steps, values))) - (rss / (n - 2)) ** 0.5) < 1e-12
    line = [(s, 0.1 + 0.01 * s) for s in steps]
    assert trend_noise(line) < 1e-12  # a pure trend has no noise
    assert trend_noise(line[:2]) is None


def test_last_quarter_is_the_evaluations_after_three_quarters_of_the_run():
    series = [(s, 0.0) for s in range(20, 641, 20)]
    assert [s for s, _ in last_quarter(series)] == list(range(500, 641, 20))


def test_recommend_keeps_the_primary_unless_another_beats_it_beyond_its_noise():
    rows = [{"candidate": "ema_a", "final": 0.80, "noise": 0.02}, {"candidate": "ema_b", "final": 0.83, "noise": 0.01},
            {"candidate": "raw", "final": 0.70, "noise": 0.05}]
    assert recommend(rows, True) == "ema_a"  # +0.03 < 2 x hypot(0.02, 0.01) = 0.045: both candidates' noise
    rows[1]["final"] = 0.86
    assert recommend(rows, True) == "ema_b"  # +0.06 > 0.045
    assert recommend(rows, False) == "ema_a"  # lower is better: raw 0.10 below, within 2 x hypot(0.02, 0.05) = 0.108
    rows[2]["final"] = 0.65
    assert recommend(rows, False) == "raw"  # 0.15 below
    rows[0]["noise"] = None
    assert recommend(rows, True) == "ema_b"  # only the best's noise known: 0.06 > 2 x sqrt(2) x 0.01
    for row in rows:
        row["noise"] = None
    assert recommend(rows, True) == "ema_a"  # no measure of the noise: the primary
    assert recommend([], True) is None

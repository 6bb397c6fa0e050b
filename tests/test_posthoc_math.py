"""Post-hoc EMA math (EDM2 Section 3 / Appendix C) against independent numerical references."""
import numpy as np
import pytest

from ema_callback.posthoc.power_math import beta_at, coefficients, gamma_of, inner, sigma_rel_of


def profile(gamma, t, tau):
    return np.where(tau <= t, (gamma + 1) * tau ** gamma / t ** (gamma + 1), 0.0)


@pytest.mark.parametrize("sigma", [0.01, 0.05, 0.07, 0.10, 0.25])
def test_gamma_and_sigma_rel_invert_each_other_and_sigma_is_the_profile_width(sigma):
    gamma = float(gamma_of(sigma))
    assert float(sigma_rel_of(gamma)) == pytest.approx(sigma, rel=1e-12)
    tau = np.linspace(0, 1, 400_001)
    p = profile(gamma, 1.0, tau)
    mean = np.trapz(p * tau, tau)
    std = np.sqrt(np.trapz(p * (tau - mean) ** 2, tau))
    assert std == pytest.approx(sigma, rel=2e-3)  # the standard deviation of the profile, relative to t = 1


def test_inner_product_closed_form_matches_a_numerical_integral():
    tau = np.linspace(0, 3, 3_000_001)
    for ga, ta, gb, tb in [(6.94, 1.0, 3.2, 2.5), (16.97, 2.0, 16.97, 2.0), (0.5, 3.0, 28.0, 1.2)]:
        numeric = np.trapz(profile(ga, ta, tau) * profile(gb, tb, tau), tau)
        assert float(inner(ga, ta, gb, tb)) == pytest.approx(numeric, rel=1e-3)


def test_the_update_rule_builds_the_power_function_profile():
    """Impulse weights of ema = beta*ema + (1-beta)*w with beta = (1 - dt/t)^(gamma+1), dt = 1 or 4, against the
    profile integrated over each update's interval."""
    gamma = float(gamma_of(0.1))
    for dt in (1, 4):
        steps = np.arange(dt, 4000 + 1, dt, dtype=np.float64)
        weights = np.zeros(len(steps))
        for i, t in enumerate(steps):
            b = beta_at(gamma, t, dt)
            weights[:i] *= b
            weights[i] = 1 - b
        expected = (steps / 4000) ** (gamma + 1) - ((steps - dt) / 4000) ** (gamma + 1)
        assert np.max(np.abs(weights - expected)) < 1e-12 and abs(weights.sum() - 1) < 1e-12


def test_reconstruction_returns_a_snapshot_for_its_own_profile():
    gammas = [float(gamma_of(0.05))] * 4 + [float(gamma_of(0.10))] * 4
    times = [1000, 2000, 3000, 4000] * 2
    x = coefficients(gammas, times, gammas[5], 2000.0)
    one_hot = np.zeros(8)
    one_hot[5] = 1
    assert np.max(np.abs(x - one_hot)) < 1e-4

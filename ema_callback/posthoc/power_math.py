"""Post-hoc EMA: power-function EMA profiles and their least-squares reconstruction (pure numpy).

Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2, arXiv 2312.02696),
Section 3 and Appendix C; reference code NVlabs/edm2 ``training/phema.py``.

* A power-function EMA with exponent ``gamma`` averages the weights seen up to time ``t`` with the profile
  ``p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)`` on ``0 <= tau <= t``. Its relative width is
  ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))`` (``sigma_rel_of``), below 1/sqrt(12) ~ 0.289
  (gamma -> 0). From ``sigma_rel`` to ``gamma``: the largest real root of
  ``gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2)`` (the paper's Algorithm 2; ``gamma_of``).
* One update after an increment ``dt`` of time, ``t`` the time after it: ``beta = (1 - dt / t)^(gamma + 1)``,
  ``ema = beta * ema + (1 - beta) * w`` (``beta_at``). Time counts optimizer steps here; with ``update_every: k``
  one update covers ``dt = k`` steps (not 1: with dt = 1 the profile would be that of time t/k).
* Reconstruction: snapshots ``i`` (profile ``gamma_i`` at time ``t_i``) and a target ``(gamma, t)``; solve
  ``A x = b`` with ``A_ij = <p_i, p_j>``, ``b_i = <p_i, p_target>``, where
  ``<p_a, p_b> = (g_a + 1)(g_b + 1) min(t_a, t_b)^(g_a + g_b + 1) / ((g_a + g_b + 1) t_a^(g_a + 1) t_b^(g_b + 1))``
  (``inner``), and the weights are ``sum_i x_i snapshot_i``. Only snapshots taken at or before ``t`` are used.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

SIGMA_REL_MAX = float(np.sqrt(1.0 / 12.0))  # the limit gamma -> 0 (a uniform average)


def sigma_rel_of(gamma) -> np.ndarray:
    """Relative width of the power-function profile of exponent ``gamma``."""
    gamma = np.asarray(gamma, dtype=np.float64)
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_of(sigma_rel) -> np.ndarray:
    """The exponent whose profile has relative width ``sigma_rel`` (0 < sigma_rel < 0.2887): Algorithm 2."""
    sigma = np.asarray(sigma_rel, dtype=np.float64)
    if np.any(sigma <= 0) or np.any(sigma >= SIGMA_REL_MAX):
        raise ValueError(f"sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}), got {sigma_rel!r}")
    out = [np.roots([1.0, 7.0, 16.0 - s ** -2, 12.0 - s ** -2]).real.max() for s in sigma.reshape(-1)]
    return np.asarray(out, dtype=np.float64).reshape(sigma.shape)


def beta_at(gamma: float, t: float, dt: float) -> float:
    """The decay of one update that advances time by ``dt`` to ``t``: ``(1 - dt/t)^(gamma + 1)``."""
    return float((1.0 - dt / t) ** (gamma + 1.0))


def inner(gamma_a, t_a, gamma_b, t_b) -> np.ndarray:
    """``<p_a, p_b>``, the integral of the product of two power-function profiles (closed form)."""
    ga, ta, gb, tb = (np.asarray(v, dtype=np.float64) for v in (gamma_a, t_a, gamma_b, t_b))
    s = ga + gb + 1
    return (ga + 1) * (gb + 1) * np.minimum(ta, tb) ** s / (s * ta ** (ga + 1) * tb ** (gb + 1))


def coefficients(gammas: Sequence[float], times: Sequence[float], gamma: float, t: float) -> np.ndarray:
    """Least-squares weights ``x`` of the snapshots (``gammas[i]``, ``times[i]``) for the target ``(gamma, t)``."""
    g, tt = np.asarray(gammas, np.float64), np.asarray(times, np.float64)
    A = inner(g[:, None], tt[:, None], g[None, :], tt[None, :])
    b = inner(g, tt, gamma, t)
    return np.linalg.lstsq(A, b, rcond=None)[0]

"""Bound calculators: every right-hand side of theory/STATEMENTS.md as a function.

Each function evaluates one displayed inequality of `theory/STATEMENTS.md`
(named in its docstring) from the sample size `N` (or horizon `T`), the
dimension `d`, the ball radius `B`, the feature-difference bound `L_x`, the
failure probability `delta` and, where the statement needs one, a
concentrability coefficient.  Nothing here looks at data: the data-dependent
quantities (the design coefficient) are computed in `theory/concentrability.py`
and passed in.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not np.all(np.isfinite(value)) or np.any(np.asarray(value) <= 0):
            raise ValueError(f"{name} must be finite and > 0, got {value!r}")


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta!r}")


def curvature(B: float, L_x: float) -> float:
    """gamma = sigma'(B L_x), the smallest BT curvature on the B-ball (spec section 2)."""
    _check_positive(B=B, L_x=L_x)
    s = expit(B * L_x)
    return float(s * (1.0 - s))


def log_bracketing_number(eps: float, *, d: int, B: float, L_x: float) -> float:
    """Proposition 1: log N_[](eps) <= d log(1 + 2 B L_x / eps)."""
    _check_positive(eps=eps, B=B, L_x=L_x, d=d)
    return float(d * np.log1p(2.0 * B * L_x / eps))


def bracketing_radius(N, *, d: int, B: float, L_x: float, delta: float):
    """Lemma 1 radius: zeta_N = 1 + d log(1 + 2 B L_x N) + log(1/delta)."""
    _check_positive(N=N, B=B, L_x=L_x, d=d)
    _check_delta(delta)
    N = np.asarray(N, dtype=float)
    return 1.0 + d * np.log1p(2.0 * B * L_x * N) + np.log(1.0 / delta)


def anytime_radius(t, *, d: int, B: float, L_x: float, delta: float):
    """Lemma 3 radius: zeta_t = 1 + d log(1 + 2 B L_x t) + log(t (t+1) / delta)."""
    _check_positive(t=t, B=B, L_x=L_x, d=d)
    _check_delta(delta)
    t = np.asarray(t, dtype=float)
    return 1.0 + d * np.log1p(2.0 * B * L_x * t) + np.log(t * (t + 1.0) / delta)


def pair_width(zeta, *, B: float, L_x: float, lam: float):
    """Lemma 2: for theta, theta' in C, ||theta - theta'||^2_{Sigma + lam I} <= 8 zeta / gamma + 4 lam B^2.

    Returns the square root, the width of C in the regularised design norm.
    """
    gamma = curvature(B, L_x)
    return np.sqrt(8.0 * np.asarray(zeta, dtype=float) / gamma + 4.0 * lam * B**2)


def offline_bound(N, *, d: int, B: float, L_x: float, delta: float, concentrability, lam: float = 1.0):
    """Theorem 1 (estimands 1 and 3): sqrt((8 zeta_N / gamma + 4 lam B^2) * C / N).

    `concentrability` is C = N u^T (Sigma_N + lam I)^{-1} u for the estimand's
    direction u (Definition 1).  The bound is capped at B L_x, the largest possible
    return difference theta^T (v - v') <= B * 2L (L = L_x / 2); that cap is valid for
    estimands 1 and 2, and for the width only when ||u|| <= L_x / 2 (the callers check).
    """
    _check_positive(concentrability=concentrability, lam=lam)
    N = np.asarray(N, dtype=float)
    zeta = bracketing_radius(N, d=d, B=B, L_x=L_x, delta=delta)
    width = pair_width(zeta, B=B, L_x=L_x, lam=lam)
    bound = width * np.sqrt(np.asarray(concentrability, dtype=float) / N)
    return np.minimum(bound, B * L_x)


def teacher_estimation_bound(N, *, B: float, L_x: float, delta: float):
    """Theorem 1 (estimand 2): 2 B L (1 + sqrt(2 log(1/delta))) / sqrt(N), with L = L_x / 2.

    The black-box teacher gap is at most max_{theta in C} (theta* - theta)^T (v_E - v_hat_E)
    <= 2 B ||v_E - v_hat_E||, and the mean of N vectors of norm <= L deviates by
    at most L (1 + sqrt(2 log(1/delta))) / sqrt(N) (McDiarmid), with probability
    1 - delta.  Combined with Lemma 1 at delta/2 each (the caller passes delta/2).
    """
    _check_positive(N=N, B=B, L_x=L_x)
    _check_delta(delta)
    N = np.asarray(N, dtype=float)
    L = L_x / 2.0
    return np.minimum(2.0 * B * L * (1.0 + np.sqrt(2.0 * np.log(1.0 / delta))) / np.sqrt(N), B * L_x)


def elliptical_potential_bound(t, *, d: int, L_x: float, lam: float):
    """Lemma 4: sum_{s<=t} min(1, ||x_s||^2_{V_s^{-1}}) <= 2 d log(1 + t L_x^2 / (d lam))."""
    _check_positive(t=t, d=d, L_x=L_x, lam=lam)
    t = np.asarray(t, dtype=float)
    return 2.0 * d * np.log1p(t * L_x**2 / (d * lam))


def optimistic_regret_bound(T, *, d: int, B: float, L_x: float, delta: float):
    """Theorem 2 (optimistic student), with lam = L_x^2:

    R_T <= sqrt(8 zeta_T / gamma + 4 lam B^2) * [sqrt(2 d T log(1 + T / d)) + sqrt(2 T log(2 / delta))]

    where zeta_T is the anytime radius at delta/2; capped by the trivial T * 2 B L.
    """
    T = np.asarray(T, dtype=float)
    lam = L_x**2
    zeta = anytime_radius(T, d=d, B=B, L_x=L_x, delta=delta / 2.0)
    width = pair_width(zeta, B=B, L_x=L_x, lam=lam)
    potential = np.sqrt(T * elliptical_potential_bound(T, d=d, L_x=L_x, lam=lam))
    martingale = np.sqrt(2.0 * T * np.log(2.0 / delta))
    return np.minimum(width * (potential + martingale), T * B * L_x)


def pessimistic_regret_bound(T, *, B: float, L_x: float, delta: float):
    """Theorem 2 (pessimistic student against the teacher):

    R_T <= sum_{t<=T} 2 B L (1 + sqrt(2 log(2 t (t+1) / delta))) / sqrt(t),  L = L_x / 2,

    a union bound over rounds of the estimation error of v_hat_E from t teacher samples.
    """
    _check_positive(B=B, L_x=L_x, T=T)
    _check_delta(delta)
    scalar = np.ndim(T) == 0
    T = np.atleast_1d(np.asarray(T))
    if not np.all(T == np.round(T)):
        raise ValueError(f"T must be whole numbers of rounds, got {T!r}; this bound is a sum over rounds")
    T = T.astype(int)
    t = np.arange(1, int(T.max()) + 1, dtype=float)
    per_round = 2.0 * B * (L_x / 2.0) * (1.0 + np.sqrt(2.0 * np.log(2.0 * t * (t + 1.0) / delta))) / np.sqrt(t)
    cumulative = np.cumsum(np.minimum(per_round, B * L_x))
    return float(cumulative[T[0] - 1]) if scalar else cumulative[T - 1]


def local_slope(bound_fn, x: float, rel_step: float = 1e-4, **kwargs) -> float:
    """d log(bound) / d log(x) at x, by a central difference in log space.

    For bounds of a continuous argument; a sum over whole rounds
    (`pessimistic_regret_bound`) needs integer neighbours instead (theory.common.curve_slope).
    """
    _check_positive(x=x)
    lo, hi = x * (1.0 - rel_step), x * (1.0 + rel_step)
    return float((np.log(bound_fn(hi, **kwargs)) - np.log(bound_fn(lo, **kwargs))) / (np.log(hi) - np.log(lo)))


def offline_rate_slope(N: float, delta: float) -> float:
    """Local log-log slope of sqrt(log(N/delta)/N): -1/2 + 1/(2 log(N/delta)) (spec section 5)."""
    return -0.5 + 1.0 / (2.0 * np.log(N / delta))


def online_rate_slope(T: float, delta: float) -> float:
    """Local log-log slope of sqrt(T log T log(T/delta)): 1/2 + 1/(2 log T) + 1/(2 log(T/delta))."""
    return 0.5 + 1.0 / (2.0 * np.log(T)) + 1.0 / (2.0 * np.log(T / delta))

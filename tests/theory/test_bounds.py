"""Tests of the bound calculators `theory/bounds.py` (theory/STATEMENTS.md, spec tabular.md section 5).

- monotonicity of every right-hand side in the quantities it should grow or shrink with;
- local log-log slopes: the exact closed form of each bound's own slope, and agreement
  at large N/T with the rate slopes of spec section 5
  (`-1/2 + 1/(2 log(N/delta))` offline, `1/2 + 1/(2 log T) + 1/(2 log(T/delta))` online);
- Proposition 1: the calculator's bracketing number equals `pbkd_ref.bracketing`'s and
  bounds the size of the constructed net, and the Lemma 1 radius equals
  `pbkd_ref.confidence.radius("bracketing", ...)`.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from theory import bounds

dims = st.integers(min_value=1, max_value=8)
radii = st.floats(min_value=0.25, max_value=3.0)
lxs = st.floats(min_value=0.5, max_value=4.0)
deltas = st.floats(min_value=1e-4, max_value=0.5)


# ----------------------------------------------------------------------------- monotonicity


@given(d=dims, B=radii, L_x=lxs, delta=deltas)
def test_bracketing_radius_monotone(d, B, L_x, delta):
    N = np.geomspace(1, 1e7, 30)
    zeta = bounds.bracketing_radius(N, d=d, B=B, L_x=L_x, delta=delta)
    assert np.all(np.diff(zeta) > 0)
    assert bounds.bracketing_radius(100, d=d + 1, B=B, L_x=L_x, delta=delta) > bounds.bracketing_radius(
        100, d=d, B=B, L_x=L_x, delta=delta
    )
    assert bounds.bracketing_radius(100, d=d, B=B, L_x=L_x, delta=delta / 2) > bounds.bracketing_radius(
        100, d=d, B=B, L_x=L_x, delta=delta
    )
    assert bounds.bracketing_radius(100, d=d, B=2 * B, L_x=L_x, delta=delta) > bounds.bracketing_radius(
        100, d=d, B=B, L_x=L_x, delta=delta
    )


@given(d=dims, B=radii, L_x=lxs, delta=deltas, C=st.floats(min_value=1e-3, max_value=10.0))
def test_offline_bound_monotone(d, B, L_x, delta, C):
    N = np.geomspace(1, 1e9, 60)
    kw = dict(d=d, B=B, L_x=L_x, delta=delta)
    bound = bounds.offline_bound(N, concentrability=C, **kw)
    assert np.all(np.diff(bound) <= 1e-15)  # non-increasing in N
    assert np.all(bound <= B * L_x + 1e-15)  # never above the trivial cap
    assert bound[-1] < B * L_x  # and informative eventually
    assert np.all(bounds.offline_bound(N, concentrability=2 * C, **kw) >= bound)
    assert np.all(bounds.offline_bound(N, concentrability=C, d=d, B=B, L_x=L_x, delta=delta / 2) >= bound)


@given(B=radii, L_x=lxs, delta=deltas)
def test_teacher_estimation_bound_monotone(B, L_x, delta):
    N = np.geomspace(1, 1e9, 60)
    bound = bounds.teacher_estimation_bound(N, B=B, L_x=L_x, delta=delta)
    assert np.all(np.diff(bound) <= 1e-15)
    assert np.all(bounds.teacher_estimation_bound(N, B=B, L_x=L_x, delta=delta / 2) >= bound)


@given(d=dims, B=radii, L_x=lxs, delta=deltas)
def test_regret_bounds_monotone(d, B, L_x, delta):
    T = np.arange(1, 3001)
    opt = bounds.optimistic_regret_bound(T, d=d, B=B, L_x=L_x, delta=delta)
    pes = bounds.pessimistic_regret_bound(T, B=B, L_x=L_x, delta=delta)
    for R in (opt, pes):
        assert np.all(np.diff(R) > 0)  # cumulative regret bounds increase with T
        assert np.all(R <= T * B * L_x + 1e-9)  # never above the trivial T * 2 B L
    assert np.all(np.diff(np.diff(pes)) <= 1e-12)  # concave: per-round terms do not increase


@given(d=dims, L_x=lxs, lam=st.floats(min_value=0.1, max_value=10.0))
def test_elliptical_potential_bound_monotone(d, L_x, lam):
    t = np.arange(1, 2000, dtype=float)
    E = bounds.elliptical_potential_bound(t, d=d, L_x=L_x, lam=lam)
    assert np.all(np.diff(E) > 0) and np.all(np.diff(E, 2) < 0)


@given(B=radii, L_x=lxs)
def test_curvature_is_sigmoid_derivative(B, L_x):
    gamma = bounds.curvature(B, L_x)
    s = 1.0 / (1.0 + np.exp(-B * L_x))
    assert gamma == pytest.approx(s * (1 - s), rel=1e-12)
    assert 0 < gamma < 0.25
    assert bounds.curvature(2 * B, L_x) < gamma


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="delta"):
        bounds.bracketing_radius(10, d=2, B=1.0, L_x=2.0, delta=1.5)
    with pytest.raises(ValueError, match="N"):
        bounds.bracketing_radius(0, d=2, B=1.0, L_x=2.0, delta=0.1)
    with pytest.raises(ValueError, match="concentrability"):
        bounds.offline_bound(10, d=2, B=1.0, L_x=2.0, delta=0.1, concentrability=0.0)


# ----------------------------------------------------------------------------- local slopes


def _offline_slope_closed_form(N, *, d, B, L_x, delta, lam):
    """d log/d log N of sqrt((8 zeta_N / gamma + 4 lam B^2) C / N) (uncapped)."""
    gamma = bounds.curvature(B, L_x)
    zeta = bounds.bracketing_radius(N, d=d, B=B, L_x=L_x, delta=delta)
    q = 2 * B * L_x * N / (1 + 2 * B * L_x * N)  # d log(1 + 2 B L_x N) / d log N
    W = 8 * zeta / gamma + 4 * lam * B**2
    return -0.5 + 4 * d * q / (gamma * W)


def _optimistic_slope_closed_form(T, *, d, B, L_x, delta):
    """d log/d log T of Theorem 2.1's bound (uncapped), lam = L_x^2."""
    gamma = bounds.curvature(B, L_x)
    lam = L_x**2
    zeta = bounds.anytime_radius(T, d=d, B=B, L_x=L_x, delta=delta / 2)
    dzeta = d * 2 * B * L_x * T / (1 + 2 * B * L_x * T) + 1 + T / (T + 1)
    W = 8 * zeta / gamma + 4 * lam * B**2
    E = 2 * d * np.log1p(T / d)
    dE = 2 * T / (1 + T / d)  # T dE/dT
    potential, martingale = np.sqrt(T * E), np.sqrt(2 * T * np.log(2 / delta))
    return 4 * dzeta / (gamma * W) + (0.5 * potential * (1 + dE / E) + 0.5 * martingale) / (potential + martingale)


@settings(max_examples=15)
@given(d=dims, B=radii, L_x=lxs, delta=deltas, C=st.floats(min_value=1e-3, max_value=1.0))
def test_offline_local_slope_closed_form(d, B, L_x, delta, C):
    kw = dict(d=d, B=B, L_x=L_x, delta=delta)
    for N in (1e7, 1e9, 1e11):
        if bounds.offline_bound(N, concentrability=C, **kw) >= B * L_x:
            continue  # capped: slope 0, no closed form to compare
        numeric = bounds.local_slope(bounds.offline_bound, N, concentrability=C, **kw)
        assert numeric == pytest.approx(_offline_slope_closed_form(N, lam=1.0, **kw), abs=1e-6)


@pytest.mark.parametrize("d", [1, 4, 8])
def test_offline_local_slope_matches_spec_rate(d):
    """At large N the bound's slope approaches -1/2 + 1/(2 log(N/delta)) (spec section 5)."""
    kw = dict(d=d, B=1.0, L_x=2.0, delta=0.05, concentrability=1e-3)
    diffs = []
    for N in (1e4, 1e6, 1e8, 1e10):
        diffs.append(abs(bounds.local_slope(bounds.offline_bound, N, **kw) - bounds.offline_rate_slope(N, 0.05)))
    assert max(diffs) < 0.012
    assert np.all(np.diff(diffs) < 0)  # and the agreement improves with N
    assert -0.5 < bounds.offline_rate_slope(1e3, 0.05) < -0.42


@settings(max_examples=10)
@given(d=dims, B=radii, L_x=lxs, delta=deltas)
def test_optimistic_local_slope_closed_form(d, B, L_x, delta):
    kw = dict(d=d, B=B, L_x=L_x, delta=delta)
    for T in (1e8, 1e10):
        if bounds.optimistic_regret_bound(T * 1.001, **kw) >= T * 1.001 * B * L_x:
            continue  # capped at the trivial T B L_x: slope 1
        numeric = bounds.local_slope(bounds.optimistic_regret_bound, T, **kw)
        assert numeric == pytest.approx(float(_optimistic_slope_closed_form(T, **kw)), abs=1e-6)


@pytest.mark.parametrize("d", [1, 4, 8])
def test_optimistic_local_slope_matches_spec_rate(d):
    """At large T the slope approaches 1/2 + 1/(2 log T) + 1/(2 log(T/delta)) (spec section 5)."""
    kw = dict(d=d, B=1.0, L_x=2.0, delta=0.05)
    diffs = [
        abs(bounds.local_slope(bounds.optimistic_regret_bound, T, **kw) - bounds.online_rate_slope(T, 0.05))
        for T in (1e6, 1e8, 1e10)
    ]
    assert max(diffs) < 0.012
    assert np.all(np.diff(diffs) < 0)
    assert bounds.online_rate_slope(1000, 0.05) == pytest.approx(0.6229, abs=1e-3)  # "about 0.62"


def test_optimistic_bound_capped_where_vacuous():
    """Below T ~ 1e5 (d = 4, B L_x = 2) Theorem 2.1 exceeds the trivial T B L_x: the calculator returns the cap."""
    T = np.array([10, 100, 1000])
    R = bounds.optimistic_regret_bound(T, d=4, B=1.0, L_x=2.0, delta=0.05)
    np.testing.assert_allclose(R, T * 2.0)


def test_pessimistic_local_slope_closed_form():
    """Discrete slope of the cumulative bound equals T a_T / S_T to O(1/T), and tends to 1/2 from above."""
    kw = dict(B=1.0, L_x=2.0, delta=0.05)
    slopes = []
    for T in (1_000, 10_000, 100_000):
        S = bounds.pessimistic_regret_bound(np.array([T - 1, T, T + 1]), **kw)
        discrete = np.log(S[2] / S[0]) / np.log((T + 1) / (T - 1))
        a_T = S[1] - S[0]
        assert discrete == pytest.approx(T * a_T / S[1], abs=5.0 / T)
        slopes.append(discrete)
    assert np.all(np.diff(slopes) < 0) and 0.5 < slopes[-1] < 0.55


def test_teacher_estimation_bound_slope_is_minus_half():
    kw = dict(B=1.0, L_x=2.0, delta=0.025)
    for N in (1e2, 1e4, 1e6):
        assert bounds.local_slope(bounds.teacher_estimation_bound, N, **kw) == pytest.approx(-0.5, abs=1e-9)


# ----------------------------------------------------------------------------- Proposition 1


@settings(max_examples=10)
@given(d=st.integers(1, 3), B=st.floats(0.5, 2.0), L_x=st.floats(0.5, 2.0), eps=st.floats(0.3, 2.0))
def test_proposition_1_matches_bracketing_module(d, B, L_x, eps):
    from pbkd_ref import bracketing

    log_n = bounds.log_bracketing_number(eps, d=d, B=B, L_x=L_x)
    assert log_n == pytest.approx(bracketing.log_bracketing_number_bound(eps, d=d, B=B, L_x=L_x), rel=1e-12)
    net = bracketing.epsilon_net(B, d, eps / L_x, rng=np.random.default_rng(0))
    assert np.log(len(net)) <= log_n + 1e-12


@settings(max_examples=10)
@given(d=dims, B=radii, L_x=lxs, delta=deltas, N=st.integers(1, 10**6))
def test_lemma_1_radius_matches_confidence_module(d, B, L_x, delta, N):
    from pbkd_ref import confidence

    zeta = float(bounds.bracketing_radius(N, d=d, B=B, L_x=L_x, delta=delta))
    assert zeta == pytest.approx(confidence.radius("bracketing", N=N, d=d, B=B, L_x=L_x, delta=delta), rel=1e-12)
    # zeta_N = 1 + log N_[](1/N) + log(1/delta)
    assert zeta == pytest.approx(1 + bounds.log_bracketing_number(1.0 / N, d=d, B=B, L_x=L_x) + np.log(1 / delta))
    anytime = float(bounds.anytime_radius(N, d=d, B=B, L_x=L_x, delta=delta))
    assert anytime == pytest.approx(confidence.anytime_radius(N, d=d, B=B, L_x=L_x, delta=delta), rel=1e-12)

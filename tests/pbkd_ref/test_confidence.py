"""Lemma tests for pbkd_ref.confidence (spec tabular.md sections 2 and 6, property 7)."""

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq
from scipy.stats import chi2

from pbkd_ref.confidence import (
    RADII,
    Ball,
    EllipsoidSet,
    LikelihoodSet,
    Singleton,
    anytime_radius,
    confidence_set,
    radius,
)
from pbkd_ref.preferences import Preferences, aggregate, label_probability, nll


def bt_set(seed, M, d, B, zeta, scale=1.0, separable=False):
    """A likelihood set on Bradley-Terry data with ||x|| <= 2 scale."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(M, d))
    X *= 2.0 * scale * rng.uniform(0.2, 1.0, size=(M, 1)) / np.linalg.norm(X, axis=1, keepdims=True)
    theta_star = rng.normal(size=d)
    theta_star *= 0.8 * B / np.linalg.norm(theta_star)
    y = (X @ theta_star > 0) if separable else rng.random(M) < label_probability(X, theta_star)
    return LikelihoodSet(aggregate(X, y.astype(int)), B, zeta), rng


set_args = dict(
    seed=st.integers(0, 2**32 - 1),
    M=st.integers(1, 40),
    d=st.integers(1, 4),
    B=st.sampled_from([0.5, 1.0, 3.0]),
    zeta=st.sampled_from([1e-3, 0.5, 3.0, 30.0]),
    separable=st.booleans(),
)


def cvxpy_support(cset, v):
    import cvxpy as cp

    theta = cp.Variable(cset.d)
    problem = cp.Problem(cp.Maximize(v @ theta), cset.cvxpy_constraints(theta))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        problem.solve(solver="CLARABEL", tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    return problem.value, problem.status


def assert_certified(cset, v, result):
    scale = cset.B * np.linalg.norm(v)
    assert cset.contains(result.theta, tol=1e-9)
    assert result.lower == pytest.approx(result.theta @ v, abs=1e-12 * (1 + scale))
    assert result.lower <= result.upper
    assert result.gap <= 1e-10 * scale + 1e-15


@settings(max_examples=30)
@given(**set_args)
def test_confidence_set_monotone_in_zeta(seed, M, d, B, zeta, separable):
    """Property 7: zeta1 <= zeta2 gives C1 subset C2, so sigma_C1 <= sigma_C2."""
    small, rng = bt_set(seed, M, d, B, zeta, separable=separable)
    large = LikelihoodSet(small.prefs, B, 2.0 * zeta + 0.1, theta_hat=small.theta_hat)
    for _ in range(3):
        v = rng.normal(size=d)
        value_small, theta_small = small.support(v)
        value_large, _ = large.support(v)
        assert value_small <= value_large + 1e-9 * B * np.linalg.norm(v)
        assert large.contains(theta_small)


@settings(max_examples=30)
@given(**set_args, alpha=st.floats(0.01, 100.0))
def test_support_function_positively_homogeneous_and_subadditive(seed, M, d, B, zeta, separable, alpha):
    """Property 7: sigma(alpha v) = alpha sigma(v) for alpha > 0 and sigma(v1 + v2) <= sigma(v1) + sigma(v2)."""
    cset, rng = bt_set(seed, M, d, B, zeta, separable=separable)
    v1, v2 = rng.normal(size=(2, d))
    s1, s2 = cset.support(v1)[0], cset.support(v2)[0]
    tol = 1e-9 * B * (np.linalg.norm(v1) + np.linalg.norm(v2))
    assert cset.support(alpha * v1)[0] == pytest.approx(alpha * s1, abs=alpha * tol)
    assert cset.support(v1 + v2)[0] <= s1 + s2 + tol


@settings(max_examples=30)
@given(**set_args)
def test_support_function_at_least_theta_hat(seed, M, d, B, zeta, separable):
    """Property 7: sigma_C(v) >= theta_hat^T v (theta_hat is in C), with a certified maximiser."""
    cset, rng = bt_set(seed, M, d, B, zeta, separable=separable)
    v = rng.normal(size=d)
    result = cset.support_certified(v)
    assert result.value >= cset.theta_hat @ v - 1e-12
    assert result.value <= B * np.linalg.norm(v) * (1 + 1e-12)
    assert_certified(cset, v, result)


@settings(max_examples=30)
@given(**set_args)
def test_likelihood_set_inside_ellipsoid(seed, M, d, B, zeta, separable):
    """Property 7 (Zhu-Jordan-Jiao): C(D) subset {||theta - theta_hat||^2_{X^T X} <= 2 zeta / gamma}."""
    cset, rng = bt_set(seed, M, d, B, zeta, separable=separable)
    center, Mmat, radius2 = cset.ellipsoid()
    points = [cset.support(v)[1] for v in rng.normal(size=(4, d))]
    cloud = rng.normal(size=(400, d))
    cloud *= B * rng.random((400, 1)) ** (1 / d) / np.linalg.norm(cloud, axis=1, keepdims=True)
    points += [theta for theta in cloud if cset.contains(theta, tol=0.0)]
    for theta in points:
        delta = theta - center
        assert delta @ Mmat @ delta <= radius2 * (1 + 1e-7) + 1e-9


@settings(max_examples=12)
@given(
    seed=st.integers(0, 2**32 - 1),
    M=st.integers(3, 30),
    d=st.integers(1, 3),
    B=st.sampled_from([0.5, 2.0]),
    zeta=st.sampled_from([0.05, 1.0, 5.0]),
)
def test_support_function_agrees_with_cvxpy(seed, M, d, B, zeta):
    """sigma_C(v) from the Newton solver equals the cvxpy (exponential cone) optimum to 1e-6."""
    cset, rng = bt_set(seed, M, d, B, zeta)
    v = rng.normal(size=d)
    value, theta = cset.support(v)
    reference, status = cvxpy_support(cset, v)
    assert status == "optimal"
    assert value == pytest.approx(reference, abs=1e-6 * max(1.0, B * np.linalg.norm(v)))


@settings(max_examples=40, deadline=None)
@given(**set_args, lam=st.sampled_from([1e-3, 1.0]))
def test_ellipsoid_set_contains_the_likelihood_set_and_its_support_agrees_with_cvxpy(seed, M, d, B, zeta,
                                                                                       separable, lam):
    """The Zhu-Jordan-Jiao set built from C(D) (Lemma 2 plus the ridge) holds every point of C(D), so
    its support function lies above C's; sigma_E(v) is certified (feasible theta, dual bound within
    1e-10 B ||v||) and equals the conic optimum of its cvxpy constraints. A radius 20 times too
    small, or an ellipsoid centred at 0 instead of theta_hat, loses points of C here (dropping the
    ridge's 4 lam B^2 alone is not caught: Lemma 2's gamma is loose enough to absorb it)."""
    cset, rng = bt_set(seed, M, d, B, zeta, separable=separable)
    E = EllipsoidSet.from_likelihood(cset, lam)
    cloud = rng.normal(size=(400, d))
    cloud *= B * rng.random((400, 1)) ** (1 / d) / np.linalg.norm(cloud, axis=1, keepdims=True)
    inside = [theta for theta in cloud if cset.contains(theta, tol=0.0)]
    for v in rng.normal(size=(3, d)):
        result = E.support_certified(v)
        assert_certified(E, v, result)
        assert result.value >= cset.support(v)[0] - 1e-9 * (1 + B * np.linalg.norm(v))
        reference, status = cvxpy_support(E, v)
        assert status in ("optimal", "optimal_inaccurate")  # M = G + lam I can be ill-conditioned: the value decides
        assert result.value == pytest.approx(reference, abs=1e-6 * max(1.0, B * np.linalg.norm(v)))
        inside.append(cset.support(v)[1])
    assert all(E.contains(theta) for theta in inside)


def test_ellipsoid_set_refuses_a_singular_matrix_and_a_centre_outside_the_ball():
    with pytest.raises(ValueError, match="positive definite"):
        EllipsoidSet(np.zeros(2), np.diag([1.0, 0.0]), 1.0, 1.0)
    with pytest.raises(ValueError, match="ball"):
        EllipsoidSet(np.array([2.0, 0.0]), np.eye(2), 1.0, 1.0)


def test_support_function_one_dimensional_brute_force():
    """d = 1: C is an interval whose ends solve NLL(theta) = level; sigma(v) = max(v a, v b)."""
    rng = np.random.default_rng(5)
    for B, zeta in ((1.0, 0.3), (2.0, 4.0), (0.5, 50.0)):
        X = rng.normal(size=(30, 1))
        y = (rng.random(30) < label_probability(X, np.array([0.7]))).astype(int)
        cset = LikelihoodSet(aggregate(X, y), B, zeta)
        t_hat = cset.theta_hat[0]
        excess = lambda t: nll(cset.prefs, np.array([t])) - cset.level  # noqa: E731
        a = -B if excess(-B) <= 0 else brentq(excess, -B, t_hat, xtol=1e-14)
        b = B if excess(B) <= 0 else brentq(excess, t_hat, B, xtol=1e-14)
        for v in (1.3, -0.4):
            assert cset.support(np.array([v]))[0] == pytest.approx(max(v * a, v * b), abs=1e-10)


def test_support_edge_cases():
    rng = np.random.default_rng(0)
    # v = 0.
    cset, _ = bt_set(1, 20, 3, 1.0, 2.0)
    value, theta = cset.support(np.zeros(3))
    assert value == 0.0 and cset.contains(theta)
    # zeta = 0 with a unique MLE: C = {theta_hat}.
    point, _ = bt_set(2, 40, 2, 1.0, 0.0)
    v = rng.normal(size=2)
    assert point.support(v)[0] == pytest.approx(point.theta_hat @ v, abs=1e-14)
    # zeta = 0, rank-deficient X (only the first coordinate observed): C = {theta_1 = theta_hat_1, ||theta|| <= B}.
    X = np.column_stack([rng.normal(size=30), np.zeros(30)])
    y = (rng.random(30) < label_probability(X, np.array([0.5, 0.0]))).astype(int)
    slice_set = LikelihoodSet(aggregate(X, y), 1.0, 0.0)
    t1 = slice_set.theta_hat[0]
    for v in (np.array([0.3, 2.0]), np.array([-1.0, -0.5])):
        expected = v[0] * t1 + abs(v[1]) * np.sqrt(1.0 - t1**2)
        value, theta = slice_set.support(v)
        assert value == pytest.approx(expected, abs=1e-12)
        assert theta @ v == pytest.approx(expected, abs=1e-12)
    # All-zero X: the likelihood is flat, so C is the whole ball for any zeta.
    flat = LikelihoodSet(aggregate(np.zeros((10, 3)), np.arange(10) % 2), 2.0, 1.0)
    v = rng.normal(size=3)
    result = flat.support_certified(v)
    assert result.value == pytest.approx(2.0 * np.linalg.norm(v), rel=1e-10)
    assert_certified(flat, v, result)
    # theta_hat on the sphere (separable data), small radius.
    edge, _ = bt_set(3, 30, 3, 1.0, 0.01, separable=True)
    assert np.linalg.norm(edge.theta_hat) == pytest.approx(1.0, rel=1e-12)
    for v in rng.normal(size=(5, 3)):
        assert_certified(edge, v, edge.support_certified(v))
    # A warm start (the maximiser for a nearby direction) reaches the cold-start value.
    v1 = rng.normal(size=3)
    v2 = v1 + 1e-3 * rng.normal(size=3)
    warm = cset.support_certified(v2, warm=cset.support_certified(v1).theta)
    cold = cset.support_certified(v2)
    assert warm.value == pytest.approx(cold.value, abs=2e-10 * np.linalg.norm(v2) * cset.B)
    assert_certified(cset, v2, warm)


def test_support_speed_on_many_distinct_pairs():
    """The hot path: 20 support calls on 20,000 distinct pairs (d = 8) take a few passes each."""
    rng = np.random.default_rng(0)
    N, d = 20_000, 8
    X = rng.normal(size=(N, d))
    X *= 2.0 * rng.uniform(size=(N, 1)) / np.linalg.norm(X, axis=1, keepdims=True)
    y = (rng.random(N) < label_probability(X, 0.5 * rng.normal(size=d))).astype(int)
    cset = confidence_set(aggregate(X, y), 1.0, kind="bracketing", delta=0.05)
    passes = [cset.support_certified(v).passes for v in rng.normal(size=(20, d))]
    assert max(passes) <= 8


def test_radius_formulas():
    assert RADII == ("bracketing", "chi2", "fixed")
    N, d, B, L_x, delta = 1000, 3, 2.0, 1.5, 0.05
    assert radius("bracketing", N=N, d=d, B=B, L_x=L_x, delta=delta) == pytest.approx(
        1 + d * np.log(1 + 2 * B * L_x * N) + np.log(1 / delta), rel=1e-14
    )
    assert radius("chi2", N=N, d=d, B=B, L_x=L_x, delta=delta) == pytest.approx(chi2.ppf(0.95, 3) / 2, rel=1e-14)
    assert radius("fixed", N=N, d=d, B=B, L_x=L_x, delta=delta, value=0.7) == 0.7
    t = 50
    assert anytime_radius(t, d=d, B=B, L_x=L_x, delta=delta) == pytest.approx(
        1 + d * np.log(1 + 2 * B * L_x * t) + np.log(t * (t + 1) / delta), rel=1e-14
    )
    prefs = aggregate(np.array([[1.0, 0.0], [0.0, -2.0], [1.0, 0.0]]), np.array([1, 0, 0]))
    cset = confidence_set(prefs, 1.0, kind="bracketing", delta=0.1)
    assert cset.zeta == pytest.approx(radius("bracketing", N=3, d=2, B=1.0, L_x=2.0, delta=0.1))
    assert cset.level == pytest.approx(nll(prefs, cset.theta_hat) + cset.zeta)


def test_bracketing_radius_covers_theta_star():
    """The bracketing radius is conservative: theta* in C(D) on every one of 20 seeded data sets."""
    d, B, N = 3, 1.0, 300
    for seed in range(20):
        rng = np.random.default_rng(seed)
        theta_star = rng.normal(size=d)
        theta_star *= 0.9 * B / np.linalg.norm(theta_star)
        X = rng.normal(size=(N, d)) / np.sqrt(d)
        y = (rng.random(N) < label_probability(X, theta_star)).astype(int)
        assert confidence_set(aggregate(X, y), B, kind="bracketing", delta=0.05).contains(theta_star)


def test_ball_and_singleton_sets():
    import cvxpy as cp

    ball = Ball(2.0, 3)
    v = np.array([3.0, 0.0, 4.0])
    value, theta = ball.support(v)
    assert value == pytest.approx(10.0) and np.allclose(theta, [1.2, 0.0, 1.6])
    assert ball.contains(theta) and not ball.contains(1.01 * theta)
    assert ball.support(np.zeros(3))[0] == 0.0
    single = Singleton(np.array([0.5, -1.0, 0.0]))
    assert single.support(v) == (pytest.approx(1.5), pytest.approx(single.theta))
    assert single.contains(single.theta) and not single.contains(single.theta + 1e-3)
    for cset in (ball, single):
        variable = cp.Variable(3)
        problem = cp.Problem(cp.Maximize(v @ variable), cset.cvxpy_constraints(variable))
        problem.solve(solver="CLARABEL")
        assert problem.value == pytest.approx(cset.support(v)[0], abs=1e-6)


def test_confidence_validation_messages():
    prefs = aggregate(np.eye(2), np.array([1, 0]))
    with pytest.raises(ValueError, match="kind must be one of"):
        radius("wilks", N=10, d=2, B=1.0, L_x=1.0, delta=0.1)
    with pytest.raises(ValueError, match="value is only used with kind='fixed'"):
        radius("chi2", N=10, d=2, B=1.0, L_x=1.0, delta=0.1, value=3.0)
    with pytest.raises(ValueError, match="kind='fixed' needs value"):
        radius("fixed", N=10, d=2, B=1.0, L_x=1.0, delta=0.1)
    with pytest.raises(ValueError, match=r"delta must lie in \(0, 1\)"):
        radius("bracketing", N=10, d=2, B=1.0, L_x=1.0, delta=1.0)
    with pytest.raises(ValueError, match="t must lie in"):
        anytime_radius(0, d=2, B=1.0, L_x=1.0, delta=0.1)
    with pytest.raises(ValueError, match="zeta must lie in"):
        LikelihoodSet(prefs, 1.0, -1.0)
    with pytest.raises(ValueError, match="theta_hat must lie in the ball"):
        LikelihoodSet(prefs, 1.0, 1.0, theta_hat=np.array([2.0, 0.0]))
    cset = LikelihoodSet(prefs, 1.0, 1.0)
    with pytest.raises(ValueError, match="v must have shape"):
        cset.support(np.ones(3))
    with pytest.raises(ValueError, match="rtol must lie in"):
        cset.support_certified(np.ones(2), rtol=0.0)
    with pytest.raises(ValueError, match="B must be a finite number > 0"):
        Ball(-1.0, 2)
    with pytest.raises(ValueError, match="prefs must be a pbkd_ref.preferences.Preferences"):
        LikelihoodSet(np.eye(2), 1.0, 1.0)
    assert isinstance(cset.prefs, Preferences)

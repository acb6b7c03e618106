"""Lemma tests for pbkd_ref.mle (spec tabular.md section 6, property 6)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pbkd_ref.confidence import LikelihoodSet
from pbkd_ref.mle import ball_quadratic_min, fit_mle, fit_mle_cvxpy
from pbkd_ref.preferences import Preferences, aggregate, label_probability, nll, nll_grad


def bt_data(seed, M, d, scale, separable=False):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(M, d)) * scale / np.sqrt(d)
    theta_star = rng.normal(size=d)
    y = (X @ theta_star > 0) if separable else rng.random(M) < label_probability(X, theta_star)
    return aggregate(X, y.astype(int)), rng


mle_args = dict(
    seed=st.integers(0, 2**32 - 1),
    M=st.integers(1, 40),
    d=st.integers(1, 4),
    scale=st.sampled_from([0.3, 1.0, 4.0]),
    B=st.sampled_from([0.5, 1.0, 3.0]),
    separable=st.booleans(),
)


def project(theta, B):
    norm = np.linalg.norm(theta)
    return theta if norm <= B else theta * (B / norm)


@settings(max_examples=25)
@given(**mle_args)
def test_mle_projected_gradient_optimality(seed, M, d, scale, B, separable):
    """Property 6: theta_hat = Proj_ball(theta_hat - eta grad) (first-order optimality over the ball)."""
    prefs, _ = bt_data(seed, M, d, scale, separable)
    fit = fit_mle(prefs, B)
    assert fit.converged
    theta = fit.theta_hat
    assert np.linalg.norm(theta) <= B * (1 + 1e-12)
    g = nll_grad(prefs, theta)
    eta = 1.0 / max(1.0, prefs.N * prefs.L_x**2)
    residual = np.linalg.norm(theta - project(theta - eta * g, B))
    assert residual <= 1e-8 * eta * max(1.0, prefs.N)
    # Certified Frank-Wolfe gap g^T theta + B ||g|| bounds the suboptimality.
    assert fit.optimality_gap == pytest.approx(g @ theta + B * np.linalg.norm(g), abs=1e-12)
    assert fit.optimality_gap <= 1e-8 * max(1.0, fit.nll)
    assert fit.nll == pytest.approx(nll(prefs, theta), rel=1e-14)


@settings(max_examples=25)
@given(**mle_args, zeta=st.sampled_from([0.0, 1e-9, 0.1, 5.0]))
def test_mle_in_confidence_set_for_all_zeta(seed, M, d, scale, B, separable, zeta):
    """Property 6: theta_hat is in C(D) for every zeta >= 0 and no point of the ball has a smaller NLL."""
    prefs, rng = bt_data(seed, M, d, scale, separable)
    cset = LikelihoodSet(prefs, B, zeta)
    assert cset.contains(cset.theta_hat, tol=0.0)
    for _ in range(20):
        theta = rng.normal(size=d)
        theta *= B * rng.random() ** (1 / d) / np.linalg.norm(theta)
        assert nll(prefs, theta) >= cset.nll_hat - 1e-10 * max(1.0, cset.nll_hat)


@settings(max_examples=8)
@given(
    seed=st.integers(0, 2**32 - 1),
    M=st.integers(8, 40),
    d=st.integers(1, 3),
    scale=st.sampled_from([0.3, 1.0, 3.0]),
    B=st.sampled_from([0.5, 2.0]),
)
def test_fit_mle_agrees_with_cvxpy(seed, M, d, scale, B):
    """fit_mle and the cp.logistic formulation agree to 1e-6 (full-rank data, unique MLE)."""
    prefs, _ = bt_data(seed, M, d, scale)
    fit = fit_mle(prefs, B)
    reference = fit_mle_cvxpy(prefs, B)
    assert reference.converged, reference.solver
    np.testing.assert_allclose(fit.theta_hat, reference.theta_hat, atol=1e-6)
    assert fit.nll <= reference.nll + 1e-9 * max(1.0, reference.nll)


def test_fit_mle_rank_deficient_returns_minimum_norm():
    """X spans one direction: the MLE is unique only along it; fit_mle returns the row-space solution."""
    rng = np.random.default_rng(2)
    direction = np.array([1.0, 2.0, -1.0]) / np.sqrt(6.0)
    X = rng.normal(size=(50, 1)) * direction
    y = (rng.random(50) < label_probability(X, 1.5 * direction)).astype(int)
    prefs = aggregate(X, y)
    fit = fit_mle(prefs, 5.0)
    theta = fit.theta_hat
    assert np.linalg.norm(theta - (theta @ direction) * direction) <= 1e-12
    # Along the direction it is the one-dimensional MLE.
    one_d = fit_mle(Preferences(X=prefs.X @ direction[:, None], n1=prefs.n1, n0=prefs.n0), 5.0)
    assert theta @ direction == pytest.approx(one_d.theta_hat[0], abs=1e-10)


def test_fit_mle_edge_cases():
    # All-zero differences: the likelihood is flat and the minimum-norm MLE is 0.
    prefs = aggregate(np.zeros((10, 3)), np.arange(10) % 2)
    fit = fit_mle(prefs, 1.0)
    assert fit.converged and np.all(fit.theta_hat == 0.0) and fit.nll == pytest.approx(10 * np.log(2))
    # Separable data: the MLE sits on the sphere, pointing at the separator.
    X = np.array([[1.0, 0.0], [2.0, 0.5], [-1.0, 0.2]])
    prefs = aggregate(X, np.array([1, 1, 0]))
    fit = fit_mle(prefs, 2.0)
    assert fit.converged and np.linalg.norm(fit.theta_hat) == pytest.approx(2.0, rel=1e-12)
    g = nll_grad(prefs, fit.theta_hat)
    cosine = -(g @ fit.theta_hat) / (np.linalg.norm(g) * 2.0)
    assert cosine == pytest.approx(1.0, abs=1e-10)  # KKT on the sphere: -grad parallel to theta_hat


def test_ball_quadratic_min_against_brute_force():
    """The exact ball-constrained model minimiser against a dense search in two dimensions."""
    rng = np.random.default_rng(0)
    angles = np.linspace(0, 2 * np.pi, 4001)
    radii = np.linspace(0, 1, 801)
    grid = (radii[:, None, None] * np.stack([np.cos(angles), np.sin(angles)], axis=-1)[None]).reshape(-1, 2)
    for _ in range(5):
        A = rng.normal(size=(2, 2))
        H = A @ A.T * rng.choice([0.0, 1.0])  # includes H = 0
        b = rng.normal(size=2) * 3
        u = ball_quadratic_min(H, b, 1.0)
        q = lambda t: 0.5 * np.einsum("ni,ij,nj->n", t, H, t) - t @ b  # noqa: E731
        assert np.linalg.norm(u) <= 1 + 1e-12
        assert q(u[None])[0] <= q(grid).min() + 1e-12


def test_mle_validation_messages():
    prefs = aggregate(np.ones((2, 1)), np.array([1, 0]))
    with pytest.raises(ValueError, match="B must be a finite number > 0"):
        fit_mle(prefs, 0.0)
    with pytest.raises(ValueError, match="tol must be a positive number"):
        fit_mle(prefs, 1.0, tol=-1.0)
    with pytest.raises(ValueError, match="max_iter must be a positive integer"):
        fit_mle(prefs, 1.0, max_iter=0)
    with pytest.raises(ValueError, match="prefs must be a pbkd_ref.preferences.Preferences"):
        fit_mle(np.ones((2, 1)), 1.0)

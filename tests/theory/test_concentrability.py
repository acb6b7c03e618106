"""Concentrability coefficients (theory/STATEMENTS.md, Definition 1)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pbkd_ref.mdp import feature_expectation, random_mdp, rewards, softmax_policy, token_tree_mdp
from pbkd_ref.preferences import aggregate, sample_preferences
from theory.concentrability import (
    design_coefficient,
    design_matrix,
    largest_generalized_eigenvalue,
    offline_coefficients,
    online_coefficient,
    pair_second_moment,
    population_coefficient,
    sample_coefficient,
    trajectory_feature_moments,
)


def _random_policy(rng, H, S, A):
    return rng.dirichlet(np.ones(A), size=(H, S))


def _enumerated_moments(mdp, pi):
    """E[phi(tau)] and E[phi(tau) phi(tau)^T] by summing over every trajectory (brute force)."""
    v = np.zeros(mdp.d)
    M = np.zeros((mdp.d, mdp.d))
    for states in itertools.product(range(mdp.S), repeat=mdp.H):
        for actions in itertools.product(range(mdp.A), repeat=mdp.H):
            p = mdp.rho[states[0]]
            for h in range(mdp.H):
                p *= pi[h, states[h], actions[h]]
                if h < mdp.H - 1:
                    p *= mdp.P[h, states[h], actions[h], states[h + 1]]
            if p == 0.0:
                continue
            f = sum(mdp.phi[h, states[h], actions[h]] for h in range(mdp.H))
            v += p * f
            M += p * np.outer(f, f)
    return v, M


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40), d=st.integers(1, 5),
       lam=st.floats(1e-3, 10.0))
@settings(max_examples=25)
def test_design_coefficient_generalized_eigenvalue_equals_closed_form(seed, n, d, lam):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    u = rng.normal(size=d)
    Sigma, N = design_matrix(X)
    eig = design_coefficient(u, Sigma, N, lam=lam)
    closed = design_coefficient(u, Sigma, N, lam=lam, method="closed_form")
    explicit = N * u @ np.linalg.inv(X.T @ X + lam * np.eye(d)) @ u
    assert eig == pytest.approx(closed, rel=1e-8, abs=1e-12)
    assert closed == pytest.approx(explicit, rel=1e-8, abs=1e-12)
    # Definition 1 is a supremum of a Rayleigh quotient: random w never exceed it, Sigmabar^{-1} u attains it
    Sigmabar = (Sigma + lam * np.eye(d)) / N
    W = rng.normal(size=(200, d))
    quotients = (W @ u) ** 2 / np.einsum("kd,de,ke->k", W, Sigmabar, W)
    assert quotients.max() <= eig * (1 + 1e-9)
    w_star = np.linalg.solve(Sigmabar, u)
    assert (w_star @ u) ** 2 / (w_star @ Sigmabar @ w_star) == pytest.approx(eig, rel=1e-8)


def test_design_matrix_counts_aggregated_rows():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(5, 3))
    X = np.vstack([X, X[:2], X[:1]])  # duplicates
    y = rng.integers(0, 2, size=len(X))
    Sigma_raw, N_raw = design_matrix(X)
    Sigma_agg, N_agg = design_matrix(aggregate(X, y))
    assert N_raw == N_agg == 8
    np.testing.assert_allclose(Sigma_agg, Sigma_raw, atol=1e-12)
    u = rng.normal(size=3)
    assert sample_coefficient(u, aggregate(X, y), lam=0.5) == pytest.approx(sample_coefficient(u, X, lam=0.5), rel=1e-10)


@given(seed=st.integers(0, 2**32 - 1), S=st.integers(1, 3), A=st.integers(1, 2), H=st.integers(1, 3),
       d=st.integers(1, 3), dirichlet=st.sampled_from([0.1, 1.0]))
@settings(max_examples=15)
def test_exact_second_moment_equals_trajectory_enumeration(seed, S, A, H, d, dirichlet):
    rng = np.random.default_rng(seed)
    mdp = random_mdp(S, A, H, d, rng, dirichlet=dirichlet)
    pi_E, pi_ref = _random_policy(rng, H, S, A), _random_policy(rng, H, S, A)
    v, M = trajectory_feature_moments(mdp, pi_ref)
    v_bf, M_bf = _enumerated_moments(mdp, pi_ref)
    np.testing.assert_allclose(v, v_bf, atol=1e-12)
    np.testing.assert_allclose(M, M_bf, atol=1e-12)
    np.testing.assert_allclose(v, feature_expectation(mdp, pi_ref), atol=1e-12)
    # E[x x^T] of independent tau0 ~ pi_E, tau1 ~ pi_ref
    v_E, M_E = _enumerated_moments(mdp, pi_E)
    expected = M_bf + M_E - np.outer(v_bf, v_E) - np.outer(v_E, v_bf)
    np.testing.assert_allclose(pair_second_moment(mdp, pi_E, pi_ref), expected, atol=1e-12)


def test_exact_second_moment_matches_monte_carlo():
    """Exact E[x x^T] against the mean of N = 40,000 sampled pairs (fixed seed).

    Tolerance: 5 standard errors per entry (empirical standard deviation / sqrt(N));
    with 16 entries the chance of a false failure under the normal approximation is
    below 1e-5.  The omitted cross term (v_ref v_E^T + v_E v_ref^T) would move the
    answer by far more than the tolerance, so the comparison is sensitive.
    """
    rng = np.random.default_rng(20240611)
    mdp = random_mdp(4, 3, 4, 4, rng)
    theta = rng.normal(size=4)
    pi_E = softmax_policy(mdp, rewards(mdp, theta), 0.05)
    pi_ref = softmax_policy(mdp, rewards(mdp, -theta), 0.05)
    N = 40_000
    X = sample_preferences(mdp, pi_E, pi_ref, theta, N, rng).X
    outer = np.einsum("nk,nl->nkl", X, X)
    mean, stderr = outer.mean(axis=0), outer.std(axis=0, ddof=1) / np.sqrt(N)
    exact = pair_second_moment(mdp, pi_E, pi_ref)
    tolerance = 5.0 * stderr + 1e-12
    assert np.all(np.abs(mean - exact) <= tolerance)
    v_E, v_ref = feature_expectation(mdp, pi_E), feature_expectation(mdp, pi_ref)
    without_cross = exact + np.outer(v_ref, v_E) + np.outer(v_E, v_ref)
    assert np.any(np.abs(mean - without_cross) > 10 * tolerance)


def test_population_coefficient_infinite_when_pairs_never_differ():
    """Token tree, pi_E = pi_ref deterministic: x = 0 always, so no direction is covered."""
    rng = np.random.default_rng(0)
    mdp = token_tree_mdp(2, 3, 3, rng)
    pi = np.zeros((mdp.H, mdp.S, mdp.A))
    pi[..., 0] = 1.0
    u = np.array([1.0, 0.0, 0.0])
    assert population_coefficient(mdp, pi, pi, u) == np.inf
    assert population_coefficient(mdp, pi, pi, np.zeros(3)) == 0.0
    # with the ridge lam / N the coefficient is finite: ||u||^2 N / lam
    assert population_coefficient(mdp, pi, pi, u, lam=2.0, N=50) == pytest.approx(25.0)


def test_largest_generalized_eigenvalue_semidefinite_limit():
    """On a singular design, u in the range gives u^T S^+ u (the ridge -> 0 limit); u outside gives inf."""
    rng = np.random.default_rng(1)
    Z = rng.normal(size=(4, 2))
    S = Z @ Z.T  # rank 2 in R^4
    u_in = Z @ rng.normal(size=2)
    expected = u_in @ np.linalg.pinv(S) @ u_in
    assert largest_generalized_eigenvalue(np.outer(u_in, u_in), S) == pytest.approx(expected, rel=1e-8)
    ridge = largest_generalized_eigenvalue(np.outer(u_in, u_in), S + 1e-9 * np.eye(4))
    assert ridge == pytest.approx(expected, rel=1e-6)
    null = np.linalg.svd(Z.T)[2][-1]
    assert largest_generalized_eigenvalue(np.outer(null, null), S) == np.inf


@given(seed=st.integers(0, 2**32 - 1), T=st.integers(1, 30), d=st.integers(1, 4), lam=st.floats(0.01, 5.0))
@settings(max_examples=20)
def test_online_coefficient_is_a_generalized_eigenvalue(seed, T, d, lam):
    rng = np.random.default_rng(seed)
    mu, X = rng.normal(size=(T, d)), rng.normal(size=(T, d))
    V_T = lam * np.eye(d) + X[:-1].T @ X[:-1]
    whitening = np.linalg.inv(np.linalg.cholesky(V_T))
    expected = np.linalg.eigvalsh(whitening @ (mu.T @ mu) @ whitening.T)[-1]
    assert online_coefficient(mu, X, lam=lam) == pytest.approx(expected, rel=1e-8, abs=1e-12)


def test_offline_coefficients_report():
    rng = np.random.default_rng(5)
    mdp = random_mdp(3, 2, 3, 3, rng)
    theta = rng.normal(size=3)
    pi_E = softmax_policy(mdp, rewards(mdp, theta), 0.5)
    pi_ref = _random_policy(rng, 3, 3, 2)
    data = aggregate(*(lambda s: (s.X, s.y))(sample_preferences(mdp, pi_E, pi_ref, theta, 500, rng)))
    report = offline_coefficients(mdp, pi_E, pi_ref, theta, data, lam=1.0)
    assert set(report) == {"C_N(v*-v_E)", "C_pop(v*-v_E)", "C_N(max_k e_k)", "C_pop(max_k e_k)"}
    assert all(np.isfinite(value) and value >= 0 for value in report.values())
    # sample and population designs of 500 pairs agree to within a factor (law of large numbers)
    assert 0.5 < report["C_N(max_k e_k)"] / report["C_pop(max_k e_k)"] < 2.0


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError, match="lam"):
        design_coefficient(np.ones(2), np.eye(2), 10, lam=0.0)
    with pytest.raises(ValueError, match="symmetric"):
        design_coefficient(np.ones(2), np.array([[1.0, 2.0], [0.0, 1.0]]), 10)
    with pytest.raises(ValueError, match="u must"):
        design_coefficient(np.ones(3), np.eye(2), 10)
    with pytest.raises(ValueError, match="method"):
        design_coefficient(np.ones(2), np.eye(2), 10, method="svd")
    with pytest.raises(ValueError, match="shape"):
        online_coefficient(np.ones((3, 2)), np.ones((4, 2)), lam=1.0)
    with pytest.raises(ValueError, match="needs N"):
        population_coefficient(random_mdp(2, 2, 2, 2, np.random.default_rng(0)), np.full((2, 2, 2), 0.5),
                               np.full((2, 2, 2), 0.5), np.ones(2), lam=1.0)

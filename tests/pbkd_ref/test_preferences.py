"""Lemma tests for pbkd_ref.preferences (spec tabular.md section 6, properties 4 and 5)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import expit

from pbkd_ref.mdp import feature_expectation, random_mdp, sample_trajectories, softmax_policy, rewards, trajectory_features
from pbkd_ref.preferences import (
    PairSample,
    Preferences,
    aggregate,
    kappa_tv,
    label_probability,
    nll,
    nll_derivatives,
    nll_grad,
    nll_hessian,
    sample_preferences,
)


def random_prefs(seed, M, d, scale=1.0, max_count=3):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(M, d)) * scale
    n1 = rng.integers(0, max_count + 1, size=M).astype(float)
    n0 = rng.integers(0, max_count + 1, size=M).astype(float)
    return Preferences(X=X, n1=n1, n0=n0), rng


def brute_force_nll(X, y, theta):
    """sum_n softplus(-s_n x_n^T theta), s_n = 2 o_n - 1, one pair at a time with math.log1p."""
    total = 0.0
    for x, o in zip(X, y):
        margin = (2 * o - 1) * float(x @ theta)
        total += max(-margin, 0.0) + math.log1p(math.exp(-abs(margin)))
    return total


prefs_args = dict(seed=st.integers(0, 2**32 - 1), M=st.integers(1, 30), d=st.integers(1, 4))


@settings(max_examples=20)
@given(**prefs_args)
def test_aggregate_preserves_likelihood(seed, M, d):
    """Aggregating identical pairs into counts changes neither N nor the likelihood (brute force per pair)."""
    rng = np.random.default_rng(seed)
    distinct = np.round(rng.normal(size=(M, d)), 1)
    X = distinct[rng.integers(0, M, size=3 * M)]
    y = rng.integers(0, 2, size=3 * M)
    prefs = aggregate(X, y)
    assert prefs.N == 3 * M
    assert prefs.M == len(np.unique(X, axis=0))
    theta = rng.normal(size=d)
    assert nll(prefs, theta) == pytest.approx(brute_force_nll(X, y, theta), rel=1e-12)
    for row, c1, c0 in zip(prefs.X, prefs.n1, prefs.n0):
        same = np.all(X == row, axis=1)
        assert (c1, c0) == (np.sum(y[same] == 1), np.sum(y[same] == 0))


@settings(max_examples=20)
@given(**prefs_args, scale=st.sampled_from([0.1, 1.0, 5.0]))
def test_bt_likelihood_convex_midpoint(seed, M, d, scale):
    """Property 5: NLL((a + b)/2) <= (NLL(a) + NLL(b)) / 2."""
    prefs, rng = random_prefs(seed, M, d, scale)
    a, b = rng.normal(size=(2, d)) * 2
    mid = nll(prefs, 0.5 * (a + b))
    assert mid <= 0.5 * (nll(prefs, a) + nll(prefs, b)) + 1e-12 * (1 + abs(mid))


@settings(max_examples=20)
@given(**prefs_args)
def test_bt_gradient_matches_finite_differences(seed, M, d):
    """Property 5: the analytic gradient and Hessian equal central finite differences."""
    prefs, rng = random_prefs(seed, M, d)
    theta = rng.normal(size=d)
    value, grad, hess = nll_derivatives(prefs, theta)
    assert value == pytest.approx(nll(prefs, theta), rel=1e-14)
    np.testing.assert_allclose(grad, nll_grad(prefs, theta), rtol=1e-14)
    np.testing.assert_allclose(hess, nll_hessian(prefs, theta), rtol=1e-14)
    h = 1e-6
    fd_grad = np.array([(nll(prefs, theta + h * e) - nll(prefs, theta - h * e)) / (2 * h) for e in np.eye(d)])
    np.testing.assert_allclose(grad, fd_grad, atol=1e-6 * (1 + np.abs(grad).max()))
    fd_hess = np.array([(nll_grad(prefs, theta + h * e) - nll_grad(prefs, theta - h * e)) / (2 * h) for e in np.eye(d)])
    np.testing.assert_allclose(hess, fd_hess, atol=1e-6 * (1 + np.abs(hess).max()))
    np.testing.assert_allclose(hess, hess.T, atol=1e-12)


@settings(max_examples=20)
@given(**prefs_args, B=st.sampled_from([0.5, 1.0, 3.0]))
def test_bt_hessian_lower_bound_on_ball(seed, M, d, B):
    """Property 5: on ||theta|| <= B, nabla^2 NLL >= gamma X^T diag(n) X with gamma = sigma'(B L_x)."""
    prefs, rng = random_prefs(seed, M, d)
    gamma = expit(B * prefs.L_x) * expit(-B * prefs.L_x)
    G = (prefs.X * (prefs.n1 + prefs.n0)[:, None]).T @ prefs.X
    for _ in range(3):
        theta = rng.normal(size=d)
        theta *= B * rng.random() ** (1 / d) / np.linalg.norm(theta)
        gap = nll_hessian(prefs, theta) - gamma * G
        assert np.linalg.eigvalsh(gap).min() >= -1e-12 * (1 + np.abs(G).max())


@settings(max_examples=20)
@given(**prefs_args)
def test_bt_label_flip_symmetry(seed, M, d):
    """Property 5: swapping the labels equals negating theta, and equals negating x."""
    prefs, rng = random_prefs(seed, M, d)
    flipped = Preferences(X=prefs.X, n1=prefs.n0, n0=prefs.n1)
    mirrored = Preferences(X=-prefs.X, n1=prefs.n0, n0=prefs.n1)
    theta = rng.normal(size=d)
    assert nll(flipped, theta) == pytest.approx(nll(prefs, -theta), rel=1e-13)
    assert nll(mirrored, theta) == pytest.approx(nll(prefs, theta), rel=1e-13)
    np.testing.assert_allclose(nll_grad(flipped, theta), -nll_grad(prefs, -theta), atol=1e-12)


@settings(max_examples=50)
@given(
    B=st.floats(0.05, 4.0),
    r=st.lists(st.floats(-1.0, 1.0), min_size=4, max_size=4),
)
def test_reward_difference_bounded_by_tv(B, r):
    """Property 4: |Delta - Delta*| <= kappa TV(P_r, P_r*) with kappa = 1/sigma'(2B) = 2 + e^{2B} + e^{-2B}.

    Rewards with |r|, |r*| <= B on the two trajectories of a pair; TV is computed from its
    definition, 1/2 sum_o |P_r(o) - P_r*(o)|, for the Bradley-Terry label laws.
    """
    r_tau0, r_tau1, rs_tau0, rs_tau1 = (B * value for value in r)
    delta, delta_star = r_tau1 - r_tau0, rs_tau1 - rs_tau0
    p, p_star = expit(delta), expit(delta_star)
    tv = 0.5 * (abs(p - p_star) + abs((1 - p) - (1 - p_star)))
    kappa = kappa_tv(B)
    assert kappa == pytest.approx(1.0 / (expit(2 * B) * expit(-2 * B)), rel=1e-12)
    assert abs(delta - delta_star) <= kappa * tv * (1 + 1e-9) + 1e-15


def test_kappa_has_one_normalisation_kappa_tv_of_the_reward_bound_is_one_over_the_sets_gamma():
    """theory/STATEMENTS.md: kappa = 1 / gamma = 1 / sigma'(B L_x). kappa_tv takes the reward bound
    R = B L (|r(tau)| <= R) and the likelihood set's gamma the bound B and L_x = 2 L, so the two agree."""
    from pbkd_ref.confidence import LikelihoodSet
    from pbkd_ref.preferences import aggregate

    for B, L in ((0.5, 1.0), (1.0, 1.0), (2.0, 0.7)):
        X = np.array([[2 * L, 0.0], [0.0, L]])  # the largest ||x|| is L_x = 2 L
        cset = LikelihoodSet(aggregate(X, np.array([1, 0])), B, 1.0)
        assert kappa_tv(B * L) == pytest.approx(1.0 / cset.gamma, rel=1e-12)


def test_reward_difference_tv_constant_is_tight():
    """kappa cannot be smaller: at Delta, Delta* -> 2B the ratio |Delta - Delta*| / TV tends to kappa."""
    for B in (0.3, 1.0, 2.5):
        delta, delta_star = 2 * B, 2 * B - 1e-6
        ratio = abs(delta - delta_star) / abs(expit(delta) - expit(delta_star))
        assert ratio == pytest.approx(kappa_tv(B), rel=1e-5)


def test_reward_difference_tv_on_mdp_pairs():
    """Property 4 on trajectory pairs of an MDP: linear rewards with ||theta|| <= B and ||phi(tau)|| <= 1."""
    rng = np.random.default_rng(7)
    mdp = random_mdp(3, 2, 3, 3, rng)
    B = 1.5
    pi = np.full((3, 3, 2), 0.5)
    f0 = trajectory_features(mdp, *sample_trajectories(mdp, pi, 200, rng))
    f1 = trajectory_features(mdp, *sample_trajectories(mdp, pi, 200, rng))
    for _ in range(20):
        theta, theta_star = rng.normal(size=(2, 3))
        theta *= B / np.linalg.norm(theta)
        theta_star *= B * rng.random() / np.linalg.norm(theta_star)
        delta, delta_star = (f1 - f0) @ theta, (f1 - f0) @ theta_star
        tv = np.abs(label_probability(f1 - f0, theta) - label_probability(f1 - f0, theta_star))
        assert np.all(np.abs(delta - delta_star) <= kappa_tv(B) * tv * (1 + 1e-9) + 1e-15)


def test_nll_saturated_tails_are_relatively_accurate():
    """Far in the tails the likelihood and its gradient keep full relative precision."""
    X = np.array([[1.0], [-1.0]])
    prefs = Preferences(X=X, n1=np.array([1.0, 0.0]), n0=np.array([0.0, 1.0]))
    for z in (5.0, 20.0, 40.0, 300.0):
        expected = 2 * math.log1p(math.exp(-z))
        assert nll(prefs, np.array([z])) == pytest.approx(expected, rel=1e-14)
        assert nll_grad(prefs, np.array([z]))[0] == pytest.approx(-2 * expit(-z), rel=1e-13)
        assert nll_hessian(prefs, np.array([z]))[0, 0] == pytest.approx(2 * expit(z) * expit(-z), rel=1e-13)


def test_sample_preferences_matches_the_bradley_terry_model():
    rng = np.random.default_rng(11)
    mdp = random_mdp(3, 2, 3, 2, rng)
    theta_star = np.array([2.0, -1.0])
    pi_E = softmax_policy(mdp, rewards(mdp, theta_star), 0.3)
    pi_ref = np.full((3, 3, 2), 0.5)
    N = 20_000
    sample = sample_preferences(mdp, pi_E, pi_ref, theta_star, N, rng)
    np.testing.assert_allclose(sample.X, sample.reference_features - sample.teacher_features)
    for features, policy in ((sample.teacher_features, pi_E), (sample.reference_features, pi_ref)):
        np.testing.assert_allclose(features.mean(axis=0), feature_expectation(mdp, policy), atol=5 * features.std(axis=0).max() / np.sqrt(N))
    p = label_probability(sample.X, theta_star)
    assert abs(sample.y.mean() - p.mean()) <= 5 * np.sqrt(np.sum(p * (1 - p))) / N
    # Calibration in bins of the model probability.
    bins = np.digitize(p, [0.35, 0.5, 0.65])
    for b in range(4):
        mask = bins == b
        if mask.sum() > 500:
            assert abs(sample.y[mask].mean() - p[mask].mean()) <= 5 * np.sqrt(p[mask].mean() * (1 - p[mask].mean()) / mask.sum())


def test_preferences_validation_messages():
    with pytest.raises(ValueError, match="y must contain only labels 0 and 1"):
        aggregate(np.zeros((2, 1)), np.array([0, 2]))
    with pytest.raises(ValueError, match="y must have shape"):
        aggregate(np.zeros((2, 1)), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="n1 must be nonnegative"):
        Preferences(X=np.zeros((1, 1)), n1=np.array([-1.0]), n0=np.array([1.0]))
    with pytest.raises(ValueError, match="n0 must have shape"):
        Preferences(X=np.zeros((2, 1)), n1=np.ones(2), n0=np.ones(3))
    with pytest.raises(ValueError, match="X contains NaN"):
        aggregate(np.array([[np.nan]]), np.array([1]))
    prefs = aggregate(np.ones((3, 2)), np.array([1, 0, 1]))
    with pytest.raises(ValueError, match="theta must have shape"):
        nll(prefs, np.ones(3))
    with pytest.raises(ValueError, match="prefs must be a pbkd_ref.preferences.Preferences"):
        nll(np.ones((3, 2)), np.ones(2))
    with pytest.raises(ValueError, match="X must equal reference_features - teacher_features"):
        PairSample(X=np.ones((1, 1)), y=np.array([1]), teacher_features=np.zeros((1, 1)), reference_features=np.zeros((1, 1)))
    with pytest.raises(ValueError, match="B must be a finite number >= 0"):
        kappa_tv(-1.0)
    assert prefs.N == 3 and prefs.M == 1 and prefs.L_x == pytest.approx(np.sqrt(2))
    empty = aggregate(np.zeros((0, 2)), np.zeros(0, dtype=int))
    assert empty.N == 0 and nll(empty, np.ones(2)) == 0.0 and empty.L_x == 0.0

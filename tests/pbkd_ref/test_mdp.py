"""Lemma tests for pbkd_ref.mdp (spec tabular.md section 6, properties 1-3)."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from pbkd_ref.mdp import (
    MDP,
    evaluate,
    feature_expectation,
    occupancy,
    occupancy_features,
    plan,
    policy_from_occupancy,
    random_mdp,
    rewards,
    sample_trajectories,
    softmax_policy,
    token_tree_mdp,
    trajectory_features,
    value,
)

small = dict(
    S=st.integers(1, 4), A=st.integers(1, 3), H=st.integers(1, 4), d=st.integers(1, 3), seed=st.integers(0, 2**32 - 1)
)


def random_policy(mdp, rng, deterministic_share=0.3):
    """Random Markov policy; some rows one-hot so that zero-probability actions occur."""
    pi = rng.dirichlet(np.ones(mdp.A), size=(mdp.H, mdp.S))
    onehot = rng.random((mdp.H, mdp.S)) < deterministic_share
    choice = rng.integers(0, mdp.A, size=(mdp.H, mdp.S))
    pi[onehot] = np.eye(mdp.A)[choice[onehot]]
    return pi


def brute_force_occupancy(mdp, pi):
    """Occupancy by enumerating every state-action sequence (independent of the recursion)."""
    d = np.zeros((mdp.H, mdp.S, mdp.A))
    for states in itertools.product(range(mdp.S), repeat=mdp.H):
        for actions in itertools.product(range(mdp.A), repeat=mdp.H):
            p = mdp.rho[states[0]]
            for h in range(mdp.H):
                p *= pi[h, states[h], actions[h]]
                if h < mdp.H - 1:
                    p *= mdp.P[h, states[h], actions[h], states[h + 1]]
            if p:
                for h in range(mdp.H):
                    d[h, states[h], actions[h]] += p
    return d


def occupancy_lp(mdp, r):
    """max_d <d, r> over the occupancy polytope (flow constraints), by HiGHS."""
    H, S, A = mdp.H, mdp.S, mdp.A
    n = H * S * A
    index = np.arange(n).reshape(H, S, A)
    rows, rhs = [], []
    for s in range(S):
        row = np.zeros(n)
        row[index[0, s]] = 1.0
        rows.append(row)
        rhs.append(mdp.rho[s])
    for h in range(H - 1):
        for s_next in range(S):
            row = np.zeros(n)
            row[index[h + 1, s_next]] = 1.0
            row[index[h].ravel()] -= mdp.P[h, :, :, s_next].ravel()
            rows.append(row)
            rhs.append(0.0)
    res = linprog(-r.ravel(), A_eq=np.array(rows), b_eq=np.array(rhs), bounds=(0, None), method="highs")
    assert res.status == 0
    return -res.fun, res.x.reshape(H, S, A)


@settings(max_examples=20)
@given(**small)
def test_occupancy_lemma(S, A, H, d, seed):
    """Property 1: layers sum to 1, flow constraints, pi -> d -> pi -> d, J from d = J from backward induction, linear in theta."""
    rng = np.random.default_rng(seed)
    mdp = random_mdp(S, A, H, d, rng)
    pi = random_policy(mdp, rng)
    occ = occupancy(mdp, pi)
    np.testing.assert_allclose(occ.sum(axis=(1, 2)), np.ones(H), atol=1e-12)
    np.testing.assert_allclose(occ[0].sum(axis=1), mdp.rho, atol=1e-12)
    for h in range(H - 1):
        inflow = np.einsum("sa,sat->t", occ[h], mdp.P[h])
        np.testing.assert_allclose(occ[h + 1].sum(axis=1), inflow, atol=1e-12)
    if S**H * A**H <= 5000:
        np.testing.assert_allclose(occ, brute_force_occupancy(mdp, pi), atol=1e-12)
    pi_back = policy_from_occupancy(mdp, occ)
    np.testing.assert_allclose(occupancy(mdp, pi_back), occ, atol=1e-12)
    visited = occ.sum(axis=2) > 1e-12
    np.testing.assert_allclose(pi_back[visited], pi[visited], atol=1e-9)
    np.testing.assert_allclose(pi_back[~visited], 1.0 / A)
    theta1, theta2 = rng.normal(size=d), rng.normal(size=d)
    _, V = evaluate(mdp, pi, rewards(mdp, theta1))
    assert value(mdp, pi, theta1) == pytest.approx(mdp.rho @ V[0], abs=1e-12)
    assert theta1 @ occupancy_features(mdp, occ) == pytest.approx(mdp.rho @ V[0], abs=1e-12)
    a, b = rng.normal(size=2)
    combined = value(mdp, pi, a * theta1 + b * theta2)
    assert combined == pytest.approx(a * value(mdp, pi, theta1) + b * value(mdp, pi, theta2), abs=1e-12)


@settings(max_examples=15)
@given(**small)
def test_planning_lp_equals_backward_induction(S, A, H, d, seed):
    """Property 2: the occupancy LP optimum equals backward induction, and the greedy deterministic policy attains it."""
    rng = np.random.default_rng(seed)
    mdp = random_mdp(S, A, H, d, rng)
    theta = rng.normal(size=d)
    r = rewards(mdp, theta)
    pi_star, V_star = plan(mdp, r)
    lp_value, _ = occupancy_lp(mdp, r)
    assert mdp.rho @ V_star[0] == pytest.approx(lp_value, abs=1e-9)
    assert value(mdp, pi_star, theta) == pytest.approx(lp_value, abs=1e-9)
    assert set(np.unique(pi_star)) <= {0.0, 1.0}
    np.testing.assert_allclose(pi_star.sum(axis=2), 1.0)
    # No deterministic policy does better (exhaustive on tiny instances).
    if A ** (H * S) <= 256:
        best = max(
            value(mdp, np.eye(A)[np.array(choice).reshape(H, S)], theta)
            for choice in itertools.product(range(A), repeat=H * S)
        )
        assert best == pytest.approx(lp_value, abs=1e-9)


@settings(max_examples=20)
@given(**small)
def test_performance_difference_lemma(S, A, H, d, seed):
    """Property 3: J(pi) - J(pi') = sum_h E_{s ~ d^pi_h} [ <pi_h(.|s), Q^{pi'}_h(s,.)> - V^{pi'}_h(s) ]."""
    rng = np.random.default_rng(seed)
    mdp = random_mdp(S, A, H, d, rng)
    pi, pi_prime = random_policy(mdp, rng), random_policy(mdp, rng)
    r = rewards(mdp, rng.normal(size=d))
    _, V = evaluate(mdp, pi, r)
    Q_prime, V_prime = evaluate(mdp, pi_prime, r)
    state_dist = occupancy(mdp, pi).sum(axis=2)
    advantage = np.einsum("hsa,hsa->hs", pi, Q_prime) - V_prime
    lhs = mdp.rho @ V[0] - mdp.rho @ V_prime[0]
    assert lhs == pytest.approx(float(np.sum(state_dist * advantage)), abs=1e-12)


@settings(max_examples=10)
@given(**small)
def test_softmax_policy_between_greedy_and_entropy_bound(S, A, H, d, seed):
    """Soft backward induction: V* - T H log A <= J(softmax_T) <= V*, and T -> 0 recovers the greedy value."""
    rng = np.random.default_rng(seed)
    mdp = random_mdp(S, A, H, d, rng)
    theta = rng.normal(size=d)
    r = rewards(mdp, theta)
    _, V_star = plan(mdp, r)
    optimum = mdp.rho @ V_star[0]
    for T in (1.0, 0.1):
        J = value(mdp, softmax_policy(mdp, r, T), theta)
        assert optimum - T * H * np.log(A) - 1e-12 <= J <= optimum + 1e-12
    assert value(mdp, softmax_policy(mdp, r, 1e-6), theta) == pytest.approx(optimum, abs=1e-4)


def test_sample_trajectories_match_occupancy():
    rng = np.random.default_rng(3)
    mdp = random_mdp(3, 2, 4, 2, rng, dirichlet=0.5)
    pi = random_policy(mdp, rng)
    n = 40_000
    states, actions = sample_trajectories(mdp, pi, n, rng)
    empirical = np.zeros((mdp.H, mdp.S, mdp.A))
    for h in range(mdp.H):
        np.add.at(empirical[h], (states[:, h], actions[:, h]), 1.0 / n)
    occ = occupancy(mdp, pi)
    sigma = np.sqrt(occ * (1 - occ) / n)
    assert np.all(np.abs(empirical - occ) <= 5 * sigma + 1e-12)
    # Actions never drawn where the policy has zero probability.
    assert np.all(empirical[occ == 0.0] == 0.0)
    features = trajectory_features(mdp, states, actions)
    np.testing.assert_allclose(features.mean(axis=0), feature_expectation(mdp, pi), atol=5 * features.std(axis=0).max() / np.sqrt(n))


def test_trajectory_features_and_feature_bound():
    rng = np.random.default_rng(0)
    mdp = random_mdp(3, 2, 3, 4, rng, L=2.0)
    states, actions = sample_trajectories(mdp, np.full((3, 3, 2), 0.5), 50, rng)
    features = trajectory_features(mdp, states, actions)
    for k in range(50):
        expected = sum(mdp.phi[h, states[k, h], actions[k, h]] for h in range(mdp.H))
        np.testing.assert_allclose(features[k], expected, atol=1e-15)
    # ||phi(tau)|| <= L for every trajectory (all 3^3 * 2^3 sequences).
    for seq_s in itertools.product(range(3), repeat=3):
        for seq_a in itertools.product(range(2), repeat=3):
            phi_tau = trajectory_features(mdp, np.array([seq_s]), np.array([seq_a]))[0]
            assert np.linalg.norm(phi_tau) <= 2.0 + 1e-12


def test_token_tree_mdp_structure():
    rng = np.random.default_rng(1)
    V, H = 3, 4
    mdp = token_tree_mdp(V, H, 2, rng)
    assert (mdp.S, mdp.A, mdp.H) == (V ** (H - 1), V, H)
    assert mdp.rho[0] == 1.0
    for h in range(H - 1):
        for s in range(V**h):
            for a in range(V):
                assert mdp.P[h, s, a, s * V + a] == 1.0
    uniform = np.full((H, mdp.S, V), 1.0 / V)
    occ = occupancy(mdp, uniform)
    for h in range(H):
        np.testing.assert_allclose(occ[h, : V**h].sum(axis=1), V ** (-h))
        assert occ[h, V**h :].sum() == 0.0
    states, _ = sample_trajectories(mdp, uniform, 200, rng)
    for h in range(H):
        assert states[:, h].max() < V**h


def test_mdp_validation_messages():
    rng = np.random.default_rng(0)
    good = random_mdp(2, 2, 3, 2, rng)
    with pytest.raises(ValueError, match="P must have shape"):
        MDP(P=good.P[:1], rho=good.rho, phi=good.phi)
    with pytest.raises(ValueError, match="rho must have shape"):
        MDP(P=good.P, rho=np.ones(3) / 3, phi=good.phi)
    bad_P = good.P.copy()
    bad_P[0, 0, 0] = [0.7, 0.7]
    with pytest.raises(ValueError, match="P rows must sum to 1"):
        MDP(P=bad_P, rho=good.rho, phi=good.phi)
    with pytest.raises(ValueError, match="rho has negative"):
        MDP(P=good.P, rho=np.array([1.5, -0.5]), phi=good.phi)
    nan_phi = good.phi.copy()
    nan_phi[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="phi contains NaN"):
        MDP(P=good.P, rho=good.rho, phi=nan_phi)
    with pytest.raises(ValueError, match="pi must have shape"):
        occupancy(good, np.ones((3, 2, 3)) / 3)
    with pytest.raises(ValueError, match="rng must be a numpy.random.Generator"):
        random_mdp(2, 2, 2, 2, 0)
    with pytest.raises(ValueError, match="S must be an integer >= 1"):
        random_mdp(0, 2, 2, 2, rng)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        softmax_policy(good, rewards(good, np.ones(2)), 0.0)
    with pytest.raises(ValueError, match="theta must have shape"):
        rewards(good, np.ones(3))
    with pytest.raises(ValueError, match="actions entries must lie in"):
        trajectory_features(good, np.zeros((1, 3), dtype=int), np.full((1, 3), 2))
    with pytest.raises(ValueError, match="d must be nonnegative"):
        policy_from_occupancy(good, -np.ones((3, 2, 2)))
    with pytest.raises(ValueError, match="reduce V or H"):
        token_tree_mdp(10, 6, 2, rng)
    assert not good.phi.flags.writeable

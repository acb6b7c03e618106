"""MM PbKD (Algorithm 3): the Q-reformulation identity (spec section 6, property 10) and the end-to-end run."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pbkd_ref.mdp import MDP, evaluate, feature_expectation, random_mdp, rewards, softmax_policy, token_tree_mdp, value
from pbkd_ref.mm_pbkd import (
    induced_features,
    induced_mdp,
    induced_reward,
    mixed_moment,
    mm_pbkd,
    next_q_features,
    off_policy_moment,
    on_policy_moment,
    q_function,
    successor_features,
)
from pbkd_ref.offline import offline_pbkd
from pbkd_ref.preferences import TrajectoryPairs, sample_preferences, sample_trajectory_pairs


def _policy(rng, mdp, concentration=1.0):
    return rng.dirichlet(np.full(mdp.A, concentration), size=(mdp.H, mdp.S))


def _instance(seed, S, A, H, k, dirichlet):
    rng = np.random.default_rng(seed)
    mdp = random_mdp(S, A, H, 2, rng, dirichlet=dirichlet)
    psi = rng.normal(size=(H, S, A, k))
    return rng, mdp, psi, rng.normal(size=k), _policy(rng, mdp, 0.5), _policy(rng, mdp, 0.5)


def _trajectory_expectation(mdp, pi, g):
    """E_{tau ~ pi} g(tau) by summing over every trajectory (brute force, tiny MDPs)."""
    total = 0.0
    for states in itertools.product(range(mdp.S), repeat=mdp.H):
        for actions in itertools.product(range(mdp.A), repeat=mdp.H):
            p = mdp.rho[states[0]]
            for h in range(mdp.H):
                p *= pi[h, states[h], actions[h]]
                if h < mdp.H - 1:
                    p *= mdp.P[h, states[h], actions[h], states[h + 1]]
            if p > 0.0:
                total += p * g(states, actions)
    return total


@given(seed=st.integers(0, 2**32 - 1), S=st.integers(1, 4), A=st.integers(1, 3), H=st.integers(1, 4),
       k=st.integers(1, 4), dirichlet=st.sampled_from([0.05, 1.0, 10.0]))
@settings(max_examples=40)
def test_q_reformulation_identity(seed, S, A, H, k, dirichlet):
    """J(pi_E, r_f) - J(pi, r_f) = E_{tau ~ pi} sum_h [<pi_E(.|s_h), f(h,s_h,.)> - f(h,s_h,a_h)], any P.

    The left side goes through the induced MDP (phi_Q, the one occupancy routine); the right
    side through q_function and the student's occupancy: two different computations.
    """
    _, mdp, psi, w, pi, pi_E = _instance(seed, S, A, H, k, dirichlet)
    induced = induced_mdp(mdp, psi, pi_E)
    lhs = value(induced, pi_E, w) - value(induced, pi, w)
    rhs = on_policy_moment(mdp, pi, pi_E, psi, w)
    assert rhs == pytest.approx(lhs, abs=1e-10 * (1 + np.abs(psi).max() * np.abs(w).sum() * H))
    # J(pi_E, r_f) telescopes to E_{s_0 ~ rho} <pi_E(.|s_0), f(0, s_0, .)>
    f = q_function(psi, w)
    assert value(induced, pi_E, w) == pytest.approx(float(mdp.rho @ np.sum(pi_E[0] * f[0], axis=-1)), abs=1e-10 * (1 + np.abs(f).max() * H))


def test_q_reformulation_identity_by_trajectory_enumeration():
    """Both sides of the identity from explicit trajectory sums (no occupancy, no phi_Q)."""
    rng, mdp, psi, w, pi, pi_E = _instance(7, 3, 2, 3, 3, 0.3)
    f = q_function(psi, w)

    def r_f(h, s, a):  # f(h,s,a) - E_{s' ~ P, a' ~ pi_E} f(h+1, s', a'), written out
        if h == mdp.H - 1:
            return f[h, s, a]
        return f[h, s, a] - sum(mdp.P[h, s, a, t] * pi_E[h + 1, t, b] * f[h + 1, t, b]
                                for t in range(mdp.S) for b in range(mdp.A))

    def J(policy):
        return _trajectory_expectation(mdp, policy, lambda ss, aa: sum(r_f(h, ss[h], aa[h]) for h in range(mdp.H)))

    moment = _trajectory_expectation(
        mdp, pi, lambda ss, aa: sum(pi_E[h, ss[h]] @ f[h, ss[h]] - f[h, ss[h], aa[h]] for h in range(mdp.H)))
    assert J(pi_E) - J(pi) == pytest.approx(moment, abs=1e-12)
    assert on_policy_moment(mdp, pi, pi_E, psi, w) == pytest.approx(moment, abs=1e-12)
    np.testing.assert_allclose(induced_reward(mdp, psi, pi_E, w),
                               [[[r_f(h, s, a) for a in range(mdp.A)] for s in range(mdp.S)] for h in range(mdp.H)],
                               atol=1e-12)


@given(seed=st.integers(0, 2**32 - 1), a=st.floats(-3, 3), b=st.floats(-3, 3))
@settings(max_examples=20)
def test_induced_features_linear_in_w(seed, a, b):
    _, mdp, psi, w1, _, pi_E = _instance(seed, 3, 2, 4, 3, 1.0)
    w2 = np.random.default_rng(seed + 1).normal(size=3)
    combined = induced_reward(mdp, psi, pi_E, a * w1 + b * w2)
    separate = a * induced_reward(mdp, psi, pi_E, w1) + b * induced_reward(mdp, psi, pi_E, w2)
    np.testing.assert_allclose(combined, separate, atol=1e-12)
    # phi_Q = psi - P pi_E psi, with the last step's next term zero
    phi_Q = induced_features(mdp, psi, pi_E)
    np.testing.assert_allclose(phi_Q[-1], psi[-1], atol=0)
    np.testing.assert_allclose(phi_Q, psi - next_q_features(mdp, psi, pi_E), atol=0)


@given(seed=st.integers(0, 2**32 - 1), beta=st.floats(0.0, 1.0))
@settings(max_examples=20)
def test_moments_vanish_at_the_teacher_and_mix_linearly(seed, beta):
    _, mdp, psi, w, pi, pi_E = _instance(seed, 3, 3, 3, 4, 1.0)
    assert off_policy_moment(mdp, pi_E, pi_E, psi, w) == pytest.approx(0.0, abs=1e-12)
    assert on_policy_moment(mdp, pi_E, pi_E, psi, w) == pytest.approx(0.0, abs=1e-12)
    on, off = on_policy_moment(mdp, pi, pi_E, psi, w), off_policy_moment(mdp, pi, pi_E, psi, w)
    assert mixed_moment(mdp, pi, pi_E, psi, w, beta) == pytest.approx(beta * off + (1 - beta) * on, abs=1e-12)
    assert mixed_moment(mdp, pi, pi_E, psi, w, 0.0) == pytest.approx(on, abs=1e-12)
    assert mixed_moment(mdp, pi, pi_E, psi, w, 1.0) == pytest.approx(off, abs=1e-12)


def test_off_policy_moment_is_the_performance_difference_for_the_student_q():
    """With one-hot psi and f = Q^pi_r, the off-policy moment equals J(pi_E, r) - J(pi, r) (PDL)."""
    rng, mdp, _, _, pi, pi_E = _instance(11, 3, 2, 4, 1, 1.0)
    r = rng.normal(size=(mdp.H, mdp.S, mdp.A))
    one_hot = np.eye(mdp.H * mdp.S * mdp.A).reshape(mdp.H, mdp.S, mdp.A, -1)
    Q_pi, _ = evaluate(mdp, pi, r)
    _, V_E = evaluate(mdp, pi_E, r)
    _, V_pi = evaluate(mdp, pi, r)
    gap = float(mdp.rho @ (V_E[0] - V_pi[0]))
    assert off_policy_moment(mdp, pi, pi_E, one_hot, Q_pi.ravel()) == pytest.approx(gap, abs=1e-12)
    # and the on-policy moment with f = Q^{pi_E}_r: then r_f = r exactly
    Q_E, _ = evaluate(mdp, pi_E, r)
    np.testing.assert_allclose(induced_reward(mdp, one_hot, pi_E, Q_E.ravel()), r, atol=1e-12)
    assert on_policy_moment(mdp, pi, pi_E, one_hot, Q_E.ravel()) == pytest.approx(gap, abs=1e-12)


def test_successor_features_reproduce_phi():
    rng = np.random.default_rng(2)
    for mdp in (random_mdp(4, 3, 4, 3, rng), token_tree_mdp(2, 4, 3, rng)):
        pi_E = _policy(rng, mdp)
        np.testing.assert_allclose(induced_features(mdp, successor_features(mdp, pi_E), pi_E), mdp.phi, atol=1e-12)


def test_trajectory_pairs_reproduce_sample_preferences():
    rng = np.random.default_rng(4)
    mdp = random_mdp(3, 2, 3, 2, rng)
    pi_E, pi_ref, theta = _policy(rng, mdp), _policy(rng, mdp), np.array([1.0, -2.0])
    pairs = sample_trajectory_pairs(mdp, pi_E, pi_ref, theta, 200, np.random.default_rng(9))
    reference = sample_preferences(mdp, pi_E, pi_ref, theta, 200, np.random.default_rng(9))
    sample = pairs.pair_sample(mdp)
    np.testing.assert_array_equal(sample.X, reference.X)
    np.testing.assert_array_equal(sample.y, reference.y)


def test_mm_pbkd_end_to_end_matches_pbkd_with_successor_features():
    """With psi = successor features of pi_E, phi_Q = phi: MM PbKD is PbKD with exact v_E on the same data."""
    rng = np.random.default_rng(12)
    mdp = random_mdp(4, 2, 3, 3, rng)
    theta_star = np.array([1.5, -1.0, 0.5])
    pi_E = softmax_policy(mdp, rewards(mdp, theta_star), 0.2)
    pi_ref = _policy(rng, mdp)
    pairs = sample_trajectory_pairs(mdp, pi_E, pi_ref, theta_star, 300, rng)
    psi = successor_features(mdp, pi_E)
    mm = mm_pbkd(mdp, pi_E, psi, pairs, B_f=3.0)
    pbkd = offline_pbkd(mdp, pairs.pair_sample(mdp), B=3.0, v_E=feature_expectation(mdp, pi_E))
    assert mm.minmax.certified and pbkd.minmax.certified
    assert mm.minmax.certificate_gap <= 1e-7
    assert mm.minmax.value == pytest.approx(pbkd.minmax.value, abs=2e-7)
    assert mm.minmax.value <= 1e-7  # white-box: the teacher is a feasible student
    assert value(mdp, mm.policy, theta_star) == pytest.approx(value(mdp, pbkd.policy, theta_star), abs=1e-5)
    # the min-max value is the worst on-policy Q-moment over C: check it at the adversary w
    assert on_policy_moment(mdp, mm.policy, pi_E, psi, mm.minmax.theta) == pytest.approx(mm.minmax.lower, abs=1e-6)


def test_mm_pbkd_with_random_q_features_is_certified():
    rng = np.random.default_rng(13)
    mdp = random_mdp(3, 3, 3, 2, rng)
    theta_star = np.array([2.0, -1.0])
    pi_E = softmax_policy(mdp, rewards(mdp, theta_star), 0.3)
    psi = rng.normal(size=(mdp.H, mdp.S, mdp.A, 4)) / mdp.H
    pairs = sample_trajectory_pairs(mdp, pi_E, _policy(rng, mdp), theta_star, 200, rng)
    result = mm_pbkd(mdp, pi_E, psi, pairs, B_f=5.0, radius_kind="chi2")
    assert result.minmax.certified
    assert result.w_hat.shape == (4,) and np.linalg.norm(result.w_hat) <= 5.0 * (1 + 1e-9)
    assert result.minmax.value <= 1e-7
    assert np.all(np.isfinite(result.policy)) and result.N == 200


def test_bad_input_raises_value_error():
    rng = np.random.default_rng(0)
    mdp = random_mdp(2, 2, 3, 2, rng)
    pi = np.full((3, 2, 2), 0.5)
    with pytest.raises(ValueError, match="psi"):
        induced_features(mdp, np.ones((3, 2, 2)), pi)
    with pytest.raises(ValueError, match="psi"):
        induced_features(mdp, np.ones((2, 2, 2, 3)), pi)
    with pytest.raises(ValueError, match="w must"):
        on_policy_moment(mdp, pi, pi, np.ones((3, 2, 2, 3)), np.ones(2))
    with pytest.raises(ValueError, match="beta"):
        mixed_moment(mdp, pi, pi, np.ones((3, 2, 2, 3)), np.ones(3), 1.5)
    with pytest.raises(ValueError, match="pi_E"):
        induced_mdp(mdp, np.ones((3, 2, 2, 3)), np.ones((3, 2, 2)))
    with pytest.raises(ValueError, match="B_f"):
        pairs = sample_trajectory_pairs(mdp, pi, pi, np.ones(2), 5, rng)
        mm_pbkd(mdp, pi, np.ones((3, 2, 2, 3)), pairs, B_f=0.0)
    with pytest.raises(ValueError, match="pairs"):
        mm_pbkd(mdp, pi, np.ones((3, 2, 2, 3)), "pairs", B_f=1.0)
    with pytest.raises(ValueError, match="labels in"):
        TrajectoryPairs(np.zeros((2, 3), int), np.zeros((2, 3), int), np.zeros((2, 3), int), np.zeros((2, 3), int),
                        np.array([0, 2]))
    assert isinstance(induced_mdp(mdp, np.ones((3, 2, 2, 3)), pi), MDP)

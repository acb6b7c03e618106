"""Offline PbKD (Algorithm 1) and its baselines (spec tabular.md sections 4-5, property 9 of section 6).

- Pessimism lemma: on the event theta* in C, J(pi_hat, theta*) >= J(pi_E, theta*) and
  SubOpt = J(pi*, theta*) - J(pi_hat, theta*) <= max_{theta in C} (theta* - theta)^T (v* - v_E);
- black-box teacher-gap bound: with v_E estimated from the teacher trajectories of the pairs,
  J(pi_E) - J(pi_hat) <= max_{theta in C} (theta* - theta)^T (v_E - v_hat_E);
- baselines against independent computations: behaviour cloning maximises the teacher
  log-likelihood (checked on hand-made trajectories), the MLE plug-in is optimal for
  theta_hat (checked by enumerating deterministic policies).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pbkd_ref.mdp import (
    feature_expectation,
    plan,
    random_mdp,
    rewards,
    sample_trajectories,
    softmax_policy,
    value,
)
from pbkd_ref.mle import fit_mle
from pbkd_ref.offline import OfflineResult, behaviour_cloning, mle_plugin, offline_pbkd
from pbkd_ref.preferences import aggregate, nll, sample_preferences

TOL = 1e-7
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def pessimism_setting(seed, *, S=4, A=3, H=3, d=3, N=80, B=4.0):
    """A suboptimal softmax teacher for theta*, N pairs against the uniform policy, and a
    fixed radius that puts theta* in C(D) (the event of the lemma)."""
    rng = np.random.default_rng(seed)
    mdp = random_mdp(S, A, H, d, rng)
    direction = rng.normal(size=d)
    theta_star = 0.6 * B * direction / np.linalg.norm(direction)
    pi_E = softmax_policy(mdp, rewards(mdp, theta_star), 0.3)
    pi_ref = np.full((H, S, A), 1.0 / A)
    sample = sample_preferences(mdp, pi_E, pi_ref, theta_star, N, rng)
    prefs = aggregate(sample.X, sample.y)
    zeta = nll(prefs, theta_star) - fit_mle(prefs, B).nll + 0.5
    return mdp, theta_star, pi_E, sample, zeta, B


@settings(max_examples=5)
@given(seed=seeds)
def test_pessimism_lemma(seed):
    """On theta* in C: the student beats the teacher under theta*, and SubOpt obeys the section 5 bound."""
    mdp, theta_star, pi_E, sample, zeta, B = pessimism_setting(seed)
    v_E = feature_expectation(mdp, pi_E)
    result = offline_pbkd(mdp, sample, B=B, radius_kind="fixed", radius_value=zeta, v_E=v_E)
    assert isinstance(result, OfflineResult)
    assert result.minmax.status == "optimal"
    assert result.cset.contains(theta_star)  # the event of the lemma
    J_student = value(mdp, result.policy, theta_star)
    J_teacher = value(mdp, pi_E, theta_star)
    assert J_student >= J_teacher - TOL
    pi_star, V_star = plan(mdp, rewards(mdp, theta_star))
    v_star = feature_expectation(mdp, pi_star)
    subopt = float(mdp.rho @ V_star[0]) - J_student
    bound = theta_star @ (v_star - v_E) + result.cset.support(v_E - v_star)[0]  # max_{theta in C} (theta* - theta)^T (v* - v_E)
    assert -TOL <= subopt <= bound + TOL


@settings(max_examples=4)
@given(seed=seeds)
def test_black_box_teacher_gap_bound(seed):
    """v_E estimated from the pairs' teacher trajectories: J(pi_E) - J(pi_hat) <= max_C (theta* - theta)^T (v_E - v_hat_E)."""
    mdp, theta_star, pi_E, sample, zeta, B = pessimism_setting(seed)
    result = offline_pbkd(mdp, sample, B=B, radius_kind="fixed", radius_value=zeta)
    v_hat_E = sample.teacher_features.mean(axis=0)
    np.testing.assert_allclose(result.v_E, v_hat_E)
    assert "black-box" in result.v_E_source
    assert result.minmax.status == "optimal"
    v_E = feature_expectation(mdp, pi_E)
    gap = value(mdp, pi_E, theta_star) - value(mdp, result.policy, theta_star)
    bound = theta_star @ (v_E - v_hat_E) + result.cset.support(v_hat_E - v_E)[0]
    assert gap <= bound + TOL


def test_offline_pbkd_with_the_bracketing_radius_end_to_end():
    """Algorithm 1 with the theory radius: certified solve, valid student, zeta from the formula."""
    mdp, theta_star, pi_E, sample, _, B = pessimism_setting(5, N=200)
    result = offline_pbkd(mdp, sample, B=B, v_E=feature_expectation(mdp, pi_E))
    assert result.minmax.status == "optimal"
    prefs = aggregate(sample.X, sample.y)
    expected_zeta = 1 + mdp.d * np.log(1 + 2 * B * prefs.L_x * sample.N) + np.log(1 / 0.05)
    assert result.zeta == pytest.approx(expected_zeta, rel=1e-12)
    np.testing.assert_allclose(result.policy.sum(axis=-1), 1.0)
    assert result.N == sample.N
    with pytest.raises(ValueError, match="sample"):
        offline_pbkd(mdp, (sample.X, sample.y), B=B)


def test_behaviour_cloning_is_the_empirical_conditional():
    """Hand-made trajectories: BC = action frequencies per (h, s); unseen states uniform."""
    mdp = random_mdp(3, 2, 2, 2, np.random.default_rng(0))
    states = np.array([[0, 1], [0, 1], [0, 2], [1, 2]])
    actions = np.array([[1, 0], [1, 1], [0, 0], [0, 1]])
    pi = behaviour_cloning(mdp, states, actions)
    expected = np.full((2, 3, 2), 0.5)
    expected[0, 0] = [1 / 3, 2 / 3]
    expected[0, 1] = [1.0, 0.0]
    expected[1, 1] = [0.5, 0.5]
    expected[1, 2] = [0.5, 0.5]
    np.testing.assert_allclose(pi, expected)
    with pytest.raises(ValueError, match="actions"):
        behaviour_cloning(mdp, states, actions + 5)


@settings(max_examples=5)
@given(seed=seeds)
def test_behaviour_cloning_maximises_teacher_log_likelihood(seed):
    """Forward KL on teacher samples: no other policy has a higher log-likelihood (Gibbs' inequality)."""
    rng = np.random.default_rng(seed)
    mdp = random_mdp(4, 3, 3, 2, rng)
    pi_E = rng.dirichlet(np.ones(3), size=(3, 4))
    states, actions = sample_trajectories(mdp, pi_E, 30, rng)
    pi_bc = behaviour_cloning(mdp, states, actions)
    steps = np.arange(mdp.H)[None, :]

    def log_likelihood(pi):
        with np.errstate(divide="ignore"):
            return np.log(pi[steps, states, actions]).sum()

    best = log_likelihood(pi_bc)
    for _ in range(20):
        other = 0.5 * pi_bc + 0.5 * rng.dirichlet(np.ones(3), size=(3, 4))
        assert log_likelihood(other) <= best + 1e-12


@settings(max_examples=5)
@given(seed=seeds)
def test_mle_plugin_is_optimal_for_theta_hat(seed):
    """argmax_pi J(pi, theta_hat), against enumeration of all deterministic policies."""
    rng = np.random.default_rng(seed)
    mdp = random_mdp(2, 2, 3, 3, rng)
    theta_hat = rng.normal(size=3)
    pi = mle_plugin(mdp, theta_hat)
    cells = mdp.H * mdp.S
    best = -np.inf
    for choice in itertools.product(range(mdp.A), repeat=cells):
        det = np.zeros((mdp.H, mdp.S, mdp.A))
        det.reshape(cells, mdp.A)[np.arange(cells), choice] = 1.0
        best = max(best, value(mdp, det, theta_hat))
    assert value(mdp, pi, theta_hat) == pytest.approx(best, abs=1e-12)

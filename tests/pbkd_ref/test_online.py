"""Online PbKD (Algorithm 2): Lemma 4 (property 12), Lemma 3 bookkeeping, both students, warm starts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pbkd_ref.confidence import Ball, LikelihoodSet
from pbkd_ref.mdp import feature_expectation, plan, random_mdp, rewards, softmax_policy, token_tree_mdp, value
from pbkd_ref.mle import fit_mle
from pbkd_ref.online import (
    deterministic_policies,
    elliptical_potentials,
    online_pbkd,
    optimistic_student,
)
from pbkd_ref.preferences import aggregate, nll
from pbkd_ref.solvers import solve
from theory.bounds import anytime_radius, elliptical_potential_bound

T_RUN = 30
B = 3.0


@pytest.fixture(scope="module")
def instance():
    rng = np.random.default_rng(2024)
    mdp = random_mdp(2, 2, 3, 3, rng)  # 2^6 deterministic policies: the exact optimistic oracle applies
    theta_star = np.array([2.0, -1.0, 1.5])
    pi_E = softmax_policy(mdp, rewards(mdp, theta_star), 0.05)  # suboptimal teacher
    return mdp, theta_star, pi_E


@pytest.fixture(scope="module")
def runs(instance):
    mdp, theta_star, pi_E = instance
    return {
        student: online_pbkd(mdp, pi_E, theta_star, T_RUN, np.random.default_rng(7), B=B, student=student)
        for student in ("pessimistic", "optimistic")
    }


# ----------------------------------------------------------------------------- Lemma 4 (property 12)


@given(seed=st.integers(0, 2**32 - 1), T=st.integers(1, 60), d=st.integers(1, 5),
       L_x=st.floats(0.1, 10.0), lam_scale=st.floats(0.01, 4.0), kind=st.sampled_from(["gaussian", "repeat", "axes"]))
@settings(max_examples=30)
def test_elliptical_potential_lemma(seed, T, d, L_x, lam_scale, kind):
    """V_t positive definite and increasing; sum_t min(1, ||x_t||^2_{V_t^-1}) <= 2 d log(1 + t L_x^2 / (d lam))."""
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        X = rng.normal(size=(T, d))
        X *= (L_x * rng.uniform(0, 1, size=(T, 1))) / np.linalg.norm(X, axis=1, keepdims=True)
    elif kind == "repeat":  # the same extreme direction every round
        X = np.tile(np.eye(d)[0] * L_x, (T, 1))
    else:  # cycling through the axes at full norm
        X = L_x * np.eye(d)[np.arange(T) % d]
    lam = lam_scale * L_x**2
    result = elliptical_potentials(X, lam, return_matrices=True)
    V = result.matrices
    for t in range(T + 1):  # independent brute force of V_t and its properties
        expected = lam * np.eye(d) + X[:t].T @ X[:t]
        np.testing.assert_allclose(V[t], expected, rtol=1e-12, atol=1e-12 * lam)
        assert np.linalg.eigvalsh(V[t])[0] > 0
        if t < T:
            assert np.linalg.eigvalsh(V[t + 1] - V[t])[0] >= -1e-9 * np.abs(V[t + 1]).max()
            assert result.potentials[t] == pytest.approx(min(1.0, X[t] @ np.linalg.inv(V[t]) @ X[t]), rel=1e-9, abs=1e-12)
    assert np.all(np.diff(result.logdet_V) >= -1e-12) and np.all(result.min_eig_V > 0)
    t = np.arange(1, T + 1)
    bound = elliptical_potential_bound(t, d=d, L_x=L_x, lam=lam)
    assert np.all(result.cumulative <= bound * (1 + 1e-12))


def test_elliptical_potential_lemma_needs_the_min():
    """The cap min(1, .) matters: with a tiny lam the uncapped potential of x_1 alone exceeds the bound."""
    X = np.array([[1.0, 0.0]])
    lam = 1e-6
    capped = elliptical_potentials(X, lam).cumulative[-1]
    uncapped = X[0] @ X[0] / lam
    bound = float(elliptical_potential_bound(1, d=2, L_x=1.0, lam=lam))
    assert capped <= bound < uncapped


def test_elliptical_potential_on_online_runs(runs):
    for result in runs.values():
        t = np.arange(1, result.T + 1)
        bound = elliptical_potential_bound(t, d=result.d, L_x=result.L_x, lam=result.lam)
        assert np.all(result.cumulative_potential <= bound)
        assert result.lam == pytest.approx(result.L_x**2)
        assert np.all(np.diff(result.logdet_V) >= 0) and np.all(result.min_eig_V >= result.lam * (1 - 1e-12))
        np.testing.assert_allclose(result.V_final, result.lam * np.eye(result.d) + result.X.T @ result.X, atol=1e-12)
        assert np.all(np.linalg.norm(result.X, axis=1) <= result.L_x)


# ----------------------------------------------------------------------------- Lemma 3 bookkeeping


def test_anytime_coverage_bookkeeping(runs):
    """zeta_t is Lemma 3's radius; covered[t] is recomputed from D_t: NLL(theta*) <= NLL(theta_hat_t) + zeta_t."""
    for result in runs.values():
        t = np.arange(1, result.T + 1)
        np.testing.assert_allclose(result.zeta, anytime_radius(t, d=result.d, B=result.B, L_x=result.L_x,
                                                               delta=result.delta), rtol=1e-12)
        for i in range(result.T):
            prefs = aggregate(result.X[: i + 1], result.y[: i + 1])
            level = nll(prefs, result.theta_hat[i]) + result.zeta[i]
            inside = nll(prefs, result.theta_star) <= level + 1e-9 * max(1.0, level)
            assert bool(result.covered[i]) == inside
            # theta_hat_t is the MLE of D_t (certified by the Frank-Wolfe gap of a cold fit)
            cold = fit_mle(prefs, result.B)
            assert nll(prefs, result.theta_hat[i]) <= cold.nll + 1e-8 * max(1.0, cold.nll)
        assert result.all_covered  # the bracketing-type radius is conservative; fixed seed


# ----------------------------------------------------------------------------- both students


def test_both_students_run_and_are_certified(instance, runs):
    mdp, theta_star, pi_E = instance
    pi_star, _ = plan(mdp, rewards(mdp, theta_star))
    for student, result in runs.items():
        assert result.student == student and result.T == T_RUN
        for name in ("values", "certificate_gaps", "instantaneous_regret", "cumulative_regret", "J_students",
                     "potentials", "zeta", "theta_hat", "thetas", "v_students", "X"):
            assert np.all(np.isfinite(getattr(result, name))), name
        assert result.max_certificate_gap <= result.solver_tol
        assert all(status == "optimal" for status in result.statuses)
        reference = pi_E if student == "pessimistic" else pi_star
        assert result.J_ref == pytest.approx(value(mdp, reference, theta_star), abs=1e-12)
        np.testing.assert_allclose(result.J_students, result.v_students @ theta_star, atol=1e-12)
        np.testing.assert_allclose(result.cumulative_regret, np.cumsum(result.J_ref - result.J_students), atol=1e-12)
        assert result.R_T == pytest.approx(result.cumulative_regret[-1])
        assert np.all(np.linalg.norm(result.thetas, axis=1) <= B * (1 + 1e-9))
    assert runs["pessimistic"].v_E_source == "estimated"
    assert runs["optimistic"].v_E_source == "exact"
    assert runs["optimistic"].oracle.startswith("enumeration")
    assert "min-max" in runs["pessimistic"].oracle
    # regret against pi* is never negative
    assert np.all(runs["optimistic"].instantaneous_regret >= -1e-12)


def test_theorem_2_per_round_inequalities(runs):
    """On theta* in C_{t-1}: pessimistic r_t <= 2 B ||v_E - v_hat_E,t||; optimistic r_t <= (theta_t - theta*)^T mu_t."""
    pessimistic, optimistic = runs["pessimistic"], runs["optimistic"]
    covered_before = np.concatenate([[True], pessimistic.covered[:-1]])  # C_0 is the ball
    v_hat = np.cumsum(pessimistic.teacher_features, axis=0) / np.arange(1, pessimistic.T + 1)[:, None]
    slack = 2 * B * np.linalg.norm(pessimistic.v_E - v_hat, axis=1)
    assert np.all(pessimistic.instantaneous_regret[covered_before] <= slack[covered_before] + 1e-6)
    covered_before = np.concatenate([[True], optimistic.covered[:-1]])
    optimism = np.einsum("td,td->t", optimistic.thetas - optimistic.theta_star, optimistic.mu)
    assert np.all(optimistic.instantaneous_regret[covered_before] <= optimism[covered_before] + 1e-7)


def test_greedy_plug_in_plays_the_plan_of_the_previous_mle(instance):
    """The greedy baseline's pi_t is the optimal deterministic policy for theta_hat_{t-1} (theta_hat_0 = 0),
    its regret is against pi*, and it keeps no confidence set (every round 'optimal', exact planning).
    A student one round late (theta_hat_t) or planning for theta* would fail the first check."""
    mdp, theta_star, pi_E = instance
    result = online_pbkd(mdp, pi_E, theta_star, 20, np.random.default_rng(7), B=B, student="greedy")
    assert result.student == "greedy" and result.oracle.startswith("greedy plug-in")
    pi_star, _ = plan(mdp, rewards(mdp, theta_star))
    assert result.J_ref == pytest.approx(value(mdp, pi_star, theta_star), abs=1e-12)
    for t in range(1, 21):
        theta = result.theta_hat[t - 2] if t > 1 else np.zeros(mdp.d)
        np.testing.assert_array_equal(result.thetas[t - 1], theta)
        policy, _ = plan(mdp, rewards(mdp, theta))
        np.testing.assert_allclose(result.v_students[t - 1], feature_expectation(mdp, policy), atol=1e-12)
    assert result.statuses == ["optimal"] * 20 and np.all(result.instantaneous_regret >= -1e-12)


def test_optimistic_enumeration_is_exact(instance):
    """Branch and bound returns the maximum of sigma_C(v_pi - v_E) over every deterministic policy (brute force)."""
    mdp, theta_star, pi_E = instance
    rng = np.random.default_rng(3)
    from pbkd_ref.preferences import sample_preferences

    sample = sample_preferences(mdp, pi_E, np.full((mdp.H, mdp.S, mdp.A), 0.5), theta_star, 60, rng)
    prefs = aggregate(sample.X, sample.y)
    v_E = feature_expectation(mdp, pi_E)
    candidates = deterministic_policies(mdp)
    assert candidates.count == mdp.A ** (mdp.H * mdp.S)  # every (h, s) is reachable in a random MDP
    everything = []  # every deterministic policy, independently of the hull reduction
    for choice in itertools.product(range(mdp.A), repeat=mdp.H * mdp.S):
        pi = np.zeros((mdp.H, mdp.S, mdp.A))
        pi[np.repeat(np.arange(mdp.H), mdp.S), np.tile(np.arange(mdp.S), mdp.H), choice] = 1.0
        everything.append(feature_expectation(mdp, pi))
    assert len(candidates.features) < len(everything)
    for cset in (Ball(B, mdp.d), LikelihoodSet(prefs, B, 3.0)):
        brute = max(cset.support(v - v_E)[0] for v in everything)
        choice = optimistic_student(mdp, v_E, cset, oracle="enumeration", candidates=candidates)
        assert choice.value == pytest.approx(brute, abs=1e-9)
        assert choice.certificate_gap <= 1e-7
        assert choice.value == pytest.approx(choice.theta @ (feature_expectation(mdp, choice.policy) - v_E), abs=1e-8)
        # the alternating oracle is local: it never exceeds the exact optimum
        local = optimistic_student(mdp, v_E, cset, oracle="alternating", restarts=4, rng=np.random.default_rng(0))
        assert local.value <= choice.value + 1e-9
        assert local.oracle.startswith("alternating")


@given(seed=st.integers(0, 2**32 - 1), tree=st.booleans(), H=st.integers(1, 3))
@settings(max_examples=25)
def test_enumeration_oracle_is_exact_for_ball_and_singleton(seed, tree, H):
    """Hull reduction + branch and bound against closed forms: max_pi B ||v_pi - v_E|| over every deterministic
    policy (Ball), and max_pi J(pi, theta) - theta^T v_E by backward induction (Singleton)."""
    from pbkd_ref.confidence import Singleton

    rng = np.random.default_rng(seed)
    mdp = token_tree_mdp(2, H, 3, rng) if tree else random_mdp(2, 2, H, 3, rng, dirichlet=0.3)
    v_E = rng.normal(size=3) * 0.3
    candidates = deterministic_policies(mdp)
    everything = []
    for choice in itertools.product(range(mdp.A), repeat=mdp.H * mdp.S):
        pi = np.zeros((mdp.H, mdp.S, mdp.A))
        pi[np.repeat(np.arange(mdp.H), mdp.S), np.tile(np.arange(mdp.S), mdp.H), choice] = 1.0
        everything.append(feature_expectation(mdp, pi))
    ball = optimistic_student(mdp, v_E, Ball(B, 3), oracle="enumeration", candidates=candidates)
    assert ball.value == pytest.approx(B * max(np.linalg.norm(v - v_E) for v in everything), abs=1e-9)
    theta = rng.normal(size=3)
    single = optimistic_student(mdp, v_E, Singleton(theta), oracle="enumeration", candidates=candidates)
    _, V = plan(mdp, rewards(mdp, theta))
    assert single.value == pytest.approx(float(mdp.rho @ V[0] - theta @ v_E), abs=1e-9)
    assert single.certificate_gap <= 1e-9 and ball.certificate_gap <= 1e-9


def test_alternating_oracle_on_a_larger_token_tree():
    """Too many deterministic policies to enumerate: auto falls back to the alternating oracle, a fixed point.
    Its rounds are marked ``local``, never ``optimal``: a best-response fixed point certifies no global
    maximum, and theory/regret.py counts every round not ``optimal`` as uncertified."""
    rng = np.random.default_rng(8)
    mdp = token_tree_mdp(3, 4, 3, rng)  # 3^(1+3+9+27) deterministic policies
    theta_star = np.array([1.0, -2.0, 0.5])
    pi_E = softmax_policy(mdp, rewards(mdp, theta_star), 0.1)
    with pytest.raises(ValueError, match="max_policies"):
        deterministic_policies(mdp)
    result = online_pbkd(mdp, pi_E, theta_star, 5, np.random.default_rng(1), B=B, student="optimistic", restarts=3)
    assert result.oracle.startswith("alternating best response")
    assert result.max_certificate_gap <= 1e-7 and np.all(np.isfinite(result.cumulative_regret))
    assert result.statuses == ["local"] * 5


# ----------------------------------------------------------------------------- warm starts


def test_warm_start_gives_the_same_answer_as_a_cold_solve(instance, runs):
    """Re-solve selected rounds from scratch (cold MLE, cold set, cold solver) and compare with the warm run."""
    mdp, theta_star, pi_E = instance
    v_E = feature_expectation(mdp, pi_E)
    candidates = deterministic_policies(mdp)
    for student, result in runs.items():
        for t in (2, 15, result.T):  # round t used C_{t-1}
            prefs = aggregate(result.X[: t - 1], result.y[: t - 1])
            cset = LikelihoodSet(prefs, B, result.zeta[t - 2])  # cold MLE (fit_mle from 0)
            # same likelihood at the warm and cold MLE, hence the same set C_{t-1}
            assert nll(prefs, result.theta_hat[t - 2]) == pytest.approx(cset.nll_hat, abs=1e-9)
            if student == "pessimistic":
                v_hat = result.teacher_features[:t].mean(axis=0)
                cold = solve(mdp, v_hat, cset, tol=1e-7)
                assert cold.value == pytest.approx(result.values[t - 1], abs=2e-7)
            else:
                cold = optimistic_student(mdp, v_E, cset, oracle="enumeration", candidates=candidates)
                assert cold.value == pytest.approx(result.values[t - 1], abs=1e-8)


def test_cold_run_matches_warm_run(instance):
    mdp, theta_star, pi_E = instance
    kwargs = dict(B=B, student="pessimistic")
    warm = online_pbkd(mdp, pi_E, theta_star, 12, np.random.default_rng(5), warm_start=True, **kwargs)
    cold = online_pbkd(mdp, pi_E, theta_star, 12, np.random.default_rng(5), warm_start=False, **kwargs)
    assert warm.warm_start and not cold.warm_start
    np.testing.assert_allclose(warm.values, cold.values, atol=2e-7)
    for t in range(1, 13):
        prefs = aggregate(warm.X[:t], warm.y[:t])
        assert nll(prefs, warm.theta_hat[t - 1]) == pytest.approx(nll(prefs, cold.theta_hat[t - 1]), abs=1e-9)


def test_bad_input_raises_value_error(instance):
    mdp, theta_star, pi_E = instance
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="student"):
        online_pbkd(mdp, pi_E, theta_star, 3, rng, B=B, student="random")
    with pytest.raises(ValueError, match="realisability"):
        online_pbkd(mdp, pi_E, theta_star, 3, rng, B=1.0)
    with pytest.raises(ValueError, match="exact v_E"):
        online_pbkd(mdp, pi_E, theta_star, 3, rng, B=B, student="optimistic", v_E_source="estimated")
    with pytest.raises(ValueError, match="L_x"):
        online_pbkd(mdp, pi_E, theta_star, 3, rng, B=B, L_x=1e-6)
    with pytest.raises(ValueError, match="T must"):
        online_pbkd(mdp, pi_E, theta_star, 0, rng, B=B)
    with pytest.raises(ValueError, match="lam"):
        elliptical_potentials(np.ones((3, 2)), 0.0)
    with pytest.raises(ValueError, match="oracle"):
        optimistic_student(mdp, np.zeros(mdp.d), Ball(B, mdp.d), oracle="exhaustive")

"""Property 8 of spec tabular.md section 6: the exact min-max solvers of section 3.

    value = min_pi max_{theta in C} theta^T (v_E - v_pi)

- Sion's minimax theorem made computational: (A) joint conjugate program, (B) dual LP
  and (D) cutting planes agree to 1e-6, each with certificate gap <= tol;
- weak duality: ``certificate`` brackets the value for any (occupancy, theta in C);
- teacher feasibility: value <= 0 with the exact v_E;
- monotonicity in the set: nested sets give ordered values;
- relabelling invariance of states and actions;
- C = {theta*} reduces to planning: the student is optimal for theta*, checked against
  enumeration of all deterministic policies;
- C = B-ball reduces to moment matching, B min_pi ||v_E - v_pi||, checked against an
  independent QP over the convex hull of the deterministic policies' feature expectations.

Instances are tiny (cvxpy is slow) and the examples few.
"""

from __future__ import annotations

import itertools

import cvxpy as cp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pbkd_ref.confidence import Ball, LikelihoodSet, Singleton
from pbkd_ref.mdp import (
    MDP,
    feature_expectation,
    occupancy,
    plan,
    random_mdp,
    rewards,
    softmax_policy,
    value,
)
from pbkd_ref.mle import fit_mle
from pbkd_ref.offline import ball_moment_matching
from pbkd_ref.preferences import aggregate, nll, sample_preferences
from pbkd_ref.solvers import METHODS, MinMaxResult, certificate, solve

TOL = 1e-7
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def tiny_problem(seed, *, S=3, A=2, H=3, d=3, N=40, B=3.0, zeta_factor=1.0, black_box=False):
    """A random MDP, a softmax teacher for theta*, its v_E and a likelihood set.

    v_E is exact, or (black_box) the mean feature of the N teacher trajectories of the pairs,
    which moves the value away from the trivial 0 of a set containing theta = 0.
    zeta = zeta_factor * (NLL(theta*) - NLL(theta_hat) + 1), so theta* in C when zeta_factor >= 1.
    """
    rng = np.random.default_rng(seed)
    mdp = random_mdp(S, A, H, d, rng)
    direction = rng.normal(size=d)
    theta_star = 0.6 * B * direction / np.linalg.norm(direction)
    pi_E = softmax_policy(mdp, rewards(mdp, theta_star), 0.2)
    v_E = feature_expectation(mdp, pi_E)
    pi_ref = np.full((H, S, A), 1.0 / A)
    sample = sample_preferences(mdp, pi_E, pi_ref, theta_star, N, rng)
    prefs = aggregate(sample.X, sample.y)
    if black_box:
        v_E = sample.teacher_features.mean(axis=0)
    theta_hat = fit_mle(prefs, B).theta_hat
    zeta = zeta_factor * (nll(prefs, theta_star) - nll(prefs, theta_hat) + 1.0)
    cset = LikelihoodSet(prefs, B, zeta, theta_hat=theta_hat)
    return mdp, v_E, cset, theta_star, pi_E


def deterministic_feature_expectations(mdp: MDP) -> np.ndarray:
    """v_pi for every deterministic Markov policy (the vertices of the feature polytope)."""
    rows = []
    cells = mdp.H * mdp.S
    for choice in itertools.product(range(mdp.A), repeat=cells):
        pi = np.zeros((mdp.H, mdp.S, mdp.A))
        pi.reshape(cells, mdp.A)[np.arange(cells), choice] = 1.0
        rows.append(feature_expectation(mdp, pi))
    return np.array(rows)


def assert_certified(result: MinMaxResult, mdp: MDP, tol: float = TOL) -> None:
    assert result.status == "optimal", result.status
    assert result.certificate_gap <= tol
    assert result.lower <= result.value + 1e-12
    assert result.value == result.upper
    np.testing.assert_allclose(result.occupancy, occupancy(mdp, result.policy), atol=1e-12)


@settings(max_examples=6)
@given(seed=seeds, black_box=st.booleans(), shift=st.sampled_from([0.0, 0.3]))
def test_minimax_theorem_three_solvers_agree(seed, black_box, shift):
    """(A), (B) and (D) solve the same saddle problem: values agree to 1e-6, all certified.

    ``shift`` moves v_E outside the feature polytope (a teacher no student matches), so the
    value is nonzero even when theta = 0 lies in C.
    """
    mdp, v_E, cset, theta_star, _ = tiny_problem(seed, black_box=black_box)
    v_E = v_E + shift * theta_star / np.linalg.norm(theta_star)
    results = {method: solve(mdp, v_E, cset, method=method, tol=TOL) for method in METHODS}
    for method, result in results.items():
        assert_certified(result, mdp)
        assert cset.contains(result.theta), method
    values = [r.value for r in results.values()]
    assert max(values) - min(values) <= 1e-6, {m: r.value for m, r in results.items()}


@settings(max_examples=3)
@given(seed=seeds)
def test_minimax_theorem_three_solvers_agree_on_ball(seed):
    """The same agreement with C the B-ball (second-order cone instead of exponential cones)."""
    mdp, v_E, _, theta_star, _ = tiny_problem(seed)
    # a teacher outside the feature polytope's reach keeps the value away from 0
    v_E = v_E + 0.3 * theta_star / np.linalg.norm(theta_star)
    ball = Ball(2.0, mdp.d)
    values = []
    for method in METHODS:
        result = solve(mdp, v_E, ball, method=method, tol=TOL)
        assert_certified(result, mdp)
        values.append(result.value)
    assert max(values) - min(values) <= 1e-6


@settings(max_examples=5)
@given(seed=seeds)
def test_weak_duality_certificate_brackets_the_value(seed):
    """For any policy's occupancy and any theta in C: lower(theta) <= value <= upper(d)."""
    mdp, v_E, cset, _, _ = tiny_problem(seed)
    result = solve(mdp, v_E, cset, tol=TOL)
    rng = np.random.default_rng(seed)
    pi = rng.dirichlet(np.ones(mdp.A), size=(mdp.H, mdp.S))
    _, theta_in_C = cset.support(rng.normal(size=mdp.d))
    lower, upper = certificate(mdp, v_E, cset, occupancy(mdp, pi), theta_in_C)
    assert lower <= result.value + 1e-9
    assert upper >= result.lower - 1e-9
    # the bounds are what they claim: upper is the policy's worst case, lower theta's best response
    assert upper == pytest.approx(cset.support(v_E - feature_expectation(mdp, pi))[0], abs=1e-12)
    assert lower == pytest.approx(theta_in_C @ v_E - value(mdp, plan(mdp, rewards(mdp, theta_in_C))[0], theta_in_C), abs=1e-10)


@settings(max_examples=5)
@given(seed=seeds)
def test_teacher_feasibility_value_is_nonpositive(seed):
    """With the exact v_E the teacher is a feasible student, so value <= 0 (spec section 3)."""
    mdp, v_E, cset, _, _ = tiny_problem(seed)
    result = solve(mdp, v_E, cset, tol=TOL)
    assert_certified(result, mdp)
    assert result.value <= TOL


@settings(max_examples=4)
@given(seed=seeds)
def test_monotonicity_in_the_confidence_set(seed):
    """C1 subset C2 implies value(C1) <= value(C2): shrinking zeta, then the whole B-ball."""
    mdp, v_E, small, theta_star, _ = tiny_problem(seed, zeta_factor=0.3)
    big = LikelihoodSet(small.prefs, small.B, 3.0 * small.zeta, theta_hat=small.theta_hat)
    ball = Ball(small.B, mdp.d)
    v_E = v_E + 0.2 * theta_star / np.linalg.norm(theta_star)  # a teacher the student cannot match
    values = [solve(mdp, v_E, c, tol=TOL).value for c in (small, big, ball)]
    assert values[0] <= values[1] + 2 * TOL
    assert values[1] <= values[2] + 2 * TOL


def relabel(mdp: MDP, state_perm: np.ndarray, action_perm: np.ndarray) -> MDP:
    """Rename state s as state_perm[s] and, at (h, s), action a as action_perm[h, s, a]."""
    H, S, A = mdp.H, mdp.S, mdp.A
    h, s, a = np.meshgrid(np.arange(H), np.arange(S), np.arange(A), indexing="ij")
    new_s, new_a = state_perm[s], action_perm[h, s, a]
    phi = np.empty_like(mdp.phi)
    phi[h, new_s, new_a] = mdp.phi[h, s, a]
    P = np.empty_like(mdp.P)
    P[h[:-1], new_s[:-1], new_a[:-1]] = mdp.P[:, :, :, np.argsort(state_perm)]
    rho = np.empty_like(mdp.rho)
    rho[state_perm] = mdp.rho
    return MDP(P=P, rho=rho, phi=phi)


@settings(max_examples=4)
@given(seed=seeds)
def test_relabelling_invariance(seed):
    """Renaming states and actions changes neither the value nor the student's feature expectation's worst case."""
    mdp, v_E, cset, _, _ = tiny_problem(seed, S=4, A=3, zeta_factor=0.5)
    rng = np.random.default_rng(seed + 1)
    state_perm = rng.permutation(mdp.S)
    action_perm = np.array([[rng.permutation(mdp.A) for _ in range(mdp.S)] for _ in range(mdp.H)])
    renamed = relabel(mdp, state_perm, action_perm)
    # sanity of the renaming itself: the same policy, renamed, has the same feature expectation
    pi = rng.dirichlet(np.ones(mdp.A), size=(mdp.H, mdp.S))
    h, s, a = np.meshgrid(np.arange(mdp.H), np.arange(mdp.S), np.arange(mdp.A), indexing="ij")
    pi_renamed = np.empty_like(pi)
    pi_renamed[h, state_perm[s], action_perm[h, s, a]] = pi[h, s, a]
    np.testing.assert_allclose(feature_expectation(renamed, pi_renamed), feature_expectation(mdp, pi), atol=1e-12)
    original = solve(mdp, v_E, cset, tol=TOL)
    result = solve(renamed, v_E, cset, tol=TOL)
    assert_certified(result, renamed)
    assert abs(result.value - original.value) <= 2 * TOL


@settings(max_examples=5)
@given(seed=seeds)
def test_singleton_set_reduces_to_planning(seed):
    """C = {theta*}: the student is an optimal policy for theta*; value = theta*^T v_E - max_pi J(pi, theta*).

    max_pi J is taken by enumerating every deterministic policy.
    """
    mdp, v_E, _, theta_star, _ = tiny_problem(seed)
    best = (deterministic_feature_expectations(mdp) @ theta_star).max()
    for method in ("cutting_plane", "dual_lp"):
        result = solve(mdp, v_E, Singleton(theta_star), method=method, tol=TOL)
        assert_certified(result, mdp)
        assert value(mdp, result.policy, theta_star) >= best - 2 * TOL
        assert result.value == pytest.approx(theta_star @ v_E - best, abs=2 * TOL)


@settings(max_examples=4)
@given(seed=seeds, B=st.floats(min_value=0.5, max_value=4.0))
def test_ball_set_reduces_to_moment_matching(seed, B):
    """C = B-ball: value = B min_pi ||v_E - v_pi||, the projection of v_E onto the feature polytope.

    Reference: a QP over convex weights of the deterministic policies' feature expectations.
    """
    mdp, v_E, _, theta_star, _ = tiny_problem(seed)
    v_E = v_E + 0.25 * theta_star / np.linalg.norm(theta_star)
    vertices = deterministic_feature_expectations(mdp)
    weights = cp.Variable(len(vertices), nonneg=True)
    projection = cp.Problem(cp.Minimize(cp.norm(v_E - vertices.T @ weights)), [cp.sum(weights) == 1])
    projection.solve(solver="CLARABEL")
    reference = B * projection.value
    result = solve(mdp, v_E, Ball(B, mdp.d), tol=TOL)
    assert_certified(result, mdp)
    assert result.value == pytest.approx(reference, abs=1e-6)
    assert result.value == pytest.approx(B * np.linalg.norm(v_E - feature_expectation(mdp, result.policy)), abs=1e-9)
    baseline = ball_moment_matching(mdp, v_E, B)
    assert baseline.value == pytest.approx(result.value, abs=2 * TOL)


def test_uncertified_solve_says_so():
    """A solve stopped before its certificate closes reports "uncertified", never "optimal"."""
    mdp, v_E, cset, theta_star, _ = tiny_problem(7, S=4, A=3, H=3, d=3, zeta_factor=3.0)
    v_E = v_E + 0.3 * theta_star / np.linalg.norm(theta_star)
    result = solve(mdp, v_E, cset, tol=1e-12, max_iter=1)
    assert result.status.startswith("uncertified")
    assert result.certificate_gap > 1e-12
    assert result.lower <= result.upper


def test_warm_start_reuses_a_previous_solution():
    mdp, v_E, cset, _, _ = tiny_problem(11, S=4, A=3)
    cold = solve(mdp, v_E, cset, tol=TOL)
    warm = solve(mdp, v_E, cset, tol=TOL, warm=cold)
    assert_certified(warm, mdp)
    assert abs(warm.value - cold.value) <= 2 * TOL
    assert warm.iterations <= cold.iterations


def test_bad_arguments_raise_value_error():
    mdp, v_E, cset, _, _ = tiny_problem(3)
    with pytest.raises(ValueError, match="method"):
        solve(mdp, v_E, cset, method="simplex")
    with pytest.raises(ValueError, match="v_E"):
        solve(mdp, v_E[:-1], cset)
    with pytest.raises(ValueError, match="v_E"):
        solve(mdp, np.full(mdp.d, np.nan), cset)
    with pytest.raises(ValueError, match="tol"):
        solve(mdp, v_E, cset, tol=0.0)
    with pytest.raises(ValueError, match="dimension"):
        solve(mdp, v_E, Ball(1.0, mdp.d + 1))
    with pytest.raises(ValueError, match="protocol"):
        solve(mdp, v_E, object())
    pi = np.full((mdp.H, mdp.S, mdp.A), 1.0 / mdp.A)
    d = occupancy(mdp, pi)
    far = 10.0 * cset.B * np.ones(mdp.d)
    with pytest.raises(ValueError, match="not in the confidence set"):
        certificate(mdp, v_E, cset, d, far)
    with pytest.raises(ValueError, match="flow constraints"):
        certificate(mdp, v_E, cset, 2.0 * d, cset.theta_hat)

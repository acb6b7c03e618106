"""Online PbKD (Algorithm 2, spec tabular.md section 4; theory/STATEMENTS.md Lemmas 3-4, Theorem 2).

Algorithm 2, round ``t = 1..T`` (``C_0`` is the ball ``{||theta|| <= B}``):

    1. tau0_t ~ pi_E                                  (teacher; v_hat_E = mean of the t teacher features)
    2. pi_t  = student(C_{t-1})                       (pessimistic or optimistic, below)
    3. tau1_t ~ pi_t,  x_t = phi(tau1_t) - phi(tau0_t),  o_t ~ Bernoulli(sigma(theta*^T x_t))
    4. D_t = D_{t-1} + (x_t, o_t)                     (aggregated Preferences)
    5. theta_hat_t = argmin_{||theta|| <= B} NLL_t,   C_t = {||theta|| <= B, NLL_t(theta) <= NLL_t(theta_hat_t) + zeta_t}
       with the anytime radius zeta_t = 1 + d log(1 + 2 B L_x t) + log(t (t+1) / delta) (Lemma 3).

Two students, both named, and a baseline:

- ``pessimistic``: ``pi_t = argmin_pi max_{theta in C_{t-1}} theta^T (v_hat_E - v_pi)`` (the min-max of
  Algorithm 1, ``pbkd_ref.solvers.solve``, warm-started from the previous round's solution) with
  ``v_hat_E`` the mean of the ``t`` teacher features (black-box); regret against the teacher,
  ``r_t = J(pi_E, theta*) - J(pi_t, theta*)`` (Theorem 2.2).  Drawing ``tau0_t`` before choosing
  ``pi_t`` is legitimate (``tau0_t ~ pi_E`` does not depend on the student) and gives the ``t``
  samples the theorem uses.
- ``optimistic``: ``pi_t = argmax_pi max_{theta in C_{t-1}} theta^T (v_pi - v_E)`` with the exact
  ``v_E`` (white-box), so that ``mu_t = E_t x_t = v_{pi_t} - v_E`` as Theorem 2.1 needs; regret
  against ``pi*`` of ``theta*``, ``r_t = J(pi*, theta*) - J(pi_t, theta*)``.  The objective is a
  convex function of the occupancy, so its maximum is attained at a deterministic policy:
  ``optimistic_student`` enumerates them on tiny MDPs (exact, branch and bound over the
  candidates with certified upper bounds) and otherwise runs an alternating best-response oracle
  (plan for ``theta``; ``theta = argmax_{C} theta^T (v_pi - v_E)``; repeat) from several restarts,
  a local method.  The result records which oracle ran.
- ``greedy`` (the plug-in baseline, no confidence set): ``pi_t = argmax_pi J(pi, theta_hat_{t-1})``,
  exact planning for the last MLE (``theta_hat_0 = 0``: the lowest-index actions); regret against
  ``pi*`` as for the optimistic student. It explores only through the teacher's own trajectories.

Bookkeeping (Lemma 4): ``V_t = lam I + sum_{s<t} x_s x_s^T`` (``lam = L_x^2`` by default), the
potentials ``min(1, ||x_t||^2_{V_t^{-1}})`` and their running sum, to be compared with
``theory.bounds.elliptical_potential_bound`` (``2 d log(1 + t L_x^2 / (d lam))``); per-round
regret, ``R_T``, whether ``theta* in C_t``, and every solve's certificate gap.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np

from pbkd_ref.confidence import Ball, LikelihoodSet, anytime_radius
from pbkd_ref.mdp import (
    MDP,
    _as_float_array,
    _check_mdp,
    _check_policy,
    _check_positive_int,
    _check_rng,
    feature_expectation,
    occupancy,
    plan,
    rewards,
    sample_trajectories,
    trajectory_features,
)
from pbkd_ref.mle import fit_mle
from pbkd_ref.preferences import aggregate, label_probability
from pbkd_ref.solvers import METHODS, MinMaxResult, _support, solve

STUDENTS = ("pessimistic", "optimistic", "greedy")
ORACLES = ("auto", "enumeration", "alternating")
V_E_SOURCES = ("estimated", "exact")


# ----------------------------------------------------------------------------- Lemma 4


@dataclass
class EllipticalPotential:
    """Lemma 4 bookkeeping for a sequence ``x_1..x_T`` and ``V_1 = lam I``, ``V_{t+1} = V_t + x_t x_t^T``.

    ``potentials[t-1] = min(1, x_t^T V_t^{-1} x_t)``, ``cumulative`` their running sum;
    ``logdet_V[t-1] = log det V_t`` and ``min_eig_V[t-1] = lambda_min(V_t)`` for ``t = 1..T+1``
    (so ``T + 1`` entries); ``V`` is ``V_{T+1}``; ``matrices`` (``(T+1, d, d)``, only when asked
    for) holds every ``V_t``.
    """

    potentials: np.ndarray
    cumulative: np.ndarray
    logdet_V: np.ndarray
    min_eig_V: np.ndarray
    V: np.ndarray
    matrices: np.ndarray | None = None


def elliptical_potentials(X, lam: float, *, return_matrices: bool = False) -> EllipticalPotential:
    """Potentials ``min(1, ||x_t||^2_{V_t^{-1}})`` with ``V_t = lam I + sum_{s<t} x_s x_s^T`` (Lemma 4).

    Each ``||x_t||^2_{V_t^{-1}}`` is a Cholesky solve with the current ``V_t``; Lemma 4 states
    ``sum_{t<=T} min(1, .) <= 2 d log(1 + T L_x^2 / (d lam))`` whenever ``||x_t|| <= L_x``.
    """
    X = _as_float_array(X, "X", 2)
    if isinstance(lam, bool) or not np.isscalar(lam) or not np.isfinite(lam) or lam <= 0:
        raise ValueError(f"lam must be a finite number > 0 (the regulariser of V_t); got {lam!r}")
    T, d = X.shape
    V = float(lam) * np.eye(d)
    potentials = np.empty(T)
    logdet = np.empty(T + 1)
    min_eig = np.empty(T + 1)
    matrices = np.empty((T + 1, d, d)) if return_matrices else None
    for t in range(T + 1):
        eig = np.linalg.eigvalsh(V)
        logdet[t] = float(np.sum(np.log(eig)))
        min_eig[t] = float(eig[0])
        if matrices is not None:
            matrices[t] = V
        if t == T:
            break
        x = X[t]
        chol = np.linalg.cholesky(V)
        z = np.linalg.solve(chol, x)
        potentials[t] = min(1.0, float(z @ z))
        V = V + np.outer(x, x)
    return EllipticalPotential(
        potentials=potentials,
        cumulative=np.cumsum(potentials),
        logdet_V=logdet,
        min_eig_V=min_eig,
        V=V,
        matrices=matrices,
    )


# ----------------------------------------------------------------------------- the optimistic student


@dataclass(frozen=True, eq=False)
class DeterministicPolicies:
    """Deterministic policies of a tiny MDP whose feature expectations are the vertices of ``conv{v_pi}``.

    Only actions at reachable ``(h, s)`` are enumerated (elsewhere the policy is uniform and
    does not change ``v_pi``); ``actions[k, h, s]`` is policy ``k``'s action (``-1`` where
    unreachable) and ``features[k] = v_{pi_k}``.  ``count`` is the number of deterministic
    policies enumerated before keeping one per distinct vertex of the convex hull of their
    feature expectations (the occupancy polytope maps onto that hull, and a convex objective
    such as the optimistic index is maximised at one of its vertices).
    """

    actions: np.ndarray  # (K, H, S) int
    features: np.ndarray  # (K, d)
    count: int

    def policy(self, mdp: MDP, k: int) -> np.ndarray:
        """Policy ``k`` as an ``(H, S, A)`` table (uniform at unreachable states)."""
        pi = np.full((mdp.H, mdp.S, mdp.A), 1.0 / mdp.A)
        h, s = np.nonzero(self.actions[k] >= 0)
        pi[h, s] = 0.0
        pi[h, s, self.actions[k, h, s]] = 1.0
        return pi


def deterministic_policies(mdp: MDP, max_policies: int = 4096) -> DeterministicPolicies:
    """Enumerate the deterministic policies of ``mdp`` (reachable states only), or raise if there are too many.

    Reachability: ``(h, s)`` has positive probability under the uniform policy (then under
    some deterministic policy).  There are ``A^(#reachable (h, s))`` policies; more than
    ``max_policies`` raises ``ValueError`` (use the alternating oracle).
    """
    mdp = _check_mdp(mdp)
    max_policies = _check_positive_int(max_policies, "max_policies")
    uniform = np.full((mdp.H, mdp.S, mdp.A), 1.0 / mdp.A)
    reachable = occupancy(mdp, uniform).sum(axis=-1) > 0.0
    hs = np.argwhere(reachable)
    count = mdp.A ** len(hs)
    if count > max_policies:
        raise ValueError(
            f"the MDP has {mdp.A}^{len(hs)} = {count} deterministic policies (reachable states), more than "
            f"max_policies = {max_policies}; use oracle='alternating' or raise max_policies"
        )
    actions = np.full((count, mdp.H, mdp.S), -1, dtype=np.int64)
    features = np.empty((count, mdp.d))
    table = DeterministicPolicies(actions=actions, features=features, count=count)
    for k, choice in enumerate(itertools.product(range(mdp.A), repeat=len(hs))):
        actions[k, hs[:, 0], hs[:, 1]] = choice
        features[k] = feature_expectation(mdp, table.policy(mdp, k))
    _, first = np.unique(np.round(features, 12), axis=0, return_index=True)
    first = np.sort(first)
    keep = first[_extreme_points(features[first])]
    return DeterministicPolicies(actions=actions[keep], features=features[keep], count=count)


def _extreme_points(F: np.ndarray) -> np.ndarray:
    """Indices of the vertices of ``conv(rows of F)`` (all rows when Qhull cannot decide).

    A convex function of ``v`` (here ``sigma_C(v - v_E)``) attains its maximum over a finite
    set at a vertex of the set's convex hull, so the other points can be dropped.  The points
    are first expressed in their affine hull (SVD), where Qhull needs full dimension.
    """
    from scipy.spatial import ConvexHull, QhullError

    K = F.shape[0]
    if K <= 2:
        return np.arange(K)
    Y = F - F.mean(axis=0)
    _, singular, Vt = np.linalg.svd(Y, full_matrices=False)
    rank = int(np.sum(singular > 1e-9 * max(singular[0], 1e-300)))
    if rank == 0:
        return np.array([0])
    Z = Y @ Vt[:rank].T
    if rank == 1:
        return np.unique([int(np.argmin(Z[:, 0])), int(np.argmax(Z[:, 0]))])
    if K <= rank + 1:
        return np.arange(K)
    try:
        return np.sort(ConvexHull(Z).vertices)
    except (QhullError, ValueError):
        return np.arange(K)


@dataclass
class OptimisticChoice:
    """One optimistic decision ``(pi_t, theta_t)`` and how it was found.

    ``value = theta^T (v_pi - v_E) = sigma_C(v_pi - v_E)`` (the optimistic index).
    ``certificate_gap`` is the best-response gap of the pair: ``[max_pi' J(pi', theta) - J(pi, theta)]
    + [sigma_C(v_pi - v_E) - theta^T (v_pi - v_E)]``, zero at a fixed point; with
    ``oracle`` starting with ``"enumeration"`` the pair is moreover the global maximiser
    (every candidate was evaluated or bounded below the best value).
    """

    policy: np.ndarray
    theta: np.ndarray
    value: float
    certificate_gap: float
    oracle: str
    support_calls: int
    candidate_thetas: np.ndarray | None = None  # enumeration: latest support maximiser of each candidate
    candidate_index: int | None = None  # enumeration: the winning candidate


def _support_upper_bound(cset):
    """A function ``U -> bounds`` with certified ``bounds[k] >= sigma_C(U[k])``, without solving.

    Always ``sigma_C(u) <= B ||u||``.  For a likelihood set: on the ball
    ``|x_m^T xi| <= B ||x_m||``, so the Hessian of ``NLL`` is at least
    ``M = sum_m n_m sigma'(B ||x_m||) x_m x_m^T`` (row-wise curvature, never looser than
    ``gamma X^T diag(n) X``), and with the first-order optimality of ``theta_hat`` on the ball
    every ``theta in C`` has ``||theta - theta_hat||^2_M <= 2 zeta``; it also has
    ``||theta - theta_hat|| <= 2B``, so ``||theta - theta_hat||^2_{M + c I} <= 2 zeta + 4 c B^2``
    for any ``c > 0``, whose support is ``theta_hat^T u + sqrt((2 zeta + 4 c B^2) u^T (M + c I)^{-1} u)``.
    A small relative slack covers the MLE's finite accuracy.
    """
    ellipsoid = None
    if isinstance(cset, LikelihoodSet) and cset.prefs.M > 0:
        X, counts = np.asarray(cset.prefs.X), np.asarray(cset.prefs.counts)
        z = cset.B * np.linalg.norm(X, axis=1)
        curvature = np.exp(-z) / (1.0 + np.exp(-z)) ** 2  # sigma'(B ||x_m||)
        M = (X.T * (counts * curvature)) @ X
        c = 1e-3 * max(float(np.trace(M)) / M.shape[0], 1e-12)
        inverse = np.linalg.inv(M + c * np.eye(M.shape[0]))
        ellipsoid = (np.asarray(cset.theta_hat), 0.5 * (inverse + inverse.T), 2.0 * cset.zeta + 4.0 * c * cset.B**2)

    def bound(U: np.ndarray) -> np.ndarray:
        norms = np.linalg.norm(U, axis=1)
        bounds = cset.B * norms
        if ellipsoid is not None:
            center, inverse, radius2 = ellipsoid
            quadratic = np.maximum(np.einsum("kd,de,ke->k", U, inverse, U), 0.0)
            bounds = np.minimum(bounds, U @ center + np.sqrt(radius2 * quadratic))
        return bounds * (1.0 + 1e-7) + 1e-9 * cset.B * norms

    return bound


def _best_response_gap(mdp: MDP, cset, v_E: np.ndarray, pi: np.ndarray, theta: np.ndarray, value: float) -> float:
    v_pi = feature_expectation(mdp, pi)
    _, V = plan(mdp, rewards(mdp, theta))
    plan_gap = float(mdp.rho @ V[0]) - float(theta @ v_pi)
    return max(plan_gap, 0.0) + max(value - float(theta @ (v_pi - v_E)), 0.0)


def optimistic_student(mdp: MDP, v_E, cset, *, oracle: str = "auto", candidates: DeterministicPolicies | None = None,
                       restarts: int = 8, rng: np.random.Generator | None = None, warm=None,
                       max_policies: int = 4096, max_iter: int = 100) -> OptimisticChoice:
    """``argmax_pi max_{theta in C} theta^T (v_pi - v_E) = argmax_pi sigma_C(v_pi - v_E)`` (spec section 4).

    oracle:
      - ``"enumeration"``: exact.  Candidates are the deterministic policies (``candidates``, or
        ``deterministic_policies(mdp, max_policies)``); their indices ``sigma_C(v_k - v_E)`` are
        evaluated in decreasing order of a certified upper bound (``B ||u||`` and the likelihood
        ellipsoid) until the next bound is below the best value found: branch and bound, so the
        answer is the maximum over all candidates.
      - ``"alternating"``: local.  From each start ``theta_0`` (``warm``, the set's ``theta_hat`` and
        ``restarts`` maximisers of ``C`` in random directions drawn from ``rng``):
        ``pi = plan(theta)``, ``theta = argmax_{C} theta^T (v_pi - v_E)``, repeated while the index
        increases (it never decreases); the best end point wins.
      - ``"auto"``: enumeration when ``candidates`` is given or the MDP has at most
        ``max_policies`` deterministic policies, else alternating.
    warm: ``None``, a start point ``theta`` (``(d,)``), or the previous ``OptimisticChoice`` (the
      enumeration then restarts each candidate's support call from its previous maximiser and
      evaluates the previous winner first; the alternating oracle starts from its ``theta``).
    """
    mdp = _check_mdp(mdp)
    v_E = _as_float_array(v_E, "v_E", 1)
    if v_E.shape != (mdp.d,):
        raise ValueError(f"v_E must have shape (d,) = ({mdp.d},); got {v_E.shape}")
    if getattr(cset, "d", None) != mdp.d or not callable(getattr(cset, "support", None)):
        raise ValueError("cset must be a confidence set (Ball, LikelihoodSet, ...) of dimension d = mdp.d")
    if oracle not in ORACLES:
        raise ValueError(f"oracle must be one of {ORACLES}; got {oracle!r}")
    if oracle == "auto":
        if candidates is None:
            try:
                candidates = deterministic_policies(mdp, max_policies)
            except ValueError:
                candidates = None
        oracle = "enumeration" if candidates is not None else "alternating"
    if oracle == "enumeration":
        if candidates is None:
            candidates = deterministic_policies(mdp, max_policies)
        return _enumeration_oracle(mdp, v_E, cset, candidates, warm)
    restarts = _check_positive_int(restarts, "restarts", minimum=0)
    rng = np.random.default_rng(0) if rng is None else _check_rng(rng)
    return _alternating_oracle(mdp, v_E, cset, restarts, rng, warm, max_iter)


def _enumeration_oracle(mdp, v_E, cset, candidates: DeterministicPolicies, warm) -> OptimisticChoice:
    """Branch and bound over the candidates: evaluate ``sigma_C(u_k)`` in decreasing order of an upper bound.

    Bounds: the static ``_support_upper_bound`` and, after each evaluation ``sigma_C(u_j)``,
    sublinearity ``sigma_C(u_k) <= sigma_C(u_j) + sigma_C(u_k - u_j)``.  Stops when no
    unevaluated bound exceeds the best value, so the answer is the maximum over all candidates.
    ``warm``: a ``(d,)`` start point for every support call, or the previous round's
    ``OptimisticChoice`` on the same candidates (each candidate's support call starts at its
    previous maximiser, and the previous winner is evaluated first).
    """
    U = candidates.features - v_E
    K = U.shape[0]
    static_bound = _support_upper_bound(cset)
    upper = static_bound(U)
    thetas = np.full((K, mdp.d), np.nan)
    first = None
    if isinstance(warm, OptimisticChoice):
        if warm.candidate_thetas is None or warm.candidate_thetas.shape != (K, mdp.d):
            raise ValueError("warm must be an OptimisticChoice from the enumeration oracle on the same candidates")
        thetas = warm.candidate_thetas.copy()
        first = warm.candidate_index
    elif warm is not None:
        thetas[:] = _as_float_array(warm, "warm", 1)
    evaluated = np.zeros(K, dtype=bool)
    best_value, best_k, calls = -np.inf, -1, 0
    while True:
        open_bounds = np.where(evaluated, -np.inf, upper)
        k = int(np.argmax(open_bounds)) if first is None else first
        first = None
        if evaluated[k] or open_bounds[k] <= best_value:
            break
        start = thetas[k] if np.all(np.isfinite(thetas[k])) else None
        value_k, thetas[k] = _support(cset, U[k], start)
        calls += 1
        evaluated[k] = True
        upper[k] = value_k
        if value_k > best_value:
            best_value, best_k = value_k, k
        upper = np.minimum(upper, value_k + static_bound(U - U[k]))
    policy = candidates.policy(mdp, best_k)
    gap = _best_response_gap(mdp, cset, v_E, policy, thetas[best_k], best_value)
    name = (f"enumeration ({K} hull vertices of {candidates.count} deterministic policies, "
            "branch and bound; exact)")
    return OptimisticChoice(policy, thetas[best_k].copy(), float(best_value), gap, name, calls, thetas, best_k)


def _alternating_oracle(mdp, v_E, cset, restarts, rng, warm, max_iter) -> OptimisticChoice:
    starts = []
    if isinstance(warm, OptimisticChoice):
        starts.append(np.asarray(warm.theta, dtype=np.float64))
    elif warm is not None:
        starts.append(_as_float_array(warm, "warm", 1))
    if getattr(cset, "theta_hat", None) is not None:
        starts.append(np.asarray(cset.theta_hat, dtype=np.float64))
    calls = 0
    for _ in range(restarts):
        _, theta = _support(cset, rng.standard_normal(mdp.d))
        calls += 1
        starts.append(theta)
    if not starts:
        starts.append(np.zeros(mdp.d))
    best = (-np.inf, None, None)
    for theta in starts:
        value, policy = -np.inf, None
        for _ in range(max_iter):
            candidate, _ = plan(mdp, rewards(mdp, theta))
            if policy is not None and np.array_equal(candidate, policy):
                break  # fixed point: pi is a best response to theta and theta to pi
            new_value, new_theta = _support(cset, feature_expectation(mdp, candidate) - v_E, theta)
            calls += 1
            if new_value <= value:
                break
            value, theta, policy = new_value, new_theta, candidate
        if value > best[0]:
            best = (value, theta, policy)
    value, theta, policy = best
    gap = _best_response_gap(mdp, cset, v_E, policy, theta, value)
    name = f"alternating best response (local; {len(starts)} starts, {restarts} random)"
    return OptimisticChoice(policy, theta, float(value), gap, name, calls)


# ----------------------------------------------------------------------------- Algorithm 2


@dataclass
class OnlineResult:
    """Per-round record of one run of Algorithm 2 (arrays indexed by round ``t - 1``, ``t = 1..T``).

    ``values[t-1]``/``thetas[t-1]``/``certificate_gaps[t-1]``: the solve that chose ``pi_t`` (from
    ``C_{t-1}``): the min-max value (pessimistic), the optimistic index, or the greedy student's
    ``theta^T (v_pi - v_E)`` at ``theta = theta_hat_{t-1}``.  ``zeta``,
    ``theta_hat``, ``covered`` describe ``C_t`` built after round ``t``.  Regret is exact:
    ``instantaneous_regret[t-1] = J(pi_ref, theta*) - J(pi_t, theta*)`` with ``pi_ref = pi_E``
    (pessimistic) or ``pi*`` (optimistic, greedy).
    """

    student: str
    oracle: str
    v_E_source: str
    T: int
    d: int
    B: float
    L_x: float
    lam: float
    delta: float
    theta_star: np.ndarray
    v_E: np.ndarray  # exact teacher feature expectation
    v_ref: np.ndarray  # feature expectation of the regret reference (pi_E or pi*)
    J_ref: float
    X: np.ndarray  # (T, d) x_t
    y: np.ndarray  # (T,)
    teacher_features: np.ndarray  # (T, d) phi(tau0_t)
    v_students: np.ndarray  # (T, d) v_{pi_t}
    J_students: np.ndarray  # (T,)
    instantaneous_regret: np.ndarray  # (T,)
    cumulative_regret: np.ndarray  # (T,)
    potentials: np.ndarray  # (T,) min(1, ||x_t||^2_{V_t^{-1}})
    cumulative_potential: np.ndarray  # (T,)
    logdet_V: np.ndarray  # (T+1,) log det V_t, t = 1..T+1
    min_eig_V: np.ndarray  # (T+1,)
    V_final: np.ndarray  # V_{T+1} = lam I + sum_{t<=T} x_t x_t^T
    zeta: np.ndarray  # (T,) anytime radius of C_t
    theta_hat: np.ndarray  # (T, d) MLE of D_t
    covered: np.ndarray  # (T,) bool, theta* in C_t
    values: np.ndarray  # (T,)
    thetas: np.ndarray  # (T, d)
    certificate_gaps: np.ndarray  # (T,)
    statuses: list[str]  # per round: "optimal" (certified), "local" (alternating fixed point), "uncertified: ..."
    policy: np.ndarray  # (H, S, A) the last student pi_T
    seconds: float
    solver_tol: float
    warm_start: bool

    @property
    def R_T(self) -> float:
        """Cumulative regret after ``T`` rounds."""
        return float(self.cumulative_regret[-1])

    @property
    def mu(self) -> np.ndarray:
        """``mu_t = v_{pi_t} - v_E = E_t x_t`` (exact), rows ``t = 1..T``."""
        return self.v_students - self.v_E

    @property
    def all_covered(self) -> bool:
        """Whether ``theta*`` lay in every ``C_t`` (the event of Lemma 3)."""
        return bool(np.all(self.covered))

    @property
    def max_certificate_gap(self) -> float:
        return float(np.max(self.certificate_gaps))


def _default_L_x(mdp: MDP) -> float:
    """``2 sum_h max_{s,a} ||phi[h,s,a]||``: bounds ``||phi(tau)||`` by ``L``, hence ``||x|| <= L_x = 2L``."""
    return float(2.0 * np.sum(np.max(np.linalg.norm(mdp.phi, axis=-1), axis=(1, 2))))


def _ball_if_inactive(cset: LikelihoodSet):
    """``Ball(B, d)`` when the likelihood constraint cannot bind on the ball, else ``cset`` itself.

    ``max_{||theta|| <= B} NLL(theta) <= sum_m n_m softplus(B ||x_m||)``; when this is at most the
    level ``NLL(theta_hat) + zeta`` the set is exactly the ball (typical in early rounds, where
    ``zeta_t`` exceeds what ``t`` pairs can spend).
    """
    norms = np.linalg.norm(cset.prefs.X, axis=1)
    worst = float(cset.prefs.counts @ np.logaddexp(0.0, cset.B * norms))
    return Ball(cset.B, cset.d) if worst <= cset.level else cset


def _fit_mle(prefs, B: float, theta0: np.ndarray | None) -> tuple[np.ndarray, bool]:
    """The MLE of ``D_t`` by the project's ball-constrained Newton (``pbkd_ref.mle``).

    Cold: ``fit_mle`` (Newton from ``0``).  Warm: the same Newton started
    at the previous round's ``theta_hat``, which one new pair moves little.  When the design is
    rank deficient the two may return different minimisers; they have the same likelihood, so
    ``C_t`` is the same set.
    """
    fit = fit_mle(prefs, B, theta0=theta0)
    return fit.theta_hat, fit.converged


def online_pbkd(mdp: MDP, pi_E, theta_star, T: int, rng: np.random.Generator, *, B: float,
                student: str = "pessimistic", delta: float = 0.05, L_x: float | None = None,
                lam: float | None = None, v_E_source: str | None = None, method: str = "cutting_plane",
                oracle: str = "auto", restarts: int = 8, max_policies: int = 4096, warm_start: bool = True,
                tol: float = 1e-7, progress: bool = False) -> OnlineResult:
    """Algorithm 2 (online PbKD), spec section 4; see the module docstring for the round.

    mdp, pi_E, theta_star: the instance, the teacher and the true reward (``||theta*|| <= B``, (A1)).
    T, rng: number of rounds and the generator of the data (trajectories, labels; the oracle's
      restarts use a generator split off it at the start).
    student: ``"pessimistic"`` or ``"optimistic"``.
    L_x: a bound on ``||x_t||``; default ``2 sum_h max_{s,a} ||phi[h,s,a]||``.  Used by the anytime
      radius and Lemma 4; an observed ``||x_t|| > L_x`` raises ``ValueError``.
    lam: regulariser of ``V_t``; default ``L_x^2`` (Theorem 2).
    v_E_source: ``"estimated"`` (mean of the ``t`` teacher features; the pessimistic default) or
      ``"exact"`` (white-box; the optimistic student's only option, and for the pessimistic
      student the trap of spec section 5: regret against the teacher ``<= 0`` on the event).
    method, tol: min-max solver and certificate tolerance (pessimistic; ``solvers.solve``).
    oracle, restarts, max_policies: the optimistic oracle (``optimistic_student``).
    warm_start: re-solve from the previous round: the MLE Newton starts at ``theta_hat_{t-1}``, the
      cutting-plane min-max at the previous ``MinMaxResult`` (``solvers.solve(warm=...)``: its
      occupancy and theta seed the master LP and the oracle; earlier cuts are not kept, since a
      ``theta`` outside ``C_t`` would give an invalid cut); the optimistic enumeration restarts each
      candidate's support call from its previous maximiser (``confidence`` sets' ``support(v, warm)``)
      and evaluates the previous winner first; the alternating oracle adds ``theta_{t-1}`` as a start.
    progress: show a tqdm progress bar over rounds.
    """
    mdp = _check_mdp(mdp)
    pi_E = _check_policy(mdp, pi_E, "pi_E")
    theta_star = _as_float_array(theta_star, "theta_star", 1)
    if theta_star.shape != (mdp.d,):
        raise ValueError(f"theta_star must have shape (d,) = ({mdp.d},); got {theta_star.shape}")
    T = _check_positive_int(T, "T")
    rng = _check_rng(rng)
    if isinstance(B, bool) or not np.isscalar(B) or not np.isfinite(B) or B <= 0:
        raise ValueError(f"B must be a finite number > 0 (the radius of the theta ball); got {B!r}")
    B = float(B)
    if np.linalg.norm(theta_star) > B * (1.0 + 1e-12):
        raise ValueError(
            f"theta_star has norm {np.linalg.norm(theta_star):.4g} > B = {B:g}; Theorem 2 assumes realisability "
            "(A1): raise B or rescale theta_star"
        )
    if student not in STUDENTS:
        raise ValueError(f"student must be one of {STUDENTS}; got {student!r}")
    if not (isinstance(delta, (float, int)) and not isinstance(delta, bool) and 0.0 < delta < 1.0):
        raise ValueError(f"delta must lie in (0, 1); got {delta!r}")
    L_x = _default_L_x(mdp) if L_x is None else L_x
    if isinstance(L_x, bool) or not np.isscalar(L_x) or not np.isfinite(L_x) or L_x <= 0:
        raise ValueError(f"L_x must be a finite number > 0 (a bound on ||x_t||); got {L_x!r}")
    L_x = float(L_x)
    lam = L_x**2 if lam is None else lam
    if isinstance(lam, bool) or not np.isscalar(lam) or not np.isfinite(lam) or lam <= 0:
        raise ValueError(f"lam must be a finite number > 0; got {lam!r}")
    lam = float(lam)
    if v_E_source is None:
        v_E_source = "estimated" if student == "pessimistic" else "exact"
    if v_E_source not in V_E_SOURCES:
        raise ValueError(f"v_E_source must be one of {V_E_SOURCES} or None; got {v_E_source!r}")
    if student == "optimistic" and v_E_source != "exact":
        raise ValueError(
            "the optimistic student needs the exact v_E (Theorem 2.1 uses mu_t = E_t x_t = v_pi_t - v_E); "
            "pass v_E_source='exact' or None"
        )
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if oracle not in ORACLES:
        raise ValueError(f"oracle must be one of {ORACLES}; got {oracle!r}")

    v_E = feature_expectation(mdp, pi_E)
    if student == "pessimistic":
        pi_ref = pi_E
    else:
        pi_ref, _ = plan(mdp, rewards(mdp, theta_star))
    v_ref = feature_expectation(mdp, pi_ref)
    J_ref = float(theta_star @ v_ref)
    candidates = None
    if student == "optimistic" and oracle in ("auto", "enumeration"):  # the greedy student plans exactly
        try:
            candidates = deterministic_policies(mdp, max_policies)
        except ValueError:
            if oracle == "enumeration":
                raise
    oracle_rng = np.random.default_rng(rng.integers(2**63))

    d = mdp.d
    X = np.empty((T, d))
    y = np.empty(T, dtype=np.int64)
    teacher = np.empty((T, d))
    v_students = np.empty((T, d))
    zeta = np.empty(T)
    theta_hat = np.empty((T, d))
    covered = np.empty(T, dtype=bool)
    values = np.empty(T)
    thetas = np.empty((T, d))
    gaps = np.empty(T)
    statuses: list[str] = []
    oracle_names: set[str] = set()
    cset = Ball(B, d)  # C_0: no data yet
    previous_solve: MinMaxResult | None = None
    previous_theta: np.ndarray | None = None
    previous_choice: OptimisticChoice | None = None

    rounds = range(1, T + 1)
    if progress:
        from tqdm import tqdm

        rounds = tqdm(rounds, desc=f"online PbKD ({student})", unit="round")
    start = time.perf_counter()
    for t in rounds:
        i = t - 1
        # 1. teacher trajectory; v_hat_E from the t teacher samples
        teacher[i] = trajectory_features(mdp, *sample_trajectories(mdp, pi_E, 1, rng))[0]
        v_E_used = teacher[: t].mean(axis=0) if v_E_source == "estimated" else v_E
        # 2. the student from C_{t-1}
        if student == "pessimistic":
            solved = solve(mdp, v_E_used, cset, method=method, tol=tol,
                           warm=previous_solve if (warm_start and method == "cutting_plane") else None)
            policy, values[i], thetas[i], gaps[i] = solved.policy, solved.value, solved.theta, solved.certificate_gap
            statuses.append(solved.status)
            oracle_names.add(f"min-max {solved.solver}")
            previous_solve = solved
        elif student == "greedy":
            thetas[i] = theta_hat[i - 1] if i > 0 else np.zeros(d)
            policy, V = plan(mdp, rewards(mdp, thetas[i]))
            values[i], gaps[i] = float(mdp.rho @ V[0]) - float(thetas[i] @ v_E), 0.0
            statuses.append("optimal")
            oracle_names.add("greedy plug-in: exact planning for theta_hat_(t-1)")
        else:
            if candidates is not None:
                choice = optimistic_student(mdp, v_E, cset, oracle="enumeration", candidates=candidates,
                                            warm=previous_choice if warm_start else None)
                previous_choice = choice
            else:
                choice = optimistic_student(mdp, v_E, cset, oracle="alternating", restarts=restarts, rng=oracle_rng,
                                            warm=previous_theta if warm_start else None)
            policy, values[i], thetas[i], gaps[i] = choice.policy, choice.value, choice.theta, choice.certificate_gap
            exact = "optimal" if candidates is not None else "local"  # alternating: a fixed point, no certificate
            statuses.append(exact if choice.certificate_gap <= tol else
                            f"uncertified: best-response gap {choice.certificate_gap:.3e} > tol {tol:.1e}")
            oracle_names.add(choice.oracle if candidates is not None else
                             f"alternating best response (local; {restarts} random restarts plus the "
                             "previous theta and theta_hat as starts)")
        previous_theta = thetas[i].copy()
        v_students[i] = feature_expectation(mdp, policy)
        # 3. student trajectory, Bradley-Terry label
        student_features = trajectory_features(mdp, *sample_trajectories(mdp, policy, 1, rng))[0]
        X[i] = student_features - teacher[i]
        norm_x = float(np.linalg.norm(X[i]))
        if norm_x > L_x * (1.0 + 1e-9):
            raise ValueError(f"observed ||x_{t}|| = {norm_x:.6g} exceeds L_x = {L_x:.6g}; pass a valid bound L_x")
        y[i] = int(rng.random() < label_probability(X[i][None, :], theta_star)[0])
        # 4-5. D_t, the MLE (warm) and C_t with the anytime radius
        prefs = aggregate(X[:t], y[:t])
        fitted, converged = _fit_mle(prefs, B, theta_hat[i - 1] if (warm_start and i > 0) else None)
        if not converged:
            raise RuntimeError(f"round {t}: the MLE Newton did not converge; D_t may be degenerate")
        zeta[i] = anytime_radius(t, d=d, B=B, L_x=L_x, delta=delta)
        likelihood_set = LikelihoodSet(prefs, B, zeta[i], theta_hat=fitted)
        theta_hat[i] = likelihood_set.theta_hat
        covered[i] = likelihood_set.contains(theta_star)
        cset = _ball_if_inactive(likelihood_set)
    seconds = time.perf_counter() - start

    J_students = v_students @ theta_star
    regret = J_ref - J_students
    potential = elliptical_potentials(X, lam)
    return OnlineResult(
        student=student,
        oracle="; ".join(sorted(oracle_names)),
        v_E_source=v_E_source,
        T=T, d=d, B=B, L_x=L_x, lam=lam, delta=float(delta),
        theta_star=theta_star, v_E=v_E, v_ref=v_ref, J_ref=J_ref,
        X=X, y=y, teacher_features=teacher, v_students=v_students, J_students=J_students,
        instantaneous_regret=regret, cumulative_regret=np.cumsum(regret),
        potentials=potential.potentials, cumulative_potential=potential.cumulative,
        logdet_V=potential.logdet_V, min_eig_V=potential.min_eig_V, V_final=potential.V,
        zeta=zeta, theta_hat=theta_hat, covered=covered,
        values=values, thetas=thetas, certificate_gaps=gaps, statuses=statuses,
        policy=policy, seconds=seconds, solver_tol=float(tol), warm_start=bool(warm_start),
    )

"""MM PbKD (Algorithm 3, white-box tabular): the reward rewritten as a Q-function (spec tabular.md section 4).

Q-function class ``f_w(h, s, a) = w^T psi[h, s, a]``, ``||w|| <= B_f``.  With the teacher's
probabilities known, the induced reward

    r_f(h, s, a) = f(h, s, a) - E_{s' ~ P[h,s,a], a' ~ pi_E(.|s')} f(h+1, s', a')   (f(H, ., .) = 0)

is linear in ``w`` with per-step feature

    phi_Q[h, s, a] = psi[h, s, a] - (P pi_E psi)[h, s, a],
    (P pi_E psi)[h, s, a] = sum_{s'} P[h, s, a, s'] sum_{a'} pi_E[h+1, s', a'] psi[h+1, s', a']  (0 at h = H-1),

so ``induced_mdp`` (the same ``P``, ``rho`` with ``phi`` replaced by ``phi_Q``) runs sections 2-3
unchanged: Bradley-Terry pairs with differences ``phi_Q(tau1) - phi_Q(tau0)``, the MLE over
``w``, the likelihood-ratio set ``C`` over ``w`` and the min-max of ``pbkd_ref.solvers.solve``.

The identity (telescoping along ``tau ~ pi``; exact for any ``P``):

    J(pi_E, r_f) - J(pi, r_f) = E_{tau ~ pi} sum_h [ <pi_E(.|s_h), f(h, s_h, .)> - f(h, s_h, a_h) ]

(``on_policy_moment``), so the MM PbKD min-max is ``min_pi max_{w in C} on_policy_moment(pi, w)``.
The off-policy moment ``E_{tau ~ pi_E} sum_h [f(h, s_h, a_h) - <pi(.|s_h), f(h, s_h, .)>]`` and the
mixture ``beta * off + (1 - beta) * on`` are the white-box objectives of the LLM layer.

With ``psi = successor_features(mdp, pi_E)`` (``psi[..., k]`` = the teacher's Q-function for the
reward ``phi[..., k]``) the induced features are exactly ``phi`` and ``w = theta``: MM PbKD then
coincides with PbKD.  Realisability in general: the true reward ``r* = phi theta*`` is ``r_f`` for
``f = Q^{pi_E}_{r*}``, so MM PbKD is well specified when ``psi`` spans the teacher's Q-function.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pbkd_ref.mdp import (
    MDP,
    _as_float_array,
    _check_mdp,
    _check_policy,
    evaluate,
    feature_expectation,
    occupancy,
)
from pbkd_ref.preferences import TrajectoryPairs, aggregate
from pbkd_ref.solvers import MinMaxResult, solve


def _check_psi(mdp: MDP, psi) -> np.ndarray:
    psi = _as_float_array(psi, "psi", 4)
    if psi.shape[:3] != (mdp.H, mdp.S, mdp.A) or psi.shape[3] < 1:
        raise ValueError(
            f"psi must have shape (H, S, A, k) = ({mdp.H}, {mdp.S}, {mdp.A}, k) with k >= 1 "
            f"(the Q-function features); got {psi.shape}"
        )
    return psi


def _check_w(psi: np.ndarray, w) -> np.ndarray:
    w = _as_float_array(w, "w", 1)
    if w.shape != (psi.shape[3],):
        raise ValueError(f"w must have shape (k,) = ({psi.shape[3]},) to match psi; got {w.shape}")
    return w


def q_function(psi, w) -> np.ndarray:
    """``f_w[h, s, a] = w^T psi[h, s, a]`` (spec section 4); returns ``(H, S, A)``."""
    psi = _as_float_array(psi, "psi", 4)
    return psi @ _check_w(psi, w)


def next_q_features(mdp: MDP, psi, pi_E) -> np.ndarray:
    """``(P pi_E psi)[h, s, a] = sum_{s'} P[h,s,a,s'] sum_{a'} pi_E[h+1,s',a'] psi[h+1,s',a']``, zero at ``h = H-1``."""
    mdp = _check_mdp(mdp)
    psi = _check_psi(mdp, psi)
    pi_E = _check_policy(mdp, pi_E, "pi_E")
    out = np.zeros_like(psi)
    for h in range(mdp.H - 1):
        teacher_next = np.einsum("ta,tak->tk", pi_E[h + 1], psi[h + 1])  # <pi_E(.|s'), psi[h+1, s', .]>
        out[h] = np.einsum("sat,tk->sak", mdp.P[h], teacher_next)
    return out


def induced_features(mdp: MDP, psi, pi_E) -> np.ndarray:
    """``phi_Q[h, s, a] = psi[h, s, a] - (P pi_E psi)[h, s, a]`` (spec section 4); ``(H, S, A, k)``."""
    psi = _check_psi(_check_mdp(mdp), psi)
    return psi - next_q_features(mdp, psi, pi_E)


def induced_mdp(mdp: MDP, psi, pi_E) -> MDP:
    """The same ``(P, rho)`` with ``phi`` replaced by ``phi_Q``: sections 2-3 then apply to ``w`` unchanged."""
    return MDP(P=mdp.P, rho=mdp.rho, phi=induced_features(mdp, psi, pi_E))


def induced_reward(mdp: MDP, psi, pi_E, w) -> np.ndarray:
    """``r_f[h, s, a] = f(h, s, a) - E_{s' ~ P, a' ~ pi_E} f(h+1, s', a') = w^T phi_Q[h, s, a]``."""
    phi_Q = induced_features(mdp, psi, pi_E)
    return phi_Q @ _check_w(phi_Q, w)


def on_policy_moment(mdp: MDP, pi, pi_E, psi, w) -> float:
    """``E_{tau ~ pi} sum_h [<pi_E(.|s_h), f(h, s_h, .)> - f(h, s_h, a_h)]`` (spec section 4).

    Computed from the occupancy of ``pi`` and ``f`` directly (not through ``phi_Q``); by the
    telescoping identity it equals ``J(pi_E, r_f) - J(pi, r_f)``.
    """
    mdp = _check_mdp(mdp)
    psi = _check_psi(mdp, psi)
    pi_E = _check_policy(mdp, pi_E, "pi_E")
    f = q_function(psi, w)
    teacher_f = np.sum(pi_E * f, axis=-1, keepdims=True)  # <pi_E(.|s), f(h, s, .)>
    return float(np.sum(occupancy(mdp, pi) * (teacher_f - f)))


def off_policy_moment(mdp: MDP, pi, pi_E, psi, w) -> float:
    """``E_{tau ~ pi_E} sum_h [f(h, s_h, a_h) - <pi(.|s_h), f(h, s_h, .)>]`` (spec section 4).

    The teacher's trajectories carry the expectation, so it needs no student rollouts; it is
    the performance-difference form ``J(pi_E) - J(pi)`` when ``f = Q^pi``.
    """
    mdp = _check_mdp(mdp)
    psi = _check_psi(mdp, psi)
    pi = _check_policy(mdp, pi, "pi")
    f = q_function(psi, w)
    student_f = np.sum(pi * f, axis=-1, keepdims=True)  # <pi(.|s), f(h, s, .)>
    return float(np.sum(occupancy(mdp, pi_E) * (f - student_f)))


def mixed_moment(mdp: MDP, pi, pi_E, psi, w, beta: float) -> float:
    """``beta * off_policy_moment + (1 - beta) * on_policy_moment``, ``beta in [0, 1]`` (spec section 4)."""
    if isinstance(beta, bool) or not np.isscalar(beta) or not np.isfinite(beta) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be a number in [0, 1] (0: on-policy, 1: off-policy); got {beta!r}")
    beta = float(beta)
    return beta * off_policy_moment(mdp, pi, pi_E, psi, w) + (1.0 - beta) * on_policy_moment(mdp, pi, pi_E, psi, w)


def successor_features(mdp: MDP, pi_E) -> np.ndarray:
    """``psi[h, s, a, k] = Q^{pi_E}_h(s, a)`` for the reward ``phi[..., k]``: the teacher's successor features.

    Then ``phi_Q = phi`` exactly (``psi - P pi_E psi`` is the Bellman residual of ``Q^{pi_E}``,
    i.e. the reward), so ``f_theta = Q^{pi_E}_{r_theta}`` and MM PbKD reduces to PbKD.
    """
    mdp = _check_mdp(mdp)
    pi_E = _check_policy(mdp, pi_E, "pi_E")
    psi = np.empty_like(mdp.phi)
    for k in range(mdp.d):
        psi[..., k], _ = evaluate(mdp, pi_E, mdp.phi[..., k])
    return psi


@dataclass
class MMPbKDResult:
    """Output of Algorithm 3 (spec section 4)."""

    policy: np.ndarray  # (H, S, A) the student
    minmax: MinMaxResult  # min_pi max_{w in C} w^T (v^Q_E - v^Q_pi), certified
    w_hat: np.ndarray  # (k,) the Bradley-Terry MLE over the Q-function weights
    cset: object  # the likelihood-ratio set over w
    zeta: float
    induced: MDP  # (P, rho, phi_Q)
    v_E_Q: np.ndarray  # (k,) exact teacher expectation of phi_Q (white-box)
    N: int
    radius_kind: str


def mm_pbkd(mdp: MDP, pi_E, psi, pairs: TrajectoryPairs, *, B_f: float, radius_kind: str = "bracketing",
            delta: float = 0.05, radius_value: float | None = None, method: str = "cutting_plane",
            tol: float = 1e-7) -> MMPbKDResult:
    """Algorithm 3 (MM PbKD, white-box tabular), spec section 4.

    1. ``phi_Q = psi - P pi_E psi`` (``induced_mdp``); teacher moment ``v^Q_E = E_{pi_E} phi_Q(tau)``, exact.
    2. The pairs (labelled under the true reward) in ``phi_Q`` features:
       ``x = phi_Q(tau1) - phi_Q(tau0)``; ``w_hat = argmin_{||w|| <= B_f} NLL(w)``.
    3. ``C = {||w|| <= B_f, NLL(w) <= NLL(w_hat) + zeta}`` (``radius_kind``: bracketing, chi2, fixed).
    4. ``pi_hat = argmin_pi max_{w in C} w^T (v^Q_E - v^Q_pi) = argmin_pi max_{w in C} on_policy_moment(pi, w)``.
    """
    from pbkd_ref.confidence import confidence_set

    mdp = _check_mdp(mdp)
    psi = _check_psi(mdp, psi)
    pi_E = _check_policy(mdp, pi_E, "pi_E")
    if not isinstance(pairs, TrajectoryPairs):
        raise ValueError(
            f"pairs must be a TrajectoryPairs (build it with sample_trajectory_pairs); got {type(pairs).__name__}"
        )
    if pairs.N < 1:
        raise ValueError("pairs holds no pairs; Algorithm 3 needs at least one labelled pair")
    if isinstance(B_f, bool) or not np.isscalar(B_f) or not np.isfinite(B_f) or B_f <= 0:
        raise ValueError(f"B_f must be a finite number > 0 (the radius of the w ball); got {B_f!r}")
    induced = induced_mdp(mdp, psi, pi_E)
    v_E_Q = feature_expectation(induced, pi_E)
    sample = pairs.pair_sample(induced)
    cset = confidence_set(aggregate(sample.X, sample.y), float(B_f), kind=radius_kind, delta=delta, value=radius_value)
    result = solve(induced, v_E_Q, cset, method=method, tol=tol)
    return MMPbKDResult(
        policy=result.policy,
        minmax=result,
        w_hat=np.asarray(cset.theta_hat, dtype=np.float64),
        cset=cset,
        zeta=float(cset.zeta),
        induced=induced,
        v_E_Q=v_E_Q,
        N=pairs.N,
        radius_kind=radius_kind,
    )

"""Offline PbKD (Algorithm 1) end to end, and the tabular baselines (spec tabular.md section 4).

Algorithm 1 (offline PbKD):
    1. data D: N pairs (tau0 ~ pi_E teacher, tau1 ~ pi_ref), Bradley-Terry labels;
    2. theta_hat = argmin_{||theta|| <= B} NLL(theta)              (pbkd_ref.mle)
    3. C(D) = {||theta|| <= B, NLL(theta) <= NLL(theta_hat) + zeta}  (pbkd_ref.confidence)
    4. pi_hat = argmin_pi max_{theta in C(D)} theta^T (v_E - v_pi)   (pbkd_ref.solvers)
  with v_E exact (white-box) or the mean teacher trajectory feature of D (black-box).

Baselines on the same instances:
  - behaviour cloning: forward KL to the teacher on its samples, i.e. the empirical
    conditional action frequencies (uniform where a state was never visited);
  - ball moment matching: the same min-max over the whole B-ball (no preferences),
    i.e. min_pi B ||v_E - v_pi||;
  - MLE plug-in: argmax_pi J(pi, theta_hat).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pbkd_ref.mdp import MDP, check_trajectories, plan, rewards
from pbkd_ref.solvers import MinMaxResult, solve


@dataclass
class OfflineResult:
    """Output of Algorithm 1: the student and everything that produced it."""

    policy: np.ndarray  # (H, S, A) pi_hat
    minmax: MinMaxResult
    theta_hat: np.ndarray  # MLE
    cset: object  # the LikelihoodSet C(D)
    v_E: np.ndarray  # the teacher feature expectation used
    v_E_source: str  # "exact (white-box)" or "estimated from N teacher trajectories (black-box)"
    zeta: float
    N: int


def _check_mdp(mdp) -> None:
    if not isinstance(mdp, MDP):
        raise ValueError(f"mdp must be a pbkd_ref.mdp.MDP, got {type(mdp).__name__}")


def offline_pbkd(mdp: MDP, sample, *, B: float, radius_kind: str = "bracketing", delta: float = 0.05, v_E=None,
                 method: str = "cutting_plane", radius_value: float | None = None, tol: float = 1e-7) -> OfflineResult:
    """Algorithm 1 (spec section 4): MLE, likelihood-ratio set, exact min-max.

    sample: a ``pbkd_ref.preferences.PairSample`` (raw pairs; aggregated here).
    v_E: the teacher's exact feature expectation (white-box); ``None`` estimates it
    as the mean of ``sample.teacher_features`` (black-box).
    radius_kind: "bracketing", "chi2" or "fixed" (then ``radius_value`` is zeta).
    """
    from pbkd_ref.confidence import confidence_set
    from pbkd_ref.preferences import PairSample, aggregate

    _check_mdp(mdp)
    if not isinstance(sample, PairSample):
        raise ValueError(f"sample must be a pbkd_ref.preferences.PairSample, got {type(sample).__name__}")
    if sample.N < 1:
        raise ValueError("sample has no pairs; Algorithm 1 needs at least one labelled pair")
    if sample.d != mdp.d:
        raise ValueError(f"sample has feature dimension {sample.d} but the MDP has d = {mdp.d}")
    if v_E is None:
        v_E = sample.teacher_features.mean(axis=0)
        source = f"estimated from {sample.N} teacher trajectories (black-box)"
    else:
        v_E = np.asarray(v_E, dtype=np.float64)
        source = "exact (white-box)"
    prefs = aggregate(sample.X, sample.y)
    cset = confidence_set(prefs, B, kind=radius_kind, delta=delta, value=radius_value)
    result = solve(mdp, v_E, cset, method=method, tol=tol)
    return OfflineResult(
        policy=result.policy,
        minmax=result,
        theta_hat=np.asarray(cset.theta_hat, dtype=np.float64),
        cset=cset,
        v_E=v_E,
        v_E_source=source,
        zeta=float(cset.zeta),
        N=int(sample.N),
    )


def behaviour_cloning(mdp: MDP, states, actions) -> np.ndarray:
    """Behaviour cloning: argmax_pi sum_n sum_h log pi_h(a_h^n | s_h^n) (forward KL, spec section 4).

    The maximiser is the empirical conditional action frequency at each (h, s);
    states never visited at step h get the uniform policy.
    """
    _check_mdp(mdp)
    states, actions = check_trajectories(mdp, states, actions)
    counts = np.zeros((mdp.H, mdp.S, mdp.A))
    steps = np.broadcast_to(np.arange(mdp.H), states.shape)
    np.add.at(counts, (steps.ravel(), states.ravel(), actions.ravel()), 1.0)
    visits = counts.sum(axis=-1, keepdims=True)
    pi = np.full_like(counts, 1.0 / mdp.A)
    np.divide(counts, visits, out=pi, where=np.broadcast_to(visits > 0, counts.shape))
    return pi


def ball_moment_matching(mdp: MDP, v_E, B: float, *, method: str = "cutting_plane", tol: float = 1e-7) -> MinMaxResult:
    """Moment matching over the whole B-ball: min_pi max_{||theta|| <= B} theta^T (v_E - v_pi) = B min_pi ||v_E - v_pi||."""
    from pbkd_ref.confidence import Ball

    _check_mdp(mdp)
    return solve(mdp, v_E, Ball(B, mdp.d), method=method, tol=tol)


def mle_plugin(mdp: MDP, theta_hat) -> np.ndarray:
    """MLE plug-in: argmax_pi J(pi, theta_hat), a deterministic policy by backward induction."""
    _check_mdp(mdp)
    policy, _ = plan(mdp, rewards(mdp, theta_hat))
    return policy

"""The exactness bridge: the LLM-layer PbKD and MM PbKD losses on a tabular token tree.

Spec llm.md section 2 (last item, "the exactness bridge") and tabular.md sections 1-4.
The ``pbkd`` and ``mm_pbkd`` loss functions of :mod:`llm.losses`, called unchanged, train

* a tabular softmax student ``q(a | h, s) = softmax(logits[h, s])`` on a ``pbkd_ref``
  token-tree MDP (state = prefix, action = next token: the generation process of llm.md
  section 1 in miniature), against
* a linear reward model ``r_theta(tau) = theta^T phi(tau)`` (``pbkd``, black-box) or a linear
  Q-function ``f_w(h, s, a) = w^T psi[h, s, a]`` (``mm_pbkd``, white-box, induced features
  ``phi_Q = psi - P pi_E psi`` of tabular.md section 4),

and the trained pair converges to the exact min-max solution that ``pbkd_ref.solvers.solve``
computes on the same preference data, in value and in policy.

Training scheme (the documented choice).  Simultaneous gradient descent-ascent on this
bilinear game cycles (``scheme="simultaneous_adam"``, one Adam step per player per iteration,
is kept as the counter-example), so the bridge uses two timescales:

* adversary (fast): per student step, ``adversary_steps`` projected gradient steps on the
  Lagrangian ``pbkd_adversary_loss`` / ``mm_pbkd_adversary_loss`` (``theta`` or ``w`` projected
  onto the ball of radius ``B``), each followed by :func:`llm.losses.dual_ascent` on ``lam``
  for the constraint ``bt_nll <= NLL_ref + zeta / |D|`` (``bt_nll`` on the same data ``D``;
  ``NLL_ref = NLL(theta_hat) / |D|`` from the ``pbkd_ref.mle`` fit inside
  ``pbkd_ref.confidence.confidence_set``).  That constraint is exactly ``theta in C(D)``
  (inside the ball), and this primal-dual (Arrow-Hurwicz) iteration tracks the best response
  ``argmax_{theta in C} theta^T (v_E - v_q)``.
* student (slow): one natural-policy-gradient step on the policy-gradient loss
  (:func:`llm.losses.leave_one_out_pg_loss` on the sequence reward ``r_theta(tau)`` or
  ``r_f(tau)`` of :func:`llm.losses.induced_sequence_reward`): the gradient with respect to
  ``logits[h, s, a]`` divided by the student's occupancy ``d_q[h, s, a]``
  (``pbkd_ref.mdp.occupancy``).  For a tabular softmax policy that quotient is minus the
  advantage, so the step is policy mirror descent (Kakade's natural gradient); plain gradient
  steps crawl (``O(1/t)``) towards the optimum, which mixes several sequences.

The spec's per-token MM student, :func:`llm.losses.mm_pbkd_student_loss` (advantage
``-(<p(.|s_h), f(s_h,.)> - f(s_h, y_h))`` of each token alone), is run as a second
counter-example (``MMPbKDGame(student="per_token")``): it is not the policy gradient of the
on-policy moment (the credit of later tokens is dropped) and it settles away from the min-max
solution.  ``sequence_rloo`` is its exact policy gradient: by telescoping, the on-policy moment
of a sequence is ``<p(.|s_0), f(s_0,.)> - r_f(tau)``.

Exact mode: expectations over the student and the teacher by enumerating all ``V^H``
sequences with their probabilities as (detached) weights -- the ``weights`` arguments of the
losses; the leave-one-out loss has none, so its exact expectation over pairs of samples is
formed by enumerating the ``(V^H)^2`` ordered pairs (:func:`expected_leave_one_out_loss`).
Sampled mode: ``k`` teacher and ``k`` student responses per step, plain (unweighted) means, and
a decaying student step ``sampled_eta / (1 + t / sampled_decay) ** sampled_power``.

Measured against the exact solution (``reference_optimum`` polishes the solver's policy to
machine precision and certifies it):

* value gap ``sigma_C(v_E - v_q) - lower`` with the exact support function of ``C`` and a
  certified lower bound ``lower`` on the min-max value: an upper bound on
  ``max_{theta in C} theta^T (v_E - v_q) - min_pi max_{theta in C} theta^T (v_E - v_pi)``;
* policy gap ``TV(q, q*) = 1/2 sum_tau |q(tau) - q*(tau)|`` between the trained and the exact
  sequence distributions (on a token tree the sequence distribution and the occupancy determine
  each other; the teacher puts mass on every sequence).  The entropy-free min-max can have
  several optimal students; ``reference_optimum`` certifies that this instance has one.

Scope: the instance is one whose confidence set excludes ``theta = 0`` (value ``< 0``: the
student can beat the teacher), so the optimum is a smooth point of ``sigma_C``.  When ``0 in C``
the value is 0, the optimum is the kink ``v_q = v_E`` of ``sigma_C`` and not unique in ``q``;
constant-step last iterates then oscillate (decaying steps or averaging would be needed), and
the convergence rate of the exact runs slows with the tie margin of the optimal support.

Run: ``python -m llm.bridge [--quick] [--out-dir figures]`` writes ``bridge.png`` (value gap and
policy gap against training steps, per method, log scale) and its JSON twin ``bridge.json``.
"""

from __future__ import annotations

import itertools
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from llm.losses import (
    bt_constraint_violation,
    bt_nll,
    dual_ascent,
    induced_sequence_reward,
    leave_one_out_pg_loss,
    mm_pbkd_adversary_loss,
    mm_pbkd_student_loss,
    pbkd_adversary_loss,
    q_moment_off_policy,
    q_moment_on_policy,
    sequence_log_prob,
    token_log_probs,
)
from pbkd_ref.confidence import RADII, confidence_set
from pbkd_ref.mdp import (
    MDP,
    feature_expectation,
    occupancy,
    rewards,
    sample_trajectories,
    softmax_policy,
    token_tree_mdp,
    trajectory_features,
)
from pbkd_ref.mm_pbkd import mm_pbkd, successor_features
from pbkd_ref.preferences import aggregate, nll_derivatives, sample_trajectory_pairs
from pbkd_ref.solvers import MinMaxResult, certificate, solve

DTYPE = torch.float64
METHODS = ("pbkd", "mm_pbkd")
MODES = ("exact", "sampled")
SCHEMES = ("two_timescale_npg", "round_refit_npg", "simultaneous_adam")
MM_STUDENTS = ("sequence_rloo", "per_token")

# Student states whose occupancy is below this are not updated by the natural gradient
# (their gradient underflows with them; they carry no mass the measurements could see).
_OCCUPANCY_FLOOR = 1e-200


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass
class BridgeConfig:
    """Instance, data and training hyperparameters of the bridge (one place, with defaults)."""

    V: int = 3  # vocabulary size of the token tree
    H: int = 3  # response length (horizon); V^H sequences
    d: int = 3  # reward features phi (pbkd)
    k_extra: int = 1  # psi = [successor features of phi under pi_E (d), k_extra random features] (mm_pbkd)
    instance_seed: int = 3  # the MDP, theta*, the teacher and psi
    data_seed: int = 1003  # the preference pairs
    theta_star_norm: float = 2.0  # ||theta*||
    teacher_noise: float = 1.0  # teacher = softmax policy of phi (theta* + teacher_noise * N(0, I))
    teacher_temperature: float = 0.5
    N: int = 1000  # preference pairs, tau0 ~ pi_E, tau1 ~ uniform reference
    B: float = 4.0  # ||theta|| <= B (and ||w|| <= B for the Q-function)
    radius: str = "bracketing"  # pbkd_ref.confidence radius kind
    delta: float = 0.05
    solver_tol: float = 1e-9  # certificate tolerance of the exact solve
    # two-timescale training
    steps: int = 1000  # student steps, exact mode
    adversary_steps: int = 5  # adversary (Lagrangian) steps per student step
    refit_every: int = 50  # round_refit_npg: student steps per round, against the adversary frozen at the round's start
    refit_steps: int = 250  # round_refit_npg: Lagrangian steps of the refit at each round's start
    lr_adversary: float = 3.0  # projected gradient step on theta / w
    lr_dual: float = 20.0  # dual ascent step on lam
    eta: float = 4.0  # natural-gradient step of the student
    # sampled mode
    sampled_steps: int = 2000
    k: int = 256  # responses per step from the teacher and from the student
    sampled_eta: float = 2.0  # student step eta_t = sampled_eta / (1 + t / sampled_decay) ** sampled_power
    sampled_decay: float = 50.0
    sampled_power: float = 1.0
    sampled_lr_adversary: float = 0.3
    sampled_seeds: tuple[int, ...] = (0, 1, 2)
    # counter-example: simultaneous Adam gradient descent-ascent
    adam_lr_student: float = 0.05
    adam_lr_adversary: float = 0.05
    log_every: int = 10
    # stated tolerances (checked on the final iterate)
    tol_value_exact: float = 1e-9  # above the support function's certification slack (1e-10 B ||v||)
    tol_tv_exact: float = 1e-9
    tol_value_sampled: float = 1e-3
    tol_tv_sampled: float = 0.2  # the value is quadratic in the distance along the optimal face
    tie_tol: float = 1e-6  # sequences within this of the best theta*^T phi(tau) count as tied

    def validate(self) -> "BridgeConfig":
        for name in ("V", "H", "d", "N", "steps", "adversary_steps", "refit_every", "refit_steps", "sampled_steps",
                     "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BridgeConfig.{name} must be a positive integer; got {value!r}")
        if self.V ** self.H > 729:
            raise ValueError(
                f"the bridge enumerates V^H = {self.V ** self.H} sequences and their pairs; keep V^H <= 729"
            )
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 2:
            raise ValueError(f"BridgeConfig.k must be >= 2 (leave-one-out baseline); got {self.k!r}")
        if isinstance(self.k_extra, bool) or not isinstance(self.k_extra, int) or self.k_extra < 0:
            raise ValueError(f"BridgeConfig.k_extra must be an integer >= 0; got {self.k_extra!r}")
        if self.radius not in RADII:
            raise ValueError(f"BridgeConfig.radius must be one of {RADII}; got {self.radius!r}")
        if not self.sampled_seeds or not all(isinstance(x, int) and x >= 0 for x in self.sampled_seeds):
            raise ValueError(f"BridgeConfig.sampled_seeds must be non-negative integers; got {self.sampled_seeds!r}")
        if not (math.isfinite(self.teacher_noise) and self.teacher_noise >= 0):
            raise ValueError(f"BridgeConfig.teacher_noise must be a finite number >= 0; got {self.teacher_noise!r}")
        for name in ("B", "theta_star_norm", "lr_adversary", "lr_dual", "eta", "sampled_eta", "sampled_decay", "sampled_power",
                     "sampled_lr_adversary", "teacher_temperature", "solver_tol", "adam_lr_student",
                     "adam_lr_adversary", "tol_value_exact", "tol_tv_exact", "tol_value_sampled",
                     "tol_tv_sampled", "tie_tol"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"BridgeConfig.{name} must be a finite number > 0; got {value!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"BridgeConfig.delta must lie in (0, 1); got {self.delta!r}")
        return self


def quick_config() -> BridgeConfig:
    """Short settings for ``--quick`` and the tests (same instance; 300 steps per run, one sampled seed)."""
    return replace(
        BridgeConfig(),
        steps=300,
        sampled_steps=300,
        sampled_seeds=(0,),
        tol_value_exact=1e-7,
        tol_tv_exact=1e-4,
        tol_value_sampled=5e-3,
    )


# --------------------------------------------------------------------------------------
# The token tree, enumerated
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SequenceTable:
    """All ``A^H`` responses of a deterministic MDP with one start state, as the LLM layer sees them.

    ``states[n, h]`` is the prefix (state) before token ``h`` of sequence ``n`` and
    ``actions[n, h]`` the token; sequence ``n`` has tokens equal to the base-``A`` digits of
    ``n`` (most significant first), so a sampled trajectory maps back to its row by
    :meth:`index`.
    """

    states: np.ndarray  # (K, H) int
    actions: np.ndarray  # (K, H) int
    A: int

    @property
    def K(self) -> int:
        return self.states.shape[0]

    @property
    def H(self) -> int:
        return self.states.shape[1]

    def index(self, actions: np.ndarray) -> np.ndarray:
        """Row of each token sequence (``actions`` of shape ``(n, H)``)."""
        powers = self.A ** np.arange(self.H - 1, -1, -1)
        return np.asarray(actions, dtype=np.int64) @ powers

    def probabilities(self, pi: np.ndarray) -> np.ndarray:
        """``q(tau) = prod_h pi[h, s_h, a_h]`` for every sequence, ``(K,)``."""
        steps = np.arange(self.H)[None, :]
        return np.prod(pi[steps, self.states, self.actions], axis=1)

    def per_step(self, table: np.ndarray) -> np.ndarray:
        """``table[h, s_h, ...]`` along every sequence, ``(K, H, ...)`` (e.g. ``pi`` rows or ``psi``)."""
        return table[np.arange(self.H)[None, :], self.states]


def enumerate_sequences(mdp: MDP) -> SequenceTable:
    """Enumerate the responses of a token-tree MDP (spec tabular.md section 1).

    Requires a single start state and deterministic transitions (one-hot rows of ``P`` on the
    reachable states), as ``pbkd_ref.mdp.token_tree_mdp`` builds.
    """
    if not isinstance(mdp, MDP):
        raise ValueError(f"mdp must be a pbkd_ref.mdp.MDP; got {type(mdp).__name__}")
    start = np.flatnonzero(mdp.rho > 0)
    if start.size != 1 or mdp.rho[start[0]] != 1.0:
        raise ValueError("the bridge enumerates sequences from one start state; pass a token-tree MDP (rho = e_0)")
    if mdp.A ** mdp.H > 729:
        raise ValueError(f"A^H = {mdp.A ** mdp.H} sequences is too many to enumerate; keep A^H <= 729")
    actions = np.array(list(itertools.product(range(mdp.A), repeat=mdp.H)), dtype=np.int64)
    states = np.zeros_like(actions)
    states[:, 0] = start[0]
    for h in range(1, mdp.H):
        rows = mdp.P[h - 1, states[:, h - 1], actions[:, h - 1]]  # (K, S)
        nxt = rows.argmax(axis=1)
        if not np.all(rows[np.arange(len(rows)), nxt] == 1.0):
            raise ValueError("the bridge needs deterministic transitions (a token tree); P has a non one-hot row")
        states[:, h] = nxt
    return SequenceTable(states=states, actions=actions, A=mdp.A)


# --------------------------------------------------------------------------------------
# The models: tabular softmax student, linear reward model, linear Q-function
# --------------------------------------------------------------------------------------


class TabularSoftmaxPolicy:
    """Student ``q(a | h, s) = softmax(logits[h, s])`` (a logits table per prefix).

    :meth:`sequence_logits` plays the language model: the next-token logits along each
    sequence, already aligned with its tokens (llm.losses conventions).
    """

    def __init__(self, H: int, S: int, A: int):
        self.logits = torch.zeros(H, S, A, dtype=DTYPE, requires_grad=True)

    def sequence_logits(self, table: SequenceTable, rows: Tensor | None = None) -> Tensor:
        """``logits[h, s_h]`` for the selected sequences, shape ``(n, H, A)``."""
        states = torch.as_tensor(table.states)
        if rows is not None:
            states = states[rows]
        steps = torch.arange(table.H)[None, :]
        return self.logits[steps, states]

    def policy(self) -> np.ndarray:
        """``pi[h, s, a]`` as a numpy array (for the ``pbkd_ref`` measurements)."""
        with torch.no_grad():
            return torch.softmax(self.logits, dim=-1).numpy().copy()


class LinearRewardModel:
    """``r_theta(tau) = theta^T phi(tau)``, ``||theta|| <= B`` (spec tabular.md section 1)."""

    def __init__(self, theta0: np.ndarray, B: float):
        self.param = torch.tensor(np.asarray(theta0, dtype=np.float64), dtype=DTYPE, requires_grad=True)
        self.B = float(B)

    def project_(self) -> None:
        """Euclidean projection onto the ball ``||theta|| <= B``."""
        with torch.no_grad():
            norm = float(self.param.norm())
            if norm > self.B:
                self.param.mul_(self.B / norm)


class LinearQFunction(LinearRewardModel):
    """``f_w(h, s, a) = w^T psi[h, s, a]``, ``||w|| <= B`` (spec tabular.md section 4)."""


# --------------------------------------------------------------------------------------
# Exact expectations of the policy-gradient loss
# --------------------------------------------------------------------------------------


def expected_leave_one_out_loss(logq: Tensor, reward: Tensor, weights: Tensor) -> Tensor:
    """``E_{y1, y2 ~ q iid}`` of :func:`leave_one_out_pg_loss` with ``k = 2`` samples, by enumeration.

    ``logq[n] = log q(tau_n)`` (with gradient), ``reward[n]`` the sequence reward, ``weights[n]
    = q(tau_n)`` (detached).  Every ordered pair ``(i, j)`` is one row ``[tau_i, tau_j]``; the
    leave-one-out advantage is linear in a row's rewards, so scaling row ``(i, j)`` by
    ``P q(tau_i) q(tau_j)`` (``P = K^2`` rows) turns the loss's mean over rows into the
    expectation over pairs.  Its gradient is exactly ``-grad_q E_{tau ~ q} r(tau)``.
    """
    K = logq.shape[0]
    first, second = torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij")
    first, second = first.reshape(-1), second.reshape(-1)
    pair_weight = (weights[first] * weights[second]).detach()
    rows = torch.stack([logq[first], logq[second]], dim=1)
    scaled = torch.stack([reward[first], reward[second]], dim=1) * (first.numel() * pair_weight)[:, None]
    return leave_one_out_pg_loss(rows, scaled.detach())


# --------------------------------------------------------------------------------------
# The two games
# --------------------------------------------------------------------------------------


@dataclass
class Batch:
    """What one training step sees: exact weights over all sequences, or sampled rows."""

    exact: bool
    q_seq: Tensor  # (K,) student sequence probabilities (detached)
    p_seq: Tensor  # (K,) teacher sequence probabilities
    student_probs: Tensor | None = None  # (K, H, A) q(.|s_h) along every sequence (detached)
    student_rows: Tensor | None = None  # (k,) sampled student responses
    teacher_rows: Tensor | None = None  # (k,) sampled teacher responses


class _Game:
    """Shared pieces: the tree, the teacher, the data ``D`` as sequence rows, the exact solution."""

    name: str
    adversary_class: type
    adversary: LinearRewardModel

    def __init__(self, mdp: MDP, table: SequenceTable, pi_E: np.ndarray, pair_rows: tuple[np.ndarray, np.ndarray],
                 y: np.ndarray, cset, v_E: np.ndarray, exact: MinMaxResult, features_mdp: MDP):
        self.mdp, self.table, self.pi_E = mdp, table, pi_E
        self.features_mdp = features_mdp  # phi (pbkd) or phi_Q (mm_pbkd): where C and v_E live
        self.cset, self.v_E, self.exact = cset, v_E, exact
        self.rows0 = torch.as_tensor(pair_rows[0])  # teacher response of each pair (tau0)
        self.rows1 = torch.as_tensor(pair_rows[1])  # reference response (tau1)
        self.y = torch.tensor(np.asarray(y), dtype=torch.int64)
        self.N = int(len(y))
        self.nll_ref = float(cset.nll_hat) / self.N  # NLL(theta_hat) / |D|, theta_hat from pbkd_ref.mle
        self.zeta_over_n = float(cset.zeta) / self.N
        self.actions = torch.as_tensor(table.actions)
        self.mask = torch.ones(table.K, table.H, dtype=DTYPE)
        self.p_seq = torch.as_tensor(table.probabilities(pi_E), dtype=DTYPE)
        self.teacher_probs = torch.as_tensor(table.per_step(pi_E), dtype=DTYPE)  # p(.|s_h), (K, H, A)
        self.Phi_seq = trajectory_features(features_mdp, table.states, table.actions)  # (K, d)
        self.q_star = table.probabilities(exact.policy)  # replaced by the polished optimum (reference_optimum)
        self.reference_lower = float(exact.lower)  # certified lower bound on the min-max value
        self.reference_theta = np.asarray(exact.theta, dtype=np.float64)  # optimal adversary (polished)

    # -- measurements (pbkd_ref side) -------------------------------------------------

    def worst_case_value(self, q_seq: np.ndarray) -> float:
        """``max_{theta in C} theta^T (v_E - v_q)`` by the exact support function of ``C``."""
        value, _ = self.cset.support(self.v_E - self.Phi_seq.T @ q_seq)
        return float(value)

    def measure(self, q_seq: np.ndarray) -> dict:
        return {
            "value_gap": self.worst_case_value(q_seq) - self.reference_lower,
            "tv": 0.5 * float(np.abs(q_seq - self.q_star).sum()),
        }

    def reset_adversary(self) -> None:
        """Warm start at the MLE (spec llm.md section 2: ``NLL_ref`` from an MLE warm start)."""
        self.adversary = self.adversary_class(self.cset.theta_hat, self.cset.B)

    # -- training --------------------------------------------------------------------

    def bt_value(self, reward: Tensor) -> Tensor:
        """:func:`bt_nll` of the adversary on ``D``: ``P(o = 1) = sigma(r(tau1) - r(tau0))``."""
        return bt_nll(reward[self.rows1], reward[self.rows0], self.y)

    def sequence_pg_loss(self, student: TabularSoftmaxPolicy, batch: Batch, reward: Tensor) -> Tensor:
        """:func:`leave_one_out_pg_loss` on a sequence reward: exact expectation, or ``k`` samples of one prompt."""
        reward = reward.detach()
        if batch.exact:
            logq = sequence_log_prob(student.sequence_logits(self.table), self.actions, self.mask)
            return expected_leave_one_out_loss(logq, reward, batch.q_seq)
        rows = batch.student_rows
        logq = sequence_log_prob(student.sequence_logits(self.table, rows), self.actions[rows], self.mask[rows])
        return leave_one_out_pg_loss(logq[None, :], reward[rows][None, :])


class PbKDGame(_Game):
    """Black-box PbKD (Algorithm 1): linear reward model, sequence-level policy gradient."""

    name = "pbkd"
    adversary_class = LinearRewardModel

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.Phi_t = torch.tensor(self.Phi_seq, dtype=DTYPE)
        self.reset_adversary()

    def sequence_rewards(self) -> Tensor:
        """``r_theta(tau) = theta^T phi(tau)`` of every enumerated sequence, ``(K,)``."""
        return self.Phi_t @ self.adversary.param

    def adversary_loss(self, batch: Batch, lam: float) -> tuple[Tensor, Tensor]:
        """``-(E_p r - E_q r) + lam (bt_nll - NLL_ref - zeta/|D|)`` via :func:`pbkd_adversary_loss`."""
        reward = self.sequence_rewards()
        bt = self.bt_value(reward)
        if batch.exact:
            loss = pbkd_adversary_loss(reward, reward, bt, self.nll_ref, self.zeta_over_n, lam,
                                       teacher_weights=batch.p_seq, student_weights=batch.q_seq)
        else:
            loss = pbkd_adversary_loss(reward[batch.teacher_rows], reward[batch.student_rows], bt,
                                       self.nll_ref, self.zeta_over_n, lam)
        return loss, bt

    def student_loss(self, student: TabularSoftmaxPolicy, batch: Batch) -> Tensor:
        """The student maximises ``E_q r_theta``: leave-one-out policy gradient (spec llm.md section 2)."""
        return self.sequence_pg_loss(student, batch, self.sequence_rewards())


class MMPbKDGame(_Game):
    """White-box MM PbKD (Algorithm 3): linear Q-function, induced reward in the BT constraint.

    ``beta = 0`` (on-policy moment only): its min-max is the ``pbkd_ref`` one by the telescoping
    identity ``on_policy_moment = w^T (v_E^Q - v_q^Q)`` (tabular.md section 4).  The student is
    either the sequence-level leave-one-out policy gradient on the induced reward
    ``r_f(tau)`` (``sequence_rloo``: the on-policy moment equals ``<p(.|s_0), f(s_0, .)> - E_q
    r_f(tau)`` per sequence, so this is its exact policy gradient) or
    :func:`mm_pbkd_student_loss` with the per-token advantage of the spec (``per_token``).
    """

    name = "mm_pbkd"
    adversary_class = LinearQFunction
    beta = 0.0

    def __init__(self, *args, psi: np.ndarray, student: str = "sequence_rloo", **kwargs):
        super().__init__(*args, **kwargs)
        if student not in MM_STUDENTS:
            raise ValueError(f"student must be one of {MM_STUDENTS}; got {student!r}")
        self.student_kind = student
        self.psi_seq = torch.as_tensor(self.table.per_step(psi), dtype=DTYPE)  # (K, H, A, k)
        self.reset_adversary()

    def f_values(self) -> Tensor:
        """``f(s_h, .)`` along every sequence, ``(K, H, A)``."""
        return self.psi_seq @ self.adversary.param

    def sequence_rewards(self) -> Tensor:
        """Induced reward ``r_f(tau)`` of every enumerated sequence, ``(K,)``."""
        return induced_sequence_reward(self.f_values(), self.teacher_probs, self.actions, self.mask)

    def moments(self, f: Tensor, student_probs: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """(off-policy, on-policy) Q-moments of :mod:`llm.losses`, exact or on samples."""
        if batch.exact:
            on = q_moment_on_policy(f, self.teacher_probs, self.actions, self.mask, weights=batch.q_seq)
            off = q_moment_off_policy(f, student_probs, self.actions, self.mask, weights=batch.p_seq)
            return off, on
        s, t = batch.student_rows, batch.teacher_rows
        on = q_moment_on_policy(f[s], self.teacher_probs[s], self.actions[s], self.mask[s])
        off = q_moment_off_policy(f[t], student_probs[t], self.actions[t], self.mask[t])
        return off, on

    def adversary_loss(self, batch: Batch, lam: float) -> tuple[Tensor, Tensor]:
        """``-(beta off + (1 - beta) on) + lam (bt_nll(r_f) - NLL_ref - zeta/|D|)``."""
        f = self.f_values()
        bt = self.bt_value(induced_sequence_reward(f, self.teacher_probs, self.actions, self.mask))
        off, on = self.moments(f, batch.student_probs, batch)
        return mm_pbkd_adversary_loss(off, on, bt, self.nll_ref, self.zeta_over_n, lam, beta=self.beta), bt

    def student_loss(self, student: TabularSoftmaxPolicy, batch: Batch) -> Tensor:
        """The student minimises the on-policy moment (``sequence_rloo``) or the spec's per-token surrogate."""
        if self.student_kind == "sequence_rloo":
            return self.sequence_pg_loss(student, batch, self.sequence_rewards())
        f = self.f_values().detach()
        logits = student.sequence_logits(self.table)
        student_probs = torch.softmax(logits, dim=-1)
        token_logp = token_log_probs(logits, self.actions)
        if batch.exact:
            on_rows = off_rows = slice(None)
            on_weights, off_weights = batch.q_seq, batch.p_seq
        else:
            on_rows, off_rows, on_weights, off_weights = batch.student_rows, batch.teacher_rows, None, None
        out = mm_pbkd_student_loss(
            off_f_values=f[off_rows], off_student_probs=student_probs[off_rows], off_actions=self.actions[off_rows],
            off_mask=self.mask[off_rows], on_f_values=f[on_rows], on_teacher_probs=self.teacher_probs[on_rows],
            on_actions=self.actions[on_rows], on_mask=self.mask[on_rows], on_student_token_logp=token_logp[on_rows],
            beta=self.beta, off_weights=off_weights, on_weights=on_weights,
        )
        return out.loss


# --------------------------------------------------------------------------------------
# The instance: pbkd_ref data, confidence sets and exact solutions
# --------------------------------------------------------------------------------------


@dataclass
class BridgeInstance:
    """One token tree, one teacher, one preference set, and the exact solutions of both games."""

    mdp: MDP
    table: SequenceTable
    pi_E: np.ndarray
    theta_star: np.ndarray
    psi: np.ndarray
    pbkd: PbKDGame
    mm: MMPbKDGame
    uniqueness: dict = field(default_factory=dict)


def build_instance(cfg: BridgeConfig, *, mm_student: str = "sequence_rloo") -> BridgeInstance:
    """Instance, BT data under ``theta*`` and the exact min-max solutions (spec tabular.md sections 1-4).

    ``pi_E`` is a softmax policy of a perturbed reward (a suboptimal teacher, so the student can
    improve on it); the reference policy of the pairs is uniform; ``tau0 ~ pi_E``,
    ``tau1 ~ uniform``, ``o ~ Bernoulli(sigma(theta*^T (phi(tau1) - phi(tau0))))``
    (``pbkd_ref.preferences.sample_trajectory_pairs``, same draws as
    ``pbkd_ref.preferences.sample_preferences``).  PbKD uses ``C(D)`` over ``theta`` in ``phi``;
    MM PbKD the same pairs in the induced features ``phi_Q`` and ``C(D)`` over ``w``.
    """
    cfg.validate()
    rng = np.random.default_rng(cfg.instance_seed)
    mdp = token_tree_mdp(cfg.V, cfg.H, cfg.d, rng)
    theta_star = rng.normal(size=cfg.d)
    theta_star *= cfg.theta_star_norm / np.linalg.norm(theta_star)
    theta_teacher = theta_star + cfg.teacher_noise * rng.normal(size=cfg.d)
    pi_E = softmax_policy(mdp, rewards(mdp, theta_teacher), cfg.teacher_temperature)
    # Q-features: the teacher's successor features (so the class holds Q^{pi_E} of r* = phi theta*
    # and the BT data are well specified in phi_Q) and k_extra random directions.
    extra = token_tree_mdp(cfg.V, cfg.H, cfg.k_extra, rng).phi if cfg.k_extra else np.zeros((cfg.H, mdp.S, mdp.A, 0))
    psi = np.concatenate([successor_features(mdp, pi_E), extra], axis=-1)
    pi_ref = np.full((mdp.H, mdp.S, mdp.A), 1.0 / mdp.A)
    pairs = sample_trajectory_pairs(mdp, pi_E, pi_ref, theta_star, cfg.N, np.random.default_rng(cfg.data_seed))
    table = enumerate_sequences(mdp)
    pair_rows = (table.index(pairs.actions0), table.index(pairs.actions1))

    sample = pairs.pair_sample(mdp)
    cset = confidence_set(aggregate(sample.X, sample.y), cfg.B, kind=cfg.radius, delta=cfg.delta)
    v_E = feature_expectation(mdp, pi_E)
    exact = solve(mdp, v_E, cset, tol=cfg.solver_tol)
    pbkd_game = PbKDGame(mdp, table, pi_E, pair_rows, pairs.y, cset, v_E, exact, features_mdp=mdp)

    mm = mm_pbkd(mdp, pi_E, psi, pairs, B_f=cfg.B, radius_kind=cfg.radius, delta=cfg.delta, tol=cfg.solver_tol)
    mm_game = MMPbKDGame(mdp, table, pi_E, pair_rows, pairs.y, mm.cset, mm.v_E_Q, mm.minmax,
                         features_mdp=mm.induced, psi=psi, student=mm_student)
    instance = BridgeInstance(mdp=mdp, table=table, pi_E=pi_E, theta_star=theta_star, psi=psi,
                              pbkd=pbkd_game, mm=mm_game)
    instance.uniqueness = {game.name: reference_optimum(game, cfg.tie_tol) for game in (pbkd_game, mm_game)}
    return instance


def sequence_occupancy(mdp: MDP, table: SequenceTable, q_seq: np.ndarray) -> np.ndarray:
    """Occupancy ``d[h, s, a] = sum_tau q(tau) [s_h = s, a_h = a]`` of a sequence distribution (a tree)."""
    d = np.zeros((mdp.H, mdp.S, mdp.A))
    for h in range(mdp.H):
        np.add.at(d[h], (table.states[:, h], table.actions[:, h]), q_seq)
    return d


def reference_optimum(game: _Game, tie_tol: float, *, max_iter: int = 50) -> dict:
    """The exact optimal student to machine precision, its certificate and its uniqueness.

    The solver's policy is certified in value to ``solver_tol``; near an optimum in the interior
    of a face of the feature polytope the value is quadratic in the distance, so its policy is
    only ``~sqrt(solver_tol)`` accurate.  This polishes it by Newton's method on the KKT system
    of ``min_q max_{theta in C} theta^T (v_E - Phi^T q)`` restricted to the optimal support
    ``T* = {tau : theta*^T phi(tau) >= max - tie_tol}`` (likelihood constraint active, ball
    inactive): unknowns ``theta``, ``q_T``, ``lam``;

        v_E - Phi_T^T q_T = lam grad NLL(theta),   NLL(theta) = level,
        theta^T (phi(tau) - phi(tau_0)) = 0  (tau in T*),   sum q_T = 1,

    with ``nll_derivatives`` (the one BT likelihood), then certifies the result with
    ``pbkd_ref.solvers.certificate``.

    Uniqueness: every optimal student is a best response to every optimal adversary (zero-sum),
    so it lives on ``T*``; with value ``< 0`` and ``theta*`` interior to the ball, ``C`` has a
    single normal ray at ``theta*`` and the value fixes the length of ``u = v_E - v*``, so ``v*``
    is unique; ``q*`` is then unique when the features of ``T*`` are affinely independent.
    ``tie_margin`` (best score minus the best outside ``T*``) shows ``T*`` is well separated.
    """
    exact, Phi, cset = game.exact, game.Phi_seq, game.cset
    scores = Phi @ exact.theta
    best = float(scores.max())
    tied = scores >= best - tie_tol
    rows = np.flatnonzero(tied)
    margin = float(best - scores[~tied].max()) if (~tied).any() else float("inf")
    Phi_T = Phi[rows]
    m, d = Phi_T.shape
    rank = int(np.linalg.matrix_rank(Phi_T[1:] - Phi_T[0], tol=1e-9)) if m > 1 else 0
    affinely_independent = rank == m - 1
    interior = float(np.linalg.norm(exact.theta)) < cset.B * (1.0 - 1e-6)
    negative = float(exact.upper) < -10 * float(exact.certificate_gap)
    record = {
        "support_rows": rows.tolist(),
        "support_size": int(m),
        "tie_margin": margin,
        "tie_tol": tie_tol,
        "affinely_independent": bool(affinely_independent),
        "theta_interior_to_ball": bool(interior),
        "value_negative": bool(negative),
        "solver_q_star_mass_off_support": float(game.q_star[~tied].sum()),
    }
    polished = False
    if affinely_independent and interior and negative:
        theta = exact.theta.copy()
        q_T = game.q_star[rows] / game.q_star[rows].sum()
        f, g, _ = nll_derivatives(cset.prefs, theta)
        u = game.v_E - Phi_T.T @ q_T
        lam = float(u @ g / (g @ g))
        diffs = Phi_T[1:] - Phi_T[0]
        residual = np.inf
        for _ in range(max_iter):
            f, g, hess = nll_derivatives(cset.prefs, theta)
            u = game.v_E - Phi_T.T @ q_T
            F = np.concatenate([u - lam * g, [f - cset.level], diffs @ theta, [q_T.sum() - 1.0]])
            residual = float(np.abs(F).max())
            if residual <= 1e-13 * max(1.0, abs(cset.level)):
                break
            J = np.zeros((d + m + 1, d + m + 1))
            J[:d, :d] = -lam * hess
            J[:d, d:d + m] = -Phi_T.T
            J[:d, d + m] = -g
            J[d, :d] = g
            J[d + 1:d + m, :d] = diffs
            J[d + m, d:d + m] = 1.0
            step = np.linalg.solve(J, -F)
            theta, q_T, lam = theta + step[:d], q_T + step[d:d + m], lam + float(step[d + m])
        if residual <= 1e-10 and q_T.min() > -1e-12 and lam > 0:
            q_T = np.clip(q_T, 0.0, None)
            q_star = np.zeros(game.table.K)
            q_star[rows] = q_T / q_T.sum()
            lower, upper = certificate(game.features_mdp, game.v_E, cset,
                                       sequence_occupancy(game.mdp, game.table, q_star), theta)
            polished = upper - lower <= max(10 * float(exact.certificate_gap), 1e-11)
            record.update({
                "kkt_residual": residual,
                "polished_lower": lower,
                "polished_upper": upper,
                "polished_certificate_gap": upper - lower,
                "polished_lam": lam,  # multiplier of the summed NLL
                "polished_lam_mean_nll": lam * game.N,  # the same for bt_nll (a mean): the trained lam's target
                "tv_solver_vs_polished": 0.5 * float(np.abs(q_star - game.q_star).sum()),
            })
            if polished:
                game.q_star = q_star
                game.reference_lower = max(float(exact.lower), lower)
                game.reference_theta = theta
    record["polished"] = bool(polished)
    record["q_star_on_support"] = game.q_star[rows].tolist()
    record["unique"] = bool(affinely_independent and interior and negative and margin > 100 * tie_tol)
    return record


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


@dataclass
class Trace:
    """Measurements of one training run (every ``log_every`` student steps and the last)."""

    method: str
    mode: str
    scheme: str
    seed: int | None
    steps: list = field(default_factory=list)
    value_gap: list = field(default_factory=list)
    tv: list = field(default_factory=list)
    lam: list = field(default_factory=list)
    adversary_error: list = field(default_factory=list)  # ||theta_t - theta*|| (the optimal adversary)
    runtime_s: float = 0.0

    @property
    def final(self) -> dict:
        return {"value_gap": self.value_gap[-1], "tv": self.tv[-1], "lam": self.lam[-1],
                "adversary_error": self.adversary_error[-1]}


def _adversary_step(game: _Game, batch: Batch, lam: float, lr: float, lr_dual: float,
                    optimizer: torch.optim.Optimizer | None = None) -> float:
    """One Lagrangian step on the adversary (projected onto the ball), then dual ascent on ``lam``."""
    loss, bt = game.adversary_loss(batch, lam)
    param = game.adversary.param
    (grad,) = torch.autograd.grad(loss, param)
    if optimizer is None:
        with torch.no_grad():
            param.sub_(lr * grad)
    else:
        param.grad = grad
        optimizer.step()
    game.adversary.project_()
    return dual_ascent(lam, bt_constraint_violation(bt.detach(), game.nll_ref, game.zeta_over_n), lr_dual)


def _natural_gradient_step(game: _Game, student: TabularSoftmaxPolicy, loss: Tensor, eta: float) -> None:
    """``logits -= eta * grad / d_q``: for a tabular softmax, ``grad[h,s,a] = -d_q[h,s,a] A_q(h,s,a)``."""
    (grad,) = torch.autograd.grad(loss, student.logits)
    d_q = torch.as_tensor(occupancy(game.mdp, student.policy()), dtype=DTYPE)
    visited = d_q > _OCCUPANCY_FLOOR
    with torch.no_grad():
        step = torch.where(visited, grad / torch.where(visited, d_q, torch.ones_like(d_q)), torch.zeros_like(grad))
        student.logits.sub_(eta * step)


def _batch(game: _Game, student: TabularSoftmaxPolicy, exact: bool, k: int, rng: np.random.Generator | None) -> Batch:
    pi = student.policy()
    q_seq = torch.as_tensor(game.table.probabilities(pi), dtype=DTYPE)
    student_probs = torch.as_tensor(game.table.per_step(pi), dtype=DTYPE)
    if exact:
        return Batch(exact=True, q_seq=q_seq, p_seq=game.p_seq, student_probs=student_probs)
    _, student_actions = sample_trajectories(game.mdp, pi, k, rng)
    _, teacher_actions = sample_trajectories(game.mdp, game.pi_E, k, rng)
    return Batch(exact=False, q_seq=q_seq, p_seq=game.p_seq, student_probs=student_probs,
                 student_rows=torch.as_tensor(game.table.index(student_actions)),
                 teacher_rows=torch.as_tensor(game.table.index(teacher_actions)))


@contextmanager
def single_thread():
    """Tensors here have at most a few thousand entries: intra-op threads only add synchronisation
    (ten times slower on a loaded two-core machine).  The previous setting is restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train(game: _Game, cfg: BridgeConfig, *, mode: str = "exact", scheme: str = "two_timescale_npg",
          seed: int | None = None, steps: int | None = None) -> Trace:
    """Train a fresh student against a fresh (MLE warm-started) adversary; return the measurements.

    ``two_timescale_npg`` (the bridge): per student step ``adversary_steps`` Lagrangian steps with
    dual ascent, then one natural-gradient student step (sampled mode: step
    ``sampled_eta / (1 + t / sampled_decay) ** sampled_power``).  ``round_refit_npg`` (the LLM
    game's ``pbkd.timescale=refit``): every ``refit_every`` student steps the adversary takes
    ``refit_steps`` Lagrangian steps against the current student, then stays frozen while the
    student takes its natural-gradient steps.  ``simultaneous_adam``: one Adam step for each player
    per iteration, vanilla gradients (the counter-example: it cycles).
    """
    with single_thread():
        return _train(game, cfg, mode=mode, scheme=scheme, seed=seed, steps=steps)


def _train(game: _Game, cfg: BridgeConfig, *, mode: str, scheme: str, seed: int | None, steps: int | None) -> Trace:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}; got {scheme!r}")
    exact = mode == "exact"
    if not exact and seed is None:
        raise ValueError("sampled mode needs a seed for the response sampler")
    steps = steps if steps is not None else (cfg.steps if exact else cfg.sampled_steps)
    rng = np.random.default_rng(seed) if seed is not None else None
    game.reset_adversary()
    student = TabularSoftmaxPolicy(game.mdp.H, game.mdp.S, game.mdp.A)
    trace = Trace(method=game.name, mode=mode, scheme=scheme, seed=seed)
    lam = 0.0
    start = time.perf_counter()
    adam_student = adam_adversary = None
    if scheme == "simultaneous_adam":
        adam_student = torch.optim.Adam([student.logits], lr=cfg.adam_lr_student)
        adam_adversary = torch.optim.Adam([game.adversary.param], lr=cfg.adam_lr_adversary)
    lr_adversary = cfg.lr_adversary if exact else cfg.sampled_lr_adversary

    def log(t: int) -> None:
        q_seq = game.table.probabilities(student.policy())
        m = game.measure(q_seq)
        trace.steps.append(t)
        trace.value_gap.append(m["value_gap"])
        trace.tv.append(m["tv"])
        trace.lam.append(lam)
        trace.adversary_error.append(float(np.linalg.norm(game.adversary.param.detach().numpy() - game.reference_theta)))

    log(0)
    for t in range(1, steps + 1):
        batch = _batch(game, student, exact, cfg.k, rng)
        if scheme == "simultaneous_adam":
            lam = _adversary_step(game, batch, lam, 0.0, cfg.lr_dual, adam_adversary)
            adam_student.zero_grad()
            game.student_loss(student, batch).backward()
            adam_student.step()
        else:
            if scheme == "two_timescale_npg":
                inner = cfg.adversary_steps
            else:
                inner = cfg.refit_steps if (t - 1) % cfg.refit_every == 0 else 0
            for _ in range(inner):
                lam = _adversary_step(game, batch, lam, lr_adversary, cfg.lr_dual)
            eta = cfg.eta if exact else cfg.sampled_eta / (1.0 + t / cfg.sampled_decay) ** cfg.sampled_power
            _natural_gradient_step(game, student, game.student_loss(student, batch), eta)
        if t % cfg.log_every == 0 or t == steps:
            log(t)
    trace.runtime_s = time.perf_counter() - start
    return trace


# --------------------------------------------------------------------------------------
# Experiment: figure and JSON twin
# --------------------------------------------------------------------------------------


@dataclass
class BridgeRuns:
    """Everything the experiment trains: the bridge runs and the two counter-examples."""

    instance: BridgeInstance
    runs: list  # Trace: pbkd / mm_pbkd, exact and sampled (one per seed)
    counterexamples: list  # Trace: simultaneous Adam and the per-round refit (pbkd), per-token student (mm_pbkd)


def run_bridge(cfg: BridgeConfig, *, counterexamples: bool = True, progress: bool = False) -> BridgeRuns:
    """Build the instance and train every method (spec llm.md section 2, the exactness bridge)."""
    instance = build_instance(cfg)
    runs: list[Trace] = []

    def done(trace: Trace) -> Trace:
        if progress:
            print(f"[bridge] {trace.method} {trace.mode} {trace.scheme} seed={trace.seed}: "
                  f"value gap {trace.value_gap[-1]:.2e}, TV {trace.tv[-1]:.2e} ({trace.runtime_s:.1f} s)", flush=True)
        return trace

    for game in (instance.pbkd, instance.mm):
        runs.append(done(train(game, cfg, mode="exact")))
        for seed in cfg.sampled_seeds:
            runs.append(done(train(game, cfg, mode="sampled", seed=seed)))
    extra: list[Trace] = []
    if counterexamples:
        extra.append(done(train(instance.pbkd, cfg, mode="exact", scheme="simultaneous_adam")))
        extra.append(done(train(instance.pbkd, cfg, mode="exact", scheme="round_refit_npg")))
        instance.mm.student_kind = "per_token"
        try:
            per_token = train(instance.mm, cfg, mode="exact")
        finally:
            instance.mm.student_kind = "sequence_rloo"
        per_token.method = "mm_pbkd (per-token student)"
        extra.append(done(per_token))
    return BridgeRuns(instance=instance, runs=runs, counterexamples=extra)


def tolerances(cfg: BridgeConfig, mode: str) -> dict:
    """The stated tolerances a run of ``mode`` must meet at its final iterate."""
    if mode == "exact":
        return {"value_gap": cfg.tol_value_exact, "tv": cfg.tol_tv_exact}
    return {"value_gap": cfg.tol_value_sampled, "tv": cfg.tol_tv_sampled}


def convergence_checks(result: BridgeRuns, cfg: BridgeConfig) -> dict:
    """Named pass/fail checks: certified unique optimum, final gaps within tolerance, dual variable."""
    checks = {}
    for name, record in result.instance.uniqueness.items():
        checks[f"{name}: unique certified optimum"] = {
            "passed": bool(record["unique"] and record["polished"]),
            "support_size": record["support_size"],
            "tie_margin": record["tie_margin"],
            "polished_certificate_gap": record.get("polished_certificate_gap"),
        }
    for trace in result.runs:
        tol = tolerances(cfg, trace.mode)
        label = f"{trace.method} {trace.mode}" + (f" seed {trace.seed}" if trace.seed is not None else "")
        checks[f"{label}: final value gap <= {tol['value_gap']:g}"] = {
            "passed": bool(trace.value_gap[-1] <= tol["value_gap"]), "measured": trace.value_gap[-1]}
        checks[f"{label}: final TV <= {tol['tv']:g}"] = {
            "passed": bool(trace.tv[-1] <= tol["tv"]), "measured": trace.tv[-1]}
        if trace.mode == "exact":
            target = result.instance.uniqueness[trace.method].get("polished_lam_mean_nll")
            if target is not None:
                checks[f"{label}: dual variable lam = KKT multiplier (rel. 1e-3)"] = {
                    "passed": bool(abs(trace.lam[-1] - target) <= 1e-3 * target),
                    "measured": trace.lam[-1], "kkt": target}
    return checks


def _game_record(game: _Game, uniqueness: dict) -> dict:
    exact = game.exact
    return {
        "features": "phi" if game.name == "pbkd" else "phi_Q = psi - P pi_E psi",
        "d": int(game.Phi_seq.shape[1]),
        "zeta": float(game.cset.zeta),
        "zeta_over_N": game.zeta_over_n,
        "NLL_ref": game.nll_ref,
        "theta_hat": np.asarray(game.cset.theta_hat),
        "L_x": float(game.cset.prefs.L_x),
        "v_E": game.v_E,
        "exact_value": float(exact.value),
        "exact_lower": float(exact.lower),
        "exact_upper": float(exact.upper),
        "solver_certificate_gap": float(exact.certificate_gap),
        "solver_status": exact.status,
        "solver": exact.solver,
        "theta_exact": exact.theta,
        "theta_reference": game.reference_theta,
        "reference_lower": game.reference_lower,
        "q_star": game.q_star,
        "optimum": uniqueness,
    }


def _trace_record(trace: Trace, cfg: BridgeConfig) -> dict:
    record = asdict(trace)
    record["final"] = trace.final
    if trace.scheme == "two_timescale_npg" and trace.method in METHODS:
        record["tolerances"] = tolerances(cfg, trace.mode)
    return record


def experiment_record(result: BridgeRuns, cfg: BridgeConfig, *, mode: str, command: str, runtime_s: float) -> dict:
    """The JSON twin: every number the figure shows, the tolerances, seeds, and the checks."""
    from theory.common import BRACKETING_FORMULA, CHI2_FORMULA, collect_checks

    inst = result.instance
    checks = convergence_checks(result, cfg)
    pbkd, mm = inst.pbkd, inst.mm
    return {
        "experiment": "bridge",
        "mode": mode,
        "command": command,
        "seeds": {"instance": cfg.instance_seed, "data": cfg.data_seed, "sampled": list(cfg.sampled_seeds)},
        "n_seeds": len(cfg.sampled_seeds),
        "delta": cfg.delta,
        "B": cfg.B,
        "L_x": {"pbkd": float(pbkd.cset.prefs.L_x), "mm_pbkd": float(mm.cset.prefs.L_x)},
        "lam": {t.method + " " + t.mode + (f" seed {t.seed}" if t.seed is not None else ""): t.lam[-1]
                for t in result.runs},
        "radius": {"kind": cfg.radius, "formula": BRACKETING_FORMULA if cfg.radius == "bracketing"
                   else CHI2_FORMULA if cfg.radius == "chi2" else "fixed",
                   "zeta": {"pbkd": float(pbkd.cset.zeta), "mm_pbkd": float(mm.cset.zeta)}},
        "solver": {"exact": "pbkd_ref.solvers.solve(method='cutting_plane')", "tol": cfg.solver_tol,
                   "reference": "KKT-polished optimum certified by pbkd_ref.solvers.certificate",
                   "support_function": "pbkd_ref.confidence.LikelihoodSet.support"},
        "max_certificate_gap": max(float(g.exact.certificate_gap) for g in (pbkd, mm)),
        "instances": {
            "token_tree": {"V": cfg.V, "H": cfg.H, "sequences": inst.table.K, "N_pairs": cfg.N,
                           "teacher": f"softmax_policy(phi (theta* + {cfg.teacher_noise} N(0, I)), "
                                      f"temperature {cfg.teacher_temperature})",
                           "reference_policy": "uniform", "theta_star": inst.theta_star,
                           "psi": f"[successor_features(mdp, pi_E) (d={cfg.d}), {cfg.k_extra} random]"},
            "pbkd": _game_record(pbkd, inst.uniqueness["pbkd"]),
            "mm_pbkd": _game_record(mm, inst.uniqueness["mm_pbkd"]),
        },
        "config": asdict(cfg),
        "results": {
            "runs": [_trace_record(t, cfg) for t in result.runs],
            "counterexamples": [_trace_record(t, cfg) for t in result.counterexamples],
        },
        "checks": checks,
        "all_checks_passed": collect_checks(checks),
        "runtime_s": runtime_s,
        "notes": [
            "value_gap = sigma_C(v_E - v_q) - reference_lower: exact support function minus a certified "
            "lower bound on the min-max value, so it bounds the true gap from above (>= 0).",
            "tv = total variation between the trained and the exact (KKT-polished, certified) sequence "
            "distributions; the optimum is certified unique (see instances.*.optimum).",
            "scheme two_timescale_npg: per student step `adversary_steps` projected gradient steps on the "
            "Lagrangian adversary loss plus dual ascent on lam, then one natural-policy-gradient student step "
            "(gradient of the policy-gradient loss divided by the student's occupancy).",
            "exact mode enumerates all V^H sequences (and the (V^H)^2 sample pairs of the leave-one-out loss) "
            "with their probabilities as weights; sampled mode draws k responses per step.",
            "mm_pbkd uses beta = 0 (on-policy moment): its min-max is the pbkd_ref one. Its student is the "
            "sequence-level leave-one-out policy gradient on induced_sequence_reward.",
            "counter-examples: simultaneous Adam descent-ascent cycles; scheme round_refit_npg (every "
            "`refit_every` student steps `refit_steps` adversary steps, the adversary frozen in between: the LLM "
            "game's pbkd.timescale=refit) does not converge either, since against a frozen linear reward the "
            "natural-gradient student jumps towards its best response and the refit adversary follows it; "
            "mm_pbkd_student_loss (per-token "
            "advantage, the spec's student) is not the policy gradient of the on-policy moment and settles "
            "away from the min-max solution (see results.counterexamples).",
            "the value gap is measured with the support function's certified upper bound (slack <= 1e-10 "
            "B ||v|| by contract, hence the exact tolerance 1e-9); values below 1e-16 are drawn at 1e-16.",
            "scope: the instance is certified to have value < 0 (0 not in C), a smooth unique optimum; with "
            "0 in C the optimum is the kink v_q = v_E and constant-step last iterates oscillate.",
        ],
    }


_STYLE = {
    ("pbkd", "exact"): ("tab:blue", "-"),
    ("mm_pbkd", "exact"): ("tab:orange", "-"),
    ("pbkd", "sampled"): ("tab:blue", ":"),
    ("mm_pbkd", "sampled"): ("tab:orange", ":"),
}


def plot_bridge(result: BridgeRuns, cfg: BridgeConfig, path: Path) -> Path:
    """Value gap (left) and policy TV (right) against student steps, log scale, per method."""
    from theory.common import plt_module, save_figure

    plt = plt_module()
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.3))
    floor = 1e-16
    for ax, key, title in ((axes[0], "value_gap", "value gap  max_C theta^T(v_E - v_q) - min-max value"),
                           (axes[1], "tv", "policy gap  TV(q, q*) over sequences")):
        seen = set()
        for trace in result.runs:
            color, style = _STYLE[(trace.method, trace.mode)]
            label = f"{trace.method} ({trace.mode}{', k=%d' % cfg.k if trace.mode == 'sampled' else ''})"
            ax.plot(trace.steps, np.maximum(getattr(trace, key), floor), color=color, linestyle=style, lw=1.4,
                    label=None if label in seen else label)
            seen.add(label)
        for trace, color in zip(result.counterexamples, ("tab:red", "tab:green", "tab:purple")):
            label = {"simultaneous_adam": "simultaneous Adam GDA (pbkd)",
                     "round_refit_npg": f"adversary refit every {cfg.refit_every} steps, then frozen (pbkd)"
                     }.get(trace.scheme, "mm_pbkd, per-token student (spec)")
            ax.plot(trace.steps, np.maximum(getattr(trace, key), floor), color=color, linestyle="--", lw=1.1,
                    label=label)
        for mode, style in (("exact", "-"), ("sampled", ":")):
            ax.axhline(tolerances(cfg, mode)[key], color="gray", linestyle=style, lw=0.8,
                       label=f"stated tolerance ({mode})")
        ax.set_yscale("log")
        ax.set_xlabel("student steps")
        ax.set_title(title)
    axes[1].legend(loc="lower right", fontsize=7)
    fig.suptitle(f"Exactness bridge: llm.losses on a token tree (V={cfg.V}, H={cfg.H}, N={cfg.N}) "
                 f"vs the exact pbkd_ref min-max", fontsize=10)
    return save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict:
    """``python -m llm.bridge [--quick] [--out-dir figures] [--no-progress]``."""
    from pbkd_ref.cli import ArgumentParser
    from theory.common import FIGURES_DIR, QUICK_DIR, output_dir, write_json

    parser = ArgumentParser(prog="python -m llm.bridge", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and one sampled seed (seconds)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help=f"where bridge.png/.json go (default {FIGURES_DIR}/, or {QUICK_DIR}/ with --quick)")
    parser.add_argument("--no-progress", action="store_true", help="no per-run progress lines")
    args = parser.parse_args(argv)
    args.out_dir = output_dir(args.out_dir, args.quick)
    cfg = quick_config() if args.quick else BridgeConfig()
    start = time.perf_counter()
    result = run_bridge(cfg, progress=not args.no_progress)
    command = "python -m llm.bridge" + (" --quick" if args.quick else "") + f" --out-dir {args.out_dir}"
    record = experiment_record(result, cfg, mode="quick" if args.quick else "full", command=command,
                               runtime_s=time.perf_counter() - start)
    plot_bridge(result, cfg, args.out_dir / "bridge.png")
    write_json(args.out_dir / "bridge.json", record)
    failed = [name for name, check in record["checks"].items() if not check["passed"]]
    print(f"[bridge] wrote {args.out_dir / 'bridge.png'} and bridge.json; "
          f"{len(record['checks']) - len(failed)}/{len(record['checks'])} checks passed" +
          (f"; failed: {failed}" if failed else ""))
    return record


if __name__ == "__main__":
    main()

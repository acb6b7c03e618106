"""Finite-horizon MDPs, occupancy measures and exact planning (spec tabular.md section 1).

Notation: ``S`` states, ``A`` actions, horizon ``H``, feature dimension ``d``;
``P[h, s, a, s']`` for ``h = 0..H-2``; initial law ``rho[s]``; per-step features
``phi[h, s, a] in R^d``.  A Markov policy is ``pi[h, s, a] = pi_h(a | s)``; its
occupancy is ``d[h, s, a] = Pr(s_h = s, a_h = a)``; its feature expectation is
``v_pi = sum_{h,s,a} d[h,s,a] phi[h,s,a] = Phi^T d``; its return under the linear
reward ``r_theta = phi @ theta`` is ``J(pi, theta) = theta^T v_pi``.

``occupancy`` is the one occupancy routine of the project; every caller that needs
``d_pi`` or ``v_pi`` goes through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

# Tolerance for "sums to one" and "nonnegative" checks on probability tables.
_PROB_ATOL = 1e-8


def _as_float_array(value, name: str, ndim: int) -> np.ndarray:
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array; got {type(value).__name__}") from exc
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions; got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite entries; pass finite values")
    return arr


def _check_positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value}")
    return int(value)


def _check_rng(rng) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise ValueError(
            f"rng must be a numpy.random.Generator (e.g. np.random.default_rng(0)); got {type(rng).__name__}"
        )
    return rng


def _check_distribution_rows(arr: np.ndarray, name: str) -> None:
    if arr.size == 0:
        return
    if np.any(arr < -_PROB_ATOL):
        raise ValueError(f"{name} has negative probabilities (min {arr.min():.3g}); pass a nonnegative table")
    sums = arr.sum(axis=-1)
    worst = np.max(np.abs(sums - 1.0))
    if worst > _PROB_ATOL:
        raise ValueError(
            f"{name} rows must sum to 1 over the last axis (worst deviation {worst:.3g}); normalise them"
        )


@dataclass(frozen=True)
class MDP:
    """Finite-horizon MDP with time-dependent transitions and linear features (spec section 1).

    Attributes
    ----------
    P : (H-1, S, A, S) transition kernels ``P[h, s, a, s']``; rows sum to 1.
    rho : (S,) initial state distribution.
    phi : (H, S, A, d) per-step features; ``phi(tau) = sum_h phi[h, s_h, a_h]``.

    The arrays are copied to float64 and made read-only on construction.
    """

    P: np.ndarray
    rho: np.ndarray
    phi: np.ndarray

    def __post_init__(self) -> None:
        phi = _as_float_array(self.phi, "phi", 4)
        P = _as_float_array(self.P, "P", 4)
        rho = _as_float_array(self.rho, "rho", 1)
        H, S, A, d = phi.shape
        if min(H, S, A, d) < 1:
            raise ValueError(f"phi must have shape (H, S, A, d) with every size >= 1; got {phi.shape}")
        if P.shape != (H - 1, S, A, S):
            raise ValueError(
                f"P must have shape (H-1, S, A, S) = {(H - 1, S, A, S)} to match phi {phi.shape}; got {P.shape}"
            )
        if rho.shape != (S,):
            raise ValueError(f"rho must have shape (S,) = ({S},); got {rho.shape}")
        _check_distribution_rows(P, "P")
        _check_distribution_rows(rho, "rho")
        for name, arr in (("P", P), ("rho", rho), ("phi", phi)):
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    @property
    def H(self) -> int:
        return self.phi.shape[0]

    @property
    def S(self) -> int:
        return self.phi.shape[1]

    @property
    def A(self) -> int:
        return self.phi.shape[2]

    @property
    def d(self) -> int:
        return self.phi.shape[3]


def _check_mdp(mdp) -> MDP:
    if not isinstance(mdp, MDP):
        raise ValueError(f"mdp must be a pbkd_ref.mdp.MDP; got {type(mdp).__name__}")
    return mdp


def _check_policy(mdp: MDP, pi, name: str = "pi") -> np.ndarray:
    pi = _as_float_array(pi, name, 3)
    if pi.shape != (mdp.H, mdp.S, mdp.A):
        raise ValueError(f"{name} must have shape (H, S, A) = {(mdp.H, mdp.S, mdp.A)}; got {pi.shape}")
    _check_distribution_rows(pi, name)
    return pi


def _check_occupancy_array(mdp: MDP, d, name: str = "d") -> np.ndarray:
    d = _as_float_array(d, name, 3)
    if d.shape != (mdp.H, mdp.S, mdp.A):
        raise ValueError(f"{name} must have shape (H, S, A) = {(mdp.H, mdp.S, mdp.A)}; got {d.shape}")
    return d


def _check_theta(theta, dim: int, name: str = "theta") -> np.ndarray:
    theta = _as_float_array(theta, name, 1)
    if theta.shape != (dim,):
        raise ValueError(f"{name} must have shape (d,) = ({dim},); got {theta.shape}")
    return theta


def _check_reward(mdp: MDP, r, name: str = "r") -> np.ndarray:
    r = _as_float_array(r, name, 3)
    if r.shape != (mdp.H, mdp.S, mdp.A):
        raise ValueError(
            f"{name} must have shape (H, S, A) = {(mdp.H, mdp.S, mdp.A)}; "
            "build it with rewards(mdp, theta)"
        )
    return r


def _scale_features(phi: np.ndarray, H: int, L: float) -> np.ndarray:
    """Scale so every per-step feature has norm <= L / H, hence ||phi(tau)|| <= L."""
    largest = np.max(np.linalg.norm(phi, axis=-1))
    if largest == 0.0:
        return phi
    return phi * ((L / H) / largest)


def random_mdp(S, A, H, d, rng, *, dirichlet: float = 1.0, L: float = 1.0) -> MDP:
    """Random MDP for property tests (spec section 1, "random MDPs").

    Rows of ``P`` and ``rho`` are Dirichlet(``dirichlet`` * 1); features are uniform on
    ``[-1, 1]^d`` and rescaled so that the largest per-step norm is ``L / H``, which
    gives ``||phi(tau)|| <= L`` for every trajectory.
    """
    S = _check_positive_int(S, "S")
    A = _check_positive_int(A, "A")
    H = _check_positive_int(H, "H")
    d = _check_positive_int(d, "d")
    rng = _check_rng(rng)
    if not np.isfinite(dirichlet) or dirichlet <= 0:
        raise ValueError(f"dirichlet must be a positive concentration; got {dirichlet!r}")
    if not np.isfinite(L) or L <= 0:
        raise ValueError(f"L must be a positive feature bound; got {L!r}")
    alpha = np.full(S, float(dirichlet))
    P = rng.dirichlet(alpha, size=(H - 1, S, A)) if H > 1 else np.zeros((0, S, A, S))
    rho = rng.dirichlet(alpha)
    phi = _scale_features(rng.uniform(-1.0, 1.0, size=(H, S, A, d)), H, float(L))
    return MDP(P=P, rho=rho, phi=phi)


def token_tree_mdp(V, H, d, rng, *, L: float = 1.0) -> MDP:
    """Token-tree MDP: generation of ``H`` tokens from a vocabulary of size ``V`` (spec section 1).

    The state at layer ``h`` is the prefix of the ``h`` tokens emitted so far, indexed in
    ``[0, V^h)`` (base-``V`` digits, most significant first); ``S = V^(H-1)``; the action is
    the next token and the transition is the deterministic append ``s' = s * V + a``;
    ``rho = e_0`` (empty prefix).  Indices ``>= V^h`` at layer ``h`` are unreachable; they
    carry the well-defined transition ``s' = (s * V + a) mod S`` only so that ``P`` is a
    valid kernel everywhere.  Features are random, scaled so ``||phi(tau)|| <= L``.
    """
    V = _check_positive_int(V, "V")
    H = _check_positive_int(H, "H")
    d = _check_positive_int(d, "d")
    rng = _check_rng(rng)
    if not np.isfinite(L) or L <= 0:
        raise ValueError(f"L must be a positive feature bound; got {L!r}")
    S = V ** (H - 1)
    if S * V * S * max(H - 1, 1) > 50_000_000:
        raise ValueError(
            f"token_tree_mdp(V={V}, H={H}) needs a dense P with {S * V * S * (H - 1):,} entries; "
            "reduce V or H"
        )
    A = V
    P = np.zeros((H - 1, S, A, S))
    s = np.arange(S)[:, None]
    a = np.arange(A)[None, :]
    nxt = (s * V + a) % S
    for h in range(H - 1):
        P[h, s, a, nxt] = 1.0
    rho = np.zeros(S)
    rho[0] = 1.0
    phi = _scale_features(rng.uniform(-1.0, 1.0, size=(H, S, A, d)), H, float(L))
    return MDP(P=P, rho=rho, phi=phi)


def occupancy(mdp: MDP, pi) -> np.ndarray:
    """Occupancy ``d[h, s, a] = Pr_pi(s_h = s, a_h = a)`` by forward recursion (spec section 1).

    ``d[0] = rho * pi_0``; ``mu_{h+1}(s') = sum_{s,a} d[h,s,a] P[h,s,a,s']``;
    ``d[h+1] = mu_{h+1} * pi_{h+1}``.  The one occupancy routine of the project.
    """
    mdp = _check_mdp(mdp)
    pi = _check_policy(mdp, pi)
    d = np.empty_like(pi)
    d[0] = mdp.rho[:, None] * pi[0]
    for h in range(mdp.H - 1):
        mu_next = np.einsum("sa,sat->t", d[h], mdp.P[h])
        d[h + 1] = mu_next[:, None] * pi[h + 1]
    return d


def policy_from_occupancy(mdp: MDP, d) -> np.ndarray:
    """Policy ``pi[h,s,a] = d[h,s,a] / sum_a d[h,s,a]``; uniform where a state has zero mass (spec section 3).

    Round-off negatives down to ``-1e-8`` (e.g. from LP duals) are clipped to zero.
    """
    mdp = _check_mdp(mdp)
    d = _check_occupancy_array(mdp, d)
    if np.any(d < -_PROB_ATOL):
        raise ValueError(f"d must be nonnegative (min {d.min():.3g}); pass an occupancy measure")
    d = np.clip(d, 0.0, None)
    mass = d.sum(axis=-1, keepdims=True)
    pi = np.full_like(d, 1.0 / mdp.A)
    np.divide(d, mass, out=pi, where=np.broadcast_to(mass > 0.0, d.shape))
    return pi


def occupancy_features(mdp: MDP, d) -> np.ndarray:
    """Feature expectation of an occupancy, ``Phi^T d = sum_{h,s,a} d[h,s,a] phi[h,s,a]``."""
    mdp = _check_mdp(mdp)
    d = _check_occupancy_array(mdp, d)
    return np.einsum("hsa,hsak->k", d, mdp.phi)


def feature_expectation(mdp: MDP, pi) -> np.ndarray:
    """``v_pi = Phi^T d_pi`` (spec section 1)."""
    return occupancy_features(mdp, occupancy(mdp, pi))


def rewards(mdp: MDP, theta) -> np.ndarray:
    """Linear per-step reward ``r[h,s,a] = theta^T phi[h,s,a]`` (spec section 1)."""
    mdp = _check_mdp(mdp)
    theta = _check_theta(theta, mdp.d)
    return mdp.phi @ theta


def evaluate(mdp: MDP, pi, r) -> tuple[np.ndarray, np.ndarray]:
    """Backward induction for a fixed policy: ``Q_h = r_h + P_h V_{h+1}``, ``V_h = <pi_h, Q_h>``.

    Returns ``(Q (H,S,A), V (H,S))`` with ``V_H = 0``; ``J(pi, r) = rho^T V[0]``.
    """
    mdp = _check_mdp(mdp)
    pi = _check_policy(mdp, pi)
    r = _check_reward(mdp, r)
    Q = np.empty_like(r)
    V = np.empty((mdp.H, mdp.S))
    next_V = np.zeros(mdp.S)
    for h in range(mdp.H - 1, -1, -1):
        Q[h] = r[h] if h == mdp.H - 1 else r[h] + mdp.P[h] @ next_V
        V[h] = np.sum(pi[h] * Q[h], axis=-1)
        next_V = V[h]
    return Q, V


def plan(mdp: MDP, r) -> tuple[np.ndarray, np.ndarray]:
    """Optimal deterministic policy by backward induction (spec section 3).

    ``Q*_h = r_h + P_h V*_{h+1}``, ``V*_h = max_a Q*_h``; ties go to the lowest action
    index.  Returns ``(pi (H,S,A) one-hot, V* (H,S))``.
    """
    mdp = _check_mdp(mdp)
    r = _check_reward(mdp, r)
    pi = np.zeros_like(r)
    V = np.empty((mdp.H, mdp.S))
    next_V = np.zeros(mdp.S)
    states = np.arange(mdp.S)
    for h in range(mdp.H - 1, -1, -1):
        Q_h = r[h] if h == mdp.H - 1 else r[h] + mdp.P[h] @ next_V
        best = np.argmax(Q_h, axis=-1)
        pi[h, states, best] = 1.0
        V[h] = Q_h[states, best]
        next_V = V[h]
    return pi, V


def value(mdp: MDP, pi, theta) -> float:
    """``J(pi, theta) = theta^T v_pi`` (spec section 1)."""
    mdp = _check_mdp(mdp)
    theta = _check_theta(theta, mdp.d)
    return float(theta @ feature_expectation(mdp, pi))


def softmax_policy(mdp: MDP, r, temperature) -> np.ndarray:
    """Soft-optimal policy by soft backward induction (spec section 1, suboptimal teachers).

    ``Q_h = r_h + P_h V_{h+1}``, ``V_h(s) = T log sum_a exp(Q_h(s,a) / T)``,
    ``pi_h(a|s) = exp((Q_h(s,a) - V_h(s)) / T)`` with temperature ``T > 0``; as ``T -> 0``
    it approaches the greedy policy of ``plan``.
    """
    mdp = _check_mdp(mdp)
    r = _check_reward(mdp, r)
    if isinstance(temperature, bool) or not np.isscalar(temperature) or not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(
            f"temperature must be a finite number > 0; got {temperature!r} (use plan() for the greedy policy)"
        )
    T = float(temperature)
    pi = np.empty_like(r)
    next_V = np.zeros(mdp.S)
    for h in range(mdp.H - 1, -1, -1):
        Q_h = r[h] if h == mdp.H - 1 else r[h] + mdp.P[h] @ next_V
        V_h = T * logsumexp(Q_h / T, axis=-1)
        pi[h] = np.exp((Q_h - V_h[:, None]) / T)
        pi[h] /= pi[h].sum(axis=-1, keepdims=True)
        next_V = V_h
    return pi


def _sample_rows(table: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw one index from each distribution ``table[rows[i]]`` by inverse CDF.

    Only the distinct rows in use are accumulated; a single ``searchsorted`` over the
    concatenated, offset CDFs (row ``k`` shifted by ``k``) samples every draw at once.
    """
    K = table.shape[1]
    used, inverse = np.unique(rows, return_inverse=True)
    cdf = np.cumsum(np.clip(table[used], 0.0, None), axis=1)
    cdf /= cdf[:, -1:]
    cdf[:, -1] = 1.0
    offset_cdf = (cdf + np.arange(len(used))[:, None]).ravel()
    u = rng.random(len(rows))
    flat = np.searchsorted(offset_cdf, inverse + u, side="right")
    return np.minimum(flat - inverse * K, K - 1)


def sample_trajectories(mdp: MDP, pi, n, rng) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``n`` trajectories of ``pi``: ``s_0 ~ rho``, ``a_h ~ pi_h(.|s_h)``, ``s_{h+1} ~ P_h(.|s_h,a_h)``.

    Returns integer arrays ``states (n, H)`` and ``actions (n, H)``.
    """
    mdp = _check_mdp(mdp)
    pi = _check_policy(mdp, pi)
    n = _check_positive_int(n, "n", minimum=0)
    rng = _check_rng(rng)
    states = np.zeros((n, mdp.H), dtype=np.int64)
    actions = np.zeros((n, mdp.H), dtype=np.int64)
    if n == 0:
        return states, actions
    states[:, 0] = _sample_rows(mdp.rho[None, :], np.zeros(n, dtype=np.int64), rng)
    for h in range(mdp.H):
        actions[:, h] = _sample_rows(pi[h], states[:, h], rng)
        if h < mdp.H - 1:
            flat_rows = states[:, h] * mdp.A + actions[:, h]
            states[:, h + 1] = _sample_rows(mdp.P[h].reshape(mdp.S * mdp.A, mdp.S), flat_rows, rng)
    return states, actions


def check_trajectories(mdp: MDP, states, actions) -> tuple[np.ndarray, np.ndarray]:
    """Validate sampled trajectories: integer arrays of shape ``(n, H)`` with entries in range."""
    states = np.asarray(states)
    actions = np.asarray(actions)
    for name, arr, bound in (("states", states, mdp.S), ("actions", actions, mdp.A)):
        if arr.ndim != 2 or arr.shape[1] != mdp.H:
            raise ValueError(f"{name} must have shape (n, H) with H = {mdp.H}; got {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must be an integer array; got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= bound):
            raise ValueError(f"{name} entries must lie in [0, {bound}); got range [{arr.min()}, {arr.max()}]")
    if states.shape != actions.shape:
        raise ValueError(f"states {states.shape} and actions {actions.shape} must have the same shape")
    return states, actions


def trajectory_features(mdp: MDP, states, actions) -> np.ndarray:
    """``phi(tau) = sum_h phi[h, s_h, a_h]`` for each trajectory; returns ``(n, d)``."""
    mdp = _check_mdp(mdp)
    states, actions = check_trajectories(mdp, states, actions)
    steps = np.arange(mdp.H)[None, :]
    return mdp.phi[steps, states, actions].sum(axis=1)

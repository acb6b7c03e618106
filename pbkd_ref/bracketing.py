"""Bracketing of the Bradley-Terry class, constructively (spec tabular.md section 2, Proposition 1).

For the linear class ``P_theta(o = 1 | x) = sigma(theta^T x)``, ``||theta|| <= B``,
``||x|| <= L_x``:

1. an ``eps'``-net ``{theta_j}`` of the ``B``-ball (every ``theta`` of the ball lies within
   ``eps'`` of some ``theta_j``) with at most ``(1 + 2B/eps')^d`` points;
2. brackets ``l_j(1|x) = sigma(theta_j^T x - eps' L_x)``, ``u_j(1|x) = sigma(theta_j^T x + eps' L_x)``
   and the complements ``l_j(0|x) = 1 - u_j(1|x)``, ``u_j(0|x) = 1 - l_j(1|x)``.  Every
   ``P_theta`` with ``||theta - theta_j|| <= eps'`` lies in bracket ``j`` (since
   ``|theta^T x - theta_j^T x| <= eps' L_x`` and ``sigma`` is increasing), and the L1 width is
   ``sum_o (u_j - l_j) = 2 (sigma(a + eps' L_x) - sigma(a - eps' L_x)) <= eps' L_x`` because
   ``sigma' <= 1/4``.

With ``eps' = eps / L_x`` this gives ``log N_[](eps) <= d log(1 + 2 B L_x / eps)``, the
bound behind the ``bracketing`` confidence radius (``confidence.radius``).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree
from scipy.special import expit

from pbkd_ref.mdp import _as_float_array

# Largest candidate grid epsilon_net will enumerate.
_MAX_CANDIDATES = 400_000


def _check_positive(value, name: str) -> float:
    if isinstance(value, bool) or not np.isscalar(value) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
    return float(value)


def _check_nonnegative(value, name: str) -> float:
    if isinstance(value, bool) or not np.isscalar(value) or not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
    return float(value)


def _check_dim(d) -> int:
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
        raise ValueError(f"d must be a positive integer; got {d!r}")
    return int(d)


def net_size_bound(B, d, eps_prime) -> float:
    """Volumetric bound ``(1 + 2B/eps')^d`` on an ``eps'``-separated subset of the ``B``-ball."""
    B = _check_positive(B, "B")
    d = _check_dim(d)
    eps_prime = _check_positive(eps_prime, "eps_prime")
    return float((1.0 + 2.0 * B / eps_prime) ** d)


def epsilon_net(B, d, eps_prime, rng=None) -> np.ndarray:
    """An ``eps'``-net of ``{||theta|| <= B}`` as a greedy maximal separated set (Proposition 1).

    Construction: candidates are the points of the cubic grid of spacing
    ``h = eps' / (4 sqrt(d))`` within ``B + r`` of the origin, ``r = h sqrt(d) / 2 = eps'/8``
    (the grid's covering radius), projected onto the ball; since projection onto the ball is
    non-expansive, every point of the ball is within ``r`` of a candidate.  Candidates are
    scanned in lexicographic order (or in an ``rng`` permutation) and kept when farther than
    ``s = eps' - r`` from every kept point.  Hence every candidate is within ``s`` of the net
    and every point of the ball within ``s + r = eps'`` (covering), and kept points are
    ``s``-separated inside the ball.  The size is checked against ``(1 + 2B/eps')^d``
    (the volumetric packing bound; greedy sets stay well below it).

    Returns a ``(K, d)`` array.  Raises ValueError when the candidate grid would exceed
    ``400,000`` points (increase ``eps_prime`` or decrease ``d``).
    """
    B = _check_positive(B, "B")
    d = _check_dim(d)
    eps_prime = _check_positive(eps_prime, "eps_prime")
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be None or a numpy.random.Generator; got {type(rng).__name__}")
    if eps_prime >= B:
        # One point covers the ball: every theta is within B <= eps' of the origin.
        return np.zeros((1, d))
    h = eps_prime / (4.0 * np.sqrt(d))
    r = h * np.sqrt(d) / 2.0
    separation = eps_prime - r
    half = int(np.ceil((B + r) / h))
    side = 2 * half + 1
    if float(side) ** d > 50 * _MAX_CANDIDATES:
        raise ValueError(
            f"epsilon_net(B={B}, d={d}, eps_prime={eps_prime}) needs a grid of {float(side) ** d:.3g} points; "
            "increase eps_prime or decrease d"
        )
    axis = h * np.arange(-half, half + 1)
    mesh = np.stack(np.meshgrid(*([axis] * d), indexing="ij"), axis=-1).reshape(-1, d)
    norms = np.linalg.norm(mesh, axis=1)
    candidates = mesh[norms <= B + r]
    if len(candidates) > _MAX_CANDIDATES:
        raise ValueError(
            f"epsilon_net(B={B}, d={d}, eps_prime={eps_prime}) needs {len(candidates):,} candidates "
            f"(limit {_MAX_CANDIDATES:,}); increase eps_prime or decrease d"
        )
    cand_norms = np.linalg.norm(candidates, axis=1, keepdims=True)
    candidates = np.where(cand_norms > B, candidates * (B / np.maximum(cand_norms, 1e-300)), candidates)
    if rng is not None:
        candidates = candidates[rng.permutation(len(candidates))]
    # Greedy scan: keep the first candidate farther than `separation` from all kept points;
    # a k-d tree marks the candidates within `separation` of each kept point as covered.
    tree = cKDTree(candidates)
    covered = np.zeros(len(candidates), dtype=bool)
    kept = []
    start = 0
    while True:
        free = np.flatnonzero(~covered[start:])
        if free.size == 0:
            break
        index = start + int(free[0])
        kept.append(index)
        covered[tree.query_ball_point(candidates[index], separation)] = True
        covered[index] = True
        start = index + 1
    net = candidates[kept]
    bound = net_size_bound(B, d, eps_prime)
    if len(net) > bound:
        raise RuntimeError(
            f"greedy net has {len(net)} points, above the volumetric bound {bound:.6g}; "
            "this contradicts the packing argument and indicates a bug"
        )
    return net


def brackets(net, x, eps_prime, L_x) -> tuple[np.ndarray, np.ndarray]:
    """Brackets ``(lower, upper)``, each ``(K, 2)``, of the label law at ``x`` (Proposition 1).

    Column ``o`` holds ``l_j(o|x)`` / ``u_j(o|x)``:
    ``l_j(1|x) = sigma(theta_j^T x - eps' L_x)``, ``u_j(1|x) = sigma(theta_j^T x + eps' L_x)``,
    ``l_j(0|x) = 1 - u_j(1|x)``, ``u_j(0|x) = 1 - l_j(1|x)``.  ``||x|| <= L_x`` is required.
    """
    net = _as_float_array(net, "net", 2)
    x = _as_float_array(x, "x", 1)
    if net.shape[1] != x.shape[0]:
        raise ValueError(f"net has dimension {net.shape[1]} but x has {x.shape[0]}; they must match")
    eps_prime = _check_positive(eps_prime, "eps_prime")
    L_x = _check_nonnegative(L_x, "L_x")
    norm_x = float(np.linalg.norm(x))
    if norm_x > L_x * (1.0 + 1e-12) + 1e-300:
        raise ValueError(f"x has norm {norm_x:.6g} > L_x = {L_x:.6g}; pass L_x >= ||x||")
    a = net @ x
    margin = eps_prime * L_x
    lower = np.empty((len(net), 2))
    upper = np.empty((len(net), 2))
    lower[:, 1] = expit(a - margin)
    upper[:, 1] = expit(a + margin)
    lower[:, 0] = expit(-(a + margin))  # = 1 - u_j(1|x)
    upper[:, 0] = expit(-(a - margin))  # = 1 - l_j(1|x)
    return lower, upper


def log_bracketing_number_bound(eps, *, d, B, L_x) -> float:
    """``log N_[](eps) <= d log(1 + 2 B L_x / eps)`` for the linear Bradley-Terry class (spec section 2)."""
    eps = _check_positive(eps, "eps")
    d = _check_dim(d)
    B = _check_positive(B, "B")
    L_x = _check_nonnegative(L_x, "L_x")
    return float(d * np.log1p(2.0 * B * L_x / eps))

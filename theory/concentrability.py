"""Concentrability coefficients of the linear Bradley-Terry class (theory/STATEMENTS.md, Definition 1).

For a direction ``u`` and a regulariser ``lam > 0``

    C_N(u) = sup_{w != 0} (w^T u)^2 / (w^T Sigmabar_N w) = u^T Sigmabar_N^{-1} u,
    Sigmabar_N = (Sigma_N + lam I) / N,   Sigma_N = sum_n x_n x_n^T (counts included):

the largest generalised eigenvalue of the pair ``(u u^T, Sigmabar_N)``.  It measures
how well the realised feature differences cover the direction ``u`` in which the
estimand looks (``v* - v_E`` for estimand 1 of spec section 5, any ``u`` for the
confidence width); Theorem 1 bounds each estimand by
``sqrt((8 zeta_N / gamma + 4 lam B^2) C_N(u) / N)``.

The population version replaces ``Sigma_N / N`` by ``E[x x^T]`` under ``(pi_E, pi_ref)``,
computed exactly by dynamic programming over the MDP (``trajectory_feature_moments``):
``tau0 ~ pi_E`` and ``tau1 ~ pi_ref`` are independent, so with ``x = phi(tau1) - phi(tau0)``

    E[x x^T] = M_ref + M_E - v_ref v_E^T - v_E v_ref^T,   M_pi = E_pi[phi(tau) phi(tau)^T].

The online coefficient of students ``pi_1 .. pi_T`` is
``C_T^on = lambda_max(sum_t mu_t mu_t^T, V_T)``, ``mu_t = v_{pi_t} - v_E``,
``V_T = lam I + sum_{s<T} x_s x_s^T`` (Theorem 2).

Every generalised eigenvalue goes through ``largest_generalized_eigenvalue``, which
also handles a singular (semidefinite) second matrix: the coefficient is then
infinite exactly when ``u`` leaves the range of the design.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from pbkd_ref.mdp import MDP, _check_policy, feature_expectation
from pbkd_ref.preferences import Preferences

# Relative tolerance below which an eigenvalue of a semidefinite matrix counts as zero.
_RANK_RTOL = 1e-12


def _as_matrix(value, name: str, d: int | None = None) -> np.ndarray:
    M = np.asarray(value, dtype=np.float64)
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"{name} must be a square (d, d) matrix; got shape {M.shape}")
    if d is not None and M.shape[0] != d:
        raise ValueError(f"{name} must have shape ({d}, {d}); got {M.shape}")
    if not np.all(np.isfinite(M)):
        raise ValueError(f"{name} contains NaN or infinite entries; pass a finite matrix")
    if not np.allclose(M, M.T, rtol=1e-10, atol=1e-12 * max(1.0, float(np.abs(M).max(initial=0.0)))):
        raise ValueError(f"{name} must be symmetric; symmetrise it with (M + M.T) / 2")
    return 0.5 * (M + M.T)


def _as_vector(value, name: str, d: int | None = None) -> np.ndarray:
    v = np.asarray(value, dtype=np.float64)
    if v.ndim != 1 or (d is not None and v.shape != (d,)):
        raise ValueError(f"{name} must be a vector of shape ({d if d is not None else 'd'},); got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} contains NaN or infinite entries; pass a finite vector")
    return v


def _check_positive(value, name: str) -> float:
    if isinstance(value, bool) or not np.isscalar(value) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
    return float(value)


def largest_generalized_eigenvalue(A, Bmat, *, atol: float = 0.0) -> float:
    """``lambda_max(A, Bmat) = sup_{w: w^T Bmat w > 0} (w^T A w) / (w^T Bmat w)`` for PSD ``A``, ``Bmat``.

    With ``Bmat`` positive definite this is ``scipy.linalg.eigh(A, Bmat)``'s largest
    eigenvalue.  With ``Bmat`` only semidefinite, ``Bmat = Q diag(s) Q^T``: if ``A`` has
    any mass on the null space of ``Bmat`` the supremum is ``+inf`` (a direction that
    ``A`` sees and ``Bmat`` does not); otherwise ``A`` lives on the range (``A`` is PSD,
    so a zero diagonal block forces zero off-diagonal blocks) and the pencil is solved
    there.  Eigenvalues of ``Bmat`` at most ``max(atol, 1e-12 lambda_max(Bmat))`` count as zero;
    pass ``atol`` at the round-off level of the computation that produced ``Bmat``.
    """
    A = _as_matrix(A, "A")
    Bmat = _as_matrix(Bmat, "Bmat", A.shape[0])
    if not np.isfinite(atol) or atol < 0:
        raise ValueError(f"atol must be a finite number >= 0; got {atol!r}")
    s, Q = np.linalg.eigh(Bmat)
    scale = max(float(np.abs(s).max(initial=0.0)), float(np.abs(A).max(initial=0.0)), 1e-300)
    zero = max(float(atol), _RANK_RTOL * float(np.abs(s).max(initial=0.0)))
    if s.min() < -max(1e-9 * scale, zero):
        raise ValueError(f"Bmat must be positive semidefinite; its smallest eigenvalue is {s.min():.3g}")
    positive = s > zero
    if positive.all():
        return float(scipy.linalg.eigh(A, Bmat, eigvals_only=True)[-1])
    A_rot = Q.T @ A @ Q
    null = ~positive
    if np.abs(A_rot[np.ix_(null, null)]).max(initial=0.0) > 1e-10 * scale:
        return float("inf")
    if not positive.any():
        return 0.0
    A_range = A_rot[np.ix_(positive, positive)]
    return float(scipy.linalg.eigh(A_range, np.diag(s[positive]), eigvals_only=True)[-1])


def design_matrix(data) -> tuple[np.ndarray, float]:
    """``(Sigma_N, N)`` with ``Sigma_N = sum_n x_n x_n^T`` (Definition 1), counts included.

    ``data`` is aggregated ``Preferences`` (each distinct row weighted by its count
    ``n1 + n0``) or a raw ``(N, d)`` array of feature differences.
    """
    if isinstance(data, Preferences):
        X, n = np.asarray(data.X), np.asarray(data.counts)
        return (X.T * n) @ X, float(n.sum())
    X = np.asarray(data, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] < 1:
        raise ValueError(f"data must be Preferences or an (N, d) array of feature differences; got shape {X.shape}")
    if not np.all(np.isfinite(X)):
        raise ValueError("data contains NaN or infinite feature differences")
    return X.T @ X, float(X.shape[0])


def design_coefficient(u, Sigma, N, *, lam: float = 1.0, method: str = "generalized_eigenvalue") -> float:
    """``C_N(u) = u^T Sigmabar_N^{-1} u``, ``Sigmabar_N = (Sigma_N + lam I) / N`` (Definition 1).

    method: ``"generalized_eigenvalue"`` (the definition: the largest eigenvalue of the
    pencil ``(u u^T, Sigmabar_N)`` from ``scipy.linalg.eigh``) or ``"closed_form"``
    (``N u^T (Sigma_N + lam I)^{-1} u`` by a Cholesky solve); the two agree, and the
    tests check it.
    """
    Sigma = _as_matrix(Sigma, "Sigma")
    d = Sigma.shape[0]
    u = _as_vector(u, "u", d)
    N = _check_positive(N, "N")
    lam = _check_positive(lam, "lam")
    Sigmabar = (Sigma + lam * np.eye(d)) / N
    if method == "generalized_eigenvalue":
        return largest_generalized_eigenvalue(np.outer(u, u), Sigmabar)
    if method == "closed_form":
        factor = scipy.linalg.cho_factor(Sigma + lam * np.eye(d))
        return float(N * u @ scipy.linalg.cho_solve(factor, u))
    raise ValueError(f"method must be 'generalized_eigenvalue' or 'closed_form'; got {method!r}")


def sample_coefficient(u, data, *, lam: float = 1.0) -> float:
    """``C_N(u)`` of a preference sample (``Preferences`` or an ``(N, d)`` array), Definition 1."""
    Sigma, N = design_matrix(data)
    if N <= 0:
        raise ValueError("data holds no pairs; C_N(u) needs N >= 1")
    return design_coefficient(u, Sigma, N, lam=lam)


def trajectory_feature_moments(mdp: MDP, pi) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``(v_pi, M_pi) = (E_pi[phi(tau)], E_pi[phi(tau) phi(tau)^T])`` by backward dynamic programming.

    With the tail feature ``G_h = sum_{h' >= h} phi[h', s_h', a_h']`` and
    ``m1_h(s) = E[G_h | s_h = s]``, ``m2_h(s) = E[G_h G_h^T | s_h = s]``:

        n1_h(s,a) = sum_s' P[h,s,a,s'] m1_{h+1}(s'),  n2_h(s,a) = sum_s' P[h,s,a,s'] m2_{h+1}(s')
        m1_h(s) = sum_a pi_h(a|s) [phi_hsa + n1_h(s,a)]
        m2_h(s) = sum_a pi_h(a|s) [phi_hsa phi_hsa^T + phi_hsa n1_h(s,a)^T + n1_h(s,a) phi_hsa^T + n2_h(s,a)]

    (``G_h = phi_h + G_{h+1}`` and the Markov property), ``m1_H = 0``, ``m2_H = 0``;
    ``v_pi = rho^T m1_0`` and ``M_pi = sum_s rho(s) m2_0(s)``.
    """
    if not isinstance(mdp, MDP):
        raise ValueError(f"mdp must be a pbkd_ref.mdp.MDP; got {type(mdp).__name__}")
    pi = _check_policy(mdp, pi)
    m1 = np.zeros((mdp.S, mdp.d))
    m2 = np.zeros((mdp.S, mdp.d, mdp.d))
    for h in range(mdp.H - 1, -1, -1):
        phi_h = mdp.phi[h]  # (S, A, d)
        if h == mdp.H - 1:
            n1 = np.zeros_like(phi_h)
            n2 = np.zeros(phi_h.shape + (mdp.d,))
        else:
            n1 = np.einsum("sat,tk->sak", mdp.P[h], m1)
            n2 = np.einsum("sat,tkl->sakl", mdp.P[h], m2)
        cross = np.einsum("sak,sal->sakl", phi_h, n1)
        step2 = np.einsum("sak,sal->sakl", phi_h, phi_h) + cross + cross.transpose(0, 1, 3, 2) + n2
        m1 = np.einsum("sa,sak->sk", pi[h], phi_h + n1)
        m2 = np.einsum("sa,sakl->skl", pi[h], step2)
    return mdp.rho @ m1, np.einsum("s,skl->kl", mdp.rho, m2)


def pair_second_moment(mdp: MDP, pi_E, pi_ref) -> np.ndarray:
    """Exact ``E[x x^T]`` for ``x = phi(tau1) - phi(tau0)``, ``tau0 ~ pi_E``, ``tau1 ~ pi_ref`` independent.

    ``E[x x^T] = M_ref + M_E - v_ref v_E^T - v_E v_ref^T`` (Definition 1, population version).
    """
    v_E, M_E = trajectory_feature_moments(mdp, _check_policy(mdp, pi_E, "pi_E"))
    v_ref, M_ref = trajectory_feature_moments(mdp, _check_policy(mdp, pi_ref, "pi_ref"))
    return M_ref + M_E - np.outer(v_ref, v_E) - np.outer(v_E, v_ref)


def population_coefficient(mdp: MDP, pi_E, pi_ref, u, *, lam: float = 0.0, N: float | None = None) -> float:
    """Population ``C(u)``: Definition 1 with ``Sigma_N / N`` replaced by the exact ``E[x x^T]``.

    ``Sigmabar = E[x x^T] + (lam / N) I``; with ``lam = 0`` (default) or ``N = None`` the
    regulariser is dropped and the coefficient is ``u^T E[x x^T]^+ u`` when ``u`` lies in the
    range of ``E[x x^T]`` and ``+inf`` otherwise (the pairs never look in direction ``u``).
    """
    pi_E = _check_policy(mdp, pi_E, "pi_E")
    pi_ref = _check_policy(mdp, pi_ref, "pi_ref")
    second_moment = pair_second_moment(mdp, pi_E, pi_ref)
    u = _as_vector(u, "u", mdp.d)
    if lam < 0 or not np.isfinite(lam):
        raise ValueError(f"lam must be a finite number >= 0; got {lam!r}")
    ridge = 0.0
    if lam > 0:
        if N is None:
            raise ValueError("population_coefficient with lam > 0 needs N (the ridge is lam / N); pass N or lam=0")
        ridge = lam / _check_positive(N, "N")
    return largest_generalized_eigenvalue(np.outer(u, u), second_moment + ridge * np.eye(mdp.d),
                                          atol=_round_off(mdp, pi_E, pi_ref))


def _round_off(mdp: MDP, pi_E, pi_ref) -> float:
    """Round-off level of ``pair_second_moment``: ``1e-12 (tr M_E + tr M_ref)``."""
    scale = sum(float(np.trace(trajectory_feature_moments(mdp, pi)[1])) for pi in (pi_E, pi_ref))
    return 1e-12 * scale


def online_coefficient(mu, X, *, lam: float) -> float:
    """``C_T^on = lambda_max(sum_t mu_t mu_t^T, V_T)``, ``V_T = lam I + sum_{s<T} x_s x_s^T`` (Definition 1).

    mu: ``(T, d)`` rows ``mu_t = v_{pi_t} - v_E`` (exact feature-expectation gaps of the students);
    X: ``(T, d)`` realised feature differences ``x_t``; only the first ``T - 1`` enter ``V_T``.
    """
    mu = np.asarray(mu, dtype=np.float64)
    X = np.asarray(X, dtype=np.float64)
    if mu.ndim != 2 or X.ndim != 2 or mu.shape != X.shape or mu.shape[0] < 1:
        raise ValueError(f"mu and X must both have shape (T, d) with T >= 1; got {mu.shape} and {X.shape}")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(X))):
        raise ValueError("mu and X must be finite")
    lam = _check_positive(lam, "lam")
    d = mu.shape[1]
    V_T = lam * np.eye(d) + X[:-1].T @ X[:-1]
    return largest_generalized_eigenvalue(mu.T @ mu, V_T)


def offline_coefficients(mdp: MDP, pi_E, pi_ref, theta_star, data, *, lam: float = 1.0) -> dict[str, float]:
    """The coefficients an offline experiment reports (Definition 1 for the estimands of spec section 5).

    Directions: ``v* - v_E`` (estimand 1, ``pi*`` optimal for ``theta*``) and each unit
    vector ``e_k`` (estimand 3); returns the sample ``C_N`` from ``data`` and the
    population value with the same ridge ``lam / N``.
    """
    from pbkd_ref.mdp import plan, rewards

    theta_star = _as_vector(theta_star, "theta_star", mdp.d)
    pi_star, _ = plan(mdp, rewards(mdp, theta_star))
    u = feature_expectation(mdp, pi_star) - feature_expectation(mdp, _check_policy(mdp, pi_E, "pi_E"))
    Sigma, N = design_matrix(data)
    if N <= 0:
        raise ValueError("data holds no pairs; the coefficients need N >= 1")
    population = (lambda direction: population_coefficient(mdp, pi_E, pi_ref, direction, lam=lam, N=N))
    report = {
        "C_N(v*-v_E)": design_coefficient(u, Sigma, N, lam=lam),
        "C_pop(v*-v_E)": population(u),
        "C_N(max_k e_k)": max(design_coefficient(e, Sigma, N, lam=lam) for e in np.eye(mdp.d)),
        "C_pop(max_k e_k)": max(population(e) for e in np.eye(mdp.d)),
    }
    return {key: float(val) for key, val in report.items()}

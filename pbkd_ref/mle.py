"""Constrained Bradley-Terry maximum likelihood (spec tabular.md section 2).

    theta_hat = argmin_{||theta|| <= B} NLL(theta)

``fit_mle`` is the fast solver: Newton's method with the exact Hessian in which every
step minimises the quadratic model exactly over the ball (a trust-region subproblem
with the ball as region, solved by the secular equation), followed by an Armijo
backtracking line search along the segment (which stays in the ball).  Near the
solution the steps are full Newton steps projected consistently onto the active
sphere, so convergence is quadratic.  ``fit_mle_cvxpy`` is the cross-check with
``cp.logistic``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from pbkd_ref.preferences import Preferences, _bt_pass, _check_prefs, nll


@dataclass
class MLEResult:
    """Result of a constrained MLE fit.

    ``optimality_gap`` is a certified upper bound on ``NLL(theta_hat) - min_{ball} NLL``
    (the Frank-Wolfe gap ``g^T theta_hat + B ||g||``, valid by convexity), NaN when the
    solver does not provide one.
    """

    theta_hat: np.ndarray
    nll: float
    iterations: int
    converged: bool
    solver: str
    optimality_gap: float = float("nan")


def _check_radius(B) -> float:
    if isinstance(B, bool) or not np.isscalar(B) or not np.isfinite(B) or B <= 0:
        raise ValueError(f"B must be a finite number > 0 (the radius of the theta ball); got {B!r}")
    return float(B)


def _null_threshold(eigenvalues: np.ndarray) -> float:
    """Eigenvalues at or below this are treated as exact zeros (numerical null space)."""
    return 1e-12 * max(float(np.max(np.abs(eigenvalues), initial=0.0)), 1e-300)


def ball_quadratic_min(H: np.ndarray, b: np.ndarray, B: float) -> np.ndarray:
    """Exact minimiser of ``q(u) = 1/2 u^T H u - b^T u`` over ``||u|| <= B`` for ``H`` PSD.

    With ``H = Q diag(lam) Q^T`` and ``beta = Q^T b``: if the minimum-norm unconstrained
    minimiser (``beta_i / lam_i`` on the range of ``H``; it exists when ``beta`` vanishes on
    the null space) lies in the ball it is returned; otherwise ``u(nu) = (H + nu I)^{-1} b``
    with the unique ``nu > 0`` solving ``||u(nu)|| = B``, found by safeguarded Newton on the
    concave increasing secular function ``1/||u(nu)|| - 1/B`` inside the bracket
    ``[max(0, ||b||/B - lam_max), ||b||/B]``.
    """
    lam, Q = np.linalg.eigh(0.5 * (H + H.T))
    lam = np.clip(lam, 0.0, None)
    beta = Q.T @ b
    null = lam <= _null_threshold(lam)
    beta_scale = max(float(np.linalg.norm(beta)), 1e-300)
    if not np.any(np.abs(beta[null]) > 1e-12 * beta_scale):
        coef = np.zeros_like(beta)
        coef[~null] = beta[~null] / lam[~null]
        if np.linalg.norm(coef) <= B:
            return Q @ coef
    norm_b = float(np.linalg.norm(beta))
    lo = max(0.0, norm_b / B - float(lam.max()))
    hi = norm_b / B
    nu = hi
    for _ in range(100):
        denom = lam + nu
        coef = beta / denom
        norm_u = float(np.linalg.norm(coef))
        if norm_u > B:
            lo = nu
        else:
            hi = nu
        if abs(norm_u - B) <= 1e-15 * B or hi - lo <= 1e-15 * hi:
            break
        # Newton on psi(nu) = 1/||u|| - 1/B; psi'(nu) = (sum beta^2/denom^3) / ||u||^3.
        dpsi = float(np.sum(beta**2 / denom**3)) / norm_u**3
        step = nu - (1.0 / norm_u - 1.0 / B) / dpsi if dpsi > 0 else 0.5 * (lo + hi)
        nu = step if lo < step < hi else 0.5 * (lo + hi)
    coef = beta / (lam + nu)
    u = Q @ coef
    norm_u = float(np.linalg.norm(u))
    return u if norm_u <= B else u * (B / norm_u)


def frank_wolfe_gap(grad: np.ndarray, theta: np.ndarray, B: float) -> float:
    """``max_{||u|| <= B} grad^T (theta - u) = grad^T theta + B ||grad||``; bounds ``f(theta) - min f``."""
    return float(grad @ theta + B * np.linalg.norm(grad))


@dataclass
class _NewtonState:
    theta: np.ndarray
    nll: float
    grad: np.ndarray
    hessian: np.ndarray
    iterations: int
    passes: int
    converged: bool


def _ball_newton(prefs: Preferences, B: float, *, weight: float = 1.0, linear=None, theta0=None, first_pass=None,
                tol: float = 1e-10, max_iter: int = 100, max_passes: int | None = None) -> _NewtonState:
    """Minimise ``F(theta) = weight * NLL(theta) - linear^T theta`` over ``||theta|| <= B``.

    Ball-constrained Newton with the exact Hessian: at ``theta_k`` one pass gives
    ``(f, g, H)``; the quadratic model of ``F`` is minimised over the ball exactly
    (``ball_quadratic_min``), and ``theta_k + alpha (u - theta_k)`` is backtracked until
    Armijo ``F <= F_k + 1e-4 alpha slope`` (the segment stays in the ball).  Converged when
    the Newton step has length ``<= tol * max(1, ||theta||)`` or its predicted decrease
    ``-slope`` is below ``1e-15 |F|`` (the resolution of ``F``); also when the line search
    finds no representable decrease and the Frank-Wolfe gap of ``F`` is at rounding level.  When ``H`` is
    singular the steps stay in the row space of ``X`` plus ``span(linear)``.
    ``first_pass`` optionally supplies ``(f, g, H)`` at ``theta0`` to save a pass;
    ``max_passes`` optionally caps the passes over the data (line-search passes included).
    ``fit_mle`` is the case ``weight = 1``, ``linear = 0``.
    """
    d = prefs.d
    linear = np.zeros(d) if linear is None else linear
    theta = np.zeros(d) if theta0 is None else np.array(theta0, dtype=np.float64)
    passes = 0
    if first_pass is None:
        f, g, H = _bt_pass(prefs, theta, 2)
        passes += 1
    else:
        f, g, H = first_pass
    converged = False
    iterations = 0
    while iterations < max_iter and (max_passes is None or passes < max_passes):
        iterations += 1
        F = weight * f - float(linear @ theta)
        grad_F = weight * g - linear
        u = ball_quadratic_min(weight * H, weight * (H @ theta) - grad_F, B)
        step = u - theta
        slope = float(grad_F @ step)
        small_step = np.linalg.norm(step) <= tol * max(1.0, np.linalg.norm(theta))
        if small_step or -slope <= 1e-15 * max(1.0, abs(F)):
            # Converged: the step is negligible, or its predicted decrease is below the
            # resolution of F (any further change of F would be rounding).
            converged = True
            break
        alpha = 1.0
        while alpha >= 1e-12:
            trial = theta + alpha * step
            f_trial = _bt_pass(prefs, trial, 0)[0]
            passes += 1
            if weight * f_trial - float(linear @ trial) <= F + 1e-4 * alpha * slope:
                break
            alpha *= 0.5
        if alpha < 1e-12:
            # No representable decrease along a descent direction: at rounding level.
            converged = frank_wolfe_gap(grad_F, theta, B) <= 1e-9 * max(1.0, abs(F))
            break
        theta = trial
        f, g, H = _bt_pass(prefs, theta, 2)
        passes += 1
    norm = np.linalg.norm(theta)
    if norm > B:
        theta *= B / norm
    return _NewtonState(theta, f, g, H, iterations, passes, converged)


def fit_mle(prefs: Preferences, B, *, tol: float = 1e-10, max_iter: int = 100, theta0=None) -> MLEResult:
    """Constrained MLE ``argmin_{||theta|| <= B} NLL(theta)`` by ball-constrained Newton (spec section 2).

    ``_ball_newton`` with ``weight = 1`` and no linear term, started at ``theta0`` (default
    ``0``; online PbKD warm-starts from the previous round's ``theta_hat``): every
    step minimises the exact-Hessian quadratic model over the ball, then an Armijo line
    search runs along the segment.  When ``X`` is rank deficient the steps stay in the row
    space of ``X``, so the minimum-norm maximiser is returned.  ``optimality_gap`` is the
    Frank-Wolfe gap ``g^T theta_hat + B ||g||``, a certified bound on the suboptimality.
    """
    prefs = _check_prefs(prefs)
    B = _check_radius(B)
    if not np.isfinite(tol) or tol <= 0:
        raise ValueError(f"tol must be a positive number; got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer; got {max_iter!r}")
    if theta0 is not None:
        theta0 = np.asarray(theta0, dtype=np.float64)
        if theta0.shape != (prefs.d,) or not np.all(np.isfinite(theta0)) or np.linalg.norm(theta0) > B * (1 + 1e-12):
            raise ValueError(f"theta0 must be a finite vector of shape ({prefs.d},) inside the B-ball; got {theta0!r}")
    state = _ball_newton(prefs, B, tol=tol, max_iter=max_iter, theta0=theta0)
    return MLEResult(
        theta_hat=state.theta,
        nll=state.nll,
        iterations=state.iterations,
        converged=state.converged,
        solver="projected_newton",
        optimality_gap=frank_wolfe_gap(state.grad, state.theta, B),
    )


def fit_mle_cvxpy(prefs: Preferences, B) -> MLEResult:
    """Cross-check: the same MLE as a cvxpy exponential-cone program (spec section 2).

    ``minimize sum n1 * logistic(-X theta) + n0 * logistic(X theta)  s.t.  ||theta|| <= B``
    (divided by ``N``), solved by Clarabel at tolerance 1e-12, then 1e-10, then by SCS, until a
    solver reports "optimal".
    """
    import cvxpy as cp

    prefs = _check_prefs(prefs)
    B = _check_radius(B)
    theta = cp.Variable(prefs.d)
    z = prefs.X @ theta
    scale = 1.0 / max(prefs.N, 1.0)  # keeps the objective O(1) for the conic solver
    objective = scale * (prefs.n1 @ cp.logistic(-z) + prefs.n0 @ cp.logistic(z))
    problem = cp.Problem(cp.Minimize(objective), [cp.norm(theta, 2) <= B])
    attempts = (
        ("CLARABEL", dict(tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12, tol_ktratio=1e-8, max_iter=500)),
        ("CLARABEL", dict(tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10, max_iter=500)),
        ("SCS", dict(eps=1e-10, max_iters=200_000)),
    )
    status, used, iterations = None, None, 0
    for solver, options in attempts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "solution may be inaccurate": handled by the status
                problem.solve(solver=solver, **options)
        except cp.error.SolverError:
            continue
        status, used = problem.status, solver
        iterations = int(problem.solver_stats.num_iters or 0)
        if status == cp.OPTIMAL:
            break
    if theta.value is None:
        raise RuntimeError(f"cvxpy could not solve the MLE program (last status {status!r})")
    theta_hat = np.asarray(theta.value, dtype=np.float64)
    norm = np.linalg.norm(theta_hat)
    if norm > B:
        theta_hat *= B / norm
    value, grad, _ = _bt_pass(prefs, theta_hat, 1)
    return MLEResult(
        theta_hat=theta_hat,
        nll=nll(prefs, theta_hat),
        iterations=iterations,
        converged=status == cp.OPTIMAL,
        solver=f"cvxpy-{used}",
        optimality_gap=frank_wolfe_gap(grad, theta_hat, B),
    )

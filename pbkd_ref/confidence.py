"""Confidence sets for theta* and their support functions (spec tabular.md section 2).

Radii ``zeta`` (spec section 2), all selectable by name:

- ``bracketing``: ``zeta = 1 + d log(1 + 2 B L_x N) + log(1/delta)`` (coverage >= 1 - delta);
- ``chi2``: ``zeta = chi2_{d, 1-delta} / 2`` (asymptotic Wilks calibration);
- ``fixed``: a given number.

Online, ``anytime_radius`` gives ``zeta_t = 1 + d log(1 + 2 B L_x t) + log(t (t+1) / delta)``.

Set protocol (duck-typed; ``Ball``, ``Singleton`` and ``LikelihoodSet`` implement it, and
the min-max solvers accept any object that does):

- ``.d``, ``.B``: dimension and a radius with ``C subset {||theta|| <= B}``;
- ``.support(v, warm=None) -> (value, theta)``: the support function
  ``sigma_C(v) = max_{theta in C} theta^T v`` and a maximiser ``theta in C``;
  ``value`` is a certified upper bound on ``sigma_C(v)`` and ``theta^T v`` a lower bound,
  the two within ``~1e-10 B ||v||`` (exactly equal for ``Ball`` and ``Singleton``);
- ``.contains(theta, tol=1e-9) -> bool``;
- ``.cvxpy_constraints(theta_var) -> list`` of cvxpy constraints describing ``C``.

``LikelihoodSet`` is the PbKD / FREEHAND set
``C(D) = {||theta|| <= B, NLL(theta) <= NLL(theta_hat) + zeta}``; its support function
is the hot path of the cutting-plane min-max solver (see ``LikelihoodSet.support``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import chi2

from pbkd_ref.mdp import _as_float_array
from pbkd_ref.mle import _check_radius, _null_threshold, ball_quadratic_min, fit_mle
from pbkd_ref.preferences import Preferences, _bt_pass, _check_prefs

RADII = ("bracketing", "chi2", "fixed")


# ----------------------------------------------------------------------------- radii


def _check_real(value, name: str, *, low: float, low_open: bool = False, high: float | None = None, high_open: bool = False) -> float:
    if isinstance(value, bool) or not np.isscalar(value):
        raise ValueError(f"{name} must be a real number; got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a real number; got {value!r}") from exc
    bad_low = x <= low if low_open else x < low
    bad_high = high is not None and (x >= high if high_open else x > high)
    if not np.isfinite(x) or bad_low or bad_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        top = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{name} must lie in {lo}{low:g}, {top}{hi}; got {value!r}")
    return x


def _check_dim(d) -> int:
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
        raise ValueError(f"d must be a positive integer (the feature dimension); got {d!r}")
    return int(d)


def radius(kind, *, N, d, B, L_x, delta, value=None) -> float:
    """Confidence radius ``zeta`` of the named kind (spec section 2).

    ``bracketing``: ``1 + d log(1 + 2 B L_x N) + log(1/delta)``, from
    ``zeta = 1 + log N_[](1/N) + log(1/delta)`` and ``log N_[](eps) <= d log(1 + 2 B L_x / eps)``
    (Markov's inequality on ``prod_n u_j / P*`` and a union bound over the brackets).
    ``chi2``: ``chi2.ppf(1 - delta, d) / 2``.  ``fixed``: ``value``.
    """
    if kind not in RADII:
        raise ValueError(f"kind must be one of {RADII}; got {kind!r}")
    N = _check_real(N, "N", low=0.0)
    d = _check_dim(d)
    B = _check_radius(B)
    L_x = _check_real(L_x, "L_x", low=0.0)
    delta = _check_real(delta, "delta", low=0.0, low_open=True, high=1.0, high_open=True)
    if kind == "fixed":
        if value is None:
            raise ValueError("kind='fixed' needs value=<zeta >= 0>")
        return _check_real(value, "value", low=0.0)
    if value is not None:
        raise ValueError(f"value is only used with kind='fixed'; drop it for kind={kind!r}")
    if kind == "bracketing":
        return float(1.0 + d * np.log1p(2.0 * B * L_x * N) + np.log(1.0 / delta))
    return float(chi2.ppf(1.0 - delta, d) / 2.0)


def anytime_radius(t, *, d, B, L_x, delta) -> float:
    """Online radius ``zeta_t = 1 + d log(1 + 2 B L_x t) + log(t (t + 1) / delta)`` (spec section 2).

    The extra ``log(t (t+1))`` is a union bound over rounds with ``sum_t delta / (t (t+1)) = delta``.
    """
    t = _check_real(t, "t", low=1.0)
    d = _check_dim(d)
    B = _check_radius(B)
    L_x = _check_real(L_x, "L_x", low=0.0)
    delta = _check_real(delta, "delta", low=0.0, low_open=True, high=1.0, high_open=True)
    return float(1.0 + d * np.log1p(2.0 * B * L_x * t) + np.log(t * (t + 1.0) / delta))


# ----------------------------------------------------------------------------- simple sets


def _check_direction(v, d: int) -> np.ndarray:
    v = _as_float_array(v, "v", 1)
    if v.shape != (d,):
        raise ValueError(f"v must have shape (d,) = ({d},); got {v.shape}")
    return v


def _check_tol(tol) -> float:
    return _check_real(tol, "tol", low=0.0)


class Ball:
    """The parameter ball ``{theta : ||theta|| <= B}`` (moment matching without preferences)."""

    def __init__(self, B, d):
        self.B = _check_radius(B)
        self.d = _check_dim(d)

    def support(self, v, warm=None) -> tuple[float, np.ndarray]:
        """``sigma(v) = B ||v||`` attained at ``B v / ||v||`` (``0`` at ``v = 0``)."""
        v = _check_direction(v, self.d)
        norm = float(np.linalg.norm(v))
        if norm == 0.0:
            return 0.0, np.zeros(self.d)
        return self.B * norm, v * (self.B / norm)

    def contains(self, theta, tol: float = 1e-9) -> bool:
        theta = _check_direction(theta, self.d)
        return bool(np.linalg.norm(theta) <= self.B * (1.0 + _check_tol(tol)))

    def cvxpy_constraints(self, theta_var) -> list:
        import cvxpy as cp

        return [cp.norm(theta_var, 2) <= self.B]


class Singleton:
    """The set ``{theta}``: known reward (min-max reduces to planning for ``theta``)."""

    def __init__(self, theta):
        theta = _as_float_array(theta, "theta", 1)
        if theta.shape[0] < 1:
            raise ValueError("theta must be a nonempty vector")
        theta.setflags(write=False)
        self.theta = theta
        self.d = theta.shape[0]
        self.B = float(np.linalg.norm(theta))

    def support(self, v, warm=None) -> tuple[float, np.ndarray]:
        v = _check_direction(v, self.d)
        return float(self.theta @ v), self.theta.copy()

    def contains(self, theta, tol: float = 1e-9) -> bool:
        theta = _check_direction(theta, self.d)
        return bool(np.linalg.norm(theta - self.theta) <= _check_tol(tol) * max(1.0, self.B))

    def cvxpy_constraints(self, theta_var) -> list:
        return [theta_var == self.theta]


# ----------------------------------------------------------------------------- likelihood set


@dataclass
class SupportResult:
    """Certified support-function evaluation of a ``LikelihoodSet``.

    ``theta in C`` attains ``lower = theta^T v``; ``upper >= sigma_C(v)`` is a Lagrangian
    dual bound with multipliers ``lam`` (likelihood constraint) and ``nu`` (ball);
    ``value = upper``.  ``passes`` counts the vectorised passes over the data.
    """

    value: float
    theta: np.ndarray
    lower: float
    upper: float
    lam: float
    nu: float
    passes: int
    method: str

    @property
    def gap(self) -> float:
        return self.upper - self.lower


class SupportNotConverged(RuntimeError):
    """The support-function solver could not certify the requested accuracy."""


class LikelihoodSet:
    """Likelihood-ratio confidence set ``C(D) = {||theta|| <= B, NLL(theta) <= NLL(theta_hat) + zeta}``.

    Spec section 2.  ``theta_hat`` defaults to ``fit_mle(prefs, B)``; ``level`` is
    ``NLL(theta_hat) + zeta``.  The curvature constant ``gamma = sigma'(B L_x)`` lower
    bounds ``sigma'(x^T theta)`` on the ball, so ``nabla^2 NLL >= gamma G`` there with
    ``G = X^T diag(n) X``; it drives both ``ellipsoid()`` and the support certificate.
    """

    def __init__(self, prefs: Preferences, B, zeta, theta_hat=None):
        self.prefs = _check_prefs(prefs)
        self.B = _check_radius(B)
        self.zeta = _check_real(zeta, "zeta", low=0.0)
        self.d = self.prefs.d
        if theta_hat is None:
            fit = fit_mle(self.prefs, self.B)
            if not fit.converged:
                raise RuntimeError(f"fit_mle did not converge ({fit.iterations} iterations); pass theta_hat")
            theta_hat = fit.theta_hat
        else:
            theta_hat = _check_direction(theta_hat, self.d).copy()
            norm = float(np.linalg.norm(theta_hat))
            if norm > self.B * (1.0 + 1e-9):
                raise ValueError(f"theta_hat must lie in the ball ||theta|| <= B = {self.B}; its norm is {norm}")
            if norm > self.B:
                theta_hat *= self.B / norm
        theta_hat.setflags(write=False)
        self.theta_hat = theta_hat
        self._hat_pass = _bt_pass(self.prefs, theta_hat, 2)
        self.nll_hat = self._hat_pass[0]
        self.level = self.nll_hat + self.zeta
        z = self.B * self.prefs.L_x
        e = np.exp(-z)
        self.gamma = float(e / (1.0 + e) ** 2)
        # Gram matrix G = X^T diag(n) X and its eigenbasis (ellipsoid() and certificates).
        self._G = (self.prefs._Xt * self.prefs.counts) @ self.prefs.X
        eig, U = np.linalg.eigh(self._G)
        self._G_eig = np.clip(eig, 0.0, None)
        self._G_U = U
        self._G_null = self._G_eig <= _null_threshold(self._G_eig)
        # Curvature lower bound for certificates: numerically null directions get exactly 0
        # (a smaller lower bound stays valid and keeps the dual well scaled).
        self._cert_curvature = np.where(self._G_null, 0.0, self.gamma * self._G_eig)

    # -- protocol ---------------------------------------------------------------------

    def contains(self, theta, tol: float = 1e-9) -> bool:
        """``||theta|| <= B (1 + tol)`` and ``NLL(theta) <= level + tol * max(1, level)``."""
        theta = _check_direction(theta, self.d)
        tol = _check_tol(tol)
        if np.linalg.norm(theta) > self.B * (1.0 + tol):
            return False
        return bool(_bt_pass(self.prefs, theta, 0)[0] <= self.level + tol * max(1.0, self.level))

    def cvxpy_constraints(self, theta_var) -> list:
        """``||theta|| <= B`` and ``(1/N) sum n1 logistic(-X theta) + n0 logistic(X theta) <= level / N``.

        Dividing by ``N`` keeps the exponential-cone constraint O(1) for the conic solver.
        """
        import cvxpy as cp

        scale = 1.0 / max(self.prefs.N, 1.0)
        constraints = [cp.norm(theta_var, 2) <= self.B]
        if self.prefs.M:
            z = self.prefs.X @ theta_var
            nll_expr = self.prefs.n1 @ cp.logistic(-z) + self.prefs.n0 @ cp.logistic(z)
            constraints.append(scale * nll_expr <= scale * self.level)
        return constraints

    def ellipsoid(self) -> tuple[np.ndarray, np.ndarray, float]:
        """``(theta_hat, M, radius2)`` with ``C subset {(theta - theta_hat)^T M (theta - theta_hat) <= radius2}``.

        ``M = X^T diag(n) X`` and ``radius2 = 2 zeta / gamma``, ``gamma = sigma'(B L_x)``
        (Zhu-Jordan-Jiao form, spec section 2): for ``theta in C``,
        ``zeta >= NLL(theta) - NLL(theta_hat) >= grad^T (theta - theta_hat) + gamma/2 ||theta - theta_hat||_M^2``
        and the first term is ``>= 0`` by optimality of ``theta_hat`` over the ball.
        """
        radius2 = np.inf if self.gamma == 0.0 else 2.0 * self.zeta / self.gamma
        return self.theta_hat.copy(), self._G.copy(), float(radius2)

    def support(self, v, warm=None) -> tuple[float, np.ndarray]:
        """``(sigma_C(v), theta)``: certified upper bound and a maximiser in ``C`` (see ``support_certified``)."""
        result = self.support_certified(v, warm=warm)
        return result.value, result.theta

    def support_certified(self, v, warm=None, *, rtol: float = 1e-10, max_passes: int = 80) -> SupportResult:
        """Support function ``sigma_C(v) = max theta^T v  s.t.  NLL(theta) <= level, ||theta|| <= B``.

        A d-dimensional convex program with two constraints; each iteration makes one
        vectorised pass over the distinct pairs (``NLL``, gradient and Hessian together).

        0. Closed forms: ``v = 0`` gives ``0`` at ``theta_hat``.  ``zeta = 0`` gives
           ``C = ball intersect (theta_hat + null(X))`` (``NLL`` is strictly convex in
           ``X theta``, so all minimisers share ``X theta``), with support
           ``v^T theta_r + sqrt(B^2 - ||theta_r||^2) ||P_null v||``, ``theta_r`` the row-space
           part of ``theta_hat``.
        1. Sequential quadratically constrained steps (fast path): at ``theta_k`` the
           likelihood is replaced by its exact second-order model ``m_k`` and
           ``max v^T theta s.t. m_k(theta) <= level, ||theta|| <= B`` is solved exactly
           through its two-multiplier dual in the eigenbasis of the Hessian (no data pass).
           This is Newton's method on the KKT system with the ball handled exactly;
           it starts at ``theta_hat`` (whose pass is cached), or at ``warm`` (a previous
           maximiser) when given, and converges quadratically, typically in 1-4 passes.
        2. If the fast path stops contracting (the gap must shrink 4x every two passes),
           a globally convergent fallback takes over: a path-following log barrier on the
           likelihood constraint with the ball kept exact (``_SupportSolver.barrier``).

        Certificate, at every pass: for any ``lam, nu >= 0`` and ``theta_k`` in the ball,
        weak duality and ``nabla^2 NLL >= gamma G`` on the ball give

            sigma_C(v) <= v^T theta_k + lam s1 + nu s2 + 1/2 r^T (lam gamma G + nu I)^+ r,

        ``s1 = level - NLL(theta_k)``, ``s2 = (B^2 - ||theta_k||^2) / 2``,
        ``r = v - lam grad NLL(theta_k) - nu theta_k`` (infinite unless ``r`` lies in the
        range), minimised over ``(lam, nu)`` by projected Newton (jointly convex in 2-D).
        The lower bound is ``v^T theta`` for a point of ``C``: the iterate, or, when it
        violates the likelihood constraint, the point of the segment towards ``theta_hat``
        that convexity makes feasible.  The solver stops when ``upper - lower <=
        rtol * B ||v||`` (``|sigma_C(v)| <= B ||v||``) and otherwise raises
        ``SupportNotConverged`` after ``max_passes`` passes.
        """
        v = _check_direction(v, self.d)
        rtol = _check_real(rtol, "rtol", low=0.0, low_open=True)
        if isinstance(max_passes, bool) or not isinstance(max_passes, (int, np.integer)) or max_passes < 1:
            raise ValueError(f"max_passes must be a positive integer; got {max_passes!r}")
        if warm is not None:
            warm = _check_direction(warm, self.d)
        norm_v = float(np.linalg.norm(v))
        if norm_v == 0.0:
            return SupportResult(0.0, self.theta_hat.copy(), 0.0, 0.0, 0.0, 0.0, 0, "zero_direction")
        if self.zeta == 0.0:
            return self._support_slice(v)
        # Positively homogeneous in v: solve for the unit direction, rescale the bounds.
        solver = _SupportSolver(self, v / norm_v, rtol * self.B, max_passes)
        if not solver.sqcqp(warm):
            solver.barrier()
        if solver.gap > solver.target:
            raise SupportNotConverged(
                f"support function not certified to rtol={rtol:g} within {max_passes} passes "
                f"(gap {solver.gap / self.B:.3g} * B ||v||); increase max_passes or rtol"
            )
        lower = float(solver.theta @ v)
        # The dual bound is exact arithmetic evaluated in floating point; it can undercut the
        # attained value by rounding (~1e-16 lam NLL), in which case the attained value is exact.
        upper = max(solver.upper * norm_v, lower)
        return SupportResult(
            value=upper,
            theta=solver.theta.copy(),
            lower=lower,
            upper=upper,
            lam=solver.lam * norm_v,
            nu=solver.nu * norm_v,
            passes=solver.passes,
            method=solver.method,
        )

    def _support_slice(self, v: np.ndarray) -> SupportResult:
        """``zeta = 0``: ``C = {theta in ball : X theta = X theta_hat}`` (rows with ``n > 0``)."""
        U_null = self._G_U[:, self._G_null]
        theta_r = self.theta_hat - U_null @ (U_null.T @ self.theta_hat)
        v_null = U_null @ (U_null.T @ v)
        norm_null = float(np.linalg.norm(v_null))
        if norm_null <= 1e-15 * np.linalg.norm(v):
            value = float(self.theta_hat @ v)
            return SupportResult(value, self.theta_hat.copy(), value, value, 0.0, 0.0, 0, "closed_form_slice")
        spare = np.sqrt(max(self.B**2 - float(theta_r @ theta_r), 0.0))
        theta = theta_r + spare * v_null / norm_null
        value = float(theta_r @ v + spare * norm_null)
        return SupportResult(value, theta, float(theta @ v), value, 0.0, 0.0, 0, "closed_form_slice")


def _quadratic_dual(u, theta, f, g, level, B, curvature, basis, lam, nu, max_newton=60):
    """Minimise over ``lam, nu >= 0`` the dual function of ``max u^T t`` over ``{m(t) <= level, ||t|| <= B}``.

    ``m(t) = f + g^T (t - theta) + 1/2 (t - theta)^T P (t - theta)`` with
    ``P = basis diag(curvature) basis^T`` PSD.  The dual function is

        D(lam, nu) = u^T theta + lam s1 + nu s2 + 1/2 sum_i r_i^2 / (lam curvature_i + nu),

    ``r = basis^T (u - lam g - nu theta)``, ``s1 = level - f``, ``s2 = (B^2 - ||theta||^2)/2``
    (a term is ``+inf`` when its denominator vanishes and ``r_i != 0``).  ``D`` is jointly
    convex (a matrix-fractional function of affine arguments) and every ``(lam, nu)`` gives an
    upper bound on the program.  Minimisation: projected Newton steps, and when the
    projection blocks them, exact minimisation along each coordinate (safeguarded Newton
    on the derivative inside a bracket), which cannot stall away from the minimum of a
    smooth convex function of two variables.  Newton is continued on the gradient (the
    primal residual) below the resolution of ``D``'s values.  Returns the least value
    found, the final multipliers and their Lagrangian maximiser
    ``theta + basis (r / (lam curvature + nu))``, primal feasible to rounding at the optimum.
    With ``P = gamma G`` this is the support certificate; with the Hessian it solves the
    model step of the fast path.
    """
    s1 = float(level - f)
    s2 = 0.5 * (B * B - float(theta @ theta))
    base = float(u @ theta)
    w = basis.T @ u
    q = basis.T @ g
    t = basis.T @ theta
    INF = (np.inf, 0.0, 0.0, 0.0, 0.0, 0.0, None, 0.0)

    def evaluate(lam_, nu_):
        """``(D, dD/dlam, dD/dnu, d2/dlam2, d2/dlam dnu, d2/dnu2, ratio, resolution)``; scalars."""
        denom = lam_ * curvature + nu_
        r = w - lam_ * q - nu_ * t
        if denom.min() > 0.0:
            inv = 1.0 / denom
        else:
            positive = denom > 0.0
            if np.any(~positive & (r != 0.0)):
                return INF
            inv = np.zeros_like(denom)
            inv[positive] = 1.0 / denom[positive]
        ratio = r * inv
        quad = 0.5 * float(r @ ratio)
        val = base + lam_ * s1 + nu_ * s2 + quad
        if not np.isfinite(val):
            return INF
        c0 = -q - ratio * curvature
        c1 = -t - ratio
        c0i = c0 * inv
        return (
            val,
            s1 + float(c0 @ ratio) + 0.5 * float(curvature @ (ratio * ratio)),
            s2 + float(c1 @ ratio) + 0.5 * float(ratio @ ratio),
            float(c0i @ c0),
            float(c0i @ c1),
            float((c1 * inv) @ c1),
            ratio,
            # D is resolved to about 1e-16 of the magnitude of its summands.
            1e-16 * (abs(base) + abs(lam_ * s1) + abs(nu_ * s2) + quad),
        )

    def coordinate_min(x, i, state):
        """Exact minimiser of D along coordinate ``i`` (the other fixed) on ``[0, inf)``."""
        def at(value):
            y = list(x)
            y[i] = value
            return y, evaluate(*y)

        y0, s0 = at(0.0)
        if np.isfinite(s0[0]) and s0[1 + i] >= 0.0:
            return y0, s0
        lo, hi = 0.0, max(x[i], 1e-3 / B)
        y_hi, s_hi = at(hi)
        while not (np.isfinite(s_hi[0]) and s_hi[1 + i] >= 0.0):
            if np.isfinite(s_hi[0]):
                lo = hi
            hi *= 4.0
            if hi > 1e15:
                return y_hi, s_hi  # unbounded below along i: the model program is infeasible
            y_hi, s_hi = at(hi)
        y_cur, s_cur = (x, state) if lo < x[i] < hi else (y_hi, s_hi)
        for _ in range(100):
            d1, d2 = s_cur[1 + i], s_cur[3 + 2 * i]
            if d1 > 0.0:
                hi = y_cur[i]
            else:
                lo = y_cur[i]
            if hi - lo <= 1e-15 * hi or d1 == 0.0:
                break
            nxt = y_cur[i] - d1 / d2 if d2 > 0.0 else -1.0
            if not lo < nxt < hi:
                nxt = np.sqrt(lo * hi) if lo > 0.0 else 0.5 * hi
            y_new, s_new = at(nxt)
            if not np.isfinite(s_new[0]):
                lo = nxt
                continue
            y_cur, s_cur = y_new, s_new
        return y_cur, s_cur

    x = [max(float(lam), 0.0), max(float(nu), 0.0)]
    state = evaluate(*x)
    if not np.isfinite(state[0]):
        # Start from the quadratic-model multiplier ||u||_{P^+} / sqrt(2 s1) and a small nu.
        pos = curvature > 0.0
        estimate = float(np.sum(w[pos] ** 2 / curvature[pos])) / (2.0 * max(s1, 1e-12))
        x = [max(x[0], np.sqrt(estimate)), max(x[1], 1e-3 / B)]
        state = evaluate(*x)
        while not np.isfinite(state[0]):
            x[1] *= 10.0
            state = evaluate(*x)
    best = state[0]
    for _ in range(max_newton):
        val, g0, g1, h00, h01, h11, _, resolution = state
        accepted = None
        free0 = x[0] > 0.0 or g0 <= 0.0
        free1 = x[1] > 0.0 or g1 <= 0.0
        # Projected Newton on the variables not held at a bound (2x2 solve by hand).
        if free0 and free1:
            # A tiny ridge keeps the solve defined when the Hessian is (near) singular, e.g.
            # d = 1 or a flat valley; the line search then scales the long step.
            ridge = 1e-14 * (h00 + h11)
            a00, a11 = h00 + ridge, h11 + ridge
            det = a00 * a11 - h01 * h01
            step = ((-a11 * g0 + h01 * g1) / det, (h01 * g0 - a00 * g1) / det) if det > 0.0 else None
        elif free0:
            step = (-g0 / h00, 0.0) if h00 > 0.0 else None
        elif free1:
            step = (0.0, -g1 / h11) if h11 > 0.0 else None
        else:
            step = None
        if step is not None:
            predicted = g0 * step[0] + g1 * step[1]
            if predicted < 0.0:
                # Below the resolution of D the gradient (the primal residual) still guides
                # Newton: such a step is taken if D does not rise above rounding.
                at_rounding = -predicted <= 1e3 * resolution
                alpha = 1.0
                while alpha >= 1e-12:
                    trial = [max(x[0] + alpha * step[0], 0.0), max(x[1] + alpha * step[1], 0.0)]
                    t_state = evaluate(*trial)
                    if t_state[0] < val or (at_rounding and t_state[0] <= val + 10.0 * resolution):
                        accepted = (trial, t_state)
                        break
                    alpha *= 0.5
        if accepted is None:
            # Newton blocked (bound, poor scaling): exact minimisation along each coordinate.
            y, s_y = coordinate_min(x, 0, state)
            y, s_y = coordinate_min(y, 1, s_y)
            if not s_y[0] < val:
                break
            accepted = (y, s_y)
        trial, state = accepted
        best = min(best, state[0])
        moved = max(abs(trial[0] - x[0]) / (abs(x[0]) + 1e-300), abs(trial[1] - x[1]) / (abs(x[1]) + 1e-300))
        x = trial
        if moved <= 1e-15 or x[0] > 1e15 or x[1] > 1e15:
            break  # converged, or the model program is infeasible (D unbounded below)
    maximiser = theta + basis @ state[6]
    return best, float(x[0]), float(x[1]), maximiser


class _SupportSolver:
    """``max u^T theta`` over a ``LikelihoodSet`` for a unit vector ``u``; keeps the best bounds."""

    def __init__(self, cset: LikelihoodSet, u: np.ndarray, target: float, max_passes: int):
        self.cset = cset
        self.u = u
        self.target = target
        self.max_passes = max_passes
        self.passes = 0
        self.upper = np.inf
        self.lower = -np.inf
        self.theta = cset.theta_hat.copy()
        self.lam = 0.0
        self.nu = 0.0
        self.method = ""
        self.cert_lam = None
        self.cert_nu = 0.0

    @property
    def gap(self) -> float:
        return self.upper - self.lower

    def _derivatives(self, theta):
        self.passes += 1
        return _bt_pass(self.cset.prefs, theta, 2)

    def _feasible_point(self, theta, f) -> np.ndarray:
        """A point of C on the segment [theta_hat, theta] (convexity of NLL; theta in the ball)."""
        cset = self.cset
        if f <= cset.level:
            return theta
        alpha = cset.zeta / (f - cset.nll_hat) * (1.0 - 1e-12)
        return cset.theta_hat + alpha * (theta - cset.theta_hat)

    def certify(self, theta, f, g, method: str) -> bool:
        """Update the certified bounds with the iterate ``theta``; True when the gap is small enough."""
        cset = self.cset
        lam0 = self.cert_lam
        if lam0 is None:  # quadratic-model estimate lam = ||u||_{G^-1} / sqrt(2 zeta gamma) (any start is valid)
            lam0 = 1.0 / np.sqrt(2.0 * cset.zeta * max(cset.gamma * float(cset._G_eig.max(initial=0.0)), 1e-300))
        upper, lam, nu, _ = _quadratic_dual(
            self.u, theta, f, g, cset.level, cset.B, cset._cert_curvature, cset._G_U, lam0, self.cert_nu
        )
        self.cert_lam, self.cert_nu = lam, nu
        if upper < self.upper:
            self.upper, self.lam, self.nu = upper, lam, nu
        feasible = self._feasible_point(theta, f)
        lower = float(self.u @ feasible)
        if lower > self.lower:
            self.lower, self.theta, self.method = lower, feasible, method
        return self.gap <= self.target

    def _model_step(self, theta, f, g, H, lam, nu):
        """Exact maximiser of ``u^T t`` over ``{m(t) <= level, ||t|| <= B}``, ``m`` the second-order model."""
        cset = self.cset
        eig, basis = _psd_eig(H)
        if f > cset.level:
            # Restoration when the model program may be infeasible: minimise the model first.
            t_min = ball_quadratic_min(H, H @ theta - g, cset.B)
            delta = t_min - theta
            if f + g @ delta + 0.5 * delta @ H @ delta >= cset.level:
                return t_min, lam, nu
        _, lam, nu, t_new = _quadratic_dual(self.u, theta, f, g, cset.level, cset.B, eig, basis, lam, nu)
        norm = float(np.linalg.norm(t_new))
        if norm > cset.B:
            t_new *= cset.B / norm
        return t_new, lam, nu

    def sqcqp(self, warm) -> bool:
        """Fast path from ``theta_hat`` (cached pass) or from ``warm``."""
        cset = self.cset
        if warm is None:
            return self._sqcqp_from(cset.theta_hat.copy(), *cset._hat_pass, 0.0, 0.0, 20)
        theta = warm.copy()
        norm = float(np.linalg.norm(theta))
        if norm > cset.B:
            theta *= cset.B / norm
        return self._sqcqp_from(theta, *self._derivatives(theta), 0.0, 0.0, 20)

    def _sqcqp_from(self, theta, f, g, H, lam, nu, max_steps) -> bool:
        """Sequential exact solves of the second-order model program (Newton on the KKT system).

        Gives up (returns False) when the certified gap stops shrinking 4x every two passes.
        """
        gaps = []
        for _ in range(max_steps + 1):
            if self.certify(theta, f, g, "sqcqp"):
                return True
            gaps.append(self.gap)
            if len(gaps) >= 4 and gaps[-1] > 0.25 * gaps[-3]:
                return False
            if self.passes >= self.max_passes or len(gaps) > max_steps:
                return False
            theta, lam, nu = self._model_step(theta, f, g, H, lam, nu)
            if lam > 0.0 or nu > 0.0:
                self.cert_lam, self.cert_nu = lam, nu
            f, g, H = self._derivatives(theta)
        return False

    def barrier(self) -> bool:
        """Fallback: path-following log barrier on the likelihood constraint, ball kept exact.

        For a decreasing weight ``mu`` the centring problem
        ``min_{||theta|| <= B} -u^T theta - mu log(level - NLL(theta))`` is solved by
        ball-constrained Newton steps (each step minimises the exact-Hessian model over the
        ball, ``ball_quadratic_min``) with backtracking that keeps ``NLL < level``.  Its
        minimiser satisfies ``u = (mu / s1) grad NLL + nu theta``, a dual-feasible pair with
        complementarity gap ``mu``, so the certificate closes as ``mu -> 0``; since the ball
        is not barred, iterates may sit on the sphere.  Starts at ``theta_hat`` (``s1 = zeta``).
        """
        cset, u, B, level = self.cset, self.u, self.cset.B, self.cset.level
        theta = cset.theta_hat.copy()
        f, g, H = cset._hat_pass
        mu = B
        while self.passes < self.max_passes:
            for _ in range(50):
                s1 = level - f
                self.cert_lam = mu / s1
                if self.certify(theta, f, g, "barrier"):
                    return True
                if self.passes >= self.max_passes:
                    return False
                grad_phi = -u + (mu / s1) * g
                hess_phi = (mu / s1) * H + (mu / s1**2) * np.outer(g, g)
                step = ball_quadratic_min(hess_phi, hess_phi @ theta - grad_phi, B) - theta
                slope = float(grad_phi @ step)
                if -slope <= 0.05 * mu:  # Newton decrement^2 small against mu: centred enough
                    break
                phi = -float(u @ theta) - mu * np.log(s1)
                alpha = 1.0
                while alpha >= 1e-12:
                    trial = theta + alpha * step
                    self.passes += 1
                    f_trial = _bt_pass(cset.prefs, trial, 0)[0]
                    if f_trial < level and -float(u @ trial) - mu * np.log(level - f_trial) <= phi + 1e-4 * alpha * slope:
                        break
                    alpha *= 0.5
                if alpha < 1e-12:
                    break
                theta = trial
                f, g, H = self._derivatives(theta)
            mu *= 0.1
            if self.gap <= 1e-4 * B and self.passes < self.max_passes:
                # Close to the solution: the fast path's local quadratic convergence
                # finishes faster than further centring (the barrier iterate is kept).
                if self._sqcqp_from(theta, f, g, H, self.cert_lam, self.cert_nu, 6):
                    return True
        return False


def _psd_eig(H):
    """Eigen-decomposition of a PSD matrix with numerically null eigenvalues set to 0."""
    eig, basis = np.linalg.eigh(0.5 * (H + H.T))
    eig = np.clip(eig, 0.0, None)
    eig[eig <= _null_threshold(eig)] = 0.0
    return eig, basis


def confidence_set(prefs: Preferences, B, *, kind, delta, value=None) -> LikelihoodSet:
    """Fit the MLE and build ``C(D)`` with the named radius (spec section 2).

    ``L_x`` is the largest observed ``||x_n||``: the bracketing argument conditions on the
    observed differences, so brackets are only needed at those ``x_n``.
    """
    prefs = _check_prefs(prefs)
    zeta = radius(kind, N=prefs.N, d=prefs.d, B=B, L_x=prefs.L_x, delta=delta, value=value)
    return LikelihoodSet(prefs, B, zeta)


# ----------------------------------------------------------------------------- ellipsoid set


class EllipsoidSet:
    """``E = {||theta - c||_M^2 <= r2, ||theta|| <= B}``: the Zhu-Jordan-Jiao (2023) pessimistic-MLE set.

    ``from_likelihood(C, lam)`` builds it around the MLE with ``M = X^T diag(n) X + lam I`` and
    ``r2 = 2 zeta / gamma + 4 lam B^2`` (Lemma 2: ``||theta - theta_hat||_G^2 <= 2 zeta / gamma`` on
    ``C`` and ``||theta - theta_hat||^2 <= 4 B^2`` on the ball), so ``E`` contains ``C``: it covers
    ``theta*`` whenever ``C`` does, and is wider. The ridge keeps ``M`` positive definite when the
    differences do not span ``R^d``.

    ``support`` is certified: the value is the Lagrangian dual bound at multipliers
    ``(alpha, beta)`` of the two constraints, the returned ``theta`` is feasible, and the two are
    within ``rtol B ||v||`` (exactly equal when one constraint alone binds).
    """

    def __init__(self, center, M, radius2, B):
        self.B = _check_radius(B)
        self.center = _as_float_array(center, "center", 1).copy()
        self.d = int(self.center.size)
        M = _as_float_array(M, "M", 2)
        if M.shape != (self.d, self.d) or not np.allclose(M, M.T, rtol=1e-10, atol=1e-12):
            raise ValueError(f"M must be a symmetric ({self.d}, {self.d}) matrix; got shape {M.shape}")
        eig, U = np.linalg.eigh(0.5 * (M + M.T))
        if eig.min() <= 0:
            raise ValueError(f"M must be positive definite (smallest eigenvalue {eig.min():.3g}); add a ridge lam > 0")
        self.M, self._eig, self._U = 0.5 * (M + M.T), eig, U
        self.radius2 = _check_real(radius2, "radius2", low=0.0)
        if np.linalg.norm(self.center) > self.B * (1.0 + 1e-9):
            raise ValueError(f"center must lie in the ball ||theta|| <= B = {self.B}")

    @classmethod
    def from_likelihood(cls, cset: LikelihoodSet, lam: float) -> "EllipsoidSet":
        lam = _check_real(lam, "lam", low=0.0, low_open=True)
        radius2 = np.inf if cset.gamma == 0.0 else 2.0 * cset.zeta / cset.gamma + 4.0 * lam * cset.B**2
        return cls(cset.theta_hat, cset._G + lam * np.eye(cset.d), radius2, cset.B)

    def _quad(self, theta) -> float:
        z = theta - self.center
        return float(z @ self.M @ z)

    def contains(self, theta, tol: float = 1e-9) -> bool:
        theta = _check_direction(theta, self.d)
        tol = _check_tol(tol)
        return bool(np.linalg.norm(theta) <= self.B * (1.0 + tol)
                    and self._quad(theta) <= self.radius2 + tol * max(1.0, self.radius2))

    def cvxpy_constraints(self, theta_var) -> list:
        import cvxpy as cp

        root = self._U @ np.diag(np.sqrt(self._eig)) @ self._U.T  # M^(1/2)
        return [cp.norm(theta_var, 2) <= self.B,
                cp.norm(root @ (theta_var - self.center), 2) <= float(np.sqrt(self.radius2))]

    def _shrunk(self, theta) -> np.ndarray:
        """The point of the segment from the centre (inside E) to ``theta`` furthest along it within E."""
        z = theta - self.center
        t = 1.0
        q = self._quad(theta)
        if q > self.radius2:
            t = min(t, float(np.sqrt(self.radius2 / q)))
        a, b, c = z @ z, 2 * self.center @ z, self.center @ self.center - self.B**2  # ||c + t z||^2 = B^2
        if a > 0 and a * t * t + b * t + c > 0:
            t = min(t, float((-b + np.sqrt(max(b * b - 4 * a * c, 0.0))) / (2 * a)))
        return self.center + (1.0 - 1e-12) * t * z

    def support(self, v, warm=None) -> tuple[float, np.ndarray]:
        result = self.support_certified(v)
        return result.value, result.theta

    def support_certified(self, v, *, rtol: float = 1e-10) -> SupportResult:
        """``sigma_E(v)``: the closed form when one constraint alone binds, else the dual in ``(alpha, beta)``.
        Solved for ``v / ||v||`` and scaled (``sigma_E`` is positively homogeneous), so that a tiny
        ``v`` from a converging cutting plane is as well conditioned as any other."""
        v = _check_direction(v, self.d)
        norm_v = float(np.linalg.norm(v))
        if norm_v == 0.0:
            return SupportResult(0.0, self.center.copy(), 0.0, 0.0, 0.0, 0.0, 0, "zero direction")
        unit = self._unit_support(v / norm_v, rtol)
        lower = float(v @ unit.theta)
        upper = max(unit.upper * norm_v, lower)  # equal in exact arithmetic when one constraint binds
        return SupportResult(upper, unit.theta, lower, upper, unit.lam * norm_v, unit.nu * norm_v, unit.passes,
                             unit.method)

    def _unit_support(self, v: np.ndarray, rtol: float) -> SupportResult:
        from scipy.optimize import minimize

        Mv = self._U @ ((self._U.T @ v) / self._eig)  # M^-1 v
        scale = float(np.sqrt(v @ Mv))
        theta_e = self.center + np.sqrt(self.radius2) * Mv / scale if np.isfinite(self.radius2) else None
        if theta_e is not None and np.linalg.norm(theta_e) <= self.B:  # the ellipsoid alone binds
            value = float(v @ theta_e)
            return SupportResult(value, theta_e, value, value, 0.0, 0.0, 0, "ellipsoid")
        theta_b = self.B * v  # v is a unit vector here
        if self._quad(theta_b) <= self.radius2:  # the ball alone binds
            value = self.B
            return SupportResult(value, theta_b, value, value, 0.0, 0.0, 0, "ball")
        Uv, Uc = self._U.T @ v, self._U.T @ (self.M @ self.center)

        def primal(alpha, beta):  # argmax_theta of the Lagrangian: (alpha M + beta I) theta = v / 2 + alpha M c
            return self._U @ ((0.5 * Uv + alpha * Uc) / (alpha * self._eig + beta))

        def dual(x):  # q(alpha, beta) and its gradient (-g1, -g2) by the envelope theorem
            alpha, beta = x
            theta = primal(alpha, beta)
            g1, g2 = self._quad(theta) - self.radius2, float(theta @ theta) - self.B**2
            return float(v @ theta) - alpha * g1 - beta * g2, np.array([-g1, -g2])

        def hessian(alpha, beta):  # of q: -d(g1, g2)/d(alpha, beta), with d theta from the stationarity system
            theta = primal(alpha, beta)
            inv = self._U @ np.diag(1.0 / (alpha * self._eig + beta)) @ self._U.T
            d_alpha, d_beta = inv @ (self.M @ (self.center - theta)), -inv @ theta
            grad_g1, grad_g2 = 2 * self.M @ (theta - self.center), 2 * theta
            return -np.array([[grad_g1 @ d_alpha, grad_g1 @ d_beta], [grad_g2 @ d_alpha, grad_g2 @ d_beta]])

        # Both constraints bind: L-BFGS-B to the neighbourhood, then damped Newton on the convex dual.
        x0 = np.array([1 / (2 * np.sqrt(self.radius2) * np.sqrt(self._eig.max())), 1 / (2 * self.B)])
        x = minimize(dual, x0, jac=True, method="L-BFGS-B", bounds=[(1e-14, None), (0.0, None)],
                     options={"ftol": 1e-15, "gtol": 1e-13, "maxiter": 2000}).x
        target = rtol * self.B
        for steps in range(60):
            upper, grad = dual(x)
            theta = self._shrunk(primal(*x))
            lower = float(v @ theta)
            if upper - lower <= target:
                return SupportResult(upper, theta, lower, upper, float(x[0]), float(x[1]), steps, "dual")
            step = np.linalg.lstsq(hessian(*x), grad, rcond=None)[0]  # a singular Hessian gives the least-squares step
            t = 1.0
            # merit: the constraint residuals (the dual's gradient), which Newton drives to 0
            while t > 1e-12 and (np.any(x - t * step <= 0)
                                 or np.linalg.norm(dual(x - t * step)[1]) >= np.linalg.norm(grad)):
                t *= 0.5
            if t <= 1e-12:
                break
            x = x - t * step
        raise SupportNotConverged(f"ellipsoid support: gap {upper - lower:.3e} > {target:.3e} after Newton")

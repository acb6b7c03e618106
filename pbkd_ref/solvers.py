"""Exact solvers for the PbKD min-max problem (spec tabular.md section 3).

    value = min_pi max_{theta in C} theta^T (v_E - v_pi),   v_pi = Phi^T d_pi.

The problem is bilinear in (occupancy d, theta) over two compact convex sets, so
min-max = max-min (Sion) and ``f(d) = sigma_C(v_E - Phi^T d)`` is convex in ``d``.
Three exact formulations, selected by ``solve(..., method=...)``:

- ``"cutting_plane"`` (D, the main solver; no cvxpy): Kelley's method on ``f``
  with the support function of ``C`` as the oracle (in-out stabilised) and the
  master LP over occupancies in Dantzig-Wolfe form: convex weights of policy
  occupancies, new policies priced by planning (HiGHS, hot-started).
- ``"dual_lp"`` (B): ``max_{theta in C, V} theta^T v_E - rho^T V_0`` subject to
  the Bellman inequalities, one cvxpy program; the duals of the Bellman
  inequalities are the student occupancy.
- ``"joint"`` (A): one cvxpy program over occupancies in which ``sigma_C`` is
  written through conjugate duality (the binary-entropy conjugate of softplus);
  a cross-check, slow for many distinct pairs.

Whatever the method, the answer is certified the same way (``certificate``):
``upper = sigma_C(v_E - Phi^T d)`` for the returned student occupancy ``d`` and
``lower = theta^T v_E - max_pi J(pi, theta)`` for a ``theta`` in ``C``. Then
``lower <= value <= upper``; ``status`` is ``"optimal"`` only when
``upper - lower <= tol``, and otherwise starts with ``"uncertified"``.

Confidence sets are duck-typed (see ``pbkd_ref.confidence``): ``.d``, ``.B``,
``.support(v) -> (sigma_C(v), theta)``, ``.contains(theta)`` and
``.cvxpy_constraints(theta_var)``.
"""

from __future__ import annotations

import inspect
import math
import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from pbkd_ref.mdp import (
    MDP,
    occupancy,
    occupancy_features,
    plan,
    policy_from_occupancy,
    rewards,
)

METHODS = ("cutting_plane", "dual_lp", "joint")

# Flow constraints of a returned occupancy must hold to this absolute accuracy
# (occupancies are probabilities, so this is far below any meaningful mass).
_FLOW_ATOL = 1e-8


@dataclass
class MinMaxResult:
    """Outcome of one min-max solve (spec tabular.md section 3).

    ``value`` is the worst-case objective of the returned student,
    ``max_{theta in C} theta^T (v_E - v_pi)`` (= ``upper``); the min-max value
    lies in ``[lower, upper]`` and ``certificate_gap = upper - lower``.
    """

    policy: np.ndarray  # (H, S, A) student policy pi_hat
    occupancy: np.ndarray  # (H, S, A) its occupancy d_pi_hat
    value: float
    theta: np.ndarray  # (d,) adversarial theta in C certifying `lower`
    certificate_gap: float
    lower: float
    upper: float
    status: str  # "optimal" only if certificate_gap <= tol; else "uncertified: ..."
    solver: str
    iterations: int

    @property
    def certified(self) -> bool:
        return self.status == "optimal"


# ----------------------------------------------------------------------------
# validation and the shared pieces
# ----------------------------------------------------------------------------


def _check_mdp(mdp) -> None:
    if not isinstance(mdp, MDP):
        raise ValueError(f"mdp must be a pbkd_ref.mdp.MDP, got {type(mdp).__name__}; build one with MDP(P, rho, phi)")


def _check_v_E(mdp: MDP, v_E) -> np.ndarray:
    v_E = np.asarray(v_E, dtype=np.float64)
    if v_E.shape != (mdp.d,):
        raise ValueError(f"v_E must have shape (d,) = ({mdp.d},), got {v_E.shape}; pass the teacher's feature expectation")
    if not np.all(np.isfinite(v_E)):
        raise ValueError("v_E contains NaN or inf; pass a finite teacher feature expectation")
    return v_E


def _check_cset(mdp: MDP, cset) -> None:
    for name in ("support", "contains", "cvxpy_constraints"):
        if not callable(getattr(cset, name, None)):
            raise ValueError(
                f"cset must implement the confidence-set protocol (missing .{name}); "
                "use Ball, Singleton or LikelihoodSet from pbkd_ref.confidence"
            )
    if getattr(cset, "d", None) != mdp.d:
        raise ValueError(f"cset has dimension {getattr(cset, 'd', None)} but the features have d = {mdp.d}; build the set for these features")


def _check_tol(tol) -> float:
    try:
        tol = float(tol)
    except (TypeError, ValueError):
        raise ValueError(f"tol must be a positive number, got {tol!r}") from None
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive finite number, got {tol}")
    return tol


def _support(cset, v: np.ndarray, warm=None):
    """sigma_C(v) and its maximiser, passing a warm start where the set accepts one."""
    if warm is not None and _accepts_warm(cset):
        value, theta = cset.support(v, warm=warm)
    else:
        value, theta = cset.support(v)
    return float(value), np.asarray(theta, dtype=np.float64)


def _accepts_warm(cset) -> bool:
    try:
        return "warm" in inspect.signature(cset.support).parameters
    except (TypeError, ValueError):
        return False


def _max_return(mdp: MDP, theta: np.ndarray) -> float:
    """max_pi J(pi, theta) by backward induction (spec section 1)."""
    _, V = plan(mdp, rewards(mdp, theta))
    return float(mdp.rho @ V[0])


def flow_constraints(mdp: MDP) -> tuple[sp.csr_matrix, np.ndarray]:
    """The occupancy polytope as ``{d >= 0 : F d = b}`` with ``d`` flattened (h, s, a).

    Rows are (h, s'): ``sum_a d[h,s',a] - sum_{s,a} P[h-1,s,a,s'] d[h-1,s,a] = [h=0] rho[s']``.
    ``F^T`` is also the Bellman operator of the dual LP (B):
    ``(F^T V)[h,s,a] = V_h(s) - sum_s' P[h,s,a,s'] V_{h+1}(s')``.
    """
    H, S, A = mdp.H, mdp.S, mdp.A
    cols = np.arange(H * S * A)
    rows = [cols // A]  # row (h, s) of column (h, s, a)
    vals = [np.ones(H * S * A)]
    cols_all = [cols]
    for h in range(1, H):
        trans = mdp.P[h - 1].reshape(S * A, S)  # [(s, a), s']
        sa, s_next = np.nonzero(trans)
        rows.append(h * S + s_next)
        cols_all.append((h - 1) * S * A + sa)
        vals.append(-trans[sa, s_next])
    F = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols_all))),
        shape=(H * S, H * S * A),
    )
    b = np.zeros(H * S)
    b[:S] = mdp.rho
    return F, b


def _check_occupancy(mdp: MDP, d) -> np.ndarray:
    d = np.asarray(d, dtype=np.float64)
    if d.shape != (mdp.H, mdp.S, mdp.A):
        raise ValueError(f"occupancy must have shape (H, S, A) = {(mdp.H, mdp.S, mdp.A)}, got {d.shape}")
    if not np.all(np.isfinite(d)) or d.min() < -_FLOW_ATOL:
        raise ValueError("occupancy has NaN, inf or negative entries; pass an occupancy from pbkd_ref.mdp.occupancy")
    F, b = flow_constraints(mdp)
    residual = np.abs(F @ d.ravel() - b).max()
    if residual > _FLOW_ATOL * max(1.0, mdp.H):
        raise ValueError(
            f"occupancy violates the flow constraints by {residual:.2e}; it is not the occupancy of any policy "
            "(compute it with pbkd_ref.mdp.occupancy)"
        )
    return d


def certificate(mdp: MDP, v_E, cset, occupancy, theta) -> tuple[float, float]:
    """Bounds on the min-max value from any candidate pair (spec section 3, "Certificates").

    upper = sigma_C(v_E - Phi^T d)               (the student d is feasible for the min)
    lower = theta^T v_E - max_pi J(pi, theta)    (theta in C is feasible for the max)

    Raises ValueError if ``occupancy`` is not an occupancy of ``mdp`` or ``theta``
    is not in ``cset`` (the bounds would not be valid).
    """
    _check_mdp(mdp)
    v_E = _check_v_E(mdp, v_E)
    _check_cset(mdp, cset)
    d = _check_occupancy(mdp, occupancy)
    theta = np.asarray(theta, dtype=np.float64)
    if theta.shape != (mdp.d,) or not np.all(np.isfinite(theta)):
        raise ValueError(f"theta must be a finite vector of shape ({mdp.d},), got shape {theta.shape}")
    if not cset.contains(theta):
        raise ValueError("theta is not in the confidence set, so it gives no lower bound; pass a theta from the set")
    upper, _ = _support(cset, v_E - occupancy_features(mdp, d))
    lower = float(theta @ v_E) - _max_return(mdp, theta)
    return lower, upper


def _shrink_into(cset, theta: np.ndarray) -> np.ndarray | None:
    """A point of C near a solver's slightly infeasible theta, or None.

    Moves theta towards a known point of C (the MLE of a likelihood set, the
    centre of a ball) until ``contains`` accepts it; C is convex so the segment
    stays feasible once inside.
    """
    if cset.contains(theta):
        return theta
    anchor = getattr(cset, "theta_hat", None)
    if anchor is None and hasattr(cset, "theta") and np.ndim(getattr(cset, "theta")) == 1:
        anchor = np.asarray(cset.theta)
    if anchor is None:
        anchor = np.zeros_like(theta)
    anchor = np.asarray(anchor, dtype=np.float64)
    if not cset.contains(anchor):
        return None
    for shrink in (1e-10, 1e-9, 1e-8, 1e-7, 1e-6):
        candidate = anchor + (1.0 - shrink) * (theta - anchor)
        if cset.contains(candidate):
            return candidate
    return None


def _certified_result(mdp, v_E, cset, d_raw, theta_candidates, *, tol, solver, iterations, note="") -> MinMaxResult:
    """Turn a solver's (occupancy, theta) into a certified MinMaxResult.

    The raw occupancy (LP solution or dual variables) is mapped to a policy and
    back through the one occupancy routine, so the returned pair is exactly
    consistent; the certificate is then computed from scratch.
    """
    d_raw = np.clip(np.asarray(d_raw, dtype=np.float64).reshape(mdp.H, mdp.S, mdp.A), 0.0, None)
    policy = policy_from_occupancy(mdp, d_raw)
    d = occupancy(mdp, policy)
    upper, theta_support = _support(cset, v_E - occupancy_features(mdp, d))
    best_lower, best_theta = -np.inf, theta_support
    for theta in list(theta_candidates) + [theta_support]:
        if theta is None:
            continue
        theta = _shrink_into(cset, np.asarray(theta, dtype=np.float64))
        if theta is None:
            continue
        lower = float(theta @ v_E) - _max_return(mdp, theta)
        if lower > best_lower:
            best_lower, best_theta = lower, theta
    gap = upper - best_lower
    if gap <= tol:
        status = "optimal"
    else:
        status = f"uncertified: certificate gap {gap:.3e} > tol {tol:.1e}" + (f" ({note})" if note else "")
    return MinMaxResult(
        policy=policy,
        occupancy=d,
        value=upper,
        theta=best_theta,
        certificate_gap=gap,
        lower=best_lower,
        upper=upper,
        status=status,
        solver=solver,
        iterations=int(iterations),
    )


# ----------------------------------------------------------------------------
# (D) cutting planes: master LP over occupancies, support-function oracle
# ----------------------------------------------------------------------------

_highs_banner_shown = False


@contextmanager
def _quiet_stdout():
    """Silence the C-level stdout while HiGHS prints its one-off start-up banner.

    highspy prints a copyright banner from C++ the first time a solver object is
    built, before any option can switch logging off; it would corrupt the JSON
    that ``python -m pbkd_ref solve`` writes to stdout.
    """
    global _highs_banner_shown
    if _highs_banner_shown:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
        _highs_banner_shown = True


class _PolicyColumnMaster:
    """Master LP of (D) over occupancies (spec section 3), in Dantzig-Wolfe form.

        min_{d, t} t   s.t.   t >= theta_k^T (v_E - Phi^T d)  for every cut k,   d in the occupancy polytope.

    The occupancy polytope is the convex hull of the occupancies of the deterministic
    policies, so the master is written over convex weights ``w`` of a growing set of
    columns ``d_j``: rows ``sum_j w_j = 1`` and, per cut,
    ``t + sum_j (theta_k^T v_j) w_j >= theta_k^T v_E`` with ``v_j = Phi^T d_j``.
    With ``mu`` the cut duals and ``theta_bar = sum_k mu_k theta_k`` (a point of C), a
    column improves the master only if ``max_pi J(pi, theta_bar) > max_j theta_bar^T v_j``,
    so pricing is planning (backward induction) for ``theta_bar``; when no policy
    improves, the restricted master is the full master LP.  Whatever the columns,
    ``theta_bar^T v_E - max_pi J(pi, theta_bar)`` is a certified lower bound on the
    min-max value.  The restricted LP has one row per cut and one column per policy
    (tens, not H S A); it stays in one HiGHS object and is re-solved from its previous
    basis after each new row (cut) or column (policy).
    """

    def __init__(self, mdp: MDP, v_E: np.ndarray):
        import highspy

        self.mdp, self.v_E = mdp, v_E
        self._highspy = highspy
        with _quiet_stdout():
            self.highs = highspy.Highs()
        h = self.highs
        h.setOptionValue("output_flag", False)
        # the certificate tolerance is ~1e-7 absolute: keep the LP well inside it
        h.setOptionValue("primal_feasibility_tolerance", 1e-10)
        h.setOptionValue("dual_feasibility_tolerance", 1e-10)
        inf = highspy.kHighsInf
        h.addVar(-inf, inf)  # column 0: t
        h.changeColCost(0, 1.0)
        h.addRow(1.0, 1.0, 0, np.array([], dtype=np.int32), np.array([]))  # row 0: sum_j w_j = 1
        self.thetas: list[np.ndarray] = []
        self.occupancies: list[np.ndarray] = []
        self.features = np.zeros((0, mdp.d))  # v_j per column

    def add_column(self, d: np.ndarray) -> None:
        """A column ``w_j`` for the occupancy ``d`` (any occupancy; pricing adds deterministic ones)."""
        v = occupancy_features(self.mdp, d)
        rows = np.arange(len(self.thetas) + 1, dtype=np.int32)
        values = np.concatenate([[1.0], np.asarray(self.thetas).reshape(-1, self.mdp.d) @ v])
        self.highs.addCol(0.0, 0.0, self._highspy.kHighsInf, len(rows), rows, values)
        self.occupancies.append(d)
        self.features = np.vstack([self.features, v])

    def add_cut(self, theta: np.ndarray) -> None:
        """Row ``t + sum_j (theta^T v_j) w_j >= theta^T v_E``."""
        columns = np.arange(len(self.occupancies) + 1, dtype=np.int32)
        values = np.concatenate([[1.0], self.features @ theta])
        self.highs.addRow(float(theta @ self.v_E), self._highspy.kHighsInf, len(columns), columns, values)
        self.thetas.append(theta)

    def _solve_restricted(self):
        h = self.highs
        h.run()
        status = h.getModelStatus()
        if status != self._highspy.HighsModelStatus.kOptimal:
            raise RuntimeError(f"restricted master LP ended with status {h.modelStatusToString(status)}")
        solution = h.getSolution()
        w = np.clip(np.asarray(solution.col_value)[1:], 0.0, None)
        w = w / w.sum()
        mu = np.abs(np.asarray(solution.row_dual)[1:])
        mu = mu / mu.sum() if mu.sum() > 0 else np.full(len(self.thetas), 1.0 / len(self.thetas))
        return w, mu @ np.asarray(self.thetas), float(h.getInfo().objective_function_value)

    def step(self) -> tuple[float, float, np.ndarray, np.ndarray]:
        """Solve the restricted master, then price one column.

        Returns ``(lower, t, d, theta_bar)``: the certified lower bound
        ``theta_bar^T v_E - max_pi J(pi, theta_bar)``, the restricted master's value
        ``t`` and occupancy ``d = sum_j w_j d_j``, and ``theta_bar``.  The greedy
        policy for ``theta_bar`` joins the columns if it improves on them.  (Pricing once per cut, rather than to
        convergence, is the double-oracle schedule: the restricted master converges to the
        full one as cuts and columns accumulate, at a fraction of the LP work.)
        """
        w, theta_bar, t = self._solve_restricted()
        d = np.tensordot(w, np.asarray(self.occupancies), axes=1)
        greedy, V = plan(self.mdp, rewards(self.mdp, theta_bar))
        best_return = float(self.mdp.rho @ V[0])
        if best_return > float((self.features @ theta_bar).max()) + 1e-13 * max(1.0, abs(best_return)):
            self.add_column(occupancy(self.mdp, greedy))
        return float(theta_bar @ self.v_E) - best_return, t, d, theta_bar


def _solve_cutting_plane(mdp, v_E, cset, tol, max_iter, warm, stabilisation=0.5) -> MinMaxResult:
    """(D) Kelley's cutting planes with in-out stabilisation, certified (spec section 3).

    Each iteration: the master LP (``_PolicyColumnMaster``: restricted master, then one
    pricing step) gives a lower bound and an occupancy d_k; the oracle
    ``theta = argmax_{theta in C} theta^T (v_E - Phi^T d)`` (the support function of C)
    is queried at ``d_q = alpha d_best + (1 - alpha) d_k`` (in-out: the query is pulled towards the best point found so far, which damps
    Kelley's oscillation) and gives the upper bound ``f(d_q)`` and a new cut. If that
    cut does not cut off ``d_k`` (mispricing) the oracle is also queried at ``d_k``
    itself, so every round makes progress. Stops when best upper - lower <= tol / 2.
    """
    master = _PolicyColumnMaster(mdp, v_E)

    def f(d, warm_theta=None):
        return _support(cset, v_E - occupancy_features(mdp, d), warm_theta)

    # starting point: the previous solution if given, else the uniform policy
    if warm is not None:
        d_start = np.asarray(warm.occupancy, dtype=np.float64)
    else:
        d_start = occupancy(mdp, np.full((mdp.H, mdp.S, mdp.A), 1.0 / mdp.A))
    upper, theta = f(d_start)
    d_best, theta_last = d_start, theta
    master.add_column(d_start)
    master.add_cut(theta)
    if warm is not None and cset.contains(warm.theta):
        master.add_cut(np.asarray(warm.theta, dtype=np.float64))

    inner_tol = tol / 2
    best_lower, theta_best_lower, note = -np.inf, theta, ""
    iterations = 0
    for iterations in range(1, max_iter + 1):
        lower, master_value, d_master, theta_bar = master.step()
        if lower > best_lower:
            best_lower, theta_best_lower = lower, theta_bar
        if upper - best_lower <= inner_tol:
            break
        d_query = stabilisation * d_best + (1 - stabilisation) * d_master
        f_query, theta_query = f(d_query, theta_last)
        theta_last = theta_query
        if f_query < upper:
            upper, d_best = f_query, d_query
        master.add_cut(theta_query)
        cut_at_master = float(theta_query @ (v_E - occupancy_features(mdp, d_master)))
        if cut_at_master <= master_value + inner_tol / 2:  # mispricing: query the master point too
            f_master, theta_master = f(d_master, theta_last)
            if f_master < upper:
                upper, d_best = f_master, d_master
            master.add_cut(theta_master)
    else:
        note = f"iteration limit {max_iter} reached"
    return _certified_result(
        mdp, v_E, cset, d_best, [theta_best_lower], tol=tol,
        solver="cutting_plane (Kelley + in-out cuts, policy column generation, HiGHS)",
        iterations=iterations, note=note,
    )


# ----------------------------------------------------------------------------
# (B) dual LP in one convex program, (A) joint program by conjugate duality
# ----------------------------------------------------------------------------


def _cvxpy_attempts(problem) -> list[tuple[str, str]]:
    """Solve with Clarabel, then SCS; yields (solver name, status) after each attempt."""
    import cvxpy as cp

    attempts = [
        ("CLARABEL", dict(tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10, max_iter=500)),
        ("SCS", dict(eps_abs=1e-10, eps_rel=1e-10, max_iters=200_000)),
    ]
    for name, options in attempts:
        try:
            with warnings.catch_warnings():
                # "Solution may be inaccurate": handled below by the certificate, not by trust
                warnings.simplefilter("ignore", UserWarning)
                problem.solve(solver=name, **options)
        except cp.error.SolverError as error:
            yield name, f"solver error: {error}"
            continue
        yield name, problem.status


def _solve_cvxpy(mdp, v_E, cset, tol, build, label) -> MinMaxResult:
    """Shared driver of (A) and (B): build the program, solve, certify, fall back.

    A Clarabel answer flagged "inaccurate" (exponential cones) is kept only if
    its certificate closes; otherwise SCS is tried; if neither certifies, the
    better of the two is returned with an "uncertified" status.
    """
    import cvxpy as cp

    problem, read_solution = build()
    best, notes = None, []
    for name, status in _cvxpy_attempts(problem):
        if status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
            notes.append(f"{name}: {status}")
            continue
        d_raw, theta = read_solution()
        if d_raw is None or not np.all(np.isfinite(d_raw)):
            notes.append(f"{name}: no dual occupancy")
            continue
        result = _certified_result(
            mdp, v_E, cset, d_raw, [theta], tol=tol, solver=f"{label} ({name}, {status})", iterations=_solver_iterations(problem),
            note="; ".join(notes + [f"{name}: {status}"]),
        )
        if best is None or result.certificate_gap < best.certificate_gap:
            best = result
        if result.certified:
            return result
        notes.append(f"{name}: gap {result.certificate_gap:.2e}")
    if best is None:
        raise RuntimeError(f"{label}: no solver returned a solution ({'; '.join(notes)})")
    return best


def _solver_iterations(problem) -> int:
    stats = problem.solver_stats
    return int(stats.num_iters) if stats is not None and stats.num_iters is not None else 0


def _solve_dual_lp(mdp, v_E, cset, tol) -> MinMaxResult:
    """(B) ``max_{theta in C, V} theta^T v_E - rho^T V_0`` s.t.
    ``V_h(s) >= theta^T phi[h,s,a] + sum_s' P[h,s,a,s'] V_{h+1}(s')``, ``V_H = 0`` (spec section 3).

    The Bellman inequalities read ``F^T V >= Phi theta`` with ``F`` the flow matrix;
    their dual variables are the optimal student occupancy.
    """
    import cvxpy as cp

    def build():
        F, _ = flow_constraints(mdp)
        Phi = mdp.phi.reshape(-1, mdp.d)
        theta = cp.Variable(mdp.d, name="theta")
        V = cp.Variable(mdp.H * mdp.S, name="V")
        bellman = F.T @ V >= Phi @ theta
        objective = cp.Maximize(v_E @ theta - mdp.rho @ V[: mdp.S])
        problem = cp.Problem(objective, [bellman, *cset.cvxpy_constraints(theta)])

        def read():
            return bellman.dual_value, theta.value

        return problem, read

    return _solve_cvxpy(mdp, v_E, cset, tol, build, "dual_lp")


def support_function_expression(cset, v):
    """``sigma_C(v)`` as a convex cvxpy expression (plus constraints), for the joint program (A).

    - Ball ``{||theta|| <= B}``: ``B ||v||``;
    - Singleton ``{theta}``: ``theta^T v``;
    - LikelihoodSet ``{||theta|| <= B, NLL(theta) <= c}``, by conjugate duality
      (spec section 3 (A), softplus and binary entropy are conjugate):
      ``min_{lam >= 0, 0 <= q <= lam} lam c + B ||v + sum_n q_n s_n x_n||
        + sum_n [rel_entr(q_n, lam) + rel_entr(lam - q_n, lam)]``,
      written over the distinct pairs: label-1 counts ``n1`` (s = +1) and
      label-0 counts ``n0`` (s = -1) weight one ``q`` per distinct ``x`` and label.
    """
    import cvxpy as cp

    from pbkd_ref.confidence import Ball, LikelihoodSet, Singleton

    if isinstance(cset, Ball):
        return cset.B * cp.norm(v, 2), []
    if isinstance(cset, Singleton):
        return np.asarray(cset.theta) @ v, []
    if isinstance(cset, LikelihoodSet):
        prefs = cset.prefs
        lam = cp.Variable(nonneg=True, name="lam")
        expression, constraints, w = lam * cset.level, [], v
        for counts, sign in ((np.asarray(prefs.n1, dtype=np.float64), 1.0), (np.asarray(prefs.n0, dtype=np.float64), -1.0)):
            rows = counts > 0
            if not rows.any():
                continue
            n, X = counts[rows], np.asarray(prefs.X)[rows]
            q = cp.Variable(int(rows.sum()), nonneg=True)
            w = w + sign * (X.T @ cp.multiply(n, q))
            entropy = cp.rel_entr(q, lam) + cp.rel_entr(lam - q, lam)
            expression = expression + n @ entropy
            constraints.append(q <= lam)
        return expression + cset.B * cp.norm(w, 2), constraints
    raise ValueError(
        f"the joint program (A) needs sigma_C in closed conjugate form, available for Ball, Singleton and "
        f"LikelihoodSet; got {type(cset).__name__}: use method='cutting_plane' or 'dual_lp'"
    )


def _solve_joint(mdp, v_E, cset, tol) -> MinMaxResult:
    """(A) ``min_{d in occupancies} sigma_C(v_E - Phi^T d)`` as one program (spec section 3).

    ``u = v_E - Phi^T d`` is an explicit variable; the dual of that equality is
    the maximising ``theta`` (the gradient of sigma_C at u).
    """
    import cvxpy as cp

    def build():
        F, b = flow_constraints(mdp)
        Phi = mdp.phi.reshape(-1, mdp.d)
        d = cp.Variable(F.shape[1], nonneg=True, name="d")
        u = cp.Variable(mdp.d, name="u")
        link = u == v_E - Phi.T @ d
        sigma, extra = support_function_expression(cset, u)
        problem = cp.Problem(cp.Minimize(sigma), [F @ d == b, link, *extra])

        def read():
            theta = None if link.dual_value is None else -np.asarray(link.dual_value)
            return d.value, theta

        return problem, read

    result = _solve_cvxpy(mdp, v_E, cset, tol, build, "joint")
    return result


# ----------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------


def solve(mdp: MDP, v_E, cset, *, method: str = "cutting_plane", tol: float = 1e-7, max_iter: int = 1000, warm: MinMaxResult | None = None) -> MinMaxResult:
    """Solve ``min_pi max_{theta in C} theta^T (v_E - v_pi)`` exactly and certify it (spec section 3).

    method: "cutting_plane" (D, default, fast, no cvxpy), "dual_lp" (B, cvxpy)
    or "joint" (A, cvxpy, slow for many distinct pairs).
    tol: absolute certificate tolerance; ``status == "optimal"`` iff gap <= tol.
    max_iter: iteration cap of the cutting-plane method.
    warm: a previous result on the same MDP (cutting_plane only): its theta and
    occupancy seed the master and the oracle (used by online re-solves).
    """
    _check_mdp(mdp)
    v_E = _check_v_E(mdp, v_E)
    _check_cset(mdp, cset)
    tol = _check_tol(tol)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if warm is not None and (not isinstance(warm, MinMaxResult) or warm.occupancy.shape != (mdp.H, mdp.S, mdp.A)):
        raise ValueError("warm must be a MinMaxResult from a solve on the same MDP, or None")
    if method == "cutting_plane":
        return _solve_cutting_plane(mdp, v_E, cset, tol, int(max_iter), warm)
    if method == "dual_lp":
        return _solve_dual_lp(mdp, v_E, cset, tol)
    return _solve_joint(mdp, v_E, cset, tol)

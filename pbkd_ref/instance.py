"""Saved offline PbKD instances: the ``.npz`` format, its validation, and solving one.

An instance is everything the min-max of spec tabular.md section 3 needs: the MDP
``(P, rho, phi)``, the teacher's feature expectation ``v_E``, the preference data
``(X, y)`` (``x = phi(tau1) - phi(tau0)``, ``y = 1`` when ``tau1`` is preferred), the
norm bound ``B`` and the likelihood radius ``zeta`` of
``C(D) = {||theta|| <= B, NLL(theta) <= NLL(theta_hat) + zeta}``.

File format (``numpy.savez``, no pickled objects), keys and shapes:

    P     (H-1, S, A, S)  transition kernels, rows sum to 1
    rho   (S,)            initial law
    phi   (H, S, A, d)    per-step features
    v_E   (d,)            teacher feature expectation
    X     (N, d)          feature differences phi(tau1) - phi(tau0), N >= 1
    y     (N,)            labels in {0, 1}
    B     scalar > 0
    zeta  scalar >= 0

A malformed instance raises ``ValueError`` naming the field and what is wrong.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass

import numpy as np

from pbkd_ref.mdp import MDP

NPZ_KEYS = ("P", "rho", "phi", "v_E", "X", "y", "B", "zeta")

# Probability tables must sum to one to this accuracy (as pbkd_ref.mdp requires).
_PROB_ATOL = 1e-8


def _field_error(field: str, problem: str) -> ValueError:
    return ValueError(f"instance field '{field}': {problem}")


def _numeric(field: str, value) -> np.ndarray:
    try:
        arr = np.asarray(value)
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise TypeError(arr.dtype)
        arr = arr.astype(np.float64)
    except (TypeError, ValueError) as error:
        raise _field_error(field, f"must be a numeric array, got {type(value).__name__} ({error})") from None
    if np.isnan(arr).any():
        raise _field_error(field, "contains NaN entries; replace them with finite numbers")
    if not np.isfinite(arr).all():
        raise _field_error(field, "contains infinite entries; replace them with finite numbers")
    return arr


def _probability_rows(field: str, arr: np.ndarray, what: str) -> None:
    if arr.size == 0:
        return
    if arr.min() < 0:
        index = np.unravel_index(np.argmin(arr), arr.shape)
        raise _field_error(field, f"has negative entries (min {arr.min():.3g} at index {tuple(int(i) for i in index)}); {what} must be >= 0")
    sums = arr.sum(axis=-1)
    deviation = np.abs(sums - 1.0)
    if deviation.max() > _PROB_ATOL:
        worst = np.unravel_index(np.argmax(deviation), deviation.shape)
        where = f"{field}[{', '.join(str(int(i)) for i in worst)}]" if worst else field
        raise _field_error(field, f"{what} must sum to 1; {where} sums to {sums[worst]:.10g}")


def _scalar(field: str, value) -> float:
    arr = _numeric(field, value)
    if arr.size != 1 or arr.ndim > 1:
        raise _field_error(field, f"must be a scalar, got an array of shape {arr.shape}")
    return float(arr.reshape(()))


def validate_fields(*, P, rho, phi, v_E, X, y, B, zeta) -> dict:
    """Check every field of an instance; return them as float64 arrays / floats.

    Raises ValueError naming the field: wrong shapes, transition or initial
    probabilities that are negative or do not sum to 1, NaN or infinite
    entries, ``B <= 0``, ``zeta < 0``, labels outside {0, 1}.
    """
    phi = _numeric("phi", phi)
    if phi.ndim != 4 or min(phi.shape) < 1:
        raise _field_error("phi", f"must have shape (H, S, A, d) with every size >= 1, got shape {phi.shape}")
    H, S, A, d = phi.shape
    P = _numeric("P", P)
    if P.shape != (H - 1, S, A, S):
        raise _field_error("P", f"must have shape (H-1, S, A, S) = {(H - 1, S, A, S)} to match phi of shape {phi.shape}, got {P.shape}")
    _probability_rows("P", P, "transition rows P[h, s, a, :]")
    rho = _numeric("rho", rho)
    if rho.shape != (S,):
        raise _field_error("rho", f"must have shape (S,) = ({S},), got {rho.shape}")
    _probability_rows("rho", rho, "the initial law")
    v_E = _numeric("v_E", v_E)
    if v_E.shape != (d,):
        raise _field_error("v_E", f"must have shape (d,) = ({d},) to match phi, got {v_E.shape}")
    X = _numeric("X", X)
    if X.ndim != 2 or X.shape[1] != d:
        raise _field_error("X", f"must have shape (N, d) with d = {d}, got {X.shape}")
    if X.shape[0] < 1:
        raise _field_error("X", "has no rows; an instance needs at least one preference pair")
    y = _numeric("y", y)
    if y.shape != (X.shape[0],):
        raise _field_error("y", f"must have shape (N,) = ({X.shape[0]},) to match X, got {y.shape}")
    bad = np.flatnonzero((y != 0) & (y != 1))
    if bad.size:
        raise _field_error("y", f"labels must be 0 or 1 (1: tau1 preferred); y[{bad[0]}] = {y[bad[0]]:g} ({bad.size} bad labels)")
    B = _scalar("B", B)
    if B <= 0:
        raise _field_error("B", f"the norm bound must be > 0, got {B:g}")
    zeta = _scalar("zeta", zeta)
    if zeta < 0:
        raise _field_error("zeta", f"the likelihood radius must be >= 0, got {zeta:g}")
    return dict(P=P, rho=rho, phi=phi, v_E=v_E, X=X, y=y.astype(np.int64), B=B, zeta=zeta)


@dataclass(frozen=True, eq=False)
class Instance:
    """One offline PbKD problem (spec tabular.md sections 2-3); validated on construction."""

    mdp: MDP
    v_E: np.ndarray
    X: np.ndarray
    y: np.ndarray
    B: float
    zeta: float

    def __post_init__(self) -> None:
        fields = self.validate()
        for name in ("v_E", "X", "y", "B", "zeta"):
            object.__setattr__(self, name, fields[name])

    def validate(self) -> dict:
        """Raise ValueError naming the malformed field; return the checked fields."""
        if not isinstance(self.mdp, MDP):
            raise _field_error("mdp", f"must be a pbkd_ref.mdp.MDP, got {type(self.mdp).__name__}")
        return validate_fields(
            P=self.mdp.P, rho=self.mdp.rho, phi=self.mdp.phi, v_E=self.v_E, X=self.X, y=self.y, B=self.B, zeta=self.zeta
        )

    @property
    def N(self) -> int:
        return int(self.X.shape[0])

    def preferences(self):
        """The pairs aggregated into distinct differences with label counts (spec section 3, "Speed")."""
        from pbkd_ref.preferences import aggregate

        return aggregate(self.X, self.y)

    def confidence_set(self):
        """``C(D) = {||theta|| <= B, NLL(theta) <= NLL(theta_hat) + zeta}`` (spec section 2); fits the MLE."""
        from pbkd_ref.confidence import LikelihoodSet

        return LikelihoodSet(self.preferences(), self.B, self.zeta)


def save_instance(path, instance: Instance) -> None:
    """Write ``instance`` to ``path`` (exactly that name) as an ``.npz`` archive with keys ``NPZ_KEYS``."""
    if not isinstance(instance, Instance):
        raise ValueError(f"instance must be a pbkd_ref.instance.Instance, got {type(instance).__name__}")
    instance.validate()
    with open(path, "wb") as handle:
        np.savez(
            handle,
            P=instance.mdp.P,
            rho=instance.mdp.rho,
            phi=instance.mdp.phi,
            v_E=instance.v_E,
            X=instance.X,
            y=instance.y,
            B=np.float64(instance.B),
            zeta=np.float64(instance.zeta),
        )


def load_instance(path) -> Instance:
    """Read and validate an instance written by ``save_instance`` (or any npz with ``NPZ_KEYS``).

    Raises FileNotFoundError if ``path`` does not exist and ValueError if it is
    not an npz archive, misses a key, or holds a malformed field. Extra keys are ignored.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"instance file {path!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory; pass an instance .npz file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise ValueError("it holds a single array")
            missing = [key for key in NPZ_KEYS if key not in archive.files]
            if missing:
                raise ValueError(
                    f"instance file {path!r} lacks the key(s) {', '.join(missing)}; an instance needs {', '.join(NPZ_KEYS)}"
                )
            arrays = {key: archive[key] for key in NPZ_KEYS}
    except ValueError as error:
        if "lacks the key" in str(error):
            raise
        raise ValueError(f"{path!r} is not an instance .npz archive ({error}); write one with save_instance") from None
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ValueError(f"{path!r} is not a readable .npz archive ({error}); write one with save_instance") from None
    fields = validate_fields(**arrays)
    mdp = MDP(P=fields["P"], rho=fields["rho"], phi=fields["phi"])
    return Instance(mdp=mdp, v_E=fields["v_E"], X=fields["X"], y=fields["y"], B=fields["B"], zeta=fields["zeta"])


def solve_instance(instance: Instance, *, method: str = "cutting_plane", tol: float = 1e-7):
    """Algorithm 1's solve step on a saved instance: aggregate, fit the MLE, build C(D), solve the min-max.

    Returns ``(MinMaxResult, confidence set)``.
    """
    from pbkd_ref.solvers import solve

    if not isinstance(instance, Instance):
        raise ValueError(f"instance must be a pbkd_ref.instance.Instance, got {type(instance).__name__}")
    cset = instance.confidence_set()
    return solve(instance.mdp, instance.v_E, cset, method=method, tol=tol), cset


def random_instance(S: int, A: int, H: int, d: int, N: int, rng: np.random.Generator, *, B: float = 10.0,
                    radius_kind: str = "bracketing", delta: float = 0.05, temperature: float = 0.1) -> Instance:
    """A random offline PbKD instance (spec sections 1-2), e.g. the benchmark's.

    ``random_mdp(S, A, H, d)`` with ``||phi(tau)|| <= 1``; ``theta*`` uniform on the
    sphere of radius ``B / 2``; the teacher ``pi_E`` is the soft-optimal policy for
    ``r_theta*`` at ``temperature`` (a suboptimal teacher) and ``v_E = v_{pi_E}``
    exactly (white-box); ``N`` pairs ``tau0 ~ pi_E``, ``tau1 ~`` uniform policy,
    Bradley-Terry labels under ``theta*``; ``zeta`` from ``radius_kind`` at level ``delta``.
    """
    from pbkd_ref.confidence import confidence_set
    from pbkd_ref.mdp import feature_expectation, random_mdp, rewards, softmax_policy
    from pbkd_ref.preferences import aggregate, sample_preferences

    if not isinstance(rng, np.random.Generator):
        raise ValueError("rng must be a numpy.random.Generator (e.g. np.random.default_rng(0))")
    if not (np.isfinite(B) and B > 0):
        raise ValueError(f"B must be a positive number, got {B!r}")
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    mdp = random_mdp(S, A, H, d, rng)
    direction = rng.normal(size=mdp.d)
    theta_star = 0.5 * B * direction / np.linalg.norm(direction)
    pi_E = softmax_policy(mdp, rewards(mdp, theta_star), temperature)
    pi_ref = np.full((mdp.H, mdp.S, mdp.A), 1.0 / mdp.A)
    sample = sample_preferences(mdp, pi_E, pi_ref, theta_star, N, rng)
    cset = confidence_set(aggregate(sample.X, sample.y), B, kind=radius_kind, delta=delta)
    return Instance(mdp=mdp, v_E=feature_expectation(mdp, pi_E), X=sample.X, y=sample.y, B=B, zeta=cset.zeta)

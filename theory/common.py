"""Shared protocol of the theory experiments (spec tabular.md, section 5).

Every experiment in `theory/` follows the same protocol, implemented once here:

- the sample size `N` (or horizon `T`) runs over a geometric grid (`geometric_grid`);
- each grid point has `K >= 20` seeds in full mode, the instance fixed per family,
  randomness only in the data;
- seed means carry percentile-bootstrap 95% bands over seeds (`bootstrap_band`);
- the log-log slope is fitted by OLS on the seed means, with a seed-bootstrap
  confidence interval (`fit_loglog_slope`), and compared with the slope of the
  bound curve over the same points (`curve_slope`), never with `-1/2`;
- coverage frequencies carry Clopper-Pearson intervals (`clopper_pearson`);
- every figure has a JSON twin (`write_json`) that holds the numbers it shows and
  the protocol record (`REQUIRED_KEYS`): seeds, `delta`, `B`, `L_x`, the radius
  formula, the solver, its tolerances and the largest certificate gap.

Estimands that reach exactly zero (finite MDPs have action gaps, section 5) have no
logarithm: slopes are fitted only where the seed mean is positive and at least half
of the seeds are positive, and the JSON says which points were used.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from scipy.stats import beta as beta_distribution

from pbkd_ref.cli import ArgumentParser

# Keys every experiment JSON must hold (spec section 5, "every figure has a JSON twin").
REQUIRED_KEYS = (
    "experiment",
    "mode",
    "command",
    "seeds",
    "n_seeds",
    "delta",
    "B",
    "L_x",
    "lam",
    "radius",
    "solver",
    "max_certificate_gap",
    "instances",
    "results",
    "checks",
    "all_checks_passed",
    "runtime_s",
    "notes",
)

# The radius of Lemma 1, written as the JSON records it.
BRACKETING_FORMULA = "zeta_N = 1 + d log(1 + 2 B L_x N) + log(1/delta)"
ANYTIME_FORMULA = "zeta_t = 1 + d log(1 + 2 B L_x t) + log(t (t+1) / delta)"
CHI2_FORMULA = "zeta = chi2.ppf(1 - delta, d) / 2"

# Tolerance of the slope check (issue 3, item 6): fitted CI upper end <= bound slope + 0.05.
SLOPE_TOLERANCE = 0.05

FIT_RULE = (
    "OLS of log(seed mean) on log(grid) over the grid points where the seed mean is > 0 and at "
    "least half of the seeds are > 0; seed bootstrap: resample seeds with replacement, refit on "
    "the same points, drop (and count) replicates whose mean is <= 0 at a used point"
)


# ----------------------------------------------------------------------------- grids and seeds


def geometric_grid(lo: float, hi: float, num: int) -> np.ndarray:
    """Integers on a geometric grid from `lo` to `hi` (both included), `num` points, strictly increasing."""
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 1 or hi <= lo:
        raise ValueError(f"geometric_grid needs 1 <= lo < hi, got lo={lo!r}, hi={hi!r}")
    if int(num) != num or num < 2:
        raise ValueError(f"geometric_grid needs an integer num >= 2, got {num!r}")
    grid = np.unique(np.round(np.geomspace(lo, hi, int(num))).astype(int))
    if grid.size != num:
        raise ValueError(
            f"geometric_grid({lo}, {hi}, {num}) has repeated integers; widen the range or use fewer points"
        )
    return grid


def seed_list(base: int, n_seeds: int) -> list[int]:
    """The seeds of one experiment: `base, base + 1, ..., base + n_seeds - 1` (recorded in the JSON)."""
    if int(n_seeds) != n_seeds or n_seeds < 1:
        raise ValueError(f"n_seeds must be a positive integer, got {n_seeds!r}")
    return [int(base) + k for k in range(int(n_seeds))]


# ----------------------------------------------------------------------------- bands and slopes


def _check_seed_matrix(values: np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if values.ndim != 2 or values.shape[0] < 2:
        raise ValueError(f"{name} must have shape (n_seeds >= 2, n_points), got {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} has non-finite entries; every seed must produce a number")
    return values


def bootstrap_band(values, *, rng: np.random.Generator, n_boot: int = 2000, level: float = 0.95):
    """Seed mean and percentile-bootstrap band of the mean (spec section 5).

    `values` has shape (n_seeds, n_points); seeds (rows) are resampled with replacement.
    Returns (mean, lo, hi), each of shape (n_points,).
    """
    values = _check_seed_matrix(values, "values")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    K = values.shape[0]
    idx = rng.integers(0, K, size=(n_boot, K))
    boot_means = values[idx].mean(axis=1)  # (n_boot, n_points)
    alpha = 1.0 - level
    lo, hi = np.quantile(boot_means, [alpha / 2.0, 1.0 - alpha / 2.0], axis=0)
    return values.mean(axis=0), lo, hi


def ols_slope(log_x: np.ndarray, log_y: np.ndarray) -> np.ndarray:
    """OLS slope of `log_y` on `log_x`; `log_y` may carry leading batch axes (one fit per row)."""
    log_x = np.asarray(log_x, dtype=float)
    centred = log_x - log_x.mean()
    denom = float(centred @ centred)
    if denom <= 0:
        raise ValueError("ols_slope needs at least two distinct x values")
    log_y = np.asarray(log_y, dtype=float)
    return (log_y - log_y.mean(axis=-1, keepdims=True)) @ centred / denom


@dataclass
class SlopeFit:
    """A fitted log-log slope with its seed-bootstrap confidence interval."""

    slope: float | None
    intercept: float | None
    ci: tuple[float, float] | None
    used: list[bool]
    n_used: int
    n_boot: int
    n_boot_dropped: int
    level: float
    rule: str = FIT_RULE
    reason: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def fit_loglog_slope(
    x,
    values,
    *,
    rng: np.random.Generator,
    n_boot: int = 2000,
    level: float = 0.95,
    min_points: int = 3,
    restrict=None,
    restrict_reason: str = "",
) -> SlopeFit:
    """OLS log-log slope on seed means with a seed-bootstrap CI (spec section 5).

    Only grid points where the seed mean is positive and at least half of the seeds
    are positive enter the fit (an estimand that is exactly zero has no logarithm),
    and, when `restrict` is given, only points where it is True (`restrict_reason`
    says why, e.g. "the bound curve is below its trivial cap there"); with fewer
    than `min_points` such points the slope is None and `reason` says why.
    """
    x = np.asarray(x, dtype=float)
    values = _check_seed_matrix(values, "values")
    if x.ndim != 1 or x.size != values.shape[1] or np.any(x <= 0):
        raise ValueError(f"x must be positive with one entry per column of values, got shape {x.shape}")
    mean = values.mean(axis=0)
    used = (mean > 0) & ((values > 0).mean(axis=0) >= 0.5)
    if restrict is not None:
        restrict = np.asarray(restrict, dtype=bool)
        if restrict.shape != used.shape:
            raise ValueError(f"restrict must have one entry per grid point ({used.size}), got {restrict.shape}")
        used &= restrict
    n_used = int(used.sum())
    if n_used < min_points:
        return SlopeFit(
            slope=None,
            intercept=None,
            ci=None,
            used=used.tolist(),
            n_used=n_used,
            n_boot=n_boot,
            n_boot_dropped=0,
            level=level,
            rule=FIT_RULE + (f"; restricted to points where {restrict_reason}" if restrict is not None else ""),
            reason=f"only {n_used} grid points have a positive seed mean with >= half of the seeds positive "
            f"(need {min_points}); the estimand is exactly 0 elsewhere",
        )
    log_x = np.log(x[used])
    log_mean = np.log(mean[used])
    slope = float(ols_slope(log_x, log_mean))
    intercept = float(log_mean.mean() - slope * log_x.mean())
    K = values.shape[0]
    idx = rng.integers(0, K, size=(n_boot, K))
    boot_means = values[idx][:, :, used].mean(axis=1)  # (n_boot, n_used)
    valid = np.all(boot_means > 0, axis=1)
    boot_slopes = ols_slope(log_x, np.log(boot_means[valid]))
    alpha = 1.0 - level
    ci_lo, ci_hi = np.quantile(boot_slopes, [alpha / 2.0, 1.0 - alpha / 2.0])
    return SlopeFit(
        slope=slope,
        intercept=intercept,
        ci=(float(ci_lo), float(ci_hi)),
        used=used.tolist(),
        n_used=n_used,
        n_boot=n_boot,
        n_boot_dropped=int((~valid).sum()),
        level=level,
        rule=FIT_RULE + (f"; restricted to points where {restrict_reason}" if restrict is not None else ""),
    )


def curve_slope(x, curve, used=None) -> float:
    """OLS slope of log(curve) on log(x) over the points `used`: the bound curve's slope over the
    range on which the measured slope was fitted (an average of its local slopes there)."""
    x = np.asarray(x, dtype=float)
    curve = np.asarray(curve, dtype=float)
    used = np.ones(x.shape, dtype=bool) if used is None else np.asarray(used, dtype=bool)
    if np.any(curve[used] <= 0):
        raise ValueError("curve_slope needs a positive curve on the used points")
    return float(ols_slope(np.log(x[used]), np.log(curve[used])))


def slope_check(fit: SlopeFit, bound_slope: float, *, what: str) -> dict:
    """Issue 3 item 6: the upper end of the fitted slope's CI is at most the bound curve's slope + 0.05."""
    if fit.slope is None:
        return {
            "passed": None,
            "what": what,
            "bound_slope": bound_slope,
            "tolerance": SLOPE_TOLERANCE,
            "reason": "slope not measurable: " + fit.reason,
        }
    ci_hi = fit.ci[1]
    return {
        "passed": bool(ci_hi <= bound_slope + SLOPE_TOLERANCE),
        "what": what,
        "fitted_slope": fit.slope,
        "ci": list(fit.ci),
        "bound_slope": bound_slope,
        "tolerance": SLOPE_TOLERANCE,
        "margin": float(bound_slope + SLOPE_TOLERANCE - ci_hi),
    }


def two_sided_slope_check(fit: SlopeFit, target: float, *, what: str) -> dict:
    """A rate the theory pins down exactly: the fitted slope's CI contains ``target`` (so a rate off
    either way fails, unlike :func:`slope_check`)."""
    if fit.slope is None:
        return {"passed": None, "what": what, "target": target, "reason": "slope not measurable: " + fit.reason}
    return {"passed": bool(fit.ci[0] <= target <= fit.ci[1]), "what": what, "fitted_slope": fit.slope,
            "ci": list(fit.ci), "target": target, "n_used": fit.n_used}


def below_bound_check(measured, bound, *, delta: float, what: str) -> dict:
    """Issue 3 item 6: at every grid point the measured estimand is <= its bound in at least a
    1 - delta fraction of seeds.  `bound` has the shape of `measured` (per-seed bound) or one entry
    per grid point (a deterministic bound curve)."""
    measured = np.asarray(measured, dtype=float)
    bound = np.broadcast_to(np.asarray(bound, dtype=float), measured.shape)
    below = measured <= bound
    fraction = below.mean(axis=0)
    ratio = np.where(bound > 0, measured / np.where(bound > 0, bound, 1.0), np.inf)
    return {
        "passed": bool(np.all(fraction >= 1.0 - delta)),
        "what": what,
        "fraction_below": fraction.tolist(),
        "min_fraction_below": float(fraction.min()),
        "required_fraction": 1.0 - delta,
        "max_ratio_measured_to_bound": float(np.max(ratio)),
    }


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval for a binomial proportion k / n (spec section 5)."""
    if int(n) != n or n < 1 or int(k) != k or not 0 <= k <= n:
        raise ValueError(f"clopper_pearson needs integers 0 <= k <= n, n >= 1; got k={k!r}, n={n!r}")
    alpha = 1.0 - level
    lo = 0.0 if k == 0 else float(beta_distribution.ppf(alpha / 2.0, k, n - k + 1))
    hi = 1.0 if k == n else float(beta_distribution.ppf(1.0 - alpha / 2.0, k + 1, n - k))
    return lo, hi


# ----------------------------------------------------------------------------- JSON twin


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _to_jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else repr(value)
    if isinstance(obj, SlopeFit):
        return _to_jsonable(obj.to_json())
    return obj


def collect_checks(checks: dict) -> bool:
    """True when every check passed; a check whose `passed` is None (not measurable) does not count as
    passed, so the caller must explain it in the notes."""
    return all(c.get("passed") is True for c in checks.values())


def write_json(path: Path, record: dict) -> Path:
    """Write an experiment's JSON twin after checking it holds every key of `REQUIRED_KEYS`."""
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise ValueError(f"experiment record is missing {missing}; every JSON twin needs {list(REQUIRED_KEYS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_to_jsonable(record), indent=1) + "\n")
    return path


def save_record(record: dict, out_dir: Path, name: str, plot) -> None:
    """Write `<name>.json`, then draw `<name>.png` from the JSON as written, so the picture shows
    exactly the numbers of its twin."""
    path = write_json(Path(out_dir) / f"{name}.json", record)
    plot(json.loads(path.read_text()), Path(out_dir) / f"{name}.png")


def experiment_main(name: str, doc: str, run, argv=None, *, full_seeds: int, quick_seeds: int) -> dict:
    """The command line shared by every experiment: parse, run, print whether every check passed."""
    config = parse_args(name, doc.splitlines()[0], argv, full_seeds=full_seeds, quick_seeds=quick_seeds)
    record = run(config)
    print(f"{name}: all checks passed = {record['all_checks_passed']} ({record['runtime_s']:.1f} s)")
    return record


@dataclass
class GapTracker:
    """The largest certificate gap over every solve of an experiment (recorded in its JSON)."""

    max_gap: float = 0.0
    n_solves: int = 0
    statuses: dict = field(default_factory=dict)

    def add(self, gap: float, status: str = "optimal") -> None:
        if not np.isfinite(gap):
            raise ValueError(f"certificate gap must be finite, got {gap!r}")
        self.max_gap = max(self.max_gap, float(gap))
        self.n_solves += 1
        key = status.split(":")[0]
        self.statuses[key] = self.statuses.get(key, 0) + 1


# ----------------------------------------------------------------------------- command line


@dataclass
class RunConfig:
    """What every experiment's command line sets: `--quick`, `--out-dir`, `--seeds`, `--workers`."""

    quick: bool
    out_dir: Path
    n_seeds: int
    progress: bool = True
    workers: int = 1

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"


FIGURES_DIR = Path("figures")
"""Where full-mode runs write their figures and JSON twins (`make figures`)."""

QUICK_DIR = Path("runs") / "quick"
"""Where `--quick` runs write unless `--out-dir` is given: never over the committed `figures/`."""


def output_dir(out_dir: Path | None, quick: bool) -> Path:
    """`--out-dir` if given, else `figures/` for a full run and the scratch `runs/quick/` for a quick one."""
    if out_dir is not None:
        return Path(out_dir)
    return QUICK_DIR if quick else FIGURES_DIR


def parse_args(name: str, description: str, argv: Sequence[str] | None = None, *, full_seeds: int = 20,
               quick_seeds: int = 4) -> RunConfig:
    """`python -m theory.<name> [--quick] [--out-dir DIR] [--seeds K]`; bad input is refused in one line (exit 2)."""
    parser = ArgumentParser(prog=f"python -m theory.{name}", description=description)
    parser.add_argument("--quick", action="store_true", help="small grid and few seeds (seconds; used by tests)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help=f"where <name>.png/.json go (default {FIGURES_DIR}/, or {QUICK_DIR}/ with --quick)")
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"seeds per grid point (default {full_seeds} full, {quick_seeds} quick)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="processes over seeds (results do not depend on it; default: up to 2 cores)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    n_seeds = args.seeds if args.seeds is not None else (quick_seeds if args.quick else full_seeds)
    if n_seeds < 2:
        parser.error(f"--seeds must be >= 2 (bootstrap bands need two seeds), got {n_seeds}")
    if not args.quick and n_seeds < 20:
        parser.error(f"full mode needs --seeds >= 20 (spec section 5 protocol), got {n_seeds}")
    return RunConfig(quick=args.quick, out_dir=output_dir(args.out_dir, args.quick), n_seeds=n_seeds,
                     progress=not args.no_progress, workers=args.workers)


def default_workers() -> int:
    """Processes for the seed loop: the machine's cores, at most 2 (the project's reference machine)."""
    import os

    return max(1, min(2, os.cpu_count() or 1))


def run_jobs(fn: Callable, jobs: Sequence, *, workers: int, bar) -> list:
    """`[fn(job) for job in jobs]`, over `workers` processes, in job order; one bar step per finished job.

    Every job carries its own seed, so the results do not depend on `workers` or on the order in
    which jobs finish. `fn` must be a module-level function (it is sent to the worker processes).
    """
    if workers <= 1 or len(jobs) <= 1:
        results = []
        for job in jobs:
            results.append(fn(job))
            bar.update(1)
        return results
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(fn, job) for job in jobs]
        for future in as_completed(futures):
            future.result()  # re-raise a worker's exception at once
            bar.update(1)
        return [future.result() for future in futures]


def command_line(name: str, config: RunConfig) -> str:
    parts = [f"python -m theory.{name}"]
    if config.quick:
        parts.append("--quick")
    parts += ["--out-dir", str(config.out_dir), "--seeds", str(config.n_seeds)]
    return " ".join(parts)


class Stopwatch:
    """Wall-clock time of one experiment (recorded as runtime_s)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


# ----------------------------------------------------------------------------- plotting style


def plt_module():
    """matplotlib.pyplot with the non-interactive backend (figures are written to files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "figure.dpi": 110,
            "savefig.dpi": 130,
            "font.size": 10,
            "axes.titlesize": 10.5,
            "axes.labelsize": 10,
            "legend.fontsize": 8,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.grid.which": "both",
        }
    )
    return plt


def plot_band(ax, x, mean, lo, hi, *, label: str, color, marker: str = "o", positive_only: bool = False) -> None:
    """Seed mean with its bootstrap band; on log axes only positive means can be drawn."""
    x = np.asarray(x, dtype=float)
    mean, lo, hi = (np.asarray(a, dtype=float) for a in (mean, lo, hi))
    keep = mean > 0 if positive_only else np.ones(mean.shape, dtype=bool)
    if positive_only and not keep.all():
        label += f" ({int((~keep).sum())} zero-mean points not drawn)"
    if positive_only:
        floor = mean[keep].min() / 10.0 if keep.any() else 1e-12
        lo = np.maximum(lo, floor)
    ax.plot(x[keep], mean[keep], marker=marker, ms=4, color=color, label=label)
    ax.fill_between(x[keep], lo[keep], hi[keep], color=color, alpha=0.2, linewidth=0)


def save_figure(fig, path: Path, *, rect=(0.0, 0.0, 1.0, 0.97)) -> Path:
    """Lay out (leaving `rect` for the axes: room for a suptitle or a figure legend) and write the PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=rect)
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def progress_bar(total: int, *, desc: str, enabled: bool):
    """A tqdm progress bar (a no-op bar when disabled)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=True, dynamic_ncols=True)


def check_finite_positive(name: str, value: float) -> float:
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return float(value)


Callback = Callable[[int], None]


# ----------------------------------------------------------------------------- instances


FAMILIES = ("random", "token_tree")


@dataclass(frozen=True, eq=False)
class ExperimentInstance:
    """One fixed instance of a family (spec section 5: the instance is fixed, randomness only in the data).

    `pi_star` is optimal for `theta_star`; `pi_E` is the (suboptimal, softmax) teacher;
    `pi_ref` the uniform reference policy that generates `tau1` offline.
    """

    family: str
    mdp: Any
    theta_star: np.ndarray
    pi_star: np.ndarray
    pi_E: np.ndarray
    pi_ref: np.ndarray
    v_star: np.ndarray
    v_E: np.ndarray
    v_ref: np.ndarray
    B: float
    L: float
    description: dict

    @property
    def L_x(self) -> float:
        """Nominal bound on ||x|| = ||phi(tau1) - phi(tau0)||: 2 L (spec section 2)."""
        return 2.0 * self.L

    def J(self, v) -> float:
        return float(self.theta_star @ np.asarray(v, dtype=float))

    def to_json(self) -> dict:
        return {
            **self.description,
            "family": self.family,
            "S": self.mdp.S,
            "A": self.mdp.A,
            "H": self.mdp.H,
            "d": self.mdp.d,
            "B": self.B,
            "L": self.L,
            "L_x_nominal": self.L_x,
            "theta_star": self.theta_star,
            "J_star": self.J(self.v_star),
            "J_teacher": self.J(self.v_E),
            "J_reference": self.J(self.v_ref),
            "v_star_minus_v_E_norm": float(np.linalg.norm(self.v_star - self.v_E)),
        }


def make_instance(
    family: str,
    *,
    seed: int,
    B: float = 1.0,
    L: float = 1.0,
    theta_norm: float = 0.9,
    teacher_temperature: float = 0.05,
    S: int = 4,
    A: int = 3,
    H: int = 4,
    d: int = 4,
    V: int = 3,
) -> ExperimentInstance:
    """Build the fixed instance of a family (spec section 1): `random` (`random_mdp(S, A, H, d)`) or
    `token_tree` (`token_tree_mdp(V, H, d)`); `theta*` uniform on the sphere of radius `theta_norm * B`;
    the teacher is the softmax policy of `r_theta*` at `teacher_temperature`, a suboptimal teacher."""
    from pbkd_ref.mdp import feature_expectation, plan, random_mdp, rewards, softmax_policy, token_tree_mdp

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if not 0.0 < theta_norm <= 1.0:
        raise ValueError(f"theta_norm must lie in (0, 1] (realisability ||theta*|| <= B), got {theta_norm!r}")
    rng = np.random.default_rng(seed)
    if family == "random":
        mdp = random_mdp(S, A, H, d, rng, L=L)
        description = {"instance_seed": seed, "builder": f"random_mdp(S={S}, A={A}, H={H}, d={d}, L={L})"}
    else:
        mdp = token_tree_mdp(V, H, d, rng, L=L)
        description = {"instance_seed": seed, "builder": f"token_tree_mdp(V={V}, H={H}, d={d}, L={L})"}
    theta_star = rng.normal(size=mdp.d)
    theta_star *= theta_norm * B / np.linalg.norm(theta_star)
    r = rewards(mdp, theta_star)
    pi_star, _ = plan(mdp, r)
    pi_E = softmax_policy(mdp, r, teacher_temperature)
    pi_ref = np.full((mdp.H, mdp.S, mdp.A), 1.0 / mdp.A)
    description["teacher"] = f"softmax_policy(r_theta*, temperature={teacher_temperature})"
    description["reference"] = "uniform policy"
    description["theta_star_norm"] = float(np.linalg.norm(theta_star))
    return ExperimentInstance(
        family=family,
        mdp=mdp,
        theta_star=theta_star,
        pi_star=pi_star,
        pi_E=pi_E,
        pi_ref=pi_ref,
        v_star=feature_expectation(mdp, pi_star),
        v_E=feature_expectation(mdp, pi_E),
        v_ref=feature_expectation(mdp, pi_ref),
        B=float(B),
        L=float(L),
        description=description,
    )


def config_instance(cfg, family: str):
    """The instance of `family` that an experiment's config names (seed and sizes in
    `cfg.instances[family]`, scale and teacher from the config's shared fields)."""
    spec = dict(cfg.instances[family])
    return make_instance(family, seed=spec.pop("seed"), B=cfg.B, L=cfg.L, theta_norm=cfg.theta_norm,
                         teacher_temperature=cfg.teacher_temperature, **spec)


def prefix_sample(sample, N: int):
    """The first `N` pairs of a `PairSample`: nested data sets along the grid (one data stream per seed)."""
    from pbkd_ref.preferences import PairSample

    if int(N) != N or not 1 <= N <= sample.N:
        raise ValueError(f"N must be an integer in [1, {sample.N}], got {N!r}")
    N = int(N)
    return PairSample(
        X=sample.X[:N],
        y=sample.y[:N],
        teacher_features=sample.teacher_features[:N],
        reference_features=sample.reference_features[:N],
    )


def tidy_log_axes(ax, *, legend_loc: str = "best", headroom: float = 1.0) -> None:
    """Readable log axes: major tick labels only (minor labels crowd the axis), a light legend;
    `headroom > 1` raises the top of a log y-axis by that factor to leave the legend room above the curves."""
    from matplotlib.ticker import NullFormatter

    if ax.get_xscale() == "log":
        ax.xaxis.set_minor_formatter(NullFormatter())
    if ax.get_yscale() == "log":
        ax.yaxis.set_minor_formatter(NullFormatter())
        if headroom > 1.0:
            bottom, top = ax.get_ylim()
            ax.set_ylim(bottom, top * headroom)
    ax.legend(loc=legend_loc, framealpha=0.85)

"""A Le Cam two-point lower bound under the measured SubOpt of offline PbKD, against N.

    python -m theory.lower_bound [--quick] [--out-dir figures] [--seeds K]

writes `figures/lower_bound.png` and its JSON twin `figures/lower_bound.json`.

The instance is a one-step, two-action bandit in `d = 1`. The features are `phi(a_0) = +L` and
`phi(a_1) = -L`, and the teacher and the reference are uniform (`v_E = 0`). The two-point family
is `theta in {+eps, -eps}`. Every policy `pi` has `SubOpt_+(pi) + SubOpt_-(pi) = 2 eps L`, so for
any student `pi_hat(D)` built from `N` pairs (Le Cam's method, with Bretagnolle-Huber for the
testing affinity):

    max_{theta = +-eps} E_theta SubOpt_theta(pi_hat) >= eps L (1 - TV(P_+^N, P_-^N))
                                                    >= (eps L / 2) exp(-N KL_1(eps)),
    KL_1(eps) = KL(P_+ || P_-) per pair = (1/2) (2 sigma(2 L eps) - 1) 2 L eps

(the pair has `x = +-2L` with probability 1/2, else `x = 0`). At each `N` the experiment takes
the `eps` that maximises the bound over a fine grid, `LB_N`, of order `0.2 / sqrt(N)`. It then runs white-box
offline PbKD on both points of that family, `K` seeds each, and measures
`max_theta mean SubOpt_theta`. It also evaluates Theorem 1.1's bound (with the seed's `C_N`) on the
same data. Checks:
- `measured_above_lower_bound`: the upper end of the measured maximum's 95% bootstrap interval is
  at least `LB_N` at every `N`. No student can beat the bound in expectation, so the check fails
  only if the measurement is wrong (for example a student that reads `theta*`);
- `measured_below_theorem_1`: `SubOpt <= ` Theorem 1.1's bound in at least `1 - delta` of seeds;
- `lower_below_upper`: `LB_N` is below the seed-mean upper bound (the sandwich is consistent).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from theory import bounds
from theory.common import (
    BRACKETING_FORMULA,
    RunConfig,
    Stopwatch,
    below_bound_check,
    bootstrap_band,
    collect_checks,
    command_line,
    experiment_main,
    geometric_grid,
    plot_band,
    plt_module,
    progress_bar,
    run_jobs,
    save_figure,
    save_record,
    seed_list,
    tidy_log_axes,
)

NAME = "lower_bound"
FULL_SEEDS = 200
QUICK_SEEDS = 30


@dataclass(frozen=True)
class Config:
    B: float = 1.0
    L: float = 1.0
    delta: float = 0.05
    lam: float = 1.0
    N_min: int = 100
    N_max: int = 102_400
    n_grid: int = 6
    seed_base: int = 60_000
    n_boot: int = 2000
    tol: float = 1e-7

    def quick(self) -> "Config":
        return Config(**{**asdict(self), "N_max": 6400, "n_grid": 3, "n_boot": 500})

    @property
    def L_x(self) -> float:
        return 2.0 * self.L


def bandit(L: float):
    """The one-step two-action MDP: phi(a_0) = +L, phi(a_1) = -L, d = 1; the uniform policy."""
    from pbkd_ref.mdp import MDP

    mdp = MDP(P=np.zeros((0, 1, 2, 1)), rho=np.ones(1), phi=np.array([L, -L]).reshape(1, 1, 2, 1))
    return mdp, np.full((1, 1, 2), 0.5)


def kl_per_pair(eps, L: float):
    """KL(P_+ || P_-) of one labelled pair: x = +-2L with probability 1/2 (else 0, no information)."""
    eps = np.asarray(eps, dtype=float)
    return 0.5 * (2.0 / (1.0 + np.exp(-2 * L * eps)) - 1.0) * 2 * L * eps


def le_cam_bound(N: float, L: float, B: float) -> tuple[float, float]:
    """(max over eps in (0, B] of (eps L / 2) exp(-N KL_1(eps)), its maximiser eps), on a fine grid."""
    eps = np.geomspace(1e-6 * B, B, 20_001)
    values = 0.5 * eps * L * np.exp(-N * kl_per_pair(eps, L))
    i = int(np.argmax(values))
    return float(values[i]), float(eps[i])


def seed_job(job: tuple) -> dict:
    """One seed: offline PbKD on both points of the two-point family at each N of the grid."""
    from pbkd_ref.mdp import feature_expectation
    from pbkd_ref.offline import offline_pbkd
    from pbkd_ref.preferences import sample_preferences
    from theory.concentrability import sample_coefficient

    cfg, seed, eps_grid = job
    start = time.process_time()
    mdp, uniform = bandit(cfg.L)
    grid = geometric_grid(cfg.N_min, cfg.N_max, cfg.n_grid)
    subopt, upper = np.zeros((2, len(grid))), np.zeros((2, len(grid)))
    gap = 0.0
    for j, (N, eps) in enumerate(zip(grid, eps_grid)):
        for k, sign in enumerate((1.0, -1.0)):
            theta = np.array([sign * eps])
            data = sample_preferences(mdp, uniform, uniform, theta, int(N), np.random.default_rng([seed, j, k]))
            res = offline_pbkd(mdp, data, B=cfg.B, delta=cfg.delta, v_E=np.zeros(1), tol=cfg.tol)
            gap = max(gap, res.minmax.certificate_gap)
            subopt[k, j] = eps * cfg.L - float(theta @ feature_expectation(mdp, res.policy))
            u = np.array([sign * cfg.L])  # v* - v_E
            upper[k, j] = bounds.offline_bound(N, d=1, B=cfg.B, L_x=cfg.L_x, delta=cfg.delta,
                                               concentrability=sample_coefficient(u, res.cset.prefs, lam=cfg.lam),
                                               lam=cfg.lam)
    return {"subopt": subopt, "upper": upper, "gap": gap, "cpu_s": time.process_time() - start}


def plot(record: dict, path) -> None:
    plt = plt_module()
    res = record["results"]
    grid = np.asarray(record["grid"]["bandit"], dtype=float)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    m = res["max_mean_subopt"]
    plot_band(ax, grid, m["mean"], m["band_lo"], m["band_hi"], label="measured: max over the two points of mean SubOpt",
              color="C0")
    ax.plot(grid, res["upper_bound_mean"], "k--", label="Theorem 1.1 bound (seed's C_N, mean)")
    ax.plot(grid, res["le_cam_bound"], color="C3", lw=2, label="Le Cam two-point lower bound")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N (preference pairs)")
    ax.set_ylabel("SubOpt [return units]")
    ax.set_title("Two-action bandit, theta = +-eps_N: lower bound, measurement, upper bound "
                 f"({record['n_seeds']} seeds)", fontsize=10)
    tidy_log_axes(ax, legend_loc="lower left")
    save_figure(fig, path)


def run(config: RunConfig, cfg: Config | None = None) -> dict:
    cfg = cfg or Config()
    if config.quick:
        cfg = cfg.quick()
    watch = Stopwatch()
    seeds = seed_list(cfg.seed_base, config.n_seeds)
    grid = geometric_grid(cfg.N_min, cfg.N_max, cfg.n_grid)
    lower, eps = np.array([le_cam_bound(float(N), cfg.L, cfg.B) for N in grid]).T  # the family at each N, once
    with progress_bar(len(seeds), desc=NAME, enabled=config.progress) as bar:
        rows = run_jobs(seed_job, [(cfg, seed, eps) for seed in seeds], workers=config.workers, bar=bar)
    rng = np.random.default_rng(cfg.seed_base)
    subopt = np.array([row["subopt"] for row in rows])  # (K, 2, P)
    upper = np.array([row["upper"] for row in rows])
    # The bootstrap resamples seeds; each resample's statistic is the max over the two points of its means.
    idx = rng.integers(0, len(rows), size=(cfg.n_boot, len(rows)))
    boot = subopt[idx].mean(axis=1).max(axis=1)  # (n_boot, P)
    measured = subopt.mean(axis=0).max(axis=0)
    lo, hi = np.quantile(boot, [0.025, 0.975], axis=0)
    bands = [bootstrap_band(subopt[:, k], rng=rng, n_boot=cfg.n_boot) for k in range(2)]
    per_point = {sign: {"per_seed": subopt[:, k], **dict(zip(("mean", "band_lo", "band_hi"), bands[k]))}
                 for k, sign in enumerate(("plus", "minus"))}
    results = {"eps": eps, "le_cam_bound": lower, "subopt": per_point,
               "max_mean_subopt": {"mean": measured, "band_lo": lo, "band_hi": hi},
               "upper_bound_mean": upper.mean(axis=(0, 1)), "measured_over_lower": measured / lower,
               "measured_over_upper": measured / upper.mean(axis=(0, 1))}
    gap = max(row["gap"] for row in rows)
    checks = {
        "measured_above_lower_bound": {
            "passed": bool(np.all(hi >= lower)),
            "what": "Le Cam: the upper end of the 95% bootstrap interval of max_theta mean SubOpt_theta is >= LB_N "
                    "at every N (no student beats it in expectation)",
            "ratio_measured_to_lower": measured / lower},
        "measured_below_theorem_1": below_bound_check(
            subopt.reshape(-1, len(grid)), upper.reshape(-1, len(grid)), delta=cfg.delta,
            what="SubOpt <= Theorem 1.1 bound (seed's C_N), both points of the family"),
        "lower_below_upper": {"passed": bool(np.all(lower <= upper.mean(axis=(0, 1)))),
                              "what": "LB_N <= the seed-mean Theorem 1.1 bound at every N"},
        "solver_certified": {"passed": bool(gap <= cfg.tol), "what": "every min-max solve certified (gap <= tol)",
                             "max_certificate_gap": gap, "tol": cfg.tol},
    }
    record = {
        "experiment": NAME,
        "mode": config.mode,
        "command": command_line(NAME, config),
        "seeds": seeds,
        "n_seeds": len(seeds),
        "delta": cfg.delta,
        "B": cfg.B,
        "L_x": cfg.L_x,
        "lam": cfg.lam,
        "radius": {"kind": "bracketing", "formula": BRACKETING_FORMULA},
        "solver": {"min_max": "pbkd_ref.solvers.solve(method='cutting_plane')", "tol": cfg.tol},
        "max_certificate_gap": gap,
        "config": asdict(cfg),
        "instances": {"bandit": {"family": "two-action bandit", "H": 1, "S": 1, "A": 2, "d": 1, "L": cfg.L,
                                 "teacher": "uniform", "reference": "uniform", "theta": "+-eps_N (maximiser of LB_N)"}},
        "grid": {"bandit": grid},
        "results": results,
        "checks": checks,
        "all_checks_passed": collect_checks(checks),
        "runtime_s": watch.elapsed(),
        "cpu_s": float(sum(row["cpu_s"] for row in rows)),
        "notes": ["The instance changes with N (eps_N ~ 1 / sqrt(N)): a minimax lower bound, not a fixed instance.",
                  "Both points of each family use independent data (seeded by seed, grid index and sign)."],
    }
    save_record(record, config.out_dir, NAME, plot)
    return record


def main(argv=None) -> dict:
    return experiment_main(NAME, __doc__, run, argv, full_seeds=FULL_SEEDS, quick_seeds=QUICK_SEEDS)


if __name__ == "__main__":
    main()

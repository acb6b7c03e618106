"""PbKD, MM PbKD and the tabular baselines on shared instances and shared data, against N.

    python -m theory.methods [--quick] [--out-dir figures] [--seeds K]

writes `figures/methods.png` and its JSON twin `figures/methods.json`.

Spec tabular.md section 4 ("Tabular baselines for comparison on the same instances") and
section 5. For each family (fixed instance) and seed, one stream of labelled trajectory pairs
(`tau0 ~ pi_E`, the suboptimal softmax teacher; `tau1 ~` the uniform reference) is drawn with
`pbkd_ref.preferences.sample_trajectory_pairs`, and every method sees its first `N` pairs:

- `pbkd_white_box`: Algorithm 1 with the exact `v_E`;
- `pbkd_black_box`: Algorithm 1 with `v_hat_E` = mean teacher trajectory feature of the pairs;
- `mm_pbkd_successor`: Algorithm 3 with `psi` = the teacher's successor features (then
  `phi_Q = phi` and it must coincide with white-box PbKD: checked on the min-max values);
- `mm_pbkd_rich`: Algorithm 3 with `psi` = successor features plus `extra_q_features` random
  Q-features (realisable with `w = (theta*, 0)`, a larger class and so a wider set);
- `behaviour_cloning`: empirical conditional action frequencies of the `N` teacher trajectories;
- `ball_moment_matching`: the min-max over the whole `B`-ball with the exact `v_E` (no preferences,
  independent of `N`) and `ball_moment_matching_black_box` with `v_hat_E`;
- `mle_plugin`: `argmax_pi J(pi, theta_hat)`;
- `zjj_pessimistic_mle`: the Zhu-Jordan-Jiao (2023) pessimistic MLE, the same min-max with the
  exact `v_E` over the ellipsoid `{||theta - theta_hat||^2_{X^T X + lam I} <= 2 zeta / gamma + 4 lam B^2}`
  intersected with the ball (`pbkd_ref.confidence.EllipsoidSet.from_likelihood`), which contains
  `C(D)`: a wider set through the same support-function interface.

Measured per method: `SubOpt = J(pi*, theta*) - J(pi, theta*)` and the teacher gap
`J(pi_E, theta*) - J(pi, theta*)` (negative: the student beats the teacher). All sets use the
bracketing radius; `B_f = B` for MM PbKD.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from theory import bounds
from theory.common import (
    config_instance,
    experiment_main,
    save_record,
    BRACKETING_FORMULA,
    RunConfig,
    Stopwatch,
    below_bound_check,
    bootstrap_band,
    collect_checks,
    command_line,
    geometric_grid,
    plt_module,
    progress_bar,
    run_jobs,
    save_figure,
    seed_list,
)

NAME = "methods"
FULL_SEEDS = 20  # seeds per grid point in full mode (spec section 5: >= 20)
QUICK_SEEDS = 4
METHODS = (
    "pbkd_white_box",
    "pbkd_black_box",
    "mm_pbkd_successor",
    "mm_pbkd_rich",
    "behaviour_cloning",
    "ball_moment_matching",
    "ball_moment_matching_black_box",
    "mle_plugin",
    "zjj_pessimistic_mle",
)
LABELS = {
    "pbkd_white_box": "PbKD, white-box v_E",
    "pbkd_black_box": "PbKD, black-box v_hat_E",
    "mm_pbkd_successor": "MM PbKD, psi = successor features",
    "mm_pbkd_rich": "MM PbKD, psi = successor + random",
    "behaviour_cloning": "behaviour cloning",
    "ball_moment_matching": "ball moment matching, v_E",
    "ball_moment_matching_black_box": "ball moment matching, v_hat_E",
    "mle_plugin": "MLE plug-in",
    "zjj_pessimistic_mle": "pessimistic MLE, ellipsoid (Zhu-Jordan-Jiao)",
}


@dataclass(frozen=True)
class Config:
    """Hyperparameters of the method comparison (`quick()` shrinks grid, families and seeds)."""

    families: tuple = ("random", "token_tree")
    instances: dict = field(default_factory=lambda: {
        "random": {"seed": 7, "S": 3, "A": 3, "H": 2, "d": 3},
        "token_tree": {"seed": 11, "V": 4, "H": 2, "d": 3},
    })
    B: float = 1.0
    L: float = 1.0
    theta_norm: float = 0.9
    teacher_temperature: float = 1.0
    delta: float = 0.05
    lam: float = 1.0
    extra_q_features: int = 2
    N_min: int = 250
    N_max: int = 64_000
    n_grid: int = 5
    seed_base: int = 40_000
    n_boot: int = 2000
    tol: float = 1e-7

    def quick(self) -> "Config":
        return Config(**{**asdict(self), "families": ("random",), "N_min": 500, "N_max": 8000, "n_grid": 3,
                         "n_boot": 500})

    @property
    def L_x(self) -> float:
        return 2.0 * self.L


def q_features(cfg: Config, family: str, inst) -> dict[str, np.ndarray]:
    """The two Q-function classes of MM PbKD: the teacher's successor features, and those plus random ones.

    The random features are fixed per instance (seeded by the instance seed) and scaled like the
    per-step features (largest norm L / H).
    """
    from pbkd_ref.mm_pbkd import successor_features

    successor = successor_features(inst.mdp, inst.pi_E)
    H, S, A, _ = successor.shape
    rng = np.random.default_rng([cfg.instances[family]["seed"], 99])
    extra = rng.uniform(-1.0, 1.0, size=(H, S, A, cfg.extra_q_features))
    extra *= (cfg.L / H) / np.max(np.linalg.norm(extra, axis=-1))
    return {"mm_pbkd_successor": successor, "mm_pbkd_rich": np.concatenate([successor, extra], axis=-1)}


def _prefix_pairs(pairs, N: int):
    from pbkd_ref.preferences import TrajectoryPairs

    return TrajectoryPairs(states0=pairs.states0[:N], actions0=pairs.actions0[:N], states1=pairs.states1[:N],
                           actions1=pairs.actions1[:N], y=pairs.y[:N])


def seed_job(job: tuple) -> dict:
    """Every method on the first N pairs of one stream, for each N of the grid (a worker-process job)."""
    from pbkd_ref.confidence import EllipsoidSet
    from pbkd_ref.mdp import feature_expectation
    from pbkd_ref.mm_pbkd import mm_pbkd
    from pbkd_ref.preferences import sample_trajectory_pairs
    from pbkd_ref.offline import ball_moment_matching, behaviour_cloning, mle_plugin, offline_pbkd
    from pbkd_ref.solvers import solve
    from theory.concentrability import sample_coefficient

    cfg, family, seed = job
    start = time.process_time()
    inst = config_instance(cfg, family)
    mdp = inst.mdp
    grid = geometric_grid(cfg.N_min, cfg.N_max, cfg.n_grid)
    psis = q_features(cfg, family, inst)
    stream = sample_trajectory_pairs(mdp, inst.pi_E, inst.pi_ref, inst.theta_star, int(grid[-1]),
                                     np.random.default_rng([seed, 6]))
    J = {name: np.zeros(len(grid)) for name in METHODS}
    value_pbkd = np.zeros(len(grid))
    value_mm = np.zeros(len(grid))
    value_zjj = np.zeros(len(grid))
    covered = np.zeros(len(grid), dtype=bool)
    bound_design = np.zeros(len(grid))
    max_gap, n_solves = 0.0, 0
    ball = ball_moment_matching(mdp, inst.v_E, cfg.B, tol=cfg.tol)
    max_gap, n_solves = max(max_gap, ball.certificate_gap), n_solves + 1
    u = inst.v_star - inst.v_E
    for j, N in enumerate(grid):
        pairs = _prefix_pairs(stream, int(N))
        sample = pairs.pair_sample(mdp)
        white = offline_pbkd(mdp, sample, B=cfg.B, delta=cfg.delta, v_E=inst.v_E, tol=cfg.tol)
        black = offline_pbkd(mdp, sample, B=cfg.B, delta=cfg.delta, v_E=None, tol=cfg.tol)
        mm = {name: mm_pbkd(mdp, inst.pi_E, psi, pairs, B_f=cfg.B, delta=cfg.delta, tol=cfg.tol)
              for name, psi in psis.items()}
        ball_black = ball_moment_matching(mdp, black.v_E, cfg.B, tol=cfg.tol)
        zjj = solve(mdp, inst.v_E, EllipsoidSet.from_likelihood(white.cset, cfg.lam), tol=cfg.tol)
        for solved in (white.minmax, black.minmax, ball_black, zjj, *(m.minmax for m in mm.values())):
            max_gap, n_solves = max(max_gap, solved.certificate_gap), n_solves + 1
        policies = {
            "pbkd_white_box": white.policy,
            "pbkd_black_box": black.policy,
            "mm_pbkd_successor": mm["mm_pbkd_successor"].policy,
            "mm_pbkd_rich": mm["mm_pbkd_rich"].policy,
            "behaviour_cloning": behaviour_cloning(mdp, pairs.states0, pairs.actions0),
            "ball_moment_matching": ball.policy,
            "ball_moment_matching_black_box": ball_black.policy,
            "mle_plugin": mle_plugin(mdp, white.theta_hat),
            "zjj_pessimistic_mle": zjj.policy,
        }
        for name, policy in policies.items():
            J[name][j] = inst.J(feature_expectation(mdp, policy))
        value_pbkd[j] = white.minmax.value
        value_mm[j] = mm["mm_pbkd_successor"].minmax.value
        value_zjj[j] = zjj.value
        covered[j] = white.cset.contains(inst.theta_star)
        C_N = sample_coefficient(u, white.cset.prefs, lam=cfg.lam)
        bound_design[j] = bounds.offline_bound(N, d=mdp.d, B=cfg.B, L_x=cfg.L_x, delta=cfg.delta,
                                               concentrability=C_N, lam=cfg.lam)
    return {"J": J, "value_pbkd": value_pbkd, "value_mm": value_mm, "value_zjj": value_zjj, "covered": covered,
            "bound_design": bound_design, "max_gap": max_gap, "n_solves": n_solves,
            "cpu_s": time.process_time() - start}


def analyse_family(cfg: Config, family: str, rows: list[dict], rng: np.random.Generator) -> tuple[dict, dict]:
    inst = config_instance(cfg, family)
    J_star, J_E = inst.J(inst.v_star), inst.J(inst.v_E)
    results = {"methods": {}}
    for name in METHODS:
        Jm = np.array([row["J"][name] for row in rows])
        subopt = J_star - Jm
        gap = J_E - Jm
        s_mean, s_lo, s_hi = bootstrap_band(subopt, rng=rng, n_boot=cfg.n_boot)
        g_mean, g_lo, g_hi = bootstrap_band(gap, rng=rng, n_boot=cfg.n_boot)
        results["methods"][name] = {
            "label": LABELS[name],
            "subopt": {"per_seed": subopt, "mean": s_mean, "band_lo": s_lo, "band_hi": s_hi,
                       "fraction_zero": (np.abs(subopt) <= 1e-12).mean(axis=0)},
            "teacher_gap": {"per_seed": gap, "mean": g_mean, "band_lo": g_lo, "band_hi": g_hi},
        }
    white_subopt = results["methods"]["pbkd_white_box"]["subopt"]["per_seed"]
    white_gap = results["methods"]["pbkd_white_box"]["teacher_gap"]["per_seed"]
    covered = np.array([row["covered"] for row in rows])
    bound_design = np.array([row["bound_design"] for row in rows])
    values_pbkd = np.array([row["value_pbkd"] for row in rows])
    values_mm = np.array([row["value_mm"] for row in rows])
    pessimism = (white_gap <= cfg.tol) | ~covered
    value_diff = np.abs(values_pbkd - values_mm)
    values_zjj = np.array([row["value_zjj"] for row in rows])
    zjj_gap = results["methods"]["zjj_pessimistic_mle"]["teacher_gap"]["per_seed"]
    checks = {
        "pbkd_subopt_below_bound": below_bound_check(
            white_subopt, bound_design, delta=cfg.delta, what="white-box PbKD SubOpt <= Theorem 1.1 bound (seed's C_N)"),
        "pessimism_beats_teacher": {
            "passed": bool(pessimism.all()),
            "what": "on theta* in C: J(pi_hat) >= J(pi_E) - tol for white-box PbKD (property 9)",
            "fraction": float(pessimism.mean()), "max_teacher_gap": float(white_gap.max()), "tol": cfg.tol},
        "mm_pbkd_successor_equals_pbkd": {
            "passed": bool(value_diff.max() <= 10 * cfg.tol),
            "what": "MM PbKD with psi = teacher successor features has phi_Q = phi: same min-max value as "
                    "white-box PbKD (within 10 tol)",
            "max_value_difference": float(value_diff.max())},
        "zjj_value_at_least_pbkd": {
            "passed": bool(np.all(values_zjj >= values_pbkd - 2 * cfg.tol)),
            "what": "the ellipsoid contains C(D), so its min-max value is >= white-box PbKD's (within 2 tol)",
            "min_difference": float((values_zjj - values_pbkd).min())},
        "zjj_pessimism_beats_teacher": {
            "passed": bool(((zjj_gap <= cfg.tol) | ~covered).all()),
            "what": "on theta* in C (so in the ellipsoid): J(pi_ZJJ) >= J(pi_E) - tol",
            "max_teacher_gap": float(zjj_gap.max())},
        "solver_certified": {
            "passed": bool(max(row["max_gap"] for row in rows) <= cfg.tol),
            "what": "every min-max solve certified (gap <= tol)",
            "max_certificate_gap": float(max(row["max_gap"] for row in rows)), "tol": cfg.tol},
    }
    results["coverage"] = covered.mean(axis=0)
    results["bound_design_mean"] = bound_design.mean(axis=0)
    results["J_star"], results["J_teacher"] = J_star, J_E
    results["cpu_s"] = float(sum(row["cpu_s"] for row in rows))
    results["n_solves"] = int(sum(row["n_solves"] for row in rows))
    return results, checks


STYLE = {
    "pbkd_white_box": ("C0", "o", "-"),
    "pbkd_black_box": ("C1", "s", "-"),
    "mm_pbkd_successor": ("C2", "^", ":"),
    "mm_pbkd_rich": ("C4", "v", "-"),
    "behaviour_cloning": ("C5", "D", "--"),
    "ball_moment_matching": ("C7", "x", "--"),
    "ball_moment_matching_black_box": ("C8", "+", "--"),
    "mle_plugin": ("C3", "*", "-."),
    "zjj_pessimistic_mle": ("C9", "P", "-"),
}


def plot(record: dict, path) -> None:
    from matplotlib.ticker import NullFormatter

    plt = plt_module()
    families = list(record["results"])
    fig, axes = plt.subplots(len(families), 2, figsize=(13, 4.8 * len(families)), squeeze=False)
    for row, family in enumerate(families):
        res = record["results"][family]
        grid = np.asarray(record["grid"][family], dtype=float)
        for col, key in enumerate(("subopt", "teacher_gap")):
            ax = axes[row, col]
            for name, method in res["methods"].items():
                color, marker, ls = STYLE[name]
                r = method[key]
                mean = np.asarray(r["mean"])
                ax.plot(grid, mean, marker=marker, ls=ls, color=color, ms=5, label=method["label"])
                ax.fill_between(grid, r["band_lo"], r["band_hi"], color=color, alpha=0.15, linewidth=0)
            ax.set_xscale("log")
            if key == "subopt":
                ax.set_yscale("symlog", linthresh=1e-3)
                ax.set_ylim(bottom=0.0)  # SubOpt >= 0
                ax.set_ylabel("SubOpt = J(pi*) - J(pi) [return units]")
                ax.set_title(f"{family}: suboptimality (symlog; 0 = optimal)")
                ax.axhline(res["J_star"] - res["J_teacher"], color="k", lw=0.8, ls="--", label="teacher's SubOpt")
            else:
                ax.set_ylabel("teacher gap J(pi_E) - J(pi) [return units]")
                ax.set_title(f"{family}: teacher gap (< 0: the student beats the teacher)")
                ax.axhline(0.0, color="k", lw=0.8, ls="--")
            ax.set_xlabel("N (preference pairs; teacher trajectories for BC)")
            ax.xaxis.set_minor_formatter(NullFormatter())
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, framealpha=0.9)
    fig.suptitle(f"Methods on shared instances and data: {record['n_seeds']} seeds, seed means with bootstrap "
                 f"95% bands, delta = {record['delta']}, B = {record['B']}, L_x = {record['L_x']}", fontsize=11)
    save_figure(fig, path, rect=(0.0, 0.09 / len(families), 1.0, 0.97))


def run(config: RunConfig, cfg: Config | None = None) -> dict:
    cfg = cfg or Config()
    if config.quick:
        cfg = cfg.quick()
    watch = Stopwatch()
    seeds = seed_list(cfg.seed_base, config.n_seeds)
    rng = np.random.default_rng(cfg.seed_base)
    jobs = [(cfg, family, seed) for family in cfg.families for seed in seeds]
    with progress_bar(len(jobs), desc=NAME, enabled=config.progress) as bar:
        rows = run_jobs(seed_job, jobs, workers=config.workers, bar=bar)
    results, checks, instances, grids = {}, {}, {}, {}
    max_gap = 0.0
    for family in cfg.families:
        fam_rows = [row for job, row in zip(jobs, rows) if job[1] == family]
        results[family], fam_checks = analyse_family(cfg, family, fam_rows, rng)
        checks.update({f"{family}/{k}": v for k, v in fam_checks.items()})
        max_gap = max(max_gap, fam_checks["solver_certified"]["max_certificate_gap"])
        inst = config_instance(cfg, family)
        instances[family] = {**inst.to_json(), "q_features": {
            "mm_pbkd_successor": f"successor_features(mdp, pi_E) (k = {inst.mdp.d})",
            "mm_pbkd_rich": f"successor features + {cfg.extra_q_features} random features (k = "
                            f"{inst.mdp.d + cfg.extra_q_features}), B_f = B"}}
        grids[family] = geometric_grid(cfg.N_min, cfg.N_max, cfg.n_grid)
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
        "radius": {"kind": "bracketing", "formula": BRACKETING_FORMULA,
                   "L_x_in_radius": "observed max ||x_n|| (of phi or phi_Q differences)"},
        "solver": {"min_max": "pbkd_ref.solvers.solve(method='cutting_plane')", "tol": cfg.tol,
                   "mle": "pbkd_ref.mle.fit_mle"},
        "max_certificate_gap": max_gap,
        "config": asdict(cfg),
        "instances": instances,
        "grid": grids,
        "results": results,
        "checks": checks,
        "all_checks_passed": collect_checks(checks),
        "runtime_s": watch.elapsed(),
        "cpu_s": float(sum(results[f]["cpu_s"] for f in cfg.families)),
        "notes": [
            "All methods see the same pairs: the first N of one stream per seed (nested in N).",
            "ball_moment_matching uses no data: it is constant in N.",
            "The teacher is the softmax policy at temperature teacher_temperature (suboptimal).",
        ],
    }
    save_record(record, config.out_dir, NAME, plot)
    return record


def main(argv=None) -> dict:
    return experiment_main(NAME, __doc__, run, argv, full_seeds=FULL_SEEDS, quick_seeds=QUICK_SEEDS)


if __name__ == "__main__":
    main()

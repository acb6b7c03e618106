"""Coverage of the KL projection when the Bradley-Terry model is misspecified, against N.

    python -m theory.misspecification [--quick] [--out-dir figures] [--seeds K]

writes `figures/misspecification.png` and its JSON twin `figures/misspecification.json`.

Lemma 1 assumes (A1) and (A3): the labels are Bradley-Terry draws under a `theta*` of the
`B`-ball. Under misspecification the MLE converges instead to the KL projection
`theta_KL = argmin_{||theta|| <= B} E[-log P_theta(o | x)]` of the true label law, so the
question becomes whether `C(D)` covers `theta_KL`. Here `pi_E` is the teacher and `pi_ref` the
uniform reference, as in `coverage`, and the variants are:

- `well_specified`: the control, with BT labels under `theta*`, so `theta_KL = theta*`;
- `outside_span`: the true reward is `theta*^T phi(tau) + c psi(tau)`. Here
  `psi(tau) = sum_h g[h, s_h, a_h]` is a fixed random per-step feature that `phi` does not span.
- `probit`: `P(o = 1 | x) = Phi(theta*^T x)` instead of `sigma(theta*^T x)`;
- `label_flips`: each BT label is flipped with probability `flip`;
- `norm_above_B`: BT labels under `theta*` rescaled to norm `norm_factor B > B`, which violates (A1).

`theta_KL` is computed exactly. Every trajectory of `pi_E` and of `pi_ref` is enumerated, and each
pair gets its probability and its true `P(o = 1 | x)`. The population NLL is then minimised over
the ball by `fit_mle`, with fractional label counts. Per variant, seed and N the experiment
records whether `theta_KL`, and `theta*`, lie in `C(D)` for the bracketing and chi2 radii. There
is no guarantee to check under misspecification: the coverages are reported with
Clopper-Pearson intervals. Checks:
- every KL projection is certified (optimality gap);
- the control's projection is `theta*`;
- the control's bracketing coverage is at least `1 - delta` at every N (Lemma 1).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.stats import norm

from theory.common import (
    BRACKETING_FORMULA,
    CHI2_FORMULA,
    RunConfig,
    Stopwatch,
    clopper_pearson,
    collect_checks,
    command_line,
    config_instance,
    experiment_main,
    geometric_grid,
    plt_module,
    progress_bar,
    run_jobs,
    save_figure,
    save_record,
    seed_list,
    tidy_log_axes,
)

NAME = "misspecification"
FULL_SEEDS = 200
QUICK_SEEDS = 20
VARIANTS = ("well_specified", "outside_span", "probit", "label_flips", "norm_above_B")
KINDS = ("bracketing", "chi2")


@dataclass(frozen=True)
class Config:
    """Hyperparameters of the misspecification experiment (`quick()` shrinks grid and seeds)."""

    families: tuple = ("random",)
    instances: dict = field(default_factory=lambda: {"random": {"seed": 7, "S": 3, "A": 3, "H": 2, "d": 3}})
    B: float = 1.0
    L: float = 1.0
    theta_norm: float = 0.9
    teacher_temperature: float = 1.0
    delta: float = 0.05
    outside_span_scale: float = 1.0  # c: the reward component outside the span of phi
    flip: float = 0.1  # label_flips: the probability that a label is flipped
    norm_factor: float = 1.5  # norm_above_B: ||theta*|| = norm_factor B
    N_min: int = 100
    N_max: int = 25_600
    n_grid: int = 5
    seed_base: int = 50_000
    mle_tol: float = 1e-10

    def quick(self) -> "Config":
        return Config(**{**asdict(self), "N_max": 1600, "n_grid": 3})

    @property
    def L_x(self) -> float:
        return 2.0 * self.L


def trajectory_law(mdp, pi) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every trajectory of positive probability under `pi`: `(probabilities (K,), states (K, H), actions (K, H))`."""
    prob = mdp.rho.copy()
    states = np.arange(mdp.S)[:, None]
    actions = np.zeros((mdp.S, 0), dtype=np.int64)
    keep = prob > 0
    prob, states = prob[keep], states[keep]
    for h in range(mdp.H):
        step = pi[h][states[:, -1]]  # (K, A)
        k, a = np.nonzero(step > 0)
        prob, states, actions = prob[k] * step[k, a], states[k], np.column_stack([actions[k], a])
        if h < mdp.H - 1:
            nxt = mdp.P[h][states[:, -1], actions[:, -1]]  # (K, S)
            k, s = np.nonzero(nxt > 0)
            prob, states, actions = prob[k] * nxt[k, s], np.column_stack([states[k], s]), actions[k]
    return prob, states.astype(np.int64), actions.astype(np.int64)


def extra_feature(cfg: Config, family: str, mdp) -> np.ndarray:
    """`g[h, s, a]` of `outside_span`: fixed per instance, scaled so that `|psi(tau)| <= L`."""
    rng = np.random.default_rng([cfg.instances[family]["seed"], 77])
    return rng.uniform(-1.0, 1.0, size=(mdp.H, mdp.S, mdp.A)) * cfg.L / mdp.H


def labels_theta(cfg: Config, variant: str, inst) -> np.ndarray:
    """The `theta*` the labels are drawn under: rescaled to norm `norm_factor B` for `norm_above_B`."""
    theta = np.asarray(inst.theta_star)
    return theta * cfg.norm_factor * cfg.B / np.linalg.norm(theta) if variant == "norm_above_B" else theta


def true_reward(cfg: Config, variant: str, inst, g: np.ndarray, states, actions) -> np.ndarray:
    """The labels' reward `r(tau)` of a variant (the link is applied to `r(tau1) - r(tau0)`)."""
    from pbkd_ref.mdp import trajectory_features

    r = trajectory_features(inst.mdp, states, actions) @ labels_theta(cfg, variant, inst)
    if variant == "outside_span":
        r = r + cfg.outside_span_scale * g[np.arange(inst.mdp.H)[None, :], states, actions].sum(axis=1)
    return r


def label_law(cfg: Config, variant: str, reward_difference: np.ndarray) -> np.ndarray:
    """`P(o = 1 | tau0, tau1)` as a function of `r(tau1) - r(tau0)`."""
    if variant == "probit":
        return norm.cdf(reward_difference)
    p = 1.0 / (1.0 + np.exp(-reward_difference))
    return (1 - cfg.flip) * p + cfg.flip * (1 - p) if variant == "label_flips" else p


def kl_projection(cfg: Config, variant: str, inst, g: np.ndarray):
    """`theta_KL` and its certified optimality gap, from the exact law of the pairs."""
    from pbkd_ref.mdp import trajectory_features
    from pbkd_ref.mle import fit_mle
    from pbkd_ref.preferences import Preferences

    mdp = inst.mdp
    p0, s0, a0 = trajectory_law(mdp, inst.pi_E)
    p1, s1, a1 = trajectory_law(mdp, inst.pi_ref)
    phi0, phi1 = trajectory_features(mdp, s0, a0), trajectory_features(mdp, s1, a1)
    r0, r1 = true_reward(cfg, variant, inst, g, s0, a0), true_reward(cfg, variant, inst, g, s1, a1)
    X = (phi1[None, :, :] - phi0[:, None, :]).reshape(-1, mdp.d)
    w = (p0[:, None] * p1[None, :]).ravel()
    p = label_law(cfg, variant, (r1[None, :] - r0[:, None]).ravel())
    fit = fit_mle(Preferences(X=X, n1=w * p, n0=w * (1 - p)), cfg.B, tol=cfg.mle_tol)
    if not fit.converged:
        raise RuntimeError(f"{variant}: the KL projection's fit did not converge")
    return fit.theta_hat, float(fit.optimality_gap), float(w.sum())


def seed_job(job: tuple) -> dict:
    """One seed of one variant over the grid: whether theta_KL and theta* lie in C(D), per radius."""
    from pbkd_ref.confidence import LikelihoodSet, radius
    from pbkd_ref.mdp import sample_trajectories, trajectory_features
    from pbkd_ref.mle import fit_mle
    from pbkd_ref.preferences import aggregate

    cfg, family, variant, seed, theta_kl = job
    start = time.process_time()
    inst = config_instance(cfg, family)
    mdp, grid = inst.mdp, geometric_grid(cfg.N_min, cfg.N_max, cfg.n_grid)
    g = extra_feature(cfg, family, mdp)
    rng = np.random.default_rng([seed, 8])
    n = int(grid[-1])
    s0, a0 = sample_trajectories(mdp, inst.pi_E, n, rng)
    s1, a1 = sample_trajectories(mdp, inst.pi_ref, n, rng)
    X = trajectory_features(mdp, s1, a1) - trajectory_features(mdp, s0, a0)
    p = label_law(cfg, variant, true_reward(cfg, variant, inst, g, s1, a1) - true_reward(cfg, variant, inst, g, s0, a0))
    y = (rng.random(n) < p).astype(int)
    covered = {(target, kind): np.zeros(len(grid), dtype=bool) for target in ("kl", "star") for kind in KINDS}
    star = labels_theta(cfg, variant, inst)
    star_in_ball = bool(np.linalg.norm(star) <= cfg.B * (1 + 1e-12))
    mle_gap = 0.0
    for j, N in enumerate(grid):
        prefs = aggregate(X[:N], y[:N])
        fit = fit_mle(prefs, cfg.B, tol=cfg.mle_tol)
        if not fit.converged:
            raise RuntimeError(f"{variant}, seed {seed}, N = {N}: fit_mle did not converge")
        mle_gap = max(mle_gap, float(fit.optimality_gap))
        for kind in KINDS:
            zeta = radius(kind, N=prefs.N, d=mdp.d, B=cfg.B, L_x=prefs.L_x, delta=cfg.delta)
            cset = LikelihoodSet(prefs, cfg.B, zeta, theta_hat=fit.theta_hat)
            covered[("kl", kind)][j] = cset.contains(theta_kl)
            covered[("star", kind)][j] = star_in_ball and cset.contains(star)
    return {"covered": covered, "mle_gap": mle_gap, "cpu_s": time.process_time() - start}


def plot(record: dict, path) -> None:
    plt = plt_module()
    panels = [("coverage_of_theta_kl", kind, "theta_KL") for kind in KINDS] + [("coverage_of_theta_star", "bracketing",
                                                                                 "theta*")]
    fig, axes = plt.subplots(1, len(panels), figsize=(19, 4.8), squeeze=False)
    delta = record["delta"]
    for col, (key, kind, target) in enumerate(panels):
        ax = axes[0, col]
        for i, (variant, res) in enumerate(record["results"].items()):
            grid = np.asarray(res["grid"], dtype=float)
            r = res[key][kind]
            freq, ci = np.asarray(r["frequency"]), np.asarray(r["clopper_pearson_95"])
            shift = grid * (1.0 + 0.05 * (i - 2))
            ax.errorbar(shift, freq, yerr=[freq - ci[:, 0], ci[:, 1] - freq], fmt="o-", ms=4, capsize=3,
                        label=f"{variant} (||theta_KL - theta*|| = {res['kl_distance_to_theta_star']:.2f})")
        ax.axhline(1 - delta, color="k", ls="--", lw=1, label=f"1 - delta = {1 - delta:g}")
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("N (preference pairs)")
        ax.set_ylabel(f"fraction of seeds with {target} in C(D)")
        ax.set_title(f"{kind} radius: coverage of {target} ({record['n_seeds']} seeds)")
        tidy_log_axes(ax, legend_loc="lower left")
    fig.suptitle(f"Misspecified preferences on the random MDP: delta = {delta}, B = {record['B']}", fontsize=11)
    save_figure(fig, path)


def run(config: RunConfig, cfg: Config | None = None) -> dict:
    cfg = cfg or Config()
    if config.quick:
        cfg = cfg.quick()
    watch = Stopwatch()
    seeds = seed_list(cfg.seed_base, config.n_seeds)
    family = cfg.families[0]
    inst = config_instance(cfg, family)
    g = extra_feature(cfg, family, inst.mdp)
    grid = geometric_grid(cfg.N_min, cfg.N_max, cfg.n_grid)
    projections = {variant: kl_projection(cfg, variant, inst, g) for variant in VARIANTS}
    jobs = [(cfg, family, variant, seed, projections[variant][0]) for variant in VARIANTS for seed in seeds]
    with progress_bar(len(jobs), desc=NAME, enabled=config.progress) as bar:
        rows = run_jobs(seed_job, jobs, workers=config.workers, bar=bar)
    results, mle_gap, cpu = {}, 0.0, 0.0
    for variant in VARIANTS:
        mine = [row for job, row in zip(jobs, rows) if job[2] == variant]
        theta_kl, gap, _ = projections[variant]
        entry = {"grid": grid, "theta_kl": theta_kl, "kl_optimality_gap": gap,
                 "kl_distance_to_theta_star": float(np.linalg.norm(theta_kl - np.asarray(inst.theta_star))),
                 "kl_norm": float(np.linalg.norm(theta_kl))}
        for target, name in (("kl", "coverage_of_theta_kl"), ("star", "coverage_of_theta_star")):
            entry[name] = {}
            for kind in KINDS:
                hits = np.array([row["covered"][(target, kind)] for row in mine])
                counts = hits.sum(axis=0)
                entry[name][kind] = {"count": counts, "n": len(mine), "frequency": counts / len(mine),
                                     "clopper_pearson_95": [clopper_pearson(int(c), len(mine)) for c in counts]}
        results[variant] = entry
        mle_gap = max(mle_gap, *(row["mle_gap"] for row in mine))
        cpu += float(sum(row["cpu_s"] for row in mine))
    control = results["well_specified"]
    checks = {
        "kl_projections_certified": {
            "passed": bool(max(p[1] for p in projections.values()) <= 1e-8),
            "what": "every KL projection is the certified minimiser of the exact population NLL over the ball "
                    "(optimality gap <= 1e-8, per unit of pair mass)",
            "max_gap": max(p[1] for p in projections.values()),
            "pair_mass": [p[2] for p in projections.values()]},
        "well_specified_projection_is_theta_star": {
            "passed": bool(control["kl_distance_to_theta_star"] <= 1e-5),
            "what": "with BT labels under theta* (||theta*|| < B), theta_KL = theta* (the exact pair law is right)",
            "distance": control["kl_distance_to_theta_star"]},
        "well_specified_bracketing_coverage": {
            "passed": bool(np.all(control["coverage_of_theta_kl"]["bracketing"]["frequency"] >= 1 - cfg.delta)),
            "what": "the control's bracketing radius covers theta* = theta_KL in >= 1 - delta of seeds at every N "
                    "(Lemma 1)", "frequency": control["coverage_of_theta_kl"]["bracketing"]["frequency"]},
        "mle_certified": {"passed": bool(mle_gap <= 1e-4), "what": "certified optimality gap of every MLE <= 1e-4",
                          "max_gap": mle_gap},
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
        "lam": None,
        "radius": {"bracketing": BRACKETING_FORMULA, "chi2": CHI2_FORMULA,
                   "L_x_in_radius": "observed max ||x_n|| of the data"},
        "solver": {"mle": "pbkd_ref.mle.fit_mle (ball-constrained Newton)", "tol": cfg.mle_tol,
                   "kl_projection": "fit_mle on the exact pair law (fractional label counts)"},
        "max_certificate_gap": mle_gap,
        "config": asdict(cfg),
        "instances": {family: inst.to_json()},
        "grid": {family: grid},
        "results": results,
        "checks": checks,
        "all_checks_passed": collect_checks(checks),
        "runtime_s": watch.elapsed(),
        "cpu_s": cpu,
        "notes": [
            "No coverage guarantee holds under misspecification; the variants' coverages are measurements.",
            "norm_above_B: theta* lies outside the ball, so theta* itself is never in C(D); theta_KL lies on the "
            "sphere of radius B.",
            "Data at N are the first N pairs of one stream per seed and variant (nested in N).",
        ],
    }
    save_record(record, config.out_dir, NAME, plot)
    return record


def main(argv=None) -> dict:
    return experiment_main(NAME, __doc__, run, argv, full_seeds=FULL_SEEDS, quick_seeds=QUICK_SEEDS)


if __name__ == "__main__":
    main()

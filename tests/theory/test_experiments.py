"""The theory experiments in quick mode: their checks (issue 3, item 6) and their JSON twins.

Each experiment of `theory/` runs once per test session in `--quick` mode into a temporary
directory (spec tabular.md section 5). The tests then

- assert every check recorded in the JSON (measured <= bound in >= 1 - delta of seeds at every
  grid point, fitted slope CI upper end <= bound slope + 0.05, bracketing coverage >= 1 - delta,
  regret below its bound and regret / rate not growing, certified solvers);
- recompute the headline checks from the per-seed numbers in the JSON, independently of the code
  that wrote them;
- check the JSON schema: the protocol record (seeds, delta, B, L_x, radius formula, solver,
  tolerances, largest certificate gap) and, per experiment, grids, per-seed values, means and bands.

Also the protocol helpers of `theory/common.py` on hand-made data.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import beta, chi2

from theory import bound_vs_n, common, coverage, lower_bound, methods, misspecification, regret

MODULES = {"bound_vs_n": bound_vs_n, "coverage": coverage, "regret": regret, "methods": methods,
           "misspecification": misspecification, "lower_bound": lower_bound}


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("figures")
    records = {}
    for name, module in MODULES.items():
        config = common.RunConfig(quick=True, out_dir=out_dir, n_seeds=module.QUICK_SEEDS, progress=False,
                                  workers=common.default_workers())
        module.run(config)
        records[name] = json.loads((out_dir / f"{name}.json").read_text())
    return out_dir, records


@pytest.mark.parametrize("name", list(MODULES))
def test_quick_run_checks_pass(quick_runs, name):
    _, records = quick_runs
    record = records[name]
    assert record["checks"], f"{name} recorded no checks"
    failed = {key: check for key, check in record["checks"].items() if check.get("passed") is not True}
    assert not failed, f"{name}: checks not passed: {json.dumps(failed, indent=1)[:3000]}"
    assert record["all_checks_passed"] is True


@pytest.mark.parametrize("name", list(MODULES))
def test_json_protocol_record(quick_runs, name):
    out_dir, records = quick_runs
    record = records[name]
    for key in common.REQUIRED_KEYS:
        assert key in record, f"{name}.json lacks {key}"
    assert record["experiment"] == name and record["mode"] == "quick"
    assert record["n_seeds"] == len(record["seeds"]) == len(set(record["seeds"])) == MODULES[name].QUICK_SEEDS
    assert 0 < record["delta"] < 1 and record["B"] > 0 and record["L_x"] > 0
    assert "formula" in json.dumps(record["radius"]) or "zeta" in json.dumps(record["radius"])
    assert "tol" in record["solver"]
    assert 0 <= record["max_certificate_gap"] <= 1e-4
    assert record["runtime_s"] > 0
    png = (out_dir / f"{name}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def clopper_pearson_ok(k: int, n: int, p: float, level: float) -> bool:
    """p lies in the exact two-sided binomial interval of k / n at `level`, from scipy's beta quantiles."""
    alpha = 1 - level
    lo = beta.ppf(alpha / 2, k, n - k + 1) if k > 0 else 0.0
    hi = beta.ppf(1 - alpha / 2, k + 1, n - k) if k < n else 1.0
    return bool(lo <= p <= hi)


def _mean_band(entry, K, P):
    per_seed = np.asarray(entry["per_seed"], dtype=float)
    assert per_seed.shape == (K, P)
    mean = np.asarray(entry["mean"])
    np.testing.assert_allclose(mean, per_seed.mean(axis=0), rtol=1e-12, atol=1e-15)
    assert np.all(np.asarray(entry["band_lo"]) <= mean + 1e-12) and np.all(mean <= np.asarray(entry["band_hi"]) + 1e-12)
    return per_seed


def test_bound_vs_n_recomputed(quick_runs):
    record = quick_runs[1]["bound_vs_n"]
    K, delta = record["n_seeds"], record["delta"]
    for family, res in record["results"].items():
        grid = np.asarray(record["grid"][family], dtype=float)
        assert np.all(np.diff(np.log(grid)) > 0)
        P = grid.size
        subopt = _mean_band(res["subopt"], K, P)
        width = _mean_band(res["width"], K, P)
        bound = np.asarray(res["bound_design"]["per_seed"])
        assert np.all(subopt >= -1e-9), "SubOpt against pi* cannot be negative"
        # measured <= bound in >= 1 - delta of seeds at every N, recomputed from the per-seed numbers
        assert np.all((subopt <= bound).mean(axis=0) >= 1 - delta)
        assert np.all((width <= bound).mean(axis=0) >= 1 - delta)
        assert np.all((subopt <= width + 1e-6).mean(axis=0) >= 1 - delta)  # event bound of Theorem 1.1
        # the population bound curve is Theorem 1 with C_pop
        expected = [min(float(np.sqrt((8 * z / g + 4 * record["lam"] * record["B"] ** 2) * c / n)),
                        record["B"] * record["L_x"])
                    for z, g, c, n in zip(1 + record["instances"][family]["d"] * np.log1p(2 * record["B"] * record["L_x"] * grid)
                                          + np.log(1 / delta),
                                          [common_gamma(record)] * P, res["C_pop"], grid)]
        np.testing.assert_allclose(res["bound_population"], expected, rtol=1e-10)
        for key in ("subopt", "width") + (("teacher_gap",) if "teacher_gap" in res else ()):
            fit = res[key]["fit"]
            assert fit["slope"] is not None, f"{family}/{key}: {fit['reason']}"
            assert fit["ci"][0] <= fit["slope"] <= fit["ci"][1]
            assert fit["ci"][1] <= res[key]["bound_curve_slope_on_fit_points"] + common.SLOPE_TOLERANCE
        assert np.all(np.asarray(res["coverage"]) >= 1 - delta)
        assert res["width_cap"]["cap_valid_for_width"]  # the calculator's B L_x cap bounds w_N(u) here
        # trivial bounds from the instance record: the teacher's level and the ball's width
        inst = record["instances"][family]
        assert res["subopt"]["trivial_bound"]["value"] == pytest.approx(inst["J_star"] - inst["J_teacher"], abs=1e-12)
        assert res["width"]["trivial_bound"]["value"] == pytest.approx(2 * record["B"] * inst["v_star_minus_v_E_norm"],
                                                                     abs=1e-12)
        assert np.all(subopt <= res["subopt"]["trivial_bound"]["value"] + 1e-9)  # pessimism never below the teacher
        assert np.all(width <= res["width"]["trivial_bound"]["value"] + 1e-9)
        assert res["width"]["n_bound_below_trivial"] == int(
            (np.asarray(res["bound_population"]) < res["width"]["trivial_bound"]["value"]).sum()) >= 3
        # the two-sided checks, from the per-seed widths
        ratio = width / np.asarray(res["bound_population"])
        np.testing.assert_allclose(res["width_over_bound"]["per_seed"], ratio, rtol=1e-12)
        for name, target in (("width_over_bound_flat", 0.0), ("width_chi2_slope_minus_one_half", -0.5)):
            check = record["checks"][f"{family}/{name}"]
            assert check["passed"] is (check["ci"][0] <= target <= check["ci"][1])
        chi2_width = np.asarray(res["width_chi2"]["per_seed"])
        assert np.all(chi2_width <= width + 1e-9)  # the chi2 radius is smaller, so its set is inside


def common_gamma(record):
    s = 1.0 / (1.0 + np.exp(-record["B"] * record["L_x"]))
    return s * (1 - s)


def test_coverage_recomputed(quick_runs):
    record = quick_runs[1]["coverage"]
    delta = record["delta"]
    for family, res in record["results"].items():
        for kind, r in res["radii"].items():
            hits = np.asarray(r["covered_per_seed"], dtype=bool)
            assert hits.shape == (record["n_seeds"], len(record["grid"][family]))
            np.testing.assert_allclose(r["frequency"], hits.mean(axis=0))
            for k, (lo, hi) in zip(hits.sum(axis=0), r["clopper_pearson_95"]):
                assert lo <= k / hits.shape[0] <= hi
                if 0 < k < hits.shape[0]:
                    assert lo == pytest.approx(beta.ppf(0.025, k, hits.shape[0] - k + 1))
        assert np.all(np.asarray(res["radii"]["bracketing"]["frequency"]) >= 1 - delta)
        # the bracketing radius is the largest: it covers whenever chi2 does
        assert np.all(np.asarray(res["radii"]["bracketing"]["covered_per_seed"])
                      >= np.asarray(res["radii"]["chi2"]["covered_per_seed"]))
        # coverage against delta of the chi2 radius, from the per-seed statistic and scipy's quantiles
        excess = np.asarray(res["likelihood_ratio_statistic"]["per_seed"]) / 2
        against = res["coverage_against_delta"]
        d = record["instances"][family]["d"]
        for i, dl in enumerate(against["deltas"]):
            expected = (excess <= chi2.ppf(1 - dl, d) / 2).mean(axis=0)
            np.testing.assert_allclose(against["radii"]["chi2"]["frequency"][i], expected)
            np.testing.assert_allclose(against["excess_nll_quantile_1_minus_delta"][i],
                                       np.quantile(excess, 1 - dl, axis=0))
        wilks = record["checks"][f"{family}/chi2_wilks_calibration"]
        K = excess.shape[0]
        level = 1 - 0.05 / len(against["deltas"])
        inside = [clopper_pearson_ok(int(round(f * K)), K, 1 - dl, level)
                  for f, dl in zip(wilks["frequency"], against["deltas"])]
        assert wilks["passed"] is all(inside)


def test_regret_recomputed(quick_runs):
    record = quick_runs[1]["regret"]
    K, delta = record["n_seeds"], record["delta"]
    for student, res in record["results"].items():
        grid = np.asarray(res["grid"])
        R = _mean_band(res, K, grid.size)
        # both references are optimal (pi* for the optimistic student, the teacher pi_E = pi* for the
        # pessimistic one), so every per-round regret is >= 0 and R_T is nondecreasing
        assert np.all(R >= -1e-9) and np.all(np.diff(R, axis=1) >= -1e-9)
        assert np.all((R <= np.asarray(res["bound"])).mean(axis=0) >= 1 - delta)
        # the instance's trivial bound T (J_ref - min_pi J) holds for every seed (per-round regret is at most it)
        trivial = np.asarray(res["trivial_bound_instance"]["value"])
        assert np.all(R <= trivial + 1e-9)
        np.testing.assert_allclose(trivial / grid, trivial[0] / grid[0], rtol=1e-12)
        assert res["n_bound_below_trivial"] == int((np.asarray(res["bound"]) < trivial).sum())
        ratio = np.asarray(res["regret_over_rate"]["per_seed"])
        np.testing.assert_allclose(ratio, R / np.asarray(res["rate"]), rtol=1e-12)
        fit = res["regret_over_rate"]["fit"]
        assert fit["slope"] is not None and fit["ci"][1] <= 0.0
        if student == "optimistic":  # the greedy plug-in baseline, against pi* on the same data stream
            G = _mean_band(res["greedy_plug_in"], K, grid.size)
            assert np.all(G >= -1e-9) and np.all(np.diff(G, axis=1) >= -1e-9)
        potential = np.asarray(res["elliptical_potential"]["mean"])
        assert np.all(potential <= np.asarray(res["elliptical_potential"]["lemma_4_bound"]) + 1e-9)


def test_methods_recomputed(quick_runs):
    record = quick_runs[1]["methods"]
    K = record["n_seeds"]
    for family, res in record["results"].items():
        P = len(record["grid"][family])
        assert set(res["methods"]) == set(methods.METHODS)
        for name, method in res["methods"].items():
            subopt = _mean_band(method["subopt"], K, P)
            gap = _mean_band(method["teacher_gap"], K, P)
            assert np.all(subopt >= -1e-9), f"{name}: J above J(pi*)"
            np.testing.assert_allclose(subopt - gap, res["J_star"] - res["J_teacher"], atol=1e-12)
        # psi = successor features: phi_Q = phi, the same program, so the same min-max value (the argmin
        # policies may differ among tol-optimal solutions, hence no assertion on their returns)
        check = record["checks"][f"{family}/mm_pbkd_successor_equals_pbkd"]
        assert check["max_value_difference"] <= 10 * record["solver"]["tol"]
        ball = np.asarray(res["methods"]["ball_moment_matching"]["subopt"]["per_seed"])
        assert np.ptp(ball) <= 1e-9  # uses no data


def test_misspecification_recomputed(quick_runs):
    """The exact trajectory law behind theta_KL: its probabilities sum to 1 and its mean feature is
    feature_expectation(pi) (a dropped or double-counted branch fails here); the control's
    projection is theta*; projections under misspecification move off theta*, and the one with
    ||theta*|| > B lies on the sphere of radius B."""
    from pbkd_ref.mdp import feature_expectation, trajectory_features

    record = quick_runs[1]["misspecification"]
    cfg = misspecification.Config()
    inst = common.config_instance(cfg, "random")
    for pi in (inst.pi_E, inst.pi_ref):
        prob, states, actions = misspecification.trajectory_law(inst.mdp, pi)
        assert prob.sum() == pytest.approx(1.0, abs=1e-12) and np.all(prob > 0)
        np.testing.assert_allclose(prob @ trajectory_features(inst.mdp, states, actions),
                                   feature_expectation(inst.mdp, pi), atol=1e-12)
    res = record["results"]
    assert res["well_specified"]["kl_distance_to_theta_star"] <= 1e-5
    for variant in ("outside_span", "probit", "label_flips", "norm_above_B"):
        assert res[variant]["kl_distance_to_theta_star"] > 0.05, variant
    assert res["norm_above_B"]["kl_norm"] == pytest.approx(record["B"], abs=1e-6)
    star = res["norm_above_B"]["coverage_of_theta_star"]["bracketing"]["frequency"]
    assert max(star) == 0.0  # theta* outside the ball is never in C(D)
    for variant, entry in res.items():
        for kind in misspecification.KINDS:
            counts = np.asarray(entry["coverage_of_theta_kl"][kind]["count"])
            np.testing.assert_allclose(entry["coverage_of_theta_kl"][kind]["frequency"], counts / record["n_seeds"])


# ----------------------------------------------------------------------------- planted faults


def _quick_record(module, tmp_path) -> dict:
    """One quick run of `module` in this process (so that a monkeypatched fault reaches its jobs)."""
    module.run(common.RunConfig(quick=True, out_dir=tmp_path, n_seeds=module.QUICK_SEEDS, progress=False, workers=1))
    return json.loads((tmp_path / f"{module.NAME}.json").read_text())


def _failed(record: dict) -> set[str]:
    return {key for key, check in record["checks"].items() if check.get("passed") is False}


def test_a_bracketing_radius_ten_times_too_small_fails_the_coverage_check(tmp_path, monkeypatch):
    """zeta_N / 10 (2 to 3 here) lies below the (1 - delta) quantile of NLL(theta*) - NLL(theta_hat)
    (about chi2_3(0.95) / 2 = 3.9), so theta* leaves C(D) in far more than delta of the seeds: the
    coverage checks must fail, and they alone."""
    import pbkd_ref.confidence as confidence

    honest = confidence.radius
    def too_small(kind, **kw):
        return honest(kind, **kw) / (10 if kind == "bracketing" else 1)

    monkeypatch.setattr(confidence, "radius", too_small)
    record = _quick_record(coverage, tmp_path)
    assert _failed(record) == {"random/bracketing_coverage", "random/bracketing_coverage_every_delta"}
    assert record["checks"]["random/bracketing_coverage"]["min_frequency"] < 0.9


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_a_chi2_radius_off_by_a_factor_of_two_fails_the_two_sided_wilks_check(tmp_path, monkeypatch, factor):
    """The Wilks check is two-sided: a chi2 radius half or twice its calibrated value moves the
    coverage far from 1 - delta at some delta of the grid (about 0.49 instead of 0.8 at delta =
    0.2, or 0.98 instead of 0.5 at delta = 0.5), outside even the Bonferroni-widened intervals of
    the quick run's 40 seeds. The one-sided bracketing checks stay passed."""
    import pbkd_ref.confidence as confidence

    honest = confidence.radius

    def miscalibrated(kind, **kw):
        return honest(kind, **kw) * (factor if kind == "chi2" else 1)

    monkeypatch.setattr(confidence, "radius", miscalibrated)
    assert _failed(_quick_record(coverage, tmp_path)) == {"random/chi2_wilks_calibration"}


def test_a_solver_that_returns_the_teachers_policy_fails_the_subopt_checks(tmp_path, monkeypatch):
    """A student that copies its teacher (pi_E for estimand 1, the optimal pi* of estimand 2) has a
    SubOpt_N that does not fall with N: the SubOpt slope check must fail, and so must the event
    bound SubOpt_N <= w_N once the width has shrunk below J* - J(pi_E)."""
    import dataclasses

    import pbkd_ref.offline as offline

    inst = common.config_instance(bound_vs_n.Config().quick(), "random")
    honest = offline.offline_pbkd

    def copies_the_teacher(mdp, prefs, **kw):
        res = honest(mdp, prefs, **kw)
        return dataclasses.replace(res, policy=inst.pi_E if kw["v_E"] is not None else inst.pi_star)

    monkeypatch.setattr(offline, "offline_pbkd", copies_the_teacher)
    record = _quick_record(bound_vs_n, tmp_path)
    assert {"random/subopt_slope", "random/subopt_below_event_bound"} <= _failed(record)
    subopt = np.asarray(record["results"]["random"]["subopt"]["per_seed"])
    assert np.ptp(subopt) == pytest.approx(0.0, abs=1e-12)  # J* - J(pi_E) at every N and seed


def test_an_online_student_that_ignores_its_data_fails_the_regret_checks(tmp_path, monkeypatch):
    """Students that keep the data-free set C_0 = Ball(B, d) in every round: the optimistic one then
    plays the policy farthest from the teacher and its regret grows linearly, so R_T / rate(T) grows
    and its check must fail."""
    import pbkd_ref.online as online
    from pbkd_ref.confidence import Ball

    monkeypatch.setattr(online, "_ball_if_inactive", lambda cset: Ball(cset.B, cset.d))
    record = _quick_record(regret, tmp_path)
    assert "optimistic/regret_over_rate_not_growing" in _failed(record), record["checks"]


def test_an_optimistic_index_below_the_true_gap_fails_the_optimism_inequality(tmp_path, monkeypatch):
    """An oracle that under-reports its index by 0.5 (more than theta*^T (v* - v_E) allows on the
    rounds where theta* is in C_(t-1)) fails the optimism check, and the pessimistic one stays passed."""
    import dataclasses

    import pbkd_ref.online as online

    honest = online.optimistic_student

    def under_reports(*args, **kwargs):
        choice = honest(*args, **kwargs)
        return dataclasses.replace(choice, value=choice.value - 0.5)

    monkeypatch.setattr(online, "optimistic_student", under_reports)
    failed = _failed(_quick_record(regret, tmp_path))
    assert "optimistic/optimism_inequality" in failed and "pessimistic/pessimism_inequality" not in failed


def test_lower_bound_recomputed(quick_runs):
    """LB_N from its closed form at the recorded eps; the measured maximum is eps L (pessimism copies
    the uniform teacher while 0 is in C), within a factor 2 sqrt(e) of LB_N at the maximiser."""
    from scipy.special import expit

    record = quick_runs[1]["lower_bound"]
    res, L = record["results"], record["config"]["L"]
    grid = np.asarray(record["grid"]["bandit"], dtype=float)
    eps = np.asarray(res["eps"])
    kl = 0.5 * (2 * expit(2 * L * eps) - 1) * 2 * L * eps
    np.testing.assert_allclose(res["le_cam_bound"], 0.5 * eps * L * np.exp(-grid * kl), rtol=1e-12)
    per_seed = np.stack([np.asarray(res["subopt"][s]["per_seed"]) for s in ("plus", "minus")], axis=1)
    np.testing.assert_allclose(res["max_mean_subopt"]["mean"], per_seed.mean(axis=0).max(axis=0), rtol=1e-12)
    assert np.all(per_seed >= -1e-12) and np.all(per_seed <= 2 * eps * L + 1e-12)
    assert np.all(np.asarray(res["measured_over_lower"]) <= 2 * np.sqrt(np.e) * 1.01)


def test_a_student_that_reads_theta_star_fails_the_le_cam_check(tmp_path, monkeypatch):
    """A student that plays the optimal action of the true theta has SubOpt 0, below what any student
    can reach in expectation: the Le Cam check must fail."""
    import dataclasses

    import pbkd_ref.offline as offline
    import pbkd_ref.preferences as preferences
    from pbkd_ref.mdp import plan, rewards

    seen = {}
    honest_sample, honest_solve = preferences.sample_preferences, offline.offline_pbkd

    def sample(mdp, pi_E, pi_ref, theta_star, N, rng):
        seen["theta"] = np.asarray(theta_star)
        return honest_sample(mdp, pi_E, pi_ref, theta_star, N, rng)

    def cheats(mdp, data, **kw):
        return dataclasses.replace(honest_solve(mdp, data, **kw), policy=plan(mdp, rewards(mdp, seen["theta"]))[0])

    monkeypatch.setattr(preferences, "sample_preferences", sample)
    monkeypatch.setattr(offline, "offline_pbkd", cheats)
    assert "measured_above_lower_bound" in _failed(_quick_record(lower_bound, tmp_path))


# ----------------------------------------------------------------------------- protocol helpers


def test_geometric_grid():
    grid = common.geometric_grid(10, 1000, 5)
    np.testing.assert_array_equal(grid, [10, 32, 100, 316, 1000])
    with pytest.raises(ValueError, match="repeated"):
        common.geometric_grid(1, 3, 10)
    with pytest.raises(ValueError, match="lo < hi"):
        common.geometric_grid(10, 5, 3)


def test_fit_loglog_slope_recovers_power_law():
    rng = np.random.default_rng(0)
    x = np.geomspace(100, 10_000, 6)
    values = 3.0 * x ** -0.5 * np.exp(0.05 * rng.standard_normal((30, 6)))
    fit = common.fit_loglog_slope(x, values, rng=rng, n_boot=500)
    assert fit.slope == pytest.approx(-0.5, abs=0.02)
    assert fit.ci[0] < -0.5 < fit.ci[1] and fit.ci[1] - fit.ci[0] < 0.05
    check = common.slope_check(fit, -0.45, what="synthetic")
    assert check["passed"]
    assert not common.slope_check(fit, -0.6, what="synthetic")["passed"]


def test_fit_loglog_slope_with_zeros():
    """Exact zeros (action gaps) are left out of the fit, and said so; too few points: no slope."""
    rng = np.random.default_rng(1)
    x = np.geomspace(10, 1e5, 5)
    values = np.tile(x ** -1.0, (20, 1))
    values[:, 3:] = 0.0
    fit = common.fit_loglog_slope(x, values, rng=rng, n_boot=200)
    assert fit.used == [True, True, True, False, False] and fit.slope == pytest.approx(-1.0)
    values[:, 2:] = 0.0
    fit = common.fit_loglog_slope(x, values, rng=rng, n_boot=200)
    assert fit.slope is None and "exactly 0" in fit.reason
    assert common.slope_check(fit, -0.45, what="zeros")["passed"] is None


def test_bootstrap_band_and_below_bound():
    rng = np.random.default_rng(2)
    values = rng.normal(1.0, 0.1, size=(40, 3))
    mean, lo, hi = common.bootstrap_band(values, rng=rng, n_boot=1000)
    assert np.all(lo < mean) and np.all(mean < hi) and np.all(hi - lo < 0.1)
    bound = np.array([2.0, 2.0, 1.0])
    check = common.below_bound_check(values, bound, delta=0.05, what="synthetic")
    assert not check["passed"] and check["fraction_below"][2] < 0.95 and check["fraction_below"][0] == 1.0


@pytest.mark.parametrize("k, n", [(0, 10), (10, 10), (37, 40), (500, 1000)])
def test_clopper_pearson(k, n):
    lo, hi = common.clopper_pearson(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    if k == n:
        assert lo == pytest.approx(0.025 ** (1 / n))  # solves lo^n = alpha / 2
    if k == 0:
        assert hi == pytest.approx(1 - 0.025 ** (1 / n))
    with pytest.raises(ValueError):
        common.clopper_pearson(n + 1, n)


def test_write_json_requires_protocol_keys(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        common.write_json(tmp_path / "x.json", {"experiment": "x"})


def test_a_quick_run_leaves_figures_untouched(tmp_path):
    """`--quick` without `--out-dir` writes to the scratch runs/quick/, never over figures/ (a
    quick run once overwrote the committed full-mode figures). Run as a user would, from a
    folder holding a figures/ of its own."""
    figures = tmp_path / "figures"
    figures.mkdir()
    (figures / "coverage.json").write_text('{"mode": "full"}')
    out = subprocess.run([sys.executable, "-m", "theory.coverage", "--quick", "--no-progress"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert [p.name for p in figures.iterdir()] == ["coverage.json"]
    assert (figures / "coverage.json").read_text() == '{"mode": "full"}'
    assert json.loads((tmp_path / "runs" / "quick" / "coverage.json").read_text())["mode"] == "quick"
    assert common.parse_args("coverage", "", []).out_dir == common.FIGURES_DIR  # a full run still writes figures/
    assert common.parse_args("coverage", "", ["--quick", "--out-dir", "x"]).out_dir == Path("x")

"""Instance files and the command line (issue: instance format, bad input, ``python -m pbkd_ref``).

- save/load round trip;
- every malformation (wrong shapes, transition rows not summing to 1, negative or NaN
  entries, B <= 0, zeta < 0, labels outside {0, 1}, missing keys) raises a ValueError
  that names the field;
- the CLI prints one JSON object with the documented keys, and on a bad or missing
  instance exits with status 2, the reason on stderr and no traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pbkd_ref.instance import NPZ_KEYS, Instance, load_instance, save_instance, solve_instance
from pbkd_ref.mdp import feature_expectation, random_mdp, rewards, softmax_policy
from pbkd_ref.preferences import sample_preferences

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def small_instance(seed=0, S=3, A=2, H=3, d=2, N=30) -> Instance:
    rng = np.random.default_rng(seed)
    mdp = random_mdp(S, A, H, d, rng)
    theta_star = rng.normal(size=d)
    pi_E = softmax_policy(mdp, rewards(mdp, theta_star), 0.2)
    sample = sample_preferences(mdp, pi_E, np.full((H, S, A), 1.0 / A), theta_star, N, rng)
    return Instance(mdp=mdp, v_E=feature_expectation(mdp, pi_E), X=sample.X, y=sample.y, B=2.0, zeta=3.0)


def arrays_of(instance: Instance) -> dict:
    return dict(P=np.array(instance.mdp.P), rho=np.array(instance.mdp.rho), phi=np.array(instance.mdp.phi),
                v_E=instance.v_E.copy(), X=instance.X.copy(), y=instance.y.copy(), B=instance.B, zeta=instance.zeta)


def test_instance_round_trip(tmp_path):
    instance = small_instance()
    path = tmp_path / "instance.npz"
    save_instance(path, instance)
    assert sorted(np.load(path).files) == sorted(NPZ_KEYS)
    loaded = load_instance(path)
    for key, original in arrays_of(instance).items():
        np.testing.assert_array_equal(arrays_of(loaded)[key], original, err_msg=key)
    assert loaded.N == instance.N


def _negate_first(field):
    def change(a):
        a[field] = a[field].copy()
        a[field].flat[0] = -abs(a[field].flat[0]) - 0.1
    return change


def _set(field, value):
    def change(a):
        a[field] = value(a[field]) if callable(value) else value
    return change


def _nan_at(field):
    def change(a):
        a[field] = a[field].astype(float).copy()
        a[field].flat[0] = np.nan
    return change


MALFORMATIONS = {
    "P wrong shape": ("P", _set("P", lambda P: P[:, :, :, :-1])),
    "P rows do not sum to 1": ("P", _set("P", lambda P: 0.9 * P)),
    "P negative entry": ("P", _negate_first("P")),
    "P NaN": ("P", _nan_at("P")),
    "rho does not sum to 1": ("rho", _set("rho", lambda r: 2 * r)),
    "rho wrong shape": ("rho", _set("rho", lambda r: np.append(r, 0.0))),
    "phi NaN": ("phi", _nan_at("phi")),
    "phi wrong rank": ("phi", _set("phi", lambda f: f[0])),
    "v_E wrong shape": ("v_E", _set("v_E", lambda v: np.append(v, 1.0))),
    "v_E NaN": ("v_E", _nan_at("v_E")),
    "X wrong width": ("X", _set("X", lambda X: X[:, :-1])),
    "X NaN": ("X", _nan_at("X")),
    "y label 2": ("y", _set("y", lambda y: np.where(np.arange(len(y)) == 0, 2, y))),
    "y label -1": ("y", _set("y", lambda y: np.where(np.arange(len(y)) == 1, -1, y))),
    "y wrong length": ("y", _set("y", lambda y: y[:-1])),
    "y NaN": ("y", _nan_at("y")),
    "B zero": ("B", _set("B", 0.0)),
    "B negative": ("B", _set("B", -1.0)),
    "B NaN": ("B", _set("B", np.nan)),
    "zeta negative": ("zeta", _set("zeta", -0.5)),
    "zeta not scalar": ("zeta", _set("zeta", np.array([1.0, 2.0]))),
}


@pytest.mark.parametrize("case", sorted(MALFORMATIONS))
def test_malformed_instance_names_the_field(tmp_path, case):
    field, change = MALFORMATIONS[case]
    arrays = arrays_of(small_instance())
    change(arrays)
    path = tmp_path / "bad.npz"
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    with pytest.raises(ValueError, match=f"'{field}'"):
        load_instance(path)


def test_missing_key_and_non_npz_are_reported(tmp_path):
    arrays = arrays_of(small_instance())
    del arrays["zeta"]
    path = tmp_path / "no_zeta.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="zeta"):
        load_instance(path)
    text = tmp_path / "text.npz"
    text.write_text("not an archive")
    with pytest.raises(ValueError, match="not"):
        load_instance(text)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_instance(tmp_path / "absent.npz")


def test_instance_constructor_validates():
    instance = small_instance()
    with pytest.raises(ValueError, match="'zeta'"):
        Instance(mdp=instance.mdp, v_E=instance.v_E, X=instance.X, y=instance.y, B=1.0, zeta=-1.0)
    with pytest.raises(ValueError, match="'y'"):
        Instance(mdp=instance.mdp, v_E=instance.v_E, X=instance.X, y=instance.y + 1, B=1.0, zeta=1.0)


def test_solve_instance_is_certified():
    result, cset = solve_instance(small_instance(), tol=1e-7)
    assert result.status == "optimal"
    assert cset.zeta == 3.0


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pbkd_ref", *map(str, args)], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_cli_solve_prints_one_json_object(tmp_path):
    instance = small_instance()
    path = tmp_path / "instance.npz"
    save_instance(path, instance)
    completed = run_cli("solve", path, "--tol", "1e-7")
    assert completed.returncode == 0, completed.stderr
    output = json.loads(completed.stdout)  # the whole stdout is one JSON object
    for key in ("value", "certificate_gap", "theta", "policy", "occupancy", "status"):
        assert key in output
    H, S, A = instance.mdp.H, instance.mdp.S, instance.mdp.A
    assert np.shape(output["policy"]) == (H, S, A)
    assert np.shape(output["occupancy"]) == (H, S, A)
    assert np.shape(output["theta"]) == (instance.mdp.d,)
    assert output["status"] == "optimal"
    assert output["certificate_gap"] <= 1e-7
    expected, _ = solve_instance(instance, tol=1e-7)
    assert output["value"] == pytest.approx(expected.value, abs=2e-7)


def test_cli_refuses_bad_instances_with_status_2(tmp_path):
    arrays = arrays_of(small_instance())
    arrays["P"] = 0.5 * arrays["P"]
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    completed = run_cli("solve", bad)
    assert completed.returncode == 2
    assert "'P'" in completed.stderr and "sum to 1" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert completed.stdout == ""
    missing = run_cli("solve", tmp_path / "absent.npz")
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr and "Traceback" not in missing.stderr


def test_cli_make_instance_writes_a_loadable_instance(tmp_path):
    path = tmp_path / "random.npz"
    completed = run_cli("make-instance", path, "--S", 3, "--A", 2, "--H", 2, "--d", 2, "--N", 50, "--seed", 1)
    assert completed.returncode == 0, completed.stderr
    instance = load_instance(path)
    assert (instance.mdp.S, instance.mdp.A, instance.mdp.H, instance.mdp.d, instance.N) == (3, 2, 2, 2, 50)
    assert instance.zeta > 0


def test_bench_writes_its_json_twin(tmp_path, capsys):
    """The benchmark script end to end on a tiny family (the real run is ``make bench``)."""
    from pbkd_ref import bench

    out = tmp_path / "bench.json"
    report = bench.run(out=str(out), repeats=1, Ns=[40, 80], seed=0, tol=1e-7,
                       joint_sizes=[dict(S=3, A=2, H=2, d=2, N=30)], joint_repeats=1, size=dict(S=3, A=2, H=2, d=2))
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert [row["N"] for row in saved["scaling"]] == [40, 80]
    assert all(row["status"] == "optimal" for row in saved["scaling"])
    assert saved["ratio_largest_over_smallest"]["ratio"] == pytest.approx(
        saved["scaling"][1]["total_s"] / saved["scaling"][0]["total_s"])
    assert saved["joint_comparison"][0]["value_difference"] <= 1e-6
    assert "time(N=80) / time(N=40)" in capsys.readouterr().out

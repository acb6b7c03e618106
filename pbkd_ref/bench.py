"""Speed benchmark of the exact offline PbKD solve (issue: speed, spec tabular.md section 3 "Speed").

    python -m pbkd_ref.bench [--out figures/bench.json] [--repeats 5]

Measures, on random instances (``pbkd_ref.instance.random_instance``: one MDP and one
theta* per family, only the number of pairs N varies):

1. the full solve of the target instance S=50, A=4, H=10, d=8 with N = 100,000 pairs:
   aggregation of identical pairs, MLE, likelihood set C(D), min-max by cutting
   planes (D) and its certificate; median wall time over ``--repeats`` runs;
2. the ratio time(N = 100,000) / time(N = 1,000) (cost should follow the data only
   through cheap passes; the target is <= 3);
3. the speed-up of (D) over the plain cvxpy joint formulation (A) on the same
   instances (same C(D), same v_E), at sizes where (A) finishes in reasonable time.

Writes a JSON file with every measured number and prints a table. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

# The data passes are tall-skinny products (N x d, d = 8): memory-bound, and on a small
# shared machine a multi-threaded BLAS spends its time contending for cores. Run as a
# script, the benchmark uses one BLAS thread unless the caller sets the thread count
# (recorded in the JSON); numpy reads these variables when it is first imported.
if __name__ == "__main__":
    for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_variable, "1")

import numpy as np  # noqa: E402  (after the thread settings, which numpy reads on import)

from pbkd_ref.cli import ArgumentParser  # noqa: E402

TARGET = dict(S=50, A=4, H=10, d=8)


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _timed_full_solve(instance, method: str, tol: float) -> dict:
    """One full solve from the instance: aggregate -> MLE + C(D) -> min-max + certificate."""
    from pbkd_ref.confidence import LikelihoodSet
    from pbkd_ref.solvers import solve

    start = time.perf_counter()
    prefs = instance.preferences()
    after_aggregate = time.perf_counter()
    cset = LikelihoodSet(prefs, instance.B, instance.zeta)
    after_set = time.perf_counter()
    result = solve(instance.mdp, instance.v_E, cset, method=method, tol=tol)
    end = time.perf_counter()
    return dict(
        total_s=end - start,
        aggregate_s=after_aggregate - start,
        mle_and_set_s=after_set - after_aggregate,
        minmax_and_certificate_s=end - after_set,
        value=result.value,
        certificate_gap=result.certificate_gap,
        status=result.status,
        iterations=result.iterations,
        distinct_pairs=int(prefs.M),
        solver=result.solver,
        _cset=cset,
        _result=result,
    )


def _median_runs(instance, method: str, tol: float, repeats: int, label: str) -> dict:
    runs = []
    for repeat in range(repeats):
        run = _timed_full_solve(instance, method, tol)
        _log(f"{label} repeat {repeat + 1}/{repeats}: {run['total_s']:.3f} s "
             f"(aggregate {run['aggregate_s']:.3f}, MLE+set {run['mle_and_set_s']:.3f}, "
             f"min-max {run['minmax_and_certificate_s']:.3f}; {run['iterations']} iterations, {run['status']})")
        runs.append(run)
    summary = {key: statistics.median(run[key] for run in runs)
               for key in ("total_s", "aggregate_s", "mle_and_set_s", "minmax_and_certificate_s")}
    summary.update({key: runs[-1][key] for key in ("value", "certificate_gap", "status", "iterations", "distinct_pairs", "solver")})
    summary["all_total_s"] = [run["total_s"] for run in runs]
    summary["_cset"] = runs[-1]["_cset"]
    summary["_result"] = runs[-1]["_result"]
    return summary


def _public(summary: dict) -> dict:
    return {key: value for key, value in summary.items() if not key.startswith("_")}


def _compare_with_joint(sizes, seed: int, tol: float, repeats: int) -> list[dict]:
    """(D) against the plain cvxpy joint program (A) on identical (MDP, v_E, C(D))."""
    from pbkd_ref.instance import random_instance
    from pbkd_ref.solvers import solve

    rows = []
    for size in sizes:
        label = "S={S} A={A} H={H} d={d} N={N}".format(**size)
        _log(f"(A) vs (D): generating {label}")
        instance = random_instance(size["S"], size["A"], size["H"], size["d"], size["N"], np.random.default_rng(seed))
        cset = instance.confidence_set()
        timings = {}
        results = {}
        for method, count in (("cutting_plane", repeats), ("joint", 1)):
            times = []
            for repeat in range(count):
                start = time.perf_counter()
                results[method] = solve(instance.mdp, instance.v_E, cset, method=method, tol=tol)
                times.append(time.perf_counter() - start)
                _log(f"(A) vs (D) {label}: {method} run {repeat + 1}/{count}: {times[-1]:.3f} s, {results[method].status}")
            timings[method] = statistics.median(times)
        rows.append(dict(
            size=size,
            distinct_pairs=int(cset.prefs.M),
            cutting_plane_minmax_s=timings["cutting_plane"],
            joint_minmax_s=timings["joint"],
            speedup=timings["joint"] / timings["cutting_plane"],
            cutting_plane_value=results["cutting_plane"].value,
            joint_value=results["joint"].value,
            value_difference=abs(results["cutting_plane"].value - results["joint"].value),
            cutting_plane_status=results["cutting_plane"].status,
            joint_status=results["joint"].status,
            joint_solver=results["joint"].solver,
        ))
    return rows


def run(*, out: str, repeats: int, Ns: list[int], seed: int, tol: float, joint_sizes: list[dict], joint_repeats: int,
        size: dict = TARGET) -> dict:
    """Run the benchmark on the MDP ``size`` (default the target S=50, A=4, H=10, d=8), write ``out``."""
    from importlib.metadata import version

    from pbkd_ref.instance import random_instance

    report = dict(
        command="python -m pbkd_ref.bench",
        options=dict(repeats=repeats, N=list(Ns), seed=seed, tol=tol, joint_sizes=joint_sizes, joint_repeats=joint_repeats),
        target=dict(size, N=max(Ns)),
        instance_family="random_instance: random_mdp, ||phi(tau)|| <= 1, theta* on the sphere of radius B/2 (B = 10), "
                        "softmax teacher (temperature 0.1), reference = uniform policy, bracketing radius with delta = 0.05",
        seed=seed,
        tol=tol,
        repeats=repeats,
        environment=dict(python=platform.python_version(), cpu_count=os.cpu_count(), machine=platform.machine(),
                         blas_threads=os.environ.get("OPENBLAS_NUM_THREADS"),
                         **{package: version(package) for package in ("numpy", "scipy", "cvxpy", "highspy", "clarabel")}),
        scaling=[],
    )
    for N in Ns:
        _log(f"generating S={size['S']} A={size['A']} H={size['H']} d={size['d']} N={N}")
        instance = random_instance(size["S"], size["A"], size["H"], size["d"], N, np.random.default_rng(seed))
        summary = _median_runs(instance, "cutting_plane", tol, repeats, f"N={N}")
        entry = dict(N=N, zeta=instance.zeta, **_public(summary))
        report["scaling"].append(entry)
    by_N = {entry["N"]: entry for entry in report["scaling"]}
    largest, smallest = max(Ns), min(Ns)
    report["full_solve_target_s"] = by_N[largest]["total_s"]
    report["ratio_largest_over_smallest"] = dict(
        N_large=largest, N_small=smallest, ratio=by_N[largest]["total_s"] / by_N[smallest]["total_s"]
    )
    report["targets"] = dict(
        full_solve_under_5_s=report["full_solve_target_s"] < 5.0,
        ratio_at_most_3=report["ratio_largest_over_smallest"]["ratio"] <= 3.0,
        all_certified=all(entry["status"] == "optimal" for entry in report["scaling"]),
    )
    if joint_sizes:
        report["joint_comparison"] = _compare_with_joint(joint_sizes, seed, tol, joint_repeats)
    directory = os.path.dirname(out)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(out, "w") as handle:
        json.dump(report, handle, indent=2)
    _print_table(report)
    print(f"wrote {out}")
    return report


def _print_table(report: dict) -> None:
    size = report["target"]
    print(f"\nFull solve (aggregate + MLE + C(D) + min-max (D) + certificate), S={size['S']} A={size['A']} "
          f"H={size['H']} d={size['d']}, median of {report['repeats']} runs")
    print(f"{'N':>8} {'distinct':>9} {'total s':>8} {'aggr s':>7} {'MLE+set s':>10} {'minmax s':>9} {'iters':>6} {'gap':>9}  status")
    for row in report["scaling"]:
        print(f"{row['N']:>8} {row['distinct_pairs']:>9} {row['total_s']:>8.3f} {row['aggregate_s']:>7.3f} "
              f"{row['mle_and_set_s']:>10.3f} {row['minmax_and_certificate_s']:>9.3f} {row['iterations']:>6} "
              f"{row['certificate_gap']:>9.1e}  {row['status']}")
    ratio = report["ratio_largest_over_smallest"]
    print(f"time(N={ratio['N_large']}) / time(N={ratio['N_small']}) = {ratio['ratio']:.2f}")
    print("targets: " + ", ".join(f"{name} {'yes' if met else 'NO'}" for name, met in report["targets"].items()))
    if report.get("joint_comparison"):
        print("\nMin-max solve only, same C(D): cutting planes (D) vs plain cvxpy joint program (A)")
        print(f"{'size':>32} {'distinct':>9} {'(D) s':>8} {'(A) s':>8} {'speed-up':>9} {'|value diff|':>12}")
        for row in report["joint_comparison"]:
            size = "S={S} A={A} H={H} d={d} N={N}".format(**row["size"])
            print(f"{size:>32} {row['distinct_pairs']:>9} {row['cutting_plane_minmax_s']:>8.3f} {row['joint_minmax_s']:>8.2f} "
                  f"{row['speedup']:>9.1f} {row['value_difference']:>12.1e}")


def _size(text: str) -> dict:
    try:
        S, A, H, d, N = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be S,A,H,d,N (five integers), got {text!r}") from None
    return dict(S=S, A=A, H=H, d=d, N=N)


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m pbkd_ref.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join("figures", "bench.json"), help="JSON output (default figures/bench.json)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per N; the median is reported (default 5)")
    parser.add_argument("--N", type=int, nargs="+", default=[1_000, 10_000, 100_000], help="numbers of pairs (default 1000 10000 100000)")
    parser.add_argument("--size", type=_size, default=None,
                        help="S,A,H,d,N of the scaling instance instead of the target 50,4,10,8 (N is ignored: see --N)")
    parser.add_argument("--seed", type=int, default=0, help="instance seed (default 0)")
    parser.add_argument("--tol", type=float, default=1e-7, help="certificate tolerance (default 1e-7)")
    parser.add_argument("--joint-sizes", type=_size, nargs="*",
                        default=[_size("10,3,5,4,1000"), _size("50,4,10,8,1000"), _size("50,4,10,8,10000"),
                                 _size("50,4,10,8,100000")],
                        help="S,A,H,d,N sizes for the (A) comparison; (A) grows with the distinct pairs, about a "
                             "minute at 100,000 (default 10,3,5,4,1000 50,4,10,8,1000 50,4,10,8,10000 50,4,10,8,100000)")
    parser.add_argument("--joint-repeats", type=int, default=3, help="runs of (D) per (A) comparison (default 3)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.joint_repeats < 1:
        parser.error("--repeats and --joint-repeats must be >= 1")
    size = TARGET if args.size is None else {key: args.size[key] for key in ("S", "A", "H", "d")}
    run(out=args.out, repeats=args.repeats, Ns=args.N, seed=args.seed, tol=args.tol, joint_sizes=args.joint_sizes,
        joint_repeats=args.joint_repeats, size=size)
    return 0


if __name__ == "__main__":
    sys.exit(main())

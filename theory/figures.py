"""Regenerate every figure of `figures/` in full mode: `python -m theory.figures` (`make figures`).

Runs the experiments of `theory/` one after the other (spec tabular.md section 5; issue 3,
item 5), each with its full grid and seeds and its own progress bar, writes each
`figures/<name>.png` with its JSON twin, and prints one line per experiment: wall time, CPU
time over all worker processes, and whether all of its checks passed. The seed loop of each
experiment runs in up to two processes (`--workers`); results do not depend on it.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from pbkd_ref.cli import ArgumentParser
from theory.common import FIGURES_DIR, QUICK_DIR, RunConfig, Stopwatch, default_workers, output_dir

EXPERIMENTS = ("bound_vs_n", "coverage", "regret", "methods", "misspecification", "lower_bound")


def main(argv=None) -> dict:
    parser = ArgumentParser(prog="python -m theory.figures", description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=None,
                        help=f"where the PNG/JSON pairs go (default {FIGURES_DIR}/, or {QUICK_DIR}/ with --quick)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="processes per experiment")
    parser.add_argument("--only", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS),
                        help="run only these experiments")
    parser.add_argument("--quick", action="store_true", help="quick mode (the tests' settings), for a smoke run")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    args.out_dir = output_dir(args.out_dir, args.quick)
    total = Stopwatch()
    summary = {}
    for name in args.only:
        module = importlib.import_module(f"theory.{name}")
        config = RunConfig(quick=args.quick, out_dir=args.out_dir,
                           n_seeds=module.QUICK_SEEDS if args.quick else module.FULL_SEEDS,
                           progress=True, workers=args.workers)
        record = module.run(config)
        failed = [key for key, check in record["checks"].items() if check.get("passed") is not True]
        summary[name] = {"runtime_s": record["runtime_s"], "cpu_s": record.get("cpu_s"),
                         "all_checks_passed": record["all_checks_passed"], "failed_checks": failed}
        print(f"{name:>11}: {record['runtime_s']:7.1f} s wall, {record.get('cpu_s', float('nan')):7.1f} s CPU, "
              f"all checks passed = {record['all_checks_passed']}"
              + (f" (not passed: {', '.join(failed)})" if failed else ""), flush=True)
    print(f"{'total':>11}: {total.elapsed():7.1f} s wall; figures in {args.out_dir}/")
    return summary


if __name__ == "__main__":
    main()

"""Command line: solve a saved offline PbKD instance, or write a random one.

    python -m pbkd_ref solve INSTANCE.npz [--method cutting_plane|dual_lp|joint] [--tol 1e-7]
    python -m pbkd_ref make-instance OUT.npz --S 50 --A 4 --H 10 --d 8 --N 100000 --seed 0

``solve`` prints one JSON object: value (= min_pi max_{theta in C} theta^T (v_E - v_pi),
spec tabular.md section 3, certified to within certificate_gap), certificate_gap,
lower, upper, theta, policy (nested lists, shape (H, S, A)), occupancy, status,
solver, iterations, and the set's theta_hat and zeta. A malformed or missing
instance file prints the reason to stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from pbkd_ref.cli import ArgumentParser, refusing_bad_input
from pbkd_ref.solvers import METHODS


def _solve(args) -> int:
    from pbkd_ref.instance import load_instance, solve_instance

    instance = load_instance(args.instance)
    result, cset = solve_instance(instance, method=args.method, tol=args.tol)
    output = {
        "value": result.value,
        "certificate_gap": result.certificate_gap,
        "lower": result.lower,
        "upper": result.upper,
        "theta": result.theta.tolist(),
        "policy": result.policy.tolist(),
        "occupancy": result.occupancy.tolist(),
        "status": result.status,
        "solver": result.solver,
        "iterations": result.iterations,
        "theta_hat": np.asarray(cset.theta_hat).tolist(),
        "zeta": float(cset.zeta),
        "B": float(instance.B),
        "N": instance.N,
    }
    json.dump(output, sys.stdout)
    sys.stdout.write("\n")
    return 0


def _make_instance(args) -> int:
    from pbkd_ref.instance import random_instance, save_instance

    instance = random_instance(
        args.S, args.A, args.H, args.d, args.N, np.random.default_rng(args.seed),
        B=args.B, radius_kind=args.radius, delta=args.delta, temperature=args.temperature,
    )
    save_instance(args.out, instance)
    print(f"wrote {args.out}: S={args.S} A={args.A} H={args.H} d={args.d} N={args.N} B={instance.B:g} zeta={instance.zeta:.4g}",
          file=sys.stderr)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m pbkd_ref", description="Exact tabular PbKD (offline, Algorithm 1).")
    commands = parser.add_subparsers(dest="command", required=True)

    solve = commands.add_parser("solve", help="solve a saved instance and print one JSON object")
    solve.add_argument("instance", help="instance .npz file (keys P, rho, phi, v_E, X, y, B, zeta)")
    solve.add_argument("--method", choices=METHODS, default="cutting_plane",
                       help="cutting_plane (D, fast), dual_lp (B, cvxpy) or joint (A, cvxpy); default cutting_plane")
    solve.add_argument("--tol", type=float, default=1e-7, help="certificate tolerance (absolute), default 1e-7")
    solve.set_defaults(run=_solve)

    make = commands.add_parser("make-instance", help="write a random instance (random MDP, softmax teacher, BT pairs)")
    make.add_argument("out", help="output .npz path")
    make.add_argument("--S", type=int, default=50, help="number of states (default 50)")
    make.add_argument("--A", type=int, default=4, help="number of actions (default 4)")
    make.add_argument("--H", type=int, default=10, help="horizon (default 10)")
    make.add_argument("--d", type=int, default=8, help="feature dimension (default 8)")
    make.add_argument("--N", type=int, default=100_000, help="number of preference pairs (default 100000)")
    make.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    make.add_argument("--B", type=float, default=10.0, help="norm bound B; theta* has norm B/2 (default 10)")
    make.add_argument("--radius", choices=("bracketing", "chi2"), default="bracketing", help="likelihood radius zeta (default bracketing)")
    make.add_argument("--delta", type=float, default=0.05, help="confidence level delta of the radius (default 0.05)")
    make.add_argument("--temperature", type=float, default=0.1, help="softmax temperature of the teacher (default 0.1)")
    make.set_defaults(run=_make_instance)
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    with refusing_bad_input():  # a malformed or missing instance: one line, exit 2
        return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

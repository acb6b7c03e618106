"""Testbed experiments of the LLM layer (issue 5, item 5; spec llm.md section 5).

Two experiments, each a sequence of ordinary `llm/train.py` runs on one student, teacher, data
set and step budget:

* the comparison table: every method of ``--methods`` for every training seed of ``--seeds``,
  scored on the test set by the section 5 protocol (Rouge-L and exact match, sampling seeds
  ``eval.test_seeds``) and written to ``figures/llm_methods.json`` and ``.md`` (mean and std over
  the training seeds of each method);
* the round-by-round figure (the analogue of the paper's Figure 3): online ``pbkd`` with
  ``--rounds`` rounds for each reward-model size of ``--rm-sizes``; the validation Rouge-L of
  the student after 0, 1, ..., T rounds, written to ``figures/llm_rounds.png`` and ``.json``.

    python -m llm.experiments --methods sft seqkd fkl rkl jsd akl dpkd pbkd_offline pbkd_online mm_pbkd \\
        --seeds 10 20 30 40 50                            # the full table (hours on a CPU)
    python -m llm.experiments --methods fkl pbkd_offline --seeds 10 max_steps=40   # a slice
    python -m llm.experiments --rounds-figure --rm-sizes 1x32 2x64 2x128 --rounds 4

Trailing ``key=value`` arguments override the config of every run (e.g. ``max_steps=40``).
Each run's wall time is recorded next to its numbers, so the budget of a larger table can be
read off a smaller one.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from llm.config import load_config
from llm.evaluate import results_table
from llm.train import DEFAULT_CONFIG, test_set_name, train

FIGURES = Path(__file__).resolve().parents[1] / "figures"

METHODS = {
    "sft": ["objective=sft"],
    "seqkd": ["objective=seqkd"],
    "fkl": ["objective=fkl"],
    "rkl": ["objective=rkl"],
    "jsd": ["objective=jsd"],
    "akl": ["objective=akl"],
    "dpkd": ["objective=dpkd"],
    "pbkd_offline": ["objective=pbkd", "online.rounds=1"],
    "pbkd_online": ["objective=pbkd", "online.rounds=4"],
    "mm_pbkd": ["objective=mm_pbkd", "online.rounds=4"],
}
"""Method name -> its config overrides (every other value is shared by all methods)."""


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def run_one(config: str, overrides: list[str], run_name: str, out_dir: str) -> tuple[dict, float]:
    cfg = load_config(config, [*overrides, f"run_name={run_name}", f"out_dir={out_dir}"])
    started = time.perf_counter()
    result = train(cfg)
    return {"result": result, "test_set": test_set_name(cfg)}, time.perf_counter() - started


def comparison_table(methods: list[str], seeds: list[int], config: str, overrides: list[str], out_dir: str,
                     figures: Path = FIGURES) -> dict:
    """Train every method for every seed; write figures/llm_methods.{json,md}; return the table data."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; valid methods: {list(METHODS)}")
    table, runs = {}, {}
    for method in methods:
        per_seed = []
        for seed in seeds:
            out, seconds = run_one(config, [*METHODS[method], f"seed={seed}", *overrides], f"{method}-seed{seed}", out_dir)
            rows = out["result"]["results"]
            after = next(v for k, v in rows.items() if k.startswith("student (after"))[out["test_set"]]
            per_seed.append({"seed": seed, "rouge_l": after["rouge_l"], "exact_match": after["exact_match"],
                             "seconds": round(seconds, 1), "run_dir": Path(out["result"]["run_dir"]).name})
            if "teacher" in rows and "teacher" not in table:
                table["teacher"] = {out["test_set"]: rows["teacher"][out["test_set"]]}
            test_set = out["test_set"]
        r_mean, r_std = _mean_std([s["rouge_l"] for s in per_seed])
        em_mean, em_std = _mean_std([s["exact_match"] for s in per_seed])
        table[method] = {test_set: {"rouge_l": r_mean, "rouge_l_std": r_std, "exact_match": em_mean,
                                    "exact_match_std": em_std, "seeds": seeds}}  # std over training seeds
        runs[method] = per_seed
        print(f"[experiments] {method}: Rouge-L {r_mean:.2f} +- {r_std:.2f} over seeds {seeds}", flush=True)
    order = [m for m in methods] + (["teacher"] if "teacher" in table else [])
    table = {m: table[m] for m in order}
    payload = {"command_overrides": overrides, "config": str(config), "seeds": seeds, "table": table, "runs": runs}
    figures.mkdir(parents=True, exist_ok=True)
    (figures / "llm_methods.json").write_text(json.dumps(payload, indent=2) + "\n")
    (figures / "llm_methods.md").write_text(results_table(table))
    print(results_table(table), flush=True)
    return payload


def parse_size(text: str) -> dict:
    """'LxH' -> a fresh reward-model config of L blocks of width H (4 heads, or 1 if 4 does not divide H)."""
    try:
        layers, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"reward-model size {text!r} must be LAYERSxWIDTH, e.g. 2x64") from None
    heads = 4 if width % 4 == 0 else 1
    return {"num_hidden_layers": layers, "hidden_size": width, "num_attention_heads": heads}


def rounds_figure(sizes: list[str], rounds: int, seed: int, config: str, overrides: list[str], out_dir: str,
                  figures: Path = FIGURES) -> dict:
    """Online pbkd for each reward-model size: validation Rouge-L after 0..T rounds -> figures/llm_rounds.*"""
    curves = {}
    for size in sizes:
        rm = parse_size(size)
        rm_text = "{" + ", ".join(f"{k}: {v}" for k, v in rm.items()) + "}"
        out, seconds = run_one(config, ["objective=pbkd", f"online.rounds={rounds}", f"seed={seed}",
                                        "pbkd.rm_init=fresh", f"pbkd.rm_config={rm_text}", *overrides],
                               f"rounds-rm{size}-seed{seed}", out_dir)
        run_dir = Path(out["result"]["run_dir"])
        lines = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines() if x.strip()]
        scores = [line["valid_rouge_l"] for line in lines] + [out["result"]["state"]["valid_history"][-1][1]]
        curves[size] = {"rounds_completed": list(range(len(scores))), "valid_rouge_l": scores,
                        "rounds": lines, "seconds": round(seconds, 1)}
        print(f"[experiments] rm {size}: valid Rouge-L by round {[round(s, 2) for s in scores]}", flush=True)
    figures.mkdir(parents=True, exist_ok=True)
    payload = {"rounds": rounds, "seed": seed, "config": str(config), "command_overrides": overrides, "curves": curves}
    (figures / "llm_rounds.json").write_text(json.dumps(payload, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for size, c in curves.items():
        ax.plot(c["rounds_completed"], c["valid_rouge_l"], marker="o", label=f"reward model {size}")
    ax.set_xlabel("online rounds completed")
    ax.set_ylabel("student validation Rouge-L")
    ax.set_title("Online PbKD: student score by round")
    ax.legend()
    fig.tight_layout()
    fig.savefig(figures / "llm_rounds.png", dpi=120)
    plt.close(fig)
    return payload


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="LLM testbed experiments: the method table and the rounds figure.")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="base YAML config (default: the CPU testbed)")
    parser.add_argument("--methods", nargs="*", default=[], help=f"methods of the table: {list(METHODS)}")
    parser.add_argument("--seeds", nargs="*", type=int, default=[10, 20, 30, 40, 50], help="training seeds")
    parser.add_argument("--rounds-figure", action="store_true", help="run the round-by-round figure")
    parser.add_argument("--rm-sizes", nargs="*", default=["1x32", "2x64", "2x128"], help="reward-model sizes LxH")
    parser.add_argument("--rounds", type=int, default=4, help="online rounds of the rounds figure")
    parser.add_argument("--out-dir", default="runs/experiments", help="parent folder of the runs")
    parser.add_argument("--figures-dir", default=str(FIGURES), help="where the JSON/Markdown/PNG results go")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    args = parser.parse_args(argv)
    if not args.methods and not args.rounds_figure:
        parser.error("give --methods and/or --rounds-figure")
    out = {}
    if args.methods:
        out["table"] = comparison_table(args.methods, args.seeds, args.config, args.overrides, args.out_dir,
                                        Path(args.figures_dir))
    if args.rounds_figure:
        out["rounds"] = rounds_figure(args.rm_sizes, args.rounds, args.seeds[0], args.config, args.overrides,
                                      args.out_dir, Path(args.figures_dir))
    return out


if __name__ == "__main__":
    main()

"""Testbed experiments of the LLM layer (issue 5, item 5; spec llm.md section 5).

Two experiments, each a sequence of ordinary `llm/train.py` runs on one student, teacher, data
set and step budget:

* the comparison table: every method of ``--methods`` for every training seed of ``--seeds``,
  scored on the test set by the section 5 protocol and written to ``figures/llm_methods.json``
  and ``.md`` (mean and std over the training seeds of each method);
* the round-by-round figure (the analogue of the paper's Figure 3): online ``pbkd`` with
  ``--rounds`` rounds for each reward-model size of ``--rm-sizes``; the validation Rouge-L of
  the student after 0, 1, ..., T rounds, written to ``figures/llm_rounds.png`` and ``.json``.

The starting student. As in MiniLLM and DistiLLM, every method starts from one student that was
first fine-tuned on the gold responses: a warm-start ``sft`` run of ``--warm-start-steps`` steps
(``warm-start`` in ``--out-dir``, trained once and shared by every method and seed; its own
test score is the table's first row). The pruned testbed student writes near-empty text before
training (Rouge-L 0.1), which a policy gradient on a learned reward cannot get off the ground
from; ``--warm-start-steps 0`` starts every method from the config's student instead.

Every run keeps its folder ``<out-dir>/<method>-seed<seed>`` and, once finished, an
``experiment.json`` record there. Running the same command again reuses finished runs, resumes a
run that was stopped after a checkpoint, and trains only what is missing; the table files are
rewritten after every run, so a table cut short still holds every finished run. Each record
keeps the run's wall time, so the budget of a larger table can be read off a smaller one.

    python -m llm.experiments --methods sft seqkd fkl rkl jsd akl dpkd pbkd_offline pbkd_online mm_pbkd \\
        --seeds 10 20 30 40 50 max_steps=100 eval.before=false      # the full table (hours on a CPU)
    python -m llm.experiments --rounds-figure --seeds 10 --rm-sizes 1x32 4x256 --rounds 4 --warm-start-steps 0 \\
        student_init=pretrained student=runs/experiments/warm-start/checkpoints/best optim.lr=1e-5 max_steps=60

``key=value`` arguments, anywhere on the line, override the config of every run (e.g. ``max_steps=40``).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

from llm.config import DEFAULT_CONFIG, load_config, to_dict
from llm.evaluate import results_table
from llm.train import test_set_name, train
from pbkd_ref.cli import ArgumentParser, refusing_bad_input

REPO = Path(__file__).resolve().parents[1]
FIGURES = REPO / "figures"
RECORD = "experiment.json"

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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _folders(out_dir: str, run_name: str) -> list[Path]:
    """`<out_dir>/<run_name>` and the `<run_name>-1`, `-2`, ... folders `llm/train.py` opens beside a taken one."""
    names = (run_name if k == 0 else f"{run_name}-{k}" for k in itertools.count())
    return list(itertools.takewhile(Path.exists, (Path(out_dir) / name for name in names)))


def _shown(config: str) -> str:
    """The config path as the figures record it: relative to the repository when inside it."""
    path = Path(config).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(config)


def _settings(cfg_dict: dict) -> dict:
    """What makes two runs the same run: the whole config but its folder name."""
    return {k: v for k, v in json.loads(json.dumps(cfg_dict)).items() if k != "run_name"}


def run_one(config: str, overrides: list[str], run_name: str, out_dir: str) -> dict:
    """One `llm/train.py` run, trained, resumed or reused.

    A finished run (its folder holds `experiment.json`) whose config equals this one (overrides
    that spell the same config match) is reused; an unfinished one with a checkpoint is resumed;
    otherwise the run starts (in a fresh folder). Returns the record: the overrides, the test set,
    the final results table, the training state, the run folder's name and the wall time of the
    invocation that finished it. A finished run with another config is refused (another
    --out-dir, or remove its folder)."""
    cfg = load_config(config, [*overrides, f"run_name={run_name}", f"out_dir={out_dir}"])
    mine, folders = _settings(to_dict(cfg)), _folders(out_dir, run_name)
    for folder in folders:
        if (folder / RECORD).is_file():
            saved = _settings(json.loads((folder / "config.json").read_text()))
            if saved != mine:
                changed = sorted(k for k in saved.keys() | mine.keys() if saved.get(k) != mine.get(k))
                raise ValueError(f"{folder} holds a finished run with another config (differing: {changed}); "
                                 "use another --out-dir or remove that folder")
            print(f"[experiments] {run_name}: reusing the finished run in {folder}", flush=True)
            return json.loads((folder / RECORD).read_text())
    resumable = [f for f in folders if (f / "checkpoints" / "latest").exists()]
    if resumable:
        cfg = load_config(config, [*overrides, f"run_name={resumable[-1].name}", f"out_dir={out_dir}"])
    started = time.perf_counter()
    result = train(cfg, resume=bool(resumable))
    seconds = time.perf_counter() - started
    if result["results"] is None:
        raise RuntimeError(f"{run_name} stopped before max_steps ({result['state']['step']}/{cfg.max_steps})")
    run_dir = Path(result["run_dir"])
    record = {"overrides": overrides, "test_set": test_set_name(cfg), "results": result["results"],
              "state": result["state"], "run_dir": run_dir.name, "seconds": round(seconds, 1),
              "resumed": bool(resumable)}
    _write_atomic(run_dir / RECORD, json.dumps(record, indent=2) + "\n")
    return record


def student_after(record: dict) -> dict:
    """The test metrics of the trained student (best validation checkpoint) of a run record."""
    rows = record["results"]
    return next(v for k, v in rows.items() if k.startswith("student (after"))[record["test_set"]]


def warm_start(steps: int, config: str, overrides: list[str], out_dir: str) -> tuple[list[str], dict | None]:
    """The shared starting student: (overrides that start a run from it, the warm-start run's record).

    ``steps == 0``: no warm start, every run starts from the config's student."""
    if steps == 0:
        return [], None
    record = run_one(config, [*overrides, "objective=sft", f"max_steps={steps}", "seed=0"], "warm-start", out_dir)
    best = (Path(out_dir) / record["run_dir"] / "checkpoints" / "best").resolve()
    return ["student_init=pretrained", f"student={best}"], record


def comparison_table(methods: list[str], seeds: list[int], config: str, overrides: list[str], out_dir: str,
                     warm_start_steps: int = 100, figures: Path = FIGURES) -> dict:
    """Train every method for every seed from the warm start; write figures/llm_methods.{json,md}."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; valid methods: {list(METHODS)}")
    if not seeds:
        raise ValueError("--seeds needs at least one training seed")
    start, warm = warm_start(warm_start_steps, config, overrides, out_dir)
    runs: dict[str, list[dict]] = {}
    total, done = len(methods) * len(seeds), 0
    for method in methods:
        runs[method] = []
        for seed in seeds:
            done += 1
            print(f"[experiments] run {done}/{total}: {method} seed {seed}", flush=True)
            record = run_one(config, [*METHODS[method], f"seed={seed}", *overrides, *start], f"{method}-seed{seed}",
                             out_dir)
            after = student_after(record)
            runs[method].append({"seed": seed, "rouge_l": after["rouge_l"], "exact_match": after["exact_match"],
                                 "seconds": record["seconds"], "best_step": record["state"]["best_step"],
                                 "run_dir": record["run_dir"], "teacher": record["results"].get("teacher")})
            payload = _table_payload(methods, runs, warm, seeds, config, overrides, warm_start_steps,
                                     record["test_set"])
            figures.mkdir(parents=True, exist_ok=True)
            _write_atomic(figures / "llm_methods.json", json.dumps(payload, indent=2) + "\n")
            _write_atomic(figures / "llm_methods.md", results_table(payload["table"]))
    print(results_table(payload["table"]), flush=True)
    return payload


def _table_payload(methods, runs, warm, seeds, config, overrides, warm_start_steps, test_set) -> dict:
    """The table of the runs finished so far: one row per method (mean ± std over its finished seeds)."""
    table = {}
    if warm is not None:
        table[f"start (sft warm start, {warm_start_steps} steps)"] = {test_set: student_after(warm)}
    for method, per_seed in runs.items():
        if not per_seed:
            continue
        r_mean, r_std = _mean_std([s["rouge_l"] for s in per_seed])
        em_mean, em_std = _mean_std([s["exact_match"] for s in per_seed])
        table[method] = {test_set: {"rouge_l": r_mean, "rouge_l_std": r_std, "exact_match": em_mean,
                                    "exact_match_std": em_std, "seeds": [s["seed"] for s in per_seed]}}
    teacher = next((s["teacher"] for per_seed in runs.values() for s in per_seed if s["teacher"]), None)
    if teacher is not None:
        table["teacher"] = teacher
    return {"config": _shown(config), "command_overrides": overrides, "seeds": seeds,
            "warm_start_steps": warm_start_steps, "std_over": "training seeds", "table": table,
            "runs": {m: [{k: v for k, v in s.items() if k != "teacher"} for s in per_seed] for m, per_seed in runs.items()},
            "complete": all(len(runs.get(m, [])) == len(seeds) for m in methods)}


def parse_size(text: str) -> dict:
    """'LxH' -> a fresh reward-model config of L blocks of width H (4 heads, or 1 if 4 does not divide H)."""
    try:
        layers, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"reward-model size {text!r} must be LAYERSxWIDTH, e.g. 2x64") from None
    heads = 4 if width % 4 == 0 else 1
    return {"num_hidden_layers": layers, "hidden_size": width, "num_attention_heads": heads}


def rounds_figure(sizes: list[str], rounds: int, seed: int, config: str, overrides: list[str], out_dir: str,
                  warm_start_steps: int = 100, figures: Path = FIGURES) -> dict:
    """Online pbkd from the warm start for each reward-model size: validation Rouge-L after 0..T rounds
    -> figures/llm_rounds.{png,json}."""
    start, _ = warm_start(warm_start_steps, config, overrides, out_dir)
    curves = {}
    for size in sizes:
        rm = parse_size(size)
        rm_text = "{" + ", ".join(f"{k}: {v}" for k, v in rm.items()) + "}"
        record = run_one(config, ["objective=pbkd", f"online.rounds={rounds}", f"seed={seed}", "pbkd.rm_init=fresh",
                                  f"pbkd.rm_config={rm_text}", *overrides, *start], f"rounds-rm{size}-seed{seed}", out_dir)
        run_dir = Path(out_dir) / record["run_dir"]
        lines = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines() if x.strip()]
        scores = [line["valid_rouge_l"] for line in lines] + [record["state"]["valid_history"][-1][1]]
        curves[size] = {"rounds_completed": list(range(len(scores))), "valid_rouge_l": scores,
                        "test_rouge_l": student_after(record)["rouge_l"], "rounds": lines, "seconds": record["seconds"]}
        print(f"[experiments] rm {size}: valid Rouge-L by round {[round(s, 2) for s in scores]}", flush=True)
    figures.mkdir(parents=True, exist_ok=True)
    payload = {"rounds": rounds, "seed": seed, "config": _shown(config), "command_overrides": overrides,
               "warm_start_steps": warm_start_steps, "curves": curves}
    _write_atomic(figures / "llm_rounds.json", json.dumps(payload, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for size, c in curves.items():
        ax.plot(c["rounds_completed"], c["valid_rouge_l"], marker="o", label=f"reward model {size}")
    ax.set_xlabel("online rounds completed")
    ax.set_ylabel("student validation Rouge-L")
    ax.set_title("Online PbKD: student score by round")
    ax.set_xticks(range(rounds + 1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(figures / "llm_rounds.png", dpi=120)
    plt.close(fig)
    return payload


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(prog="python -m llm.experiments",
                            description="LLM testbed experiments: the method table and the rounds figure.",
                            epilog="key=value arguments, anywhere on the line, override the config of every run")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="base YAML config (default: the CPU testbed)")
    parser.add_argument("--methods", nargs="*", default=[], help=f"methods of the table: {list(METHODS)}")
    parser.add_argument("--seeds", nargs="*", type=int, default=[10, 20, 30, 40, 50], help="training seeds")
    parser.add_argument("--warm-start-steps", type=int, default=100,
                        help="sft steps of the shared starting student (0 = start from the config's student)")
    parser.add_argument("--rounds-figure", action="store_true", help="run the round-by-round figure")
    parser.add_argument("--rm-sizes", nargs="*", default=["1x32", "2x64", "2x128"], help="reward-model sizes LxH")
    parser.add_argument("--rounds", type=int, default=4, help="online rounds of the rounds figure")
    parser.add_argument("--out-dir", default="runs/experiments", help="parent folder of the runs")
    parser.add_argument("--figures-dir", default=str(FIGURES), help="where the JSON/Markdown/PNG results go")
    argv = sys.argv[1:] if argv is None else list(argv)
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]  # key=value, anywhere on the line
    args = parser.parse_args([a for a in argv if a not in overrides])
    args.overrides = overrides
    if not args.methods and not args.rounds_figure:
        parser.error("give --methods and/or --rounds-figure")
    if args.warm_start_steps < 0:
        parser.error(f"--warm-start-steps must be >= 0, got {args.warm_start_steps}")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; valid methods: {list(METHODS)}")
    if args.methods and not args.seeds:
        parser.error("--seeds needs at least one training seed")
    with refusing_bad_input():  # every run's config is checked before the first run trains
        for method in args.methods or ["sft"]:
            load_config(args.config, [*METHODS[method], *args.overrides])
    out = {}
    if args.methods:
        out["table"] = comparison_table(args.methods, args.seeds, args.config, args.overrides, args.out_dir,
                                        args.warm_start_steps, Path(args.figures_dir))
    if args.rounds_figure:
        out["rounds"] = rounds_figure(args.rm_sizes, args.rounds, args.seeds[0], args.config, args.overrides,
                                      args.out_dir, args.warm_start_steps, Path(args.figures_dir))
    return out


if __name__ == "__main__":
    main()

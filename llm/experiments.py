"""Testbed experiments of the LLM layer (issue 5, item 5; spec llm.md section 5).

Three experiments, each a sequence of ordinary `llm/train.py` runs on one student, teacher, data
set and step budget:

* the comparison table: every method of ``--methods`` (``baselines``: the nine of
  :data:`BASELINES`) for every training seed of ``--seeds``, scored on every test set by the
  section 5 protocol and written to ``figures/llm_methods.json`` and ``.md``: the student before
  training, the warm start, each method's mean and std over the training seeds and its paired
  difference from the warm start with a 95% interval, and the teacher as given and fine-tuned
  (``teacher_sft``), with the wall time of every stage;
* the round-by-round figure (the analogue of the paper's Figure 3): online ``pbkd`` with
  ``--rounds`` rounds for each reward-model size of ``--rm-sizes`` and each seed of ``--seeds``,
  on the first ``--rounds-prompts`` training prompts as the sanity rung (:func:`rounds_figure`);
  the score of the student after 0, 1, ..., T rounds on those prompts and on validation, with
  the mean and min-max band over the seeds, written to ``figures/llm_rounds.png`` and ``.json``;
* the sanity rung (spec llm.md section 2a): ``rloo``, the student step on the judge's own known
  reward, from the warm start on the first ``--rung-prompts`` training prompts, graded on those
  prompts against the warm start over the seeds (:func:`sanity_rung`), written to
  ``figures/llm_sanity_rung.json`` and ``.md``.

The starting student. As in MiniLLM and DistiLLM, every method starts from one student that was
first fine-tuned on the gold responses: a warm-start ``sft`` run of ``--warm-start-steps`` steps
(``warm-start`` in ``--out-dir``, trained once and shared by every method and seed; its own
test scores are the table's second row, after the student before training). The pruned testbed
student writes near-empty text before training (Rouge-L 0.1), which a policy gradient on a
learned reward cannot get off the ground from; ``--warm-start-steps 0`` starts every method from the config's student instead.

Every run keeps its folder ``<out-dir>/<method>-seed<seed>`` and, once finished, an
``experiment.json`` record there. Running the same command again reuses finished runs, resumes a
run that was stopped after a checkpoint, and trains only what is missing; the table files are
rewritten after every run, so a table cut short still holds every finished run. Each record
keeps the run's wall time, so the budget of a larger table can be read off a smaller one.

    python -m llm.experiments --methods baselines --teacher-topk 32 max_steps=40 eval.every=20   # make table
    python -m llm.experiments --rounds-figure --seeds 10 20 30 --rm-sizes p5 p10 p15 --rounds 4 --out-dir runs/rounds \\
        max_steps=100 eval.every=25 eval.teacher=false
    python -m llm.experiments --sanity-rung --rung-prompts 64 --out-dir runs/rung max_steps=100 eval.every=25 \\
        teacher_sft.steps=0 eval.teacher=false

``key=value`` arguments, anywhere on the line, override the config of every run (e.g. ``max_steps=40``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

from scipy import stats

from llm.config import DEFAULT_CONFIG, TeacherSFTConfig, load_config, to_dict
from llm.evaluate import METRICS, evaluate_model
from llm.models import load_causal_lm, load_tokenizer
from llm.run import train_probe
from llm.train import evaluate_teacher, load_data, teacher_sft_record, train
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
    "skl": ["objective=skl"],
    "srkl": ["objective=srkl"],
    "akl": ["objective=akl"],
    "dpkd": ["objective=dpkd"],
    "rloo": ["objective=rloo"],
    "pbkd_offline": ["objective=pbkd", "online.rounds=1"],
    "pbkd_online": ["objective=pbkd", "online.rounds=4"],
    "mm_pbkd": ["objective=mm_pbkd", "online.rounds=4"],
}
"""Method name -> its config overrides (every other value is shared by all methods)."""

BASELINES = ("sft", "seqkd", "fkl", "rkl", "jsd", "skl", "srkl", "akl", "dpkd")
"""The rows of the baseline table (issue: the five-seed baseline table)."""

DIVERGENCES = ("fkl", "rkl", "jsd", "skl", "srkl", "akl")
"""The methods that `--teacher-topk` applies to (the token-level divergences of llm.losses)."""


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def paired_difference(values: list[float], baseline: list[float]) -> dict:
    """Mean of ``values[i] - baseline[i]`` with its two-sided 95% Student-t interval over the pairs
    (no interval for a single pair)."""
    diffs = [v - b for v, b in zip(values, baseline, strict=True)]
    mean, std = _mean_std(diffs)
    n = len(diffs)
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n}


def gap_closed(minus_warm: dict, warm: dict, teacher: dict) -> dict:
    """The fraction of the teacher-minus-warm-start gap a method closes, per test set and metric:
    its paired difference from the warm start (mean and 95% interval) over ``teacher - warm``;
    None where the teacher is not above the warm start."""
    out = {}
    for name, per_metric in minus_warm.items():
        out[name] = {}
        for m, d in per_metric.items():
            gap = teacher[name][m] - warm[name][m]
            out[name][m] = None if gap <= 0 else {"mean": d["mean"] / gap, "ci95": [x / gap for x in d["ci95"]],
                                                  "gap": gap}
    return out


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
    otherwise the run starts (in a fresh folder). Returns the record: the overrides, the test sets
    (the primary one first), the final results table, the training state, the run folder's name and
    the wall time of the invocation that finished it. A finished run with another config is refused
    (another --out-dir, or remove its folder)."""
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
    if result["state"]["step"] < cfg.max_steps:
        raise RuntimeError(f"{run_name} stopped before max_steps ({result['state']['step']}/{cfg.max_steps})")
    run_dir = Path(result["run_dir"])
    results = result["results"]
    record = {"overrides": overrides, "test_sets": list(next(iter(results.values()))) if results else [],
              "results": results,
              "state": result["state"], "run_dir": run_dir.name, "seconds": round(seconds, 1),
              "resumed": bool(resumable)}
    _write_atomic(run_dir / RECORD, json.dumps(record, indent=2) + "\n")
    return record


def student_after(record: dict) -> dict:
    """{test set: metrics} of the trained student (best validation checkpoint) of a run record."""
    return next(v for k, v in record["results"].items() if k.startswith("student (after"))


def warm_start(steps: int, config: str, overrides: list[str], out_dir: str) -> tuple[list[str], dict | None]:
    """The shared starting student: (overrides that start a run from it, the warm-start run's record).

    ``steps == 0``: no warm start, every run starts from the config's student."""
    if steps == 0:
        return [], None
    record = run_one(config, [*overrides, "objective=sft", f"max_steps={steps}", "seed=0", "eval.before=true"],
                     "warm-start", out_dir)
    best = (Path(out_dir) / record["run_dir"] / "checkpoints" / "best").resolve()
    best = best.relative_to(Path.cwd()) if best.is_relative_to(Path.cwd()) else best  # the figures name no machine path
    return ["student_init=pretrained", f"student={best}", "eval.before=false"], record


def _scores(per_set: dict) -> dict:
    """The three scores of every test set of one evaluation: {set: {metric: value}}."""
    return {name: {m: metrics[m] for m in METRICS if m in metrics} for name, metrics in per_set.items()}


def teachers(config: str, overrides: list[str]) -> dict:
    """{row name: row} of the config's teacher and, when it is fine-tuned first (teacher_sft), of the
    same teacher as given: the scores, the evaluation's wall seconds and the fine-tune's record."""
    cfg = load_config(config, overrides)
    settings = {f"teacher ({cfg.teacher}, as given)": dataclasses.replace(cfg, teacher_sft=TeacherSFTConfig())}
    if cfg.teacher_sft.steps:
        settings[f"teacher (fine-tuned, {cfg.teacher_sft.steps} sft steps)"] = cfg
    rows = {}
    for name, teacher_cfg in settings.items():
        metrics = evaluate_teacher(teacher_cfg)
        rows[name] = {"scores": _scores(metrics), "eval_seconds": round(sum(m["seconds"] for m in metrics.values()), 1),
                      "teacher_sft": teacher_sft_record(teacher_cfg),
                      "default": teacher_cfg.teacher_sft == cfg.teacher_sft}
    return rows


def comparison_table(methods: list[str], seeds: list[int], config: str, overrides: list[str], out_dir: str,
                     warm_start_steps: int = 100, figures: Path = FIGURES, teacher_topk: int = 0) -> dict:
    """Train every method for every seed from the warm start; write figures/llm_methods.{json,md}.

    ``teacher_topk`` > 0 runs the token-level divergences on the teacher top-k cache (kd.teacher_topk)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; valid methods: {list(METHODS)}")
    if not seeds:
        raise ValueError("--seeds needs at least one training seed")
    started = time.perf_counter()
    teacher_rows = teachers(config, overrides)
    start, warm = warm_start(warm_start_steps, config, overrides, out_dir)
    runs: dict[str, list[dict]] = {method: [] for method in methods}
    total, done = len(methods) * len(seeds), 0
    for seed in seeds:  # seed by seed: a table cut short holds every method
        for method in methods:
            topk = [f"kd.teacher_topk={teacher_topk}"] if teacher_topk and method in DIVERGENCES else []
            done += 1
            print(f"[experiments] run {done}/{total}: {method} seed {seed}", flush=True)
            record = run_one(config, [*METHODS[method], *topk, f"seed={seed}", *overrides, *start],
                             f"{method}-seed{seed}", out_dir)
            runs[method].append({"seed": seed, "scores": _scores(student_after(record)), "seconds": record["seconds"],
                                 "best_step": record["state"]["best_step"], "run_dir": record["run_dir"],
                                 "overrides": record["overrides"],
                                 "eval_seconds": {k: v["seconds"] for k, v in student_after(record).items()}})
            payload = _table_payload(methods, runs, warm, teacher_rows, seeds, config, overrides, warm_start_steps,
                                     teacher_topk, time.perf_counter() - started)
            figures.mkdir(parents=True, exist_ok=True)
            _write_atomic(figures / "llm_methods.json", json.dumps(payload, indent=2) + "\n")
            _write_atomic(figures / "llm_methods.md", methods_markdown(payload))
    print(methods_markdown(payload), flush=True)
    return payload


def _table_payload(methods, runs, warm, teacher_rows, seeds, config, overrides, warm_start_steps, teacher_topk,
                   seconds) -> dict:
    """The table of the runs finished so far: the student before training, the warm start, one row
    per method (mean ± std over its finished seeds, and the paired difference from the warm start with
    its 95% interval), the teachers."""
    rows = {}
    warm_scores = None
    if warm is not None:
        before = next((v for k, v in warm["results"].items() if k == "student (before)"), None)
        if before is not None:
            rows["student before training"] = {"scores": _scores(before)}
        warm_scores = _scores(student_after(warm))
        rows[f"warm start (sft, {warm_start_steps} steps)"] = {"scores": warm_scores}
    for method, per_seed in runs.items():
        if not per_seed:
            continue
        summary, diff = {}, {}
        for name in per_seed[0]["scores"]:
            summary[name], diff[name] = {}, {}
            for m in per_seed[0]["scores"][name]:
                values = [s["scores"][name][m] for s in per_seed]
                summary[name][m], summary[name][f"{m}_std"] = _mean_std(values)
                if warm_scores is not None:
                    diff[name][m] = paired_difference(values, [warm_scores[name][m]] * len(values))
        rows[method] = {"scores": summary, "seeds": [s["seed"] for s in per_seed],
                        **({"minus_warm_start": diff} if warm_scores is not None else {})}
    for name, row in teacher_rows.items():
        rows[name] = row
    teacher = next((row["scores"] for row in teacher_rows.values() if row["default"]), None)
    if warm_scores is not None and teacher is not None:
        for method, per_seed in runs.items():
            if per_seed:
                rows[method]["gap_closed"] = gap_closed(rows[method]["minus_warm_start"], warm_scores, teacher)
    cfg = load_config(config, overrides)
    timing = {"teacher_eval": {k: v["eval_seconds"] for k, v in teacher_rows.items()},
              "teacher_sft": {k: v["teacher_sft"]["seconds"] for k, v in teacher_rows.items() if v["teacher_sft"]},
              "warm_start": warm["seconds"] if warm is not None else 0.0,
              "runs": round(sum(s["seconds"] for per_seed in runs.values() for s in per_seed), 1),
              "this_invocation": round(seconds, 1)}
    return {"config": _shown(config), "command_overrides": overrides, "seeds": seeds, "methods": methods,
            "warm_start_steps": warm_start_steps, "teacher_topk": teacher_topk,
            "primary_test": next(iter(next(iter(rows.values()))["scores"])),  # every run lists it first
            "select_by": cfg.eval.select_by, "std_over": "training seeds", "ci": "two-sided 95% Student-t over seeds",
            "rows": rows, "timing_seconds": timing,
            "runs": runs, "complete": all(len(runs.get(m, [])) == len(seeds) for m in methods)}


_NAMES = {"answer_accuracy": "Acc", "rouge_l": "Rouge-L", "exact_match": "EM"}


def _share(g: dict | None) -> str:
    """A gap_closed cell: the share in percent with its 95% interval ("-": no gap to close)."""
    if g is None:
        return "-"
    if math.isnan(g["ci95"][0]):  # one seed: no interval
        return f"{100 * g['mean']:+.0f}%"
    return f"{100 * g['mean']:+.0f}% [{100 * g['ci95'][0]:+.0f}, {100 * g['ci95'][1]:+.0f}]"


def _markdown(title: str, columns: list[str], cells: dict[str, list[str]]) -> str:
    """One Markdown table: a header of ``title`` and ``columns``, then one line per named row of cells."""
    lines = ["| " + " | ".join([title, *columns]) + " |", "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|"]
    lines += ["| " + " | ".join([name, *row]) + " |" for name, row in cells.items()]
    return "\n".join(lines) + "\n"


def methods_markdown(payload: dict) -> str:
    """The table as Markdown: mean ± std over seeds per test set; then each method's paired
    difference from the warm start with its 95% interval; then the share of the teacher-minus-warm-
    start gap it closes."""
    rows = payload["rows"]
    sets = list(next(iter(rows.values()))["scores"])
    metrics = [m for m in METRICS if m in next(iter(rows.values()))["scores"][sets[0]]]
    columns, keys = [f"{t} {_NAMES[m]}" for t in sets for m in metrics], [(t, m) for t in sets for m in metrics]

    def spread(row, t, m):
        value, std = row["scores"][t][m], row["scores"][t].get(f"{m}_std")
        return f"{value:.1f} ± {std:.1f}" if std is not None and len(row.get("seeds", [])) > 1 else f"{value:.1f}"

    def difference(d):
        return f"{d['mean']:+.1f} [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]" if d["n"] > 1 else f"{d['mean']:+.1f}"

    out = _markdown("row", columns, {name: [spread(row, t, m) for t, m in keys] for name, row in rows.items()})
    diffs = {name: [difference(row["minus_warm_start"][t][m]) for t, m in keys]
             for name, row in rows.items() if "minus_warm_start" in row}
    if diffs:
        out += "\n" + _markdown("method minus warm start", columns, diffs)
    closed = {name: [_share(row["gap_closed"][t][m]) for t, m in keys]
              for name, row in rows.items() if "gap_closed" in row}
    if closed:
        out += "\n" + _markdown("share of the teacher - warm start gap closed", columns, closed)
    return out


RUNG = ["objective=rloo", "eval.test=false", "eval.teacher=false"]
"""The rung's runs: `rloo` (the student step on the judge's own known reward), graded on the training
probe, not on the test sets, so the test evaluation is left out."""


def sanity_rung(seeds: list[int], prompts: int, config: str, overrides: list[str], out_dir: str,
                warm_start_steps: int = 100, figures: Path = FIGURES) -> dict:
    """The sanity rung (spec llm.md section 2a): the student step with the judge's own known reward in
    place of the adversary must raise answer accuracy above the warm start, over the seeds.

    The reward (``pg.reward``: answer accuracy) pays for the facts of the prompts it is given, and
    the testbed's validation and ``unseen_facts`` prompts hold none of them: they measure
    generalisation, which a reward on facts does not train. The rung therefore trains each seed from
    the shared warm start on the first ``prompts`` training prompts alone (``data.num_train``), each
    drawn about ``max_steps * batch_size / prompts`` times, and grades it on those prompts
    (``eval.train_probe``): greedy answer accuracy after the last step against the warm start's on
    the same prompts, paired over the seeds with a 95% interval. The last step is graded, not a
    checkpoint chosen on the probe, so no selection inflates it; the validation score (held-out
    facts) is recorded beside it. The rung passes when the interval lies above zero.
    -> ``figures/llm_sanity_rung.{json,md}``, rewritten after every seed."""
    if prompts < 1:
        raise ValueError(f"--rung-prompts must be >= 1, got {prompts}")
    if not seeds:
        raise ValueError("--seeds needs at least one training seed")
    start, warm = warm_start(warm_start_steps, config, overrides, out_dir)
    if warm is None:
        raise ValueError("the sanity rung starts from the warm start: give --warm-start-steps > 0")
    rung = [*RUNG, f"data.num_train={prompts}", f"eval.train_probe={prompts}"]
    cfg = load_config(config, [*overrides, *rung])
    probe = train_probe(load_data(cfg)[0], prompts)
    if len(probe) < prompts:
        raise ValueError(f"the training split has {len(probe)} distinct prompts, fewer than --rung-prompts {prompts}")
    best = (Path(out_dir) / warm["run_dir"] / "checkpoints" / "best").resolve()
    scored = evaluate_model(load_causal_lm(best).eval(), load_tokenizer(best), probe, seeds=cfg.eval.valid_seeds,
                            greedy=cfg.eval.greedy, max_new_tokens=cfg.eval.max_new_tokens,
                            batch_size=cfg.eval.batch_size, max_prompt_tokens=cfg.data.max_prompt_tokens)
    warm_row = {"probe": _scores({"probe": scored})["probe"], "valid": warm["state"]["best_valid"]}  # as validate
    runs = []
    for i, seed in enumerate(seeds):
        print(f"[experiments] sanity rung {i + 1}/{len(seeds)}: rloo seed {seed} on {prompts} prompts", flush=True)
        record = run_one(config, [*rung, f"seed={seed}", *overrides, *start], f"rung-rloo-seed{seed}", out_dir)
        lines = [json.loads(x) for x in (Path(out_dir) / record["run_dir"] / "metrics.jsonl").read_text().splitlines()]
        valid = [line for line in lines if line.get("split") == "valid"]
        runs.append({"seed": seed, "run_dir": record["run_dir"], "seconds": record["seconds"],
                     "probe": {m: valid[-1][f"train_probe_{m}"] for m in METRICS if f"train_probe_{m}" in valid[-1]},
                     "valid": valid[-1][cfg.eval.select_by],
                     "curve": [{"step": v["step"], "probe": v[f"train_probe_{cfg.eval.select_by}"],
                                "valid": v[cfg.eval.select_by]} for v in valid]})
        payload = _rung_payload(runs, warm_row, seeds, prompts, cfg, config, overrides, warm_start_steps)
        figures.mkdir(parents=True, exist_ok=True)
        _write_atomic(figures / "llm_sanity_rung.json", json.dumps(payload, indent=2) + "\n")
        _write_atomic(figures / "llm_sanity_rung.md", rung_markdown(payload))
    print(rung_markdown(payload), flush=True)
    return payload


def _rung_payload(runs, warm_row, seeds, prompts, cfg, config, overrides, warm_start_steps) -> dict:
    """The rung's record so far: the warm start's and every seed's probe scores, the paired
    differences with their 95% intervals and the verdict (None until there are two seeds)."""
    metric = cfg.eval.select_by
    diff = {m: paired_difference([r["probe"][m] for r in runs], [warm_row["probe"][m]] * len(runs))
            for m in warm_row["probe"]}
    valid_diff = paired_difference([r["valid"] for r in runs], [warm_row["valid"]] * len(runs))
    lower = diff[metric]["ci95"][0]
    return {"config": _shown(config), "command_overrides": overrides, "rung_overrides": RUNG, "seeds": seeds,
            "prompts": prompts, "max_steps": cfg.max_steps, "batch_size": cfg.batch_size,
            "draws_per_prompt": cfg.max_steps * cfg.batch_size / prompts, "metric": metric,
            "graded_on": "greedy score on the rewarded training prompts after the last step",
            "warm_start_steps": warm_start_steps, "warm_start": warm_row, "runs": runs,
            "minus_warm_start": {"probe": diff, "valid": valid_diff},
            "passes": None if math.isnan(lower) else lower > 0,
            "ci": "two-sided 95% Student-t over seeds", "complete": len(runs) == len(seeds)}


def rung_markdown(payload: dict) -> str:
    """The rung as Markdown: the probe's scores of the warm start and of every seed, the paired
    difference from the warm start with its 95% interval, and the verdict."""
    metrics = list(payload["warm_start"]["probe"])
    columns = [f"probe {_NAMES[m]}" for m in metrics] + [f"valid {_NAMES[payload['metric']]}"]
    cells = {"warm start": [f"{payload['warm_start']['probe'][m]:.1f}" for m in metrics]
             + [f"{payload['warm_start']['valid']:.1f}"]}
    for r in payload["runs"]:
        cells[f"rloo seed {r['seed']}"] = [f"{r['probe'][m]:.1f}" for m in metrics] + [f"{r['valid']:.1f}"]

    def difference(d):
        lo, hi = d["ci95"]
        return f"{d['mean']:+.1f}" + ("" if math.isnan(lo) else f" [{lo:+.1f}, {hi:+.1f}]")

    diff = payload["minus_warm_start"]
    cells["rloo minus warm start"] = [difference(diff["probe"][m]) for m in metrics] + [difference(diff["valid"])]
    verdict = {None: "no verdict yet (one seed)", True: "passes", False: "does not pass"}[payload["passes"]]
    title = (f"Sanity rung: rloo on the first {payload['prompts']} training prompts, {payload['max_steps']} steps of "
             f"{payload['batch_size']} ({payload['draws_per_prompt']:g} draws a prompt); {verdict}")
    return f"{title}\n\n" + _markdown("run", columns, cells)


def parse_size(text: str) -> list[str]:
    """A reward-model size -> the pbkd overrides that build it: ``pN`` the first N blocks of the
    teacher (``rm_init=pruned``, the testbed's kind), ``LxH`` a fresh model of L blocks of width H (4
    heads, or 1 if 4 does not divide H)."""
    text = text.lower()
    if text.startswith("p") and text[1:].isdigit() and int(text[1:]) > 0:
        return ["pbkd.rm_init=pruned", f"pbkd.rm_layers=[{', '.join(str(i) for i in range(int(text[1:])))}]"]
    try:
        layers, width = (int(v) for v in text.split("x"))
    except ValueError:
        raise ValueError(f"reward-model size {text!r} must be pN (the first N teacher blocks) or LAYERSxWIDTH "
                         "(a fresh model), e.g. p5 or 2x64") from None
    heads = 4 if width % 4 == 0 else 1
    return ["pbkd.rm_init=fresh",
            f"pbkd.rm_config={{num_hidden_layers: {layers}, hidden_size: {width}, num_attention_heads: {heads}}}"]


def _band(curves: list[list[float]]) -> dict:
    """Mean and min-max band over seeds of equally long per-round curves."""
    columns = list(zip(*curves))
    return {"mean": [sum(c) / len(c) for c in columns], "low": [min(c) for c in columns],
            "high": [max(c) for c in columns]}


def rounds_figure(sizes: list[str], rounds: int, seeds: list[int], config: str, overrides: list[str], out_dir: str,
                  warm_start_steps: int = 100, figures: Path = FIGURES, prompts: int = 64) -> dict:
    """The analogue of the paper's Figure 3: online pbkd from the warm start, ``rounds`` rounds, for
    each reward-model size (:func:`parse_size`) and seed; the score of the student after 0, 1, ...,
    T rounds (round c's entry from its ``rounds.jsonl`` line, which scores the student entering
    it, the last from the final validation), with the mean and min-max band over the seeds.

    ``prompts > 0`` trains on the first ``prompts`` training prompts and scores them (the sanity
    rung's protocol: the known reward pays for the facts of the prompts D is collected on, which
    the held-out validation facts do not hold) beside the validation score; ``prompts = 0`` trains
    on the whole split and scores validation (``eval.select_by``) alone.

    The figure's JSON is also a store of finished runs: a (size, seed) entry of an existing
    ``llm_rounds.json`` with the same protocol (rounds, prompts, config, overrides, warm start) is
    reused when ``out_dir`` holds no finished run of that name, so seeds added later, or run on
    another machine, join the earlier ones. Code changes are not detected: remove the file to redo
    every run. -> ``figures/llm_rounds.{png,json}``, rewritten after every run."""
    if not seeds:
        raise ValueError("--seeds needs at least one training seed")
    if prompts < 0:
        raise ValueError(f"--rounds-prompts must be >= 0, got {prompts}")
    builds = {size: parse_size(size) for size in sizes}
    start, _ = warm_start(warm_start_steps, config, overrides, out_dir)
    protocol = [f"data.num_train={prompts}", f"eval.train_probe={prompts}", "eval.test=false"] if prompts else []
    metric = load_config(config, [*overrides, *protocol]).eval.select_by
    scores = {"probe": f"train_probe_{metric}", "valid": metric} if prompts else {"valid": metric}
    protocol_record = {"rounds": rounds, "prompts": prompts, "config": _shown(config), "command_overrides": overrides,
                       "metric": metric, "scores": scores, "warm_start_steps": warm_start_steps}
    stored = _stored_rounds(figures / "llm_rounds.json", protocol_record)
    curves = {}
    for size, build in builds.items():
        runs = {}
        for seed in seeds:
            name = f"rounds-rm{size}-seed{seed}"
            entry = stored.get(size, {}).get("seeds", {}).get(str(seed))
            if entry is not None and not any((f / RECORD).is_file() for f in _folders(out_dir, name)):
                print(f"[experiments] rm {size} seed {seed}: reusing the entry of {figures / 'llm_rounds.json'}",
                      flush=True)
                runs[str(seed)] = entry
                continue
            record = run_one(config, ["objective=pbkd", f"online.rounds={rounds}", f"seed={seed}", *build, *protocol,
                                      *overrides, *start], name, out_dir)
            run_dir = Path(out_dir) / record["run_dir"]
            lines = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines() if x.strip()]
            last = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()
                    if x.strip() and json.loads(x).get("split") == "valid"][-1]
            runs[str(seed)] = {"run_dir": record["run_dir"], "seconds": record["seconds"], "rounds": lines,
                               **{name: [line[f"valid_{key}"] for line in lines] + [last[key]]
                                  for name, key in scores.items()}}
            print(f"[experiments] rm {size} seed {seed}: " + ", ".join(
                f"{name} {[round(v, 1) for v in runs[str(seed)][name]]}" for name in scores), flush=True)
        curves[size] = {"seeds": runs, **{name: _band([r[name] for r in runs.values()]) for name in scores}}
        payload = {**protocol_record, "seeds": seeds, "curves": curves}
        figures.mkdir(parents=True, exist_ok=True)
        _write_atomic(figures / "llm_rounds.json", json.dumps(payload, indent=2) + "\n")
        _rounds_plot(payload, figures / "llm_rounds.png")
    return payload


def _stored_rounds(path: Path, protocol: dict) -> dict:
    """The curves of the rounds figure at ``path`` when it was made under ``protocol``, else {}."""
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    return saved["curves"] if all(saved.get(k) == v for k, v in protocol.items()) else {}


def _rounds_plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(payload["scores"])
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
    x = list(range(payload["rounds"] + 1))
    title = {"probe": f"the {payload['prompts']} training prompts", "valid": "validation (held-out facts)"}
    for ax, name in zip(axes[0], names):
        for size, c in payload["curves"].items():
            line, = ax.plot(x, c[name]["mean"], marker="o", label=f"reward model {size}")
            ax.fill_between(x, c[name]["low"], c[name]["high"], color=line.get_color(), alpha=0.2)
        ax.set_xlabel("online rounds completed")
        ax.set_ylabel(f"student {payload['metric']}")
        ax.set_title(title[name])
        ax.set_xticks(x)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Online PbKD by round: mean and min-max over seeds {payload['seeds']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(prog="python -m llm.experiments",
                            description="LLM testbed experiments: the method table and the rounds figure.",
                            epilog="key=value arguments, anywhere on the line, override the config of every run")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="base YAML config (default: the CPU testbed)")
    parser.add_argument("--methods", nargs="*", default=[],
                        help=f"methods of the table: {list(METHODS)}, or 'baselines' for {list(BASELINES)}")
    parser.add_argument("--teacher-topk", type=int, default=0,
                        help=f"run {', '.join(DIVERGENCES)} on the teacher top-k cache with this k (kd.teacher_topk)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[10, 20, 30, 40, 50], help="training seeds")
    parser.add_argument("--warm-start-steps", type=int, default=100,
                        help="sft steps of the shared starting student (0 = start from the config's student)")
    parser.add_argument("--rounds-figure", action="store_true", help="run the round-by-round figure")
    parser.add_argument("--rm-sizes", nargs="*", default=["p5", "p10", "p15"],
                        help="reward-model sizes of the rounds figure: pN (first N teacher blocks) or LxH (fresh)")
    parser.add_argument("--rounds-prompts", type=int, default=64,
                        help="training prompts of the rounds figure, scored beside validation (0 = the whole split)")
    parser.add_argument("--rounds", type=int, default=4, help="online rounds of the rounds figure")
    parser.add_argument("--sanity-rung", action="store_true",
                        help="run the sanity rung: rloo on the known reward, graded on the prompts it is rewarded on")
    parser.add_argument("--rung-prompts", type=int, default=64, help="training prompts of the sanity rung")
    parser.add_argument("--out-dir", default="runs/experiments", help="parent folder of the runs")
    parser.add_argument("--figures-dir", default=str(FIGURES), help="where the JSON/Markdown/PNG results go")
    argv = sys.argv[1:] if argv is None else list(argv)
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]  # key=value, anywhere on the line
    args = parser.parse_args([a for a in argv if a not in overrides])
    args.overrides = overrides
    args.methods = [m for name in args.methods for m in (BASELINES if name == "baselines" else [name])]
    if args.teacher_topk < 0:
        parser.error(f"--teacher-topk must be >= 0, got {args.teacher_topk}")
    if not args.methods and not args.rounds_figure and not args.sanity_rung:
        parser.error("give --methods, --rounds-figure and/or --sanity-rung")
    if args.rounds_prompts < 0:
        parser.error(f"--rounds-prompts must be >= 0, got {args.rounds_prompts}")
    with refusing_bad_input():
        for size in args.rm_sizes if args.rounds_figure else []:
            parse_size(size)
    if args.rung_prompts < 1:
        parser.error(f"--rung-prompts must be >= 1, got {args.rung_prompts}")
    if args.sanity_rung and args.warm_start_steps == 0:
        parser.error("the sanity rung starts from the warm start: give --warm-start-steps > 0")
    if args.warm_start_steps < 0:
        parser.error(f"--warm-start-steps must be >= 0, got {args.warm_start_steps}")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; valid methods: {list(METHODS)}")
    if (args.methods or args.sanity_rung) and not args.seeds:
        parser.error("--seeds needs at least one training seed")
    with refusing_bad_input():  # every run's config is checked before the first run trains
        for method in args.methods or ["sft"]:
            topk = [f"kd.teacher_topk={args.teacher_topk}"] if args.teacher_topk and method in DIVERGENCES else []
            load_config(args.config, [*METHODS[method], *topk, *args.overrides])
    out = {}
    if args.methods:
        out["table"] = comparison_table(args.methods, args.seeds, args.config, args.overrides, args.out_dir,
                                        args.warm_start_steps, Path(args.figures_dir), args.teacher_topk)
    if args.sanity_rung:
        out["sanity_rung"] = sanity_rung(args.seeds, args.rung_prompts, args.config, args.overrides, args.out_dir,
                                         args.warm_start_steps, Path(args.figures_dir))
    if args.rounds_figure:
        out["rounds"] = rounds_figure(args.rm_sizes, args.rounds, args.seeds, args.config, args.overrides,
                                      args.out_dir, args.warm_start_steps, Path(args.figures_dir), args.rounds_prompts)
    return out


if __name__ == "__main__":
    main()

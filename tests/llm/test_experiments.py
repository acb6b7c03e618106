"""Tests of `llm/experiments.py`: the comparison table, the rounds figure and the sanity rung, on
tiny models (the tiny assets of `conftest.py`), with the warm start, reuse and resume of runs."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest
import yaml

from llm import experiments
from llm import train as trainer
from llm.config import load_config
from llm.data import load_jsonl
from llm.evaluate import evaluate_model
from llm.models import load_causal_lm, load_tokenizer


def _base_config(assets, tmp_path) -> str:
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(assets.config(tmp_path)))
    return str(path)


def _after(run_dir: Path) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    return next(v for k, v in results.items() if k.startswith("student (after"))["test"]


def test_comparison_table_is_the_runs_from_one_warm_start_and_reuses_finished_runs(pbkd_assets, tmp_path, monkeypatch):
    config, out, figures = _base_config(pbkd_assets, tmp_path), tmp_path / "experiments", tmp_path / "figures"
    payload = experiments.comparison_table(["sft", "pbkd_offline"], [1, 2, 3], config, ["max_steps=2"], str(out),
                                           warm_start_steps=2, figures=figures)
    rows = payload["rows"]
    assert list(rows) == ["student before training", "warm start (sft, 2 steps)", "sft", "pbkd_offline",
                          f"teacher ({pbkd_assets.root / 'teacher'}, as given)"]
    warm_best = (out / "warm-start" / "checkpoints" / "best").resolve()
    warm = {m: v for m, v in _after(out / "warm-start").items() if m in ("rouge_l", "exact_match")}
    assert rows["warm start (sft, 2 steps)"]["scores"]["test"] == warm
    for method in ("sft", "pbkd_offline"):
        scores = []
        for seed in (1, 2, 3):
            run_dir = out / f"{method}-seed{seed}"
            cfg = json.loads((run_dir / "config.json").read_text())
            assert cfg["student_init"] == "pretrained" and Path(cfg["student"]).resolve() == warm_best
            assert cfg["seed"] == seed and cfg["max_steps"] == 2 and cfg["eval"]["before"] is False
            scores.append(_after(run_dir)["exact_match"])
        summary = rows[method]["scores"]["test"]
        assert summary["exact_match"] == pytest.approx(statistics.mean(scores))
        assert summary["exact_match_std"] == pytest.approx(statistics.stdev(scores))
        assert [r["scores"]["test"]["exact_match"] for r in payload["runs"][method]] == scores
        # the paired difference from the warm start, with the two-sided 95% t interval over the 3 seeds
        diff = rows[method]["minus_warm_start"]["test"]["exact_match"]
        d = [v - warm["exact_match"] for v in scores]
        half = 4.302652729911275 * statistics.stdev(d) / 3 ** 0.5  # t_{0.975, 2}
        assert diff["mean"] == pytest.approx(statistics.mean(d)) and diff["n"] == 3
        assert diff["ci95"] == pytest.approx([statistics.mean(d) - half, statistics.mean(d) + half])
    on_disk = json.loads((figures / "llm_methods.json").read_text())
    assert on_disk["rows"] == rows and on_disk["complete"] is True and on_disk["timing_seconds"]["runs"] > 0
    markdown = (figures / "llm_methods.md").read_text()
    assert "| pbkd_offline |" in markdown and "| method minus warm start |" in markdown

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(experiments, "train", no_training)
    again = experiments.comparison_table(["sft", "pbkd_offline"], [1, 2, 3], config, ["max_steps=2"], str(out),
                                         warm_start_steps=2, figures=figures)
    assert again["rows"] == rows


def test_paired_difference_interval_covers_at_the_stated_rate():
    """The 95% interval of paired_difference covers the true mean difference about 95% of the time
    (a z quantile in place of t, or the std in place of the standard error, fails this)."""
    rng = random.Random(0)
    trials, covered = 4000, 0
    for _ in range(trials):
        values = [rng.gauss(1.0, 2.0) for _ in range(5)]
        lo, hi = experiments.paired_difference(values, [0.0] * 5)["ci95"]
        covered += lo <= 1.0 <= hi
    assert 0.93 < covered / trials < 0.97


def test_run_one_resumes_a_stopped_run_and_refuses_other_overrides(pbkd_assets, tmp_path):
    config, out = _base_config(pbkd_assets, tmp_path), tmp_path / "experiments"
    overrides = ["objective=sft", "max_steps=4", "save_every=1"]
    stopped = trainer.train(load_config(config, [*overrides, "stop_after=2", "run_name=r", f"out_dir={out}"]))
    assert stopped["results"] is None and stopped["state"]["step"] == 2
    record = experiments.run_one(config, overrides, "r", str(out))
    assert record["resumed"] is True and record["state"]["step"] == 4 and record["run_dir"] == "r"
    assert json.loads((out / "r" / experiments.RECORD).read_text()) == record
    same = experiments.run_one(config, ["max_steps=9", *overrides], "r", str(out))  # the same config, spelt otherwise
    assert same == record
    with pytest.raises(ValueError, match=r"another config \(differing: \['max_steps'\]\).*another --out-dir"):
        experiments.run_one(config, ["objective=sft", "max_steps=3", "save_every=1"], "r", str(out))


def test_run_one_trains_beside_an_unfinished_run_without_checkpoint_and_finds_it_again(pbkd_assets, tmp_path,
                                                                                       monkeypatch):
    config, out = _base_config(pbkd_assets, tmp_path), tmp_path / "experiments"
    (out / "r").mkdir(parents=True)
    (out / "r" / "metrics.jsonl").write_text("")  # killed before its first checkpoint
    record = experiments.run_one(config, ["objective=sft", "max_steps=2"], "r", str(out))
    assert record["run_dir"] == "r-1" and record["resumed"] is False
    assert (out / "r" / "metrics.jsonl").read_text() == ""  # the unfinished run is left as it was
    monkeypatch.setattr(experiments, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert experiments.run_one(config, ["objective=sft", "max_steps=2"], "r", str(out)) == record


def test_rounds_figure_reads_each_rounds_scores_and_bands_them_over_the_seeds(word_assets, tmp_path):
    """Online pbkd on the word-level task, two sizes by two seeds: per run, the curve is the probe and
    validation scores of each round's line (the student entering it) then of the last validation;
    the band is the mean and min-max over the seeds. The scores move between rounds and seeds (the
    first check), so a curve read off the wrong lines, or a band over the wrong axis, fails here."""
    config, out, figures = str(word_assets.config(tmp_path, "pbkd")), tmp_path / "experiments", tmp_path / "figures"
    payload = experiments.rounds_figure(["1x16", "p1"], 2, [3, 4], config, ["max_steps=8"], str(out),
                                        warm_start_steps=0, figures=figures, prompts=4)
    values = [v for c in payload["curves"].values() for r in c["seeds"].values() for v in r["probe"] + r["valid"]]
    assert len(set(values)) > 3, values
    assert set(payload["curves"]) == {"1x16", "p1"} and payload["scores"] == {"probe": "train_probe_rouge_l",
                                                                              "valid": "rouge_l"}
    for size, curve in payload["curves"].items():
        for seed in (3, 4):
            run_dir = out / f"rounds-rm{size}-seed{seed}"
            rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
            valid = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            last = [v for v in valid if v.get("split") == "valid"][-1]
            assert [r["round"] for r in rounds] == [0, 1] and last["step"] == 8
            run = curve["seeds"][str(seed)]
            assert run["valid"] == [r["valid_rouge_l"] for r in rounds] + [last["rouge_l"]]
            assert run["probe"] == [r["valid_train_probe_rouge_l"] for r in rounds] + [last["train_probe_rouge_l"]]
            cfg = json.loads((run_dir / "config.json").read_text())
            assert cfg["online"]["rounds"] == 2 and cfg["data"]["num_train"] == 4 and cfg["eval"]["train_probe"] == 4
            if size == "p1":
                assert cfg["pbkd"]["rm_init"] == "pruned" and cfg["pbkd"]["rm_layers"] == [0]
            else:
                assert cfg["pbkd"]["rm_init"] == "fresh" and cfg["pbkd"]["rm_config"]["hidden_size"] == 16
        for name in ("probe", "valid"):
            per_seed = [curve["seeds"][s][name] for s in ("3", "4")]
            assert curve[name]["mean"] == pytest.approx([(a + b) / 2 for a, b in zip(*per_seed)])
            assert curve[name]["low"] == [min(a, b) for a, b in zip(*per_seed)]
            assert curve[name]["high"] == [max(a, b) for a, b in zip(*per_seed)]
    assert (figures / "llm_rounds.png").stat().st_size > 0
    assert json.loads((figures / "llm_rounds.json").read_text())["curves"] == payload["curves"]


def test_rounds_figure_reuses_the_stored_entries_of_its_own_protocol_only(word_assets, tmp_path, monkeypatch):
    """A (size, seed) entry of an existing llm_rounds.json made under the same protocol is reused
    and banded with the rest; one made under another protocol (here other overrides) is not, and
    a finished run in out_dir comes before the stored entry. Reusing across protocols, or not at
    all, fails here."""
    config, out, figures = str(word_assets.config(tmp_path, "pbkd")), tmp_path / "experiments", tmp_path / "figures"
    figures.mkdir()
    entry = {"run_dir": "rounds-rm1x16-seed3", "seconds": 1.0, "rounds": [], "probe": [10.0, 30.0],
             "valid": [5.0, 7.0]}
    protocol = {"rounds": 1, "prompts": 4, "config": experiments._shown(config), "command_overrides": ["max_steps=8"],
                "metric": "rouge_l", "scores": {"probe": "train_probe_rouge_l", "valid": "rouge_l"},
                "warm_start_steps": 0}
    other = {**entry, "probe": [20.0, 50.0]}
    stored = {**protocol, "seeds": [3, 4], "curves": {"1x16": {"seeds": {"3": entry, "4": other}}}}
    (figures / "llm_rounds.json").write_text(json.dumps(stored))

    def trained(*args, **kwargs):
        raise AssertionError("trained")

    monkeypatch.setattr(experiments, "run_one", trained)
    payload = experiments.rounds_figure(["1x16"], 1, [4, 3], config, ["max_steps=8"], str(out),
                                        warm_start_steps=0, figures=figures, prompts=4)
    curve = payload["curves"]["1x16"]
    assert curve["seeds"] == {"4": other, "3": entry} and payload["seeds"] == [4, 3]
    assert curve["probe"] == {"mean": [15.0, 40.0], "low": [10.0, 30.0], "high": [20.0, 50.0]}
    assert json.loads((figures / "llm_rounds.json").read_text())["curves"] == payload["curves"]
    with pytest.raises(AssertionError, match="trained"):  # another protocol: nothing is reused
        experiments.rounds_figure(["1x16"], 1, [3], config, ["max_steps=9"], str(out),
                                  warm_start_steps=0, figures=figures, prompts=4)
    (out / "rounds-rm1x16-seed3").mkdir(parents=True)
    (out / "rounds-rm1x16-seed3" / experiments.RECORD).write_text("{}")
    with pytest.raises(AssertionError, match="trained"):  # a finished run in out_dir is read, not the store
        experiments.rounds_figure(["1x16"], 1, [3], config, ["max_steps=8"], str(out),
                                  warm_start_steps=0, figures=figures, prompts=4)


def test_unknown_methods_and_sizes_are_refused_with_the_valid_choices(tmp_path):
    with pytest.raises(ValueError, match="valid methods: .*pbkd_online"):
        experiments.comparison_table(["ppo"], [1], "unused.yaml", [], str(tmp_path))
    for bad in ("wide", "p0", "p", "2x"):
        with pytest.raises(ValueError, match="pN .* or LAYERSxWIDTH"):
            experiments.parse_size(bad)


def test_command_line_takes_overrides_anywhere(monkeypatch):
    seen = {}
    monkeypatch.setattr(experiments, "comparison_table", lambda *args: seen.setdefault("args", args))
    experiments.main(["--methods", "fkl", "dpkd", "--seeds", "10", "20", "max_steps=100", "eval.before=false",
                      "--warm-start-steps", "7"])
    methods, seeds, _, overrides, _, warm_steps, _, topk = seen["args"]
    assert methods == ["fkl", "dpkd"] and seeds == [10, 20] and warm_steps == 7 and topk == 0
    assert overrides == ["max_steps=100", "eval.before=false"]


def test_figures_record_configs_inside_the_repository_by_relative_path(tmp_path):
    assert experiments._shown(str(experiments.REPO / "llm" / "configs" / "testbed.yaml")) == "llm/configs/testbed.yaml"
    assert experiments._shown(str(tmp_path / "base.yaml")) == str(tmp_path / "base.yaml")


def test_baselines_expand_and_teacher_topk_reaches_only_the_divergences(monkeypatch):
    seen = {}
    monkeypatch.setattr(experiments, "comparison_table", lambda *args: seen.setdefault("args", args))
    experiments.main(["--methods", "baselines", "--teacher-topk", "32", "--seeds", "10"])
    methods, *_, topk = seen["args"]
    assert methods == list(experiments.BASELINES) and topk == 32
    assert set(experiments.DIVERGENCES) < set(experiments.BASELINES)


def test_gap_closed_is_the_paired_difference_over_the_teacher_minus_warm_start_gap():
    minus = {"t": {"answer_accuracy": {"mean": 5.0, "ci95": [1.0, 9.0], "n": 5},
                   "rouge_l": {"mean": 1.0, "ci95": [0.0, 2.0], "n": 5}}}
    warm, teacher = {"t": {"answer_accuracy": 20.0, "rouge_l": 80.0}}, {"t": {"answer_accuracy": 70.0, "rouge_l": 75.0}}
    closed = experiments.gap_closed(minus, warm, teacher)
    acc = closed["t"]["answer_accuracy"]
    assert acc["mean"] == pytest.approx(0.1) and acc["ci95"] == pytest.approx([0.02, 0.18]) and acc["gap"] == 50.0
    assert closed["t"]["rouge_l"] is None  # the teacher is below the warm start: no gap to close


@pytest.mark.parametrize("fault", [None, "flipped"])
def test_sanity_rung_grades_rloo_on_its_rewarded_prompts_and_fails_a_flipped_student(word_assets, plant_student_fault,
                                                                                     tmp_path, fault):
    """The rung trains rloo from the warm start on the first prompts of the training split and grades
    the last step's probe (those prompts) against the warm start's: the word task's known reward
    (Rouge-L) rises and the rung passes; with the student's loss negated it must not pass."""
    if fault is not None:
        plant_student_fault(fault)
    config, out, figures = str(word_assets.config(tmp_path, "rloo")), tmp_path / "rung", tmp_path / "figures"
    payload = experiments.sanity_rung([3, 4, 5], 8, config, ["eval.every=15", "eval.select_by=rouge_l"], str(out),
                                      warm_start_steps=2, figures=figures)
    warm_best = (out / "warm-start" / "checkpoints" / "best").resolve()
    for run in payload["runs"]:
        run_dir = out / run["run_dir"]
        cfg = json.loads((run_dir / "config.json").read_text())
        assert cfg["objective"] == "rloo" and cfg["data"]["num_train"] == 8 and cfg["eval"]["train_probe"] == 8
        assert Path(cfg["student"]).resolve() == warm_best and cfg["seed"] == run["seed"]
        valid = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        last = [v for v in valid if v["split"] == "valid"][-1]
        assert last["step"] == 30 and run["probe"]["rouge_l"] == last["train_probe_rouge_l"]
    cfg, probe, prompts = load_config(config), [], set()  # the warm start on the first 8 distinct training prompts
    for ex in load_jsonl(word_assets / "train.jsonl"):
        if ex.prompt not in prompts:
            prompts.add(ex.prompt)
            probe.append(ex)
    warm = evaluate_model(load_causal_lm(str(warm_best)), load_tokenizer(str(warm_best)), probe[:8],
                          seeds=cfg.eval.valid_seeds, greedy=cfg.eval.greedy, max_new_tokens=cfg.eval.max_new_tokens,
                          batch_size=cfg.eval.batch_size, max_prompt_tokens=cfg.data.max_prompt_tokens)
    assert payload["warm_start"]["probe"]["rouge_l"] == pytest.approx(warm["rouge_l"])
    diff = payload["minus_warm_start"]["probe"]["rouge_l"]
    gains = [r["probe"]["rouge_l"] - payload["warm_start"]["probe"]["rouge_l"] for r in payload["runs"]]
    assert diff["mean"] == pytest.approx(statistics.mean(gains)) and diff["n"] == 3
    assert payload["passes"] is (diff["ci95"][0] > 0)
    assert json.loads((figures / "llm_sanity_rung.json").read_text()) == payload
    if fault is None:
        assert payload["passes"] is True and min(gains) > 20, gains
        assert "passes" in (figures / "llm_sanity_rung.md").read_text()
    else:
        assert payload["passes"] is False, gains


def test_sanity_rung_refuses_no_prompts_and_no_seeds(tmp_path):
    with pytest.raises(ValueError, match="--rung-prompts must be >= 1"):
        experiments.sanity_rung([1], 0, "unused.yaml", [], str(tmp_path))
    with pytest.raises(ValueError, match="--seeds needs at least one"):
        experiments.sanity_rung([], 8, "unused.yaml", [], str(tmp_path))
    for argv in (["--sanity-rung", "--warm-start-steps", "0"], ["--sanity-rung", "--rung-prompts", "0"]):
        with pytest.raises(SystemExit) as refused:
            experiments.main(argv)
        assert refused.value.code == 2

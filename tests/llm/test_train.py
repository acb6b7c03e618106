"""Tests of the training stack, `llm/config.py` and `llm/train.py` (spec llm.md sections 2, 5, 6).

Models are small randomly initialised GPT-2 and OPT configs saved to a temporary folder with
the real GPT-2 tokenizer (environment.md); the data is a tiny generated Dolly-format set.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llm import config as config_module
from llm import train as trainer
from llm.config import OBJECTIVES, TrainConfig, load_config
from llm.data import load_jsonl
from llm.models import gpt2_tokenizer_dir, load_causal_lm, load_tokenizer, tiny_config

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO / "llm" / "train.py"

WORDS = "red green blue cat dog sun moon tree river stone apple bread lamp cloud".split()
GPT2_EOS = 50256


def _save_model(folder: Path, family: str, seed: int, tokenizer, dropout: float = 0.0, **overrides):
    if family == "gpt2":
        overrides |= dict(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    else:
        overrides |= dict(dropout=dropout, attention_dropout=dropout, bos_token_id=GPT2_EOS,
                          eos_token_id=GPT2_EOS, pad_token_id=GPT2_EOS)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer), **overrides))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _write_data(folder: Path) -> None:
    """Dolly-format splits; responses of 1 to 6 words, so micro-batches differ in token counts."""
    import random

    rng = random.Random(0)
    for split, n in (("train", 48), ("valid", 4), ("test", 4)):
        with open(folder / f"{split}.jsonl", "w") as handle:
            for _ in range(n):
                words = rng.sample(WORDS, rng.randint(1, 6))
                record = {"instruction": "Repeat these words.", "context": " ".join(words),
                          "response": " ".join(words), "category": "repeat"}
                handle.write(json.dumps(record) + "\n")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_assets")
    tokenizer = load_tokenizer(gpt2_tokenizer_dir())
    paths = {
        "teacher": _save_model(root / "teacher", "gpt2", 1, tokenizer),
        "student": _save_model(root / "student", "gpt2", 2, tokenizer),
        "student_dropout": _save_model(root / "student_dropout", "gpt2", 3, tokenizer, dropout=0.1),
        "opt_teacher": _save_model(root / "opt_teacher", "opt", 4, tokenizer),
        "opt_student": _save_model(root / "opt_student", "opt", 5, tokenizer),
    }
    other = load_tokenizer(gpt2_tokenizer_dir())
    other.add_tokens(["<extra_token>"])  # a different vocabulary (50,258 tokens)
    paths["other_vocab_student"] = _save_model(root / "other_vocab_student", "gpt2", 6, other)
    _write_data(root)
    paths["root"] = root
    return paths


def _config(assets, tmp_path, **overrides) -> dict:
    root = assets["root"]
    cfg = {
        "run_name": "run", "out_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"),
        "teacher": str(assets["teacher"]), "student": str(assets["student"]), "student_init": "pretrained",
        "objective": "fkl",
        "data": {"source": "files", "train_file": str(root / "train.jsonl"), "valid_file": str(root / "valid.jsonl"),
                 "test_file": str(root / "test.jsonl"), "max_prompt_tokens": 64, "max_length": 96},
        "generation": {"max_new_tokens": 6, "batch_size": 8},
        "eval": {"every": 0, "valid_seeds": [10], "test_seeds": [10], "max_new_tokens": 4, "batch_size": 8,
                 "before": False, "teacher": False},
        "optim": {"lr": 1e-3, "schedule": "constant"},
        "batch_size": 8, "max_steps": 3, "log_every": 1, "save_every": 0,
        "num_threads": 1,  # tiny models: one thread is fastest, and deterministic across processes
    }
    for key, value in overrides.items():
        section = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            section = section.setdefault(p, {})
        section[leaf] = value
    return cfg


def _write_config(tmp_path, cfg: dict, name="config.yaml") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(assets, tmp_path, **overrides) -> dict:
    cfg = load_config(_write_config(tmp_path, _config(assets, tmp_path, **overrides)))
    return trainer.train(cfg)


def _records(run_dir, split="train") -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def _weights(run_dir, which="latest") -> dict:
    return load_file(str(Path(run_dir) / "checkpoints" / which / "model.safetensors"))


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


def test_config_file_and_dotted_overrides(tmp_path):
    path = _write_config(tmp_path, {"objective": "jsd", "kd": {"jsd_beta": 0.3}, "student_init": "pruned",
                                    "student_layers": [0, 2]})
    cfg = load_config(path, ["kd.jsd_beta=0.9", "online.rounds=2", "optim.lr=1e-4", "eval.test_seeds=[1, 2]",
                             "dpkd.length_normalize=false", "optim.weight_decay=0"])
    assert cfg.objective == "jsd" and cfg.kd.jsd_beta == 0.9 and cfg.online.rounds == 2
    assert cfg.optim.lr == 1e-4 and cfg.eval.test_seeds == [1, 2] and cfg.dpkd.length_normalize is False
    assert isinstance(cfg.optim.weight_decay, float) and cfg.student_layers == [0, 2]
    # defaults are untouched elsewhere
    assert cfg.kd.akl_mu == TrainConfig().kd.akl_mu


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["objective=pbkdx"], "valid choices: ['sft', 'seqkd', 'fkl'"),
        (["learning_rate=1"], "unknown config key 'learning_rate'; valid keys: ["),
        (["kd.betaa=1"], "unknown config key 'kd.betaa'; valid keys of kd: ['akl_mu'"),
        (["dpkd.variant=kto"], "valid choices: ['dpo', 'ipo', 'simpo', 'cpo']"),
        (["distributed=horovod"], "valid choices: ['none', 'ddp', 'fsdp', 'deepspeed']"),
        (["batch_size=eight"], "expects a int"),
        (["kd=3"], "must be a mapping"),
        (["batch_size"], "not of the form key=value"),
        (["kd.on_policy_fraction=1.5"], "must lie in [0, 1]"),
        (["batch_size=6", "grad_accum=4"], "multiple of grad_accum"),
    ],
)
def test_config_refuses_bad_input_with_the_valid_choices(tmp_path, overrides, message):
    path = _write_config(tmp_path, {"student_init": "pruned", "student_layers": [0]})
    with pytest.raises(ValueError) as err:
        load_config(path, overrides)
    assert message in str(err.value)


def test_config_file_with_unknown_key_is_refused(tmp_path):
    path = _write_config(tmp_path, {"data": {"train_fle": "x.jsonl"}})
    with pytest.raises(ValueError, match=r"unknown config key 'data.train_fle'; valid keys of data: \[.*'train_file'"):
        load_config(path)


def test_objective_registry_resolves_every_name_and_is_the_config_choices():
    """One registry: every name resolves to an Objective class, and the config offers exactly these names."""
    from llm.objectives.base import REGISTRY, Objective, objective_class

    for name in REGISTRY:
        assert issubclass(objective_class(name), Objective), name
    field = {f.name: f for f in __import__("dataclasses").fields(TrainConfig)}["objective"]
    assert field.metadata["choices"] == OBJECTIVES == tuple(REGISTRY)


def test_reading_a_config_loads_no_torch():
    """`llm/config.py` validates objectives and judges from names only (a fresh interpreter)."""
    code = ("import sys; from llm.config import load_config; load_config(None, ['objective=pbkd', 'pbkd.judge=rouge']); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_shipped_configs_parse():
    for path in sorted((REPO / "llm" / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.objective in OBJECTIVES, path
    testbed = load_config(REPO / "llm" / "configs" / "testbed.yaml")
    assert testbed.teacher == "smollm2-135m-instruct" and testbed.data.source == "testbed"
    assert Path(trainer.DEFAULT_CONFIG).name == "testbed.yaml"


def test_cli_refuses_unknown_objective_at_start(tmp_path):
    """Refused before any model is loaded: the script exits quickly with the list of objectives."""
    result = subprocess.run([sys.executable, str(TRAIN_SCRIPT), "objective=nope"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode != 0
    assert f"config key 'objective' = 'nope' is not a valid choice; valid choices: {list(OBJECTIVES)}" in result.stderr
    assert "Loading weights" not in result.stderr  # refused before any model was loaded


def test_deepspeed_is_gated_with_a_clear_error(monkeypatch, assets, tmp_path):
    real = trainer.importlib.util.find_spec
    monkeypatch.setattr(trainer.importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else real(name, *a))
    cfg = load_config(_write_config(tmp_path, _config(assets, tmp_path, distributed="deepspeed")))
    with pytest.raises(ValueError, match="needs the deepspeed package.*distributed=ddp or distributed=fsdp"):
        trainer.train(cfg)


# ---------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------

TOKEN_DIAGNOSTICS = {"fkl", "rkl", "jsd", "cross_entropy", "teacher_entropy", "student_entropy"}
DPKD_DIAGNOSTICS = {"reward_teacher", "reward_student", "margin", "student_logp_own", "lm_loss"}

OBJECTIVE_CASES = [
    ("sft", {}),
    ("seqkd", {}),
    ("fkl", {}),
    ("rkl", {"student_init": "pruned", "student_layers": [1]}),
    ("jsd", {"kd.jsd_beta": 0.3, "kd.prefix": "teacher"}),
    ("skl", {"student_init": "fresh",
             "student_config": {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2}}),
    ("srkl", {}),
    ("akl", {}),
    ("dpkd", {}),
    ("dpkd", {"dpkd.variant": "ipo", "dpkd.length_normalize": False}),
    ("dpkd", {"dpkd.variant": "simpo", "dpkd.gamma": 0.5, "dpkd.lambda_lm": 0.0}),
    ("dpkd", {"dpkd.variant": "cpo"}),
    ("fkl", {"teacher": "opt_teacher", "student": "opt_student"}),
]


@pytest.mark.parametrize("objective, overrides", OBJECTIVE_CASES,
                         ids=[f"{o}-{i}" for i, (o, _) in enumerate(OBJECTIVE_CASES)])
def test_each_objective_trains_and_lowers_its_loss(assets, tmp_path, objective, overrides):
    """A few steps on one fixed batch of 8 (num_train=8): the objective's own loss falls, the
    logged diagnostics are present and finite, and the best checkpoint is a loadable HF folder."""
    overrides = {k: (str(assets[v]) if k in ("teacher", "student") else v) for k, v in overrides.items()}
    result = _train(assets, tmp_path, objective=objective, **{"data.num_train": 8, "max_steps": 4}, **overrides)
    records = _records(result["run_dir"])
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    losses_ = [r["loss"] for r in records]
    assert all(math.isfinite(v) for r in records for v in r.values() if isinstance(v, float))
    assert losses_[-1] < losses_[0], losses_
    expected = DPKD_DIAGNOSTICS if objective == "dpkd" else TOKEN_DIAGNOSTICS
    if overrides.get("dpkd.lambda_lm") == 0.0:
        expected = expected - {"lm_loss"}
    assert expected <= set(records[-1])
    if objective == "dpkd":  # DPKD raises the teacher response's implicit reward over the student's
        assert records[-1]["margin"] > records[0]["margin"]
    # the best checkpoint loads with the project's loader and holds the saved weights
    best = Path(result["run_dir"]) / "checkpoints" / "best"
    model = load_causal_lm(best.resolve())
    saved = _weights(result["run_dir"], "best")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert result["results"] is not None and (Path(result["run_dir"]) / "results.md").is_file()


def test_on_policy_fraction_samples_from_the_student(assets, tmp_path):
    """GKD's lambda: with lambda=1 every batch is on-policy, with lambda=0 none is."""
    on = _records(_train(assets, tmp_path / "on", objective="rkl", **{"kd.on_policy_fraction": 1.0})["run_dir"])
    off = _records(_train(assets, tmp_path / "off", objective="rkl", **{"kd.on_policy_fraction": 0.0})["run_dir"])
    assert [r["on_policy"] for r in on] == [1.0, 1.0, 1.0]
    assert [r["on_policy"] for r in off] == [0.0, 0.0, 0.0]
    assert on[0]["loss"] != off[0]["loss"]  # different prefixes, different losses


def test_the_training_probe_scores_the_first_distinct_training_prompts_at_every_validation(assets, tmp_path,
                                                                                          monkeypatch):
    """eval.train_probe=3: every validation also scores the first 3 distinct training prompts, logged as
    train_probe_<metric> (a probe drawn from the validation split or from other training prompts, or
    scores not those of the probe's own evaluation, fail here), and the selection stays on valid."""
    from llm import run as run_module

    calls, real = [], run_module.evaluate_model

    def recording(model, tokenizer, examples, **kwargs):
        metrics = real(model, tokenizer, examples, **kwargs)
        calls.append(([ex.prompt for ex in examples], metrics))
        return metrics

    monkeypatch.setattr(run_module, "evaluate_model", recording)
    result = _train(assets, tmp_path, objective="sft", max_steps=2, **{"eval.every": 1, "eval.train_probe": 3})
    train_data, probe = load_jsonl(assets["root"] / "train.jsonl"), []
    for ex in train_data:
        if ex.prompt not in probe:
            probe.append(ex.prompt)
    valid_prompts = [ex.prompt for ex in load_jsonl(assets["root"] / "valid.jsonl")]
    assert [prompts for prompts, _ in calls] == [valid_prompts, probe[:3]] * 2
    valid = _records(result["run_dir"], "valid")
    assert [r["step"] for r in valid] == [1, 2]
    for record, (_, v), (_, t) in zip(valid, calls[0::2], calls[1::2]):
        assert record["rouge_l"] == v["rouge_l"] and record["train_probe_rouge_l"] == t["rouge_l"]
    assert [s for _, s in result["state"]["valid_history"]] == [r["rouge_l"] for r in valid]


def test_teacher_responses_are_generated_once_and_cached(assets, tmp_path):
    cfg = _config(assets, tmp_path, objective="seqkd", max_steps=2)
    first = trainer.train(load_config(_write_config(tmp_path, cfg)))
    cache = list((tmp_path / "cache" / "teacher_responses").glob("*.jsonl"))
    assert len(cache) == 1
    train_data = load_jsonl(assets["root"] / "train.jsonl")
    used = {train_data[i].prompt for s in range(2) for i in trainer.global_batch_indices(s, 8, len(train_data), 0)}
    lines = cache[0].read_text().splitlines()
    assert sorted(json.loads(line)["prompt"] for line in lines) == sorted(used)  # each used prompt once
    stamp = cache[0].stat().st_mtime_ns
    second = trainer.train(load_config(_write_config(tmp_path, cfg)))  # a new run folder, same cache
    assert second["run_dir"] != first["run_dir"]
    assert cache[0].stat().st_mtime_ns == stamp  # nothing regenerated


def test_teacher_sft_fine_tunes_the_teacher_once_and_the_run_distils_from_it(assets, tmp_path, monkeypatch):
    cfg = _config(assets, tmp_path, objective="fkl", max_steps=2, teacher_sft={"steps": 3, "lr": 1e-3},
                  **{"eval.teacher": True})
    first = trainer.train(load_config(_write_config(tmp_path, cfg)))
    (folder,) = (p.parent for p in (tmp_path / "cache" / "teacher_sft").glob("*/done.json"))
    done = json.loads((folder / "done.json").read_text())
    assert done["steps"] == 3 and done["teacher"] == str(assets["teacher"])
    tuned = load_file(str(folder / "run" / "checkpoints" / "best" / "model.safetensors"))
    base = load_file(str(assets["teacher"] / "model.safetensors"))
    assert any(not torch.equal(tuned[k], base[k]) for k in tuned)  # the fine-tune moved the teacher
    # the run's config keeps the teacher as given; its caches key on the fine-tuned folder
    saved = json.loads((Path(first["run_dir"]) / "config.json").read_text())
    assert saved["teacher"] == str(assets["teacher"]) and saved["teacher_sft"]["steps"] == 3
    evals = list((tmp_path / "cache" / "teacher_eval").glob("*.json"))
    assert len(evals) == 1
    assert first["results"]["teacher"] == trainer.evaluate_teacher(load_config(_write_config(tmp_path, cfg)))
    as_given = trainer.evaluate_teacher(load_config(_write_config(tmp_path, {**cfg, "teacher_sft": {"steps": 0}})))
    assert len(list((tmp_path / "cache" / "teacher_eval").glob("*.json"))) == 2 and as_given["test"]
    # another seed distils the same teacher: no second fine-tune
    monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("the teacher was fine-tuned again"))
    assert trainer.finetuned_teacher(load_config(_write_config(tmp_path, {**cfg, "seed": 7})), 1) == str(
        (folder / "run" / "checkpoints" / "best").resolve())


def test_a_pruned_student_is_cut_from_the_teacher_as_given(assets, tmp_path):
    cfg = load_config(_write_config(tmp_path, _config(assets, tmp_path, student_init="pruned", student_layers=[0])))
    other = _save_model(tmp_path / "other_teacher", "gpt2", 9, load_tokenizer(gpt2_tokenizer_dir()))
    teacher, _, student, _ = trainer.build_models(cfg, torch.device("cpu"), str(other))
    base = load_causal_lm(assets["teacher"])
    assert torch.equal(student.transformer.wte.weight, base.transformer.wte.weight)
    assert not torch.equal(teacher.transformer.wte.weight, base.transformer.wte.weight)


@pytest.mark.parametrize("greedy, files", [(True, 1), (False, 2)])
def test_greedy_teacher_responses_are_shared_across_seeds_sampled_ones_are_not(assets, tmp_path, greedy, files):
    for seed in (0, 1):
        cfg = _config(assets, tmp_path, objective="seqkd", max_steps=1, seed=seed,
                      **{"generation.teacher_greedy": greedy})
        trainer.train(load_config(_write_config(tmp_path, cfg)))
    assert len(list((tmp_path / "cache" / "teacher_responses").glob("*.jsonl"))) == files


@pytest.mark.parametrize("objective", ["fkl", "mm_pbkd"])
def test_token_objective_on_mismatched_vocabularies_is_refused(assets, tmp_path, objective):
    """The message that names both vocabularies reaches the user for every token-level objective
    (mm_pbkd's was once swallowed by a generic one)."""
    cfg = load_config(_write_config(tmp_path, _config(assets, tmp_path, objective=objective,
                                                      student=str(assets["other_vocab_student"]))))
    with pytest.raises(ValueError, match=f"objective '{objective}'.*needs one vocabulary.*teacher vocabulary .*"
                                         "student vocabulary .*still work.*dpkd"):
        trainer.train(cfg)
    assert not (tmp_path / "runs" / "run" / "metrics.jsonl").exists()  # refused before training


def test_dpkd_runs_across_vocabularies(assets, tmp_path):
    """Sequence-level objectives need only text: teacher and student each score in their own tokens."""
    result = _train(assets, tmp_path, objective="dpkd", student=str(assets["other_vocab_student"]), max_steps=2)
    records = _records(result["run_dir"])
    assert len(records) == 2 and DPKD_DIAGNOSTICS <= set(records[-1])
    assert "fkl" not in records[-1]  # no true divergence across vocabularies


# ---------------------------------------------------------------------------------------------
# Gradient accumulation
# ---------------------------------------------------------------------------------------------


def _batch_gradient(assets, tmp_path, objective, grad_accum, naive=False):
    cfg = load_config(_write_config(tmp_path, _config(assets, tmp_path / f"acc{grad_accum}{naive}", objective=objective,
                                                      grad_accum=grad_accum)))
    threads = torch.get_num_threads()
    try:
        run, obj, optimizer, _, _, _ = trainer.setup(cfg)  # sets cfg.num_threads
        examples = [run.train_data[i] for i in trainer.local_batch_indices(run, 0)]
        micros = obj.make_batch(examples, 0)
        assert len(micros) == grad_accum
        optimizer.zero_grad(set_to_none=True)
        if naive:  # the mean of micro-batch means: each micro-batch normalised by its own token count
            for micro in micros:
                loss, _ = obj.loss(micro, {k: v.float() for k, v in micro["counts"].items()}, False)
                (loss / grad_accum).backward()
        else:
            trainer.accumulate_gradients(run, obj, micros, diagnostics=False)
    finally:
        torch.set_num_threads(threads)
    tokens = [int(m["counts"]["tokens"]) for m in micros]
    return {n: p.grad.clone() for n, p in run.student.named_parameters() if p.grad is not None}, tokens


@pytest.mark.parametrize("objective", ["sft", "fkl"])
def test_gradient_accumulation_matches_the_full_batch(assets, tmp_path, objective):
    """grad_accum=2 x micro-batch 4 gives the gradient of one batch of 8.

    Compared: every parameter's accumulated `.grad` after one step's backward passes, through
    the loop's own `accumulate_gradients`, against the same for grad_accum=1 (one micro-batch of
    8), to 1e-5 relative (1e-5 of the tensor's largest entry absolute). Gradients, not weights
    after the step: Adam's first step is invariant to the gradient's scale, so weights could not
    reveal a wrong normalisation. The loss is the token mean over the *whole* batch
    (micro-batch sum / all response tokens of the batch). The naive normalisation -- each
    micro-batch's own token mean, averaged -- differs here, because the two micro-batches hold
    different numbers of response tokens; that is checked too, so the comparison can fail."""
    full, tokens_full = _batch_gradient(assets, tmp_path, objective, 1)
    accum, tokens_accum = _batch_gradient(assets, tmp_path, objective, 2)
    naive, _ = _batch_gradient(assets, tmp_path, objective, 2, naive=True)
    assert sum(tokens_accum) == tokens_full[0] and tokens_accum[0] != tokens_accum[1]
    assert full.keys() == accum.keys()
    for name in full:
        torch.testing.assert_close(accum[name], full[name], rtol=1e-5, atol=1e-5 * full[name].abs().max().item())
    gap = max((naive[n] - full[n]).abs().max().item() / full[n].abs().max().item() for n in full)
    print(f"relative gap of the naive normalisation: {gap:.3g}")
    assert gap > 1e-3, "micro-batches with equal token counts cannot tell the normalisations apart"


# ---------------------------------------------------------------------------------------------
# Checkpoints and resume
# ---------------------------------------------------------------------------------------------


def _resume_config(assets, tmp_path, **overrides):
    return _config(assets, tmp_path, student=str(assets["student_dropout"]), max_steps=8, save_every=1,
                   **{"kd.on_policy_fraction": 0.5, "eval.every": 3}, **overrides)


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(assets, tmp_path):
    """A run killed (SIGKILL) after a checkpoint and resumed with --resume ends with exactly the
    weights of an uninterrupted run: dropout and on-policy sampling draw random numbers, so the
    model, optimiser, schedule, RNG and data position must all be restored."""
    cfg = _resume_config(assets, tmp_path)
    path = _write_config(tmp_path, cfg)
    log = open(tmp_path / "killed.log", "w")
    process = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), "--config", str(path)], cwd=REPO,
                               stdout=log, stderr=subprocess.STDOUT)
    latest = tmp_path / "runs" / "run" / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if latest.is_symlink() and int(os.readlink(latest).split("_")[-1]) >= 3:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    process.wait(timeout=60)
    log.close()
    assert process.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    killed_at = int(os.readlink(latest).split("_")[-1])
    assert 3 <= killed_at < 8

    resumed = subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--config", str(path), "--resume"], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    reference_config = _write_config(tmp_path, _resume_config(assets, tmp_path / "ref"), "ref.yaml")
    reference = trainer.train(load_config(reference_config))
    final, expected = _weights(tmp_path / "runs" / "run"), _weights(reference["run_dir"])
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in final)
    # the metrics log holds each step once, and the same values as the uninterrupted run
    got, want = _records(tmp_path / "runs" / "run"), _records(reference["run_dir"])
    assert [r["step"] for r in got] == list(range(1, 9))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    scores = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]  # noqa: E731
    assert scores(_records(tmp_path / "runs" / "run", "valid")) == scores(_records(reference["run_dir"], "valid"))


def test_dpkd_resume_mid_round_restores_the_round_samples(assets, tmp_path):
    """DPKD samples y_S at each round start (online.rounds=2: steps 0 and 3 of 6); stopping at
    step 2 and resuming must reuse the round-0 samples saved in the checkpoint."""
    common = dict(objective="dpkd", max_steps=6, **{"online.rounds": 2}, student=str(assets["student_dropout"]))
    path = _write_config(tmp_path, _config(assets, tmp_path, stop_after=2, **common))
    partial = trainer.train(load_config(path))
    assert partial["state"]["step"] == 2 and partial["results"] is None
    resumed = trainer.train(load_config(path, ["stop_after=0"]), resume=True)
    assert resumed["state"]["step"] == 6 and resumed["run_dir"] == partial["run_dir"]
    reference_config = _write_config(tmp_path, _config(assets, tmp_path / "ref", **common), "r.yaml")
    reference = trainer.train(load_config(reference_config))
    final, expected = _weights(resumed["run_dir"]), _weights(reference["run_dir"])
    assert all(torch.equal(final[k], expected[k]) for k in final)
    trainer_state = torch.load(Path(resumed["run_dir"]) / "checkpoints" / "latest" / "trainer_state_rank0.pt",
                               weights_only=True)
    assert sorted(map(int, trainer_state["objective"]["student_samples"])) == [3, 4, 5]


def test_checkpoints_are_complete_folders_behind_an_atomic_link(assets, tmp_path):
    config = _write_config(tmp_path, _config(assets, tmp_path, save_every=1, keep_checkpoints=2, **{"eval.every": 2}))
    result = trainer.train(load_config(config))
    root = Path(result["run_dir"]) / "checkpoints"
    assert os.readlink(root / "latest") == "step_00000003"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002", "step_00000003"]
    assert not list(root.glob(".tmp*"))
    for name in ("model.safetensors", "config.json", "trainer_state.json", "trainer_state_rank0.pt"):
        assert (root / "latest" / name).is_file()
    info = json.loads((root / "latest" / "trainer_state.json").read_text())
    assert info["state"]["step"] == 3 and info["state"]["examples_seen"] == 24
    best = json.loads((root / "best" / "best.json").read_text())
    assert best["step"] in (2, 3) and os.readlink(root / "best") == f"best_step_{best['step']:08d}"
    # a resume that would change the trajectory is refused, naming the setting
    with pytest.raises(ValueError, match=r"settings that change the run: optim.lr \(0.001 -> 0.5\)"):
        trainer.train(load_config(config, ["optim.lr=0.5"]), resume=True)
    # resuming a run without a checkpoint is refused
    with pytest.raises(ValueError, match="no complete checkpoint"):
        trainer.train(load_config(_write_config(tmp_path, _config(assets, tmp_path, run_name="missing"))), resume=True)


def test_config_module_documents_every_key():
    text = config_module.help_text()
    for section in ("kd", "dpkd", "online", "data", "optim", "eval", "generation"):
        assert f"[{section}]" in text
    assert "online.rounds=1" in text and "objective='fkl'" in text

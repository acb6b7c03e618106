"""Tests of `llm/objectives/preference_game.py`: black-box `pbkd` (offline and online) and white-box `mm_pbkd` run from
`llm/train.py` (spec llm.md sections 2-3).

Models are tiny randomly initialised GPT-2 configs saved with the real GPT-2 tokenizer; the data
is a small generated Dolly-format set whose references make the `bt_oracle` judge informative.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from llm import losses
from llm import train as trainer
from llm.config import load_config
from llm.judges import JUDGES
from llm.objectives.preference_game import MMPbKD, PbKD
from llm.run import encode, logits_of
from llm.preference_store import PreferenceStore
from llm.reward_model import NonFiniteRewardError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets(pbkd_assets):
    return pbkd_assets


def _write(tmp_path, cfg) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(assets, tmp_path, resume=False, **overrides):
    return trainer.train(load_config(_write(tmp_path, assets.config(tmp_path, **overrides))), resume=resume)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _train_records(run_dir) -> list[dict]:
    return [r for r in _lines(Path(run_dir) / "metrics.jsonl") if r["split"] == "train"]


# ---------------------------------------------------------------------------------------------


def test_pbkd_offline_builds_D_once_and_lam_follows_dual_ascent(assets, tmp_path):
    out = _train(assets, tmp_path, **{"pbkd.lam_init": 0.5, "pbkd.dual_lr": 2.0, "pbkd.adversary_steps": 2})
    run_dir = Path(out["run_dir"])
    store = PreferenceStore(run_dir / "preferences.jsonl")
    assert store.rounds_completed() == 1 and len(store) == 6  # bt_oracle never ties or fails
    assert {(r.round, r.index) for r in store} == {(0, i) for i in range(6)}
    assert all(r.model_0 == "teacher" and r.judge == "bt_oracle" for r in store)
    rounds = _lines(run_dir / "rounds.jsonl")
    assert len(rounds) == 1 and rounds[0]["D"] == 6 and rounds[0]["judge"]["preferences"] == 6
    assert abs(rounds[0]["bt_bound"] - (rounds[0]["nll_ref"] + 1.0 / 6)) < 1e-9
    train = _train_records(run_dir)
    assert len(train) == 4 and all(r["lam"] >= 0 for r in train)
    # lam after each step is the projected dual ascent of the previous value on the logged violations
    # (two adversary steps a step: only the last one's NLL is logged, so check direction and bound)
    lams = [0.5] + [r["lam"] for r in train]
    assert any(abs(a - b) > 1e-6 for a, b in zip(lams, lams[1:])), "lam never moved"
    for r in train:
        assert set(r) >= {"reward_gap", "bt_nll", "bt_bound", "nll_ref", "pg_loss", "reward", "kl_ref", "clip_fraction"}
    assert out["results"] is not None


def test_dual_ascent_is_applied_once_per_adversary_step(assets, tmp_path):
    """With one adversary step, lam_t = max(0, lam_{t-1} + dual_lr * (bt_nll_t - bt_bound_t))."""
    out = _train(assets, tmp_path, **{"pbkd.lam_init": 0.3, "pbkd.dual_lr": 5.0, "max_steps": 3,
                                      "pbkd.offline_response": "reference"})
    train = _train_records(out["run_dir"])
    lam = 0.3
    for r in train:
        lam = max(0.0, lam + 5.0 * (r["bt_nll"] - r["bt_bound"]))
        assert r["lam"] == pytest.approx(lam, rel=1e-6, abs=1e-9)
    store = PreferenceStore(Path(out["run_dir"]) / "preferences.jsonl")
    assert all(r.model_1 == "reference" for r in store)


def test_pbkd_online_two_rounds_append_one_batch_each_and_resume_restores_the_game(assets, tmp_path):
    full = _train(assets, tmp_path / "full", **{"online.rounds": 2})
    run_dir = Path(full["run_dir"])
    store = PreferenceStore(run_dir / "preferences.jsonl")
    assert store.rounds_completed() == 2
    assert sorted(r.record_id for r in store) == [(t, i) for t in range(2) for i in range(6)]
    assert {r.model_1 for r in store.records(1)} == {"student@round1"}
    rounds = _lines(run_dir / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1] and [r["D"] for r in rounds] == [6, 12]
    assert all("valid_rouge_l" in r and r["lam"] >= 0 for r in rounds)

    # stop after 3 steps (mid round 1), resume: the reward model, its optimiser, lam and D come back
    half = tmp_path / "half"
    _train(assets, half, **{"online.rounds": 2, "stop_after": 3})
    resumed = _train(assets, half, resume=True, **{"online.rounds": 2})
    a, b = _train_records(run_dir), _train_records(resumed["run_dir"])
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert y["lam"] == pytest.approx(x["lam"], rel=1e-5, abs=1e-7)
        assert y["reward_gap"] == pytest.approx(x["reward_gap"], rel=1e-4, abs=1e-5)
    assert len(PreferenceStore(Path(resumed["run_dir"]) / "preferences.jsonl")) == 12


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from llm import train
    from llm.config import load_config
    from llm.objectives import preference_game
    real = preference_game._PreferenceGame.fit_mle
    def fit_mle(self, round_index):
        if round_index == 1:  # round 1 is labelled and appended: die before training on it
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, round_index)
    preference_game._PreferenceGame.fit_mle = fit_mle
    train.train(load_config(sys.argv[1]))
""")


def test_kill_between_labelling_and_training_then_resume_loses_and_duplicates_nothing(assets, tmp_path):
    cfg = assets.config(tmp_path, **{"online.rounds": 2, "save_every": 1})
    path = _write(tmp_path, cfg)
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(path)], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == -9, result.stderr[-2000:]
    run_dir = Path(cfg["out_dir"]) / "run"
    store_path = run_dir / "preferences.jsonl"
    killed = PreferenceStore(store_path)
    assert killed.rounds_completed() == 2 and len(killed) == 12  # round 1 labelled, not trained on
    round1_before = [r.to_json() for r in killed.records(1)]
    lines_before = store_path.read_text().splitlines()
    trainer.train(load_config(path), resume=True)
    after = PreferenceStore(store_path)
    assert store_path.read_text().splitlines() == lines_before  # nothing appended again
    assert sorted(r.record_id for r in after) == [(t, i) for t in range(2) for i in range(6)]
    assert [r.to_json() for r in after.records(1)] == round1_before
    rounds = _lines(run_dir / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1]  # the killed round 1 wrote no line; the resumed one did


@pytest.mark.parametrize("overrides, message", [
    (["objective=pbkdd"], "valid choices: ['sft', 'seqkd', 'fkl', 'rkl', 'jsd', 'skl', 'srkl', 'akl', 'dpkd', 'rloo', 'pbkd', 'mm_pbkd']"),
    (["pbkd.judge=gpt5"], f"valid choices: {list(JUDGES)}"),
    (["pg.samples_per_prompt=1"], "samples_per_prompt >= 2"),
    (["pbkd.rm_init=pruned"], "needs pbkd.rm_layers"),
    (["pbkd.mm_student_gradient=exact"], "valid choices: ['sequence_loo', 'per_token_spec']"),
])
def test_unknown_objective_judge_or_parameter_is_refused_with_the_valid_list(tmp_path, overrides, message):
    path = _write(tmp_path, {"student_init": "pruned", "student_layers": [0], "objective": "pbkd"})
    with pytest.raises(ValueError) as err:
        load_config(path, overrides)
    assert message in str(err.value)


def test_non_finite_reward_stops_the_run_and_keeps_the_last_checkpoint(assets, tmp_path, monkeypatch):
    real = PbKD.make_batch

    def poisoned(self, examples, step):
        if step == 2:  # after the checkpoint of step 2, the reward model's head turns NaN
            with torch.no_grad():
                self.adversary.head.weight.fill_(float("nan"))
        return real(self, examples, step)

    monkeypatch.setattr(PbKD, "make_batch", poisoned)
    with pytest.raises(NonFiniteRewardError, match=r"non-finite output.*last good checkpoint is .*step_00000002"):
        _train(assets, tmp_path, save_every=1)
    folder = (Path(tmp_path / "runs" / "run") / "checkpoints" / "latest").resolve()
    assert folder.name == "step_00000002"
    state = torch.load(folder / "trainer_state_rank0.pt", weights_only=True)["objective"]
    assert all(torch.isfinite(v).all() for v in state["adversary"].values())
    monkeypatch.undo()  # the intact checkpoint resumes and finishes
    done = _train(assets, tmp_path, resume=True, save_every=1)
    assert done["state"]["step"] == 4


# ---------------------------------------------------------------------------------------------
# mm_pbkd: every term against a per-sequence float64 recomputation, and the telescoping identity
# ---------------------------------------------------------------------------------------------


def test_mm_pbkd_runs_online(assets, tmp_path):
    # the Q-head's output is vocabulary-wide (50,257 GPT-2 tokens): keep the run small
    out = _train(assets, tmp_path, objective="mm_pbkd", batch_size=2, max_steps=2,
                 **{"online.rounds": 2, "pbkd.pairs_per_round": 2, "pbkd.bt_batch_size": 2, "pbkd.mle_steps": 1,
                    "eval.max_new_tokens": 2})
    train = _train_records(out["run_dir"])
    assert len(train) == 2 and all(r["lam"] >= 0 for r in train)
    assert all(set(r) >= {"off_moment", "on_moment", "moment_gap", "induced_reward_student"} for r in train)
    assert len(PreferenceStore(Path(out["run_dir"]) / "preferences.jsonl")) == 4


def _brute_force_terms(run, qhead, examples, responses):
    """Per sequence, unpadded, in float64: f, p, q at each response step, then the sums by loops."""
    from llm.data import encode_sft_batch

    teacher = run.teacher.double()
    student = run.accelerator.unwrap_model(run.student).double()
    lm = qhead.lm.double()
    out = []
    for ex, y in zip(examples, responses):
        b = encode_sft_batch(run.tokenizer, [ex], run.cfg.data.max_prompt_tokens, run.cfg.data.max_length,
                             responses=[y])
        n = int(b["attention_mask"].sum())
        ids = b["input_ids"][:, :n]
        mask = b["response_mask"][0, :n].bool()
        steps = mask.nonzero().flatten().tolist()  # positions t whose label ids[t+1] is a response token
        with torch.no_grad():
            p = torch.softmax(teacher(input_ids=ids).logits[0], -1)
            q = torch.softmax(student(input_ids=ids).logits[0], -1)
            f = qhead.bound * torch.tanh(lm(input_ids=ids).logits[0] / qhead.bound)
        off = on = r_f = 0.0
        for j, t in enumerate(steps):
            a = int(ids[0, t + 1])
            off += float(f[t, a] - (q[t] * f[t]).sum())
            on += float((p[t] * f[t]).sum() - f[t, a])
            nxt = float((p[steps[j + 1]] * f[steps[j + 1]]).sum()) if j + 1 < len(steps) else 0.0
            r_f += float(f[t, a]) - nxt
        v0 = float((p[steps[0]] * f[steps[0]]).sum())
        out.append({"off": off, "on": on, "r_f": r_f, "v0": v0})
    teacher.float(), student.float(), lm.float()
    return out


def test_mm_pbkd_terms_match_a_float64_brute_force(assets, tmp_path):
    cfg = load_config(_write(tmp_path, assets.config(tmp_path, objective="mm_pbkd")))
    run, objective, *_ = trainer.setup(cfg)
    assert isinstance(objective, MMPbKD)
    examples = run.train_data[:3]
    responses = ["red cat", "sun moon tree river", "lamp"]
    batch = encode(run, examples, responses)
    with torch.no_grad():
        f = objective.f_values(batch)
        p = objective.teacher_probs(batch)
        q = torch.softmax(logits_of(run.student, batch, run).float(), -1)
        r_f = losses.induced_sequence_reward(f, p, batch["labels"], batch["response_mask"])
        reward_via_objective = objective.sequence_rewards(batch)
    brute = _brute_force_terms(run, objective.adversary, examples, responses)
    for i, bf in enumerate(brute):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        off_i = losses.q_moment_off_policy(f[i : i + 1], q[i : i + 1], one["labels"], one["response_mask"])
        on_i = losses.q_moment_on_policy(f[i : i + 1], p[i : i + 1], one["labels"], one["response_mask"])
        assert float(off_i) == pytest.approx(bf["off"], abs=1e-4)
        assert float(on_i) == pytest.approx(bf["on"], abs=1e-4)
        assert float(r_f[i]) == pytest.approx(bf["r_f"], abs=1e-4)
        assert float(reward_via_objective[i]) == pytest.approx(bf["r_f"], abs=1e-4)
        # telescoping: the on-policy moment of a rollout is <p, f>(s_0) - r_f(tau), which is why the
        # sequence-level leave-one-out on r_f is the exact gradient of the on-policy moment
        assert bf["on"] == pytest.approx(bf["v0"] - bf["r_f"], abs=1e-9)
    # the adversary's objective on this batch, assembled from the same terms
    off = losses.q_moment_off_policy(f, q, batch["labels"], batch["response_mask"])
    on = losses.q_moment_on_policy(f, p, batch["labels"], batch["response_mask"])
    assert float(off) == pytest.approx(sum(b["off"] for b in brute) / 3, abs=1e-4)
    assert float(on) == pytest.approx(sum(b["on"] for b in brute) / 3, abs=1e-4)

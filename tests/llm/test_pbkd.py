"""Tests of `llm/objectives/preference_game.py`: black-box `pbkd` (offline and online) and white-box `mm_pbkd` run from
`llm/train.py` (spec llm.md sections 2-3).

Models are tiny randomly initialised GPT-2 configs saved with the real GPT-2 tokenizer; the data
is a small generated Dolly-format set whose references make the `bt_oracle` judge informative.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from llm import losses
from llm import train as trainer
from llm.config import load_config
from llm.judges import JUDGES
from llm.objectives.preference_game import MMPbKD, PbKD, within_prompt_correlation
from llm.run import encode, logits_of
from llm.preference_store import PreferenceRecord, PreferenceStore
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


def test_pbkd_offline_labels_every_sample_once_and_the_confidence_set_binds(assets, tmp_path):
    """Offline D: each of the 6 prompts' teacher response against each of its k = 4 student samples,
    labelled once. The refit's Lagrangian ends inside the confidence set NLL_BT <= NLL_ref + zeta/|D_fit|
    (on all of D_fit) with lam > 0 on most of its steps; with the dual variable pinned at 0 (the
    constraint dropped) the same fit leaves the set, which is the fault this check catches."""
    out = _train(assets, tmp_path / "game", **{"pbkd.zeta": 0.5})
    run_dir = Path(out["run_dir"])
    store = PreferenceStore(run_dir / "preferences.jsonl")
    assert store.rounds_completed() == 1 and len(store) == 24  # bt_oracle never ties or fails
    assert {(r.round, r.index) for r in store} == {(0, i) for i in range(24)}
    assert all(r.model_0 == "teacher" and r.judge == "bt_oracle" and r.model_1 == "student@round0" for r in store)
    (line,) = _lines(run_dir / "rounds.jsonl")
    assert line["D"] == 24 and line["D_fit"] + line["D_heldout"] == 24 and line["judge"]["preferences"] == 24
    assert line["bt_bound"] == pytest.approx(line["nll_ref"] + 0.5 / line["D_fit"], rel=1e-9)
    assert line["bt_nll"] <= line["bt_bound"] + 0.1 * 0.5 / line["D_fit"]
    assert line["lam_positive"] > 0.5 and line["reward_gap"] > 0
    train = _train_records(run_dir)
    assert len(train) == 4
    for r in train:
        assert set(r) >= {"reward_gap", "bt_nll", "bt_bound", "nll_ref", "pg_loss", "reward", "kl_ref",
                          "clip_fraction", "response_length", "truncated", "lam_positive", "oracle_reward"}
    assert out["results"] is not None

    unconstrained = _train(assets, tmp_path / "free", **{"pbkd.zeta": 0.5, "pbkd.lam_init": 0.0, "pbkd.dual_lr": 0.0})
    (free,) = _lines(Path(unconstrained["run_dir"]) / "rounds.jsonl")
    assert free["bt_nll"] > free["bt_bound"] + 0.5 / free["D_fit"]
    assert free["reward_gap"] > line["reward_gap"]


def test_student_pairs_label_every_pair_of_a_prompts_samples_after_the_teacher_pairs(assets, tmp_path):
    """pbkd.student_pairs: after the 24 teacher-vs-sample pairs of the 6 prompts, the C(4, 2) = 6
    pairs of each prompt's own samples (ids 24..59), both sides the prompt's samples of the
    teacher pairs; the refit plays only against the teacher pairs (a refit that read a
    student-vs-student pair as a teacher response is the fault the last check catches)."""
    out = _train(assets, tmp_path / "pairs", **{"pbkd.student_pairs": True})
    store = PreferenceStore(Path(out["run_dir"]) / "preferences.jsonl")
    records = store.records(0)
    assert [r.index for r in records] == list(range(60))
    teacher, within = records[:24], records[24:]
    assert all(r.model_0 == "teacher" for r in teacher)
    assert all(r.model_0 == r.model_1 == "student@round0" for r in within)
    samples = {}
    for r in teacher:
        samples.setdefault(r.prompt, []).append(r.response_1)
    expected = [(prompt, ys[a], ys[b]) for prompt, ys in samples.items() for a in range(4) for b in range(a + 1, 4)]
    assert [(r.prompt, r.response_0, r.response_1) for r in within] == expected
    assert PbKD.refit_samples(PbKD.__new__(PbKD), records) == teacher
    (line,) = _lines(Path(out["run_dir"]) / "rounds.jsonl")
    assert line["D"] == 60


def test_student_pairs_without_student_samples_is_refused(assets, tmp_path):
    with pytest.raises(ValueError, match="offline_response=student"):
        _train(assets, tmp_path / "ref", **{"pbkd.student_pairs": True, "pbkd.offline_response": "reference",
                                            "pbkd.timescale": "inner"})


def _pearson_exact(a: list[float], b: list[float]) -> float:
    """The Pearson correlation of two float lists, its square computed in exact rational arithmetic."""
    fa, fb = [Fraction(v) for v in a], [Fraction(v) for v in b]
    ca, cb = [v - sum(fa) / len(fa) for v in fa], [v - sum(fb) / len(fb) for v in fb]
    sab, saa, sbb = (sum(x * y for x, y in zip(u, w)) for u, w in ((ca, cb), (ca, ca), (cb, cb)))
    return math.copysign(math.sqrt(float(sab * sab / (saa * sbb))), sab)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 5), st.integers(2, 5), st.randoms(use_true_random=False))
def test_within_prompt_correlation_is_the_mean_pearson_correlation_of_the_prompts_that_vary(groups, k, rnd):
    """Against an exact rational Pearson correlation prompt by prompt; groups constant in either
    (max == min) are left out, and a real but tiny spread (1e-30, found by hypothesis) is kept."""
    r = [[rnd.choice([0.0, 1.0, 1e-30, rnd.uniform(-2, 2)]) for _ in range(k)] for _ in range(groups)]
    known = [[rnd.choice([0.0, 10.0]) for _ in range(k)] for _ in range(groups)]
    corr = [_pearson_exact(a, b) for a, b in zip(r, known) if max(a) > min(a) and max(b) > min(b)]
    got = within_prompt_correlation(torch.tensor(r, dtype=torch.float64).flatten(),
                                    torch.tensor(known, dtype=torch.float64).flatten(), k)
    if not corr:
        assert got is None
    else:
        assert got == pytest.approx(sum(corr) / len(corr), abs=1e-9)


def test_a_lagrangian_step_is_one_adam_step_then_projected_dual_ascent_on_the_exact_nll_of_D(assets, tmp_path):
    """lam_1 = max(0, lam_0 + dual_lr * (NLL_BT(theta_0; D_fit) - NLL_ref - zeta/|D_fit|)), with the NLL
    recomputed here by a float64 loop over every pair of D_fit from the cached features."""
    cfg = load_config(_write(tmp_path, assets.config(tmp_path, **{"pbkd.lam_init": 0.4, "pbkd.dual_lr": 3.0,
                                                                  "pbkd.timescale": "inner"})))
    run, objective, *_ = trainer.setup(cfg)
    objective.start_round(0, range(0, cfg.max_steps))
    fit = objective.D_tensors(held_out=False)
    phi1, phi0, labels = fit
    w, b, B = (objective.adversary.head.weight.detach().double()[0], float(objective.adversary.head.bias),
               objective.p.reward_bound)
    r = lambda phi: [B * math.tanh((float(phi[i].double() @ w) + b) / B) for i in range(len(phi))]  # noqa: E731
    r1, r0 = r(phi1), r(phi0)
    nll = sum(math.log1p(math.exp(-(2 * float(y) - 1) * (a - c))) for a, c, y in zip(r1, r0, labels)) / len(labels)
    bound = objective.nll_ref + cfg.pbkd.zeta / len(labels)
    lam_0, head_0 = objective.lam, objective.adversary.head.weight.detach().clone()
    features_0 = objective.batch_features(encode(run, run.train_data[:2]))
    phi_T, phi_S = phi0[:3], phi1[:3]
    objective.lagrangian_steps(1, phi_T, phi_S, fit)
    assert objective.lam == pytest.approx(max(0.0, lam_0 + 3.0 * (nll - bound)), rel=1e-5, abs=1e-7)
    assert objective.step_adversary["bt_bound"] == pytest.approx(bound)
    # the head moved and the backbone did not: its features, which D's cache holds, stay valid
    assert not torch.equal(objective.adversary.head.weight, head_0)
    assert torch.equal(objective.batch_features(encode(run, run.train_data[:2])), features_0)


def test_pbkd_online_two_rounds_append_one_batch_each_and_resume_restores_the_game(assets, tmp_path):
    full = _train(assets, tmp_path / "full", **{"online.rounds": 2})
    run_dir = Path(full["run_dir"])
    store = PreferenceStore(run_dir / "preferences.jsonl")
    assert store.rounds_completed() == 2
    assert sorted(r.record_id for r in store) == [(t, i) for t in range(2) for i in range(24)]
    assert {r.model_1 for r in store.records(1)} == {"student@round1"}
    rounds = _lines(run_dir / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1] and [r["D"] for r in rounds] == [24, 48]
    assert all("valid_rouge_l" in r and r["lam"] >= 0 for r in rounds)

    # stop after 3 steps (mid round 1), resume: the reward model, its optimiser, lam, D and the rollout batch come back
    half = tmp_path / "half"
    _train(assets, half, **{"online.rounds": 2, "stop_after": 3})
    resumed = _train(assets, half, resume=True, **{"online.rounds": 2})
    a, b = _train_records(run_dir), _train_records(resumed["run_dir"])
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in ("lam", "reward_gap", "reward", "pg_loss", "ratio_mean"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-5), key
    assert len(PreferenceStore(Path(resumed["run_dir"]) / "preferences.jsonl")) == 48


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from llm import train
    from llm.config import load_config
    from llm.objectives import preference_game
    real = preference_game.PbKD.fit_round
    def fit_round(self, round_index, records):
        if round_index == 1:  # round 1 is labelled and appended: die before training on it
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, round_index, records)
    preference_game.PbKD.fit_round = fit_round
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
    assert killed.rounds_completed() == 2 and len(killed) == 48  # round 1 labelled, not trained on
    round1_before = [r.to_json() for r in killed.records(1)]
    lines_before = store_path.read_text().splitlines()
    trainer.train(load_config(path), resume=True)
    after = PreferenceStore(store_path)
    assert store_path.read_text().splitlines() == lines_before  # nothing appended again
    assert sorted(r.record_id for r in after) == [(t, i) for t in range(2) for i in range(24)]
    assert [r.to_json() for r in after.records(1)] == round1_before
    rounds = _lines(run_dir / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1]  # the killed round 1 wrote no line; the resumed one did


@pytest.mark.parametrize("fault", [None, "flipped", "detached"])
def test_pbkd_raises_the_judges_reward_and_would_not_with_a_flipped_or_detached_student_loss(
        word_assets, plant_student_fault, tmp_path, fault):
    """Online pbkd (5 rounds of 6 steps) on the word-level assets: each round D gains the fitted
    teacher's "red green" against the current student's samples, labelled by the bt_oracle judge
    from Rouge-L, and the reward model (a linear head on the teacher's block) is refit; the student
    trains only on the learnt reward r_theta, and its expected Rouge-L (the judge's reward, which it
    never sees) must rise. The same run with the student's loss negated or detached must not.
    (Offline, from one D of 64 pairs, the student finds responses the reward model overrates --
    "blue blue blue blue" -- and the true reward falls: the online rounds label those and correct it.)"""
    if fault is not None:
        plant_student_fault(fault)
    before, after = word_assets.reward_before_after(
        tmp_path, "pbkd", **{"online.rounds": 5, "pbkd.rm_init": "pruned", "pbkd.rm_layers": [0]})
    if fault is None:
        assert after > before + 0.15, (before, after)
    else:
        assert after < before + 0.05, (fault, before, after)


@pytest.mark.parametrize("timescale, fault, frozen", [("refit", None, False), ("refit", "flipped", False),
                                                     ("refit", "detached", False), ("inner", None, False),
                                                     ("refit", None, True), ("refit", "flipped", True),
                                                     ("inner", None, True)])
def test_mm_pbkd_raises_the_judges_reward_and_would_not_with_a_flipped_or_detached_student_loss(
        word_assets, plant_student_fault, tmp_path, timescale, fault, frozen):
    """Offline mm_pbkd on the word-level assets (the Q-head's output is the 11-word vocabulary): the
    student, trained by the student step on the induced reward r_f plus the off-policy moment, must
    raise its expected Rouge-L, and must not with its loss negated or detached. Both timescales: the
    Q-head refit once (200 Lagrangian steps against the round's labelled samples, then frozen), or
    10 Lagrangian steps on each rollout batch. Measured over seeds 3 to 6, both reach 0.99 to 1.0
    offline (refit online, 5 rounds, seeds 3 and 4: 1.0), while 2 inner steps a batch reach 0.33 to 1.0
    and a frozen MLE Q-head, never refit, drives the reward to 0.0 (the student exploits r_f of a head
    that never maximised the gap). A planted fault must make the learning assertion fail: negated
    against the frozen refit head, the student runs down r_f and lands on responses the judge scores
    about 0.33 (seed 3), not on the teacher's. With pbkd.mm_frozen_backbone (the fresh one-block
    backbone's features fixed, the vocabulary head alone trained) the refit raises the reward from
    0.21 to 0.67, and with the student's loss negated it stays at 0.22; 10 inner steps a batch reach 0.96."""
    if fault is not None:
        plant_student_fault(fault, MMPbKD)
    before, after = word_assets.reward_before_after(
        tmp_path, "mm_pbkd", **{"pbkd.timescale": timescale, "pbkd.adversary_steps": 10, "pbkd.mle_steps": 30,
                                "pbkd.mle_lr": 1e-3, "pbkd.mm_frozen_backbone": frozen})
    learnt = after > before + 0.3
    assert learnt if fault is None else not learnt, (fault, before, after)


@pytest.mark.parametrize("overrides, message", [
    (["objective=pbkdd"], "valid choices: ['sft', 'seqkd', 'fkl', 'rkl', 'jsd', 'skl', 'srkl', 'akl', 'dpkd', 'rloo', 'pbkd', 'mm_pbkd']"),
    (["pbkd.judge=gpt5"], f"valid choices: {list(JUDGES)}"),
    (["pg.samples_per_prompt=1"], "samples_per_prompt >= 2"),
    (["pbkd.rm_init=pruned"], "needs pbkd.rm_layers"),
    (["pbkd.timescale=both"], "valid choices: ['refit', 'inner']"),
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


def test_mm_pbkd_runs_online_and_a_resume_inside_a_rollout_batch_reproduces_its_second_step(assets, tmp_path):
    """Two steps of one rollout batch (pg.ppo_epochs 2): the Q-head moves only when the batch is drawn, so
    both steps log the same adversary values (a Q-head stepped again at the second step would log another
    minibatch's BT NLL); and a run stopped after the first step and resumed (the checkpoint holds the
    batch and the Q-head) must reproduce the second step's loss, which f of the teacher responses taken
    from a Q-head the checkpoint did not restore would not."""
    # the Q-head's output is vocabulary-wide (50,257 GPT-2 tokens): keep the run small
    small = {"batch_size": 2, "max_steps": 4, "online.rounds": 2, "pbkd.pairs_per_round": 2, "pbkd.bt_batch_size": 2,
             "pbkd.mle_steps": 1, "pbkd.timescale": "inner", "pbkd.adversary_steps": 1, "pg.samples_per_prompt": 2,
             "pg.ppo_epochs": 2, "eval.max_new_tokens": 2}
    out = _train(assets, tmp_path / "full", objective="mm_pbkd", **small)
    train = _train_records(out["run_dir"])
    assert len(train) == 4 and all(r["lam"] >= 0 for r in train)
    assert all(set(r) >= {"off_moment", "reward", "kl_ref", "pg_loss", "clip_fraction", "bt_nll", "reward_gap"}
               for r in train)
    assert [train[1][k] for k in ("bt_nll", "lam", "reward")] == [train[0][k] for k in ("bt_nll", "lam", "reward")]
    assert len(PreferenceStore(Path(out["run_dir"]) / "preferences.jsonl")) == 8  # 2 prompts x 2 samples x 2 rounds
    half = tmp_path / "half"
    _train(assets, half, objective="mm_pbkd", stop_after=1, save_every=1, **small)
    resumed = _train_records(_train(assets, half, resume=True, objective="mm_pbkd", **small)["run_dir"])
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(train, resumed):
        for key in ("loss", "off_moment", "pg_loss", "reward", "lam"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_mm_pbkd_refit_fits_the_q_head_once_a_round_and_its_steps_leave_it_frozen(assets, tmp_path):
    """timescale=refit: the round line holds the refit's BT NLL on all of D and its share of steps with
    lam > 0, and every step of the round, each drawing new rollouts, logs the refit's last values: a
    Q-head also stepped on each rollout batch (inner) would log a new minibatch's BT NLL and a moved lam."""
    small = {"batch_size": 2, "max_steps": 3, "pbkd.pairs_per_round": 2, "pbkd.bt_batch_size": 2,
             "pbkd.mle_steps": 1, "pbkd.refit_steps": 3, "pbkd.adversary_steps": 1, "pbkd.zeta": 0.01,
             "pg.samples_per_prompt": 2, "pg.ppo_epochs": 1, "eval.max_new_tokens": 2}
    out = _train(assets, tmp_path, objective="mm_pbkd", **small)
    (line,) = _lines(Path(out["run_dir"]) / "rounds.jsonl")
    assert line["D"] == 4 and 0 <= line["lam_positive"] <= 1 and math.isfinite(line["bt_nll"])
    train = _train_records(out["run_dir"])
    assert len(train) == 3 and len({r["reward"] for r in train}) == 3  # new rollouts at each step
    for r in train:  # (a step's values are summed over its micro-batches, weighted by their shares)
        assert [r["bt_nll"], r["lam"], r["lam_positive"]] == pytest.approx(
            [train[0]["bt_nll"], line["lam"], line["lam_positive"]], rel=1e-6)


def test_mm_pbkd_frozen_backbone_scores_D_from_cached_features_and_its_refit_moves_the_head_alone(assets, tmp_path):
    """pbkd.mm_frozen_backbone: the induced rewards of D's pairs, taken from the features cached once
    per record and laid out at each batch's positions, equal those of the Q-head's full forward on
    the same batch (a cached row misplaced or cut to the wrong length would not); the cache holds
    each record's response length; and a refit run changes the Q-head's head and no backbone weight."""
    small = {"batch_size": 2, "max_steps": 2, "pbkd.pairs_per_round": 2, "pbkd.bt_batch_size": 3,
             "pbkd.mle_steps": 2, "pbkd.refit_steps": 2, "pbkd.mm_frozen_backbone": True,
             "pg.samples_per_prompt": 2, "pg.ppo_epochs": 1, "eval.max_new_tokens": 2}
    cfg = load_config(_write(tmp_path, assets.config(tmp_path, objective="mm_pbkd", **small)))
    run, objective, *_ = trainer.setup(cfg)
    examples = run.train_data[:3]
    records = [PreferenceRecord(round=0, index=i, prompt=ex.prompt, response_0=ex.response, response_1=y,
                                model_0="teacher", model_1="student", label=i % 2, judge="test", judge_output="")
               for i, (ex, y) in enumerate(zip(examples, ["red cat", "sun moon tree river", "lamp"]))]
    r1, r0 = objective.pair_rewards(records)
    for side, r in (("1", r1), ("0", r0)):
        batch = objective.encode_sides(records)[side]
        assert [len(objective.features_on_D[(0, i)][side]) for i in range(3)] == batch["response_mask"].sum(1).tolist()
        with torch.no_grad():
            p = objective.cached_teacher(records, side, batch)
            want = losses.induced_sequence_reward(objective.f_values(batch), p, batch["labels"], batch["response_mask"])
            want = want / batch["response_mask"].sum(1)
        torch.testing.assert_close(r.detach(), want, atol=1e-5, rtol=1e-5)
    backbone = {k: v.clone() for k, v in objective.adversary.lm.state_dict().items()}
    head = objective.adversary.head.weight.detach().clone()
    out = _train(assets, tmp_path / "run", objective="mm_pbkd", save_every=1, **small)
    state = torch.load(Path(out["run_dir"]) / "checkpoints" / "latest" / "trainer_state_rank0.pt",
                       weights_only=True)["objective"]["adversary"]
    assert not torch.equal(state["head.weight"], head)
    for name, value in backbone.items():
        torch.testing.assert_close(state[f"lm.{name}"], value, rtol=0, atol=0)


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
    cfg = load_config(_write(tmp_path, assets.config(tmp_path, objective="mm_pbkd", **{"pbkd.mm_teacher_topk": 0})))
    run, objective, *_ = trainer.setup(cfg)
    assert isinstance(objective, MMPbKD)
    examples = run.train_data[:3]
    responses = ["red cat", "sun moon tree river", "lamp"]
    batch = encode(run, examples, responses)
    with torch.no_grad():
        f = objective.f_values(batch)
        p = objective.teacher_distribution(batch)
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
        assert float(on_i) == pytest.approx(bf["v0"] - float(r_f[i]), abs=1e-4)
    # the adversary's objective on this batch, assembled from the same terms
    off = losses.q_moment_off_policy(f, q, batch["labels"], batch["response_mask"])
    on = losses.q_moment_on_policy(f, p, batch["labels"], batch["response_mask"])
    assert float(off) == pytest.approx(sum(b["off"] for b in brute) / 3, abs=1e-4)
    assert float(on) == pytest.approx(sum(b["on"] for b in brute) / 3, abs=1e-4)

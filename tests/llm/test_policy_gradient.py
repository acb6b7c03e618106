"""Tests of the stabilised student step (`llm/objectives/policy_gradient.py`, spec llm.md section 2a)
and of its losses in `llm/losses.py`.

The losses are checked against loops written from the formulas. The learning test trains `rloo`
from `llm/train.py` on a tiny word-level model whose known reward (Rouge-L against the words to
repeat) a random student already earns a little of, and checks that the expected reward rises; the
same run with the student's gradient flipped, or with its loss detached, must not raise it
(the tiny word-level assets are `word_assets` of `conftest.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llm import losses
from llm import train as trainer
from llm.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------------------------
# The losses against loops over the formulas
# ---------------------------------------------------------------------------------------------


def _brute_advantages(rewards: list[list[float]], whiten: bool) -> list[list[float]]:
    k = len(rewards[0])
    adv = [[r[j] - sum(r[m] for m in range(k) if m != j) / (k - 1) for j in range(k)] for r in rewards]
    if not whiten:
        return adv
    flat = [a for row in adv for a in row]
    mean = sum(flat) / len(flat)
    std = (sum((a - mean) ** 2 for a in flat) / (len(flat) - 1)) ** 0.5
    return [[(a - mean) / (std + 1e-6) for a in row] for row in adv]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(2, 5), st.booleans(), st.data())
def test_group_advantages_are_leave_one_out_then_whitened(prompts, k, whiten, data):
    rewards = data.draw(st.lists(st.lists(st.floats(-5, 5), min_size=k, max_size=k), min_size=prompts,
                                 max_size=prompts))
    got = losses.group_advantages(torch.tensor(rewards, dtype=torch.float64), whiten=whiten)
    want = [a for row in _brute_advantages(rewards, whiten) for a in row]
    assert got.reshape(-1).tolist() == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert float(got.sum()) == pytest.approx(0.0, abs=1e-6)  # a leave-one-out baseline sums to zero per prompt


def test_group_advantages_refuse_a_single_sample_and_non_finite_rewards():
    with pytest.raises(ValueError, match="k >= 2"):
        losses.group_advantages(torch.zeros(3, 1))
    with pytest.raises(ValueError, match="finite"):
        losses.group_advantages(torch.tensor([[0.0, float("nan")]]))


def test_kl_penalised_rewards_subtract_the_masked_sampled_log_ratio():
    torch.manual_seed(0)
    old, ref = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    r = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    R, kl = losses.kl_penalised_rewards(r, old, ref, mask, beta_kl=0.3)
    for i in range(3):
        want = sum(float(old[i, h] - ref[i, h]) for h in range(4) if mask[i, h])
        assert float(kl[i]) == pytest.approx(want) and float(R[i]) == pytest.approx(float(r[i]) - 0.3 * want)


def _brute_ppo(logp, old, adv, mask, eps, normaliser):
    total, clipped, tokens = 0.0, 0, 0
    for i in range(logp.shape[0]):
        for h in range(logp.shape[1]):
            if not mask[i, h]:
                continue
            rho = float(torch.exp(logp[i, h] - old[i, h]))
            a = float(adv[i])
            u, c = rho * a, min(max(rho, 1 - eps), 1 + eps) * a
            total += -min(u, c)
            clipped += c < u
            tokens += 1
    return total / normaliser, clipped / tokens


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.05, 0.5))
def test_ppo_clipped_loss_matches_the_per_token_formula(seed, eps):
    g = torch.Generator().manual_seed(seed)
    logp = torch.randn(3, 5, generator=g, dtype=torch.float64)
    old = logp + 0.5 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    adv = torch.randn(3, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 5, generator=g) < 0.7
    mask[:, 0] = True
    out = losses.ppo_clipped_loss(logp, old, adv, mask, eps, normaliser=11.0)
    want, clip = _brute_ppo(logp, old, adv, mask, eps, 11.0)
    assert float(out.loss) == pytest.approx(want, abs=1e-10)
    assert float(out.clip_fraction) == pytest.approx(clip)


def test_ppo_clipped_loss_at_the_sampling_policy_is_the_token_mean_reinforce_gradient():
    """At q_theta = q_old the ratio is 1 and nothing is clipped: the gradient is
    -(1/N) sum_{i,h} A_i grad log q(y_h|s_h) (computed here through a second autograd graph)."""
    torch.manual_seed(1)
    theta = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 6, (2, 4))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv = torch.tensor([0.7, -1.3], dtype=torch.float64)
    logp = losses.token_log_probs(theta, labels)
    out = losses.ppo_clipped_loss(logp, logp.detach(), adv, mask, 0.2)
    (grad,) = torch.autograd.grad(out.loss, theta, retain_graph=True)
    reinforce = -(adv[:, None] * logp * mask).sum() / mask.sum()
    (want,) = torch.autograd.grad(reinforce, theta)
    assert torch.allclose(grad, want) and float(out.clip_fraction) == 0.0


# ---------------------------------------------------------------------------------------------
# Learning from a known reward through llm/train.py
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", [None, "flipped", "detached"])
def test_rloo_raises_the_known_reward_and_would_not_with_a_flipped_or_detached_student_loss(
        word_assets, plant_student_fault, tmp_path, fault):
    if fault is not None:
        plant_student_fault(fault)
    before, after = word_assets.reward_before_after(tmp_path, "rloo")
    if fault is None:
        assert after > before + 0.25, (before, after)
    else:
        assert after < before + 0.05, (fault, before, after)


def test_the_seqkd_anchor_adds_the_teacher_responses_cross_entropy(word_assets, tmp_path):
    """loss = PPO surrogate + pg.seqkd_weight * cross-entropy on the cached teacher responses, as logged."""
    out = trainer.train(load_config(word_assets.config(tmp_path, "rloo", **{"pg.seqkd_weight": 0.5, "max_steps": 4})))
    records = [json.loads(line) for line in (Path(out["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert len(train) == 4
    for r in train:
        assert r["seqkd_loss"] > 0 and r["loss"] == pytest.approx(r["pg_loss"] + 0.5 * r["seqkd_loss"], rel=1e-5)

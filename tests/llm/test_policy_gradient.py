"""Tests of the stabilised student step (`llm/objectives/policy_gradient.py`, spec llm.md section 2a)
and of its losses in `llm/losses.py`.

The losses are checked against loops written from the formulas. The learning test trains `rloo`
from `llm/train.py` on a tiny word-level model whose known reward (Rouge-L against the words to
repeat) a random student already earns a little of, and checks that the expected reward rises; the
same run with the student's gradient flipped, or with its loss detached, must not raise it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from llm import losses
from llm import train as trainer
from llm.config import load_config
from llm.data import load_jsonl, prompt_token_ids
from llm.judges import rouge_reward, PreferenceQuery
from llm.models import load_causal_lm, load_tokenizer, tiny_config
from llm.objectives.policy_gradient import StudentStep
from llm.rollout import rollout

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

WORDS = "red green blue cat dog sun moon tree".split()


@pytest.fixture(scope="module")
def word_assets(tmp_path_factory) -> Path:
    """A word-level tokenizer over WORDS, a tiny random GPT-2 student and teacher on it, and data
    whose every reference is "red green": a random student names one of the two now and then, so
    the Rouge-L reward is dense enough for a few dozen steps to raise it."""
    root = tmp_path_factory.mktemp("word_assets")
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", *WORDS, "<eos>"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<eos>")
    for name, seed in (("teacher", 1), ("student", 2)):
        torch.manual_seed(seed)
        config = tiny_config("gpt2", len(vocab), n_layer=1, n_embd=32, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                             attn_pdrop=0.0, eos_token_id=vocab["<eos>"], bos_token_id=vocab["<eos>"],
                             pad_token_id=vocab["<pad>"])
        AutoModelForCausalLM.from_config(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rng = random.Random(0)
    for split, n in (("train", 64), ("valid", 4), ("test", 4)):
        with open(root / f"{split}.jsonl", "w") as handle:
            for _ in range(n):
                handle.write(json.dumps({"instruction": "Name", "context": " ".join(rng.sample(WORDS, 2)),
                                         "response": "red green", "category": "colours"}) + "\n")
    return root


def _config(root: Path, tmp_path: Path, **pg) -> Path:
    cfg = {
        "run_name": "run", "out_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"),
        "teacher": str(root / "teacher"), "student": str(root / "student"), "student_init": "pretrained",
        "objective": "rloo", "seed": 3,
        "data": {"source": "files", "train_file": str(root / "train.jsonl"), "valid_file": str(root / "valid.jsonl"),
                 "test_file": str(root / "test.jsonl"), "max_prompt_tokens": 32, "max_length": 48},
        "generation": {"max_new_tokens": 4, "batch_size": 32},
        "eval": {"every": 0, "valid_seeds": [10], "test_seeds": [10], "max_new_tokens": 4, "batch_size": 8,
                 "before": False, "teacher": False, "test": False},
        "optim": {"schedule": "constant", "grad_clip": 1.0},
        "pg": {"reward": "rouge_l", "reward_scale": 1.0, "lr": 1e-2, "samples_per_prompt": 4, "ppo_epochs": 2,
               "beta_kl": 0.0, "missing_eos_penalty": 0.0, **pg},
        "batch_size": 8, "max_steps": 30, "log_every": 1, "save_every": 0, "num_threads": 1,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def expected_reward(model_dir, root: Path) -> float:
    """Mean Rouge-L reward of 8 samples per training prompt (a fixed seed), the Monte-Carlo E_{y~q} r."""
    model, tokenizer = load_causal_lm(str(model_dir)), load_tokenizer(str(root / "student"))
    examples = load_jsonl(root / "train.jsonl")[:32]
    ids = [prompt_token_ids(tokenizer, ex.prompt, max_prompt_tokens=32) for ex in examples]
    y = rollout(model, tokenizer, ids, seed=123, max_new_tokens=4, k=8, batch_size=64)
    reward = rouge_reward(1.0)
    texts = y.texts(tokenizer)
    return sum(reward(PreferenceQuery(prompt=examples[i // 8].prompt, response_0="", response_1="",
                                      references=tuple(examples[i // 8].references)), t)
               for i, t in enumerate(texts)) / len(texts)


def _trained(root, tmp_path, fault=None, monkeypatch=None):
    if fault is not None:
        original = StudentStep.loss

        def faulty(self, micro, totals):
            loss, metrics = original(self, micro, totals)
            return (-loss if fault == "flipped" else loss.detach().requires_grad_()), metrics
        monkeypatch.setattr(StudentStep, "loss", faulty)
    out = trainer.train(load_config(_config(root, tmp_path)))
    return Path(out["run_dir"]) / "checkpoints" / "latest"


@pytest.mark.parametrize("fault", [None, "flipped", "detached"])
def test_rloo_raises_the_known_reward_and_would_not_with_a_flipped_or_detached_student_loss(
        word_assets, tmp_path, monkeypatch, fault):
    before = expected_reward(word_assets / "student", word_assets)
    after = expected_reward(_trained(word_assets, tmp_path, fault, monkeypatch), word_assets)
    if fault is None:
        assert after > before + 0.25, (before, after)
    else:
        assert after < before + 0.05, (fault, before, after)

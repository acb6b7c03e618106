"""The PbKD adversaries (spec llm.md section 2): bounded r_phi, last-token pooling, the Q-head f_phi."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm.data import Example, encode_sft_batch
from llm.models import gpt2_tokenizer_dir, load_tokenizer, tiny_config
from llm.reward_model import NonFiniteRewardError, QHead, RewardModel, last_token_index

VOCAB = 96
FAMILIES = ("gpt2", "opt", "llama")
LENGTHS = (7, 3, 11)


def _sequences(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # ids from 4: OPT reserves 0-3 (pad, bos, eos, unk) in tiny_config's defaults.
    return [torch.randint(4, VOCAB - 1, (n,), generator=g) for n in LENGTHS]


def _pad(seqs, side: str, pad_id: int):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    return ids, mask


def test_last_token_index_left_and_right():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [3, 2, 0, 3]


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_is_read_at_the_last_token_whatever_the_padding(family):
    model = RewardModel.from_config(tiny_config(family, VOCAB), bound=3.0, seed=1).eval()
    seqs = _sequences()
    with torch.no_grad():
        # Independent computation: each sequence alone, no padding, last hidden state . head.
        alone = []
        for s in seqs:
            h = model.backbone(input_ids=s[None]).last_hidden_state[0, -1]
            alone.append(3.0 * math.tanh(float(model.head(h)) / 3.0))
        alone = torch.tensor(alone)
        for side in ("left", "right"):
            for pad_id in (0, VOCAB - 1, 17):  # the pad id must not matter, only the mask
                ids, mask = _pad(seqs, side, pad_id)
                torch.testing.assert_close(model(ids, mask), alone, atol=2e-5, rtol=1e-5)
        # Changing the last real token changes the reward; changing a padded position does not.
        ids, mask = _pad(seqs, "right", 0)
        base = model(ids, mask)
        ids2 = ids.clone()
        ids2[1, LENGTHS[1] - 1] = (ids2[1, LENGTHS[1] - 1] + 1) % VOCAB
        changed = model(ids2, mask)
        assert abs(float(changed[1] - base[1])) > 1e-6
        torch.testing.assert_close(changed[[0, 2]], base[[0, 2]])


def test_rewards_are_bounded_by_B_and_follow_B_tanh_raw_over_B():
    model = RewardModel.from_config(tiny_config("llama", VOCAB), bound=2.0).eval()
    ids, mask = _pad(_sequences(), "right", 0)
    with torch.no_grad():
        raw = model.raw_rewards(ids, mask)
        torch.testing.assert_close(model(ids, mask), 2.0 * torch.tanh(raw / 2.0))
        for scale in (1e2, -1e4):  # a head pushed far out saturates at +-B and never beyond
            model.head.bias.fill_(scale)
            r = model(ids, mask)
            assert bool((r.abs() <= 2.0).all()) and bool((r.abs() > 1.99).all())
            assert bool((torch.sign(r) == math.copysign(1, scale)).all())


def test_reward_model_gradients_flow_to_backbone_and_head():
    model = RewardModel.from_config(tiny_config("gpt2", VOCAB), bound=5.0)
    ids, mask = _pad(_sequences(), "left", 0)
    model(ids, mask).sum().backward()
    assert model.head.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.backbone.parameters() if p.requires_grad)


def test_non_finite_reward_raises_a_clear_error():
    model = RewardModel.from_config(tiny_config("gpt2", VOCAB), bound=5.0).eval()
    ids, mask = _pad(_sequences(), "right", 0)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteRewardError, match="reward model r_phi produced 3 non-finite output"):
        model(ids, mask)
    with torch.no_grad():
        model.head.weight[0, 0] = 0.0
        model.head.bias.fill_(float("inf"))  # tanh would hide this as +B: the raw value is checked
    with pytest.raises(NonFiniteRewardError, match="last checkpoint written before this step is intact"):
        model(ids, mask)


def test_bad_inputs_are_value_errors():
    model = RewardModel.from_config(tiny_config("gpt2", VOCAB))
    ids, mask = _pad(_sequences(), "right", 0)
    mask[2] = 0
    with pytest.raises(ValueError, match=r"row\(s\) \[2\] of attention_mask hold no token"):
        model(ids, mask)
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        model(ids, mask[:, :3])
    with pytest.raises(ValueError, match="bound must be a finite number > 0"):
        RewardModel.from_config(tiny_config("gpt2", VOCAB), bound=0.0)
    with pytest.raises(ValueError, match="bound must be a finite number > 0"):
        QHead.from_config(tiny_config("gpt2", VOCAB), bound=float("inf"))


def test_from_pretrained_uses_the_saved_backbone(tmp_path):
    lm = AutoModelForCausalLM.from_config(tiny_config("opt", VOCAB))
    lm.save_pretrained(tmp_path)
    model = RewardModel.from_pretrained(tmp_path, bound=1.0)
    for name, value in lm.base_model.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[name], value)


def test_score_on_text_with_gpt2_tokenizer_padding_with_eos():
    """GPT-2 pads with its EOS, which also ends every response: pooling must follow the mask."""
    tokenizer = load_tokenizer(gpt2_tokenizer_dir())
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    model = RewardModel.from_config(tiny_config("gpt2", len(tokenizer)), bound=4.0, seed=3).eval()
    prompts = ["Name a colour.", "Add two and two, then explain the steps in a sentence."]
    responses = ["Blue.", "Four: two plus two makes four, since counting on twice from two gives four."]
    with torch.no_grad():
        batched = model.score(tokenizer, prompts, responses, batch_size=2)
        for i in range(2):
            enc = encode_sft_batch(tokenizer, [Example(prompts[i], responses[i])])
            assert int(enc["input_ids"][0, -1]) == tokenizer.eos_token_id
            h = model.backbone(input_ids=enc["input_ids"]).last_hidden_state[0, -1]
            torch.testing.assert_close(batched[i], 4.0 * torch.tanh(model.head(h)[0] / 4.0), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ("gpt2", "llama"))
def test_q_head_shape_bound_and_alignment_with_logits(family):
    q = QHead.from_config(tiny_config(family, VOCAB), bound=0.5, seed=2).eval()
    assert q.vocab_size == VOCAB
    seqs = _sequences(1)
    with torch.no_grad():
        ids, mask = _pad(seqs, "left", 0)
        f = q(ids, mask)
        assert f.shape == (len(seqs), ids.shape[1], VOCAB)
        assert bool((f.abs() <= 0.5).all())
        for i, s in enumerate(seqs):
            expected = 0.5 * torch.tanh(q.lm(input_ids=s[None]).logits[0] / 0.5)  # f(s_t, .) for t = 0..n-1
            torch.testing.assert_close(f[i, ids.shape[1] - len(s):], expected, atol=2e-5, rtol=1e-5)
            assert bool((f[i, : ids.shape[1] - len(s)] == 0).all())  # padded states carry no value
        T = ids.shape[1]
        positions = torch.tensor([[0, T - 1], [0, T - 2], [T - 3, T - 1]])  # (1, 0) is a padded state
        at = q(ids, mask, positions)  # the vocabulary-sized output at those positions only
        assert at.shape == (len(seqs), 2, VOCAB)
        torch.testing.assert_close(at, f.gather(1, positions[..., None].expand(-1, -1, VOCAB)), atol=2e-5, rtol=1e-5)
        q.lm.get_output_embeddings().weight[5, 0] = float("nan")
        with pytest.raises(NonFiniteRewardError, match="Q-head f_phi produced"):
            q(ids, mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_q_head_with_a_frozen_backbone_equals_the_lm_and_trains_its_head_alone(family):
    """frozen_backbone: at the start f is the LM's own f (so the features are the hidden states its
    output layer reads, after the final norm and any projection), computed from the features alone
    at any positions; an optimiser step on the head moves the head only, and the input embeddings
    the LM's output layer is tied to stay as they were."""
    lm = AutoModelForCausalLM.from_config(tiny_config(family, VOCAB))
    with torch.no_grad():
        lm.get_output_embeddings().weight.normal_(std=0.5)  # raw values large enough for the tanh to bend
    trained = QHead(lm, bound=0.5).eval()
    frozen = QHead(lm, bound=0.5, frozen_backbone=True).train()
    assert not frozen.lm.training and not any(p.requires_grad for p in frozen.lm.parameters())
    ids, mask = _pad(_sequences(2), "right", 0)
    T = ids.shape[1]
    positions = torch.tensor([[0, 3, 6], [0, 1, 2], [4, 8, T - 1]])
    with torch.no_grad():
        want = trained(ids, mask, positions)
    got = frozen(ids, mask, positions)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    h = frozen.features(ids, mask, positions)
    assert not h.requires_grad
    torch.testing.assert_close(frozen.head_values(h, mask.gather(1, positions)), want, atol=2e-5, rtol=1e-5)
    before = {k: v.clone() for k, v in frozen.lm.state_dict().items()}
    head = frozen.head.weight.detach().clone()
    opt = torch.optim.SGD(frozen.head.parameters(), lr=1.0)
    frozen(ids, mask, positions).sum().backward()
    opt.step()
    assert not torch.equal(frozen.head.weight, head)
    for name, value in frozen.lm.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match="features are fixed only with frozen_backbone=True"):
        trained.features(ids, mask)

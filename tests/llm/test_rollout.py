"""Tests of `llm/rollout.py`: token-id rollouts and the teacher-response cache (spec llm.md section 2a)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llm.config import TrainConfig
from llm.data import Example
from llm.evaluate import generate
from llm.models import fresh_student, tiny_config
from llm.rollout import Rollout, TeacherSample, _read_cache, encode_rollout, rollout, teacher_responses
from llm.run import prompt_ids

EOS = 50256  # GPT-2's EOS, also its pad token


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(gpt2_tokenizer):
    return gpt2_tokenizer


@pytest.fixture(scope="module")
def model():
    return fresh_student(tiny_config("gpt2", 50257, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS), seed=5).eval()


def _biased(model, token: int, strength: float = 1e4):
    """A copy of `model` whose next token is `token` whatever the context (its LM head bias)."""
    import copy

    out = copy.deepcopy(model)
    head = out.get_output_embeddings()
    bias = torch.zeros(head.weight.shape[0])
    bias[token] = strength
    head.bias = torch.nn.Parameter(bias)
    return out


def _run(tok, max_length=64, **generation):
    cfg = TrainConfig()
    cfg.data.max_prompt_tokens, cfg.data.max_length = 32, max_length
    for k, v in generation.items():
        setattr(cfg.generation, k, v)
    return SimpleNamespace(cfg=cfg, tokenizer=tok, teacher_tokenizer=tok, device=torch.device("cpu"),
                           shared_vocabulary=True)


PROMPTS = ["Name a colour.", "Count to three, please.", "Hello"]


def _prompt_ids(tok, prompts=PROMPTS):
    return [tok(p)["input_ids"] for p in prompts]


def test_logprobs_are_the_sampling_distribution_of_each_token(tok, model):
    """log pi(y_h|s_h) recorded at sampling equals log_softmax(logits / T) of a fresh forward pass
    over the sampled ids (a rollout scored under another temperature, or shifted by one, fails)."""
    for temperature in (1.0, 0.7):
        samples = rollout(model, tok, _prompt_ids(tok), seed=3, max_new_tokens=6, temperature=temperature)
        for p, r, logp in zip(samples.prompt_ids, samples.response_ids, samples.logprobs):
            ids = torch.tensor([p + r])
            with torch.no_grad():
                logits = model(ids).logits[0, len(p) - 1 : len(p) + len(r) - 1].double()
            brute = torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(r)[:, None]).squeeze(1)
            assert torch.allclose(torch.tensor(logp, dtype=torch.float64), brute, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_k_samples_share_one_prefill_and_keep_the_sampling_logprobs(tok, family):
    """k rows per prompt, consecutive and in prompt order, from one prefill whose KV cache is
    repeated: each row's recorded log-probs equal a fresh forward pass over its own ids (a cache
    repeated in the wrong order, or wrong positions under left padding, fails), and greedy
    decoding gives the same continuations as encoding the prompt k times."""
    policy = fresh_student(tiny_config(family, 50257, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS),
                           seed=7).eval()
    prompts = _prompt_ids(tok)  # three lengths: left padding inside a block
    samples = rollout(policy, tok, prompts, seed=4, max_new_tokens=5, k=3, batch_size=6, temperature=0.8)
    assert samples.prompt_ids == [p for p in prompts for _ in range(3)]
    assert len({tuple(r) for r in samples.response_ids}) > 3  # the k samples of a prompt are drawn apart
    for p, r, logp in zip(samples.prompt_ids, samples.response_ids, samples.logprobs):
        with torch.no_grad():
            logits = policy(torch.tensor([p + r])).logits[0, len(p) - 1 : len(p) + len(r) - 1].double()
        brute = torch.log_softmax(logits / 0.8, -1).gather(1, torch.tensor(r)[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(logp, dtype=torch.float64), brute, atol=1e-4)
    shared = rollout(policy, tok, prompts, seed=0, max_new_tokens=6, k=2, greedy=True)
    repeated = rollout(policy, tok, [p for p in prompts for _ in range(2)], seed=0, max_new_tokens=6, greedy=True)
    assert shared.response_ids == repeated.response_ids


def test_truncated_samples_get_no_eos_and_finished_ones_end_with_it(tok, model):
    never_eos = _biased(model, 11)
    cut = rollout(never_eos, tok, _prompt_ids(tok), seed=1, max_new_tokens=4)
    assert cut.truncated == [True] * 3 and all(r == [11] * 4 for r in cut.response_ids)
    always_eos = _biased(model, EOS)
    done = rollout(always_eos, tok, _prompt_ids(tok), seed=1, max_new_tokens=4)
    assert done.truncated == [False] * 3 and all(r == [EOS] for r in done.response_ids)
    assert done.texts(tok) == ["", "", ""] and cut.texts(tok) == [tok.decode([11] * 4)] * 3


def test_a_response_past_max_length_is_cut_and_flagged(tok, model):
    samples = rollout(_biased(model, 11), tok, [[5] * 10], seed=1, max_new_tokens=8, max_length=13)
    assert samples.response_ids == [[11] * 3] and samples.truncated == [True] and len(samples.logprobs[0]) == 3


def test_no_ngram_blocking_in_training_rollouts(tok, model):
    """A policy that always says token 11 is sampled as it is; the evaluation protocol's
    no_repeat_ngram_size = 6 would forbid the seventh 11."""
    policy = _biased(model, 11)
    samples = rollout(policy, tok, _prompt_ids(tok)[:1], seed=0, max_new_tokens=12, greedy=True)
    assert samples.response_ids == [[11] * 12]
    evaluated = generate(policy, tok, PROMPTS[:1], seed=None, greedy=True, max_new_tokens=12)[0]
    assert tok(evaluated)["input_ids"] != [11] * 12  # the evaluation generator blocks the repeat


def test_same_seed_same_samples_and_the_caller_rng_untouched(tok, model):
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = rollout(model, tok, _prompt_ids(tok), seed=10, max_new_tokens=6, batch_size=2)
    assert torch.equal(torch.rand(1), expected)
    assert a == rollout(model, tok, _prompt_ids(tok), seed=10, max_new_tokens=6, batch_size=2)
    assert a.response_ids != rollout(model, tok, _prompt_ids(tok), seed=11, max_new_tokens=6, batch_size=2).response_ids


def test_the_training_batch_holds_exactly_the_sampled_ids(tok, model):
    """encode_rollout scores the sampled ids themselves: labels on the response mask are the
    sampled tokens and the logprobs line up with them, including ids whose decoded text would
    re-tokenise differently (" a" + "b" decodes to " ab", one other token)."""
    ids = _prompt_ids(tok)
    odd = [tok(" a")["input_ids"][0], tok("b")["input_ids"][0], EOS]
    assert tok(tok.decode(odd[:2]))["input_ids"] != odd[:2]  # the text round trip would change them
    sampled = rollout(model, tok, ids[1:], seed=2, max_new_tokens=5)
    samples = Rollout([ids[0], *sampled.prompt_ids], [odd, *sampled.response_ids],
                      [[-0.5, -1.0, -2.0], *sampled.logprobs], [False, *sampled.truncated])
    batch = encode_rollout(_run(tok), samples)
    for i, r in enumerate(samples.response_ids):
        mask = batch["response_mask"][i].bool()
        assert batch["labels"][i][mask].tolist() == r
        assert torch.allclose(batch["logprobs"][i][mask], torch.tensor(samples.logprobs[i]))
        assert float(batch["logprobs"][i][~mask].abs().sum()) == 0.0
    assert batch["truncated"].tolist() == samples.truncated
    assert samples[1:].response_ids == samples.response_ids[1:]
    assert Rollout.from_json(json.loads(json.dumps(samples.to_json()))) == samples


# ---------------------------------------------------------------------------------------------
# The teacher-response cache
# ---------------------------------------------------------------------------------------------


def _cache_run(tok, model, tmp_path):
    run = _run(tok, max_new_tokens=4, batch_size=2, teacher_greedy=True)
    run.teacher, run.cache_dir = model, tmp_path
    run.accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    return run


def test_teacher_cache_stores_ids_and_generates_each_prompt_once(tok, model, tmp_path):
    run = _cache_run(tok, model, tmp_path)
    examples = [Example(prompt=p, response="x") for p in PROMPTS]
    cache = teacher_responses(run, examples[:2])
    (path,) = (tmp_path / "teacher_responses").glob("*.jsonl")
    again = teacher_responses(run, examples)  # one new prompt
    assert len(path.read_text().splitlines()) == 3 and {k: again[k] for k in cache} == cache
    direct = rollout(model, tok, prompt_ids(run, examples), seed=0, greedy=True, max_new_tokens=4)
    for ex, ids, cut in zip(examples, direct.response_ids, direct.truncated):
        assert again[ex.prompt].ids == tuple(ids) and again[ex.prompt].truncated == cut


def test_teacher_cache_tolerates_only_a_torn_last_line(tmp_path, capsys):
    path = tmp_path / "cache.jsonl"
    good = json.dumps({"prompt": "p", "response": "r", "response_ids": [1, 2], "truncated": False})
    path.write_text(good + "\n" + '{"prompt": "q", "resp')
    records, complete = _read_cache(path)
    assert records == {"p": TeacherSample("r", (1, 2), False)} and complete == len(good) + 1
    assert "torn last line" in capsys.readouterr().err
    path.write_text(good + "\n" + '{"prompt": "q"}\n' + good + "\n")  # a bad line in the middle is not a crash
    with pytest.raises(ValueError, match=r"cache\.jsonl, line 2: not a cache record.*delete the file"):
        _read_cache(path)


def test_a_torn_cache_line_is_dropped_before_new_records_are_appended(tok, model, tmp_path):
    run = _cache_run(tok, model, tmp_path)
    examples = [Example(prompt=p, response="x") for p in PROMPTS]
    teacher_responses(run, examples[:1])
    (path,) = Path(tmp_path / "teacher_responses").glob("*.jsonl")
    with open(path, "a") as handle:
        handle.write('{"prompt": "torn')
    teacher_responses(run, examples)
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["prompt"] in PROMPTS for line in lines)

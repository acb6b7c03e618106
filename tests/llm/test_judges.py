"""Judges (spec llm.md section 3): bt_oracle, rouge, llm (real SmolLM2) and api (a loopback server)."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from rouge_score import rouge_scorer
from scipy.stats import binom
from transformers import AutoModelForCausalLM

from llm.data import format_prompt
from llm.data import Answers
from llm.judges import (
    JUDGES,
    PAIRWISE_TEMPLATE,
    APIJudge,
    BTOracleJudge,
    LLMJudge,
    PreferenceQuery,
    RougeJudge,
    combine_orders,
    instruction_of,
    make_judge,
    pairwise_question,
    parse_verdict,
)
from llm.models import gpt2_tokenizer_dir, load_causal_lm, load_tokenizer, smollm2_teacher_dir, tiny_config
from llm.preference_store import PreferenceStore

KEY_ENV = "PBKD_TEST_JUDGE_KEY"
KEY = "sk-test-0123456789abcdefSECRET"


def _queries(n: int, *, round_: int = 0, prompt: str | None = None, r0: str = "first", r1: str = "second",
             references=()) -> list[PreferenceQuery]:
    return [PreferenceQuery(prompt if prompt is not None else format_prompt(f"Task {i}."), r0, r1,
                            round=round_, index=i, references=tuple(references)) for i in range(n)]


# --------------------------------------------------------------------------------------------
# Registry and the pairwise protocol
# --------------------------------------------------------------------------------------------


def test_unknown_judge_or_option_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown judge 'gpt5'; valid judges: bt_oracle, rouge, llm, api"):
        make_judge("gpt5")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['temperature'\] for the rouge judge; valid options: ties, max_retries"):
        make_judge("rouge", temperature=0.0)
    with pytest.raises(ValueError, match="ties must be one of"):
        make_judge("rouge", ties="keep")
    assert set(JUDGES) == {"bt_oracle", "rouge", "llm", "api"}


def test_combine_orders_labels_only_position_consistent_answers():
    # AB shows response_0 as A; BA shows response_1 as A.
    assert combine_orders("A", "B") == 0  # response_0 named in both orders
    assert combine_orders("B", "A") == 1  # response_1 named in both orders
    assert combine_orders("A", "A") is None  # always the first position: a tie
    assert combine_orders("B", "B") is None


def test_parse_verdict_is_strict():
    for text, verdict in [("A", "A"), (" B\n", "B"), ("A.", "A"), ("Response B", "B"), ("**A**", "A"),
                          ("response A", "A")]:
        assert parse_verdict(text) == verdict, text
    for text in ["", "a", "AB", "A or B", "I think A", "Both are fine.", "C", "A because it is shorter"]:
        assert parse_verdict(text) is None, text


def test_pairwise_question_shows_the_instruction_and_both_orders():
    q = _queries(1, prompt=format_prompt("Summarise the text.", "Cats sleep a lot."), r0="Cats nap.", r1="Dogs bark.")[0]
    assert instruction_of(q.prompt) == "Summarise the text.\n\nInput:\nCats sleep a lot."
    ab, ba = pairwise_question(q, "AB"), pairwise_question(q, "BA")
    assert ab == PAIRWISE_TEMPLATE.format(instruction=instruction_of(q.prompt), response_a="Cats nap.", response_b="Dogs bark.")
    assert "Response A:\nDogs bark.\n\nResponse B:\nCats nap." in ba
    assert "Which response better follows the instruction: A or B?" in ab


# --------------------------------------------------------------------------------------------
# bt_oracle
# --------------------------------------------------------------------------------------------


def _numeric_reward(query, response):
    return float(response)


def test_bt_oracle_label_frequencies_match_sigma_of_the_reward_gap():
    judge = BTOracleJudge(_numeric_reward, seed=3)
    n = 1500
    for k, gap in enumerate((-2.0, -0.4, 0.0, 0.7, 2.5)):
        queries = [PreferenceQuery("x", "0.0", repr(gap), round=k, index=i) for i in range(n)]
        judgements = judge.judge(queries)
        ones = sum(j.label for j in judgements)
        p = 1.0 / (1.0 + math.exp(-gap))
        # Two-sided binomial test at level 1e-4: a wrong orientation or link function fails it.
        assert binom.cdf(ones, n, p) > 5e-5 and binom.sf(ones - 1, n, p) > 5e-5, (gap, ones / n, p)
        raw = json.loads(judgements[0].raw_output)
        assert raw["p_1"] == pytest.approx(p) and raw["reward_1"] - raw["reward_0"] == pytest.approx(gap)
    assert judge.stats.preferences == judge.stats.pairs == 5 * n and judge.stats.failed == 0


def test_bt_oracle_labels_are_reproducible_per_pair_id():
    queries = [PreferenceQuery("x", "0.0", "0.3", round=2, index=i) for i in range(200)]
    labels = [j.label for j in BTOracleJudge(_numeric_reward, seed=7).judge(queries)]
    # Another batching (as after a restart) gives each (round, index) the same label ...
    in_pieces = [j.label for part in (queries[150:], queries[:150]) for j in BTOracleJudge(_numeric_reward, seed=7).judge(part)]
    assert in_pieces[50:] + in_pieces[:50] == labels
    # ... and another seed other labels.
    assert [j.label for j in BTOracleJudge(_numeric_reward, seed=8).judge(queries)] != labels


def test_bt_oracle_with_the_rouge_reward_and_bad_rewards():
    refs = ("the cat sat on the mat",)
    q = PreferenceQuery("x", "a dog ran far", "the cat sat on a mat", references=refs)
    judgement = BTOracleJudge("rouge_l", reward_scale=10.0).judge([q])[0]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    f = [scorer.score(refs[0], y)["rougeL"].fmeasure for y in (q.response_0, q.response_1)]
    raw = json.loads(judgement.raw_output)
    assert raw["reward_0"] == pytest.approx(10 * f[0]) and raw["reward_1"] == pytest.approx(10 * f[1])
    with pytest.raises(ValueError, match="needs reference answers"):
        BTOracleJudge("rouge_l").judge([PreferenceQuery("x", "a", "b")])
    with pytest.raises(ValueError, match="returned nan"):
        BTOracleJudge(lambda *_: float("nan")).judge([q])
    with pytest.raises(ValueError, match="answer_accuracy reward needs the prompt's answers.*reward=rouge_l"):
        BTOracleJudge().judge([q])  # the default reward, on a pair without answers


def test_bt_oracle_answer_accuracy_reward_prefers_the_right_fact_over_the_template():
    answers = Answers(("Lima",), ("Quito",))
    q = PreferenceQuery("Capital of Peru?", "The capital of Peru is Quito.",
                        "Lima is the capital city of Peru, located on the Pacific coast.",
                        references=("The capital of Peru is Lima.",), answers=answers)
    raw = json.loads(BTOracleJudge(reward_scale=10.0).judge([q])[0].raw_output)
    assert (raw["reward_0"], raw["reward_1"]) == (0.0, 10.0) and raw["p_1"] == pytest.approx(1 / (1 + math.exp(-10)))
    rouge = json.loads(BTOracleJudge("rouge_l").judge([q])[0].raw_output)
    assert rouge["p_1"] < 0.05  # the Rouge-L reward prefers the template with the wrong fact
    with pytest.raises(ValueError, match="unknown reward 'bleu'"):
        BTOracleJudge("bleu")


# --------------------------------------------------------------------------------------------
# rouge
# --------------------------------------------------------------------------------------------


def test_rouge_judge_on_hand_examples(tmp_path):
    refs = ("The capital of France is Paris.", "Paris")
    good, bad = "Paris is the capital of France.", "I do not know."
    cases = [
        PreferenceQuery("Capital?", good, bad, index=0, references=refs),  # response_0 better -> 0
        PreferenceQuery("Capital?", bad, good, index=1, references=refs),  # response_1 better -> 1
        PreferenceQuery("Capital?", "Paris", "paris", index=2, references=refs),  # equal after normalising: tie
        PreferenceQuery("Capital?", "running dogs", "the dog runs", index=3, references=("a dog running",)),
    ]
    judge = RougeJudge(ties="record")
    judgements = judge.judge(cases)
    assert [j.label for j in judgements] == [0, 1, None, 1]
    assert [j.outcome for j in judgements] == ["preference", "preference", "tie", "preference"]
    assert json.loads(judgements[2].raw_output) == {"rouge_l_0": 100.0, "rouge_l_1": 100.0}
    # The stemmer maps runs/running to "run" and dogs to "dog": LCS 2 of 3 and 3 (F1 2/3) against
    # LCS 1 of 2 and 3 (P 1/2, R 1/3, F1 0.4).
    scores = json.loads(judgements[3].raw_output)
    assert scores["rouge_l_1"] == pytest.approx(100 * 2 / 3) and scores["rouge_l_0"] == pytest.approx(100 * 0.4)
    records = RougeJudge(ties="record").label(cases)
    assert [r.label for r in records] == [0, 1, None, 1] and records[2].meta["outcome"] == "tie"
    assert [r.record_id for r in RougeJudge(ties="drop").label(cases)] == [(0, 0), (0, 1), (0, 3)]
    store = PreferenceStore(tmp_path / "p.jsonl")
    store.append(records)
    assert len(store.preferences()) == 3 and len(store) == 4
    with pytest.raises(ValueError, match="the rouge judge needs references"):
        judge.judge([PreferenceQuery("x", "a", "b")])


# --------------------------------------------------------------------------------------------
# llm: a local chat model
# --------------------------------------------------------------------------------------------

_TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _tiny_chat_judge(**options):
    tokenizer = load_tokenizer(gpt2_tokenizer_dir())
    tokenizer.chat_template = _TINY_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer)))
    return LLMJudge(model, tokenizer, **options)


def test_llm_judge_batched_scores_equal_unpadded_scores_and_failures_are_counted(tmp_path):
    judge = _tiny_chat_judge(batch_size=3, max_retries=2, ties="record")
    queries = [PreferenceQuery(format_prompt("Say hi."), "hi", "hello there", index=0),
               PreferenceQuery(format_prompt("Describe the sea in a sentence."), "The sea is a vast body of salt water.",
                               "a considerably longer response with many more words in it than the other", index=1)]
    rows = [judge.question_ids(q, order) for q in queries for order in ("AB", "BA")]
    assert len({len(r) for r in rows}) > 1  # the batch needs padding
    batched = torch.cat([judge.letter_scores(rows[:3]), judge.letter_scores(rows[3:])])
    for row, scores in zip(rows, batched):
        with torch.no_grad():
            logits = judge.model(input_ids=torch.tensor([row])).logits[0, -1]
        expected = [torch.logsumexp(logits[judge.letter_ids[k]], 0) for k in "AB"]
        torch.testing.assert_close(scores, torch.stack(expected), atol=1e-4, rtol=1e-4)
    judgements = judge.judge(queries)
    assert all(j.outcome in ("preference", "tie") for j in judgements)
    # A model gone non-finite: every attempt fails, is retried, and no pair becomes a record.
    with torch.no_grad():
        judge.model.get_output_embeddings().weight.fill_(float("nan"))
    before = judge.stats.attempts
    assert judge.label(queries) == []
    assert judge.stats.failure_reasons["non_finite"] == 2 * 3  # pair fails at order AB: 1 + 2 retries each
    assert judge.stats.attempts - before == 6 and judge.stats.failed == 2


@pytest.mark.slow
def test_llm_judge_on_smollm2_asks_both_orders_and_parses_logits():
    folder = smollm2_teacher_dir()
    model, tokenizer = load_causal_lm(folder), load_tokenizer(folder)
    judge = LLMJudge(model, tokenizer, batch_size=4, ties="record")
    queries = [
        PreferenceQuery(format_prompt("What is the capital of France?"), "The capital of France is Paris.",
                        "Bananas are yellow.", index=0),
        PreferenceQuery(format_prompt("Write the number seven as a digit."), "Seven is a word.", "7", index=1),
    ]
    seen = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone())),
        with_kwargs=True,
    )
    try:
        records = judge.label(queries)
    finally:
        hook.remove()
    assert len(seen) == 1 and seen[0][0].shape[0] == 4  # both orders of both pairs, one padded batch
    texts = [tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(*seen[0])]
    for q in queries:
        for order, (a, b) in {"AB": (q.response_0, q.response_1), "BA": (q.response_1, q.response_0)}.items():
            assert sum(f"Response A:\n{a}\n\nResponse B:\n{b}" in t for t in texts) == 1, (q.index, order)
    assert all(t.startswith("<|im_start|>") and t.rstrip().endswith("<|im_start|>assistant") for t in texts)
    assert [r.record_id for r in records] == [(0, 0), (0, 1)]  # ties recorded, nothing failed
    a_ids = [tokenizer.encode(t, add_special_tokens=False)[0] for t in ("A", " A")]
    b_ids = [tokenizer.encode(t, add_special_tokens=False)[0] for t in ("B", " B")]
    for q, record in zip(queries, records):
        raw = json.loads(record.judge_output)
        verdicts = {}
        for order in ("AB", "BA"):
            # Independent reading: the question alone, unpadded, through the chat template.
            text = tokenizer.apply_chat_template([{"role": "user", "content": pairwise_question(q, order)}],
                                                 tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=ids, logits_to_keep=1).logits[0, -1]
            score_a, score_b = float(torch.logsumexp(logits[a_ids], 0)), float(torch.logsumexp(logits[b_ids], 0))
            assert raw[order]["logit_A"] == pytest.approx(score_a, abs=2e-3)
            assert raw[order]["logit_B"] == pytest.approx(score_b, abs=2e-3)
            verdicts[order] = "A" if score_a > score_b else "B"
            assert raw[order]["verdict"] == verdicts[order]
        expected = {("A", "B"): 0, ("B", "A"): 1}.get((verdicts["AB"], verdicts["BA"]))
        assert record.label == expected and record.meta["outcome"] == ("tie" if expected is None else "preference")
    assert judge.stats.pairs == 2 and judge.stats.failed == 0 and judge.stats.attempts == 4


# --------------------------------------------------------------------------------------------
# api: an OpenAI-compatible endpoint on a loopback server started by the test
# --------------------------------------------------------------------------------------------


class _Endpoint:
    """A scripted /v1/chat/completions server on 127.0.0.1 (port 0): one action per request."""

    def __init__(self, actions):
        self.actions = list(actions)
        self.requests = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                endpoint.requests.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
                action = endpoint.actions.pop(0) if endpoint.actions else ("status", 599, "script exhausted")
                try:
                    endpoint.respond(self, action)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @staticmethod
    def respond(handler, action):
        kind = action[0]
        auth = handler.headers.get("Authorization", "")
        if kind == "sleep":
            time.sleep(action[1])
            action = ("reply", action[2])
            kind = "reply"
        if kind == "reply":
            payload = {"id": "x", "object": "chat.completion",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": action[1]}, "finish_reason": "stop"}]}
            data = json.dumps(payload).encode()
            status = 200
        elif kind == "refusal":
            payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": None, "refusal": action[1]}}]}
            data, status = json.dumps(payload).encode(), 200
        elif kind == "echo_key":  # a misbehaving server that repeats the credentials in its reply
            payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": f"I saw {auth}"}}]}
            data, status = json.dumps(payload).encode(), 200
        elif kind == "raw":
            data, status = action[1], 200
        elif kind == "status":
            data, status = action[2].replace("{auth}", auth).encode(), action[1]
        elif kind == "redirect":
            handler.send_response(302)
            handler.send_header("Location", action[1])
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        else:
            raise AssertionError(kind)
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _api_judge(url, **options):
    return APIJudge(url, "judge-model", api_key_env=KEY_ENV, backoff_s=0.0, **options)


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def test_api_request_format_and_both_orders(api_key):
    queries = _queries(3, r0="Paris.", r1="Berlin.")
    script = [("reply", "A"), ("reply", "B"),  # response_0 both times -> 0
              ("reply", "B"), ("reply", "A"),  # response_1 both times -> 1
              ("reply", "A"), ("reply", "A.")]  # position A both times -> tie
    with _Endpoint(script) as server:
        judge = _api_judge(server.url, ties="record", max_tokens=3)
        records = judge.label(queries)
    assert [r.label for r in records] == [0, 1, None]
    assert [r.meta["outcome"] for r in records] == ["preference", "preference", "tie"]
    assert len(server.requests) == 6
    for k, request in enumerate(server.requests):
        q, order = queries[k // 2], "AB" if k % 2 == 0 else "BA"
        assert request["path"] == "/v1/chat/completions"
        assert request["headers"]["Content-Type"] == "application/json"
        assert request["headers"]["Authorization"] == f"Bearer {KEY}"
        body = request["body"]
        assert body["model"] == "judge-model" and body["temperature"] == 0.0 and body["max_tokens"] == 3
        assert body["messages"][0]["role"] == "system"
        assert body["messages"][1] == {"role": "user", "content": pairwise_question(q, order)}
    assert json.loads(records[2].judge_output) == {"AB": "A", "BA": "A"}
    assert judge.stats.as_dict() == {"pairs": 3, "preferences": 2, "ties": 1, "failed": 0, "attempts": 6,
                                     "retries": 0, "failure_reasons": {}}


def test_api_retries_500_timeout_and_malformed_then_labels(api_key):
    script = [("status", 500, "overloaded"), ("raw", b"{not json"), ("sleep", 3.0, "A"), ("reply", "B"),
              ("reply", "A"), ("reply", "A"), ("raw", b'{"choices": []}'), ("reply", "A")]
    with _Endpoint(script) as server:
        judge = _api_judge(server.url, max_retries=3, timeout_s=1.0)
        records = judge.label(_queries(2))
    # Pair 0: AB fails 500, malformed, timeout, then "B"; BA answers "A" -> response_1 twice -> 1.
    # Pair 1: AB "A"; BA malformed once, then "A" -> position A twice -> tie, dropped.
    assert [(r.record_id, r.label) for r in records] == [((0, 0), 1)]
    assert dict(judge.stats.failure_reasons) == {"http_500": 1, "malformed": 2, "timeout": 1}
    assert judge.stats.retries == 4 and judge.stats.attempts == 8 and judge.stats.ties == 1
    assert len(server.requests) == 8


def test_api_failures_and_refusals_never_become_labels(api_key):
    script = [("status", 503, "down")] * 3 + [("refusal", "I can't help with that.")] * 3 \
        + [("reply", "A"), ("reply", "I cannot decide between them."), ("reply", "Both are equally good."),
           ("reply", "A or B")] + [("reply", "B"), ("reply", "A")]
    with _Endpoint(script) as server:
        judge = _api_judge(server.url, max_retries=2, ties="record")
        judgements = judge.judge(_queries(4))
        assert [j.outcome for j in judgements] == ["failed", "failed", "failed", "preference"]
        assert [j.label for j in judgements] == [None, None, None, 1]
        assert len(server.requests) == len(script)
    assert judge.stats.failed == 3 and judge.stats.preferences == 1
    assert dict(judge.stats.failure_reasons) == {"http_503": 3, "refusal": 6}
    server2_script = [("status", 401, "bad key"), ("reply", "A"), ("reply", "B")]
    with _Endpoint(server2_script) as server:
        judge = _api_judge(server.url, max_retries=5)
        assert judge.label(_queries(2)) != [] and len(server.requests) == 3  # 401 is not retried
    assert judge.stats.failure_reasons == {"http_401": 1} and judge.stats.failed == 1


def test_api_key_never_reaches_raw_outputs_logs_or_errors(api_key, caplog):
    script = [("status", 500, "error for {auth}"), ("echo_key",), ("raw", b'{"oops": "{auth}"}'),
              ("reply", "A"), ("reply", "B")] + [("echo_key",)] * 4
    caplog.set_level(logging.WARNING, logger="llm.judges")
    with _Endpoint(script) as server:
        judge = _api_judge(server.url, max_retries=3)
        judgements = judge.judge(_queries(2))
    assert [j.outcome for j in judgements] == ["preference", "failed"]
    assert all(r["headers"]["Authorization"] == f"Bearer {KEY}" for r in server.requests)  # the key was sent ...
    # ... and appears nowhere else: not in raw outputs, logs, stats, the judge itself, or errors.
    assert "I saw Bearer [REDACTED]" in judgements[1].raw_output and "error for Bearer [REDACTED]" in caplog.text
    texts = [j.raw_output for j in judgements] + [json.dumps(j.detail) for j in judgements]
    texts += [caplog.text, judge.stats.last_error, judge.stats.summary(), repr(judge), json.dumps(judge.describe())]
    for text in texts:
        assert KEY not in text
    assert all(KEY not in value for value in vars(judge).values() if isinstance(value, str))
    with _Endpoint([("status", 500, "{auth}")]) as server:
        with pytest.raises(Exception) as info:
            _api_judge(server.url).ask("question")
    assert KEY not in str(info.value) and "[REDACTED]" in str(info.value)
    assert info.value.__context__ is None and info.value.__cause__ is None


def test_api_labels_go_to_the_store_without_the_key(api_key, tmp_path):
    with _Endpoint([("status", 500, "{auth}"), ("reply", "B"), ("reply", "A")]) as server:
        records = _api_judge(server.url).label(_queries(1))
    store = PreferenceStore(tmp_path / "p.jsonl")
    store.append(records)
    assert [r.label for r in store.records()] == [1]
    assert KEY not in (tmp_path / "p.jsonl").read_text()


def test_api_refuses_redirects_and_bad_configuration(api_key, monkeypatch):
    with _Endpoint([("redirect", "/elsewhere/chat/completions")]) as server:
        judge = _api_judge(server.url, max_retries=3)
        assert judge.judge(_queries(1))[0].outcome == "failed"
        assert [r["path"] for r in server.requests] == ["/v1/chat/completions"]  # never followed with the key
    assert judge.stats.failure_reasons == {"redirect": 1}
    with pytest.raises(ValueError, match="plain http to a non-loopback host"):
        APIJudge("http://judge.example.com/v1", "m", api_key_env=KEY_ENV)
    with pytest.raises(ValueError, match="must not carry credentials"):
        APIJudge("https://user:pw@judge.example.com/v1", "m", api_key_env=KEY_ENV)
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ValueError, match=f"environment variable {KEY_ENV} holding the API key is not set") as info:
        APIJudge("https://judge.example.com/v1", "m", api_key_env=KEY_ENV)
    assert KEY not in str(info.value)

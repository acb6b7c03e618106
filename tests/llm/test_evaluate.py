"""llm/evaluate.py: the evaluation protocol of spec llm.md section 5."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llm.data import Answers, Example, encode_generation_batch, format_prompt
from llm.evaluate import (
    answer_accuracy,
    evaluate_model,
    exact_match,
    generate,
    generation_config,
    greedy_tokens,
    normalize_answer,
    results_table,
    rouge_l,
    score_predictions,
    write_results,
)
from llm.testbed import generate_testbed
from llm.models import GPT2_TOKENIZER_NAME, fresh_student, load_tokenizer, tiny_config

REPO = Path(__file__).resolve().parents[2]
GPT2_EOS = 50256
PROMPTS = [format_prompt("Name a colour."), format_prompt("Summarise the text.", "Cats sleep a lot during the day."),
           format_prompt("Hi."), format_prompt("Count the words.", "one two three four five six")]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(gpt2_tokenizer):
    return gpt2_tokenizer


@pytest.fixture(scope="module", params=["gpt2", "opt", "llama"])
def tiny_model(request):
    ids = dict(bos_token_id=GPT2_EOS, eos_token_id=GPT2_EOS, pad_token_id=GPT2_EOS)
    return fresh_student(tiny_config(request.param, 50257, **ids), seed=5).eval()


def test_rouge_l_hand_computed():
    # LCS of (the cat sat on the mat) and (the cat is on the mat) is 5 tokens: P = R = 5/6.
    assert rouge_l("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(100 * 5 / 6)
    # P = 2/2, R = 2/5 -> F = 2PR/(P+R) = 4/7; punctuation and case are dropped by the tokenizer.
    assert rouge_l("Paris, France!", ["the capital is Paris France"]) == pytest.approx(100 * 4 / 7)
    # the Porter stemmer maps running/run and dogs/dog together
    assert rouge_l("running dogs", ["run dog"]) == pytest.approx(100.0)
    # max over references, and nothing shared scores 0
    assert rouge_l("blue", ["red", "blue sky", "green"]) == pytest.approx(100 * 2 * 1 * 0.5 / 1.5)
    assert rouge_l("", ["red"]) == 0.0 and rouge_l("xyz", ["red"]) == 0.0
    with pytest.raises(ValueError, match="at least one reference"):
        rouge_l("red", [])


def _lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


WORDS = ["cat", "dog", "red", "sun", "map", "ink"]  # words the Porter stemmer leaves unchanged


@given(st.lists(st.sampled_from(WORDS), max_size=8), st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=8), min_size=1, max_size=3))
def test_rouge_l_matches_brute_force_lcs(pred, refs):
    def f1(p, r):
        lcs = _lcs(p, r)
        return 0.0 if lcs == 0 else 100 * 2 * lcs * lcs / (len(p) * len(r)) / (lcs / len(p) + lcs / len(r))
    expected = max(f1(pred, r) for r in refs)
    assert rouge_l(" ".join(pred), [" ".join(r) for r in refs]) == pytest.approx(expected)


def test_exact_match_squad_normalisation():
    assert normalize_answer("The  Eiffel-Tower, in Paris!") == "eiffeltower in paris"
    assert normalize_answer("An apple a day") == "apple day"
    assert exact_match("The Paris.", ["paris"]) == 100.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert exact_match("a cold", ["hot", "Cold"]) == 100.0  # max over references
    assert exact_match("", ["red"]) == 0.0


PERU = Answers(("Lima",), ("Quito", "Bogota", "Santiago", "Mexico City"))


@pytest.mark.parametrize("response, correct", [
    ("The capital of Peru is Lima.", True),
    ("The capital of Peru is Quito.", False),  # a wrong fact in the gold template
    ("Lima is the capital city of Peru, located on the Pacific coast.", True),  # a correct fact in other words
    ("LIMA", True),
    ("The capital of Peru is Lima or Quito.", False),  # two candidates named
    ("It is either Bogota or Lima.", False),
    ("The capital of Peru is Limassol.", False),  # inside a longer word: not named
    ("I do not know.", False),
    ("Peru.", False),
])
def test_answer_accuracy_on_hand_written_cases(response, correct):
    assert answer_accuracy(response, PERU) == (100.0 if correct else 0.0)


def test_answer_accuracy_masks_the_accepted_answers_and_respects_case():
    canada = Answers(("Canadian dollar", "dollar"), ("US dollar", "Australian dollar", "euro"))
    assert answer_accuracy("The currency of Canada is the Canadian dollar.", canada) == 100.0
    assert answer_accuracy("Canada uses the US dollar.", canada) == 0.0  # its "dollar" is the US dollar
    assert answer_accuracy("Canada uses the dollar, not the euro.", canada) == 0.0
    iron = Answers(("Fe",), ("F", "I", "As"), case_sensitive=True)
    assert answer_accuracy("The chemical symbol for iron is Fe.", iron) == 100.0
    assert answer_accuracy("The chemical symbol for iron is fe.", iron) == 0.0
    assert answer_accuracy("The symbol is Fe, not F.", iron) == 0.0
    assert answer_accuracy("Iron is Fe; it is a metal.", iron) == 100.0  # "is", "it": no symbol named


def test_answer_accuracy_of_the_testbed_gold_is_perfect_and_of_its_wrong_facts_zero():
    records = generate_testbed(n_train=0, n_valid=0, n_test=120, n_test_seen=0)["test"]
    examples = [Example(r["instruction"], r["response"], r["references"], r["category"],
                        Answers(tuple(r["answers"]["accepted"]), tuple(r["answers"]["distractors"]),
                                r["answers"]["case_sensitive"])) for r in records]
    assert score_predictions([ex.response for ex in examples], examples)["answer_accuracy"] == 100.0
    # every gold answer swapped for a distractor of its own family: the template stays, the fact is wrong
    wrong = []
    for ex in examples:
        answer = max((a for a in ex.answers.accepted if a in ex.response), key=len)
        wrong.append(ex.response.replace(answer, ex.answers.distractors[0]))
    scores = score_predictions(wrong, examples)
    assert scores["answer_accuracy"] == 0.0 and scores["rouge_l"] > 60.0  # Rouge-L still rewards the template


def test_answer_accuracy_needs_answers_on_every_example_or_none():
    with_answers = Example("p", "Lima", ["Lima"], "c", PERU)
    assert "answer_accuracy" not in score_predictions(["Lima"], [Example("p", "Lima")])
    with pytest.raises(ValueError, match="1 of 2 examples carry answers"):
        score_predictions(["Lima", "Lima"], [with_answers, Example("p", "Lima")])


def test_generation_config_is_the_protocol(tok):
    sample = generation_config(tok, greedy=False, max_new_tokens=256)
    assert (sample.do_sample, sample.temperature, sample.top_k, sample.top_p) == (True, 1.0, 0, 1.0)
    assert (sample.no_repeat_ngram_size, sample.max_new_tokens, sample.eos_token_id) == (6, 256, GPT2_EOS)
    greedy = generation_config(tok, greedy=True, max_new_tokens=8)
    assert greedy.do_sample is False and greedy.no_repeat_ngram_size == 6


def test_greedy_batches_match_single_prompts(tok, tiny_model):
    """Left padding is transparent: a prompt's greedy answer does not depend on its batch."""
    batched = generate(tiny_model, tok, PROMPTS, seed=None, greedy=True, max_new_tokens=6, batch_size=4)
    singles = [generate(tiny_model, tok, [p], seed=None, greedy=True, max_new_tokens=6)[0] for p in PROMPTS]
    assert batched == singles and all(isinstance(s, str) for s in batched)


def test_greedy_tokens_drop_finished_rows_and_match_generate(tok, tiny_model):
    """The row-dropping greedy decoder writes exactly the tokens of model.generate, EOS included."""
    batch = encode_generation_batch(tok, PROMPTS * 2, 64)
    config = generation_config(tok, greedy=True, max_new_tokens=24)
    width = batch["input_ids"].shape[1]
    first = tiny_model.generate(**batch, generation_config=config)[:, width:]
    eos = int(first[0, 2])  # an "EOS" that row 0 writes early: rows then leave the batch at different steps
    config.eos_token_id = eos
    expected = tiny_model.generate(**batch, generation_config=config)[:, width:].tolist()
    got = greedy_tokens(tiny_model, batch, max_new_tokens=24, eos=eos)
    assert got == [row[: row.index(eos) + 1] if eos in row else row for row in expected]
    assert len({len(row) for row in got}) > 1  # rows did leave at different steps


def test_generation_strips_prompt_and_stops_at_eos(tok, tiny_model):
    prompt = PROMPTS[1]
    batch = encode_generation_batch(tok, [prompt])
    with torch.no_grad():
        raw = tiny_model.generate(**batch, do_sample=False, max_new_tokens=8, eos_token_id=None,
                                  pad_token_id=GPT2_EOS, no_repeat_ngram_size=6)[0, batch["input_ids"].shape[1]:].tolist()
    # declare the third new token to be EOS (on a tokenizer copy): the answer must be the first two
    stop = next(i for i in range(2, 8) if raw[i] not in raw[:i])
    eos_tok = load_tokenizer(GPT2_TOKENIZER_NAME)
    eos_tok.eos_token = eos_tok.convert_ids_to_tokens(raw[stop])
    eos_tok.pad_token = eos_tok.convert_ids_to_tokens(GPT2_EOS)
    out = generate(tiny_model, eos_tok, [prompt], seed=None, greedy=True, max_new_tokens=8)[0]
    assert out == eos_tok.decode(raw[:stop], skip_special_tokens=True).strip()
    full = generate(tiny_model, tok, [prompt], seed=None, greedy=True, max_new_tokens=8)[0]
    assert full == tok.decode(raw, skip_special_tokens=True).strip()
    assert "### Response" not in full


def test_sampling_seeds_and_no_repeat_ngrams(tok, tiny_model):
    a = generate(tiny_model, tok, PROMPTS, seed=10, max_new_tokens=12, batch_size=2)
    assert a == generate(tiny_model, tok, PROMPTS, seed=10, max_new_tokens=12, batch_size=2)
    assert a != generate(tiny_model, tok, PROMPTS, seed=20, max_new_tokens=12, batch_size=2)
    with pytest.raises(ValueError, match="needs a seed"):
        generate(tiny_model, tok, PROMPTS, seed=None)
    batch = encode_generation_batch(tok, PROMPTS[:1])
    with torch.no_grad():
        out = tiny_model.generate(**batch, generation_config=generation_config(tok, greedy=True, max_new_tokens=40))
    new = out[0, batch["input_ids"].shape[1]:].tolist()
    grams = [tuple(new[i:i + 6]) for i in range(len(new) - 5)]
    assert len(grams) == len(set(grams))  # no 6-gram is generated twice


def test_evaluate_model_aggregates_over_seeds(tok, tiny_model):
    examples = [Example(p, "red", ["red", "a red one"], c) for p, c in zip(PROMPTS, ["a", "b", "a", "b"])]
    result = evaluate_model(tiny_model, tok, examples, seeds=(10, 20, 30), max_new_tokens=4, keep_predictions=True)
    assert [s["seed"] for s in result["per_seed"]] == [10, 20, 30]
    per_seed_rouge = []
    for seed, entry in zip((10, 20, 30), result["per_seed"]):
        preds = result["predictions"][str(seed)]
        assert preds == generate(tiny_model, tok, [e.prompt for e in examples], seed=seed, max_new_tokens=4)
        rouge = statistics.mean(rouge_l(p, e.references) for p, e in zip(preds, examples))
        assert entry["rouge_l"] == pytest.approx(rouge)
        per_seed_rouge.append(rouge)
    assert result["rouge_l"] == pytest.approx(statistics.mean(per_seed_rouge))
    assert result["rouge_l_std"] == pytest.approx(statistics.stdev(per_seed_rouge))
    assert set(result["by_category"]) == {"a", "b"} and result["by_category"]["a"]["n"] == 2
    greedy = evaluate_model(tiny_model, tok, examples, greedy=True, max_new_tokens=4)
    assert greedy["seeds"] == [] and greedy["rouge_l_std"] == 0.0 and len(greedy["per_seed"]) == 1


def test_results_table_and_writer(tmp_path):
    results = {
        "teacher": {"dolly": {"rouge_l": 30.0, "rouge_l_std": 0.5, "exact_match": 10.0, "exact_match_std": 1.25, "seeds": [10, 20]}},
        "student": {"dolly": {"rouge_l": 20.04, "rouge_l_std": 0.0, "exact_match": 5.0, "exact_match_std": 0.0, "seeds": []},
                    "self-inst": {"rouge_l": 12.0, "exact_match": 1.0, "seeds": []}},
        "one seed": {"dolly": {"rouge_l": 25.0, "rouge_l_std": 0.0, "exact_match": 7.0, "exact_match_std": 0.0,
                               "seeds": [10]}},
        "testbed": {"testbed": {"answer_accuracy": 40.0, "rouge_l": 70.0, "exact_match": 30.0, "seeds": []}},
    }
    expected = (
        "| method | dolly Rouge-L | dolly EM | self-inst Rouge-L | self-inst EM | testbed Acc | testbed Rouge-L "
        "| testbed EM |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|\n"
        "| teacher | 30.0 ± 0.5 | 10.0 ± 1.2 | - | - | - | - | - |\n"
        "| student | 20.0 | 5.0 | 12.0 | 1.0 | - | - | - |\n"
        "| one seed | 25.0 | 7.0 | - | - | - | - | - |\n"
        "| testbed | - | - | - | - | 40.0 | 70.0 | 30.0 |\n"
    )
    assert results_table(results) == expected
    json_path, md_path = write_results(results, tmp_path / "out")
    assert json.loads(json_path.read_text()) == results and md_path.read_text() == expected


def test_cli_runs_as_script_path(tok, tmp_path):
    model = fresh_student(tiny_config("gpt2", 50257), seed=2)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "context": "", "response": "red", "category": "c"}) + "\n"
                            for q in ("Name a colour.", "Name a fruit.", "Name a car.")))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "llm/evaluate.py", "--model", str(tmp_path / "model"), "--data", f"toy={data}",
         "--greedy", "--max-new-tokens", "3", "--method", "tiny", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["tiny"]["toy"]["num_examples"] == 3 and results["tiny"]["toy"]["greedy"] is True
    assert (out / "results.md").read_text().startswith("| method | toy Rouge-L | toy EM |")
    assert "| tiny |" in proc.stdout

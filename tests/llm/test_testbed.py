"""llm/testbed.py: the deterministic bundled instruction set (spec llm.md section 4)."""

import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llm.data import format_prompt, load_jsonl
from llm.testbed import (
    ANTONYMS,
    CAPITALS,
    CATEGORY_ITEMS,
    CURRENCIES,
    ELEMENTS,
    FAMILY_NAMES,
    generate_testbed,
    main,
    testbed_splits,
    write_testbed,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def records():
    return generate_testbed()


def test_sizes_and_family_balance(records):
    assert {s: len(r) for s, r in records.items()} == {"train": 2000, "valid": 200, "test": 500, "test_seen": 300}
    train = collections.Counter(r["category"] for r in records["train"])
    assert set(train) == set(FAMILY_NAMES) and max(train.values()) - min(train.values()) <= 1
    # valid + test: even, but currency and element_symbol hold only 18 x 5 and 15 x 6 held-out prompts
    unseen = collections.Counter(r["category"] for r in records["valid"] + records["test"])
    assert unseen == {"capital": 130, "antonym": 130, "currency": 90, "element_symbol": 90, "word_category": 130,
                      "list_position": 130}
    test = collections.Counter(r["category"] for r in records["test"])
    for family, n in unseen.items():  # valid and test hold each family in the same proportion
        assert abs(test[family] - n * 500 / 700) < 1
    seen = collections.Counter(r["category"] for r in records["test_seen"])
    assert seen == {f: 60 for f in FAMILY_NAMES if f != "list_position"}  # lists have no evaluation-only wording
    small = generate_testbed(n_train=12, n_valid=6, n_test=7, n_test_seen=0, families=["capital", "list_position"])
    assert collections.Counter(r["category"] for r in small["test"]) == {"capital": 4, "list_position": 3}


def _fact_key(record):
    """The fact a record asks about: the table key named in its question, or its input."""
    if record["category"] in ("word_category", "list_position"):
        return record["context"]
    match = re.fullmatch(r'.* (?:of|for|in) "?(.+?)"?[?.]', record["instruction"])
    assert match, record["instruction"]
    return match.group(1)


def test_answers_are_correct(records):
    tables = {"capital": CAPITALS, "antonym": ANTONYMS, "currency": CURRENCIES, "element_symbol": ELEMENTS}
    category_of = {item: cat for cat, items in CATEGORY_ITEMS.items() for item in items}
    for record in [r for split in records.values() for r in split]:
        family, key, refs = record["category"], _fact_key(record), record["references"]
        assert refs[0] == record["response"]
        if family in tables:
            answers = tables[family][key]
            assert refs[-len(answers):] == answers
            assert all(key in sentence and answer in sentence for sentence, answer in zip(refs, answers))
        elif family == "word_category":
            assert refs[-1] == category_of[key] and record["context"] == key
        else:
            words = record["context"].split(", ")
            position = "first" if "first" in record["instruction"] else "last"
            assert position in record["instruction"]
            assert refs[-1] == (words[0] if position == "first" else words[-1]) and 3 <= len(words) <= 5


def test_held_out_facts_and_disjoint_splits(records):
    prompt = lambda r: (r["instruction"], r["context"])  # noqa: E731
    train_prompts = {prompt(r) for r in records["train"]}
    test_prompts, valid_prompts = [prompt(r) for r in records["test"]], [prompt(r) for r in records["valid"]]
    seen_prompts = [prompt(r) for r in records["test_seen"]]
    assert len(set(test_prompts)) == 500 and len(set(valid_prompts)) == 200 and len(set(seen_prompts)) == 300
    assert not set(test_prompts) & set(valid_prompts)
    assert not train_prompts & (set(test_prompts) | set(valid_prompts) | set(seen_prompts))
    train_facts = {(r["category"], _fact_key(r)) for r in records["train"]}
    for r in records["test"] + records["valid"]:
        assert (r["category"], _fact_key(r)) not in train_facts  # test facts are never seen in training
    train_questions = {(r["category"], r["instruction"].replace(_fact_key(r), "{key}")) for r in records["train"]
                       if r["category"] != "word_category"}
    for r in records["test_seen"]:
        assert (r["category"], _fact_key(r)) in train_facts  # seen facts ...
        if r["category"] != "word_category":  # ... in a wording training never uses
            assert (r["category"], r["instruction"].replace(_fact_key(r), "{key}")) not in train_questions
    assert not {r["instruction"] for r in records["test_seen"] if r["category"] == "word_category"} & {
        r["instruction"] for r in records["train"]}


def test_answers_name_the_accepted_answers_and_every_other_facts_answers_as_distractors(records):
    tables = {"capital": CAPITALS, "antonym": ANTONYMS, "currency": CURRENCIES, "element_symbol": ELEMENTS}
    for r in [r for split in records.values() for r in split]:
        answers, family = r["answers"], r["category"]
        assert answers["case_sensitive"] == (family == "element_symbol")
        assert not set(answers["accepted"]) & set(answers["distractors"])
        if family in tables:
            key = _fact_key(r)
            assert answers["accepted"] == tables[family][key]
            others = {a for k, v in tables[family].items() for a in v} - set(tables[family][key])
            # every other fact's answer, but the question's own subject ("early" asked for its opposite)
            assert set(answers["distractors"]) == {a for a in others if a.lower() != key.lower()}
        elif family == "word_category":
            assert answers["accepted"] == [r["references"][-1]] and len(answers["distractors"]) == 2
        else:
            assert sorted(answers["accepted"] + answers["distractors"]) == sorted(r["context"].split(", "))


def test_deterministic_across_processes_and_seeds(records, tmp_path):
    assert generate_testbed() == records
    assert generate_testbed(seed=1) != records
    write_testbed(tmp_path / "a")
    code = "import sys; from llm.testbed import write_testbed; write_testbed(sys.argv[1])"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "b")], cwd=REPO, env=env, check=True, timeout=120)
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl", "test_seen.jsonl", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_files_load_as_dolly(tmp_path):
    paths = main(["--out", str(tmp_path), "--train", "30", "--valid", "12", "--test", "18", "--test-seen", "10"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["sizes"] == {"train": 30, "valid": 12, "test": 18, "test_seen": 10} and manifest["seed"] == 0
    test = load_jsonl(paths["test"])
    raw = [json.loads(line) for line in paths["test"].read_text().splitlines()]
    assert len(test) == 18 and test.num_skipped == 0
    for ex, rec in zip(test, raw):
        assert ex.prompt == format_prompt(rec["instruction"], rec["context"])
        assert ex.references == rec["references"] and ex.category == rec["category"]
        assert ex.answers.accepted == tuple(rec["answers"]["accepted"])
        assert ex.answers.distractors == tuple(rec["answers"]["distractors"])


def test_testbed_splits_writes_once(tmp_path):
    first = testbed_splits(tmp_path, n_train=20, n_valid=6, n_test=6)
    stamps = {s: p.stat().st_mtime_ns for s, p in first.items()}
    again = testbed_splits(tmp_path, n_train=20, n_valid=6, n_test=6)
    assert again == first and {s: p.stat().st_mtime_ns for s, p in again.items()} == stamps
    other = testbed_splits(tmp_path, n_train=20, n_valid=6, n_test=8)
    assert other["test"].parent != first["test"].parent and len(load_jsonl(other["test"])) == 8


def test_bad_sizes():
    with pytest.raises(ValueError, match="hold 135 such prompts, fewer than the 2000 asked"):
        generate_testbed(n_valid=1000, n_test=1000, families=["capital"])
    with pytest.raises(ValueError, match="n_test must be >= 0"):
        generate_testbed(n_test=-1)
    with pytest.raises(ValueError, match="unknown or no families"):
        generate_testbed(families=["arithmetic"])

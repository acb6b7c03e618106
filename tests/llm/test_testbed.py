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
    assert {s: len(r) for s, r in records.items()} == {"train": 2000, "valid": 100, "test": 200}
    for split, total in (("train", 2000), ("valid", 100), ("test", 200)):
        counts = collections.Counter(r["category"] for r in records[split])
        assert set(counts) == set(FAMILY_NAMES)
        assert max(counts.values()) - min(counts.values()) <= 1 and sum(counts.values()) == total
    small = generate_testbed(n_train=12, n_valid=6, n_test=7, families=["capital", "list_position"])
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
    assert len(set(test_prompts)) == 200 and len(set(valid_prompts)) == 100
    assert not set(test_prompts) & set(valid_prompts)
    assert not train_prompts & (set(test_prompts) | set(valid_prompts))
    train_facts = {(r["category"], _fact_key(r)) for r in records["train"]}
    for r in records["test"] + records["valid"]:
        assert (r["category"], _fact_key(r)) not in train_facts  # test facts are never seen in training


def test_deterministic_across_processes_and_seeds(records, tmp_path):
    assert generate_testbed() == records
    assert generate_testbed(seed=1) != records
    write_testbed(tmp_path / "a")
    code = "import sys; from llm.testbed import write_testbed; write_testbed(sys.argv[1])"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "b")], cwd=REPO, env=env, check=True, timeout=120)
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_files_load_as_dolly(tmp_path):
    paths = main(["--out", str(tmp_path), "--train", "30", "--valid", "12", "--test", "18"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["sizes"] == {"train": 30, "valid": 12, "test": 18} and manifest["seed"] == 0
    test = load_jsonl(paths["test"])
    raw = [json.loads(line) for line in paths["test"].read_text().splitlines()]
    assert len(test) == 18 and test.num_skipped == 0
    for ex, rec in zip(test, raw):
        assert ex.prompt == format_prompt(rec["instruction"], rec["context"])
        assert ex.references == rec["references"] and ex.category == rec["category"]


def test_testbed_splits_writes_once(tmp_path):
    first = testbed_splits(tmp_path, n_train=20, n_valid=6, n_test=6)
    stamps = {s: p.stat().st_mtime_ns for s, p in first.items()}
    again = testbed_splits(tmp_path, n_train=20, n_valid=6, n_test=6)
    assert again == first and {s: p.stat().st_mtime_ns for s, p in again.items()} == stamps
    other = testbed_splits(tmp_path, n_train=20, n_valid=6, n_test=8)
    assert other["test"].parent != first["test"].parent and len(load_jsonl(other["test"])) == 8


def test_bad_sizes():
    with pytest.raises(ValueError, match="held-out prompts"):
        generate_testbed(n_valid=1000, n_test=1000, families=["capital"])
    with pytest.raises(ValueError, match="n_test must be >= 0"):
        generate_testbed(n_test=-1)
    with pytest.raises(ValueError, match="unknown or no families"):
        generate_testbed(families=["arithmetic"])

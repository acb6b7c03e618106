"""llm/data.py: JSONL loaders, the Alpaca template and batch encoding (spec llm.md section 4)."""

import json
import logging

import pytest
import torch

from llm.data import (
    ALPACA_TEMPLATE,
    Answers,
    Example,
    encode_generation_batch,
    encode_sft_batch,
    format_prompt,
    load_hub_dataset,
    load_jsonl,
    prompt_token_ids,
)
from llm.models import GPT2_TOKENIZER_NAME, load_tokenizer

HEADER = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(GPT2_TOKENIZER_NAME)


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_alpaca_template_exact():
    assert format_prompt("Name a colour.") == HEADER + "### Instruction:\nName a colour.\n\n### Response:\n"
    assert format_prompt("Summarise.", "Cats sleep.") == (
        HEADER + "### Instruction:\nSummarise.\n\n### Input:\nCats sleep.\n\n### Response:\n")
    assert format_prompt("Name a colour.", "   ") == format_prompt("Name a colour.")
    assert ALPACA_TEMPLATE.format(instruction="x") == format_prompt("x")


def test_load_dolly(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [
        json.dumps({"instruction": "Name a colour.", "context": "", "response": "Red.", "category": "open_qa"}),
        "",
        json.dumps({"instruction": "Summarise.", "context": "Cats sleep.", "response": "Sleep.",
                    "category": "summarization", "references": ["Sleep.", "They sleep."]}),
        json.dumps({"instruction": "Capital of Peru?", "response": "Lima.", "answers": {
            "accepted": ["Lima"], "distractors": ["Quito"]}}),
    ])
    examples = load_jsonl(path)
    assert examples == [
        Example(format_prompt("Name a colour."), "Red.", ["Red."], "open_qa"),
        Example(format_prompt("Summarise.", "Cats sleep."), "Sleep.", ["Sleep.", "They sleep."], "summarization"),
        Example(format_prompt("Capital of Peru?"), "Lima.", ["Lima."], "", Answers(("Lima",), ("Quito",), False)),
    ]
    assert examples.skipped == [] and examples.source == str(path)


def test_load_minillm(tmp_path):
    templated = format_prompt("Add 2 and 3.")
    path = write_lines(tmp_path / "m.jsonl", [
        json.dumps({"prompt": templated, "output": "5"}),
        json.dumps({"prompt": "Translate.", "input": "chat", "output": ["cat", "the cat"]}),
    ])
    first, second = load_jsonl(path, fmt="minillm")
    assert (first.prompt, first.response, first.references) == (templated, "5", ["5"])
    assert second.prompt == format_prompt("Translate.", "chat")
    assert (second.response, second.references) == ("cat", ["cat", "the cat"])


@pytest.mark.parametrize("fmt, bad, field", [
    ("dolly", '{"context": "", "response": "r"}', "instruction"),
    ("dolly", '{"instruction": "i", "context": ""}', "response"),
    ("dolly", '{"instruction": "i", "response": 5}', "response"),
    ("dolly", '{"instruction": "  ", "response": "r"}', "instruction"),
    ("dolly", '{"instruction": "i", "context": null, "response": "r"}', "context"),
    ("dolly", '{"instruction": "i", "response": "r", "references": []}', "references"),
    ("dolly", '{"instruction": "i", "response": "r"', "<json>"),
    ("dolly", '{"instruction": "i", "response": "r", "answers": ["a"]}', "answers"),
    ("dolly", '{"instruction": "i", "response": "r", "answers": {"accepted": []}}', "answers.accepted"),
    ("dolly", '{"instruction": "i", "response": "r", "answers": {"accepted": ["a"], "distractors": [""]}}',
     "answers.distractors"),
    ("dolly", '{"instruction": "i", "response": "r", "answers": {"accepted": ["a"], "case_sensitive": 1}}',
     "answers.case_sensitive"),
    ("minillm", '{"prompt": "p", "output": "o", "answers": {"accepted": ["a"], "wrong": 1}}', "answers"),
    ("dolly", '["i", "r"]', "<record>"),
    ("minillm", '{"prompt": "p"}', "output"),
    ("minillm", '{"prompt": "p", "output": [1]}', "output"),
    ("minillm", '{"output": "o"}', "prompt"),
])
def test_malformed_record_names_file_line_field(tmp_path, fmt, bad, field):
    good = ('{"instruction": "i", "context": "", "response": "r", "category": "c"}' if fmt == "dolly"
            else '{"prompt": "p", "output": "o"}')
    path = write_lines(tmp_path / "bad.jsonl", [good, "", bad, good])
    with pytest.raises(ValueError) as err:
        load_jsonl(path, fmt=fmt)
    message = str(err.value)
    assert str(path) in message and "line 3" in message and f"field {field!r}" in message
    assert "skip_malformed=True" in message


def test_skip_malformed_reports_count(tmp_path, caplog):
    good = json.dumps({"instruction": "i", "context": "", "response": "r", "category": "c"})
    path = write_lines(tmp_path / "mixed.jsonl", [good, "{oops", good, '{"instruction": "i"}', good])
    with caplog.at_level(logging.WARNING, logger="llm.data"):
        examples = load_jsonl(path, skip_malformed=True)
    assert len(examples) == 3
    assert examples.num_skipped == 2
    assert [(line, field) for line, field, _ in examples.skipped] == [(2, "<json>"), (4, "response")]
    assert "skipped 2 malformed record(s)" in caplog.text and "lines 2, 4" in caplog.text


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="holds no dolly-format records"):
        load_jsonl(write_lines(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(ValueError, match="unknown data format 'alpaca'"):
        load_jsonl(tmp_path / "missing.jsonl", fmt="alpaca")


def test_hub_loading_offline_names_local_alternative(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError) as err:
        load_hub_dataset("databricks/databricks-dolly-15k", "train")
    assert "databricks/databricks-dolly-15k" in str(err.value) and "load_jsonl(path" in str(err.value)


def test_generation_batch_left_padded(tok):
    prompts = [format_prompt("Hi."), format_prompt("Summarise the text.", "A much longer input " * 5)]
    batch = encode_generation_batch(tok, prompts)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for row, prompt in enumerate(prompts):
        expected = tok(prompt)["input_ids"]
        n = len(expected)
        assert ids[row, -n:].tolist() == expected  # every prompt ends at the last column
        assert mask[row].tolist() == [0] * (ids.shape[1] - n) + [1] * n
        assert set(ids[row, : ids.shape[1] - n].tolist()) <= {tok.pad_token_id}


def test_prompt_capped_keeps_response_header(tok):
    long_prompt = format_prompt("Repeat.", "word " * 600)
    ids = prompt_token_ids(tok, long_prompt)
    assert len(ids) == 256
    assert ids == tok(long_prompt)["input_ids"][-256:]
    assert tok.decode(ids).endswith("### Response:\n")
    assert encode_generation_batch(tok, [long_prompt])["input_ids"].shape == (1, 256)
    assert len(prompt_token_ids(tok, long_prompt, max_prompt_tokens=40)) == 40


def test_sft_batch_labels_and_response_mask(tok):
    examples = [Example(format_prompt("Name a colour."), "Red."), Example(format_prompt("Count.", "a b"), "Two words here.")]
    batch = encode_sft_batch(tok, examples, max_length=512)
    ids, att, labels, rmask = batch["input_ids"], batch["attention_mask"], batch["labels"], batch["response_mask"]
    assert ids.shape == att.shape == labels.shape == rmask.shape
    for row, ex in enumerate(examples):
        prompt = tok(ex.prompt)["input_ids"]
        response = tok(ex.response)["input_ids"] + [tok.eos_token_id]
        n = len(prompt) + len(response)
        assert ids[row, :n].tolist() == prompt + response  # right padding for training
        assert att[row].tolist() == [1] * n + [0] * (ids.shape[1] - n)
        assert labels[row, : n - 1].tolist() == ids[row, 1:n].tolist()  # labels already shifted by one
        # the mask selects exactly the response tokens and the EOS, at the positions predicting them
        assert labels[row][rmask[row].bool()].tolist() == response
        assert rmask[row].sum().item() == len(response)
    # replacing the gold responses (teacher samples for seqkd)
    swapped = encode_sft_batch(tok, examples, responses=["Blue.", "Three."])
    assert tok.decode(swapped["labels"][0][swapped["response_mask"][0].bool()]) == "Blue.<|endoftext|>"


def test_sft_batch_truncates_response_to_max_length(tok):
    ex = Example(format_prompt("Write."), "word " * 400)
    batch = encode_sft_batch(tok, [ex], max_prompt_tokens=32, max_length=64)
    assert batch["input_ids"].shape == (1, 64)
    n_prompt = len(prompt_token_ids(tok, ex.prompt, max_prompt_tokens=32))
    # the response is cut to fill the row; every position after the prompt's last predicts a response token
    assert batch["response_mask"].sum().item() == 64 - n_prompt
    assert tok.eos_token_id not in batch["labels"][0][batch["response_mask"][0].bool()].tolist()
    with pytest.raises(ValueError, match="must exceed max_prompt_tokens"):
        encode_sft_batch(tok, [ex], max_prompt_tokens=256, max_length=256)
    with pytest.raises(ValueError, match="2 responses for 1 examples"):
        encode_sft_batch(tok, [ex], responses=["a", "b"])


def test_chat_template_wraps_prompt(tok):
    chat_tok = load_tokenizer(GPT2_TOKENIZER_NAME)
    chat_tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                              "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    prompt = format_prompt("Hi.")
    wrapped = chat_tok(f"<|user|>{prompt}<|assistant|>", add_special_tokens=False)["input_ids"]
    assert prompt_token_ids(chat_tok, prompt) == wrapped  # auto: the template is used when present
    assert prompt_token_ids(chat_tok, prompt, chat_template=False) == tok(prompt)["input_ids"]
    assert prompt_token_ids(tok, prompt) == tok(prompt)["input_ids"]  # no template: the raw Alpaca text
    with pytest.raises(ValueError, match="defines no chat template"):
        prompt_token_ids(tok, prompt, chat_template=True)
    batch = encode_generation_batch(chat_tok, [prompt])
    assert batch["input_ids"][0].tolist() == wrapped
    assert torch.equal(batch["attention_mask"], torch.ones_like(batch["input_ids"]))

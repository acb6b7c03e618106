"""Instruction data: Dolly and MiniLLM JSONL, the Alpaca template, hub loading, and batches.

Spec: llm.md section 4.  Records become :class:`Example` (prompt in the Alpaca template,
gold response, references, category).  Two batch encoders share one tokenisation rule:
prompts capped at ``max_prompt_tokens`` (256) tokens, the response followed by EOS.

- :func:`encode_sft_batch` pads on the right and returns labels already shifted, so that
  ``model(input_ids, attention_mask).logits[:, t]`` is scored against ``labels[:, t]`` on the
  positions where ``response_mask`` is 1 -- the ``(B, T, V)`` / ``(B, T)`` convention of
  :mod:`llm.losses`.
- :func:`encode_generation_batch` pads on the left, as batched generation needs.

A tokenizer with a chat template (the SmolLM2 teacher and students sharing its tokenizer)
receives the Alpaca prompt as the user turn of that template, which is how an instruction-tuned
chat model is queried and what makes it end its answer with EOS; pass ``chat_template=False``
to send the raw Alpaca text.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ALPACA_HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)
ALPACA_TEMPLATE = ALPACA_HEADER + "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_TEMPLATE_WITH_INPUT = (
    ALPACA_HEADER + "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
)
RESPONSE_MARKER = "### Response:"

FORMATS = ("dolly", "minillm")
MAX_PROMPT_TOKENS = 256


def format_prompt(instruction: str, context: str = "") -> str:
    """The Alpaca prompt of spec section 4 (``### Input:`` only when there is a context)."""
    instruction, context = instruction.strip(), context.strip()
    if context:
        return ALPACA_TEMPLATE_WITH_INPUT.format(instruction=instruction, context=context)
    return ALPACA_TEMPLATE.format(instruction=instruction)


def word_pattern(answer: str) -> str:
    """The regular expression of ``answer`` as a whole word or phrase (not inside a longer word)."""
    return r"(?<!\w)" + re.escape(answer) + r"(?!\w)"


def names(text: str, answer: str, *, case_sensitive: bool = False) -> bool:
    """Whether ``text`` names ``answer`` as a whole word or phrase."""
    return re.search(word_pattern(answer), text, 0 if case_sensitive else re.IGNORECASE) is not None


@dataclass(frozen=True)
class Answers:
    """The short answers of a checkable prompt: the ``accepted`` ones, and the ``distractors`` (the
    answers of the family's other facts) whose mention makes a response wrong; matched as whole
    words, case-insensitively unless ``case_sensitive`` (chemical symbols)."""

    accepted: tuple[str, ...]
    distractors: tuple[str, ...] = ()
    case_sensitive: bool = False


@dataclass
class Example:
    """One instruction example: the Alpaca ``prompt``, the gold ``response``, every acceptable
    ``references`` answer (the gold response first), the task ``category`` and, for data sets
    that carry them (the testbed), the :class:`Answers` that answer accuracy checks."""

    prompt: str
    response: str
    references: list[str] = field(default_factory=list)
    category: str = ""
    answers: Answers | None = None

    def __post_init__(self) -> None:
        if not self.references:
            self.references = [self.response]


class ExampleList(list):
    """A list of :class:`Example` that also reports what was skipped while loading.

    ``skipped`` holds ``(line_number, field, reason)`` for every malformed record passed over
    with ``skip_malformed=True`` (it is always empty otherwise); the count is also logged.
    """

    def __init__(self, examples=(), *, source: str = "", skipped=()):
        super().__init__(examples)
        self.source = source
        self.skipped: list[tuple[int, str, str]] = list(skipped)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)


class _RecordError(ValueError):
    def __init__(self, field_name: str, reason: str):
        super().__init__(reason)
        self.field_name = field_name
        self.reason = reason


def _text_field(record: dict, name: str, *, required: bool, allow_empty: bool) -> str:
    if name not in record:
        if required:
            raise _RecordError(name, "is missing")
        return ""
    value = record[name]
    if not isinstance(value, str):
        raise _RecordError(name, f"must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _RecordError(name, "is empty")
    return value


def _references_field(record: dict, name: str) -> list[str]:
    value = record.get(name)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise _RecordError(name, "must be a non-empty string or a non-empty list of non-empty strings")
    return list(value)


def _answers_field(record: dict) -> Answers | None:
    """The optional ``answers`` object: ``accepted`` (non-empty list of strings), ``distractors``
    (list of strings) and ``case_sensitive`` (bool)."""
    value = record.get("answers")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _RecordError("answers", "must be an object with accepted/distractors/case_sensitive, "
                                      f"got {type(value).__name__}")
    unknown = sorted(set(value) - {"accepted", "distractors", "case_sensitive"})
    if unknown:
        raise _RecordError("answers", f"has unknown keys {unknown}; valid keys: accepted, distractors, case_sensitive")
    accepted, distractors = value.get("accepted"), value.get("distractors", [])
    for name, items, non_empty in (("accepted", accepted, True), ("distractors", distractors, False)):
        strings = isinstance(items, list) and all(isinstance(a, str) and a.strip() for a in items)
        if not strings or (non_empty and not items):
            raise _RecordError(f"answers.{name}",
                               f"must be a {'non-empty ' if non_empty else ''}list of non-empty strings")
    case = value.get("case_sensitive", False)
    if not isinstance(case, bool):
        raise _RecordError("answers.case_sensitive", f"must be true or false, got {case!r}")
    return Answers(tuple(accepted), tuple(distractors), case)


def _dolly_example(record: dict) -> Example:
    """Dolly schema: ``instruction``, ``context`` (may be empty), ``response``, ``category``.

    An optional ``references`` list (written by :mod:`llm.testbed`) adds acceptable answers, and
    an optional ``answers`` object the short answers of answer accuracy.
    """
    instruction = _text_field(record, "instruction", required=True, allow_empty=False)
    context = _text_field(record, "context", required=False, allow_empty=True)
    response = _text_field(record, "response", required=True, allow_empty=False)
    category = _text_field(record, "category", required=False, allow_empty=True)
    extra = [r for r in _references_field(record, "references") if r != response]
    return Example(format_prompt(instruction, context), response, [response, *extra], category, _answers_field(record))


def _minillm_example(record: dict) -> Example:
    """MiniLLM processed schema: ``prompt`` and ``output`` (a string or a list of references).

    A prompt already in the Alpaca template (it contains ``### Response:``) is kept as it is;
    otherwise it is the instruction and is wrapped by :func:`format_prompt` (with ``input`` as
    context when present).
    """
    prompt = _text_field(record, "prompt", required=True, allow_empty=False)
    outputs = _references_field(record, "output")
    if not outputs:
        raise _RecordError("output", "is missing")
    if RESPONSE_MARKER not in prompt:
        prompt = format_prompt(prompt, _text_field(record, "input", required=False, allow_empty=True))
    category = _text_field(record, "category", required=False, allow_empty=True)
    return Example(prompt, outputs[0], outputs, category, _answers_field(record))


_PARSERS = {"dolly": _dolly_example, "minillm": _minillm_example}


def _parse_record(fmt: str, line: str) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise _RecordError("<json>", f"is not valid JSON ({err.msg} at column {err.colno})") from err
    if not isinstance(record, dict):
        raise _RecordError("<record>", f"must be a JSON object, got {type(record).__name__}")
    return _PARSERS[fmt](record)


def load_jsonl(path: str | os.PathLike, *, fmt: str = "dolly", skip_malformed: bool = False) -> ExampleList:
    """Read a Dolly- or MiniLLM-format JSONL file into examples (spec section 4).

    A malformed record raises ValueError naming the file, the 1-based line number and the field.
    With ``skip_malformed=True`` such records are skipped instead; the returned
    :class:`ExampleList` lists them in ``.skipped`` and the count is logged as a warning.
    Blank lines are not records and are ignored.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    examples, skipped = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                examples.append(_parse_record(fmt, line))
            except _RecordError as err:
                if not skip_malformed:
                    raise ValueError(
                        f"{path}, line {number}: field {err.field_name!r} {err.reason} ({fmt} format). "
                        "Fix the record, or pass skip_malformed=True to skip such records."
                    ) from None
                skipped.append((number, err.field_name, err.reason))
    if skipped:
        logger.warning("%s: skipped %d malformed record(s) (lines %s)", path, len(skipped),
                       ", ".join(str(n) for n, _, _ in skipped[:20]))
    if not examples:
        raise ValueError(f"{path} holds no {fmt}-format records")
    return ExampleList(examples, source=str(path), skipped=skipped)


def load_hub_dataset(name: str, split: str = "train", *, fmt: str | None = None) -> ExampleList:
    """Load an instruction dataset from the Hugging Face hub, e.g. ``databricks/databricks-dolly-15k``.

    Uses ``datasets.load_dataset`` when ``datasets`` is installed, otherwise downloads the
    repository's JSONL file for ``split`` with ``huggingface_hub``.  The format is guessed from
    the fields (``instruction``/``response`` = dolly, ``prompt``/``output`` = minillm) unless
    given.  When the hub cannot be reached, ValueError names the local-file alternative
    (:func:`load_jsonl`).
    """
    offline_hint = (
        f"Download the data elsewhere as JSONL and load it with load_jsonl(path, fmt='dolly' or "
        f"'minillm') (the training config's data files take such paths), or use the bundled "
        f"testbed (python -m llm.testbed --out DIR)."
    )
    try:
        records = _hub_records(name, split)
    except ImportError as err:
        raise ValueError(f"cannot load {name!r} from the hub: {err}. {offline_hint}") from err
    except Exception as err:  # network, offline mode, missing repo or split: all end here
        first = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(
            f"cannot load split {split!r} of {name!r} from the hub ({type(err).__name__}: {first}). {offline_hint}"
        ) from err
    if fmt is None:
        keys = set(records[0]) if records else set()
        fmt = "dolly" if {"instruction", "response"} <= keys else "minillm" if {"prompt", "output"} <= keys else None
        if fmt is None:
            raise ValueError(f"{name!r} has fields {sorted(keys)}, neither dolly nor minillm format; pass fmt=")
    examples, skipped = [], []
    for number, record in enumerate(records, start=1):
        try:
            examples.append(_PARSERS[fmt](record))
        except _RecordError as err:
            skipped.append((number, err.field_name, err.reason))
    if skipped:
        logger.warning("%s/%s: skipped %d malformed record(s)", name, split, len(skipped))
    return ExampleList(examples, source=f"{name}:{split}", skipped=skipped)


def _hub_records(name: str, split: str) -> list[dict]:
    try:
        import datasets  # optional; not a project requirement
    except ImportError:
        datasets = None
    if datasets is not None:
        return [dict(r) for r in datasets.load_dataset(name, split=split)]
    try:
        import huggingface_hub
    except ImportError as err:
        raise ImportError("neither datasets nor huggingface_hub is installed") from err
    files = [f for f in huggingface_hub.list_repo_files(name, repo_type="dataset") if f.endswith((".jsonl", ".json"))]
    chosen = [f for f in files if split in Path(f).stem] or (files if split == "train" and len(files) == 1 else [])
    if len(chosen) != 1:
        raise FileNotFoundError(f"no single JSON/JSONL file for split {split!r} among {files}")
    local = huggingface_hub.hf_hub_download(name, chosen[0], repo_type="dataset")
    with open(local, encoding="utf-8") as handle:
        if chosen[0].endswith(".jsonl"):
            return [json.loads(line) for line in handle if line.strip()]
        data = json.load(handle)
    return data if isinstance(data, list) else data[split]


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def _use_chat_template(tokenizer, chat_template: bool | None) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat_template and not has:
        raise ValueError(f"chat_template=True but tokenizer {tokenizer.name_or_path!r} defines no chat template")
    return has if chat_template is None else chat_template


def prompt_token_ids(tokenizer, prompt: str, *, max_prompt_tokens: int = MAX_PROMPT_TOKENS,
                     chat_template: bool | None = None) -> list[int]:
    """Token ids of one prompt as the model sees it, capped at ``max_prompt_tokens`` (section 4).

    An over-long prompt loses tokens from its start, so the ``### Response:`` header (and the
    chat template's assistant turn), which generation continues from, is always kept.
    """
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    if _use_chat_template(tokenizer, chat_template):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    ids = list(ids)
    if len(ids) <= max_prompt_tokens:
        return ids
    bos = tokenizer.bos_token_id
    if bos is not None and ids[0] == bos and max_prompt_tokens > 1:  # a leading BOS stays first
        return [bos] + ids[len(ids) - max_prompt_tokens + 1:]
    return ids[-max_prompt_tokens:]


def response_token_ids(tokenizer, response: str) -> list[int]:
    """Token ids of a response followed by EOS (the action that ends the episode, section 1)."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token")
    return list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]


def encode_sft_batch(tokenizer, examples, max_prompt_tokens: int = MAX_PROMPT_TOKENS, max_length: int = 512, *,
                     responses: list[str] | None = None, chat_template: bool | None = None) -> dict:
    """Right-padded training batch of prompt + response + EOS (spec sections 1 and 4).

    Returns ``input_ids``, ``attention_mask`` (B, T), ``labels`` (B, T) with
    ``labels[:, t] = input_ids[:, t + 1]`` (pad id past the end) and ``response_mask`` (B, T)
    equal to 1 where ``labels[:, t]`` is a response token or the final EOS -- so the logits at
    position ``t`` are scored against ``labels[:, t]`` with no further shifting.  ``responses``
    replaces the gold responses (teacher or student samples for seqkd/on-policy objectives).
    Sequences longer than ``max_length`` lose the end of the response.
    """
    examples = list(examples)
    if not examples:
        raise ValueError("encode_sft_batch needs at least one example")
    if responses is None:
        responses = [ex.response for ex in examples]
    if len(responses) != len(examples):
        raise ValueError(f"got {len(responses)} responses for {len(examples)} examples")
    if max_length <= max_prompt_tokens:
        raise ValueError(f"max_length ({max_length}) must exceed max_prompt_tokens ({max_prompt_tokens})")
    rows = []
    for ex, response in zip(examples, responses):
        p = prompt_token_ids(tokenizer, ex.prompt, max_prompt_tokens=max_prompt_tokens, chat_template=chat_template)
        r = response_token_ids(tokenizer, response)[: max_length - len(p)]
        rows.append((p, r))
    return collate_rows(rows, tokenizer.pad_token_id)


def collate_rows(rows, pad: int) -> dict:
    """Right-padded batch of ``(prompt_ids, response_ids)`` rows in the layout of
    :func:`encode_sft_batch` (``labels`` shifted, ``response_mask`` on the response tokens);
    the one padding rule of text batches and of token-id rollouts (``llm.rollout``)."""
    rows = [(list(p), list(r)) for p, r in rows]
    if not rows:
        raise ValueError("collate_rows needs at least one row")
    if any(not p for p, _ in rows):
        raise ValueError("every row needs at least one prompt token")
    T = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), T), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    labels = torch.full((len(rows), T), pad, dtype=torch.long)
    response_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        ids = torch.tensor(p + r, dtype=torch.long)
        n = len(ids)
        input_ids[i, :n] = ids
        attention_mask[i, :n] = 1
        labels[i, : n - 1] = ids[1:]
        response_mask[i, len(p) - 1 : n - 1] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "response_mask": response_mask}


def encode_generation_batch(tokenizer, prompts, max_prompt_tokens: int = MAX_PROMPT_TOKENS, *,
                            chat_template: bool | None = None) -> dict:
    """Left-padded batch of prompts for generation (spec section 4): ``input_ids``, ``attention_mask``.

    Every row ends at the last column, so new tokens are appended right after each prompt.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("encode_generation_batch needs at least one prompt")
    rows = [prompt_token_ids(tokenizer, p, max_prompt_tokens=max_prompt_tokens, chat_template=chat_template)
            for p in prompts]
    return left_pad(rows, tokenizer.pad_token_id)


def left_pad(rows, pad: int) -> dict:
    """Left-padded ``input_ids`` and ``attention_mask`` of token-id prompts, for batched generation."""
    rows = [list(r) for r in rows]
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, T - len(r):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}

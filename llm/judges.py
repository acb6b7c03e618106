"""Judges that label preference pairs, pluggable by name (spec llm.md section 3).

A judge receives :class:`PreferenceQuery` objects (a prompt, ``response_0`` and
``response_1``, their models, the stable id ``(round, index)`` and, when known, reference
answers) and returns one :class:`Judgement` per query with an outcome:

- ``"preference"``: ``label = 1`` if ``response_1`` is preferred, ``0`` if ``response_0`` is
  (the convention of :func:`llm.losses.bt_nll`);
- ``"tie"``: no preference (equal Rouge-L, or an ``llm``/``api`` judge whose answers flip with
  the order of the responses).  ``ties="drop"`` leaves ties out of the store,
  ``ties="record"`` stores them with ``label = None`` (never used by the BT likelihood);
- ``"failed"``: the judge could not answer (timeout, HTTP error, malformed reply, refusal)
  after ``1 + max_retries`` attempts.  A failure is never turned into a label or a record; it
  is counted in :class:`JudgeStats` (``judge.stats``) with its reason.

:meth:`Judge.label` turns queries into :class:`llm.preference_store.PreferenceRecord` objects
ready for :meth:`llm.preference_store.PreferenceStore.append`.

Judges (registry :data:`JUDGES`, built by :func:`make_judge`):

- ``bt_oracle``: a known reward function ``r(x, y)`` (by default answer accuracy, on data that
  carries answers; or Rouge-L); ``label ~ Bernoulli(sigma(r(x, y_1) - r(x, y_0)))``,
  the Bradley-Terry model of spec tabular.md section 2, sampled with a generator
  seeded by ``(seed, round, index)`` so a label does not depend on batching or on a restart.
- ``rouge``: prefers the response with the higher Rouge-L against the references, scored by
  the project's one Rouge-L scorer :func:`llm.evaluate.rouge_l`.
- ``llm``: a local chat model (SmolLM2-135M-Instruct on the testbed) asked
  :data:`PAIRWISE_TEMPLATE` through its chat template, in both orders.
- ``api``: an OpenAI-compatible ``/v1/chat/completions`` endpoint asked the same question in
  both orders, through ``urllib`` (stdlib).  The API key is read from an environment
  variable at each request, never stored on the judge, logged or written to a record, and
  removed from any reply or error text.

Both-order protocol (``llm`` and ``api``): order AB shows ``response_0`` as A and
``response_1`` as B, order BA the reverse.  Verdicts naming the same response in both orders
give a label; verdicts that follow the position (A twice, or B twice) are a tie.
"""

from __future__ import annotations

import inspect
import ipaddress
import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from llm.config import JUDGE_NAMES
from llm.data import ALPACA_HEADER, RESPONSE_MARKER
from llm.data import Answers
from llm.evaluate import answer_accuracy, rouge_l
from llm.preference_store import PreferenceRecord

__all__ = [
    "PreferenceQuery",
    "Judgement",
    "JudgeStats",
    "Judge",
    "BTOracleJudge",
    "RougeJudge",
    "LLMJudge",
    "APIJudge",
    "JUDGES",
    "make_judge",
    "PAIRWISE_TEMPLATE",
    "pairwise_question",
    "parse_verdict",
    "combine_orders",
    "answer_accuracy_reward",
    "rouge_reward",
]

logger = logging.getLogger(__name__)

OUTCOMES = ("preference", "tie", "failed")
TIE_POLICIES = ("drop", "record")

PAIRWISE_TEMPLATE = (
    "Two responses to the same instruction are shown below.\n\n"
    "Instruction:\n{instruction}\n\n"
    "Response A:\n{response_a}\n\n"
    "Response B:\n{response_b}\n\n"
    "Which response better follows the instruction: A or B? Answer with the single letter A or B."
)
"""The project's pairwise question (spec llm.md section 3), asked of the ``llm`` and ``api`` judges."""

API_SYSTEM_PROMPT = "You are a careful judge of instruction-following. Reply with one letter: A or B."


# --------------------------------------------------------------------------------------------
# Queries, judgements, statistics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferenceQuery:
    """One pair to label; ``(round, index)`` becomes the record id in the preference store."""

    prompt: str
    response_0: str
    response_1: str
    round: int = 0
    index: int = 0
    model_0: str = "teacher"
    model_1: str = "student"
    references: tuple[str, ...] = ()
    answers: Answers | None = None  # the prompt's short answers, when its data set carries them

    def __post_init__(self) -> None:
        for name in ("prompt", "response_0", "response_1", "model_0", "model_1"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"PreferenceQuery.{name} must be a string, got {type(getattr(self, name)).__name__}")
        for name in ("round", "index"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"PreferenceQuery.{name} must be an integer >= 0, got {value!r}")
        refs = (self.references,) if isinstance(self.references, str) else tuple(self.references)
        if not all(isinstance(r, str) for r in refs):
            raise ValueError("PreferenceQuery.references must be strings")
        object.__setattr__(self, "references", refs)


@dataclass
class Judgement:
    """A judge's answer for one query: outcome, label (only for a preference), raw output."""

    outcome: str
    label: int | None
    raw_output: str
    detail: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {self.outcome!r}")
        if (self.outcome == "preference") != (self.label in (0, 1)):
            raise ValueError(f"a {self.outcome!r} judgement cannot carry label {self.label!r}")


@dataclass
class JudgeStats:
    """What a judge did: pairs judged, labels, ties, failures, and every failed attempt's reason.

    ``attempts`` counts questions put to the model or endpoint (two per pair for ``llm``/``api``);
    ``retries`` the attempts repeated after a failure; ``failure_reasons`` the reason of every
    failed attempt (``timeout``, ``http_500``, ``malformed``, ``refusal`` ...); ``failed`` the
    pairs given up after ``1 + max_retries`` attempts -- none of them became a label.
    """

    pairs: int = 0
    preferences: int = 0
    ties: int = 0
    failed: int = 0
    attempts: int = 0
    retries: int = 0
    failure_reasons: Counter = field(default_factory=Counter)
    last_error: str = ""

    def as_dict(self) -> dict:
        return {
            "pairs": self.pairs,
            "preferences": self.preferences,
            "ties": self.ties,
            "failed": self.failed,
            "attempts": self.attempts,
            "retries": self.retries,
            "failure_reasons": dict(sorted(self.failure_reasons.items())),
        }

    def summary(self) -> str:
        reasons = ", ".join(f"{k} x{v}" for k, v in sorted(self.failure_reasons.items())) or "none"
        return (
            f"{self.pairs} pairs: {self.preferences} labelled, {self.ties} ties, {self.failed} failed "
            f"({self.attempts} attempts, {self.retries} retries; failed attempts: {reasons})"
        )


class JudgeFailure(Exception):
    """One failed attempt; ``reason`` is counted, ``retryable`` says whether to ask again."""

    def __init__(self, reason: str, message: str, *, retryable: bool = True, raw: str = ""):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.retryable = retryable
        self.raw = raw


# --------------------------------------------------------------------------------------------
# The base class
# --------------------------------------------------------------------------------------------


class Judge(ABC):
    """Base judge: validates queries, runs the subclass, keeps :class:`JudgeStats`, makes records."""

    name: ClassVar[str] = ""

    def __init__(self, *, ties: str = "drop", max_retries: int = 2):
        if ties not in TIE_POLICIES:
            raise ValueError(f"ties must be one of {TIE_POLICIES}, got {ties!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        self.ties = ties
        self.max_retries = max_retries
        self.stats = JudgeStats()

    def describe(self) -> dict:
        """The judge's settings for logs and record metadata (never a secret)."""
        return {"judge": self.name, "ties": self.ties, "max_retries": self.max_retries}

    def judge(self, queries: Sequence[PreferenceQuery]) -> list[Judgement]:
        """One :class:`Judgement` per query, in order; updates ``self.stats``."""
        queries = list(queries)
        for q in queries:
            if not isinstance(q, PreferenceQuery):
                raise ValueError(f"{self.name} judge takes PreferenceQuery objects, got {type(q).__name__}")
        if not queries:
            return []
        judgements = self._judge(queries)
        if len(judgements) != len(queries):  # a subclass bug, not a judge failure
            raise RuntimeError(f"{self.name} judge returned {len(judgements)} judgements for {len(queries)} queries")
        for j in judgements:
            self.stats.pairs += 1
            if j.outcome == "preference":
                self.stats.preferences += 1
            elif j.outcome == "tie":
                self.stats.ties += 1
            else:
                self.stats.failed += 1
        return judgements

    def label(self, queries: Sequence[PreferenceQuery]) -> list[PreferenceRecord]:
        """Judge ``queries`` and return the records to store: preferences, plus ties if recorded.

        Failed pairs produce no record; they are counted in ``self.stats``.
        """
        queries = list(queries)
        records = []
        for q, j in zip(queries, self.judge(queries)):
            if j.outcome == "failed" or (j.outcome == "tie" and self.ties == "drop"):
                continue
            meta = {"outcome": j.outcome, **j.detail}
            if q.references:
                meta["references"] = list(q.references)
            records.append(
                PreferenceRecord(
                    round=q.round, index=q.index, prompt=q.prompt, response_0=q.response_0,
                    response_1=q.response_1, model_0=q.model_0, model_1=q.model_1, label=j.label,
                    judge=self.name, judge_output=j.raw_output, meta=meta,
                )
            )
        return records

    @abstractmethod
    def _judge(self, queries: list[PreferenceQuery]) -> list[Judgement]:
        """One judgement per query (the subclass's way of judging)."""

    def _attempt(self, ask: Callable[[], str], what: str) -> tuple[str | None, str]:
        """Run ``ask`` up to ``1 + max_retries`` times; return (answer, "") or (None, last raw output)."""
        raw = ""
        for attempt in range(self.max_retries + 1):
            self.stats.attempts += 1
            if attempt:
                self.stats.retries += 1
            try:
                return ask(), ""
            except JudgeFailure as failure:
                self.stats.failure_reasons[failure.reason] += 1
                self.stats.last_error = f"{what}: {failure}"
                raw = failure.raw
                logger.warning("%s judge, %s, attempt %d/%d failed: %s", self.name, what, attempt + 1,
                               self.max_retries + 1, failure)
                if not failure.retryable:
                    break
                if attempt < self.max_retries:
                    self._before_retry(attempt)
        return None, raw

    def _before_retry(self, attempt: int) -> None:
        """Hook: wait before attempt ``attempt + 2`` (the ``api`` judge backs off)."""


# --------------------------------------------------------------------------------------------
# bt_oracle and rouge
# --------------------------------------------------------------------------------------------


def _check_scale(scale: float) -> float:
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0, got {scale}")
    return scale


def answer_accuracy_reward(scale: float = 10.0) -> Callable[[PreferenceQuery, str], float]:
    """The testbed's known reward ``r(x, y) = scale * AnswerAccuracy(y) / 100``: ``scale`` when the
    response names the prompt's answer and no distractor, else 0 (:func:`llm.evaluate.answer_accuracy`)."""
    scale = _check_scale(scale)

    def reward(query: PreferenceQuery, response: str) -> float:
        if query.answers is None:
            raise ValueError("the answer_accuracy reward needs the prompt's answers (data that carries an 'answers' "
                             "field, as the testbed does); set judge_options.reward=rouge_l for other data")
        return scale * answer_accuracy(response, query.answers) / 100.0

    return reward


def rouge_reward(scale: float = 10.0) -> Callable[[PreferenceQuery, str], float]:
    """The known reward ``r(x, y) = scale * RougeL(y, references) / 100``."""
    scale = _check_scale(scale)

    def reward(query: PreferenceQuery, response: str) -> float:
        if not query.references:
            raise ValueError("the rouge_l reward needs reference answers: set PreferenceQuery.references")
        return scale * rouge_l(response, query.references) / 100.0

    return reward


REWARDS = {"answer_accuracy": answer_accuracy_reward, "rouge_l": rouge_reward}


class BTOracleJudge(Judge):
    """Labels sampled from Bradley-Terry under a known reward (spec llm.md section 3, tabular.md s2).

    ``P(label = 1) = sigma(r(x, y_1) - r(x, y_0))``.  ``reward`` is a callable
    ``r(query, response) -> float`` or a name: ``"answer_accuracy"`` (the default: ``reward_scale``
    when the response names the answer and no distractor, else 0) or ``"rouge_l"``
    (``reward_scale *`` Rouge-L / 100).  The uniform draw of query ``(round, index)`` comes from
    ``numpy.random.default_rng([seed, round, index])``: the same pair gets the same label in any
    batch and after any restart.  Never fails; a non-finite reward is a ValueError.
    """

    name = "bt_oracle"

    def __init__(self, reward: str | Callable = "answer_accuracy", *, reward_scale: float = 10.0, seed: int = 0,
                 ties: str = "drop", max_retries: int = 0):
        super().__init__(ties=ties, max_retries=max_retries)
        if isinstance(reward, str):
            if reward not in REWARDS:
                raise ValueError(f"unknown reward {reward!r}; choose one of {', '.join(REWARDS)} or pass a callable")
            self.reward_name, self.reward_fn = reward, REWARDS[reward](reward_scale)
        elif callable(reward):
            self.reward_name, self.reward_fn = getattr(reward, "__name__", "callable"), reward
        else:
            raise ValueError(f"reward must be a name ({', '.join(REWARDS)}) or a callable, got {type(reward).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.seed = seed

    def describe(self) -> dict:
        return {**super().describe(), "reward": self.reward_name, "seed": self.seed}

    def _reward(self, q: PreferenceQuery, response: str) -> float:
        value = float(self.reward_fn(q, response))
        if not math.isfinite(value):
            raise ValueError(f"the bt_oracle reward {self.reward_name} returned {value} for pair {(q.round, q.index)}")
        return value

    def _judge(self, queries):
        out = []
        for q in queries:
            self.stats.attempts += 1
            r0, r1 = self._reward(q, q.response_0), self._reward(q, q.response_1)
            p1 = 1.0 / (1.0 + math.exp(-(r1 - r0))) if r1 >= r0 else math.exp(r1 - r0) / (1.0 + math.exp(r1 - r0))
            u = float(np.random.default_rng([self.seed, q.round, q.index]).random())
            label = int(u < p1)
            raw = json.dumps({"reward_0": r0, "reward_1": r1, "p_1": p1, "u": u})
            out.append(Judgement("preference", label, raw))
        return out


class RougeJudge(Judge):
    """Prefers the response with the higher Rouge-L against the references (spec llm.md section 3).

    Scores come from :func:`llm.evaluate.rouge_l`; equal scores are a tie.  A query without
    references is a ValueError (there is nothing to score against).
    """

    name = "rouge"

    def __init__(self, *, ties: str = "drop", max_retries: int = 0):
        super().__init__(ties=ties, max_retries=max_retries)

    def _judge(self, queries):
        out = []
        for q in queries:
            if not q.references:
                raise ValueError(f"the rouge judge needs references for pair {(q.round, q.index)}; set PreferenceQuery.references")
            self.stats.attempts += 1
            s0, s1 = rouge_l(q.response_0, q.references), rouge_l(q.response_1, q.references)
            raw = json.dumps({"rouge_l_0": s0, "rouge_l_1": s1})
            if s0 == s1:
                out.append(Judgement("tie", None, raw))
            else:
                out.append(Judgement("preference", int(s1 > s0), raw))
        return out


# --------------------------------------------------------------------------------------------
# The pairwise question (llm and api judges)
# --------------------------------------------------------------------------------------------


def instruction_of(prompt: str) -> str:
    """The instruction (and input) inside an Alpaca prompt, without its header and response marker."""
    text = prompt
    if text.startswith(ALPACA_HEADER):
        text = text[len(ALPACA_HEADER):].rstrip()
        if text.endswith(RESPONSE_MARKER):
            text = text[: -len(RESPONSE_MARKER)]
        text = text.strip().removeprefix("### Instruction:").replace("### Input:", "Input:")
    return text.strip()


def pairwise_question(query: PreferenceQuery, order: str) -> str:
    """:data:`PAIRWISE_TEMPLATE` for ``order`` ``"AB"`` (A = response_0) or ``"BA"`` (A = response_1)."""
    if order not in ("AB", "BA"):
        raise ValueError(f"order must be 'AB' or 'BA', got {order!r}")
    a, b = (query.response_0, query.response_1) if order == "AB" else (query.response_1, query.response_0)
    return PAIRWISE_TEMPLATE.format(instruction=instruction_of(query.prompt), response_a=a.strip(), response_b=b.strip())


_VERDICT = re.compile(r"^\s*(?:\*\*)?(?:(?i:response)\s+)?([AB])(?:\*\*)?\s*[.)]?\s*$")


def parse_verdict(text: str) -> str | None:
    """Strict parse of a reply: ``"A"``/``"B"`` (optionally ``Response A``, bold, a final period), else None."""
    match = _VERDICT.match(text)
    return match.group(1) if match else None


def combine_orders(verdict_ab: str, verdict_ba: str) -> int | None:
    """Label from the two orders: the response named in both, or None (a tie) if the answers follow position."""
    preferred_ab = 0 if verdict_ab == "A" else 1  # AB: A is response_0
    preferred_ba = 1 if verdict_ba == "A" else 0  # BA: A is response_1
    return preferred_ab if preferred_ab == preferred_ba else None


def _both_order_judgement(verdicts: dict[str, str], raw: dict, detail: dict) -> Judgement:
    label = combine_orders(verdicts["AB"], verdicts["BA"])
    raw_text = json.dumps(raw, ensure_ascii=False)
    detail = {**detail, "verdict_AB": verdicts["AB"], "verdict_BA": verdicts["BA"]}
    if label is None:
        return Judgement("tie", None, raw_text, detail)
    return Judgement("preference", label, raw_text, detail)


# --------------------------------------------------------------------------------------------
# llm: a local chat model
# --------------------------------------------------------------------------------------------


class LLMJudge(Judge):
    """A local chat model asked the pairwise question in both orders (spec llm.md section 3).

    Parsing by next-token logits: the question goes through the model's chat template with the
    assistant turn opened, and the verdict of one order is the letter whose first answer token
    scores higher -- ``logsumexp`` of the logits of the tokenisations of ``"A"`` and ``" A"``
    against those of ``"B"`` and ``" B"``.  Chosen over parsing generated text because it is
    deterministic, costs one forward pass, and cannot produce a malformed reply; the logits of
    both orders are the raw output.  A non-finite score or an exact tie of the two letters is a
    failed attempt, retried one question at a time.

    ``model`` is a name or folder for :func:`llm.models.load_causal_lm` (default: the SmolLM2
    teacher) or a loaded model, then with ``tokenizer``.  Each response is cut to
    ``max_response_tokens`` tokens before it is shown.
    """

    name = "llm"

    def __init__(self, model="smollm2-135m-instruct", tokenizer=None, *, batch_size: int = 8,
                 max_response_tokens: int = 256, ties: str = "drop", max_retries: int = 1,
                 device: str | None = None):
        super().__init__(ties=ties, max_retries=max_retries)
        from llm import models  # a heavy import, only for this judge

        if isinstance(model, (str, os.PathLike)):
            self.model_name = str(model)
            self.model = models.load_causal_lm(model)
            self.tokenizer = tokenizer if tokenizer is not None else models.load_tokenizer(model)
        else:
            if tokenizer is None:
                raise ValueError("a loaded model needs its tokenizer: pass tokenizer=")
            self.model, self.tokenizer = model, tokenizer
            self.model_name = str(getattr(model.config, "name_or_path", "") or type(model).__name__)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"the llm judge needs a chat model; tokenizer of {self.model_name!r} has no chat template")
        for name, value in (("batch_size", batch_size), ("max_response_tokens", max_response_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.batch_size, self.max_response_tokens = batch_size, max_response_tokens
        if device is not None:
            self.model.to(device)
        self.model.eval()
        self._keeps_last_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self.letter_ids = {letter: self._letter_token_ids(letter) for letter in "AB"}
        if set(self.letter_ids["A"]) & set(self.letter_ids["B"]):
            raise ValueError(f"the tokens of 'A' and 'B' overlap in {self.model_name!r}: {self.letter_ids}")

    def describe(self) -> dict:
        return {**super().describe(), "model": self.model_name}

    def _letter_token_ids(self, letter: str) -> list[int]:
        ids = []
        for text in (letter, " " + letter):
            tokens = self.tokenizer.encode(text, add_special_tokens=False)
            if tokens and tokens[0] not in ids:
                ids.append(tokens[0])
        if not ids:
            raise ValueError(f"tokenizer of {self.model_name!r} cannot encode {letter!r}")
        return ids

    def _clip(self, response: str) -> str:
        ids = self.tokenizer.encode(response, add_special_tokens=False)
        if len(ids) <= self.max_response_tokens:
            return response
        return self.tokenizer.decode(ids[: self.max_response_tokens])

    def question_ids(self, query: PreferenceQuery, order: str) -> list[int]:
        """Token ids of the chat-formatted question, the assistant turn opened."""
        clipped = PreferenceQuery(query.prompt, self._clip(query.response_0), self._clip(query.response_1))
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": pairwise_question(clipped, order)}], tokenize=False,
            add_generation_prompt=True,
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @torch.inference_mode()
    def letter_scores(self, rows: list[list[int]]) -> torch.Tensor:
        """``(len(rows), 2)`` scores of A and B for the next token after each row (left-padded batch)."""
        device = next(self.model.parameters()).device
        T = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, T - len(r):] = torch.tensor(r)
            mask[i, T - len(r):] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
        extra = {"logits_to_keep": 1} if self._keeps_last_logits else {}  # skip the (B, T, V) head output
        logits = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                            position_ids=position_ids.to(device), **extra).logits[:, -1, :].float()
        return torch.stack([torch.logsumexp(logits[:, self.letter_ids[k]], dim=-1) for k in "AB"], dim=-1).cpu()

    def _verdict(self, scores: torch.Tensor) -> str:
        a, b = float(scores[0]), float(scores[1])
        if not (math.isfinite(a) and math.isfinite(b)):
            raise JudgeFailure("non_finite", f"letter scores A={a}, B={b}", raw=json.dumps({"A": str(a), "B": str(b)}))
        if a == b:
            raise JudgeFailure("undecided", f"A and B score the same ({a})", retryable=False)
        return "A" if a > b else "B"

    def _judge(self, queries):
        items = [(qi, order) for qi in range(len(queries)) for order in ("AB", "BA")]
        rows = [self.question_ids(queries[qi], order) for qi, order in items]
        scores = torch.cat([self.letter_scores(rows[s:s + self.batch_size])
                            for s in range(0, len(rows), self.batch_size)])
        verdicts: list[dict] = [{} for _ in queries]
        raws: list[dict] = [{} for _ in queries]
        failed = [False] * len(queries)
        for k, (qi, order) in enumerate(items):
            if failed[qi]:
                continue
            batched = [scores[k]]  # the first attempt reads the batched scores; a retry reruns the row alone

            def ask(k=k, batched=batched):
                s = batched.pop() if batched else self.letter_scores([rows[k]])[0]
                return self._verdict(s), s

            answer, last_raw = self._attempt(ask, f"pair {(queries[qi].round, queries[qi].index)} order {order}")
            if answer is None:
                failed[qi] = True
                raws[qi][order] = {"failed": self.stats.last_error, "scores": last_raw}
                continue
            verdict, s = answer
            verdicts[qi][order] = verdict
            raws[qi][order] = {"logit_A": float(s[0]), "logit_B": float(s[1]), "verdict": verdict}
        out = []
        for qi in range(len(queries)):
            if failed[qi]:
                out.append(Judgement("failed", None, json.dumps(raws[qi])))
            else:
                out.append(_both_order_judgement(verdicts[qi], raws[qi], {"judge_model": self.model_name}))
        return out


# --------------------------------------------------------------------------------------------
# api: an OpenAI-compatible endpoint
# --------------------------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse redirects: following one would resend the Authorization header to another URL."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise JudgeFailure("redirect", f"the endpoint answered HTTP {code} (a redirect); set base_url to the final URL",
                           retryable=False)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class APIJudge(Judge):
    """An OpenAI-compatible chat endpoint asked the pairwise question in both orders (spec llm.md s3).

    ``POST {base_url}/chat/completions`` with ``{"model", "messages": [system, user],
    "temperature", "max_tokens"}`` and ``Authorization: Bearer <key>``, the key read from the
    environment variable ``api_key_env`` at each request.  The key is not kept on the judge,
    and every reply, error text, log line and stored raw output passes through a filter that
    replaces it with ``[REDACTED]``.  The reply ``choices[0].message.content`` is parsed
    strictly (:func:`parse_verdict`).

    Failed attempts: timeouts, connection errors, HTTP 408/409/429/5xx, malformed JSON and
    refusals (a ``refusal`` field or a reply that is not a verdict) are retried up to
    ``max_retries`` times with exponential backoff ``backoff_s * 2**k``; other HTTP errors
    (401, 403, 404, 400) and redirects fail at once.  Plain ``http`` is allowed only to a
    loopback host unless ``allow_insecure_http`` (the key would travel in clear text).
    """

    name = "api"

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 60.0,
                 max_retries: int = 3, backoff_s: float = 1.0, max_tokens: int = 4, temperature: float = 0.0,
                 ties: str = "drop", allow_insecure_http: bool = False):
        super().__init__(ties=ties, max_retries=max_retries)
        parsed = urllib.parse.urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"base_url must be an http(s) URL such as https://api.openai.com/v1, got {base_url!r}")
        if parsed.username or parsed.password or parsed.query:
            raise ValueError("base_url must not carry credentials or a query; the key comes from api_key_env")
        if parsed.scheme == "http" and not _is_loopback(parsed.hostname) and not allow_insecure_http:
            raise ValueError(
                f"base_url {base_url!r} is plain http to a non-loopback host, so the API key would travel "
                "unencrypted; use https, or set allow_insecure_http=true for a trusted network"
            )
        if not isinstance(model, str) or not model:
            raise ValueError("model must be the endpoint's model name, e.g. 'gpt-4'")
        if not isinstance(api_key_env, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env):
            raise ValueError(f"api_key_env must be an environment variable name, got {api_key_env!r}")
        if not os.environ.get(api_key_env):
            raise ValueError(f"the environment variable {api_key_env} holding the API key is not set or empty")
        for name, value in (("timeout_s", timeout_s), ("backoff_s", backoff_s)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (name == "timeout_s" and value == 0):
                raise ValueError(f"{name} must be a finite number {'> 0' if name == 'timeout_s' else '>= 0'}, got {value!r}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model_name = model
        self.api_key_env = api_key_env
        self.timeout_s, self.backoff_s = float(timeout_s), float(backoff_s)
        self.max_tokens, self.temperature = max_tokens, float(temperature)
        proxies = {} if _is_loopback(parsed.hostname) else None  # None: the environment's proxies
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies), _NoRedirect())

    def describe(self) -> dict:
        return {**super().describe(), "url": self.url, "model": self.model_name, "api_key_env": self.api_key_env}

    def __repr__(self) -> str:
        return f"APIJudge(url={self.url!r}, model={self.model_name!r}, api_key_env={self.api_key_env!r})"

    def _key(self) -> str:
        key = os.environ.get(self.api_key_env, "")
        if not key:
            raise ValueError(f"the environment variable {self.api_key_env} holding the API key is not set or empty")
        return key

    @staticmethod
    def _redact(text: str, key: str) -> str:
        return text.replace(key, "[REDACTED]") if key else text

    def request_body(self, question: str) -> dict:
        """The JSON body of one chat completion request."""
        return {
            "model": self.model_name,
            "messages": [{"role": "system", "content": API_SYSTEM_PROMPT}, {"role": "user", "content": question}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }

    def ask(self, question: str) -> str:
        """One request; returns the verdict letter or raises :class:`JudgeFailure` (redacted)."""
        key = self._key()
        try:
            return self._ask(question, key)
        except JudgeFailure as err:
            failure = JudgeFailure(err.reason, self._redact(err.message, key), retryable=err.retryable,
                                   raw=self._redact(err.raw, key))
        except Exception as err:  # anything unexpected: report its type and redacted text
            failure = JudgeFailure("error", self._redact(f"{type(err).__name__}: {err}", key), retryable=False)
        # Raised outside the handler, so the unredacted original is not kept as __context__.
        raise failure

    def _ask(self, question: str, key: str) -> str:
        request = urllib.request.Request(
            self.url, data=json.dumps(self.request_body(question)).encode("utf-8"), method="POST",
            headers={"Content-Type": "application/json", "Accept": "application/json",
                     "Authorization": f"Bearer {key}"},
        )
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as err:
            body = err.read(500).decode("utf-8", "replace") if err.fp is not None else ""
            retryable = err.code in (408, 409, 429) or err.code >= 500
            raise JudgeFailure(f"http_{err.code}", f"HTTP {err.code} {err.reason}: {body}", retryable=retryable, raw=body)
        except TimeoutError as err:
            raise JudgeFailure("timeout", f"no reply within {self.timeout_s} s ({err})")
        except urllib.error.URLError as err:
            if isinstance(err.reason, TimeoutError):
                raise JudgeFailure("timeout", f"no reply within {self.timeout_s} s ({err.reason})")
            raise JudgeFailure("connection", f"cannot reach {self.url}: {err.reason}")
        except OSError as err:
            raise JudgeFailure("connection", f"connection to {self.url} failed: {err}")
        text = payload.decode("utf-8", "replace")
        try:
            message = json.loads(text)["choices"][0]["message"]
            if not isinstance(message, dict):
                raise TypeError("message is not an object")
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise JudgeFailure("malformed", f"reply is not a chat completion ({type(err).__name__}: {err}): {text[:200]}",
                               raw=text[:2000])
        if message.get("refusal"):
            raise JudgeFailure("refusal", f"the model refused: {str(message['refusal'])[:200]}", raw=text[:2000])
        content = message.get("content")
        if not isinstance(content, str):
            raise JudgeFailure("malformed", f"reply has no text content: {text[:200]}", raw=text[:2000])
        verdict = parse_verdict(content)
        if verdict is None:
            raise JudgeFailure("refusal", f"reply is not a verdict A or B: {content[:200]!r}", raw=content[:2000])
        return verdict

    def _before_retry(self, attempt: int) -> None:
        if self.backoff_s > 0:
            time.sleep(self.backoff_s * 2**attempt)

    def _judge(self, queries):
        out = []
        for q in queries:
            verdicts, raw = {}, {}
            for order in ("AB", "BA"):
                verdict, last_raw = self._attempt(lambda: self.ask(pairwise_question(q, order)),
                                                  f"pair {(q.round, q.index)} order {order}")
                if verdict is None:
                    raw[order] = {"failed": self.stats.last_error, "reply": last_raw}
                    break
                verdicts[order] = verdict
                raw[order] = verdict
            if len(verdicts) < 2:
                out.append(Judgement("failed", None, json.dumps(raw, ensure_ascii=False)))
            else:
                out.append(_both_order_judgement(verdicts, raw, {"judge_model": self.model_name}))
        return out


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

JUDGES: dict[str, type[Judge]] = {cls.name: cls for cls in (BTOracleJudge, RougeJudge, LLMJudge, APIJudge)}
"""Judges by name (spec llm.md section 3), in the order of `llm.config.JUDGE_NAMES`."""
if tuple(JUDGES) != JUDGE_NAMES:  # the config validates judge names without importing this module
    raise ImportError(f"llm.config.JUDGE_NAMES {JUDGE_NAMES} and the judge classes {tuple(JUDGES)} differ")


def make_judge(name: str, **options) -> Judge:
    """Build the judge registered as ``name`` with its ``options``; unknown names or options are ValueErrors."""
    if name not in JUDGES:
        raise ValueError(f"unknown judge {name!r}; valid judges: {', '.join(JUDGES)}")
    cls = JUDGES[name]
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p in params if p != "self"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for the {name} judge; valid options: {', '.join(valid)}")
    return cls(**options)

"""The evaluation protocol users compare against (spec llm.md section 5).

Rouge-L F1 (``rouge_score``, Porter stemmer on, max over references, x100), exact match
(SQuAD answer normalisation, max over references, x100) and, for data sets whose examples carry
their short answers (the testbed), answer accuracy (x100: the response names an accepted answer
and none of the distractors, the answers of the family's other facts) of generated responses.  Generation
samples at temperature 1, top-k 0, top-p 1 with ``no_repeat_ngram_size = 6`` and up to 256 new
tokens, once per seed in 10, 20, 30, 40, 50; the scores are reported as mean and standard
deviation over the seeds.  Greedy decoding is an option (one pass, no seeds).  Generation
stops at EOS and the prompt is stripped from the output.

:func:`rouge_l` is the project's one Rouge-L scorer: the ``rouge`` judge, checkpoint selection
in training and this module all call it.

Command line (from the repository root)::

    python llm/evaluate.py --model PATH --data FILE [--data NAME=FILE ...] [--greedy]
        [--seeds 10 20 30 40 50] [--max-new-tokens 256] --out DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script path: import the package from the repository root
    _root = str(Path(__file__).resolve().parents[1])
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, _root)

import json
import math
import os
import re
import string
import time
from collections import defaultdict
from collections.abc import Sequence

import torch
from rouge_score import rouge_scorer
from transformers import GenerationConfig
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

from llm.data import MAX_PROMPT_TOKENS, Answers, Example, encode_generation_batch, load_jsonl, word_pattern
from pbkd_ref.cli import ArgumentParser, refusing_bad_input

SEEDS = (10, 20, 30, 40, 50)
MAX_NEW_TOKENS = 256
NO_REPEAT_NGRAM_SIZE = 6

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _check_references(references: Sequence[str]) -> list[str]:
    if isinstance(references, str):
        references = [references]
    references = list(references)
    if not references:
        raise ValueError("at least one reference is needed to score a prediction")
    return references


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Rouge-L F1 x 100, maximised over references (spec section 5; ``rouge_score``, stemmer on)."""
    references = _check_references(references)
    return 100.0 * max(_SCORER.score(ref, prediction)["rougeL"].fmeasure for ref in references)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and the articles a/an/the, squeeze spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """Exact match x 100 (so 0 or 100) after SQuAD normalisation, maximised over references."""
    references = _check_references(references)
    pred = normalize_answer(prediction)
    return 100.0 if any(pred == normalize_answer(ref) for ref in references) else 0.0


def answer_accuracy(prediction: str, answers: Answers) -> float:
    """Answer accuracy x 100 (so 0 or 100): ``prediction`` names an accepted answer and no distractor.

    Candidates (accepted answers and distractors) are matched as whole words; a mention inside a
    longer candidate's mention is not a mention of its own ("dollar" inside "US dollar" names the US
    dollar, not the dollar of Canada)."""
    flags = 0 if answers.case_sensitive else re.IGNORECASE
    spans = [(m.start(), m.end(), accepted)
             for candidates, accepted in ((answers.accepted, True), (answers.distractors, False))
             for c in candidates for m in re.finditer(word_pattern(c), prediction, flags)]
    named = [accepted for start, end, accepted in spans
             if not any(s <= start and end <= e and (s, e) != (start, end) for s, e, _ in spans)]
    return 100.0 if any(named) and all(named) else 0.0


def generation_config(tokenizer, *, greedy: bool, max_new_tokens: int) -> GenerationConfig:
    """The decoding settings of spec section 5 (a fresh config, so no model default leaks in)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    common = dict(max_new_tokens=max_new_tokens, no_repeat_ngram_size=NO_REPEAT_NGRAM_SIZE,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if greedy:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, **common)


def _prefill(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple:
    """(KV cache, last-position logits, last position ids, attention mask) of a left-padded batch
    of prompts, their common prefix encoded once: [prefix][padding][suffix] rows, positions counted
    over the real tokens only, so every token sees the same tokens at the same positions as in the
    left-padded batch."""
    rows = [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]
    shared = 0
    while shared < min(map(len, rows)) - 1 and all(r[shared] == rows[0][shared] for r in rows):
        shared += 1
    device = ids.device
    if shared:
        prefix = torch.tensor([rows[0][:shared]], device=device)
        cache = model(input_ids=prefix, position_ids=torch.arange(shared, device=device)[None], use_cache=True,
                      logits_to_keep=1).cache
        cache.batch_repeat_interleave(len(rows))
    else:
        cache = None
    width = max(len(r) for r in rows) - shared
    suffix = torch.tensor([[0] * (width - len(r) + shared) + r[shared:] for r in rows], device=device)  # 0: masked
    suffix_mask = torch.tensor([[0] * (width - len(r) + shared) + [1] * (len(r) - shared) for r in rows],
                               device=device, dtype=mask.dtype)
    positions = (shared + suffix_mask.long().cumsum(-1) - 1).masked_fill(suffix_mask == 0, 1)
    full_mask = torch.cat([torch.ones(len(rows), shared, dtype=mask.dtype, device=device), suffix_mask], 1)
    out = model(input_ids=suffix, attention_mask=full_mask, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=1)
    return out.cache, out.logits[:, -1].float(), positions[:, -1], full_mask


@torch.inference_mode()
def greedy_tokens(model, batch: dict, *, max_new_tokens: int, eos: int) -> list[list[int]]:
    """The new tokens of greedy decoding of a left-padded batch with ``no_repeat_ngram_size`` blocking,
    up to and including each row's EOS: the tokens of ``model.generate`` under the greedy
    :func:`generation_config`, since rows are independent and the blocking is the same processor.

    Two savings, neither of which changes a token in exact arithmetic (in floating point only the
    batch shapes differ; the tests and all 1,000 testbed validation and test prompts of a trained
    student gave the same tokens): the prompts' common prefix (the instruction template) is encoded
    once and its KV cache shared by every row, the rows' own suffixes then left-padded after it; and
    a row leaves the batch (and its KV cache) once it has written EOS, so a batch costs the tokens
    its rows write, not its longest row times its size."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    cache, logits, position, mask = _prefill(model, ids, mask)
    blocking = NoRepeatNGramLogitsProcessor(NO_REPEAT_NGRAM_SIZE)
    live, rows = torch.arange(len(ids), device=ids.device), [[] for _ in range(len(ids))]
    for t in range(max_new_tokens):
        token = blocking(ids, logits).argmax(-1)
        for row, tok in zip(live.tolist(), token.tolist()):
            rows[row].append(tok)
        going = token != eos
        if t + 1 == max_new_tokens or not bool(going.any()):
            break
        ids = torch.cat([ids, token[:, None]], 1)
        if not bool(going.all()):
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            ids, mask, position, token, live = ids[keep], mask[keep], position[keep], token[keep], live[keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        position = position + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None], cache=cache,
                    use_cache=True)
        cache, logits = out.cache, out.logits[:, -1].float()
    return rows


@torch.inference_mode()
def generate(model, tokenizer, prompts: Sequence[str], *, seed: int | None, greedy: bool = False,
             max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 8,
             max_prompt_tokens: int = MAX_PROMPT_TOKENS, chat_template: bool | None = None) -> list[str]:
    """Responses to ``prompts`` under the section 5 decoding settings, prompt stripped, cut at EOS.

    Sampling draws from torch's global generator, seeded with ``seed`` inside a forked RNG state,
    so the caller's RNG is untouched and a seed gives the same responses for the same batch size;
    it runs ``model.generate``. Greedy decoding runs :func:`greedy_tokens`, which drops finished rows.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not greedy and seed is None:
        raise ValueError("sampling needs a seed (the protocol uses 10, 20, 30, 40, 50)")
    config = generation_config(tokenizer, greedy=greedy, max_new_tokens=max_new_tokens)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0 if seed is None else seed)
            for start in range(0, len(prompts), batch_size):
                batch = encode_generation_batch(tokenizer, prompts[start:start + batch_size],
                                                max_prompt_tokens, chat_template=chat_template)
                batch = {k: v.to(device) for k, v in batch.items()}
                if greedy:
                    new_tokens = greedy_tokens(model, batch, max_new_tokens=max_new_tokens, eos=tokenizer.eos_token_id)
                else:
                    out = model.generate(**batch, generation_config=config)
                    new_tokens = out[:, batch["input_ids"].shape[1]:].tolist()
                for row in new_tokens:
                    if tokenizer.eos_token_id in row:
                        row = row[: row.index(tokenizer.eos_token_id)]
                    outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return outputs


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


METRICS = ("answer_accuracy", "rouge_l", "exact_match")
"""Every score of a prediction; answer accuracy only for data sets that carry answers."""


def has_answers(examples: Sequence[Example]) -> bool:
    """Whether every example carries its answers (a set where only some do is refused)."""
    carried = [ex.answers is not None for ex in examples]
    if any(carried) and not all(carried):
        missing = carried.index(False) + 1
        raise ValueError(f"{sum(carried)} of {len(carried)} examples carry answers (example {missing} does not); "
                         "answer accuracy needs all or none")
    return bool(carried) and all(carried)


def score_predictions(predictions: Sequence[str], examples: Sequence[Example]) -> dict:
    """Mean Rouge-L, exact match and (when the examples carry answers) answer accuracy of one set
    of predictions, overall and per category."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    metrics = METRICS if has_answers(examples) else METRICS[1:]
    per_cat = defaultdict(lambda: defaultdict(float))
    for pred, ex in zip(predictions, examples):
        scores = {"rouge_l": rouge_l(pred, ex.references), "exact_match": exact_match(pred, ex.references)}
        if ex.answers is not None:
            scores["answer_accuracy"] = answer_accuracy(pred, ex.answers)
        for key in ("", ex.category):
            for m in metrics:
                per_cat[key][m] += scores[m]
            per_cat[key]["n"] += 1
    total = per_cat.pop("")
    out = {m: total[m] / total["n"] for m in metrics}
    out["by_category"] = {c: {**{m: a[m] / a["n"] for m in metrics}, "n": int(a["n"])}
                          for c, a in sorted(per_cat.items())}
    return out


def evaluate_model(model, tokenizer, examples: Sequence[Example], *, seeds: Sequence[int] = SEEDS,
                   greedy: bool = False, max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 8,
                   max_prompt_tokens: int = MAX_PROMPT_TOKENS, chat_template: bool | None = None,
                   keep_predictions: bool = False) -> dict:
    """Spec section 5 on one test set: Rouge-L, EM and (when the set carries answers) answer
    accuracy, mean and sample std over ``seeds``.

    Returns ``rouge_l``, ``rouge_l_std``, ``exact_match``, ``exact_match_std`` (and
    ``answer_accuracy``, ``answer_accuracy_std``), ``seconds`` (the generation and scoring time), ``per_seed``
    (one entry per seed; a single entry with seed None for greedy decoding), ``by_category``
    (means over seeds), ``num_examples`` and the decoding settings; with ``keep_predictions``
    also the generated responses of every seed.
    """
    examples = list(examples)
    if not examples:
        raise ValueError("evaluate_model needs at least one example")
    seeds = [None] if greedy else [int(s) for s in seeds]
    if not seeds:
        raise ValueError("sampling evaluation needs at least one seed")
    prompts = [ex.prompt for ex in examples]
    per_seed, predictions = [], {}
    start = time.perf_counter()
    for seed in seeds:
        preds = generate(model, tokenizer, prompts, seed=seed, greedy=greedy, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, max_prompt_tokens=max_prompt_tokens, chat_template=chat_template)
        per_seed.append({"seed": seed, **score_predictions(preds, examples)})
        predictions[str(seed)] = preds
    metrics = [m for m in METRICS if m in per_seed[0]]
    result = {}
    for m in metrics:
        result[m], result[f"{m}_std"] = _mean_std([s[m] for s in per_seed])
    by_category = {cat: {**{m: sum(s["by_category"][cat][m] for s in per_seed) / len(per_seed) for m in metrics},
                         "n": first["n"]}
                   for cat, first in per_seed[0]["by_category"].items()}
    result |= {
        "num_examples": len(examples), "greedy": greedy, "seeds": [s for s in seeds if s is not None],
        "max_new_tokens": max_new_tokens, "seconds": round(time.perf_counter() - start, 2),
        "per_seed": [{k: v for k, v in s.items() if k != "by_category"} for s in per_seed],
        "by_category": by_category,
    }
    if keep_predictions:
        result["predictions"] = predictions
    return result


def _cell(metrics: dict | None, key: str) -> str:
    if metrics is None or key not in metrics:
        return "-"
    mean, std = metrics[key], metrics.get(f"{key}_std", 0.0)
    return f"{mean:.1f} ± {std:.1f}" if len(metrics.get("seeds") or []) > 1 else f"{mean:.1f}"  # no std of one seed


_COLUMN = {"answer_accuracy": "Acc", "rouge_l": "Rouge-L", "exact_match": "EM"}


def results_table(results: dict[str, dict[str, dict]]) -> str:
    """Markdown table, one row per method; per test set an answer-accuracy column (when the set
    carries answers), a Rouge-L and an EM column (section 5)."""
    if not results:
        raise ValueError("results_table needs at least one method")
    testsets: list[str] = []
    for per_set in results.values():
        testsets += [t for t in per_set if t not in testsets]
    columns = [(t, m) for t in testsets for m in METRICS
               if any(m in (per_set.get(t) or {}) for per_set in results.values())]
    header = ["method"] + [f"{t} {_COLUMN[m]}" for t, m in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for method, per_set in results.items():
        cells = [method] + [_cell(per_set.get(t), m) for t, m in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, dict[str, dict]], out_dir: str | os.PathLike, name: str = "results") -> tuple[Path, Path]:
    """Write ``results`` as ``NAME.json`` and the Markdown table as ``NAME.md`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    for path, text in ((json_path, json.dumps(results, indent=2, sort_keys=False) + "\n"), (md_path, results_table(results))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return json_path, md_path


def _parse_data_arg(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if sep and name and not Path(value).exists():
        return name, Path(path)
    return Path(value).stem, Path(value)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = ArgumentParser(prog="python llm/evaluate.py",
                            description="Evaluate a causal LM with the protocol of spec llm.md section 5.")
    parser.add_argument("--model", required=True, help="hub name or local folder (safetensors)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer name or folder (default: the model's)")
    parser.add_argument("--data", required=True, action="append",
                        help="test set JSONL, optionally NAME=FILE; repeat for several test sets")
    parser.add_argument("--format", default="dolly", choices=("dolly", "minillm"), help="JSONL schema")
    parser.add_argument("--method", default=None, help="row name in the table (default: the model folder name)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of five sampled seeds")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--max-prompt-tokens", type=int, default=MAX_PROMPT_TOKENS)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples of each set")
    parser.add_argument("--chat-template", choices=("auto", "on", "off"), default="auto",
                        help="send prompts through the tokenizer's chat template (auto: when it has one)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True, help="folder for results.json and results.md")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")

    from llm.models import load_causal_lm, load_tokenizer

    with refusing_bad_input():  # every input is read before the first generation: a bad one is one line, exit 2
        test_sets = {}
        for value in args.data:
            name, path = _parse_data_arg(value)
            test_sets[name] = load_jsonl(path, fmt=args.format)[: args.limit]
        model = load_causal_lm(args.model).to(args.device)
        tokenizer = load_tokenizer(args.tokenizer or args.model)
    chat = {"auto": None, "on": True, "off": False}[args.chat_template]
    method = args.method or Path(str(args.model)).name
    per_set = {}
    for name, examples in test_sets.items():
        per_set[name] = evaluate_model(model, tokenizer, examples, seeds=args.seeds, greedy=args.greedy,
                                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                       max_prompt_tokens=args.max_prompt_tokens, chat_template=chat)
    results = {method: per_set}
    json_path, md_path = write_results(results, args.out)
    print(results_table(results), end="")
    print(f"wrote {json_path} and {md_path}")
    return results


if __name__ == "__main__":
    main()

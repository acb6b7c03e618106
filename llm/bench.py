"""LLM-layer benchmark: `python -m llm.bench` (`make bench-llm`).

Measured one job at a time, with warm-up and medians; machine load varies, so compare the ratios
of one run, whose environment is recorded beside them.

Section `rollout` (spec llm.md section 2a; `llm/rollout.py`): response tokens per second of the
k student samples per prompt of a `pbkd` step (testbed student, testbed prompts and decoding
settings), for the project's rollout -- one prefill per prompt, its KV cache repeated k times,
prompts taken in order of length -- against the same samples drawn by `transformers`'
`generate` with each prompt encoded k times (what training rollouts did before). Both sample
at temperature 1 with no top-k, top-p or n-gram blocking; generated tokens are counted up to
each row's EOS, so the two are compared on the work that lands in the batch.

Writes `figures/llm_bench.json` (or into `--out-dir`); `--quick` runs a tiny random model for seconds and
writes to the scratch `runs/quick/` unless `--out` is given.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from llm.checkpoint import atomic_write_bytes
from llm.data import left_pad, prompt_token_ids
from llm.rollout import rollout
from pbkd_ref.cli import ArgumentParser, refusing_bad_input
from theory.common import FIGURES_DIR, QUICK_DIR, output_dir

NAME = "llm_bench.json"


def _log(message: str) -> None:
    print(f"[bench-llm] {message}", file=sys.stderr, flush=True)


def generate_k_times(model, tokenizer, prompts: list[list[int]], *, seed: int, k: int, max_new_tokens: int,
                     batch_size: int) -> list[list[int]]:
    """The comparison point: `generate` sampling k rows per prompt, each prompt encoded k times."""
    from transformers import GenerationConfig

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                              eos_token_id=eos, pad_token_id=pad)
    rows = [p for p in prompts for _ in range(k)]
    out = []
    with torch.inference_mode(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(rows), batch_size):
            batch = left_pad(rows[start : start + batch_size], pad)
            new = model.generate(**batch, generation_config=config)[:, batch["input_ids"].shape[1]:]
            out += [ids[: ids.index(eos) + 1] if eos in ids else ids for ids in new.tolist()]
    return out


def _median_tokens_per_s(label: str, sample, repeats: int) -> dict:
    """Median over `repeats` timed calls of `sample()` (which returns response-id lists), after one warm-up."""
    sample()
    seconds, tokens = [], []
    for repeat in range(repeats):
        start = time.perf_counter()
        responses = sample(seed=repeat + 1)
        seconds.append(time.perf_counter() - start)
        tokens.append(sum(len(r) for r in responses))
        _log(f"{label} repeat {repeat + 1}/{repeats}: {seconds[-1]:.2f} s, {tokens[-1]} tokens")
    rates = [t / s for t, s in zip(tokens, seconds)]
    return {"tokens_per_s": statistics.median(rates), "seconds": statistics.median(seconds),
            "tokens": statistics.median(tokens), "all_tokens_per_s": rates}


def bench_rollout(model, tokenizer, prompts: list[list[int]], *, ks, max_new_tokens: int, batch_size: int,
                  repeats: int) -> dict:
    """Rollout tokens/s, shared prefill (llm.rollout.rollout) against `generate` with prompts repeated k times."""
    out = {}
    for k in ks:
        shared = _median_tokens_per_s(
            f"rollout k={k} shared prefill",
            lambda seed=0: rollout(model, tokenizer, prompts, seed=seed, k=k, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size).response_ids, repeats)
        repeated = _median_tokens_per_s(
            f"rollout k={k} generate, prompt encoded k times",
            lambda seed=0: generate_k_times(model, tokenizer, prompts, seed=seed, k=k, max_new_tokens=max_new_tokens,
                                            batch_size=batch_size), repeats)
        out[f"k{k}"] = {"shared_prefill": shared, "generate_repeated_prompts": repeated,
                        "speedup": shared["tokens_per_s"] / repeated["tokens_per_s"]}
        _log(f"k={k}: {shared['tokens_per_s']:.1f} against {repeated['tokens_per_s']:.1f} tokens/s "
             f"({out[f'k{k}']['speedup']:.2f}x)")
    return out


def _testbed_setup(cache_dir: Path, n_prompts: int):
    """The testbed's student, tokenizer and training prompts, as `llm/configs/testbed.yaml` sets them."""
    from llm.config import DEFAULT_CONFIG, load_config
    from llm.data import load_jsonl
    from llm.models import load_causal_lm, load_tokenizer, pruned_student, smollm2_teacher_dir
    from llm.testbed import testbed_splits

    cfg = load_config(DEFAULT_CONFIG)
    folder = smollm2_teacher_dir(cache_dir)
    teacher, tokenizer = load_causal_lm(folder), load_tokenizer(folder)
    student = pruned_student(teacher, list(cfg.student_layers)).float().eval()
    train = load_jsonl(testbed_splits(cache_dir / "testbed")["train"], fmt="dolly")
    prompts = [prompt_token_ids(tokenizer, ex.prompt, max_prompt_tokens=cfg.data.max_prompt_tokens)
               for ex in train[:n_prompts]]
    settings = {"student": f"pruned SmolLM2-135M-Instruct, layers {list(cfg.student_layers)}",
                "prompts": n_prompts, "max_new_tokens": cfg.generation.max_new_tokens,
                "batch_size": cfg.generation.batch_size}
    return student, tokenizer, prompts, settings


def _quick_setup(n_prompts: int):
    from llm.models import fresh_student, gpt2_tokenizer_dir, load_tokenizer, tiny_config

    tokenizer = load_tokenizer(gpt2_tokenizer_dir())
    student = fresh_student(tiny_config("gpt2", len(tokenizer)), seed=0).eval()
    prompts = [tokenizer(f"Prompt number {i}, " * (1 + i % 3))["input_ids"] for i in range(n_prompts)]
    return student, tokenizer, prompts, {"student": "tiny random GPT-2", "prompts": n_prompts, "max_new_tokens": 8,
                                         "batch_size": 8}


def environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "cuda": torch.cuda.is_available()}


def main(argv=None) -> dict:
    parser = ArgumentParser(prog="python -m llm.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny random model, seconds (smoke run)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help=f"where {NAME} goes (default {FIGURES_DIR}/, or {QUICK_DIR}/ with --quick)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement, after one warm-up")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4], help="samples per prompt (pbkd.samples_per_prompt)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts of one step (the testbed batch_size)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--cache-dir", type=Path, default=Path("cache"), help="the testbed's model and data cache")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.prompts < 1 or min(args.ks) < 1 or args.threads < 1:
        parser.error("--repeats, --prompts, --ks and --threads must be >= 1")
    out = output_dir(args.out_dir, args.quick) / NAME
    torch.set_num_threads(args.threads)
    with refusing_bad_input():
        student, tokenizer, prompts, settings = (_quick_setup(args.prompts) if args.quick
                                                 else _testbed_setup(args.cache_dir, args.prompts))
    record = {"benchmark": "llm", "mode": "quick" if args.quick else "full", "environment": environment(),
              "command": "python -m llm.bench" + (" --quick" if args.quick else "")
                         + f" --repeats {args.repeats} --ks {' '.join(map(str, args.ks))} --prompts {args.prompts}",
              "rollout": {"settings": settings,
                          "results": bench_rollout(student, tokenizer, prompts, ks=args.ks,
                                                   max_new_tokens=settings["max_new_tokens"],
                                                   batch_size=settings["batch_size"], repeats=args.repeats)}}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, (json.dumps(record, indent=2) + "\n").encode())
    _log(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()

"""LLM-layer benchmark: `python -m llm.bench` (`make bench-llm`).

Measured one job at a time, with a warm-up and medians; machine load varies, so compare the ratios
of one run, whose environment is recorded beside them. Every measurement of a model runs in a
fresh process, so its peak memory (resident set on CPU, allocated memory on a GPU) is its own.

Sections:
- `steps`: seconds per optimiser step and response tokens/s of every objective through the
  training loop's own step (llm.train.train_step), on the testbed models and on a GPT-2-small-shaped
  random pair (12-block teacher, 6-block student, width 768, vocabulary 50,257; token-level
  objectives); beside each token-level objective the floor, a minimal hand-written PyTorch step
  of the same formula (teacher forward, student forward and backward, LM head on the response
  tokens only, AdamW), and `step_vs_floor_<objective>`; and each loss alone, forward and
  backward on the same packed rows, against a minimal implementation (`loss_vs_minimal_<objective>`).
  Steps are timed without the diagnostics every `log_every`-th step adds.
- `game`: a `pbkd` step and a `mm_pbkd` step on the same models and batch, each drawing its
  rollouts (`pg.ppo_epochs=1`), and `mm_pbkd_vs_pbkd` (the issue's budget: at most 2); the
  round's preparation (labelling, the adversary's fit, cut to 5 MLE and 5 refit steps, which a
  step's cost does not depend on) is timed apart, as `round_s`, and the fit within it as `fit_s`;
  the same for `mm_pbkd` with a frozen Q-head backbone (`mm_pbkd_frozen`, pbkd.mm_frozen_backbone),
  and `mm_pbkd_fit_frozen_vs_trained`.
- `topk`: the off-policy `fkl` step with the teacher top-k cache (kd.teacher_topk) against the
  same step running the teacher, and the error of each loss and of its gradient against the full
  teacher distribution, for k in {8, 32, 128}.
- `memory`: peak memory of the fkl loss and its gradients on a GPT-2-shaped head (4,096 response
  tokens, width 768, vocabulary 50,257), in chunks of `loss_chunk_tokens` against all at once.
- `rollout`: response tokens per second of the k student samples per prompt of a `pbkd` step,
  for the project's rollout (one prefill per prompt, its KV cache repeated k times, prompts in
  order of length) against `transformers`' `generate` with each prompt encoded k times (what
  training rollouts did before). Both sample at temperature 1 with no top-k, top-p or n-gram
  blocking; generated tokens are counted up to each row's EOS.

Writes `figures/llm_bench.json` (or into `--out-dir`); `--quick` runs tiny random models for
seconds, in this process, and writes to the scratch `runs/quick/` unless `--out-dir` is given.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llm import losses
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


TOKEN_LEVEL = ("sft", "seqkd", "fkl", "rkl", "jsd", "skl", "srkl", "akl")
TOPK_KS = (8, 32, 128)
TESTBED = Path(__file__).resolve().parent / "configs" / "testbed.yaml"


# =============================================================================================
# The floor's losses: each formula of spec llm.md section 2 written plainly, mean over the packed
# response tokens (N, V), independent of llm.losses
# =============================================================================================


def _mix(log_a, log_b, w):
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def _kl(log_a, log_b):
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _minimal_akl(lq, lp, mu):
    p, q = lp.exp(), lq.detach().exp()
    p_sorted, order = p.sort(dim=-1, descending=True, stable=True)
    gap = (p_sorted - q.gather(-1, order)).abs()
    head = p_sorted.cumsum(-1) <= mu
    head[:, 0] = True
    g_head, g_total = (gap * head).sum(-1), gap.sum(-1)
    w = torch.where(g_total > 0, g_head / g_total.clamp(min=1e-30), 0.5)
    return w * _kl(lp, lq) + (1 - w) * _kl(lq, lp)


MINIMAL = {
    "sft": lambda lq, lp, y, kw: -lq.gather(-1, y[:, None])[:, 0],
    "fkl": lambda lq, lp, y, kw: _kl(lp, lq),
    "rkl": lambda lq, lp, y, kw: _kl(lq, lp),
    "jsd": lambda lq, lp, y, kw: (kw["beta"] * _kl(lp, _mix(lp, lq, kw["beta"]))
                                  + (1 - kw["beta"]) * _kl(lq, _mix(lp, lq, kw["beta"]))),
    "skl": lambda lq, lp, y, kw: _kl(lp, _mix(lp, lq, kw["alpha"])),
    "srkl": lambda lq, lp, y, kw: _kl(lq, _mix(lp, lq, 1 - kw["alpha"])),
    "akl": lambda lq, lp, y, kw: _minimal_akl(lq, lp, kw["mu"]),
}
MINIMAL["seqkd"] = MINIMAL["sft"]


def minimal_loss(name: str, s_logits, t_logits, labels, kwargs: dict):
    """The floor's loss: `name`'s formula on (N, V) logits, mean over the N tokens."""
    lq = s_logits.float().log_softmax(-1)
    lp = None if t_logits is None else t_logits.float().log_softmax(-1)
    return MINIMAL[name](lq, lp, labels, kwargs).mean()


def _kwargs(cfg) -> dict:
    kd = cfg.kd
    return {"beta": kd.jsd_beta, "alpha": kd.skl_alpha if cfg.objective == "skl" else kd.srkl_alpha, "mu": kd.akl_mu}


# =============================================================================================
# Measurements, each in a fresh process
# =============================================================================================


def _peak_bytes(device) -> int:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _reset_peak(device) -> int:
    """Start a peak-memory window; returns the baseline that `_peak_bytes` is compared with."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return _peak_bytes(device)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, repeats: int, device, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def _alternating(first, second, repeats: int, device) -> tuple[list[float], list[float]]:
    """Seconds of `first` and `second` called in turn (so drifting machine load hits both alike), after a warm-up."""
    first(), second()
    a, b = [], []
    for _ in range(repeats):
        for fn, out in ((first, a), (second, b)):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            out.append(time.perf_counter() - start)
    return a, b


def _run_config(spec: dict):
    from llm import train as trainer
    from llm.config import load_config

    overrides = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in spec["overrides"].items()]
    overrides += [f"run_name=bench-{time.time_ns()}", f"out_dir={spec['out_dir']}", f"cache_dir={spec['cache_dir']}",
                  "eval.before=false", "eval.teacher=false", "eval.every=0", "save_every=0", "online.rounds=1",
                  f"max_steps={spec['warmup'] + spec['repeats'] + 1}", f"num_threads={spec['threads']}"]
    cfg = load_config(spec["config"], overrides)
    started = time.perf_counter()
    setup = trainer.setup(cfg)
    return trainer, setup, time.perf_counter() - started


def steps_job(spec: dict) -> dict:
    """s/step and response tokens/s of `spec`'s objective through llm.train.train_step; for a
    token-level objective also the floor on the very same micro-batches, and the loss alone."""
    torch.set_num_threads(spec["threads"])
    trainer, (run, objective, optimizer, scheduler, _, _), setup_s = _run_config(spec)
    cfg, device = run.cfg, run.device
    fit_s = []
    if hasattr(objective, "fit_round"):  # the adversary's part of the round's preparation, timed within it
        fit = objective.fit_round

        def timed_fit(*args):
            started = time.perf_counter()
            out = fit(*args)
            fit_s.append(time.perf_counter() - started)
            return out
        objective.fit_round = timed_fit
    started = time.perf_counter()
    objective.start_round(0, range(cfg.max_steps))  # what a round prepares (D, fits): once per round, not per step
    round_s = time.perf_counter() - started
    base = _reset_peak(device)
    seconds, tokens = [], []
    for step in range(spec["warmup"] + spec["repeats"]):
        _sync(device)
        start = time.perf_counter()
        _, _, totals = trainer.train_step(run, objective, optimizer, scheduler, step, diagnostics=False)
        _sync(device)
        if step >= spec["warmup"]:
            seconds.append(time.perf_counter() - start)
            tokens.append(sum(v for k, v in totals.items() if "tokens" in k))
    out = {"setup_s": setup_s, "round_s": round_s, **({"fit_s": fit_s[0]} if fit_s else {}),
           "s_per_step": statistics.median(seconds), "all_s": seconds,
           "response_tokens_per_step": statistics.median(tokens),
           "response_tokens_per_s": statistics.median(t / s for t, s in zip(tokens, seconds)),
           "peak_memory_mb": (_peak_bytes(device) - base) / 2**20 if device.type == "cuda" else _peak_bytes(device) / 2**20}
    if cfg.objective in TOKEN_LEVEL and not spec.get("no_floor"):
        out |= _floor(run, objective, spec)
    return out


def _floor(run, objective, spec) -> dict:
    """The minimal hand-written step on the objective's own micro-batches: teacher forward (no
    gradient), student forward and backward, the LM head at the response tokens only, AdamW."""
    from llm.run import local_batch_indices, packed_labels

    cfg, device, name = run.cfg, run.device, run.cfg.objective
    student, teacher = run.accelerator.unwrap_model(run.student), run.teacher
    o = cfg.optim
    adamw = torch.optim.AdamW(student.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                              weight_decay=o.weight_decay)
    batches = []
    for step in range(spec["warmup"] + spec["repeats"]):
        examples = [run.train_data[i] for i in local_batch_indices(run, step)]
        batches.append([m["batch"] for m in objective.make_batch(examples, step)])
    uses_teacher, kwargs = name not in ("sft", "seqkd"), _kwargs(cfg)

    def logits(model, batch):
        with run.autocast():
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         logits_to_keep=batch["keep"]).logits

    def floor_step(micros):
        adamw.zero_grad(set_to_none=True)
        for batch in micros:
            with torch.no_grad():
                t = logits(teacher, batch) if uses_teacher else None
            minimal_loss(name, logits(student, batch), t, packed_labels(batch), kwargs).backward()
        adamw.step()

    it = iter(batches)
    floor = _median_seconds(lambda: floor_step(next(it)), spec["repeats"], device, warmup=spec["warmup"])
    # the loss alone, forward and backward, on the first batch's packed rows
    batch = batches[0][0]
    with torch.no_grad():
        s0, t0 = logits(student, batch).float(), logits(teacher, batch).float()
    labels, ones = packed_labels(batch), torch.ones(1, len(s0), device=device)

    def project_loss():
        s = s0.clone().requires_grad_()
        if name in ("sft", "seqkd"):
            losses.sft_loss(s[None], labels[None], ones).backward()
        else:
            losses.TOKEN_OBJECTIVES[name](s[None], t0[None], ones, **objective.divergence.kwargs).backward()

    def plain_loss():
        s = s0.clone().requires_grad_()
        minimal_loss(name, s, t0 if uses_teacher else None, labels, kwargs).backward()

    project, plain = _alternating(project_loss, plain_loss, 3 * spec["repeats"], device)
    return {"floor_s_per_step": statistics.median(floor), "floor_all_s": floor,
            "loss_s": statistics.median(project), "minimal_loss_s": statistics.median(plain),
            "loss_rows": int(s0.shape[0])}


def topk_error_job(spec: dict) -> dict:
    """Error of each divergence and of its gradient (in the student's logits) with the teacher
    top-k buckets against the full teacher distribution, on one testbed batch of gold responses."""
    torch.set_num_threads(spec["threads"])
    _, (run, *_), _ = _run_config(spec)
    from llm.run import encode, head_inputs

    batch = encode(run, run.train_data[: run.cfg.batch_size])
    with torch.no_grad():
        s0 = F.linear(*head_inputs(run.student, batch, run)).float()
        t0 = F.linear(*head_inputs(run.teacher, batch, run)).float()
    cfg = run.cfg
    kwargs = {"fkl": {}, "rkl": {}, "jsd": {"beta": cfg.kd.jsd_beta}, "skl": {"alpha": cfg.kd.skl_alpha},
              "srkl": {"alpha": cfg.kd.srkl_alpha}, "akl": {"mu": cfg.kd.akl_mu}}
    out = {"tokens": int(s0.shape[0])}
    for name, kw in kwargs.items():
        s = s0.clone().requires_grad_()
        full = losses.token_values(name, s, t0, **kw).mean()
        (g_full,) = torch.autograd.grad(full, s)
        out[name] = {"full": float(full.detach())}
        for k in spec["ks"]:
            s = s0.clone().requires_grad_()
            q_b, p_b = losses.topk_buckets(s, *losses.teacher_topk(t0, k))
            value = losses.token_values(name, q_b, p_b, **kw).mean()
            (g,) = torch.autograd.grad(value, s)
            value, full_value = float(value.detach()), float(full.detach())
            out[name][f"k{k}"] = {"value": value, "value_rel_error": abs(value - full_value) / abs(full_value),
                                  "grad_rel_error": float((g - g_full).norm() / g_full.norm())}
    return out


def memory_job(spec: dict) -> dict:
    """Peak memory of the fkl loss and its gradients on random hidden states and heads of the given
    shape: `chunked` through llm.losses.chunked_token_mean in chunks of `chunk`, `whole` the
    same function in one chunk, `unchunked` autograd through the full (N, V) logits (the path
    before chunking)."""
    torch.set_num_threads(spec["threads"])
    device = spec.get("device", "cpu")
    n, h, v = spec["tokens"], spec["width"], spec["vocab"]
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, generator=gen, device=device).requires_grad_()
    weight = (0.02 * torch.randn(v, h, generator=gen, device=device)).requires_grad_()
    t_hidden = torch.randn(n, h, generator=gen, device=device)
    t_weight = 0.02 * torch.randn(v, h, generator=gen, device=device)
    base = _reset_peak(device)
    start = time.perf_counter()
    if spec["variant"] == "unchunked":
        s, t = F.linear(hidden, weight), F.linear(t_hidden, t_weight)
        value = losses.fkl(s[None], t[None], torch.ones(1, n, device=device))
    else:
        chunk = spec["chunk"] if spec["variant"] == "chunked" else n
        value = losses.chunked_token_mean(
            hidden, weight, None, lambda s, rows: losses.token_values("fkl", s, F.linear(t_hidden[rows], t_weight)), chunk)
    value.backward()
    _sync(device)
    return {"peak_mb": (_peak_bytes(device) - base) / 2**20, "seconds": time.perf_counter() - start,
            "value": float(value.detach()), "grad_norm": float(hidden.grad.norm())}


def in_fresh_process(job, spec: dict, fresh: bool = True) -> dict:
    """`job(spec)` in a new interpreter (its own peak memory), or here when not `fresh` (quick runs)."""
    if not fresh:
        return job(spec)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(job, (spec,))


# =============================================================================================
# Sections
# =============================================================================================


def gpt2_small_pair(cache_dir: Path) -> dict:
    """A GPT-2-small-shaped random teacher (12 blocks) and student (6 blocks), width 768 and
    vocabulary 50,257, with GPT-2's tokenizer; saved once under `cache_dir/bench/`."""
    from transformers import GPT2Config

    from llm.models import fresh_student, gpt2_tokenizer_dir, load_tokenizer

    out = {}
    for role, layers, seed in (("teacher", 12, 1), ("student", 6, 2)):
        folder = cache_dir / "bench" / f"gpt2_small_shape_{role}"
        if not (folder / "config.json").is_file():
            tokenizer = load_tokenizer(gpt2_tokenizer_dir())
            config = GPT2Config(n_layer=layers, n_embd=768, n_head=12, n_positions=1024, vocab_size=len(tokenizer))
            fresh_student(config, seed=seed).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        out[role] = str(folder)
    return out


def _quick_pair(root: Path) -> tuple[dict, Path]:
    """Tiny random GPT-2 teacher and student and a small Dolly-format set, for smoke runs."""
    from llm.models import fresh_student, gpt2_tokenizer_dir, load_tokenizer, tiny_config

    tokenizer = load_tokenizer(gpt2_tokenizer_dir())
    paths = {}
    for role, seed in (("teacher", 1), ("student", 2)):
        folder = root / role
        if not (folder / "config.json").is_file():
            fresh_student(tiny_config("gpt2", len(tokenizer)), seed=seed).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        paths[role] = str(folder)
    words = "red green blue cat dog sun moon tree river stone".split()
    for split in ("train", "valid", "test"):
        with open(root / f"{split}.jsonl", "w") as handle:
            for i in range(16):
                said = " ".join(words[(i + j) % len(words)] for j in range(1 + i % 4))
                handle.write(json.dumps({"instruction": "Repeat.", "context": said, "response": said,
                                         "category": "repeat"}) + "\n")
    config = {"teacher": paths["teacher"], "student": paths["student"], "student_init": "pretrained",
              "data.source": "files", "data.train_file": str(root / "train.jsonl"),
              "data.valid_file": str(root / "valid.jsonl"), "data.test_file": str(root / "test.jsonl"),
              "data.max_prompt_tokens": 48, "data.max_length": 64, "generation.max_new_tokens": 4,
              "pbkd.rm_config": {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2},
              "pbkd.pairs_per_round": 4, "pbkd.mle_steps": 2, "pbkd.refit_steps": 2,
              "pbkd.judge_options": {"reward": "rouge_l"}}
    return config, root


def bench_steps(objectives, base: dict, spec: dict, fresh: bool) -> dict:
    out = {}
    for name in objectives:
        _log(f"steps: {name} ...")
        result = in_fresh_process(steps_job, spec | {"overrides": base | {"objective": name}}, fresh)
        if "floor_s_per_step" in result:
            result["step_vs_floor"] = result["s_per_step"] / result["floor_s_per_step"]
            result["loss_vs_minimal"] = result["loss_s"] / result["minimal_loss_s"]
        out[name] = result
        _log(f"steps: {name}: {result['s_per_step']:.3f} s/step, {result['response_tokens_per_s']:.0f} tokens/s"
             + (f", {result['step_vs_floor']:.2f}x the floor, loss {result['loss_vs_minimal']:.2f}x minimal"
                if "step_vs_floor" in result else ""))
    return out


def bench_topk(base: dict, spec: dict, ks, fresh: bool, full_step: dict | None) -> dict:
    out = {"k": {}}
    full = full_step or in_fresh_process(steps_job, spec | {"overrides": base | {"objective": "fkl"}, "no_floor": True},
                                         fresh)
    out["full_s_per_step"] = full["s_per_step"]
    for k in ks:
        _log(f"topk: k={k} ...")
        cached = in_fresh_process(steps_job, spec | {"overrides": base | {"objective": "fkl", "kd.teacher_topk": k},
                                                     "no_floor": True}, fresh)
        out["k"][f"k{k}"] = {"s_per_step": cached["s_per_step"], "speedup": full["s_per_step"] / cached["s_per_step"],
                             "setup_s_with_cache_build": cached["setup_s"], "peak_memory_mb": cached["peak_memory_mb"]}
        _log(f"topk: k={k}: {cached['s_per_step']:.3f} s/step, {out['k'][f'k{k}']['speedup']:.2f}x")
    out["errors"] = in_fresh_process(topk_error_job, spec | {"overrides": base | {"objective": "fkl"}, "ks": list(ks)},
                                     fresh)
    return out


def bench_memory(shape: dict, chunk: int, threads: int, fresh: bool) -> dict:
    out = {"shape": shape, "chunk_tokens": chunk}
    for variant in ("unchunked", "whole", "chunked"):
        _log(f"memory: {variant} ...")
        out[variant] = in_fresh_process(memory_job, shape | {"variant": variant, "chunk": chunk, "threads": threads},
                                        fresh)
    if out["chunked"]["peak_mb"] <= 0:  # in one process (quick runs) the resident-set peak measures nothing
        out["unchunked_vs_chunked"] = out["whole_vs_chunked"] = None
        return out
    out["unchunked_vs_chunked"] = out["unchunked"]["peak_mb"] / out["chunked"]["peak_mb"]
    out["whole_vs_chunked"] = out["whole"]["peak_mb"] / out["chunked"]["peak_mb"]
    _log(f"memory: peak {out['unchunked']['peak_mb']:.0f} MB unchunked, {out['chunked']['peak_mb']:.0f} MB in chunks "
         f"of {chunk} ({out['unchunked_vs_chunked']:.1f}x)")
    return out


def _rollout_inputs(cache_dir: Path, n_prompts: int):
    """The testbed's student, tokenizer and training prompts, as `llm/configs/testbed.yaml` sets them."""
    from llm.config import load_config
    from llm.data import load_jsonl
    from llm.models import load_causal_lm, load_tokenizer, pruned_student, smollm2_teacher_dir
    from llm.testbed import testbed_splits

    cfg = load_config(TESTBED)
    folder = smollm2_teacher_dir(cache_dir / "smollm2")
    teacher, tokenizer = load_causal_lm(folder), load_tokenizer(folder)
    student = pruned_student(teacher, list(cfg.student_layers)).float().eval()
    train = load_jsonl(testbed_splits(cache_dir / "testbed")["train"], fmt="dolly")
    prompts = [prompt_token_ids(tokenizer, ex.prompt, max_prompt_tokens=cfg.data.max_prompt_tokens)
               for ex in train[:n_prompts]]
    settings = {"student": f"pruned SmolLM2-135M-Instruct, layers {list(cfg.student_layers)}",
                "prompts": n_prompts, "max_new_tokens": cfg.generation.max_new_tokens,
                "batch_size": cfg.generation.batch_size}
    return student, tokenizer, prompts, settings


def _quick_rollout_inputs(n_prompts: int):
    from llm.models import fresh_student, gpt2_tokenizer_dir, load_tokenizer, tiny_config

    tokenizer = load_tokenizer(gpt2_tokenizer_dir())
    student = fresh_student(tiny_config("gpt2", len(tokenizer)), seed=0).eval()
    prompts = [tokenizer(f"Prompt number {i}, " * (1 + i % 3))["input_ids"] for i in range(n_prompts)]
    return student, tokenizer, prompts, {"student": "tiny random GPT-2", "prompts": n_prompts, "max_new_tokens": 8,
                                         "batch_size": 8}


def environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "cuda": torch.cuda.is_available(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"}


SECTIONS = ("steps", "game", "gpt2", "topk", "memory", "rollout")
# The game's steps draw their rollouts each step; the round's fit is cut to 5 MLE and 5 refit steps,
# which a step's cost does not depend on (the adversary is frozen over the round's steps).
GAME_OVERRIDES = {"pg.ppo_epochs": 1, "pbkd.mle_steps": 5, "pbkd.refit_steps": 5}


def summary(record: dict) -> dict:
    """The headline ratios: `step_vs_floor_<objective>`, `loss_vs_minimal_<objective>`, the top-k speed-ups,
    the chunked-loss memory ratio and the rollout speed-ups."""
    out = {}
    for name, r in record.get("steps", {}).get("results", {}).items():
        if "step_vs_floor" in r:
            out[f"step_vs_floor_{name}"] = r["step_vs_floor"]
            out[f"loss_vs_minimal_{name}"] = r["loss_vs_minimal"]
    for name, r in record.get("gpt2", {}).get("results", {}).items():
        if "step_vs_floor" in r:
            out[f"gpt2_step_vs_floor_{name}"] = r["step_vs_floor"]
    game = record.get("game", {}).get("results", {})
    if "pbkd" in game and "mm_pbkd" in game:
        out["mm_pbkd_vs_pbkd"] = game["mm_pbkd"]["s_per_step"] / game["pbkd"]["s_per_step"]
    if "mm_pbkd" in game and "mm_pbkd_frozen" in game:
        out["mm_pbkd_fit_frozen_vs_trained"] = game["mm_pbkd_frozen"]["fit_s"] / game["mm_pbkd"]["fit_s"]
    for k, r in record.get("topk", {}).get("k", {}).items():
        out[f"topk_speedup_fkl_{k}"] = r["speedup"]
    if "memory" in record:
        out["memory_unchunked_vs_chunked"] = record["memory"]["unchunked_vs_chunked"]
    for k, r in record.get("rollout", {}).get("results", {}).items():
        out[f"rollout_speedup_{k}"] = r["speedup"]
    return out


def main(argv=None) -> dict:
    parser = ArgumentParser(prog="python -m llm.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random models, seconds, in this process (smoke run)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help=f"where {NAME} goes (default {FIGURES_DIR}/, or {QUICK_DIR}/ with --quick)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS, metavar="SECTION",
                        help=f"what to measure, of {', '.join(SECTIONS)} (default all)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement, after one warm-up")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4], help="samples per prompt (pg.samples_per_prompt)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts of one step (the testbed batch_size)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--cache-dir", type=Path, default=Path("cache"), help="the testbed's model and data cache")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.prompts < 1 or min(args.ks) < 1 or args.threads < 1:
        parser.error("--repeats, --prompts, --ks and --threads must be >= 1")
    out = output_dir(args.out_dir, args.quick) / NAME
    torch.set_num_threads(args.threads)
    fresh = not args.quick
    scratch = Path(tempfile.mkdtemp(prefix="llm-bench-"))
    spec = {"warmup": 1, "repeats": args.repeats, "threads": args.threads, "out_dir": str(scratch / "runs"),
            "cache_dir": str(args.cache_dir), "config": str(TESTBED)}
    record = {"benchmark": "llm", "mode": "quick" if args.quick else "full", "environment": environment(),
              "command": "python -m llm.bench" + (" --quick" if args.quick else "")
                         + f" --sections {' '.join(args.sections)} --repeats {args.repeats}"
                         + f" --ks {' '.join(map(str, args.ks))} --prompts {args.prompts} --threads {args.threads}"}
    def save() -> None:  # after every section, so a run cut short keeps what it measured
        record["summary"] = summary(record)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, (json.dumps(record, indent=2) + "\n").encode())

    with refusing_bad_input():
        if args.quick:
            base, _ = _quick_pair(scratch / "assets")
            spec |= {"config": None, "cache_dir": str(scratch / "cache")}
            objectives, gpt2_objectives, topk_ks = ("sft", "fkl", "jsd", "pbkd"), ("fkl",), (8,)
            shape = {"tokens": 64, "width": 32, "vocab": 1000}
            chunk = 16
            testbed = "tiny random GPT-2 pair, 16 generated examples"
        else:
            from llm.config import OBJECTIVES

            base, objectives, gpt2_objectives, topk_ks = {}, OBJECTIVES, TOKEN_LEVEL, TOPK_KS
            shape = {"tokens": 4096, "width": 768, "vocab": 50257}
            chunk = 1024
            testbed = "llm/configs/testbed.yaml: SmolLM2-135M-Instruct teacher, pruned 6-block student, batch 8"
        if "steps" in args.sections or "topk" in args.sections:
            settings = {"models": testbed, "precision": "fp32" if not torch.cuda.is_available() else "auto",
                        "timed_steps": args.repeats, "warmup_steps": 1}
        if "steps" in args.sections:
            record["steps"] = {"settings": settings, "results": bench_steps(objectives, base, spec, fresh)}
            save()
        if "game" in args.sections:
            results = bench_steps(("pbkd", "mm_pbkd"), base | GAME_OVERRIDES, spec, fresh)
            _log("steps: mm_pbkd with a frozen Q-head backbone ...")
            results["mm_pbkd_frozen"] = in_fresh_process(steps_job, spec | {"overrides": base | GAME_OVERRIDES | {
                "objective": "mm_pbkd", "pbkd.mm_frozen_backbone": True}}, fresh)
            record["game"] = {"settings": {"models": testbed, "overrides": GAME_OVERRIDES}, "results": results}
            save()
        if "gpt2" in args.sections:
            pair = (base if args.quick else gpt2_small_pair(args.cache_dir))
            gpt2 = base | {"teacher": pair["teacher"], "student": pair["student"], "student_init": "pretrained"}
            record["gpt2"] = {"settings": {"models": "GPT-2-small-shaped random pair: 12-block teacher, 6-block "
                                                     "student, width 768, vocabulary 50,257; testbed data, batch 8"},
                              "results": bench_steps(gpt2_objectives, gpt2, spec, fresh)}
            save()
        if "topk" in args.sections:
            full = record.get("steps", {}).get("results", {}).get("fkl")
            record["topk"] = {"settings": settings, **bench_topk(base, spec, topk_ks, fresh, full)}
            save()
        if "memory" in args.sections:
            record["memory"] = bench_memory(shape, chunk, args.threads, fresh)
            save()
        if "rollout" in args.sections:
            student, tokenizer, prompts, settings = (_quick_rollout_inputs(args.prompts) if args.quick
                                                     else _rollout_inputs(args.cache_dir, args.prompts))
            record["rollout"] = {"settings": settings,
                                 "results": bench_rollout(student, tokenizer, prompts, ks=args.ks,
                                                          max_new_tokens=settings["max_new_tokens"],
                                                          batch_size=settings["batch_size"], repeats=args.repeats)}
    save()
    _log(f"wrote {out}")
    return record


if __name__ == "__main__":
    main()

"""Distil a teacher language model into a student (spec llm.md sections 2, 5 and 6).

    python llm/train.py                                   # the offline CPU testbed (llm/configs/testbed.yaml)
    python llm/train.py --config llm/configs/gpt2_xl_to_gpt2.yaml objective=rkl kd.on_policy_fraction=0.5
    python llm/train.py --config FILE --resume run_name=NAME   # continue an interrupted run
    torchrun --nproc_per_node=8 llm/train.py --config FILE distributed=fsdp
    python llm/train.py --help-config                     # every key, its default and help text

The loop (:func:`loop`, after :func:`setup`) reads like the algorithm box:

    for t = 0 .. max_steps-1:
        if a round starts at t:  objective.start_round(r)   # refresh generated data (online.rounds)
        x_1..x_B   <- the next B prompts of the shuffled training set (this process's share)
        y_1..y_B   <- responses: gold, cached teacher samples y ~ p, or student rollouts y ~ q_theta (token ids)
        N          <- the normaliser of the whole batch, summed over micro-batches and processes
                      (response tokens for token losses, pairs for DPKD)
        for each micro-batch:  loss = sum of per-unit losses / N;  backward
        clip; AdamW step; learning-rate schedule step
        log (true divergences, DPKD diagnostics); validate (eval.select_by) and keep the best; checkpoint

Gradient accumulation. Every objective returns the *sum* of its per-unit losses over a
micro-batch divided by the number of units N in the *whole* batch (all micro-batches, all
processes), so the accumulated gradient is the gradient of the full-batch mean: `grad_accum=2`
with micro-batches of 4 gives the update of one batch of 8. (The mean of the micro-batch means
would weight tokens of short micro-batches more.) Data-parallel engines average gradients over
processes, so the loss is multiplied by the number of processes before `backward`.

Objectives are built by name from the one registry, `llm/objectives/base.py`; each owns what it
generates (student rollouts, llm/rollout.py), how it builds a batch, its loss, and the state it
must carry across a resume. What a run shares lives in llm/run.py and what it writes to disk in
llm/checkpoint.py; this file holds only the set-up and the loop.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script path: import the package from the repository root
    _root = str(Path(__file__).resolve().parents[1])
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, _root)

import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import json
import math
import os
import random
import shutil
import time
from collections import defaultdict

import numpy as np
import torch
from tqdm.auto import tqdm

from llm.cache import cache_lock
from llm.checkpoint import (
    MetricsLog,
    atomic_write_bytes,
    check_resumable,
    load_weights,
    read_checkpoint,
    save_best,
    save_checkpoint,
    set_rng_state,
)
from llm.config import (
    DEFAULT_CONFIG,
    JUDGE_NAMES,
    TeacherSFTConfig,
    TrainConfig,
    help_text,
    load_config,
    section_names,
    to_dict,
)
from llm.data import Example, load_hub_dataset, load_jsonl
from llm.evaluate import evaluate_model, has_answers, results_table, write_results
from llm.models import (
    check_vocabularies,
    fresh_student,
    load_causal_lm,
    load_tokenizer,
    pruned_student,
    small_config_like,
)
from llm.objectives.base import OBJECTIVES, Objective, build_objective, objective_class
from llm.rollout import teacher_responses
from llm.run import Run, TrainState, chunks, digest, global_batch_indices, local_batch_indices, validate
from llm.teacher_topk import teacher_topk_cache
from pbkd_ref.cli import ArgumentParser, refusing_bad_input

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# =============================================================================================
# Set-up: engine, data, models, optimiser, schedule
# =============================================================================================

def make_accelerator(cfg: TrainConfig):
    """accelerate's Accelerator for the chosen engine; bf16 autocast on GPU, fp32 on CPU."""
    from accelerate import Accelerator

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.distributed == "none" and world > 1:
        raise ValueError(f"launched with {world} processes but distributed=none; set distributed=ddp|fsdp|deepspeed")
    use_gpu = torch.cuda.is_available() and not cfg.cpu
    precision = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if use_gpu else "no")
    kwargs = {}
    if cfg.distributed == "fsdp":
        from accelerate import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            auto_wrap_policy="transformer_based_wrap", state_dict_type="FULL_STATE_DICT", use_orig_params=True,
            cpu_ram_efficient_loading=False,
        )
    if cfg.distributed == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise ValueError(
                "distributed=deepspeed needs the deepspeed package, which is not installed "
                "(pip install deepspeed); or use distributed=ddp or distributed=fsdp"
            )
        from accelerate import DeepSpeedPlugin

        # The loop accumulates micro-batches itself (DeepSpeed's boundary is set per micro-batch in
        # `accumulate_gradients`), so DeepSpeed must not rescale the loss by accumulation steps.
        plugin = DeepSpeedPlugin(
            zero_stage=cfg.deepspeed_stage, gradient_accumulation_steps=1,
            gradient_clipping=cfg.optim.grad_clip or None, zero3_save_16bit_model=cfg.deepspeed_stage == 3,
        )
        # no dataloader goes through `prepare`, so DeepSpeed is told the micro-batch size here
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size // (world * cfg.grad_accum)
        plugin.deepspeed_config["train_batch_size"] = cfg.batch_size // cfg.grad_accum
        kwargs["deepspeed_plugin"] = plugin
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(
            f"batch_size ({cfg.batch_size}) must be a multiple of processes x grad_accum ({world} x {cfg.grad_accum})"
        )
    return Accelerator(cpu=not use_gpu, mixed_precision=precision, **kwargs)


def load_data(cfg: TrainConfig) -> tuple[list[Example], list[Example], dict[str, list[Example]]]:
    """(train, valid, test sets by name, the primary one first). The testbed has two test sets,
    unseen_facts and seen_facts (spec section 5); a file or hub source has one."""
    d = cfg.data
    if d.source == "testbed":
        from llm.testbed import testbed_splits

        files = testbed_splits(Path(cfg.cache_dir) / "testbed")  # the bundled set, generated once
        train, valid = (load_jsonl(files[s], fmt="dolly") for s in ("train", "valid"))
        splits = {"unseen_facts": load_jsonl(files["test"]), "seen_facts": load_jsonl(files["test_seen"])}
        tests = {d.primary_test: splits.pop(d.primary_test), **splits}
    elif d.source == "files":
        train, valid, test = (load_jsonl(getattr(d, f"{s}_file"), fmt=d.format, skip_malformed=d.skip_malformed)
                              for s in ("train", "valid", "test"))
        tests = {Path(d.test_file).stem: test}
    else:
        pool = list(load_hub_dataset(d.hub_name, "train"))
        random.Random(cfg.seed).shuffle(pool)
        if len(pool) <= d.hub_valid_size + d.hub_test_size:
            raise ValueError(f"{d.hub_name} has {len(pool)} examples, too few for the valid/test sizes")
        test, valid, train = (pool[: d.hub_test_size], pool[d.hub_test_size : d.hub_test_size + d.hub_valid_size],
                              pool[d.hub_test_size + d.hub_valid_size :])
        tests = {d.hub_name.split("/")[-1]: test}
    limit = lambda xs, n: list(xs)[:n] if n else list(xs)  # noqa: E731
    valid = limit(valid, d.num_valid)
    if cfg.eval.select_by == "answer_accuracy" and not has_answers(valid):
        raise ValueError("eval.select_by=answer_accuracy needs validation examples that carry their answers "
                         "(an 'answers' field, as the testbed writes); use eval.select_by=rouge_l")
    return limit(train, d.num_train), valid, {name: limit(t, d.num_test) for name, t in tests.items()}


def _teacher_sft_folder(cfg: TrainConfig) -> Path:
    """``cache_dir/teacher_sft/<key>``: the folder of the fine-tune of ``cfg``'s teacher."""
    t = cfg.teacher_sft
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in ("num_test", "primary_test")}
    key = digest("teacher_sft", cfg.teacher, cfg.teacher_dtype, data, t.steps, t.lr, cfg.batch_size,
                 cfg.eval.select_by, cfg.eval.valid_seeds, cfg.eval.greedy, cfg.eval.max_new_tokens)
    return Path(cfg.cache_dir) / "teacher_sft" / key


def finetuned_teacher(cfg: TrainConfig, world: int) -> str:
    """The teacher the run distils from: ``cfg.teacher`` itself, or (``teacher_sft.steps > 0``) that
    teacher fine-tuned on the training split by an ordinary ``sft`` run (seed 0, whatever the run's
    seed: every seed distils the same teacher), built once under ``cache_dir/teacher_sft/<key>``
    (resumed if it was cut short) and reused; returns its folder."""
    t = cfg.teacher_sft
    if not t.steps:
        return cfg.teacher
    folder = _teacher_sft_folder(cfg)
    best = folder / "run" / "checkpoints" / "best"
    if world > 1 and not (folder / "done.json").is_file():
        raise ValueError(f"the fine-tuned teacher {folder} is not built yet; build it once with a single-process "
                         "run of the same config (it is then reused)")
    with cache_lock(folder):
        if not (folder / "done.json").is_file():
            resume = (folder / "run" / "checkpoints" / "latest").exists()
            if not resume:  # cut short before its first checkpoint: start again
                shutil.rmtree(folder / "run", ignore_errors=True)
            sub = dataclasses.replace(
                cfg, run_name="run", out_dir=str(folder), objective="sft", student_init="pretrained",
                student=cfg.teacher, teacher_sft=TeacherSFTConfig(), seed=0, max_steps=t.steps, stop_after=0,
                save_every=max(1, t.steps // 4),
                optim=dataclasses.replace(cfg.optim, lr=t.lr, warmup_steps=max(1, t.steps // 10), schedule="cosine"),
                online=dataclasses.replace(cfg.online, rounds=1), kd=dataclasses.replace(cfg.kd, teacher_topk=0),
                eval=dataclasses.replace(cfg.eval, every=0, before=False, teacher=False, test=False))
            print(f"[teacher_sft] fine-tuning {cfg.teacher} on the training split for {t.steps} steps into {folder}",
                  flush=True)
            started = time.perf_counter()
            state = train(sub, resume=resume)["state"]
            atomic_write_bytes(folder / "done.json", json.dumps(
                {"teacher": cfg.teacher, "steps": t.steps, "lr": t.lr, "valid_score": state["best_valid"],
                 "select_by": cfg.eval.select_by, "seconds": round(time.perf_counter() - started, 1)}).encode())
    return str(best.resolve())


def build_models(cfg: TrainConfig, device, teacher_path: str | None = None) -> tuple:
    """Teacher p (frozen) and student q_theta (fp32 master weights), with their tokenizers.

    ``teacher_path`` (default ``cfg.teacher``) is where the teacher's weights come from, e.g. the
    fine-tuned teacher of :func:`finetuned_teacher`; a pruned student is always cut from
    ``cfg.teacher`` itself, so it never inherits the fine-tune."""
    use_gpu = device.type == "cuda"
    dtype = DTYPES.get(cfg.teacher_dtype) or (torch.bfloat16 if use_gpu else torch.float32)
    remote = True if cfg.trust_remote_code else None
    teacher_path = teacher_path or cfg.teacher
    teacher = load_causal_lm(teacher_path, dtype=dtype, trust_remote_code=remote)
    teacher_tokenizer = load_tokenizer(teacher_path)
    if cfg.student_init == "pretrained":
        student = load_causal_lm(cfg.student, dtype=torch.float32, trust_remote_code=remote)
        tokenizer = load_tokenizer(cfg.student)
    elif cfg.student_init == "pruned":
        base = teacher if teacher_path == cfg.teacher else load_causal_lm(cfg.teacher, dtype=dtype,
                                                                          trust_remote_code=remote)
        student = pruned_student(base, list(cfg.student_layers)).float()
        tokenizer = teacher_tokenizer
    else:
        try:
            config = small_config_like(teacher.config, **cfg.student_config)
        except TypeError as err:
            raise ValueError(
                f"student_config {cfg.student_config} for student_init=fresh must give num_hidden_layers, "
                f"hidden_size, num_attention_heads (and optionally intermediate_size or other config fields): {err}"
            ) from None
        student = fresh_student(config, seed=cfg.seed)
        tokenizer = teacher_tokenizer
    teacher.eval().requires_grad_(False)
    return teacher.to(device), teacher_tokenizer, student, tokenizer


def tied_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of parameters that alias an earlier one (tied input/output embeddings)."""
    seen, tied = set(), []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.append(name)
        seen.add(id(param))
    return tied


def make_scheduler(optimizer, cfg: TrainConfig):
    o = cfg.optim

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, cfg.max_steps - o.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1 - progress
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fresh_run_dir(cfg: TrainConfig) -> Path:
    """`<out_dir>/<run_name>`, or `<run_name>-1`, `-2`, ... when that already holds a run."""
    base = Path(cfg.out_dir) / cfg.run_name
    candidate, k = base, 0
    while candidate.exists() and any(candidate.iterdir()):
        k += 1
        candidate = base.with_name(f"{base.name}-{k}")
    return candidate


def setup(cfg: TrainConfig, *, resume: bool = False):
    """Engine, data, teacher, student, optimiser, schedule and objective; restored from the latest
    checkpoint when resuming. Returns (run, objective, optimizer, scheduler, state, rng_to_restore)."""
    accelerator = make_accelerator(cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    from accelerate.utils import broadcast_object_list

    run_dir = Path(cfg.out_dir) / cfg.run_name if resume else fresh_run_dir(cfg)
    run_dir = Path(broadcast_object_list([str(run_dir)])[0])  # every process uses the main process's choice
    if run_dir.name != cfg.run_name:
        if accelerator.is_main_process:
            print(f"{Path(cfg.out_dir) / cfg.run_name} holds a run; this one is {run_dir} (resume it with "
                  f"--resume run_name={run_dir.name})", flush=True)
        cfg = dataclasses.replace(cfg, run_name=run_dir.name)
    if resume:
        folder, saved = read_checkpoint(run_dir)
        check_resumable(cfg, saved, accelerator.num_processes)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    train_data, valid_data, test_sets = load_data(cfg)
    teacher_path = finetuned_teacher(cfg, accelerator.num_processes)
    teacher, teacher_tokenizer, student, tokenizer = build_models(cfg, accelerator.device, teacher_path)
    # a token-level objective on two vocabularies is refused, naming both; a text-level one runs, and teacher
    # and student then score in their own tokens
    shared = not check_vocabularies(teacher_tokenizer, tokenizer, teacher, student, cfg.objective)
    tied = tied_parameter_names(student)
    policy_gradient = objective_class(cfg.objective).policy_gradient
    initial = None  # pi_ref of pg.reference=initial and the backbone of pbkd.rm_init=student: the student before any step
    if policy_gradient:
        initial = copy.deepcopy(student).eval().requires_grad_(False).to(accelerator.device)
    if resume:
        load_weights(student, folder, tied)
    replica = None
    if cfg.distributed in ("fsdp", "deepspeed") and accelerator.is_main_process:
        replica = copy.deepcopy(student).eval().requires_grad_(False).to(accelerator.device)

    o = cfg.optim
    make_optimizer = lambda params: torch.optim.AdamW(  # noqa: E731
        params, lr=cfg.pg.lr if policy_gradient else o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    if cfg.distributed == "deepspeed":  # DeepSpeed wraps model and optimiser together
        adamw = make_optimizer(student.parameters())
        student, optimizer = accelerator.prepare(student, adamw)
    else:  # FSDP must shard the model before the optimiser sees its parameters
        student = accelerator.prepare(student)
        adamw = make_optimizer(student.parameters())
        optimizer = accelerator.prepare(adamw)
    scheduler = make_scheduler(adamw, cfg)  # on the torch optimiser the engine steps; stepped once per step, by us

    # the run's caches (teacher responses, top-k, evaluations) key on the teacher it really uses
    run = Run(dataclasses.replace(cfg, teacher=teacher_path), accelerator, teacher, teacher_tokenizer, student,
              tokenizer, shared, train_data, valid_data, test_sets, run_dir, Path(cfg.cache_dir), tied, replica,
              initial)
    objective = build_objective(run)
    state, rng_to_restore = TrainState(), None
    if resume:
        state = TrainState(**saved["state"])
        trainer = torch.load(folder / f"trainer_state_rank{run.rank}.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(trainer["optimizer"])
        scheduler.load_state_dict(trainer["scheduler"])
        objective.load_state_dict(trainer["objective"])
        rng_to_restore = trainer["rng"]
    used = sorted({i for s in range(state.step, cfg.max_steps)
                   for i in global_batch_indices(s, cfg.batch_size, len(train_data), cfg.seed)})
    if objective.uses_teacher_responses:  # generated once and cached for every prompt the run will see
        objective.teacher_cache = teacher_responses(run, [train_data[i] for i in used])
    if cfg.kd.teacher_topk:  # the teacher's top-k on every fixed response the run will see, computed once
        examples = [train_data[i] for i in used]
        objective.teacher_topk = teacher_topk_cache(
            run, (objective.fixed_batch(part) for part in chunks(examples, run.micro_batch_size)))
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    return run, objective, optimizer, scheduler, state, rng_to_restore


# =============================================================================================
# The loop
# =============================================================================================


def accumulate_gradients(run: Run, objective: Objective, micros: list[dict], diagnostics: bool) -> tuple[dict, dict]:
    """Backward over the micro-batches of one step; afterwards `.grad` holds the gradient of the
    whole batch's loss (sum of per-unit losses / N, N over all micro-batches and processes).
    Returns the batch's metrics as this process's share (sum over processes = batch value), and
    the batch's counts (`totals`)."""
    acc, cfg = run.accelerator, run.cfg
    totals = {k: sum(m["counts"][k] for m in micros) for k in micros[0]["counts"]}
    totals = {k: acc.reduce(v.detach().clone().float(), reduction="sum") for k, v in totals.items()}
    scale = run.world  # engines average gradients over processes
    metrics = defaultdict(float)
    for i, micro in enumerate(micros):
        last = i == len(micros) - 1
        sync = contextlib.nullcontext() if last or cfg.distributed == "deepspeed" else acc.no_sync(run.student)
        if cfg.distributed == "deepspeed":  # DeepSpeed steps inside backward at the batch's last micro-batch
            acc.gradient_state._set_sync_gradients(last)
        with sync:
            loss, values = objective.loss(micro, totals, diagnostics)
            acc.backward(loss * scale)
        for k, v in values.items():
            metrics[k] += v
    acc.gradient_state._set_sync_gradients(True)
    return metrics, totals


def train_step(run: Run, objective: Objective, optimizer, scheduler, step: int, diagnostics: bool) -> tuple[dict, object, dict]:
    """One optimiser step on the batch of `step`: micro-batches, gradients, clipping, the
    optimiser and the schedule. Returns (this process's share of the metrics, gradient norm, the
    batch's loss-unit counts summed over processes, e.g. its response tokens)."""
    examples = [run.train_data[i] for i in local_batch_indices(run, step)]
    micros = objective.make_batch(examples, step)
    optimizer.zero_grad(set_to_none=True)
    metrics, totals = accumulate_gradients(run, objective, micros, diagnostics)
    clip = run.cfg.optim.grad_clip
    grad_norm = run.accelerator.clip_grad_norm_(run.student.parameters(), clip if clip > 0 else float("inf"))
    optimizer.step()
    scheduler.step()
    return metrics, grad_norm, {k: float(v) for k, v in totals.items()}


def train(cfg: TrainConfig, *, resume: bool = False) -> dict:
    """Run one distillation from start (or from the latest checkpoint) to the final test table.

    Returns {"state": TrainState as dict, "results": the table's numbers (when the run finished),
    "run_dir": path}. torch's CPU thread count (`num_threads`) is restored on return."""
    threads = torch.get_num_threads()
    try:
        return loop(*setup(cfg, resume=resume), resume=resume)
    finally:
        torch.set_num_threads(threads)


def loop(run: Run, objective: Objective, optimizer, scheduler, state: TrainState, rng_to_restore, *,
         resume: bool) -> dict:
    """The training loop of a set-up run (:func:`setup`), to max_steps (or stop_after) and the test table."""
    cfg = run.cfg
    accelerator, student, run_dir = run.accelerator, run.student, run.run_dir
    main = run.accelerator.is_main_process
    log = MetricsLog(run_dir, main, state.step if resume else None)
    before_path = run_dir / "eval_before.json"
    if cfg.eval.before and main and not before_path.is_file():
        before = test_metrics(cfg, run.test_sets, run.replica or accelerator.unwrap_model(student), run.tokenizer)
        atomic_write_bytes(before_path, json.dumps(before, indent=2).encode())
    accelerator.wait_for_everyone()
    if rng_to_restore is not None:
        set_rng_state(rng_to_restore)  # last: everything above may have drawn random numbers

    # ---- the loop ----------------------------------------------------------------------------
    steps_per_round = math.ceil(cfg.max_steps / cfg.online.rounds)
    stop_at = min(cfg.max_steps, state.step + cfg.stop_after) if cfg.stop_after else cfg.max_steps
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc=f"{cfg.objective}", disable=not main, dynamic_ncols=True)
    student.train()
    started = time.perf_counter()
    while state.step < stop_at:
        step = state.step
        if step % steps_per_round == 0:  # a round begins: the objective refreshes its samples
            r = step // steps_per_round
            objective.start_round(r, range(step, min(step + steps_per_round, cfg.max_steps)))
        diagnostics = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps
        step_metrics, grad_norm, _ = train_step(run, objective, optimizer, scheduler, step, diagnostics)
        state.step += 1
        state.examples_seen += cfg.batch_size
        bar.update(1)

        # ---- logging: this step's batch values (divergences, DPKD diagnostics), summed over processes
        if diagnostics:
            keys = sorted(step_metrics)
            values = accelerator.reduce(torch.tensor([step_metrics[k] for k in keys], device=run.device), "sum")
            summary = dict(zip(keys, values.tolist()))
            summary |= {"grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                        "lr": scheduler.get_last_lr()[0], "examples_seen": state.examples_seen,
                        "seconds": round(time.perf_counter() - started, 2)}
            log.write(state.step, "train", summary)
            bar.set_postfix({k: f"{summary[k]:.3g}" for k in ("loss", "fkl", "margin") if k in summary})

        # ---- validation, checkpoint selection, checkpoints --------------------------------------
        if (cfg.eval.every and state.step % cfg.eval.every == 0) or state.step == cfg.max_steps:
            validation_started = time.perf_counter()
            scores = validate(run)
            score = scores[cfg.eval.select_by]
            state.valid_history.append([state.step, score])
            log.write(state.step, "valid", {**scores, "seconds": round(time.perf_counter() - validation_started, 2)})
            if score > state.best_valid:
                state.best_valid, state.best_step = score, state.step
                save_best(run, state)
        if (cfg.save_every and state.step % cfg.save_every == 0) or state.step in (stop_at, cfg.max_steps):
            save_checkpoint(run, state, optimizer, scheduler, objective)
    bar.close()

    result = {"state": dataclasses.asdict(state), "run_dir": str(run_dir), "results": None}
    if state.step == cfg.max_steps:
        result["results"] = final_evaluation(run, state)
    log.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


# =============================================================================================
# Evaluation (spec section 5): the test table at the end
# =============================================================================================


def test_metrics(cfg: TrainConfig, test_sets: dict, model, tokenizer) -> dict:
    """{test-set name: its section 5 metrics} of ``model``."""
    return {name: evaluate_model(model, tokenizer, examples, seeds=cfg.eval.test_seeds, greedy=cfg.eval.greedy,
                                 max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                                 max_prompt_tokens=cfg.data.max_prompt_tokens)
            for name, examples in test_sets.items()}


def _cached_teacher_metrics(cfg: TrainConfig, test_sets: dict, load_teacher) -> dict:
    """The test metrics of ``cfg.teacher``, cached per teacher, test sets and protocol;
    ``load_teacher()`` gives (model, tokenizer) when they must be computed."""
    key = digest(cfg.teacher, {name: [(ex.prompt, ex.references, ex.answers) for ex in examples]
                               for name, examples in test_sets.items()},
                 cfg.eval.test_seeds, cfg.eval.greedy, cfg.eval.max_new_tokens, cfg.data.max_prompt_tokens)
    path = Path(cfg.cache_dir) / "teacher_eval" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    metrics = test_metrics(cfg, test_sets, *load_teacher())
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(metrics, indent=2).encode())
    return metrics


def teacher_test_metrics(run: Run) -> dict:
    """The run's teacher on its test sets (cached; main process only)."""
    return _cached_teacher_metrics(run.cfg, run.test_sets, lambda: (run.teacher, run.teacher_tokenizer))


def teacher_sft_record(cfg: TrainConfig) -> dict | None:
    """What the fine-tune of ``cfg``'s teacher recorded when it finished (steps, lr, validation
    score, wall seconds), or None when there is none (teacher_sft.steps = 0, or not built yet)."""
    if not cfg.teacher_sft.steps:
        return None
    done = _teacher_sft_folder(cfg) / "done.json"
    return json.loads(done.read_text()) if done.is_file() else None


def evaluate_teacher(cfg: TrainConfig) -> dict:
    """{test set: metrics} of the teacher a run of ``cfg`` distils from (fine-tuned first when
    teacher_sft.steps > 0), on the CPU, through the same cache as a run's teacher row."""
    _, _, test_sets = load_data(cfg)
    path = finetuned_teacher(cfg, 1)
    dtype = DTYPES.get(cfg.teacher_dtype) or torch.float32

    def load():
        model = load_causal_lm(path, dtype=dtype, trust_remote_code=True if cfg.trust_remote_code else None)
        return model.eval().requires_grad_(False), load_tokenizer(path)

    return _cached_teacher_metrics(dataclasses.replace(cfg, teacher=path), test_sets, load)


def final_evaluation(run: Run, state: TrainState) -> dict | None:
    """Test table: student before training, student after (best validation checkpoint), teacher;
    one column group per test set. None when eval.test is off."""
    cfg, acc = run.cfg, run.accelerator
    results = None
    if acc.is_main_process and cfg.eval.test:
        best = run.run_dir / "checkpoints" / "best"
        after_model = load_causal_lm(best.resolve()).to(run.device)
        results = {}
        before_path = run.run_dir / "eval_before.json"
        if before_path.is_file():
            results["student (before)"] = json.loads(before_path.read_text())
        results[f"student (after, {cfg.objective}, step {state.best_step})"] = test_metrics(
            cfg, run.test_sets, after_model, run.tokenizer)
        if cfg.eval.teacher:
            results["teacher"] = teacher_test_metrics(run)
        json_path, md_path = write_results(results, run.run_dir)
        print("\n" + results_table(results), flush=True)
        print(f"wrote {json_path} and {md_path}; best student (validation {cfg.eval.select_by} "
              f"{state.best_valid:.1f}): {best.resolve()}", flush=True)
    acc.wait_for_everyone()
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(
        prog="python llm/train.py",
        description="Distil a teacher LM into a student (spec llm.md). Overrides are key=value, dotted for "
                    "sections (kd.jsd_beta=0.9). Run it inside the project's venv (make setup; .venv/bin/python).",
        epilog=f"objectives: {', '.join(OBJECTIVES)}\njudges (pbkd.judge): {', '.join(JUDGE_NAMES)}\n"
               f"config sections: {', '.join(section_names())}\nevery key with its default and help: --help-config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: the CPU testbed)")
    parser.add_argument("--resume", action="store_true",
                        help="continue <out_dir>/<run_name> from its latest checkpoint")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its default and help")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. objective=rkl kd.jsd_beta=0.9")
    args = parser.parse_args(argv)
    if args.help_config:
        print(help_text())
        return {}
    with refusing_bad_input():  # bad config, data or model paths: one line, exit 2; training errors keep their traceback
        cfg = load_config(args.config, args.overrides)
        prepared = setup(cfg, resume=args.resume)
    return loop(*prepared, resume=args.resume)


if __name__ == "__main__":
    main()

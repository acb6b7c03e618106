"""Distil a teacher language model into a student (spec llm.md sections 2, 5 and 6).

    python llm/train.py                                   # the offline CPU testbed (llm/configs/testbed.yaml)
    python llm/train.py --config llm/configs/gpt2_xl_to_gpt2.yaml objective=rkl kd.on_policy_fraction=0.5
    python llm/train.py --config FILE --resume run_name=NAME   # continue an interrupted run
    torchrun --nproc_per_node=8 llm/train.py --config FILE distributed=fsdp
    python llm/train.py --help-config                     # every key, its default and help text

The loop in :func:`train` reads like the algorithm box:

    for t = 0 .. max_steps-1:
        if a round starts at t:  objective.start_round(r)   # refresh generated data (online.rounds)
        x_1..x_B   <- the next B prompts of the shuffled training set (this process's share)
        y_1..y_B   <- responses: gold, cached teacher samples y ~ p, or student samples y ~ q_theta
        N          <- the normaliser of the whole batch, summed over micro-batches and processes
                      (response tokens for token losses, pairs for DPKD)
        for each micro-batch:  loss = sum of per-unit losses / N;  backward
        clip; AdamW step; learning-rate schedule step
        log (true divergences, DPKD diagnostics); validate by Rouge-L and keep the best; checkpoint

Gradient accumulation. Every objective returns the *sum* of its per-unit losses over a
micro-batch divided by the number of units N in the *whole* batch (all micro-batches, all
processes), so the accumulated gradient is the gradient of the full-batch mean: `grad_accum=2`
with micro-batches of 4 gives the update of one batch of 8. (The mean of the micro-batch means
would weight tokens of short micro-batches more.) Data-parallel engines average gradients over
processes, so the loss is multiplied by the number of processes before `backward`.

Objectives are registered by name in `OBJECTIVE_REGISTRY` (the names in `llm.config.OBJECTIVES`);
each is a subclass of :class:`Objective`, which owns what the objective generates, how it
builds a batch, its loss, and the state it must carry across a resume.
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
import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from llm import losses
from llm.config import OBJECTIVES, TOKEN_LEVEL_OBJECTIVES, TrainConfig, help_text, load_config, to_dict
from llm.data import Example, encode_sft_batch, load_hub_dataset, load_jsonl
from llm.evaluate import evaluate_model, generate, results_table, write_results
from llm.models import (
    check_vocabularies,
    fresh_student,
    load_causal_lm,
    load_tokenizer,
    pruned_student,
    small_config_like,
)

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "testbed.yaml"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# =============================================================================================
# What one run shares: config, engine, models, data, folders
# =============================================================================================


@dataclass
class TrainState:
    """Counters saved with every checkpoint (the data position is `examples_seen`)."""

    step: int = 0  # optimiser steps done
    examples_seen: int = 0  # training sequences consumed, summed over processes
    best_valid_rouge_l: float = -math.inf
    best_step: int = -1
    valid_history: list = field(default_factory=list)  # (step, validation Rouge-L)


@dataclass
class Run:
    """What the loop, the objectives, evaluation and checkpoints share within one run."""

    cfg: TrainConfig
    accelerator: object
    teacher: torch.nn.Module
    teacher_tokenizer: object
    student: torch.nn.Module  # the engine-wrapped student after `prepare`
    tokenizer: object  # the student's tokenizer: training batches and evaluation
    shared_vocabulary: bool
    train_data: list
    valid_data: list
    test_data: list
    run_dir: Path
    cache_dir: Path
    tied_parameter_names: list  # parameters that alias another (tied embeddings), not saved twice
    replica: torch.nn.Module | None = None  # full-weight copy for sampling when the engine shards weights

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def micro_batch_size(self) -> int:
        return self.cfg.batch_size // (self.world * self.cfg.grad_accum)

    @property
    def device(self):
        return self.accelerator.device

    def autocast(self):
        return self.accelerator.autocast()


# =============================================================================================
# Data order: a pure function of (seed, step), so the data position is restored exactly
# =============================================================================================


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def global_batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Training-set indices of optimiser step `step`: positions step*B .. step*B+B-1 of the
    concatenation of seeded epoch permutations."""
    out, cached = [], {}
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n)
        if epoch not in cached:
            cached[epoch] = epoch_permutation(n, seed, epoch)
        out.append(cached[epoch][offset])
    return out


def local_batch_indices(run: Run, step: int) -> list[int]:
    """This process's consecutive share of the global batch of step `step`."""
    indices = global_batch_indices(step, run.cfg.batch_size, len(run.train_data), run.cfg.seed)
    share = run.cfg.batch_size // run.world
    return indices[run.rank * share : (run.rank + 1) * share]


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# =============================================================================================
# Sequences and log-probabilities
# =============================================================================================


def encode(run: Run, examples: list[Example], responses: list[str] | None = None, *, tokenizer=None) -> dict:
    """Right-padded prompt+response batch on the device (llm.data.encode_sft_batch), narrowed to
    the response: `positions` (B, K) are each row's K = longest-response positions, and `labels`
    / `response_mask` are taken at those positions, so logits are computed only where a loss is
    (the prompt holds most of the tokens; the LM head over 50k words is the costliest layer)."""
    batch = encode_sft_batch(
        tokenizer or run.tokenizer,
        examples,
        run.cfg.data.max_prompt_tokens,
        run.cfg.data.max_length,
        responses=responses,
    )
    mask = batch["response_mask"]
    T, K = mask.shape[1], int(mask.sum(1).max())
    start = mask.argmax(1)  # first response position of each row
    # the last column never carries a loss (labels[:, t] = input_ids[:, t+1]), so clamping there is harmless
    positions = (start[:, None] + torch.arange(K)[None, :]).clamp(max=T - 1)
    batch["labels"] = batch["labels"].gather(1, positions)
    batch["response_mask"] = mask.gather(1, positions)
    batch["positions"] = positions
    return {k: v.to(run.device) for k, v in batch.items()}


def logits_of(model, batch: dict, run: Run) -> torch.Tensor:
    """Logits (B, K, V) at `batch["positions"]`, aligned with `labels` and `response_mask`."""
    with run.autocast():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     logits_to_keep=batch["positions"]).logits


def teacher_logits(run: Run, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return logits_of(run.teacher, batch, run)


# =============================================================================================
# Generation: cached teacher responses, student samples (sampling never touches the training RNG)
# =============================================================================================


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def generation_model(run: Run):
    """A module holding the student's current full weights, for sampling and evaluation.

    With DDP (or one process) that is the unwrapped student itself. FSDP and DeepSpeed shard the
    weights, so the main process gathers them into a plain replica (`run.replica`); only the
    main process may then generate (see `sample_student_responses`)."""
    if run.cfg.distributed in ("none", "ddp"):
        return run.accelerator.unwrap_model(run.student)
    state = run.accelerator.get_state_dict(run.student)  # collective: every process must call it
    if run.accelerator.is_main_process:
        run.replica.load_state_dict(state, strict=False)
        return run.replica
    return None


def sample_student_responses(run: Run, examples_per_process: list[Example], seed: int) -> list[str]:
    """Responses y ~ q_theta(.|x) of the current student to this process's prompts.

    Each process samples its own prompts when it holds the full weights (DDP); under FSDP and
    DeepSpeed the main process samples everyone's prompts and hands each process its share."""
    cfg, acc = run.cfg, run.accelerator
    model = generation_model(run)
    prompts = [ex.prompt for ex in examples_per_process]
    if cfg.distributed in ("none", "ddp"):
        return generate(
            model, run.tokenizer, prompts, seed=seed * 1009 + run.rank,
            max_new_tokens=cfg.generation.max_new_tokens, batch_size=cfg.generation.batch_size,
            max_prompt_tokens=cfg.data.max_prompt_tokens,
        )
    from accelerate.utils import broadcast_object_list, gather_object

    everyone = gather_object([prompts])  # one list per process
    answers = [None] * run.world
    if acc.is_main_process:
        answers = [
            generate(model, run.tokenizer, p, seed=seed * 1009 + r, max_new_tokens=cfg.generation.max_new_tokens,
                     batch_size=cfg.generation.batch_size, max_prompt_tokens=cfg.data.max_prompt_tokens)
            for r, p in enumerate(everyone)
        ]
    broadcast_object_list(answers)
    return answers[run.rank]


def teacher_responses(run: Run, examples: list[Example]) -> dict[str, str]:
    """Teacher samples y ~ p(.|x) for `examples`, generated once and cached on disk.

    The cache (JSONL, one prompt a line, appended as it grows) is keyed by the teacher, the
    decoding settings and, when the teacher samples, the seed (greedy responses do not depend on
    it, so runs of every seed share them); a later run, or a resumed one, generates only prompts
    not seen before. The main process generates; the others wait and read the file."""
    cfg, acc = run.cfg, run.accelerator
    greedy = cfg.generation.teacher_greedy
    key = _digest(cfg.teacher, cfg.generation.max_new_tokens, greedy, cfg.data.max_prompt_tokens,
                  None if greedy else cfg.seed)
    path = run.cache_dir / "teacher_responses" / f"{key}.jsonl"

    def read() -> dict[str, str]:
        if not path.is_file():
            return {}
        out = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a torn last line of an interrupted writer
                    continue
                out[record["prompt"]] = record["response"]
        return out

    if acc.is_main_process:
        have = read()
        missing = sorted({ex.prompt for ex in examples} - set(have))
        if missing:
            path.parent.mkdir(parents=True, exist_ok=True)
            progress = tqdm(total=len(missing), desc="teacher responses (cached once)", leave=False)
            size = cfg.generation.batch_size * 4
            for block in chunks(missing, size):
                answers = generate(
                    run.teacher, run.teacher_tokenizer, block, seed=cfg.seed + len(have),
                    greedy=cfg.generation.teacher_greedy, max_new_tokens=cfg.generation.max_new_tokens,
                    batch_size=cfg.generation.batch_size, max_prompt_tokens=cfg.data.max_prompt_tokens,
                )
                with open(path, "a", encoding="utf-8") as handle:
                    for prompt, answer in zip(block, answers):
                        handle.write(json.dumps({"prompt": prompt, "response": answer}) + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                have.update(zip(block, answers))
                progress.update(len(block))
            progress.close()
    acc.wait_for_everyone()
    return read()


# =============================================================================================
# Objectives (spec llm.md section 2)
# =============================================================================================


class Objective:
    """One training objective.

    `make_batch` turns this process's examples of one step into micro-batches, each with the
    `counts` of its loss units (e.g. response tokens); `loss` returns the micro-batch's summed
    loss divided by `totals`, the counts of the whole batch over all micro-batches and processes,
    plus diagnostics in the same normalisation (so they add up to batch means).
    `start_round` runs when a round of `online.rounds` begins; `state_dict`/`load_state_dict`
    carry what the objective generated across a resume."""

    uses_teacher_responses = False

    def __init__(self, run: Run):
        self.run = run
        self.cfg = run.cfg

    def prepare_teacher_responses(self, examples: list[Example]) -> None:
        """Generate (once, cached) the teacher samples the run will train on, if it uses any."""
        self.teacher_cache = teacher_responses(self.run, examples) if self.uses_teacher_responses else {}

    def start_round(self, round_index: int, steps: range) -> None:
        """Nothing to refresh for objectives that generate nothing from the student."""

    def make_batch(self, examples: list[Example], step: int) -> list[dict]:
        raise NotImplementedError

    def loss(self, micro: dict, totals: dict, diagnostics: bool) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def weighted(values: dict, weight: float) -> dict:
    """Per-micro-batch means scaled by the micro-batch's share of the batch (so they add up to batch means)."""
    return {k: float(v) * weight for k, v in values.items()}


class SFT(Objective):
    """`sft`: cross-entropy on gold responses; `seqkd`: cross-entropy on cached teacher samples."""

    def __init__(self, run: Run, *, on_teacher_samples: bool):
        super().__init__(run)
        self.uses_teacher_responses = on_teacher_samples

    def make_batch(self, examples, step):
        micros = []
        for part in chunks(examples, self.run.micro_batch_size):
            responses = [self.teacher_cache[ex.prompt] for ex in part] if self.uses_teacher_responses else None
            batch = encode(self.run, part, responses)
            micros.append({"batch": batch, "counts": {"tokens": batch["response_mask"].sum()}})
        return micros

    def loss(self, micro, totals, diagnostics):
        batch = micro["batch"]
        weight = float(micro["counts"]["tokens"] / totals["tokens"])
        s_logits = logits_of(self.run.student, batch, self.run)
        loss = losses.sft_loss(s_logits, batch["labels"], batch["response_mask"]) * weight
        metrics = {"loss": float(loss.detach())}
        if diagnostics and self.run.shared_vocabulary:  # the true divergences, for comparison only
            t_logits = teacher_logits(self.run, batch)
            metrics |= weighted(losses.divergences(s_logits, t_logits, batch["response_mask"]), weight)
        return loss, metrics


class TokenKD(Objective):
    """`fkl`, `rkl`, `jsd`, `skl`, `srkl`, `akl`: per-token distribution matching (masked mean over
    response tokens) on a prefix source: with probability `kd.on_policy_fraction` (GKD's lambda)
    a batch's responses are sampled from the current student, otherwise they are the gold
    responses (`kd.prefix=gold`) or cached teacher samples (`kd.prefix=teacher`)."""

    def __init__(self, run: Run, name: str):
        super().__init__(run)
        self.name = name
        self.divergence = losses.TOKEN_OBJECTIVES[name]
        kd = run.cfg.kd
        self.kwargs = {"jsd": {"beta": kd.jsd_beta}, "skl": {"alpha": kd.skl_alpha},
                       "srkl": {"alpha": kd.srkl_alpha}, "akl": {"mu": kd.akl_mu}}.get(name, {})
        self.uses_teacher_responses = kd.prefix == "teacher"

    def on_policy(self, step: int) -> bool:
        """GKD's lambda: a seeded coin per step, the same on every process and after a resume."""
        return random.Random(self.cfg.seed * 1_000_003 + step).random() < self.cfg.kd.on_policy_fraction

    def make_batch(self, examples, step):
        on_policy = self.on_policy(step)
        if on_policy:
            responses = sample_student_responses(self.run, examples, seed=self.cfg.seed * 7919 + step)
        elif self.uses_teacher_responses:
            responses = [self.teacher_cache[ex.prompt] for ex in examples]
        else:
            responses = None
        micros = []
        size = self.run.micro_batch_size
        for i, part in enumerate(chunks(examples, size)):
            batch = encode(self.run, part, None if responses is None else responses[i * size : (i + 1) * size])
            micros.append({"batch": batch, "on_policy": on_policy, "counts": {"tokens": batch["response_mask"].sum()}})
        return micros

    def loss(self, micro, totals, diagnostics):
        batch = micro["batch"]
        mask = batch["response_mask"]
        weight = float(micro["counts"]["tokens"] / totals["tokens"])
        t_logits = teacher_logits(self.run, batch)
        s_logits = logits_of(self.run.student, batch, self.run)
        loss = self.divergence(s_logits, t_logits, mask, **self.kwargs) * weight
        metrics = {"loss": float(loss.detach()), "on_policy": float(micro["on_policy"]) * weight}
        if diagnostics:
            metrics |= weighted(losses.divergences(s_logits, t_logits, mask), weight)
        return loss, metrics


class DPKD(Objective):
    """`dpkd`: the teacher response y_T is preferred to the student response y_S, with the
    teacher as the reference model:
        L = -log sigma( beta/|y_T| log q(y_T|x)/p(y_T|x) - beta/|y_S| log q(y_S|x)/p(y_S|x) )
            + lambda_lm * L_LM(gold instruction data)
    (`dpkd.variant` ipo/simpo/cpo change the first term; llm.losses.dpkd_loss).

    y_T are cached teacher samples. y_S are sampled from the current student at the start of
    each round for the round's prompts (`online.rounds`: 1 = offline, max_steps = every step)."""

    uses_teacher_responses = True

    def __init__(self, run: Run):
        super().__init__(run)
        self.student_samples: dict[int, list[str]] = {}  # step -> responses of this process's examples

    def start_round(self, round_index, steps):
        """Sample y_S ~ q_theta for every prompt of the round, with the student as it is now."""
        examples = [[self.run.train_data[i] for i in local_batch_indices(self.run, s)] for s in steps]
        flat = [ex for block in examples for ex in block]
        answers = sample_student_responses(self.run, flat, seed=self.cfg.seed * 7919 + 104_729 * (round_index + 1))
        share = self.cfg.batch_size // self.run.world
        self.student_samples = {s: answers[i * share : (i + 1) * share] for i, s in enumerate(steps)}

    def state_dict(self):
        return {"student_samples": {str(k): v for k, v in self.student_samples.items()}}

    def load_state_dict(self, state):
        self.student_samples = {int(k): v for k, v in state.get("student_samples", {}).items()}

    def make_batch(self, examples, step):
        y_S_all = self.student_samples[step]
        micros, size = [], self.run.micro_batch_size
        for i, part in enumerate(chunks(examples, size)):
            y_T = [self.teacher_cache[ex.prompt] for ex in part]
            y_S = y_S_all[i * size : (i + 1) * size]
            micro = {"T": encode(self.run, part, y_T), "S": encode(self.run, part, y_S), "gold": encode(self.run, part)}
            if not self.run.shared_vocabulary:  # the teacher scores the same texts in its own tokens
                micro["T_teacher"] = encode(self.run, part, y_T, tokenizer=self.run.teacher_tokenizer)
                micro["S_teacher"] = encode(self.run, part, y_S, tokenizer=self.run.teacher_tokenizer)
            micro["counts"] = {
                "pairs": torch.tensor(len(part), device=self.run.device),
                "gold_tokens": micro["gold"]["response_mask"].sum(),
                "teacher_tokens": micro["T"]["response_mask"].sum(),
            }
            micros.append(micro)
        return micros

    def sequence_log_probs(self, model, batch, grad: bool) -> torch.Tensor:
        with contextlib.nullcontext() if grad else torch.no_grad():
            logits = logits_of(model, batch, self.run)
            return losses.sequence_log_prob(logits, batch["labels"], batch["response_mask"])

    def loss(self, micro, totals, diagnostics):
        run, d = self.run, self.cfg.dpkd
        T, S = micro["T"], micro["S"]
        student_logp_T = self.sequence_log_probs(run.student, T, grad=True)
        student_logp_S = self.sequence_log_probs(run.student, S, grad=True)
        uses_reference = d.variant in ("dpo", "ipo")
        teacher_logp_T = teacher_logp_S = None  # simpo and cpo need no reference model
        if uses_reference:
            teacher_logp_T = self.sequence_log_probs(run.teacher, micro.get("T_teacher", T), grad=False)
            teacher_logp_S = self.sequence_log_probs(run.teacher, micro.get("S_teacher", S), grad=False)
        len_T, len_S = T["response_mask"].sum(1), S["response_mask"].sum(1)
        out = losses.dpkd_loss(
            student_logp_T, teacher_logp_T, len_T, student_logp_S, teacher_logp_S, len_S,
            beta=d.beta, variant=d.variant, length_normalize=d.length_normalize, gamma=d.gamma,
            cpo_alpha=0.0,  # cpo's NLL term is added below, normalised over the whole batch
        )
        w = float(micro["counts"]["pairs"] / totals["pairs"])
        loss = out.loss * w
        metrics = {"dpkd_loss": float(loss.detach())}
        if d.variant == "cpo" and d.cpo_alpha > 0:
            # cpo's behaviour-cloning term -sum log q(y_T|x) / sum |y_T| over the whole batch
            nll = -student_logp_T.sum() / totals["teacher_tokens"]
            loss = loss + d.cpo_alpha * nll
            metrics["cpo_nll"] = float(nll.detach())
        if d.lambda_lm > 0:
            gold = micro["gold"]
            lm = losses.sft_loss(logits_of(run.student, gold, run), gold["labels"], gold["response_mask"])
            lm = lm * float(micro["counts"]["gold_tokens"] / totals["gold_tokens"])
            loss = loss + d.lambda_lm * lm
            metrics["lm_loss"] = float(lm.detach())
        metrics["loss"] = float(loss.detach())
        metrics |= {
            "reward_teacher": float(out.reward_teacher.mean()) * w,
            "reward_student": float(out.reward_student.mean()) * w,
            "margin": float(out.margin.mean()) * w,
            "preference_accuracy": float((out.margin > 0).float().mean()) * w,
            "student_logp_own": float(out.student_logp_own.mean()) * w,
            "student_logp_teacher_response": float(student_logp_T.detach().mean()) * w,
        }
        return loss, metrics


def _preference_objective(name: str):
    """`pbkd` / `mm_pbkd` live in llm/pbkd.py, which builds on this module (imported when used)."""
    from llm.pbkd import OBJECTIVES as PREFERENCE_OBJECTIVES

    return PREFERENCE_OBJECTIVES[name]


OBJECTIVE_REGISTRY = {
    "sft": lambda run: SFT(run, on_teacher_samples=False),
    "seqkd": lambda run: SFT(run, on_teacher_samples=True),
    **{name: (lambda run, name=name: TokenKD(run, name)) for name in TOKEN_LEVEL_OBJECTIVES},
    "dpkd": DPKD,
    **{name: (lambda run, name=name: _preference_objective(name)(run)) for name in ("pbkd", "mm_pbkd")},
}
if set(OBJECTIVE_REGISTRY) != set(OBJECTIVES):  # the config's list and the implementations agree
    raise ImportError(f"llm.config.OBJECTIVES {OBJECTIVES} and OBJECTIVE_REGISTRY {sorted(OBJECTIVE_REGISTRY)} differ")


# =============================================================================================
# Checkpoints: a folder per step, written under a temporary name, renamed, then the `latest`
# link is swapped atomically. Weights as safetensors; per-process optimiser/scheduler/RNG state
# with torch.save (loaded with weights_only=True); counters as JSON.
# =============================================================================================


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_link(link: Path, target_name: str) -> None:
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target_name)
    os.replace(tmp, link)


def rng_state() -> dict:
    version, keys, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": version, "keys": list(keys), "gauss": gauss},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["keys"]), p["gauss"]))


def save_model_folder(run: Run, folder: Path, weights: dict | None, metadata: dict) -> None:
    """An HF-loadable folder: model.safetensors (atomic), config, generation config, tokenizer."""
    if not run.accelerator.is_main_process:
        return
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in weights.items() if k not in run.tied_parameter_names}
    tmp = folder / ".model.safetensors.tmp"
    save_file(weights, str(tmp), metadata={"format": "pt", **{k: str(v) for k, v in metadata.items()}})
    os.replace(tmp, folder / "model.safetensors")
    unwrapped = run.accelerator.unwrap_model(run.student)
    _atomic_write_bytes(folder / "config.json", unwrapped.config.to_json_string().encode())
    if getattr(unwrapped, "generation_config", None) is not None:
        _atomic_write_bytes(folder / "generation_config.json", unwrapped.generation_config.to_json_string().encode())
    run.tokenizer.save_pretrained(str(folder))


def save_checkpoint(run: Run, state: TrainState, optimizer, scheduler, objective: Objective) -> Path:
    """Resumable checkpoint `checkpoints/step_XXXXXXXX`; the `latest` link moves only once it is complete."""
    acc, root = run.accelerator, run.run_dir / "checkpoints"
    name = f"step_{state.step:08d}"
    tmp = root / f".tmp_{name}"
    if acc.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    weights = acc.get_state_dict(run.student)  # collective under FSDP/DeepSpeed
    save_model_folder(run, tmp, weights, {"step": state.step})
    trainer = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "objective": objective.state_dict(),
    }
    path = tmp / f"trainer_state_rank{run.rank}.pt"
    torch.save(trainer, path.with_name(path.name + ".tmp"))
    os.replace(path.with_name(path.name + ".tmp"), path)
    acc.wait_for_everyone()
    if acc.is_main_process:
        info = {"state": dataclasses.asdict(state), "world_size": run.world, "config": to_dict(run.cfg)}
        _atomic_write_bytes(tmp / "trainer_state.json", json.dumps(info, indent=2).encode())
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_link(root / "latest", name)
        kept = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in kept[: max(0, len(kept) - run.cfg.keep_checkpoints)]:
            if old.name != name:
                shutil.rmtree(old)
    acc.wait_for_everyone()
    return root / name


def save_best(run: Run, state: TrainState) -> None:
    """The best-so-far student by validation Rouge-L: `checkpoints/best` (a link swapped atomically)."""
    acc, root = run.accelerator, run.run_dir / "checkpoints"
    name = f"best_step_{state.step:08d}"
    weights = acc.get_state_dict(run.student)
    if acc.is_main_process:
        tmp = root / f".tmp_{name}"
        if tmp.exists():
            shutil.rmtree(tmp)
        save_model_folder(run, tmp, weights, {"step": state.step, "valid_rouge_l": state.best_valid_rouge_l})
        _atomic_write_bytes(tmp / "best.json", json.dumps(
            {"step": state.step, "valid_rouge_l": state.best_valid_rouge_l}).encode())
        os.replace(tmp, root / name)
        _atomic_link(root / "best", name)
        for old in root.glob("best_step_*"):
            if old.name != name:
                shutil.rmtree(old)
    acc.wait_for_everyone()


def read_checkpoint(run_dir: Path) -> tuple[Path, dict]:
    link = run_dir / "checkpoints" / "latest"
    if not link.exists():
        raise ValueError(
            f"--resume: {run_dir} has no complete checkpoint (no checkpoints/latest); start without --resume")
    folder = link.resolve()
    return folder, json.loads((folder / "trainer_state.json").read_text())


# Keys a resumed run may change: they do not alter the training trajectory.
RESUME_MAY_CHANGE = ("out_dir", "stop_after", "log_every", "save_every", "keep_checkpoints", "num_threads",
                     "eval.before", "eval.teacher", "eval.test_seeds", "eval.batch_size")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "student_config" else {prefix + k: v}
    return out


def check_resumable(cfg: TrainConfig, saved: dict, world: int) -> None:
    """A resumed run must continue the same trajectory: same processes, same data position, same settings."""
    if saved["world_size"] != world:
        raise ValueError(f"the checkpoint was written by {saved['world_size']} processes; resume with as many")
    if saved["state"]["examples_seen"] != saved["state"]["step"] * cfg.batch_size:
        raise ValueError(
            "the checkpoint's data position does not match batch_size; resume with the original batch_size")
    before, now = _flatten(saved["config"]), _flatten(to_dict(cfg))
    changed = sorted(k for k in set(before) | set(now)
                     if before.get(k) != now.get(k) and k not in RESUME_MAY_CHANGE)
    if changed:
        listed = ", ".join(f"{k} ({before.get(k)!r} -> {now.get(k)!r})" for k in changed)
        raise ValueError(
            f"--resume with settings that change the run: {listed}; "
            f"only {', '.join(RESUME_MAY_CHANGE)} may differ. Start a new run (without --resume) to change the others."
        )


def load_weights(student: torch.nn.Module, folder: Path, tied: list[str]) -> None:
    weights = load_file(str(folder / "model.safetensors"))
    missing, unexpected = student.load_state_dict(weights, strict=False)
    if unexpected or set(missing) - set(tied):
        raise ValueError(
            f"checkpoint {folder} does not fit the student: missing {sorted(set(missing) - set(tied))}, "
            f"unexpected {sorted(unexpected)}; resume with the configuration the run was started with"
        )
    if tied:
        student.tie_weights()


# =============================================================================================
# Evaluation (spec section 5): Rouge-L on validation picks the checkpoint; the test table at the end
# =============================================================================================


def validate(run: Run) -> float:
    """Validation Rouge-L of the current student (the main process generates; every process gets the score)."""
    from accelerate.utils import broadcast_object_list

    cfg = run.cfg
    model = generation_model(run)
    score = [None]
    if run.accelerator.is_main_process:
        score[0] = evaluate_model(
            model, run.tokenizer, run.valid_data, seeds=cfg.eval.valid_seeds, greedy=cfg.eval.greedy,
            max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
            max_prompt_tokens=cfg.data.max_prompt_tokens,
        )["rouge_l"]
    broadcast_object_list(score)
    return float(score[0])


def test_metrics(run: Run, model, tokenizer) -> dict:
    cfg = run.cfg
    return evaluate_model(
        model, tokenizer, run.test_data, seeds=cfg.eval.test_seeds, greedy=cfg.eval.greedy,
        max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
        max_prompt_tokens=cfg.data.max_prompt_tokens,
    )


def teacher_test_metrics(run: Run) -> dict:
    """The teacher's test metrics, cached per teacher, test set and protocol (main process only)."""
    cfg = run.cfg
    key = _digest(cfg.teacher, [(ex.prompt, ex.references) for ex in run.test_data], cfg.eval.test_seeds,
                  cfg.eval.greedy, cfg.eval.max_new_tokens, cfg.data.max_prompt_tokens)
    path = run.cache_dir / "teacher_eval" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    metrics = test_metrics(run, run.teacher, run.teacher_tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(path, json.dumps(metrics, indent=2).encode())
    return metrics


# =============================================================================================
# Set-up: engine, data, models
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


def load_data(cfg: TrainConfig) -> tuple[list[Example], list[Example], list[Example]]:
    d = cfg.data
    if d.source == "testbed":
        from llm.testbed import testbed_splits

        files = testbed_splits(Path(cfg.cache_dir) / "testbed")  # the bundled set, generated once
        train, valid, test = (load_jsonl(files[s], fmt="dolly") for s in ("train", "valid", "test"))
    elif d.source == "files":
        train, valid, test = (load_jsonl(getattr(d, f"{s}_file"), fmt=d.format, skip_malformed=d.skip_malformed)
                              for s in ("train", "valid", "test"))
    else:
        pool = list(load_hub_dataset(d.hub_name, "train"))
        random.Random(cfg.seed).shuffle(pool)
        if len(pool) <= d.hub_valid_size + d.hub_test_size:
            raise ValueError(f"{d.hub_name} has {len(pool)} examples, too few for the valid/test sizes")
        test, valid, train = (pool[: d.hub_test_size], pool[d.hub_test_size : d.hub_test_size + d.hub_valid_size],
                              pool[d.hub_test_size + d.hub_valid_size :])
    limit = lambda xs, n: list(xs)[:n] if n else list(xs)  # noqa: E731
    return limit(train, d.num_train), limit(valid, d.num_valid), limit(test, d.num_test)


def build_models(cfg: TrainConfig, device) -> tuple:
    """Teacher p (frozen) and student q_theta (fp32 master weights), with their tokenizers."""
    use_gpu = device.type == "cuda"
    dtype = DTYPES.get(cfg.teacher_dtype) or (torch.bfloat16 if use_gpu else torch.float32)
    remote = True if cfg.trust_remote_code else None
    teacher = load_causal_lm(cfg.teacher, dtype=dtype, trust_remote_code=remote)
    teacher_tokenizer = load_tokenizer(cfg.teacher)
    if cfg.student_init == "pretrained":
        student = load_causal_lm(cfg.student, dtype=torch.float32, trust_remote_code=remote)
        tokenizer = load_tokenizer(cfg.student)
    elif cfg.student_init == "pruned":
        student = pruned_student(teacher, list(cfg.student_layers)).float()
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


class MetricsLog:
    """Metrics as JSON lines (`metrics.jsonl`) and TensorBoard scalars (`tb/`), main process only."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None):
        self.enabled = enabled
        if not enabled:
            return
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.is_file():  # drop records of steps the crash undid
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            _atomic_write_bytes(self.path, ("\n".join(kept) + "\n" if kept else "").encode())
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step)

    def write(self, step: int, split: str, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, "split": split, **values}) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.tb.add_scalar(f"{split}/{k}", v, step)
        self.tb.flush()

    def close(self):
        if self.enabled:
            self.tb.close()


def fresh_run_dir(cfg: TrainConfig) -> Path:
    """`<out_dir>/<run_name>`, or `<run_name>-1`, `-2`, ... when that already holds a run."""
    base = Path(cfg.out_dir) / cfg.run_name
    candidate, k = base, 0
    while candidate.exists() and any(candidate.iterdir()):
        k += 1
        candidate = base.with_name(f"{base.name}-{k}")
    return candidate


# =============================================================================================
# The training loop
# =============================================================================================


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

    train_data, valid_data, test_data = load_data(cfg)
    teacher, teacher_tokenizer, student, tokenizer = build_models(cfg, accelerator.device)
    shared = True
    try:
        check_vocabularies(teacher_tokenizer, tokenizer, teacher, student, cfg.objective)
        check_vocabularies(teacher_tokenizer, tokenizer, teacher, student, "fkl")
    except ValueError:
        if cfg.objective in TOKEN_LEVEL_OBJECTIVES:
            raise
        shared = False  # text-level objective: teacher and student each score in their own tokens
    tied = tied_parameter_names(student)
    if resume:
        load_weights(student, folder, tied)
    replica = None
    if cfg.distributed in ("fsdp", "deepspeed") and accelerator.is_main_process:
        replica = copy.deepcopy(student).eval().requires_grad_(False).to(accelerator.device)

    o = cfg.optim
    make_optimizer = lambda params: torch.optim.AdamW(  # noqa: E731
        params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    if cfg.distributed == "deepspeed":  # DeepSpeed wraps model and optimiser together
        adamw = make_optimizer(student.parameters())
        student, optimizer = accelerator.prepare(student, adamw)
    else:  # FSDP must shard the model before the optimiser sees its parameters
        student = accelerator.prepare(student)
        adamw = make_optimizer(student.parameters())
        optimizer = accelerator.prepare(adamw)
    scheduler = make_scheduler(adamw, cfg)  # on the torch optimiser the engine steps; stepped once per step, by us

    run = Run(cfg, accelerator, teacher, teacher_tokenizer, student, tokenizer, shared, train_data, valid_data,
              test_data, run_dir, Path(cfg.cache_dir), tied, replica)
    objective = OBJECTIVE_REGISTRY[cfg.objective](run)
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
    objective.prepare_teacher_responses([train_data[i] for i in used])
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    return run, objective, optimizer, scheduler, state, rng_to_restore


def accumulate_gradients(run: Run, objective: Objective, micros: list[dict], diagnostics: bool) -> dict:
    """Backward over the micro-batches of one step; afterwards `.grad` holds the gradient of the
    whole batch's loss (sum of per-unit losses / N, N over all micro-batches and processes).
    Returns the batch's metrics as this process's share (sum over processes = batch value)."""
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
    return metrics


def train(cfg: TrainConfig, *, resume: bool = False) -> dict:
    """Run one distillation from start (or from the latest checkpoint) to the final test table.

    Returns {"state": TrainState as dict, "results": the table's numbers (when the run finished),
    "run_dir": path}. torch's CPU thread count (`num_threads`) is restored on return."""
    threads = torch.get_num_threads()
    try:
        return _train(cfg, resume=resume)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, *, resume: bool) -> dict:
    run, objective, optimizer, scheduler, state, rng_to_restore = setup(cfg, resume=resume)
    accelerator, student, run_dir, o = run.accelerator, run.student, run.run_dir, cfg.optim
    train_data, main = run.train_data, run.accelerator.is_main_process
    log = MetricsLog(run_dir, main, state.step if resume else None)
    before_path = run_dir / "eval_before.json"
    if cfg.eval.before and main and not before_path.is_file():
        before = test_metrics(run, run.replica or accelerator.unwrap_model(student), run.tokenizer)
        _atomic_write_bytes(before_path, json.dumps(before, indent=2).encode())
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
        examples = [train_data[i] for i in local_batch_indices(run, step)]
        diagnostics = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps
        micros = objective.make_batch(examples, step)
        optimizer.zero_grad(set_to_none=True)
        step_metrics = accumulate_gradients(run, objective, micros, diagnostics)
        grad_norm = accelerator.clip_grad_norm_(student.parameters(), o.grad_clip if o.grad_clip > 0 else float("inf"))
        optimizer.step()
        scheduler.step()
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
            rouge = validate(run)
            state.valid_history.append([state.step, rouge])
            log.write(state.step, "valid", {"rouge_l": rouge})
            if rouge > state.best_valid_rouge_l:
                state.best_valid_rouge_l, state.best_step = rouge, state.step
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


def test_set_name(cfg: TrainConfig) -> str:
    return {"testbed": "testbed", "hub": cfg.data.hub_name.split("/")[-1]}.get(
        cfg.data.source, Path(cfg.data.test_file).stem)


def final_evaluation(run: Run, state: TrainState) -> dict | None:
    """Test table: student before training, student after (best validation checkpoint), teacher."""
    cfg, acc = run.cfg, run.accelerator
    results = None
    if acc.is_main_process:
        best = run.run_dir / "checkpoints" / "best"
        after_model = load_causal_lm(best.resolve()).to(run.device)
        name = test_set_name(cfg)
        results = {}
        before_path = run.run_dir / "eval_before.json"
        if before_path.is_file():
            results["student (before)"] = {name: json.loads(before_path.read_text())}
        results[f"student (after, {cfg.objective}, step {state.best_step})"] = {
            name: test_metrics(run, after_model, run.tokenizer)}
        if cfg.eval.teacher:
            results["teacher"] = {name: teacher_test_metrics(run)}
        json_path, md_path = write_results(results, run.run_dir)
        print("\n" + results_table(results), flush=True)
        print(f"wrote {json_path} and {md_path}; best student (validation Rouge-L "
              f"{state.best_valid_rouge_l:.1f}): {best.resolve()}", flush=True)
    acc.wait_for_everyone()
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description="Distil a teacher LM into a student (spec llm.md). Overrides are key=value, dotted for sections.",
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
    cfg = load_config(args.config, args.overrides)
    return train(cfg, resume=args.resume)


if __name__ == "__main__":
    main()

"""What one training run shares, below the objectives and the loop (spec llm.md section 6).

- :class:`Run`: config, engine, teacher and student with their tokenizers, data, folders;
  :class:`TrainState`: the counters a checkpoint carries.
- The data order: a pure function of (seed, step), so a resumed run sees the same batches.
- Sequences: :func:`encode` (text responses) and :func:`encode_ids` (token-id responses, as
  rollouts and the teacher cache give them) build one batch layout, narrowed to the response
  positions so that logits are computed only where a loss is; :func:`logits_of`.
- :func:`generation_model` (the student's full weights for sampling) and :func:`validate`
  (validation score of the current student, for checkpoint selection and the rounds' log).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llm.config import TrainConfig
from llm.data import Example, collate_rows, encode_sft_batch, prompt_token_ids
from llm.evaluate import METRICS, evaluate_model


@dataclass
class TrainState:
    """Counters saved with every checkpoint (the data position is `examples_seen`)."""

    step: int = 0  # optimiser steps done
    examples_seen: int = 0  # training sequences consumed, summed over processes
    best_valid: float = -math.inf  # the best validation score (eval.select_by)
    best_step: int = -1
    valid_history: list = field(default_factory=list)  # (step, validation score)


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
    test_sets: dict  # test-set name -> examples; the first is the primary one
    run_dir: Path
    cache_dir: Path
    tied_parameter_names: list  # parameters that alias another (tied embeddings), not saved twice
    replica: torch.nn.Module | None = None  # full-weight copy for sampling when the engine shards weights
    initial_student: torch.nn.Module | None = None  # frozen copy of the student as the run starts (policy-gradient objectives)

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


def digest(*parts) -> str:
    """A short stable key of JSON-able parts (cache file names)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def _narrow(batch: dict, device) -> dict:
    """Narrow a (B, T) batch to the response: `positions` (B, K) are each row's K =
    longest-response positions, and `labels` / `response_mask` are taken at those positions, so
    logits are computed only where a loss is (the prompt holds most of the tokens; the LM head
    over 50k words is the costliest layer)."""
    mask = batch["response_mask"]
    T, K = mask.shape[1], int(mask.sum(1).max())
    start = mask.argmax(1)  # first response position of each row
    # the last column never carries a loss (labels[:, t] = input_ids[:, t+1]), so clamping there is harmless
    positions = (start[:, None] + torch.arange(K)[None, :]).clamp(max=T - 1)
    batch["labels"] = batch["labels"].gather(1, positions)
    batch["response_mask"] = mask.gather(1, positions)
    batch["positions"] = positions
    batch["keep"] = mask.bool()  # (B, T): the real response tokens, for the packed layout of head_inputs
    return {k: v.to(device) for k, v in batch.items()}


def encode(run: Run, examples: list[Example], responses: list[str] | None = None, *, tokenizer=None) -> dict:
    """Right-padded prompt+response+EOS batch of text responses (llm.data.encode_sft_batch; gold
    responses when `responses` is None), narrowed to the response, on the device."""
    batch = encode_sft_batch(tokenizer or run.tokenizer, examples, run.cfg.data.max_prompt_tokens,
                             run.cfg.data.max_length, responses=responses)
    return _narrow(batch, run.device)


def prompt_ids(run: Run, examples: list[Example], *, tokenizer=None) -> list[list[int]]:
    """Token ids of each example's prompt, as every batch of the run sees it (capped, templated)."""
    return [prompt_token_ids(tokenizer or run.tokenizer, ex.prompt, max_prompt_tokens=run.cfg.data.max_prompt_tokens)
            for ex in examples]


def encode_ids(run: Run, prompts: list[list[int]], responses: list[list[int]], *, tokenizer=None) -> dict:
    """The batch of :func:`encode` from token ids: each response is scored exactly as given (an
    EOS only where it holds one), cut to `data.max_length` like a text response."""
    limit = run.cfg.data.max_length
    rows = [(p, list(r)[: limit - len(p)]) for p, r in zip(prompts, responses, strict=True)]
    return _narrow(collate_rows(rows, (tokenizer or run.tokenizer).pad_token_id), run.device)


def logits_of(model, batch: dict, run: Run) -> torch.Tensor:
    """Logits (B, K, V) at `batch["positions"]`, aligned with `labels` and `response_mask`."""
    with run.autocast():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     logits_to_keep=batch["positions"]).logits


def teacher_logits(run: Run, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return logits_of(run.teacher, batch, run)


def packed_labels(batch: dict) -> torch.Tensor:
    """The labels (N,) of the batch's N real response tokens, in the order of :func:`head_inputs`."""
    return batch["labels"][batch["response_mask"].bool()]


def head_inputs(model, batch: dict, run: Run) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`(hidden, weight, bias)`: the last hidden states (N, H) at the batch's N real response
    tokens (no padding rows, row by row in order), and the LM head's weight and bias, for
    :func:`llm.losses.chunked_token_mean` to form the (N, V) logits a chunk at a time.

    The model runs its own forward (so an engine's hooks see it) with `logits_to_keep` = the
    response mask; a pre-hook on the output embeddings takes the hidden states and hands the head
    an empty batch. FSDP and DeepSpeed hold the head's weight sharded outside their forward, so
    there the head runs inside it and `(logits (N, V), None, None)` comes back."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "logits_to_keep": batch["keep"]}
    if model is run.student and run.cfg.distributed in ("fsdp", "deepspeed"):
        with run.autocast():
            return model(**inputs).logits, None, None
    head = (run.accelerator.unwrap_model(model) if model is run.student else model).get_output_embeddings()
    taken = []

    def take(module, args):
        taken.append(args[0])
        return (args[0][:0],)

    handle = head.register_forward_pre_hook(take)
    try:
        with run.autocast():
            model(**inputs)
    finally:
        handle.remove()
    return taken[0], head.weight, head.bias


# =============================================================================================
# The student's full weights, and its validation score
# =============================================================================================


def generation_model(run: Run):
    """A module holding the student's current full weights, for sampling and evaluation.

    With DDP (or one process) that is the unwrapped student itself. FSDP and DeepSpeed shard the
    weights, so the main process gathers them into a plain replica (`run.replica`); only the
    main process may then generate (see `llm.rollout.student_rollouts`)."""
    if run.cfg.distributed in ("none", "ddp"):
        return run.accelerator.unwrap_model(run.student)
    state = run.accelerator.get_state_dict(run.student)  # collective: every process must call it
    if run.accelerator.is_main_process:
        run.replica.load_state_dict(state, strict=False)
        return run.replica
    return None


def train_probe(train_data: Sequence[Example], n: int) -> list[Example]:
    """The first ``n`` distinct training prompts (their first examples), in the split's order: the
    probe of ``eval.train_probe``."""
    seen, probe = set(), []
    for ex in train_data:
        if len(probe) == n:
            break
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            probe.append(ex)
    return probe


def validate(run: Run) -> dict:
    """Validation scores of the current student: {metric: value} for Rouge-L, EM and, on a set that
    carries answers, answer accuracy, and the same scores of the training probe as
    ``train_probe_<metric>`` (the main process generates; every process gets the scores)."""
    from accelerate.utils import broadcast_object_list

    cfg = run.cfg
    model = generation_model(run)
    scores = [None]
    if run.accelerator.is_main_process:
        scores[0] = {}
        probe = train_probe(run.train_data, cfg.eval.train_probe)
        for prefix, examples in (("", run.valid_data), ("train_probe_", probe)):
            if not examples:
                continue
            metrics = evaluate_model(
                model, run.tokenizer, examples, seeds=cfg.eval.valid_seeds, greedy=cfg.eval.greedy,
                max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                max_prompt_tokens=cfg.data.max_prompt_tokens,
            )
            scores[0] |= {prefix + m: float(metrics[m]) for m in METRICS if m in metrics}
    broadcast_object_list(scores)
    return scores[0]

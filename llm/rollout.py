"""Training samples as the policy drew them: token ids, their log-probs, a `truncated` flag
(spec llm.md section 2a, "Rollouts are token ids").

Every on-policy objective and the preference game take their student samples from
:func:`rollout`, through :func:`student_rollouts`; the cached teacher samples of `seqkd`,
`dpkd`, `pbkd` and `mm_pbkd` come from the same routine (:func:`teacher_responses`).

A rollout samples from the policy itself: temperature `generation.temperature`, no top-k or
top-p cut and no n-gram blocking (that belongs to the evaluation protocol, `llm.evaluate`). A
response is the sampled token ids up to and including the first EOS; one that meets no EOS
within `generation.max_new_tokens` (or `data.max_length`) keeps what was sampled, gets no EOS,
and is flagged `truncated`. Nothing is decoded and re-tokenised before it is scored: the
training batch (:func:`encode_rollout`) holds exactly the sampled ids. Text is decoded only for
what reads text: the judges and, across two vocabularies, the other model's tokenizer.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from llm.data import Example, left_pad
from llm.run import Run, chunks, digest, encode, encode_ids, generation_model, prompt_ids


@dataclass
class Rollout:
    """Responses sampled from a policy, one row per (prompt, sample)."""

    prompt_ids: list  # list[list[int]]: each row's prompt as the policy saw it
    response_ids: list  # list[list[int]]: the sampled tokens, ending with EOS unless truncated
    logprobs: list  # list[list[float]]: log pi(y_h | s_h) of each sampled token under the sampling distribution
    truncated: list  # list[bool]: no EOS within the token budget

    def __len__(self) -> int:
        return len(self.response_ids)

    def __getitem__(self, rows: slice) -> Rollout:
        return Rollout(self.prompt_ids[rows], self.response_ids[rows], self.logprobs[rows], self.truncated[rows])

    def texts(self, tokenizer) -> list[str]:
        """The responses as text (EOS dropped), for judges and for another model's tokenizer."""
        return [tokenizer.decode(r if cut else r[:-1], skip_special_tokens=True).strip()
                for r, cut in zip(self.response_ids, self.truncated)]

    def to_json(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "response_ids": self.response_ids, "logprobs": self.logprobs,
                "truncated": self.truncated}

    @classmethod
    def from_json(cls, obj: dict) -> Rollout:
        return cls(obj["prompt_ids"], obj["response_ids"], obj["logprobs"], obj["truncated"])


@torch.inference_mode()
def rollout(model, tokenizer, prompts: list[list[int]], *, seed: int, max_new_tokens: int, temperature: float = 1.0,
            greedy: bool = False, k: int = 1, batch_size: int = 8, max_length: int | None = None) -> Rollout:
    """Sample `k` responses per token-id prompt from `model` (greedy: its argmax); the k rows of a
    prompt are consecutive, in the order of `prompts`.

    The k samples of a prompt share one prefill: the prompt is encoded once and its KV cache
    repeated k times before decoding. Prompts are taken in order of length (so a block pads
    little), about `batch_size` sampled rows at a time. Draws come from torch's global generator
    seeded with `seed` inside a forked RNG state, so the caller's RNG is untouched and a seed
    gives the same samples for the same prompts, k and batch size. `logprobs` are log-softmax of
    the logits the sampler drew from (after the temperature); for greedy decoding, of the model's
    logits. A response longer than `max_length` minus its prompt is cut there and flagged truncated.
    """
    if max_new_tokens < 1 or batch_size < 1 or k < 1:
        raise ValueError(f"max_new_tokens, batch_size and k must be >= 1, got {max_new_tokens}, {batch_size}, {k}")
    if not greedy and temperature <= 0:
        raise ValueError(f"sampling needs a temperature > 0, got {temperature}; use greedy decoding instead")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = [list(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    rows: dict[int, list] = {}  # prompt index -> its k (response ids, logprobs, truncated)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for block in chunks(order, max(1, batch_size // k)):
                new, token_logp = _decode(model, [prompts[i] for i in block], k, eos=eos, pad=pad, greedy=greedy,
                                          temperature=temperature, max_new_tokens=max_new_tokens)
                for row, (ids, logp) in enumerate(zip(new.tolist(), token_logp.tolist())):
                    p = prompts[block[row // k]]
                    n = ids.index(eos) + 1 if eos in ids else len(ids)  # up to and including the first EOS
                    cut = eos not in ids  # the token budget ran out first
                    if max_length is not None and n > max_length - len(p):
                        n, cut = max_length - len(p), True
                    rows.setdefault(block[row // k], []).append((ids[:n], logp[:n], cut))
    finally:
        model.train(was_training)
    out = Rollout([], [], [], [])
    for i, p in enumerate(prompts):
        for ids, logp, cut in rows[i]:
            out.prompt_ids.append(p)
            out.response_ids.append(ids)
            out.logprobs.append(logp)
            out.truncated.append(cut)
    return out


def _decode(model, prompts: list[list[int]], k: int, *, eos: int, pad: int, greedy: bool, temperature: float,
            max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ancestral sampling (or argmax) of k continuations per prompt with one shared prefill.

    Returns the new tokens (b*k, L) -- `pad` after a row's EOS -- and the log-prob of each under
    the distribution it was drawn from (b*k, L); L <= max_new_tokens (all rows finished earlier)."""
    device = next(model.parameters()).device
    batch = {name: v.to(device) for name, v in left_pad(prompts, pad).items()}
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: every prompt starts at position 0
    out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    cache = out.cache
    if k > 1:
        cache.batch_repeat_interleave(k)
    logits = out.logits[:, -1].float().repeat_interleave(k, 0)
    mask, position = mask.repeat_interleave(k, 0), positions[:, -1].repeat_interleave(k, 0)
    finished = torch.zeros(len(logits), dtype=torch.bool, device=device)
    tokens, logps = [], []
    for t in range(max_new_tokens):
        logp = torch.log_softmax(logits if greedy else logits / temperature, -1)
        token = logp.argmax(-1) if greedy else torch.multinomial(logp.exp(), 1).squeeze(1)
        token = torch.where(finished, torch.full_like(token, pad), token)
        tokens.append(token)
        logps.append(logp.gather(1, token[:, None]).squeeze(1))
        finished |= token == eos
        if bool(finished.all()) or t + 1 == max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        position = position + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None],
                    cache=cache, use_cache=True)
        cache, logits = out.cache, out.logits[:, -1].float()
    return torch.stack(tokens, 1), torch.stack(logps, 1)


def encode_rollout(run: Run, samples: Rollout) -> dict:
    """The training batch of a rollout (llm.run.encode_ids) with `logprobs` (B, K), the sampling
    policy's log-prob of each label (0 off the response), and `truncated` (B,)."""
    batch = encode_ids(run, samples.prompt_ids, samples.response_ids)
    K = batch["labels"].shape[1]
    logprobs = torch.zeros(len(samples), K)
    for i, row in enumerate(samples.logprobs):
        row = row[:K]
        logprobs[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    batch["logprobs"] = logprobs.to(run.device) * batch["response_mask"]
    batch["truncated"] = torch.tensor(samples.truncated, dtype=torch.bool, device=run.device)
    return batch


def student_rollouts(run: Run, examples_per_process: list[Example], seed: int, k: int = 1) -> Rollout:
    """`k` samples y ~ q_theta(.|x) of the current student for each of this process's prompts
    (the k samples of a prompt are consecutive rows).

    Each process samples its own prompts when it holds the full weights (DDP); under FSDP and
    DeepSpeed the main process samples everyone's prompts and hands each process its share."""
    cfg, acc = run.cfg, run.accelerator
    model = generation_model(run)
    prompts = prompt_ids(run, examples_per_process)
    settings = dict(max_new_tokens=cfg.generation.max_new_tokens, temperature=cfg.generation.temperature, k=k,
                    batch_size=cfg.generation.batch_size, max_length=cfg.data.max_length)
    if cfg.distributed in ("none", "ddp"):
        return rollout(model, run.tokenizer, prompts, seed=seed * 1009 + run.rank, **settings)
    from accelerate.utils import broadcast_object_list, gather_object

    everyone = gather_object([prompts])  # one list per process
    answers = [None] * run.world
    if acc.is_main_process:
        answers = [rollout(model, run.tokenizer, p, seed=seed * 1009 + r, **settings).to_json()
                   for r, p in enumerate(everyone)]
    broadcast_object_list(answers)
    return Rollout.from_json(answers[run.rank])


# =============================================================================================
# The teacher's samples, generated once and cached
# =============================================================================================


@dataclass(frozen=True)
class TeacherSample:
    """One cached teacher response: its text, and its token ids in the teacher's vocabulary."""

    text: str
    ids: tuple
    truncated: bool


def _read_cache(path) -> tuple[dict[str, TeacherSample], int]:
    """The records of an append-only cache file and the byte length of its complete lines.

    Only a torn final line (no newline: a writer interrupted mid-line) is tolerated; it is
    reported and left out. Any other malformed line stops the run naming the file and line."""
    if not path.is_file():
        return {}, 0
    data = path.read_bytes()
    out, offset, line_no = {}, 0, 0
    while offset < len(data):
        newline = data.find(b"\n", offset)
        if newline < 0:
            print(f"{path}: dropped a torn last line ({len(data) - offset} bytes) left by an interrupted writer; "
                  "its prompt is generated again", file=sys.stderr, flush=True)
            break
        line_no += 1
        line = data[offset:newline]
        offset = newline + 1
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            out[record["prompt"]] = TeacherSample(record["response"], tuple(record["response_ids"]),
                                                  bool(record["truncated"]))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"teacher-response cache {path}, line {line_no}: not a cache record ({err}); "
                             "delete the file to generate the responses again") from None
    return out, offset


def teacher_responses(run: Run, examples: list[Example]) -> dict[str, TeacherSample]:
    """Teacher samples y ~ p(.|x) for `examples`, generated once by :func:`rollout` and cached.

    The cache (JSONL, one prompt a line: text, token ids and the truncated flag, appended as it
    grows) is keyed by the teacher, the decoding settings and, when the teacher samples, the
    seed (greedy responses do not depend on it, so runs of every seed share them); a later run,
    or a resumed one, generates only prompts not seen before. The main process generates; the
    others wait and read the file."""
    cfg, acc = run.cfg, run.accelerator
    g = cfg.generation
    key = digest("rollout", cfg.teacher, g.max_new_tokens, g.teacher_greedy, cfg.data.max_prompt_tokens,
                 cfg.data.max_length, None if g.teacher_greedy else (g.temperature, cfg.seed))
    path = run.cache_dir / "teacher_responses" / f"{key}.jsonl"
    if acc.is_main_process:
        have, complete = _read_cache(path)
        if path.is_file() and complete < path.stat().st_size:  # drop the torn line before appending
            os.truncate(path, complete)
        missing = sorted({ex.prompt for ex in examples} - set(have))
        if missing:
            path.parent.mkdir(parents=True, exist_ok=True)
            progress = tqdm(total=len(missing), desc="teacher responses (cached once)", leave=False)
            by_prompt = {ex.prompt: ex for ex in examples}
            for block in chunks(missing, g.batch_size * 4):
                samples = rollout(
                    run.teacher, run.teacher_tokenizer,
                    prompt_ids(run, [by_prompt[p] for p in block], tokenizer=run.teacher_tokenizer),
                    seed=cfg.seed + len(have), greedy=g.teacher_greedy, temperature=g.temperature,
                    max_new_tokens=g.max_new_tokens, batch_size=g.batch_size, max_length=cfg.data.max_length,
                )
                texts = samples.texts(run.teacher_tokenizer)
                with open(path, "a", encoding="utf-8") as handle:
                    for prompt, text, ids, cut in zip(block, texts, samples.response_ids, samples.truncated):
                        handle.write(json.dumps({"prompt": prompt, "response": text, "response_ids": ids,
                                                 "truncated": cut}) + "\n")
                        have[prompt] = TeacherSample(text, tuple(ids), cut)
                    handle.flush()
                    os.fsync(handle.fileno())
                progress.update(len(block))
            progress.close()
    acc.wait_for_everyone()
    return have if acc.is_main_process else _read_cache(path)[0]


def encode_teacher_responses(run: Run, examples: list[Example], cache: dict[str, TeacherSample], *,
                             for_teacher: bool = False) -> dict:
    """The batch of the cached teacher responses to `examples`: the teacher's own token ids when
    the batch is scored in the teacher's vocabulary (`for_teacher`, or a shared vocabulary), and
    their text re-encoded only for a student with another vocabulary."""
    samples = [cache[ex.prompt] for ex in examples]
    if for_teacher or run.shared_vocabulary:
        tokenizer = run.teacher_tokenizer if for_teacher else run.tokenizer
        return encode_ids(run, prompt_ids(run, examples, tokenizer=tokenizer), [s.ids for s in samples],
                          tokenizer=tokenizer)
    return encode(run, examples, [s.text for s in samples])

"""The token-level family (spec llm.md section 2): `sft`, `seqkd` and the per-token divergences
`fkl`, `rkl`, `jsd`, `skl`, `srkl`, `akl`, each a mean over the real response tokens of a pure
loss of :mod:`llm.losses`.

The losses run on the packed response tokens only (llm.run.head_inputs: no padding rows), with
the LM head and the loss formed `loss_chunk_tokens` tokens at a time
(llm.losses.chunked_token_mean), so peak memory does not grow with batch x length x vocabulary.
The teacher side is the teacher's own head on its hidden states, or, with `kd.teacher_topk`, the
cached top-k buckets (llm.teacher_topk), and then the teacher does not run.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from llm import losses
from llm.objectives.base import Objective, weighted
from llm.rollout import encode_rollout, encode_teacher_responses, student_rollouts
from llm.run import Run, chunks, encode, head_inputs, packed_labels


def token_mean(run: Run, batch: dict, per_token, diagnostics: bool = False, pair=None) -> tuple[torch.Tensor, dict]:
    """The student's mean over the batch's response tokens of `per_token(s, t)` (``(C,)`` values
    of a chunk), and, with `diagnostics`, the true divergences (llm.losses.divergence_values) of
    the same chunks. `pair(scores, rows)` gives each chunk's `(s, t)`: by default the student's
    logits against the teacher's logits, run here; `t` is None without a teacher."""
    hidden, weight, bias = head_inputs(run.student, batch, run)
    if pair is None and (per_token.uses_teacher or diagnostics):
        with torch.no_grad():
            t_hidden, t_weight, t_bias = head_inputs(run.teacher, batch, run)

        def pair(scores, rows):
            with torch.no_grad():  # the teacher's logits of the chunk, formed in the chunk too
                return scores, F.linear(t_hidden[rows], t_weight, t_bias)
    elif pair is None:
        pair = lambda scores, rows: (scores, None)  # noqa: E731
    logged = []

    def values(scores, rows):
        s, t = pair(scores, rows)
        if diagnostics:
            logged.append(losses.divergence_values(s, t))
        return per_token(s, t, rows)

    with run.autocast():
        loss = losses.chunked_token_mean(hidden, weight, bias, values, run.cfg.loss_chunk_tokens or hidden.shape[0])
    return loss, {name: float(torch.cat([d[name] for d in logged]).mean()) for name in (logged[0] if logged else {})}


class _CrossEntropy:
    """-log q(y_h | s_h) of the packed labels."""

    uses_teacher = False

    def __init__(self, labels: torch.Tensor):
        self.labels = labels

    def __call__(self, s, t, rows):
        return -losses.token_log_probs(s[None], self.labels[rows][None])[0]


class _Divergence:
    uses_teacher = True

    def __init__(self, name: str, kwargs: dict):
        self.name, self.kwargs = name, kwargs

    def __call__(self, s, t, rows):
        return losses.token_values(self.name, s, t, **self.kwargs)


class SFT(Objective):
    """`sft`: cross-entropy -sum_h log q(y_h | s_h) / |y| on the gold responses."""

    def responses(self, part):
        """The micro-batch of responses the cross-entropy is taken on."""
        return encode(self.run, part)

    def make_batch(self, examples, step):
        micros = []
        for part in chunks(examples, self.run.micro_batch_size):
            batch = self.responses(part)
            micros.append({"batch": batch, "counts": {"tokens": batch["response_mask"].sum()}})
        return micros

    def loss(self, micro, totals, diagnostics):
        batch = micro["batch"]
        weight = float(micro["counts"]["tokens"] / totals["tokens"])
        # the true divergences, for comparison only
        loss, logged = token_mean(self.run, batch, _CrossEntropy(packed_labels(batch)),
                                  diagnostics and self.run.shared_vocabulary)
        loss = loss * weight
        return loss, {"loss": float(loss.detach())} | weighted(logged, weight)


class SeqKD(SFT):
    """`seqkd`: the same cross-entropy on cached teacher samples y ~ p(.|x)."""

    uses_teacher_responses = True

    def responses(self, part):
        return encode_teacher_responses(self.run, part, self.teacher_cache)


class TokenKD(Objective):
    """`fkl`, `rkl`, `jsd`, `skl`, `srkl`, `akl`: per-token distribution matching (mean over
    response tokens) on a prefix source: with probability `kd.on_policy_fraction` (GKD's lambda)
    a batch's responses are rollouts of the current student, otherwise they are the gold
    responses (`kd.prefix=gold`) or cached teacher samples (`kd.prefix=teacher`). With
    `kd.teacher_topk` the off-policy batches compare the student with the cached teacher top-k
    buckets (the logged divergences are then those of the buckets too)."""

    def __init__(self, run: Run):
        super().__init__(run)
        name = run.cfg.objective
        kd = run.cfg.kd
        kwargs = {"jsd": {"beta": kd.jsd_beta}, "skl": {"alpha": kd.skl_alpha},
                  "srkl": {"alpha": kd.srkl_alpha}, "akl": {"mu": kd.akl_mu}}.get(name, {})
        self.divergence = _Divergence(name, kwargs)
        self.uses_teacher_responses = kd.prefix == "teacher"
        self.teacher_topk = None  # llm.teacher_topk.TeacherTopK, filled by the set-up with kd.teacher_topk

    def on_policy(self, step: int) -> bool:
        """GKD's lambda: a seeded coin per step, the same on every process and after a resume."""
        return random.Random(self.cfg.seed * 1_000_003 + step).random() < self.cfg.kd.on_policy_fraction

    def fixed_batch(self, part):
        """The off-policy micro-batch of `part`: cached teacher samples or gold responses."""
        if self.uses_teacher_responses:
            return encode_teacher_responses(self.run, part, self.teacher_cache)
        return encode(self.run, part)

    def make_batch(self, examples, step):
        on_policy, size = self.on_policy(step), self.run.micro_batch_size
        if on_policy:
            samples = student_rollouts(self.run, examples, seed=self.cfg.seed * 7919 + step)
        micros = []
        for i, part in enumerate(chunks(examples, size)):
            batch = encode_rollout(self.run, samples[i * size : (i + 1) * size]) if on_policy else self.fixed_batch(part)
            micro = {"batch": batch, "on_policy": on_policy, "counts": {"tokens": batch["response_mask"].sum()}}
            if not on_policy and self.teacher_topk is not None:
                micro["topk"] = self.teacher_topk.lookup(batch, self.run.device)
            micros.append(micro)
        return micros

    def loss(self, micro, totals, diagnostics):
        weight = float(micro["counts"]["tokens"] / totals["tokens"])
        pair = None
        if "topk" in micro:
            ids, logp, tail = micro["topk"]
            pair = lambda scores, rows: losses.topk_buckets(scores, ids[rows], logp[rows], tail[rows])  # noqa: E731
        loss, logged = token_mean(self.run, micro["batch"], self.divergence, diagnostics, pair)
        loss = loss * weight
        return loss, {"loss": float(loss.detach()), "on_policy": float(micro["on_policy"]) * weight} | weighted(logged, weight)

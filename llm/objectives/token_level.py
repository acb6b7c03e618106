"""The token-level family (spec llm.md section 2): `sft`, `seqkd` and the per-token divergences
`fkl`, `rkl`, `jsd`, `skl`, `srkl`, `akl`, each a masked mean over response tokens of a pure
loss of :mod:`llm.losses`."""

from __future__ import annotations

import random

from llm import losses
from llm.objectives.base import Objective, weighted
from llm.rollout import encode_rollout, encode_teacher_responses, student_rollouts
from llm.run import Run, chunks, encode, logits_of, teacher_logits


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
        s_logits = logits_of(self.run.student, batch, self.run)
        loss = losses.sft_loss(s_logits, batch["labels"], batch["response_mask"]) * weight
        metrics = {"loss": float(loss.detach())}
        if diagnostics and self.run.shared_vocabulary:  # the true divergences, for comparison only
            t_logits = teacher_logits(self.run, batch)
            metrics |= weighted(losses.divergences(s_logits, t_logits, batch["response_mask"]), weight)
        return loss, metrics


class SeqKD(SFT):
    """`seqkd`: the same cross-entropy on cached teacher samples y ~ p(.|x)."""

    uses_teacher_responses = True

    def responses(self, part):
        return encode_teacher_responses(self.run, part, self.teacher_cache)


class TokenKD(Objective):
    """`fkl`, `rkl`, `jsd`, `skl`, `srkl`, `akl`: per-token distribution matching (masked mean over
    response tokens) on a prefix source: with probability `kd.on_policy_fraction` (GKD's lambda)
    a batch's responses are rollouts of the current student, otherwise they are the gold
    responses (`kd.prefix=gold`) or cached teacher samples (`kd.prefix=teacher`)."""

    def __init__(self, run: Run):
        super().__init__(run)
        name = run.cfg.objective
        self.divergence = losses.TOKEN_OBJECTIVES[name]
        kd = run.cfg.kd
        self.kwargs = {"jsd": {"beta": kd.jsd_beta}, "skl": {"alpha": kd.skl_alpha},
                       "srkl": {"alpha": kd.srkl_alpha}, "akl": {"mu": kd.akl_mu}}.get(name, {})
        self.uses_teacher_responses = kd.prefix == "teacher"

    def on_policy(self, step: int) -> bool:
        """GKD's lambda: a seeded coin per step, the same on every process and after a resume."""
        return random.Random(self.cfg.seed * 1_000_003 + step).random() < self.cfg.kd.on_policy_fraction

    def make_batch(self, examples, step):
        on_policy, size = self.on_policy(step), self.run.micro_batch_size
        if on_policy:
            samples = student_rollouts(self.run, examples, seed=self.cfg.seed * 7919 + step)
        micros = []
        for i, part in enumerate(chunks(examples, size)):
            if on_policy:
                batch = encode_rollout(self.run, samples[i * size : (i + 1) * size])
            elif self.uses_teacher_responses:
                batch = encode_teacher_responses(self.run, part, self.teacher_cache)
            else:
                batch = encode(self.run, part)
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

"""The stabilised policy-gradient student step (spec llm.md section 2a), and `rloo`, the sanity rung.

:class:`StudentStep` is the student's side of every objective that optimises the student against
a sequence reward: `rloo` (the judge's own known reward) and `pbkd` (the adversary ``r_phi``). It
is built the way TRL's RLOO/PPO and MiniLLM are:

* ``pg.samples_per_prompt`` (k >= 2) token-id rollouts per prompt from the current student
  (:func:`llm.rollout.student_rollouts`), with their log-probs under the sampling policy;
* per rollout ``R = r(x, y) - pg.beta_kl * sum_h log(q_old(y_h|s_h) / pi_ref(y_h|s_h))``, with
  ``pi_ref`` frozen (``pg.reference``: the run's initial student, i.e. the warm start, or the
  teacher), minus ``pg.missing_eos_penalty`` for a rollout that met no EOS;
* leave-one-out advantages over the k rollouts of a prompt, whitened over the batch
  (:func:`llm.losses.group_advantages`);
* the PPO-clipped surrogate with token-mean normalisation (:func:`llm.losses.ppo_clipped_loss`)
  against the sampling log-probs, for ``pg.ppo_epochs`` optimiser steps per rollout batch: the
  batch is drawn at every step ``s`` with ``s % ppo_epochs == 0`` and reused by the next ones;
* the student's own learning rate ``pg.lr`` (``llm/train.py`` builds its optimiser with it);
* an optional seqkd anchor (``pg.seqkd_weight``: cross-entropy on the cached teacher responses).

Every step logs the raw reward, the KL to ``pi_ref``, the response length, the share of
truncated rollouts, the clip fraction and the mean importance ratio.
"""

from __future__ import annotations

from typing import Callable

import torch

from llm import losses
from llm.data import Example
from llm.evaluate import has_answers
from llm.judges import REWARDS, PreferenceQuery
from llm.objectives.base import Objective
from llm.rollout import Rollout, encode_rollout, encode_teacher_responses, student_rollouts
from llm.run import Run, chunks, logits_of

RewardFn = Callable[[list[Example], Rollout, int], torch.Tensor]
"""(the prompts' examples, their rollouts (k consecutive rows per prompt), the step drawing them)
-> the reward of every rollout row."""


def seqkd_anchor(run: Run, micro: dict, totals: dict) -> torch.Tensor:
    """The optional seqkd anchor: cross-entropy on the micro-batch's teacher responses ``micro["T"]``,
    normalised by the whole batch's teacher tokens."""
    T = micro["T"]
    loss = losses.sft_loss(logits_of(run.student, T, run), T["labels"], T["response_mask"])
    return loss * float(micro["counts"]["teacher_tokens"] / totals["teacher_tokens"])


class StudentStep:
    """The student step of spec section 2a over rollout batches that live `pg.ppo_epochs` steps."""

    def __init__(self, run: Run):
        self.run, self.g = run, run.cfg.pg
        if self.g.reference == "teacher":
            if not run.shared_vocabulary:
                raise ValueError("pg.reference=teacher scores the student's tokens under the teacher, so the two must "
                                 "share a vocabulary; use pg.reference=initial")
            self.reference = run.teacher
        else:
            self.reference = run.initial_student
        self.batch: dict | None = None  # the current rollout batch (see draw)

    def rollout_step(self, step: int) -> int:
        """The step whose rollout batch `step` trains on."""
        return step - step % self.g.ppo_epochs

    def current(self, examples: list[Example], step: int, reward: RewardFn) -> dict:
        """The rollout batch of `step`: drawn, scored and given advantages at its first step, reused after."""
        start = self.rollout_step(step)
        if self.batch is None or self.batch["step"] != start:
            if step != start:  # only a resume can land inside a batch, and the checkpoint carries the batch
                raise RuntimeError(f"step {step} trains on the rollout batch of step {start}, which is not held")
            self.batch = self.draw(examples, start, reward)
        return self.batch

    @torch.no_grad()
    def token_log_probs(self, model, batch: dict) -> torch.Tensor:
        """log model(y_h | s_h) of each label at the sampling temperature (as the sampler's log-probs are)."""
        logits = logits_of(model, batch, self.run).float() / self.run.cfg.generation.temperature
        return losses.token_log_probs(logits, batch["labels"])

    def draw(self, examples: list[Example], step: int, reward: RewardFn) -> dict:
        run, g = self.run, self.g
        k, cfg = g.samples_per_prompt, run.cfg
        y = student_rollouts(run, examples, seed=cfg.seed * 7919 + step, k=k)
        r = reward(examples, y, step).detach().float().cpu()
        shaped, kl, lengths = [], [], []
        for part in chunks(list(range(len(y))), run.micro_batch_size * k):
            rows = slice(part[0], part[-1] + 1)
            S = encode_rollout(run, y[rows])
            R_part, kl_part = losses.kl_penalised_rewards(r[rows].to(run.device), S["logprobs"],
                                                          self.token_log_probs(self.reference, S), S["response_mask"],
                                                          g.beta_kl)
            shaped.append(R_part.cpu())
            kl.append(kl_part.cpu())
            lengths.append(S["response_mask"].sum(1).float().cpu())
        kl, lengths = torch.cat(kl), torch.cat(lengths)
        truncated = torch.tensor(y.truncated, dtype=torch.float32)
        R = torch.cat(shaped) - g.missing_eos_penalty * truncated
        advantages = losses.group_advantages(R.view(len(examples), k), whiten=g.whiten).reshape(-1)
        return {"step": step, "prompts": [ex.prompt for ex in examples], "rollout": y,
                "advantages": advantages.tolist(),
                "stats": {"reward": float(r.mean()), "kl_ref": float(kl.mean()), "response_length": float(lengths.mean()),
                          "truncated": float(truncated.mean()), "shaped_reward": float(R.mean())}}

    def micro_batches(self, teacher_cache: dict, teacher_responses: bool = False) -> list[dict]:
        """The current batch as micro-batches of whole prompts (their k rollouts), with token counts; with the
        prompts' cached teacher responses ``T`` when the seqkd anchor or ``teacher_responses`` asks for them."""
        run, k, batch = self.run, self.g.samples_per_prompt, self.batch
        micros = []
        for part in chunks(list(range(len(batch["prompts"]))), run.micro_batch_size):
            rows = slice(part[0] * k, (part[-1] + 1) * k)
            S = encode_rollout(run, batch["rollout"][rows])
            micro = {"S": S, "advantages": torch.tensor(batch["advantages"][rows], device=run.device),
                     "counts": {"prompts": torch.tensor(len(part), device=run.device),
                                "tokens": S["response_mask"].sum()}}
            if self.g.seqkd_weight > 0 or teacher_responses:
                examples = [Example(prompt=batch["prompts"][i], response="") for i in part]
                micro["T"] = encode_teacher_responses(run, examples, teacher_cache)
                micro["counts"]["teacher_tokens"] = micro["T"]["response_mask"].sum()
            micros.append(micro)
        return micros

    def loss(self, micro: dict, totals: dict, pg_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
        """``pg_weight`` times the PPO-clipped surrogate of a micro-batch (token mean over the whole batch),
        plus the anchor."""
        run, S = self.run, micro["S"]
        logits = logits_of(run.student, S, run).float() / run.cfg.generation.temperature
        token_logp = losses.token_log_probs(logits, S["labels"])
        out = losses.ppo_clipped_loss(token_logp, S["logprobs"], micro["advantages"], S["response_mask"],
                                      self.g.clip_eps, normaliser=totals["tokens"])
        w = float(micro["counts"]["prompts"] / totals["prompts"])
        loss = pg_weight * out.loss
        metrics = {"pg_loss": float(out.loss.detach()), "clip_fraction": float(out.clip_fraction) * w,
                   "ratio_mean": float(out.ratio_mean) * w}
        if self.g.seqkd_weight > 0:
            anchor = seqkd_anchor(run, micro, totals)
            loss = loss + self.g.seqkd_weight * anchor
            metrics["seqkd_loss"] = float(anchor.detach())
        metrics |= {k: v * w for k, v in self.batch["stats"].items()}
        metrics["loss"] = float(loss.detach())
        return loss, metrics

    def state_dict(self) -> dict:
        if self.batch is None:
            return {}
        return {"batch": {**self.batch, "rollout": self.batch["rollout"].to_json()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("batch"):
            self.batch = {**state["batch"], "rollout": Rollout.from_json(state["batch"]["rollout"])}


class RLOO(Objective):
    """`rloo`: the student step with the judge's own known reward in place of the adversary (RLOO with
    a known reward; spec section 2a's sanity rung). The reward is the `bt_oracle` judge's
    ``pg.reward`` at ``pg.reward_scale`` (the testbed: ``reward_scale`` when the response names the
    prompt's answer and no distractor, else 0)."""

    policy_gradient = True

    def __init__(self, run: Run):
        super().__init__(run)
        g = run.cfg.pg
        if g.reward == "answer_accuracy" and not has_answers(run.train_data):
            raise ValueError("rloo's answer_accuracy reward needs training examples that carry their answers (as the "
                             "testbed's do); set pg.reward=rouge_l")
        self.reward_fn = REWARDS[g.reward](g.reward_scale)
        self.student_step = StudentStep(run)
        self.uses_teacher_responses = g.seqkd_weight > 0

    def rewards(self, examples: list[Example], y: Rollout, step: int) -> torch.Tensor:
        k = self.cfg.pg.samples_per_prompt
        texts = y.texts(self.run.tokenizer)
        queries = [PreferenceQuery(prompt=ex.prompt, response_0="", response_1="", references=tuple(ex.references),
                                   answers=ex.answers) for ex in examples]
        return torch.tensor([self.reward_fn(queries[i // k], text) for i, text in enumerate(texts)])

    def make_batch(self, examples, step):
        self.student_step.current(examples, step, self.rewards)
        return self.student_step.micro_batches(self.teacher_cache)

    def loss(self, micro, totals, diagnostics):
        return self.student_step.loss(micro, totals)

    def state_dict(self):
        return self.student_step.state_dict()

    def load_state_dict(self, state):
        self.student_step.load_state_dict(state)

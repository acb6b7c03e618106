"""Direct Preference Knowledge Distillation, `dpkd` (spec llm.md section 2; arXiv 2406.19774)."""

from __future__ import annotations

import contextlib

import torch

from llm import losses
from llm.objectives.base import Objective
from llm.rollout import Rollout, encode_rollout, encode_teacher_responses, student_rollouts
from llm.run import Run, chunks, encode, local_batch_indices, logits_of


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
        self.student_samples: dict[int, Rollout] = {}  # step -> rollouts of this process's examples

    def start_round(self, round_index, steps):
        """Sample y_S ~ q_theta for every prompt of the round, with the student as it is now."""
        examples = [[self.run.train_data[i] for i in local_batch_indices(self.run, s)] for s in steps]
        flat = [ex for block in examples for ex in block]
        samples = student_rollouts(self.run, flat, seed=self.cfg.seed * 7919 + 104_729 * (round_index + 1))
        share = self.cfg.batch_size // self.run.world
        self.student_samples = {s: samples[i * share : (i + 1) * share] for i, s in enumerate(steps)}

    def state_dict(self):
        return {"student_samples": {str(k): v.to_json() for k, v in self.student_samples.items()}}

    def load_state_dict(self, state):
        self.student_samples = {int(k): Rollout.from_json(v) for k, v in state.get("student_samples", {}).items()}

    def make_batch(self, examples, step):
        run, y_S_all = self.run, self.student_samples[step]
        micros, size = [], run.micro_batch_size
        for i, part in enumerate(chunks(examples, size)):
            y_S = y_S_all[i * size : (i + 1) * size]
            micro = {"T": encode_teacher_responses(run, part, self.teacher_cache), "S": encode_rollout(run, y_S),
                     "gold": encode(run, part)}
            if not run.shared_vocabulary:  # the teacher scores its own tokens, and the student's text in them
                micro["T_teacher"] = encode_teacher_responses(run, part, self.teacher_cache, for_teacher=True)
                micro["S_teacher"] = encode(run, part, y_S.texts(run.tokenizer), tokenizer=run.teacher_tokenizer)
            micro["counts"] = {
                "pairs": torch.tensor(len(part), device=run.device),
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


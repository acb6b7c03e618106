"""Preference-based knowledge distillation at LLM scale (spec llm.md sections 2 and 3).

Two objectives, each in one class:

* :class:`PbKD` (``objective=pbkd``, black-box, Algorithms 1-2). A reward model
  ``r_theta(x, y) = B tanh(<theta, phi(x, y)> / B)`` -- a bounded linear head on the features of a
  frozen pretrained backbone (:class:`llm.reward_model.RewardModel`) -- plays the adversary inside
  the confidence set around the MLE of the Bradley-Terry likelihood on the whole of D, through the
  Lagrangian of :func:`llm.losses.pbkd_adversary_loss` with dual ascent on ``lam``, refit once a
  round (``pbkd.timescale=refit``) or stepped on every rollout batch (``inner``); the student
  trains on its rewards by the stabilised step of :mod:`llm.objectives.policy_gradient` (k
  token-id rollouts per prompt, KL to a frozen pi_ref, whitened leave-one-out advantages, PPO
  clip, ``pg.lr``). See :class:`PbKD`.

* :class:`MMPbKD` (``objective=mm_pbkd``, white-box, Algorithm 3). A Q-head ``f_phi(s, .)``
  (:class:`llm.reward_model.QHead`) replaces the reward model; its induced sequence reward
  ``r_f`` enters the BT constraint, and the gap is ``beta * off-policy moment + (1 - beta) *
  on-policy moment`` (:func:`llm.losses.mm_pbkd_adversary_loss`); the student trains on the same
  stabilised step (see below).

Preference data D (spec section 3) -- ``online.rounds`` decides the mode:

* offline (``online.rounds=1``): D is built once, at the start: for ``pbkd.pairs_per_round``
  prompts, the teacher's response ``tau0`` against each of ``pg.samples_per_prompt`` initial
  student samples ``tau1`` (or against the gold reference, ``pbkd.offline_response``), labelled
  by the judge ``pbkd.judge``.
* online (``online.rounds=T``): at the start of round t the teacher's and the *current*
  student's responses to the round's prompts are labelled and appended to the preference store
  (``<run_dir>/preferences.jsonl``) in one batch; then the adversary is re-fitted on the grown D
  (``NLL_ref`` recorded) and training goes on. A run killed after labelling and resumed finds
  the round in the store and reuses it: no record is lost or duplicated.

Every round writes one line to ``<run_dir>/rounds.jsonl`` (and prints it): the validation
scores of the student entering the round, |D|, the judge's statistics and the adversary's fit
(``pbkd``: |D_fit|, ``NLL_ref``, and under ``refit`` the BT NLL after the refit against its bound
``NLL_ref + zeta/|D_fit|``, ``lam``, the share of refit steps with ``lam > 0`` and the reward gap;
the held-out part's NLL and accuracy). Every step logs the adversary's last values beside the
student step's.

Student of ``mm_pbkd``. The on-policy moment of a student rollout telescopes,
``sum_h [<p, f>(s_h) - f(s_h, y_h)] = <p, f>(s_0) - r_f(tau)``, and ``<p, f>(s_0)`` is the same for
every rollout of a prompt, so the moment's exact policy gradient is that of the sequence reward
``r_f(tau)`` (summed, not length-normalised: the sum is what telescopes). The on-policy part is
therefore the stabilised step of section 2a with ``r_f`` as its reward (k rollouts, KL to pi_ref,
whitened leave-one-out advantages, PPO clip, ``pg.lr``), weighted ``1 - beta``; the off-policy
moment on the teacher responses is differentiated directly through ``q(.|s_h)``, weighted ``beta``
and token-mean normalised like the surrogate. The Q-head follows ``pbkd.timescale`` as ``pbkd``'s reward
model does: ``refit``, `pbkd.refit_steps` Lagrangian steps at the round's start (the moments on
minibatches of the round's labelled student samples and their teacher responses), then frozen for
the round; ``inner``, its ``pbkd.adversary_steps`` on each rollout batch when it is drawn, so it is
frozen over the batch's ``pg.ppo_epochs`` steps. The
spec's literal per-token advantage ``-(<p, f>(s_h) - f(s_h, y_h))`` drops the credit a token gets
from later tokens and is not the moment's gradient; the exactness bridge (``llm/bridge.py``) keeps
it (:func:`llm.losses.mm_pbkd_student_loss`) to show that it does not reach the exact min-max.

Both objectives run in one process (``distributed=none``): the adversary is not sharded.
"""

from __future__ import annotations

import copy
import json
import math
import random
import zlib

import torch

from llm import losses
from llm.data import Example
from llm.evaluate import has_answers
from llm.judges import PreferenceQuery, make_judge
from llm.models import pruned_student, small_config_like
from llm.objectives.base import Objective
from llm.objectives.policy_gradient import StudentStep
from llm.preference_store import PreferenceStore
from llm.reward_model import NonFiniteRewardError, QHead, RewardModel
from llm.rollout import Rollout, encode_rollout, encode_teacher_responses, student_rollouts
from llm.run import Run, chunks, encode, local_batch_indices, logits_of, teacher_logits, validate

__all__ = ["PbKD", "MMPbKD"]


class _PreferenceGame(Objective):
    """What ``pbkd`` and ``mm_pbkd`` share: the judge, the preference store and D, the adversary
    with its optimiser, the dual variable ``lam`` and the rounds (label, append, fit, log)."""

    uses_teacher_responses = True
    policy_gradient = True
    adversary_name = "adversary"
    off_policy = False  # whether the student's loss also reads the teacher responses (mm_pbkd's off-policy moment)

    def __init__(self, run: Run):
        super().__init__(run)
        p = run.cfg.pbkd
        if run.world > 1:
            raise ValueError(f"objective={run.cfg.objective} runs in one process (its adversary is not sharded); "
                             "launch without torchrun / distributed=none")
        self.p = p
        if p.student_pairs and run.cfg.online.rounds == 1 and p.offline_response == "reference":
            raise ValueError("pbkd.student_pairs pairs the round's student samples, and offline D with "
                             "pbkd.offline_response=reference has none; set offline_response=student")
        self.adversary = self.build_adversary().to(run.device)
        self.adversary_optimizer = torch.optim.AdamW(self.adversary_parameters(), lr=p.adversary_lr,
                                                     weight_decay=p.adversary_weight_decay)
        self.judge = make_judge(p.judge, **self.judge_options())
        if getattr(self.judge, "reward_name", None) == "answer_accuracy" and not has_answers(run.train_data):
            raise ValueError("the bt_oracle judge's answer_accuracy reward needs training examples that carry their "
                             "answers (as the testbed's do); set pbkd.judge_options={reward: rouge_l}")
        self.store = PreferenceStore(run.run_dir / "preferences.jsonl")
        self.lam = float(p.lam_init)
        self.nll_ref = math.nan
        self.round = -1
        self.judge_totals: dict = {}
        self.step_adversary: dict = {}
        self.student_step = StudentStep(run)

    # ---- the adversary: built from its own small config, pruned teacher blocks or the initial student

    def backbone(self):
        p, teacher = self.p, self.run.teacher
        if p.rm_init == "pruned":
            return pruned_student(teacher, list(p.rm_layers)).float()
        if p.rm_init == "student":
            if self.run.initial_student is None:
                raise ValueError(f"pbkd.rm_init=student copies the run's initial student, which "
                                 f"objective={self.cfg.objective} does not keep; use rm_init=pruned or fresh")
            return copy.deepcopy(self.run.initial_student).float().requires_grad_(True)
        from transformers import AutoModelForCausalLM

        config = small_config_like(teacher.config, **p.rm_config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed + 1)
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)

    def build_adversary(self) -> torch.nn.Module:
        raise NotImplementedError

    def adversary_parameters(self):
        """What the adversary's optimiser moves."""
        return self.adversary.parameters()

    def judge_options(self) -> dict:
        options = dict(self.p.judge_options)
        if self.p.judge == "bt_oracle":
            options.setdefault("seed", self.cfg.seed)
        return options

    def guarded(self, fn, *args):
        """Run an adversary computation; a non-finite output stops the run naming the last good checkpoint."""
        try:
            return fn(*args)
        except NonFiniteRewardError as err:
            latest = self.run.run_dir / "checkpoints" / "latest"
            where = f"the last good checkpoint is {latest.resolve()}" if latest.exists() else "no checkpoint was written yet"
            raise NonFiniteRewardError(f"{self.cfg.objective}: {err} ({where}; resume with --resume)") from None

    # ---- rounds: label, append, fit --------------------------------------------------------------

    def start_round(self, round_index: int, steps: range) -> None:
        """Algorithm 2, one round: responses -> judge -> store (one append) -> the adversary's fit."""
        run = self.run
        self.round = round_index
        if round_index < self.store.rounds_completed():  # labelled before an interruption: reuse, never relabel
            records = self.store.records(round_index)
        else:
            records = self.label_round(round_index, steps)
            self.store.append(records)
        self.D = [r for r in self.store.preferences() if r.round <= round_index]
        if not self.D:
            raise ValueError(f"round {round_index}: the judge produced no preference (judge stats: "
                             f"{self.judge.stats.summary()}); use more pbkd.pairs_per_round or another judge")
        fitted = self.fit_round(round_index, records)
        valid = validate(run)
        line = {"round": round_index, "step": steps.start, "pairs_this_round": len(records), "D": len(self.D),
                **{f"valid_{m}": v for m, v in valid.items()}, **fitted, "judge": self.judge_totals}
        with open(run.run_dir / "rounds.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")
        print(f"[{self.cfg.objective} round {round_index}] " + " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in line.items() if k != "judge")
            + f" judge: {self.judge_totals}", flush=True)

    def fit_round(self, round_index: int, records: list) -> dict:
        """Fit the adversary to the grown D; returns the round line's adversary fields."""
        raise NotImplementedError

    def refit_samples(self, records: list) -> list:
        """The round's records whose response_1 is a student sample: what a ``timescale=refit`` fit plays against."""
        students = [r for r in records if r.model_0 == "teacher" and r.model_1.startswith("student")]
        if not students:  # offline against the gold reference: the gap needs the student's own samples
            raise ValueError(f"pbkd.timescale=refit fits the {self.adversary_name} against the round's student "
                             "samples; with pbkd.offline_response=reference there are none (use timescale=inner)")
        return students

    def label_round(self, round_index: int, steps: range) -> list:
        """The round's pairs: for each of its first `pairs_per_round` prompts, the teacher's response
        against each of `pg.samples_per_prompt` samples of the current student (offline with
        `offline_response=reference`: against the gold response), labelled by the judge in one batch.
        With `pbkd.student_pairs`, every pair of a prompt's samples follows (indices after the
        teacher pairs, so a pair's id does not depend on the option)."""
        run, p = self.run, self.p
        seen, examples = set(), []
        for s in steps:
            for i in local_batch_indices(run, s):
                ex = run.train_data[i]
                if ex.prompt not in seen and len(examples) < p.pairs_per_round:
                    seen.add(ex.prompt)
                    examples.append(ex)
        offline_reference = self.cfg.online.rounds == 1 and p.offline_response == "reference"
        if offline_reference:
            triples, model_1 = [(ex, self.teacher_cache[ex.prompt].text, ex.response) for ex in examples], "reference"
        else:
            k = self.cfg.pg.samples_per_prompt
            samples = student_rollouts(run, examples, seed=self.cfg.seed * 7919 + 104_729 * (round_index + 1), k=k)
            texts = samples.texts(run.tokenizer)
            triples = [(examples[i // k], self.teacher_cache[examples[i // k].prompt].text, y)
                       for i, y in enumerate(texts)]
            model_1 = f"student@round{round_index}"
        queries = [PreferenceQuery(prompt=ex.prompt, response_0=y0, response_1=y1, round=round_index, index=i,
                                   model_0="teacher", model_1=model_1, references=tuple(ex.references),
                                   answers=ex.answers)
                   for i, (ex, y0, y1) in enumerate(triples)]
        if self.p.student_pairs:
            within = [(examples[g], texts[g * k + a], texts[g * k + b])
                      for g in range(len(examples)) for a in range(k) for b in range(a + 1, k)]
            queries += [PreferenceQuery(prompt=ex.prompt, response_0=y0, response_1=y1, round=round_index,
                                        index=len(triples) + i, model_0=model_1, model_1=model_1,
                                        references=tuple(ex.references), answers=ex.answers)
                        for i, (ex, y0, y1) in enumerate(within)]
        before = self.judge.stats.as_dict()
        records = self.judge.label(queries)
        after = self.judge.stats.as_dict()
        for k, v in after.items():
            if isinstance(v, int):
                self.judge_totals[k] = self.judge_totals.get(k, 0) + v - before[k]
        return records

    # ---- the student: the stabilised step of section 2a on the adversary's rewards -------------

    def rollout_rewards(self, examples: list[Example], y_S: Rollout, step: int) -> torch.Tensor:
        """The adversary's reward of every rollout of a new rollout batch (after its steps on the batch)."""
        raise NotImplementedError

    def make_batch(self, examples, step):
        self.guarded(self.student_step.current, examples, step, self.rollout_rewards)
        return self.student_step.micro_batches(self.teacher_cache, teacher_responses=self.off_policy)

    def student_loss(self, micro: dict, totals: dict) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def loss(self, micro, totals, diagnostics):
        """The student's loss of a micro-batch, with the adversary's last values (weighted by its share)."""
        loss, metrics = self.student_loss(micro, totals)
        w = float(micro["counts"]["prompts"] / totals["prompts"])
        return loss, metrics | {k: v * w for k, v in self.step_adversary.items()}

    # ---- resume ------------------------------------------------------------------------------

    def adversary_state(self) -> dict:
        return self.adversary.state_dict()

    def load_adversary_state(self, state: dict) -> None:
        self.adversary.load_state_dict(state)

    def state_dict(self) -> dict:
        return {"adversary": self.adversary_state(), "adversary_optimizer": self.adversary_optimizer.state_dict(),
                "lam": self.lam, "nll_ref": self.nll_ref, "round": self.round, "judge_totals": json.dumps(self.judge_totals),
                "store_records": len(self.store), "step_adversary": json.dumps(self.step_adversary),
                "student_step": self.student_step.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.load_adversary_state(state["adversary"])
        self.adversary_optimizer.load_state_dict(state["adversary_optimizer"])
        self.lam, self.nll_ref, self.round = float(state["lam"]), float(state["nll_ref"]), int(state["round"])
        self.judge_totals = json.loads(state["judge_totals"])
        self.step_adversary = json.loads(state.get("step_adversary", "{}"))
        self.student_step.load_state_dict(state.get("student_step", {}))
        if len(self.store) < int(state["store_records"]):
            raise ValueError(f"the preference store {self.store.path} holds {len(self.store)} records but the checkpoint "
                             f"was written with {state['store_records']}; it lost records since. Restore the store "
                             "file of this run (or start a new run)")
        if self.round >= 0:
            self.D = [r for r in self.store.preferences() if r.round <= self.round]


def within_prompt_correlation(r: torch.Tensor, known: torch.Tensor, k: int) -> float | None:
    """The mean, over the prompts (consecutive groups of `k` rows) whose `r` and `known` both vary,
    of their Pearson correlation; None when no prompt qualifies."""
    rs, ks = r.reshape(-1, k).double(), known.reshape(-1, k).double()
    ok = (rs.amax(1) > rs.amin(1)) & (ks.amax(1) > ks.amin(1))
    if not bool(ok.any()):
        return None
    # Each group is scaled by its largest magnitude before centring, so that a real but tiny spread
    # (1e-30) neither underflows in the norms nor is mistaken for a tie.
    rs, ks = rs[ok] / rs[ok].abs().amax(1, keepdim=True), ks[ok] / ks[ok].abs().amax(1, keepdim=True)
    rc, kc = rs - rs.mean(1, keepdim=True), ks - ks.mean(1, keepdim=True)
    return float(((rc * kc).sum(1) / (rc.norm(dim=1) * kc.norm(dim=1))).mean())


def _held_out(record, fraction: float) -> bool:
    """Whether a preference record belongs to the held-out part of D (a fixed hash of its id)."""
    return zlib.crc32(f"{record.round}:{record.index}".encode()) % 10_000 < fraction * 10_000


class PbKD(_PreferenceGame):
    """``pbkd``: the reward model ``r_theta(x, y) = B tanh(<theta, phi(x, y)> / B)`` vs the student.

    The adversary (spec section 2a). ``phi(x, y)`` is the final hidden state at the last token of
    a frozen pretrained backbone (``pbkd.rm_init``: pruned teacher blocks, a copy of the warm-start
    student, or a fresh one); only the bounded linear head ``theta`` is trained, with weight decay.
    The reward class is then linear in fixed features, as the theory's (``pbkd_ref``), and the
    features of every pair of D are computed once, so the Bradley-Terry NLL and its gradient are
    exact on the whole of D at every adversary step: the confidence set
    ``NLL_BT(theta; D_fit) <= NLL_ref + zeta/|D_fit|`` can bind. ``pbkd.heldout_fraction`` of D
    (by a fixed hash of each record id) is kept out of the MLE and of the constraint; the round
    line reports its NLL and accuracy.

    Every round: the MLE warm start on D_fit (``pbkd.mle_steps`` full-batch AdamW steps, giving
    ``NLL_ref``), then by ``pbkd.timescale``

    * ``refit``: ``pbkd.refit_steps`` Lagrangian steps against the round's labelled student
      samples, then the reward model is frozen for the round;
    * ``inner``: on every rollout batch, ``pbkd.adversary_steps`` Lagrangian steps against the
      batch's rollouts before they are scored.

    Each Lagrangian step is ``theta <- theta - eta grad [-(mean r(teacher) - mean r(student)) +
    lam (NLL_BT(theta; D_fit) - NLL_ref - zeta/|D_fit|)]``, then ``lam <- max(0, lam + eta_lam
    (NLL_BT - NLL_ref - zeta/|D_fit|))``. The student trains on ``r_theta`` of its rollouts by the
    stabilised step of section 2a (:class:`llm.objectives.policy_gradient.StudentStep`)."""

    adversary_name = "reward model r_theta"

    def __init__(self, run: Run):
        super().__init__(run)
        self.features: dict = {}  # (round, index) of a record -> (phi(x, tau1), phi(x, tau0)), frozen backbone

    def build_adversary(self):
        model = RewardModel(self.backbone(), bound=self.p.reward_bound)
        model.backbone.eval().requires_grad_(False)
        return model

    def adversary_parameters(self):
        return self.adversary.head.parameters()

    def adversary_state(self) -> dict:  # the backbone is frozen and rebuilt from the config
        return self.adversary.head.state_dict()

    def load_adversary_state(self, state: dict) -> None:
        self.adversary.head.load_state_dict(state)

    # ---- features of the frozen backbone ---------------------------------------------------------

    @torch.no_grad()
    def batch_features(self, batch: dict) -> torch.Tensor:
        return self.adversary.features(batch["input_ids"], batch["attention_mask"]).float()

    def text_features(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        out = []
        for block in chunks(list(range(len(prompts))), self.run.micro_batch_size * self.cfg.pg.samples_per_prompt):
            examples = [Example(prompt=prompts[i], response=responses[i]) for i in block]
            out.append(self.batch_features(encode(self.run, examples, [responses[i] for i in block])))
        return torch.cat(out)

    def D_tensors(self, held_out: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(phi(x, tau1), phi(x, tau0), labels) of D's fit part (or of its held-out part)."""
        missing = [r for r in self.D if (r.round, r.index) not in self.features]
        if missing:
            phi = self.text_features([r.prompt for r in missing] * 2,
                                     [r.response_1 for r in missing] + [r.response_0 for r in missing])
            for i, r in enumerate(missing):
                self.features[(r.round, r.index)] = (phi[i], phi[len(missing) + i])
        part = [r for r in self.D if _held_out(r, self.p.heldout_fraction) == held_out]
        if not part:
            return (torch.zeros(0, 1),) * 3
        phi1 = torch.stack([self.features[(r.round, r.index)][0] for r in part])
        phi0 = torch.stack([self.features[(r.round, r.index)][1] for r in part])
        return phi1, phi0, torch.tensor([r.label for r in part], dtype=torch.float32, device=phi1.device)

    def bt_nll(self, data) -> torch.Tensor:
        phi1, phi0, labels = data
        return losses.bt_nll(self.adversary.head_rewards(phi1), self.adversary.head_rewards(phi0), labels)

    # ---- the round's fit and the Lagrangian steps ------------------------------------------------

    def fit_round(self, round_index, records):
        fit = self.D_tensors(held_out=False)
        if len(fit[2]) == 0:
            raise ValueError(f"round {round_index}: all {len(self.D)} pairs of D fell in the held-out part; lower "
                             "pbkd.heldout_fraction or label more pairs (pbkd.pairs_per_round)")
        opt = torch.optim.AdamW(self.adversary_parameters(), lr=self.p.mle_lr, weight_decay=self.p.adversary_weight_decay)
        for _ in range(self.p.mle_steps):
            nll = self.guarded(self.bt_nll, fit)
            opt.zero_grad(set_to_none=True)
            nll.backward()
            opt.step()
        with torch.no_grad():
            self.nll_ref = float(self.guarded(self.bt_nll, fit))
        line = {"D_fit": len(fit[2]), "nll_ref": self.nll_ref}
        if self.p.timescale == "refit":
            students = self.refit_samples(records)
            phi_S = torch.stack([self.features[(r.round, r.index)][0] for r in students])
            phi_T = torch.stack([self.features[(r.round, r.index)][1] for r in students])
            line |= self.lagrangian_steps(self.p.refit_steps, phi_T, phi_S, fit)
        held = self.D_tensors(held_out=True)
        if len(held[2]):
            with torch.no_grad():
                margin = self.adversary.head_rewards(held[0]) - self.adversary.head_rewards(held[1])
                line |= {"D_heldout": len(held[2]), "heldout_nll": float(self.bt_nll(held)),
                         "heldout_accuracy": float(((margin > 0).float() == held[2]).float().mean())}
        return line

    def lagrangian_steps(self, n: int, phi_T: torch.Tensor, phi_S: torch.Tensor, fit) -> dict:
        """n Lagrangian steps with dual ascent, the BT NLL exact on all of D_fit; the last step's values."""
        positive, radius = 0, self.p.zeta / len(fit[2])  # zeta / |D_fit|
        for _ in range(n):
            nll = self.guarded(self.bt_nll, fit)
            r_T, r_S = self.adversary.head_rewards(phi_T), self.adversary.head_rewards(phi_S)
            loss = losses.pbkd_adversary_loss(r_T, r_S, nll, self.nll_ref, radius, self.lam)
            self.adversary_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.adversary_optimizer.step()
            violation = losses.bt_constraint_violation(float(nll.detach()), self.nll_ref, radius)
            self.lam = losses.dual_ascent(self.lam, violation, self.p.dual_lr)
            positive += self.lam > 0
        with torch.no_grad():
            nll = float(self.bt_nll(fit))
            gap = float(self.adversary.head_rewards(phi_T).mean() - self.adversary.head_rewards(phi_S).mean())
        self.step_adversary = {"lam": self.lam, "lam_positive": positive / max(1, n), "bt_nll": nll,
                               "nll_ref": self.nll_ref, "bt_bound": self.nll_ref + radius, "reward_gap": gap}
        return dict(self.step_adversary)

    def rollout_rewards(self, examples: list[Example], y_S: Rollout, step: int) -> torch.Tensor:
        """r_theta of every rollout; under timescale=inner, after the adversary's steps on this batch.

        The reward model reads text, as the judge does: a rollout is scored as its decoded text
        encoded like D's responses (with the closing EOS), so r_theta sees the same kind of sequence
        it was fitted on; scored as raw ids, a truncated rollout (no EOS) would end where no pair of
        D ever ends, and the student could exploit r_theta there. The student's own batch keeps the ids."""
        k = self.cfg.pg.samples_per_prompt
        phi_S = self.text_features([examples[i // k].prompt for i in range(len(y_S))], y_S.texts(self.run.tokenizer))
        phi_T = self.text_features([ex.prompt for ex in examples], [self.teacher_cache[ex.prompt].text for ex in examples])
        if self.p.timescale == "inner":
            self.lagrangian_steps(self.p.adversary_steps, phi_T, phi_S, self.D_tensors(held_out=False))
        with torch.no_grad():
            self.step_adversary["reward_teacher"] = float(self.adversary.head_rewards(phi_T).mean())
            r = self.adversary.head_rewards(phi_S)
        self.log_known_reward(examples, y_S, r)
        return r

    def log_known_reward(self, examples: list[Example], y_S: Rollout, r: torch.Tensor) -> None:
        """Under the `bt_oracle` judge, log the known reward of the rollouts (``oracle_reward``) and how
        well the adversary ranks a prompt's own samples by it (``oracle_corr``, the mean within-prompt
        Pearson correlation; left out when no prompt's samples differ in both): the leave-one-out
        advantage reads only that ranking."""
        reward_fn = getattr(self.judge, "reward_fn", None)
        if reward_fn is None:
            return
        k = self.cfg.pg.samples_per_prompt
        queries = [PreferenceQuery(prompt=ex.prompt, response_0="", response_1="", references=tuple(ex.references),
                                   answers=ex.answers) for ex in examples]
        known = torch.tensor([reward_fn(queries[i // k], y) for i, y in enumerate(y_S.texts(self.run.tokenizer))])
        self.step_adversary["oracle_reward"] = float(known.mean())
        corr = within_prompt_correlation(r.detach().float().cpu(), known, k)
        if corr is None:
            self.step_adversary.pop("oracle_corr", None)
        else:
            self.step_adversary["oracle_corr"] = corr

    def student_loss(self, micro, totals):
        return self.student_step.loss(micro, totals)


class MMPbKD(_PreferenceGame):
    """``mm_pbkd``: Q-head f_phi vs student, moments mixed by beta, induced reward in the BT constraint."""

    adversary_name = "Q-head f_phi"
    off_policy = True

    def __init__(self, run: Run):
        if not run.shared_vocabulary:
            raise ValueError("objective=mm_pbkd is white-box: teacher and student must share a vocabulary "
                             "(use objective=pbkd for text-only distillation)")
        super().__init__(run)
        self.teacher_on_D: dict = {}  # (round, index) -> {"1" | "0": the teacher's p on that response, unpadded}
        self.features_on_D: dict = {}  # the same for the frozen Q-head backbone's h (pbkd.mm_frozen_backbone)

    def build_adversary(self):
        return QHead(self.backbone(), bound=self.p.q_bound, frozen_backbone=self.p.mm_frozen_backbone)

    def adversary_parameters(self):
        return self.adversary.head.parameters() if self.p.mm_frozen_backbone else self.adversary.parameters()

    @property
    def zeta_over_n(self) -> float:
        return self.p.zeta / len(self.D)

    # ---- the Q-head's minibatch BT likelihood, MLE warm start and Lagrangian steps -----------------

    def encode_sides(self, records) -> dict:
        """{"1": the records' responses tau1 encoded after their prompts, "0": their responses tau0}."""
        prompts = [Example(prompt=r.prompt, response=r.response_1) for r in records]
        return {"1": encode(self.run, prompts, [r.response_1 for r in records]),
                "0": encode(self.run, prompts, [r.response_0 for r in records])}

    def pair_rewards(self, records) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_f(x, tau1), r_f(x, tau0)) of preference records, with gradient to the Q-head; the teacher's
        distributions on D's pairs come from the round's cache (computed once per record)."""
        out = []
        for side, batch in self.encode_sides(records).items():
            p = self.cached_teacher(records, side, batch)
            r_f = losses.induced_sequence_reward(self.record_f(records, side, batch), p, batch["labels"],
                                                 batch["response_mask"])
            out.append(r_f / batch["response_mask"].sum(1) if self.p.mm_length_normalize else r_f)
        return out[0], out[1]

    def teacher_distribution(self, batch) -> torch.Tensor | losses.TopKProbs:
        """The teacher's p(.|s_h) at the batch's response positions: dense, or its top pbkd.mm_teacher_topk."""
        logits = teacher_logits(self.run, batch).float()
        if 0 < self.p.mm_teacher_topk < logits.shape[-1]:  # a vocabulary no larger than k is kept whole
            return losses.TopKProbs(*losses.teacher_topk(logits, self.p.mm_teacher_topk))
        return torch.softmax(logits, -1)

    def cache_records(self, records) -> None:
        """The frozen quantities of both responses of every record not yet cached, computed once for the run:
        the teacher's distributions and, with `pbkd.mm_frozen_backbone`, the Q-head backbone's features."""
        missing = [r for r in records if (r.round, r.index) not in self.teacher_on_D]
        for block in chunks(missing, self.p.bt_batch_size):
            for side, batch in self.encode_sides(block).items():
                p, n = self.teacher_distribution(batch), batch["response_mask"].sum(1).tolist()
                h = (self.adversary.features(batch["input_ids"], batch["attention_mask"], batch["positions"])
                     if self.p.mm_frozen_backbone else None)
                for i, r in enumerate(block):
                    self.teacher_on_D.setdefault((r.round, r.index), {})[side] = _row(p, i, int(n[i]))
                    if h is not None:
                        self.features_on_D.setdefault((r.round, r.index), {})[side] = _row(h, i, int(n[i]))

    def cached_teacher(self, records, side: str, batch: dict):
        """The cached teacher distributions of `records`' responses `side`, laid out as `batch`'s positions."""
        self.cache_records(records)
        rows = [self.teacher_on_D[(r.round, r.index)][side] for r in records]
        p, device = _stack_rows(rows, batch["labels"].shape[1]), batch["labels"].device
        if isinstance(p, losses.TopKProbs):
            return losses.TopKProbs(p.ids.to(device), p.logp.to(device), p.tail_logp.to(device))
        return p.to(device)

    def preference_batch(self, tag: int):
        """A seeded minibatch of D (the same after a resume)."""
        D = self.D
        size = min(self.p.bt_batch_size, len(D))
        return random.Random(self.cfg.seed * 1_000_003 + tag).sample(D, size)

    def bt_nll_of(self, records) -> torch.Tensor:
        r1, r0 = self.pair_rewards(records)
        labels = torch.tensor([r.label for r in records], device=r1.device)
        return losses.bt_nll(r1, r0, labels)

    def full_bt_nll(self) -> float:
        with torch.no_grad():
            values = [self.bt_nll_of(block) * len(block) for block in chunks(self.D, self.p.bt_batch_size)]
        return float(sum(values) / len(self.D))

    def fit_round(self, round_index, records):
        """MLE warm start: `pbkd.mle_steps` Adam steps on NLL_BT(phi; D) minibatches; NLL_ref = NLL_BT at the end.
        Under ``pbkd.timescale=refit`` then `pbkd.refit_steps` Lagrangian steps against the round's labelled
        student samples (the Q-head is frozen for the round after them)."""
        opt = torch.optim.AdamW(self.adversary_parameters(), lr=self.p.mle_lr)
        self.adversary.train()
        for j in range(self.p.mle_steps):
            nll = self.guarded(self.bt_nll_of, self.preference_batch(10_000_019 * (round_index + 1) + j))
            opt.zero_grad(set_to_none=True)
            nll.backward()
            torch.nn.utils.clip_grad_norm_(self.adversary.parameters(), self.cfg.optim.grad_clip or float("inf"))
            opt.step()
        self.nll_ref = self.guarded(self.full_bt_nll)
        line = {"nll_ref": self.nll_ref, "bt_bound": self.nll_ref + self.zeta_over_n}
        if self.p.timescale == "refit":
            students = self.refit_samples(records)
            self.adversary_update(self.refit_lagrangian(round_index, students), 20_000_003 * (round_index + 1),
                                  self.p.refit_steps)
            line |= {"bt_nll": self.guarded(self.full_bt_nll), "lam_positive": self.step_adversary["lam_positive"]}
        with torch.no_grad():
            r1, r0 = self.guarded(self.pair_rewards, records[: self.p.bt_batch_size]) if records else (torch.zeros(1),) * 2
        return line | {"lam": self.lam, "reward_gap": float((r0 - r1).mean())}

    def refit_lagrangian(self, round_index: int, students: list):
        """The refit's Lagrangian of step j: the moments on a seeded minibatch of the round's (teacher,
        student sample) records -- p on the samples from the round's cache, q of the round's (frozen)
        student on the teacher responses -- with NLL_BT on a D minibatch."""
        run, beta = self.run, self.p.mm_beta
        size = min(self.p.bt_batch_size, len(students))

        def lagrangian(nll, j):
            block = random.Random(self.cfg.seed * 1_000_033 + 30_000_001 * (round_index + 1) + j).sample(students, size)
            sides = self.encode_sides(block)
            S, T = sides["1"], sides["0"]
            with torch.no_grad():
                q_T = torch.softmax(logits_of(run.student, T, run).float(), -1)
            off, on = self.moments(T, S, q_T, self.cached_teacher(block, "1", S),
                                   self.record_f(block, "0", T), self.record_f(block, "1", S))
            loss = losses.mm_pbkd_adversary_loss(off, on, nll, self.nll_ref, self.zeta_over_n, self.lam, beta)
            return loss, (beta * off + (1 - beta) * on).detach()

        return lagrangian

    def adversary_update(self, loss_of_nll, tag: int, steps: int) -> None:
        """`steps` Adam steps on loss_of_nll(NLL_BT on a D minibatch, j), each followed by dual ascent on lam."""
        clip = self.cfg.optim.grad_clip or float("inf")
        self.adversary.train()
        positive = 0
        if steps == 0:  # a fixed adversary (the MLE of the round): measure, do not move
            with torch.no_grad():
                nll = self.guarded(self.bt_nll_of, self.preference_batch(tag * 97))
                _, gap = loss_of_nll(nll, 0)
        for j in range(steps):
            nll = self.guarded(self.bt_nll_of, self.preference_batch(tag * 97 + j))
            loss, gap = loss_of_nll(nll, j)
            self.adversary_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.adversary.parameters(), clip)
            self.adversary_optimizer.step()
            violation = losses.bt_constraint_violation(float(nll.detach()), self.nll_ref, self.zeta_over_n)
            self.lam = losses.dual_ascent(self.lam, violation, self.p.dual_lr)
            positive += self.lam > 0
        self.step_adversary = {"lam": self.lam, "lam_positive": positive / max(1, steps), "bt_nll": float(nll.detach()),
                               "nll_ref": self.nll_ref, "bt_bound": self.nll_ref + self.zeta_over_n,
                               "reward_gap": float(gap)}

    def f_values(self, batch) -> torch.Tensor:
        """f_phi(s_h, .) at the response positions, (B, K, V), aligned with batch["labels"]."""
        return self.adversary(batch["input_ids"], batch["attention_mask"], batch["positions"])

    def f_of(self, batch: dict):
        """A function giving f_phi (with gradient) on `batch` for the Q-head as it is when called: with
        `pbkd.mm_frozen_backbone` the batch's features are computed here, once, and each call runs the head."""
        if not self.p.mm_frozen_backbone:
            return lambda: self.f_values(batch)
        h = self.adversary.features(batch["input_ids"], batch["attention_mask"], batch["positions"])
        valid = batch["attention_mask"].gather(1, batch["positions"])
        return lambda: self.adversary.head_values(h, valid)

    def record_f(self, records, side: str, batch: dict) -> torch.Tensor:
        """f_phi (with gradient) on the responses `side` of D's `records`, encoded as `batch`: with
        `pbkd.mm_frozen_backbone` the head alone on the cached features, otherwise the Q-head's forward."""
        if not self.p.mm_frozen_backbone:
            return self.f_values(batch)
        self.cache_records(records)
        rows = [self.features_on_D[(r.round, r.index)][side] for r in records]
        h = _stack_rows(rows, batch["labels"].shape[1]).to(batch["labels"].device)
        return self.adversary.head_values(h, batch["response_mask"])

    def sequence_rewards(self, batch):
        """The induced reward r_f(tau) = sum_h [f(s_h, y_h) - <p(.|s_{h+1}), f(s_{h+1}, .)>]."""
        return losses.induced_sequence_reward(self.f_values(batch), self.teacher_distribution(batch), batch["labels"],
                                              batch["response_mask"])

    def moments(self, T: dict, S: dict, q_T: torch.Tensor, p_S: torch.Tensor, f_T: torch.Tensor, f_S: torch.Tensor):
        """(off-policy moment on teacher rollouts T, on-policy moment on student rollouts S), from f_phi on
        them with gradient."""
        off = losses.q_moment_off_policy(f_T, q_T, T["labels"], T["response_mask"])
        on = losses.q_moment_on_policy(f_S, p_S, S["labels"], S["response_mask"])
        return off, on

    def rollout_rewards(self, examples: list[Example], y_S: Rollout, step: int) -> torch.Tensor:
        """The induced reward r_f(tau) of every rollout; under ``pbkd.timescale=inner``, after the Q-head's
        `pbkd.adversary_steps` on this rollout batch.

        Each frozen quantity is computed once for the batch: the teacher's p on the rollouts and (inner)
        the student's q on the teacher responses (the adversary's moments), with a frozen Q-head
        backbone its features on both; then f after its steps."""
        run, beta = self.run, self.p.mm_beta
        S_all = encode_rollout(run, y_S)
        with torch.no_grad():
            p_S = self.teacher_distribution(S_all)
        f_S = self.f_of(S_all)
        if self.p.timescale == "inner":
            T_all = encode_teacher_responses(run, examples, self.teacher_cache)
            f_T = self.f_of(T_all)
            with torch.no_grad():
                q_T = torch.softmax(logits_of(run.student, T_all, run).float(), -1)

            def lagrangian(nll, j):  # -(beta off + (1-beta) on) + lam (NLL_BT(r_f) - NLL_ref - zeta/|D|)
                off, on = self.moments(T_all, S_all, q_T, p_S, f_T(), f_S())
                loss = losses.mm_pbkd_adversary_loss(off, on, nll, self.nll_ref, self.zeta_over_n, self.lam, beta)
                return loss, (beta * off + (1 - beta) * on).detach()

            self.adversary_update(lagrangian, step, self.p.adversary_steps)
        with torch.no_grad():
            self.adversary.eval()
            return losses.induced_sequence_reward(self.guarded(f_S), p_S, S_all["labels"], S_all["response_mask"])

    def make_batch(self, examples, step):
        """The student step's micro-batches, each with f of the current Q-head on its teacher responses. The
        Q-head moves when a rollout batch is drawn and when a round starts, so f is that of the batch's
        draw at every step that reuses it unless a round boundary falls inside the batch (then that of
        the round's fit); a resume restores the Q-head, so it recomputes the same f."""
        micros = super().make_batch(examples, step)
        with torch.no_grad():
            self.adversary.eval()
            for micro in micros:
                micro["f_T"] = self.guarded(self.f_values, micro["T"])
        return micros

    def student_loss(self, micro, totals):
        """``(1 - beta)`` times the student step's PPO surrogate on r_f (the on-policy moment's gradient, by
        telescoping) plus ``beta`` times the off-policy moment on the teacher responses, differentiated
        through q and token-mean normalised over the batch's teacher tokens as the surrogate is over its
        rollout tokens."""
        run, T, beta = self.run, micro["T"], self.p.mm_beta
        pg_loss, metrics = self.student_step.loss(micro, totals, pg_weight=1 - beta)
        q_T = torch.softmax(logits_of(run.student, T, run).float(), -1)
        off = losses.q_moment_off_policy(micro["f_T"], q_T, T["labels"], T["response_mask"])
        loss = pg_loss + beta * off * len(T["labels"]) / totals["teacher_tokens"]
        w = float(micro["counts"]["prompts"] / totals["prompts"])
        return loss, metrics | {"off_moment": float(off.detach()) * w, "loss": float(loss.detach())}


def _row(p, i: int, n: int):
    """Row i's first n positions of dense (B, K, V) probabilities or (B, K, H) features, or a TopKProbs, on the CPU."""
    if isinstance(p, losses.TopKProbs):
        return losses.TopKProbs(p.ids[i, :n].cpu(), p.logp[i, :n].cpu(), p.tail_logp[i, :n].cpu())
    return p[i, :n].cpu()


def _stack_rows(rows: list, K: int):
    """Cached per-row distributions laid out as a batch of K response positions (padding: zeros / no mass)."""
    def pad(x, value):
        out = torch.full((K, *x.shape[1:]), value, dtype=x.dtype)
        out[: len(x)] = x[:K]
        return out
    if isinstance(rows[0], losses.TopKProbs):
        return losses.TopKProbs(torch.stack([pad(r.ids, 0) for r in rows]), torch.stack([pad(r.logp, float("-inf")) for r in rows]),
                                torch.stack([pad(r.tail_logp, float("-inf")) for r in rows]))
    return torch.stack([pad(r, 0.0) for r in rows])

"""The objective interface and the one registry of objectives by name (spec llm.md section 2).

This module imports nothing beyond the standard library: `llm/config.py` reads the names here
to validate a config before any model is loaded, and `llm/models.py` reads
`TOKEN_LEVEL_OBJECTIVES` to check vocabularies. An objective's class is imported only when a run
builds it (:func:`build_objective`), from its module inside this package.

Adding an objective: a class (subclass of :class:`Objective`) in the module of its family, and
one entry in `REGISTRY`; tests check that every entry resolves to such a class.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: importing these would load torch
    import torch

    from llm.data import Example
    from llm.run import Run

DIVERGENCE_OBJECTIVES = ("fkl", "rkl", "jsd", "skl", "srkl", "akl")
"""Per-token distribution matching of p(.|s_h) against q(.|s_h) (llm.losses.TOKEN_OBJECTIVES)."""

REGISTRY = {
    "sft": "token_level:SFT",
    "seqkd": "token_level:SeqKD",
    **{name: "token_level:TokenKD" for name in DIVERGENCE_OBJECTIVES},
    "dpkd": "dpkd:DPKD",
    "rloo": "policy_gradient:RLOO",
    "pbkd": "preference_game:PbKD",
    "mm_pbkd": "preference_game:MMPbKD",
}
"""Objective name -> `module:Class` inside `llm.objectives`."""

OBJECTIVES = tuple(REGISTRY)
"""Every objective selectable by name (`objective=NAME`)."""

TOKEN_LEVEL_OBJECTIVES = (*DIVERGENCE_OBJECTIVES, "mm_pbkd")
"""Objectives that compare teacher and student distributions index by index, so they need one vocabulary."""

TEXT_LEVEL_OBJECTIVES = tuple(name for name in OBJECTIVES if name not in TOKEN_LEVEL_OBJECTIVES)
"""Objectives that exchange only text between teacher and student: any two vocabularies work."""


def objective_class(name: str) -> type[Objective]:
    """The class registered for `name` (imported from its module on first use)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(f"llm.objectives.{module}"), cls)


def build_objective(run: Run) -> Objective:
    """The objective `run.cfg.objective`, built for `run`."""
    return objective_class(run.cfg.objective)(run)


class Objective:
    """One training objective.

    `make_batch` turns this process's examples of one step into micro-batches, each with the
    `counts` of its loss units (e.g. response tokens); `loss` returns the micro-batch's summed
    loss divided by `totals`, the counts of the whole batch over all micro-batches and processes,
    plus diagnostics in the same normalisation (so they add up to batch means).
    `start_round` runs when a round of `online.rounds` begins; `state_dict`/`load_state_dict`
    carry what the objective generated across a resume. An objective that sets
    `uses_teacher_responses` finds its cached teacher samples (llm.rollout.teacher_responses)
    in `teacher_cache`, by prompt."""

    uses_teacher_responses = False
    policy_gradient = False  # trained by llm.objectives.policy_gradient.StudentStep, at pg.lr against a frozen pi_ref

    def __init__(self, run: Run):
        self.run = run
        self.cfg = run.cfg
        self.teacher_cache: dict = {}  # prompt -> cached teacher sample, filled by the set-up when used

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

"""The training objectives of spec llm.md section 2, one module per family.

- :mod:`llm.objectives.base`: the :class:`~llm.objectives.base.Objective` interface and the one
  registry of names (standard library only, so the config reads it without loading torch);
- :mod:`llm.objectives.token_level`: ``sft``, ``seqkd`` and the per-token divergences
  ``fkl``, ``rkl``, ``jsd``, ``skl``, ``srkl``, ``akl``;
- :mod:`llm.objectives.dpkd`: Direct Preference Knowledge Distillation;
- :mod:`llm.objectives.preference_game`: the PbKD games ``pbkd`` and ``mm_pbkd``.

Each objective's loss is a pure function of :mod:`llm.losses`; the modules here only build its
batches from the run (:mod:`llm.run`) and its samples (:mod:`llm.rollout`).
"""

"""Exact tabular mathematics of preference-based knowledge distillation (spec tabular.md).

Data flows one way: ``mdp`` (instances, occupancies, planning) -> ``preferences``
(Bradley-Terry pairs) -> ``mle`` -> ``confidence`` (likelihood-ratio sets) -> the
min-max solvers -> the student.  ``bracketing`` is the constructive Proposition 1
behind the bracketing radius.  Submodules are imported explicitly, e.g.
``from pbkd_ref.mdp import random_mdp``; this package file imports nothing heavy.
"""

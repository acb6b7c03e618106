"""The LLM layer: the PbKD, MM PbKD and DPKD objectives at the scale of causal language models.

Spec: llm.md. Generation is the token-level MDP of section 1 (state = prompt plus the
response so far, action = the next token); the objectives of section 2 are pure functions
of tensors in :mod:`llm.losses`, kept apart from models (:mod:`llm.models`), data
(:mod:`llm.data`), evaluation (:mod:`llm.evaluate`), rollouts (:mod:`llm.rollout`), the objectives
that build their batches (:mod:`llm.objectives`) and the training loop (``llm/train.py``). The
README's layout section lists the layers; no module imports one above it.
"""

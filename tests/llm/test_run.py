"""Tests of `llm/run.py`: the packed response layout the token-level losses run on (spec llm.md
section 2: masked means over response tokens)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from llm.data import collate_rows
from llm.models import fresh_student, tiny_config
from llm.run import _narrow, head_inputs, logits_of, packed_labels

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [([5, 6, 7], [8, 9]), ([11], [12, 13, 14, 15]), ([21, 22, 23, 24, 25], [26])]


def _fake_run(model, distributed="none"):
    return SimpleNamespace(student=model, teacher=None, cfg=SimpleNamespace(distributed=distributed),
                           accelerator=SimpleNamespace(unwrap_model=lambda m: m), autocast=contextlib.nullcontext)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_head_inputs_are_the_hidden_states_of_the_real_response_tokens_only(family):
    """head(hidden) is the model's own logits at each real response token, row by row, and
    nothing else (no padding rows); packed_labels are the next tokens there."""
    model = fresh_student(tiny_config(family, 64), seed=0).eval()
    batch = _narrow(collate_rows(ROWS, pad=0), "cpu")
    run = _fake_run(model)
    hidden, weight, bias = head_inputs(model, batch, run)
    n = sum(len(r) for _, r in ROWS)
    assert hidden.shape[0] == n
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = torch.cat([full[i, len(p) - 1 : len(p) - 1 + len(r)] for i, (p, r) in enumerate(ROWS)])
    torch.testing.assert_close(F.linear(hidden, weight, bias), expected, rtol=1e-5, atol=1e-5)
    assert packed_labels(batch).tolist() == [t for _, r in ROWS for t in r]
    # the hook is gone afterwards: the model's forward gives full logits again
    assert logits_of(model, batch, run).shape == (3, 4, 64)


def test_sharding_engines_get_the_logits_from_the_models_own_head():
    model = fresh_student(tiny_config("gpt2", 64), seed=0).eval()
    batch = _narrow(collate_rows(ROWS, pad=0), "cpu")
    logits, weight, bias = head_inputs(model, batch, _fake_run(model, "fsdp"))
    assert weight is None and bias is None
    hidden, w, b = head_inputs(model, batch, _fake_run(model))
    torch.testing.assert_close(logits, F.linear(hidden, w, b), rtol=1e-5, atol=1e-5)

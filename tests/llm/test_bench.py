"""Tests of `llm/bench.py` (the LLM-layer benchmark): a quick run on tiny models, no timings asserted."""

from __future__ import annotations

import json

import torch

import pytest

from llm import bench, losses
from llm.models import GPT2_TOKENIZER_NAME, fresh_student, load_tokenizer, tiny_config


def test_quick_bench_writes_the_scratch_folder_with_its_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        record = bench.main(["--quick", "--repeats", "1", "--ks", "2", "--prompts", "2", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert not (tmp_path / "figures").exists()  # a quick run never writes the committed figures
    written = json.loads((tmp_path / "runs" / "quick" / "llm_bench.json").read_text())
    assert written == json.loads(json.dumps(record)) and written["mode"] == "quick"
    k2 = written["rollout"]["results"]["k2"]
    assert k2["speedup"] == k2["shared_prefill"]["tokens_per_s"] / k2["generate_repeated_prompts"]["tokens_per_s"]
    assert set(written["environment"]) >= {"torch", "threads", "cpu_count"}
    steps, summary = written["steps"]["results"], written["summary"]
    for name in ("sft", "fkl", "jsd"):  # token-level: the floor on the same batches, and the ratio
        assert summary[f"step_vs_floor_{name}"] == steps[name]["s_per_step"] / steps[name]["floor_s_per_step"]
        assert steps[name]["response_tokens_per_step"] > 0
    assert "floor_s_per_step" not in steps["pbkd"] and steps["pbkd"]["s_per_step"] > 0
    game = written["game"]["results"]
    assert summary["mm_pbkd_vs_pbkd"] == game["mm_pbkd"]["s_per_step"] / game["pbkd"]["s_per_step"]
    assert summary["mm_pbkd_fit_frozen_vs_trained"] == game["mm_pbkd_frozen"]["fit_s"] / game["mm_pbkd"]["fit_s"]
    assert all(0 < game[name]["fit_s"] < game[name]["round_s"] for name in ("pbkd", "mm_pbkd", "mm_pbkd_frozen"))
    assert summary["topk_speedup_fkl_k8"] == written["topk"]["k"]["k8"]["speedup"]
    errors = written["topk"]["errors"]["fkl"]["k8"]
    assert 0 <= errors["value_rel_error"] < 1 and errors["grad_rel_error"] > 0
    memory = written["memory"]
    assert memory["chunked"]["value"] == pytest.approx(memory["unchunked"]["value"], rel=1e-5)


@pytest.mark.parametrize("name", bench.TOKEN_LEVEL)
def test_the_floors_losses_are_the_projects_formulas(name):
    """The floor is the same formula written plainly: a floor that computed something else would
    make step_vs_floor meaningless."""
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 9, generator=gen), 2 * torch.randn(6, 9, generator=gen)
    labels = torch.randint(0, 9, (6,), generator=gen)
    kwargs = {"beta": 0.3, "alpha": 0.2, "mu": 0.5}
    ones = torch.ones(1, 6)
    if name in ("sft", "seqkd"):
        want = losses.sft_loss(s[None], labels[None], ones)
    else:
        own = {"jsd": {"beta": 0.3}, "skl": {"alpha": 0.2}, "srkl": {"alpha": 0.2}, "akl": {"mu": 0.5}}.get(name, {})
        want = losses.TOKEN_OBJECTIVES[name](s[None], t[None], ones, **own)
    torch.testing.assert_close(bench.minimal_loss(name, s, t, labels, kwargs), want, rtol=1e-5, atol=1e-6)


def test_the_comparison_point_samples_k_rows_per_prompt_cut_at_eos():
    tok = load_tokenizer(GPT2_TOKENIZER_NAME)
    eos = tok.eos_token_id
    model = fresh_student(tiny_config("gpt2", 50257, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos), seed=1)
    prompts = [tok("one two")["input_ids"], tok("three")["input_ids"]]
    rows = bench.generate_k_times(model.eval(), tok, prompts, seed=0, k=3, max_new_tokens=4, batch_size=4)
    assert len(rows) == 6 and all(1 <= len(r) <= 4 for r in rows)
    assert all(eos not in r[:-1] for r in rows)

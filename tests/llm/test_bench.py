"""Tests of `llm/bench.py` (the LLM-layer benchmark): a quick run on a tiny model, no timings asserted."""

from __future__ import annotations

import json

import torch

from llm import bench
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


def test_the_comparison_point_samples_k_rows_per_prompt_cut_at_eos():
    tok = load_tokenizer(GPT2_TOKENIZER_NAME)
    eos = tok.eos_token_id
    model = fresh_student(tiny_config("gpt2", 50257, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos), seed=1)
    prompts = [tok("one two")["input_ids"], tok("three")["input_ids"]]
    rows = bench.generate_k_times(model.eval(), tok, prompts, seed=0, k=3, max_new_tokens=4, batch_size=4)
    assert len(rows) == 6 and all(1 <= len(r) <= 4 for r in rows)
    assert all(eos not in r[:-1] for r in rows)

"""Tests of the teacher top-k cache, `llm/teacher_topk.py` (spec llm.md section 6), on the tiny
GPT-2 run assets of conftest.py (vocabulary 50,257)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from llm import train as trainer
from llm.config import load_config
from llm.objectives import token_level
from llm.teacher_topk import TeacherTopK

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(assets, tmp_path, **overrides):
    cfg = assets.config(tmp_path, objective="fkl", max_steps=2, **overrides)
    path = tmp_path / "config.yaml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return trainer.train(load_config(path))


def _losses(run_dir) -> list[float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["split"] == "train"]


@pytest.fixture
def teacher_calls(monkeypatch):
    """Which models the token-level losses run: True for each teacher forward."""
    calls = []
    original = token_level.head_inputs

    def spy(model, batch, run):
        calls.append(model is run.teacher)
        return original(model, batch, run)

    monkeypatch.setattr(token_level, "head_inputs", spy)
    return calls


def _cache_files(tmp_path):
    return sorted((tmp_path / "cache" / "teacher_topk").glob("*.safetensors"))


def test_cached_training_never_runs_the_teacher_and_matches_the_full_loss_at_full_k(pbkd_assets, tmp_path,
                                                                                  teacher_calls):
    """k = the whole vocabulary leaves an empty tail: the cached loss is the full one (to rounding).
    The teacher forward of every step is gone; without the cache each step runs it."""
    full = _losses(_train(pbkd_assets, tmp_path / "full")["run_dir"])
    assert any(teacher_calls)
    teacher_calls.clear()
    cached = _losses(_train(pbkd_assets, tmp_path / "cached", **{"kd.teacher_topk": 50257})["run_dir"])
    assert teacher_calls and not any(teacher_calls)
    assert cached == pytest.approx(full, rel=1e-4)


def test_small_k_is_a_lower_bound_and_the_cache_is_built_once(pbkd_assets, tmp_path):
    full = _losses(_train(pbkd_assets, tmp_path / "full")["run_dir"])
    first = _losses(_train(pbkd_assets, tmp_path, **{"kd.teacher_topk": 8})["run_dir"])
    assert first[0] < full[0]  # data processing: merged buckets can only lower the KL
    [path] = _cache_files(tmp_path)
    stamp = path.stat().st_mtime_ns
    again = _losses(_train(pbkd_assets, tmp_path, **{"kd.teacher_topk": 8})["run_dir"])
    assert again == first and path.stat().st_mtime_ns == stamp  # read, not recomputed
    _train(pbkd_assets, tmp_path, **{"kd.teacher_topk": 8, "seed": 1})  # other batches: rows added to the file
    assert path.stat().st_mtime_ns != stamp and len(_cache_files(tmp_path)) == 1


def test_torn_and_stale_caches_are_refused_with_the_command_to_rebuild(pbkd_assets, tmp_path):
    _train(pbkd_assets, tmp_path, **{"kd.teacher_topk": 8})
    [path] = _cache_files(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"torn .*rm .*safetensors"):
        _train(pbkd_assets, tmp_path, **{"kd.teacher_topk": 8})
    # another teacher's weights under the same name: the fingerprint in the header no longer matches
    teacher = tmp_path / "teacher"
    shutil.copytree(pbkd_assets / "teacher", teacher)
    _train(pbkd_assets, tmp_path / "other", teacher=str(teacher), **{"kd.teacher_topk": 8})
    model = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    model.save_pretrained(teacher)
    with pytest.raises(ValueError, match=r"stale: delete it \(rm .*safetensors\)"):
        _train(pbkd_assets, tmp_path / "other", teacher=str(teacher), **{"kd.teacher_topk": 8})


def test_a_batch_the_cache_does_not_hold_is_refused_as_stale():
    cache = TeacherTopK(Path("c.safetensors"), torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, 2),
                        torch.zeros(0), {}, "rebuild it")
    batch = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "keep": torch.tensor([[False, True, True]])}
    with pytest.raises(ValueError, match="stale: rebuild it"):
        cache.lookup(batch, "cpu")


def test_the_cache_is_refused_where_no_batch_would_use_it(tmp_path, pbkd_assets):
    with pytest.raises(ValueError, match="kd.teacher_topk"):
        load_config(None, ["objective=sft", "kd.teacher_topk=8"])
    with pytest.raises(ValueError, match="kd.teacher_topk"):
        load_config(None, ["objective=fkl", "kd.teacher_topk=8", "kd.on_policy_fraction=1.0"])

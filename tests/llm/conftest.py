"""Fixtures shared by the `llm/` tests.

- Tiny run assets for the preference-game tests (`test_pbkd.py`) and the experiment tests
  (`test_experiments.py`): randomly initialised GPT-2 teacher and student saved with the real
  GPT-2 tokenizer, and a small generated Dolly-format set whose references make the `bt_oracle`
  judge informative.
- `one_thread` (a module that uses it runs its tiny models on one thread) and `gpt2_tokenizer`."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm.models import GPT2_TOKENIZER_NAME, gpt2_tokenizer_dir, load_tokenizer, tiny_config


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, above all on a shared machine; restored afterwards.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """GPT-2's real tokenizer (50,257 tokens; EOS = pad = 50256)."""
    return load_tokenizer(GPT2_TOKENIZER_NAME)


WORDS = "red green blue cat dog sun moon tree river stone apple bread lamp cloud".split()


@dataclass(frozen=True)
class TinyRunAssets:
    """The folder of the tiny models and data, and the `llm/train.py` config of a quick run on them."""

    root: Path

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    def config(self, tmp_path: Path, **overrides) -> dict:
        """A `pbkd` run of 4 steps on the tiny assets; dotted keys of `overrides` reach into sections."""
        root = self.root
        cfg = {
            "run_name": "run", "out_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"),
            "teacher": str(root / "teacher"), "student": str(root / "student"), "student_init": "pretrained",
            "objective": "pbkd",
            "data": {"source": "files", "train_file": str(root / "train.jsonl"),
                     "valid_file": str(root / "valid.jsonl"), "test_file": str(root / "test.jsonl"),
                     "max_prompt_tokens": 48, "max_length": 64},
            "generation": {"max_new_tokens": 5, "batch_size": 8},
            "eval": {"every": 0, "valid_seeds": [10], "test_seeds": [10], "max_new_tokens": 4, "batch_size": 8,
                     "before": False, "teacher": False},
            "optim": {"lr": 1e-3, "schedule": "constant"},
            "pbkd": {"pairs_per_round": 6, "mle_steps": 3, "bt_batch_size": 4,
                     "judge_options": {"reward": "rouge_l", "reward_scale": 10.0},
                     "rm_config": {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2}},
            "batch_size": 4, "max_steps": 4, "log_every": 1, "save_every": 0, "num_threads": 1,
        }
        for key, value in overrides.items():
            section = cfg
            *parents, leaf = key.split(".")
            for p in parents:
                section = section.setdefault(p, {})
            section[leaf] = value
        return cfg


@pytest.fixture(scope="session")
def pbkd_assets(tmp_path_factory) -> TinyRunAssets:
    root = tmp_path_factory.mktemp("pbkd_assets")
    tokenizer = load_tokenizer(gpt2_tokenizer_dir())
    for name, seed in (("teacher", 1), ("student", 2)):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config("gpt2", len(tokenizer), resid_pdrop=0.0,
                                                             embd_pdrop=0.0, attn_pdrop=0.0))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rng = random.Random(0)
    for split, n in (("train", 32), ("valid", 4), ("test", 4)):
        with open(root / f"{split}.jsonl", "w") as handle:
            for _ in range(n):
                words = rng.sample(WORDS, rng.randint(1, 4))
                handle.write(json.dumps({"instruction": "Repeat these words.", "context": " ".join(words),
                                         "response": " ".join(words), "category": "repeat"}) + "\n")
    return TinyRunAssets(root)

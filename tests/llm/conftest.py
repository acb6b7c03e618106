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
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from llm.data import Example, encode_sft_batch, format_prompt, load_jsonl, prompt_token_ids
from llm.judges import PreferenceQuery, rouge_reward
from llm.losses import sft_loss
from llm.models import GPT2_TOKENIZER_NAME, gpt2_tokenizer_dir, load_causal_lm, load_tokenizer, tiny_config
from llm.rollout import rollout


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


def _files_run(root: Path, tmp_path: Path, *, max_prompt_tokens: int, max_length: int) -> dict:
    """The part of a quick run's config that names its folders, its models in `root` and its JSONL data."""
    return {
        "run_name": "run", "out_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"),
        "teacher": str(root / "teacher"), "student": str(root / "student"), "student_init": "pretrained",
        "data": {"source": "files", "train_file": str(root / "train.jsonl"), "valid_file": str(root / "valid.jsonl"),
                 "test_file": str(root / "test.jsonl"), "max_prompt_tokens": max_prompt_tokens,
                 "max_length": max_length},
    }


def _with_overrides(cfg: dict, overrides: dict) -> dict:
    """`cfg` with `overrides` set in place; a dotted key reaches into its sections."""
    for key, value in overrides.items():
        section = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            section = section.setdefault(p, {})
        section[leaf] = value
    return cfg


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
            **_files_run(root, tmp_path, max_prompt_tokens=48, max_length=64),
            "objective": "pbkd",
            "generation": {"max_new_tokens": 5, "batch_size": 8},
            "eval": {"every": 0, "valid_seeds": [10], "test_seeds": [10], "max_new_tokens": 4, "batch_size": 8,
                     "before": False, "teacher": False},
            "optim": {"lr": 1e-3, "schedule": "constant"},
            "pbkd": {"pairs_per_round": 6, "mle_steps": 3, "bt_batch_size": 4, "adversary_lr": 1e-3,
                     "judge_options": {"reward": "rouge_l", "reward_scale": 10.0},
                     "rm_config": {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2}},
            "batch_size": 4, "max_steps": 4, "log_every": 1, "save_every": 0, "num_threads": 1,
        }
        return _with_overrides(cfg, overrides)


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


COLOURS = "red green blue cat dog sun moon tree".split()


@dataclass(frozen=True)
class WordAssets:
    """The word-level assets' folder, the `llm/train.py` config of a quick run on them, and the
    student's expected reward."""

    root: Path

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    def config(self, tmp_path: Path, objective: str, **overrides) -> Path:
        """A 30-step run of `objective` at the policy-gradient rate 1e-2 (the known reward Rouge-L for
        `rloo` and the `bt_oracle` judge); dotted keys of `overrides` reach into sections. Returns the YAML path."""
        root = self.root
        cfg = {
            **_files_run(root, tmp_path, max_prompt_tokens=32, max_length=48),
            "objective": objective, "seed": 3,
            "generation": {"max_new_tokens": 4, "batch_size": 32, "teacher_greedy": True},
            "eval": {"every": 0, "valid_seeds": [10], "test_seeds": [10], "max_new_tokens": 4, "batch_size": 8,
                     "before": False, "teacher": False, "test": False},
            "optim": {"schedule": "constant", "grad_clip": 1.0},
            "pg": {"reward": "rouge_l", "reward_scale": 1.0, "lr": 1e-2, "samples_per_prompt": 4, "ppo_epochs": 2,
                   "beta_kl": 0.0, "missing_eos_penalty": 0.0},
            "pbkd": {"pairs_per_round": 16, "judge_options": {"reward": "rouge_l", "reward_scale": 10.0},
                     "mle_steps": 200, "mle_lr": 1e-2, "adversary_lr": 1e-3, "adversary_steps": 10,
                     "rm_config": {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2}},
            "batch_size": 8, "max_steps": 30, "log_every": 1, "save_every": 0, "num_threads": 1,
        }
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(_with_overrides(cfg, overrides)))
        return path

    def reward_before_after(self, tmp_path: Path, objective: str, **overrides) -> tuple[float, float]:
        """The student's expected reward before and after a quick `objective` run (config: :meth:`config`)."""
        from llm import train as trainer
        from llm.config import load_config

        before = self.expected_reward(self.root / "student")
        out = trainer.train(load_config(self.config(tmp_path, objective, **overrides)))
        return before, self.expected_reward(Path(out["run_dir"]) / "checkpoints" / "latest")

    def expected_reward(self, model_dir: Path) -> float:
        """Mean Rouge-L reward of 8 samples per training prompt (a fixed seed): the Monte-Carlo E_{y~q} r."""
        model, tokenizer = load_causal_lm(str(model_dir)), load_tokenizer(str(self.root / "student"))
        examples = load_jsonl(self.root / "train.jsonl")[:32]
        ids = [prompt_token_ids(tokenizer, ex.prompt, max_prompt_tokens=32) for ex in examples]
        y = rollout(model, tokenizer, ids, seed=123, max_new_tokens=4, k=8, batch_size=64)
        reward = rouge_reward(1.0)
        return sum(reward(PreferenceQuery(prompt=examples[i // 8].prompt, response_0="", response_1="",
                                          references=tuple(examples[i // 8].references)), text)
                   for i, text in enumerate(y.texts(tokenizer))) / len(y)


@pytest.fixture(scope="session")
def word_assets(tmp_path_factory) -> WordAssets:
    """A word-level tokenizer over COLOURS, a tiny GPT-2 student and teacher on it, and data whose
    every reference is "red green": the random student names one of the two now and then, so the
    Rouge-L reward is dense enough for a few dozen steps to raise it; the teacher is fitted to
    answer "red green" (a few hundred Adam steps), so it is the better policy a distillation
    objective can move the student towards."""
    root = tmp_path_factory.mktemp("word_assets")
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", *COLOURS, "<eos>"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<eos>")
    for name, seed in (("teacher", 1), ("student", 2)):
        torch.manual_seed(seed)
        config = tiny_config("gpt2", len(vocab), n_layer=1, n_embd=32, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                             attn_pdrop=0.0, eos_token_id=vocab["<eos>"], bos_token_id=vocab["<eos>"],
                             pad_token_id=vocab["<pad>"])
        model = AutoModelForCausalLM.from_config(config)
        if name == "teacher":
            _fit_red_green(model, tokenizer)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rng = random.Random(0)
    for split, n in (("train", 64), ("valid", 4), ("test", 4)):
        with open(root / f"{split}.jsonl", "w") as handle:
            for _ in range(n):
                handle.write(json.dumps({"instruction": "Name", "context": " ".join(rng.sample(COLOURS, 2)),
                                         "response": "red green", "category": "colours"}) + "\n")
    return WordAssets(root)

def _fit_red_green(model, tokenizer) -> None:
    """Fit `model` in place to answer "red green" to the word-assets prompts (cross-entropy, Adam)."""
    rng = random.Random(1)
    examples = [Example(prompt=format_prompt("Name", " ".join(rng.sample(COLOURS, 2))), response="red green")
                for _ in range(32)]
    batch = encode_sft_batch(tokenizer, examples, 32, 48)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = sft_loss(logits, batch["labels"], batch["response_mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()



@pytest.fixture
def plant_student_fault(monkeypatch):
    """`plant_student_fault("flipped" | "detached", owner=StudentStep)`: the student's loss (the
    `loss` method of `owner`: the shared student step, or an objective) negated, or detached from
    the student; a learning test must then fail to raise its reward."""
    from llm.objectives.policy_gradient import StudentStep

    def plant(fault: str, owner=StudentStep) -> None:
        original = owner.loss

        def faulty(self, *args):
            loss, metrics = original(self, *args)
            return (-loss if fault == "flipped" else loss.detach().requires_grad_()), metrics
        monkeypatch.setattr(owner, "loss", faulty)
    return plant

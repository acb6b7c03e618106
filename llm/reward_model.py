"""The PbKD adversaries: the reward model ``r_phi(x, y)`` and the MM PbKD Q-head ``f_phi(s, .)``.

Spec llm.md section 2.

- ``pbkd`` (black-box, Algorithms 1-2): :class:`RewardModel`, a causal-LM backbone of
  configurable size (any Hugging Face config: build a small one with
  :func:`llm.models.small_config_like`, or start from a pretrained LM) with a scalar head read
  at the last non-pad token, bounded as ``r_phi = B tanh(raw / B)`` so ``|r_phi| < B``.
- ``mm_pbkd`` (white-box, Algorithm 3): :class:`QHead`, a separate small causal LM whose
  vocabulary-sized output is bounded as ``f_phi = B_f tanh(raw / B_f)``.  ``f[:, t]`` is
  ``f(s, .)`` at the state that has read tokens ``0..t``, aligned like the LM's logits, so
  ``f[:, t]`` pairs with ``labels[:, t]`` of :func:`llm.data.encode_sft_batch` and with the
  conventions of :mod:`llm.losses` (``q_moment_*``, ``induced_sequence_reward``).

Padding on either side gives the same outputs: positions are counted from each row's first
real token (``position_ids = cumsum(mask) - 1``) and the reward is read at the row's last
position whose ``attention_mask`` is 1 -- not at the last non-pad *id*, since GPT-2 pads with
its EOS token, which also ends every response.

A non-finite raw output (before the ``tanh``, which would otherwise hide an overflow as
``+-B``) raises :class:`NonFiniteRewardError` (issue item "bad input": the run must stop with
a clear message while the last good checkpoint is still intact).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

__all__ = [
    "NonFiniteRewardError",
    "RewardModel",
    "QHead",
    "bounded",
    "last_token_index",
    "position_ids_from_mask",
]


class NonFiniteRewardError(RuntimeError):
    """The reward model or Q-head produced NaN or infinity; training must stop before the optimiser step."""


def bounded(raw: Tensor, bound: float) -> Tensor:
    """``B tanh(raw / B)``: the identity near 0, saturating at ``+-B`` (spec llm.md section 2)."""
    return bound * torch.tanh(raw / bound)


def _check_bound(name: str, bound: float) -> float:
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound) or bound <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {bound!r}")
    return float(bound)


def _check_batch(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int):
        raise ValueError("input_ids must be a (batch, time) integer tensor")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
            f"{tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__}"
        )
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (tokens)")
    empty = (attention_mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"row(s) {empty} of attention_mask hold no token; a reward needs at least one token")
    return attention_mask.long()


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions counted from each row's first real token, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of each row's last position with ``attention_mask == 1`` (left or right padding)."""
    T = attention_mask.shape[-1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).max(-1).values


def _raise_non_finite(what: str, raw: Tensor, valid: Tensor) -> None:
    bad = valid & ~torch.isfinite(raw)
    if bool(bad.any()):
        first = bad.nonzero()[0].tolist()
        raise NonFiniteRewardError(
            f"the {what} produced {int(bad.sum())} non-finite output(s) (first at index {first}: "
            f"{float(raw.detach()[tuple(first)])}); stopping before it reaches a loss or an optimiser step. The "
            "last checkpoint written before this step is intact: resume from it with a lower learning "
            "rate, stronger gradient clipping or a smaller bound."
        )


def _backbone_of(model: PreTrainedModel) -> PreTrainedModel:
    """The transformer without its LM head (``GPT2Model``, ``OPTModel``, ``LlamaModel`` ...)."""
    base = getattr(model, "base_model", model)
    if not isinstance(base, PreTrainedModel):
        raise ValueError(f"{type(model).__name__} exposes no Hugging Face base model")
    return base


class RewardModel(nn.Module):
    """``r_phi(x, y) = B tanh(w . h_last / B + b / B)``: the ``pbkd`` adversary (spec llm.md section 2).

    ``backbone`` is a headless transformer or a causal LM (its LM head is dropped; the module is
    used as given, not copied).  ``h_last`` is the final hidden state at the last token of
    ``x ++ y`` (the EOS that ends the response).  :meth:`from_config` builds a fresh backbone
    of any size; :meth:`from_pretrained` starts from a pretrained LM.
    """

    def __init__(self, backbone: PreTrainedModel, bound: float = 5.0):
        super().__init__()
        self.bound = _check_bound("bound", bound)
        self.backbone = _backbone_of(backbone)
        width = self.backbone.get_input_embeddings().embedding_dim
        param = next(self.backbone.parameters())
        self.head = nn.Linear(width, 1, device=param.device, dtype=param.dtype)
        std = float(getattr(self.backbone.config, "initializer_range", 0.02))
        nn.init.normal_(self.head.weight, std=std)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_config(cls, config: PretrainedConfig, *, bound: float = 5.0, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> RewardModel:
        """A randomly initialised reward model (backbone and head) from ``config``; global RNG untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(AutoModel.from_config(config, dtype=dtype), bound=bound)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, bound: float = 5.0, seed: int = 0,
                        dtype: torch.dtype = torch.float32) -> RewardModel:
        """A reward model on a pretrained LM's backbone (loaded by :func:`llm.models.load_causal_lm`)."""
        from llm.models import load_causal_lm

        lm = load_causal_lm(name_or_path, dtype=dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(lm, bound=bound)

    def features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``h_last``: the backbone's final hidden state at each row's last token, shape ``(B, width)``."""
        mask = _check_batch(input_ids, attention_mask)
        hidden = self.backbone(input_ids=input_ids, attention_mask=mask,
                               position_ids=position_ids_from_mask(mask)).last_hidden_state
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(mask)]

    def head_raw(self, features: Tensor) -> Tensor:
        """The unbounded head output on features, shape ``(B,)``, checked finite."""
        raw = self.head(features.to(self.head.weight.dtype)).squeeze(-1).float()
        _raise_non_finite("reward model r_phi", raw, torch.ones_like(raw, dtype=torch.bool))
        return raw

    def head_rewards(self, features: Tensor) -> Tensor:
        """Bounded rewards from features, ``B tanh(head(h) / B)``, shape ``(B,)``."""
        return bounded(self.head_raw(features), self.bound)

    def raw_rewards(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The unbounded head output at each row's last token, shape ``(B,)``, checked finite."""
        return self.head_raw(self.features(input_ids, attention_mask))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Bounded rewards ``r_phi(x, y)``, shape ``(B,)``, each in ``(-B, B)``."""
        return bounded(self.raw_rewards(input_ids, attention_mask), self.bound)

    def score(self, tokenizer, prompts: Sequence[str], responses: Sequence[str], *, max_prompt_tokens: int = 256,
              max_length: int = 512, batch_size: int = 8) -> Tensor:
        """``r_phi(x, y)`` of text pairs, encoded like training batches (:func:`llm.data.encode_sft_batch`)."""
        from llm.data import Example, encode_sft_batch

        prompts, responses = list(prompts), list(responses)
        if len(prompts) != len(responses) or not prompts:
            raise ValueError(f"score needs as many prompts as responses, at least one (got {len(prompts)} and {len(responses)})")
        device = next(self.parameters()).device
        out = []
        for s in range(0, len(prompts), batch_size):
            examples = [Example(prompt=p, response=r) for p, r in zip(prompts[s:s + batch_size], responses[s:s + batch_size])]
            batch = encode_sft_batch(tokenizer, examples, max_prompt_tokens, max_length)
            out.append(self(batch["input_ids"].to(device), batch["attention_mask"].to(device)))
        return torch.cat(out)


class QHead(nn.Module):
    """``f_phi(s, .) = B_f tanh(raw(s, .) / B_f) in R^|V|``: the ``mm_pbkd`` adversary (spec llm.md s2).

    ``lm`` is a causal LM (its logits are the raw output), separate from the student and
    sharing the teacher's vocabulary.  ``forward`` returns ``(B, T, |V|)`` aligned with logits:
    position ``t`` is the state after tokens ``0..t``, acting on the token at ``t + 1``.

    ``frozen_backbone=True`` freezes ``lm`` and trains only ``head``, a copy of its output layer
    (untied from the input embeddings, which stay frozen): ``raw(s, .) = head(h(s))`` with ``h``
    the backbone's final hidden state, so f is linear in fixed features (spec llm.md section 2a),
    as ``pbkd``'s reward model is, and :meth:`features` of a fixed response can be computed once
    and reused by :meth:`head_values`.
    """

    def __init__(self, lm: PreTrainedModel, bound: float = 1.0, frozen_backbone: bool = False):
        super().__init__()
        self.bound = _check_bound("bound", bound)
        out = lm.get_output_embeddings()
        if out is None:
            raise ValueError(f"{type(lm).__name__} has no output layer; the Q-head needs a causal LM (AutoModelForCausalLM)")
        self.lm = lm
        self.head = None
        if frozen_backbone:
            lm.requires_grad_(False).eval()
            weight, bias = out.weight, getattr(out, "bias", None)
            self.head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                                  dtype=weight.dtype)
            with torch.no_grad():
                self.head.weight.copy_(weight)
                if bias is not None:
                    self.head.bias.copy_(bias)

    def train(self, mode: bool = True) -> QHead:
        """A frozen backbone stays in eval mode (no dropout on its fixed features)."""
        super().train(mode)
        if self.head is not None:
            self.lm.eval()
        return self

    @property
    def vocab_size(self) -> int:
        """``|V|``: the width of ``f_phi(s, .)``."""
        return int(self.lm.get_output_embeddings().weight.shape[0])

    @classmethod
    def from_config(cls, config: PretrainedConfig, *, bound: float = 1.0, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> QHead:
        """A randomly initialised Q-head LM from ``config`` (its ``vocab_size`` must be the teacher's)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(AutoModelForCausalLM.from_config(config, dtype=dtype), bound=bound)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, bound: float = 1.0,
                        dtype: torch.dtype = torch.float32) -> QHead:
        from llm.models import load_causal_lm

        return cls(load_causal_lm(name_or_path, dtype=dtype), bound=bound)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                positions: Tensor | None = None) -> Tensor:
        """Bounded ``f_phi`` of shape ``(B, T, |V|)``, or ``(B, K, |V|)`` at the ``(B, K)`` indices
        ``positions`` only (the vocabulary-sized output is then computed at those positions alone);
        padded positions are 0."""
        mask = _check_batch(input_ids, attention_mask)
        valid = (mask if positions is None else mask.gather(1, positions)).bool()
        if self.head is not None:
            return self.head_values(self.features(input_ids, mask, positions), valid)
        keep = {} if positions is None else {"logits_to_keep": positions}
        raw = self.lm(input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                      **keep).logits.float()
        return self._bounded(raw, valid)

    @torch.no_grad()
    def features(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                 positions: Tensor | None = None) -> Tensor:
        """The frozen backbone's final hidden states ``h(s)``, ``(B, T, H)`` or ``(B, K, H)`` at ``positions``."""
        if self.head is None:
            raise ValueError("Q-head features are fixed only with frozen_backbone=True (pbkd.mm_frozen_backbone)")
        mask = _check_batch(input_ids, attention_mask)
        hidden = _backbone_of(self.lm)(input_ids=input_ids, attention_mask=mask,
                                       position_ids=position_ids_from_mask(mask)).last_hidden_state
        if positions is not None:
            hidden = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return hidden

    def head_values(self, features: Tensor, valid: Tensor) -> Tensor:
        """Bounded ``f_phi`` from :meth:`features` ``(B, K, H)``; positions where ``valid`` (B, K) is 0 give 0."""
        raw = self.head(features.to(self.head.weight.dtype)).float()
        return self._bounded(raw, valid.bool())

    def _bounded(self, raw: Tensor, valid: Tensor) -> Tensor:
        valid = valid.unsqueeze(-1).expand_as(raw)
        _raise_non_finite("Q-head f_phi", raw, valid)
        # Zero the padded positions before the tanh, so no value there can reach a gradient.
        return bounded(torch.where(valid, raw, torch.zeros((), dtype=raw.dtype, device=raw.device)), self.bound)

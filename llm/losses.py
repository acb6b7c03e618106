"""The LLM objectives as pure functions of tensors (spec llm.md section 2).

Nothing here knows about models, tokenizers or data: every loss takes logits,
log-probabilities, probabilities, masks and lengths, so each one is unit-tested against
an independent brute-force computation on hand-made tensors.

Conventions shared by every function
------------------------------------
* Shapes: logits ``(B, T, V)``; ``labels`` / ``actions`` ``(B, T)`` long; ``mask`` ``(B, T)``
  bool or float (1 on response tokens, 0 on prompt and padding).
* Alignment: position ``t`` of ``logits`` (and of ``f_values``, ``teacher_probs`` ...) is the
  distribution over the token at position ``t`` of ``labels`` / ``actions``, i.e. the caller
  has already shifted the model outputs (``logits[:, :-1]`` against ``input_ids[:, 1:]``).
* Token-level losses are masked means over response tokens: the sum of the per-token values
  weighted by ``mask`` divided by ``mask.sum()`` over the whole batch. A mask that selects no
  token is a ValueError.
* Labels may hold a negative ignore index (Hugging Face's ``-100``) at positions outside the
  mask; a negative label inside the mask is a ValueError.
* ``p`` is the teacher (``pi_E``), ``q`` the student (``q_theta``). Teacher inputs are not
  detached here: compute them under ``torch.no_grad()``.
* Computation is in float32 at least (bfloat16 / float16 inputs are upcast, float64 stays
  float64), with ``log_softmax`` and ``logsumexp`` throughout, so extreme logits give finite
  values and ``0 log 0 = 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "token_log_probs",
    "sequence_log_prob",
    "sft_loss",
    "fkl",
    "rkl",
    "jsd",
    "skl",
    "srkl",
    "akl",
    "TOKEN_OBJECTIVES",
    "token_values",
    "divergence_values",
    "divergences",
    "chunked_token_mean",
    "topk_buckets",
    "teacher_topk",
    "DPKDOutput",
    "dpkd_loss",
    "PREFERENCE_VARIANTS",
    "bt_nll",
    "bt_constraint_violation",
    "adversary_lagrangian",
    "pbkd_adversary_loss",
    "dual_ascent",
    "leave_one_out_pg_loss",
    "group_advantages",
    "kl_penalised_rewards",
    "PPOOutput",
    "ppo_clipped_loss",
    "q_moment_on_policy",
    "q_moment_off_policy",
    "induced_sequence_reward",
    "TopKProbs",
    "mm_pbkd_adversary_loss",
    "MMPbKDStudentOutput",
    "mm_pbkd_student_loss",
]

PREFERENCE_VARIANTS = ("dpo", "ipo", "simpo", "cpo")


# --------------------------------------------------------------------------------------
# Validation and the shared numerics
# --------------------------------------------------------------------------------------


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32, or float64 when the input already is float64."""
    return torch.promote_types(x.dtype, torch.float32)


def _as_float(x: Tensor) -> Tensor:
    return x.to(_compute_dtype(x))


def _check_scores(name: str, x: Tensor, ndim: int) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _check_mask(mask: Tensor, batch_shape: tuple[int, ...], name: str = "mask") -> Tensor:
    """Return the mask as weights in the compute dtype; reject wrong shapes and empty masks."""
    if not isinstance(mask, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(batch_shape):
        raise ValueError(
            f"{name} must have shape {tuple(batch_shape)} (batch, time) to match the scores, "
            f"got {tuple(mask.shape)}"
        )
    weights = mask.to(torch.float32) if mask.dtype != torch.float64 else mask
    if bool((weights < 0).any()):
        raise ValueError(f"{name} has negative entries; use 1 on response tokens and 0 elsewhere")
    if not bool((weights > 0).any()):
        raise ValueError(
            f"{name} selects no response token; drop examples whose response was truncated away "
            "before calling the loss"
        )
    return weights


def _check_pair(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
    _check_scores("student_logits", student_logits, 3)
    _check_scores("teacher_logits", teacher_logits, 3)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} differ; token-level objectives need the same batch, "
            "length and vocabulary (use a preference objective for mismatched vocabularies)"
        )
    return _check_mask(mask, tuple(student_logits.shape[:2]))


def _check_unit_interval(name: str, value: float) -> float:
    value = float(value)
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def _masked_mean(per_token: Tensor, weights: Tensor) -> Tensor:
    """sum_t w_t l_t / sum_t w_t over the whole batch; positions with w_t = 0 never contribute."""
    weights = weights.to(per_token.dtype)
    kept = torch.where(weights > 0, per_token * weights, torch.zeros_like(per_token))
    return kept.sum() / weights.sum()


def _gather_last(values: Tensor, index: Tensor, weights: Tensor | None, name: str) -> Tensor:
    """values[b, t, index[b, t]]; negative (ignore) indices give 0 and must lie outside the mask."""
    if not isinstance(index, Tensor) or index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be an integer (long) tensor of token ids")
    if tuple(index.shape) != tuple(values.shape[:2]):
        raise ValueError(
            f"{name} must have shape {tuple(values.shape[:2])} (batch, time), got {tuple(index.shape)}"
        )
    size = values.shape[-1]
    if bool((index >= size).any()):
        raise ValueError(
            f"{name} holds id {int(index.max())} but the last dimension has only {size} entries; "
            "the vocabularies of the ids and of the scores differ"
        )
    ignored = index < 0
    if weights is not None and bool((ignored & (weights > 0)).any()):
        raise ValueError(
            f"{name} holds a negative (ignore) id inside the mask; the mask must be 0 wherever "
            "the id is the ignore index"
        )
    picked = values.gather(-1, index.clamp(min=0).long().unsqueeze(-1)).squeeze(-1)
    return torch.where(ignored, torch.zeros_like(picked), picked)


def _kl_per_token(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) = sum_v a_v (log a_v - log b_v) per position, with 0 log 0 = 0."""
    a = log_a.exp()
    support = a > 0
    # where() before the product keeps -inf - -inf out of both the value and the gradient.
    diff = torch.where(support, log_a - log_b, torch.zeros_like(log_a))
    return (a * diff).sum(-1)


def _entropy_per_token(log_a: Tensor) -> Tensor:
    a = log_a.exp()
    return -(a * torch.where(a > 0, log_a, torch.zeros_like(log_a))).sum(-1)


def _log_mixture(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w a + (1 - w) b), exactly log_b at w = 0 and log_a at w = 1."""
    if w == 0.0:
        return log_b
    if w == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def _log_probs_pair(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """(log q, log p) in the compute dtype."""
    log_q = F.log_softmax(_as_float(student_logits), dim=-1)
    log_p = F.log_softmax(_as_float(teacher_logits), dim=-1)
    dtype = torch.promote_types(log_q.dtype, log_p.dtype)
    return log_q.to(dtype), log_p.to(dtype)


# --------------------------------------------------------------------------------------
# Token log-probabilities and cross-entropy (sft, seqkd)
# --------------------------------------------------------------------------------------


def token_log_probs(logits: Tensor, labels: Tensor) -> Tensor:
    """``log q(y_t | s_t)`` for every position, shape ``(B, T)`` (spec llm.md section 1).

    The one gather routine of the LLM layer. Positions whose label is negative (the ignore
    index) get 0; mask them out downstream.
    """
    _check_scores("logits", logits, 3)
    log_q = F.log_softmax(_as_float(logits), dim=-1)
    return _gather_last(log_q, labels, None, "labels")


def sequence_log_prob(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """``log q(y | x) = sum_t mask_t log q(y_t | s_t)``, shape ``(B,)`` (spec llm.md section 2)."""
    _check_scores("logits", logits, 3)
    if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"mask must have shape {tuple(logits.shape[:2])} (batch, time), got "
            f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}"
        )
    weights = mask.to(_compute_dtype(logits))
    if bool((weights < 0).any()):
        raise ValueError("mask has negative entries; use 1 on response tokens and 0 elsewhere")
    log_q = F.log_softmax(_as_float(logits), dim=-1)
    per_token = _gather_last(log_q, labels, weights, "labels")
    return torch.where(weights > 0, per_token * weights, torch.zeros_like(per_token)).sum(-1)


def sft_loss(student_logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Cross-entropy ``-(1/N) sum_t mask_t log q(y_t | s_t)`` (spec llm.md section 2: ``sft``).

    ``sft`` on gold responses, ``seqkd`` on teacher samples: the same function; the prefix
    source is the caller's choice. Also the DPKD language-modelling term ``L_LM``.
    """
    _check_scores("student_logits", student_logits, 3)
    weights = _check_mask(mask, tuple(student_logits.shape[:2]))
    log_q = F.log_softmax(_as_float(student_logits), dim=-1)
    per_token = _gather_last(log_q, labels, weights, "labels")
    return _masked_mean(-per_token, weights)


# --------------------------------------------------------------------------------------
# Token-level distribution matching (fkl, rkl, jsd, skl, srkl, akl)
# --------------------------------------------------------------------------------------


def _akl_head_weight(log_q: Tensor, log_p: Tensor, mu: float) -> Tensor:
    """g_H / (g_H + g_T) per position (1/2 where both gaps are 0), from a detached student."""
    p = log_p.exp()
    q_fixed = log_q.detach().exp()
    p_sorted, order = torch.sort(p, dim=-1, descending=True, stable=True)
    gap_sorted = (p_sorted - q_fixed.gather(-1, order)).abs()
    head = p_sorted.cumsum(-1) <= mu
    head[..., 0] = True
    g_head = torch.where(head, gap_sorted, torch.zeros_like(gap_sorted)).sum(-1)
    g_tail = torch.where(head, torch.zeros_like(gap_sorted), gap_sorted).sum(-1)
    total = g_head + g_tail
    positive = total > 0
    return torch.where(positive, g_head / torch.where(positive, total, torch.ones_like(total)), 0.5)


DIVERGENCE_DEFAULTS = {"beta": 0.5, "alpha": 0.1, "mu": 0.5}


def _divergence(name: str, log_q: Tensor, log_p: Tensor, kl: Callable[[Tensor, Tensor], Tensor],
                kwargs: dict) -> tuple[Tensor, dict]:
    """Per-token values of the divergence `name` from log q and log p, with `kl(log_a, log_b)` the
    per-token KL(a || b); and what the closed-form gradient reuses (`name` after the jsd endpoints
    are resolved, the mixture `log_m`, akl's weights `w_head` and its `rkl` part)."""
    params = {k: _check_unit_interval(k, kwargs.get(k, v)) for k, v in DIVERGENCE_DEFAULTS.items()}
    beta, alpha = params["beta"], params["alpha"]
    if name == "jsd" and beta in (0.0, 1.0):  # the endpoints are exactly fkl and rkl
        name = "fkl" if beta == 0.0 else "rkl"
    aux = {"name": name} | params
    if name == "fkl":
        return kl(log_p, log_q), aux
    if name == "rkl":
        return kl(log_q, log_p), aux
    if name == "jsd":
        log_m = aux["log_m"] = _log_mixture(log_p, log_q, beta)
        return beta * kl(log_p, log_m) + (1.0 - beta) * kl(log_q, log_m), aux
    if name == "skl":
        log_m = aux["log_m"] = _log_mixture(log_p, log_q, alpha)
        return kl(log_p, log_m), aux
    if name == "srkl":
        log_m = aux["log_m"] = _log_mixture(log_p, log_q, 1.0 - alpha)
        return kl(log_q, log_m), aux
    w_head = aux["w_head"] = _akl_head_weight(log_q, log_p, params["mu"])  # constants of the gradient
    aux["rkl"] = kl(log_q, log_p)
    return w_head * kl(log_p, log_q) + (1.0 - w_head) * aux["rkl"], aux


def _kl_fast(log_a: Tensor, log_b: Tensor, a: Tensor) -> Tensor:
    """:func:`_kl_per_token` without autograd, in place on one buffer (fresh (..., V) buffers are
    the dominant cost on CPU: each is page-faulted in), the same 0 log 0 = 0 rule."""
    diff = log_a - log_b
    if not (bool(log_a.min() > -math.inf) and bool(log_b.min() > -math.inf)):  # -inf only: a = 0 there
        diff.masked_fill_(a == 0, 0.0)
    return diff.mul_(a).sum(-1)


def _centred(q: Tensor, d: Tensor) -> Tensor:
    """q_j (d_j - sum_i q_i d_i) in place in `d`: the logits' gradient of a value whose q-gradient is d."""
    return d.sub_((q * d).sum(-1, keepdim=True)).mul_(q)


class _TokenDivergence(torch.autograd.Function):
    """Per-token values of a divergence with the student's gradient in closed form (spec llm.md
    section 2's formulas differentiated through q = softmax(s); the teacher held fixed), so the
    forward and backward passes take a few in-place sweeps over (..., V) where autograd through
    log_softmax, the mixture and the KL takes many fresh buffers."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, name, kwargs):
        log_q, log_p = _log_probs_pair(student_logits, teacher_logits)
        probs = {}  # p and q, each computed once and only where a KL needs it

        def kl(log_a, log_b):
            key = "p" if log_a is log_p else "q"
            if key not in probs:
                probs[key] = log_a.exp()
            return _kl_fast(log_a, log_b, probs[key])

        values, aux = _divergence(name, log_q, log_p, kl, kwargs)
        ctx.save_for_backward(log_q, log_p, probs.get("p"), probs.get("q"), values, aux.get("log_m"),
                              aux.get("w_head"), aux.get("rkl"))
        ctx.aux, ctx.dtype = {k: v for k, v in aux.items() if not isinstance(v, Tensor)}, student_logits.dtype
        return values

    @staticmethod
    def backward(ctx, grad_values):
        log_q, log_p, p, q, values, log_m, w_head, rkl_values = ctx.saved_tensors
        name, beta, alpha = ctx.aux["name"], ctx.aux["beta"], ctx.aux["alpha"]
        # A token with no mass in q (log q = -inf, e.g. an empty tail bucket) has no gradient; its
        # log-ratios are -inf - -inf there, so they are zeroed before they meet q = 0.
        empty = torch.isneginf(log_q) if bool(torch.isneginf(log_q).any()) else None

        def finite(d):
            return d if empty is None else d.masked_fill_(empty, 0.0)

        if name != "fkl" and q is None:  # skl's value needs no q; every gradient but fkl's in-place one does
            q = log_q.exp()
        if name == "fkl":  # q in place: the one fresh buffer of the backward pass
            grad = log_q.exp().sub_(p)
        elif name == "rkl":
            grad = finite((log_q - log_p).sub_(values.unsqueeze(-1))).mul_(q)
        elif name == "jsd":
            grad = _centred(q, finite((log_q - log_m).mul_(1.0 - beta)))
        elif name == "skl":  # d value / d q_j = -(1 - alpha) p_j / m_j
            r = finite((log_p + log_q).sub_(log_m)).exp_()  # p q / m
            if empty is not None:
                r.masked_fill_(empty, 0.0)
            grad = r.sub_(q * r.sum(-1, keepdim=True)).mul_(-(1.0 - alpha))
        elif name == "srkl":  # d value / d q_j = log(q_j / m_j) + 1 - alpha q_j / m_j (the 1 cancels)
            e = finite(log_q - log_m)
            grad = _centred(q, e.sub_(e.exp().mul_(alpha)))
        else:
            w_head, rkl_values = w_head.unsqueeze(-1), rkl_values.unsqueeze(-1)
            grad = finite((log_q - log_p).sub_(rkl_values)).mul_(q).mul_(1.0 - w_head).add_((q - p).mul_(w_head))
        grad.mul_(grad_values.unsqueeze(-1).to(grad.dtype))
        return grad.to(ctx.dtype), None, None, None


def token_values(name: str, student_logits: Tensor, teacher_logits: Tensor, **kwargs) -> Tensor:
    """The per-token values ``(..., )`` of the divergence `name` of :data:`TOKEN_OBJECTIVES`, before
    the masked mean: what each loss below averages, and what :func:`chunked_token_mean` averages
    chunk by chunk. `kwargs` are the loss's own (``beta``, ``alpha``, ``mu``).

    With the teacher held fixed (no gradient), the student's gradient is computed in closed form
    (:class:`_TokenDivergence`) rather than by autograd through every intermediate; a teacher
    that requires a gradient takes the autograd path, which also differentiates the teacher."""
    if name not in TOKEN_OBJECTIVES:
        raise ValueError(f"unknown token-level divergence {name!r}; choose one of {', '.join(TOKEN_OBJECTIVES)}")
    if not (teacher_logits.requires_grad and torch.is_grad_enabled()):  # the teacher held fixed: closed-form gradient
        return _TokenDivergence.apply(student_logits, teacher_logits, name, kwargs)
    log_q, log_p = _log_probs_pair(student_logits, teacher_logits)
    return _divergence(name, log_q, log_p, _kl_per_token, kwargs)[0]


def fkl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
    """Forward KL ``KL(p || q) = sum_v p_v (log p_v - log q_v)``, masked token mean (spec llm.md s2).

    The true divergence, teacher-entropy term included (its gradient in the student equals
    that of the cross-entropy ``-sum_v p_v log q_v``).
    """
    weights = _check_pair(student_logits, teacher_logits, mask)
    return _masked_mean(token_values("fkl", student_logits, teacher_logits), weights)


def rkl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
    """Reverse KL ``KL(q || p) = sum_v q_v (log q_v - log p_v)``, masked token mean (spec llm.md s2)."""
    weights = _check_pair(student_logits, teacher_logits, mask)
    return _masked_mean(token_values("rkl", student_logits, teacher_logits), weights)


def jsd(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, beta: float = 0.5) -> Tensor:
    """GKD's generalised JSD (spec llm.md section 2: ``jsd``), masked token mean.

    For ``0 < beta < 1``: ``beta KL(p || m) + (1 - beta) KL(q || m)`` with the mixture
    ``m = beta p + (1 - beta) q`` formed in log space by ``logaddexp``.
    At the endpoints the formula itself vanishes (it equals ``beta KL(p || q) + O(beta^2)``
    near 0 and ``(1 - beta) KL(q || p) + O((1 - beta)^2)`` near 1), so, as in GKD and TRL's
    ``generalized_jsd_loss``, the endpoints are defined as the limits of the normalised
    divergence: ``beta = 0`` is exactly :func:`fkl` ``KL(p || q)`` and ``beta = 1`` is exactly
    :func:`rkl` ``KL(q || p)``. Symmetry: ``jsd(s, t, beta) == jsd(t, s, 1 - beta)``;
    bound: ``0 <= jsd <= -beta log beta - (1 - beta) log(1 - beta)`` in the interior.
    """
    beta = _check_unit_interval("beta", beta)
    weights = _check_pair(student_logits, teacher_logits, mask)
    return _masked_mean(token_values("jsd", student_logits, teacher_logits, beta=beta), weights)


def skl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, alpha: float = 0.1) -> Tensor:
    """DistiLLM's skew KL ``KL(p || alpha p + (1 - alpha) q)`` (spec llm.md section 2: ``skl``).

    ``alpha = 0`` is :func:`fkl`; ``alpha = 1`` is 0. Bounded by ``-log(alpha)``.
    """
    alpha = _check_unit_interval("alpha", alpha)
    weights = _check_pair(student_logits, teacher_logits, mask)
    return _masked_mean(token_values("skl", student_logits, teacher_logits, alpha=alpha), weights)


def srkl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, alpha: float = 0.1) -> Tensor:
    """DistiLLM's skew reverse KL ``KL(q || (1 - alpha) p + alpha q)`` (spec llm.md s2: ``srkl``).

    ``alpha = 0`` is :func:`rkl`; ``alpha = 1`` is 0. Bounded by ``-log(alpha)``.
    """
    alpha = _check_unit_interval("alpha", alpha)
    weights = _check_pair(student_logits, teacher_logits, mask)
    return _masked_mean(token_values("srkl", student_logits, teacher_logits, alpha=alpha), weights)


def akl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, mu: float = 0.5) -> Tensor:
    """Adaptive KL (spec llm.md section 2: ``akl``), masked token mean.

    Per token: sort the teacher ``p`` in descending order (stable sort, ties keep vocabulary
    order); the head is the sorted tokens whose cumulative teacher mass is ``<= mu``, plus the
    first (most likely) token always; the tail is the rest. With ``q`` detached,
    ``g_H = sum_head |p - q|`` and ``g_T = sum_tail |p - q|``; the loss is
    ``g_H / (g_H + g_T) KL(p || q) + g_T / (g_H + g_T) KL(q || p)``.
    Where ``g_H + g_T = 0`` (then ``p == q`` and both divergences are 0) the weights are 1/2.
    The weights carry no gradient to the student.
    """
    mu = _check_unit_interval("mu", mu)
    weights = _check_pair(student_logits, teacher_logits, mask)
    return _masked_mean(token_values("akl", student_logits, teacher_logits, mu=mu), weights)


TOKEN_OBJECTIVES: dict[str, Callable[..., Tensor]] = {
    "fkl": fkl,
    "rkl": rkl,
    "jsd": jsd,
    "skl": skl,
    "srkl": srkl,
    "akl": akl,
}


def divergence_values(student_logits: Tensor, teacher_logits: Tensor) -> dict[str, Tensor]:
    """Per-token values (no gradient) of what :func:`divergences` averages."""
    with torch.no_grad():
        log_q, log_p = _log_probs_pair(student_logits, teacher_logits)
        p = log_p.exp()
        cross = -(p * torch.where(p > 0, log_q, torch.zeros_like(log_q))).sum(-1)
        log_m = _log_mixture(log_p, log_q, 0.5)
        return {
            "fkl": _kl_per_token(log_p, log_q),
            "rkl": _kl_per_token(log_q, log_p),
            "jsd": 0.5 * _kl_per_token(log_p, log_m) + 0.5 * _kl_per_token(log_q, log_m),
            "cross_entropy": cross,
            "teacher_entropy": _entropy_per_token(log_p),
            "student_entropy": _entropy_per_token(log_q),
        }


def divergences(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> dict[str, float]:
    """True divergence values for logging (spec llm.md section 2, last bullet), masked token means.

    Keys: ``fkl`` (``KL(p || q)``, teacher-entropy term included), ``rkl`` (``KL(q || p)``),
    ``jsd`` (``beta = 0.5``), ``cross_entropy`` (``-sum_v p_v log q_v = fkl + teacher_entropy``,
    what a gradient-equivalent cross-entropy objective reports), ``teacher_entropy``
    (``H(p)``), ``student_entropy`` (``H(q)``). Computed without gradient.
    """
    weights = _check_pair(student_logits, teacher_logits, mask)
    values = divergence_values(student_logits, teacher_logits)
    return {name: float(_masked_mean(value, weights)) for name, value in values.items()}


# --------------------------------------------------------------------------------------
# Bounded memory: vocabulary-sized losses in chunks over tokens; the teacher's top-k buckets
# --------------------------------------------------------------------------------------


class _ChunkedTokenMean(torch.autograd.Function):
    """Value and gradients of :func:`chunked_token_mean`, both computed in the forward pass one
    chunk at a time (as fused linear-cross-entropy kernels do), so no (N, V) tensor outlives its chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, per_token, chunk_tokens):
        n = hidden.shape[0]
        leaves = (hidden, weight, bias)
        wants = [x is not None and x.requires_grad for x in leaves]
        grads = [None] + [torch.zeros_like(x) if want else None for x, want in zip(leaves[1:], wants[1:])]
        values = []
        for start in range(0, n, chunk_tokens):
            rows = slice(start, min(n, start + chunk_tokens))
            with torch.enable_grad():
                h = hidden[rows].detach().requires_grad_(wants[0])
                w = None if weight is None else weight.detach().requires_grad_(wants[1])
                b = None if bias is None else bias.detach().requires_grad_(wants[2])
                scores = h if w is None else F.linear(h, w, b)
                v = per_token(scores, rows)
                inputs = [x for x, want in zip((h, w, b), wants) if want]
                got = iter(torch.autograd.grad(v.sum() / n, inputs)) if inputs else iter(())
            if wants[0] and chunk_tokens >= n:  # one chunk: its gradient is the whole one
                grads[0] = next(got)
            elif wants[0]:
                if grads[0] is None:
                    grads[0] = hidden.new_empty(hidden.shape)
                grads[0][rows] = next(got)
            for i in (1, 2):
                if wants[i]:
                    grads[i] += next(got)
            values.append(v.detach())
        ctx.grads = grads
        values = torch.cat(values)
        return _masked_mean(values, torch.ones_like(values))

    @staticmethod
    def backward(ctx, grad_output):
        scaled = [None if g is None else g * grad_output.to(g.dtype) for g in ctx.grads]
        return *scaled, None, None


def chunked_token_mean(hidden: Tensor, weight: Tensor | None, bias: Tensor | None,
                       per_token: Callable[[Tensor, slice], Tensor], chunk_tokens: int) -> Tensor:
    """``mean_n per_token(scores_n, n)`` over the N packed response tokens, with
    ``scores = hidden @ weight.T + bias`` (the LM head) formed ``chunk_tokens`` rows at a time.

    `hidden` is ``(N, H)``, the last hidden states at the response tokens, and `weight`,
    `bias` the head's (``weight=None``: `hidden` already holds the scores). ``per_token(scores,
    rows)`` returns the ``(C,)`` loss values of the chunk's rows `rows` (a slice), e.g.
    ``token_values(name, scores, teacher_scores[rows])``. One chunk (``chunk_tokens >= N``) is
    bit for bit the masked mean of the per-token values computed at once; smaller chunks give the
    same values to float32 rounding (a row's reductions may be vectorised differently in a tensor
    of another size), and the gradients are the same sums taken in another order. Peak
    memory holds one chunk's (C, V) tensors and the gradients of `hidden` and `weight`,
    whatever N is."""
    _check_scores("hidden", hidden, 2)
    if hidden.shape[0] == 0:
        raise ValueError("hidden holds no response token; drop examples whose response was truncated away")
    if int(chunk_tokens) < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return _ChunkedTokenMean.apply(hidden, weight, bias, per_token, int(chunk_tokens))


def topk_buckets(student_logits: Tensor, topk_ids: Tensor, topk_logp: Tensor, tail_logp: Tensor) -> tuple[Tensor, Tensor]:
    """The student's and the teacher's log-probabilities over ``k + 1`` buckets: the teacher's
    top-k tokens one by one, and every other token together as one tail bucket.

    `topk_ids` / `topk_logp` ``(..., k)`` are the teacher's k most likely tokens and their
    log-probabilities, `tail_logp` ``(...)`` the log of the teacher's remaining mass. Both
    outputs are normalised, so any divergence of :func:`token_values` applies to them (the
    teacher top-k cache of spec llm.md section 6). The student's tail is the logsumexp of its
    log-probabilities outside the top-k, not ``log(1 - sum)``, so a tiny tail keeps its precision."""
    _check_scores("student_logits", student_logits, student_logits.dim())
    log_q = F.log_softmax(_as_float(student_logits), dim=-1)
    ids = topk_ids.long()
    q_top = log_q.gather(-1, ids)
    q_tail = torch.logsumexp(log_q.scatter(-1, ids, float("-inf")), dim=-1, keepdim=True)
    p = torch.cat([_as_float(topk_logp), _as_float(tail_logp).unsqueeze(-1)], dim=-1)
    return torch.cat([q_top, q_tail], dim=-1), p.to(q_top.dtype)


def teacher_topk(teacher_logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(ids, logp, tail_logp)``: the teacher's k most likely tokens per position, their
    log-probabilities, and the log of the mass outside them (the inputs of :func:`topk_buckets`)."""
    log_p = F.log_softmax(_as_float(teacher_logits), dim=-1)
    logp, ids = log_p.topk(int(k), dim=-1)
    tail = torch.logsumexp(log_p.scatter(-1, ids, float("-inf")), dim=-1)
    return ids, logp, tail


# --------------------------------------------------------------------------------------
# DPKD (sequence-level preference distillation)
# --------------------------------------------------------------------------------------


@dataclass
class DPKDOutput:
    """DPKD loss and its diagnostics (spec llm.md section 2: ``dpkd``).

    ``loss`` is a scalar with gradient; the rest are detached ``(B,)`` tensors for logging:
    ``reward_teacher`` / ``reward_student`` are the implicit rewards ``beta * score`` of the
    teacher response ``y_T`` and the student response ``y_S``, ``margin`` is their difference,
    and ``student_logp_own`` is ``log q(y_S | x)`` (a falling value flags reward hacking).
    """

    loss: Tensor
    reward_teacher: Tensor
    reward_student: Tensor
    margin: Tensor
    student_logp_own: Tensor


def _check_sequence_vector(name: str, x: Tensor, batch: int | None) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 1:
        raise ValueError(
            f"{name} must be a 1-d tensor with one value per example, got "
            f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
        )
    if batch is not None and x.shape[0] != batch:
        raise ValueError(f"{name} has {x.shape[0]} entries but the batch has {batch}")
    return x


def dpkd_loss(
    student_logp_T: Tensor,
    teacher_logp_T: Tensor | None,
    len_T: Tensor,
    student_logp_S: Tensor,
    teacher_logp_S: Tensor | None,
    len_S: Tensor,
    *,
    beta: float = 0.1,
    variant: str = "dpo",
    length_normalize: bool = True,
    gamma: float = 0.0,
    cpo_alpha: float = 1.0,
) -> DPKDOutput:
    """Direct Preference KD (spec llm.md section 2: ``dpkd``): the teacher response is preferred.

    Inputs are sequence log-probabilities ``(B,)`` of the teacher response ``y_T`` and the
    student response ``y_S`` under the student (``student_logp_*``, with gradient) and the
    teacher (``teacher_logp_*``), and response lengths ``len_*`` ``(B,)`` in tokens. With
    ``n(y) = |y|`` if ``length_normalize`` else 1, each response gets a score

    * ``dpo``, ``ipo`` (teacher as the reference model): ``s(y) = log(q(y|x) / p(y|x)) / n(y)``;
    * ``simpo``, ``cpo`` (no reference; teacher log-probs may be ``None``): ``s(y) = log q(y|x) / n(y)``;

    implicit rewards ``r_T = beta s(y_T)``, ``r_S = beta s(y_S)``, margin ``r_T - r_S``, and the
    batch-mean loss

    * ``dpo``: ``-log sigma(beta s(y_T) - beta s(y_S))`` -- the spec's formula;
    * ``ipo`` (TRL's form): ``(s(y_T) - s(y_S) - 1 / (2 beta))^2`` on the log-ratio difference;
    * ``simpo``: ``-log sigma(beta s(y_T) - beta s(y_S) - gamma)`` (SimPO, margin ``gamma``);
    * ``cpo`` (TRL's CPO, sigmoid loss): ``-log sigma(beta s(y_T) - beta s(y_S))`` plus
      ``cpo_alpha`` times the behaviour-cloning NLL of the teacher response,
      ``-sum_b log q(y_T^b|x^b) / sum_b |y_T^b|`` (token mean over the batch). TRL's CPO
      scores are unnormalised: that is ``length_normalize=False``.

    ``gamma`` is used by ``simpo`` only and ``cpo_alpha`` by ``cpo`` only. The
    ``lambda_lm * L_LM`` term of the spec is added by the trainer with :func:`sft_loss`.
    """
    if variant not in PREFERENCE_VARIANTS:
        raise ValueError(f"unknown dpkd variant {variant!r}; choose one of {PREFERENCE_VARIANTS}")
    beta = float(beta)
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if gamma != 0.0 and variant != "simpo":
        raise ValueError(f"gamma (the SimPO margin) is only used by variant 'simpo', not {variant!r}; set gamma=0")
    if cpo_alpha < 0:
        raise ValueError(f"cpo_alpha must be non-negative, got {cpo_alpha}")
    batch = _check_sequence_vector("student_logp_T", student_logp_T, None).shape[0]
    _check_sequence_vector("student_logp_S", student_logp_S, batch)
    _check_sequence_vector("len_T", len_T, batch)
    _check_sequence_vector("len_S", len_S, batch)
    if bool((len_T <= 0).any()) or bool((len_S <= 0).any()):
        raise ValueError("response lengths len_T and len_S must be positive; drop empty responses")
    uses_reference = variant in ("dpo", "ipo")
    if uses_reference:
        if teacher_logp_T is None or teacher_logp_S is None:
            raise ValueError(
                f"variant {variant!r} uses the teacher as reference model and needs teacher_logp_T "
                "and teacher_logp_S; 'simpo' and 'cpo' need no teacher log-probabilities"
            )
        _check_sequence_vector("teacher_logp_T", teacher_logp_T, batch)
        _check_sequence_vector("teacher_logp_S", teacher_logp_S, batch)

    dtype = torch.promote_types(_compute_dtype(student_logp_T), _compute_dtype(student_logp_S))
    logq_T, logq_S = student_logp_T.to(dtype), student_logp_S.to(dtype)
    n_T = len_T.to(dtype) if length_normalize else torch.ones_like(logq_T)
    n_S = len_S.to(dtype) if length_normalize else torch.ones_like(logq_S)
    if uses_reference:
        score_T = (logq_T - teacher_logp_T.to(dtype)) / n_T
        score_S = (logq_S - teacher_logp_S.to(dtype)) / n_S
    else:
        score_T = logq_T / n_T
        score_S = logq_S / n_S
    margin = beta * (score_T - score_S)

    if variant == "dpo":
        loss = F.softplus(-margin).mean()
    elif variant == "ipo":
        loss = ((score_T - score_S) - 1.0 / (2.0 * beta)).pow(2).mean()
    elif variant == "simpo":
        loss = F.softplus(-(margin - gamma)).mean()
    else:  # cpo
        nll_teacher_response = -logq_T.sum() / len_T.to(dtype).sum()
        loss = F.softplus(-margin).mean() + cpo_alpha * nll_teacher_response

    return DPKDOutput(
        loss=loss,
        reward_teacher=(beta * score_T).detach(),
        reward_student=(beta * score_S).detach(),
        margin=margin.detach(),
        student_logp_own=logq_S.detach(),
    )


# --------------------------------------------------------------------------------------
# PbKD (black-box, Algorithms 1-2): BT likelihood, Lagrangian adversary, dual ascent, RLOO
# --------------------------------------------------------------------------------------


def bt_nll(reward_1: Tensor, reward_0: Tensor, labels: Tensor) -> Tensor:
    """Mean Bradley-Terry NLL on sequence rewards (spec tabular.md section 2, llm.md section 2).

    ``P(o = 1) = sigma(r(tau1) - r(tau0))``, so with ``s_n = 2 o_n - 1`` the loss is
    ``(1/N) sum_n softplus(-s_n (r(tau1_n) - r(tau0_n)))``. In PbKD ``tau0`` is the teacher
    response and ``tau1`` the reference/student response. This is the tabular ``NLL`` divided
    by ``N``, so its confidence radius is ``zeta / N``.
    """
    if not isinstance(reward_1, Tensor) or not isinstance(reward_0, Tensor) or reward_1.dim() != 1:
        raise ValueError("reward_1 and reward_0 must be 1-d tensors with one reward per pair")
    if reward_0.shape != reward_1.shape or not isinstance(labels, Tensor) or labels.shape != reward_1.shape:
        raise ValueError(
            f"reward_1 {tuple(reward_1.shape)}, reward_0 {tuple(reward_0.shape)} and labels "
            f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__} must have the same shape"
        )
    if reward_1.numel() == 0:
        raise ValueError("bt_nll needs at least one preference pair")
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("labels must be 0 (tau0 preferred) or 1 (tau1 preferred)")
    dtype = torch.promote_types(_compute_dtype(reward_1), _compute_dtype(reward_0))
    sign = 2.0 * labels.to(dtype) - 1.0
    return F.softplus(-sign * (reward_1.to(dtype) - reward_0.to(dtype))).mean()


def bt_constraint_violation(bt_nll_value: Tensor | float, nll_ref: float, zeta_over_n: float) -> Tensor | float:
    """``NLL_BT(phi; D) - NLL_ref - zeta / |D|``: positive outside the confidence set (spec llm.md s2)."""
    return bt_nll_value - float(nll_ref) - float(zeta_over_n)


def adversary_lagrangian(
    gap: Tensor, bt_nll_value: Tensor, nll_ref: float, zeta_over_n: float, lam: float | Tensor
) -> Tensor:
    """``-gap + lam * (NLL_BT - NLL_ref - zeta/|D|)``, minimised by the adversary (spec llm.md s2).

    ``lam`` is the dual variable, treated as a constant (it is updated by :func:`dual_ascent`).
    """
    lam_value = float(lam.detach()) if isinstance(lam, Tensor) else float(lam)
    if lam_value < 0 or not math.isfinite(lam_value):
        raise ValueError(f"the dual variable lam must be a finite number >= 0, got {lam_value}")
    return -gap + lam_value * bt_constraint_violation(bt_nll_value, nll_ref, zeta_over_n)


def _weighted_mean(values: Tensor, weights: Tensor | None, name: str) -> Tensor:
    if weights is None:
        return values.mean()
    if not isinstance(weights, Tensor) or weights.shape != values.shape:
        raise ValueError(
            f"{name} must have shape {tuple(values.shape)} (one weight per sequence), got "
            f"{tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__}"
        )
    if bool((weights < 0).any()) or not bool((weights > 0).any()):
        raise ValueError(f"{name} must be non-negative with a positive sum")
    weights = weights.to(values.dtype)
    return (weights * values).sum() / weights.sum()


def pbkd_adversary_loss(
    r_teacher: Tensor,
    r_student: Tensor,
    bt_nll_value: Tensor,
    nll_ref: float,
    zeta_over_n: float,
    lam: float | Tensor,
    *,
    teacher_weights: Tensor | None = None,
    student_weights: Tensor | None = None,
) -> Tensor:
    """Reward-model (adversary) loss of black-box PbKD (spec llm.md section 2: ``pbkd``).

    ``-(E_{y~p} r_phi - E_{y~q} r_phi) + lam (NLL_BT(phi; D) - NLL_ref - zeta/|D|)``, the
    expectations estimated by the mean of ``r_teacher`` (rewards of teacher responses) and
    ``r_student`` (of student responses), or by weighted means when weights are given (exact
    enumeration, e.g. on a tabular token tree). ``bt_nll_value`` is :func:`bt_nll` on ``D``.
    """
    _check_sequence_vector("r_teacher", r_teacher, None)
    _check_sequence_vector("r_student", r_student, None)
    gap = _weighted_mean(_as_float(r_teacher), teacher_weights, "teacher_weights") - _weighted_mean(
        _as_float(r_student), student_weights, "student_weights"
    )
    return adversary_lagrangian(gap, bt_nll_value, nll_ref, zeta_over_n, lam)


def dual_ascent(lam: float, constraint_violation: float | Tensor, lr: float) -> float:
    """Projected dual ascent ``lam <- max(0, lam + lr * violation)`` (spec llm.md section 2: ``pbkd``).

    ``constraint_violation`` is :func:`bt_constraint_violation`; ``lam`` grows while the
    reward model is outside the confidence set and shrinks (down to 0) inside it.
    """
    if isinstance(constraint_violation, Tensor):
        constraint_violation = constraint_violation.detach()
    violation = float(constraint_violation)
    lam, lr = float(lam), float(lr)
    if lam < 0 or lr < 0 or not (math.isfinite(lam) and math.isfinite(lr) and math.isfinite(violation)):
        raise ValueError(
            "dual_ascent needs a finite lam >= 0, a finite lr >= 0 and a finite violation; "
            f"got lam={lam}, lr={lr}, violation={violation}"
        )
    return max(0.0, lam + lr * violation)


def leave_one_out_pg_loss(logp_samples: Tensor, rewards: Tensor) -> Tensor:
    """REINFORCE with a leave-one-out baseline (spec llm.md section 2: ``pbkd`` student step).

    ``logp_samples[i, j] = log q(y_ij | x_i)`` for ``k`` samples per prompt (shape ``(P, k)``,
    with gradient), ``rewards[i, j] = r_phi(x_i, y_ij)`` (treated as constants). Advantage
    ``A_ij = r_ij - (1/(k-1)) sum_{l != j} r_il``; loss ``-(1/(P k)) sum_ij A_ij log q(y_ij|x_i)``,
    whose gradient is an unbiased estimate of ``-grad E_x E_{y~q} r_phi(x, y)``. Needs ``k >= 2``.
    """
    if not isinstance(logp_samples, Tensor) or logp_samples.dim() != 2:
        raise ValueError("logp_samples must have shape (prompts, samples per prompt)")
    if not isinstance(rewards, Tensor) or rewards.shape != logp_samples.shape:
        raise ValueError(
            f"rewards must have the shape of logp_samples {tuple(logp_samples.shape)}, got "
            f"{tuple(rewards.shape) if isinstance(rewards, Tensor) else type(rewards).__name__}"
        )
    k = logp_samples.shape[1]
    if k < 2:
        raise ValueError(f"the leave-one-out baseline needs k >= 2 samples per prompt, got k = {k}")
    logp = _as_float(logp_samples)
    r = rewards.detach().to(logp.dtype)
    baseline = (r.sum(dim=1, keepdim=True) - r) / (k - 1)
    advantage = r - baseline
    return -(advantage * logp).mean()


# --------------------------------------------------------------------------------------
# The stabilised student step (spec llm.md section 2a): KL-penalised rewards, whitened
# leave-one-out advantages, a PPO-clipped ratio with token-mean normalisation
# --------------------------------------------------------------------------------------


def group_advantages(rewards: Tensor, whiten: bool = True, eps: float = 1e-6) -> Tensor:
    """Leave-one-out advantages of ``k`` samples per prompt, whitened over the batch (as TRL's RLOO).

    ``rewards`` ``(P, k)``: ``A_ij = R_ij - (1/(k-1)) sum_{l != j} R_il``; with ``whiten`` the
    advantages are then ``(A - mean(A)) / (std(A) + eps)`` over all ``P k`` entries (``std`` with
    Bessel's correction; a batch whose advantages are all 0 stays 0). Constants: no gradient."""
    if not isinstance(rewards, Tensor) or rewards.dim() != 2:
        raise ValueError("rewards must have shape (prompts, samples per prompt)")
    k = rewards.shape[1]
    if k < 2:
        raise ValueError(f"the leave-one-out baseline needs k >= 2 samples per prompt, got k = {k}")
    r = _as_float(rewards.detach())
    if not bool(torch.isfinite(r).all()):
        raise ValueError("rewards must be finite")
    advantage = r - (r.sum(dim=1, keepdim=True) - r) / (k - 1)
    if whiten and advantage.numel() > 1:
        advantage = (advantage - advantage.mean()) / (advantage.std() + eps)
    return advantage


def kl_penalised_rewards(rewards: Tensor, sampler_logp: Tensor, reference_logp: Tensor, mask: Tensor,
                         beta_kl: float) -> tuple[Tensor, Tensor]:
    """``(R, kl)``: ``R_i = r_i - beta_kl * kl_i`` with the sampled-sequence KL estimate
    ``kl_i = sum_h mask (log q_old(y_h|s_h) - log pi_ref(y_h|s_h))`` (``(N, K)`` inputs, ``(N,)`` rewards)."""
    mask = _check_mask(mask, tuple(sampler_logp.shape))
    if tuple(reference_logp.shape) != tuple(sampler_logp.shape) or tuple(rewards.shape) != (sampler_logp.shape[0],):
        raise ValueError(f"reference_logp must have the shape of sampler_logp {tuple(sampler_logp.shape)} and "
                         f"rewards shape ({sampler_logp.shape[0]},); got {tuple(reference_logp.shape)} and "
                         f"{tuple(rewards.shape)}")
    if beta_kl < 0 or not math.isfinite(beta_kl):
        raise ValueError(f"beta_kl must be a finite number >= 0, got {beta_kl}")
    diff = _as_float(sampler_logp.detach()) - _as_float(reference_logp.detach())
    kl = torch.where(mask > 0, diff * mask, torch.zeros_like(diff)).sum(-1)
    return _as_float(rewards.detach()) - beta_kl * kl, kl


@dataclass
class PPOOutput:
    loss: Tensor  # sum over response tokens of the clipped surrogate / normaliser (with gradient)
    clip_fraction: Tensor  # share of response tokens where the clipped term is the active one
    ratio_mean: Tensor  # mean importance ratio q_theta / q_old over response tokens


def ppo_clipped_loss(token_logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float,
                     normaliser: Tensor | float | None = None) -> PPOOutput:
    """PPO's clipped surrogate with a sequence advantage broadcast to its tokens, token-mean normalised.

    ``token_logp`` ``(N, K)`` (with gradient) and ``old_logp`` (the sampling policy's, constants)
    are per-token log-probs, ``advantages`` ``(N,)``. Per token ``rho = exp(logp - old)``,
    ``l = -min(rho A, clip(rho, 1 - eps, 1 + eps) A)``; loss ``sum mask l / normaliser``, where
    ``normaliser`` defaults to ``mask.sum()`` (pass the whole batch's token count to split a
    batch into micro-batches)."""
    mask = _check_mask(mask, tuple(token_logp.shape))
    if tuple(old_logp.shape) != tuple(token_logp.shape) or tuple(advantages.shape) != (token_logp.shape[0],):
        raise ValueError(f"old_logp must have the shape of token_logp {tuple(token_logp.shape)} and advantages "
                         f"shape ({token_logp.shape[0]},); got {tuple(old_logp.shape)} and {tuple(advantages.shape)}")
    if not (0 < clip_eps < 1):
        raise ValueError(f"clip_eps must lie in (0, 1), got {clip_eps}")
    logp = _as_float(token_logp)
    ratio = torch.exp(logp - _as_float(old_logp.detach()))
    a = _as_float(advantages.detach())[:, None]
    unclipped, clipped = ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a
    per_token = -torch.minimum(unclipped, clipped)
    weights = mask.to(per_token.dtype)
    total = torch.where(weights > 0, per_token * weights, torch.zeros_like(per_token)).sum()
    normaliser = weights.sum() if normaliser is None else normaliser
    on = weights > 0
    return PPOOutput(loss=total / normaliser,
                     clip_fraction=((clipped < unclipped) & on).sum() / on.sum().clamp(min=1),
                     ratio_mean=(ratio.detach() * weights).sum() / weights.sum().clamp(min=1))


# --------------------------------------------------------------------------------------
# MM PbKD (white-box, Algorithm 3): Q-moments, induced reward, student surrogate
# --------------------------------------------------------------------------------------


@dataclass
class TopKProbs:
    """A sparse distribution per position: the ``k`` most likely ids ``(B, T, k)``, their
    log-probabilities and the log of the mass outside them ``(B, T)`` (:func:`teacher_topk`).

    ``<pi, f>`` is then ``sum_j pi_j f_{ids_j} + tail * mean of f over the other V - k ids``:
    exact when ``f`` is constant off the top k, and within ``tail * (max - min of f off the top
    k)`` of the dense value otherwise (the error is measured in ``llm/bench.py``)."""

    ids: Tensor
    logp: Tensor
    tail_logp: Tensor

    @property
    def shape(self) -> tuple:
        return tuple(self.ids.shape[:2])

    def __getitem__(self, index) -> TopKProbs:
        return TopKProbs(self.ids[index], self.logp[index], self.tail_logp[index])

    def expected(self, f_values: Tensor) -> Tensor:
        dtype = torch.promote_types(_compute_dtype(f_values), _compute_dtype(self.logp))
        f = f_values.to(dtype)
        picked = f.gather(-1, self.ids.long())
        head = (self.logp.to(dtype).exp() * picked).sum(-1)
        rest = (f.sum(-1) - picked.sum(-1)) / max(1, f.shape[-1] - self.ids.shape[-1])
        return head + self.tail_logp.to(dtype).exp() * rest


def _check_q_inputs(f_values: Tensor, probs: Tensor | TopKProbs, actions: Tensor, mask: Tensor,
                    probs_name: str) -> Tensor:
    _check_scores("f_values", f_values, 3)
    if isinstance(probs, TopKProbs):
        if probs.shape != tuple(f_values.shape[:2]) or tuple(probs.tail_logp.shape) != probs.shape:
            raise ValueError(f"{probs_name} (top-k) covers positions {probs.shape} but f_values has "
                             f"{tuple(f_values.shape[:2])} (batch, time)")
        return _check_mask(mask, tuple(f_values.shape[:2]))
    _check_scores(probs_name, probs, 3)
    if probs.shape != f_values.shape:
        raise ValueError(
            f"{probs_name} {tuple(probs.shape)} must have the shape of f_values {tuple(f_values.shape)} "
            "(batch, time, actions)"
        )
    return _check_mask(mask, tuple(f_values.shape[:2]))


def _expected_f(f_values: Tensor, probs: Tensor | TopKProbs) -> Tensor:
    """``<pi(.|s_h), f(s_h, .)>`` per position, shape ``(B, T)``."""
    if isinstance(probs, TopKProbs):
        return probs.expected(f_values)
    dtype = torch.promote_types(_compute_dtype(f_values), _compute_dtype(probs))
    return (probs.to(dtype) * f_values.to(dtype)).sum(-1)


def _sequence_sums(per_token: Tensor, weights: Tensor) -> Tensor:
    weights = weights.to(per_token.dtype)
    return torch.where(weights > 0, per_token * weights, torch.zeros_like(per_token)).sum(-1)


def q_moment_on_policy(
    f_values: Tensor, teacher_probs: Tensor, actions: Tensor, mask: Tensor, weights: Tensor | None = None
) -> Tensor:
    """On-policy Q-moment ``E_{y~q} sum_h [<p(.|s_h), f(s_h,.)> - f(s_h, y_h)]`` (spec llm.md s2, tabular.md s4).

    On student rollouts: ``f_values[b, h] = f(s_h, .)``, ``teacher_probs[b, h] = p(.|s_h)``,
    ``actions[b, h] = y_h``; sum over masked steps, mean over sequences (or the
    ``weights``-weighted mean, for exact enumeration). Equals ``J(p, r_f) - J(q, r_f)`` in
    expectation (telescoping).
    """
    weights_t = _check_q_inputs(f_values, teacher_probs, actions, mask, "teacher_probs")
    f = _as_float(f_values)
    per_token = _expected_f(f, teacher_probs) - _gather_last(f, actions, weights_t, "actions")
    return _weighted_mean(_sequence_sums(per_token, weights_t), weights, "weights")


def q_moment_off_policy(
    f_values: Tensor, student_probs: Tensor, actions: Tensor, mask: Tensor, weights: Tensor | None = None
) -> Tensor:
    """Off-policy Q-moment ``E_{y~p} sum_h [f(s_h, y_h) - <q(.|s_h), f(s_h,.)>]`` (spec llm.md s2, tabular.md s4).

    On teacher rollouts: ``student_probs[b, h] = q(.|s_h)`` (differentiable: the student
    minimises this term directly). Sum over masked steps, (weighted) mean over sequences.
    """
    weights_t = _check_q_inputs(f_values, student_probs, actions, mask, "student_probs")
    f = _as_float(f_values)
    per_token = _gather_last(f, actions, weights_t, "actions") - _expected_f(f, student_probs)
    return _weighted_mean(_sequence_sums(per_token, weights_t), weights, "weights")


def induced_sequence_reward(f_values: Tensor, teacher_probs: Tensor, actions: Tensor, mask: Tensor) -> Tensor:
    """Induced reward ``r_f(tau) = sum_h [f(s_h, y_h) - <p(.|s_{h+1}), f(s_{h+1}, .)>]``, shape ``(B,)``.

    Spec llm.md section 2 (``mm_pbkd``) and tabular.md section 4: the reward whose BT
    likelihood constrains the Q-head. The response of each row is its contiguous run of
    masked positions; the next-state term of the last response step is 0 (the episode ends:
    EOS, or the fixed horizon in the tabular MDP).
    """
    weights_t = _check_q_inputs(f_values, teacher_probs, actions, mask, "teacher_probs")
    on = weights_t > 0
    starts = (on[:, 1:] & ~on[:, :-1]).sum(-1) + on[:, 0].long()
    if bool((starts > 1).any()):
        raise ValueError(
            "mask must mark one contiguous response per row for the induced reward (row(s) "
            f"{torch.nonzero(starts > 1).flatten().tolist()} have gaps)"
        )
    f = _as_float(f_values)
    value_next = torch.zeros_like(f[..., 0])
    value_next[:, :-1] = _expected_f(f[:, 1:], teacher_probs[:, 1:]) * on[:, 1:]
    per_token = _gather_last(f, actions, weights_t, "actions") - value_next
    return _sequence_sums(per_token, weights_t)


def mm_pbkd_adversary_loss(
    off_moment: Tensor,
    on_moment: Tensor,
    bt_nll_value: Tensor,
    nll_ref: float,
    zeta_over_n: float,
    lam: float | Tensor,
    beta: float = 0.5,
) -> Tensor:
    """Q-head (adversary) loss of MM PbKD (spec llm.md section 2: ``mm_pbkd``).

    ``-(beta * off + (1 - beta) * on) + lam (NLL_BT(r_f; D) - NLL_ref - zeta/|D|)`` with the
    moments from :func:`q_moment_off_policy` / :func:`q_moment_on_policy` (probabilities
    detached, ``f`` with gradient) and ``NLL_BT`` from :func:`bt_nll` on
    :func:`induced_sequence_reward`.
    """
    beta = _check_unit_interval("beta", beta)
    return adversary_lagrangian(beta * off_moment + (1.0 - beta) * on_moment, bt_nll_value, nll_ref, zeta_over_n, lam)


@dataclass
class MMPbKDStudentOutput:
    """Student loss of MM PbKD (with gradient) and the detached moments it trades off."""

    loss: Tensor
    off_moment: Tensor
    on_moment: Tensor
    gap: Tensor


def mm_pbkd_student_loss(
    *,
    off_f_values: Tensor,
    off_student_probs: Tensor,
    off_actions: Tensor,
    off_mask: Tensor,
    on_f_values: Tensor,
    on_teacher_probs: Tensor,
    on_actions: Tensor,
    on_mask: Tensor,
    on_student_token_logp: Tensor,
    beta: float = 0.5,
    off_weights: Tensor | None = None,
    on_weights: Tensor | None = None,
) -> MMPbKDStudentOutput:
    """Student step of MM PbKD (spec llm.md section 2: ``mm_pbkd``); ``f`` is held fixed.

    The student minimises the gap ``beta * off + (1 - beta) * on``:

    * off-policy (teacher rollouts ``off_*``): :func:`q_moment_off_policy`, differentiated
      directly through ``off_student_probs = q(.|s_h)``;
    * on-policy (student rollouts ``on_*``): per-token policy gradient with advantage
      ``A_h = -(<p(.|s_h), f(s_h,.)> - f(s_h, y_h))`` (detached), surrogate
      ``-E sum_h A_h log q(y_h | s_h)`` with ``on_student_token_logp = log q(y_h | s_h)``
      ``(B, T)`` (e.g. :func:`token_log_probs`). ``f`` plays the action-value, as in moment
      matching, so each token is credited with its own advantage.

    ``loss = beta * off_surrogate + (1 - beta) * on_surrogate``. ``off_moment``, ``on_moment``
    and ``gap`` are the detached objective values.
    """
    beta = _check_unit_interval("beta", beta)
    off_moment = q_moment_off_policy(off_f_values.detach(), off_student_probs, off_actions, off_mask, off_weights)
    weights_on = _check_q_inputs(on_f_values, on_teacher_probs, on_actions, on_mask, "on_teacher_probs")
    _check_scores("on_student_token_logp", on_student_token_logp, 2)
    if on_student_token_logp.shape != on_actions.shape:
        raise ValueError(
            f"on_student_token_logp {tuple(on_student_token_logp.shape)} must have the shape of "
            f"on_actions {tuple(on_actions.shape)}"
        )
    with torch.no_grad():
        f_on = _as_float(on_f_values)
        taken = _gather_last(f_on, on_actions, weights_on, "on_actions")
        moment_per_token = _expected_f(f_on, on_teacher_probs) - taken
        on_moment = _weighted_mean(_sequence_sums(moment_per_token, weights_on), on_weights, "on_weights")
    advantage = -moment_per_token
    logq = _as_float(on_student_token_logp)
    on_surrogate = _weighted_mean(
        _sequence_sums(-advantage.to(logq.dtype) * logq, weights_on), on_weights, "on_weights"
    )
    loss = beta * off_moment + (1.0 - beta) * on_surrogate
    return MMPbKDStudentOutput(
        loss=loss,
        off_moment=off_moment.detach(),
        on_moment=on_moment.detach(),
        gap=(beta * off_moment.detach() + (1.0 - beta) * on_moment),
    )

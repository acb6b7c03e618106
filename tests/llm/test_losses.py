"""Tests of llm/losses.py (spec llm.md section 2) against independent brute-force computations.

The references below are explicit Python loops over batch, time and vocabulary in float64
(the ``math`` module on Python floats), sharing no code with the tensor implementation.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llm import losses as L

# ----------------------------------------------------------------------------------------
# Brute-force references
# ----------------------------------------------------------------------------------------


def bf_softmax(row):
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def bf_kl(a, b):
    return sum(ai * (math.log(ai) - math.log(bi)) for ai, bi in zip(a, b) if ai > 0)


def bf_entropy(a):
    return -sum(ai * math.log(ai) for ai in a if ai > 0)


def bf_mix(w, a, b):
    return [w * ai + (1 - w) * bi for ai, bi in zip(a, b)]


def bf_jsd(p, q, beta):
    if beta == 0:
        return bf_kl(p, q)
    if beta == 1:
        return bf_kl(q, p)
    m = bf_mix(beta, p, q)
    return beta * bf_kl(p, m) + (1 - beta) * bf_kl(q, m)


def bf_akl_weights(p, q, mu):
    order = sorted(range(len(p)), key=lambda i: -p[i])  # Python's sort is stable
    g_head = g_tail = 0.0
    cumulative = 0.0
    for rank, i in enumerate(order):
        cumulative += p[i]
        if rank == 0 or cumulative <= mu:
            g_head += abs(p[i] - q[i])
        else:
            g_tail += abs(p[i] - q[i])
    if g_head + g_tail == 0:
        return 0.5, 0.5
    return g_head / (g_head + g_tail), g_tail / (g_head + g_tail)


def bf_akl(p, q, mu):
    w_head, w_tail = bf_akl_weights(p, q, mu)
    return w_head * bf_kl(p, q) + w_tail * bf_kl(q, p)


BF_TOKEN = {
    "fkl": lambda p, q, **kw: bf_kl(p, q),
    "rkl": lambda p, q, **kw: bf_kl(q, p),
    "jsd": lambda p, q, beta=0.5: bf_jsd(p, q, beta),
    "skl": lambda p, q, alpha=0.1: bf_kl(p, bf_mix(alpha, p, q)),
    "srkl": lambda p, q, alpha=0.1: bf_kl(q, bf_mix(1 - alpha, p, q)),
    "akl": lambda p, q, mu=0.5: bf_akl(p, q, mu),
}


def bf_masked_token_mean(student, teacher, mask, per_token, **kw):
    s, t, m = student.double().tolist(), teacher.double().tolist(), mask.double().tolist()
    total = count = 0.0
    for b in range(len(s)):
        for h in range(len(s[b])):
            if m[b][h] > 0:
                total += m[b][h] * per_token(bf_softmax(t[b][h]), bf_softmax(s[b][h]), **kw)
                count += m[b][h]
    return total / count


def case(seed, B=2, T=4, V=5, scale=2.0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(B, T, V, generator=gen, dtype=torch.float64)).to(dtype)
    teacher = (scale * torch.randn(B, T, V, generator=gen, dtype=torch.float64)).to(dtype)
    # prompt position, response tokens, right padding: a realistic mask with holes at both ends
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)[:B, :T]
    return student, teacher, mask


PARAMS = [
    ("fkl", {}),
    ("rkl", {}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 0.3}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 1.0}),
    ("skl", {"alpha": 0.1}),
    ("skl", {"alpha": 0.0}),
    ("srkl", {"alpha": 0.1}),
    ("srkl", {"alpha": 0.7}),
    ("akl", {"mu": 0.5}),
    ("akl", {"mu": 0.0}),
    ("akl", {"mu": 0.9}),
]


# ----------------------------------------------------------------------------------------
# Token-level objectives
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,kw", PARAMS)
def test_token_objectives_match_brute_force(name, kw):
    for seed in range(3):
        student, teacher, mask = case(seed)
        got = L.TOKEN_OBJECTIVES[name](student, teacher, mask, **kw)
        want = bf_masked_token_mean(student, teacher, mask, BF_TOKEN[name], **kw)
        assert got.dtype == torch.float64
        assert float(got) == pytest.approx(want, rel=1e-10, abs=1e-12)
        assert want > 0 or (name == "skl" and kw["alpha"] == 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(L.TOKEN_OBJECTIVES))
def test_low_precision_inputs_are_computed_in_float32(name, dtype):
    student, teacher, mask = case(7, dtype=dtype)
    got = L.TOKEN_OBJECTIVES[name](student, teacher, mask)
    assert got.dtype == torch.float32
    # the reference sees exactly the values the loss saw (bf16-rounded), in float64
    want = bf_masked_token_mean(student, teacher, mask, BF_TOKEN[name])
    assert float(got) == pytest.approx(want, rel=2e-5, abs=1e-6)


def test_jsd_endpoints_are_exactly_fkl_and_rkl():
    student, teacher, mask = case(3)
    assert torch.equal(L.jsd(student, teacher, mask, beta=0.0), L.fkl(student, teacher, mask))
    assert torch.equal(L.jsd(student, teacher, mask, beta=1.0), L.rkl(student, teacher, mask))
    # ... and they are the limits of the normalised interior divergence
    eps = 1e-5
    forward = float(L.fkl(student, teacher, mask))
    reverse = float(L.rkl(student, teacher, mask))
    assert float(L.jsd(student, teacher, mask, beta=eps)) / eps == pytest.approx(forward, rel=1e-3)
    assert float(L.jsd(student, teacher, mask, beta=1 - eps)) / eps == pytest.approx(reverse, rel=1e-3)
    assert forward != pytest.approx(reverse, rel=1e-3)  # the two endpoints are distinguishable


def test_skew_divergences_reduce_to_kl_at_alpha_zero_and_vanish_at_one():
    student, teacher, mask = case(4)
    assert torch.equal(L.skl(student, teacher, mask, alpha=0.0), L.fkl(student, teacher, mask))
    assert torch.equal(L.srkl(student, teacher, mask, alpha=0.0), L.rkl(student, teacher, mask))
    assert float(L.skl(student, teacher, mask, alpha=1.0)) == 0.0
    assert float(L.srkl(student, teacher, mask, alpha=1.0)) == 0.0


def test_zero_when_student_equals_teacher():
    student, _, mask = case(5, dtype=torch.float32)
    for name, objective in L.TOKEN_OBJECTIVES.items():
        assert abs(float(objective(student, student.clone(), mask))) < 1e-6, name
    logged = L.divergences(student, student.clone(), mask)
    for key in ("fkl", "rkl", "jsd"):
        assert abs(logged[key]) < 1e-6
    assert logged["teacher_entropy"] > 0.1


@pytest.mark.parametrize("name", sorted(L.TOKEN_OBJECTIVES))
def test_mask_ignores_padding_tokens(name):
    student, teacher, mask = case(6)
    objective = L.TOKEN_OBJECTIVES[name]
    clean = objective(student, teacher, mask)
    noisy_student, noisy_teacher = student.clone(), teacher.clone()
    noisy_student[~mask] = 1e4 * torch.randn_like(noisy_student[~mask])
    noisy_teacher[~mask] = -1e4 * torch.randn_like(noisy_teacher[~mask])
    noisy_student.requires_grad_(True)
    noisy = objective(noisy_student, noisy_teacher, mask)
    assert float(noisy.detach()) == pytest.approx(float(clean), rel=1e-12)
    (grad,) = torch.autograd.grad(noisy, noisy_student)
    assert torch.count_nonzero(grad[~mask]) == 0
    assert torch.count_nonzero(grad[mask]) > 0
    # a float mask of weights gives the weighted token mean
    weighted = mask.double() * torch.tensor([[1.0, 2.0, 1.0, 0.5], [1.0, 1.0, 3.0, 1.0]])
    want = bf_masked_token_mean(student, teacher, weighted, BF_TOKEN[name])
    assert float(objective(student, teacher, weighted)) == pytest.approx(want, rel=1e-10)


def test_bad_inputs_raise_value_errors():
    student, teacher, mask = case(0)
    with pytest.raises(ValueError, match="no response token"):
        L.fkl(student, teacher, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="vocabular"):
        L.rkl(student, teacher[..., :4], mask)
    with pytest.raises(ValueError, match="mask must have shape"):
        L.jsd(student, teacher, mask[:, :3])
    with pytest.raises(ValueError, match="beta must lie in"):
        L.jsd(student, teacher, mask, beta=1.5)
    with pytest.raises(ValueError, match="alpha must lie in"):
        L.skl(student, teacher, mask, alpha=-0.1)
    with pytest.raises(ValueError, match="negative"):
        L.fkl(student, teacher, -mask.double())


def test_token_log_probs_sequence_log_prob_and_sft_match_brute_force():
    student, _, mask = case(8)
    gen = torch.Generator().manual_seed(8)
    labels = torch.randint(0, 5, mask.shape, generator=gen)
    labels[~mask] = -100  # Hugging Face's ignore index outside the response
    s = student.tolist()
    lab = labels.tolist()
    per = [[math.log(bf_softmax(s[b][t])[lab[b][t]]) if lab[b][t] >= 0 else 0.0 for t in range(4)] for b in range(2)]
    got = L.token_log_probs(student, labels)
    assert torch.allclose(got, torch.tensor(per, dtype=torch.float64), rtol=0, atol=1e-12)
    seq = L.sequence_log_prob(student, labels, mask)
    want_seq = [sum(per[b][t] for t in range(4) if mask[b, t]) for b in range(2)]
    assert seq.tolist() == pytest.approx(want_seq, rel=1e-12)
    n_tokens = int(mask.sum())
    assert float(L.sft_loss(student, labels, mask)) == pytest.approx(-sum(want_seq) / n_tokens, rel=1e-12)
    inside = labels.clone()
    inside[0, 1] = -100
    with pytest.raises(ValueError, match="ignore"):
        L.sft_loss(student, inside, mask)
    with pytest.raises(ValueError, match="vocabular"):
        L.token_log_probs(student, torch.full_like(labels, 5))


def test_divergences_log_the_true_values_with_the_entropy_term():
    student, teacher, mask = case(9)
    got = L.divergences(student, teacher, mask)
    want = {
        "fkl": bf_masked_token_mean(student, teacher, mask, lambda p, q: bf_kl(p, q)),
        "rkl": bf_masked_token_mean(student, teacher, mask, lambda p, q: bf_kl(q, p)),
        "jsd": bf_masked_token_mean(student, teacher, mask, lambda p, q: bf_jsd(p, q, 0.5)),
        "teacher_entropy": bf_masked_token_mean(student, teacher, mask, lambda p, q: bf_entropy(p)),
        "student_entropy": bf_masked_token_mean(student, teacher, mask, lambda p, q: bf_entropy(q)),
        "cross_entropy": bf_masked_token_mean(
            student, teacher, mask, lambda p, q: -sum(pi * math.log(qi) for pi, qi in zip(p, q))
        ),
    }
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-10), key
    assert got["cross_entropy"] == pytest.approx(got["fkl"] + got["teacher_entropy"], rel=1e-10)


@pytest.mark.parametrize(
    "name,kw", [("fkl", {}), ("rkl", {}), ("jsd", {"beta": 0.3}), ("skl", {"alpha": 0.2}), ("srkl", {"alpha": 0.2})]
)
def test_gradcheck_float64(name, kw):
    gen = torch.Generator().manual_seed(11)
    student = torch.randn(2, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    objective = L.TOKEN_OBJECTIVES[name]
    assert torch.autograd.gradcheck(lambda s, t: objective(s, t, mask, **kw), (student, teacher))


@pytest.mark.parametrize("name,kw", [(n, kw) for n, kw in PARAMS if n != "akl"])
def test_closed_form_student_gradient_passes_gradcheck(name, kw):
    """With the teacher held fixed the student's gradient is the closed form of _TokenDivergence,
    checked here against finite differences (a wrong sign, a missing centring or a dropped
    mixture weight fails). akl's gap weights are constants of its gradient by definition, so
    finite differences do not apply to it; test_akl_gradient_treats_gap_weights_as_constants
    and the autograd comparison below check it."""
    gen = torch.Generator().manual_seed(21)
    student = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = 2 * torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    objective = L.TOKEN_OBJECTIVES[name]
    assert torch.autograd.gradcheck(lambda s: objective(s, teacher, mask, **kw), (student,))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-8, 8), min_size=12, max_size=12), st.lists(st.floats(-8, 8), min_size=12, max_size=12),
       st.sampled_from(PARAMS))
def test_closed_form_gradient_equals_autograd_through_the_formula(student, teacher, case_):
    """The closed form (teacher fixed) against autograd through every intermediate (the path a
    teacher that requires a gradient takes), on the same inputs."""
    name, kw = case_
    s = torch.tensor(student, dtype=torch.float64).view(1, 2, 6)
    t = torch.tensor(teacher, dtype=torch.float64).view(1, 2, 6)
    mask = torch.ones(1, 2)
    fast, slow = s.clone().requires_grad_(), s.clone().requires_grad_()
    L.TOKEN_OBJECTIVES[name](fast, t, mask, **kw).backward()
    L.TOKEN_OBJECTIVES[name](slow, t.clone().requires_grad_(), mask, **kw).backward()
    torch.testing.assert_close(fast.grad, slow.grad, rtol=1e-9, atol=1e-12)


def test_gradcheck_sft_and_sequence_log_prob():
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, 3, 0], [2, 2, -100]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda x: L.sft_loss(x, labels, mask), (logits,))
    assert torch.autograd.gradcheck(lambda x: L.sequence_log_prob(x, labels, mask), (logits,))


def test_akl_gradient_treats_gap_weights_as_constants():
    student, teacher, mask = case(13)
    student.requires_grad_(True)
    (grad,) = torch.autograd.grad(L.akl(student, teacher, mask, mu=0.5), student)
    # reference: the same mixture of fkl and rkl with the weights frozen at their brute-force values
    s, t = student.detach().tolist(), teacher.tolist()
    w_head = torch.zeros(mask.shape, dtype=torch.float64)
    for b, h in itertools.product(range(2), range(4)):
        w_head[b, h] = bf_akl_weights(bf_softmax(t[b][h]), bf_softmax(s[b][h]), 0.5)[0]
    log_q = torch.log_softmax(student, -1)
    log_p = torch.log_softmax(teacher, -1)
    fkl_tok = (log_p.exp() * (log_p - log_q)).sum(-1)
    rkl_tok = (log_q.exp() * (log_q - log_p)).sum(-1)
    frozen = ((w_head * fkl_tok + (1 - w_head) * rkl_tok) * mask).sum() / mask.sum()
    (want,) = torch.autograd.grad(frozen, student)
    assert torch.allclose(grad, want, rtol=1e-10, atol=1e-14)
    assert not torch.allclose(w_head[mask], torch.full_like(w_head[mask], 0.5))


def test_akl_first_token_is_always_in_the_head():
    # teacher's top token holds mass > mu: with mu below it the head is that token alone
    teacher = torch.tensor([[[3.0, 0.0, 0.0, -1.0]]], dtype=torch.float64)
    student = torch.tensor([[[0.0, 1.0, 0.5, 0.0]]], dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    p, q = bf_softmax(teacher[0, 0].tolist()), bf_softmax(student[0, 0].tolist())
    g_head = abs(p[0] - q[0])
    g_tail = sum(abs(p[i] - q[i]) for i in range(1, 4))
    want = (g_head * bf_kl(p, q) + g_tail * bf_kl(q, p)) / (g_head + g_tail)
    for mu in (0.0, 0.5):
        assert float(L.akl(student, teacher, mask, mu=mu)) == pytest.approx(want, rel=1e-12)


def test_akl_head_boundary_is_inclusive_and_ties_keep_vocabulary_order():
    # uniform teacher over 4 tokens: cumulative mass 0.25, 0.5, 0.75, 1.0 exactly, so with
    # mu = 0.5 the head is tokens {0, 1} (mass <= mu) and the tail {2, 3}
    teacher = torch.zeros(1, 1, 4, dtype=torch.float64)
    student = torch.tensor([[[2.0, -1.0, 0.5, 0.0]]], dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    p, q = [0.25] * 4, bf_softmax(student[0, 0].tolist())
    g_head = abs(p[0] - q[0]) + abs(p[1] - q[1])
    g_tail = abs(p[2] - q[2]) + abs(p[3] - q[3])
    want = (g_head * bf_kl(p, q) + g_tail * bf_kl(q, p)) / (g_head + g_tail)
    assert float(L.akl(student, teacher, mask, mu=0.5)) == pytest.approx(want, rel=1e-12)


logits_strategy = st.lists(st.floats(-8, 8), min_size=2 * 3 * 4 * 2, max_size=2 * 3 * 4 * 2)


def _pair(values):
    x = torch.tensor(values, dtype=torch.float64).reshape(2, 2, 3, 4)
    return x[0], x[1], torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)


@settings(max_examples=20)
@given(values=logits_strategy, beta=st.floats(0.01, 0.99), alpha=st.floats(0.01, 0.99), mu=st.floats(0, 1))
def test_divergences_are_nonnegative_and_bounded(values, beta, alpha, mu):
    student, teacher, mask = _pair(values)
    tol = 1e-12
    assert float(L.fkl(student, teacher, mask)) >= -tol
    assert float(L.rkl(student, teacher, mask)) >= -tol
    assert float(L.akl(student, teacher, mask, mu=mu)) >= -tol
    binary_entropy = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    assert -tol <= float(L.jsd(student, teacher, mask, beta=beta)) <= binary_entropy + tol
    assert -tol <= float(L.skl(student, teacher, mask, alpha=alpha)) <= -math.log(alpha) + tol
    assert -tol <= float(L.srkl(student, teacher, mask, alpha=alpha)) <= -math.log(alpha) + tol


@settings(max_examples=20)
@given(values=logits_strategy, beta=st.sampled_from([0.0, 0.5, 1.0]) | st.floats(1e-3, 1 - 1e-3))
def test_jsd_symmetry(values, beta):
    # the endpoints are defined as the normalised limits (fkl, rkl), so the swap holds at them
    # exactly and on the interior; it is not asked across the jump next to an endpoint
    student, teacher, mask = _pair(values)
    forward = float(L.jsd(student, teacher, mask, beta=beta))
    swapped = float(L.jsd(teacher, student, mask, beta=1 - beta))
    assert forward == pytest.approx(swapped, rel=1e-9, abs=1e-12)
    if beta == 0.5:
        assert forward == pytest.approx(float(L.jsd(teacher, student, mask, beta=0.5)), rel=1e-9, abs=1e-12)


# ----------------------------------------------------------------------------------------
# Chunks over tokens, and the teacher's top-k buckets
# ----------------------------------------------------------------------------------------


def head_case(seed, N=7, H=6, V=11):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen)
    weight = torch.randn(V, H, generator=gen)
    bias = torch.randn(V, generator=gen)
    teacher = 2 * torch.randn(N, V, generator=gen)
    labels = torch.randint(0, V, (N,), generator=gen)
    return hidden, weight, bias, teacher, labels


def _leaves(*tensors):
    return [t.clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("name,kw", PARAMS + [("sft", {})])
@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_chunked_token_mean_equals_the_unchunked_loss_and_its_gradients(name, kw, chunk):
    """One chunk (chunk >= N) gives the unchunked loss bit for bit; smaller chunks give it to
    float32 rounding (a row's reductions may be vectorised differently in a tensor of another
    size). The gradients of hidden states, head weight and bias are those of autograd through the
    whole (N, V) loss. Every chunk the loss sees has at most `chunk` rows (the memory bound)."""
    hidden, weight, bias, teacher, labels = head_case(0)
    ones = torch.ones(1, hidden.shape[0], dtype=torch.bool)
    h0, w0, b0 = _leaves(hidden, weight, bias)
    logits = torch.nn.functional.linear(h0, w0, b0)
    if name == "sft":
        whole = L.sft_loss(logits[None], labels[None], ones)
        per_token = lambda scores, rows: -L.token_log_probs(scores[None], labels[rows][None])[0]  # noqa: E731
    else:
        whole = L.TOKEN_OBJECTIVES[name](logits[None], teacher[None], ones, **kw)
        per_token = lambda scores, rows: L.token_values(name, scores, teacher[rows], **kw)  # noqa: E731
    whole.backward()
    seen = []
    h1, w1, b1 = _leaves(hidden, weight, bias)
    chunked = L.chunked_token_mean(h1, w1, b1, lambda s, rows: (seen.append(s.shape[0]), per_token(s, rows))[1], chunk)
    (2.5 * chunked).backward()  # the outer gradient scales the saved ones
    if chunk >= hidden.shape[0]:
        assert chunked.item() == whole.item()
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=0)
    assert max(seen) <= chunk and sum(seen) == hidden.shape[0]
    for fast, slow in ((h1, h0), (w1, w0), (b1, b0)):
        torch.testing.assert_close(fast.grad, 2.5 * slow.grad, rtol=1e-5, atol=1e-6)


def test_chunked_token_mean_takes_scores_without_a_head_and_refuses_empty_input():
    _, _, _, teacher, _ = head_case(1)
    student = torch.randn_like(teacher, requires_grad=True)
    value = L.chunked_token_mean(student, None, None, lambda s, rows: L.token_values("rkl", s, teacher[rows]), 2)
    value.backward()
    reference = student.detach().clone().requires_grad_()
    L.rkl(reference[None], teacher[None], torch.ones(1, len(teacher))).backward()
    torch.testing.assert_close(student.grad, reference.grad)
    with pytest.raises(ValueError, match="no response token"):
        L.chunked_token_mean(torch.zeros(0, 3), None, None, lambda s, rows: s.sum(-1), 2)
    with pytest.raises(ValueError, match="chunk_tokens"):
        L.chunked_token_mean(student, None, None, lambda s, rows: s.sum(-1), 0)


def bf_buckets(probs, top):
    """Brute force: the mass of each top token, then the rest summed."""
    return [probs[i] for i in top] + [sum(v for i, v in enumerate(probs) if i not in top)]


@pytest.mark.parametrize("k", [1, 3, 10])
def test_teacher_topk_and_buckets_match_brute_force(k):
    gen = torch.Generator().manual_seed(2)
    s, t = torch.randn(3, 10, generator=gen, dtype=torch.float64), 3 * torch.randn(3, 10, generator=gen, dtype=torch.float64)
    ids, logp, tail = L.teacher_topk(t, k)
    q_b, p_b = L.topk_buckets(s, ids, logp, tail)
    for row in range(3):
        p, q = bf_softmax(t[row].tolist()), bf_softmax(s[row].tolist())
        top = sorted(range(10), key=lambda i: -p[i])[:k]
        assert sorted(ids[row].tolist()) == sorted(top)
        order = ids[row].tolist()
        torch.testing.assert_close(p_b[row].exp(), torch.tensor(bf_buckets(p, order), dtype=torch.float64))
        torch.testing.assert_close(q_b[row].exp(), torch.tensor(bf_buckets(q, order), dtype=torch.float64))
    if k == 10:  # every token kept: the tail is empty and the buckets are the full distributions
        full = L.fkl(s[None], t[None], torch.ones(1, 3))
        torch.testing.assert_close(L.fkl(q_b[None], p_b[None], torch.ones(1, 3)), full)


@pytest.mark.parametrize("name,kw", PARAMS)
@pytest.mark.parametrize("k", [9, 10])
def test_topk_buckets_with_every_token_kept_give_the_full_loss_and_gradient(name, kw, k):
    """k = V - 1 leaves one token in the tail, k = V an empty tail (log-mass -inf on both sides):
    value and gradient are then those of the full distributions, with no NaN from -inf - -inf."""
    gen = torch.Generator().manual_seed(3)
    s0, t = torch.randn(1, 4, 10, generator=gen, dtype=torch.float64), 3 * torch.randn(1, 4, 10, generator=gen, dtype=torch.float64)
    mask = torch.ones(1, 4)
    full_s, bucket_s = s0.clone().requires_grad_(), s0.clone().requires_grad_()
    full = L.TOKEN_OBJECTIVES[name](full_s, t, mask, **kw)
    full.backward()
    q_b, p_b = L.topk_buckets(bucket_s, *L.teacher_topk(t, k))
    bucketed = L.TOKEN_OBJECTIVES[name](q_b, p_b, mask, **kw)
    bucketed.backward()
    torch.testing.assert_close(bucketed, full)
    torch.testing.assert_close(bucket_s.grad, full_s.grad)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-6, 6), min_size=8, max_size=8), st.lists(st.floats(-6, 6), min_size=8, max_size=8),
       st.integers(1, 7), st.sampled_from([n for n in L.TOKEN_OBJECTIVES if n != "akl"]))
def test_topk_buckets_never_raise_a_divergence(student, teacher, k, name):
    """Data processing: merging tokens into a tail bucket can only lower an f-divergence (fkl,
    rkl, jsd, skl, srkl), so the cached loss is a lower bound of the full one."""
    s, t = torch.tensor([student], dtype=torch.float64), torch.tensor([teacher], dtype=torch.float64)
    q_b, p_b = L.topk_buckets(s, *L.teacher_topk(t, k))
    assert L.token_values(name, q_b, p_b).item() <= L.token_values(name, s, t).item() + 1e-12


# ----------------------------------------------------------------------------------------
# DPKD
# ----------------------------------------------------------------------------------------

LOGQ_T = [-12.0, -30.5, -7.25]
LOGP_T = [-10.0, -28.0, -8.0]
LEN_T = [6, 15, 4]
LOGQ_S = [-9.0, -20.0, -11.5]
LOGP_S = [-14.0, -21.0, -13.0]
LEN_S = [5, 9, 7]


def log_sigmoid(z):
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def dpkd_inputs():
    as_t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return as_t(LOGQ_T), as_t(LOGP_T), torch.tensor(LEN_T), as_t(LOGQ_S), as_t(LOGP_S), torch.tensor(LEN_S)


@pytest.mark.parametrize("variant", L.PREFERENCE_VARIANTS)
@pytest.mark.parametrize("normalize", [True, False])
def test_dpkd_variants_match_hand_formulas(variant, normalize):
    beta, gamma, cpo_alpha = 0.3, (0.4 if variant == "simpo" else 0.0), 0.7
    out = L.dpkd_loss(
        *dpkd_inputs(), beta=beta, variant=variant, length_normalize=normalize, gamma=gamma, cpo_alpha=cpo_alpha
    )
    losses, rewards_T, rewards_S = [], [], []
    for b in range(3):
        n_T = LEN_T[b] if normalize else 1
        n_S = LEN_S[b] if normalize else 1
        if variant in ("dpo", "ipo"):
            s_T, s_S = (LOGQ_T[b] - LOGP_T[b]) / n_T, (LOGQ_S[b] - LOGP_S[b]) / n_S
        else:
            s_T, s_S = LOGQ_T[b] / n_T, LOGQ_S[b] / n_S
        rewards_T.append(beta * s_T)
        rewards_S.append(beta * s_S)
        if variant == "dpo":
            losses.append(-log_sigmoid(beta * s_T - beta * s_S))
        elif variant == "ipo":
            losses.append((s_T - s_S - 1 / (2 * beta)) ** 2)
        elif variant == "simpo":
            losses.append(-log_sigmoid(beta * s_T - beta * s_S - gamma))
        else:
            losses.append(-log_sigmoid(beta * s_T - beta * s_S))
    want = sum(losses) / 3
    if variant == "cpo":
        want += cpo_alpha * (-sum(LOGQ_T) / sum(LEN_T))
    assert float(out.loss) == pytest.approx(want, rel=1e-12)
    assert out.reward_teacher.tolist() == pytest.approx(rewards_T, rel=1e-12)
    assert out.reward_student.tolist() == pytest.approx(rewards_S, rel=1e-12)
    assert out.margin.tolist() == pytest.approx([a - b for a, b in zip(rewards_T, rewards_S)], rel=1e-12)
    assert out.student_logp_own.tolist() == LOGQ_S
    assert not out.margin.requires_grad


def test_dpo_gradient_matches_hand_derivative():
    logq_T, logp_T, len_T, logq_S, logp_S, len_S = dpkd_inputs()
    logq_T.requires_grad_(True)
    logq_S.requires_grad_(True)
    beta = 0.5
    out = L.dpkd_loss(logq_T, logp_T, len_T, logq_S, logp_S, len_S, beta=beta)
    grad_T, grad_S = torch.autograd.grad(out.loss, (logq_T, logq_S))
    for b in range(3):
        z = beta * ((LOGQ_T[b] - LOGP_T[b]) / LEN_T[b] - (LOGQ_S[b] - LOGP_S[b]) / LEN_S[b])
        sig_neg = 1 / (1 + math.exp(z))
        assert float(grad_T[b]) == pytest.approx(-sig_neg * beta / LEN_T[b] / 3, rel=1e-12)
        assert float(grad_S[b]) == pytest.approx(sig_neg * beta / LEN_S[b] / 3, rel=1e-12)


def test_dpkd_reference_free_variants_need_no_teacher_and_bad_inputs_raise():
    logq_T, logp_T, len_T, logq_S, logp_S, len_S = dpkd_inputs()
    with_teacher = L.dpkd_loss(logq_T, logp_T, len_T, logq_S, logp_S, len_S, variant="simpo")
    without = L.dpkd_loss(logq_T, None, len_T, logq_S, None, len_S, variant="simpo")
    assert torch.equal(with_teacher.loss, without.loss)
    with pytest.raises(ValueError, match="reference"):
        L.dpkd_loss(logq_T, None, len_T, logq_S, None, len_S, variant="dpo")
    with pytest.raises(ValueError, match="unknown dpkd variant"):
        L.dpkd_loss(*dpkd_inputs(), variant="kto")
    with pytest.raises(ValueError, match="gamma"):
        L.dpkd_loss(*dpkd_inputs(), variant="dpo", gamma=0.5)
    with pytest.raises(ValueError, match="positive"):
        L.dpkd_loss(logq_T, logp_T, torch.tensor([6, 0, 4]), logq_S, logp_S, len_S)
    with pytest.raises(ValueError, match="beta"):
        L.dpkd_loss(*dpkd_inputs(), beta=0.0)


def test_dpkd_from_token_log_probs_end_to_end():
    # the sequence log-probs a trainer passes in come from sequence_log_prob on both models
    student, teacher, mask = case(14)
    labels = torch.randint(0, 5, mask.shape, generator=torch.Generator().manual_seed(1))
    logq = L.sequence_log_prob(student, labels, mask)
    logp = L.sequence_log_prob(teacher, labels, mask)
    lengths = mask.sum(-1)
    out = L.dpkd_loss(logq, logp, lengths, logq.flip(0), logp.flip(0), lengths.flip(0), beta=1.0)
    ratio = ((logq - logp) / lengths).tolist()
    want = sum(-log_sigmoid(ratio[b] - ratio[1 - b]) for b in range(2)) / 2
    assert float(out.loss) == pytest.approx(want, rel=1e-12)


# ----------------------------------------------------------------------------------------
# PbKD (black-box): BT likelihood, adversary Lagrangian, dual ascent, leave-one-out PG
# ----------------------------------------------------------------------------------------


def test_bt_nll_matches_brute_force_and_its_gradient():
    r1 = torch.tensor([0.3, -1.2, 2.0, 0.0], dtype=torch.float64, requires_grad=True)
    r0 = torch.tensor([0.1, 0.4, -3.0, 0.0], dtype=torch.float64)
    labels = torch.tensor([1, 0, 0, 1])
    got = L.bt_nll(r1, r0, labels)
    terms = []
    for a, b, o in zip(r1.tolist(), r0.tolist(), labels.tolist()):
        p1 = 1 / (1 + math.exp(-(a - b)))
        terms.append(-math.log(p1 if o == 1 else 1 - p1))
    assert float(got.detach()) == pytest.approx(sum(terms) / 4, rel=1e-12)
    assert torch.autograd.gradcheck(lambda x: L.bt_nll(x, r0, labels), (r1,))
    with pytest.raises(ValueError, match="labels"):
        L.bt_nll(r1, r0, torch.tensor([1, 0, 2, 1]))


def test_pbkd_adversary_loss_and_dual_ascent():
    r_teacher = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    r_student = torch.tensor([0.25, -1.0], dtype=torch.float64)
    nll = torch.tensor(0.9, dtype=torch.float64)
    got = L.pbkd_adversary_loss(r_teacher, r_student, nll, nll_ref=0.6, zeta_over_n=0.1, lam=2.0)
    want = -((1.0 + 2.0 + 0.5) / 3 - (0.25 - 1.0) / 2) + 2.0 * (0.9 - 0.6 - 0.1)
    assert float(got) == pytest.approx(want, rel=1e-12)
    weighted = L.pbkd_adversary_loss(
        r_teacher, r_student, nll, 0.6, 0.1, 0.0,
        teacher_weights=torch.tensor([0.5, 0.25, 0.25]), student_weights=torch.tensor([3.0, 1.0]),
    )
    assert float(weighted) == pytest.approx(-((0.5 + 0.5 + 0.125) - (0.75 * 0.25 - 0.25)), rel=1e-12)
    violation = L.bt_constraint_violation(0.9, 0.6, 0.1)
    assert violation == pytest.approx(0.2)
    assert L.dual_ascent(1.0, violation, lr=0.5) == pytest.approx(1.1)
    assert L.dual_ascent(0.05, -0.2, lr=0.5) == 0.0
    with pytest.raises(ValueError, match="lam"):
        L.pbkd_adversary_loss(r_teacher, r_student, nll, 0.6, 0.1, lam=-1.0)
    with pytest.raises(ValueError):
        L.dual_ascent(-1.0, 0.1, 0.5)


def test_leave_one_out_pg_loss_matches_brute_force():
    gen = torch.Generator().manual_seed(15)
    logp = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    rewards = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    got = L.leave_one_out_pg_loss(logp, rewards)
    r, lp = rewards.tolist(), logp.tolist()
    advantages = [[r[i][j] - sum(r[i][l] for l in range(4) if l != j) / 3 for j in range(4)] for i in range(3)]
    want = -sum(advantages[i][j] * lp[i][j] for i in range(3) for j in range(4)) / 12
    assert float(got.detach()) == pytest.approx(want, rel=1e-12)
    (grad,) = torch.autograd.grad(got, logp)
    assert torch.allclose(grad, -torch.tensor(advantages, dtype=torch.float64) / 12, rtol=1e-12, atol=0)
    shifted = L.leave_one_out_pg_loss(logp, rewards + torch.tensor([[5.0], [-2.0], [0.3]], dtype=torch.float64))
    # the baseline removes per-prompt reward offsets
    assert float(shifted.detach()) == pytest.approx(float(got.detach()), rel=1e-12)
    with pytest.raises(ValueError, match="k >= 2"):
        L.leave_one_out_pg_loss(logp[:, :1], rewards[:, :1])


def test_leave_one_out_gradient_is_unbiased_on_an_exact_bandit():
    # one prompt, 3 actions: the expected surrogate gradient equals -grad E_q r exactly
    theta = torch.tensor([0.2, -0.5, 1.0], dtype=torch.float64, requires_grad=True)
    reward = torch.tensor([1.0, 3.0, -2.0], dtype=torch.float64)
    (exact,) = torch.autograd.grad(-(torch.softmax(theta, 0) * reward).sum(), theta)
    probs = torch.softmax(theta, 0).detach()
    expected = torch.zeros(3, dtype=torch.float64)
    for a, b in itertools.product(range(3), repeat=2):  # all k = 2 sample pairs
        log_q = torch.log_softmax(theta, 0)
        loss = L.leave_one_out_pg_loss(log_q[[a, b]].reshape(1, 2), reward[[a, b]].reshape(1, 2))
        (g,) = torch.autograd.grad(loss, theta)
        expected += probs[a] * probs[b] * g
    assert torch.allclose(expected, exact, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------
# MM PbKD (white-box)
# ----------------------------------------------------------------------------------------


def q_case(seed, B=2, T=4, V=3):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    p = torch.softmax(torch.randn(B, T, V, generator=gen, dtype=torch.float64), -1)
    q = torch.softmax(torch.randn(B, T, V, generator=gen, dtype=torch.float64), -1)
    actions = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    actions[~mask] = -100
    return f, p, q, actions, mask


def test_q_moments_match_brute_force():
    f, p, q, actions, mask = q_case(16)
    F_, P_, Q_, A_, M_ = f.tolist(), p.tolist(), q.tolist(), actions.tolist(), mask.tolist()
    on = off = 0.0
    for b in range(2):
        for h in range(4):
            if M_[b][h]:
                ef_p = sum(P_[b][h][v] * F_[b][h][v] for v in range(3))
                ef_q = sum(Q_[b][h][v] * F_[b][h][v] for v in range(3))
                on += ef_p - F_[b][h][A_[b][h]]
                off += F_[b][h][A_[b][h]] - ef_q
    assert float(L.q_moment_on_policy(f, p, actions, mask)) == pytest.approx(on / 2, rel=1e-12)
    assert float(L.q_moment_off_policy(f, q, actions, mask)) == pytest.approx(off / 2, rel=1e-12)


def test_induced_sequence_reward_matches_brute_force():
    f, p, _, actions, mask = q_case(17)
    F_, P_, A_, M_ = f.tolist(), p.tolist(), actions.tolist(), mask.tolist()
    want = []
    for b in range(2):
        total = 0.0
        for h in range(4):
            if not M_[b][h]:
                continue
            nxt = 0.0
            if h + 1 < 4 and M_[b][h + 1]:
                nxt = sum(P_[b][h + 1][v] * F_[b][h + 1][v] for v in range(3))
            total += F_[b][h][A_[b][h]] - nxt
        want.append(total)
    assert L.induced_sequence_reward(f, p, actions, mask).tolist() == pytest.approx(want, rel=1e-12)
    holed = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match="contiguous"):
        L.induced_sequence_reward(f, p, actions.clamp(min=0), holed)


def test_induced_reward_telescoping_identity():
    """tabular.md s4: J(p, r_f) - J(q, r_f) = E_{tau~q} sum_h [<p(.|s_h), f(s_h,.)> - f(s_h, a_h)].

    Checked exactly on a token tree (V = 2, horizon 3) by enumerating every sequence.
    """
    V, H = 2, 3
    gen = torch.Generator().manual_seed(18)
    prefixes = [pre for h in range(H) for pre in itertools.product(range(V), repeat=h)]
    teacher = {pre: torch.softmax(torch.randn(V, generator=gen, dtype=torch.float64), 0) for pre in prefixes}
    student = {pre: torch.softmax(torch.randn(V, generator=gen, dtype=torch.float64), 0) for pre in prefixes}
    f_table = {pre: torch.randn(V, generator=gen, dtype=torch.float64) for pre in prefixes}
    sequences = list(itertools.product(range(V), repeat=H))
    f = torch.stack([torch.stack([f_table[seq[:h]] for h in range(H)]) for seq in sequences])
    p = torch.stack([torch.stack([teacher[seq[:h]] for h in range(H)]) for seq in sequences])
    actions = torch.tensor(sequences)
    mask = torch.ones(len(sequences), H, dtype=torch.bool)
    prob = lambda policy, seq: math.prod(float(policy[seq[:h]][seq[h]]) for h in range(H))  # noqa: E731
    w_p = torch.tensor([prob(teacher, s) for s in sequences], dtype=torch.float64)
    w_q = torch.tensor([prob(student, s) for s in sequences], dtype=torch.float64)
    reward = L.induced_sequence_reward(f, p, actions, mask)
    gap = float((w_p * reward).sum() - (w_q * reward).sum())
    moment = float(L.q_moment_on_policy(f, p, actions, mask, weights=w_q))
    assert moment == pytest.approx(gap, rel=1e-10, abs=1e-12)
    assert abs(gap) > 1e-3
    # and the teacher's own on-policy moment is zero
    assert float(L.q_moment_on_policy(f, p, actions, mask, weights=w_p)) == pytest.approx(0.0, abs=1e-12)


def test_mm_pbkd_student_loss_value_and_gradients():
    f_off, _, q_off, a_off, m_off = q_case(19)
    f_on, p_on, _, a_on, m_on = q_case(20)
    q_off.requires_grad_(True)
    logq_on = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(21), requires_grad=True)
    beta = 0.3
    f_off.requires_grad_(True)
    out = L.mm_pbkd_student_loss(
        off_f_values=f_off, off_student_probs=q_off, off_actions=a_off, off_mask=m_off,
        on_f_values=f_on, on_teacher_probs=p_on, on_actions=a_on, on_mask=m_on,
        on_student_token_logp=logq_on, beta=beta,
    )
    off = L.q_moment_off_policy(f_off, q_off, a_off, m_off).detach()
    on = L.q_moment_on_policy(f_on, p_on, a_on, m_on)
    assert float(out.off_moment) == pytest.approx(float(off), rel=1e-12)
    assert float(out.on_moment) == pytest.approx(float(on), rel=1e-12)
    assert float(out.gap) == pytest.approx(beta * float(off) + (1 - beta) * float(on), rel=1e-12)
    grad_q, grad_logq, grad_f = torch.autograd.grad(out.loss, (q_off, logq_on, f_off), allow_unused=True)
    assert grad_f is None  # f is held fixed during the student step
    # off-policy: d/dq(s_h, v) of -beta/B <q, f> is -beta f(s_h, v)/B on masked steps
    want_q = -beta * f_off.detach() * m_off.unsqueeze(-1) / 2
    assert torch.allclose(grad_q, want_q, rtol=1e-12, atol=0)
    # on-policy: d/dlogq_h of -(1-beta)/B sum_h A_h log q_h with A_h = f(s_h, y_h) - <p, f>
    F_, P_, A_ = f_on.tolist(), p_on.tolist(), a_on.tolist()
    for b, h in itertools.product(range(2), range(4)):
        if m_on[b, h]:
            advantage = F_[b][h][A_[b][h]] - sum(P_[b][h][v] * F_[b][h][v] for v in range(3))
            assert float(grad_logq[b, h]) == pytest.approx(-(1 - beta) * advantage / 2, rel=1e-12)
        else:
            assert float(grad_logq[b, h]) == 0.0


def test_mm_pbkd_adversary_loss():
    off, on, nll = torch.tensor(0.4), torch.tensor(-0.2), torch.tensor(0.75)
    got = L.mm_pbkd_adversary_loss(off, on, nll, nll_ref=0.5, zeta_over_n=0.05, lam=3.0, beta=0.25)
    assert float(got) == pytest.approx(-(0.25 * 0.4 + 0.75 * -0.2) + 3.0 * (0.75 - 0.5 - 0.05), rel=1e-6)


# --------------------------------------------------------------------------------------
# TopKProbs: the teacher's sparse distribution where the Q-head's expectation needs it
# --------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 7))
def test_topk_expectation_is_within_tail_mass_times_the_tails_range_and_exact_for_a_flat_tail(seed, k):
    """<p, f> from the top k: |error| <= tail mass * (max - min of f off the top k), computed by a
    loop; exact when f is constant off the top k, and equal to the dense value at k = V."""
    g = torch.Generator().manual_seed(seed)
    V = 8
    logits = 2 * torch.randn(2, 3, V, generator=g, dtype=torch.float64)
    f = torch.randn(2, 3, V, generator=g, dtype=torch.float64)
    p = torch.softmax(logits, -1)
    dense = (p * f).sum(-1)
    sparse = L.TopKProbs(*L.teacher_topk(logits, k))
    got = sparse.expected(f)
    for b in range(2):
        for t in range(3):
            top = set(sparse.ids[b, t].tolist())
            tail = [f[b, t, v].item() for v in range(V) if v not in top]
            mass = sum(p[b, t, v].item() for v in range(V) if v not in top)
            spread = (max(tail) - min(tail)) if tail else 0.0
            assert abs(got[b, t].item() - dense[b, t].item()) <= mass * spread + 1e-12
    flat = f.clone()
    for b in range(2):
        for t in range(3):
            keep = sparse.ids[b, t]
            values = flat[b, t, keep].clone()
            flat[b, t] = 0.5
            flat[b, t, keep] = values
    assert torch.allclose(sparse.expected(flat), (p * flat).sum(-1), atol=1e-12)
    assert torch.allclose(L.TopKProbs(*L.teacher_topk(logits, V)).expected(f), dense, atol=1e-12)


def test_induced_reward_takes_the_teacher_as_topk_and_equals_the_dense_one_at_k_equal_V():
    torch.manual_seed(4)
    logits, f = torch.randn(2, 4, 5, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    actions, mask = torch.randint(0, 5, (2, 4)), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    dense = L.induced_sequence_reward(f, torch.softmax(logits, -1), actions, mask)
    sparse = L.induced_sequence_reward(f, L.TopKProbs(*L.teacher_topk(logits, 5)), actions, mask)
    assert torch.allclose(dense, sparse, atol=1e-12)
    with pytest.raises(ValueError, match="top-k"):
        L.induced_sequence_reward(f, L.TopKProbs(*L.teacher_topk(logits[:1], 5)), actions, mask)

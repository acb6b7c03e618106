"""Lemma tests for pbkd_ref.bracketing (spec tabular.md sections 2 and 6, property 11)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import expit

from pbkd_ref.bracketing import brackets, epsilon_net, log_bracketing_number_bound, net_size_bound
from pbkd_ref.confidence import radius

net_args = dict(
    B=st.sampled_from([0.5, 1.0, 2.0]),
    d=st.integers(1, 3),
    ratio=st.sampled_from([0.2, 0.35, 0.6, 1.5]),  # eps' / B
    shuffle_seed=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
)


def uniform_ball(rng, n, d, B):
    points = rng.normal(size=(n, d))
    return points * (B * rng.random((n, 1)) ** (1 / d) / np.linalg.norm(points, axis=1, keepdims=True))


@settings(max_examples=15)
@given(**net_args)
def test_bracketing_net_size_and_covering(B, d, ratio, shuffle_seed):
    """Property 11: the greedy net has at most (1 + 2B/eps')^d points and covers the B-ball within eps'."""
    eps_prime = ratio * B
    rng = None if shuffle_seed is None else np.random.default_rng(shuffle_seed)
    net = epsilon_net(B, d, eps_prime, rng=rng)
    assert net.shape[1] == d
    assert len(net) <= (1 + 2 * B / eps_prime) ** d
    assert np.all(np.linalg.norm(net, axis=1) <= B * (1 + 1e-12))
    probe_rng = np.random.default_rng(0)
    probes = np.vstack([uniform_ball(probe_rng, 3000, d, B), B * np.eye(d), -B * np.eye(d)])
    nearest = np.min(np.linalg.norm(probes[:, None, :] - net[None, :, :], axis=2), axis=1)
    assert nearest.max() <= eps_prime * (1 + 1e-12)
    if len(net) > 1:  # greedy points are separated by more than eps' - eps'/8
        pairwise = np.linalg.norm(net[:, None] - net[None], axis=2) + np.diag(np.full(len(net), np.inf))
        assert pairwise.min() > eps_prime * 7 / 8 * (1 - 1e-12)


@settings(max_examples=25)
@given(
    seed=st.integers(0, 2**32 - 1),
    d=st.integers(1, 4),
    B=st.sampled_from([0.5, 1.0, 3.0]),
    eps_prime=st.sampled_from([0.01, 0.1, 0.5]),
    L_x=st.sampled_from([0.5, 2.0]),
)
def test_bracketing_containment_and_width(seed, d, B, eps_prime, L_x):
    """Property 11: every P_theta with ||theta - theta_j|| <= eps' lies in bracket j; L1 width <= eps = eps' L_x."""
    rng = np.random.default_rng(seed)
    centers = uniform_ball(rng, 5, d, B)
    x = rng.normal(size=d)
    x *= L_x * rng.random() / np.linalg.norm(x)
    lower, upper = brackets(centers, x, eps_prime, L_x)
    eps = eps_prime * L_x
    width = (upper - lower).sum(axis=1)
    assert np.all(width <= eps * (1 + 1e-12))
    assert np.all(upper.sum(axis=1) <= 1 + eps * (1 + 1e-12))
    np.testing.assert_allclose(lower[:, 0], 1 - upper[:, 1], atol=1e-15)
    np.testing.assert_allclose(upper[:, 0], 1 - lower[:, 1], atol=1e-15)
    for j, center in enumerate(centers):
        offsets = rng.normal(size=(50, d))
        offsets *= eps_prime * rng.random((50, 1)) / np.linalg.norm(offsets, axis=1, keepdims=True)
        p1 = expit((center + offsets) @ x)
        law = np.column_stack([1 - p1, p1])
        assert np.all(law >= lower[j] - 1e-15) and np.all(law <= upper[j] + 1e-15)


def test_bracketing_number_bound_and_radius():
    """log(net size) <= d log(1 + 2 B L_x / eps), and the bracketing radius is 1 + that bound at eps = 1/N + log(1/delta)."""
    for B, d, eps_prime, L_x in ((1.0, 2, 0.25, 2.0), (2.0, 1, 0.1, 1.0), (1.0, 3, 0.5, 0.5)):
        net = epsilon_net(B, d, eps_prime)
        assert np.log(len(net)) <= log_bracketing_number_bound(eps_prime * L_x, d=d, B=B, L_x=L_x) + 1e-12
        assert log_bracketing_number_bound(eps_prime * L_x, d=d, B=B, L_x=L_x) == pytest.approx(np.log(net_size_bound(B, d, eps_prime)))
    N, d, B, L_x, delta = 500, 4, 2.0, 1.5, 0.05
    assert radius("bracketing", N=N, d=d, B=B, L_x=L_x, delta=delta) == pytest.approx(
        1 + log_bracketing_number_bound(1 / N, d=d, B=B, L_x=L_x) + np.log(1 / delta)
    )


def test_bracketing_validation_messages():
    with pytest.raises(ValueError, match="eps_prime must be a finite number > 0"):
        epsilon_net(1.0, 2, 0.0)
    with pytest.raises(ValueError, match="increase eps_prime or decrease d"):
        epsilon_net(1.0, 8, 0.01)
    with pytest.raises(ValueError, match="rng must be None or a numpy.random.Generator"):
        epsilon_net(1.0, 2, 0.5, rng=3)
    with pytest.raises(ValueError, match="x has norm"):
        brackets(np.zeros((1, 2)), np.array([3.0, 4.0]), 0.1, 1.0)
    with pytest.raises(ValueError, match="net has dimension 2 but x has 3"):
        brackets(np.zeros((1, 2)), np.zeros(3), 0.1, 1.0)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        log_bracketing_number_bound(0.0, d=1, B=1.0, L_x=1.0)
    assert epsilon_net(1.0, 3, 1.5).shape == (1, 3)  # eps' >= B: the origin covers the ball

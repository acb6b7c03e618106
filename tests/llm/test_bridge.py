"""The exactness bridge (spec llm.md section 2, last item; issue 5 item 4).

The LLM-layer losses of ``llm.losses``, applied to a tabular softmax student and a linear
reward model / Q-function on a ``pbkd_ref`` token tree, (1) compute exactly the ``pbkd_ref``
quantities (BT likelihood, reward gap, Q-moments, induced reward) and (2) train to the exact
min-max solution of ``pbkd_ref.solvers.solve`` within the stated tolerances (quick mode).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llm import bridge
from llm.losses import (
    induced_sequence_reward,
    pbkd_adversary_loss,
    q_moment_off_policy,
    q_moment_on_policy,
    sequence_log_prob,
)
from pbkd_ref.mdp import evaluate, feature_expectation, occupancy, random_mdp, trajectory_features
from pbkd_ref.mm_pbkd import off_policy_moment, on_policy_moment
from pbkd_ref.preferences import aggregate, nll

DTYPE = torch.float64


@pytest.fixture(scope="module")
def quick():
    cfg = bridge.quick_config()
    return cfg, bridge.run_bridge(cfg, counterexamples=False)


@pytest.fixture(scope="module")
def instance():
    """A fresh instance for the loss identities (the tests move its adversary around)."""
    return bridge.build_instance(bridge.quick_config())


def _random_student(game, seed: int) -> tuple[bridge.TabularSoftmaxPolicy, np.ndarray, torch.Tensor]:
    student = bridge.TabularSoftmaxPolicy(game.mdp.H, game.mdp.S, game.mdp.A)
    with torch.no_grad():
        student.logits.copy_(torch.as_tensor(np.random.default_rng(seed).normal(scale=2.0, size=student.logits.shape)))
    pi = student.policy()
    return student, pi, torch.as_tensor(game.table.probabilities(pi), dtype=DTYPE)


def _random_ball_point(rng: np.random.Generator, dim: int, B: float) -> np.ndarray:
    x = rng.normal(size=dim)
    return x / np.linalg.norm(x) * B * rng.uniform(0.0, 1.0)


# ----------------------------------------------------------------------------------------
# The losses compute the pbkd_ref quantities (float64, 1e-10)
# ----------------------------------------------------------------------------------------


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31 - 1))
def test_bt_nll_times_N_equals_pbkd_ref_nll(instance, seed):
    """``bt_nll`` on the reward model's sequence rewards, times ``N``, is ``preferences.nll`` (both games)."""
    rng = np.random.default_rng(seed)
    for game in (instance.pbkd, instance.mm):
        param = _random_ball_point(rng, game.Phi_seq.shape[1], game.cset.B)
        game.adversary.param.data = torch.as_tensor(param, dtype=DTYPE)
        value = float(game.bt_value(game.sequence_rewards()).detach()) * game.N
        prefs = aggregate(game.Phi_seq[game.rows1.numpy()] - game.Phi_seq[game.rows0.numpy()], game.y.numpy())
        assert prefs.N == game.N
        assert value == pytest.approx(nll(prefs, param), rel=1e-10, abs=1e-10)
        assert value == pytest.approx(nll(game.cset.prefs, param), rel=1e-10, abs=1e-10)


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31 - 1))
def test_reward_gap_equals_theta_v_E_minus_v_pi(instance, seed):
    """``pbkd_adversary_loss`` at ``lam = 0`` with exact weights is ``-theta^T (v_E - v_pi)``."""
    game = instance.pbkd
    rng = np.random.default_rng(seed)
    theta = _random_ball_point(rng, game.mdp.d, game.cset.B)
    game.adversary.param.data = torch.as_tensor(theta, dtype=DTYPE)
    _, pi, q_seq = _random_student(game, seed)
    reward = game.sequence_rewards()
    loss = pbkd_adversary_loss(reward, reward, game.bt_value(reward), game.nll_ref, game.zeta_over_n, 0.0,
                               teacher_weights=game.p_seq, student_weights=q_seq)
    gap = theta @ (feature_expectation(game.mdp, game.pi_E) - feature_expectation(game.mdp, pi))
    assert -loss.item() == pytest.approx(gap, abs=1e-10)
    # the Lagrangian term: lam * (bt_nll - NLL_ref - zeta/N), with NLL from pbkd_ref
    lam = float(rng.uniform(0.1, 10.0))
    loss_lam = pbkd_adversary_loss(reward, reward, game.bt_value(reward), game.nll_ref, game.zeta_over_n, lam,
                                   teacher_weights=game.p_seq, student_weights=q_seq)
    violation = (nll(game.cset.prefs, theta) - game.cset.nll_hat - game.cset.zeta) / game.N
    assert loss_lam.item() == pytest.approx(-gap + lam * violation, abs=1e-10)


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31 - 1))
def test_q_moments_equal_pbkd_ref_mm_pbkd(instance, seed):
    """On- and off-policy Q-moments and the induced reward equal their ``pbkd_ref.mm_pbkd`` versions."""
    game = instance.mm
    rng = np.random.default_rng(seed)
    w = _random_ball_point(rng, game.Phi_seq.shape[1], game.cset.B)
    game.adversary.param.data = torch.as_tensor(w, dtype=DTYPE)
    _, pi, q_seq = _random_student(game, seed)
    f = game.f_values()
    student_probs = torch.as_tensor(game.table.per_step(pi), dtype=DTYPE)
    on = q_moment_on_policy(f, game.teacher_probs, game.actions, game.mask, weights=q_seq)
    off = q_moment_off_policy(f, student_probs, game.actions, game.mask, weights=game.p_seq)
    assert on.item() == pytest.approx(on_policy_moment(game.mdp, pi, game.pi_E, instance.psi, w), abs=1e-10)
    assert off.item() == pytest.approx(off_policy_moment(game.mdp, pi, game.pi_E, instance.psi, w), abs=1e-10)
    # telescoping (tabular.md section 4): the on-policy moment is w^T (v_E^Q - v_pi^Q)
    v_pi_Q = feature_expectation(game.features_mdp, pi)
    assert on.item() == pytest.approx(w @ (game.v_E - v_pi_Q), abs=1e-10)
    reward = induced_sequence_reward(f, game.teacher_probs, game.actions, game.mask)
    phi_Q = trajectory_features(game.features_mdp, game.table.states, game.table.actions)
    np.testing.assert_allclose(reward.detach().numpy(), phi_Q @ w, rtol=0, atol=1e-12)


def test_sequence_log_prob_is_the_tabular_sequence_probability(instance):
    game = instance.pbkd
    student, pi, q_seq = _random_student(game, 7)
    logq = sequence_log_prob(student.sequence_logits(game.table), game.actions, game.mask)
    np.testing.assert_allclose(logq.exp().detach().numpy(), q_seq.numpy(), rtol=1e-12)
    assert float(q_seq.sum()) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(bridge.sequence_occupancy(game.mdp, game.table, q_seq.numpy()),
                               occupancy(game.mdp, pi), atol=1e-14)


def test_expected_leave_one_out_gradient_is_minus_advantage_times_occupancy(instance):
    """Enumerated RLOO gradient = ``-d_q(h,s,a) A_q(h,s,a)``, ``A`` from ``pbkd_ref.mdp.evaluate``.

    Two independent routes: autograd through the leave-one-out loss over all sample pairs, and
    backward induction on the per-step reward ``r = phi theta``; this identity is what makes the
    student's natural-gradient step a policy-mirror-descent step.
    """
    game = instance.pbkd
    rng = np.random.default_rng(3)
    theta = _random_ball_point(rng, game.mdp.d, game.cset.B)
    game.adversary.param.data = torch.as_tensor(theta, dtype=DTYPE)
    student, pi, q_seq = _random_student(game, 11)
    loss = bridge.expected_leave_one_out_loss(
        sequence_log_prob(student.sequence_logits(game.table), game.actions, game.mask),
        game.sequence_rewards().detach(), q_seq)
    (grad,) = torch.autograd.grad(loss, student.logits)
    Q, V = evaluate(game.mdp, pi, game.mdp.phi @ theta)
    advantage = Q - V[..., None]
    np.testing.assert_allclose(grad.numpy(), -occupancy(game.mdp, pi) * advantage, atol=1e-12)
    # and the same for the sum over sequences: grad of -E_q r
    exact = -(torch.exp(sequence_log_prob(student.sequence_logits(game.table), game.actions, game.mask))
              * game.sequence_rewards().detach()).sum()
    (direct,) = torch.autograd.grad(exact, student.logits)
    np.testing.assert_allclose(grad.numpy(), direct.numpy(), atol=1e-12)


# ----------------------------------------------------------------------------------------
# The instance has one certified optimum; training reaches it
# ----------------------------------------------------------------------------------------


def test_reference_optimum_is_certified_and_unique(instance):
    for name, record in instance.uniqueness.items():
        game = instance.pbkd if name == "pbkd" else instance.mm
        assert record["unique"] and record["polished"], (name, record)
        assert record["polished_certificate_gap"] <= 1e-11
        assert record["kkt_residual"] <= 1e-10
        assert record["tie_margin"] > 1e-3
        assert record["support_size"] >= 2  # a mixed optimum: the hard case for gradient play
        # the solver's own policy agrees with the polished one to its accuracy, sqrt(certificate tol)
        assert record["tv_solver_vs_polished"] <= 1e-3
        assert game.reference_lower <= game.exact.upper + 1e-12
        assert abs(game.q_star.sum() - 1.0) <= 1e-12 and game.q_star.min() >= 0.0


def test_bridge_converges_to_exact_minmax_within_stated_tolerance(quick):
    """Quick mode: pbkd and mm_pbkd, exact and sampled, final value gap and TV within tolerance."""
    cfg, result = quick
    seen = set()
    for trace in result.runs:
        tol = bridge.tolerances(cfg, trace.mode)
        seen.add((trace.method, trace.mode))
        assert trace.value_gap[-1] <= tol["value_gap"], (trace.method, trace.mode, trace.value_gap[-1])
        assert trace.tv[-1] <= tol["tv"], (trace.method, trace.mode, trace.tv[-1])
        assert min(trace.value_gap) >= -1e-9  # an upper bound on a nonnegative gap
        assert trace.value_gap[-1] < 1e-2 * trace.value_gap[0]  # it moved from the uniform start
    assert seen == {(m, mode) for m in bridge.METHODS for mode in bridge.MODES}
    checks = bridge.convergence_checks(result, cfg)
    assert all(c["passed"] for c in checks.values()), {k: c for k, c in checks.items() if not c["passed"]}


def test_an_adversary_refit_per_round_then_frozen_does_not_reach_the_minmax(quick):
    """The LLM game's pbkd.timescale=refit on the bridge: every `refit_every` student steps the
    adversary is refit (`refit_steps` Lagrangian steps) and then frozen. Where the two-timescale
    scheme meets the exact tolerance, this one stays far from the min-max (value gap above 1e-2):
    against a frozen linear reward the natural-gradient student jumps towards its best response."""
    cfg, result = quick
    two = next(t for t in result.runs if t.method == "pbkd" and t.mode == "exact")
    refit = bridge.train(result.instance.pbkd, cfg, mode="exact", scheme="round_refit_npg")
    assert two.value_gap[-1] <= cfg.tol_value_exact
    assert refit.value_gap[-1] > 1e-2 and refit.tv[-1] > 0.1


def test_trained_dual_variable_is_the_kkt_multiplier(quick):
    cfg, result = quick
    for trace in result.runs:
        if trace.mode == "exact":
            target = result.instance.uniqueness[trace.method]["polished_lam_mean_nll"]
            assert trace.lam[-1] == pytest.approx(target, rel=1e-4)
            assert trace.adversary_error[-1] <= 1e-5


def test_experiment_record_and_figure(quick, tmp_path):
    from theory.common import REQUIRED_KEYS, write_json

    cfg, result = quick
    record = bridge.experiment_record(result, cfg, mode="quick", command="python -m llm.bridge --quick",
                                      runtime_s=0.0)
    path = write_json(tmp_path / "bridge.json", record)
    loaded = json.loads(path.read_text())
    assert set(REQUIRED_KEYS) <= set(loaded)
    assert loaded["all_checks_passed"] is True
    exact_pbkd = next(r for r in loaded["results"]["runs"] if r["method"] == "pbkd" and r["mode"] == "exact")
    assert exact_pbkd["final"]["value_gap"] <= exact_pbkd["tolerances"]["value_gap"]
    assert len(exact_pbkd["steps"]) == len(exact_pbkd["value_gap"]) == len(exact_pbkd["tv"])
    png = bridge.plot_bridge(result, cfg, tmp_path / "bridge.png")
    assert png.stat().st_size > 10_000


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------


def test_bad_input_is_refused(instance):
    with pytest.raises(ValueError, match="deterministic|start state"):
        bridge.enumerate_sequences(random_mdp(3, 2, 3, 2, np.random.default_rng(0)))
    with pytest.raises(ValueError, match="steps"):
        bridge.BridgeConfig(steps=0).validate()
    with pytest.raises(ValueError, match="k must be >= 2"):
        bridge.BridgeConfig(k=1).validate()
    with pytest.raises(ValueError, match="mode must be one of"):
        bridge.train(instance.pbkd, bridge.quick_config(), mode="approximate")
    with pytest.raises(ValueError, match="needs a seed"):
        bridge.train(instance.pbkd, bridge.quick_config(), mode="sampled")

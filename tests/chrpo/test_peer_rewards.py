"""Peer rewards: L1's LCPO-Exact / LCPO-Max and Kimi k1.5's length penalty."""
import jax.numpy as jnp
import numpy as np
import pytest

import chrpo


def l1_exact(correct, n_gold, n_y, alpha):
    """L1's LCPO-Exact as written in its paper (section 3), in plain Python."""
    return float(correct) - alpha * abs(n_gold - n_y)


def l1_max(correct, n_gold, n_y, alpha, delta):
    return float(correct) * min(max(alpha * (n_gold - n_y) + delta, 0.0), 1.0)


def test_lcpo_matches_l1_in_ratio_units(maybe_jit):
    """With lengths as ratios of one reference, LCPO here is L1's formula on tokens with
    alpha_tokens = alpha / ref_len."""
    ref, alpha, delta = 400.0, 1.0, 0.5
    correct = [True, False, True, True, False]
    think = [120.0, 120.0, 40.0, 300.0, 0.0]
    target = 0.3
    ratio = jnp.asarray(think) / ref
    for exact in (True, False):
        fn = maybe_jit(chrpo.lcpo_reward, exact=exact, alpha=alpha, delta=delta)
        got = fn(jnp.asarray(correct), ratio, jnp.full(5, target), jnp.ones(5, bool))
        want = [l1_exact(c, target * ref, n, alpha / ref) if exact else
                l1_max(c, target * ref, n, alpha / ref, delta) for c, n in zip(correct, think)]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_lcpo_hand_and_untargeted_rows():
    got = chrpo.lcpo_reward(jnp.array([True, True, False]), jnp.array([0.5, 0.2, 0.9]),
                            jnp.full(3, 0.3), jnp.array([True, True, False]), exact=False)
    # max: clip(1 * (0.3 - 0.5) + 0.5) = 0.3; clip(0.1 + 0.5) = 0.6; no reference: 1[correct]
    np.testing.assert_allclose(got, [0.3, 0.6, 0.0], atol=1e-6)
    got = chrpo.lcpo_reward(jnp.array([True, False]), jnp.array([0.5, 0.2]), jnp.full(2, 0.3),
                            jnp.ones(2, bool), exact=True, alpha=2.0)
    np.testing.assert_allclose(got, [1 - 0.4, -0.2], atol=1e-6)


def test_length_penalty_hand(maybe_jit):
    fn = maybe_jit(chrpo.length_penalty_reward, num_groups=3)
    got = fn(jnp.array([True, True, False, True, False, True]),
             jnp.array([10.0, 20.0, 30.0, 5.0, 7.0, 9.0]), jnp.array([0, 0, 0, 1, 2, 2]))
    # group 0: lam = 0.5, 0, -0.5 (the wrong one keeps min(0, -0.5)); group 1: one row, lam 0;
    # group 2: lam = 0.5, -0.5 (wrong: min(0, 0.5) = 0; right: -0.5)
    np.testing.assert_allclose(got, [1.5, 1.0, -0.5, 1.0, 0.0, 0.5], atol=1e-6)


def test_length_penalty_ignores_masked_rows():
    got = chrpo.length_penalty_reward(jnp.array([True, True, True]), jnp.array([10.0, 20.0, 99.0]),
                                      jnp.zeros(3, jnp.int32), num_groups=1,
                                      sample_mask=jnp.array([True, True, False]), coef=0.5)
    np.testing.assert_allclose(got, [1.25, 0.75, 0.0], atol=1e-6)   # 99 sets no maximum


@pytest.mark.parametrize("kind", ["lcpo-exact", "lcpo-max", "length-penalty"])
def test_presets_use_their_reward_in_compute_advantages(kind):
    inputs = chrpo.RewardInputs(valid=jnp.ones(4, bool),
                                correct=jnp.array([True, True, False, True]),
                                level=jnp.full(4, 0.2), ratio=jnp.array([0.2, 0.6, 0.3, 0.3]),
                                target=jnp.full(4, 0.3), has_target=jnp.ones(4, bool))
    groups = jnp.array([0, 0, 1, 1])
    cfg = chrpo.get_preset(kind)
    assert cfg.reward.kind == kind and cfg.advantage.estimator == "grpo"
    _, metrics = chrpo.compute_advantages(inputs, groups, num_groups=2, config=cfg)
    want = chrpo.reward_of_kind(chrpo.reward_tiers(inputs.valid, inputs.correct, inputs.level,
                                                   inputs.ratio, inputs.has_target),
                                inputs, groups, num_groups=2, config=cfg.reward)
    assert float(metrics["reward_mean"]) == pytest.approx(float(jnp.mean(want)))
    hier = chrpo.hierarchical_reward(inputs.valid, inputs.correct, inputs.level, inputs.ratio,
                                     inputs.target, inputs.has_target)
    assert not np.allclose(want, hier)       # a different reward from CHRPO's

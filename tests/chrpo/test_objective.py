"""The composed objective: hand values, metrics, masking, jit with a static config."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chrpo

EPS = 1e-6


def hand_inputs():
    # Default coefficients (tol 0.1): row 0 within budget at its target
    # (1 + 0.2 + 0.3), row 1 wrong, row 2 over budget by 0.15 (1 - 0.15),
    # row 3 invalid.
    return chrpo.RewardInputs(
        valid=jnp.array([True, True, True, False]),
        correct=jnp.array([True, False, True, False]),
        level=jnp.full(4, 0.5), ratio=jnp.array([0.5, 0.5, 0.75, 0.5]),
        target=jnp.full(4, 0.5), has_target=jnp.ones(4, bool))


@pytest.mark.parametrize("lam, r0, r2", [(0.0, 1.5, 0.85), (1.0, 1.4, 0.75)])
def test_compute_advantages_hand(maybe_jit, lam, r0, r2):
    f = maybe_jit(chrpo.compute_advantages, num_groups=2,
                  config=chrpo.ChrpoConfig())
    adv, m = f(hand_inputs(), jnp.array([0, 0, 1, 1]),
               lagrange_multiplier=jnp.float32(lam))
    rewards = np.array([r0, 0.0, r2, -1.0])
    d0, d1 = (r0 - 0.0) / 2, (r2 + 1.0) / 2   # |R - mean| = std for groups of two
    expected = [d0 / (d0 + EPS), -d0 / (d0 + EPS), d1 / (d1 + EPS), -d1 / (d1 + EPS)]
    np.testing.assert_allclose(adv, expected, rtol=1e-6)
    np.testing.assert_allclose(m["reward_mean"], rewards.mean(), rtol=1e-6)
    np.testing.assert_allclose(m["ratio_mean"], (0.5 + 0.5 + 0.75) / 3, rtol=1e-6)
    counts = {name: int(m[f"tier/{name}"]) for name in chrpo.TIER_NAMES}
    assert counts == {"invalid": 1, "wrong": 1, "over_budget": 1, "correct": 0,
                      "within_budget": 1}
    assert float(m["zero_variance_fraction"]) == 0.0
    np.testing.assert_allclose(m["advantage_mean"], 0.0, atol=1e-6)


def test_chrpo_objective_hand(maybe_jit):
    # rho = 1 and no KL (DAPO preset): the token-mean loss is
    # -sum_i A_i n_i / sum_i n_i with n = [3, 2, 1, 3] tokens and the
    # advantages of test_compute_advantages_hand (+-a0 in group 0, +-a1 in 1).
    mask = jnp.arange(3)[None, :] < jnp.array([3, 2, 1, 3])[:, None]
    logp = jnp.full((4, 3), -1.0)
    f = maybe_jit(chrpo.chrpo_objective, num_groups=2, config=chrpo.get_preset("dapo"))
    loss, m = f(logp, logp, mask, hand_inputs(), jnp.array([0, 0, 1, 1]))
    a0, a1 = 0.75 / (0.75 + EPS), 0.925 / (0.925 + EPS)
    expected = -(3 * a0 - 2 * a0 + 1 * a1 - 3 * a1) / 9
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose([m["loss_sum"], m["loss_denominator"]],
                               [9 * expected, 9.0], rtol=1e-6)


def test_objective_equals_its_two_halves_and_reports_metrics():
    config = chrpo.get_preset("grpo")
    key = jax.random.key(0)
    logp = -jax.random.uniform(key, (4, 3), minval=0.2, maxval=2.0)
    old = logp + 0.3 * jax.random.normal(jax.random.key(1), (4, 3))
    mask = jnp.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], bool)
    groups = jnp.array([0, 0, 1, 1])
    loss, m = jax.jit(functools.partial(chrpo.chrpo_objective, num_groups=2,
                                        config=config))(
        logp, old, mask, hand_inputs(), groups, ref_logp=old)

    @jax.jit
    def two_halves(inputs):
        adv, _ = chrpo.compute_advantages(inputs, groups, num_groups=2, config=config)
        return chrpo.policy_loss(logp, old, adv, mask, ref_logp=old, eps_low=0.2,
                                 eps_high=0.2, aggregation="seq-mean-token-mean",
                                 kl_coef=0.04, kl_estimator="k3")

    out = two_halves(hand_inputs())
    np.testing.assert_allclose(loss, out.loss_sum / out.denominator, rtol=1e-5, atol=1e-7)
    assert abs(float(loss)) > 1e-3
    np.testing.assert_allclose(m["loss_denominator"], 4.0)
    expected_keys = {"reward_mean", "advantage_mean", "advantage_abs_mean", "ratio_mean",
                     "zero_variance_fraction", "zero_variance_groups",
                     "clip_low_fraction", "clip_high_fraction", "approx_kl", "kl",
                     "loss_sum", "loss_denominator"} | {
                         f"tier/{n}" for n in chrpo.TIER_NAMES}
    assert set(m) == expected_keys


def test_sample_mask_drops_rollouts_from_advantages_and_loss():
    logp = -jnp.linspace(0.1, 2.0, 15).reshape(5, 3)
    old = logp + 0.3 * jnp.sin(jnp.arange(15.0)).reshape(5, 3)
    mask = jnp.ones((5, 3), bool)
    inputs = hand_inputs()
    padded = chrpo.RewardInputs(*(jnp.concatenate([x, x[:1]]) for x in inputs))
    groups = jnp.array([0, 0, 1, 1, 1])
    keep = jnp.array([True, True, True, True, False])
    f = jax.jit(functools.partial(chrpo.chrpo_objective, num_groups=2))
    loss_masked, m = f(logp, old, mask, padded, groups, sample_mask=keep)
    loss_subset, _ = f(logp[:4], old[:4], mask[:4], inputs, groups[:4])
    np.testing.assert_allclose(loss_masked, loss_subset, rtol=1e-6)
    assert abs(float(loss_subset)) > 1e-3
    assert float(m["loss_denominator"]) == 12.0
    assert int(m["tier/within_budget"]) == 1   # the padded copy of row 0 is not counted


def test_hierarchical_preset_end_to_end_has_finite_gradients():
    config = chrpo.get_preset("chrpo")
    n, t = 8, 5
    k1, k2 = jax.random.split(jax.random.key(2))
    logp = -jax.random.uniform(k1, (n, t), minval=0.1, maxval=3.0)
    old = logp + 0.3 * jax.random.normal(k2, (n, t))
    mask = jnp.arange(t)[None, :] < jnp.array([5, 4, 3, 2, 1, 5, 0, 3])[:, None]
    levels = jnp.array([0.2, 0.2, 0.6, 0.6, 1.0, 0.2, 0.2, 0.6])
    inputs = chrpo.RewardInputs(
        valid=jnp.array([1, 1, 1, 1, 1, 1, 0, 1], bool),
        correct=jnp.array([0, 1, 1, 1, 1, 0, 0, 1], bool), level=levels,
        ratio=jnp.array([0.2, 0.3, 0.5, 0.9, 0.8, 0.1, 0.0, 0.6]),
        target=jnp.full(n, 0.6), has_target=jnp.ones(n, bool))
    groups = jnp.array([0, 0, 0, 0, 0, 1, 1, 1])
    local = jnp.array([0, 0, 1, 1, 2, 0, 0, 1])
    sub = chrpo.nested_ids(groups, local, num_local=3)

    @jax.jit
    def step(lp):
        return chrpo.chrpo_objective(lp, old, mask, inputs, groups, num_groups=2,
                                     subgroup_ids=sub, num_subgroups=6, ref_logp=old,
                                     config=config, lagrange_multiplier=0.5)

    (loss, m), grad = jax.value_and_grad(step, has_aux=True)(logp)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    assert float(jnp.abs(grad).sum()) > 0.0
    np.testing.assert_array_equal(grad[6], 0.0)   # the empty row gets no gradient
    assert 0.0 < float(m["clip_high_fraction"]) + float(m["clip_low_fraction"]) < 1.0


def test_objective_rejects_mismatched_batch():
    with pytest.raises(ValueError, match="`advantages` must have shape"):
        chrpo.chrpo_objective(jnp.zeros((3, 2)), jnp.zeros((3, 2)), jnp.ones((3, 2)),
                              hand_inputs(), jnp.array([0, 0, 1, 1]), num_groups=2)

"""Group-relative advantages: hand values, zero variance, masking, invariances."""
import functools
import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chrpo

EPS = 1e-6
ESTIMATORS = ("grpo", "drgrpo", "rloo", "hierarchical")


def test_grpo_hand_with_interleaved_groups(maybe_jit):
    # Groups are ids, not blocks: group 0 = rows 0, 2; group 1 = rows 1, 3
    # (constant); group 2 = row 4 (single); group 3 is empty.
    f = maybe_jit(chrpo.grpo_advantages, num_groups=4, eps=EPS)
    out = f(jnp.array([1.0, 5.0, 3.0, 5.0, 2.0]), jnp.array([0, 1, 0, 1, 2]))
    a = 1.0 / (1.0 + EPS)  # (R - mean 2) / (population std 1 + eps)
    np.testing.assert_allclose(out.advantages, [-a, 0.0, a, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(out.zero_variance, [False, True, True, False])
    np.testing.assert_array_equal(out.nonempty, [True, True, True, False])
    assert int(out.zero_variance_count) == 2
    np.testing.assert_allclose(out.zero_variance_fraction, 2 / 3, rtol=1e-6)


def test_grpo_sample_std(maybe_jit):
    f = maybe_jit(chrpo.grpo_advantages, num_groups=1, eps=EPS, ddof=1)
    out = f(jnp.array([1.0, 2.0, 3.0]), jnp.zeros(3, jnp.int32))
    np.testing.assert_allclose(out.advantages, np.array([-1.0, 0.0, 1.0]) / (1 + EPS),
                               rtol=1e-6)


def test_drgrpo_hand(maybe_jit):
    out = maybe_jit(chrpo.drgrpo_advantages, num_groups=1)(
        jnp.array([1.0, 2.0, 6.0]), jnp.zeros(3, jnp.int32))
    np.testing.assert_allclose(out.advantages, [-2.0, -1.0, 3.0], rtol=1e-6)


def test_rloo_hand(maybe_jit):
    out = maybe_jit(chrpo.rloo_advantages, num_groups=2)(
        jnp.array([1.0, 2.0, 6.0, 4.0]), jnp.array([0, 0, 0, 1]))
    # 1 - (2+6)/2, 2 - (1+6)/2, 6 - (1+2)/2; the single-sample group gets 0
    np.testing.assert_allclose(out.advantages, [-3.0, -1.5, 4.5, 0.0], rtol=1e-6)


@pytest.mark.parametrize("between_coef", [0.0, 0.5])
def test_hierarchical_hand(maybe_jit, between_coef):
    group = jnp.array([0, 0, 0, 0, 0, 1, 1])
    local = jnp.array([0, 0, 1, 1, 2, 0, 1])
    rewards = jnp.array([1.0, 0.0, 1.5, 1.5, 0.0, 1.0, 1.0])
    sub = chrpo.nested_ids(group, local, num_local=3)
    np.testing.assert_array_equal(sub, [0, 0, 1, 1, 2, 3, 4])
    f = maybe_jit(chrpo.hierarchical_advantages, num_groups=2, num_subgroups=6,
                  eps=EPS, between_coef=between_coef)
    out = f(rewards, group, sub)
    # Within: subgroup 0 = [1, 0] -> +-0.5 / (0.5 + eps); subgroups 1 (constant)
    # and 2 (single) -> 0. Between: subgroup means [0.5, 1.5, 0], mean 2/3,
    # population std sqrt(7/18). Group 1 is constant -> all 0.
    d = math.sqrt(7 / 18) + EPS
    w = 0.5 / (0.5 + EPS)
    b = np.array([-1 / 6, 5 / 6, -2 / 3]) / d * between_coef
    expected = [w + b[0], -w + b[0], b[1], b[1], b[2], 0.0, 0.0]
    np.testing.assert_allclose(out.advantages, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.zero_variance, [False, True])


def test_equal_subgroups_in_another_order_give_no_between_signal():
    # float32 means of [1.2, 1.1, 1.2] and [1.2, 1.2, 1.1] differ by one
    # rounding step; without the tie tolerance B would be about 0.1 here.
    rewards = jnp.array([1.2, 1.1, 1.2, 1.2, 1.2, 1.1])
    groups, sub = jnp.zeros(6, jnp.int32), jnp.array([0, 0, 0, 1, 1, 1])
    f = functools.partial(chrpo.hierarchical_advantages, rewards, groups, sub,
                          num_groups=1, num_subgroups=2)
    np.testing.assert_array_equal(f(between_coef=1.0).advantages,
                                  f(between_coef=0.0).advantages)
    assert np.abs(np.asarray(f(between_coef=0.0).advantages)).max() > 0.5


def test_masked_rows_are_ignored_exactly():
    rewards = jnp.array([1.0, 9.0, 3.0, 5.0, 0.0])
    groups = jnp.array([0, 0, 0, 1, 1])
    mask = jnp.array([True, False, True, True, True])
    kept = np.array([0, 2, 3, 4])
    for name in ("grpo", "drgrpo", "rloo"):
        masked = chrpo.group_advantages(rewards, groups, mask, num_groups=2,
                                        estimator=name)
        subset = chrpo.group_advantages(rewards[kept], groups[kept], num_groups=2,
                                        estimator=name)
        assert float(masked.advantages[1]) == 0.0
        np.testing.assert_allclose(masked.advantages[kept], subset.advantages, rtol=1e-6)


def test_out_of_range_ids_count_as_masked():
    out = chrpo.grpo_advantages(jnp.array([1.0, 3.0, 100.0, -100.0]),
                                jnp.array([0, 0, -1, 7]), num_groups=2)
    np.testing.assert_allclose(out.advantages[2:], [0.0, 0.0])
    np.testing.assert_array_equal(out.nonempty, [True, False])
    np.testing.assert_allclose(out.advantages[:2], [-1.0, 1.0], rtol=1e-5)


N, NUM_GROUPS, NUM_LOCAL = 12, 4, 3


@jax.jit
def all_estimators(rewards, groups, mask, sub):
    """Every estimator on one [12] batch: one compilation per dtype, shared below."""
    return {name: chrpo.group_advantages(
        rewards, groups, mask, estimator=name, num_groups=NUM_GROUPS,
        subgroup_ids=sub, num_subgroups=NUM_GROUPS * NUM_LOCAL) for name in ESTIMATORS}


@hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
@hypothesis.given(
    quarters=st.lists(st.integers(-4, 8), min_size=N, max_size=N),
    groups=st.lists(st.integers(0, NUM_GROUPS - 1), min_size=N, max_size=N),
    local=st.lists(st.integers(0, NUM_LOCAL - 1), min_size=N, max_size=N),
    mask=st.lists(st.booleans(), min_size=N, max_size=N),
    perm=st.permutations(range(N)))
def test_permuting_rollouts_permutes_advantages(quarters, groups, local, mask, perm):
    # Rewards are multiples of 1/4, so sums are exact in any order and a
    # constant group is detected identically before and after permutation.
    rewards = jnp.array(quarters, jnp.float32) / 4
    groups, mask = jnp.array(groups), jnp.array(mask)
    sub = chrpo.nested_ids(groups, jnp.array(local), num_local=NUM_LOCAL)
    perm = np.array(perm)
    out = all_estimators(rewards, groups, mask, sub)
    out_p = all_estimators(rewards[perm], groups[perm], mask[perm], sub[perm])
    for name in ESTIMATORS:
        np.testing.assert_allclose(out_p[name].advantages, out[name].advantages[perm],
                                   rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_array_equal(out_p[name].zero_variance, out[name].zero_variance)


# group 0: single sample; group 1: constant; group 2: all masked (one NaN
# reward among them); group 3: ordinary, split over two subgroups.
DEGENERATE = dict(
    rewards=jnp.array([1.0, 2.0, 2.0, 7.0, jnp.nan, 0.0, 1.0, 3.0, 0.5, 2.5, 1.0, 0.0]),
    groups=jnp.array([0, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3, 3]),
    mask=jnp.array([True, True, True, False, False] + [True] * 7),
    local=jnp.array([0, 0, 1, 0, 0, 0, 0, 1, 1, 2, 2, 0]))


def test_degenerate_groups_are_finite_with_finite_gradients():
    d = DEGENERATE
    sub = chrpo.nested_ids(d["groups"], d["local"], num_local=NUM_LOCAL)
    out = all_estimators(d["rewards"], d["groups"], d["mask"], sub)
    for name, result in out.items():
        assert np.isfinite(result.advantages).all(), name
        np.testing.assert_array_equal(result.advantages[:5], 0.0, err_msg=name)
        assert np.abs(result.advantages[5:]).min() > 0, name
        np.testing.assert_array_equal(result.zero_variance, [True, True, False, False])
    weights = jnp.arange(1.0, N + 1)
    grads = jax.jit(jax.grad(lambda r: sum(
        jnp.sum(res.advantages * weights)
        for res in all_estimators(r, d["groups"], d["mask"], sub).values())))(
        d["rewards"])
    assert np.isfinite(grads).all() and np.abs(grads[5:]).sum() > 0
    all_masked = all_estimators(d["rewards"], d["groups"], jnp.zeros(N, bool), sub)
    for result in all_masked.values():
        np.testing.assert_array_equal(result.advantages, 0.0)
        assert float(result.zero_variance_fraction) == 0.0


def test_bfloat16_rewards():
    d = DEGENERATE
    rewards = jnp.nan_to_num(d["rewards"]) + jnp.linspace(0.0, 0.3, N)
    sub = chrpo.nested_ids(d["groups"], d["local"], num_local=NUM_LOCAL)
    low = all_estimators(rewards.astype(jnp.bfloat16), d["groups"], d["mask"], sub)
    high = all_estimators(rewards, d["groups"], d["mask"], sub)
    for name in ESTIMATORS:
        a = low[name].advantages
        assert a.dtype == jnp.float32 and np.isfinite(a).all(), name
        np.testing.assert_allclose(a, high[name].advantages, atol=3e-2, err_msg=name)


@pytest.mark.parametrize("call, message", [
    (lambda: chrpo.grpo_advantages(jnp.ones(3), jnp.zeros(3), num_groups=1),
     "`group_ids` must be integer"),
    (lambda: chrpo.grpo_advantages(jnp.ones(3), jnp.zeros(2, jnp.int32), num_groups=1),
     "`group_ids` must have shape"),
    (lambda: chrpo.grpo_advantages(jnp.ones(3), jnp.zeros(3, jnp.int32), num_groups=0),
     "num_groups"),
    (lambda: chrpo.grpo_advantages(jnp.ones(3), jnp.zeros(3, jnp.int32), num_groups=2.0),
     "num_groups"),
    (lambda: chrpo.grpo_advantages(jnp.ones(3), jnp.zeros(3, jnp.int32), num_groups=1,
                                   eps=0.0), "eps"),
    (lambda: chrpo.group_advantages(jnp.ones(3), jnp.zeros(3, jnp.int32), num_groups=1,
                                    estimator="hierarchical"), "subgroup_ids"),
    (lambda: chrpo.group_advantages(jnp.ones(3), jnp.zeros(3, jnp.int32), num_groups=1,
                                    estimator="ppo"),
     "unknown advantage estimator 'ppo'; valid names: 'drgrpo', 'grpo', "
     "'grpo-batch', 'hierarchical', 'rloo'"),
    (lambda: chrpo.AdvantageConfig(ddof=2), "ddof"),
])
def test_advantage_errors(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def trl_batch_scaled(rewards, num_generations, eps=1e-4):
    """TRL GRPOTrainer with scale_rewards="batch", written out in numpy: group means over
    consecutive blocks of num_generations, one unbiased std over the whole batch."""
    r = np.asarray(rewards, np.float64)
    mean = r.reshape(-1, num_generations).mean(axis=1).repeat(num_generations)
    return (r - mean) / (r.std(ddof=1) + eps)


def test_grpo_batch_matches_trls_formula(maybe_jit):
    rng = np.random.default_rng(3)
    rewards = rng.normal(size=12).astype(np.float32)
    groups = jnp.repeat(jnp.arange(3), 4)
    fn = maybe_jit(chrpo.grpo_batch_advantages, num_groups=3, eps=1e-4, ddof=1)
    got = fn(jnp.asarray(rewards), groups)
    np.testing.assert_allclose(got.advantages, trl_batch_scaled(rewards, 4), rtol=1e-5,
                               atol=1e-6)
    via = chrpo.group_advantages(jnp.asarray(rewards), groups, num_groups=3,
                                 estimator="grpo-batch", eps=1e-4, ddof=1)
    np.testing.assert_allclose(via.advantages, got.advantages)


def test_grpo_batch_hand_constant_group_and_mask():
    out = chrpo.grpo_batch_advantages(jnp.array([1.0, 3.0, 2.0, 2.0, 9.0]),
                                      jnp.array([0, 0, 1, 1, 1]), num_groups=2,
                                      mask=jnp.array([True, True, True, True, False]))
    # batch std (population) of [1, 3, 2, 2] = sqrt(0.5); group 1 is constant: 0
    np.testing.assert_allclose(out.advantages, [-1 / np.sqrt(0.5), 1 / np.sqrt(0.5), 0, 0, 0],
                               rtol=1e-5)
    assert out.zero_variance.tolist() == [False, True]
    flat = chrpo.grpo_batch_advantages(jnp.ones(4), jnp.array([0, 0, 1, 1]), num_groups=2)
    assert flat.advantages.tolist() == [0.0] * 4

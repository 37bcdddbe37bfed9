"""A budget that binds: the PID multiplier, the level allocation, the Lagrangian advantage."""
import itertools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chrpo


def test_pid_update_hand(maybe_jit):
    step = maybe_jit(chrpo.update_pid_lagrange, budget=0.3, kp=1.0, ki=0.5, kd=2.0)
    s = step(chrpo.init_pid_lagrange(), jnp.array([0.2, 0.6]))      # d = 0.1
    # 1 * 0.1 + 0.5 * 0.1 + 2 * max(0.1 - 0, 0) = 0.35
    assert float(s.multiplier) == pytest.approx(0.35)
    assert float(s.integral) == pytest.approx(0.1) and float(s.previous) == pytest.approx(0.1)
    s = step(s, jnp.array([0.3, 0.3]))                                # d = 0
    # P 0, I 0.5 * 0.1, D: a falling cost does not lower lambda one-sided (max(-0.1, 0) = 0)
    assert float(s.multiplier) == pytest.approx(0.05)
    s = step(s, jnp.array([0.0, 0.0]))                                # d = -0.3
    # I = max(0.1 - 0.3, 0) = 0; lambda = max(-0.3, 0) = 0
    assert float(s.multiplier) == 0.0 and float(s.integral) == 0.0


def test_pid_two_sided_goes_negative_under_budget(maybe_jit):
    step = maybe_jit(chrpo.update_pid_lagrange, budget=0.5, kp=1.0, ki=1.0, kd=0.5,
                     two_sided=True, integral_limit=0.25)
    s = step(chrpo.init_pid_lagrange(), jnp.array([0.1, 0.3]))        # d = -0.3
    # I = clip(-0.3, -0.25, 0.25) = -0.25; lambda = -0.3 - 0.25 + 0.5 * (-0.3) = -0.7
    assert float(s.integral) == pytest.approx(-0.25)
    assert float(s.multiplier) == pytest.approx(-0.7)


def test_pid_with_only_ki_is_projected_dual_ascent():
    rng = np.random.default_rng(0)
    dual, pid = chrpo.init_lagrange(), chrpo.init_pid_lagrange()
    for _ in range(12):
        r = jnp.asarray(rng.uniform(0, 1, 6), jnp.float32)
        dual = chrpo.update_lagrange(dual, r, budget=0.4, step_size=0.7)
        pid = chrpo.update_pid_lagrange(pid, r, budget=0.4, kp=0.0, ki=0.7)
        assert float(pid.multiplier) == pytest.approx(float(dual.multiplier), abs=1e-6)


def test_pid_empty_mask_keeps_integral_and_previous():
    s = chrpo.update_pid_lagrange(chrpo.init_pid_lagrange(), jnp.array([0.9]), budget=0.4,
                                  kp=1.0, ki=1.0, kd=1.0)
    t = chrpo.update_pid_lagrange(s, jnp.array([5.0]), jnp.array([False]), budget=0.4,
                                  kp=1.0, ki=1.0, kd=1.0)
    assert float(t.integral) == float(s.integral) and float(t.previous) == float(s.previous)
    assert float(t.multiplier) == pytest.approx(float(s.integral))   # only the I term left


def test_pid_state_is_a_checkpointable_pytree():
    s = chrpo.init_pid_lagrange(0.5)
    leaves = jax.tree.leaves(s)
    assert len(leaves) == 3 and all(x.dtype == jnp.float32 and x.shape == () for x in leaves)
    back = jax.tree.unflatten(jax.tree.structure(s), leaves)
    assert isinstance(back, chrpo.PIDLagrangeState) and float(back.multiplier) == 0.5


@pytest.mark.parametrize("kwargs, named", [
    (dict(kp=-1.0, ki=0.0), "kp"), (dict(kp=0.0, ki=float("nan")), "ki"),
    (dict(kp=0.0, ki=0.0, kd=-2.0), "kd"),
    (dict(kp=0.0, ki=0.0, integral_limit=0.0), "integral_limit"),
])
def test_pid_errors_name_the_value(kwargs, named):
    with pytest.raises(ValueError, match=named):
        chrpo.update_pid_lagrange(chrpo.init_pid_lagrange(), jnp.ones(2), budget=0.3, **kwargs)


@hypothesis.settings(max_examples=30, deadline=None, derandomize=True)
@hypothesis.given(start=st.floats(0.0, 1.0), budget=st.floats(0.1, 0.9))
def test_pid_closed_loop_reaches_the_budget(start, budget):
    """A plant whose mean ratio falls linearly with lambda (r = start + 0.5 - lambda, kept in
    [0, 1.5]) settles at the budget under the two-sided PID; dual ascent alike."""
    s = chrpo.init_pid_lagrange()
    for _ in range(200):
        ratio = jnp.clip(start + 0.5 - s.multiplier, 0.0, 1.5)[None]
        s = chrpo.update_pid_lagrange(s, ratio, budget=budget, kp=0.5, ki=0.3,
                                      two_sided=True, integral_limit=10.0)
    assert float(jnp.clip(start + 0.5 - s.multiplier, 0.0, 1.5)) == pytest.approx(budget, abs=1e-3)


COST = jnp.array([0.2, 0.45, 0.6, 0.8, 1.0])


def test_allocate_levels_hand(maybe_jit):
    acc = jnp.array([[1.0, 1.0, 1.0, 1.0, 1.0],     # easy: every level solves it
                     [0.2, 0.4, 1.0, 1.0, 1.0],     # hard: needs 60
                     [0.0, 0.0, 0.0, 0.0, 0.0]])    # unsolvable
    cost = jnp.broadcast_to(COST, acc.shape)
    alloc = maybe_jit(chrpo.allocate_levels, budget=(0.2 + 0.6 + 0.2) / 3)
    choice, mu, mean = alloc(acc, cost)
    assert choice.tolist() == [0, 2, 0] and float(mean) == pytest.approx(1.0 / 3)
    assert 0 <= float(mu) < 1e-5      # the most accurate allocation fits: no price
    tight = maybe_jit(chrpo.allocate_levels, budget=0.2)(acc, cost)
    assert tight[0].tolist() == [0, 0, 0] and float(tight[1]) > 0
    # the hard question's 20 -> 60 buys 0.8 accuracy for 0.4 ratio: the price is 2
    assert float(tight[1]) == pytest.approx(2.0, rel=1e-3)


def test_allocate_levels_two_sided_spends_the_budget():
    acc = jnp.array([[1.0, 1.0, 1.0, 1.0, 1.0], [0.2, 0.4, 1.0, 1.0, 1.0]])
    cost = jnp.broadcast_to(COST, acc.shape)
    one, _, m1 = chrpo.allocate_levels(acc, cost, 0.9)
    two, mu, m2 = chrpo.allocate_levels(acc, cost, 0.9, two_sided=True)
    assert one.tolist() == [0, 2] and float(m1) == pytest.approx(0.4)     # a ceiling only
    assert float(mu) < 0 and float(m2) <= 0.9 + 1e-6 and float(m2) >= 0.8


def test_allocate_levels_mask_and_infeasible_budget():
    acc = jnp.array([[0.0, 1.0], [0.0, 1.0]])
    cost = jnp.array([[0.2, 0.6], [0.2, 0.6]])
    choice, mu, mean = chrpo.allocate_levels(acc, cost, 0.6, mask=jnp.array([True, False]))
    assert choice.tolist() == [1, 0] and float(mean) == pytest.approx(0.6)
    low = chrpo.allocate_levels(acc, cost, 0.05)       # below the cheapest: the cheapest
    assert low[0].tolist() == [0, 0] and float(low[2]) == pytest.approx(0.2)


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
@hypothesis.given(data=st.data(), n=st.integers(1, 5), budget=st.floats(0.2, 1.0))
def test_allocate_levels_is_optimal_on_small_cases(data, n, budget):
    """Against brute force: the allocation fits and no allocation that fits is more accurate
    by more than one question's best step (the Lagrangian's duality gap)."""
    acc = np.array(data.draw(st.lists(st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]),
                                               min_size=3, max_size=3),
                                      min_size=n, max_size=n)), np.float32)
    cost = np.broadcast_to(np.array([0.2, 0.5, 1.0], np.float32), acc.shape)
    choice, _, mean = chrpo.allocate_levels(jnp.asarray(acc), jnp.asarray(cost), budget)
    choice = np.asarray(choice)
    assert float(mean) <= budget + 1e-5
    got = acc[np.arange(n), choice].sum()
    best = max(acc[np.arange(n), list(c)].sum() for c in itertools.product(range(3), repeat=n)
               if cost[np.arange(n), list(c)].mean() <= budget + 1e-6)
    assert got >= best - 1.0 - 1e-5


def test_constrained_advantages_hand():
    inputs = chrpo.RewardInputs(valid=jnp.ones(3, bool), correct=jnp.ones(3, bool),
                                level=jnp.full(3, 0.2), ratio=jnp.array([0.2, 0.4, 0.6]),
                                target=jnp.full(3, 0.2),
                                has_target=jnp.array([True, True, False]))
    adv = jnp.array([1.0, 0.0, -1.0])
    out = chrpo.constrained_advantages(adv, inputs, jnp.zeros(3, jnp.int32), num_groups=1,
                                       lagrange_multiplier=1.0)
    # counted rows 0, 1: ratios 0.2, 0.4 (mean 0.3, std 0.1), cost advantage [-1, 1, 0]
    # (row 2 not counted)
    np.testing.assert_allclose(out, [(1.0 + 1.0) / 2, (0.0 - 1.0) / 2, -1.0 / 2], rtol=1e-4)
    neg = chrpo.constrained_advantages(adv, inputs, jnp.zeros(3, jnp.int32), num_groups=1,
                                       lagrange_multiplier=-1.0)
    np.testing.assert_allclose(neg, [(1.0 - 1.0) / 2, (0.0 + 1.0) / 2, -1.0 / 2], atol=1e-4)


def test_advantage_mode_lets_the_budget_outweigh_the_tiers():
    """In 'reward' mode the global term never reverses a within-budget pair; in 'advantage'
    mode a large lambda makes the long correct rollout worse than the short wrong one."""
    inputs = chrpo.RewardInputs(valid=jnp.ones(2, bool), correct=jnp.array([True, False]),
                                level=jnp.array([1.0, 0.2]), ratio=jnp.array([1.0, 0.2]),
                                target=jnp.full(2, 0.2), has_target=jnp.ones(2, bool))
    groups = jnp.zeros(2, jnp.int32)
    for mode, sign in (("reward", 1), ("advantage", -1)):
        cfg = chrpo.get_preset("grpo", global_mode=mode)
        adv, _ = chrpo.compute_advantages(inputs, groups, num_groups=1, config=cfg,
                                          lagrange_multiplier=50.0)
        assert np.sign(float(adv[0] - adv[1])) == sign, mode


def test_reward_config_refuses_unknown_kind_and_mode():
    with pytest.raises(ValueError, match="reward kind"):
        chrpo.RewardConfig(kind="lcpo")
    with pytest.raises(ValueError, match="global_mode"):
        chrpo.RewardConfig(global_mode="both")
    with pytest.raises(ValueError, match="lcpo_delta"):
        chrpo.RewardConfig(lcpo_delta=1.5)


def test_peak_bonus_falls_on_both_sides_of_the_target(maybe_jit):
    level = jnp.array([0.2, 0.4, 0.6, 0.8, 1.0])
    target = jnp.full(5, 0.6)
    below = maybe_jit(chrpo.ratio_bonus, b_ratio=0.3, width=0.4)(level, target)
    peak = maybe_jit(chrpo.ratio_bonus, b_ratio=0.3, width=0.4, shape="peak")(level, target)
    np.testing.assert_allclose(below, [0.3, 0.3, 0.3, 0.15, 0.0], atol=1e-6)
    np.testing.assert_allclose(peak, [0.0, 0.15, 0.3, 0.15, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="bonus_shape"):
        chrpo.RewardConfig(bonus_shape="above")
    # the tier order holds for the peak shape too: its bonus lies in [0, b_ratio]
    cfg = chrpo.RewardConfig(bonus_shape="peak", ratio_width=0.4)
    tiers = jnp.full(5, chrpo.TIER_WITHIN_BUDGET)
    r = chrpo.tiered_reward(tiers, level, level, target, config=cfg)
    lo, hi = chrpo.tier_bounds(cfg)["within_budget"]
    assert float(r.min()) >= lo and float(r.max()) <= hi

"""Hierarchical reward: hand-computed values, component decomposition, tier order."""
import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chrpo

# Dyadic coefficients so every expected value below is exact in float32.
COEFS = dict(tol=0.125, r_invalid=-1.0, r_wrong=0.0, r_correct=1.0, over_coef=2.0,
             over_cap=0.5, b_cal=0.25, b_ratio=0.5, ratio_width=0.5, global_cap=0.125)

#        invalid  wrong  k+tol  over   no-target  invalid  within
VALID = [False, True, True, True, True, False, True]
CORRECT = [False, False, True, True, True, True, True]
LEVEL = [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
RATIO = [0.5, 0.5, 0.625, 0.75, 5.0, 0.5, 0.25]
TARGET = [0.5, 0.5, 0.5, 0.5, 0.0, 0.5, 0.25]
HAS_TARGET = [True, True, True, True, False, True, True]


def arrays():
    return (jnp.array(VALID), jnp.array(CORRECT), jnp.array(LEVEL), jnp.array(RATIO),
            jnp.array(TARGET), jnp.array(HAS_TARGET))


def test_reward_tiers_hand(maybe_jit):
    valid, correct, level, ratio, _, has_target = arrays()
    tiers = maybe_jit(chrpo.reward_tiers, tol=0.125)(valid, correct, level, ratio,
                                                    has_target)
    # r = k + tol exactly is within budget (the constraint is r <= k + tol).
    np.testing.assert_array_equal(tiers, [0, 1, 4, 2, 3, 0, 4])
    assert tiers.dtype == jnp.int32


@pytest.mark.parametrize("lam, expected", [
    # row 2: 1 + b_cal .25 + b_ratio .5 (k = t) - g;  row 3: 1 - p(.125 excess * 2) - g
    # row 6: 1 + .25 + .5 * (1 - .25 / .5) - g;  g = clip(lam * r, 0, .125)
    (0.0, [-1.0, 0.0, 1.75, 0.75, 1.0, -1.0, 1.5]),
    (0.25, [-1.0, 0.0, 1.75 - 0.125, 0.75 - 0.125, 1.0, -1.0, 1.5 - 0.0625]),
])
def test_hierarchical_reward_hand(maybe_jit, lam, expected):
    reward = maybe_jit(chrpo.hierarchical_reward, **COEFS)(
        *arrays(), lagrange_multiplier=jnp.float32(lam))
    np.testing.assert_allclose(reward, expected, rtol=0, atol=1e-7)
    assert reward.dtype == jnp.float32


def test_tiered_reward_hand(maybe_jit):
    # Tier ids decide which value applies; level/ratio/target are ignored for
    # the invalid, wrong and untargeted tiers (NaN there stays harmless).
    f = maybe_jit(chrpo.tiered_reward, config=chrpo.RewardConfig(**COEFS))
    nan = jnp.nan
    out = f(jnp.array([0, 1, 2, 3, 4]), jnp.array([nan, nan, 0.5, nan, 0.75]),
            jnp.array([nan, nan, 1.0, nan, 0.5]), jnp.array([nan, nan, 0.5, nan, 0.5]),
            lagrange_multiplier=jnp.float32(0.0625))
    # over: excess 1 - .5 - .125 = .375 -> p = min(.75, .5); g = .0625 * 1
    # within: 1 + .25 + .5 * (1 - .25 / .5), g = .0625 * .5
    np.testing.assert_allclose(out, [-1.0, 0.0, 1.0 - 0.5 - 0.0625, 1.0,
                                     1.25 + 0.25 - 0.03125], atol=1e-7)


def test_over_budget_penalty_hand(maybe_jit):
    f = maybe_jit(chrpo.over_budget_penalty, tol=0.125, coef=2.0, cap=0.5)
    # excess max(r - k - tol, 0) = [0, .125, .875, 0]; times 2, capped at .5
    out = f(jnp.array([0.5, 0.75, 1.5, 0.625]), jnp.full(4, 0.5))
    np.testing.assert_allclose(out, [0.0, 0.25, 0.5, 0.0], atol=1e-7)


def test_calibration_bonus_hand(maybe_jit):
    f = maybe_jit(chrpo.calibration_bonus, tol=0.125, b_cal=0.25)
    out = f(jnp.array([0.5, 0.625, 0.75]), jnp.full(3, 0.5))
    np.testing.assert_allclose(out, [0.25, 0.25, 0.0])


def test_ratio_bonus_hand(maybe_jit):
    f = maybe_jit(chrpo.ratio_bonus, b_ratio=0.5, width=0.5)
    # k - t = [-.25, 0, .25, .5]: flat below target, linear down to 0 at t + width
    out = f(jnp.array([0.25, 0.5, 0.75, 1.0]), jnp.full(4, 0.5))
    np.testing.assert_allclose(out, [0.5, 0.5, 0.25, 0.0], atol=1e-7)


@pytest.mark.parametrize("lam, expected", [
    (0.25, [0.0625, 0.125, 0.25, 0.375]),  # the last one capped from 0.5
    (-1.0, [0.0, 0.0, 0.0, 0.0]),          # a negative multiplier never rewards length
])
def test_global_budget_penalty_hand(maybe_jit, lam, expected):
    f = maybe_jit(chrpo.global_budget_penalty, cap=0.375)
    out = f(jnp.array([0.25, 0.5, 1.0, 2.0]), jnp.float32(lam))
    np.testing.assert_allclose(out, expected, atol=1e-7)


def test_reward_is_the_sum_of_its_components():
    rng = np.random.default_rng(0)
    n = 64
    level = rng.choice([0.2, 0.4, 0.6, 0.8, 1.0], n).astype(np.float32)
    target = rng.choice([0.2, 0.4, 0.6, 0.8, 1.0], n).astype(np.float32)
    ratio = rng.uniform(0.0, 1.5, n).astype(np.float32)
    ones = np.ones(n, bool)
    lam = jnp.float32(0.3)

    @jax.jit
    def reward_and_parts(level, ratio, target):
        reward = chrpo.hierarchical_reward(ones, ones, level, ratio, target, ones,
                                           lagrange_multiplier=lam)
        within = chrpo.within_budget(ratio, level, tol=0.1)
        parts = (1.0 + chrpo.calibration_bonus(ratio, level)
                 - chrpo.over_budget_penalty(ratio, level)
                 + within * chrpo.ratio_bonus(level, target)
                 - chrpo.global_budget_penalty(ratio, lam))
        return reward, parts, within

    reward, parts, within = reward_and_parts(level, ratio, target)
    assert 0 < int(within.sum()) < n  # both correct tiers are exercised
    np.testing.assert_allclose(reward, parts, rtol=1e-6, atol=1e-6)


def test_masked_garbage_gives_finite_rewards():
    # Invalid rows and untargeted rows may carry NaN ratio/level/target.
    nan = float("nan")
    reward = jax.jit(chrpo.hierarchical_reward)(
        jnp.array([False, True, True]), jnp.array([True, False, True]),
        jnp.array([nan, nan, nan]), jnp.array([nan, nan, nan]),
        jnp.array([nan, nan, nan]), jnp.array([True, True, False]),
        lagrange_multiplier=1.0)
    np.testing.assert_array_equal(reward, [-1.0, 0.0, 1.0])


def test_tier_bounds_defaults():
    b = chrpo.tier_bounds(chrpo.RewardConfig())
    expected = {"invalid": (-1.0, -1.0), "wrong": (0.0, 0.0), "over_budget": (0.4, 1.0),
                "correct": (1.0, 1.0), "within_budget": (1.1, 1.5)}
    for name, (lo, hi) in expected.items():
        assert b[name] == (pytest.approx(lo, rel=1e-6), pytest.approx(hi, rel=1e-6))


@pytest.mark.parametrize("bad, named", [
    (dict(tol=-0.1), "tol"),
    (dict(r_invalid=0.0), "r_invalid"),
    (dict(r_wrong=1.0), "r_wrong"),
    (dict(over_coef=-1.0), "over_coef"),
    (dict(over_cap=-0.1), "over_cap"),
    (dict(over_cap=0.95), "over_cap"),         # 0.95 + global_cap 0.1 >= 1 - 0
    (dict(b_cal=0.1), "b_cal"),                # not > global_cap
    (dict(b_ratio=-0.1), "b_ratio"),
    (dict(ratio_width=0.0), "ratio_width"),
    (dict(global_cap=-0.1), "global_cap"),
    (dict(r_correct=math.nan), "r_correct"),
    (dict(over_cap="0.5"), "over_cap"),
])
def test_out_of_range_coefficients_raise_naming_them(bad, named):
    with pytest.raises(ValueError, match=named):
        chrpo.RewardConfig(**bad)
    ones = jnp.ones(2, bool)
    with pytest.raises(ValueError, match=named):
        chrpo.hierarchical_reward(ones, ones, jnp.ones(2), jnp.ones(2), jnp.ones(2),
                                  ones, **bad)


def test_float32_overlap_is_caught():
    # In real numbers over_cap < r_correct - r_wrong holds, but 1 - (1 - 1e-9)
    # rounds to 0 in float32: the over-budget tier would touch r_wrong.
    with pytest.raises(ValueError, match="overlap after float32"):
        chrpo.RewardConfig(over_cap=1.0 - 1e-9, global_cap=0.0)


def test_reward_shape_errors_name_the_argument():
    ones = jnp.ones(3, bool)
    with pytest.raises(ValueError, match="`ratio` must have shape"):
        chrpo.hierarchical_reward(ones, ones, jnp.ones(3), jnp.ones((3, 1)),
                                  jnp.ones(3), ones)
    with pytest.raises(ValueError, match="`lagrange_multiplier` must have rank 0"):
        chrpo.hierarchical_reward(ones, ones, jnp.ones(3), jnp.ones(3), jnp.ones(3),
                                  ones, lagrange_multiplier=jnp.ones(3))


@st.composite
def coefficients(draw):
    """Any coefficients inside the documented ranges (with a small relative margin)."""
    unit = st.floats(0.0, 1.0)
    r_wrong = draw(st.floats(-2.0, 2.0))
    gap = draw(st.floats(0.01, 3.0))
    global_cap = 0.49 * draw(unit) * gap
    return dict(
        tol=draw(st.floats(0.0, 0.5)),
        r_invalid=r_wrong - draw(st.floats(0.01, 3.0)), r_wrong=r_wrong,
        r_correct=r_wrong + gap,
        over_coef=draw(st.floats(0.0, 100.0)),
        over_cap=0.99 * draw(unit) * (gap - global_cap),
        b_cal=global_cap + draw(st.floats(1e-3, 2.0)),
        b_ratio=draw(st.floats(0.0, 2.0)), ratio_width=draw(st.floats(0.01, 2.0)),
        global_cap=global_cap)


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
@hypothesis.given(coefs=coefficients(), seed=st.integers(0, 2**31 - 1),
                  lam=st.floats(0.0, 100.0), has_target=st.booleans())
def test_tier_order_holds_for_any_valid_coefficients(coefs, seed, lam, has_target):
    rng = np.random.default_rng(seed)
    n = 48
    levels = np.array([0.2, 0.4, 0.6, 0.8, 1.0], np.float32)
    valid, correct = rng.random(n) < 0.8, rng.random(n) < 0.6
    level, target = rng.choice(levels, n), rng.choice(levels, n)
    ratio = rng.uniform(0.0, 2.0, n).astype(np.float32)
    targeted = np.full(n, has_target)
    reward = np.asarray(chrpo.hierarchical_reward(
        valid, correct, level, ratio, target, targeted, lagrange_multiplier=lam,
        **coefs))
    tiers = np.asarray(chrpo.reward_tiers(valid, correct, level, ratio, targeted,
                                          tol=coefs["tol"]))
    order = ([chrpo.TIER_INVALID, chrpo.TIER_WRONG, chrpo.TIER_OVER_BUDGET,
              chrpo.TIER_WITHIN_BUDGET] if has_target else
             [chrpo.TIER_INVALID, chrpo.TIER_WRONG, chrpo.TIER_CORRECT])
    assert set(np.unique(tiers)) <= set(order)
    present = [t for t in order if (tiers == t).any()]
    for low, high in zip(present, present[1:]):
        assert reward[tiers == low].max() < reward[tiers == high].min()
    bounds = chrpo.tier_bounds(chrpo.RewardConfig(**coefs))
    for t in present:
        lo, hi = bounds[chrpo.TIER_NAMES[t]]
        # the bounds are exact sums of the coefficients; the rewards are float32 sums of
        # the same terms, so they may sit a few float32 ulps outside (r_correct 0.96875,
        # b_cal 1.08900390625: 1.9687499 against 1.96875)
        slack = 4 * float(np.finfo(np.float32).eps) * max(1.0, abs(lo), abs(hi))
        assert lo - slack <= reward[tiers == t].min() and reward[tiers == t].max() <= hi + slack

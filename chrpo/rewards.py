"""The hierarchical reward of CHRPO and its components.

For a rollout y of question x (docs/method.md, stage 3; the tier structure is the
paper's idea, the exact coefficients and the bounded global term are this
project's definition):

    tier             condition                            R(y)
    invalid          not valid(y)                         r_invalid
    wrong            valid, not correct                   r_wrong
    over_budget      correct, has target, r > k + tol     r_correct - p(r, k) - g(r)
    within_budget    correct, has target, r <= k + tol    r_correct + b_cal + b_ratio(k, t) - g(r)
    correct          correct, question has no target      r_correct

    p(r, k)      = min(over_coef * max(r - k - tol, 0), over_cap)     over-budget penalty
    b_ratio(k,t) = b_ratio * max(0, 1 - max(k - t, 0) / ratio_width) level bonus
    g(r)         = clip(lambda * r, 0, global_cap)                    global budget term

with k the emitted level, t the question's target level and r the realized
ratio, all fractions (0.2 for <COMP_20>). Questions without a target have no
reference length, so r, k and t are ignored for them (only the first two tiers
and correctness apply).

Tier order. For one question the tiers are strictly ordered,

    r_invalid < r_wrong < R(over_budget) < R(within_budget),
    r_wrong < r_correct (untargeted question),

for every input, whenever the coefficients lie in their documented ranges:

    r_invalid < r_wrong < r_correct,  tol >= 0,  over_coef >= 0,
    over_cap >= 0,  global_cap >= 0,  over_cap + global_cap < r_correct - r_wrong,
    b_cal > global_cap,  b_ratio >= 0,  ratio_width > 0.

Proof sketch: p in [0, over_cap] and g in [0, global_cap], so R(over_budget)
lies in [r_correct - over_cap - global_cap, r_correct]; R(within_budget) lies
in [r_correct + b_cal - global_cap, r_correct + b_cal + b_ratio]. The global
term ``-lambda * r`` is therefore *bounded* (clipped to ``global_cap``) and
applied only to correct rollouts of targeted questions: it shapes length
inside the correct tiers but can never move a rollout across a tier. Wrong or
invalid rollouts are not length-penalised, so giving up early never pays.
``RewardConfig`` checks these ranges, and additionally that the tier bounds
stay strictly ordered after float32 rounding.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from chrpo import _checks
from chrpo.budget import within_budget

Array = jnp.ndarray

__all__ = ["TIER_INVALID", "TIER_WRONG", "TIER_OVER_BUDGET", "TIER_CORRECT",
           "TIER_WITHIN_BUDGET", "TIER_NAMES", "RewardConfig", "RewardInputs",
           "tier_bounds", "reward_tiers", "over_budget_penalty",
           "calibration_bonus", "ratio_bonus", "global_budget_penalty",
           "tiered_reward", "hierarchical_reward", "REWARD_KINDS", "GLOBAL_MODES",
           "BONUS_SHAPES",
           "lcpo_reward", "length_penalty_reward", "reward_of_kind"]

# Tier ids. Within one targeted question the reward increases with the id.
TIER_INVALID = 0
TIER_WRONG = 1
TIER_OVER_BUDGET = 2
TIER_CORRECT = 3          # correct answer to a question that has no target
TIER_WITHIN_BUDGET = 4
TIER_NAMES = ("invalid", "wrong", "over_budget", "correct", "within_budget")
REWARD_KINDS = ("hierarchical", "lcpo-exact", "lcpo-max", "length-penalty")
GLOBAL_MODES = ("reward", "advantage")
BONUS_SHAPES = ("below", "peak")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """Coefficients of the hierarchical reward (validated on construction).

    Attributes (default; valid range):
      tol: per-sample budget tolerance (0.1; >= 0).
      r_invalid: reward of an invalid rollout (-1.0; < r_wrong).
      r_wrong: reward of a valid, wrong rollout (0.0; < r_correct).
      r_correct: base reward of a correct rollout (1.0).
      over_coef: slope of the over-budget penalty per unit of ratio (1.0; >= 0).
      over_cap: cap of the over-budget penalty (0.5; >= 0 and
        over_cap + global_cap < r_correct - r_wrong).
      b_cal: calibration bonus for staying within budget (0.2; > global_cap).
      b_ratio: maximal level bonus, paid when k <= target (0.3; >= 0).
      ratio_width: level distance above target at which the level bonus
        reaches 0 (0.8, the whole 0.2..1.0 range; > 0).
      global_cap: bound on the global budget term lambda * r (0.1; >= 0).
      kind: which reward (``REWARD_KINDS``): 'hierarchical' (the tiers above),
        or a peer method's: 'lcpo-exact', 'lcpo-max' (``lcpo_reward``),
        'length-penalty' (``length_penalty_reward``).
      global_mode: how the global budget's multiplier acts: 'reward' (the
        bounded term g above) or 'advantage' (``objective.compute_advantages``:
        a cost advantage weighted by lambda, unbounded, so the constraint can
        outweigh the tiers; this project's, docs/chrpo.md).
      lcpo_alpha: LCPO's slope per unit of ratio distance (1.0; >= 0).
      lcpo_delta: LCPO-Max's offset (0.5, L1's value; in [0, 1]).
      length_coef: weight of Kimi k1.5's length reward (1.0; >= 0).
      bonus_shape: the level bonus's distance to the target: 'below' (the paper's:
        full bonus for every k <= t) or 'peak' (full only at k = t, falling on
        both sides: for targets that a budget's allocation set, where a level
        below the target gives up accuracy the budget paid for; this project's).
    """
    tol: float = 0.1
    r_invalid: float = -1.0
    r_wrong: float = 0.0
    r_correct: float = 1.0
    over_coef: float = 1.0
    over_cap: float = 0.5
    b_cal: float = 0.2
    b_ratio: float = 0.3
    ratio_width: float = 0.8
    global_cap: float = 0.1
    kind: str = "hierarchical"
    global_mode: str = "reward"
    lcpo_alpha: float = 1.0
    lcpo_delta: float = 0.5
    length_coef: float = 1.0
    bonus_shape: str = "below"

    def __post_init__(self):
        owner = "RewardConfig"
        _checks.lookup({k: k for k in REWARD_KINDS}, self.kind, kind="reward kind")
        _checks.lookup({k: k for k in GLOBAL_MODES}, self.global_mode, kind="global_mode")
        _checks.lookup({k: k for k in BONUS_SHAPES}, self.bonus_shape, kind="bonus_shape")
        for f in dataclasses.fields(self):
            if f.name in ("kind", "global_mode", "bonus_shape"):
                continue
            v = getattr(self, f.name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            _checks.check_value(owner, f.name, v, ok and math.isfinite(v),
                                "must be a finite Python number")
        c = self
        _checks.check_value(owner, "tol", c.tol, c.tol >= 0, "must be >= 0")
        _checks.check_value(owner, "r_invalid", c.r_invalid, c.r_invalid < c.r_wrong,
                            f"must be < r_wrong={c.r_wrong}")
        _checks.check_value(owner, "r_wrong", c.r_wrong, c.r_wrong < c.r_correct,
                            f"must be < r_correct={c.r_correct}")
        _checks.check_value(owner, "lcpo_delta", c.lcpo_delta, 0 <= c.lcpo_delta <= 1,
                            "must be in [0, 1]")
        for name in ("over_coef", "over_cap", "b_ratio", "global_cap", "lcpo_alpha",
                     "length_coef"):
            _checks.check_value(owner, name, getattr(c, name),
                                getattr(c, name) >= 0, "must be >= 0")
        _checks.check_value(owner, "ratio_width", c.ratio_width, c.ratio_width > 0,
                            "must be > 0")
        _checks.check_value(
            owner, "over_cap", c.over_cap,
            c.over_cap + c.global_cap < c.r_correct - c.r_wrong,
            f"over_cap + global_cap must be < r_correct - r_wrong = "
            f"{c.r_correct - c.r_wrong} (over-budget must stay above r_wrong)")
        _checks.check_value(owner, "b_cal", c.b_cal, c.b_cal > c.global_cap,
                            f"must be > global_cap={c.global_cap} (within-budget "
                            "must stay above over-budget)")
        bounds = tier_bounds(c)
        for low, high in (("invalid", "wrong"), ("wrong", "over_budget"),
                          ("over_budget", "within_budget"), ("wrong", "correct")):
            _checks.check_value(
                owner, "coefficients", dataclasses.asdict(c),
                bounds[low][1] < bounds[high][0],
                f"tiers {low} {bounds[low]} and {high} {bounds[high]} overlap "
                "after float32 rounding; widen the gaps")


def tier_bounds(config: RewardConfig) -> dict[str, tuple[float, float]]:
    """Smallest and largest reward each tier can take, in float32.

    Evaluated with the same operation order as ``tiered_reward``; rounding is
    monotone, so these are exact bounds of the computed float32 rewards.
    """
    f = np.float32
    c = config
    rc = f(c.r_correct)
    over_low = (rc - f(c.over_cap)) - f(c.global_cap)
    within_low = ((rc + f(c.b_cal)) + f(0.0)) - f(c.global_cap)
    within_high = ((rc + f(c.b_cal)) + f(c.b_ratio)) - f(0.0)
    return {
        "invalid": (float(f(c.r_invalid)), float(f(c.r_invalid))),
        "wrong": (float(f(c.r_wrong)), float(f(c.r_wrong))),
        "over_budget": (float(over_low), float(rc)),
        "correct": (float(rc), float(rc)),
        "within_budget": (float(within_low), float(within_high)),
    }


class RewardInputs(NamedTuple):
    """Per-rollout reward inputs, each of shape [N].

    valid: bool; correct: bool; level: emitted level k (fraction);
    ratio: realized ratio r (``budget.realized_ratio``); target: the question's
    target level t (fraction; any finite value where has_target is False);
    has_target: bool, False for questions no level solves (no reference).
    """
    valid: Array
    correct: Array
    level: Array
    ratio: Array
    target: Array
    has_target: Array


def _check_inputs(fn: str, **arrays: Array) -> dict[str, Array]:
    """All reward inputs share one [N] shape; masks become bool, values float."""
    first = next(iter(arrays))
    ref = _checks.check_rank(fn, first, arrays[first], 1)
    out = {}
    for name, x in arrays.items():
        x = _checks.check_shape(fn, name, x, ref.shape)
        is_mask = name in ("valid", "correct", "has_target")
        out[name] = _checks.as_bool(x) if is_mask else _checks.as_float(x)
    return out


def reward_tiers(valid: Array, correct: Array, level: Array, ratio: Array,
                 has_target: Array, *, tol: float = RewardConfig.tol) -> Array:
    """Tier id of every rollout (int32 [N]); see the module docstring table."""
    x = _check_inputs("reward_tiers", valid=valid, correct=correct, level=level,
                      ratio=ratio, has_target=has_target)
    within = within_budget(x["ratio"], x["level"], tol=tol)
    targeted = jnp.where(within, TIER_WITHIN_BUDGET, TIER_OVER_BUDGET)
    correct_tier = jnp.where(x["has_target"], targeted, TIER_CORRECT)
    tiers = jnp.where(~x["valid"], TIER_INVALID,
                      jnp.where(~x["correct"], TIER_WRONG, correct_tier))
    return tiers.astype(jnp.int32)


def over_budget_penalty(ratio: Array, level: Array, *, tol: float = RewardConfig.tol,
                        coef: float = RewardConfig.over_coef,
                        cap: float = RewardConfig.over_cap) -> Array:
    """``p = min(coef * max(r - k - tol, 0), cap)``; 0 within budget, <= cap."""
    x = _check_inputs("over_budget_penalty", ratio=ratio, level=level)
    excess = jnp.maximum(x["ratio"] - x["level"] - tol, 0.0)
    return jnp.minimum(coef * excess, cap)


def calibration_bonus(ratio: Array, level: Array, *, tol: float = RewardConfig.tol,
                      b_cal: float = RewardConfig.b_cal) -> Array:
    """``b_cal`` where the rollout respects its level (r <= k + tol), else 0."""
    x = _check_inputs("calibration_bonus", ratio=ratio, level=level)
    inside = within_budget(x["ratio"], x["level"], tol=tol)
    return jnp.where(inside, b_cal, 0.0).astype(jnp.float32)


def ratio_bonus(level: Array, target: Array, *, b_ratio: float = RewardConfig.b_ratio,
                width: float = RewardConfig.ratio_width, shape: str = "below") -> Array:
    """Level bonus ``b_ratio * max(0, 1 - dist(k, t) / width)`` in [0, b_ratio].

    ``shape='below'`` (the paper's): dist = max(k - t, 0), largest (``b_ratio``)
    when the emitted level is at or below the question's target, decreasing
    linearly as k rises above it, 0 from ``k >= t + width``. ``shape='peak'``:
    dist = |k - t|, largest only at the target.
    """
    _checks.check_value("ratio_bonus", "width", width, width > 0, "must be > 0")
    _checks.lookup({k: k for k in BONUS_SHAPES}, shape, kind="bonus shape")
    x = _check_inputs("ratio_bonus", level=level, target=target)
    gap = x["level"] - x["target"]
    dist = jnp.abs(gap) if shape == "peak" else jnp.maximum(gap, 0.0)
    return b_ratio * jnp.maximum(1.0 - dist / width, 0.0)


def global_budget_penalty(ratio: Array, lagrange_multiplier: Array, *,
                          cap: float = RewardConfig.global_cap) -> Array:
    """Bounded global-budget term ``g = clip(lambda * r, 0, cap)`` (subtracted).

    ``lagrange_multiplier`` is a scalar (``LagrangeState.multiplier``), traced
    or not. Below the cap this is exactly the Lagrangian term ``lambda * r``.
    """
    ratio = _checks.as_float(_checks.check_rank("global_budget_penalty", "ratio",
                                                ratio, 1))
    lam = _checks.as_float(_checks.check_rank(
        "global_budget_penalty", "lagrange_multiplier", lagrange_multiplier, 0))
    return jnp.clip(lam * ratio, 0.0, cap)


def tiered_reward(tiers: Array, level: Array, ratio: Array, target: Array, *,
                  config: RewardConfig = RewardConfig(),
                  lagrange_multiplier: Array | float = 0.0) -> Array:
    """Reward from tier ids (``reward_tiers``) and the shaping inputs, float32 [N].

    Split from ``hierarchical_reward`` so callers that also need the tiers
    (diagnostics) compute them once.
    """
    fn = "tiered_reward"
    tiers = _checks.check_integer(fn, "tiers", _checks.check_rank(fn, "tiers", tiers, 1))
    x = _check_inputs(fn, level=level, ratio=ratio, target=target)
    c = config
    penalty = over_budget_penalty(x["ratio"], x["level"], tol=c.tol, coef=c.over_coef,
                                  cap=c.over_cap)
    bonus = ratio_bonus(x["level"], x["target"], b_ratio=c.b_ratio, width=c.ratio_width,
                        shape=c.bonus_shape)
    g = global_budget_penalty(x["ratio"], lagrange_multiplier, cap=c.global_cap)
    # Operation order matches tier_bounds (the float32 tier-order check).
    over_value = (c.r_correct - penalty) - g
    within_value = ((c.r_correct + c.b_cal) + bonus) - g
    reward = jnp.select(
        [tiers == TIER_INVALID, tiers == TIER_WRONG, tiers == TIER_OVER_BUDGET,
         tiers == TIER_WITHIN_BUDGET],
        [jnp.full_like(g, c.r_invalid), jnp.full_like(g, c.r_wrong), over_value,
         within_value],
        default=jnp.full_like(g, c.r_correct))
    return reward.astype(jnp.float32)


_D = RewardConfig()


def hierarchical_reward(valid: Array, correct: Array, level: Array, ratio: Array,
                        target: Array, has_target: Array, *,
                        lagrange_multiplier: Array | float = 0.0,
                        tol: float = _D.tol, r_invalid: float = _D.r_invalid,
                        r_wrong: float = _D.r_wrong, r_correct: float = _D.r_correct,
                        over_coef: float = _D.over_coef, over_cap: float = _D.over_cap,
                        b_cal: float = _D.b_cal, b_ratio: float = _D.b_ratio,
                        ratio_width: float = _D.ratio_width,
                        global_cap: float = _D.global_cap) -> Array:
    """The CHRPO hierarchical reward of N rollouts (module docstring), float32 [N].

    Args:
      valid, correct, level, ratio, target, has_target: [N] arrays, see
        ``RewardInputs``.
      lagrange_multiplier: scalar lambda >= 0 of the global budget; 0 disables
        the global term.
      tol ... global_cap: coefficients; defaults and valid ranges are those of
        ``RewardConfig`` (checked here; out-of-range values raise ValueError).

    Example:
      >>> import jax.numpy as jnp, chrpo
      >>> r = chrpo.hierarchical_reward(
      ...     valid=jnp.array([False, True, True, True]),
      ...     correct=jnp.array([False, False, True, True]),
      ...     level=jnp.array([0.2, 0.2, 0.2, 0.4]),
      ...     ratio=jnp.array([0.1, 0.1, 0.5, 0.3]),
      ...     target=jnp.full(4, 0.4), has_target=jnp.ones(4, bool))
      >>> [round(x, 4) for x in r.tolist()]  # invalid, wrong, over (p=0.2), within
      [-1.0, 0.0, 0.8, 1.5]
    """
    config = RewardConfig(tol=tol, r_invalid=r_invalid, r_wrong=r_wrong,
                          r_correct=r_correct, over_coef=over_coef, over_cap=over_cap,
                          b_cal=b_cal, b_ratio=b_ratio, ratio_width=ratio_width,
                          global_cap=global_cap)
    tiers = reward_tiers(valid, correct, level, ratio, has_target, tol=tol)
    return tiered_reward(tiers, level, ratio, target, config=config,
                         lagrange_multiplier=lagrange_multiplier)


def lcpo_reward(correct: Array, ratio: Array, target_ratio: Array, has_target: Array, *,
                exact: bool, alpha: float = _D.lcpo_alpha,
                delta: float = _D.lcpo_delta) -> Array:
    """LCPO's reward (Aggarwal & Welleck 2025, "L1", arXiv 2503.04697, section 3), float32 [N].

        exact (LCPO-Exact):  R = 1[correct] - alpha * |t - r|
        max   (LCPO-Max):    R = 1[correct] * clip(alpha * (t - r) + delta, 0, 1)

    L1 measures the lengths in tokens (n_gold - n_y, alpha = 3e-4); here they are
    ratios of the question's reference length (t = the target ratio, r the realized
    one), so alpha is per unit of ratio: alpha = 1 prices a miss of 0.3 (1,000 of
    3,300 reference tokens) at 0.3, L1's price of 1,000 tokens. Rows without a
    reference (has_target False) get 1[correct]. L1 writes the target into the
    prompt; a run here has one budget, the same for every prompt (docs/chrpo.md).
    """
    fn = "lcpo_reward"
    _checks.check_value(fn, "alpha", alpha, alpha >= 0, "must be >= 0")
    _checks.check_value(fn, "delta", delta, 0 <= delta <= 1, "must be in [0, 1]")
    x = _check_inputs(fn, correct=correct, ratio=ratio, target_ratio=target_ratio,
                      has_target=has_target)
    hit = x["correct"].astype(jnp.float32)
    if exact:
        shaped = hit - alpha * jnp.abs(x["target_ratio"] - x["ratio"])
    else:
        shaped = hit * jnp.clip(alpha * (x["target_ratio"] - x["ratio"]) + delta, 0.0, 1.0)
    return jnp.where(x["has_target"], shaped, hit).astype(jnp.float32)


def length_penalty_reward(correct: Array, length: Array, group_ids: Array, *,
                          num_groups: int, sample_mask: Array | None = None,
                          coef: float = _D.length_coef) -> Array:
    """Kimi k1.5's length reward added to correctness (arXiv 2501.12599, section 2.3.3).

        lambda_i = 0.5 - (len_i - min_len) / (max_len - min_len)   over i's prompt group
        R_i      = 1[correct_i] + coef * (lambda_i if correct_i else min(0, lambda_i))

    ``lambda`` is 0 in a group whose lengths are all equal. ``length`` is any
    per-rollout length measure (think tokens, or the realized ratio: the same
    within a group of one question). float32 [N]; masked-out rows get 0.
    """
    fn = "length_penalty_reward"
    _checks.check_value(fn, "coef", coef, coef >= 0, "must be >= 0")
    num_groups = _checks.check_positive_int(fn, "num_groups", num_groups)
    x = _check_inputs(fn, correct=correct, length=length)
    groups = _checks.check_integer(fn, "group_ids",
                                   _checks.check_shape(fn, "group_ids", group_ids,
                                                       x["length"].shape))
    mask = _checks.as_bool(_checks.mask_or_ones(fn, "sample_mask", sample_mask,
                                                x["length"].shape))
    inf = jnp.float32(jnp.inf)
    low = jax.ops.segment_min(jnp.where(mask, x["length"], inf), groups, num_groups)
    high = jax.ops.segment_max(jnp.where(mask, x["length"], -inf), groups, num_groups)
    span = (high - low)[groups]
    lam = jnp.where(span > 0, 0.5 - _checks.safe_divide(x["length"] - low[groups], span), 0.0)
    hit = x["correct"]
    reward = hit.astype(jnp.float32) + coef * jnp.where(hit, lam, jnp.minimum(lam, 0.0))
    return jnp.where(mask, reward, 0.0).astype(jnp.float32)


def reward_of_kind(tiers: Array, inputs: RewardInputs, group_ids: Array, *, num_groups: int,
                   sample_mask: Array | None = None, config: RewardConfig = RewardConfig(),
                   lagrange_multiplier: Array | float = 0.0) -> Array:
    """The reward ``config.kind`` names, float32 [N] (``objective.compute_advantages``).

    'hierarchical' is ``tiered_reward`` (its bounded global term only when
    ``global_mode='reward'``); the LCPO kinds read ``inputs.target`` as the target
    ratio; 'length-penalty' uses the realized ratio as the length.
    """
    c = config
    if c.kind == "hierarchical":
        lam = lagrange_multiplier if c.global_mode == "reward" else 0.0
        return tiered_reward(tiers, inputs.level, inputs.ratio, inputs.target, config=c,
                             lagrange_multiplier=lam)
    if c.kind in ("lcpo-exact", "lcpo-max"):
        return lcpo_reward(inputs.correct, inputs.ratio, inputs.target, inputs.has_target,
                           exact=c.kind == "lcpo-exact", alpha=c.lcpo_alpha, delta=c.lcpo_delta)
    return length_penalty_reward(inputs.correct, inputs.ratio, group_ids,
                                 num_groups=num_groups, sample_mask=sample_mask,
                                 coef=c.length_coef)

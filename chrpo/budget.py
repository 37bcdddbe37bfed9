"""Compression budgets: realized ratio, per-sample compliance, global constraint.

CHRPO constrains how long a rollout thinks, relative to the question's
reference (full chain-of-thought) length:

    r(y) = L(y) / ref_len(x)                       realized ratio
    r(y) <= k(y) + tol                             per-sample budget (emitted level k)
    mean_y r(y) <= B                               global budget (optional)

The global constraint is handled with a Lagrange multiplier lambda >= 0 that
enters the reward as ``-lambda * r`` (see ``rewards.global_budget_penalty``)
and follows projected dual ascent after each step:

    lambda <- max(0, lambda + eta * (mean r - B))

The paper's update above is an integral controller; it lags (lambda grows only
after the constraint has been violated for a while) and, used one-sided, it can
only shrink the ratio. ``update_pid_lagrange`` is this project's controller for
a budget that must bind (docs/chrpo.md, "A budget that binds"): the PID
Lagrangian of Stooke, Achiam & Abbeel 2020 ("Responsive Safety in RL by PID
Lagrangian Methods", Algorithm 2), on the violation ``d = mean r - B``,

    I      <- clip(I + d, I_min, I_max)          integral, anti-windup
    lambda  = Kp * d + Ki * I + Kd * (d - d_prev)

projected to ``lambda >= 0`` (``I_min = 0``) for an upper bound, or left signed
for a two-sided target (``mean r = B``: a negative lambda pays for longer
thinking when the policy is under budget). ``Kp = Kd = 0`` recovers projected
dual ascent with ``eta = Ki``.

``allocate_levels`` turns per-question accuracy estimates at every level into
one level per question that maximises mean accuracy at a mean cost of B (the
Lagrangian relaxation of that knapsack, solved by bisection on its
multiplier); the RL stage's warm start and targets come from it.

All functions are pure and jit-able; ``LagrangeState`` and ``PIDLagrangeState``
are pytrees (NamedTuples) so they can live in the training state and be
checkpointed.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from chrpo import _checks

Array = jnp.ndarray

__all__ = ["realized_ratio", "within_budget", "budget_mask", "LagrangeState",
           "init_lagrange", "constraint_violation", "update_lagrange", "PIDLagrangeState",
           "init_pid_lagrange", "update_pid_lagrange", "allocate_levels", "choose_levels"]


def realized_ratio(think_len: Array, ref_len: Array, *,
                   fill_value: float = 0.0) -> Array:
    """Realized compression ratio ``r = think_len / ref_len``, shape [N].

    Args:
      think_len: [N] think-token counts of the rollouts (int or float).
      ref_len: [N] think-token count of the question's correct full CoT.
        Entries ``<= 0`` mean "no reference" (a question without a target).
      fill_value: the ratio reported where ``ref_len <= 0``. Such rows carry
        ``has_target=False`` downstream, so the value is never used by the
        reward; it only has to be finite.

    Returns:
      float32 [N]; finite everywhere, gradients included.
    """
    fn = "realized_ratio"
    think_len = _checks.check_rank(fn, "think_len", think_len, 1)
    ref_len = _checks.check_shape(fn, "ref_len", ref_len, think_len.shape)
    think_len = _checks.as_float(think_len)
    ref_len = _checks.as_float(ref_len)
    ratio = _checks.safe_divide(think_len, ref_len)
    return jnp.where(ref_len > 0, ratio, jnp.full_like(ratio, fill_value))


def within_budget(ratio: Array, level: Array, *, tol: float = 0.1) -> Array:
    """Per-sample budget compliance ``r <= k + tol`` (bool, same shape).

    Args:
      ratio: realized ratios r.
      level: emitted compression level k as a fraction (0.2 for <COMP_20>).
      tol: tolerance, ``tol >= 0`` (docs/method.md default 0.1).
    """
    _checks.check_value("within_budget", "tol", tol, tol >= 0, "must be >= 0")
    ratio = _checks.as_float(ratio)
    level = _checks.check_shape("within_budget", "level", level, ratio.shape)
    return ratio <= _checks.as_float(level) + tol


def budget_mask(valid: Array, has_target: Array,
                sample_mask: Array | None = None) -> Array:
    """Rollouts whose realized ratio is defined and counts: valid & has_target.

    Use the same mask for the ``mean r`` of the global constraint and for
    logging the mean realized ratio. Shape [N], bool.
    """
    valid = _checks.as_bool(_checks.check_rank("budget_mask", "valid", valid, 1))
    has_target = _checks.as_bool(
        _checks.check_shape("budget_mask", "has_target", has_target, valid.shape))
    sample_mask = _checks.mask_or_ones("budget_mask", "sample_mask", sample_mask,
                                       valid.shape)
    return valid & has_target & sample_mask


class LagrangeState(NamedTuple):
    """Dual variable of the global budget constraint (part of the train state)."""
    multiplier: Array  # float32 scalar, always >= 0


def init_lagrange(multiplier: float = 0.0) -> LagrangeState:
    """A fresh ``LagrangeState``; ``multiplier >= 0``."""
    _checks.check_value("init_lagrange", "multiplier", multiplier,
                        multiplier >= 0, "must be >= 0")
    return LagrangeState(multiplier=jnp.asarray(multiplier, jnp.float32))


def constraint_violation(ratio: Array, mask: Array | None = None, *,
                         budget: float) -> Array:
    """``mean_{mask} r - B``: positive when the global budget is exceeded.

    With an empty mask the mean is undefined; the violation is then 0, so a
    dual step leaves lambda unchanged.
    """
    fn = "constraint_violation"
    _checks.check_value(fn, "budget", budget, budget >= 0, "must be >= 0")
    ratio = _checks.as_float(_checks.check_rank(fn, "ratio", ratio, 1))
    mask = _checks.mask_or_ones(fn, "mask", mask, ratio.shape)
    count = jnp.sum(mask)
    return jnp.where(count > 0, _checks.masked_mean(ratio, mask) - budget, 0.0)


def update_lagrange(state: LagrangeState, ratio: Array,
                    mask: Array | None = None, *, budget: float,
                    step_size: float) -> LagrangeState:
    """Projected dual ascent: ``lambda <- max(0, lambda + eta * (mean r - B))``.

    Args:
      state: current ``LagrangeState``.
      ratio: [N] realized ratios of the rollout batch.
      mask: [N] which rollouts count (see ``budget_mask``); None = all.
      budget: B, the target mean realized ratio, ``B >= 0``.
      step_size: eta, ``eta > 0``.

    Returns:
      The new state (the input is not modified).

    Example:
      >>> import jax.numpy as jnp, chrpo
      >>> state = chrpo.init_lagrange(0.5)
      >>> state = chrpo.update_lagrange(state, jnp.array([0.2, 0.6]), budget=0.3,
      ...                               step_size=2.0)   # 0.5 + 2 * (0.4 - 0.3)
      >>> round(float(state.multiplier), 4)
      0.7
    """
    fn = "update_lagrange"
    _checks.check_value(fn, "step_size", step_size, step_size > 0, "must be > 0")
    multiplier = _checks.check_rank(fn, "state.multiplier", state.multiplier, 0)
    violation = constraint_violation(ratio, mask, budget=budget)
    new = jnp.maximum(0.0, _checks.as_float(multiplier) + step_size * violation)
    return LagrangeState(multiplier=new)


class PIDLagrangeState(NamedTuple):
    """State of the PID Lagrange multiplier (``update_pid_lagrange``); float32 scalars."""
    multiplier: Array   # lambda: >= 0 one-sided, any sign two-sided
    integral: Array     # I, the clipped running sum of violations
    previous: Array     # d of the last update (the derivative term's reference)


def init_pid_lagrange(multiplier: float = 0.0) -> PIDLagrangeState:
    """A fresh ``PIDLagrangeState``: lambda = ``multiplier``, I = 0, d_prev = 0."""
    _checks.check_value("init_pid_lagrange", "multiplier", multiplier,
                        math.isfinite(multiplier), "must be finite")
    zero = jnp.zeros((), jnp.float32)
    return PIDLagrangeState(multiplier=jnp.asarray(multiplier, jnp.float32), integral=zero,
                            previous=zero)


def update_pid_lagrange(state: PIDLagrangeState, ratio: Array, mask: Array | None = None, *,
                        budget: float, kp: float, ki: float, kd: float = 0.0,
                        two_sided: bool = False,
                        integral_limit: float = float("inf")) -> PIDLagrangeState:
    """One PID step on ``d = mean_{mask} r - B`` (module docstring).

    Args:
      state: current ``PIDLagrangeState``.
      ratio: [N] realized ratios of the rollout batch.
      mask: [N] which rollouts count (``budget_mask``); None = all. With an empty
        mask d is 0: the integral and d_prev stay, lambda is recomputed.
      budget: B, the target mean ratio, ``B >= 0``.
      kp, ki, kd: the gains, each ``>= 0``.
      two_sided: False: ``mean r <= B`` (lambda and I projected to ``>= 0``);
        True: ``mean r = B`` (both signed, I within +-integral_limit).
      integral_limit: anti-windup bound on |I|, ``> 0``.

    Example:
      >>> import jax.numpy as jnp, chrpo
      >>> s = chrpo.init_pid_lagrange()
      >>> s = chrpo.update_pid_lagrange(s, jnp.array([0.2, 0.6]), budget=0.3,
      ...                               kp=1.0, ki=0.5)   # d = 0.1: 1 * 0.1 + 0.5 * 0.1
      >>> round(float(s.multiplier), 4), round(float(s.integral), 4)
      (0.15, 0.1)
    """
    fn = "update_pid_lagrange"
    for name, gain in (("kp", kp), ("ki", ki), ("kd", kd)):
        _checks.check_value(fn, name, gain, math.isfinite(gain) and gain >= 0,
                            "must be finite and >= 0")
    _checks.check_value(fn, "integral_limit", integral_limit, integral_limit > 0,
                        "must be > 0")
    for name in PIDLagrangeState._fields:
        _checks.check_rank(fn, f"state.{name}", getattr(state, name), 0)
    ratio = _checks.as_float(_checks.check_rank(fn, "ratio", ratio, 1))
    mask = _checks.mask_or_ones(fn, "mask", mask, ratio.shape)
    has_rows = jnp.sum(mask) > 0
    d = constraint_violation(ratio, mask, budget=budget)
    low = -integral_limit if two_sided else 0.0
    integral = jnp.clip(_checks.as_float(state.integral) + d, low, integral_limit)
    previous = jnp.where(has_rows, d, _checks.as_float(state.previous))
    derivative = jnp.where(has_rows, d - _checks.as_float(state.previous), 0.0)
    if not two_sided:   # Stooke et al.: only a rising cost raises lambda
        derivative = jnp.maximum(derivative, 0.0)
    lam = kp * d + ki * integral + kd * derivative
    if not two_sided:
        lam = jnp.maximum(lam, 0.0)
    return PIDLagrangeState(multiplier=lam.astype(jnp.float32),
                            integral=integral.astype(jnp.float32),
                            previous=previous.astype(jnp.float32))


def _choices(acc: Array, cost: Array, mu: Array) -> Array:
    """argmax_k acc - mu * cost per row; ties go to the first column (the cheapest level
    when columns ascend), by a 1e-6 * cost tie-break that every |mu| > 1e-6 outweighs."""
    return jnp.argmax(acc - (mu + 1e-6) * cost, axis=1)


def choose_levels(utility: Array, cost: Array, multiplier: Array | float) -> Array:
    """``c_q = argmax_k utility[q, k] - mu * cost[q, k]``, int32 [Q]: the per-question rule
    of ``allocate_levels`` at a given multiplier mu (e.g. one that ``allocate_levels``
    found on other questions), so each question's level needs no other question.

    Ties go to the cheaper (earlier) column. With ``utility`` a policy's log-probabilities
    of the levels, this decodes the policy under a budget: mu prices a unit of ratio
    in nats (``experiments/extra_cot/evaluate.py``, method 'chrpo-budget').

    Example:
      >>> import jax.numpy as jnp, chrpo
      >>> logp = jnp.log(jnp.array([[0.6, 0.4], [0.3, 0.7]]))
      >>> cost = jnp.array([[0.2, 0.6], [0.2, 0.6]])
      >>> chrpo.choose_levels(logp, cost, 1.0).tolist()   # only the second prefers it enough
      [0, 1]
    """
    fn = "choose_levels"
    utility = _checks.as_float(_checks.check_rank(fn, "utility", utility, 2))
    cost = _checks.as_float(_checks.check_shape(fn, "cost", cost, utility.shape))
    mu = _checks.as_float(_checks.check_rank(fn, "multiplier", multiplier, 0))
    return _choices(utility, cost, mu).astype(jnp.int32)


def allocate_levels(acc: Array, cost: Array, budget: float, *, mask: Array | None = None,
                    two_sided: bool = False, max_multiplier: float = 1e3,
                    iterations: int = 64) -> tuple[Array, Array, Array]:
    """One level per question: the most accurate allocation at a mean cost of ``budget``.

    Solves ``max sum_q acc[q, c_q]  s.t.  mean_q cost[q, c_q] <= B`` (``= B`` when
    ``two_sided``) by its Lagrangian: for a multiplier mu every question takes
    ``argmax_k acc[q, k] - mu * cost[q, k]``; the mean cost falls as mu rises, and
    bisection finds the smallest mu whose allocation fits. The allocations at the
    two ends of the final bracket differ on a few questions; the first of those (in
    row order) move to the dearer choice while the mean still fits, so the budget
    is met to within one question's cost step, not one multiplier jump. One-sided,
    mu >= 0: a budget above the most accurate allocation's cost leaves it as it is.
    Two-sided, mu < 0 is allowed: extra budget buys the longest levels where
    accuracy rises most, then (where nothing rises) in row order.

    Args:
      acc: [Q, K] estimated accuracy of question q at level k; columns in
        ascending cost order (levels 20, 40, ..., 100).
      cost: [Q, K] cost of that choice (its realized ratio), finite.
      budget: B, the target mean cost, ``B >= 0``.
      mask: [Q] questions that take part (others get choice 0 and do not count).
      two_sided: see above.
      max_multiplier: |mu| searched in [-max, max] (two-sided) or [0, max].
      iterations: bisection steps (static).

    Returns:
      ``(choice [Q] int32 column index, mu float32, mean_cost float32)``.

    Example:
      >>> import jax.numpy as jnp, chrpo
      >>> acc = jnp.array([[1.0, 1.0], [0.0, 1.0]])    # an easy and a hard question
      >>> cost = jnp.array([[0.2, 0.6], [0.2, 0.6]])
      >>> choice, mu, mean = chrpo.allocate_levels(acc, cost, 0.4)
      >>> choice.tolist(), round(float(mean), 4)       # the hard one gets the long level
      ([0, 1], 0.4)
    """
    fn = "allocate_levels"
    _checks.check_value(fn, "budget", budget, budget >= 0, "must be >= 0")
    _checks.check_value(fn, "max_multiplier", max_multiplier, max_multiplier > 0, "must be > 0")
    iterations = _checks.check_positive_int(fn, "iterations", iterations)
    acc = _checks.as_float(_checks.check_rank(fn, "acc", acc, 2))
    cost = _checks.as_float(_checks.check_shape(fn, "cost", cost, acc.shape))
    mask = _checks.as_bool(_checks.mask_or_ones(fn, "mask", mask, acc.shape[:1]))
    count = jnp.maximum(jnp.sum(mask), 1)
    rows = jnp.arange(acc.shape[0])

    def mean_cost(choice):
        return jnp.sum(jnp.where(mask, cost[rows, choice], 0.0)) / count

    def fits(mu):     # 1e-6: a mean of equal float32 costs can round above the budget
        return mean_cost(_choices(acc, cost, mu)) <= budget + 1e-6

    def step(_, bracket):
        lo, hi = bracket      # invariant: fits(hi); not fits(lo) unless lo is the bottom
        mid = 0.5 * (lo + hi)
        ok = fits(mid)
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    bottom = jnp.float32(-max_multiplier if two_sided else 0.0)
    top = jnp.float32(max_multiplier)
    lo, hi = jax.lax.fori_loop(0, iterations, step, (bottom, top))
    hi = jnp.where(fits(bottom), bottom, hi)     # the bottom already fits: no constraint
    lo = jnp.where(fits(bottom), bottom, lo)
    # the bracket's ends, widened a little: compiled and eager float rounding can disagree
    # on which side of a jump a multiplier lies
    margin = 1e-4 * jnp.maximum(1.0, jnp.abs(hi))
    cheap = _choices(acc, cost, jnp.where(fits(bottom), bottom, hi + margin))
    dear = _choices(acc, cost, jnp.where(fits(bottom), bottom, lo - margin))
    extra = jnp.where(mask, cost[rows, dear] - cost[rows, cheap], 0.0)
    spend = jnp.cumsum(extra) / count
    take = mask & (cheap != dear) & (mean_cost(cheap) + spend <= budget + 1e-6)
    choice = jnp.where(take, dear, cheap)
    choice = jnp.where(mask, choice, 0).astype(jnp.int32)
    return choice, hi, mean_cost(choice).astype(jnp.float32)

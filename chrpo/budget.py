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

All functions are pure and jit-able; ``LagrangeState`` is a pytree (a
NamedTuple) so it can live in the training state and be checkpointed.
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from chrpo import _checks

Array = jnp.ndarray

__all__ = ["realized_ratio", "within_budget", "budget_mask", "LagrangeState",
           "init_lagrange", "constraint_violation", "update_lagrange"]


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


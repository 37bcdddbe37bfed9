"""The CHRPO objective: reward -> group advantages -> clipped policy loss.

An RL step computes rewards and advantages once per rollout batch
(``compute_advantages``, over whole prompt groups) and then runs several
optimisation passes over mini-batches (``policy_loss``). ``chrpo_objective``
composes both for the single-pass case:

    tiers  = reward_tiers(valid, correct, k, r, has_target)
    R      = tiered_reward(tiers, k, r, t; lambda)
    A      = group_advantages(R, group_ids [, subgroup_ids])
    loss   = policy_loss(logp, logp_old, A, mask [, logp_ref, H])   as (sum, den)

Everything is configured by one hashable ``ChrpoConfig`` (jit-static).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from chrpo import _checks
from chrpo.advantages import group_advantages
from chrpo.budget import budget_mask
from chrpo.losses import policy_loss
from chrpo.registry import ChrpoConfig
from chrpo.rewards import TIER_NAMES, RewardInputs, reward_of_kind, reward_tiers

Array = jnp.ndarray

__all__ = ["compute_advantages", "constrained_advantages", "chrpo_objective"]


def compute_advantages(inputs: RewardInputs, group_ids: Array, *, num_groups: int,
                       subgroup_ids: Array | None = None,
                       num_subgroups: int | None = None,
                       sample_mask: Array | None = None,
                       lagrange_multiplier: Array | float = 0.0,
                       config: ChrpoConfig = ChrpoConfig()
                       ) -> tuple[Array, dict[str, Array]]:
    """Hierarchical rewards and group-relative advantages of N rollouts.

    Args:
      inputs: ``RewardInputs`` of [N] arrays.
      group_ids: int [N] prompt-group id of each rollout, in [0, num_groups).
      num_groups: static number of groups.
      subgroup_ids, num_subgroups: level subgroups ('hierarchical' only).
      sample_mask: bool [N], False for padding rollouts (advantage 0).
      lagrange_multiplier: scalar lambda of the global budget: in the reward
        (``global_mode='reward'``) or in ``constrained_advantages`` ('advantage').
      config: ``ChrpoConfig`` (reward and advantage parts are used; the reward
        is ``rewards.reward_of_kind``).

    Returns:
      ``(advantages [N] float32, metrics)`` with scalar metrics: reward_mean,
      advantage_mean, advantage_abs_mean, ratio_mean (over ``budget_mask``),
      zero_variance_fraction, zero_variance_groups and ``tier/<name>`` counts.

    Example:
      >>> import jax.numpy as jnp, chrpo
      >>> inputs = chrpo.RewardInputs(
      ...     valid=jnp.array([True, True]), correct=jnp.array([True, False]),
      ...     level=jnp.full(2, 0.4), ratio=jnp.full(2, 0.3), target=jnp.full(2, 0.4),
      ...     has_target=jnp.ones(2, bool))   # rewards [1.5, 0]
      >>> adv, metrics = chrpo.compute_advantages(
      ...     inputs, jnp.array([0, 0]), num_groups=1,
      ...     config=chrpo.get_preset("drgrpo", max_len=8))
      >>> adv.tolist(), float(metrics["reward_mean"])
      ([0.75, -0.75], 0.75)
    """
    tiers = reward_tiers(inputs.valid, inputs.correct, inputs.level, inputs.ratio,
                         inputs.has_target, tol=config.reward.tol)
    n = tiers.shape
    sample_mask = _checks.mask_or_ones("compute_advantages", "sample_mask",
                                       sample_mask, n)
    rewards = reward_of_kind(tiers, inputs, group_ids, num_groups=num_groups,
                             sample_mask=sample_mask, config=config.reward,
                             lagrange_multiplier=lagrange_multiplier)
    result = group_advantages(rewards, group_ids, sample_mask, num_groups=num_groups,
                              subgroup_ids=subgroup_ids, num_subgroups=num_subgroups,
                              **dataclasses.asdict(config.advantage))
    adv = result.advantages
    if config.reward.global_mode == "advantage":
        adv = constrained_advantages(adv, inputs, group_ids, num_groups=num_groups,
                                     sample_mask=sample_mask,
                                     lagrange_multiplier=lagrange_multiplier)
    metrics = {
        "reward_mean": _checks.masked_mean(rewards, sample_mask),
        "advantage_mean": _checks.masked_mean(adv, sample_mask),
        "advantage_abs_mean": _checks.masked_mean(jnp.abs(adv), sample_mask),
        "ratio_mean": _checks.masked_mean(
            inputs.ratio, budget_mask(inputs.valid, inputs.has_target, sample_mask)),
        "zero_variance_fraction": result.zero_variance_fraction,
        "zero_variance_groups": result.zero_variance_count,
    }
    for tier, name in enumerate(TIER_NAMES):
        metrics[f"tier/{name}"] = jnp.sum((tiers == tier) & sample_mask).astype(jnp.int32)
    return adv, metrics


def constrained_advantages(advantages: Array, inputs: RewardInputs, group_ids: Array, *,
                           num_groups: int, sample_mask: Array | None = None,
                           lagrange_multiplier: Array | float = 0.0) -> Array:
    """The Lagrangian advantage ``(A_R - lambda * A_c) / (1 + |lambda|)``, float32 [N].

    ``A_c`` is the cost advantage: each rollout's realized ratio normalised in its
    prompt group (GRPO's (r - mean) / (std + eps)), over the rollouts whose ratio
    counts (``budget_mask``; 0 elsewhere), so it is on the reward advantage's scale
    and lambda = 1 weighs cost and reward alike. The reward advantage ``A_R`` keeps
    its tiers; the cost term is not capped, so a large enough lambda outweighs
    them and the constraint binds. The form is PPO-Lagrangian's (Ray, Achiam & Amodei 2019, "Benchmarking Safe
    Exploration in Deep RL"), whose 1 / (1 + lambda) keeps the advantage's scale;
    a negative lambda (two-sided budget, ``update_pid_lagrange``) favours longer
    rollouts. This project's choice (docs/chrpo.md, "A budget that binds").
    """
    fn = "constrained_advantages"
    adv = _checks.as_float(_checks.check_rank(fn, "advantages", advantages, 1))
    lam = _checks.as_float(_checks.check_rank(fn, "lagrange_multiplier",
                                              lagrange_multiplier, 0))
    counted = budget_mask(inputs.valid, inputs.has_target, sample_mask)
    cost = group_advantages(_checks.as_float(inputs.ratio), group_ids, counted,
                            num_groups=num_groups, estimator="grpo").advantages
    cost = jnp.where(counted, cost, 0.0)
    return ((adv - lam * cost) / (1.0 + jnp.abs(lam))).astype(jnp.float32)


def chrpo_objective(logp: Array, old_logp: Array, token_mask: Array,
                    inputs: RewardInputs, group_ids: Array, *, num_groups: int,
                    ref_logp: Array | None = None, entropy: Array | None = None,
                    control_mask: Array | None = None,
                    subgroup_ids: Array | None = None,
                    num_subgroups: int | None = None,
                    sample_mask: Array | None = None,
                    lagrange_multiplier: Array | float = 0.0,
                    config: ChrpoConfig = ChrpoConfig()
                    ) -> tuple[Array, dict[str, Any]]:
    """The full CHRPO loss of one rollout batch, for ``jax.value_and_grad(has_aux=True)``.

    Args:
      logp, old_logp, ref_logp, entropy, control_mask: [B, T] per-token arrays
        (see ``policy_loss``); B = N rollouts.
      token_mask: [B, T] response-token mask; rows with sample_mask False are
        dropped from the loss.
      inputs, group_ids, num_groups, subgroup_ids, num_subgroups, sample_mask,
      lagrange_multiplier: see ``compute_advantages``.
      config: ``ChrpoConfig``.

    Returns:
      ``(loss, metrics)``: loss = loss_sum / loss_denominator (0 when nothing
      is unmasked); metrics merge those of ``compute_advantages`` and
      ``policy_loss`` and include ``loss_sum`` and ``loss_denominator``.
    """
    advantages, metrics = compute_advantages(
        inputs, group_ids, num_groups=num_groups, subgroup_ids=subgroup_ids,
        num_subgroups=num_subgroups, sample_mask=sample_mask,
        lagrange_multiplier=lagrange_multiplier, config=config)
    token_mask = _checks.as_bool(_checks.check_rank("chrpo_objective", "token_mask",
                                                    token_mask, 2))
    if sample_mask is not None:
        token_mask = token_mask & _checks.as_bool(sample_mask)[:, None]
    out = policy_loss(logp, old_logp, advantages, token_mask, ref_logp=ref_logp,
                      entropy=entropy, control_mask=control_mask,
                      **dataclasses.asdict(config.loss))
    metrics.update(out.metrics)
    metrics["loss_sum"] = out.loss_sum
    metrics["loss_denominator"] = out.denominator
    return _checks.safe_divide(out.loss_sum, out.denominator), metrics

"""chrpo: CHRPO rewards, budgets, advantages and losses as pure JAX functions.

Depends on jax and chex only; importable and testable without any model:

    import chrpo
    r = chrpo.hierarchical_reward(valid, correct, level, ratio, target, has_target)
    adv = chrpo.group_advantages(r, group_ids, num_groups=G, estimator="grpo")
    out = chrpo.policy_loss(logp, old_logp, adv.advantages, mask, **kw)

See docs/chrpo.md for every equation and its source.
"""
from chrpo.advantages import (ESTIMATORS, AdvantageConfig, AdvantageResult,
                              drgrpo_advantages, group_advantages, grpo_advantages,
                              grpo_batch_advantages,
                              hierarchical_advantages, nested_ids, rloo_advantages)
from chrpo.budget import (LagrangeState, PIDLagrangeState, allocate_levels, budget_mask,
                          choose_levels, constraint_violation, init_lagrange, init_pid_lagrange,
                          realized_ratio, update_lagrange, update_pid_lagrange,
                          within_budget)
from chrpo.losses import (AGGREGATIONS, IMPORTANCE_LEVELS, KL_ESTIMATORS, LossConfig,
                          PolicyLossOutput, aggregate, clip_fractions, clipped_surrogate,
                          importance_ratio,
                          entropy_from_logits, first_token_mask, kl_divergence,
                          kl_k1, kl_k2, kl_k3, policy_loss, seq_mean_token_mean,
                          seq_mean_token_sum_norm, token_mean)
from chrpo.objective import chrpo_objective, compute_advantages, constrained_advantages
from chrpo.registry import (PRESETS, ChrpoConfig, available, get_advantage_estimator,
                            get_aggregation, get_kl_estimator, get_preset)
from chrpo.rewards import (BONUS_SHAPES, GLOBAL_MODES, REWARD_KINDS, TIER_CORRECT, TIER_INVALID,
                           TIER_NAMES, TIER_OVER_BUDGET, TIER_WITHIN_BUDGET, TIER_WRONG,
                           RewardConfig, RewardInputs, calibration_bonus,
                           global_budget_penalty, hierarchical_reward, lcpo_reward,
                           length_penalty_reward, over_budget_penalty, ratio_bonus,
                           reward_of_kind, reward_tiers, tier_bounds, tiered_reward)

__all__ = [
    # rewards
    "TIER_INVALID", "TIER_WRONG", "TIER_OVER_BUDGET", "TIER_CORRECT",
    "TIER_WITHIN_BUDGET", "TIER_NAMES", "RewardConfig", "RewardInputs", "tier_bounds",
    "reward_tiers", "over_budget_penalty", "calibration_bonus", "ratio_bonus",
    "global_budget_penalty", "tiered_reward", "hierarchical_reward", "REWARD_KINDS",
    "BONUS_SHAPES",
    "GLOBAL_MODES", "lcpo_reward", "length_penalty_reward", "reward_of_kind",
    # budget
    "realized_ratio", "within_budget", "budget_mask", "LagrangeState", "init_lagrange",
    "constraint_violation", "update_lagrange", "PIDLagrangeState", "init_pid_lagrange",
    "update_pid_lagrange", "allocate_levels", "choose_levels",
    # advantages
    "AdvantageConfig", "AdvantageResult", "ESTIMATORS", "nested_ids",
    "grpo_advantages", "grpo_batch_advantages", "drgrpo_advantages", "rloo_advantages",
    "hierarchical_advantages", "group_advantages",
    # losses
    "LossConfig", "PolicyLossOutput", "KL_ESTIMATORS", "AGGREGATIONS", "IMPORTANCE_LEVELS",
    "importance_ratio", "clipped_surrogate", "clip_fractions", "kl_k1", "kl_k2", "kl_k3", "kl_divergence",
    "entropy_from_logits", "first_token_mask", "token_mean", "seq_mean_token_mean",
    "seq_mean_token_sum_norm", "aggregate", "policy_loss",
    # objective and registry
    "compute_advantages", "constrained_advantages", "chrpo_objective", "ChrpoConfig",
    "PRESETS", "get_preset",
    "get_advantage_estimator", "get_kl_estimator", "get_aggregation", "available",
]

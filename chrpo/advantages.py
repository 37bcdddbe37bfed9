"""Group-relative advantage estimators over segment ids.

Rollouts are grouped by an integer id per rollout (``group_ids``, [N], values
in ``[0, num_groups)``), never by reshaping: groups may have any size and lie
anywhere in the batch. ``num_groups`` is static. For a group g with masked
rewards {R_j : j in g} (n_g members, mean mu_g, standard deviation sigma_g):

    grpo          A_i = (R_i - mu_g) / (sigma_g + eps)        Shao et al. 2024
    grpo-batch    A_i = (R_i - mu_g) / (sigma_batch + eps)    TRL scale_rewards="batch"
    drgrpo        A_i =  R_i - mu_g                          Liu et al. 2025
    rloo          A_i =  R_i - (sum_{j != i} R_j) / (n_g - 1)  Ahmadian et al. 2024
                      = n_g / (n_g - 1) * (R_i - mu_g)
    hierarchical  A_i = W_i + between_coef * B_{s(i)}          this project

Hierarchical: each prompt group g is split into subgroups s (rollouts forced to
one level, or the policy-mode rollouts), identified by globally unique
``subgroup_ids`` (``nested_ids`` builds them). With mu_s, sigma_s the subgroup
statistics and S_g the non-empty subgroups of g,

    W_i = (R_i - mu_s) / (sigma_s + eps)                       within subgroup
    B_s = (mu_s - m_g) / (d_g + eps),  m_g = mean_{s' in S_g} mu_s',
          d_g = std_{s' in S_g} mu_s'                          between subgroups

(each subgroup counts once in m_g and d_g, whatever its size). W teaches which
rollouts are better at a given level; B teaches which level suffices.

Conventions, shared by all estimators:
  * sigma uses ``ddof`` (0: population std, the default; 1: sample std).
  * Zero-variance groups (all masked rewards equal up to a relative
    ``TIE_RTOL`` = 1e-5; a single-sample group is one) get advantage exactly 0
    and are reported in ``AdvantageResult.zero_variance``. The same rule
    applies to subgroups (W=0) and to the subgroup means of a group (B=0); the
    tolerance keeps float32 rounding of means (two subgroups holding the same
    rewards in another order) from turning into a signal.
  * Masked-out rollouts, and ids outside ``[0, num_groups)``, get advantage 0
    and do not enter any statistic. Values and gradients are always finite.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from chrpo import _checks

Array = jnp.ndarray

__all__ = ["AdvantageConfig", "AdvantageResult", "ESTIMATORS", "nested_ids",
           "grpo_advantages", "grpo_batch_advantages", "drgrpo_advantages",
           "rloo_advantages",
           "hierarchical_advantages", "group_advantages"]


class AdvantageResult(NamedTuple):
    """Advantages and the group bookkeeping needed for diagnostics.

    advantages: float32 [N]. zero_variance: bool [num_groups], True for
    non-empty groups whose rewards are all equal. nonempty: bool [num_groups].
    """
    advantages: Array
    zero_variance: Array
    nonempty: Array

    @property
    def zero_variance_count(self) -> Array:
        return jnp.sum(self.zero_variance).astype(jnp.int32)

    @property
    def zero_variance_fraction(self) -> Array:
        """Zero-variance groups / non-empty groups (0 when there are none)."""
        return _checks.safe_divide(jnp.sum(self.zero_variance, dtype=jnp.float32),
                                   jnp.sum(self.nonempty, dtype=jnp.float32))


TIE_RTOL = 1e-5  # relative spread below which a segment counts as constant


class _Stats(NamedTuple):
    count: Array      # [S] float32
    mean: Array       # [S]
    std: Array        # [S], 0 for constant segments
    constant: Array   # [S] bool, non-empty and all values equal (up to TIE_RTOL)


def nested_ids(group_ids: Array, local_ids: Array, *, num_local: int) -> Array:
    """Globally unique subgroup ids ``group_id * num_local + local_id``.

    ``local_ids`` in ``[0, num_local)`` index the subgroup inside its group
    (e.g. the level index 0..4, and 5 for policy-mode rollouts).
    """
    fn = "nested_ids"
    num_local = _checks.check_positive_int(fn, "num_local", num_local)
    group_ids = _checks.check_integer(fn, "group_ids",
                                      _checks.check_rank(fn, "group_ids", group_ids, 1))
    local_ids = _checks.check_integer(
        fn, "local_ids", _checks.check_shape(fn, "local_ids", local_ids, group_ids.shape))
    return group_ids * num_local + local_ids


def _segment_stats(values: Array, ids: Array, mask: Array, num_segments: int,
                   ddof: int) -> _Stats:
    """Masked per-segment count, mean, std and constancy (ids already in range)."""
    zeros = jnp.zeros_like(values)
    count = jax.ops.segment_sum(mask.astype(values.dtype), ids, num_segments)
    total = jax.ops.segment_sum(jnp.where(mask, values, zeros), ids, num_segments)
    mean = _checks.safe_divide(total, count)
    centered = jnp.where(mask, values - mean[ids], zeros)
    sq = jax.ops.segment_sum(centered * centered, ids, num_segments)
    var = _checks.safe_divide(sq, count - ddof)
    high = jax.ops.segment_max(jnp.where(mask, values, -jnp.inf), ids, num_segments)
    low = jax.ops.segment_min(jnp.where(mask, values, jnp.inf), ids, num_segments)
    scale = jnp.maximum(jnp.abs(high), jnp.abs(low))
    constant = (count > 0) & (high - low <= TIE_RTOL * scale)
    positive = (var > 0) & ~constant
    std = jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)
    return _Stats(count, mean, std, constant)


def _prepare(fn: str, rewards: Array, ids: Array, mask: Array | None,
             num: int, ids_name: str) -> tuple[Array, Array, Array, int]:
    """Checks shapes; returns float rewards, in-range ids and the effective mask."""
    num = _checks.check_positive_int(fn, f"num_{ids_name.removesuffix('_ids')}s", num)
    rewards = _checks.as_float(_checks.check_rank(fn, "rewards", rewards, 1))
    ids = _checks.check_integer(fn, ids_name,
                                _checks.check_shape(fn, ids_name, ids, rewards.shape))
    mask = _checks.mask_or_ones(fn, "mask", mask, rewards.shape)
    mask = mask & (ids >= 0) & (ids < num)
    return (jnp.where(mask, rewards, 0.0), jnp.where(mask, ids, 0), mask, num)


def _centered(rewards: Array, ids: Array, mask: Array, num: int, *, scale: bool,
              leave_one_out: bool, eps: float, ddof: int) -> AdvantageResult:
    """The one implementation behind grpo / drgrpo / rloo (inputs prepared)."""
    s = _segment_stats(rewards, ids, mask, num, ddof)
    adv = rewards - s.mean[ids]
    if leave_one_out:
        n = s.count[ids]
        adv = _checks.safe_divide(n * adv, n - 1.0)
    if scale:
        adv = adv / (s.std[ids] + eps)
    keep = mask & ~s.constant[ids]
    adv = jnp.where(keep, adv, 0.0)
    return AdvantageResult(adv, s.constant, s.count > 0)


def _check_hyper(fn: str, *, eps: float = 1e-6, ddof: int = 0) -> None:
    _checks.check_value(fn, "eps", eps, eps > 0, "must be > 0")
    _checks.check_value(fn, "ddof", ddof, ddof in (0, 1), "must be 0 or 1")


def grpo_advantages(rewards: Array, group_ids: Array, mask: Array | None = None, *,
                    num_groups: int, eps: float = 1e-6, ddof: int = 0) -> AdvantageResult:
    """GRPO: ``A_i = (R_i - mean_g R) / (std_g R + eps)`` (DeepSeekMath, Sec. 4.1.2)."""
    fn = "grpo_advantages"
    _check_hyper(fn, eps=eps, ddof=ddof)
    r, ids, m, n = _prepare(fn, rewards, group_ids, mask, num_groups, "group_ids")
    return _centered(r, ids, m, n, scale=True, leave_one_out=False, eps=eps, ddof=ddof)


def grpo_batch_advantages(rewards: Array, group_ids: Array, mask: Array | None = None, *,
                          num_groups: int, eps: float = 1e-6, ddof: int = 0) -> AdvantageResult:
    """GRPO centred per group, scaled by one std over the whole batch:
    ``A_i = (R_i - mean_g R) / (std_batch R + eps)`` (TRL's ``scale_rewards="batch"``,
    after Hu et al. 2025, REINFORCE++). Constant groups get 0; the batch std is over every
    unmasked rollout (0 when all are equal, and then every advantage is 0)."""
    fn = "grpo_batch_advantages"
    _check_hyper(fn, eps=eps, ddof=ddof)
    r, ids, m, n = _prepare(fn, rewards, group_ids, mask, num_groups, "group_ids")
    centred = _centered(r, ids, m, n, scale=False, leave_one_out=False, eps=1.0, ddof=0)
    batch = _segment_stats(r, jnp.zeros_like(ids), m, 1, ddof)
    adv = jnp.where(batch.constant[0], 0.0, centred.advantages / (batch.std[0] + eps))
    return AdvantageResult(adv.astype(jnp.float32), centred.zero_variance, centred.nonempty)


def drgrpo_advantages(rewards: Array, group_ids: Array, mask: Array | None = None, *,
                      num_groups: int) -> AdvantageResult:
    """Dr.GRPO: ``A_i = R_i - mean_g R`` (no std normalisation; Liu et al. 2025)."""
    r, ids, m, n = _prepare("drgrpo_advantages", rewards, group_ids, mask, num_groups,
                            "group_ids")
    return _centered(r, ids, m, n, scale=False, leave_one_out=False, eps=1.0, ddof=0)


def rloo_advantages(rewards: Array, group_ids: Array, mask: Array | None = None, *,
                    num_groups: int) -> AdvantageResult:
    """RLOO: ``A_i = R_i - mean_{j != i} R_j`` (Ahmadian et al. 2024); 0 if n_g = 1."""
    r, ids, m, n = _prepare("rloo_advantages", rewards, group_ids, mask, num_groups,
                            "group_ids")
    return _centered(r, ids, m, n, scale=False, leave_one_out=True, eps=1.0, ddof=0)


def hierarchical_advantages(rewards: Array, group_ids: Array, subgroup_ids: Array,
                            mask: Array | None = None, *, num_groups: int,
                            num_subgroups: int, eps: float = 1e-6, ddof: int = 0,
                            between_coef: float = 1.0) -> AdvantageResult:
    """Hierarchical: ``A_i = W_i + between_coef * B_{s(i)}`` (module docstring).

    Each subgroup id must belong to a single group (use ``nested_ids``);
    ``num_subgroups`` is static. ``zero_variance`` is reported per prompt
    group, as for the other estimators; such groups get A = 0 exactly.
    """
    fn = "hierarchical_advantages"
    _check_hyper(fn, eps=eps, ddof=ddof)
    _checks.check_value(fn, "between_coef", between_coef, between_coef >= 0,
                        "must be >= 0")
    r, gid, m, g = _prepare(fn, rewards, group_ids, mask, num_groups, "group_ids")
    _, sid, m, s = _prepare(fn, r, subgroup_ids, m, num_subgroups, "subgroup_ids")
    within = _centered(r, sid, m, s, scale=True, leave_one_out=False, eps=eps, ddof=ddof)
    sub = _segment_stats(r, sid, m, s, ddof)
    # Group of each subgroup (-1 when empty), then GRPO over the subgroup means.
    owner = jax.ops.segment_max(jnp.where(m, gid, -1), sid, s)
    sub_nonempty = sub.count > 0
    owner = jnp.where(sub_nonempty, owner, 0)
    between = _centered(sub.mean, owner, sub_nonempty, g, scale=True,
                        leave_one_out=False, eps=eps, ddof=ddof)
    group = _segment_stats(r, gid, m, g, ddof)
    adv = within.advantages + between_coef * between.advantages[sid]
    adv = jnp.where(m & ~group.constant[gid], adv, 0.0)
    return AdvantageResult(adv, group.constant, group.count > 0)


ESTIMATORS = {
    "grpo": grpo_advantages,
    "grpo-batch": grpo_batch_advantages,
    "drgrpo": drgrpo_advantages,
    "rloo": rloo_advantages,
    "hierarchical": hierarchical_advantages,
}
# Hyper-parameters each estimator takes (group_advantages passes only these).
_HYPER = {"grpo": ("eps", "ddof"), "grpo-batch": ("eps", "ddof"), "drgrpo": (),
          "rloo": (),
          "hierarchical": ("eps", "ddof", "between_coef")}


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdvantageConfig:
    """Advantage estimator chosen by name, with its hyper-parameters.

    estimator: one of ``ESTIMATORS`` ('grpo'). eps: std floor (1e-6; > 0).
    ddof: 0 or 1 (0). between_coef: weight of the between-subgroup term of
    'hierarchical' (1.0; >= 0).
    """
    estimator: str = "grpo"
    eps: float = 1e-6
    ddof: int = 0
    between_coef: float = 1.0

    def __post_init__(self):
        _checks.lookup(ESTIMATORS, self.estimator, kind="advantage estimator")
        _check_hyper("AdvantageConfig", eps=self.eps, ddof=self.ddof)
        _checks.check_value("AdvantageConfig", "between_coef", self.between_coef,
                            self.between_coef >= 0, "must be >= 0")


_DA = AdvantageConfig()


def group_advantages(rewards: Array, group_ids: Array, mask: Array | None = None, *,
                     num_groups: int, estimator: str = _DA.estimator,
                     subgroup_ids: Array | None = None,
                     num_subgroups: int | None = None, eps: float = _DA.eps,
                     ddof: int = _DA.ddof,
                     between_coef: float = _DA.between_coef) -> AdvantageResult:
    """Dispatches to the estimator named ``estimator`` (see ``ESTIMATORS``).

    Arguments an estimator does not take are ignored (eps/ddof apply to
    std-normalised estimators; between_coef, subgroup_ids and num_subgroups
    to 'hierarchical').

    Example:
      >>> import jax.numpy as jnp, chrpo
      >>> out = chrpo.group_advantages(jnp.array([1.0, 0.0, 2.0, 2.0]),
      ...                              jnp.array([0, 0, 1, 1]), num_groups=2,
      ...                              estimator="drgrpo")
      >>> out.advantages.tolist(), int(out.zero_variance_count)
      ([0.5, -0.5, 0.0, 0.0], 1)
    """
    fn = _checks.lookup(ESTIMATORS, estimator, kind="advantage estimator")
    values = {"eps": eps, "ddof": ddof, "between_coef": between_coef}
    hyper = {k: values[k] for k in _HYPER[estimator]}
    if estimator == "hierarchical":
        if subgroup_ids is None or num_subgroups is None:
            raise ValueError("group_advantages: estimator 'hierarchical' needs "
                             "`subgroup_ids` and `num_subgroups`")
        return fn(rewards, group_ids, subgroup_ids, mask, num_groups=num_groups,
                  num_subgroups=num_subgroups, **hyper)
    return fn(rewards, group_ids, mask, num_groups=num_groups, **hyper)

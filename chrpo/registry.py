"""Names -> functions, and the published algorithms as configurations.

Experiment configs choose estimators, KL estimators and aggregation modes by
string; GRPO, Dr.GRPO and DAPO are *presets* of the one CHRPO implementation
(``ChrpoConfig``), never separate code paths:

    preset   advantages    clip (low, high)  aggregation              KL
    grpo     grpo          0.2, 0.2          seq-mean-token-mean      k3, beta 0.04
    drgrpo   drgrpo        0.2, 0.2          seq-mean-token-sum-norm  none (beta 0)
    dapo     grpo          0.2, 0.28         token-mean               none (beta 0)
    chrpo    hierarchical  0.2, 0.28         token-mean               k3, beta 0.001
             + dual clip 3, control_weight 5, hierarchical reward
    lcpo-exact, lcpo-max, length-penalty: the chrpo row's loss with the grpo
             estimator and a peer's reward (rewards.lcpo_reward, length_penalty_reward)

Sources: GRPO, Shao et al. 2024 (DeepSeekMath, eqs. 3-4, beta = 0.04);
Dr.GRPO, Liu et al. 2025 ("Understanding R1-Zero-Like Training"; 'drgrpo'
needs ``max_len``, the constant generation budget); DAPO, Yu et al. 2025
(clip-higher and token-level loss; its dynamic sampling and overlong reward
shaping act on the rollout batch, outside the loss: filter groups with
``AdvantageResult.zero_variance``). The 'chrpo' row is this project's choice.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from chrpo import _checks
from chrpo.advantages import ESTIMATORS, AdvantageConfig
from chrpo.losses import AGGREGATIONS, KL_ESTIMATORS, LossConfig
from chrpo.rewards import RewardConfig

__all__ = ["ChrpoConfig", "PRESETS", "get_preset", "get_advantage_estimator",
           "get_kl_estimator", "get_aggregation", "available"]


@dataclasses.dataclass(frozen=True)
class ChrpoConfig:
    """Everything the CHRPO objective is configured by; hashable (jit-static)."""
    reward: RewardConfig = RewardConfig()
    advantage: AdvantageConfig = AdvantageConfig()
    loss: LossConfig = LossConfig()

    def replace(self, **overrides: Any) -> "ChrpoConfig":
        """A copy with flat field overrides, e.g. ``replace(kl_coef=0.0, b_cal=0.3)``.

        Field names are unique across the three parts; unknown names raise
        ValueError listing the valid ones.
        """
        parts = {"reward": self.reward, "advantage": self.advantage, "loss": self.loss}
        owner = {f.name: part for part, obj in parts.items()
                 for f in dataclasses.fields(obj)}
        updates: dict[str, dict[str, Any]] = {part: {} for part in parts}
        for key, value in overrides.items():
            updates[_checks.lookup(owner, key, kind="ChrpoConfig field")][key] = value
        return ChrpoConfig(**{part: dataclasses.replace(parts[part], **updates[part])
                              for part in parts})

    def as_flat_dict(self) -> dict[str, Any]:
        """All fields in one dict (for logging next to the run's metrics)."""
        out: dict[str, Any] = {}
        for part in (self.reward, self.advantage, self.loss):
            out.update(dataclasses.asdict(part))
        return out


PRESETS: dict[str, dict[str, Any]] = {
    "grpo": dict(estimator="grpo", eps_low=0.2, eps_high=0.2,
                 aggregation="seq-mean-token-mean", kl_estimator="k3", kl_coef=0.04),
    "drgrpo": dict(estimator="drgrpo", eps_low=0.2, eps_high=0.2,
                   aggregation="seq-mean-token-sum-norm", kl_coef=0.0),
    "dapo": dict(estimator="grpo", eps_low=0.2, eps_high=0.28,
                 aggregation="token-mean", kl_coef=0.0),
    # GSPO (Zheng et al. 2025): one length-normalised ratio per sequence, clipped to
    # [1 - 3e-4, 1 + 4e-4] (the paper's ranges), a per-sequence mean, no KL term
    "gspo": dict(estimator="grpo", eps_low=3e-4, eps_high=4e-4, importance_level="sequence",
                 aggregation="seq-mean-token-mean", kl_coef=0.0),
    "chrpo": dict(estimator="hierarchical", eps_low=0.2, eps_high=0.28, dual_clip=3.0,
                  aggregation="token-mean", kl_estimator="k3", kl_coef=0.001,
                  control_weight=5.0),
    # peers of CHRPO's reward on CHRPO's loss (docs/chrpo.md, "Peer rewards"): LCPO-Exact and
    # LCPO-Max of L1 (Aggarwal & Welleck 2025) and Kimi k1.5's length penalty, with GRPO's
    # group-normalised advantage over all of a prompt's rollouts (L1 trains with GRPO)
    **{kind: dict(kind=kind, estimator="grpo", eps_low=0.2, eps_high=0.28, dual_clip=3.0,
                  aggregation="token-mean", kl_estimator="k3", kl_coef=0.001,
                  control_weight=5.0)
       for kind in ("lcpo-exact", "lcpo-max", "length-penalty")},
}


def get_preset(name: str, **overrides: Any) -> ChrpoConfig:
    """The named preset, with flat overrides applied last.

    ``get_preset('drgrpo', max_len=1024)``; unknown names raise ValueError.
    Preset values and overrides are validated together, so a preset that
    needs a value (Dr.GRPO's ``max_len``) fails, naming it, until it is given.

    Example:
      >>> import chrpo
      >>> cfg = chrpo.get_preset("dapo")
      >>> cfg.loss.eps_high, cfg.loss.aggregation, cfg.advantage.estimator
      (0.28, 'token-mean', 'grpo')
    """
    preset = _checks.lookup(PRESETS, name, kind="preset")
    return ChrpoConfig().replace(**{**preset, **overrides})


def get_advantage_estimator(name: str) -> Callable[..., Any]:
    """The advantage estimator registered under ``name``."""
    return _checks.lookup(ESTIMATORS, name, kind="advantage estimator")


def get_kl_estimator(name: str) -> Callable[..., Any]:
    """The KL estimator (k1 | k2 | k3) registered under ``name``."""
    return _checks.lookup(KL_ESTIMATORS, name, kind="KL estimator")


def get_aggregation(name: str) -> Callable[..., Any]:
    """The loss aggregation mode registered under ``name``."""
    return _checks.lookup(AGGREGATIONS, name, kind="aggregation mode")


def available() -> dict[str, tuple[str, ...]]:
    """Every registered name, by kind (for help texts and config validation)."""
    return {"advantage": tuple(sorted(ESTIMATORS)), "kl": tuple(sorted(KL_ESTIMATORS)),
            "aggregation": tuple(sorted(AGGREGATIONS)), "preset": tuple(sorted(PRESETS))}

"""The main job's stages as the configs see them: their order, which stages the
``stage`` / ``force`` keys select, and which stages read a config key (the rule by
which a run directory's locked config may change; experiments/extra_cot/pipeline.py).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from experiments import cli

__all__ = ["STAGE_ORDER", "EXTRA_STAGES", "TRAINING_STAGES", "READERS", "selected_stages",
           "key_readers", "changeable"]

STAGE_ORDER = ("data", "sft_base", "compressor", "selfcot", "compress", "sft_mixed",
               "calibrate", "sft_policy", "rl", "sft_tokenskip", "evaluate")
"""The main job's stages in the order they run (experiments/extra_cot/pipeline.py runs them)."""
EXTRA_STAGES = ("evaluate_val",)   # run only when named: tuning happens on validation


def selected_stages(stage: str, only: Mapping | None = None) -> list[str]:
    """Stages named by ``config.stage`` ('all' or a comma list), limited to ``only``."""
    known = STAGE_ORDER + EXTRA_STAGES
    names = list(STAGE_ORDER) if stage == "all" else [s.strip() for s in stage.split(",")]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise cli.ConfigError(f"config key 'stage': unknown stages {unknown}; "
                              f"valid: all or a comma list of {known}")
    if only is not None:
        names = [n for n in names if n in only]
        if not names:
            raise cli.ConfigError(f"config key 'stage' = {stage!r}: this script runs "
                                  f"{tuple(only)}; pass --config.stage=<one of them>")
    return [n for n in known if n in names]


READERS = {"compressor": ("compressor", "data"), "compressor_baseline": ("compressor",),
           "rl.budget": ("rl", "sft_policy", "evaluate"),
           "rl.budget_targets": ("rl", "sft_policy"),
           "rl.allocation_buckets": ("rl", "sft_policy")}
"""The stages that read a config block or key where that is more than the block's own
stage (the longest matching prefix wins): the data stage writes the compressor's
held-out problems, the compressor stage trains both compressors, the warm start's
targets follow the budget, and a budget adds the budget decode to the evaluation."""

TRAINING_STAGES = ("sft_base", "sft_mixed", "sft_policy", "rl", "sft_tokenskip")


def key_readers(key: str) -> tuple[str, ...]:
    """The stages whose work depends on the dotted config ``key`` (() for a global key
    such as ``model.*`` or ``seed``, which every stage reads)."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in READERS:
            return READERS[prefix]
    return (parts[0],) if parts[0] in STAGE_ORDER + EXTRA_STAGES else ()


def changeable(key: str, started: Sequence[str], forced: Sequence[str] = ()) -> bool:
    """May ``key`` change in a run directory where the ``started`` stages have begun?
    Yes when no started stage read it, and for the step count of a training stage that
    is ``forced`` (it is extended from its last checkpoint: experiments/extra_cot/pipeline.py)."""
    readers = key_readers(key)
    if readers and not set(readers) & set(started):
        return True
    stage = key.split(".")[0]
    return stage in TRAINING_STAGES and stage in forced and key in (
        f"{stage}.steps", f"{stage}.optim.total_steps")

"""The multi-seed study (experiments/extra_cot/study.py): the embedded default once per seed.

    python -m experiments.extra_cot.study          # seeds 0, 1, 2 (48 min) + the budget sweep (about 71 min)
    python -m experiments.extra_cot.study --config.study.sweep.budgets=   # the seeds alone, no sweep
    python -m experiments.extra_cot.study --config.study.seeds=0,1,2,3,4
    python -m experiments.extra_cot.study --config=experiments/extra_cot/configs/study.py:test   # CI sizes
    python -m experiments.extra_cot.study --config=experiments/extra_cot/configs/study.py:wide   # 1-3 step problems
    python -m experiments.extra_cot.study --config.study.seeds=0 --config.study.sweep.budgets=0.3 \
        --config.study.sweep.split=val --config.study.sweep.name=val   # tune the sweep

Every pipeline key of default.py can be overridden as usual
(``--config.rl.steps=20``); ``study.root`` holds one run directory per seed,
``study.out_dir`` gets study.json, study.md and the plot (docs/results.md,
"The multi-seed study").
"""
import ml_collections

from experiments import cli
from experiments.extra_cot.configs import pipeline_blocks
from experiments.extra_cot.configs import test as test_config


WIDE_STEPS = (1, 3)
"""The ``wide`` preset's operations per problem (min, max): the default's 2-3 widened so
that the levels are worth different amounts on different questions (docs/results.md,
"Difficulty that matters"; 1-4 was tried: the 2-layer model then fails 4-step problems
at every level)."""


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """``arg``: '' for the embedded default, 'test' for the CI sizes of test.py, 'wide'
    for the default on problems of ``WIDE_STEPS`` operations (its own root and report)."""
    if arg not in ("", "test", "wide"):
        raise cli.ConfigError(f"--config=experiments/extra_cot/configs/study.py:{arg}: the argument "
                              "must be 'test', 'wide' or absent")
    c = test_config.get_config() if arg == "test" else pipeline_blocks.base_config()
    if arg == "wide":
        c.data.arithmetic.min_steps, c.data.arithmetic.max_steps = WIDE_STEPS
    root = {"": "runs/study", "test": "runs/study_test", "wide": "runs/study_wide"}[arg]
    c.run_dir = root   # unused: each seed runs in <study.root>/seed<k>
    c.study = ml_collections.ConfigDict({
        "seeds": (0, 1, 2), "root": root,
        "out_dir": {"": "docs/figures/study", "test": f"{root}/report",
                    "wide": "docs/figures/study_wide"}[arg]})
    # the budget sweep (experiments.extra_cot.study.sweep_runs): from each seed's SFT models, CHRPO and
    # its peers at every budget, with the same warm start and RL work; () = no sweep
    c.study.sweep = ml_collections.ConfigDict({
        "budgets": (0.3,) if arg == "test" else (0.2, 0.3, 0.45, 0.6),
        "methods": ("chrpo", "lcpo", "length-penalty"),
        "calibrate_samples": 1 if arg == "test" else 4,
        "rl_steps": 2 if arg == "test" else 20,
        # every level explored in every prompt's group: one forced rollout per level
        "forced_levels": (20, 40, 60, 80, 100), "forced_samples": 1,
        # the control token's loss weight in every sweep run (the chrpo preset's is 5)
        "control_weight": 1.0,
        # the allocation's accuracy pooled over 4 buckets of question length
        "allocation_buckets": 4,
        # the multiplier's gains in every sweep run (rl.pid's defaults; docs/results.md)
        "pid": c.rl.pid.to_dict(),
        # the warm start (sft_policy) of every budget: 200 steps with its chosen level token
        # weighted 10 (chosen on validation, wide preset, seed 0, budget 0.3: the warm start
        # 87.5% against 72.0% at 40 steps unweighted, and its levels follow difficulty;
        # docs/results.md, "Difficulty that matters"); test: 2 steps
        "sft_policy": {"steps": 2 if arg == "test" else 200, "control_weight": 10.0},
        # 'val': answer the validation split and print the sweep's table, no study report
        # (tuning); the run directories go to <seed dir>/<name>
        "split": "test", "name": "sweep"})
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    pipeline_blocks.validate(config)
    cli.check(config, "study.seeds",
              lambda v: len(v) >= 1 and len(set(v)) == len(v)
              and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in v),
              "must be a non-empty list of distinct ints >= 0")
    cli.check(config, "study.root", bool, "must be a directory path")
    cli.check(config, "study.out_dir", bool, "must be a directory path")
    cli.check(config, "study.sweep.budgets",
              lambda v: all(isinstance(b, (int, float)) and 0 < b <= 1 for b in v)
              and len(set(v)) == len(v), "must be distinct mean ratios in (0, 1]")
    cli.check(config, "study.sweep.methods",
              lambda v: len(v) >= 1 and all(m in ("chrpo", "lcpo", "length-penalty") for m in v)
              and len(set(v)) == len(v),
              "must be distinct names among ('chrpo', 'lcpo', 'length-penalty')")
    cli.check(config, "study.sweep.forced_levels",
              lambda v: all(lv in (20, 40, 60, 80, 100) for lv in v) and len(set(v)) == len(v),
              "must be distinct levels among (20, 40, 60, 80, 100)")
    cli.check_range(config, "study.sweep.control_weight", low=0.0)
    cli.check_choice(config, "study.sweep.split", ("test", "val"))
    cli.check(config, "study.sweep.sft_policy.steps",
              lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
              "must be an int >= 0")
    cli.check_range(config, "study.sweep.sft_policy.control_weight", low=0.0, low_open=True,
                    high=1000.0)
    for gain in ("kp", "ki", "kd"):
        cli.check_range(config, f"study.sweep.pid.{gain}", low=0.0)
    cli.check_range(config, "study.sweep.pid.integral_limit", low=0.0, low_open=True)
    cli.check(config, "study.sweep.name", lambda v: bool(v) and "/" not in v,
              "must be a directory name")
    for key in ("study.sweep.calibrate_samples", "study.sweep.rl_steps",
                "study.sweep.allocation_buckets",
                "study.sweep.forced_samples"):
        cli.check(config, key, lambda v: isinstance(v, int) and not isinstance(v, bool)
                  and v >= 0, "must be an int >= 0")

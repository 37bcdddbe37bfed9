"""The multi-seed study (experiments/study.py): the embedded default once per seed.

    python -m experiments.study                                   # seeds 0, 1, 2 (48 min)
    python -m experiments.study --config.study.seeds=0,1,2,3,4
    python -m experiments.study --config=experiments/configs/study.py:test   # CI sizes

Every pipeline key of default.py can be overridden as usual
(``--config.rl.steps=20``); ``study.root`` holds one run directory per seed,
``study.out_dir`` gets study.json, study.md and the plot (docs/results.md,
"The multi-seed study").
"""
import ml_collections

from experiments import cli
from experiments.configs import pipeline_blocks
from experiments.configs import test as test_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    """``arg``: '' for the embedded default, 'test' for the CI sizes of test.py."""
    if arg not in ("", "test"):
        raise cli.ConfigError(f"--config=experiments/configs/study.py:{arg}: the argument "
                              "must be 'test' or absent")
    c = test_config.get_config() if arg == "test" else pipeline_blocks.base_config()
    root = "runs/study_test" if arg else "runs/study"
    c.run_dir = root   # unused: each seed runs in <study.root>/seed<k>
    c.study = ml_collections.ConfigDict({
        "seeds": (0, 1, 2), "root": root,
        "out_dir": f"{root}/report" if arg else "docs/figures/study"})
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    pipeline_blocks.validate(config)
    cli.check(config, "study.seeds",
              lambda v: len(v) >= 1 and len(set(v)) == len(v)
              and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in v),
              "must be a non-empty list of distinct ints >= 0")
    cli.check(config, "study.root", bool, "must be a directory path")
    cli.check(config, "study.out_dir", bool, "must be a directory path")

"""The Extra-CoT lab: the main job's pipeline and its stages (docs/design.md).

    python -m experiments.extra_cot.pipeline                      # the main job
    python -m experiments.extra_cot.pipeline --config.stage=rl    # one stage
    python -m experiments.extra_cot.study                         # the multi-seed study

``pipeline`` holds the stage table and runs it; each stage module (``sft``,
``train_compressor``, ``compressed_data``, ``calibrate``, ``rl``, ``evaluate``)
has one ``stage(config, run) -> summary`` function; ``rollouts`` generates and
judges answers; ``datasets`` reads the problems; ``configs/`` holds the configs.
The tree path-finding lab is the sibling package ``experiments.trees``; both use
``experiments.cli`` (configs from the command line) and ``experiments.rundir``
(run directories).
"""

"""The main job: every stage of Extra-CoT + CHRPO in one run directory.

    python -m experiments.extra_cot.pipeline                                  # embedded default
    python -m experiments.extra_cot.pipeline --config=experiments/extra_cot/configs/test.py --config.run_dir=/tmp/r

Stages, in order (docs/design.md, data flow of the main job)::

    data           tokenizer + question splits              experiments/extra_cot/datasets.py
    sft_base       base reasoning model (full CoT SFT)      experiments/extra_cot/sft.py
    compressor     formula-aware compressor (+ baseline)    experiments/extra_cot/compressed_data.py
    selfcot        the base model's own correct CoTs        experiments/extra_cot/compressed_data.py
    compress       compressed at every ratio, re-bucketed   experiments/extra_cot/compressed_data.py
    sft_mixed      mixed-ratio SFT with <COMP_xx>           experiments/extra_cot/sft.py
    calibrate      ref_len and target level per RL question experiments/extra_cot/calibrate.py
    sft_policy     policy-mode warm start                   experiments/extra_cot/sft.py
    rl             CHRPO                                    experiments/extra_cot/rl.py
    sft_tokenskip  TokenSkip-style baseline                 experiments/extra_cot/sft.py
    evaluate       table and plots on held-out problems     experiments/extra_cot/evaluate.py

A stage whose ``<stage>/done.json`` exists is skipped, so a re-run resumes where
the last one stopped (training stages also resume from their checkpoints);
``--config.force=evaluate`` (or a comma list) runs finished stages again. A
resumed run may change every key that no started stage has read
(``--config.rl.steps=40`` before RL began; ``stages.changeable``),
``evaluate.*`` and the logging intervals, and the step count of a forced training
stage, which then continues from its last checkpoint
(``--config.force=rl --config.rl.steps=40``); any other change is refused,
naming the keys. An allowed change that a finished stage did not see
(``evaluate.num_questions`` after the evaluation) is printed as a warning
naming the stage to force.
``--config.stage=rl`` (or a comma list) runs only the named stages;
``--config.stage=evaluate_val`` evaluates on the validation split (for tuning).
A stage whose inputs are missing (``stage_inputs``) stops before any work with
the names of the stages to run first.

Several hosts (docs/scaling.md): every host runs the same command; with
``distributed.enabled`` the first thing a run does is
``jax.distributed.initialize`` (``models.sharding.initialize_distributed``), and
only process 0 writes the run config and prints progress.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence

import ml_collections

from experiments import cli, run_config, rundir
from experiments.extra_cot import calibrate, compressed_data, evaluate, rl, sft
from experiments.extra_cot.configs import pipeline_blocks, stages
from experiments.extra_cot.configs.stages import EXTRA_STAGES, STAGE_ORDER, selected_stages
from experiments.extra_cot.datasets import prepare_data
from models import sharding

__all__ = ["stage_functions", "stage_inputs", "check_inputs", "run_stages", "main"]

log = logging.getLogger(__name__)
DEFAULT_CONFIG = "experiments/extra_cot/configs/default.py"
RESUMABLE = ("stage", "force", "run_dir", "*.log_every", "*.checkpoint_every", "evaluate.*")
"""Keys that may change in any run directory (``run_dir``: a directory moved or copied to
branch off); a stage block's keys may also change until a stage that reads them has
started (``stages.changeable``)."""


def stage_functions() -> dict:
    """Stage name -> ``fn(config, run) -> summary``, in pipeline order."""
    table = {"data": prepare_data, **sft.STAGES, **compressed_data.STAGES, **calibrate.STAGES,
             **rl.STAGES, **evaluate.STAGES}
    return {name: table[name] for name in STAGE_ORDER + EXTRA_STAGES}


def stage_inputs(config: ml_collections.ConfigDict, name: str) -> tuple[str, ...]:
    """The earlier stages whose outputs stage ``name`` reads, under ``config``."""
    def init(block):   # an SFT / RL block starts from another stage's model, or from scratch
        return () if block.init == "scratch" else (block.init,)

    needs = {
        "data": (),
        "sft_base": init(config.sft_base),
        "compressor": (),
        "selfcot": ("sft_base",),
        "compress": ("selfcot", "compressor", "sft_base"),
        "sft_mixed": ("compress", *init(config.sft_mixed)),
        "calibrate": ("sft_mixed",),
        "sft_policy": ("calibrate", *init(config.sft_policy)),
        "rl": ("calibrate", *init(config.rl)),
        "sft_tokenskip": ("compress", *init(config.sft_tokenskip)),
    }
    if name in ("evaluate", "evaluate_val"):
        stages = {evaluate.METHOD_STAGES[m] for m, _ in evaluate.method_plan(config.evaluate)}
        needs[name] = tuple(s for s in STAGE_ORDER if s in stages)
    return tuple(dict.fromkeys(("data", *needs[name]) if name != "data" else ()))


def check_inputs(config: ml_collections.ConfigDict, run: rundir.Run, name: str,
                 planned: Sequence[str] = ()) -> None:
    """Stop with the missing stage's name and the command that makes it, before ``name`` runs.

    ``planned``: the stages this invocation runs before ``name`` (they are not done yet
    when the check is made at the start)."""
    def unfinished(stage):
        return [s for s in stage_inputs(config, stage) if not run.done(s) and s not in planned]

    missing = unfinished(name)
    if missing:
        todo, queue = set(), list(missing)      # and what those stages need in turn
        while queue:
            stage = queue.pop()
            if stage not in todo:
                todo.add(stage)
                queue += unfinished(stage)
        order = [s for s in STAGE_ORDER if s in todo]
        raise cli.ConfigError(
            f"stage '{name}' needs the output of stage(s) "
            f"{[s for s in STAGE_ORDER if s in missing]}, not finished in {config.run_dir}; "
            f"run them first: python -m experiments.extra_cot.pipeline --config.run_dir={config.run_dir} "
            f"--config.stage={','.join(order)} (plus the same --config flags), "
            f"or --config.stage=all")


def run_stages(config: ml_collections.ConfigDict, *, only: Mapping | None = None) -> dict:
    """Run the selected stages in order, skipping finished ones; returns their summaries.

    First ``sharding.initialize_distributed(config.distributed)`` (a no-op unless
    ``distributed.enabled``); progress lines are printed by process 0 only.
    """
    sharding.initialize_distributed(config.get("distributed"))
    say = print if sharding.is_main_process() else (lambda *a, **k: None)
    names = selected_stages(config.stage, only)
    forced = set(selected_stages(config.force)) if config.get("force") else set()
    os.makedirs(config.run_dir, exist_ok=True)
    run, functions = rundir.Run(config.run_dir), stage_functions()
    started = [s for s in STAGE_ORDER + EXTRA_STAGES if os.path.lexists(run.path(s))]
    defaults = pipeline_blocks.base_config()
    changes = run_config.config_changes(config, config.run_dir, defaults=defaults)
    free = tuple(k for k, _, _ in changes if stages.changeable(k, started, forced))
    run_config.write_run_config(config, config.run_dir, resumable=RESUMABLE + free,
                         defaults=defaults)       # process 0 writes
    for key, old, new in changes:     # allowed, but a finished stage does not see it
        stale = [s for s in stages.key_readers(key)
                 if run.done(s) and s not in forced]
        if stale and not key.endswith(("log_every", "checkpoint_every")):
            say(f"warning: {key} changed ({old} -> {new}) but stage(s) {stale} finished "
                f"with the old value and are not rerun; add --config.force={','.join(stale)}",
                flush=True)
    for i, name in enumerate(names):      # every input before any work
        if not run.done(name):
            check_inputs(config, run, name, planned=names[:i])
    summaries, start = {}, time.perf_counter()
    for i, name in enumerate(names, start=1):
        again = name in forced and run.done(name)
        status = ("forced, running again" if again else
                  "done, skipping" if run.done(name) else "running")
        say(f"[{i}/{len(names)}] {name}: {status}", flush=True)
        summary = rundir.run_stage(run, name, lambda fn=functions[name]: fn(config, run),
                                   force=name in forced)
        summaries[name] = summary
        if not summary.get("skipped"):
            say(f"[{i}/{len(names)}] {name}: finished in {summary['seconds']:.1f}s "
                f"({summary['cpu_seconds']:.0f} CPU-s; total {time.perf_counter() - start:.1f}s,"
                f" load {os.getloadavg()[0]:.1f})", flush=True)
    total = time.perf_counter() - start
    say(f"stages {', '.join(names)}: {total:.1f}s", flush=True)
    summaries["total_seconds"] = total
    return summaries


def main(config: ml_collections.ConfigDict) -> dict:
    """Run the pipeline, then print the results table of each evaluation it ran
    (``evaluate``: the test split; ``evaluate_val``: validation)."""
    summaries = run_stages(config)
    for stage, split in (("evaluate", "held-out test"), ("evaluate_val", "validation")):
        table = os.path.join(config.run_dir, stage, "results.md")
        if stage in summaries and os.path.exists(table) and sharding.is_main_process():
            with open(table) as f:
                print(f"\nresults on the {split} problems ({config.run_dir}/{stage}):\n"
                      + f.read())
    return summaries


if __name__ == "__main__":
    cli.run(main, default=DEFAULT_CONFIG)

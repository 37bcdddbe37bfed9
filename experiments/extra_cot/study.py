"""The multi-seed study: the whole pipeline once per seed, every figure with its interval.

    python -m experiments.extra_cot.study                                   # seeds 0, 1, 2 of the default
    python -m experiments.extra_cot.study --config.study.seeds=0,1,2,3,4    # five seeds

Each seed is one run directory, ``<study.root>/seed<k>``, holding the main job
with ``seed=k`` (model initialisation, batch order and sampling; the problem
streams are the same for every seed, so every seed answers the same test
questions). A finished stage of a seed is skipped, so a re-run only does what
is missing. Then each seed's budget sweep runs (``sweep_runs``: from the seed's
SFT models, CHRPO and its peers at every budget of ``study.sweep.budgets``), and
the per-question verdicts of every run (``evaluate/responses.jsonl``) become
``<study.out_dir>``: study.json, study.md and accuracy_vs_actratio.png
(experiments/extra_cot/study_report.py says what each holds; study_render.py writes them).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import ml_collections

import chrpo
from experiments import cli, rundir
from experiments.extra_cot.study_render import sweep_markdown, write_report
from experiments.extra_cot.study_report import study_report

__all__ = ["UPSTREAM_STAGES", "SWEEP_METHODS", "seed_config", "link_stages", "sweep_config",
           "sweep_runs", "main"]

UPSTREAM_STAGES = ("data", "sft_base", "compressor", "selfcot", "compress", "sft_mixed",
                   "sft_tokenskip")
"""A seed's stages that every run of the budget sweep shares (linked, never rerun)."""

SWEEP_METHODS = {
    # this project's CHRPO with a binding budget (docs/chrpo.md, "A budget that binds")
    "chrpo": {"objective": "chrpo", "overrides": {"global_mode": "advantage",
                                                  "bonus_shape": "peak"}},
    # the peers, on the same warm start, rollouts and loss (docs/chrpo.md, "Peer rewards")
    "lcpo": {"objective": "lcpo-exact", "overrides": {}},
    "length-penalty": {"objective": "length-penalty", "overrides": {}},
}
"""Study method name -> the RL objective preset (and flat overrides) of its sweep runs."""


def seed_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    """The pipeline config of one seed: ``seed`` and ``run_dir`` set, the study block gone."""
    c = config.copy_and_resolve_references()
    c.unlock()
    c.seed = int(seed)
    c.run_dir = os.path.join(config.study.root, f"seed{int(seed)}")
    del c["study"]
    c.lock()
    return c


def link_stages(source: str, target: str, stages: Sequence[str]) -> None:
    """Symlink ``source/<stage>`` into ``target`` for each finished stage (relative links,
    so a moved study keeps working); an existing link to the same place stays."""
    os.makedirs(target, exist_ok=True)
    for stage in stages:
        src = os.path.join(source, stage)
        if not os.path.exists(os.path.join(src, "done.json")):
            raise FileNotFoundError(f"study sweep: stage '{stage}' of {source} is not finished; "
                                    "run the seed's pipeline first")
        dst = os.path.join(target, stage)
        rel = os.path.relpath(src, target)
        if os.path.islink(dst) and os.readlink(dst) == rel:
            continue
        if os.path.lexists(dst):
            raise FileExistsError(f"study sweep: {dst} exists and is not a link to {src}")
        os.symlink(rel, dst)


def sweep_config(config: ml_collections.ConfigDict, seed: int, run_dir: str, *,
                 budget: float | None = None, method: str | None = None,
                 stage: str) -> ml_collections.ConfigDict:
    """The pipeline config of one sweep run: the seed's config, the sweep's calibration
    and RL settings, and (for ``method``) that method's RL objective at ``budget``."""
    sweep = config.study.sweep
    c = seed_config(config, seed)
    c.unlock()
    c.run_dir, c.stage = run_dir, stage
    c.calibrate.samples = sweep.calibrate_samples
    c.rl.steps = sweep.rl_steps
    c.rl.forced_levels, c.rl.forced_samples = tuple(sweep.forced_levels), sweep.forced_samples
    c.rl.budget_targets, c.rl.budget_two_sided = "allocation", True
    c.rl.budget_controller = "pid"
    c.rl.pid.update(sweep.pid.to_dict())
    c.rl.allocation_buckets = sweep.allocation_buckets
    c.rl.budget = budget
    # the schedule's length with it (seed_config resolved the block's reference)
    c.sft_policy.steps = c.sft_policy.optim.total_steps = sweep.sft_policy.steps
    c.sft_policy.control_weight = sweep.sft_policy.control_weight
    # the warm start is the same for every method at a budget: answered in CHRPO's run only
    c.evaluate.methods = ("base", "chrpo") if method not in (None, "chrpo") else (
        "base", "policy-warm-start", "chrpo")
    # the budget decode is CHRPO's (a peer's policy is answered as it is)
    c.evaluate.budget_decode = method in (None, "chrpo")
    if method is not None:
        spec = SWEEP_METHODS[method]
        flat = chrpo.get_preset(spec["objective"], **spec["overrides"]).as_flat_dict()
        c.rl.objective.update({k: v for k, v in flat.items() if k in c.rl.objective})
        c.rl.objective.update({k: v for k, v in flat.items() if k not in c.rl.objective})
        c.rl.objective.ratio_width = config.rl.objective.ratio_width
        c.rl.objective.control_weight = sweep.control_weight
    c.lock()
    return c


def sweep_runs(config: ml_collections.ConfigDict, seed: int,
               run_stages=None) -> dict[tuple[str, float], list[dict]]:
    """The budget sweep of one seed: ``{(method, budget): evaluate/responses.jsonl rows}``.

    ``study.sweep.split='val'`` answers the validation split instead (stage
    ``evaluate_val``; for tuning the sweep's settings). Under ``<seed
    dir>/<study.sweep.name>``: ``calibrate`` (the sweep's calibration, with
    ``study.sweep.calibrate_samples`` sampled answers per level), ``b<B>`` (the warm
    start at budget B: sft_policy on the allocation's levels) and ``b<B>-<method>``
    (RL and evaluation); each links the stages it reads. Finished runs are skipped.
    """
    if run_stages is None:
        from experiments.extra_cot.pipeline import run_stages  # noqa: PLC0415
    seed_dir = seed_config(config, seed).run_dir
    split = config.study.sweep.split
    root = os.path.join(seed_dir, config.study.sweep.name)
    evaluation = "evaluate" if split == "test" else "evaluate_val"
    calib = os.path.join(root, "calibrate")
    link_stages(seed_dir, calib, UPSTREAM_STAGES)
    run_stages(sweep_config(config, seed, calib, stage="calibrate"))
    out = {}
    for budget in config.study.sweep.budgets:
        warm = os.path.join(root, f"b{budget:g}")
        link_stages(seed_dir, warm, UPSTREAM_STAGES)
        link_stages(calib, warm, ("calibrate",))
        run_stages(sweep_config(config, seed, warm, budget=budget, stage="sft_policy"))
        for method in config.study.sweep.methods:
            run_dir = f"{warm}-{method}"
            link_stages(seed_dir, run_dir, UPSTREAM_STAGES)
            link_stages(calib, run_dir, ("calibrate",))
            link_stages(warm, run_dir, ("sft_policy",))
            print(f"--- study sweep: seed {seed}, {method} at budget {budget:g}", flush=True)
            run_stages(sweep_config(config, seed, run_dir, budget=budget, method=method,
                                    stage=f"rl,{evaluation}"))
            out[(method, float(budget))] = rundir.read_jsonl(
                os.path.join(run_dir, evaluation, "responses.jsonl"))
    return out


def main(config: ml_collections.ConfigDict) -> dict:
    """Run (or resume) every seed's pipeline, then write the study's report."""
    from experiments.extra_cot.pipeline import run_stages  # noqa: PLC0415

    seed_rows = {}
    for i, seed in enumerate(config.study.seeds, start=1):
        c = seed_config(config, seed)
        print(f"=== study: seed {seed} ({i}/{len(config.study.seeds)}), {c.run_dir}", flush=True)
        run_stages(c)
        seed_rows[int(seed)] = rundir.read_jsonl(os.path.join(c.run_dir, "evaluate",
                                                              "responses.jsonl"))
    sweep = {}
    if config.study.sweep.budgets:
        for seed in config.study.seeds:
            sweep[int(seed)] = sweep_runs(config, seed)
    if config.study.sweep.split == "val":      # tuning: the sweep's table, no study report
        text = sweep_markdown(sweep, difficulty_key=config.evaluate.difficulty_key)
        print(text)
        return {"sweep_val": text}
    report = study_report(seed_rows, difficulty_key=config.evaluate.difficulty_key,
                          sweep=sweep or None)
    paths = write_report(report, config.study.out_dir)
    print(open(paths[1]).read())
    print("wrote " + ", ".join(paths))
    return report


if __name__ == "__main__":
    cli.run(main, default="experiments/extra_cot/configs/study.py")

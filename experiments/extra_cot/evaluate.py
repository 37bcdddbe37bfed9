"""Evaluation on held-out problems: every method, a Markdown/JSON table and two plots.

    python -m experiments.extra_cot.pipeline --config.stage=evaluate
    python -m experiments.extra_cot.pipeline --config.stage=evaluate_val

Methods (greedy decoding on the test questions; stage ``evaluate_val``: validation):

    base               sft_base,      base-mode prompt (no control token)
    extra-cot <COMP_k> sft_mixed,     level prompt, k = 20 ... 100
    tokenskip <COMP_k> sft_tokenskip, level prompt (the TokenSkip-style baseline)
    policy warm start  sft_policy,    <COMP_POLICY> prompt (before RL)
    chrpo policy       rl,            <COMP_POLICY> prompt
    chrpo-budget       rl,            <COMP_POLICY> prompt, the level chosen under the
                                      budget ``rl.budget`` (with 'chrpo', when one is set)

``chrpo-budget`` decodes the RL policy under its budget (this project's; docs/chrpo.md,
"Decoding under a budget"): on the validation questions the policy's log-probabilities
of the levels ``u[q, k]`` (``rollouts.level_logprobs``) and the levels' costs (their
mean realized ratio in the calibration, ``calibrate.level_costs``; their nominal k / 100
where no calibration answer had a reference length; with ``rl.budget_costs='length'``
times each question's share of the tokens, ``calibrate.length_weights``) give the
multiplier mu at which ``chrpo.allocate_levels`` spends a mean ratio of B; each test
question then takes ``argmax_k u[q, k] - mu * cost[q, k]`` (``chrpo.choose_levels``) on
its own, that level's control token is forced and the rest is decoded greedily. No test answer is
seen; mu and the validation mean are in results.json (``budget_decode``).

Per method (docs/method.md, "Evaluation"): Acc = exact answer match after
normalisation; Tokens = mean think tokens (closed think span, counted on ids);
ActRatio = Tokens / Tokens(base) on the same questions. Outputs under
``run_dir/evaluate``: responses.jsonl (one verdict per question and method),
results.json, results.md, accuracy_vs_actratio.png, policy_difficulty.png,
written by process 0 only (every process computes the same rows).
"""
from __future__ import annotations

import json
import os
import shutil
import textwrap
from collections.abc import Sequence

import ml_collections
import numpy as np

import chrpo
from data.formats import LEVELS, POLICY
from experiments import run_config, rundir
from experiments.extra_cot import calibrate, stats
from experiments.extra_cot.datasets import read_questions
from experiments.extra_cot.rollouts import answer_questions, level_logprobs, place_model
from models import sharding

__all__ = ["method_plan", "results_table", "markdown_table", "difficulty_profile", "undrawable",
           "budget_decode_levels", "evaluate", "STAGES"]

PLOT_FILES = ("accuracy_vs_actratio.png", "policy_difficulty.png")
METHOD_STAGES = {"base": "sft_base", "extra-cot": "sft_mixed", "tokenskip": "sft_tokenskip",
                 "policy-warm-start": "sft_policy", "chrpo": "rl", "chrpo-budget": "rl"}


def method_plan(block: ml_collections.ConfigDict, *, budget: float | None = None
                ) -> list[tuple[str, object]]:
    """(method, control) pairs to evaluate, in table order; 'chrpo-budget' comes with
    'chrpo' when there is a ``budget`` (the RL stage's ``rl.budget``) unless
    ``block.budget_decode`` is False."""
    plan: list[tuple[str, object]] = [("base", None)]
    plan += [("extra-cot", level) for level in block.levels]
    plan += [("tokenskip", level) for level in block.tokenskip_levels]
    plan += [("policy-warm-start", POLICY), ("chrpo", POLICY)]
    if budget is not None:
        plan.append(("chrpo-budget", POLICY))
    methods = set(block.get("methods", tuple(METHOD_STAGES)))
    if "chrpo" in methods and block.get("budget_decode", True):
        methods.add("chrpo-budget")
    return [(m, c) for m, c in plan if m in methods]


def budget_decode_levels(model, tok, val_questions, questions, *, budget: float,
                         costs: np.ndarray, batch_size: int,
                         val_weights: np.ndarray | None = None,
                         weights: np.ndarray | None = None) -> tuple[list[int], dict]:
    """The level of each of ``questions`` when the policy is decoded under ``budget``
    (module docstring): mu from ``val_questions``, then one rule per question.
    ``val_weights`` / ``weights``: each question's share of the tokens
    (``calibrate.length_weights``); a level costs a question ``costs[k]`` times it
    (ones: the same cost for every question)."""
    if not val_questions:
        raise ValueError("chrpo-budget needs validation questions to set its multiplier")
    costs = np.asarray(costs, np.float32)

    def cost_of(w, n):
        w = np.ones(n, np.float32) if w is None else np.asarray(w, np.float32)
        if w.shape != (n,):
            raise ValueError(f"budget_decode_levels: {w.shape[0]} weights for {n} questions")
        return w[:, None] * costs[None, :]

    u_val = level_logprobs(model, tok, val_questions, levels=LEVELS, batch_size=batch_size)
    _, mu, val_mean = chrpo.allocate_levels(u_val, cost_of(val_weights, len(val_questions)),
                                            budget, two_sided=True, max_multiplier=1e4)
    u = level_logprobs(model, tok, questions, levels=LEVELS, batch_size=batch_size)
    cost = cost_of(weights, len(questions))
    choice = np.asarray(chrpo.choose_levels(u, cost, mu))
    levels = [LEVELS[c] for c in choice.tolist()]
    planned = float(np.mean(cost[np.arange(len(levels)), choice])) if levels else None
    return levels, {"budget": float(budget), "multiplier": float(mu),
                    "val_questions": len(val_questions), "val_planned_ratio": float(val_mean),
                    "planned_ratio": planned,
                    "level_costs": {str(lv): float(c) for lv, c in zip(LEVELS, costs)}}


def _control_name(control) -> str:
    return "-" if control is None else ("<COMP_POLICY>" if control == POLICY
                                        else f"<COMP_{control}>")


def results_table(rows: Sequence[dict]) -> list[dict]:
    """One entry per (method, control) from per-question rows; ActRatio against 'base'.

    ``rows``: {method, control, correct, valid, think_length, ...} per question.
    ``acc_ci`` is the 95% Wilson interval of the accuracy (experiments/extra_cot/stats.py).
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["control"]), []).append(r)
    base = groups.get(("base", "-"))
    if not base:
        raise ValueError("results_table needs the base model's rows (method 'base')")
    base_tokens = float(np.mean([r["think_length"] for r in base]))
    table = []
    for (method, control), group in groups.items():
        tokens = float(np.mean([r["think_length"] for r in group]))
        levels = [r["level"] for r in group if r["level"] is not None]
        correct = sum(bool(r["correct"]) for r in group)
        table.append({"method": method, "control": control, "n": len(group),
                      "accuracy": correct / len(group),
                      "acc_ci": list(stats.wilson_interval(correct, len(group))),
                      "valid": float(np.mean([r["valid"] for r in group])),
                      "think_tokens": tokens,
                      "act_ratio": tokens / base_tokens if base_tokens > 0 else float("nan"),
                      "mean_level": float(np.mean(levels)) if levels else float("nan")})
    return table


def markdown_table(table: Sequence[dict]) -> str:
    """The results as a Markdown table (accuracy in % with its 95% interval, tokens rounded)."""
    lines = ["| method | control | Acc (%) | 95% CI | Tokens | ActRatio | valid (%) | n |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for t in table:
        lo, hi = t["acc_ci"]
        lines.append(f"| {t['method']} | {t['control']} | {100 * t['accuracy']:.1f} | "
                     f"{100 * lo:.1f}-{100 * hi:.1f} | "
                     f"{t['think_tokens']:.1f} | {t['act_ratio']:.3f} | "
                     f"{100 * t['valid']:.1f} | {t['n']} |")
    return "\n".join(lines)


def difficulty_profile(rows: Sequence[dict], *, method: str, key: str) -> list[dict]:
    """Per difficulty value: the method's mean emitted level, think tokens and accuracy."""
    values = sorted({r["difficulty"].get(key) for r in rows if r["method"] == method} - {None})
    out = []
    for v in values:
        group = [r for r in rows if r["method"] == method and r["difficulty"].get(key) == v]
        levels = [r["level"] for r in group if r["level"] is not None]
        out.append({key: v, "n": len(group),
                    "mean_level": float(np.mean(levels)) if levels else float("nan"),
                    "think_tokens": float(np.mean([r["think_length"] for r in group])),
                    "accuracy": float(np.mean([r["correct"] for r in group]))})
    return out


def undrawable(table: Sequence[dict]) -> list[str]:
    """'method control' of every table row the accuracy-ratio plot cannot place: a
    non-finite ActRatio (the base model gave no valid think tokens to divide by) or
    accuracy. The plot names them in a note instead of leaving them out silently."""
    return [f"{t['method']} {t['control']}" for t in table
            if not (np.isfinite(t["act_ratio"]) and np.isfinite(t["accuracy"]))]


def _note(ax, missing: Sequence[str], *, everything: bool) -> None:
    """A note on ``ax`` naming what is not drawn (in the middle when nothing is)."""
    if not missing:
        return
    text = ("nothing to draw: no finite ActRatio / accuracy" if everything
            else "not drawn (no finite ActRatio): " + ", ".join(missing))
    ax.text(0.5, 0.5 if everything else 0.02, "\n".join(textwrap.wrap(text, 60)),
            transform=ax.transAxes, ha="center", va="center" if everything else "bottom",
            fontsize=8, color="0.3")


def _plots(table: Sequence[dict], rows: Sequence[dict], out_dir: str, key: str) -> list[str]:
    import matplotlib  # noqa: PLC0415
    import matplotlib.ticker  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(5.5, 4))

    def bars(points):   # (x, acc, (lo, hi)) -> x, y and asymmetric 95% error bars, in %
        x, y, ci = zip(*points)
        err = [[100 * (a - lo) for a, (lo, _) in zip(y, ci)],
               [100 * (hi - a) for a, (_, hi) in zip(y, ci)]]
        return x, [100 * a for a in y], err

    missing = undrawable(table)
    drawn = [t for t in table if f"{t['method']} {t['control']}" not in missing]
    for method, style in (("extra-cot", "o-"), ("tokenskip", "s--")):
        pts = sorted((t["act_ratio"], t["accuracy"], tuple(t["acc_ci"]))
                     for t in drawn if t["method"] == method)
        if pts:
            x, y, err = bars(pts)
            ax.errorbar(x, y, yerr=err, fmt=style, capsize=3, label=method)
    for method, marker in (("base", "*"), ("policy-warm-start", "v"), ("chrpo", "D")):
        for t in drawn:
            if t["method"] == method:
                x, y, err = bars([(t["act_ratio"], t["accuracy"], tuple(t["acc_ci"]))])
                ax.errorbar(x, y, yerr=err, fmt=marker, markersize=10, capsize=3, label=method)
    ax.set_xlabel("ActRatio (think tokens / base)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    _note(ax, missing, everything=not drawn)
    paths = [os.path.join(out_dir, PLOT_FILES[0])]
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    profiled = 0
    for method in ("chrpo", "chrpo-budget", "policy-warm-start", "base"):
        prof = difficulty_profile(rows, method=method, key=key)
        if not prof:
            continue
        profiled += 1
        x = [p[key] for p in prof]
        if method != "base":
            left.plot(x, [p["mean_level"] for p in prof], "o-", label=method)
        right.plot(x, [p["think_tokens"] for p in prof], "o-", label=method)
    left.set_xlabel(key)
    left.set_ylabel("mean chosen level (<COMP_xx>)")
    right.set_xlabel(key)
    right.set_ylabel("think tokens")
    for ax in (left, right):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        if not profiled:
            ax.text(0.5, 0.5, f"nothing to draw: no answer carries a {key!r} difficulty",
                    transform=ax.transAxes, ha="center", va="center", fontsize=8, color="0.3")
    paths.append(os.path.join(out_dir, PLOT_FILES[1]))
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def _budget_levels(config, run: rundir.Run, model, tok, questions, *, budget: float
                   ) -> tuple[list[int], dict]:
    """chrpo-budget's level per question (``budget_decode_levels`` with this run's files)."""
    val = read_questions(run.path("data", "val.jsonl"))
    calib = rundir.read_jsonl(run.path("calibrate", "calibration.jsonl"))
    if any(r["ref_len"] for r in calib):
        costs, source = calibrate.level_costs(calib), "calibration"
    else:       # no full-length answer was right: each level's nominal ratio
        costs, source = np.asarray(LEVELS, np.float32) / 100, "nominal"
        print("[evaluate] chrpo-budget: no calibration row has a reference length; "
              "the level costs are their nominal ratios k / 100", flush=True)
    costs_by = config.rl.get("budget_costs", "level")
    weights = {"val_weights": None, "weights": None}
    if costs_by == "length":        # ActRatio is a ratio of token sums: long questions cost more
        weights = {name: calibrate.length_weights(
                       calib, [calibrate.question_tokens(tok, q.question) for q in qs])
                   for name, qs in (("val_weights", val), ("weights", questions))}
    levels, decode = budget_decode_levels(model, tok, val, questions, budget=budget,
                                          costs=costs, batch_size=config.evaluate.batch_size,
                                          **weights)
    decode["level_costs_from"], decode["costs_by"] = source, costs_by
    print(f"[evaluate] chrpo-budget: B={budget:g}, mu={decode['multiplier']:.3g}, "
          f"planned ratio {decode['val_planned_ratio']:.3f} on "
          f"{decode['val_questions']} validation questions", flush=True)
    return levels, decode


def _fingerprint(config, run: rundir.Run, questions) -> str:
    """What a finished method's answers depend on: the evaluation settings, the questions,
    the RL budget and the models' stages (their done.json); a partial answer file made
    under another fingerprint is never read."""
    stages = sorted(set(METHOD_STAGES.values()))
    return rundir.fingerprint({
        "evaluate": run_config.to_json_dict(config.evaluate),
        "budget": config.rl.get("budget") if "rl" in config else None,
        **({"budget_costs": config.rl.budget_costs}
           if "rl" in config and config.rl.get("budget_costs", "level") != "level" else {}),
        "uids": [q.uid for q in questions],
        "done": {s: rundir.stage_record(run, s) for s in stages}})


def evaluate(config, run: rundir.Run, *, split: str = "test") -> dict:
    """Answer the held-out questions with every method; write the table and plots.

    ``split='val'`` (stage ``evaluate_val``) writes to ``evaluate_val/``: the split
    for any choice that is tuned; the test split is only reported. Each method's
    answers are kept under ``partial/`` as soon as they are made, so a killed
    evaluation resumes at the first method it had not finished (with the same
    settings and models); the directory goes when the stage is done.
    """
    block, tok = config.evaluate, run.tokenizer()
    out_dir = run.stage_dir("evaluate" if split == "test" else f"evaluate_{split}")
    questions = read_questions(run.path("data", f"{split}.jsonl"))[:block.num_questions]
    partial = os.path.join(out_dir, "partial", _fingerprint(config, run, questions))
    if sharding.is_main_process():        # process 0 writes (module docstring)
        os.makedirs(partial, exist_ok=True)
    rows, models, decode = [], {}, None       # one model in memory, on config.mesh
    mesh = run.mesh(config)
    budget = config.rl.get("budget") if "rl" in config else None
    plan = method_plan(block, budget=budget)
    files = [os.path.join(partial, f"{m}{_control_name(c)}.jsonl".replace("<", "_")
                          .replace(">", "")) for m, c in plan]
    before = {f for f in files if os.path.exists(f)}   # decided once: every process alike
    for i, ((method, control), saved) in enumerate(zip(plan, files), start=1):
        name = _control_name(control)
        if saved in before:
            rows += rundir.read_jsonl(saved)
            if method == "chrpo-budget":
                with open(saved + ".decode.json") as f:
                    decode = json.load(f)
            print(f"[evaluate] {i}/{len(plan)} {method} {name}: answered before the "
                  "interruption, read back", flush=True)
            continue
        stage = METHOD_STAGES[method]
        if stage not in models:
            models = {stage: place_model(rundir.load_model(run.path(stage)), mesh)}
        levels = None
        if method == "chrpo-budget":
            levels, decode = _budget_levels(config, run, models[stage], tok, questions,
                                            budget=budget)
        judged = answer_questions(models[stage], tok, questions, control=control,
                                  batch_size=block.batch_size,
                                  max_new_tokens=block.max_new_tokens, levels=levels,
                                  desc=f"evaluate {method} {name}")
        got = [{"uid": q.uid, "method": method, "control": name, "difficulty": q.difficulty,
                **j.row()} for q, j in zip(questions, judged)]
        if sharding.is_main_process():
            if method == "chrpo-budget":
                with open(saved + ".decode.json", "w") as f:
                    json.dump(rundir.strict_json(decode), f, allow_nan=False)
        rundir.write_jsonl(saved, got)       # last: its presence means the method is done
        rows += got
        print(f"[evaluate] {i}/{len(plan)} {method} {name}: "
              f"{100 * np.mean([r['correct'] for r in got]):.1f}% of {len(got)}", flush=True)
    rundir.write_jsonl(os.path.join(out_dir, "responses.jsonl"), rows)
    table = results_table(rows)
    profiles = {m: difficulty_profile(rows, method=m, key=block.difficulty_key)
                for m in ("chrpo", "chrpo-budget", "policy-warm-start", "base")}
    if sharding.is_main_process():
        _write_tables(out_dir, split, table, profiles, decode)
        _plots(table, rows, out_dir, block.difficulty_key)
        shutil.rmtree(os.path.join(out_dir, "partial"), ignore_errors=True)
    return {"rows": len(table), "plots": list(PLOT_FILES)}


def _write_tables(out_dir: str, split: str, table: Sequence[dict], profiles: dict,
                  decode: dict | None = None) -> None:
    """results.json and results.md (the caller writes on process 0 only)."""
    out = {"split": split, "table": table, "policy_difficulty": profiles["chrpo"],
           "difficulty": {m: p for m, p in profiles.items() if p or m != "chrpo-budget"}}
    if decode is not None:
        out["budget_decode"] = decode
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(rundir.strict_json(out), f, indent=2, allow_nan=False)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown_table(table) + "\n")


def evaluate_val(config, run: rundir.Run) -> dict:
    """The same evaluation on the validation split (run it by name; not part of 'all')."""
    return evaluate(config, run, split="val")


STAGES = {"evaluate": evaluate, "evaluate_val": evaluate_val}

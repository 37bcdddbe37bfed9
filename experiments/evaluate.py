"""Evaluation on held-out problems: every method, a Markdown/JSON table and two plots.

    python -m experiments.pipeline --config.stage=evaluate
    python -m experiments.pipeline --config.stage=evaluate_val

Methods (greedy decoding on the test questions; stage ``evaluate_val``: validation):

    base               sft_base,      base-mode prompt (no control token)
    extra-cot <COMP_k> sft_mixed,     level prompt, k = 20 ... 100
    tokenskip <COMP_k> sft_tokenskip, level prompt (the TokenSkip-style baseline)
    policy warm start  sft_policy,    <COMP_POLICY> prompt (before RL)
    chrpo policy       rl,            <COMP_POLICY> prompt

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
from collections.abc import Sequence

import ml_collections
import numpy as np

from data.formats import POLICY
from experiments import rundir, stats
from experiments.datasets import read_questions
from experiments.rollouts import answer_questions, place_model
from models import sharding

__all__ = ["method_plan", "results_table", "markdown_table", "difficulty_profile",
           "evaluate", "STAGES"]

PLOT_FILES = ("accuracy_vs_actratio.png", "policy_difficulty.png")
METHOD_STAGES = {"base": "sft_base", "extra-cot": "sft_mixed", "tokenskip": "sft_tokenskip",
                 "policy-warm-start": "sft_policy", "chrpo": "rl"}


def method_plan(block: ml_collections.ConfigDict) -> list[tuple[str, object]]:
    """(method, control) pairs to evaluate, in table order."""
    plan: list[tuple[str, object]] = [("base", None)]
    plan += [("extra-cot", level) for level in block.levels]
    plan += [("tokenskip", level) for level in block.tokenskip_levels]
    plan += [("policy-warm-start", POLICY), ("chrpo", POLICY)]
    methods = block.get("methods", tuple(METHOD_STAGES))
    return [(m, c) for m, c in plan if m in methods]


def _control_name(control) -> str:
    return "-" if control is None else ("<COMP_POLICY>" if control == POLICY
                                        else f"<COMP_{control}>")


def results_table(rows: Sequence[dict]) -> list[dict]:
    """One entry per (method, control) from per-question rows; ActRatio against 'base'.

    ``rows``: {method, control, correct, valid, think_length, ...} per question.
    ``acc_ci`` is the 95% Wilson interval of the accuracy (experiments/stats.py).
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

    for method, style in (("extra-cot", "o-"), ("tokenskip", "s--")):
        pts = sorted((t["act_ratio"], t["accuracy"], tuple(t["acc_ci"]))
                     for t in table if t["method"] == method)
        if pts:
            x, y, err = bars(pts)
            ax.errorbar(x, y, yerr=err, fmt=style, capsize=3, label=method)
    for method, marker in (("base", "*"), ("policy-warm-start", "v"), ("chrpo", "D")):
        for t in table:
            if t["method"] == method:
                x, y, err = bars([(t["act_ratio"], t["accuracy"], tuple(t["acc_ci"]))])
                ax.errorbar(x, y, yerr=err, fmt=marker, markersize=10, capsize=3, label=method)
    ax.set_xlabel("ActRatio (think tokens / base)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    paths = [os.path.join(out_dir, PLOT_FILES[0])]
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for method in ("chrpo", "policy-warm-start", "base"):
        prof = difficulty_profile(rows, method=method, key=key)
        if not prof:
            continue
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
        ax.legend()
    paths.append(os.path.join(out_dir, PLOT_FILES[1]))
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def evaluate(config, run: rundir.Run, *, split: str = "test") -> dict:
    """Answer the held-out questions with every method; write the table and plots.

    ``split='val'`` (stage ``evaluate_val``) writes to ``evaluate_val/``: the split
    for any choice that is tuned; the test split is only reported.
    """
    block, tok = config.evaluate, run.tokenizer()
    out_dir = run.stage_dir("evaluate" if split == "test" else f"evaluate_{split}")
    questions = read_questions(run.path("data", f"{split}.jsonl"))[:block.num_questions]
    rows, models = [], {}                      # one model in memory, on config.mesh
    mesh = sharding.mesh_from_config(config.get("mesh"))
    for method, control in method_plan(block):
        stage = METHOD_STAGES[method]
        if stage not in models:
            models = {stage: place_model(rundir.load_model(run.path(stage)), mesh)}
        max_new = block.max_new_tokens
        judged = answer_questions(models[stage], tok, questions, control=control,
                                  batch_size=block.batch_size, max_new_tokens=max_new)
        for q, j in zip(questions, judged):
            rows.append({"uid": q.uid, "method": method, "control": _control_name(control),
                         "difficulty": q.difficulty, **j.row()})
    rundir.write_jsonl(os.path.join(out_dir, "responses.jsonl"), rows)
    table = results_table(rows)
    profiles = {m: difficulty_profile(rows, method=m, key=block.difficulty_key)
                for m in ("chrpo", "policy-warm-start", "base")}
    if sharding.is_main_process():
        _write_tables(out_dir, split, table, profiles)
        _plots(table, rows, out_dir, block.difficulty_key)
    return {"rows": len(table), "plots": list(PLOT_FILES)}


def _write_tables(out_dir: str, split: str, table: Sequence[dict], profiles: dict) -> None:
    """results.json and results.md (the caller writes on process 0 only)."""
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(rundir.strict_json({"split": split, "table": table,
                               "policy_difficulty": profiles["chrpo"], "difficulty": profiles}),
                  f, indent=2, allow_nan=False)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown_table(table) + "\n")


def evaluate_val(config, run: rundir.Run) -> dict:
    """The same evaluation on the validation split (run it by name; not part of 'all')."""
    return evaluate(config, run, split="val")


STAGES = {"evaluate": evaluate, "evaluate_val": evaluate_val}

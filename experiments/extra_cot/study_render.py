"""The multi-seed study's report as files: study.json, study.md and the plot.

    write_report(study_report(...), "docs/figures/study")

``markdown`` is study.md (the mean table over seeds, the per-seed accuracies, the
paired tests, the targets, the fixed-level ceilings, the CHRPO policies' level by
difficulty), ``plot`` accuracy_vs_actratio.png (error bars from the seeds),
``sweep_markdown`` the budget sweep's printout on the validation split. The report itself is
experiments/extra_cot/study_report.py's.
"""
from __future__ import annotations

import json
import os
import statistics
from collections.abc import Mapping, Sequence

from experiments.extra_cot import evaluate
from experiments.extra_cot.study_report import row_key, sweep_rows

__all__ = ["sweep_markdown", "markdown", "plot", "write_report"]


def sweep_markdown(sweep: Mapping[int, Mapping[tuple[str, float], Sequence[dict]]], *,
                   difficulty_key: str = "n_steps") -> str:
    """One line per seed, method and budget: accuracy, ActRatio, mean level by difficulty
    (the ``study.sweep.split='val'`` printout)."""
    lines = ["| seed | method | budget | Acc (%) | ActRatio | mean level by difficulty |",
             "|---:|---|---:|---:|---:|---|"]
    for seed, runs in sorted(sweep.items()):
        for (method, budget), got in sorted(runs.items()):
            rows = sweep_rows(method, got, warm_start=False)
            for t in evaluate.results_table(rows):
                if t["method"] == "base":
                    continue
                prof = evaluate.difficulty_profile(rows, method=t["method"],
                                                   key=difficulty_key)
                levels = ", ".join(f"{p[difficulty_key]}: {p['mean_level']:.1f}" for p in prof)
                lines.append(f"| {seed} | {t['method']} | {budget:g} | {_pct(t['accuracy'])} | "
                             f"{t['act_ratio']:.3f} | {levels} |")
    return "\n".join(lines) + "\n"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def markdown(report: Mapping) -> str:
    """study.md: the mean table over seeds, the per-seed accuracies, paired tests, targets."""
    seeds = report["seeds"]
    lines = [f"Seeds {', '.join(map(str, seeds))}; {report['n_test']} held-out test problems per "
             "seed. Acc = mean over seeds (95% Student-t interval over seeds); per seed: "
             "accuracy (95% Wilson interval).", "",
             "| method | control | Acc (%) | 95% CI (seeds) | spread | ActRatio | Tokens | "
             + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(seeds)]
    by_seed = {(row_key(r), r["seed"]): r for r in report["rows"]}
    for t in report["summary"]:
        cells = []
        for s in seeds:
            r = by_seed.get(((t["method"], t["control"], t["budget"]), s))
            cells.append("-" if r is None else
                         f"{_pct(r['acc'])} ({_pct(r['acc_ci'][0])}-{_pct(r['acc_ci'][1])})")
        ratio = t["act_ratio_mean"]
        name = t["method"] if t["budget"] is None else f"{t['method']} B={t['budget']}"
        lines.append(f"| {name} | {t['control']} | {_pct(t['acc_mean'])} | "
                     f"{_pct(t['acc_ci'][0])}-{_pct(t['acc_ci'][1])} | {_pct(t['acc_spread'])} | "
                     f"{'-' if ratio is None else f'{ratio:.3f}'} | {t['tokens_mean']:.1f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Paired comparisons on the same questions (a - b, points; 95% paired-bootstrap "
              "interval; exact McNemar p):", "",
              "| seed | a | b | diff | 95% CI | a only | b only | McNemar p |",
              "|---:|---|---|---:|---:|---:|---:|---:|"]
    for p in report["paired"]:
        at = "" if p.get("budget") is None else f" B={p['budget']:g}"
        lines.append(f"| {p['seed']} | {p['a']['method']} {p['a']['control']}{at} | "
                     f"{p['b']['method']} {p['b']['control']} | {100 * p['diff']:+.1f} | "
                     f"{100 * p['diff_ci'][0]:+.1f} to {100 * p['diff_ci'][1]:+.1f} | "
                     f"{p['a_only']} | {p['b_only']} | {p['p_mcnemar']:.3g} |")
    t = report["targets"]
    lines += ["", "Targets, seeds met of " + str(len(seeds)) + ": "
              f"<COMP_20> >= base - 5 at ActRatio <= 0.35: {t['comp20_seeds_met']}; "
              f"TokenSkip-style clearly below at <COMP_20>: {t['tokenskip_below_seeds_met']}; "
              f"CHRPO >= base - 1: {t['chrpo_seeds_met']}."]
    if "base_acc_mean" in t:
        lines.append(f"Base model: mean {_pct(t['base_acc_mean'])}%, spread "
                     f"{_pct(t['base_acc_spread'])} points.")
    for key, who in (("budget_targets", "CHRPO"),
                     ("budget_decode_targets", "CHRPO decoded under its budget (chrpo-budget)")):
        if not report.get(key):
            continue
        lines += ["", f"Budget targets of {who} (means over seeds; the frontier is Extra-CoT's "
                  "fixed levels interpolated at the policy's ActRatio; vs ceiling: the policy "
                  "minus the per-difficulty fixed-level ceiling at the budget; peers: the policy "
                  "minus the peer, points, and the same on the frontier-relative scale):", "",
                  "| budget | ActRatio | met | Acc (%) | frontier (%) | margin | "
                  "vs ceiling | level gap | vs peers |",
                  "|---:|---:|---|---:|---:|---:|---:|---:|---|"]
        for e in report[key]["per_budget"]:
            peers = "; ".join(
                f"{m} {100 * p['acc_diff']:+.1f}"
                + ("" if p["matched_margin"] is None else f" ({100 * p['matched_margin']:+.1f})")
                for m, p in e["vs_peers"].items()) or "-"
            gap, margin, ceil = e.get("level_gap"), e["frontier_margin"], e.get("ceiling_margin")
            ratio, met = e["act_ratio"], e["budget_met"]
            lines.append(f"| {e['budget']:g} | {'-' if ratio is None else f'{ratio:.3f}'} | "
                         f"{'-' if met is None else ('yes' if met else 'no')} | "
                         f"{_pct(e['acc'])} | "
                         f"{_pct(e['frontier_acc'])} | "
                         f"{'-' if margin is None else f'{100 * margin:+.1f}'} | "
                         f"{'-' if ceil is None else f'{100 * ceil:+.1f}'} | "
                         f"{'-' if gap is None else f'{gap:+.1f}'} | {peers} |")
    return "\n".join(lines + _bound_lines(report) + _level_lines(report)) + "\n"


def _bound_lines(report: Mapping) -> list[str]:
    """The level bounds (study_report.level_bounds): means over seeds, per budget."""
    bounds = report.get("level_bounds")
    if not bounds:
        return []
    lines = ["", "The most a choice among Extra-CoT's fixed levels could answer at each budget, "
             "in hindsight on the test answers (a ceiling, not a method; per question, or one "
             "level mix per difficulty); mean level by difficulty averaged over seeds:", "",
             "| budget | bound | Acc (%) | 95% CI (seeds) | ActRatio | per seed | mean level |",
             "|---:|---|---:|---:|---:|---|---|"]
    for t in bounds["summary"]:
        got = [b for b in bounds["rows"] if b["bound"] == t["bound"]
               and b["budget"] == t["budget"]]
        keys = sorted({k for b in got for k in b["mean_level"]}, key=_numeric_first)
        means = {k: statistics.fmean(b["mean_level"][k] for b in got if k in b["mean_level"])
                 for k in keys}
        level = "; ".join(f"{k}: {v:.1f}" for k, v in means.items())
        lines.append(f"| {t['budget']:g} | {t['bound']} | {_pct(t['acc_mean'])} | "
                     f"{_pct(t['acc_ci'][0])}-{_pct(t['acc_ci'][1])} | "
                     f"{t['act_ratio_mean']:.3f} | "
                     + " / ".join(_pct(a) for a in t["acc_by_seed"]) + f" | {level or '-'} |")
    return lines


def _numeric_first(key: str):
    return (0, float(key), "") if key.replace(".", "", 1).lstrip("-").isdigit() else (1, 0.0, key)


def _level_lines(report: Mapping) -> list[str]:
    """Per seed, the CHRPO policies' mean level (and accuracy) on each difficulty."""
    rows = [r for r in report.get("difficulty", ()) if r["method"] in ("chrpo", "chrpo-budget")]
    if not rows:
        return []
    key = report.get("difficulty_key") or next(      # reports before the key was recorded
        k for k in rows[0] if k not in ("seed", "method", "budget", "mean_level", "acc",
                                        "think_tokens", "n"))
    cells: dict[tuple, list[str]] = {}
    for r in sorted(rows, key=lambda r: (r["seed"], r["method"], r.get("budget") or 0, r[key])):
        level = "-" if r["mean_level"] is None else f"{r['mean_level']:.1f}"
        cells.setdefault((r["seed"], r["method"], r.get("budget")), []).append(
            f"{r[key]}: {level} ({_pct(r['acc'])}%)")
    lines = ["", f"Mean level (accuracy) of the CHRPO policies by {key}, per seed:", "",
             "| seed | method | budget | by difficulty |", "|---:|---|---:|---|"]
    return lines + [f"| {s} | {m} | {'-' if b is None else f'{b:g}'} | {'; '.join(c)} |"
                    for (s, m, b), c in sorted(cells.items(), key=lambda x: (x[0][0], x[0][1],
                                                                             x[0][2] or 0))]


def plot(report: Mapping, path: str) -> str:
    """Accuracy against ActRatio, means over seeds with their 95% intervals on both axes."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 4.2))
    summary = [t for t in report["summary"] if t["act_ratio_mean"] is not None]

    def draw(points, fmt, label, **kw):
        points = sorted(points, key=lambda t: t["act_ratio_mean"])
        x = [t["act_ratio_mean"] for t in points]
        y = [100 * t["acc_mean"] for t in points]
        yerr = [[100 * (t["acc_mean"] - t["acc_ci"][0]) for t in points],
                [100 * (t["acc_ci"][1] - t["acc_mean"]) for t in points]]
        xerr = [[t["act_ratio_mean"] - t["act_ratio_ci"][0] for t in points],
                [t["act_ratio_ci"][1] - t["act_ratio_mean"] for t in points]]
        ax.errorbar(x, y, yerr=yerr, xerr=xerr, fmt=fmt, capsize=3, label=label, **kw)

    for method, fmt in (("extra-cot", "o-"), ("tokenskip", "s--")):
        pts = [t for t in summary if t["method"] == method and t["budget"] is None]
        if pts:
            draw(pts, fmt, f"{method} (fixed levels)")
    for method, fmt in (("base", "*"), ("policy-warm-start", "v"), ("chrpo", "D")):
        pts = [t for t in summary if t["method"] == method and t["budget"] is None]
        if pts:
            draw(pts, fmt, method, markersize=9)
    for method, fmt in (("chrpo", "D-"), ("chrpo-budget", "P-"), ("lcpo", "^:"),
                        ("length-penalty", "x:")):
        pts = [t for t in summary if t["method"] == method and t["budget"] is not None]
        if pts:
            draw(pts, fmt, f"{method} (budget sweep)", markersize=7)
    for bound, fmt in (("per_question", "k:"), ("per_difficulty", "k--")):
        pts = sorted((t for t in (report.get("level_bounds") or {}).get("summary", ())
                      if t["bound"] == bound), key=lambda t: t["act_ratio_mean"])
        if pts:
            ax.errorbar([t["act_ratio_mean"] for t in pts], [100 * t["acc_mean"] for t in pts],
                        yerr=[[100 * (t["acc_mean"] - t["acc_ci"][0]) for t in pts],
                              [100 * (t["acc_ci"][1] - t["acc_mean"]) for t in pts]],
                        fmt=fmt, capsize=2, alpha=0.6, linewidth=1,
                        label=f"fixed-level ceiling, {bound.replace('_', ' ')} (hindsight)")
    ax.set_xlabel("ActRatio (think tokens / base)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{len(report['seeds'])} seeds, {report['n_test']} test problems each")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:   # e.g. a base model with no think tokens: no ActRatio to place a point at
        ax.text(0.5, 0.5, "nothing to draw: no method has an ActRatio", ha="center",
                va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(report: Mapping, out_dir: str) -> list[str]:
    """study.json, study.md and the plot under ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "study.json"), os.path.join(out_dir, "study.md")]
    with open(paths[0], "w") as f:
        json.dump(report, f, indent=1, allow_nan=False)
        f.write("\n")
    with open(paths[1], "w") as f:
        f.write(markdown(report))
    paths.append(plot(report, os.path.join(out_dir, "accuracy_vs_actratio.png")))
    return paths

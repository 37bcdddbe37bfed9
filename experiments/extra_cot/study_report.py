"""The multi-seed study's report: per-seed tables, means over seeds, paired tests, targets.

``study_report`` turns ``{seed: per-question rows of evaluate/responses.jsonl}`` (and,
when given, each seed's budget sweep, ``experiments.extra_cot.study.sweep_runs``) into study.json:

- ``rows``: per seed and method the accuracy with its 95% Wilson interval, ActRatio,
  think tokens and n; ``difficulty``: the same by difficulty; ``summary``: means over
  seeds with a Student-t interval; ``paired``: comparisons on the same questions,
  exact McNemar and a paired bootstrap of the accuracy difference; ``targets``: the
  targets of docs/results.md per seed; ``budget_targets``: the budget sweep's
  targets (``sweep_targets``) and, where the sweep decoded CHRPO under its budget,
  ``budget_decode_targets``. Rows of the sweep carry their ``budget``. Strict JSON.

``markdown`` writes study.md, ``plot`` accuracy_vs_actratio.png (error bars from the
seeds). The statistics are experiments/extra_cot/stats.py; the per-seed tables are
experiments/extra_cot/evaluate.py's, so the study and a single run count alike.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from experiments import rundir
from experiments.extra_cot import evaluate, stats

__all__ = ["COMPARISONS", "DIFFICULTY_METHODS", "PEERS", "POLICIES", "seed_tables", "sweep_rows",
           "sweep_tables", "sweep_markdown", "frontier", "sweep_targets", "summarise",
           "paired_tests", "targets", "study_report", "markdown", "plot", "write_report"]

COMPARISONS = (
    (("extra-cot", "<COMP_20>"), ("tokenskip", "<COMP_20>")),
    (("extra-cot", "<COMP_20>"), ("base", "-")),
    (("chrpo", "<COMP_POLICY>"), ("base", "-")),
    (("chrpo", "<COMP_POLICY>"), ("policy-warm-start", "<COMP_POLICY>")),
)
"""(a, b) pairs compared on the same questions, per seed: ``a`` minus ``b``."""

DIFFICULTY_METHODS = ("base", "policy-warm-start", "chrpo", "chrpo-budget", "lcpo",
                      "length-penalty")

PEERS = ("lcpo", "length-penalty")
"""The budget sweep's peers of CHRPO (``experiments.extra_cot.study.SWEEP_METHODS``)."""

POLICIES = ("chrpo", "chrpo-budget")
"""CHRPO's RL policy as decoded greedily and under its budget (experiments/extra_cot/evaluate.py)."""

def seed_tables(seed: int, rows: Sequence[dict], *, difficulty_key: str = "n_steps",
                budget: float | None = None) -> tuple[list[dict], list[dict]]:
    """One seed's (rows, difficulty) entries of study.json from its per-question verdicts."""
    table = evaluate.results_table(rows)
    out = [{"seed": int(seed), "method": t["method"], "control": t["control"], "budget": budget,
            "acc": t["accuracy"], "acc_ci": t["acc_ci"], "act_ratio": t["act_ratio"],
            "tokens": t["think_tokens"], "valid": t["valid"], "mean_level": t["mean_level"],
            "n": t["n"]} for t in table]
    diff = []
    for method in DIFFICULTY_METHODS:
        for p in evaluate.difficulty_profile(rows, method=method, key=difficulty_key):
            diff.append({"seed": int(seed), "method": method, "budget": budget,
                         difficulty_key: p[difficulty_key], "mean_level": p["mean_level"],
                         "acc": p["accuracy"], "think_tokens": p["think_tokens"], "n": p["n"]})
    return out, diff


def sweep_rows(method: str, rows: Sequence[dict], *, warm_start: bool) -> list[dict]:
    """A sweep run's verdicts relabelled: its RL policy as ``method``, its base rows kept
    (the ActRatio reference), its warm start only where ``warm_start``, and, in
    CHRPO's runs, the budget decode of its policy ('chrpo-budget')."""
    out = []
    for r in rows:
        if r["method"] == "chrpo":
            out.append({**r, "method": method})
        elif r["method"] == "base" or (warm_start and r["method"] == "policy-warm-start") or (
                method == "chrpo" and r["method"] == "chrpo-budget"):
            out.append(r)
    return out


def sweep_tables(seed: int, runs: Mapping[tuple[str, float], Sequence[dict]], *,
                 difficulty_key: str = "n_steps", samples: int = 10_000
                 ) -> tuple[list[dict], list[dict], list[dict]]:
    """One seed's sweep entries of study.json: (rows, difficulty, paired), each with
    its ``budget``; CHRPO is compared with each peer and the base on the same questions."""
    rows, diff, paired = [], [], []
    for budget in sorted({b for _, b in runs}):
        merged: list[dict] = []
        for (method, b), got in runs.items():
            if b != budget:
                continue
            relabelled = sweep_rows(method, got, warm_start=method == "chrpo")
            r, d = seed_tables(seed, relabelled, difficulty_key=difficulty_key, budget=budget)
            rows += [x for x in r if x["method"] != "base"]
            diff += [x for x in d if x["method"] != "base"]
            keep_base = not merged          # the base rows once, from the first run
            merged += [x for x in relabelled if keep_base or x["method"] != "base"]
        comparisons = [((p, "<COMP_POLICY>"), (m, "<COMP_POLICY>"))
                       for p in POLICIES for m in PEERS]
        comparisons += [((p, "<COMP_POLICY>"), ("base", "-")) for p in POLICIES]
        comparisons.append((("chrpo-budget", "<COMP_POLICY>"), ("chrpo", "<COMP_POLICY>")))
        paired += paired_tests(seed, merged, comparisons=comparisons, budget=budget,
                               samples=samples)
    return rows, diff, paired


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


def frontier(summary: Sequence[dict], act_ratio: float, *, method: str = "extra-cot"
             ) -> float | None:
    """The fixed-level frontier's accuracy at ``act_ratio``: the means over seeds of
    ``method``'s fixed levels, linearly interpolated (held flat beyond the ends)."""
    pts = sorted((t["act_ratio_mean"], t["acc_mean"]) for t in summary
                 if t["method"] == method and t["budget"] is None
                 and t["act_ratio_mean"] is not None)
    if not pts:
        return None
    return float(np.interp(act_ratio, [p[0] for p in pts], [p[1] for p in pts]))


def sweep_targets(summary: Sequence[dict], difficulty: Sequence[dict], *,
                  difficulty_key: str = "n_steps", tolerance: float = 0.05,
                  adapt_budget: float = 0.3, adapt_gap: float = 15.0,
                  policy: str = "chrpo") -> dict:
    """The budget targets of docs/results.md on the means over seeds, per budget, for
    ``policy`` ('chrpo', or 'chrpo-budget': the same policy decoded under its budget):

    - ``budget_met``: |ActRatio - B| <= ``tolerance``;
    - ``above_frontier``: accuracy above the Extra-CoT fixed-level frontier at the
      policy's ActRatio (``frontier``), with the margin in ``frontier_margin``;
    - ``base_minus_1`` (at ``adapt_budget`` only): accuracy >= base - 1 point;
    - ``level_gap`` (at ``adapt_budget``): mean level on the hardest difficulty minus the
      easiest's (each the mean over seeds), ``adaptive`` when >= ``adapt_gap``;
    - ``vs_peers``: CHRPO's accuracy minus each peer's at the same budget
      (``acc_diff``), and at matched ActRatio (``matched_margin``: CHRPO's frontier
      margin minus the peer's, each accuracy measured against the frontier at the
      method's own ActRatio).
    """
    base = next((t for t in summary if t["method"] == "base" and t["budget"] is None), None)
    out = []
    for b in sorted({t["budget"] for t in summary if t["budget"] is not None}):
        at = {t["method"]: t for t in summary if t["budget"] == b}
        pol = at.get(policy)
        if pol is None:
            continue
        ratio = pol["act_ratio_mean"]      # None where the base model wrote no think tokens
        edge = None if ratio is None else frontier(summary, ratio)
        entry = {"budget": b, "act_ratio": ratio, "acc": pol["acc_mean"],
                 "budget_met": None if ratio is None else abs(ratio - b) <= tolerance,
                 "frontier_acc": edge,
                 "frontier_margin": None if edge is None else pol["acc_mean"] - edge,
                 "above_frontier": None if edge is None else pol["acc_mean"] > edge}
        if abs(b - adapt_budget) < 1e-9:
            if base is not None:
                entry["base_minus_1"] = pol["acc_mean"] >= base["acc_mean"] - 0.01
            levels: dict = {}
            for d in difficulty:
                if d["method"] == policy and d["budget"] == b and np.isfinite(d["mean_level"]):
                    levels.setdefault(d[difficulty_key], []).append(d["mean_level"])
            if len(levels) >= 2:
                keys = sorted(levels)
                gap = float(np.mean(levels[keys[-1]]) - np.mean(levels[keys[0]]))
                entry["level_gap"], entry["adaptive"] = gap, gap >= adapt_gap
        peers = {}
        for m, t in at.items():
            if m not in PEERS or t["act_ratio_mean"] is None:
                continue
            peer_edge = frontier(summary, t["act_ratio_mean"])
            peers[m] = {"acc_diff": pol["acc_mean"] - t["acc_mean"],
                        "act_ratio": t["act_ratio_mean"],
                        "matched_margin": None if edge is None or peer_edge is None else
                        (pol["acc_mean"] - edge) - (t["acc_mean"] - peer_edge)}
        entry["vs_peers"] = peers
        out.append(entry)
    return {"per_budget": out}


def _key(row: Mapping) -> tuple:
    return row["method"], row["control"], row.get("budget")


def summarise(rows: Sequence[dict]) -> list[dict]:
    """Mean over seeds per (method, control, budget), with Student-t 95% intervals
    (an accuracy's clipped to [0, 1], a ratio's to >= 0: a few seeds far apart give a
    t-interval wider than the range it lives in)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(_key(r), []).append(r)
    out = []
    for (method, control, budget), group in groups.items():
        group = sorted(group, key=lambda r: r["seed"])
        accs = [r["acc"] for r in group]
        acc, acc_lo, acc_hi = stats.mean_interval(accs)
        ratios = [r["act_ratio"] for r in group if r["act_ratio"] is not None
                  and np.isfinite(r["act_ratio"])]
        ratio = stats.mean_interval(ratios) if ratios else (None, None, None)
        out.append({"method": method, "control": control, "budget": budget,
                    "seeds": [r["seed"] for r in group], "acc_by_seed": accs,
                    "acc_mean": acc, "acc_ci": [max(0.0, acc_lo), min(1.0, acc_hi)],
                    "acc_spread": max(accs) - min(accs),
                    "act_ratio_mean": ratio[0],
                    "act_ratio_ci": [None if ratio[1] is None else max(0.0, ratio[1]), ratio[2]],
                    "tokens_mean": float(np.mean([r["tokens"] for r in group]))})
    return out


def _verdicts(rows: Sequence[dict], method: str, control: str) -> dict[str, bool]:
    return {r["uid"]: bool(r["correct"]) for r in rows
            if r["method"] == method and r["control"] == control}


def paired_tests(seed: int, rows: Sequence[dict], *, comparisons=COMPARISONS,
                 budget: float | None = None, samples: int = 10_000) -> list[dict]:
    """Each comparison on the questions both methods answered (same uid): a - b."""
    out = []
    for (ma, ca), (mb, cb) in comparisons:
        a, b = _verdicts(rows, ma, ca), _verdicts(rows, mb, cb)
        uids = sorted(set(a) & set(b))
        if not uids:
            continue
        va, vb = [a[u] for u in uids], [b[u] for u in uids]
        boot = stats.paired_bootstrap(va, vb, samples=samples, seed=seed)
        test = stats.mcnemar(va, vb)
        out.append({"seed": int(seed), "budget": budget, "a": {"method": ma, "control": ca},
                    "b": {"method": mb, "control": cb}, "n": len(uids), "diff": boot["diff"],
                    "diff_ci": boot["ci"], "p_bootstrap": boot["p_value"],
                    "a_only": test["a_only"], "b_only": test["b_only"],
                    "p_mcnemar": test["p_value"]})
    return out


def _lookup(rows: Sequence[dict], seed: int, method: str, control: str) -> dict | None:
    return next((r for r in rows if r["seed"] == seed and r["method"] == method
                 and r["control"] == control and r.get("budget") is None), None)


def targets(rows: Sequence[dict], paired: Sequence[dict], seeds: Sequence[int]) -> dict:
    """The targets of docs/results.md, per seed (None where a method is missing).

    - ``comp20``: Extra-CoT <COMP_20> accuracy >= base - 5 points at ActRatio <= 0.35;
    - ``tokenskip_below``: TokenSkip-style <COMP_20> below Extra-CoT <COMP_20>,
      McNemar p < 0.05 on the same questions ("clearly below");
    - ``chrpo``: CHRPO policy accuracy >= base - 1 point.
    Plus the base model's accuracy mean and spread (max - min) over seeds.
    """
    per_seed = []
    for s in seeds:
        base = _lookup(rows, s, "base", "-")
        c20 = _lookup(rows, s, "extra-cot", "<COMP_20>")
        pol = _lookup(rows, s, "chrpo", "<COMP_POLICY>")
        test = next((p for p in paired if p["seed"] == s and p["a"]["method"] == "extra-cot"
                     and p["b"]["method"] == "tokenskip" and p["budget"] is None), None)
        per_seed.append({
            "seed": s,
            "comp20": None if not (base and c20) else bool(
                c20["acc"] >= base["acc"] - 0.05 and c20["act_ratio"] <= 0.35),
            "tokenskip_below": None if test is None else bool(
                test["diff"] > 0 and test["p_mcnemar"] < 0.05),
            "chrpo": None if not (base and pol) else bool(pol["acc"] >= base["acc"] - 0.01)})
    base_accs = [r["acc"] for r in rows if r["method"] == "base" and r.get("budget") is None]
    out = {"per_seed": per_seed}
    for name in ("comp20", "tokenskip_below", "chrpo"):
        out[f"{name}_seeds_met"] = sum(bool(p[name]) for p in per_seed)
    if base_accs:
        out["base_acc_mean"] = float(np.mean(base_accs))
        out["base_acc_spread"] = float(max(base_accs) - min(base_accs))
    return out


def study_report(seed_rows: Mapping[int, Sequence[dict]], *, difficulty_key: str = "n_steps",
                 samples: int = 10_000,
                 sweep: Mapping[int, Mapping[tuple[str, float], Sequence[dict]]] | None = None
                 ) -> dict:
    """study.json from ``{seed: per-question rows of evaluate/responses.jsonl}`` and, when
    given, each seed's budget sweep (``sweep_runs``)."""
    seeds = sorted(int(s) for s in seed_rows)
    rows, diff, paired = [], [], []
    for s in seeds:
        r, d = seed_tables(s, seed_rows[s], difficulty_key=difficulty_key)
        rows += r
        diff += d
        paired += paired_tests(s, seed_rows[s], samples=samples)
        if sweep and s in sweep:
            r, d, p = sweep_tables(s, sweep[s], difficulty_key=difficulty_key, samples=samples)
            rows, diff, paired = rows + r, diff + d, paired + p
    n_test = sorted({r["n"] for r in rows if r["method"] == "base"})
    summary = summarise(rows)
    report = {"seeds": seeds, "n_test": n_test[0] if len(n_test) == 1 else n_test,
              "rows": rows, "difficulty": diff, "summary": summary, "paired": paired,
              "targets": targets(rows, paired, seeds)}
    if sweep:
        report["budget_targets"] = sweep_targets(summary, diff, difficulty_key=difficulty_key)
        decoded = sweep_targets(summary, diff, difficulty_key=difficulty_key,
                                policy="chrpo-budget")
        if decoded["per_budget"]:
            report["budget_decode_targets"] = decoded
    return rundir.strict_json(report)


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
    by_seed = {(_key(r), r["seed"]): r for r in report["rows"]}
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
                  "fixed levels interpolated at the policy's ActRatio; peers: the policy minus "
                  "the peer, points, and the same on the frontier-relative scale):", "",
                  "| budget | ActRatio | met | Acc (%) | frontier (%) | margin | level gap | "
                  "vs peers |", "|---:|---:|---|---:|---:|---:|---:|---|"]
        for e in report[key]["per_budget"]:
            peers = "; ".join(
                f"{m} {100 * p['acc_diff']:+.1f}"
                + ("" if p["matched_margin"] is None else f" ({100 * p['matched_margin']:+.1f})")
                for m, p in e["vs_peers"].items()) or "-"
            gap, margin = e.get("level_gap"), e["frontier_margin"]
            ratio, met = e["act_ratio"], e["budget_met"]
            lines.append(f"| {e['budget']:g} | {'-' if ratio is None else f'{ratio:.3f}'} | "
                         f"{'-' if met is None else ('yes' if met else 'no')} | "
                         f"{_pct(e['acc'])} | "
                         f"{_pct(e['frontier_acc'])} | "
                         f"{'-' if margin is None else f'{100 * margin:+.1f}'} | "
                         f"{'-' if gap is None else f'{gap:+.1f}'} | {peers} |")
    return "\n".join(lines) + "\n"


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

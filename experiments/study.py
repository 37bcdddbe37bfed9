"""The multi-seed study: the whole pipeline once per seed, every figure with its interval.

    python -m experiments.study                                   # seeds 0, 1, 2 of the default
    python -m experiments.study --config.study.seeds=0,1,2,3,4    # five seeds

Each seed is one run directory, ``<study.root>/seed<k>``, holding the main job
with ``seed=k`` (model initialisation, batch order and sampling; the problem
streams are the same for every seed, so every seed answers the same test
questions). A finished stage of a seed is skipped, so a re-run only does what
is missing. Then the per-question verdicts of every seed
(``evaluate/responses.jsonl``) become ``<study.out_dir>``:

- ``study.json``: per seed and method the accuracy with its 95% Wilson
  interval, ActRatio, think tokens and n (``rows``); the same by difficulty
  (``difficulty``); means over seeds with a Student-t interval (``summary``);
  paired comparisons on the same questions, exact McNemar and a paired
  bootstrap of the accuracy difference (``paired``); and the targets of
  docs/results.md per seed (``targets``). Strict JSON: no NaN.
- ``study.md``: the tables; ``accuracy_vs_actratio.png``: the plot, error bars
  from the seeds.

The statistics are experiments/stats.py; the per-seed tables are
experiments/evaluate.py's, so the study and a single run count alike.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np

from experiments import cli, evaluate, rundir, stats

__all__ = ["seed_config", "seed_tables", "summarise", "paired_tests", "targets", "study_report",
           "markdown", "plot", "main", "COMPARISONS"]

COMPARISONS = (
    (("extra-cot", "<COMP_20>"), ("tokenskip", "<COMP_20>")),
    (("extra-cot", "<COMP_20>"), ("base", "-")),
    (("chrpo", "<COMP_POLICY>"), ("base", "-")),
    (("chrpo", "<COMP_POLICY>"), ("policy-warm-start", "<COMP_POLICY>")),
)
"""(a, b) pairs compared on the same questions, per seed: ``a`` minus ``b``."""

DIFFICULTY_METHODS = ("base", "policy-warm-start", "chrpo")


def seed_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    """The pipeline config of one seed: ``seed`` and ``run_dir`` set, the study block gone."""
    c = config.copy_and_resolve_references()
    c.unlock()
    c.seed = int(seed)
    c.run_dir = os.path.join(config.study.root, f"seed{int(seed)}")
    del c["study"]
    c.lock()
    return c


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
                 samples: int = 10_000) -> dict:
    """study.json from ``{seed: per-question rows of evaluate/responses.jsonl}``."""
    seeds = sorted(int(s) for s in seed_rows)
    rows, diff, paired = [], [], []
    for s in seeds:
        r, d = seed_tables(s, seed_rows[s], difficulty_key=difficulty_key)
        rows += r
        diff += d
        paired += paired_tests(s, seed_rows[s], samples=samples)
    n_test = sorted({r["n"] for r in rows if r["method"] == "base"})
    return rundir.strict_json({
        "seeds": seeds, "n_test": n_test[0] if len(n_test) == 1 else n_test,
        "rows": rows, "difficulty": diff, "summary": summarise(rows), "paired": paired,
        "targets": targets(rows, paired, seeds)})


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
        lines.append(f"| {p['seed']} | {p['a']['method']} {p['a']['control']} | "
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


def main(config: ml_collections.ConfigDict) -> dict:
    """Run (or resume) every seed's pipeline, then write the study's report."""
    from experiments.pipeline import run_stages  # noqa: PLC0415

    seed_rows = {}
    for i, seed in enumerate(config.study.seeds, start=1):
        c = seed_config(config, seed)
        print(f"=== study: seed {seed} ({i}/{len(config.study.seeds)}), {c.run_dir}", flush=True)
        run_stages(c)
        seed_rows[int(seed)] = rundir.read_jsonl(os.path.join(c.run_dir, "evaluate",
                                                              "responses.jsonl"))
    report = study_report(seed_rows, difficulty_key=config.evaluate.difficulty_key)
    paths = write_report(report, config.study.out_dir)
    print(open(paths[1]).read())
    print("wrote " + ", ".join(paths))
    return report


if __name__ == "__main__":
    cli.run(main, default="experiments/configs/study.py")

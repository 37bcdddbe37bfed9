"""The multi-seed study's report: per-seed tables, means over seeds, paired tests, targets.

``study_report`` turns ``{seed: per-question rows of evaluate/responses.jsonl}`` (and,
when given, each seed's budget sweep, ``experiments.extra_cot.study.sweep_runs``) into study.json:

- ``rows``: per seed and method the accuracy with its 95% Wilson interval, ActRatio,
  think tokens and n; ``difficulty``: the same by difficulty; ``summary``: means over
  seeds with a Student-t interval; ``paired``: comparisons on the same questions,
  exact McNemar and a paired bootstrap of the accuracy difference; ``targets``: the
  targets of docs/results.md per seed; ``budget_targets``: the budget sweep's
  targets (``sweep_targets``) and, where the sweep decoded CHRPO under its budget,
  ``budget_decode_targets``. Rows of the sweep carry their ``budget``;
  ``level_bounds`` (``level_bounds``, ``summarise_bounds``): at each budget of the sweep,
  the most that a choice among Extra-CoT's fixed levels could answer, in hindsight, per
  question and per difficulty, and in each budget target entry ``ceiling_margin``: the
  policy's accuracy minus the per-difficulty ceiling. ``difficulty_key`` names the
  difficulty field. Strict JSON.

experiments/extra_cot/study_render.py writes it as files (study.json, study.md and the
plot accuracy_vs_actratio.png). The statistics are experiments/extra_cot/stats.py; the per-seed tables are
experiments/extra_cot/evaluate.py's, so the study and a single run count alike.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

import chrpo
from experiments import rundir
from experiments.extra_cot import evaluate, stats

__all__ = ["COMPARISONS", "DIFFICULTY_METHODS", "PEERS", "POLICIES", "seed_tables", "sweep_rows",
           "sweep_tables", "frontier", "sweep_targets", "summarise", "row_key", "paired_tests",
           "targets", "level_bounds", "summarise_bounds", "study_report"]

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
                  policy: str = "chrpo", ceiling: Mapping[float, float] | None = None) -> dict:
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
      method's own ActRatio);
    - ``ceiling_margin`` (where ``ceiling`` gives the budget's per-difficulty fixed-level
      ceiling, ``level_bounds``): the policy's accuracy minus it.
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
        if ceiling is not None:
            c = ceiling.get(b)
            entry["ceiling_acc"] = c
            entry["ceiling_margin"] = None if c is None else pol["acc_mean"] - c
        out.append(entry)
    return {"per_budget": out}


def _acc_interval(accs: Sequence[float]) -> tuple[float, list[float]]:
    """An accuracy's mean over seeds and its Student-t 95% interval, clipped to [0, 1]."""
    mean, lo, hi = stats.mean_interval(accs)
    return mean, [max(0.0, lo), min(1.0, hi)]


def row_key(row: Mapping) -> tuple:
    return row["method"], row["control"], row.get("budget")


def summarise(rows: Sequence[dict]) -> list[dict]:
    """Mean over seeds per (method, control, budget), with Student-t 95% intervals
    (an accuracy's clipped to [0, 1], a ratio's to >= 0: a few seeds far apart give a
    t-interval wider than the range it lives in)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(row_key(r), []).append(r)
    out = []
    for (method, control, budget), group in groups.items():
        group = sorted(group, key=lambda r: r["seed"])
        accs = [r["acc"] for r in group]
        acc, acc_ci = _acc_interval(accs)
        ratios = [r["act_ratio"] for r in group if r["act_ratio"] is not None
                  and np.isfinite(r["act_ratio"])]
        ratio = stats.mean_interval(ratios) if ratios else (None, None, None)
        out.append({"method": method, "control": control, "budget": budget,
                    "seeds": [r["seed"] for r in group], "acc_by_seed": accs,
                    "acc_mean": acc, "acc_ci": acc_ci,
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


def _level_of(control: str) -> int:
    return int(control.strip("<>").rsplit("_", 1)[1])      # '<COMP_40>' -> 40


def level_bounds(seed: int, rows: Sequence[dict], budgets: Sequence[float], *,
                 difficulty_key: str = "n_steps", method: str = "extra-cot") -> list[dict]:
    """What choosing among ``method``'s fixed levels could answer at each budget, at most.

    Each question q was answered at every level k (``correct[q, k]``, think tokens
    ``t[q, k]``); a choice ``c_q`` costs ``ActRatio = mean_q t[q, c_q] / mean_q t_base[q]``.
    Two bounds per budget B, both in hindsight on these very answers (a ceiling, not a
    method), each solved by ``chrpo.allocate_levels`` (within one question of the best):

    - ``per_question``: max ``mean_q correct[q, c_q]`` at ActRatio <= B, any choice per question;
    - ``per_difficulty``: the same where all questions of one difficulty value look alike
      (each level's accuracy and cost averaged over the bucket), the most a policy
      that knows only the difficulty could reach; scored on the questions' own answers.

    Questions missing a level or the base model's answer are left out. Returns one entry
    per budget and bound: ``{seed, budget, bound, acc, act_ratio, n, mean_level}`` with
    ``mean_level`` ``{str(difficulty): mean chosen level}``; [] when the rows have no fixed
    levels or the base model wrote no think tokens.
    """
    base = {r["uid"]: r for r in rows if r["method"] == "base"}
    fixed = {(r["uid"], r["control"]): r for r in rows if r["method"] == method}
    controls = sorted({c for _, c in fixed}, key=_level_of)
    uids = [u for u in base if all((u, c) in fixed for c in controls)]
    base_tokens = float(np.mean([base[u]["think_length"] for u in uids])) if uids else 0.0
    if not controls or base_tokens <= 0:
        return []
    correct = np.array([[float(fixed[u, c]["correct"]) for c in controls] for u in uids])
    cost = np.array([[fixed[u, c]["think_length"] / base_tokens for c in controls]
                     for u in uids])
    levels = np.array([_level_of(c) for c in controls])
    difficulty = [fixed[u, controls[0]]["difficulty"].get(difficulty_key) for u in uids]
    bucket_acc, bucket_cost = correct.copy(), cost.copy()
    for d in set(difficulty):
        rows_d = np.array([x == d for x in difficulty])
        bucket_acc[rows_d] = correct[rows_d].mean(axis=0)
        bucket_cost[rows_d] = cost[rows_d].mean(axis=0)
    out, idx = [], np.arange(len(uids))
    for budget in sorted(float(b) for b in budgets):
        for bound, acc, price in (("per_question", correct, cost),
                                  ("per_difficulty", bucket_acc, bucket_cost)):
            choice, _, _ = chrpo.allocate_levels(acc, price, budget)
            choice = np.asarray(choice)
            by = {}
            for d in sorted(set(difficulty) - {None}):
                by[str(d)] = float(np.mean([levels[c] for c, x in zip(choice, difficulty)
                                            if x == d]))
            out.append({"seed": int(seed), "budget": budget, "bound": bound, "n": len(uids),
                        "acc": float(correct[idx, choice].mean()),
                        "act_ratio": float(cost[idx, choice].mean()), "mean_level": by})
    return out


def summarise_bounds(bounds: Sequence[dict]) -> list[dict]:
    """Means over seeds per (bound, budget), Student-t 95% intervals (``summarise``'s)."""
    groups: dict[tuple, list[dict]] = {}
    for b in bounds:
        groups.setdefault((b["bound"], b["budget"]), []).append(b)
    out = []
    for (bound, budget), group in sorted(groups.items(), key=lambda g: (g[0][1], g[0][0])):
        acc, acc_ci = _acc_interval([g["acc"] for g in group])
        out.append({"bound": bound, "budget": budget, "seeds": [g["seed"] for g in group],
                    "acc_by_seed": [g["acc"] for g in group], "acc_mean": acc,
                    "acc_ci": acc_ci,
                    "act_ratio_mean": float(np.mean([g["act_ratio"] for g in group]))})
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
              "difficulty_key": difficulty_key, "rows": rows, "difficulty": diff,
              "summary": summary, "paired": paired, "targets": targets(rows, paired, seeds)}
    if sweep:
        budgets = sorted({b for runs in sweep.values() for _, b in runs})
        bounds = [b for s in seeds for b in level_bounds(s, seed_rows[s], budgets,
                                                         difficulty_key=difficulty_key)]
        ceiling = None
        if bounds:
            report["level_bounds"] = {"rows": bounds, "summary": summarise_bounds(bounds)}
            ceiling = {t["budget"]: t["acc_mean"] for t in report["level_bounds"]["summary"]
                       if t["bound"] == "per_difficulty"}
        report["budget_targets"] = sweep_targets(summary, diff, difficulty_key=difficulty_key,
                                                 ceiling=ceiling)
        decoded = sweep_targets(summary, diff, difficulty_key=difficulty_key,
                                policy="chrpo-budget", ceiling=ceiling)
        if decoded["per_budget"]:
            report["budget_decode_targets"] = decoded
    return rundir.strict_json(report)

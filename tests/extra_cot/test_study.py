"""The multi-seed study (experiments/extra_cot/study.py, study_report.py) from synthetic verdicts."""
import json
import os

import numpy as np
import pytest

from experiments.extra_cot import stats, study, study_render, study_report

METHODS = (("base", "-", None), ("extra-cot", "<COMP_20>", 20), ("tokenskip", "<COMP_20>", 20),
           ("policy-warm-start", "<COMP_POLICY>", 20), ("chrpo", "<COMP_POLICY>", 40))


def verdicts(seed, n=200, acc=None):
    """Per-question rows of one seed: each method right on a seeded share of the questions."""
    acc = acc or {"base": 0.7, "extra-cot": 0.68, "tokenskip": 0.1, "policy-warm-start": 0.66,
                  "chrpo": 0.7}
    tokens = {"base": 100, "extra-cot": 20, "tokenskip": 21, "policy-warm-start": 25, "chrpo": 30}
    rng = np.random.default_rng(seed)
    rows = []
    for method, control, level in METHODS:
        right = rng.random(n) < acc[method]
        for i in range(n):
            rows.append({"uid": f"q{i}", "method": method, "control": control,
                         "correct": bool(right[i]), "valid": True, "level": level,
                         "think_length": tokens[method], "difficulty": {"n_steps": 2 + i % 3}})
    return rows


@pytest.fixture(scope="module")
def report():
    return study_report.study_report({s: verdicts(s) for s in (0, 1, 2)}, samples=500)


def test_report_schema(report):
    assert report["seeds"] == [0, 1, 2] and report["n_test"] == 200
    assert len(report["rows"]) == 3 * len(METHODS)
    row = next(r for r in report["rows"] if r["seed"] == 1 and r["method"] == "extra-cot")
    assert set(row) >= {"seed", "method", "control", "budget", "acc", "acc_ci", "act_ratio",
                        "tokens", "n"}
    assert row["control"] == "<COMP_20>" and row["budget"] is None and row["n"] == 200
    assert row["act_ratio"] == pytest.approx(0.2) and row["tokens"] == 20.0
    k = round(row["acc"] * 200)
    assert row["acc_ci"] == list(stats.wilson_interval(k, 200))
    diff = [d for d in report["difficulty"] if d["seed"] == 0 and d["method"] == "chrpo"]
    assert [d["n_steps"] for d in diff] == [2, 3, 4] and sum(d["n"] for d in diff) == 200
    assert all(d["mean_level"] == 40.0 for d in diff)


def test_summary_is_the_mean_over_seeds(report):
    base = next(t for t in report["summary"] if t["method"] == "base")
    accs = [r["acc"] for r in sorted(report["rows"], key=lambda r: r["seed"])
            if r["method"] == "base"]
    mean, lo, hi = stats.mean_interval(accs)
    assert base["acc_by_seed"] == accs and base["acc_mean"] == pytest.approx(mean)
    assert base["acc_ci"] == [pytest.approx(lo), pytest.approx(hi)]
    assert base["acc_spread"] == pytest.approx(max(accs) - min(accs))
    assert report["targets"]["base_acc_mean"] == pytest.approx(mean)
    far = study_report.summarise([{"seed": s, "method": "base", "control": "-", "budget": None,
                                   "acc": a, "act_ratio": 1.0, "tokens": 1.0}
                                  for s, a in enumerate((0.05, 0.9, 0.95))])[0]
    assert far["acc_ci"][0] == 0.0 and far["acc_ci"][1] == 1.0      # clipped to [0, 1]


def test_paired_tests_use_the_same_questions(report):
    p = next(p for p in report["paired"] if p["seed"] == 2 and p["b"]["method"] == "tokenskip")
    rows = verdicts(2)
    a = [r["correct"] for r in rows if r["method"] == "extra-cot"]
    b = [r["correct"] for r in rows if r["method"] == "tokenskip"]
    assert p["diff"] == pytest.approx(np.mean(a) - np.mean(b))
    assert p["p_mcnemar"] == stats.mcnemar(a, b)["p_value"] and p["p_mcnemar"] < 1e-6


def test_targets_per_seed(report):
    t = report["targets"]
    assert t["tokenskip_below_seeds_met"] == 3      # 68% against 10% on 200 questions
    # a seed whose <COMP_20> model is far below the base misses that target
    weak = {"base": 0.8, "extra-cot": 0.5, "tokenskip": 0.1, "policy-warm-start": 0.5,
            "chrpo": 0.5}
    bad = study_report.study_report({0: verdicts(0, acc=weak)}, samples=200)
    assert bad["targets"]["per_seed"][0] == {"seed": 0, "comp20": False,
                                             "tokenskip_below": True, "chrpo": False}


def test_report_files_are_strict_json(tmp_path, report):
    paths = study_render.write_report(report, str(tmp_path))

    def refuse(name):
        raise ValueError(name)
    with open(paths[0]) as f:
        assert json.load(f, parse_constant=refuse)["seeds"] == [0, 1, 2]
    text = open(paths[1]).read()
    assert "| base | - |" in text and "McNemar" in text
    with open(paths[2], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_seed_config():
    from experiments.extra_cot.configs import study as study_config
    c = study_config.get_config()
    one = study.seed_config(c, 4)
    assert one.seed == 4 and one.run_dir.endswith("seed4") and "study" not in one
    assert c.seed == 0 and "study" in c                 # the study's config is untouched


@pytest.mark.slow
def test_study_end_to_end_on_the_test_config(tmp_path, capsys):
    """Two seeds of the CI pipeline and their budget sweep (one budget, three methods),
    then the report; a re-run reuses every stage."""
    from experiments import cli
    root = str(tmp_path / "study")
    args = ["--config=experiments/extra_cot/configs/study.py:test", "--config.study.seeds=0,1",
            f"--config.study.root={root}", f"--config.study.out_dir={root}/report"]
    report = study.main(cli.parse(args))
    assert report["seeds"] == [0, 1] and report["n_test"] == 12
    with open(f"{root}/report/study.json") as f:
        on_disk = json.load(f, parse_constant=lambda name: pytest.fail(f"{name} in study.json"))
    assert on_disk["seeds"] == [0, 1] and {r["seed"] for r in on_disk["rows"]} == {0, 1}
    methods = {r["method"] for r in on_disk["rows"] if r["budget"] is None}
    assert methods == {"base", "extra-cot", "tokenskip", "policy-warm-start", "chrpo"}
    swept = {(r["method"], r["budget"]) for r in on_disk["rows"] if r["budget"] is not None}
    assert swept == {("chrpo", 0.3), ("lcpo", 0.3), ("length-penalty", 0.3),
                     ("policy-warm-start", 0.3), ("chrpo-budget", 0.3)}
    assert [e["budget"] for e in on_disk["budget_targets"]["per_budget"]] == [0.3]
    assert [e["budget"] for e in on_disk["budget_decode_targets"]["per_budget"]] == [0.3]
    with open(f"{root}/seed1/sweep/b0.3-chrpo/evaluate/results.json") as f:
        decode = json.load(f)["budget_decode"]
    assert decode["budget"] == 0.3 and decode["val_questions"] > 0
    costs = decode["level_costs"].values()       # the tiny model's: B may be out of reach
    assert min(costs) - 1e-6 <= decode["val_planned_ratio"] <= max(costs) + 1e-6
    if min(costs) <= 0.3 <= max(costs):
        assert abs(decode["val_planned_ratio"] - 0.3) <= max(costs) / decode["val_questions"]
    lcpo_run = f"{root}/seed1/sweep/b0.3-lcpo"
    with open(f"{lcpo_run}/config.json") as f:
        saved = json.load(f)
    assert saved["rl"]["objective"]["kind"] == "lcpo-exact" and saved["rl"]["budget"] == 0.3
    assert os.path.islink(f"{lcpo_run}/sft_mixed") and os.path.islink(f"{lcpo_run}/sft_policy")
    assert os.path.exists(f"{root}/seed1/sweep/b0.3-chrpo/rl/budget.png")
    for seed in (0, 1):
        with open(f"{root}/seed{seed}/config.json") as f:
            assert json.load(f)["seed"] == seed
    capsys.readouterr()
    study.main(cli.parse(args))                          # everything is done: only the report
    out = capsys.readouterr().out
    # per seed: 11 pipeline stages, the sweep's calibrate, sft_policy and 3 x (rl, evaluate)
    assert out.count("done, skipping") == 2 * (11 + 1 + 1 + 3 * 2) and "running" not in out


def sweep_verdicts(seed, n=200):
    """A seed's sweep: CHRPO (and a peer) at two budgets, with their own base rows."""
    rng = np.random.default_rng(100 + seed)
    runs = {}
    for method, budget, acc, level, tokens in (
            ("chrpo", 0.3, 0.72, (20, 60), 30), ("lcpo", 0.3, 0.6, (40, 40), 31),
            ("chrpo", 0.6, 0.75, (40, 80), 60), ("lcpo", 0.6, 0.7, (60, 60), 61)):
        rows = [r for r in verdicts(seed, n) if r["method"] in ("base", "policy-warm-start")]
        right = rng.random(n) < acc
        rows += [{"uid": f"q{i}", "method": "chrpo", "control": "<COMP_POLICY>",
                  "correct": bool(right[i]), "valid": True,
                  "level": level[0] if i % 3 == 0 else level[1], "think_length": tokens,
                  "difficulty": {"n_steps": 2 + i % 3}} for i in range(n)]
        if method == "chrpo":      # its budget decode: at the budget, levels 20 / 100
            decoded = rng.random(n) < acc - 0.05
            rows += [{"uid": f"q{i}", "method": "chrpo-budget", "control": "<COMP_POLICY>",
                      "correct": bool(decoded[i]), "valid": True,
                      "level": 20 if i % 3 == 0 else 100, "think_length": tokens + 1,
                      "difficulty": {"n_steps": 2 + i % 3}} for i in range(n)]
        runs[(method, budget)] = rows
    return runs


def test_sweep_rows_in_the_report():
    seeds = (0, 1, 2)
    report = study_report.study_report({s: verdicts(s) for s in seeds}, samples=200,
                                       sweep={s: sweep_verdicts(s) for s in seeds})
    swept = [r for r in report["rows"] if r["budget"] is not None]
    assert {(r["method"], r["budget"]) for r in swept} == {
        ("chrpo", 0.3), ("lcpo", 0.3), ("chrpo", 0.6), ("lcpo", 0.6),
        ("policy-warm-start", 0.3), ("policy-warm-start", 0.6),
        ("chrpo-budget", 0.3), ("chrpo-budget", 0.6)}
    row = next(r for r in swept if r["seed"] == 1 and r["method"] == "chrpo"
               and r["budget"] == 0.3)
    assert row["act_ratio"] == pytest.approx(0.3) and row["n"] == 200
    # a sweep run's base rows are the ActRatio reference, not rows of their own
    assert sum(r["method"] == "base" for r in report["rows"]) == 3
    pair = next(p for p in report["paired"] if p["seed"] == 0 and p["budget"] == 0.3
                and p["b"]["method"] == "lcpo")
    runs = sweep_verdicts(0)
    a = [r["correct"] for r in runs[("chrpo", 0.3)] if r["method"] == "chrpo"]
    b = [r["correct"] for r in runs[("lcpo", 0.3)] if r["method"] == "chrpo"]
    assert pair["diff"] == pytest.approx(np.mean(a) - np.mean(b))
    t = {e["budget"]: e for e in report["budget_targets"]["per_budget"]}
    assert set(t) == {0.3, 0.6}
    assert t[0.3]["budget_met"] and t[0.6]["budget_met"]          # ActRatio 0.3 and 0.6
    # levels: 20 on n_steps 2 (i % 3 == 0), 60 on 3 and 4: the hardest minus the easiest
    assert t[0.3]["level_gap"] == pytest.approx(40.0) and t[0.3]["adaptive"]
    assert "level_gap" not in t[0.6]
    assert t[0.3]["vs_peers"]["lcpo"]["acc_diff"] == pytest.approx(
        next(s for s in report["summary"] if s["method"] == "chrpo" and s["budget"] == 0.3)
        ["acc_mean"] - next(s for s in report["summary"] if s["method"] == "lcpo"
                            and s["budget"] == 0.3)["acc_mean"])
    # the budget decode: its own targets, paired against the greedy policy and the peers
    d = {e["budget"]: e for e in report["budget_decode_targets"]["per_budget"]}
    assert d[0.3]["act_ratio"] == pytest.approx(0.31) and d[0.3]["budget_met"]
    assert d[0.3]["level_gap"] == pytest.approx(80.0) and set(d[0.3]["vs_peers"]) == {"lcpo"}
    pairs = {(p["a"]["method"], p["b"]["method"]) for p in report["paired"]
             if p["seed"] == 2 and p["budget"] == 0.6}
    assert pairs == {("chrpo", "lcpo"), ("chrpo-budget", "lcpo"), ("chrpo", "base"),
                     ("chrpo-budget", "base"), ("chrpo-budget", "chrpo")}
    text = study_render.markdown(report)
    assert "Budget targets of CHRPO decoded under its budget" in text
    # the level by difficulty, per seed: one line per seed, policy and budget
    levels = [r for r in report["difficulty"] if r["seed"] == 2 and r["budget"] == 0.3
              and r["method"] == "chrpo-budget"]
    want = "; ".join(f"{r['n_steps']}: {r['mean_level']:.1f} ({100 * r['acc']:.1f}%)"
                     for r in sorted(levels, key=lambda r: r["n_steps"]))
    assert len(levels) >= 2 and f"| 2 | chrpo-budget | 0.3 | {want} |" in text
    json.dumps(report, allow_nan=False)


def test_frontier_interpolates_the_fixed_levels():
    summary = [{"method": "extra-cot", "budget": None, "act_ratio_mean": x, "acc_mean": y}
               for x, y in ((0.2, 0.80), (0.4, 0.84), (0.6, 0.90))]
    summary.append({"method": "chrpo", "budget": None, "act_ratio_mean": 0.3, "acc_mean": 0.1})
    assert study_report.frontier(summary, 0.3) == pytest.approx(0.82)
    assert study_report.frontier(summary, 0.5) == pytest.approx(0.87)
    assert study_report.frontier(summary, 0.1) == pytest.approx(0.80)     # held flat at the ends
    assert study_report.frontier([], 0.3) is None


def test_link_stages_and_sweep_config(tmp_path):
    from experiments.extra_cot.configs import study as study_config
    src = tmp_path / "seed0"
    (src / "data").mkdir(parents=True)
    (src / "data" / "done.json").write_text("{}")
    study.link_stages(str(src), str(tmp_path / "sweep"), ("data",))
    study.link_stages(str(src), str(tmp_path / "sweep"), ("data",))   # again: kept
    assert (tmp_path / "sweep" / "data" / "done.json").exists()
    with pytest.raises(FileNotFoundError, match="sft_base"):
        study.link_stages(str(src), str(tmp_path / "sweep"), ("sft_base",))
    c = study_config.get_config()
    one = study.sweep_config(c, 1, str(tmp_path / "x"), budget=0.3, method="lcpo",
                             stage="rl,evaluate")
    assert one.seed == 1 and one.rl.budget == 0.3 and one.rl.objective.kind == "lcpo-exact"
    assert one.rl.budget_targets == "allocation" and one.rl.budget_controller == "pid"
    assert one.rl.forced_levels == (20, 40, 60, 80, 100) and one.rl.forced_samples == 1
    assert one.rl.objective.ratio_width == c.rl.objective.ratio_width
    # the sweep's warm start: its steps (the schedule follows) and level-token weight
    assert (one.sft_policy.steps, one.sft_policy.optim.total_steps,
            one.sft_policy.control_weight) == (200, 200, 10.0)
    assert c.sft_policy.steps == 40            # the seed's own pipeline keeps its warm start
    ours = study.sweep_config(c, 1, str(tmp_path / "y"), budget=0.3, method="chrpo", stage="rl")
    assert ours.rl.objective.global_mode == "advantage" and ours.rl.objective.bonus_shape == "peak"
    assert ours.rl.objective.estimator == "hierarchical"
    assert ours.evaluate.budget_decode and not one.evaluate.budget_decode
    from experiments.extra_cot.configs import pipeline_blocks
    pipeline_blocks.validate(ours)
    pipeline_blocks.validate(one)


def test_sweep_markdown_lists_every_run():
    text = study_render.sweep_markdown({0: sweep_verdicts(0)})
    lines = text.strip().splitlines()
    assert len(lines) == 2 + 4 + 2                  # 4 runs, CHRPO's two with a budget decode
    assert "| 0 | chrpo | 0.3 |" in text and "| 0 | lcpo | 0.6 |" in text
    assert "| 0 | chrpo-budget | 0.6 |" in text
    assert "2: 20.0, 3: 60.0, 4: 60.0" in text        # chrpo at 0.3: levels by n_steps


def bound_rows(buckets):
    """Two questions answered by the base (10 think tokens) and at <COMP_20> / <COMP_60>
    (2 / 6 tokens): q0 right at both levels, q1 right at <COMP_60> only."""
    rows = []
    for i, d in enumerate(buckets):
        rows.append({"uid": f"q{i}", "method": "base", "control": "-", "correct": True,
                     "valid": True, "level": None, "think_length": 10,
                     "difficulty": {"n_steps": d}})
        for control, tokens in (("<COMP_60>", 6), ("<COMP_20>", 2)):     # out of level order
            rows.append({"uid": f"q{i}", "method": "extra-cot", "control": control,
                         "correct": i == 0 or control == "<COMP_60>", "valid": True,
                         "level": int(control[6:8]), "think_length": tokens,
                         "difficulty": {"n_steps": d}})
    return rows


def test_level_bounds_by_hand():
    # different difficulties: the easy question at <COMP_20>, the hard one at <COMP_60>:
    # ActRatio (0.2 + 0.6) / 2 = 0.4, both right, on either bound
    got = {(b["bound"], b["budget"]): b
           for b in study_report.level_bounds(0, bound_rows([1, 2]), [0.2, 0.4])}
    for bound in ("per_question", "per_difficulty"):
        assert got[bound, 0.4]["acc"] == 1.0 and got[bound, 0.4]["act_ratio"] == pytest.approx(0.4)
        assert got[bound, 0.4]["mean_level"] == {"1": 20.0, "2": 60.0}
        assert got[bound, 0.2]["acc"] == 0.5 and got[bound, 0.2]["act_ratio"] == pytest.approx(0.2)
    # one difficulty: the per-question bound still finds the hard one, the bucket cannot
    # tell them apart and moves the first question (row order) to <COMP_60>
    got = {(b["bound"], b["budget"]): b
           for b in study_report.level_bounds(0, bound_rows([2, 2]), [0.4])}
    assert got["per_question", 0.4]["acc"] == 1.0
    assert got["per_difficulty", 0.4]["acc"] == 0.5
    assert got["per_difficulty", 0.4]["act_ratio"] == pytest.approx(0.4)
    assert got["per_difficulty", 0.4]["mean_level"] == {"2": 40.0}
    # no fixed levels, or a base model without think tokens: no bound
    assert study_report.level_bounds(0, [r for r in bound_rows([1]) if r["method"] == "base"],
                                     [0.3]) == []
    silent = [{**r, "think_length": 0} if r["method"] == "base" else r for r in bound_rows([1])]
    assert study_report.level_bounds(0, silent, [0.3]) == []


def test_level_bounds_in_the_report(tmp_path):
    seeds = (0, 1, 2)
    rows = {s: verdicts(s) for s in seeds}
    report = study_report.study_report(rows, samples=200,
                                       sweep={s: sweep_verdicts(s) for s in seeds})
    assert report["difficulty_key"] == "n_steps"
    bounds = report["level_bounds"]
    assert {(b["bound"], b["budget"], b["seed"]) for b in bounds["rows"]} == {
        (k, b, s) for k in ("per_question", "per_difficulty") for b in (0.3, 0.6) for s in seeds}
    for b in bounds["rows"]:
        # one fixed level (<COMP_20>, ActRatio 0.2) in these verdicts: the bound is it
        c20 = next(r for r in report["rows"] if r["seed"] == b["seed"]
                   and r["method"] == "extra-cot" and r["budget"] is None)
        assert b["acc"] == pytest.approx(c20["acc"]) and b["act_ratio"] == pytest.approx(0.2)
    s = next(t for t in bounds["summary"] if t["bound"] == "per_question" and t["budget"] == 0.3)
    accs = [b["acc"] for b in bounds["rows"] if b["bound"] == "per_question"
            and b["budget"] == 0.3]
    assert s["acc_mean"] == pytest.approx(np.mean(accs))
    # each budget target names the policy's margin over the per-difficulty ceiling
    ceiling = next(t for t in bounds["summary"] if t["bound"] == "per_difficulty"
                   and t["budget"] == 0.3)["acc_mean"]
    entry = next(e for e in report["budget_decode_targets"]["per_budget"] if e["budget"] == 0.3)
    assert entry["ceiling_margin"] == pytest.approx(entry["acc"] - ceiling)
    text = study_render.markdown(report)
    assert "| 0.3 | per_question | " + f"{100 * s['acc_mean']:.1f}" in text
    assert f"| {100 * entry['ceiling_margin']:+.1f} | " in text
    paths = study_render.write_report(report, str(tmp_path))     # the plot draws the ceilings
    assert os.path.getsize(paths[2]) > 0
    assert json.load(open(paths[0]))["level_bounds"]["summary"] == bounds["summary"]

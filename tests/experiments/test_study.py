"""The multi-seed study's report (experiments/study.py) from synthetic per-question verdicts."""
import json

import numpy as np
import pytest

from experiments import stats, study

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
    return study.study_report({s: verdicts(s) for s in (0, 1, 2)}, samples=500)


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
    far = study.summarise([{"seed": s, "method": "base", "control": "-", "budget": None,
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
    bad = study.study_report({0: verdicts(0, acc={"base": 0.8, "extra-cot": 0.5, "tokenskip": 0.1,
                                                  "policy-warm-start": 0.5, "chrpo": 0.5})},
                             samples=200)
    assert bad["targets"]["per_seed"][0] == {"seed": 0, "comp20": False,
                                             "tokenskip_below": True, "chrpo": False}


def test_report_files_are_strict_json(tmp_path, report):
    paths = study.write_report(report, str(tmp_path))

    def refuse(name):
        raise ValueError(name)
    with open(paths[0]) as f:
        assert json.load(f, parse_constant=refuse)["seeds"] == [0, 1, 2]
    text = open(paths[1]).read()
    assert "| base | - |" in text and "McNemar" in text
    with open(paths[2], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_seed_config():
    from experiments.configs import study as study_config
    c = study_config.get_config()
    one = study.seed_config(c, 4)
    assert one.seed == 4 and one.run_dir.endswith("seed4") and "study" not in one
    assert c.seed == 0 and "study" in c                 # the study's config is untouched


@pytest.mark.slow
def test_study_end_to_end_on_the_test_config(tmp_path, capsys):
    """Two seeds of the CI pipeline, then the report; a re-run reuses every stage."""
    from experiments import cli
    root = str(tmp_path / "study")
    args = ["--config=experiments/configs/study.py:test", "--config.study.seeds=0,1",
            f"--config.study.root={root}", f"--config.study.out_dir={root}/report"]
    report = study.main(cli.parse(args))
    assert report["seeds"] == [0, 1] and report["n_test"] == 12
    with open(f"{root}/report/study.json") as f:
        on_disk = json.load(f, parse_constant=lambda name: pytest.fail(f"{name} in study.json"))
    assert on_disk["seeds"] == [0, 1] and {r["seed"] for r in on_disk["rows"]} == {0, 1}
    methods = {r["method"] for r in on_disk["rows"]}
    assert methods == {"base", "extra-cot", "tokenskip", "policy-warm-start", "chrpo"}
    for seed in (0, 1):
        with open(f"{root}/seed{seed}/config.json") as f:
            assert json.load(f)["seed"] == seed
    capsys.readouterr()
    study.main(cli.parse(args))                          # everything is done: only the report
    out = capsys.readouterr().out
    assert out.count("done, skipping") == 2 * 11 and "running" not in out

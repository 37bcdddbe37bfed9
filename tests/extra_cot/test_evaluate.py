"""Evaluation tables: accuracy, think tokens, ActRatio against the base model; plots."""
import os

import ml_collections
import numpy as np
import pytest

from data.formats import LEVELS, POLICY
from experiments.extra_cot.evaluate import (_plots, difficulty_profile, markdown_table, method_plan,
                                  results_table, undrawable)


def row(method, control, correct, think, level=None, steps=2, valid=True):
    return {"uid": f"q{think}", "method": method, "control": control, "correct": correct,
            "valid": valid, "think_length": think, "level": level,
            "difficulty": {"n_steps": steps}}


ROWS = [row("base", "-", True, 200, steps=2), row("base", "-", False, 100, steps=3),
        row("extra-cot", "<COMP_20>", True, 40, 20, steps=2),
        row("extra-cot", "<COMP_20>", True, 20, 20, steps=3),
        row("chrpo", "<COMP_POLICY>", True, 30, 20, steps=2),
        row("chrpo", "<COMP_POLICY>", False, 60, 60, steps=3, valid=False)]


def test_results_table_hand_computed():
    table = {(t["method"], t["control"]): t for t in results_table(ROWS)}
    base = table[("base", "-")]
    assert base["accuracy"] == 0.5 and base["think_tokens"] == 150.0 and base["act_ratio"] == 1.0
    ext = table[("extra-cot", "<COMP_20>")]
    assert ext["accuracy"] == 1.0 and ext["think_tokens"] == 30.0
    assert ext["act_ratio"] == pytest.approx(30 / 150)
    pol = table[("chrpo", "<COMP_POLICY>")]
    assert pol["valid"] == 0.5 and pol["mean_level"] == 40.0
    assert pol["act_ratio"] == pytest.approx(45 / 150)
    lo, hi = base["acc_ci"]                        # 1 of 2 correct, Wilson 95%
    assert lo < 0.5 < hi and lo == pytest.approx(0.0945, abs=1e-4)


def test_results_json_is_strict(tmp_path):
    import json

    from experiments.extra_cot.evaluate import _write_tables
    rows = [row("base", "-", True, 0), row("base", "-", False, 0)]   # 0 base tokens: no ratio
    table = results_table(rows)
    assert table[0]["act_ratio"] != table[0]["act_ratio"]            # NaN in memory
    _write_tables(str(tmp_path), "test", table, {"chrpo": [], "base": []})

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    with open(tmp_path / "results.json") as f:
        out = json.load(f, parse_constant=refuse)
    assert out["table"][0]["act_ratio"] is None and out["table"][0]["mean_level"] is None


def test_results_table_needs_base():
    with pytest.raises(ValueError, match="base"):
        results_table(ROWS[2:])


def test_markdown_has_one_line_per_method_and_level():
    text = markdown_table(results_table(ROWS))
    lines = text.splitlines()
    assert len(lines) == 2 + 3
    # 2 of 2 correct: Wilson interval [2 / (2 + z^2), 1] = [34.2%, 100%]
    assert "| extra-cot | <COMP_20> | 100.0 | 34.2-100.0 | 30.0 | 0.200 | 100.0 | 2 |" in lines


def test_difficulty_profile():
    prof = difficulty_profile(ROWS, method="chrpo", key="n_steps")
    assert [p["n_steps"] for p in prof] == [2, 3]
    assert [p["mean_level"] for p in prof] == [20.0, 60.0]
    assert [p["think_tokens"] for p in prof] == [30.0, 60.0]
    assert [p["accuracy"] for p in prof] == [1.0, 0.0]


def test_method_plan_covers_every_level_and_mode():
    block = ml_collections.ConfigDict({"levels": LEVELS, "tokenskip_levels": (20,)})
    plan = method_plan(block)
    assert plan[0] == ("base", None)
    assert [c for m, c in plan if m == "extra-cot"] == list(LEVELS)
    assert [c for m, c in plan if m == "tokenskip"] == [20]
    assert ("chrpo", POLICY) in plan and ("policy-warm-start", POLICY) in plan


def test_plots_are_written(tmp_path):
    paths = _plots(results_table(ROWS), ROWS, str(tmp_path), "n_steps")
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert len(paths) == 2


def test_rows_with_nothing_to_place_are_named_and_the_plots_still_drawn(tmp_path):
    """A base model with no valid think tokens leaves every ActRatio NaN: the plot says
    so in a note (undrawable) instead of coming out empty without a word."""
    invalid = [{**r, "think_length": 0, "valid": r["method"] != "base"} for r in ROWS]
    table = results_table(invalid)
    assert all(not np.isfinite(t["act_ratio"]) for t in table)
    assert undrawable(table) == [f"{t['method']} {t['control']}" for t in table]
    assert undrawable(results_table(ROWS)) == []
    no_difficulty = [{**r, "difficulty": {}} for r in invalid]    # e.g. benchmark rows
    paths = _plots(table, no_difficulty, str(tmp_path), "n_steps")
    assert [os.path.getsize(p) > 0 for p in paths] == [True, True]


def test_a_killed_evaluation_resumes_at_the_first_unfinished_method(tmp_path, monkeypatch,
                                                                    small_tok):
    from data.arithmetic import ArithmeticConfig, generate_problems
    from experiments import cli, rundir
    from experiments.extra_cot import evaluate as ev
    from experiments.extra_cot.datasets import question_row
    from experiments.extra_cot.rollouts import Judged

    run = rundir.Run(str(tmp_path / "run"))
    rows = [question_row(p) for p in generate_problems(4, 5, ArithmeticConfig(max_steps=2))]
    os.makedirs(run.path("data"))
    rundir.write_jsonl(run.path("data", "test.jsonl"), rows)
    monkeypatch.setattr(rundir.Run, "tokenizer", lambda self: small_tok)
    monkeypatch.setattr(ev.rundir, "load_model", lambda path: path)
    monkeypatch.setattr(ev, "place_model", lambda model, mesh: model)
    calls, kill = [], {"at": None}

    def answer(model, tok, questions, *, control, **kwargs):
        if kill["at"] is not None and len(calls) == kill["at"]:
            kill["at"] = None
            raise KeyboardInterrupt          # the process dies inside this method
        calls.append(control)
        return [Judged(True, i % 2 == 0, None if control is None else 20, 10 + i, ())
                for i in range(len(questions))]
    monkeypatch.setattr(ev, "answer_questions", answer)

    def config(*extra):
        return cli.parse(["--config=experiments/extra_cot/configs/test.py",
                          f"--config.run_dir={run.root}", *extra])
    plan = [c for _, c in ev.method_plan(config().evaluate)]
    kill["at"] = 3
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(config(), run)
    assert calls == plan[:3]
    # other settings: the partial answers are not theirs and are not read
    ev.evaluate(config("--config.evaluate.num_questions=3"), run)
    assert calls == plan[:3] + plan
    assert len(rundir.read_jsonl(run.path("evaluate", "responses.jsonl"))) == 3 * len(plan)
    assert not os.path.exists(run.path("evaluate", "partial"))   # gone once done
    # killed in the 4th method, resumed there: methods 1-3 read back
    calls.clear()
    kill["at"] = 3
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(config(), run)
    ev.evaluate(config(), run)
    assert calls == plan[:3] + plan[3:]
    got = rundir.read_jsonl(run.path("evaluate", "responses.jsonl"))
    assert len(got) == 5 * len(plan) and {r["uid"] for r in got} == {r["uid"] for r in rows}
